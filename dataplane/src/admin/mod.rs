//! Admin API types, shared with `kvroute-control` so both ends use one definition.
//!
//! Endpoints (HTTP/1.1 on the admin Unix socket or loopback TCP):
//! - `GET /healthz` → `ok`
//! - `GET /metrics` → Prometheus text
//! - `GET /state` → [`State`]
//! - `PUT /replicas` with [`ReplicasUpdate`] → [`State`] (atomic replacement)

use serde::{Deserialize, Serialize};

pub mod server;

use crate::replica::{ExternalLoad, Pool, ReplicaSpec};

/// Body of `PUT /replicas`: the complete new replica set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicasUpdate {
    pub replicas: Vec<ReplicaSpec>,
}

/// Body of `GET /state`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub version: String,
    pub policy: String,
    pub io: String,
    pub generation: u64,
    pub draining: bool,
    pub workers: Vec<WorkerState>,
    pub replicas: Vec<ReplicaState>,
    /// Connection steering: mode, whether the BPF program is attached, live streams per worker.
    #[serde(default)]
    pub steering: crate::steer::SteeringState,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerState {
    pub id: usize,
    /// Client connections open on this worker.
    pub connections: u64,
    /// Requests being served (streams included).
    pub active_requests: u64,
    pub requests_total: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaState {
    pub url: String,
    pub slot: u16,
    pub models: Vec<String>,
    pub pool: Pool,
    pub healthy: bool,
    pub in_flight: u32,
    pub requests_total: u64,
    /// Failed attempts (connect/reset/timeout), the passive health signal.
    pub failures_total: u64,
    pub external_load: ExternalLoad,
}
