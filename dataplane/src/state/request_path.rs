//! What a worker's requests read: the handles the request path needs and
//! nothing more. A request can reach the replicas, the router, the admission
//! queue and its own worker's counters; it cannot start a drain, read another
//! worker's counters or reach the process wiring.

use std::sync::Arc;

use super::{Clock, DrainSignal, Shared, WorkerStats};
use crate::config::{Limits, UpstreamConfig};
use crate::replica::ReplicaTable;
use crate::route::{Router, RoutingConfig};

pub struct RequestPath {
    /// This worker's counters.
    pub stats: Arc<WorkerStats>,
    pub limits: Limits,
    pub upstream: UpstreamConfig,
    /// The session header and anchor length (routing itself is `router`'s).
    pub routing: RoutingConfig,
    pub table: Arc<ReplicaTable>,
    pub admission: Arc<crate::admission::Admission>,
    pub router: Arc<dyn Router>,
    pub prefix: crate::prefix::PrefixConfig,
    pub hot: Arc<crate::hot::HotPrefixes>,
    pub cache: Option<Arc<crate::cache::PredictionCache>>,
    /// API keys and their limits, and the credentials sent to replicas.
    pub auth: Arc<crate::auth::Auth>,
    pub upstream_tls: Arc<rustls::ClientConfig>,
    /// `[tls]`: what new client handshakes use; `None` for a plain listener.
    pub tls: Option<Arc<crate::tls::ServerTls>>,
    /// Live streams per worker, for the steering program.
    pub steering: Arc<crate::steer::Steering>,
    pub drain: DrainSignal,
    pub clock: Clock,
}

impl RequestPath {
    /// Worker `id`'s handles.
    pub fn of(shared: &Shared, id: usize) -> RequestPath {
        RequestPath {
            stats: shared.workers[id].clone(),
            limits: shared.cfg.limits.clone(),
            upstream: shared.cfg.upstream.clone(),
            routing: shared.cfg.routing.clone(),
            table: shared.table.clone(),
            admission: shared.admission.clone(),
            router: shared.router.clone(),
            prefix: shared.prefix,
            hot: shared.hot.clone(),
            cache: shared.cache.clone(),
            auth: shared.auth.clone(),
            upstream_tls: shared.upstream_tls.clone(),
            tls: shared.tls.clone(),
            steering: shared.steering.clone(),
            drain: shared.drain.signal(),
            clock: shared.clock,
        }
    }

    /// Milliseconds since start: the clock value handed to routers.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::config::Config;

    #[test]
    fn each_worker_gets_its_own_counters_and_the_process_drain() {
        let cfg = Config {
            workers: Some(2),
            replicas: vec![kvroute_admin_api::ReplicaSpec::new("http://127.0.0.1:9")],
            ..Config::default()
        };
        let shared = Shared::new(cfg).unwrap();
        let (w0, w1) = (shared.request_path(0), shared.request_path(1));
        w1.stats.requests.fetch_add(3, Ordering::Relaxed);
        assert_eq!(shared.workers[1].requests.load(Ordering::Relaxed), 3);
        assert_eq!(w0.stats.requests.load(Ordering::Relaxed), 0);
        // The same replica table and router as the admin API sees, not copies.
        assert!(Arc::ptr_eq(&w0.table, &shared.table));
        assert!(Arc::ptr_eq(&w0.router, &shared.router));
        assert_eq!(w1.table.load().replicas.len(), 1);
        let mut woken = w0.drain.subscribe();
        assert!(!w0.drain.is_draining());
        shared.begin_drain();
        assert!(w0.drain.is_draining() && w1.drain.is_draining());
        assert!(*woken.borrow_and_update());
        assert!(w0.now_ms() <= shared.now_ms());
    }
}
