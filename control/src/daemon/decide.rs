//! The daemon's decisions, without I/O: each observation comes in with the time
//! the runner read when it arrived, and what should happen goes out as a list
//! of [`Effect`]s for the runner (`daemon.rs`) to carry out. Deciding without a
//! clock or a task of its own makes every decision reproducible, and testable
//! on a fake clock without processes, sockets or a runtime.
#![deny(clippy::disallowed_methods)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvroute_admin_api::{Pool, ReplicaLoad, ReplicaSpec};

use super::effect::Effect;
use super::replica::{Replica, Seen};
use super::{Msg, ReplicaView};
use crate::config::{ms, Config, ReplicaConfig};
use crate::discovery::Source;
use crate::error::ControlError;
use crate::kv_events::ClearNotice;
use crate::push::DpReport;
use crate::scrape::Scraped;
use crate::scraper::Report;
use crate::warm::{self, Reason, WarmState};

/// How long the first push waits for a replica file or DNS name that has not
/// answered: past it, what is known is pushed (a missing file must not keep the
/// static replicas out forever).
const DISCOVERY_GRACE: Duration = Duration::from_secs(5);

/// Failed scrapes in a row after which a replica's load figures are dropped.
const STALE_SCRAPES: u32 = 3;

/// What the daemon counts of its own decisions, for `/metrics`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Counters {
    pub(super) promotions: u64,
    pub(super) demotions: u64,
    pub(super) prewarm_failures: u64,
    pub(super) clears_sent: u64,
    pub(super) reloads: u64,
    pub(super) discovery_updates: u64,
}

/// Every replica's state and what the data planes were last given.
pub(super) struct Decisions {
    cfg: Config,
    reps: BTreeMap<String, Replica>,
    sources: BTreeMap<Source, Vec<ReplicaConfig>>,
    /// Sources that have not reported yet: until they have (or a grace passed),
    /// a restarted daemon would push a set missing their replicas.
    awaiting: BTreeSet<Source>,
    warm: WarmState,
    started: Instant,
    next_gen: u64,
    /// The snapshot and the load last handed to the push tasks: only a change
    /// is handed on.
    pushed: Option<Arc<Vec<ReplicaSpec>>>,
    pushed_load: Arc<Vec<ReplicaLoad>>,
    counters: Counters,
}

impl Decisions {
    /// Decisions of a daemon started at `started`, nothing discovered yet.
    pub(super) fn new(cfg: Config, started: Instant) -> Decisions {
        Decisions {
            cfg,
            reps: BTreeMap::new(),
            sources: BTreeMap::new(),
            awaiting: BTreeSet::new(),
            warm: WarmState::default(),
            started,
            next_gen: 1,
            pushed: None,
            pushed_load: Arc::new(Vec::new()),
            counters: Counters::default(),
        }
    }

    pub(super) fn config(&self) -> &Config {
        &self.cfg
    }

    pub(super) fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The daemon's first turn: push tasks, discovery watchers, and the
    /// static replicas' tasks.
    pub(super) fn start(&mut self, now: Instant) -> Vec<Effect> {
        let mut fx = Vec::new();
        fx.push(self.start_dataplanes());
        self.start_discovery(&mut fx);
        self.reconcile(now, &mut fx);
        fx
    }

    /// A message from a task, the HTTP surface or the reload signal.
    pub(super) fn on_msg(&mut self, m: Msg, now: Instant) -> Vec<Effect> {
        let mut fx = Vec::new();
        match m {
            Msg::Discovered(d) => {
                self.counters.discovery_updates += 1;
                self.awaiting.remove(&d.source);
                self.sources.insert(d.source, d.replicas);
                self.reconcile(now, &mut fx);
            }
            Msg::Probe { url, gen, result } => self.probed(url, gen, result, now, &mut fx),
            Msg::Scrape { url, gen, report } => self.scraped(url, gen, report, now, &mut fx),
            Msg::Prewarmed { url, ok, requests } => self.prewarmed(url, ok, requests, now, &mut fx),
            Msg::Drain { url, reply } => {
                let result = match self.reps.get_mut(&url) {
                    Some(r) => {
                        if r.draining.is_none() {
                            r.draining = Some(now);
                            tracing::info!(replica = %url, "draining");
                        }
                        Ok(())
                    }
                    None => Err(ControlError::NoReplica(url)),
                };
                fx.push(Effect::ReplyDrain { reply, result });
                self.publish(now, &mut fx);
            }
            Msg::Reload(cfg) => self.reload(*cfg, now, &mut fx),
        }
        fx
    }

