//! Request and response bodies of the admin API's write endpoints, and the
//! hot prefixes a standby is pre-warmed with.

use serde::{Deserialize, Serialize};

use crate::{ExternalLoad, ReplicaSpec};

/// Body of `PUT /replicas`: the complete new replica set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicasUpdate {
    pub replicas: Vec<ReplicaSpec>,
    /// Who sends this (e.g. `kvroute-control@host`); recorded in [`crate::State::last_push`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// Who replaced the replica set last, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushRecord {
    /// [`crate::ReplicasUpdate::source`], or `"unknown"` when the pusher did not say.
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
