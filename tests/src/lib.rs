//! `kvroute-tests`: the instruments kvroute is measured and tested with.
//!
//! - `sim`: `kvroute-sim`, a simulated vLLM-like replica (KV cache, timing, metrics, KV events)
//! - `load`: `kvroute-load`, a Mooncake trace replayer and synthetic load generator
//! - `harness`: helpers for end-to-end tests that start the real binaries on loopback
#![forbid(unsafe_code)]

pub mod load;
