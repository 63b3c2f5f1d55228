//! The `[routing]` section of kvroute.toml.
#![forbid(unsafe_code)]

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::consistent::ConsistentHash;
use super::kv_aware::{KvAware, KvAwareParams};
use super::{PolicyKind, RouteObserver, Router};
use crate::error::Error;
use crate::index::IndexConfig;
use crate::prefix::{PrefixConfig, MAX_BLOCK_BYTES, MIN_BLOCK_BYTES};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    pub policy: PolicyKind,
    /// Prompt bytes per hashed block (≈ 32 tokens at the default 128).
    pub block_bytes: usize,
    /// Leading prompt bytes whose chain hash places an unseen prefix.
    pub anchor_bytes: usize,
    /// Weight of the matched fraction of the prompt in the kv-aware score.
    pub w_cache: f64,
    /// Weight of the normalised load in the kv-aware score.
    pub w_load: f64,
    /// Weight of the replica's queued prefill (uncached prompt bytes of requests in
    /// flight there that have not produced output yet) in the kv-aware score, which
    /// charges `w_prefill · (queued / scale)²`, `scale` being the larger of this
    /// request's prompt and `prefill_scale_bytes`. At 1.0 a queue of `scale` bytes
    /// costs as much as holding the whole prompt is worth.
    pub w_prefill: f64,
    /// Queued prefill, in prompt bytes, that `w_prefill` weighs as one unit for
    /// prompts shorter than this (longer prompts are their own unit). Roughly the
    /// queue that delays a first token by more than the prefill it saves to keep a
    /// conversation where its cache is: 128 KiB is ~32K tokens, a few seconds of
    /// prefill on one GPU.
    pub prefill_scale_bytes: usize,
    /// No replica takes more than `(1+epsilon)` times the mean load.
    pub epsilon: f64,
    /// A replica with fewer in-flight requests than this is never over the load
    /// bound: at low load the `(1+ε)` rule alone would scatter prefixes.
    pub load_floor: u64,
    /// kv-aware, off unless set: a replica that took more than
    /// `(1+share_epsilon)` times its weighted share of the last 256 decisions
    /// gives up the requests that are cheapest to move (in predicted seconds to
    /// first token) until it is back within it. It evens request counts on a
    /// fleet with headroom, where the in-flight bound never acts, at a cost in
    /// hit ratio when tenants are skewed (docs/routing.md has the figures).
    pub share_epsilon: Option<f64>,
    /// Header carrying the session key; the body's `user` is the fallback.
    pub session_header: String,
    pub session_ttl_ms: u64,
    pub session_capacity: usize,
    /// Hard cap on blocks tracked by the prefix index, all replicas together.
    pub index_max_blocks: usize,
    /// Lock shards of the prefix index.
    pub index_shards: usize,
    /// Block budget of a replica that does not report `kv_blocks`/`kv_block_tokens`.
    pub default_replica_blocks: u64,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            policy: PolicyKind::KvAware,
            block_bytes: 128,
            anchor_bytes: 1024,
            w_cache: 1.0,
            w_load: 0.05,
            w_prefill: 1.0,
            prefill_scale_bytes: 128 << 10,
            epsilon: 0.5,
            load_floor: 8,
            share_epsilon: None,
            session_header: "x-session-id".into(),
            session_ttl_ms: 10 * 60 * 1000,
            session_capacity: 100_000,
            index_max_blocks: 4 << 20,
            index_shards: 64,
            default_replica_blocks: 1 << 16,
        }
    }
}

