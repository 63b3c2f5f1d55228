//! The admin listener: a few JSON/text endpoints on a Unix socket or loopback TCP,
//! served by the main thread's runtime so it never competes with the workers.

// Reports on the whole process (`/state`, `/metrics`) and acts on it (`/drain`).
#![allow(clippy::disallowed_types)]

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{
    ClearApplied, ClearRequest, HotPrefixes, LoadApplied, LoadUpdate, PushRecord, ReplicaState,
    ReplicasUpdate, State, WorkerState,
};
use crate::config::AdminAddr;
use crate::metrics as m;
use crate::state::Shared;

pub enum AdminListener {
    Unix(tokio::net::UnixListener),
    Tcp(tokio::net::TcpListener),
}

const MAX_ADMIN_BODY: usize = 4 << 20;

/// Distinct pusher names remembered in `last_push.sources`.
const MAX_SOURCES: usize = 16;

/// Most hot prefixes one `GET /hot-prefixes` returns, whatever the caller asks.
const MAX_HOT_PREFIXES: usize = 256;

/// What the admin API remembers about its callers: who pushed last, and clears
/// per replica URL. Process-wide rather than in `Shared` so these additions stay
/// inside the admin module; one process serves one admin API.
#[derive(Default)]
struct AdminLog {
    last_push: Option<PushRecord>,
    pushes_total: u64,
    sources: Vec<String>,
    clears: HashMap<String, u64>,
}

static ADMIN_LOG: Mutex<Option<AdminLog>> = Mutex::new(None);

fn with_log<T>(f: impl FnOnce(&mut AdminLog) -> T) -> T {
    let mut g = ADMIN_LOG.lock().unwrap_or_else(|e| e.into_inner());
    f(g.get_or_insert_with(AdminLog::default))
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub async fn bind(addr: &AdminAddr) -> io::Result<AdminListener> {
    match addr {
        AdminAddr::Tcp(a) => Ok(AdminListener::Tcp(tokio::net::TcpListener::bind(a).await?)),
        AdminAddr::Unix(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            // A socket file left by a crashed process blocks bind; one that still
            // answers belongs to a live kvroute and must not be stolen.
            if path.exists() {
                if tokio::net::UnixStream::connect(path).await.is_ok() {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        "another process serves this admin socket",
                    ));
                }
                std::fs::remove_file(path)?;
            }
            let l = tokio::net::UnixListener::bind(path)?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
            Ok(AdminListener::Unix(l))
        }
    }
}

