//! Relay phase: the response streamed to the client as it arrives, its body's
//! framing followed, usage and TTFT reported to the router.

use std::io::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::timeout;

use super::error::Error;
use super::respond::write_client;
use super::upstream::{passive_failure, Exchange, Outcome};
use super::{Client, Stream, READ_CHUNK};
use crate::http::{self, ChunkedDecoder, ResponseFraming, ResponseHead};
use crate::io::{Conn, Runtime};
use crate::metrics as m;
use crate::replica::Replica;
use crate::route::Decision;
use crate::worker::WorkerCtx;

/// A response head from a replica, and the bytes read with it (`buf[..head.len]`
/// is the head; what follows is the start of the body).
pub(super) struct Response {
    pub(super) head: ResponseHead,
    pub(super) buf: Vec<u8>,
}

/// Streams the response to the client as it arrives.
pub(super) async fn relay<R: Runtime>(
    ctx: &WorkerCtx<R>,
    client: &mut Client<Stream<R>>,
    x: &Exchange<'_>,
    up: &mut Stream<R>,
    response: Response,
    decision: &Decision,
    in_flight: &mut crate::replica::InFlight,
) -> (Outcome, bool) {
    let (client_keep_alive, tap) = (x.client_keep_alive, x.tap);
    let Response {
        head: rhead,
        buf: mut ubuf,
    } = response;
    let replica = &*decision.replica;
    // Only successful completions report usage; the tail costs a small copy per read.
    let mut tail = (rhead.status == 200 && (rhead.content_type_json || rhead.content_type_sse))
        .then(crate::http::usage::UsageTail::default);
    let shared = &ctx.shared;
    let write_limit = Duration::from_millis(shared.limits.write_timeout_ms);
    let read_limit = Duration::from_millis(shared.upstream.read_timeout_ms);
    let status = rhead.status;
    let replica_label = Some(decision.replica.clone());
    let keep_alive = client_keep_alive && rhead.framing != ResponseFraming::UntilClose;

    let mut out = Vec::with_capacity(rhead.len + 64);
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\n",
        status,
        http::reason_phrase(status)
    );
    let mut rec = tap.recorder(status, rhead.framing);
    let mut conn_tokens: Vec<&str> = Vec::new();
    for (n, v) in &rhead.headers {
        if ubuf[n.clone()].eq_ignore_ascii_case(b"connection") {
            if let Ok(s) = std::str::from_utf8(&ubuf[v.clone()]) {
                conn_tokens.extend(s.split(',').map(str::trim).filter(|t| !t.is_empty()));
            }
        }
    }
    for (n, v) in &rhead.headers {
        let name = std::str::from_utf8(&ubuf[n.clone()]).unwrap_or("");
        if http::is_hop_by_hop(name, &conn_tokens) {
            continue;
        }
        if rhead.framing == ResponseFraming::Chunked && name.eq_ignore_ascii_case("content-length")
        {
            continue;
        }
        // Ours replaces one from a kvroute behind this one.
        if tap.header.is_some() && name.eq_ignore_ascii_case("x-kvroute-cache") {
            continue;
        }
        if let Some(r) = rec.as_mut() {
            r.header(name, &ubuf[v.clone()]);
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(&ubuf[v.clone()]);
        out.extend_from_slice(b"\r\n");
    }
    if let Some(h) = tap.header {
        let _ = write!(out, "x-kvroute-cache: {h}\r\n");
    }
    if rhead.framing == ResponseFraming::Chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");

    // Body bytes that arrived with the head go out with it.
    let mut tracker = BodyTracker::new(rhead.framing);
    let leftover = &ubuf[rhead.len..];
    // The first body byte is the replica's first output: its prefill is done (the
    // head alone is not: engines send it before they have scheduled the prompt).
    if !leftover.is_empty() {
        in_flight.prefill_done_at(ctx.shared.now_ms());
    }
    let take = match tracker.advance(leftover) {
        Ok(t) => t,
        Err(_) => {
            passive_failure(ctx, replica, "invalid chunked framing");
            return (
                Outcome::Failed {
                    error: Error::framing(),
                    replica: replica_label,
                },
                false,
            );
        }
    };
    let mut clean_upstream = take == leftover.len();
    if let Some(t) = tail.as_mut() {
        t.push(&leftover[..take]);
    }
    if let Some(r) = rec.as_mut() {
        r.push(&leftover[..take]);
    }
    out.extend_from_slice(&leftover[..take]);
    let n = out.len();
    let (r, _) = write_client(&mut client.io, out, 0..n, write_limit).await;
    ctx.metrics.bytes_out.increment(n as u64);
    if r.is_err() {
        return client_gone(status, replica_label);
    }

    while !tracker.done() {
        ubuf.clear();
        let read = match timeout(read_limit, up.read(&mut ubuf, READ_CHUNK)).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) | Err(_) => 0,
        };
        if read > 0 {
            in_flight.prefill_done_at(ctx.shared.now_ms());
        }
        if read == 0 {
            if tracker.framing == ResponseFraming::UntilClose {
                break;
            }
            // The replica died mid-stream: end the client's stream cleanly and close.
            metrics::counter!(m::ERRORS, "kind" => "upstream_midstream").increment(1);
            replica.failures.fetch_add(1, Ordering::Relaxed);
            passive_failure(ctx, replica, "response cut off mid-body");
            if tracker.framing == ResponseFraming::Chunked {
                let fin = b"0\r\n\r\n".to_vec();
                let _ = write_client(&mut client.io, fin, 0..5, write_limit).await;
            }
            return client_gone(status, replica_label);
        }
        let take = match tracker.advance(&ubuf[..read]) {
            Ok(t) => t,
            Err(_) => {
                metrics::counter!(m::ERRORS, "kind" => "upstream_framing").increment(1);
                passive_failure(ctx, replica, "invalid chunked framing");
                return client_gone(status, replica_label);
            }
        };
        clean_upstream &= take == read;
        if let Some(t) = tail.as_mut() {
            t.push(&ubuf[..take]);
        }
        if let Some(r) = rec.as_mut() {
            r.push(&ubuf[..take]);
        }
        let (r, b) = write_client(&mut client.io, ubuf, 0..take, write_limit).await;
        ubuf = b;
        ctx.metrics.bytes_out.increment(take as u64);
        if r.is_err() {
            // Closing the upstream connection tells the engine to abort the request.
            return client_gone(status, replica_label);
        }
    }
    // Reached only with the body whole (a cut-off returned above); an until-close
    // body never got a recorder.
    replica.ejection.on_success(ctx.shared.now_ms());
    tap.complete(rec);
    if let Some(t) = tail.as_ref() {
        let report = crate::route::ResponseReport {
            prompt_tokens: t.prompt_tokens(),
            cached_tokens: t.cached_tokens(),
            ttft_ms: in_flight.ttft_ms().filter(|_| rhead.content_type_sse),
        };
        ctx.shared.router.on_response(decision, &report);
    }
    let reusable =
        rhead.keep_alive && clean_upstream && tracker.framing != ResponseFraming::UntilClose;
    (
        Outcome::Done {
            status,
            replica: replica_label,
            client_keep_alive: keep_alive,
        },
        reusable,
    )
}

