//! The wire types of kvroute's admin API, shared by the data plane (`kvroute`)
//! and the control daemon (`kvroute-control`), so both ends use one definition
//! and the daemon links none of the data plane's runtime, BPF or TLS crates.
//! serde is the only dependency.
//!
//! Endpoints (HTTP/1.1 on the admin Unix socket or loopback TCP):
//! - `GET /healthz` → `ok`
//! - `GET /metrics` → Prometheus text
//! - `GET /state` → [`State`]
//! - `PUT /replicas` with [`ReplicasUpdate`] → [`State`] (atomic replacement)
//! - `PUT /load` with [`LoadUpdate`] → [`LoadApplied`] (scraped load, at scrape rate)
//! - `POST /replicas/clear` with [`ClearRequest`] → [`ClearApplied`] (the replica lost its KV cache)
//! - `GET /hot-prefixes?limit=N` → [`HotPrefixes`] (what a standby should be pre-warmed with)
//!
//! One control daemon per set of data planes is the model: the data plane applies
//! whatever it is sent, and records who pushed last and when ([`PushRecord`] in
//! [`State::last_push`]) so a second daemon fighting the first shows up.

#![forbid(unsafe_code)]

mod replica;
mod state;
mod update;

pub use replica::{ExternalLoad, Pool, ReplicaSpec, ReplicaUrl, ReplicaUrlError};
pub use state::{
    ConnectionBudget, EjectionState, LearnedSpeed, ReplicaState, State, SteeringState,
    SteeringWorker, WorkerState,
};
pub use update::{
    ClearApplied, ClearRequest, HotPrefix, HotPrefixes, LoadApplied, LoadUpdate, PushRecord,
    ReplicaLoad, ReplicasUpdate,
};
