//! The admin listener: a few JSON/text endpoints on a Unix socket or loopback TCP,
//! served by the main thread's runtime so it never competes with the workers.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{ReplicaState, ReplicasUpdate, State, WorkerState};
use crate::config::AdminAddr;
use crate::metrics as m;
use crate::server::Shared;

pub enum AdminListener {
    Unix(tokio::net::UnixListener),
    Tcp(tokio::net::TcpListener),
}

const MAX_ADMIN_BODY: usize = 4 << 20;

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
            if shared.draining.load(Ordering::Relaxed) {
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
                match shared.table.replace(u.replicas) {
                    Ok(set) => {
                        shared.router.on_replicas_changed(&set);
                        tracing::info!(
                            replicas = count,
                            generation = set.generation,
                            "replica set replaced"
                        );
                        json(200, &state(shared))
                    }
                    Err(e) => json_error(400, &e.to_string()),
                }
            }
            Err(e) => json_error(400, &format!("invalid replica update: {e}")),
        },
        (_, "/healthz" | "/metrics" | "/state" | "/replicas") => {
            json_error(405, "method not allowed")
        }
        _ => json_error(404, "no such admin endpoint"),
    }
}

/// Gauges read from atomics at scrape time rather than updated per request.
fn refresh_gauges(shared: &Shared) {
    for r in &shared.table.load().replicas {
        let url = r.spec.url.clone();
        metrics::gauge!(m::IN_FLIGHT, "replica" => url.clone()).set(r.in_flight() as f64);
        metrics::gauge!(m::REPLICA_HEALTHY, "replica" => url).set(if r.is_available() {
            1.0
        } else {
            0.0
        });
    }
    for (i, w) in shared.workers.iter().enumerate() {
        metrics::gauge!(m::CONNECTIONS, "worker" => i.to_string())
            .set(w.connections.load(Ordering::Relaxed) as f64);
    }
}

pub fn state(shared: &Shared) -> State {
    let set = shared.table.load();
    State {
        version: env!("CARGO_PKG_VERSION").into(),
        policy: shared.router.name().into(),
        io: crate::server::io_name(shared).into(),
        generation: set.generation,
        draining: shared.draining.load(Ordering::Relaxed),
        workers: shared
            .workers
            .iter()
            .enumerate()
            .map(|(id, w)| WorkerState {
                id,
                connections: w.connections.load(Ordering::Relaxed),
                active_requests: w.active_requests.load(Ordering::Relaxed),
                requests_total: w.requests.load(Ordering::Relaxed),
            })
            .collect(),
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
                requests_total: r.requests.load(Ordering::Relaxed),
                failures_total: r.failures.load(Ordering::Relaxed),
                external_load: r.external_load(),
            })
            .collect(),
        steering: shared.steering.state(),
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
