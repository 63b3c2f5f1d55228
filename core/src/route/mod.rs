//! Routing: the [`Router`] trait every policy implements, and the simple policies.
//!
//! A router sees the request's extracted fields and block hashes, a replica-set
//! snapshot and a clock value, and never touches a socket: policies are unit- and
//! property-tested without processes. The proxy calls the hooks around `pick` so a
//! policy can learn from what it decided and from what the replica reported.

pub mod backlog;
pub mod bytes_per_token;
pub mod config;
pub mod consistent;
pub mod kv_aware;
mod least_loaded;
pub mod observe;
pub mod prefill_model;
mod round_robin;
pub mod session;
pub mod share;

use std::sync::Arc;

pub use config::RoutingConfig;
pub use consistent::ConsistentHash;
pub use kv_aware::{KvAware, KvAwareCounters};
pub use least_loaded::LeastLoaded;
pub use observe::{NoObserver, RouteObserver, RouterStats};
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
    /// The request's prompt bytes (0 from policies that do not learn).
    pub prompt_bytes: u64,
    /// Hash of the request's model name (0: none), for what is learned per model.
    pub model_key: u64,
    /// What a policy that predicts time to first token expected of the chosen
    /// replica (`None` from policies that do not).
    pub prediction: Option<Prediction>,
}

/// A time-to-first-token prediction, carried from the decision to its response.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prediction {
    /// Predicted seconds from sending to the first token.
    pub ttft_s: f64,
    /// The replica's speed the prediction used (its own, or the fleet's prior).
    pub secs_per_byte: f64,
    /// Whether that speed was learned from the replica itself.
    pub learned: bool,
    /// Uncached prompt bytes predicted queued ahead of the request there.
    pub queued_ahead_bytes: u64,
    /// Whether the replica had taken more than its share of recent decisions
    /// when it was chosen ([`share`]).
    pub over_share: bool,
    /// Seconds that moving the request off it would have cost, when it was over
    /// its share and the move was refused as too dear (else 0).
    pub refused_move_s: f64,
}

/// What a finished response told about its replica, for a policy to learn from.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ResponseReport {
    /// `usage.prompt_tokens`, when the response reported usage.
    pub prompt_tokens: Option<u64>,
    /// `usage.prompt_tokens_details.cached_tokens`, when reported.
    pub cached_tokens: Option<u64>,
    /// Milliseconds from sending the request to the first body byte, for streamed
    /// responses only: an unstreamed body's first byte comes after the whole
    /// generation.
    pub ttft_ms: Option<u64>,
}

impl Decision {
    pub fn simple(replica: Arc<Replica>, kind: DecisionKind) -> Self {
        Decision {
            replica,
            kind,
            predicted_blocks: 0,
            best_blocks: 0,
            prefill_bytes: 0,
            prompt_bytes: 0,
            model_key: 0,
            prediction: None,
        }
    }

    /// Blocks of overlap given up against the best eligible replica (nonzero on
    /// spills and load-driven choices).
    pub fn regret_blocks(&self) -> u32 {
        self.best_blocks - self.predicted_blocks.min(self.best_blocks)
    }
}

pub use kvroute_admin_api::LearnedSpeed;

/// A routing policy. Implementations are shared by all workers.
pub trait Router: Send + Sync + 'static {
    fn name(&self) -> &'static str;

    /// Chooses a replica among the available ones with room that serve the
    /// request's model ([`candidates`]), skipping slots in `exclude` (replicas
    /// already tried for this request).
    fn pick(&self, req: &RouteRequest<'_>, set: &ReplicaSet, exclude: &[u16]) -> Option<Decision>;

    /// Called once the request was sent to `decision.replica` (learn the blocks).
    fn on_routed(&self, _req: &RouteRequest<'_>, _decision: &Decision) {}

    /// Called when a successful response ended, with the decision it answers and
    /// what it reported (usage, time to first byte), so a policy can compare its
    /// predictions with the replica's and learn the replica's speed.
    fn on_response(&self, _decision: &Decision, _report: &ResponseReport) {}

    /// What the policy learned of the replica in `slot`, for `/state`.
    fn learned(&self, _slot: u16) -> Option<LearnedSpeed> {
        None
    }

    /// Called after the replica set was replaced (drop state of removed replicas).
    fn on_replicas_changed(&self, _set: &ReplicaSet) {}

    /// Called when `/metrics` is scraped: the policy's own state (index size,
    /// budgets, learned speeds) for the replicas of `set`, read once per scrape
    /// instead of kept per request. A policy may also refresh what follows
    /// slowly changing estimates here (budgets). `None`: it keeps no state.
    fn scrape(&self, _set: &ReplicaSet) -> Option<RouterStats> {
        None
    }

    /// Called when the control daemon reports that the replica in `slot` lost its
    /// whole KV cache (engine `AllBlocksCleared` or restart): forget its blocks.
    fn on_replica_cleared(&self, _slot: u16) {}

    /// The most used prefixes, hottest first, at most `limit`, for pre-warming a
    /// standby (admin `GET /hot-prefixes`). Policies without an index have none.
    fn hot_prefixes(&self, _limit: usize) -> Vec<kvroute_admin_api::HotPrefix> {
        Vec::new()
    }
}

/// The replicas a request at `now_ms` may go to, in snapshot order: available,
/// not ejected by passive health, under their `max_in_flight`, serving the
/// model, not already tried.
pub fn candidates<'s>(
    set: &'s ReplicaSet,
    model: Option<&'s str>,
    exclude: &'s [u16],
    now_ms: u64,
) -> impl Iterator<Item = &'s Arc<Replica>> + 's {
    set.replicas.iter().filter(move |r| {
        r.takes_traffic(now_ms) && r.has_capacity() && r.serves(model) && !exclude.contains(&r.slot)
    })
}

