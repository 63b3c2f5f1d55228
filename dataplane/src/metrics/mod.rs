//! Prometheus metrics through the `metrics` facade.
//!
//! Names are constants here so the README, the dashboard and the code agree.

mod router;

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub use router::{export_router_stats, RouterMetrics};

pub const REQUESTS: &str = "kvroute_requests_total";
pub const ERRORS: &str = "kvroute_errors_total";
pub const IN_FLIGHT: &str = "kvroute_replica_in_flight";
pub const PENDING_PREFILL: &str = "kvroute_replica_pending_prefill_bytes";
pub const CONNECTIONS: &str = "kvroute_worker_connections";
// The connection budget.
/// Client connections by `state`: reading_head, idle or active (over all workers).
pub const CONNECTIONS_BY_STATE: &str = "kvroute_connections";
/// `reason`: headless, idle (shed to make room) or over_cap (a new one refused).
pub const CONNECTION_SHEDS: &str = "kvroute_connection_sheds_total";
/// `reason`: emfile, enfile, enomem, aborted or other.
pub const ACCEPT_ERRORS: &str = "kvroute_accept_errors_total";
pub const UPSTREAM_CONNECT: &str = "kvroute_upstream_connect_seconds";
pub const UPSTREAM_TTFB: &str = "kvroute_upstream_first_byte_seconds";
pub const REQUEST_DURATION: &str = "kvroute_request_duration_seconds";
pub const BYTES: &str = "kvroute_bytes_total";
pub const POOL: &str = "kvroute_upstream_pool_total";
pub const RETRIES: &str = "kvroute_upstream_retries_total";
pub const DECISIONS: &str = "kvroute_routing_decisions_total";
pub const REPLICA_HEALTHY: &str = "kvroute_replica_healthy";
// Admission (`max_in_flight`, the queue).
/// `reason`: queue_full, queue_timeout or queue_share.
pub const OVERLOAD_REJECTIONS: &str = "kvroute_overload_rejections_total";
/// Requests in the admission queue (all workers), at scrape time.
pub const QUEUE_DEPTH: &str = "kvroute_queue_depth";
/// Time a request spent in the admission queue, however it left.
pub const QUEUE_WAIT: &str = "kvroute_queue_wait_seconds";
/// 1 while passive health keeps the replica out of rotation.
pub const REPLICA_EJECTED: &str = "kvroute_replica_ejected";
/// Times passive health took the replica out of rotation.
pub const REPLICA_EJECTIONS: &str = "kvroute_replica_ejections_total";
// TLS on the client listener.
/// Handshakes completed.
pub const TLS_HANDSHAKES: &str = "kvroute_tls_handshakes_total";
/// `reason`: timeout, closed, plain_http, alert_received, incompatible, protocol or io.
pub const TLS_HANDSHAKE_FAILURES: &str = "kvroute_tls_handshake_failures_total";
// API keys.
/// `reason`: missing_key, invalid_key, model_not_allowed, rate_requests or
/// rate_prompt_bytes; `key`: the key's name once it was valid, else "none".
pub const AUTH_REJECTIONS: &str = "kvroute_auth_rejections_total";
/// Keys in the loaded keys file.
pub const AUTH_KEYS: &str = "kvroute_auth_keys";
// Prediction cache.
/// `result`: hit, miss or bypass; `source` of a hit: memory, backend or single_flight.
pub const CACHE_REQUESTS: &str = "kvroute_prediction_cache_requests_total";
pub const CACHE_STORES: &str = "kvroute_prediction_cache_stores_total";
pub const CACHE_BYTES: &str = "kvroute_prediction_cache_bytes";
pub const CACHE_ENTRIES: &str = "kvroute_prediction_cache_entries";
pub const CACHE_IN_FLIGHT: &str = "kvroute_prediction_cache_single_flight_leaders";
pub const CACHE_EVICTIONS: &str = "kvroute_prediction_cache_evictions_total";
/// `result`: hit (the leader's answer), timeout or fallthrough (the leader stored nothing).
pub const CACHE_SF_WAITS: &str = "kvroute_prediction_cache_single_flight_waits_total";
pub const CACHE_BACKEND_ERRORS: &str = "kvroute_prediction_cache_backend_errors_total";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the global recorder once; later calls return the same handle.
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let buckets = [
            0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
            1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
        ];
        let ratios = [
            0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0,
        ];
        let tokens = [
            0.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262_144.0,
        ];
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_ratio".into()), &ratios))
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_tokens".into()), &tokens))
            .expect("static buckets are valid")
            .build_recorder();
        let handle = recorder.handle();
        // A second install (tests running several servers in one process) keeps the first.
        let _ = metrics::set_global_recorder(recorder);
        // build_recorder() starts no upkeep: histogram samples are kept raw until a
        // scrape drains them, so with nothing scraping /metrics, memory grew with
        // every request (`cargo xtask bench footprint`, 30 s of load: 97 MiB RSS
        // without this thread, 29 MiB with it). Draining once a second bounds it.
        let upkeep = handle.clone();
        let _ = std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || loop {
                std::thread::sleep(std::time::Duration::from_secs(1));
                upkeep.run_upkeep();
            });
        handle
    })
}

