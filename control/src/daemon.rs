//! The daemon proper: one loop that owns every replica's state and decides what
//! the data planes should see, fed by small tasks that probe, scrape, subscribe
//! and watch. Deciding in one place keeps the pushed snapshot consistent: the
//! tasks only report observations.
//!
//! The deciding is [`decide::Decisions`], which does no I/O and reads no
//! clock: it takes each event with the time it arrived and returns
//! [`effect::Effect`]s. This file is the runner around it: it reads the clock,
//! owns the tasks and channels, and carries the effects out.

mod decide;
mod effect;
mod replica;
mod tasks;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvroute_admin_api::{Pool, ReplicaLoad, ReplicaSpec};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::config::{ms, Config, DnsConfig, Engine, PushConfig};
use crate::discovery::{self, Discovered, Resolver};
use crate::error::ControlError;
use crate::http::{self, Target};
use crate::kv_events::{ClearNotice, KvStats};
use crate::push::{self, Dataplane, DataplaneStats, DpReport};
use crate::scraper::Report;
use decide::Decisions;
use effect::Effect;
use tasks::ReplicaTasks;

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
    /// The KV-event subscribers' counters, filled in by the runner (which owns
    /// the subscribers).
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

/// The runner: owns the clock, the tasks and the channels, and carries out
/// what its [`Decisions`] return.
pub struct Daemon {
    decisions: Decisions,
    me: String,
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
    replica_tasks: HashMap<String, ReplicaTasks>,
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
            decisions: Decisions::new(cfg, Instant::now()),
            me,
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
            replica_tasks: HashMap::new(),
            resolver,
            shared: Arc::new(Shared::default()),
        }
    }

    pub fn sender(&self) -> mpsc::UnboundedSender<Msg> {
        self.tx.clone()
    }

    /// Reads the clock once per event, hands the event to the decisions and
    /// carries out what they return.
    pub async fn run(mut self) {
        let cfg = self.decisions.config();
        tracing::info!(name = %self.me, dataplanes = cfg.dataplanes.len(), "kvroute-control starting");
        // Read at start only: a reload's new scrape interval reaches the
        // scrapers, not this tick.
        let load_every = ms(cfg.scrape.interval_ms);
        let fx = self.decisions.start(Instant::now());
        self.execute(fx);
        let mut load_tick = tokio::time::interval(load_every);
        load_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut decide_tick = tokio::time::interval(Duration::from_millis(100));
        decide_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let fx = tokio::select! {
                Some(m) = self.rx.recv() => self.decisions.on_msg(m, Instant::now()),
                Some(c) = self.clears_rx.recv() => self.decisions.on_clear(c),
                Some(r) = self.reports_rx.recv() => {
                    self.decisions.on_dataplane_report(r, Instant::now())
                }
                _ = load_tick.tick() => {
                    let calibrated = self.calibrated_budgets();
                    self.decisions.on_load_tick(&calibrated, Instant::now())
                }
                _ = decide_tick.tick() => {
                    self.shared.heartbeat.fetch_add(1, Ordering::Relaxed);
                    self.decisions.on_tick(Instant::now())
                }
            };
            self.execute(fx);
        }
    }

    /// The block budgets the replicas' KV events show, by URL.
    fn calibrated_budgets(&self) -> HashMap<String, u64> {
        self.replica_tasks
            .iter()
            .filter_map(|(url, t)| Some((url.clone(), t.kv_stats()?.effective_blocks()?)))
            .collect()
    }

    fn execute(&mut self, effects: Vec<Effect>) {
        for e in effects {
            match e {
                Effect::StartDataplanes { admin, push } => self.start_dataplanes(&admin, &push),
                Effect::StartDiscovery { file, dns } => self.start_discovery(file, dns),
                Effect::StartReplicaTasks {
                    replica,
                    gen,
                    health,
                    scrape,
                } => self
                    .replica_tasks
                    .entry(replica.url.clone())
                    .or_insert_with(ReplicaTasks::new)
                    .restart(&replica, gen, health, scrape, &self.tx, &self.clears_tx),
                Effect::StopReplicaTasks { url } => {
                    self.replica_tasks.remove(&url);
                }
                Effect::ReconnectKvEvents { url } => {
                    if let Some(t) = self.replica_tasks.get(&url) {
                        t.reconnect_kv_events();
                    }
                }
                Effect::Clear(c) => self.send_clear(c),
                Effect::Prewarm {
                    url,
                    prefixes,
                    timeout,
                } => self.prewarm(url, prefixes, timeout),
                Effect::ReplyDrain { reply, result } => {
                    let _ = reply.send(result);
                }
                Effect::PushSnapshot(s) => {
                    self.snap_tx.send_replace(Some(s));
                }
                Effect::PushLoad(l) => {
                    self.load_tx.send_replace(l);
                }
                Effect::PublishViews(views) => self.publish_views(views),
            }
        }
        self.publish_counters();
    }

    fn start_dataplanes(&mut self, admin: &[String], push: &PushConfig) {
        for t in self.dp_tasks.drain(..) {
            t.abort();
        }
        self.dataplanes.clear();
        let mut stats_list = Vec::new();
        for (i, d) in admin.iter().enumerate() {
            let target = Target::parse_admin(d).expect("validated");
            let dp = Dataplane {
                target,
                timeout: ms(push.timeout_ms),
            };
            let stats = Arc::new(DataplaneStats::default());
            stats_list.push((d.clone(), stats.clone()));
            self.dp_tasks.push(tokio::spawn(push::run(
                i,
                dp.clone(),
                self.me.clone(),
                self.snap_tx.subscribe(),
                self.load_tx.subscribe(),
                ms(push.resync_ms),
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

    fn start_discovery(&mut self, file: Option<PathBuf>, dns: Vec<DnsConfig>) {
        for t in self.discovery_tasks.drain(..) {
            t.abort();
        }
        if let Some(path) = file {
            self.discovery_tasks
                .push(tokio::spawn(discovery::watch_file(
                    path,
                    Duration::from_millis(200),
                    self.tx.clone(),
                )));
        }
        for (i, d) in dns.into_iter().enumerate() {
            self.discovery_tasks.push(tokio::spawn(discovery::watch_dns(
                i,
                d,
                self.resolver.clone(),
                self.tx.clone(),
            )));
        }
    }

    fn send_clear(&self, c: ClearNotice) {
        for dp in self.dataplanes.clone() {
            let c = c.clone();
            tokio::spawn(async move {
                if let Err(e) = dp.clear(&c.url, c.reason).await {
                    tracing::warn!(dataplane = %dp.target, error = %e, "clear not delivered");
                }
            });
        }
    }

    fn prewarm(&self, url: String, prefixes: usize, timeout: Duration) {
        let dps = self.dataplanes.clone();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let (ok, requests) = tokio::time::timeout(timeout, prewarm_run(&url, &dps, prefixes))
                .await
                .unwrap_or((false, 0));
            let _ = tx.send(Msg::Prewarmed { url, ok, requests });
        });
    }

    fn publish_views(&self, mut views: Vec<ReplicaView>) {
        for v in &mut views {
            v.kv = self
                .replica_tasks
                .get(&v.url)
                .and_then(|t| t.kv_stats().cloned());
        }
        *self
            .shared
            .replicas
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = views;
    }

    /// Copies the decisions' counters to what `/metrics` reads (the daemon is
    /// their only writer).
    fn publish_counters(&self) {
        let c = self.decisions.counters();
        let s = &self.shared;
        s.promotions.store(c.promotions, Ordering::Relaxed);
        s.demotions.store(c.demotions, Ordering::Relaxed);
        s.prewarm_failures
            .store(c.prewarm_failures, Ordering::Relaxed);
        s.clears_sent.store(c.clears_sent, Ordering::Relaxed);
        s.reloads.store(c.reloads, Ordering::Relaxed);
        s.discovery_updates
            .store(c.discovery_updates, Ordering::Relaxed);
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
