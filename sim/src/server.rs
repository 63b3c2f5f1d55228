//! The HTTP/1.1 layer: routes requests to the replica model and shapes OpenAI responses.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::body::SimBody;
use super::config::SimEngine;
use super::error::SimError;
use super::fault::{FaultMode, FaultRequest};
use super::llamacpp;
use super::metrics;
use super::replica::Replica;
use super::request::{Endpoint, SimRequest};
use super::response::{self, Meta};

/// Returned by the service to make hyper drop the connection without writing a response.
#[derive(Debug, thiserror::Error)]
#[error("injected connection reset")]
struct ResetConnection;

/// TCP stream that turns its close into an RST once a `reset` fault hit the connection.
struct ConnIo {
    stream: TcpStream,
    reset: Arc<AtomicBool>,
}

impl Drop for ConnIo {
    fn drop(&mut self) {
        if self.reset.load(Ordering::Relaxed) {
            // Zero linger makes close() send RST instead of FIN; it does not block.
            let _ = self.stream.set_zero_linger();
        }
    }
}

impl AsyncRead for ConnIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Accepts connections forever, one task per connection.
pub async fn serve(listener: TcpListener, replica: Arc<Replica>) -> io::Result<()> {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            // Out of descriptors and the like: keep serving the connections we have.
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let replica = Arc::clone(&replica);
        tokio::spawn(async move {
            let reset = Arc::new(AtomicBool::new(false));
            let io = ConnIo {
                stream,
                reset: Arc::clone(&reset),
            };
            let svc = service_fn(move |req| {
                let replica = Arc::clone(&replica);
                let reset = Arc::clone(&reset);
                async move {
                    let resp = handle(&replica, req).await;
                    if resp.is_none() {
                        reset.store(true, Ordering::Relaxed);
                    }
                    resp.ok_or(ResetConnection)
                }
            });
            // Errors here are clients going away or injected resets: nothing to report.
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(io), svc)
                .await;
        });
    }
}

