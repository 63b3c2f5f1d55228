//! The `kv-aware` policy: every candidate priced in seconds, as the time to first
//! token the request would see there, under the `(1+ε)·mean` load bound so a hot
//! prefix spills instead of melting one replica.
//!
//! Predicted TTFT on a replica = its overhead + (the prefill work queued ahead of
//! the request there + the request's own uncached prompt) / its prefill rate.
//! The overlap the prefix index predicts sets the uncached part; the queue is
//! this proxy's uncached work in flight there plus the engine's own waiting
//! requests beyond ours; the rate and overhead are learned per replica from its
//! first tokens ([`super::prefill_model`]). A replica whose requests have been
//! waiting longer than its queue explains (stalled, swapping, restarting) is
//! predicted at least that slow, so it is never predicted fast.
//!
//! Locality is priced in the same seconds: a conversation moved off the replica
//! holding its earlier turns pays its whole prompt's prefill at the destination,
//! which is what its predicted TTFT there contains; it moves only when that is
//! still sooner. The same goes for a session pin, kept while no replica is
//! predicted sooner. Unseen prefixes go to the sooner of their anchor's two
//! rendezvous choices, so instances with no shared state agree while loads are
//! alike and still steer around a queue; prompts with no anchor go to the
//! soonest replica.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use parking_lot::Mutex;
use smallvec::SmallVec;
use xxhash_rust::xxh3::xxh3_64;

use super::backlog::Backlogs;
use super::bytes_per_token::BytesPerToken;
use super::consistent::{hrw_score, url_key, Candidate, LoadBound};
use super::prefill_model::{fit_or_prior, Fit, FleetFits};
use super::session::SessionTable;
use super::{
    candidates, Decision, DecisionKind, LearnedSpeed, Prediction, ResponseReport, RouteRequest,
    Router,
};
use crate::index::{IndexConfig, PrefixIndex};
use crate::replica::{Replica, ReplicaSet, MAX_REPLICAS};

/// The reuse share before any report: half, forgotten at [`REUSE_DECAY`] per report.
const REUSE_PRIOR: f64 = 0.5;
const REUSE_DECAY: f64 = 1.0 / 256.0;

/// The prediction error before any learned prediction was checked: a quarter,
/// forgotten at [`ERROR_DECAY`] per checked response.
const ERROR_PRIOR: f64 = 0.25;
const ERROR_DECAY: f64 = 1.0 / 64.0;
/// Errors past this are clamped: a margin of 1 would never move a request.
const ERROR_MAX: f64 = 0.9;

/// Predicted times closer than this share are a tie, broken by rendezvous order
/// (deterministic across instances) rather than by float noise.
const TIE: f64 = 1e-3;

