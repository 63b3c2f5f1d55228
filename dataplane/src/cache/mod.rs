//! Prediction cache: identical deterministic requests answered from memory.
//!
//! The proxy asks [`PredictionCache::plan`] once per request (after the body is
//! read and validated), looks up on a plan that allows it, and on a miss records
//! the response while relaying it ([`record::Recorder`]), storing it only once it
//! is complete and 200. Concurrent identical requests collapse behind the first
//! ([`single_flight`]). With a backend, memory sits in front of Redis/Valkey.
#![forbid(unsafe_code)]

/// The cache key: computed by the routing core from the body (the scanner lives there).
pub use kvroute_core::prompt::cache_key as key;
pub mod record;
pub mod redis;
pub mod single_flight;
pub mod store;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::http::RequestHead;
use crate::metrics as m;
use crate::prefix::Analyzed;
use crate::prompt::Endpoint;

pub use store::{Delivery, Entry};

/// Which requests of a model may be cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    Off,
    /// Temperature 0 (or greedy by default, if configured) or a seed.
    #[default]
    Deterministic,
    /// Every request, sampled or not: for models whose output is fixed anyway.
    Always,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PredictionCacheConfig {
    pub enabled: bool,
    /// Mode of models not listed in `models`.
    pub mode: CacheMode,
    /// Per-model modes.
    pub models: BTreeMap<String, CacheMode>,
    /// A request without `temperature` counts as greedy (engines whose default is 0).
    pub greedy_by_default: bool,
    /// Cache requests asking for logprobs too.
    pub allow_logprobs: bool,
    /// Share entries across Authorization (and x-api-key, api-key) values, or
    /// across API keys with `[auth]` on: one tenant, or public answers.
    pub shared: bool,
    pub ttl_ms: u64,
    /// Memory budget of the local store, entry bookkeeping included.
    pub max_bytes: u64,
    /// Larger responses are relayed but not stored.
    pub max_entry_bytes: u64,
    /// How long identical requests wait for the first one before going upstream themselves.
    pub single_flight_wait_ms: u64,
    /// Shared backend, `redis://host:port[/db]` (or `valkey://`).
    pub backend: Option<String>,
    /// Deadline of a backend read (connect included); past it, a miss.
    pub backend_timeout_ms: u64,
}

impl Default for PredictionCacheConfig {
    fn default() -> Self {
        PredictionCacheConfig {
            enabled: false,
            mode: CacheMode::Deterministic,
            models: BTreeMap::new(),
            greedy_by_default: false,
            allow_logprobs: false,
            shared: false,
            ttl_ms: 600_000,
            max_bytes: 256 * 1024 * 1024,
            max_entry_bytes: 4 * 1024 * 1024,
            single_flight_wait_ms: 30_000,
            backend: None,
            backend_timeout_ms: 5,
        }
    }
}

impl PredictionCacheConfig {
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |k: &str, why: &str| Err(Error::Config(format!("prediction_cache.{k}: {why}")));
        for (k, v) in [
            ("ttl_ms", self.ttl_ms),
            ("max_bytes", self.max_bytes),
            ("max_entry_bytes", self.max_entry_bytes),
            ("backend_timeout_ms", self.backend_timeout_ms),
        ] {
            if v == 0 {
                return bad(k, "must be greater than 0");
            }
        }
        if self.max_entry_bytes > self.max_bytes {
            return bad("max_entry_bytes", "must not exceed max_bytes");
        }
        if self.max_entry_bytes > u32::MAX as u64 {
            return bad("max_entry_bytes", "at most 4 GiB");
        }
        if let Some(b) = &self.backend {
            redis::parse_url(b).map_err(Error::CacheBackend)?;
        }
        Ok(())
    }
}

/// Headers that identify a tenant: entries are scoped by all of them unless `shared`.
pub(crate) const TENANT_HEADERS: [&str; 3] = ["authorization", "x-api-key", "api-key"];

/// What the cache does for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Caching is disabled, or the route is not a completion: no header, no work.
    Off,
    /// Not cacheable, or the client said `no-store`.
    Bypass(&'static str),
    /// Cacheable: look up unless `lookup` is false (`no-cache`), record on a miss.
    Use {
        key: u128,
        delivery: Delivery,
        lookup: bool,
    },
}