    /// A replica's cache is gone (its KV events said so, or it restarted):
    /// every data plane forgets it.
    pub(super) fn on_clear(&mut self, c: ClearNotice) -> Vec<Effect> {
        let mut fx = Vec::new();
        self.clear(c, &mut fx);
        fx
    }

    /// The data planes' failure counts are a second opinion: `fall` reads in a
    /// row with new failed attempts (or with the replica ejected by a data
    /// plane's passive health) take the replica out even while `/health`
    /// answers (an engine that accepts probes but resets requests), and `rise`
    /// quiet reads bring it back, so it is retried as nginx's fail_timeout does.
    pub(super) fn on_dataplane_report(&mut self, rep: DpReport, now: Instant) -> Vec<Effect> {
        let mut fx = Vec::new();
        let mut changed = false;
        for s in &rep.state.replicas {
            let Some(r) = self.reps.get_mut(&s.url) else {
                continue;
            };
            r.in_flight.insert(rep.index, s.in_flight);
            let prev = r.failures_seen.insert(rep.index, s.failures_total);
            let Some(p) = prev else { continue };
            if !self.cfg.health.passive {
                continue;
            }
            // A replica the data plane ejected gets no traffic to fail on:
            // the ejection itself is the failing signal while it lasts.
            let failed = s.failures_total > p || s.ejection.ejected;
            if failed {
                tracing::debug!(replica = %s.url, failures = s.failures_total - p, "passive failures");
            }
            if r.passive.observe(!failed, now) {
                tracing::info!(replica = %s.url, failing = r.passive.is_down(), "passive health changed");
                changed = true;
            }
        }
        if changed {
            self.publish(now, &mut fx);
        }
        fx
    }

    /// The scrape-rate turn: load figures, and block budgets (`calibrated`, by
    /// URL, as the replicas' KV events estimate them).
    pub(super) fn on_load_tick(
        &mut self,
        calibrated: &HashMap<String, u64>,
        now: Instant,
    ) -> Vec<Effect> {
        let mut fx = Vec::new();
        // Budgets move with every eviction; a new snapshot is worth pushing only
        // when one moved by more than a tenth.
        let mut budget_moved = false;
        for (url, r) in self.reps.iter_mut() {
            let Some(&est) = calibrated.get(url) else {
                continue;
            };
            let moved = r
                .budget
                .is_none_or(|b| (est as f64 - b as f64).abs() > b as f64 * 0.1);
            if moved {
                r.budget = Some(est);
                budget_moved = true;
            }
        }
        if budget_moved {
            self.publish(now, &mut fx);
        }
        let loads: Vec<ReplicaLoad> = self.reps.values().filter_map(Replica::load).collect();
        if loads.is_empty() {
            return fx;
        }
        if self.pushed_load.as_ref() != &loads {
            self.pushed_load = Arc::new(loads);
            fx.push(Effect::PushLoad(self.pushed_load.clone()));
        }
        fx.push(Effect::PublishViews(self.views()));
        fx
    }

    /// The decision turn (every 100 ms): warm pools, finished drains, and the
    /// snapshot, which may have been held back at start.
    pub(super) fn on_tick(&mut self, now: Instant) -> Vec<Effect> {
        let mut fx = Vec::new();
        self.warm_pools(now, &mut fx);
        self.finish_drains(now, &mut fx);
        self.publish(now, &mut fx);
        fx
    }