#[derive(Debug, Clone, PartialEq)]
pub struct KvAwareParams {
    pub block_bytes: usize,
    pub anchor_blocks: usize,
    pub epsilon: f64,
    /// Below this many in-flight requests a replica is never over the bound.
    pub load_floor: u64,
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
    /// Reports not learned from: missing or zero prompt tokens, more cached than
    /// prompt tokens, an implausible bytes-per-token ratio or timing.
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

/// One priced candidate of a decision.
#[derive(Debug, Clone, Copy)]
struct Priced {
    matched: u32,
    ttft_s: f64,
    cost_s: f64,
    queued_bytes: f64,
    secs_per_byte: f64,
}

pub struct KvAware {
    p: KvAwareParams,
    index: PrefixIndex,
    sessions: SessionTable,
    fits: FleetFits,
    backlogs: Backlogs,
    bytes_per_token: BytesPerToken,
    /// Mean uncached bytes per routed request (`f64` bits), to price the engine's
    /// own waiting requests, whose prompts this proxy never saw.
    mean_prefill_bytes: AtomicU64,
    /// Share of prompt tokens the replicas report cached (`f64` bits): how likely
    /// a cached block is to be used again, which prices a duplicated one.
    reuse: AtomicU64,
    /// Mean milliseconds between routed requests (`f64` bits) and the last one's
    /// time: the arrival rate that prices the wait a prefill imposes on others.
    mean_gap_ms: AtomicU64,
    last_arrival_ms: AtomicU64,
    /// Typical relative error of learned TTFT predictions (`f64` bits): the mean
    /// `|ln(observed / predicted)|`. A candidate predicted sooner by less than
    /// this is not taken over the preferred one: on a noisy fleet a small
    /// predicted saving is a coin flip that spends cache and cross-instance
    /// agreement.
    prediction_error: AtomicU64,
    next: AtomicUsize,
    /// URL key per slot as of the last replica change (0: slot unused), to tell a
    /// removed replica from a slot reused by another.
    known: Mutex<[u64; MAX_REPLICAS]>,
    counters: Counters,
}

impl KvAware {
    pub fn new(p: KvAwareParams) -> Self {
        KvAware {
            index: PrefixIndex::new(&p.index),
            sessions: SessionTable::new(p.session_capacity, p.session_ttl_ms),
            fits: FleetFits::default(),
            backlogs: Backlogs::default(),
            bytes_per_token: BytesPerToken::default(),
            mean_prefill_bytes: AtomicU64::new(0),
            reuse: AtomicU64::new(REUSE_PRIOR.to_bits()),
            mean_gap_ms: AtomicU64::new(f64::INFINITY.to_bits()),
            last_arrival_ms: AtomicU64::new(u64::MAX),
            prediction_error: AtomicU64::new(ERROR_PRIOR.to_bits()),
            next: AtomicUsize::new(0),
            known: Mutex::new([0; MAX_REPLICAS]),
            counters: Counters::default(),
            p,
        }
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

    /// Block budget mirroring a replica's KV capacity, when it is known, in
    /// prompt blocks at the learned bytes per token.
    pub fn replica_budget(&self, r: &Replica) -> u64 {
        match (r.spec.kv_blocks, r.spec.kv_block_tokens) {
            (Some(blocks), Some(tokens)) => {
                let bytes = blocks as f64 * f64::from(tokens) * self.bytes_per_token.overall();
                (bytes / self.p.block_bytes.max(1) as f64) as u64
            }
            _ => self.p.index.default_budget,
        }
    }

    /// Prompt bytes a replica holding `matched` blocks still has to prefill.
    fn prefill_bytes(&self, prompt_bytes: usize, matched: u32) -> u64 {
        (prompt_bytes as u64).saturating_sub(u64::from(matched) * self.p.block_bytes as u64)
    }

    /// Seconds from sending the request to `c` until its first token, if `c`
    /// holds `matched` of its blocks.
    /// What sending the request to `c` costs, in seconds, with its predicted
    /// TTFT there: the TTFT, plus what its prefill costs the requests after it.
    /// Prefill work added to a server at utilisation `ρ` delays the requests
    /// that arrive while it drains by `ρ / (1 − ρ)` times its length in all
    /// (the busy period it extends, M/G/1). At low load this vanishes and a
    /// request goes where it is answered soonest; near capacity, re-prefilling
    /// a prefix another replica holds is charged for the queue it builds.
    fn cost_s(
        &self,
        c: &Candidate<'_>,
        fit: Fit,
        matched: u32,
        best: u32,
        pressure: f64,
        req: &RouteRequest<'_>,
    ) -> Priced {
        let (ttft_s, queued) = self.predicted_ttft_s(c, fit, matched, req);
        let prefill = self.prefill_bytes(req.prompt_bytes, matched) as f64 * fit.secs_per_byte;
        let duplicated = f64::from(best.saturating_sub(matched)) * self.p.block_bytes as f64;
        let reuse = f64::from_bits(self.reuse.load(Ordering::Relaxed));
        Priced {
            matched,
            ttft_s,
            cost_s: ttft_s
                + prefill * pressure
                + duplicated
                    * (reuse / (1.0 - reuse).max(0.05))
                    * std::env::var("KVR_DUP")
                        .ok()
                        .and_then(|v| v.parse::<f64>().ok())
                        .unwrap_or(1.0)
                    * fit.secs_per_byte,
            queued_bytes: queued,
            secs_per_byte: fit.secs_per_byte,
        }
    }

    /// `ρ / (1 − ρ)` for the fleet's prefill utilisation `ρ`: arrivals per second
    /// times the mean uncached prefill's seconds, per replica. Capped at
    /// `ρ = 0.95` (a factor of 19) since past it the estimate is noise.
    fn pressure(&self, fleet: Fit, replicas: f64) -> f64 {
        let gap_s = f64::from_bits(self.mean_gap_ms.load(Ordering::Relaxed)) / 1e3;
        let mean_prefill = f64::from_bits(self.mean_prefill_bytes.load(Ordering::Relaxed));
        if !(gap_s > 0.0) || replicas <= 0.0 {
            return 0.0;
        }
        let rho = (mean_prefill * fleet.secs_per_byte / gap_s / replicas).clamp(0.0, 0.95);
        rho / (1.0 - rho)
    }

    /// Seconds from sending the request to `c` until its first token, if `c`
    /// holds `matched` of its blocks, with the bytes queued ahead of it there.
    fn predicted_ttft_s(
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
        let others = c.replica.external_load().waiting.saturating_sub(ours);
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
    }
}

/// Index of the cheapest of `among`, which callers order by preference: a later
/// candidate displaces an earlier one only when cheaper by more than `margin`
/// of its cost.
fn soonest(priced: &[Priced], margin: f64, among: impl Iterator<Item = usize>) -> Option<usize> {
    let keep = 1.0 - margin.max(TIE);
    let mut best: Option<usize> = None;
    for i in among {
        match best {
            Some(b) if priced[i].cost_s >= priced[b].cost_s * keep => {}
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
        let cands: SmallVec<[Candidate<'_>; 16]> = candidates(set, req.model, exclude)
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
        let pressure = self.pressure(fit_or_prior(None, &known), cands.len() as f64);
        let priced: SmallVec<[Priced; 16]> = cands
            .iter()
            .zip(&own)
            .map(|(c, fit)| {
                let matched = matches.get(c.replica.slot);
                self.cost_s(
                    c,
                    fit_or_prior(*fit, &known),
                    matched,
                    best_blocks,
                    pressure,
                    req,
                )
            })
            .collect();
        let model_key = req.model.map_or(0, |m| xxh3_64(m.as_bytes()));
        let decide = |i: usize, kind: DecisionKind| Decision {
            replica: cands[i].replica.clone(),
            kind,
            predicted_blocks: priced[i].matched,
            best_blocks,
            prefill_bytes: self.prefill_bytes(req.prompt_bytes, priced[i].matched),
            prompt_bytes: req.prompt_bytes as u64,
            model_key,
            prediction: Some(Prediction {
                ttft_s: priced[i].ttft_s,
                secs_per_byte: priced[i].secs_per_byte,
                learned: own[i].is_some(),
                queued_ahead_bytes: priced[i].queued_bytes as u64,
            }),
        };
        let admitted = |i: &usize| bound.admits(&cands[*i]);

        // Preference among equal predictions: rendezvous order of the anchor, so
        // instances agree; without an anchor, a rotation.
        let anchor = super::consistent::anchor(
            req.block_hashes,
            self.p.anchor_blocks,
            req.model,
            req.session,
        );
        let mut order: SmallVec<[usize; 16]> = (0..cands.len()).collect();
        match anchor {
            Some(a) => {
                let rank = |i: usize| hrw_score(a, cands[i].url_key, cands[i].weight);
                order.sort_by(|&x, &y| rank(y).total_cmp(&rank(x)));
            }
            None => {
                let n = order.len();
                order.rotate_left(self.next.fetch_add(1, Ordering::Relaxed) % n);
            }
        }
        let pin = req
            .session
            .and_then(|s| self.sessions.get(s, req.now_ms))
            .and_then(|p| {
                cands
                    .iter()
                    .position(|c| c.replica.slot == p.slot && c.url_key == p.url_key)
            });
        // Where the prefix is held, its holders come first (most overlap first):
        // a move off them must be confidently sooner.
        if best_blocks > 0 {
            order.sort_by_key(|&i| std::cmp::Reverse(priced[i].matched));
        }
        if let Some(p) = pin {
            let at = order.iter().position(|&i| i == p).expect("a candidate");
            order[..=at].rotate_right(1);
        }
        let margin = f64::from_bits(self.prediction_error.load(Ordering::Relaxed));

        if best_blocks == 0 && pin.is_none() {
            let first = order[0];
            let (chosen, kind) = if anchor.is_some() {
                // An unseen prefix: the sooner of its two rendezvous choices.
                let two: SmallVec<[usize; 2]> =
                    order.iter().copied().filter(admitted).take(2).collect();
                let chosen = soonest(&priced, margin, two.into_iter()).unwrap_or(first);
                let kind = if chosen == first {
                    DecisionKind::Consistent
                } else if !bound.admits(&cands[first]) {
                    DecisionKind::Spill
                } else {
                    DecisionKind::LeastLoaded
                };
                (chosen, kind)
            } else {
                let chosen = soonest(&priced, margin, order.iter().copied().filter(admitted))
                    .unwrap_or(first);
                (chosen, DecisionKind::LeastLoaded)
            };
            return Some(decide(chosen, kind));
        }

        let preferred = soonest(&priced, margin, order.iter().copied()).expect("candidates");
        let chosen =
            soonest(&priced, margin, order.iter().copied().filter(admitted)).unwrap_or(preferred);
        if std::env::var_os("KVR_DBG").is_some() && priced[chosen].matched < best_blocks {
            let h = (0..priced.len())
                .find(|&i| priced[i].matched == best_blocks)
                .unwrap();
            eprintln!("DBG prompt {} best {} chosen m {} ttft {:.4} cost {:.4} q {:.0} | holder ttft {:.4} cost {:.4} q {:.0} aw {} admit {} press {:.3}",
              req.prompt_bytes, best_blocks, priced[chosen].matched, priced[chosen].ttft_s, priced[chosen].cost_s, priced[chosen].queued_bytes,
              priced[h].ttft_s, priced[h].cost_s, priced[h].queued_bytes, cands[h].replica.awaiting(), bound.admits(&cands[h]), pressure);
        }
        let kind = if chosen != preferred {
            DecisionKind::Spill
        } else if Some(chosen) == pin {
            DecisionKind::Session
        } else if priced[chosen].matched > 0 {
            DecisionKind::Prefix
        } else {
            // A queue outweighed every replica's overlap.
            DecisionKind::LeastLoaded
        };
        Some(decide(chosen, kind))
    }

    fn on_routed(&self, req: &RouteRequest<'_>, decision: &Decision) {
        let r = &decision.replica;
        self.index.insert(r.slot, req.block_hashes);
        if let Some(s) = req.session {
            self.sessions
                .put(s, r.slot, url_key(&r.spec.url), req.now_ms);
        }
        self.count(decision.kind);
        if let Some(p) = decision.prediction {
            self.backlogs.push(
                r.slot,
                r.awaiting(),
                decision.prefill_bytes,
                req.now_ms,
                p.secs_per_byte,
            );
        }
        let last = self.last_arrival_ms.swap(req.now_ms, Ordering::Relaxed);
        if last != u64::MAX {
            let gap = req.now_ms.saturating_sub(last) as f64;
            let g = f64::from_bits(self.mean_gap_ms.load(Ordering::Relaxed));
            let g = if g.is_finite() {
                g + (gap - g) / 64.0
            } else {
                gap
            };
            self.mean_gap_ms.store(g.to_bits(), Ordering::Relaxed);
        }
        // A running mean over about the last 64 requests; racing updates lose
        // one sample's share, which a mean of 64 does not notice.
        let m = f64::from_bits(self.mean_prefill_bytes.load(Ordering::Relaxed));
        let m = m + (decision.prefill_bytes as f64 - m) / 64.0;
        self.mean_prefill_bytes
            .store(m.to_bits(), Ordering::Relaxed);
        if !req.block_hashes.is_empty() {
            let total = req.block_hashes.len() as f64;
            metrics::histogram!("kvroute_prefix_predicted_ratio")
                .record(f64::from(decision.predicted_blocks) / total);
            // What the decision gave up against the best overlap any eligible
            // replica had: nonzero on spills, so their cost is visible.
            metrics::histogram!("kvroute_routing_regret_ratio")
                .record(f64::from(decision.regret_blocks()) / total);
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
        let replica = decision.replica.spec.url.clone();
        if decision.prompt_bytes > 0
            && !self.bytes_per_token.observe(
                decision.model_key,
                decision.prompt_bytes,
                prompt_tokens,
            )
        {
            self.ignore();
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
            let share = cached_tokens as f64 / prompt_tokens as f64;
            let r = f64::from_bits(self.reuse.load(Ordering::Relaxed));
            self.reuse
                .store((r + (share - r) * REUSE_DECAY).to_bits(), Ordering::Relaxed);
            let outcome = match (predicted_tokens > 0, cached_tokens > 0) {
                (true, true) => Some((&c.hit_hit, "hit_hit")),
                (true, false) => Some((&c.hit_miss, "hit_miss")),
                (false, true) => Some((&c.miss_hit, "miss_hit")),
                (false, false) => None,
            };
            if let Some((counter, label)) = outcome {
                counter.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("kvroute_prefix_prediction_total", "outcome" => label)
                    .increment(1);
            }
            metrics::histogram!("kvroute_prefix_predicted_tokens", "replica" => replica.clone())
                .record(predicted_tokens as f64);
            metrics::histogram!("kvroute_prefix_cached_tokens", "replica" => replica.clone())
                .record(cached_tokens as f64);
            metrics::histogram!("kvroute_prefix_cached_ratio", "replica" => replica.clone())
                .record(cached_tokens as f64 / prompt_tokens as f64);
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
            metrics::histogram!("kvroute_ttft_prediction_ratio", "replica" => replica)
                .record(ratio);
            let e = f64::from_bits(self.prediction_error.load(Ordering::Relaxed));
            let e = (e + (ratio.ln().abs() - e) * ERROR_DECAY).min(ERROR_MAX);
            self.prediction_error.store(e.to_bits(), Ordering::Relaxed);
        }
    }

    fn export_gauges(&self, set: &ReplicaSet) {
        let st = self.index.stats();
        metrics::gauge!("kvroute_index_blocks").set(st.entries as f64);
        metrics::gauge!("kvroute_index_pairs").set(st.pairs as f64);
        metrics::gauge!("kvroute_index_bytes").set(st.heap_bytes as f64);
        metrics::gauge!("kvroute_index_evictions").set(st.evictions as f64);
        for r in &set.replicas {
            let url = r.spec.url.clone();
            metrics::gauge!("kvroute_index_replica_blocks", "replica" => url.clone())
                .set(self.index.tracked(r.slot) as f64);
            metrics::gauge!("kvroute_index_replica_budget_blocks", "replica" => url.clone())
                .set(self.index.budget(r.slot) as f64);
            if let Some(fit) = self.fits.get(r.slot) {
                metrics::gauge!("kvroute_replica_prefill_rate_bytes_per_second", "replica" => url.clone())
                    .set(fit.rate_bytes_per_s());
                metrics::gauge!("kvroute_replica_ttft_overhead_seconds", "replica" => url)
                    .set(fit.overhead_s);
            }
            // Budgets follow the learned bytes per token; a drift under a tenth is
            // not worth re-evicting for.
            let budget = self.replica_budget(r);
            let now = self.index.budget(r.slot);
            if budget.abs_diff(now) * 10 > now {
                self.index.set_budget(r.slot, budget);
            }
        }
        metrics::gauge!("kvroute_bytes_per_token").set(self.bytes_per_token.overall());
        let c = self.counters();
        metrics::gauge!("kvroute_routing_ttft_observations").set(c.ttft_observations as f64);
        metrics::gauge!("kvroute_routing_ignored_reports").set(c.ignored_reports as f64);
    }

    fn on_replicas_changed(&self, set: &ReplicaSet) {
        let mut known = self.known.lock();
        let mut now = [0u64; MAX_REPLICAS];
        for r in &set.replicas {
            if let Some(k) = now.get_mut(usize::from(r.slot)) {
                // Never 0, which marks an unused slot.
                *k = url_key(&r.spec.url) | 1;
            }
        }
        for slot in 0..MAX_REPLICAS {
            if known[slot] != 0 && known[slot] != now[slot] {
                self.index.clear(slot as u16);
                self.fits.clear(slot as u16);
                self.backlogs.clear(slot as u16);
            }
        }
        for r in &set.replicas {
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
