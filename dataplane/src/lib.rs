//! `kvroute`: a KV-cache-aware, thread-per-core reverse proxy for LLM inference replicas.
//!
//! The deterministic core (`http` framing, `prompt` extraction, `prefix` hashing,
//! the prefix `index`, `route` policies, `replica` state) takes bytes, snapshots
//! and clock values and never touches a socket; the I/O around it lives in `io`
//! (the io_uring/epoll boundary), `worker`, `proxy` and `server`.
//! See docs/architecture.md for the whole design.
// deny, not forbid: `sys` is the one module allowed unsafe.
#![deny(unsafe_code)]
// The clock and DNS calls clippy.toml lists are denied in the routing-core
// modules only (see there); the I/O around the core uses them.
#![allow(clippy::disallowed_methods)]

pub mod admin;
pub mod admission;
pub mod auth;
pub mod budget;
pub mod cache;
pub mod config;
pub mod ejection;
pub mod error;
pub mod hot;
pub mod http;
pub mod index;
pub mod io;
pub mod metrics;
pub mod models;
pub mod notify;
pub mod pool;
pub mod prefix;
pub mod prompt;
pub mod proxy;
pub mod replica;
pub mod resolve;
pub mod route;
pub mod server;
pub mod steer;
mod sys;
pub mod tls;
pub mod worker;

pub use error::Error;