    fn probed(
        &mut self,
        url: String,
        gen: u64,
        result: Result<(), ControlError>,
        now: Instant,
        fx: &mut Vec<Effect>,
    ) {
        let Some(r) = self.reps.get_mut(&url) else {
            return;
        };
        if r.gen != gen {
            return;
        }
        let was_down = r.health.known() && !r.health.is_healthy();
        if let Err(e) = &result {
            r.checks_failed += 1;
            tracing::debug!(replica = %url, error = %e, "health check failed");
        }
        if r.health.observe(result.is_ok(), now) {
            let healthy = r.health.is_healthy();
            tracing::info!(replica = %url, healthy, "replica health changed");
            if healthy && was_down {
                // Back from a failure: the engine most likely restarted with
                // an empty cache, and its event stream with it.
                fx.push(Effect::ReconnectKvEvents { url: url.clone() });
                self.clear(
                    ClearNotice {
                        url,
                        reason: "recovered",
                    },
                    fx,
                );
            }
            self.publish(now, fx);
        }
    }

    fn scraped(
        &mut self,
        url: String,
        gen: u64,
        report: Report,
        now: Instant,
        fx: &mut Vec<Effect>,
    ) {
        let Some(r) = self.reps.get_mut(&url) else {
            return;
        };
        if r.gen != gen {
            return;
        }
        match report {
            Report::Load(s) => {
                let seen = s.engine.map_or(Seen::Nothing, Seen::Engine);
                if seen != r.seen {
                    if let Seen::Engine(e) = seen {
                        tracing::info!(replica = %url, engine = e.name(), configured = r.cfg.engine.name(), "reading the replica as this engine");
                    }
                    r.seen = seen;
                }
                let restarted = r.scraped.is_some_and(|prev| s.restarted_since(&prev));
                let cap_changed = r.scraped.is_none_or(|old| {
                    old.kv_blocks != s.kv_blocks
                        || old.block_tokens != s.block_tokens
                        || old.slots != s.slots
                        || old.slot_tokens != s.slot_tokens
                });
                r.scraped = Some(s);
                r.scrape_streak = 0;
                if restarted {
                    // Faster than the health checks could see: the engine
                    // restarted, so its cache is empty and its event stream new.
                    tracing::info!(replica = %url, "engine restart seen in its counters");
                    fx.push(Effect::ReconnectKvEvents { url: url.clone() });
                    self.clear(
                        ClearNotice {
                            url,
                            reason: "restarted",
                        },
                        fx,
                    );
                }
                if cap_changed {
                    self.publish(now, fx);
                }
            }
            Report::Unknown { samples } => {
                if r.seen != Seen::Unknown {
                    tracing::warn!(replica = %url, samples,
                        "its metrics page has no vLLM, SGLang or llama.cpp load metrics: \
                         no load or capacity for it, health checks only (set `engine` to say which it is)");
                    r.seen = Seen::Unknown;
                }
                r.scrape_streak = 0;
                // Figures read from the engine that was there are old news.
                if r.scraped.take().is_some() {
                    r.scraped = Some(Scraped::default());
                    self.publish(now, fx);
                }
            }
            Report::Failed(e) => {
                r.scrapes_failed += 1;
                r.scrape_streak += 1;
                tracing::debug!(replica = %url, error = %e, "scrape failed");
                // A load figure nobody refreshes would steer traffic on
                // old news: after a few misses it is dropped (capacity,
                // which does not move, stays).
                if r.scrape_streak == STALE_SCRAPES {
                    if let Some(s) = r.scraped.as_mut() {
                        tracing::warn!(replica = %url, error = %e, "metrics unavailable: dropping its load figures");
                        s.running = 0.0;
                        s.waiting = 0.0;
                        s.kv_usage = 0.0;
                    }
                }
            }
        }
    }

    fn prewarmed(
        &mut self,
        url: String,
        ok: bool,
        requests: u32,
        now: Instant,
        fx: &mut Vec<Effect>,
    ) {
        let Some(r) = self.reps.get_mut(&url) else {
            return;
        };
        r.promoting = false;
        r.prewarm_requests += u64::from(requests);
        if ok && r.health.is_healthy() && r.draining.is_none() {
            let reason = r.promoted.take().unwrap_or(Reason::Failure);
            r.promoted = Some(reason);
            self.counters.promotions += 1;
            tracing::info!(replica = %url, ?reason, requests, "standby pre-warmed and promoted");
            self.publish(now, fx);
        } else {
            r.promoted = None;
            self.counters.prewarm_failures += 1;
            tracing::warn!(replica = %url, "pre-warm failed: standby not promoted");
        }
    }

