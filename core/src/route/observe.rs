//! What a router tells its caller about its work, without a metrics crate.
//!
//! Two shapes, by how often they happen. Per-request events (a decision, a
//! usage report compared with its prediction) go to a [`RouteObserver`] the
//! caller passes in, which may record them as histograms; a router without one
//! tells [`NoObserver`]. State that only matters when someone looks (index
//! size, per-replica budgets, learned speeds) is a [`RouterStats`] the caller
//! asks for ([`super::Router::scrape`]) when `/metrics` is scraped.

use crate::index::{IndexStats, SlotOccupancy};
use crate::replica::Replica;
use kvroute_admin_api::LearnedSpeed;

/// How a usage report's cached tokens compared with the prediction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionOutcome {
    /// Predicted some cached, and the replica reported some.
    HitHit,
    /// Predicted some cached; the replica reported none.
    HitMiss,
    /// Predicted none; the replica reported some.
    MissHit,
}

impl PredictionOutcome {
    /// The `outcome` label of `kvroute_prefix_prediction_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            PredictionOutcome::HitHit => "hit_hit",
            PredictionOutcome::HitMiss => "hit_miss",
            PredictionOutcome::MissHit => "miss_hit",
        }
    }
}

/// A response's usage report next to what the router predicted for it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CacheReport {
    /// `None` when neither side saw a cached token.
    pub outcome: Option<PredictionOutcome>,
    pub predicted_tokens: u64,
    pub cached_tokens: u64,
    pub prompt_tokens: u64,
}

/// Per-request events of a router, called on the request's thread: an
/// implementation records and returns.
pub trait RouteObserver: Send + Sync + 'static {
    /// A request with block hashes was routed: the share of its blocks the
    /// chosen replica is predicted to hold, and the share given up against the
    /// best overlap any eligible replica had (nonzero on spills).
    fn routed(&self, _predicted_ratio: f64, _regret_ratio: f64) {}

    /// A usage report with cached tokens came back from `replica`.
    fn cache_report(&self, _replica: &Replica, _report: &CacheReport) {}

    /// A learned time-to-first-token prediction for `replica` met the observed
    /// one: `observed / predicted`.
    fn ttft_ratio(&self, _replica: &Replica, _ratio: f64) {}

    /// A report was ignored as impossible (no tokenizer gives its counts).
    fn report_ignored(&self) {}
}

/// Records nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoObserver;

impl RouteObserver for NoObserver {}

/// A router's state when asked ([`super::Router::scrape`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouterStats {
    pub index: IndexStats,
    /// One per replica of the set passed in, in its order.
    pub replicas: Vec<ReplicaStats>,
    /// Prompt bytes per token over all models, as learned from usage reports.
    pub bytes_per_token: f64,
}

/// What the router holds about one replica.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaStats {
    pub url: String,
    /// Blocks the index tracks as cached there.
    pub blocks: u64,
    /// Blocks the index may track there before it evicts.
    pub budget_blocks: u64,
    /// Prompts held in the engine's slots and in its host cache, where the
    /// index models a slot-based engine (llama.cpp).
    pub prompts: Option<SlotOccupancy>,
    /// The learned prefill speed, once there are enough first tokens.
    pub speed: Option<LearnedSpeed>,
}
