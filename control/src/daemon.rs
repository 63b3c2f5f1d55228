//! The daemon proper: one loop that owns every replica's state and decides what
//! the data planes should see, fed by small tasks that probe, scrape, subscribe
//! and watch. Deciding in one place keeps the pushed snapshot consistent: the
//! tasks only report observations.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvroute_admin_api::ReplicaLoad;
use kvroute_admin_api::{Pool, ReplicaSpec};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::config::Engine;
use crate::config::{kv_endpoint, ms, Config, ReplicaConfig};
use crate::discovery::{self, Discovered, Resolver, Source};
use crate::error::ControlError;
use crate::health::{self, Health};
use crate::http::{self, Target};
use crate::kv_events::{self, ClearNotice, KvStats};
use crate::push::{self, Dataplane, DataplaneStats, DpReport};
use crate::scrape::Scraped;
use crate::scraper::{Report, Scraper};
use crate::warm::{self, Reason, WarmState};

/// Observations and requests the loop acts on.
pub enum Msg {
    Discovered(Discovered),
    Probe {
        url: String,
        gen: u64,
        result: Result<(), ControlError>,
    },
    Scrape {
        url: String,
        gen: u64,
        report: Report,
    },
    Prewarmed {
        url: String,
        ok: bool,
        requests: u32,
    },
    Drain {
        url: String,
        reply: oneshot::Sender<Result<(), ControlError>>,
    },
    Reload(Box<Config>),
}

/// Per-replica view for `/metrics` and `/status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReplicaView {
    pub url: String,
    pub engine: Engine,
    /// What the scrapes found: the engine read (configured or detected),
    /// `unknown` for a page with no engine's load metrics, `None` before any.
    pub detected_engine: Option<&'static str>,
    /// Slot-based engines (llama.cpp): slots, tokens per slot, and the host
    /// prompt cache's tokens as pushed.
    pub kv_slots: Option<u32>,
    pub kv_slot_tokens: Option<u32>,
    pub kv_host_tokens: Option<u64>,
    pub pool: Pool,
    pub configured_pool: Pool,
    pub healthy: Option<bool>,
    pub draining: bool,
    pub running: f64,
    pub waiting: f64,
    pub kv_usage: f64,
    pub kv_blocks: Option<u64>,
    pub kv_block_tokens: Option<u32>,
    pub checks_failed: u64,
    pub scrapes_failed: u64,
    pub prewarm_requests: u64,
    /// Block budget calibrated from KV events.
    pub kv_effective_blocks: Option<u64>,
    #[serde(skip)]
    pub kv: Option<Arc<KvStats>>,
}

/// What the HTTP surface reads.
#[derive(Default)]
pub struct Shared {
    pub replicas: Mutex<Vec<ReplicaView>>,
    pub dataplanes: Mutex<Vec<(String, Arc<DataplaneStats>)>>,
    pub promotions: AtomicU64,
    pub demotions: AtomicU64,
    pub prewarm_failures: AtomicU64,
    pub clears_sent: AtomicU64,
    pub reloads: AtomicU64,
    pub reload_errors: AtomicU64,
    pub discovery_updates: AtomicU64,
    /// Advanced by every turn of the daemon loop; the watchdog pings only while it moves.
    pub heartbeat: AtomicU64,
}

struct Rep {
    cfg: ReplicaConfig,
    health: Health,
    scraped: Option<Scraped>,
    promoted: Option<Reason>,
    promoting: bool,
    draining: Option<Instant>,
    /// Failure count last read from each data plane.
    failures_seen: HashMap<usize, u64>,
    /// The data planes' view: failed attempts in consecutive reads.
    passive: Health,
    in_flight: HashMap<usize, u32>,
    /// Bumped when the replica's tasks are replaced, so stale reports are ignored.
    gen: u64,
    tasks: Vec<JoinHandle<()>>,
    kv_stats: Option<Arc<KvStats>>,
    kv_reconnect: watch::Sender<u64>,
    checks_failed: u64,
    scrapes_failed: u64,
    prewarm_requests: u64,
    /// Block budget calibrated from KV events, as last pushed.
    budget: Option<u64>,
    /// Consecutive failed scrapes.
    scrape_streak: u32,
    /// What the last answered scrape found, to log a change once.
    seen: Seen,
}

