//! The `kv-aware` policy: session affinity, then the replica holding the longest
//! cached prefix (traded against load), then the sooner of the anchor's two
//! rendezvous choices for a prefix no replica holds, all under the `(1+ε)·mean`
//! load bound so a hot prefix spills instead of melting one replica.
//!
//! It learns each replica's speed from the responses: the prefill rate and
//! fixed overhead from its first tokens ([`super::prefill_model`]), and the
//! prompt bytes per engine token from its usage reports
//! ([`super::bytes_per_token`]). With them it predicts, for every candidate, the
//! seconds to the request's first token: overhead + (what is left of this
//! proxy's backlog there ([`super::backlog`]) + the engine's own waiting
//! requests + the request's uncached prompt) / rate. A prompt that matches no
//! cached prefix goes where that is soonest (with an anchor: the sooner of its
//! two rendezvous choices, so instances with no shared state agree while loads
//! are alike); every decision carries its prediction, checked against the
//! observed first token and exported per replica.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use smallvec::SmallVec;

use xxhash_rust::xxh3::xxh3_64;

use super::backlog::Backlogs;
use super::bytes_per_token::BytesPerToken;
use super::consistent::{anchor, best_admitted, best_where, hrw_score, Candidate, LoadBound};
use super::observe::{CacheReport, PredictionOutcome, ReplicaStats};
use super::prefill_model::{fit_or_prior, Fit, FleetFits};
use super::session::SessionTable;
use super::share::{Entry, Shares};
use super::{
    candidates, Decision, DecisionKind, LearnedSpeed, NoObserver, Prediction, ResponseReport,
    RouteObserver, RouteRequest, Router, RouterStats,
};
use crate::index::{IndexConfig, PrefixIndex, SlotModel};
use crate::replica::{Replica, ReplicaSet, MAX_REPLICAS};

/// The prediction error before any learned prediction was checked: a quarter,
/// forgotten at [`ERROR_DECAY`] per checked response.
const ERROR_PRIOR: f64 = 0.25;
const ERROR_DECAY: f64 = 1.0 / 64.0;
/// The share of its cache budget a replica's tracked prefixes fill past which
/// a new prefix placed there would soon evict others' blocks. On the offline
/// matrix, 0.8 and 0.9 keep the gain on the cells whose caches run full and
/// leave every other cell's decisions as they were; 0.95 loses the gain, and
/// 0.6 or less also moves prefixes between replicas with room, which costs
/// agreement between instances for nothing.
const NEARLY_FULL: f64 = 0.8;
/// Errors past this are clamped: a margin of 1 would never move a request.
const ERROR_MAX: f64 = 0.9;
/// Predicted times closer than this share are a tie.
const TIE: f64 = 1e-3;

/// Share of `load_norm` taken by the replica's KV usage; the rest is its load
/// relative to what the bound allows it.
const KV_USAGE_SHARE: f64 = 0.25;

#[derive(Debug, Clone, PartialEq)]
pub struct KvAwareParams {
    pub block_bytes: usize,
    pub anchor_blocks: usize,
    pub w_cache: f64,
    pub w_load: f64,
    pub w_prefill: f64,
    pub prefill_scale_bytes: usize,
    pub epsilon: f64,
    /// Below this many in-flight requests a replica is never over the bound.
    pub load_floor: u64,
    /// The share bound's `ε` ([`super::share`]); `None` for no share bound.
    pub share_epsilon: Option<f64>,
    pub session_ttl_ms: u64,
    pub session_capacity: usize,
    pub index: IndexConfig,
}

/// Counters for the proxy to export (snapshot of [`KvAware::counters`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvAwareCounters {
    pub session: u64,
    pub prefix: u64,
    pub consistent: u64,
    pub spill: u64,
    pub load_only: u64,
    /// Responses that reported usage.
    pub usage_reports: u64,
    /// Predicted a cached prefix and the replica reported cached tokens.
    pub predicted_hit_actual_hit: u64,
    /// Predicted a cached prefix, the replica reported none.
    pub predicted_hit_actual_miss: u64,
    /// Predicted nothing, the replica had some (learned elsewhere, or a shared prefix).
    pub predicted_miss_actual_hit: u64,
    pub predicted_tokens: u64,
    pub cached_tokens: u64,
    /// First tokens learned from (streamed responses with a usage report).
    pub ttft_observations: u64,
    /// Reports not learned from: zero prompt tokens, more cached than prompt
    /// tokens, an implausible bytes-per-token ratio or timing.
    pub ignored_reports: u64,
}