/// `None` asks for the connection to be reset.
async fn handle(replica: &Arc<Replica>, req: Request<Incoming>) -> Option<Response<SimBody>> {
    let path = req.uri().path();
    if replica.loading() {
        let mut r = json(
            StatusCode::SERVICE_UNAVAILABLE,
            llamacpp::error_body(503, "Loading model"),
        );
        add_replica_header(replica, &mut r);
        return Some(r);
    }
    let llama = replica.config.engine == SimEngine::Llamacpp;
    let mut resp = match (req.method(), path) {
        (&Method::GET, "/health") if llama => json(StatusCode::OK, br#"{"status":"ok"}"#.to_vec()),
        (&Method::GET, "/metrics") if llama => llamacpp_metrics(replica),
        (&Method::GET, "/props") if llama => json(
            StatusCode::OK,
            serde_json::to_vec(&llamacpp::props(&replica.config)).unwrap_or_default(),
        ),
        (&Method::GET, "/slots") if llama => {
            if replica.config.no_slots {
                not_supported(
                    "This server does not support slots endpoint. Start it with `--slots`",
                )
            } else {
                let running = replica.snapshot().running;
                json(
                    StatusCode::OK,
                    serde_json::to_vec(&llamacpp::slots(&replica.config, running))
                        .unwrap_or_default(),
                )
            }
        }
        (&Method::POST, "/v1/completions") => {
            return inference(replica, req, Endpoint::Completions).await
        }
        (&Method::POST, "/v1/chat/completions") => {
            return inference(replica, req, Endpoint::Chat).await
        }
        (&Method::GET, "/health") => text(StatusCode::OK, "ok"),
        (&Method::GET, "/v1/models") => models(replica),
        (&Method::GET, "/metrics") => {
            let c = &replica.config;
            let body =
                metrics::render(&c.model, c.kv_blocks, c.block_tokens(), &replica.snapshot());
            let mut r = Response::new(SimBody::full(body));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        (&Method::GET, "/sim/stats") => {
            let mut v = serde_json::to_value(replica.stats()).unwrap_or_default();
            v["name"] = replica.config.name.clone().into();
            json(StatusCode::OK, serde_json::to_vec(&v).unwrap_or_default())
        }
        (&Method::POST, "/sim/reset") => {
            replica.reset();
            json(StatusCode::OK, br#"{"ok":true}"#.to_vec())
        }
        (&Method::POST, "/sim/fault") => match read_body(req).await {
            Some(body) => match serde_json::from_slice::<FaultRequest>(&body) {
                Ok(f) => {
                    let faults = replica.apply_fault(&f);
                    tracing::info!(?faults, drop_cache = f.drop_cache, "faults set");
                    json(StatusCode::OK, br#"{"ok":true}"#.to_vec())
                }
                Err(e) => error(&SimError::BadRequest(e.to_string())),
            },
            None => return None,
        },
        _ => error(&SimError::NotFound),
    };
    add_replica_header(replica, &mut resp);
    Some(resp)
}

fn llamacpp_metrics(replica: &Replica) -> Response<SimBody> {
    if replica.config.no_metrics {
        return not_supported(
            "This server does not support metrics endpoint. Start it with `--metrics`",
        );
    }
    let mut r = Response::new(SimBody::full(llamacpp::render_metrics(&replica.snapshot())));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    if let Ok(v) = HeaderValue::from_str(&replica.started_us.to_string()) {
        r.headers_mut().insert("process-start-time-unix", v);
    }
    r
}

fn not_supported(message: &str) -> Response<SimBody> {
    json(
        StatusCode::NOT_IMPLEMENTED,
        llamacpp::error_body(501, message),
    )
}

async fn inference(
    replica: &Arc<Replica>,
    req: Request<Incoming>,
    endpoint: Endpoint,
) -> Option<Response<SimBody>> {
    match replica.draw_fault() {
        Some(FaultMode::Reset) => return None,
        Some(FaultMode::Hang) => std::future::pending::<()>().await,
        Some(FaultMode::Http500) => {
            let mut r = error(&SimError::InjectedFault);
            add_replica_header(replica, &mut r);
            return Some(r);
        }
        None => {}
    }
    let body = read_body(req).await?;
    let mut resp = match SimRequest::parse(endpoint, &body) {
        Err(e) => error(&e),
        Ok(r) => match &r.model {
            Some(m) if *m != replica.config.model => error(&SimError::ModelNotFound(m.clone())),
            _ if r.stream => stream(replica, r),
            _ => complete(replica, r).await,
        },
    };
    add_replica_header(replica, &mut resp);
    Some(resp)
}

fn meta_id(replica: &Replica, endpoint: Endpoint) -> String {
    let prefix = match endpoint {
        Endpoint::Completions => "cmpl",
        Endpoint::Chat => "chatcmpl",
    };
    format!("{prefix}-{}-{}", replica.config.name, replica.next_id())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn complete(replica: &Arc<Replica>, r: SimRequest) -> Response<SimBody> {
    let prompt_tokens = r.prompt_tokens();
    let _slot = replica.admit(prompt_tokens, r.max_tokens).await;
    let (p, mut t) = replica.prefill(&r.prompt, prompt_tokens).await;
    // The first token comes out of prefill; each further one costs a decode step.
    for _ in 1..r.max_tokens {
        t += replica.decode_step();
        replica.sleep_until(t).await;
    }
    replica.record_completion(r.max_tokens);
    let id = meta_id(replica, r.endpoint);
    let meta = Meta {
        endpoint: r.endpoint,
        id: &id,
        model: &replica.config.model,
        created: unix_now(),
    };
    let usage = response::usage(p.prompt_tokens, r.max_tokens, p.cached_tokens);
    json(
        StatusCode::OK,
        response::complete(&meta, r.max_tokens, usage),
    )
}

/// Headers go out at once, as vLLM's do; tokens follow after queueing and prefill.
fn stream(replica: &Arc<Replica>, r: SimRequest) -> Response<SimBody> {
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let replica = Arc::clone(replica);
    tokio::spawn(async move {
        let prompt_tokens = r.prompt_tokens();
        let _slot = tokio::select! {
            _ = tx.closed() => return,
            slot = replica.admit(prompt_tokens, r.max_tokens) => slot,
        };
        let (p, mut t) = replica.prefill(&r.prompt, prompt_tokens).await;
        let id = meta_id(&replica, r.endpoint);
        let meta = Meta {
            endpoint: r.endpoint,
            id: &id,
            model: &replica.config.model,
            created: unix_now(),
        };
        for i in 0..r.max_tokens {
            if i > 0 {
                t += replica.decode_step();
                replica.sleep_until(t).await;
            }
            let chunk = response::chunk(&meta, Some(response::token_text(i)), i == 0);
            if tx.send(Bytes::from(chunk)).await.is_err() {
                return;
            }
        }
        replica.record_completion(r.max_tokens);
        let mut tail = response::chunk(&meta, None, r.max_tokens == 0);
        if r.include_usage {
            let usage = response::usage(p.prompt_tokens, r.max_tokens, p.cached_tokens);
            tail.extend_from_slice(&response::usage_chunk(&meta, usage));
        }
        tail.extend_from_slice(response::DONE);
        let _ = tx.send(Bytes::from(tail)).await;
    });
    let mut resp = Response::new(SimBody::Stream(rx));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    resp.headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-cache"));
    resp
}

async fn read_body(req: Request<Incoming>) -> Option<Bytes> {
    req.into_body().collect().await.ok().map(|b| b.to_bytes())
}

fn models(replica: &Replica) -> Response<SimBody> {
    let c = &replica.config;
    let body = serde_json::json!({
        "object": "list",
        "data": [{
            "id": c.model, "object": "model", "created": unix_now(), "owned_by": "kvroute-sim",
            "root": c.model, "parent": null,
            "max_model_len": c.kv_blocks * c.block_tokens(),
        }]
    });
    json(
        StatusCode::OK,
        serde_json::to_vec(&body).unwrap_or_default(),
    )
}

fn add_replica_header(replica: &Replica, resp: &mut Response<SimBody>) {
    if let Ok(v) = HeaderValue::from_str(&replica.config.name) {
        resp.headers_mut().insert("x-replica", v);
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<SimBody> {
    let mut r = Response::new(SimBody::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json(status: StatusCode, body: Vec<u8>) -> Response<SimBody> {
    let mut r = Response::new(SimBody::full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error(e: &SimError) -> Response<SimBody> {
    json(e.status(), e.body())
}
