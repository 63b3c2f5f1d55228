//! Helpers shared by the end-to-end tests (`kvroute-tests`) and the bench and demo
//! runner (`xtask`), which used to carry a copy each:
//!
//! - [`port`]: loopback ports that were free a moment ago, never the same one twice
//!   in one process;
//! - [`metrics_text`]: a Prometheus text exposition (`/metrics`) parsed into samples,
//!   with lookups by name and labels and sums over a label;
//! - [`child`]: a supervised child process, killed and reaped on drop, with bounded
//!   waits for its exit and its readiness.

#![forbid(unsafe_code)]

pub mod child;
pub mod metrics_text;
pub mod port;