/// Label value for a request path: a fixed set, so a client cannot blow up cardinality.
pub fn route_label(path: &str) -> &'static str {
    let p = path.split('?').next().unwrap_or("");
    match p {
        "/v1/chat/completions" => "chat_completions",
        "/v1/completions" => "completions",
        "/v1/responses" => "responses",
        "/generate" => "generate",
        "/v1/embeddings" => "embeddings",
        "/v1/models" => "models",
        p if p.starts_with("/v1/models/") => "models",
        "/health" | "/healthz" => "health",
        _ => "other",
    }
}

/// Status codes as static strings for labels.
pub fn status_label(code: u16) -> &'static str {
    match code {
        200 => "200",
        201 => "201",
        204 => "204",
        304 => "304",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        408 => "408",
        413 => "413",
        422 => "422",
        429 => "429",
        431 => "431",
        500 => "500",
        501 => "501",
        502 => "502",
        503 => "503",
        504 => "504",
        100..=199 => "1xx",
        202..=299 => "2xx",
        300..=399 => "3xx",
        405..=499 => "4xx",
        _ => "5xx",
    }
}

/// Per-worker handles for the metrics every request touches.
///
/// `metrics::counter!` with labels builds a key and looks it up in the shared
/// registry on every call (about 8 % of a worker's CPU in the proxy benchmark);
/// a worker registers each label set once and then only bumps atomics.
pub struct WorkerMetrics {
    pub bytes_in: metrics::Counter,
    pub bytes_out: metrics::Counter,
    pub pool_reuse: metrics::Counter,
    pub pool_new: metrics::Counter,
    pub ttfb: metrics::Histogram,
    pub connect: metrics::Histogram,
    decisions: std::cell::RefCell<std::collections::HashMap<&'static str, metrics::Counter>>,
    requests: std::cell::RefCell<RequestCounters>,
    durations: std::cell::RefCell<std::collections::HashMap<&'static str, metrics::Histogram>>,
}

/// (route, status, replica slot) → key name → (replica URL the handle was made
/// for, handle). Key names come from the keys file (or are "none"), so the
/// label stays as bounded as that file.
type RequestCounters = std::collections::HashMap<
    (&'static str, &'static str, u16),
    std::collections::HashMap<std::sync::Arc<str>, (String, metrics::Counter)>,
>;

/// Slot value for requests that reached no replica.
const NO_REPLICA: u16 = u16::MAX;

impl Default for WorkerMetrics {
    fn default() -> Self {
        WorkerMetrics {
            bytes_in: metrics::counter!(BYTES, "direction" => "client_in"),
            bytes_out: metrics::counter!(BYTES, "direction" => "client_out"),
            pool_reuse: metrics::counter!(POOL, "result" => "reuse"),
            pool_new: metrics::counter!(POOL, "result" => "new"),
            ttfb: metrics::histogram!(UPSTREAM_TTFB),
            connect: metrics::histogram!(UPSTREAM_CONNECT),
            decisions: Default::default(),
            requests: Default::default(),
            durations: Default::default(),
        }
    }
}

impl WorkerMetrics {
    pub fn decision(&self, kind: &'static str) {
        self.decisions
            .borrow_mut()
            .entry(kind)
            .or_insert_with(|| metrics::counter!(DECISIONS, "kind" => kind))
            .increment(1);
    }

    /// Counts a finished request; `replica` is `(slot, url)` when one was
    /// chosen, `key` the API key's name (`"none"` without one).
    pub fn request(
        &self,
        route: &'static str,
        status: u16,
        replica: Option<(u16, &str)>,
        key: &str,
    ) {
        let status = status_label(status);
        let (slot, url) = replica.unwrap_or((NO_REPLICA, "none"));
        let register = || metrics::counter!(REQUESTS, "route" => route, "status" => status, "replica" => url.to_owned(), "key" => key.to_owned());
        let mut map = self.requests.borrow_mut();
        let by_key = map.entry((route, status, slot)).or_default();
        match by_key.get_mut(key) {
            // A slot is reused by another replica after a swap: re-register under its URL.
            Some(entry) if entry.0 != url => *entry = (url.to_owned(), register()),
            Some(_) => {}
            None => {
                by_key.insert(key.into(), (url.to_owned(), register()));
            }
        }
        by_key.get(key).expect("present").1.increment(1);
    }

    pub fn duration(&self, route: &'static str, secs: f64) {
        self.durations
            .borrow_mut()
            .entry(route)
            .or_insert_with(|| metrics::histogram!(REQUEST_DURATION, "route" => route))
            .record(secs);
    }
}