/// What a replica's scrapes found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Nothing,
    Engine(Engine),
    /// A metrics page without any engine's load metrics.
    Unknown,
}

impl Seen {
    fn name(self) -> Option<&'static str> {
        match self {
            Seen::Nothing => None,
            Seen::Engine(e) => Some(e.name()),
            Seen::Unknown => Some("unknown"),
        }
    }
}

impl Rep {
    fn up(&self) -> bool {
        self.health.is_healthy() && !self.passive.is_down()
    }

    /// The budget the data planes' index gets: the engine's capacity, lowered
    /// to what its eviction events show it really keeps.
    fn kv_blocks(&self) -> Option<u64> {
        if let Some(shape) = self.slot_shape() {
            return Some(shape.blocks());
        }
        let cap = self.scraped.and_then(|s| s.kv_blocks);
        match (cap, self.budget) {
            (Some(c), Some(b)) => Some(c.min(b)),
            (None, Some(b)) => Some(b),
            (c, None) => c,
        }
    }

    fn kv_block_tokens(&self) -> Option<u32> {
        if self.slot_shape().is_some() {
            return Some(1);
        }
        self.scraped.and_then(|s| s.block_tokens)
    }

    /// A slot-based engine's shape, with its host cache as configured or, by
    /// default, its total context (the least llama.cpp's prompt cache keeps).
    fn slot_shape(&self) -> Option<SlotShape> {
        let s = self.scraped?;
        let (slots, slot_tokens) = (s.slots?, s.slot_tokens?);
        let host_tokens = self
            .cfg
            .host_cache_tokens
            .unwrap_or(u64::from(slots) * u64::from(slot_tokens));
        Some(SlotShape {
            slots,
            slot_tokens,
            host_tokens,
        })
    }
}

/// What a slot-based replica's budget is pushed as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SlotShape {
    slots: u32,
    slot_tokens: u32,
    host_tokens: u64,
}

impl SlotShape {
    /// Tokens held with every slot full and a full host cache: the block budget
    /// (in blocks of one token) behind the slot model.
    fn blocks(self) -> u64 {
        u64::from(self.slots) * u64::from(self.slot_tokens) + self.host_tokens
    }
}