#[derive(Default)]
struct Counters {
    session: AtomicU64,
    prefix: AtomicU64,
    consistent: AtomicU64,
    spill: AtomicU64,
    load_only: AtomicU64,
    usage_reports: AtomicU64,
    hit_hit: AtomicU64,
    hit_miss: AtomicU64,
    miss_hit: AtomicU64,
    predicted_tokens: AtomicU64,
    cached_tokens: AtomicU64,
    ttft_observations: AtomicU64,
    ignored_reports: AtomicU64,
}

pub struct KvAware {
    p: KvAwareParams,
    index: PrefixIndex,
    sessions: SessionTable,
    fits: FleetFits,
    backlogs: Backlogs,
    shares: Shares,
    bytes_per_token: BytesPerToken,
    /// Mean uncached bytes per routed request (`f64` bits), to price the engine's
    /// own waiting requests, whose prompts this proxy never saw.
    mean_prefill_bytes: AtomicU64,
    /// Typical relative error of learned TTFT predictions (`f64` bits): the mean
    /// `|ln(observed / predicted)|`. A new prefix leaves its first rendezvous
    /// choice only for one predicted sooner by more than this: on a noisy fleet
    /// a small predicted saving is a coin flip that costs agreement between
    /// instances.
    prediction_error: AtomicU64,
    next: AtomicUsize,
    /// URL key per slot as of the last replica change (0: slot unused), to tell a
    /// removed replica from a slot reused by another.
    known: Mutex<[u64; MAX_REPLICAS]>,
    counters: Counters,
    observer: Arc<dyn RouteObserver>,
}

impl KvAware {
    pub fn new(p: KvAwareParams) -> Self {
        KvAware {
            index: PrefixIndex::new(&p.index),
            sessions: SessionTable::new(p.session_capacity, p.session_ttl_ms),
            fits: FleetFits::default(),
            backlogs: Backlogs::default(),
            shares: Shares::default(),
            bytes_per_token: BytesPerToken::default(),
            mean_prefill_bytes: AtomicU64::new(0),
            prediction_error: AtomicU64::new(ERROR_PRIOR.to_bits()),
            next: AtomicUsize::new(0),
            known: Mutex::new([0; MAX_REPLICAS]),
            counters: Counters::default(),
            observer: Arc::new(NoObserver),
            p,
        }
    }

    /// Tells `observer` of each decision and report (the data plane's metrics).
    pub fn observed(mut self, observer: Arc<dyn RouteObserver>) -> Self {
        self.observer = observer;
        self
    }

    /// The prefix index, for the admin API (clear a restarted replica, stats).
    pub fn index(&self) -> &PrefixIndex {
        &self.index
    }

    pub fn sessions(&self) -> &SessionTable {
        &self.sessions
    }

    /// A replica's learned prefill speed, once it has enough first tokens.
    pub fn fit(&self, slot: u16) -> Option<Fit> {
        self.fits.get(slot)
    }

    /// The learned prompt bytes per engine token, over every model.
    pub fn bytes_per_token(&self) -> f64 {
        self.bytes_per_token.overall()
    }

    pub fn counters(&self) -> KvAwareCounters {
        let c = &self.counters;
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        KvAwareCounters {
            session: r(&c.session),
            prefix: r(&c.prefix),
            consistent: r(&c.consistent),
            spill: r(&c.spill),
            load_only: r(&c.load_only),
            usage_reports: r(&c.usage_reports),
            predicted_hit_actual_hit: r(&c.hit_hit),
            predicted_hit_actual_miss: r(&c.hit_miss),
            predicted_miss_actual_hit: r(&c.miss_hit),
            predicted_tokens: r(&c.predicted_tokens),
            cached_tokens: r(&c.cached_tokens),
            ttft_observations: r(&c.ttft_observations),
            ignored_reports: r(&c.ignored_reports),
        }
    }