/// Follows the response body's framing while its bytes pass through untouched.
struct BodyTracker {
    framing: ResponseFraming,
    remaining: u64,
    chunked: ChunkedDecoder,
    finished: bool,
}

impl BodyTracker {
    fn new(framing: ResponseFraming) -> Self {
        BodyTracker {
            framing,
            remaining: match framing {
                ResponseFraming::Length(n) => n,
                _ => 0,
            },
            chunked: ChunkedDecoder::new(),
            finished: framing == ResponseFraming::None,
        }
    }

    fn done(&self) -> bool {
        self.finished
    }

    /// How many of `bytes` belong to the body; marks the end when reached.
    fn advance(&mut self, bytes: &[u8]) -> Result<usize, http::ChunkError> {
        match self.framing {
            ResponseFraming::None => Ok(0),
            ResponseFraming::Length(_) => {
                let take = (self.remaining as usize).min(bytes.len());
                self.remaining -= take as u64;
                self.finished = self.remaining == 0;
                Ok(take)
            }
            ResponseFraming::Chunked => {
                let take = self.chunked.feed(bytes, None)?;
                self.finished = self.chunked.is_done();
                Ok(take)
            }
            ResponseFraming::UntilClose => Ok(bytes.len()),
        }
    }
}

/// The relay's end when the client is gone or its stream was ended early: the
/// upstream connection is not reused, so the engine aborts the request.
fn client_gone(status: u16, replica: Option<Arc<Replica>>) -> (Outcome, bool) {
    (Outcome::ClientGone { status, replica }, false)
}