    fn reload(&mut self, cfg: Config, now: Instant, fx: &mut Vec<Effect>) {
        tracing::info!("reloading configuration");
        self.counters.reloads += 1;
        let dp_changed = cfg.dataplanes != self.cfg.dataplanes || cfg.push != self.cfg.push;
        let checks_changed = cfg.health != self.cfg.health || cfg.scrape != self.cfg.scrape;
        let discovery_changed =
            cfg.replicas_file != self.cfg.replicas_file || cfg.dns != self.cfg.dns;
        let static_list = cfg.replicas.clone();
        self.cfg = cfg;
        if dp_changed {
            fx.push(self.start_dataplanes());
        }
        if discovery_changed {
            self.start_discovery(fx);
        } else {
            self.sources.insert(Source::Static, static_list);
        }
        if checks_changed {
            // New intervals and thresholds: restart every replica's tasks.
            let urls: Vec<String> = self.reps.keys().cloned().collect();
            for u in urls {
                self.restart_tasks(&u, fx);
            }
        }
        self.reconcile(now, fx);
    }

    fn start_dataplanes(&self) -> Effect {
        Effect::StartDataplanes {
            admin: self.cfg.dataplanes.clone(),
            push: self.cfg.push.clone(),
        }
    }

    fn start_discovery(&mut self, fx: &mut Vec<Effect>) {
        // Lists of sources still configured stay until their watcher reports
        // again: dropping them would drain those replicas for a moment.
        let dns_count = self.cfg.dns.len();
        let has_file = self.cfg.replicas_file.is_some();
        self.sources.retain(|s, _| match s {
            Source::Static => true,
            Source::File => has_file,
            Source::Dns(i) => *i < dns_count,
        });
        self.sources
            .insert(Source::Static, self.cfg.replicas.clone());
        self.awaiting.clear();
        if has_file {
            self.awaiting.insert(Source::File);
        }
        self.awaiting.extend((0..dns_count).map(Source::Dns));
        fx.push(Effect::StartDiscovery {
            file: self.cfg.replicas_file.clone(),
            dns: self.cfg.dns.clone(),
        });
    }

    /// Merges the sources into the wanted set: static entries win over the file,
    /// the file over DNS, so an operator can pin a replica's settings.
    fn wanted(&self) -> BTreeMap<String, ReplicaConfig> {
        let mut out = BTreeMap::new();
        for (_, list) in self.sources.iter().rev() {
            for r in list {
                out.insert(r.url.clone(), r.clone());
            }
        }
        out
    }

    fn reconcile(&mut self, now: Instant, fx: &mut Vec<Effect>) {
        let wanted = self.wanted();
        // Gone from every source: drain first, remove once drained.
        for (url, r) in self.reps.iter_mut() {
            if !wanted.contains_key(url) && r.draining.is_none() {
                tracing::info!(replica = %url, "replica no longer discovered: draining");
                r.draining = Some(now);
            }
        }
        for (url, c) in wanted {
            match self.reps.get_mut(&url) {
                Some(r) if r.cfg == c => {
                    r.draining = None;
                }
                Some(r) => {
                    r.cfg = c;
                    r.draining = None;
                    self.restart_tasks(&url, fx);
                }
                None => {
                    let (rise, fall) = (self.cfg.health.rise, self.cfg.health.fall);
                    self.reps
                        .insert(url.clone(), Replica::new(c, rise, fall, now));
                    tracing::info!(replica = %url, "replica discovered");
                    self.restart_tasks(&url, fx);
                }
            }
        }
        self.publish(now, fx);
    }

