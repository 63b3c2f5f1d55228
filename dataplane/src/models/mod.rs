//! `GET /v1/models` and `GET /v1/models/{id}`, answered by the data plane from
//! the whole fleet instead of forwarded to one replica (which would list only
//! that replica's models, a different list per call in a mixed fleet).
//!
//! Each available replica is asked for its own `/v1/models` (concurrently, each
//! within [`FETCH_TIMEOUT`]), and the answers are merged by [`merge::merge`]:
//! the union deduplicated by `id`, each object as a replica that serves it sent
//! it. A replica that fails or answers garbage is left out; with no answer at
//! all the route is a 503 in OpenAI's error shape.

mod fetch;
pub mod merge;

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Write as _;
use std::rc::Rc;
use std::time::{Duration, Instant};

use xxhash_rust::xxh3::xxh3_128;

use crate::http::{ErrorKind, ErrorResponse, RequestHead};
use crate::io::Runtime;
use crate::metrics as m;
use crate::replica::ReplicaSet;
use crate::worker::WorkerCtx;
use merge::{Fleet, Listing};

/// How long one worker reuses a merged list. Chat UIs and SDKs poll
/// `/v1/models` (on every page load, every few seconds), and each miss costs
/// one request to every replica; a second bounds that to one fan-out per
/// second per worker and credential set, while a list a second old is as good
/// as a fresh one: replicas gain or lose models rarely (a LoRA adapter loaded),
/// and a change of the replica set itself (added, removed, health flipped by
/// the control daemon) starts a new generation, which is never served from an
/// older one's entry. Per worker, so the cache needs no lock; concurrent
/// requests on one worker share one fan-out.
pub const TTL: Duration = Duration::from_secs(1);

/// How long a replica has to answer its own `/v1/models` before it is left
/// out: a listing is a lookup, never GPU work, so a replica that takes longer
/// is overloaded or gone, and the client waits at most this long.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(1);

/// Credential sets one worker keeps a list for (see [`Credentials`]).
const MAX_SCOPES: usize = 64;

/// The `replica` label (slot, name) of requests answered from the fleet.
pub const METRICS_REPLICA: (u16, &str) = (u16::MAX - 2, "fleet");

/// A request the fleet answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    /// `GET /v1/models`
    List,
    /// `GET /v1/models/{id}`, the id percent-decoded (ids such as
    /// `meta-llama/Llama-3.1-8B` contain slashes, which clients may encode).
    Model(String),
}

impl Query {
    /// The query a request is, or `None` when it is forwarded like any other
    /// (another method, another path).
    pub fn of(method: &str, path: &str) -> Option<Query> {
        if method != "GET" && method != "HEAD" {
            return None;
        }
        let path = path.split('?').next().unwrap_or("");
        match path.strip_prefix("/v1/models")? {
            "" | "/" => Some(Query::List),
            rest => {
                let id = percent_encoding::percent_decode_str(rest.strip_prefix('/')?)
                    .decode_utf8_lossy()
                    .into_owned();
                Some(Query::Model(id))
            }
        }
    }
}

/// The credential headers a forwarded request would carry: the client's (but
/// those `[auth]` keeps back) and `[upstream] api_key`, passed on to the
/// replicas so one that requires an API key answers as it would to the
/// request. Lists are cached per credential set, so one client's list is never
/// another's answer; with `[auth]` on, each key's list is then filtered down
/// to the models it may use.
pub struct Credentials {
    scope: u128,
    lines: Rc<[u8]>,
}

impl Credentials {
    pub fn of(head: &RequestHead, buf: &[u8], fwd: &crate::auth::Forwarding) -> Credentials {
        let mut lines = Vec::new();
        for name in crate::cache::TENANT_HEADERS {
            if fwd.drops(name) {
                continue;
            }
            if let Some(v) = head.header(buf, name) {
                lines.extend_from_slice(name.as_bytes());
                lines.extend_from_slice(b": ");
                lines.extend_from_slice(v);
                lines.extend_from_slice(b"\r\n");
            }
        }
        lines.extend_from_slice(fwd.lines());
        Credentials {
            scope: xxh3_128(&lines),
            lines: lines.into(),
        }
    }
}

