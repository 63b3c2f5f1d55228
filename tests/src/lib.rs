//! `kvroute-tests`: the end-to-end tests of kvroute's real binaries and what they run on.
//! The simulated replica and the load generator they start are `kvroute-sim` and
//! `kvroute-load`.
//!
//! - `harness`: helpers for end-to-end tests that start the real binaries on loopback
//! - `pki`: test certificates (a CA and server certificates it signs), made with rcgen
//! - `llama`: real llama.cpp replicas (`llama-server`) for end-to-end tests and benchmarks
//! - `zmtp_relay`: a ZeroMQ relay that drops chosen messages, for KV-event gap tests
#![forbid(unsafe_code)]

pub mod harness;
pub mod llama;
pub mod pki;
pub mod zmtp_relay;
