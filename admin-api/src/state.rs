//! `GET /state`: what one data plane is doing, as the control daemon and
//! operators read it.

use serde::{Deserialize, Serialize};

use crate::{ExternalLoad, Pool, PushRecord};

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
    pub steering: SteeringState,
    /// `None` until the first `PUT /replicas` (a fresh process: push everything).
    #[serde(default)]
    pub last_push: Option<PushRecord>,
    /// The connection budget in force (`[limits] max_connections` or derived).
    #[serde(default)]
    pub connection_budget: Option<ConnectionBudget>,
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
    /// The slot shape of a slot-based replica ([`crate::ReplicaSpec::kv_slots`] and
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
    pub learned: Option<LearnedSpeed>,
    /// Passive health: out of rotation after consecutive failures, and why.
    #[serde(default)]
    pub ejection: EjectionState,
}

/// `steering` in `GET /state`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SteeringState {
    /// What the config asked for: `ebpf`, `kernel` or `ebpf-required`.
    pub requested: String,
    /// What picks the worker now: `p2c`, `hash`, `cpu` (the program) or `kernel`.
    pub mode: String,
    /// Whether the program is attached to the listeners' reuseport group.
    pub attached: bool,
    /// Why the kernel's hash is in use when BPF was asked for.
    pub fallback_reason: Option<String>,
    /// Where the maps are pinned.
    pub pin_dir: Option<String>,
    pub workers: Vec<SteeringWorker>,
    /// This process: tells the old from the new one across an upgrade.
    #[serde(default)]
    pub pid: u32,
    /// Set once an upgrade handed the socket array to a newer process.
    #[serde(default)]
    pub released: bool,
    /// The process an upgrade started (0: none).
    #[serde(default)]
    pub successor_pid: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SteeringWorker {
    pub id: usize,
    /// Client connections open on the worker: the load the program balances.
    pub live_streams: u64,
    pub accepted_total: u64,
    /// Connections the program sent to this worker (wrapping u32; 0 without BPF).
    pub steered: u64,
}

/// A replica's passive health as `/state` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EjectionState {
    /// Out of rotation now (half-open with its probe under way counts).
    pub ejected: bool,
    /// Time left until the replica is half-open; absent when in rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ejected_for_ms: Option<u64>,
    /// The failure that ejected it, while not readmitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub consecutive_failures: u32,
    pub ejections_total: u64,
}

/// A replica's prefill speed as a policy learned it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LearnedSpeed {
    pub prefill_bytes_per_s: f64,
    pub ttft_overhead_s: f64,
    pub observations: usize,
}

/// The connection budget in force (`[limits] max_connections` or derived from
/// `RLIMIT_NOFILE`), as `/state` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionBudget {
    /// Client connections over all workers.
    pub max_connections: usize,
    /// Client connections one worker holds (`max_connections / workers`, rounded up).
    pub per_worker: usize,
    /// Above this many a worker sheds before it accepts.
    pub high_watermark: usize,
    /// The soft `RLIMIT_NOFILE` the caps were derived from (or checked against).
    pub nofile: u64,
    /// Sockets a worker lets be closing at once (shed, their tasks not yet
    /// run; refusals being written) before it stops accepting for a moment:
    /// a slice of the reserve, so a fast flood cannot push past the limit.
    #[serde(default)]
    pub closing_max: usize,
    /// Derived from `nofile` (`max_connections` was 0 or absent).
    pub derived: bool,
}