    fn restart_tasks(&mut self, url: &str, fx: &mut Vec<Effect>) {
        let gen = self.next_gen;
        self.next_gen += 1;
        let Some(r) = self.reps.get_mut(url) else {
            return;
        };
        r.gen = gen;
        r.health
            .set_thresholds(self.cfg.health.rise, self.cfg.health.fall);
        r.passive
            .set_thresholds(self.cfg.health.rise, self.cfg.health.fall);
        let mut health = self.cfg.health.clone();
        if let Some(p) = &r.cfg.health_path {
            health.path = p.clone();
        }
        fx.push(Effect::StartReplicaTasks {
            replica: r.cfg.clone(),
            gen,
            health,
            scrape: self.cfg.scrape.clone(),
        });
    }

    fn clear(&mut self, c: ClearNotice, fx: &mut Vec<Effect>) {
        if !self.reps.contains_key(&c.url) {
            return;
        }
        self.counters.clears_sent += 1;
        tracing::info!(replica = %c.url, reason = c.reason, "replica cache cleared: telling the data planes");
        fx.push(Effect::Clear(c));
    }

    fn warm_pools(&mut self, now: Instant, fx: &mut Vec<Effect>) {
        let cands: Vec<warm::Candidate> = self
            .reps
            .values()
            .map(|r| warm::Candidate {
                url: r.cfg.url.clone(),
                warm: r.cfg.pool == Pool::Warm,
                promoted: if r.promoting { None } else { r.promoted },
                promoting: r.promoting,
                known: r.health.known(),
                healthy: r.up(),
                healthy_since: r.health.since(),
                waiting: r.scraped.map_or(0.0, |s| s.waiting),
                draining: r.draining.is_some(),
            })
            .collect();
        match warm::decide(&mut self.warm, &cands, &self.cfg.warm, now) {
            Some(warm::Action::Promote(url, reason)) => self.prewarm(url, reason, fx),
            Some(warm::Action::Demote(url)) => {
                if let Some(r) = self.reps.get_mut(&url) {
                    r.promoted = None;
                    self.counters.demotions += 1;
                    tracing::info!(replica = %url, "standby demoted back to the warm pool");
                }
            }
            None => {}
        }
    }

    /// Has the data planes' hottest prefixes replayed to the standby (one token
    /// each) so it joins with the common system prompts cached.
    fn prewarm(&mut self, url: String, reason: Reason, fx: &mut Vec<Effect>) {
        let Some(r) = self.reps.get_mut(&url) else {
            return;
        };
        r.promoting = true;
        r.promoted = Some(reason);
        tracing::info!(replica = %url, ?reason, "pre-warming standby before promotion");
        fx.push(Effect::Prewarm {
            url,
            prefixes: self.cfg.warm.prewarm_prefixes,
            timeout: ms(self.cfg.warm.prewarm_timeout_ms),
        });
    }

    fn finish_drains(&mut self, now: Instant, fx: &mut Vec<Effect>) {
        let n_dp = self.cfg.dataplanes.len();
        let done: Vec<String> = self
            .reps
            .iter()
            .filter(|(_, r)| {
                r.draining.is_some_and(|t| {
                    let held = now.duration_since(t);
                    let idle = r.in_flight.len() >= n_dp && r.in_flight.values().all(|v| *v == 0);
                    // The unhealthy mark must have reached the data planes before
                    // an idle report means anything.
                    (idle && held > ms(self.cfg.push.resync_ms) * 2)
                        || held > ms(self.cfg.drain.timeout_ms)
                })
            })
            .map(|(u, _)| u.clone())
            .collect();
        let wanted = self.wanted();
        for u in done {
            if wanted.contains_key(&u) {
                // Drained by command but still discovered: stays out of rotation.
                continue;
            }
            tracing::info!(replica = %u, "drained: removing");
            self.reps.remove(&u);
            fx.push(Effect::StopReplicaTasks { url: u });
        }
    }

    /// The snapshot every data plane should have. Held back at start until each
    /// replica has had its first check (bounded), so a restarted daemon does not
    /// push "everything down" over a data plane's good state.
    fn snapshot(&self, now: Instant) -> Option<Vec<ReplicaSpec>> {
        let up_for = now.duration_since(self.started);
        let grace = ms(self.cfg.health.interval_ms + self.cfg.health.timeout_ms) * 2;
        if up_for < grace && self.reps.values().any(|r| !r.health.known()) {
            return None;
        }
        if !self.awaiting.is_empty() && up_for < DISCOVERY_GRACE {
            return None;
        }
        Some(self.reps.values().map(Replica::spec).collect())
    }