impl Plan {
    /// Value of the `x-kvroute-cache` header on a response that did not hit.
    pub fn header(&self) -> Option<&'static str> {
        match self {
            Plan::Off => None,
            Plan::Use { lookup: true, .. } => Some("miss"),
            _ => Some("bypass"),
        }
    }
}

pub enum Lookup<'a> {
    Hit(Arc<Entry>),
    Miss(Option<single_flight::Flight<'a>>),
}

/// What the relay of a response does for the cache.
#[derive(Default)]
pub struct Tap {
    /// `x-kvroute-cache` value for the response.
    pub header: Option<&'static str>,
    /// Record the response and store it under this key if it completes as a 200.
    pub record: Option<(Arc<PredictionCache>, u128, Delivery)>,
}

impl Tap {
    pub fn new(cache: Option<&Arc<PredictionCache>>, plan: Plan) -> Tap {
        let record = match (cache, plan) {
            (Some(c), Plan::Use { key, delivery, .. }) => Some((c.clone(), key, delivery)),
            _ => None,
        };
        Tap {
            header: plan.header(),
            record,
        }
    }

    /// A recorder for a response with this status and framing, if it may be stored.
    pub fn recorder(
        &self,
        status: u16,
        framing: crate::http::ResponseFraming,
    ) -> Option<record::Recorder> {
        let (c, _, delivery) = self.record.as_ref()?;
        if status != 200 {
            return None;
        }
        record::Recorder::new(framing, c.cfg.max_entry_bytes as usize, *delivery)
    }

    /// Called once the response passed through whole.
    pub fn complete(&self, rec: Option<record::Recorder>) {
        if let (Some(r), Some((c, key, _))) = (rec, &self.record) {
            if let Some(e) = r.finish() {
                c.insert(*key, e);
            }
        }
    }
}

pub struct PredictionCache {
    pub cfg: PredictionCacheConfig,
    pub store: store::Store,
    pub flight: single_flight::SingleFlight,
    pub backend: Option<redis::Backend>,
}

fn cache_control(head: &RequestHead, buf: &[u8]) -> (bool, bool) {
    let (mut no_cache, mut no_store) = (false, false);
    for (n, v) in head.header_iter(buf) {
        if !n.eq_ignore_ascii_case("cache-control") {
            continue;
        }
        for t in v.split(|&b| b == b',') {
            let t = t.trim_ascii();
            no_cache |= t.eq_ignore_ascii_case(b"no-cache");
            no_store |= t.eq_ignore_ascii_case(b"no-store");
        }
    }
    (no_cache, no_store)
}

impl PredictionCache {
    /// `None` when disabled. Fails only on a backend that cannot be resolved.
    pub fn new(cfg: &PredictionCacheConfig) -> Result<Option<Arc<PredictionCache>>, Error> {
        if !cfg.enabled {
            return Ok(None);
        }
        let backend = match &cfg.backend {
            Some(url) => Some(
                redis::Backend::new(url, Duration::from_millis(cfg.backend_timeout_ms))
                    .map_err(Error::CacheBackend)?,
            ),
            None => None,
        };
        Ok(Some(Arc::new(PredictionCache {
            store: store::Store::new(cfg.max_bytes, Duration::from_millis(cfg.ttl_ms)),
            flight: single_flight::SingleFlight::default(),
            backend,
            cfg: cfg.clone(),
        })))
    }

    pub fn ttl(&self) -> Duration {
        Duration::from_millis(self.cfg.ttl_ms)
    }

    pub fn single_flight_wait(&self) -> Duration {
        Duration::from_millis(self.cfg.single_flight_wait_ms)
    }