impl Drop for Rep {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// How long the first push waits for a replica file or DNS name that has not
/// answered: past it, what is known is pushed (a missing file must not keep the
/// static replicas out forever).
const DISCOVERY_GRACE: Duration = Duration::from_secs(5);

/// Failed scrapes in a row after which a replica's load figures are dropped.
const STALE_SCRAPES: u32 = 3;

pub struct Daemon {
    cfg: Config,
    me: String,
    reps: BTreeMap<String, Rep>,
    sources: BTreeMap<Source, Vec<ReplicaConfig>>,
    /// Sources that have not reported yet: until they have (or a grace passed),
    /// a restarted daemon would push a set missing their replicas.
    awaiting: std::collections::BTreeSet<Source>,
    tx: mpsc::UnboundedSender<Msg>,
    rx: mpsc::UnboundedReceiver<Msg>,
    clears_rx: mpsc::UnboundedReceiver<ClearNotice>,
    clears_tx: mpsc::UnboundedSender<ClearNotice>,
    reports_rx: mpsc::UnboundedReceiver<DpReport>,
    reports_tx: mpsc::UnboundedSender<DpReport>,
    snap_tx: watch::Sender<Option<Arc<Vec<ReplicaSpec>>>>,
    load_tx: watch::Sender<Arc<Vec<ReplicaLoad>>>,
    dataplanes: Vec<Dataplane>,
    dp_tasks: Vec<JoinHandle<()>>,
    discovery_tasks: Vec<JoinHandle<()>>,
    warm: WarmState,
    started: Instant,
    next_gen: u64,
    resolver: Arc<dyn Resolver>,
    pub shared: Arc<Shared>,
}

impl Daemon {
    pub fn new(cfg: Config, resolver: Arc<dyn Resolver>) -> Daemon {
        let (tx, rx) = mpsc::unbounded_channel();
        let (clears_tx, clears_rx) = mpsc::unbounded_channel();
        let (reports_tx, reports_rx) = mpsc::unbounded_channel();
        let me = cfg.name.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "localhost".into());
            // Stable across restarts: a restarted daemon is the same pusher, not
            // a second one (two daemons on one host need distinct `name`s).
            format!("kvroute-control@{host}")
        });
        Daemon {
            me,
            reps: BTreeMap::new(),
            sources: BTreeMap::new(),
            awaiting: std::collections::BTreeSet::new(),
            tx,
            rx,
            clears_rx,
            clears_tx,
            reports_rx,
            reports_tx,
            snap_tx: watch::channel(None).0,
            load_tx: watch::channel(Arc::new(Vec::new())).0,
            dataplanes: Vec::new(),
            dp_tasks: Vec::new(),
            discovery_tasks: Vec::new(),
            warm: WarmState::default(),
            started: Instant::now(),
            next_gen: 1,
            resolver,
            shared: Arc::new(Shared::default()),
            cfg,
        }
    }

    pub fn sender(&self) -> mpsc::UnboundedSender<Msg> {
        self.tx.clone()
    }

    fn start_dataplanes(&mut self) {
        for t in self.dp_tasks.drain(..) {
            t.abort();
        }
        self.dataplanes.clear();
        let mut stats_list = Vec::new();
        for (i, d) in self.cfg.dataplanes.iter().enumerate() {
            let target = Target::parse_admin(d).expect("validated");
            let dp = Dataplane {
                target,
                timeout: ms(self.cfg.push.timeout_ms),
            };
            let stats = Arc::new(DataplaneStats::default());
            stats_list.push((d.clone(), stats.clone()));
            self.dp_tasks.push(tokio::spawn(push::run(
                i,
                dp.clone(),
                self.me.clone(),
                self.snap_tx.subscribe(),
                self.load_tx.subscribe(),
                ms(self.cfg.push.resync_ms),
                stats,
                self.reports_tx.clone(),
            )));
            self.dataplanes.push(dp);
        }
        *self
            .shared
            .dataplanes
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = stats_list;
    }

    fn start_discovery(&mut self) {
        for t in self.discovery_tasks.drain(..) {
            t.abort();
        }
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
        if let Some(path) = &self.cfg.replicas_file {
            self.awaiting.insert(Source::File);
            self.discovery_tasks
                .push(tokio::spawn(discovery::watch_file(
                    path.clone(),
                    Duration::from_millis(200),
                    self.tx.clone(),
                )));
        }
        for (i, d) in self.cfg.dns.iter().enumerate() {
            self.awaiting.insert(Source::Dns(i));
            self.discovery_tasks.push(tokio::spawn(discovery::watch_dns(
                i,
                d.clone(),
                self.resolver.clone(),
                self.tx.clone(),
            )));
        }
    }

    pub async fn run(mut self) {
        tracing::info!(name = %self.me, dataplanes = self.cfg.dataplanes.len(), "kvroute-control starting");
        self.start_dataplanes();
        self.start_discovery();
        self.reconcile();
        let mut load_tick = tokio::time::interval(ms(self.cfg.scrape.interval_ms));
        load_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut decide_tick = tokio::time::interval(Duration::from_millis(100));
        decide_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                Some(m) = self.rx.recv() => self.handle(m),
                Some(c) = self.clears_rx.recv() => self.clear(c),
                Some(r) = self.reports_rx.recv() => self.passive(r),
                _ = load_tick.tick() => self.publish_load(),
                _ = decide_tick.tick() => {
                    self.shared.heartbeat.fetch_add(1, Ordering::Relaxed);
                    self.warm_pools();
                    self.finish_drains();
                    self.publish();
                }
            }
        }
    }

    fn handle(&mut self, m: Msg) {
        match m {
            Msg::Discovered(d) => {
                self.shared
                    .discovery_updates
                    .fetch_add(1, Ordering::Relaxed);
                self.awaiting.remove(&d.source);
                self.sources.insert(d.source, d.replicas);
                self.reconcile();
            }
            Msg::Probe { url, gen, result } => {
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
                if r.health.observe(result.is_ok(), Instant::now()) {
                    let now = r.health.is_healthy();
                    tracing::info!(replica = %url, healthy = now, "replica health changed");
                    if now && was_down {
                        // Back from a failure: the engine most likely restarted with
                        // an empty cache, and its event stream with it.
                        r.kv_reconnect.send_modify(|g| *g += 1);
                        let _ = self.clears_tx.send(ClearNotice {
                            url: url.clone(),
                            reason: "recovered",
                        });
                    }
                    self.publish();
                }
            }
            Msg::Scrape { url, gen, report } => {
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
                        if r.scraped.is_some_and(|prev| s.restarted_since(&prev)) {
                            // Faster than the health checks could see: the engine
                            // restarted, so its cache is empty and its event stream new.
                            tracing::info!(replica = %url, "engine restart seen in its counters");
                            r.kv_reconnect.send_modify(|g| *g += 1);
                            let _ = self.clears_tx.send(ClearNotice {
                                url: url.clone(),
                                reason: "restarted",
                            });
                        }
                        let cap_changed = r.scraped.is_none_or(|old| {
                            old.kv_blocks != s.kv_blocks
                                || old.block_tokens != s.block_tokens
                                || old.slots != s.slots
                                || old.slot_tokens != s.slot_tokens
                        });
                        r.scraped = Some(s);
                        r.scrape_streak = 0;
                        if cap_changed {
                            self.publish();
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
                            self.publish();
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
            Msg::Prewarmed { url, ok, requests } => {
                let Some(r) = self.reps.get_mut(&url) else {
                    return;
                };
                r.promoting = false;
                r.prewarm_requests += u64::from(requests);
                if ok && r.health.is_healthy() && r.draining.is_none() {
                    let reason = r.promoted.take().unwrap_or(Reason::Failure);
                    r.promoted = Some(reason);
                    self.shared.promotions.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(replica = %url, ?reason, requests, "standby pre-warmed and promoted");
                    self.publish();
                } else {
                    r.promoted = None;
                    self.shared.prewarm_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(replica = %url, "pre-warm failed: standby not promoted");
                }
            }
            Msg::Drain { url, reply } => {
                let res = match self.reps.get_mut(&url) {
                    Some(r) => {
                        if r.draining.is_none() {
                            r.draining = Some(Instant::now());
                            tracing::info!(replica = %url, "draining");
                        }
                        Ok(())
                    }
                    None => Err(ControlError::NoReplica(url)),
                };
                let _ = reply.send(res);
                self.publish();
            }
            Msg::Reload(cfg) => self.reload(*cfg),
        }
    }

    fn reload(&mut self, cfg: Config) {
        tracing::info!("reloading configuration");
        self.shared.reloads.fetch_add(1, Ordering::Relaxed);
        let dp_changed = cfg.dataplanes != self.cfg.dataplanes || cfg.push != self.cfg.push;
        let checks_changed = cfg.health != self.cfg.health || cfg.scrape != self.cfg.scrape;
        let discovery_changed =
            cfg.replicas_file != self.cfg.replicas_file || cfg.dns != self.cfg.dns;
        let static_list = cfg.replicas.clone();
        self.cfg = cfg;
        if dp_changed {
            self.start_dataplanes();
        }
        if discovery_changed {
            self.start_discovery();
        } else {
            self.sources.insert(Source::Static, static_list);
        }
        if checks_changed {
            // New intervals and thresholds: restart every replica's tasks.
            let urls: Vec<String> = self.reps.keys().cloned().collect();
            for u in urls {
                self.restart_tasks(&u);
            }
        }
        self.reconcile();
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

    fn reconcile(&mut self) {
        let wanted = self.wanted();
        // Gone from every source: drain first, remove once drained.
        for (url, r) in self.reps.iter_mut() {
            if !wanted.contains_key(url) && r.draining.is_none() {
                tracing::info!(replica = %url, "replica no longer discovered: draining");
                r.draining = Some(Instant::now());
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
                    self.restart_tasks(&url);
                }
                None => {
                    let (kv_reconnect, _) = watch::channel(0);
                    self.reps.insert(
                        url.clone(),
                        Rep {
                            cfg: c,
                            health: Health::new(self.cfg.health.rise, self.cfg.health.fall),
                            scraped: None,
                            promoted: None,
                            promoting: false,
                            draining: None,
                            failures_seen: HashMap::new(),
                            // Presumed fine: one failed attempt must not take it out.
                            passive: {
                                let mut h = Health::new(self.cfg.health.rise, self.cfg.health.fall);
                                h.observe(true, Instant::now());
                                h
                            },
                            in_flight: HashMap::new(),
                            gen: 0,
                            tasks: Vec::new(),
                            kv_stats: None,
                            kv_reconnect,
                            checks_failed: 0,
                            scrapes_failed: 0,
                            prewarm_requests: 0,
                            budget: None,
                            scrape_streak: 0,
                            seen: Seen::Nothing,
                        },
                    );
                    tracing::info!(replica = %url, "replica discovered");
                    self.restart_tasks(&url);
                }
            }
        }
        self.publish();
    }

    fn restart_tasks(&mut self, url: &str) {
        let gen = self.next_gen;
        self.next_gen += 1;
        let Some(r) = self.reps.get_mut(url) else {
            return;
        };
        for t in r.tasks.drain(..) {
            t.abort();
        }
        r.gen = gen;
        r.health
            .set_thresholds(self.cfg.health.rise, self.cfg.health.fall);
        r.passive
            .set_thresholds(self.cfg.health.rise, self.cfg.health.fall);
        let mut hc = self.cfg.health.clone();
        if let Some(p) = &r.cfg.health_path {
            hc.path = p.clone();
        }
        let sc = self.cfg.scrape.clone();
        let tx = self.tx.clone();
        let u = url.to_string();
        if let Ok((target, _)) = http::split_url(url) {
            r.tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(ms(hc.interval_ms));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let result = health::probe(&target, &hc.path, ms(hc.timeout_ms)).await;
                    if tx
                        .send(Msg::Probe {
                            url: u.clone(),
                            gen,
                            result,
                        })
                        .is_err()
                    {
                        return;
                    }
                }
            }));
        }
        if r.cfg.metrics_url().is_some() {
            let mut scraper = Scraper::new(&r.cfg, ms(sc.timeout_ms));
            let tx = self.tx.clone();
            let u = url.to_string();
            r.tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(ms(sc.interval_ms));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let report = scraper.once().await;
                    if tx
                        .send(Msg::Scrape {
                            url: u.clone(),
                            gen,
                            report,
                        })
                        .is_err()
                    {
                        return;
                    }
                }
            }));
        }
        r.kv_stats = None;
        if let Some(base) = r.cfg.kv_events.clone() {
            let stats = Arc::new(KvStats::default());
            for rank in 0..r.cfg.dp_ranks {
                let Ok(endpoint) = kv_endpoint(&base, rank) else {
                    continue;
                };
                let replay = r
                    .cfg
                    .kv_events_replay
                    .as_ref()
                    .and_then(|b| kv_endpoint(b, rank).ok());
                r.tasks.push(tokio::spawn(kv_events::subscribe(
                    kv_events::Feed {
                        url: url.to_string(),
                        endpoint,
                        replay,
                    },
                    stats.clone(),
                    self.clears_tx.clone(),
                    r.kv_reconnect.subscribe(),
                )));
            }
            r.kv_stats = Some(stats);
        }
    }

    fn clear(&mut self, c: ClearNotice) {
        if !self.reps.contains_key(&c.url) {
            return;
        }
        self.shared.clears_sent.fetch_add(1, Ordering::Relaxed);
        tracing::info!(replica = %c.url, reason = c.reason, "replica cache cleared: telling the data planes");
        for dp in self.dataplanes.clone() {
            let c = c.clone();
            tokio::spawn(async move {
                if let Err(e) = dp.clear(&c.url, c.reason).await {
                    tracing::warn!(dataplane = %dp.target, error = %e, "clear not delivered");
                }
            });
        }
    }

    /// The data planes' failure counts are a second opinion: `fall` reads in a
    /// row with new failed attempts (or with the replica ejected by a data
    /// plane's passive health) take the replica out even while `/health`
    /// answers (an engine that accepts probes but resets requests), and `rise`
    /// quiet reads bring it back, so it is retried as nginx's fail_timeout does.
    fn passive(&mut self, rep: DpReport) {
        let mut changed = false;
        let now = Instant::now();
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
            self.publish();
        }
    }

    fn warm_pools(&mut self) {
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
        match warm::decide(&mut self.warm, &cands, &self.cfg.warm, Instant::now()) {
            Some(warm::Action::Promote(url, reason)) => self.prewarm(url, reason),
            Some(warm::Action::Demote(url)) => {
                if let Some(r) = self.reps.get_mut(&url) {
                    r.promoted = None;
                    self.shared.demotions.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(replica = %url, "standby demoted back to the warm pool");
                }
            }
            None => {}
        }
    }

    /// Replays the data plane's hottest prefixes to the standby (one token each)
    /// so it joins with the common system prompts cached.
    fn prewarm(&mut self, url: String, reason: Reason) {
        let Some(r) = self.reps.get_mut(&url) else {
            return;
        };
        r.promoting = true;
        r.promoted = Some(reason);
        tracing::info!(replica = %url, ?reason, "pre-warming standby before promotion");
        let dps = self.dataplanes.clone();
        let limit = self.cfg.warm.prewarm_prefixes;
        let deadline = ms(self.cfg.warm.prewarm_timeout_ms);
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let (ok, requests) = tokio::time::timeout(deadline, prewarm_run(&url, &dps, limit))
                .await
                .unwrap_or((false, 0));
            let _ = tx.send(Msg::Prewarmed { url, ok, requests });
        });
    }

    fn finish_drains(&mut self) {
        let n_dp = self.dataplanes.len();
        let done: Vec<String> = self
            .reps
            .iter()
            .filter(|(_, r)| {
                r.draining.is_some_and(|t| {
                    let idle = r.in_flight.len() >= n_dp && r.in_flight.values().all(|v| *v == 0);
                    // The unhealthy mark must have reached the data planes before
                    // an idle report means anything.
                    (idle && t.elapsed() > ms(self.cfg.push.resync_ms) * 2)
                        || t.elapsed() > ms(self.cfg.drain.timeout_ms)
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
        }
    }

    /// The snapshot every data plane should have. Held back at start until each
    /// replica has had its first check (bounded), so a restarted daemon does not
    /// push "everything down" over a data plane's good state.
    fn snapshot(&self) -> Option<Vec<ReplicaSpec>> {
        let grace = ms(self.cfg.health.interval_ms + self.cfg.health.timeout_ms) * 2;
        if self.started.elapsed() < grace && self.reps.values().any(|r| !r.health.known()) {
            return None;
        }
        if !self.awaiting.is_empty() && self.started.elapsed() < DISCOVERY_GRACE {
            return None;
        }
        Some(
            self.reps
                .values()
                .map(|r| ReplicaSpec {
                    url: r.cfg.url.clone(),
                    models: r.cfg.models.clone(),
                    weight: r.cfg.weight,
                    pool: if r.promoted.is_some() && !r.promoting {
                        Pool::Active
                    } else {
                        r.cfg.pool
                    },
                    healthy: r.up() && r.draining.is_none(),
                    kv_blocks: r.kv_blocks(),
                    kv_block_tokens: r.kv_block_tokens(),
                    kv_slots: r.slot_shape().map(|s| s.slots),
                    kv_slot_tokens: r.slot_shape().map(|s| s.slot_tokens),
                    kv_host_tokens: r.slot_shape().map(|s| s.host_tokens),
                    max_in_flight: r.cfg.max_in_flight,
                })
                .collect(),
        )
    }

    fn publish(&mut self) {
        if let Some(s) = self.snapshot() {
            let changed = self
                .snap_tx
                .borrow()
                .as_ref()
                .is_none_or(|cur| cur.as_ref() != &s);
            if changed {
                self.snap_tx.send_replace(Some(Arc::new(s)));
            }
        }
        self.update_views();
    }

    fn publish_load(&mut self) {
        // Budgets move with every eviction; a new snapshot is worth pushing only
        // when one moved by more than a tenth.
        let mut budget_moved = false;
        for r in self.reps.values_mut() {
            let Some(est) = r.kv_stats.as_ref().and_then(|k| k.effective_blocks()) else {
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
            self.publish();
        }
        let loads: Vec<ReplicaLoad> = self
            .reps
            .values()
            .filter_map(|r| {
                let s = r.scraped?;
                Some(ReplicaLoad {
                    url: r.cfg.url.clone(),
                    running: s.running.max(0.0).round() as u32,
                    waiting: s.waiting.max(0.0).round() as u32,
                    kv_usage: s.kv_usage as f32,
                })
            })
            .collect();
        if loads.is_empty() {
            return;
        }
        let changed = self.load_tx.borrow().as_ref() != &loads;
        if changed {
            self.load_tx.send_replace(Arc::new(loads));
        }
        self.update_views();
    }

    fn update_views(&self) {
        let views = self
            .reps
            .values()
            .map(|r| ReplicaView {
                url: r.cfg.url.clone(),
                engine: r.cfg.engine,
                detected_engine: r.seen.name(),
                kv_slots: r.slot_shape().map(|s| s.slots),
                kv_slot_tokens: r.slot_shape().map(|s| s.slot_tokens),
                kv_host_tokens: r.slot_shape().map(|s| s.host_tokens),
                pool: if r.promoted.is_some() && !r.promoting {
                    Pool::Active
                } else {
                    r.cfg.pool
                },
                configured_pool: r.cfg.pool,
                healthy: r.health.known().then(|| r.up()),
                draining: r.draining.is_some(),
                running: r.scraped.map_or(0.0, |s| s.running),
                waiting: r.scraped.map_or(0.0, |s| s.waiting),
                kv_usage: r.scraped.map_or(0.0, |s| s.kv_usage),
                kv_blocks: r.kv_blocks(),
                kv_block_tokens: r.kv_block_tokens(),
                checks_failed: r.checks_failed,
                scrapes_failed: r.scrapes_failed,
                prewarm_requests: r.prewarm_requests,
                kv_effective_blocks: r.budget,
                kv: r.kv_stats.clone(),
            })
            .collect();
        *self
            .shared
            .replicas
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = views;
    }
}

/// Gathers the hot prefixes of every data plane (each sees only its share of
/// the traffic: the same anchor's hits add up) and replays the hottest to `url`
/// with `max_tokens: 1`. Every replay must succeed: a standby that cannot serve
/// its warm-up would not serve users either.
async fn prewarm_run(url: &str, dps: &[Dataplane], limit: usize) -> (bool, u32) {
    let mut merged: Vec<kvroute_admin_api::HotPrefix> = Vec::new();
    let mut answered = false;
    for dp in dps {
        match dp.hot_prefixes(limit).await {
            Ok(h) => {
                answered = true;
                for p in h.prefixes {
                    match merged.iter_mut().find(|m| m.anchor == p.anchor) {
                        Some(m) => m.hits += p.hits,
                        None => merged.push(p),
                    }
                }
            }
            Err(e) => {
                tracing::warn!(dataplane = %dp.target, error = %e, "hot prefixes unavailable")
            }
        }
    }
    if !answered {
        return (false, 0);
    }
    merged.sort_by(|a, b| b.hits.cmp(&a.hits).then(a.anchor.cmp(&b.anchor)));
    tracing::info!(replica = %url, prefixes = merged.len().min(limit), "replaying hot prefixes");
    let hot = kvroute_admin_api::HotPrefixes { prefixes: merged };
    let Ok((target, _)) = http::split_url(url) else {
        return (false, 0);
    };
    let mut sent = 0;
    for p in hot.prefixes.iter().take(limit) {
        let Ok(mut body) = serde_json::from_str::<serde_json::Value>(&p.sample_body) else {
            continue;
        };
        if let Some(o) = body.as_object_mut() {
            o.insert("max_tokens".into(), 1.into());
            o.insert("stream".into(), false.into());
        }
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        match http::request(
            &target,
            "POST",
            &p.path,
            Some(bytes),
            Duration::from_secs(30),
        )
        .await
        {
            Ok(r) if (200..300).contains(&r.status) => sent += 1,
            Ok(r) => {
                tracing::warn!(replica = %url, status = r.status, "pre-warm request refused");
                return (false, sent);
            }
            Err(e) => {
                tracing::warn!(replica = %url, error = %e, "pre-warm request failed");
                return (false, sent);
            }
        }
    }
    (true, sent)
}

/// One line on where replicas come from, for `check`.
pub fn describe(cfg: &Config) -> String {
    let file = cfg.replicas_file.as_ref().map_or_else(
        || "no replica file".to_string(),
        |p| format!("file {}", p.display()),
    );
    format!(
        "{} data planes, {} static replicas, {file}, {} DNS names",
        cfg.dataplanes.len(),
        cfg.replicas.len(),
        cfg.dns.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::Mutex as StdMutex;

    /// A one-request-per-connection HTTP server answering `status` with `body`
    /// and recording each request's head and body.
    fn server(status: u16, body: String) -> (SocketAddr, Arc<StdMutex<Vec<String>>>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(StdMutex::new(Vec::new()));
        let rec = seen.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let mut buf = Vec::new();
                let mut tmp = [0u8; 4096];
                // Read the head, then Content-Length bytes of body.
                loop {
                    let n = s.read(&mut tmp).unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&tmp[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some(i) = text.find("\r\n\r\n") {
                        let len = text[..i]
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse::<usize>().ok())?
                            })
                            .unwrap_or(0);
                        if buf.len() >= i + 4 + len {
                            break;
                        }
                    }
                }
                rec.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf).to_string());
                let _ = s.write_all(
                    format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                );
            }
        });
        (addr, seen)
    }

    use std::net::SocketAddr;

    fn hot(n: usize) -> String {
        let prefixes: Vec<kvroute_admin_api::HotPrefix> = (0..n)
            .map(|i| kvroute_admin_api::HotPrefix {
                anchor: i as u64,
                hits: 10,
                model: Some("m".into()),
                path: "/v1/chat/completions".into(),
                sample_body: format!(
                    r#"{{"model":"m","messages":[{{"role":"system","content":"sys {i}"}}],"max_tokens":500,"stream":true}}"#
                ),
            })
            .collect();
        serde_json::to_string(&kvroute_admin_api::HotPrefixes { prefixes }).unwrap()
    }

    fn dp(addr: SocketAddr) -> Dataplane {
        Dataplane {
            target: Target::Tcp {
                addr: addr.to_string(),
            },
            timeout: Duration::from_secs(2),
        }
    }

    #[tokio::test]
    async fn prewarm_replays_hot_prefixes_with_one_token() {
        let (admin, asked) = server(200, hot(3));
        let (replica, seen) = server(200, "{}".into());
        let (ok, n) = prewarm_run(&format!("http://{replica}"), &[dp(admin)], 2).await;
        assert!(ok);
        assert_eq!(n, 2, "bounded by the limit");
        assert!(asked.lock().unwrap()[0].starts_with("GET /hot-prefixes?limit=2 "));
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2);
        for (i, req) in seen.iter().enumerate() {
            assert!(req.starts_with("POST /v1/chat/completions "), "{req}");
            let body: serde_json::Value =
                serde_json::from_str(req.split("\r\n\r\n").nth(1).unwrap()).unwrap();
            assert_eq!(body["max_tokens"], 1);
            assert_eq!(body["stream"], false);
            assert_eq!(body["messages"][0]["content"], format!("sys {i}"));
        }
    }

    #[tokio::test]
    async fn a_standby_that_fails_prewarm_is_not_ready() {
        let (admin, _) = server(200, hot(2));
        let (replica, _) = server(500, "{}".into());
        let (ok, n) = prewarm_run(&format!("http://{replica}"), &[dp(admin)], 8).await;
        assert!(!ok);
        assert_eq!(n, 0);
        // Hits from several data planes add up before the limit applies.
        let (a1, _) = server(200, hot(3));
        let (a2, _) = server(200, hot(1));
        let (replica, seen) = server(200, "{}".into());
        let (ok, n) = prewarm_run(&format!("http://{replica}"), &[dp(a1), dp(a2)], 1).await;
        assert!(ok && n == 1);
        assert!(seen.lock().unwrap()[0].contains("sys 0"));
        // No data plane answers: no promotion on a blind guess either.
        let (ok, _) = prewarm_run(
            &format!("http://{replica}"),
            &[dp("127.0.0.1:1".parse().unwrap())],
            8,
        )
        .await;
        assert!(!ok);
    }
}
