//! `kvroute-tests`: the instruments kvroute is measured and tested with.
//!
//! - `sim`: `kvroute-sim`, a simulated vLLM-like replica (KV cache, timing, metrics, KV events)
//! - `load`: `kvroute-load`, a Mooncake trace replayer and synthetic load generator
//! - `harness`: helpers for end-to-end tests that start the real binaries on loopback
//! - `pki`: test certificates (a CA and server certificates it signs), made with rcgen
//! - `llama`: real llama.cpp replicas (`llama-server`) for end-to-end tests and benchmarks
//! - `zmtp_relay`: a ZeroMQ relay that drops chosen messages, for KV-event gap tests
#![forbid(unsafe_code)]

pub mod harness;
pub mod llama;
pub mod load;
pub mod pki;
pub mod sim;
pub mod zmtp_relay;
