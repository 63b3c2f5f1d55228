//! A replica as configured or pushed, and the load it reports.

use serde::{Deserialize, Serialize};

/// Whether a replica takes traffic or stands by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pool {
    #[default]
    Active,
    Warm,
}

/// What a replica is, as configured or pushed by the control daemon.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaSpec {
    /// `http://host:port`, or `https://host:port` for a replica behind TLS
    /// (verified against `[upstream] ca_file` or the system roots).
    pub url: String,
    /// Model names it serves; empty means "any model".
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub pool: Pool,
    /// Set false by the control daemon's health checks.
    #[serde(default = "default_true")]
    pub healthy: bool,
    /// KV capacity in blocks of `kv_block_tokens` tokens, when known.
    #[serde(default)]
    pub kv_blocks: Option<u64>,
    #[serde(default)]
    pub kv_block_tokens: Option<u32>,
    /// Set for an engine that keeps whole prompts in a fixed number of slots
    /// (llama.cpp's server: `total_slots`): the index then holds at most this
    /// many prompts in slots, plus what `kv_host_tokens` keeps, and forgets a
    /// prompt the way the engine does rather than block by block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_slots: Option<u32>,
    /// Tokens one slot holds (llama.cpp's `n_ctx` per slot); a longer prompt is
    /// held up to it. Unset: no limit but the block budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_slot_tokens: Option<u32>,
    /// Tokens of prompts the engine keeps in host memory after they leave a slot
    /// (llama.cpp's `--cache-ram` prompt cache); unset or 0: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_host_tokens: Option<u64>,
    /// Most requests this proxy keeps in flight on the replica at once; a
    /// replica at its bound is skipped by routing and requests wait in the
    /// admission queue. Unset: `[upstream] max_in_flight_per_replica`; 0:
    /// unbounded. Set near the engine's batch size (vLLM `max_num_seqs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u32>,
}

fn default_weight() -> u32 {
    1
}
fn default_true() -> bool {
    true
}

impl ReplicaSpec {
    pub fn new(url: impl Into<String>) -> Self {
        ReplicaSpec {
            url: url.into(),
            models: Vec::new(),
            weight: 1,
            pool: Pool::Active,
            healthy: true,
            kv_blocks: None,
            kv_block_tokens: None,
            kv_slots: None,
            kv_slot_tokens: None,
            kv_host_tokens: None,
            max_in_flight: None,
        }
    }
}

/// Load reported by the replica itself (scraped by the control daemon).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ExternalLoad {
    pub running: u32,
    pub waiting: u32,
    /// KV cache usage, 0.0..=1.0.
    pub kv_usage: f32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_with_only_a_url_takes_the_defaults() {
        let s: ReplicaSpec = serde_json::from_str(r#"{"url":"http://127.0.0.1:8001"}"#).unwrap();
        assert_eq!(s, ReplicaSpec::new("http://127.0.0.1:8001"));
        assert_eq!((s.weight, s.pool, s.healthy), (1, Pool::Active, true));
        let warm: ReplicaSpec =
            serde_json::from_str(r#"{"url":"http://h:1","pool":"warm","healthy":false}"#).unwrap();
        assert_eq!((warm.pool, warm.healthy), (Pool::Warm, false));
    }

    #[test]
    fn an_unknown_field_is_refused() {
        assert!(serde_json::from_str::<ReplicaSpec>(r#"{"url":"http://h:1","wieght":2}"#).is_err());
    }
}
