//! `kvroute`: a KV-cache-aware, thread-per-core reverse proxy for LLM inference replicas.
//!
//! The routing core (`prompt` extraction, `prefix` hashing, the prefix `index`,
//! `route` policies, the `replica` set, `ejection`, `hot` prefixes) is the
//! `kvroute-core` crate, re-exported here under the same paths: it takes bytes,
//! snapshots and clock values and never touches a socket. This crate is the I/O
//! around it: `http` framing, `io` (the io_uring/epoll boundary), `worker`,
//! `proxy`, `server`, `admin`, `steer`, and `resolve`, which turns replica URLs
//! into the addresses the core takes.
//! See docs/architecture.md for the whole design.
// deny, not forbid: `sys` is the one module allowed unsafe.
#![deny(unsafe_code)]

pub use kvroute_core::{ejection, endpoint, hot, index, prefix, prompt, replica, route};

pub mod admin;
pub mod admission;
pub mod auth;
pub mod budget;
pub mod cache;
pub mod config;
pub mod error;
pub mod http;
pub mod io;
pub mod metrics;
pub mod models;
pub mod notify;
pub mod pool;
pub mod proxy;
pub mod resolve;
pub mod server;
pub mod state;
pub mod steer;
mod sys;
pub mod tls;
pub mod worker;

pub use error::Error;