    /// Decides for one request whose body `analyze` already accepted.
    /// `tenant` is the API key's name when `[auth]` is on: the scope then,
    /// instead of the credential headers.
    pub fn plan(
        &self,
        head: &RequestHead,
        buf: &[u8],
        path: &str,
        a: &Analyzed<'_>,
        body: &[u8],
        tenant: Option<&str>,
    ) -> Plan {
        let p = self.decide(head, buf, path, a, body, tenant);
        match p {
            Plan::Bypass(why) => {
                metrics::counter!(m::CACHE_REQUESTS, "result" => "bypass", "reason" => why)
                    .increment(1)
            }
            Plan::Use { lookup: false, .. } => {
                metrics::counter!(m::CACHE_REQUESTS, "result" => "bypass", "reason" => "no_cache")
                    .increment(1)
            }
            _ => {}
        }
        p
    }

    fn decide(
        &self,
        head: &RequestHead,
        buf: &[u8],
        path: &str,
        a: &Analyzed<'_>,
        body: &[u8],
        tenant: Option<&str>,
    ) -> Plan {
        if head.method(buf) != "POST"
            || !matches!(
                a.endpoint,
                Endpoint::Completions | Endpoint::ChatCompletions
            )
        {
            // Not an answer the cache could hold (models list, health, embeddings
            // for now): no header and no count, like with the cache off.
            return Plan::Off;
        }
        let (no_cache, no_store) = cache_control(head, buf);
        if no_store {
            return Plan::Bypass("no_store");
        }
        let f = &a.fields;
        let mode = f
            .model
            .and_then(|m| self.cfg.models.get(m))
            .copied()
            .unwrap_or(self.cfg.mode);
        let deterministic =
            f.is_deterministic() || (self.cfg.greedy_by_default && f.temperature.is_none());
        match mode {
            CacheMode::Off => return Plan::Bypass("model"),
            CacheMode::Deterministic if !deterministic => return Plan::Bypass("sampled"),
            _ => {}
        }
        if f.n.is_some_and(|n| n > 1) {
            return Plan::Bypass("n");
        }
        // With API keys on, the key's name: one key's answers are found again
        // by that key whichever header carried it, and never by another.
        // Else every credential header a replica or a gateway in front of it
        // may read (OpenAI's Authorization, Anthropic/Azure-style api keys);
        // requests without any share the anonymous scope. The two kinds never
        // collide: a header scope holds NUL bytes (its u32 lengths), a key
        // name never does.
        let mut scope_buf = Vec::new();
        if let (false, Some(name)) = (self.cfg.shared, tenant) {
            scope_buf.push(b'k');
            scope_buf.extend_from_slice(name.as_bytes());
        } else if !self.cfg.shared {
            for name in TENANT_HEADERS {
                let v = head.header(buf, name).unwrap_or(b"");
                scope_buf.extend_from_slice(&(v.len() as u32).to_le_bytes());
                scope_buf.extend_from_slice(v);
            }
        }
        let scope = (!self.cfg.shared).then_some(&scope_buf[..]);
        let Ok((key, facts)) = key::cache_key(path, scope, body) else {
            return Plan::Bypass("body");
        };
        if facts.logprobs && !self.cfg.allow_logprobs {
            return Plan::Bypass("logprobs");
        }
        Plan::Use {
            key,
            delivery: Delivery::of(f.stream, f.include_usage),
            lookup: !no_cache,
        }
    }

    /// A local entry answering this mode of request.
    pub fn get_local(&self, key: u128, delivery: Delivery) -> Option<Arc<Entry>> {
        self.store.get(key).filter(|e| e.delivery == delivery)
    }

    /// The backend's entry, copied into memory when found.
    pub async fn get_backend(&self, key: u128, delivery: Delivery) -> Option<Arc<Entry>> {
        let raw = self.backend.as_ref()?.get(key).await?;
        let Some(e) = Entry::decode(&raw) else {
            metrics::counter!(m::CACHE_BACKEND_ERRORS, "op" => "decode").increment(1);
            return None;
        };
        if e.weight() as u64 > self.cfg.max_entry_bytes {
            return None;
        }
        let e = Arc::new(e);
        self.store.insert(key, e.clone());
        (e.delivery == delivery).then_some(e)
    }