/// One worker's merged lists, one per credential set.
#[derive(Default)]
pub struct ModelsCache {
    scopes: RefCell<HashMap<u128, Rc<Entry>>>,
}

/// A merged list of one replica-set generation: being fetched (empty cell,
/// joined by every request that arrives meanwhile) or fetched at an instant.
struct Entry {
    generation: u64,
    merged: tokio::sync::OnceCell<(Instant, Rc<Fleet>)>,
}

impl Entry {
    fn usable(&self, generation: u64, now: Instant) -> bool {
        self.generation == generation
            && self
                .merged
                .get()
                .is_none_or(|(at, _)| now.saturating_duration_since(*at) < TTL)
    }
}

impl ModelsCache {
    /// The entry to answer `scope` from: the current one, or a new empty one.
    fn entry(&self, scope: u128, generation: u64, now: Instant) -> Rc<Entry> {
        let mut map = self.scopes.borrow_mut();
        if let Some(e) = map.get(&scope).filter(|e| e.usable(generation, now)) {
            return e.clone();
        }
        map.retain(|_, e| e.usable(generation, now));
        if map.len() >= MAX_SCOPES {
            map.clear();
        }
        let e = Rc::new(Entry {
            generation,
            merged: tokio::sync::OnceCell::new(),
        });
        map.insert(scope, e.clone());
        e
    }
}

/// Answers `query` from the fleet: the complete response and its status.
/// `caller` sees only the models its API key may use (others are not found).
pub async fn answer<R: Runtime>(
    ctx: &WorkerCtx<R>,
    query: &Query,
    credentials: Credentials,
    caller: &crate::auth::Caller,
    keep_alive: bool,
    is_head: bool,
) -> (Vec<u8>, u16) {
    let set = ctx.shared.table.load();
    let entry = ctx
        .models
        .entry(credentials.scope, set.generation, Instant::now());
    let fleet = entry
        .merged
        .get_or_init(|| async {
            let fleet = fetch_fleet::<R>(&set, credentials.lines, &ctx.shared.upstream_tls).await;
            (Instant::now(), Rc::new(fleet))
        })
        .await
        .1
        .clone();
    let (out, status, error) = render(&fleet, query, &|m| caller.may_use(m), keep_alive, is_head);
    if let Some(kind) = error {
        metrics::counter!(m::ERRORS, "kind" => kind.code()).increment(1);
    }
    (out, status)
}

/// Asks every available replica at once and merges the answers.
async fn fetch_fleet<R: Runtime>(
    set: &ReplicaSet,
    credentials: Rc<[u8]>,
    upstream_tls: &std::sync::Arc<rustls::ClientConfig>,
) -> Fleet {
    let available: Vec<_> = set.replicas.iter().filter(|r| r.is_available()).collect();
    // Local tasks on this worker's runtime; dropped (aborted) with the set.
    let mut tasks = tokio::task::JoinSet::new();
    for (i, r) in available.iter().enumerate() {
        let target = fetch::Target {
            addr: r.addr,
            authority: r.authority.clone(),
            tls: r.tls.clone().map(|n| (n, upstream_tls.clone())),
        };
        let credentials = credentials.clone();
        tasks.spawn_local(async move {
            (
                i,
                fetch::fetch::<R>(target, credentials, FETCH_TIMEOUT).await,
            )
        });
    }
    let mut listings = vec![Listing::Failed; available.len()];
    while let Some(done) = tasks.join_next().await {
        if let Ok((i, listing)) = done {
            listings[i] = listing;
        }
    }
    for (r, l) in available.iter().zip(&listings) {
        if *l == Listing::Failed {
            tracing::debug!(replica = %r.spec.url, "no usable /v1/models answer; left out of the list");
        }
    }
    merge::merge(
        available
            .iter()
            .map(|r| r.spec.models.as_slice())
            .zip(listings),
    )
}

