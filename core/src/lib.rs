//! `kvroute-core`: kvroute's routing core, with no networking and no OS clock.
//!
//! Bytes, a replica-set snapshot and `now` go in; a decision comes out.
//! [`prompt`] extracts the prompt from a request body, [`prefix`] hashes it in
//! prefix-chained blocks, [`index`] mirrors what each replica's KV cache holds,
//! [`route`] holds the policies, [`replica`] the swappable replica set and its
//! in-flight accounting, [`ejection`] passive health, and [`hot`] the sampling
//! of hot prefixes for warming a standby.
//!
//! The data plane (`kvroute`) owns the sockets, the runtime and the clock: it
//! resolves replica URLs before they reach [`replica::ReplicaTable`], passes
//! clock values in, and reads the routers' state ([`route::RouterStats`],
//! [`route::RouteObserver`]) into its metrics. Because nothing here blocks or
//! reads a clock, every policy is unit- and property-tested on a fake clock.
//!
//! `unsafe` lives only in `sys` (the SIMD and AES kernels, each entry under a
//! `// SAFETY:` comment).
// The clock and DNS calls clippy.toml lists are banned in the whole crate.
#![deny(clippy::disallowed_methods)]

pub mod ejection;
pub mod endpoint;
pub mod error;
pub mod hot;
pub mod index;
pub mod prefix;
pub mod prompt;
pub mod replica;
pub mod route;
mod sys;

pub use error::Error;