    /// Block budget mirroring a replica's KV capacity, when it is known; for a
    /// slot-based replica that does not report one, what its slots and host
    /// cache hold at most.
    pub fn replica_budget(&self, r: &Replica) -> u64 {
        match (r.spec.kv_blocks, r.spec.kv_block_tokens) {
            (Some(blocks), Some(tokens)) => {
                self.token_blocks(blocks.saturating_mul(u64::from(tokens)))
            }
            _ => self
                .slot_model(r)
                .filter(|m| m.slot_blocks < u32::MAX)
                .map_or(self.p.index.default_budget, |m| m.max_blocks()),
        }
    }

    /// Prompt blocks of `tokens` engine tokens, at the learned bytes per token.
    fn token_blocks(&self, tokens: u64) -> u64 {
        (tokens as f64 * self.bytes_per_token.overall() / self.p.block_bytes.max(1) as f64) as u64
    }

    /// The slot model of a replica that reports `kv_slots` (llama.cpp), in
    /// prompt blocks.
    pub fn slot_model(&self, r: &Replica) -> Option<SlotModel> {
        let slots = r.spec.kv_slots.filter(|s| *s > 0)?;
        let slot_blocks = r.spec.kv_slot_tokens.map_or(u32::MAX, |t| {
            self.token_blocks(u64::from(t))
                .clamp(1, u64::from(u32::MAX)) as u32
        });
        Some(SlotModel {
            slots,
            slot_blocks,
            host_blocks: self.token_blocks(r.spec.kv_host_tokens.unwrap_or(0)),
        })
    }

    /// `w_cache·matched/total − w_load·load_norm − w_prefill·(queued/scale)²`,
    /// `load_norm` being the load as a fraction of what the bound allows, blended
    /// with the replica's KV usage, `queued` the prefill bytes waiting there, and
    /// `scale` the larger of this prompt and `prefill_scale_bytes`.
    ///
    /// Request counts alone treat a replica prefilling one 100 KiB prompt as idle
    /// next to one decoding two short answers; the queued prefill is what delays a
    /// newcomer's first token. Why squared, and not in units of this prompt alone:
    /// a short queue delays the first token by less than the overlap it would give
    /// up saves (and a conversation moved off its replica takes its later turns'
    /// hits along), while the long queues are what the TTFT tail is made of. In
    /// units of a small prompt, every queue looked long, and small requests were
    /// scattered off their cache; the offline replay of the trace (`cargo xtask
    /// bench routing --offline`) put this form half a point of hit ratio above
    /// the linear one at the same TTFT p99.
    fn score(
        &self,
        c: &Candidate<'_>,
        matched: u32,
        total: usize,
        prompt_bytes: usize,
        bound: &LoadBound,
    ) -> f64 {
        let cache = f64::from(matched) / total.max(1) as f64;
        let relative = c.load as f64 / bound.capacity(c.weight) as f64;
        let kv = f64::from(c.kv_usage).clamp(0.0, 1.0);
        let load_norm = (1.0 - KV_USAGE_SHARE) * relative + KV_USAGE_SHARE * kv;
        let scale = prompt_bytes.max(self.p.prefill_scale_bytes).max(1) as f64;
        let queued = c.pending_prefill as f64 / scale;
        self.p.w_cache * cache - self.p.w_load * load_norm - self.p.w_prefill * queued * queued
    }

    /// How much of its cache a replica's prefixes fill, as the index tracks
    /// them: blocks over its budget (0 where it has none: nothing to evict).
    fn held(&self, slot: u16) -> f64 {
        match self.index.budget(slot) {
            0 => 0.0,
            budget => self.index.tracked(slot) as f64 / budget as f64,
        }
    }

    /// Prompt bytes a replica holding `matched` blocks still has to prefill.
    fn prefill_bytes(&self, prompt_bytes: usize, matched: u32) -> u64 {
        (prompt_bytes as u64).saturating_sub(u64::from(matched) * self.p.block_bytes as u64)
    }