/// An upgrade's successor's admin listener: the old process still holds the
/// address until it exits, so bind as soon as it is free, for up to `within`.
pub async fn serve_once_free(addr: AdminAddr, within: Duration, shared: Arc<Shared>) {
    let until = std::time::Instant::now() + within;
    loop {
        match bind(&addr).await {
            Ok(l) => {
                tracing::info!(admin = ?addr, "upgrade: admin API taken over");
                serve(l, shared).await;
                return;
            }
            Err(e) if std::time::Instant::now() > until => {
                tracing::error!(admin = ?addr, error = %e, "upgrade: admin address never freed");
                return;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

pub async fn serve(l: AdminListener, shared: Arc<Shared>) {
    loop {
        let shared = shared.clone();
        match &l {
            AdminListener::Tcp(t) => match t.accept().await {
                Ok((s, _)) => {
                    tokio::spawn(handle(s, shared));
                }
                Err(e) => accept_error(e).await,
            },
            AdminListener::Unix(u) => match u.accept().await {
                Ok((s, _)) => {
                    tokio::spawn(handle(s, shared));
                }
                Err(e) => accept_error(e).await,
            },
        }
    }
}

async fn accept_error(e: io::Error) {
    tracing::warn!(error = %e, "admin accept failed");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

async fn handle<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, shared: Arc<Shared>) {
    let resp = match timeout_read(&mut s).await {
        Ok((method, path, body)) => route(&shared, &method, &path, &body),
        Err(msg) => json_error(400, msg),
    };
    let _ = s.write_all(&resp).await;
    let _ = s.shutdown().await;
}

/// Reads one request (head + Content-Length body) within 5 s.
async fn timeout_read<S: AsyncRead + Unpin>(
    s: &mut S,
) -> Result<(String, String, Vec<u8>), &'static str> {
    tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = Vec::with_capacity(4096);
        let head_len = loop {
            if let Some(end) = crate::http::find_head_end(&buf) {
                break end;
            }
            if buf.len() > 64 * 1024 {
                return Err("request head too large");
            }
            if s.read_buf(&mut buf).await.map_err(|_| "read failed")? == 0 {
                return Err("connection closed");
            }
        };
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        req.parse(&buf[..head_len])
            .map_err(|_| "malformed request")?;
        let method = req.method.unwrap_or("").to_string();
        let path = req.path.unwrap_or("").to_string();
        let len = req
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .and_then(|h| {
                std::str::from_utf8(h.value)
                    .ok()?
                    .trim()
                    .parse::<usize>()
                    .ok()
            })
            .unwrap_or(0);
        if len > MAX_ADMIN_BODY {
            return Err("body too large");
        }
        while buf.len() < head_len + len {
            if s.read_buf(&mut buf).await.map_err(|_| "read failed")? == 0 {
                return Err("connection closed inside body");
            }
        }
        Ok((method, path, buf[head_len..head_len + len].to_vec()))
    })
    .await
    .map_err(|_| "request timeout")?
}

fn route(shared: &Shared, method: &str, path: &str, body: &[u8]) -> Vec<u8> {
    match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/healthz") => {
            if shared.drain.is_draining() {
                response(503, "text/plain", b"draining\n")
            } else {
                response(200, "text/plain", b"ok\n")
            }
        }
        ("GET", "/metrics") => {
            refresh_gauges(shared);
            let text = m::install().render();
            response(200, "text/plain; version=0.0.4", text.as_bytes())
        }
        ("GET", "/state") => json(200, &state(shared)),
        ("PUT", "/replicas") => match serde_json::from_slice::<ReplicasUpdate>(body) {
            Ok(u) => {
                let count = u.replicas.len();
                let resolved = crate::resolve::replicas(&shared.table.load(), u.replicas);
                match resolved.and_then(|r| Ok(shared.table.replace(r)?)) {
                    Ok(set) => {
                        shared.router.on_replicas_changed(&set);
                        let source = u.source.unwrap_or_else(|| "unknown".into());
                        let fight = with_log(|log| {
                            log.pushes_total += 1;
                            if !log.sources.contains(&source) {
                                // Bounded: a pusher that invents a name per push
                                // must not grow the state without limit.
                                if log.sources.len() >= MAX_SOURCES {
                                    log.sources.remove(0);
                                }
                                log.sources.push(source.clone());
                            }
                            let fight = log.last_push.as_ref().is_some_and(|p| p.source != source);
                            log.last_push = Some(PushRecord {
                                source: source.clone(),
                                at_unix_ms: unix_ms(),
                                generation: set.generation,
                                pushes_total: log.pushes_total,
                                sources: log.sources.clone(),
                            });
                            fight
                        });
                        if fight {
                            tracing::warn!(
                                %source,
                                "replica set pushed by a different source than last time: \
                                 run one control daemon per data-plane set"
                            );
                        }
                        tracing::info!(
                            replicas = count,
                            generation = set.generation,
                            %source,
                            "replica set replaced"
                        );
                        json(200, &state(shared))
                    }
                    Err(e) => json_error(400, &e.to_string()),
                }
            }
            Err(e) => json_error(400, &format!("invalid replica update: {e}")),
        },
        ("PUT", "/load") => match serde_json::from_slice::<LoadUpdate>(body) {
            Ok(u) => {
                let set = shared.table.load();
                let mut applied = LoadApplied {
                    applied: 0,
                    unknown: 0,
                    generation: set.generation,
                };
                for l in &u.loads {
                    match set.replicas.iter().find(|r| r.spec.url == l.url) {
                        Some(r) => {
                            r.set_external_load(l.external());
                            applied.applied += 1;
                        }
                        None => applied.unknown += 1,
                    }
                }
                json(200, &applied)
            }
            Err(e) => json_error(400, &format!("invalid load update: {e}")),
        },
        ("POST", "/replicas/clear") => match serde_json::from_slice::<ClearRequest>(body) {
            Ok(c) => {
                let set = shared.table.load();
                match set.replicas.iter().find(|r| r.spec.url == c.url) {
                    Some(r) => {
                        shared.router.on_replica_cleared(r.slot);
                        let clears_total = with_log(|log| {
                            let n = log.clears.entry(c.url.clone()).or_insert(0);
                            *n += 1;
                            *n
                        });
                        tracing::info!(
                            replica = %c.url,
                            slot = r.slot,
                            reason = c.reason.as_deref().unwrap_or("unspecified"),
                            "replica KV cache cleared"
                        );
                        json(
                            200,
                            &ClearApplied {
                                url: c.url,
                                slot: r.slot,
                                clears_total,
                            },
                        )
                    }
                    None => json_error(404, &format!("no replica with url {}", c.url)),
                }
            }
            Err(e) => json_error(400, &format!("invalid clear request: {e}")),
        },
        ("GET", "/hot-prefixes") => {
            let limit = query_param(path, "limit")
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(32)
                .min(MAX_HOT_PREFIXES);
            json(
                200,
                &HotPrefixes {
                    prefixes: {
                        // The router's own list first (a policy may know better);
                        // else what the proxy sampled from request bodies.
                        let from_router = shared.router.hot_prefixes(limit);
                        if from_router.is_empty() {
                            shared.hot.top(limit)
                        } else {
                            from_router
                        }
                    },
                },
            )
        }
        (_, "/healthz" | "/metrics" | "/state" | "/replicas" | "/load" | "/replicas/clear")
        | (_, "/hot-prefixes") => json_error(405, "method not allowed"),
        _ => json_error(404, "no such admin endpoint"),
    }
}