/// The response to `query` given what the fleet serves (of it, only the models
/// `visible` passes), its status, and the error it is, if one.
fn render(
    fleet: &Fleet,
    query: &Query,
    visible: &dyn Fn(&str) -> bool,
    keep_alive: bool,
    is_head: bool,
) -> (Vec<u8>, u16, Option<ErrorKind>) {
    let body = match (fleet, query) {
        (Fleet::Models(list), Query::List) => Ok(serde_json::json!({
            "object": "list",
            "data": list
                .iter()
                .filter(|m| visible(&m.id))
                .map(merge::Model::to_json)
                .collect::<Vec<_>>(),
        })),
        (Fleet::Models(_), Query::Model(id)) => match fleet.find(id).filter(|m| visible(&m.id)) {
            Some(model) => Ok(model.to_json()),
            None => Err((
                ErrorKind::ModelNotFound,
                format!("model {id:?} is not served here"),
            )),
        },
        (Fleet::Refused, _) => Err((
            ErrorKind::Unauthorized,
            "every replica refused the request's credentials".to_string(),
        )),
        (Fleet::NoReplica, _) => Err((
            ErrorKind::NoReplica,
            "no healthy replica answered /v1/models".to_string(),
        )),
    };
    let mut out = Vec::with_capacity(512);
    let (status, error) = match body {
        Ok(v) => {
            let body = serde_json::to_vec(&v).unwrap_or_default();
            let _ =
                write!(
                out,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{}\r\n",
                body.len(),
                if keep_alive { "" } else { "connection: close\r\n" }
            );
            out.extend_from_slice(&body);
            (200, None)
        }
        Err((kind, message)) => {
            ErrorResponse::write(&mut out, kind, &message, !keep_alive);
            (kind.status(), Some(kind))
        }
    };
    if is_head {
        if let Some(end) = crate::http::find_head_end(&out) {
            out.truncate(end);
        }
    }
    (out, status, error)
}

#[cfg(test)]
mod tests {
    use super::merge::Model;
    use super::*;

    #[test]
    fn queries_are_get_or_head_on_the_models_routes() {
        assert_eq!(Query::of("GET", "/v1/models"), Some(Query::List));
        assert_eq!(Query::of("HEAD", "/v1/models/?x=1"), Some(Query::List));
        assert_eq!(
            Query::of("GET", "/v1/models/meta-llama/Llama-3.1-8B"),
            Some(Query::Model("meta-llama/Llama-3.1-8B".into()))
        );
        assert_eq!(
            Query::of("GET", "/v1/models/org%2Fm%201?q"),
            Some(Query::Model("org/m 1".into()))
        );
        assert_eq!(Query::of("POST", "/v1/models"), None);
        assert_eq!(Query::of("DELETE", "/v1/models/ft-1"), None);
        assert_eq!(Query::of("GET", "/v1/modelsx"), None);
        assert_eq!(Query::of("GET", "/v1/completions"), None);
    }

    const ALL: &dyn Fn(&str) -> bool = &|_| true;

    #[test]
    fn a_key_sees_only_its_models() {
        let fleet = Fleet::Models(vec![Model::configured("m1"), Model::configured("m2")]);
        let only_m2: &dyn Fn(&str) -> bool = &|m| m == "m2";
        let (out, status, _) = render(&fleet, &Query::List, only_m2, true, false);
        let (_, v) = parts(&out);
        assert_eq!(status, 200);
        assert_eq!(v["data"].as_array().unwrap().len(), 1);
        assert_eq!(v["data"][0]["id"], "m2");
        let (out, status, err) = render(&fleet, &Query::Model("m1".into()), only_m2, true, false);
        assert_eq!((status, err), (404, Some(ErrorKind::ModelNotFound)));
        assert_eq!(parts(&out).1["error"]["code"], "model_not_found");
        let (_, status, _) = render(&fleet, &Query::Model("m2".into()), only_m2, true, false);
        assert_eq!(status, 200);
    }

