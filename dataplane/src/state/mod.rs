//! The process's state: the replica table, the router, the admission queue,
//! TLS, keys, the connection budget and each worker's counters. `server.rs`
//! builds it and hands each subsystem its own handles: the workers a
//! [`RequestPath`] each, the signal loop and the admin API the whole of it
//! (they report on and act on the process). None of them imports `server`.

// Defines the process state and hands out its narrow handles.
#![allow(clippy::disallowed_types)]

mod clock;
mod drain;
mod request_path;

pub use clock::Clock;
pub use drain::{Drain, DrainSignal};
pub use request_path::RequestPath;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::config::Config;
use crate::error::Error;
use crate::replica::ReplicaTable;
use crate::route::Router;

/// Counters of one worker, read by `/state` and `/metrics`.
#[derive(Default, Debug)]
pub struct WorkerStats {
    pub connections: AtomicU64,
    pub active_requests: AtomicU64,
    pub requests: AtomicU64,
    /// Advanced by the worker's runtime every [`crate::notify::HEARTBEAT`]; the watchdog reads it.
    pub heartbeat: AtomicU64,
    /// Client connections by state, as the worker's budget registry sees them.
    pub states: Arc<crate::budget::registry::StateCounts>,
}

/// State every worker and the admin API share.
pub struct Shared {
    pub cfg: Config,
    pub table: Arc<ReplicaTable>,
    /// Requests waiting for a replica with room; the table tells it of releases.
    pub admission: Arc<crate::admission::Admission>,
    pub router: Arc<dyn Router>,
    /// Most used prefixes with a sample request each, for pre-warming standbys.
    pub hot: Arc<crate::hot::HotPrefixes>,
    /// Block size etc. for prompt hashing, fixed at start like the policy.
    pub prefix: crate::prefix::PrefixConfig,
    pub workers: Vec<Arc<WorkerStats>>,
    pub io_name: OnceLock<&'static str>,
    pub drain: Drain,
    pub steering: Arc<crate::steer::Steering>,
    /// `None` unless `[prediction_cache] enabled`.
    pub cache: Option<Arc<crate::cache::PredictionCache>>,
    /// `[tls]`: what new client handshakes use; `None` for a plain listener.
    pub tls: Option<Arc<crate::tls::ServerTls>>,
    /// Verifies `https://` replicas (`[upstream] ca_file` or the system roots).
    pub upstream_tls: Arc<rustls::ClientConfig>,
    /// API keys (`[auth]`) and the credentials sent to replicas.
    pub auth: Arc<crate::auth::Auth>,
    /// Client connections allowed, over all workers and per worker.
    pub budget: crate::budget::Caps,
    pub clock: Clock,
}

impl Shared {
    pub fn new(cfg: Config) -> Result<Arc<Shared>, Error> {
        let up = &cfg.upstream;
        let admission = Arc::new(crate::admission::Admission::new(
            up.queue_max,
            Duration::from_millis(up.queue_timeout_ms),
        ));
        let table = Arc::new(ReplicaTable::with_waiters(
            up.max_in_flight_per_replica,
            admission.clone(),
        ));
        table.replace(crate::resolve::replicas(
            &table.load(),
            cfg.replicas.clone(),
        )?)?;
        let router = cfg
            .routing
            .build_observed(Arc::new(crate::metrics::RouterMetrics));
        router.on_replicas_changed(&table.load());
        let n = cfg.worker_count();
        let (tls, upstream_tls) = load_tls(&cfg)?;
        let nofile = crate::budget::fd_limit().unwrap_or(1024);
        let budget = crate::budget::caps(cfg.limits.max_connections, n, nofile);
        Ok(Arc::new(Shared {
            budget,
            tls: tls.map(Arc::new),
            upstream_tls,
            table,
            admission,
            router,
            hot: Default::default(),
            prefix: cfg.routing.prefix(),
            workers: (0..n).map(|_| Arc::default()).collect(),
            io_name: OnceLock::new(),
            drain: Drain::default(),
            steering: crate::steer::Steering::new(cfg.steering, cfg.steering_mode, n),
            cache: crate::cache::PredictionCache::new(&cfg.prediction_cache)?,
            auth: Arc::new(crate::auth::Auth::new(&cfg.auth, &cfg.upstream)?),
            clock: Clock::start(),
            cfg,
        }))
    }

    /// Milliseconds since start: the clock value handed to routers.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Gives up the listeners (the steering program stops picking this
    /// process) and tells every worker and connection.
    pub fn begin_drain(&self) {
        self.steering.forget_listeners();
        self.drain.begin();
    }

    /// Worker `id`'s handles.
    pub fn request_path(&self, id: usize) -> RequestPath {
        RequestPath::of(self, id)
    }

    /// The status line systemd shows (`systemctl status`).
    pub fn status_line(&self) -> String {
        format!(
            "workers={} replicas={} io={} policy={}{}",
            self.workers.len(),
            self.table.load().replicas.len(),
            io_name(self),
            self.router.name(),
            if self.drain.is_draining() {
                " draining"
            } else {
                ""
            }
        )
    }

    /// Each worker's heartbeat count, for the watchdog.
    pub fn heartbeats(&self) -> Vec<u64> {
        self.workers
            .iter()
            .map(|w| w.heartbeat.load(Ordering::Relaxed))
            .collect()
    }

    pub fn open_connections(&self) -> u64 {
        self.workers
            .iter()
            .map(|w| w.connections.load(Ordering::Relaxed))
            .sum()
    }
}

/// The TLS state `cfg` asks for: refuses a certificate, key or CA file that
/// does not load, naming the file. Also what `--check-config` runs.
pub fn load_tls(
    cfg: &Config,
) -> Result<(Option<crate::tls::ServerTls>, Arc<rustls::ClientConfig>), Error> {
    let server = cfg
        .tls
        .as_ref()
        .map(crate::tls::ServerTls::load)
        .transpose()?;
    let client = crate::tls::upstream::client_config(cfg.upstream.ca_file.as_deref())?;
    Ok((server, client))
}

/// For `/state`.
pub fn io_name(shared: &Shared) -> &'static str {
    shared.io_name.get().copied().unwrap_or("none")
}