    fn publish(&mut self, now: Instant, fx: &mut Vec<Effect>) {
        if let Some(s) = self.snapshot(now) {
            if self.pushed.as_ref().is_none_or(|cur| cur.as_ref() != &s) {
                let s = Arc::new(s);
                self.pushed = Some(s.clone());
                fx.push(Effect::PushSnapshot(s));
            }
        }
        fx.push(Effect::PublishViews(self.views()));
    }

    fn views(&self) -> Vec<ReplicaView> {
        self.reps.values().map(Replica::view).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::Discovered;
    use tokio::sync::oneshot;

    const URL: &str = "http://10.0.0.1:8000";

    /// The fake clock's epoch: the one real reading; every later time is this
    /// plus a chosen offset.
    #[allow(clippy::disallowed_methods)]
    fn epoch() -> Instant {
        Instant::now()
    }

    fn config(toml_text: &str) -> Config {
        let text = format!("dataplanes = [\"127.0.0.1:9090\"]\n{toml_text}");
        let cfg: Config = toml::from_str(&text).unwrap();
        cfg.validate().unwrap();
        cfg
    }

    fn one_replica(extra: &str) -> Config {
        config(&format!("{extra}\n[[replicas]]\nurl = \"{URL}\"\n"))
    }

    /// The generation each replica's tasks were (re)started with.
    fn started_gens(fx: &[Effect]) -> Vec<(String, u64)> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::StartReplicaTasks { replica, gen, .. } => Some((replica.url.clone(), *gen)),
                _ => None,
            })
            .collect()
    }

    fn clears(fx: &[Effect]) -> Vec<(String, &'static str)> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Clear(c) => Some((c.url.clone(), c.reason)),
                _ => None,
            })
            .collect()
    }

    fn reconnects(fx: &[Effect]) -> Vec<String> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::ReconnectKvEvents { url } => Some(url.clone()),
                _ => None,
            })
            .collect()
    }

    fn last_snapshot(fx: &[Effect]) -> Option<Arc<Vec<ReplicaSpec>>> {
        fx.iter().rev().find_map(|e| match e {
            Effect::PushSnapshot(s) => Some(s.clone()),
            _ => None,
        })
    }

    /// Started on `cfg` at `t0`, with the generation of the one replica's tasks.
    fn started(cfg: Config, t0: Instant) -> (Decisions, u64) {
        let mut d = Decisions::new(cfg, t0);
        let fx = d.start(t0);
        assert!(matches!(fx[0], Effect::StartDataplanes { .. }));
        let gens = started_gens(&fx);
        assert_eq!(gens.len(), 1, "one replica, one set of tasks");
        (d, gens[0].1)
    }

    fn probe(d: &mut Decisions, gen: u64, ok: bool, now: Instant) -> Vec<Effect> {
        let result = if ok {
            Ok(())
        } else {
            Err(ControlError::Unhealthy { status: 503 })
        };
        d.on_msg(
            Msg::Probe {
                url: URL.into(),
                gen,
                result,
            },
            now,
        )
    }

    fn scrape(d: &mut Decisions, gen: u64, report: Report, now: Instant) -> Vec<Effect> {
        d.on_msg(
            Msg::Scrape {
                url: URL.into(),
                gen,
                report,
            },
            now,
        )
    }

    fn healthy(d: &Decisions) -> Option<bool> {
        let r = &d.reps[URL];
        r.health.known().then(|| r.health.is_healthy())
    }

    #[test]
    fn probes_flip_health_after_rise_or_fall_and_a_recovery_reconnects_and_clears() {
        let t0 = epoch();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let (mut d, gen) = started(one_replica("[health]\nrise = 2\nfall = 3"), t0);
        assert_eq!(healthy(&d), None);
        // The first result decides at once, and is no recovery.
        let fx = probe(&mut d, gen, true, s(1));
        assert_eq!(healthy(&d), Some(true));
        assert!(reconnects(&fx).is_empty() && clears(&fx).is_empty());
        assert!(last_snapshot(&fx).is_some_and(|v| v[0].healthy));
        // Out after `fall` failures in a row.
        probe(&mut d, gen, false, s(2));
        probe(&mut d, gen, false, s(3));
        assert_eq!(healthy(&d), Some(true));
        let fx = probe(&mut d, gen, false, s(4));
        assert_eq!(healthy(&d), Some(false));
        assert!(last_snapshot(&fx).is_some_and(|v| !v[0].healthy));
        assert_eq!(d.reps[URL].checks_failed, 3);
        // Back after `rise` successes: the engine likely restarted, so its
        // event stream is reconnected and its cache cleared everywhere.
        let fx = probe(&mut d, gen, true, s(5));
        assert_eq!(healthy(&d), Some(false));
        assert!(reconnects(&fx).is_empty() && clears(&fx).is_empty());
        let fx = probe(&mut d, gen, true, s(6));
        assert_eq!(healthy(&d), Some(true));
        assert_eq!(reconnects(&fx), vec![URL.to_string()]);
        assert_eq!(clears(&fx), vec![(URL.to_string(), "recovered")]);
        assert_eq!(d.counters().clears_sent, 1);
        assert!(last_snapshot(&fx).is_some_and(|v| v[0].healthy));
        assert_eq!(d.reps[URL].health.since(), s(6));
    }

    #[test]
    fn a_replica_gone_from_discovery_drains_then_leaves_after_the_drain_timeout() {
        let t0 = epoch();
        let ms_after = |n: u64| t0 + Duration::from_millis(n);
        let cfg = config("replicas_file = \"/replicas.json\"\n[drain]\ntimeout_ms = 1000");
        let mut d = Decisions::new(cfg, t0);
        d.start(t0);
        let listed: ReplicaConfig = toml::from_str(&format!("url = \"{URL}\"")).unwrap();
        let fx = d.on_msg(
            Msg::Discovered(Discovered {
                source: Source::File,
                replicas: vec![listed],
            }),
            ms_after(10),
        );
        let gen = started_gens(&fx)[0].1;
        probe(&mut d, gen, true, ms_after(20));
        assert_eq!(d.counters().discovery_updates, 1);
        // Gone from the file: drained, not removed, and pushed as unhealthy.
        let fx = d.on_msg(
            Msg::Discovered(Discovered {
                source: Source::File,
                replicas: Vec::new(),
            }),
            ms_after(100),
        );
        assert_eq!(d.reps[URL].draining, Some(ms_after(100)));
        assert!(last_snapshot(&fx).is_some_and(|v| v.len() == 1 && !v[0].healthy));
        assert!(!fx
            .iter()
            .any(|e| matches!(e, Effect::StopReplicaTasks { .. })));
        // No data plane has reported it idle: it stays for the drain timeout...
        let fx = d.on_tick(ms_after(1100));
        assert!(d.reps.contains_key(URL));
        assert!(!fx
            .iter()
            .any(|e| matches!(e, Effect::StopReplicaTasks { .. })));
        // ...and leaves past it, its tasks with it.
        let fx = d.on_tick(ms_after(1101));
        assert!(!d.reps.contains_key(URL));
        assert!(fx
            .iter()
            .any(|e| matches!(e, Effect::StopReplicaTasks { url } if url == URL)));
        assert!(last_snapshot(&fx).is_some_and(|v| v.is_empty()));
    }

    #[test]
    fn draining_an_unknown_replica_replies_no_replica() {
        let t0 = epoch();
        let (mut d, _) = started(one_replica(""), t0);
        let (reply, _answer) = oneshot::channel();
        let fx = d.on_msg(
            Msg::Drain {
                url: "http://10.0.0.9:8000".into(),
                reply,
            },
            t0,
        );
        let result = fx.iter().find_map(|e| match e {
            Effect::ReplyDrain { result, .. } => Some(result),
            _ => None,
        });
        assert!(
            matches!(result, Some(Err(ControlError::NoReplica(u))) if u == "http://10.0.0.9:8000"),
            "{result:?}"
        );
        assert_eq!(d.reps[URL].draining, None);
    }

    #[test]
    fn a_probe_from_a_stale_generation_is_ignored() {
        let t0 = epoch();
        let (mut d, old) = started(one_replica(""), t0);
        // New health settings replace the replica's tasks.
        let fx = d.on_msg(
            Msg::Reload(Box::new(one_replica("[health]\ninterval_ms = 250"))),
            t0,
        );
        let gens = started_gens(&fx);
        assert_eq!(gens.len(), 1);
        let new = gens[0].1;
        assert_ne!(new, old);
        assert_eq!(d.counters().reloads, 1);
        let fx = probe(&mut d, old, false, t0);
        assert!(fx.is_empty(), "{fx:?}");
        assert_eq!(healthy(&d), None);
        assert_eq!(d.reps[URL].checks_failed, 0);
        probe(&mut d, new, false, t0);
        assert_eq!(healthy(&d), Some(false));
        assert_eq!(d.reps[URL].checks_failed, 1);
    }

    #[test]
    fn three_failed_scrapes_drop_the_load_but_keep_the_capacity() {
        let t0 = epoch();
        let (mut d, gen) = started(one_replica(""), t0);
        let load = Scraped {
            running: 3.0,
            waiting: 2.0,
            kv_usage: 0.5,
            kv_blocks: Some(1000),
            block_tokens: Some(16),
            ..Scraped::default()
        };
        scrape(&mut d, gen, Report::Load(load), t0);
        for _ in 1..STALE_SCRAPES {
            scrape(&mut d, gen, Report::Failed("refused".into()), t0);
            assert_eq!(
                d.reps[URL].scraped,
                Some(load),
                "a miss or two keeps the figures"
            );
        }
        scrape(&mut d, gen, Report::Failed("refused".into()), t0);
        let r = &d.reps[URL];
        assert_eq!(r.scrapes_failed, u64::from(STALE_SCRAPES));
        assert_eq!(
            r.scraped,
            Some(Scraped {
                running: 0.0,
                waiting: 0.0,
                kv_usage: 0.0,
                ..load
            })
        );
        assert_eq!(r.spec().kv_blocks, Some(1000));
        assert_eq!(r.spec().kv_block_tokens, Some(16));
        // The load pushed next says so.
        let fx = d.on_load_tick(&HashMap::new(), t0);
        let pushed = fx.iter().find_map(|e| match e {
            Effect::PushLoad(l) => Some(l.clone()),
            _ => None,
        });
        let pushed = pushed.expect("load pushed");
        assert_eq!((pushed[0].running, pushed[0].waiting), (0, 0));
    }

    #[test]
    fn an_engine_restart_seen_in_the_counters_clears_the_replica() {
        let t0 = epoch();
        let (mut d, gen) = started(one_replica(""), t0);
        let first = Scraped {
            start_time: Some(100.0),
            monotonic: Some(5000.0),
            ..Scraped::default()
        };
        let fx = scrape(&mut d, gen, Report::Load(first), t0);
        assert!(clears(&fx).is_empty(), "a first scrape is no restart");
        let fx = scrape(
            &mut d,
            gen,
            Report::Load(Scraped {
                monotonic: Some(6000.0),
                ..first
            }),
            t0,
        );
        assert!(clears(&fx).is_empty() && reconnects(&fx).is_empty());
        // A counter going down: a new process with an empty cache.
        let fx = scrape(
            &mut d,
            gen,
            Report::Load(Scraped {
                monotonic: Some(10.0),
                ..first
            }),
            t0,
        );
        assert_eq!(reconnects(&fx), vec![URL.to_string()]);
        assert_eq!(clears(&fx), vec![(URL.to_string(), "restarted")]);
        // So does a new start time.
        let fx = scrape(
            &mut d,
            gen,
            Report::Load(Scraped {
                start_time: Some(200.0),
                monotonic: Some(20.0),
                ..first
            }),
            t0,
        );
        assert_eq!(clears(&fx), vec![(URL.to_string(), "restarted")]);
        assert_eq!(d.counters().clears_sent, 2);
    }
}