    fn parts(out: &[u8]) -> (String, serde_json::Value) {
        let s = String::from_utf8(out.to_vec()).unwrap();
        let (head, body) = s.split_once("\r\n\r\n").unwrap();
        (head.to_string(), serde_json::from_str(body).unwrap())
    }

    #[test]
    fn renders_list_model_and_errors_in_openai_shape() {
        let fleet = Fleet::Models(vec![Model::configured("m1"), Model::configured("m2")]);
        let (out, status, err) = render(&fleet, &Query::List, ALL, true, false);
        assert_eq!((status, err), (200, None));
        let (head, v) = parts(&out);
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(!head.contains("connection: close"));
        assert_eq!(v["object"], "list");
        assert_eq!(v["data"][1]["id"], "m2");
        assert_eq!(v["data"][1]["object"], "model");

        let (out, status, _) = render(&fleet, &Query::Model("m2".into()), ALL, false, false);
        let (head, v) = parts(&out);
        assert_eq!(status, 200);
        assert!(head.contains("connection: close"));
        assert_eq!(v, Model::configured("m2").to_json());

        let (out, status, err) = render(&fleet, &Query::Model("m3".into()), ALL, true, false);
        assert_eq!((status, err), (404, Some(ErrorKind::ModelNotFound)));
        let (_, v) = parts(&out);
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["type"], "invalid_request_error");

        let (out, status, _) = render(&Fleet::NoReplica, &Query::List, ALL, true, false);
        assert_eq!(status, 503);
        assert_eq!(parts(&out).1["error"]["code"], "no_healthy_replica");
        let (out, status, _) = render(
            &Fleet::Refused,
            &Query::Model("m1".into()),
            ALL,
            true,
            false,
        );
        assert_eq!(status, 401);
        assert_eq!(parts(&out).1["error"]["code"], "invalid_api_key");
    }

    #[test]
    fn head_gets_the_get_head_without_body() {
        let fleet = Fleet::Models(vec![Model::configured("m1")]);
        let (get, _, _) = render(&fleet, &Query::List, ALL, true, false);
        let (head, _, _) = render(&fleet, &Query::List, ALL, true, true);
        assert!(head.ends_with(b"\r\n\r\n"));
        assert!(get.starts_with(&head) && get.len() > head.len());
    }

    #[test]
    fn cache_entries_expire_and_never_cross_generations_or_scopes() {
        let cache = ModelsCache::default();
        let t0 = Instant::now();
        let a = cache.entry(1, 7, t0);
        // Still being fetched: joined, whatever the time.
        assert!(Rc::ptr_eq(&a, &cache.entry(1, 7, t0 + TTL * 5)));
        a.merged
            .set((t0, Rc::new(Fleet::NoReplica)))
            .expect("empty cell");
        assert!(Rc::ptr_eq(&a, &cache.entry(1, 7, t0 + TTL / 2)));
        // Another credential set, another generation, or an old list: a new entry.
        assert!(!Rc::ptr_eq(&a, &cache.entry(2, 7, t0)));
        assert!(!Rc::ptr_eq(&a, &cache.entry(1, 8, t0)));
        let b = cache.entry(1, 7, t0);
        assert!(!Rc::ptr_eq(&a, &b), "generation 8 replaced it");
        b.merged.set((t0, Rc::new(Fleet::NoReplica))).unwrap();
        assert!(!Rc::ptr_eq(&b, &cache.entry(1, 7, t0 + TTL)));
        // Bounded however many credential sets come by.
        for s in 0..(3 * MAX_SCOPES as u128) {
            let e = cache.entry(s, 7, t0);
            let _ = e.merged.set((t0, Rc::new(Fleet::NoReplica)));
        }
        assert!(cache.scopes.borrow().len() <= MAX_SCOPES);
    }
}
