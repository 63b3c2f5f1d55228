//! Admin API types, shared with `kvroute-control` so both ends use one definition.
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

use serde::{Deserialize, Serialize};

pub mod server;

use crate::replica::{ExternalLoad, Pool, ReplicaSpec};

/// Body of `PUT /replicas`: the complete new replica set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicasUpdate {
    pub replicas: Vec<ReplicaSpec>,
    /// Who sends this (e.g. `kvroute-control@host`); recorded in [`State::last_push`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// Who replaced the replica set last, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushRecord {
    /// [`ReplicasUpdate::source`], or `"unknown"` when the pusher did not say.
    pub source: String,
    /// Wall-clock milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// Replica-set generation the push produced.
    pub generation: u64,
    /// Pushes in this process's life, from every source.
    pub pushes_total: u64,
    /// Distinct sources seen pushing in this process's life (the last 16): more
    /// than one means two daemons are steering the same data plane.
    pub sources: Vec<String>,
}

/// Body of `PUT /load`: load reported by the replicas themselves, scraped by the
/// control daemon. Replicas not named keep their last value; unknown URLs are
/// counted in [`LoadApplied::unknown`] (the set may have changed under the daemon).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadUpdate {
    pub loads: Vec<ReplicaLoad>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaLoad {
    pub url: String,
    pub running: u32,
    pub waiting: u32,
    /// KV cache usage, 0.0..=1.0.
    pub kv_usage: f32,
}

impl ReplicaLoad {
    pub fn external(&self) -> ExternalLoad {
        ExternalLoad {
            running: self.running,
            waiting: self.waiting,
            kv_usage: self.kv_usage.clamp(0.0, 1.0),
        }
    }
}

/// Answer to `PUT /load`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadApplied {
    pub applied: u32,
    pub unknown: u32,
    /// Current replica-set generation, so the daemon notices a restart at load rate.
    pub generation: u64,
}

/// Body of `POST /replicas/clear`: the replica's KV cache was emptied (an
/// `AllBlocksCleared` event or an engine restart), so every prefix the index
/// credits it with is gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClearRequest {
    pub url: String,
    /// Free text for the log (`all_blocks_cleared`, `sequence_reset`, ...).
    #[serde(default)]
    pub reason: Option<String>,
}

/// Answer to `POST /replicas/clear`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClearApplied {
    pub url: String,
    pub slot: u16,
    /// Clears of this replica URL in this process's life.
    pub clears_total: u64,
}

/// One hot prefix: enough for the control daemon to replay it to a standby.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HotPrefix {
    /// Hash of the prefix's first blocks (the routing anchor).
    pub anchor: u64,
    /// Requests that used this prefix recently.
    pub hits: u64,
    pub model: Option<String>,
    /// `/v1/completions` or `/v1/chat/completions`.
    pub path: String,
    /// A request body (JSON) whose prompt starts with the prefix, bounded in size.
    pub sample_body: String,
}

/// Body of `GET /hot-prefixes`, hottest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HotPrefixes {
    pub prefixes: Vec<HotPrefix>,
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
    /// Requests in the admission queue (all workers), waiting for a replica
    /// with room or for one to come back.
    #[serde(default)]
    pub queue_depth: usize,
    /// Connection steering: mode, whether the BPF program is attached, live streams per worker.
    #[serde(default)]
    pub steering: crate::steer::SteeringState,
    /// `None` until the first `PUT /replicas` (a fresh process: push everything).
    #[serde(default)]
    pub last_push: Option<PushRecord>,
    /// The connection budget in force (`[limits] max_connections` or derived).
    #[serde(default)]
    pub connection_budget: Option<crate::budget::Caps>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerState {
    pub id: usize,
    /// Client connections open on this worker.
    pub connections: u64,
    /// Requests being served (streams included).
    pub active_requests: u64,
    pub requests_total: u64,
    /// Of `connections`: without a complete request head yet, idle between
    /// requests, with a request in progress (shed ones still closing are in none).
    #[serde(default)]
    pub reading_head: u64,
    #[serde(default)]
    pub idle: u64,
    #[serde(default)]
    pub active: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaState {
    pub url: String,
    pub slot: u16,
    pub models: Vec<String>,
    pub pool: Pool,
    pub healthy: bool,
    pub in_flight: u32,
    /// The bound on `in_flight` in force (the spec's or the fleet default); 0: none.
    #[serde(default)]
    pub max_in_flight: u32,
    /// Prompt bytes of in-flight requests the replica was predicted not to hold
    /// and has not started answering: its queued prefill, as kv-aware scores it.
    #[serde(default)]
    pub pending_prefill_bytes: u64,
    pub requests_total: u64,
    /// Failed attempts (connect/reset/timeout), the passive health signal.
    pub failures_total: u64,
    /// Why the latest attempt failed (`connect refused`, `certificate verify
    /// failed: UnknownIssuer`, ...); absent once an attempt succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub external_load: ExternalLoad,
    /// Cache clears reported for this replica URL (`POST /replicas/clear`).
    #[serde(default)]
    pub clears_total: u64,
    pub kv_blocks: Option<u64>,
    pub kv_block_tokens: Option<u32>,
    /// The slot shape of a slot-based replica ([`ReplicaSpec::kv_slots`] and
    /// the two after it), as pushed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_slots: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_slot_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_host_tokens: Option<u64>,
    /// The replica's prefill speed as the routing policy learned it from its
    /// first tokens (absent until it has enough of them).
    #[serde(default)]
    pub learned: Option<crate::route::LearnedSpeed>,
    /// Passive health: out of rotation after consecutive failures, and why.
    #[serde(default)]
    pub ejection: crate::ejection::EjectionState,
}
