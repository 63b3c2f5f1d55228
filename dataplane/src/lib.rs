//! `kvroute`: a KV-cache-aware, thread-per-core reverse proxy for LLM inference replicas.
//!
//! The deterministic core (HTTP framing, routing, replica state) takes bytes,
//! snapshots and clock values and never touches a socket; the I/O around it lives
//! in `io`, `worker` and `server`. See ARCHITECTURE.md for the whole design.

pub mod admin;
pub mod error;
pub mod index;
pub mod prefix;
pub mod prompt;
pub mod replica;
pub mod route;

pub use error::Error;
