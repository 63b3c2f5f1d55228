//! The benchmarks whose figures the README quotes, and what they run on.
//!
//! Each benchmark is a module with a clap `Args` and a `run(args)`, dispatched by
//! `cargo xtask bench proxy|routing|footprint|tls|drills`:
//!
//! - [`proxy`]: proxy overhead, kvroute vs nginx, HAProxy, SGLang's router, direct
//! - [`routing`]: routing quality on the shared trace, kvroute policies vs SGLang's router
//!   (on simulated replicas, or on llama.cpp's server through [`llama_routing`])
//! - [`footprint`]: binary size, start-to-ready and memory, vs nginx and HAProxy
//! - [`tls`]: TLS termination, handshakes and keep-alive requests, vs nginx
//! - [`drills`]: failures under load (a replica or the control daemon killed, a rolling
//!   upgrade, a connection flood, a garbage replica)
//!
//! Beside them: [`fleet`] (the replicas, routers and load generator a run starts, also
//! what `cargo xtask demo` runs), [`replay`] (the routing core replayed offline on a
//! simulated fleet), [`llama`] (llama.cpp's server and test model, built and cached),
//! [`trace`] (the vendored trace), [`report`] (writing and publishing the reports) and
//! [`procs`] (cargo, git and the workspace's paths).
#![forbid(unsafe_code)]

pub mod drills;
pub mod fleet;
pub mod footprint;
pub mod llama;
pub mod llama_routing;
pub mod procs;
pub mod proxy;
pub mod replay;
pub mod report;
pub mod routing;
pub mod tls;
pub mod trace;