    /// Seconds from sending the request to `c` until its first token, if `c`
    /// holds `matched` of its blocks, and the bytes queued ahead of it there.
    fn predicted_ttft(
        &self,
        c: &Candidate<'_>,
        fit: Fit,
        matched: u32,
        req: &RouteRequest<'_>,
    ) -> (f64, f64) {
        let own = self.prefill_bytes(req.prompt_bytes, matched) as f64;
        let ours = c.replica.awaiting();
        let wait = self
            .backlogs
            .wait(c.replica.slot, ours, req.now_ms, fit.secs_per_byte);
        // The engine's queue counts our requests too; only the rest are extra,
        // at the mean prompt this proxy sees.
        let others = c.waiting.saturating_sub(ours);
        let mean_prefill = f64::from_bits(self.mean_prefill_bytes.load(Ordering::Relaxed));
        let extra = f64::from(others) * mean_prefill;
        let ttft = fit.overhead_s + wait.seconds + (extra + own) * fit.secs_per_byte;
        (ttft, wait.queued_bytes + extra)
    }

    fn count(&self, kind: DecisionKind) {
        let c = &self.counters;
        let counter = match kind {
            DecisionKind::Session => &c.session,
            DecisionKind::Prefix => &c.prefix,
            DecisionKind::Consistent => &c.consistent,
            DecisionKind::Spill => &c.spill,
            DecisionKind::RoundRobin | DecisionKind::LeastLoaded => &c.load_only,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn ignore(&self) {
        self.counters
            .ignored_reports
            .fetch_add(1, Ordering::Relaxed);
        self.observer.report_ignored();
    }
}

/// The soonest of `among`, which callers order by preference: a later one
/// displaces an earlier one only when predicted sooner by more than `margin`.
fn soonest(
    predictions: &[Prediction],
    margin: f64,
    among: impl Iterator<Item = usize>,
) -> Option<usize> {
    let keep = 1.0 - margin.max(TIE);
    let mut best: Option<usize> = None;
    for i in among {
        match best {
            Some(b) if predictions[i].ttft_s >= predictions[b].ttft_s * keep => {}
            _ => best = Some(i),
        }
    }
    best
}

impl Router for KvAware {
    fn name(&self) -> &'static str {
        "kv-aware"
    }

    fn pick(&self, req: &RouteRequest<'_>, set: &ReplicaSet, exclude: &[u16]) -> Option<Decision> {
        let cands: SmallVec<[Candidate<'_>; 16]> = candidates(set, req.model, exclude, req.now_ms)
            .map(Candidate::new)
            .collect();
        if cands.is_empty() {
            return None;
        }
        let bound = LoadBound::new(&cands, self.p.epsilon, self.p.load_floor);
        let mask = cands
            .iter()
            .fold(0u128, |m, c| m | (1u128 << c.replica.slot));
        let matches = self.index.longest_match(req.block_hashes, mask);
        let best_blocks = matches.best();
        let own: SmallVec<[Option<Fit>; 16]> = cands
            .iter()
            .map(|c| self.fits.get(c.replica.slot))
            .collect();
        let known: SmallVec<[Fit; 16]> = own.iter().flatten().copied().collect();
        // Which candidates took more than their share of recent decisions, in
        // proportion to their weights. Not to their learned rates: fits of
        // alike replicas differ by their noise, and shares that follow it
        // move requests for nothing.
        let over = self.p.share_epsilon.map_or(0, |epsilon| {
            let entries: SmallVec<[Entry; 16]> = cands
                .iter()
                .map(|c| Entry {
                    slot: c.replica.slot,
                    weight: c.weight as f64,
                })
                .collect();
            self.shares.over(&entries, epsilon)
        });
        let within = |i: usize| over & (1u128 << i) == 0;
        let predictions: SmallVec<[Prediction; 16]> = cands
            .iter()
            .zip(&own)
            .enumerate()
            .map(|(i, (c, f))| {
                let fit = fit_or_prior(*f, &known);
                let (ttft_s, queued) =
                    self.predicted_ttft(c, fit, matches.get(c.replica.slot), req);
                Prediction {
                    ttft_s,
                    secs_per_byte: fit.secs_per_byte,
                    learned: f.is_some(),
                    queued_ahead_bytes: queued as u64,
                    over_share: !within(i),
                    refused_move_s: 0.0,
                }
            })
            .collect();
        let model_key = req.model.map_or(0, |m| xxh3_64(m.as_bytes()));
        let decide = |i: usize, kind: DecisionKind| {
            let predicted_blocks = matches.get(cands[i].replica.slot);
            Decision {
                replica: cands[i].replica.clone(),
                kind,
                predicted_blocks,
                best_blocks,
                prefill_bytes: self.prefill_bytes(req.prompt_bytes, predicted_blocks),
                prompt_bytes: req.prompt_bytes as u64,
                model_key,
                prediction: Some(predictions[i]),
            }
        };
        let admitted = |i: &usize| bound.admits(&cands[*i]);
        // Admitted and within their share, or, when none is, admitted.
        let eligible = |order: &[usize]| -> SmallVec<[usize; 16]> {
            let both: SmallVec<[usize; 16]> = order
                .iter()
                .copied()
                .filter(|i| admitted(i) && within(*i))
                .collect();
            if both.is_empty() {
                order.iter().copied().filter(admitted).collect()
            } else {
                both
            }
        };

        if let Some(pin) = req.session.and_then(|s| self.sessions.get(s, req.now_ms)) {
            let pinned = cands
                .iter()
                .position(|c| c.replica.slot == pin.slot && c.replica.url_key == pin.url_key);
            if let Some(i) = pinned.filter(|&i| bound.admits(&cands[i])) {
                return Some(decide(i, DecisionKind::Session));
            }
        }

        let anchor = anchor(
            req.block_hashes,
            self.p.anchor_blocks,
            req.model,
            req.session,
        );
        if best_blocks == 0 {
            let margin = f64::from_bits(self.prediction_error.load(Ordering::Relaxed));
            let mut order: SmallVec<[usize; 16]> = (0..cands.len()).collect();
            return Some(match anchor {
                // An unseen prefix: the sooner of its two rendezvous choices
                // that the bound admits (and that are within their share: with
                // nothing cached, moving costs nothing).
                Some(a) => {
                    // Each score once: the comparator would take two logarithms
                    // per comparison, most of a decision's time on a large fleet.
                    let ranks: SmallVec<[f64; 16]> = cands
                        .iter()
                        .map(|c| hrw_score(a, c.replica.url_key, c.weight))
                        .collect();
                    order.sort_by(|&x, &y| ranks[y].total_cmp(&ranks[x]));
                    let first = order[0];
                    // On a nearly full first choice it would evict others'
                    // blocks, and its tenant would follow it there: the
                    // second choice comes first when it holds clearly less
                    // (by more than the model's error). With room on the
                    // first, placing costs nothing and the hash decides, so
                    // instances, whose indexes differ, still agree.
                    let mut two: SmallVec<[usize; 2]> =
                        eligible(&order).into_iter().take(2).collect();
                    if let [first_choice, second_choice] = two[..] {
                        let held = |i: usize| self.held(cands[i].replica.slot);
                        let (h1, h2) = (held(first_choice), held(second_choice));
                        if h1 >= NEARLY_FULL && h2 < h1 * (1.0 - margin.max(TIE)) {
                            two.swap(0, 1);
                        }
                    }
                    let chosen = soonest(&predictions, margin, two.into_iter()).unwrap_or(first);
                    let kind = if chosen == first {
                        DecisionKind::Consistent
                    } else if !bound.admits(&cands[first]) || !within(first) {
                        DecisionKind::Spill
                    } else {
                        DecisionKind::LeastLoaded
                    };
                    decide(chosen, kind)
                }
                // Nothing to place by: the soonest, from a rotating start so
                // equal predictions spread.
                None => {
                    let n = order.len();
                    order.rotate_left(self.next.fetch_add(1, Ordering::Relaxed) % n);
                    let first = order[0];
                    let chosen = soonest(&predictions, margin, eligible(&order).into_iter())
                        .unwrap_or(first);
                    decide(chosen, DecisionKind::LeastLoaded)
                }
            });
        }

        // Ties in score (equal overlap and load) go by rendezvous order, so they
        // too are deterministic across instances.
        let total = req.block_hashes.len();
        let tie =
            |c: &Candidate<'_>| anchor.map_or(0.0, |a| hrw_score(a, c.replica.url_key, c.weight));
        let rank = |c: &Candidate<'_>| {
            (
                self.score(
                    c,
                    matches.get(c.replica.slot),
                    total,
                    req.prompt_bytes,
                    &bound,
                ),
                tie(c),
            )
        };
        let (preferred, mut chosen) = best_admitted(&cands, &bound, rank)?;
        let mut kind = if chosen != preferred {
            DecisionKind::Spill
        } else if matches.get(cands[chosen].replica.slot) > 0 {
            DecisionKind::Prefix
        } else {
            // Load outweighed every replica's overlap.
            DecisionKind::LeastLoaded
        };
        let mut refused = 0.0;
        if !within(chosen) {
            // Over its share: the best-scoring replica within its share takes
            // the request if that costs no more predicted time than the share's
            // price. In seconds, so a move to a slower replica costs more than
            // the same uncached bytes on a faster one.
            let alt = best_where(&cands, |i| within(i) && admitted(&i), rank);
            if let Some(a) = alt {
                let cost = predictions[a].ttft_s - predictions[chosen].ttft_s;
                if cost <= self.shares.price(cands[chosen].replica.slot) {
                    chosen = a;
                    kind = DecisionKind::Spill;
                } else {
                    refused = cost;
                }
            }
        }
        let mut d = decide(chosen, kind);
        if let Some(p) = d.prediction.as_mut() {
            p.refused_move_s = refused;
        }
        Some(d)
    }

    fn on_routed(&self, req: &RouteRequest<'_>, decision: &Decision) {
        let r = &decision.replica;
        self.index.insert(r.slot, req.block_hashes);
        if let Some(s) = req.session {
            self.sessions.put(s, r.slot, r.url_key, req.now_ms);
        }
        self.count(decision.kind);
        let mean_prefill = f64::from_bits(self.mean_prefill_bytes.load(Ordering::Relaxed));
        if let (Some(_), Some(p)) = (self.p.share_epsilon, decision.prediction) {
            self.shares.record(r.slot, p.over_share, p.refused_move_s);
        }
        if let Some(p) = decision.prediction {
            self.backlogs.push(
                r.slot,
                r.awaiting(),
                decision.prefill_bytes,
                req.now_ms,
                p.secs_per_byte,
            );
        }
        // A running mean over about the last 64 requests; racing updates lose
        // one sample's share, which a mean of 64 does not notice.
        let m = mean_prefill + (decision.prefill_bytes as f64 - mean_prefill) / 64.0;
        self.mean_prefill_bytes
            .store(m.to_bits(), Ordering::Relaxed);
        if !req.block_hashes.is_empty() {
            let total = req.block_hashes.len() as f64;
            // What the decision gave up against the best overlap any eligible
            // replica had: nonzero on spills, so their cost is visible.
            self.observer.routed(
                f64::from(decision.predicted_blocks) / total,
                f64::from(decision.regret_blocks()) / total,
            );
        }
    }

    fn learned(&self, slot: u16) -> Option<LearnedSpeed> {
        let fit = self.fits.get(slot)?;
        Some(LearnedSpeed {
            prefill_bytes_per_s: fit.rate_bytes_per_s(),
            ttft_overhead_s: fit.overhead_s,
            observations: self.fits.observations(slot),
        })
    }

    fn on_response(&self, decision: &Decision, report: &ResponseReport) {
        let Some(prompt_tokens) = report.prompt_tokens else {
            return;
        };
        let c = &self.counters;
        let impossible = prompt_tokens == 0
            || report
                .cached_tokens
                .is_some_and(|cached| cached > prompt_tokens);
        if impossible {
            self.ignore();
            return;
        }
        if decision.prompt_bytes > 0
            && !self.bytes_per_token.observe(
                decision.model_key,
                decision.prompt_bytes,
                prompt_tokens,
            )
        {
            // A token count no tokenizer gives for this prompt: its other
            // numbers are not to be trusted either.
            self.ignore();
            return;
        }
        let bpt = self.bytes_per_token.get(decision.model_key);
        if let Some(cached_tokens) = report.cached_tokens {
            let predicted_tokens =
                (f64::from(decision.predicted_blocks) * self.p.block_bytes as f64 / bpt)
                    .min(prompt_tokens as f64) as u64;
            c.usage_reports.fetch_add(1, Ordering::Relaxed);
            c.predicted_tokens
                .fetch_add(predicted_tokens, Ordering::Relaxed);
            c.cached_tokens.fetch_add(cached_tokens, Ordering::Relaxed);
            let outcome = match (predicted_tokens > 0, cached_tokens > 0) {
                (true, true) => Some((&c.hit_hit, PredictionOutcome::HitHit)),
                (true, false) => Some((&c.hit_miss, PredictionOutcome::HitMiss)),
                (false, true) => Some((&c.miss_hit, PredictionOutcome::MissHit)),
                (false, false) => None,
            };
            if let Some((counter, _)) = outcome {
                counter.fetch_add(1, Ordering::Relaxed);
            }
            self.observer.cache_report(
                &decision.replica,
                &CacheReport {
                    outcome: outcome.map(|(_, o)| o),
                    predicted_tokens,
                    cached_tokens,
                    prompt_tokens,
                },
            );
        }
        let Some(ttft_ms) = report.ttft_ms else {
            return;
        };
        // The replica's own count of what it prefilled, in prompt bytes; the
        // prediction where it reports no cached tokens.
        let uncached = match report.cached_tokens {
            Some(cached) => {
                decision.prompt_bytes as f64 * (prompt_tokens - cached) as f64
                    / prompt_tokens as f64
            }
            None => decision.prefill_bytes as f64,
        };
        let Some(prediction) = decision.prediction else {
            return;
        };
        let work = prediction.queued_ahead_bytes + uncached as u64;
        // A millisecond clock: a first token inside it is taken at its middle.
        let ttft_s = (ttft_ms as f64 + 0.5) / 1e3;
        if self
            .fits
            .observe(decision.replica.slot, work, ttft_s)
            .is_err()
        {
            self.ignore();
            return;
        }
        c.ttft_observations.fetch_add(1, Ordering::Relaxed);
        if prediction.learned && prediction.ttft_s > 0.0 {
            let ratio = ttft_s / prediction.ttft_s;
            self.observer.ttft_ratio(&decision.replica, ratio);
            let e = f64::from_bits(self.prediction_error.load(Ordering::Relaxed));
            let e = (e + (ratio.ln().abs() - e) * ERROR_DECAY).min(ERROR_MAX);
            self.prediction_error.store(e.to_bits(), Ordering::Relaxed);
        }
    }

    fn scrape(&self, set: &ReplicaSet) -> Option<RouterStats> {
        let mut replicas = Vec::with_capacity(set.replicas.len());
        for r in &set.replicas {
            replicas.push(ReplicaStats {
                url: r.spec.url.clone(),
                blocks: self.index.tracked(r.slot),
                budget_blocks: self.index.budget(r.slot),
                prompts: self.index.slot_occupancy(r.slot),
                speed: self.learned(r.slot),
            });
            // Budgets follow the learned bytes per token; a drift under a tenth is
            // not worth re-evicting for.
            let budget = self.replica_budget(r);
            let now = self.index.budget(r.slot);
            if budget.abs_diff(now) * 10 > now {
                self.index.set_budget(r.slot, budget);
            }
        }
        Some(RouterStats {
            index: self.index.stats(),
            replicas,
            bytes_per_token: self.bytes_per_token.overall(),
        })
    }

    fn on_replicas_changed(&self, set: &ReplicaSet) {
        let mut known = self.known.lock();
        let mut now = [0u64; MAX_REPLICAS];
        for r in &set.replicas {
            if let Some(k) = now.get_mut(usize::from(r.slot)) {
                // Never 0, which marks an unused slot.
                *k = r.url_key | 1;
            }
        }
        for slot in 0..MAX_REPLICAS {
            if known[slot] != 0 && known[slot] != now[slot] {
                self.index.clear(slot as u16);
                self.fits.clear(slot as u16);
                self.backlogs.clear(slot as u16);
                self.shares.clear(slot as u16);
            }
        }
        for r in &set.replicas {
            self.index.set_slot_model(r.slot, self.slot_model(r));
            let budget = self.replica_budget(r);
            if self.index.budget(r.slot) != budget {
                self.index.set_budget(r.slot, budget);
            }
        }
        *known = now;
    }
}

#[cfg(test)]
mod tests;