    /// Stores a complete answer locally (and, through `spawn`, in the backend).
    pub fn insert(self: &Arc<Self>, key: u128, e: Arc<Entry>) {
        if e.weight() as u64 > self.cfg.max_entry_bytes {
            return;
        }
        metrics::counter!(m::CACHE_STORES).increment(1);
        self.store.insert(key, e.clone());
        if self.backend.is_some() {
            let me = self.clone();
            // After the client has its answer, off the request's path.
            tokio::task::spawn_local(async move {
                if let Some(b) = &me.backend {
                    b.set(key, &e.encode(), me.ttl()).await;
                }
            });
        }
    }

    /// Memory, then the backend, then the single flight. A miss may carry the
    /// flight: the caller goes upstream and identical requests wait until it drops.
    pub async fn lookup(&self, key: u128, delivery: Delivery) -> Lookup<'_> {
        let hit = |source: &'static str| {
            metrics::counter!(m::CACHE_REQUESTS, "result" => "hit", "source" => source)
                .increment(1);
        };
        let miss = || metrics::counter!(m::CACHE_REQUESTS, "result" => "miss").increment(1);
        if let Some(e) = self.get_local(key, delivery) {
            hit("memory");
            return Lookup::Hit(e);
        }
        if let Some(e) = self.get_backend(key, delivery).await {
            hit("backend");
            return Lookup::Hit(e);
        }
        match self.flight.join(key) {
            single_flight::Role::Leader(f) => {
                // The previous leader may have stored between the lookup and the join.
                if let Some(e) = self.get_local(key, delivery) {
                    hit("memory");
                    return Lookup::Hit(e);
                }
                miss();
                Lookup::Miss(Some(f))
            }
            single_flight::Role::Wait(rx) => {
                let done = single_flight::wait(rx, self.single_flight_wait()).await;
                if let Some(e) = self.get_local(key, delivery) {
                    metrics::counter!(m::CACHE_SF_WAITS, "result" => "hit").increment(1);
                    hit("single_flight");
                    return Lookup::Hit(e);
                }
                let why = if done { "fallthrough" } else { "timeout" };
                metrics::counter!(m::CACHE_SF_WAITS, "result" => why).increment(1);
                miss();
                Lookup::Miss(None)
            }
        }
    }

    /// Gauges refreshed at scrape time.
    pub fn export_gauges(&self) {
        let (bytes, entries) = self.store.usage();
        metrics::gauge!(m::CACHE_BYTES).set(bytes as f64);
        metrics::gauge!(m::CACHE_ENTRIES).set(entries as f64);
        metrics::gauge!(m::CACHE_IN_FLIGHT).set(self.flight.len() as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::parse_request_head;
    use crate::prefix::{analyze, PrefixConfig};

    fn plan_of(cfg: &PredictionCacheConfig, headers: &str, body: &str) -> Plan {
        plan_for(cfg, headers, body, None)
    }

    fn plan_for(
        cfg: &PredictionCacheConfig,
        headers: &str,
        body: &str,
        tenant: Option<&str>,
    ) -> Plan {
        let c = PredictionCache::new(&PredictionCacheConfig {
            enabled: true,
            ..cfg.clone()
        })
        .unwrap()
        .unwrap();
        let raw = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: k\r\n{headers}Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let buf = raw.into_bytes();
        let head = parse_request_head(&buf, 1 << 16, 100).unwrap().unwrap();
        let body = &buf[head.len..];
        let a = analyze("/v1/chat/completions", body, &PrefixConfig::default()).unwrap();
        c.plan(&head, &buf, "/v1/chat/completions", &a, body, tenant)
    }

    fn used(p: Plan) -> bool {
        matches!(p, Plan::Use { lookup: true, .. })
    }

    #[test]
    fn cacheability_rules() {
        let d = PredictionCacheConfig::default();
        let m = r#""model":"m","messages":[{"role":"user","content":"x"}]"#;
        assert!(used(plan_of(&d, "", &format!("{{{m},\"temperature\":0}}"))));
        assert!(used(plan_of(
            &d,
            "",
            &format!("{{{m},\"temperature\":1,\"seed\":3}}")
        )));
        assert_eq!(
            plan_of(&d, "", &format!("{{{m},\"temperature\":1}}")),
            Plan::Bypass("sampled")
        );
        // Absent temperature: sampled unless the engine is known to default to greedy.
        assert_eq!(
            plan_of(&d, "", &format!("{{{m}}}")),
            Plan::Bypass("sampled")
        );
        let greedy = PredictionCacheConfig {
            greedy_by_default: true,
            ..d.clone()
        };
        assert!(used(plan_of(&greedy, "", &format!("{{{m}}}"))));
        assert_eq!(
            plan_of(&d, "", &format!("{{{m},\"temperature\":0,\"n\":2}}")),
            Plan::Bypass("n")
        );
        let lp = format!("{{{m},\"temperature\":0,\"logprobs\":true}}");
        assert_eq!(plan_of(&d, "", &lp), Plan::Bypass("logprobs"));
        let allow = PredictionCacheConfig {
            allow_logprobs: true,
            ..d.clone()
        };
        assert!(used(plan_of(&allow, "", &lp)));

        let per_model = PredictionCacheConfig {
            models: [
                ("m".to_string(), CacheMode::Always),
                ("off".to_string(), CacheMode::Off),
            ]
            .into_iter()
            .collect(),
            ..d.clone()
        };
        assert!(used(plan_of(
            &per_model,
            "",
            &format!("{{{m},\"temperature\":1}}")
        )));
        let off = r#"{"model":"off","temperature":0,"messages":[]}"#;
        assert_eq!(plan_of(&per_model, "", off), Plan::Bypass("model"));

        let det = format!("{{{m},\"temperature\":0}}");
        assert!(matches!(
            plan_of(&d, "Cache-Control: max-age=0, No-Cache\r\n", &det),
            Plan::Use { lookup: false, .. }
        ));
        assert_eq!(
            plan_of(&d, "cache-control: no-store\r\n", &det),
            Plan::Bypass("no_store")
        );
    }

    #[test]
    fn tenants_split_unless_shared() {
        let d = PredictionCacheConfig::default();
        let body = r#"{"model":"m","temperature":0,"messages":[]}"#;
        let key = |cfg: &PredictionCacheConfig, h: &str| match plan_of(cfg, h, body) {
            Plan::Use { key, .. } => key,
            p => panic!("{p:?}"),
        };
        let anon = key(&d, "");
        let a = key(&d, "Authorization: Bearer a\r\n");
        let b = key(&d, "Authorization: Bearer b\r\n");
        let x = key(&d, "x-api-key: a\r\n");
        assert!(anon != a && a != b && a != x && anon != x);
        let shared = PredictionCacheConfig {
            shared: true,
            ..d.clone()
        };
        assert_eq!(
            key(&shared, "Authorization: Bearer a\r\n"),
            key(&shared, "Authorization: Bearer b\r\n")
        );
        // With API keys, the key's name is the tenant, whatever header carried it.
        let by_key =
            |cfg: &PredictionCacheConfig, h: &str, t: &str| match plan_for(cfg, h, body, Some(t)) {
                Plan::Use { key, .. } => key,
                p => panic!("{p:?}"),
            };
        let alice = by_key(&d, "Authorization: Bearer sk-1\r\n", "alice");
        assert_eq!(alice, by_key(&d, "x-api-key: sk-1\r\n", "alice"));
        assert_ne!(alice, by_key(&d, "Authorization: Bearer sk-1\r\n", "bob"));
        assert!(alice != anon && alice != a);
        assert_eq!(
            by_key(&shared, "", "alice"),
            by_key(&shared, "", "bob"),
            "shared: across keys too"
        );
    }

    #[test]
    fn config_is_validated() {
        let ok = PredictionCacheConfig::default();
        ok.validate().unwrap();
        let e = PredictionCacheConfig {
            max_entry_bytes: ok.max_bytes + 1,
            ..ok.clone()
        };
        assert!(e
            .validate()
            .unwrap_err()
            .to_string()
            .contains("max_entry_bytes"));
        let e = PredictionCacheConfig {
            backend: Some("http://x".into()),
            ..ok
        };
        assert!(e
            .validate()
            .unwrap_err()
            .to_string()
            .contains("prediction_cache.backend"));
    }
}