impl RoutingConfig {
    /// Rejects values that would make routing meaningless, with the key's name.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |key: &str, why: String| Err(Error::Config(format!("routing.{key}: {why}")));
        if !(MIN_BLOCK_BYTES..=MAX_BLOCK_BYTES).contains(&self.block_bytes) {
            return bad(
                "block_bytes",
                format!(
                    "{} is outside {MIN_BLOCK_BYTES}..={MAX_BLOCK_BYTES}",
                    self.block_bytes
                ),
            );
        }
        if self.prefill_scale_bytes == 0 {
            return bad("prefill_scale_bytes", "must be at least 1".into());
        }
        if self.anchor_bytes < self.block_bytes {
            return bad("anchor_bytes", "must be at least block_bytes".into());
        }
        for (key, v) in [
            ("w_cache", self.w_cache),
            ("w_load", self.w_load),
            ("w_prefill", self.w_prefill),
            ("epsilon", self.epsilon),
        ] {
            if !v.is_finite() || v < 0.0 {
                return bad(key, format!("{v} must be a finite number >= 0"));
            }
        }
        if let Some(v) = self.share_epsilon.filter(|v| !v.is_finite() || *v < 0.0) {
            return bad("share_epsilon", format!("{v} must be a finite number >= 0"));
        }
        if self.session_header.is_empty() || !self.session_header.bytes().all(is_token_byte) {
            return bad("session_header", "must be a valid HTTP header name".into());
        }
        if self.index_shards == 0 || self.index_shards > 1 << 16 {
            return bad("index_shards", "must be in 1..=65536".into());
        }
        Ok(())
    }

    pub fn prefix(&self) -> PrefixConfig {
        PrefixConfig {
            block_bytes: self.block_bytes,
        }
    }

    pub fn anchor_blocks(&self) -> usize {
        (self.anchor_bytes / self.block_bytes.max(1)).max(1)
    }

    pub fn kv_aware_params(&self) -> KvAwareParams {
        KvAwareParams {
            block_bytes: self.block_bytes,
            anchor_blocks: self.anchor_blocks(),
            w_cache: self.w_cache,
            w_load: self.w_load,
            w_prefill: self.w_prefill,
            prefill_scale_bytes: self.prefill_scale_bytes,
            epsilon: self.epsilon,
            load_floor: self.load_floor,
            share_epsilon: self.share_epsilon,
            session_ttl_ms: self.session_ttl_ms,
            session_capacity: self.session_capacity,
            index: IndexConfig {
                shards: self.index_shards,
                max_entries: self.index_max_blocks,
                default_budget: self.default_replica_blocks,
            },
        }
    }

    /// The configured policy, shared by all workers.
    pub fn build(&self) -> Arc<dyn Router> {
        self.policy.build(self)
    }

    /// [`RoutingConfig::build`] with the policy's per-request events told to
    /// `observer` (the data plane's metrics).
    pub fn build_observed(&self, observer: Arc<dyn RouteObserver>) -> Arc<dyn Router> {
        self.policy.build_observed(self, observer)
    }

    /// The kv-aware router with its concrete type, for callers that export its
    /// counters or reach its index; coerces to `Arc<dyn Router>`.
    pub fn build_kv_aware(&self) -> Arc<KvAware> {
        Arc::new(KvAware::new(self.kv_aware_params()))
    }

    pub fn build_consistent_hash(&self) -> Arc<ConsistentHash> {
        Arc::new(ConsistentHash::new(
            self.anchor_blocks(),
            self.epsilon,
            self.load_floor,
        ))
    }
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_toml() {
        let d = RoutingConfig::default();
        assert_eq!(d.policy, PolicyKind::KvAware);
        d.validate().unwrap();
        assert_eq!(d.anchor_blocks(), 8);
        let c: RoutingConfig =
            toml::from_str("policy = \"consistent-hash\"\nblock_bytes = 64\nepsilon = 0.5\n")
                .unwrap();
        assert_eq!(
            (c.policy, c.block_bytes, c.epsilon, c.anchor_bytes),
            (PolicyKind::ConsistentHash, 64, 0.5, 1024)
        );
        assert!(toml::from_str::<RoutingConfig>("blok_bytes = 1").is_err());
        assert_eq!(c.build().name(), "consistent-hash");
        assert_eq!(d.build().name(), "kv-aware");
    }

    #[test]
    fn validation_names_the_key() {
        let c = RoutingConfig {
            block_bytes: 1,
            ..Default::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("routing.block_bytes"));
        let c = RoutingConfig {
            epsilon: f64::NAN,
            ..Default::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("routing.epsilon"));
        let c: RoutingConfig = toml::from_str("share_epsilon = -0.5\n").unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("routing.share_epsilon"));
        let c: RoutingConfig = toml::from_str("share_epsilon = 0.25\n").unwrap();
        c.validate().unwrap();
        assert_eq!(c.kv_aware_params().share_epsilon, Some(0.25));
    }
}