fn query_param<'a>(path: &'a str, name: &str) -> Option<&'a str> {
    path.split_once('?')?
        .1
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Gauges read from atomics at scrape time rather than updated per request.
fn refresh_gauges(shared: &Shared) {
    if let Some(st) = shared.router.scrape(&shared.table.load()) {
        m::export_router_stats(&st);
    }
    metrics::gauge!(m::QUEUE_DEPTH).set(shared.admission.depth() as f64);
    if let Some(c) = &shared.cache {
        c.export_gauges();
    }
    for r in &shared.table.load().replicas {
        let url = r.spec.url.clone();
        metrics::gauge!(m::IN_FLIGHT, "replica" => url.clone()).set(r.in_flight() as f64);
        metrics::gauge!(m::PENDING_PREFILL, "replica" => url.clone())
            .set(r.pending_prefill() as f64);
        metrics::gauge!(m::REPLICA_HEALTHY, "replica" => url.clone()).set(if r.is_available() {
            1.0
        } else {
            0.0
        });
        let ejected = r.ejection.is_ejected(shared.now_ms());
        metrics::gauge!(m::REPLICA_EJECTED, "replica" => url.clone())
            .set(f64::from(u8::from(ejected)));
        metrics::counter!(m::REPLICA_EJECTIONS, "replica" => url).absolute(r.ejection.total());
    }
    let mut by_state = [0u64; 3];
    for (i, w) in shared.workers.iter().enumerate() {
        metrics::gauge!(m::CONNECTIONS, "worker" => i.to_string())
            .set(w.connections.load(Ordering::Relaxed) as f64);
        by_state[0] += w.states.reading_head.load(Ordering::Relaxed);
        by_state[1] += w.states.idle.load(Ordering::Relaxed);
        by_state[2] += w.states.active.load(Ordering::Relaxed);
    }
    for (state, n) in ["reading_head", "idle", "active"].into_iter().zip(by_state) {
        metrics::gauge!(m::CONNECTIONS_BY_STATE, "state" => state).set(n as f64);
    }
}

pub fn state(shared: &Shared) -> State {
    let set = shared.table.load();
    State {
        version: env!("CARGO_PKG_VERSION").into(),
        policy: shared.router.name().into(),
        io: crate::state::io_name(shared).into(),
        generation: set.generation,
        draining: shared.drain.is_draining(),
        workers: shared
            .workers
            .iter()
            .enumerate()
            .map(|(id, w)| WorkerState {
                id,
                connections: w.connections.load(Ordering::Relaxed),
                active_requests: w.active_requests.load(Ordering::Relaxed),
                requests_total: w.requests.load(Ordering::Relaxed),
                reading_head: w.states.reading_head.load(Ordering::Relaxed),
                idle: w.states.idle.load(Ordering::Relaxed),
                active: w.states.active.load(Ordering::Relaxed),
            })
            .collect(),
        queue_depth: shared.admission.depth(),
        replicas: set
            .replicas
            .iter()
            .map(|r| ReplicaState {
                url: r.spec.url.clone(),
                slot: r.slot,
                models: r.spec.models.clone(),
                pool: r.spec.pool,
                healthy: r.healthy.load(Ordering::Relaxed),
                in_flight: r.in_flight(),
                max_in_flight: r.max_in_flight,
                pending_prefill_bytes: r.pending_prefill(),
                requests_total: r.requests.load(Ordering::Relaxed),
                failures_total: r.failures.load(Ordering::Relaxed),
                last_error: r.last_error.load_full().map(|e| e.to_string()),
                external_load: r.external_load(),
                clears_total: with_log(|log| log.clears.get(&r.spec.url).copied().unwrap_or(0)),
                kv_blocks: r.spec.kv_blocks,
                kv_block_tokens: r.spec.kv_block_tokens,
                kv_slots: r.spec.kv_slots,
                kv_slot_tokens: r.spec.kv_slot_tokens,
                kv_host_tokens: r.spec.kv_host_tokens,
                learned: shared.router.learned(r.slot),
                ejection: r.ejection.state(shared.now_ms()),
            })
            .collect(),
        steering: shared.steering.state(),
        last_push: with_log(|log| log.last_push.clone()),
        connection_budget: Some(shared.budget),
    }
}

fn response(status: u16, ctype: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        crate::http::reason_phrase(status),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

fn json<T: serde::Serialize>(status: u16, v: &T) -> Vec<u8> {
    response(
        status,
        "application/json",
        &serde_json::to_vec(v).unwrap_or_default(),
    )
}

fn json_error(status: u16, message: &str) -> Vec<u8> {
    json(
        status,
        &serde_json::json!({"error": {"message": message, "type": "invalid_request_error", "code": status}}),
    )
}
