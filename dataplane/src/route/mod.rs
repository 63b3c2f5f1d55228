//! Routing: the [`Router`] trait every policy implements, and the simple policies.
//!
//! A router sees the request's extracted fields and block hashes, a replica-set
//! snapshot and a clock value, and never touches a socket: policies are unit- and
//! property-tested without processes. The proxy calls the hooks around `pick` so a
//! policy can learn from what it decided and from what the replica reported.

pub mod config;
pub mod consistent;
pub mod kv_aware;
mod least_loaded;
mod round_robin;
pub mod session;

use std::sync::Arc;

pub use config::RoutingConfig;
pub use consistent::ConsistentHash;
pub use kv_aware::{KvAware, KvAwareCounters};
pub use least_loaded::LeastLoaded;
pub use round_robin::RoundRobin;

use crate::replica::{Replica, ReplicaSet};

/// What the router may look at for one request.
#[derive(Debug, Default, Clone, Copy)]
pub struct RouteRequest<'a> {
    /// Request path, e.g. `/v1/chat/completions`.
    pub path: &'a str,
    /// `model` from the body, when there is one.
    pub model: Option<&'a str>,
    /// Session key (`x-session-id` header, else the `user` field).
    pub session: Option<&'a [u8]>,
    /// Prefix-chained hashes of the prompt's full blocks, in order.
    pub block_hashes: &'a [u64],
    /// Prompt length in bytes (including the partial last block).
    pub prompt_bytes: usize,
    /// Milliseconds on the caller's clock; routers never read the OS clock.
    pub now_ms: u64,
}

/// Why a replica was chosen; exported as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DecisionKind {
    RoundRobin,
    LeastLoaded,
    /// Session affinity kept the conversation where it was.
    Session,
    /// The replica holding the longest cached prefix.
    Prefix,
    /// Unknown prefix placed by consistent hashing of its anchor.
    Consistent,
    /// The preferred replica was over the load bound; the next one took it.
    Spill,
}

impl DecisionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DecisionKind::RoundRobin => "round_robin",
            DecisionKind::LeastLoaded => "least_loaded",
            DecisionKind::Session => "session",
            DecisionKind::Prefix => "prefix",
            DecisionKind::Consistent => "consistent",
            DecisionKind::Spill => "spill",
        }
    }
}

/// A routing decision.
#[derive(Debug, Clone)]
pub struct Decision {
    pub replica: Arc<Replica>,
    pub kind: DecisionKind,
    /// Blocks of the prompt the chosen replica is predicted to hold.
    pub predicted_blocks: u32,
    /// Most blocks any eligible replica was predicted to hold (regret = best − predicted).
    pub best_blocks: u32,
    /// Prompt bytes the chosen replica is predicted to prefill (not hold); 0 from
    /// policies that do not predict.
    pub prefill_bytes: u64,
}

impl Decision {
    pub fn simple(replica: Arc<Replica>, kind: DecisionKind) -> Self {
        Decision {
            replica,
            kind,
            predicted_blocks: 0,
            best_blocks: 0,
            prefill_bytes: 0,
        }
    }

    /// Blocks of overlap given up against the best eligible replica (nonzero on
    /// spills and load-driven choices).
    pub fn regret_blocks(&self) -> u32 {
        self.best_blocks - self.predicted_blocks.min(self.best_blocks)
    }
}

/// A routing policy. Implementations are shared by all workers.
pub trait Router: Send + Sync + 'static {
    fn name(&self) -> &'static str;

    /// Chooses a replica among the available ones serving the request's model,
    /// skipping slots in `exclude` (replicas already tried for this request).
    fn pick(&self, req: &RouteRequest<'_>, set: &ReplicaSet, exclude: &[u16]) -> Option<Decision>;

    /// Called once the request was sent to `decision.replica` (learn the blocks).
    fn on_routed(&self, _req: &RouteRequest<'_>, _decision: &Decision) {}

    /// Called when a response reported its prompt and cached token counts.
    fn on_usage(&self, _replica: &Replica, _prompt_tokens: u64, _cached_tokens: u64) {}

    /// Like `on_usage`, with the decision the response answers, so a policy can
    /// compare its predicted overlap with the replica's `cached_tokens`. The proxy
    /// should call this one; the default forwards to `on_usage`.
    fn on_usage_predicted(&self, decision: &Decision, prompt_tokens: u64, cached_tokens: u64) {
        self.on_usage(&decision.replica, prompt_tokens, cached_tokens)
    }

    /// Called after the replica set was replaced (drop state of removed replicas).
    fn on_replicas_changed(&self, _set: &ReplicaSet) {}

    /// Called when `/metrics` is scraped: set gauges of the policy's own state
    /// (index size, budgets), read once per scrape instead of kept per request.
    fn export_gauges(&self, _set: &ReplicaSet) {}

    /// Called when the control daemon reports that the replica in `slot` lost its
    /// whole KV cache (engine `AllBlocksCleared` or restart): forget its blocks.
    fn on_replica_cleared(&self, _slot: u16) {}

    /// The most used prefixes, hottest first, at most `limit`, for pre-warming a
    /// standby (admin `GET /hot-prefixes`). Policies without an index have none.
    fn hot_prefixes(&self, _limit: usize) -> Vec<crate::admin::HotPrefix> {
        Vec::new()
    }
}

/// The replicas a request may go to, in snapshot order.
pub fn candidates<'s>(
    set: &'s ReplicaSet,
    model: Option<&'s str>,
    exclude: &'s [u16],
) -> impl Iterator<Item = &'s Arc<Replica>> + 's {
    set.replicas
        .iter()
        .filter(move |r| r.is_available() && r.serves(model) && !exclude.contains(&r.slot))
}

/// Routing policy names accepted by `--policy` / `policy =`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyKind {
    RoundRobin,
    LeastLoaded,
    /// Session, then longest cached prefix vs load, then consistent hashing
    /// (the default: `RoutingConfig::default().policy`).
    KvAware,
    /// Consistent hashing of the prompt's anchor with bounded load, no index.
    ConsistentHash,
}

impl PolicyKind {
    pub fn build(self, cfg: &RoutingConfig) -> Arc<dyn Router> {
        match self {
            PolicyKind::RoundRobin => Arc::new(RoundRobin::default()),
            PolicyKind::LeastLoaded => Arc::new(LeastLoaded),
            PolicyKind::KvAware => cfg.build_kv_aware(),
            PolicyKind::ConsistentHash => cfg.build_consistent_hash(),
        }
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    use crate::replica::{ReplicaSpec, ReplicaTable};

    pub fn table(n: usize) -> ReplicaTable {
        ReplicaTable::new(
            (0..n)
                .map(|i| ReplicaSpec::new(format!("http://127.0.0.1:{}", 9000 + i)))
                .collect(),
        )
        .unwrap()
    }
}