/// Routing policy names accepted by `--policy` / `policy =`: [`PolicyKind::as_str`]
/// spells them, and `FromStr` and serde read the same names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
    pub const ALL: [PolicyKind; 4] = [
        PolicyKind::RoundRobin,
        PolicyKind::LeastLoaded,
        PolicyKind::KvAware,
        PolicyKind::ConsistentHash,
    ];

    /// The policy's name in the config file and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::RoundRobin => "round-robin",
            PolicyKind::LeastLoaded => "least-loaded",
            PolicyKind::KvAware => "kv-aware",
            PolicyKind::ConsistentHash => "consistent-hash",
        }
    }

    pub fn build(self, cfg: &RoutingConfig) -> Arc<dyn Router> {
        self.build_observed(cfg, Arc::new(NoObserver))
    }

    /// [`PolicyKind::build`] with per-request events told to `observer`.
    pub fn build_observed(
        self,
        cfg: &RoutingConfig,
        observer: Arc<dyn RouteObserver>,
    ) -> Arc<dyn Router> {
        match self {
            PolicyKind::RoundRobin => Arc::new(RoundRobin::default()),
            PolicyKind::LeastLoaded => Arc::new(LeastLoaded),
            PolicyKind::KvAware => Arc::new(KvAware::new(cfg.kv_aware_params()).observed(observer)),
            PolicyKind::ConsistentHash => cfg.build_consistent_hash(),
        }
    }
}

impl std::fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A policy name that is none of [`PolicyKind::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown routing policy {0:?} (one of round-robin, least-loaded, kv-aware, consistent-hash)"
)]
pub struct UnknownPolicy(pub String);

impl std::str::FromStr for PolicyKind {
    type Err = UnknownPolicy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PolicyKind::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| UnknownPolicy(s.to_string()))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::{ReplicaSpec, ReplicaTable};

    /// A replica at its `max_in_flight` is no candidate for any policy, and is
    /// one again once a request ends.
    #[test]
    fn full_replicas_are_skipped_by_every_policy() {
        let specs = (0..2)
            .map(|i| ReplicaSpec {
                max_in_flight: Some(1),
                ..ReplicaSpec::new(format!("http://127.0.0.1:{}", 9100 + i))
            })
            .collect();
        let t = ReplicaTable::new(specs).unwrap();
        let set = t.load();
        let busy = set.replicas[0].try_begin_at(0, 0).unwrap();
        let cfg = RoutingConfig::default();
        for kind in [
            PolicyKind::RoundRobin,
            PolicyKind::LeastLoaded,
            PolicyKind::KvAware,
            PolicyKind::ConsistentHash,
        ] {
            let router = kind.build(&cfg);
            router.on_replicas_changed(&set);
            for _ in 0..4 {
                let d = router.pick(&RouteRequest::default(), &set, &[]).unwrap();
                assert_eq!(d.replica.slot, set.replicas[1].slot, "{kind:?}");
            }
            let other = set.replicas[1].try_begin_at(0, 0).unwrap();
            assert!(router.pick(&RouteRequest::default(), &set, &[]).is_none());
            drop(other);
        }
        drop(busy);
        assert_eq!(candidates(&set, None, &[], 0).count(), 2);
    }

    #[test]
    fn policy_names_read_back_the_same_way_everywhere() {
        for kind in PolicyKind::ALL {
            let name = kind.as_str();
            assert_eq!(name.parse::<PolicyKind>(), Ok(kind));
            assert_eq!(kind.to_string(), name);
            // serde (the config file) spells them as `as_str` does.
            let v: PolicyKind = serde_json::from_str(&format!("{name:?}")).unwrap();
            assert_eq!(v, kind);
            assert_eq!(serde_json::to_string(&kind).unwrap(), format!("{name:?}"));
        }
        let e = "kv_aware".parse::<PolicyKind>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown routing policy \"kv_aware\" (one of round-robin, least-loaded, kv-aware, consistent-hash)"
        );
    }
}
