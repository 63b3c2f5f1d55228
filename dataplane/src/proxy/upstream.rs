//! Upstream phase: the request's [`Plan`] carried out (attempts, queue places,
//! waits), one attempt at one replica, and the replica's passive health.

use std::borrow::Cow;
use std::io::Write as _;
use std::net::SocketAddr;
use std::ops::Range;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::error::{Cause, Error, Retry, Source};
use super::plan::{self, Action, Fleet as _, Plan, Verdict};
use super::read::Body;
use super::relay::{relay, Response};
use super::respond::send_error_with;
use super::route::Routing;
use super::{Client, Next, Request, Stream, COALESCE_BODY, READ_CHUNK};
use crate::auth::Caller;
use crate::http::{self, parse_response_head, BodyFraming, RequestHead, ResponseHead};
use crate::io::{Conn, Runtime};
use crate::metrics as m;
use crate::replica::Replica;
use crate::route::{Decision, RouteRequest};
use crate::tls::MaybeTls;
use crate::worker::WorkerCtx;

pub(super) enum Outcome {
    /// A response was relayed in full.
    Done {
        status: u16,
        replica: Option<Arc<Replica>>,
        client_keep_alive: bool,
    },
    /// Nothing reached the client yet; answer with this error.
    Failed {
        error: Error,
        replica: Option<Arc<Replica>>,
    },
    /// The response started but the client or the replica broke the stream.
    ClientGone {
        status: u16,
        replica: Option<Arc<Replica>>,
    },
}

/// One request on its way to a replica: what every attempt sends, and how
/// the response goes back.
pub(super) struct Exchange<'a> {
    /// What the router sees of it.
    pub(super) req: RouteRequest<'a>,
    /// Request line and headers for the replica, without `host` and the final
    /// CRLF (see [`build_upstream_head`]).
    pub(super) head: &'a [u8],
    /// The body is `body[body_range]`: the client's buffer, lent for the
    /// duration, or a decoded chunked body.
    pub(super) body: Vec<u8>,
    pub(super) body_range: Range<usize>,
    pub(super) is_head: bool,
    pub(super) client_keep_alive: bool,
    pub(super) tap: &'a crate::cache::Tap,
    /// The API key's tenant, for its share of the admission queue.
    pub(super) key: Option<&'a str>,
}

/// Request line and end-to-end headers for the replica, without `host` (added per
/// attempt, since a retry may go to another replica) and without the final CRLF.
/// `fwd` says which client credential headers stay back and what kvroute adds.
fn build_upstream_head(
    head: &RequestHead,
    buf: &[u8],
    peer: SocketAddr,
    body_len: usize,
    fwd: &crate::auth::Forwarding,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(head.len + 128);
    out.extend_from_slice(head.method(buf).as_bytes());
    out.push(b' ');
    out.extend_from_slice(head.path(buf).as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut conn_tokens: Vec<&str> = Vec::new();
    for (n, v) in head.header_iter(buf) {
        if n.eq_ignore_ascii_case("connection") {
            if let Ok(s) = std::str::from_utf8(v) {
                conn_tokens.extend(s.split(',').map(str::trim).filter(|t| !t.is_empty()));
            }
        }
    }
    let mut xff: Option<&[u8]> = None;
    for (n, v) in head.header_iter(buf) {
        if http::is_hop_by_hop(n, &conn_tokens)
            || n.eq_ignore_ascii_case("host")
            || n.eq_ignore_ascii_case("content-length")
            || n.eq_ignore_ascii_case("expect")
            || fwd.drops(n)
        {
            continue;
        }
        if n.eq_ignore_ascii_case("x-forwarded-for") {
            xff = Some(v);
            continue;
        }
        out.extend_from_slice(n.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    if let Some(prev) = xff {
        out.extend_from_slice(prev);
        out.extend_from_slice(b", ");
    }
    let _ = write!(out, "{}\r\n", peer.ip());
    out.extend_from_slice(fwd.lines());
    if body_len > 0 || !matches!(head.framing, BodyFraming::None) || head.method(buf) == "POST" {
        let _ = write!(out, "content-length: {body_len}\r\n");
    }
    out
}

/// Sends the request on to a replica and its response back, or answers the
/// error that stopped it; returns the status, the replica, and what the
/// connection does next.
pub(super) async fn send<R: Runtime>(
    ctx: &Rc<WorkerCtx<R>>,
    client: &mut Client<Stream<R>>,
    rq: &Request<'_>,
    head: &RequestHead,
    body: Body,
    routing: &Routing,
    caller: &Caller,
) -> (u16, Option<Arc<Replica>>, Next) {
    let shared = &ctx.shared;
    let tap = crate::cache::Tap::new(shared.cache.as_ref(), routing.cache_plan);
    let upstream_head = build_upstream_head(
        head,
        &client.buf,
        client.peer,
        routing.body_len,
        shared.auth.forwarding(),
    );
    // The body moves out of the client buffer only for the duration of forwarding.
    let (body_buf, body_range, in_client_buf) = match body {
        Body::InBuf(r) => (std::mem::take(&mut client.buf), r, true),
        Body::Decoded(v) => {
            let n = v.len();
            (v, 0..n, false)
        }
    };
    let mut x = Exchange {
        req: RouteRequest {
            path: &rq.path,
            model: routing.model.as_deref(),
            session: routing.session.as_deref(),
            block_hashes: &routing.hashes,
            prompt_bytes: routing.prompt_bytes,
            now_ms: shared.now_ms(),
        },
        head: &upstream_head,
        body: body_buf,
        body_range,
        is_head: rq.is_head,
        client_keep_alive: rq.keep_alive,
        tap: &tap,
        key: caller.tenant(),
    };
    let outcome = forward(ctx, client, &mut x).await;
    if in_client_buf {
        client.buf = std::mem::take(&mut x.body);
    }
    // Drop this request's bytes; a pipelined next request stays at the front.
    rq.done(client);
    match outcome {
        Outcome::Done {
            status,
            replica,
            client_keep_alive,
        } => (
            status,
            replica,
            if client_keep_alive {
                Next::KeepAlive
            } else {
                Next::Close
            },
        ),
        Outcome::Failed { error, replica } => {
            let kind = error.kind;
            let extra = crate::admission::retry_after_header(&shared.admission, kind);
            let close = !rq.keep_alive;
            send_error_with(client, kind, &error.message, &extra, close, rq.write_limit).await;
            (kind.status(), replica, rq.next())
        }
        Outcome::ClientGone { status, replica } => (status, replica, Next::Close),
    }
}

/// The live replica set and admission queue, as the planner sees them for one request.
struct View<'a, R: Runtime> {
    ctx: &'a WorkerCtx<R>,
    req: &'a RouteRequest<'a>,
    set: &'a crate::replica::ReplicaSet,
}

impl<R: Runtime> plan::Fleet for View<'_, R> {
    type Candidate = Decision;

    fn waiters_ahead(&self) -> bool {
        self.ctx.shared.admission.has_waiters_for(self.req.model)
    }

    fn any_serves(&self) -> bool {
        self.set.any_serves(self.req.model)
    }

    fn pick(&self, exclude: &[u16]) -> Option<Decision> {
        self.ctx.shared.router.pick(self.req, self.set, exclude)
    }

    fn untried_but_full(&self, exclude: &[u16]) -> bool {
        self.set.replicas.iter().any(|r| {
            !exclude.contains(&r.slot)
                && r.serves(self.req.model)
                && r.takes_traffic(self.req.now_ms)
                && !r.has_capacity()
        })
    }

    fn none_up(&self) -> bool {
        !self
            .set
            .replicas
            .iter()
            .any(|r| r.is_available() && r.serves(self.req.model))
    }

    fn unknown_model(&self) -> Option<&str> {
        let model = self.req.model?;
        (!self.set.replicas.is_empty() && !self.set.any_serves(Some(model))).then_some(model)
    }

    fn queueing(&self) -> bool {
        self.ctx.shared.admission.enabled()
    }
}

/// The request ends with `error` before any response byte; a refusal by the
/// admission queue is counted as one.
fn give_up(error: Error, replica: Option<Arc<Replica>>) -> Outcome {
    if let Cause::Refused(Some(reason)) = error.cause {
        metrics::counter!(m::OVERLOAD_REJECTIONS, "reason" => reason).increment(1);
    }
    Outcome::Failed { error, replica }
}

/// Drives the request's [`Plan`]: carries out its attempts, queue places and
/// waits, then relays the response.
async fn forward<R: Runtime>(
    ctx: &Rc<WorkerCtx<R>>,
    client: &mut Client<Stream<R>>,
    x: &mut Exchange<'_>,
) -> Outcome {
    let route = x.req;
    let req = &route;
    let key = x.key;
    let shared = &ctx.shared;
    let up_cfg = &shared.upstream;
    let admission = &shared.admission;
    let mut set = shared.table.load();
    if set.generation != ctx.pool_generation.get() {
        let addrs: Vec<SocketAddr> = set.replicas.iter().map(|r| r.addr).collect();
        ctx.pool
            .borrow_mut()
            .prune(|a| addrs.contains(a), Instant::now());
        ctx.pool_generation.set(set.generation);
    }
    let mut plan = Plan::new(up_cfg.retries, admission.timeout());
    let mut last_replica: Option<Arc<Replica>> = None;
    let mut ubuf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    // A place in the admission queue while no replica has room.
    let mut stay: Option<crate::admission::Stay> = None;
    let (mut up, rhead, chosen, mut in_flight, connect_started) = loop {
        debug_assert_eq!(plan.is_queued(), stay.is_some());
        let view = View {
            ctx,
            req,
            set: &set,
        };
        // The queue's clock: tokio's, as its waits are.
        let (d, fresh_only) = match plan.next(tokio::time::Instant::now().into_std(), &view) {
            Action::Try {
                candidate,
                fresh_only,
            } => (candidate, fresh_only),
            Action::Enter { behind } => {
                match admission.enter(key, req.model) {
                    Ok(t) => {
                        if view.none_up() {
                            metrics::counter!(m::ERRORS, "kind" => "queued_no_replica")
                                .increment(1);
                        }
                        stay = Some(crate::admission::Stay::new(t, admission.timeout()));
                        plan.entered(tokio::time::Instant::now().into_std());
                        if !behind {
                            set = shared.table.load();
                        }
                    }
                    Err(why) => return give_up(plan.refused(why, &view), None),
                }
                continue;
            }
            Action::Wait { until } => {
                let ticket = stay
                    .as_ref()
                    .and_then(|s| s.ticket.as_ref())
                    .expect("held until admitted");
                let until = tokio::time::Instant::from_std(until);
                let _ = tokio::time::timeout_at(until, ticket.woken()).await;
                if client.io.peer_closed() {
                    // The client left: its place goes to the next one, nothing to answer.
                    return Outcome::ClientGone {
                        status: 499,
                        replica: None,
                    };
                }
                ticket.rearm();
                set = shared.table.load();
                continue;
            }
            Action::GiveUp(error) => {
                // The queue's refusals concern no replica in particular.
                let replica = match error.cause {
                    Cause::Refused(Some(_)) => None,
                    _ => last_replica,
                };
                return give_up(error, replica);
            }
        };
        let replica = d.replica.clone();
        // Another worker may have taken the last slot since the pick: look again.
        let Some(in_flight) = replica.try_begin_at(d.prefill_bytes, ctx.shared.now_ms()) else {
            continue;
        };
        plan.began();
        if let Some(mut s) = stay.take() {
            if let Some(t) = s.ticket.take() {
                t.admitted();
            }
        }
        last_replica = Some(replica.clone());
        let started = Instant::now();
        match attempt::<R>(ctx, x, &replica, fresh_only, &mut ubuf).await {
            Ok((conn, rhead)) => {
                if replica.last_error.load().is_some() {
                    replica.last_error.store(None);
                }
                ctx.metrics.decision(d.kind.as_str());
                shared.router.on_routed(req, &d);
                break (conn, rhead, d, in_flight, started);
            }
            Err((error, reused)) => {
                debug_assert_eq!(error.source(), Source::Upstream);
                let why = error.why().unwrap_or_default();
                let verdict = plan.failed(d, replica.slot, &error, reused);
                if verdict == Verdict::Fresh {
                    // Not the replica's fault: not counted against it.
                    tracing::debug!(replica = %replica.spec.url, why = %why, "stale pooled connection");
                    continue;
                }
                replica.failures.fetch_add(1, Ordering::Relaxed);
                if error.retry() == Retry::Never {
                    // The replica may be working on it: don't double the GPU work.
                    replica.last_error.store(Some(Arc::new(why.to_string())));
                    passive_failure(ctx, &replica, &why);
                    return Outcome::Failed {
                        error,
                        replica: last_replica,
                    };
                }
                if matches!(error.cause, Cause::UpstreamIo(_)) {
                    metrics::counter!(m::ERRORS, "kind" => "upstream_connect").increment(1);
                }
                tracing::warn!(replica = %replica.spec.url, why = %why, "upstream attempt failed");
                passive_failure(ctx, &replica, &why);
                replica.last_error.store(Some(Arc::new(why.into_owned())));
                if verdict == Verdict::GiveUp {
                    return Outcome::Failed {
                        error,
                        replica: last_replica,
                    };
                }
                metrics::counter!(m::RETRIES).increment(1);
            }
        }
    };
    ctx.metrics
        .ttfb
        .record(connect_started.elapsed().as_secs_f64());
    let response = Response {
        head: rhead,
        buf: ubuf,
    };
    let (outcome, reusable) =
        relay::<R>(ctx, client, x, &mut up, response, &chosen, &mut in_flight).await;
    drop(in_flight);
    if reusable {
        ctx.pool
            .borrow_mut()
            .put(chosen.replica.addr, up, Instant::now());
    }
    outcome
}

/// One try at one replica: connection (pooled or new), request written, response
/// head read. On error, also says whether the connection came from the pool.
async fn attempt<R: Runtime>(
    ctx: &WorkerCtx<R>,
    x: &mut Exchange<'_>,
    replica: &Replica,
    fresh_only: bool,
    ubuf: &mut Vec<u8>,
) -> Result<(Stream<R>, ResponseHead), (Error, bool)> {
    let (upstream_head, body_range, is_head) = (x.head, x.body_range.clone(), x.is_head);
    let body = &mut x.body;
    let up_cfg = &ctx.shared.upstream;
    // Half-open after an ejection, this request is the probe.
    replica
        .ejection
        .on_attempt(ctx.shared.now_ms(), up_cfg.eject_base_ms);
    let pooled = if fresh_only {
        None
    } else {
        // One made for another scheme or TLS name at this address (the replica's
        // URL changed, or virtual hosts share it) is not this replica's: dropped.
        ctx.pool
            .borrow_mut()
            .take(replica.addr, Instant::now())
            .filter(|c| c.server_name() == replica.tls.as_ref())
    };
    let reused = pooled.is_some();
    let mut conn = match pooled {
        Some(c) => {
            ctx.metrics.pool_reuse.increment(1);
            c
        }
        None => {
            ctx.metrics.pool_new.increment(1);
            match connect_upstream(ctx, replica).await {
                Ok(c) => c,
                Err(why) => return Err((Error::upstream_io(why), false)),
            }
        }
    };
    let fail = |why: &'static str| Err((Error::upstream_io(why), reused));
    // Request head (+ small body) in one write.
    let mut out =
        Vec::with_capacity(upstream_head.len() + 64 + body_range.len().min(COALESCE_BODY));
    out.extend_from_slice(upstream_head);
    out.extend_from_slice(b"host: ");
    out.extend_from_slice(replica.authority.as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
    let coalesce = body_range.len() <= COALESCE_BODY;
    if coalesce {
        out.extend_from_slice(&body[body_range.clone()]);
    }
    let n = out.len();
    let (r, _) = conn.write_all(out, 0..n).await;
    if r.is_err() {
        return fail("write failed");
    }
    if !coalesce {
        let b = std::mem::take(body);
        let (r, b) = conn.write_all(b, body_range).await;
        *body = b;
        if r.is_err() {
            return fail("write failed");
        }
    }
    ubuf.clear();
    let deadline =
        tokio::time::Instant::now() + Duration::from_millis(up_cfg.first_byte_timeout_ms);
    loop {
        match tokio::time::timeout_at(deadline, conn.read(ubuf, READ_CHUNK)).await {
            Ok(Ok(0)) | Ok(Err(_)) if ubuf.is_empty() => {
                return fail("connection closed before response")
            }
            Ok(Ok(0)) | Ok(Err(_)) => {
                return Err((Error::bad_response("connection closed inside head"), reused))
            }
            Ok(Ok(_)) => {}
            Err(_) => return Err((Error::first_byte_timeout(), reused)),
        }
        match parse_response_head(ubuf, 64 * 1024, is_head) {
            Ok(Some(h)) if (100..200).contains(&h.status) => {
                if h.status == 101 {
                    return Err((
                        Error::bad_response("protocol upgrade is not supported"),
                        reused,
                    ));
                }
                // Interim response (100, 103): skip it, the final one follows.
                ubuf.drain(..h.len);
                continue;
            }
            Ok(Some(h)) => return Ok((conn, h)),
            Ok(None) => continue,
            Err(why) => return Err((Error::bad_response(why), reused)),
        }
    }
}

/// Counts a failed attempt, or a response cut off, against `replica`'s passive
/// health, and takes it out of rotation when that is due and the rest of the
/// fleet can take its share.
pub(super) fn passive_failure<R: Runtime>(ctx: &WorkerCtx<R>, replica: &Replica, why: &str) {
    let shared = &ctx.shared;
    let up = &shared.upstream;
    let now = shared.now_ms();
    let verdict = replica.ejection.on_failure(now, &up.ejection(), why, || {
        shared
            .table
            .load()
            .may_eject(replica, now, up.eject_max_percent)
    });
    if let crate::ejection::Verdict::Ejected { until_ms } = verdict {
        tracing::warn!(
            replica = %replica.spec.url,
            why = %why,
            for_ms = until_ms - now,
            "replica ejected after consecutive failures"
        );
    }
}

/// A new connection to `replica`, with its TLS handshake for an `https://` URL,
/// both within `connect_timeout_ms` (and in the connect-time histogram). A
/// certificate the replica presents that does not verify fails it like a
/// refused connection, with the reason.
async fn connect_upstream<R: Runtime>(
    ctx: &WorkerCtx<R>,
    replica: &Replica,
) -> Result<Stream<R>, Cow<'static, str>> {
    let limit = Duration::from_millis(ctx.shared.upstream.connect_timeout_ms);
    let t = Instant::now();
    let deadline = tokio::time::Instant::now() + limit;
    let tcp = match tokio::time::timeout_at(deadline, R::connect(replica.addr)).await {
        Ok(Ok(c)) => c,
        Ok(Err(_)) => return Err("connect refused".into()),
        Err(_) => return Err("connect timeout".into()),
    };
    let conn = match &replica.tls {
        None => MaybeTls::Plain(tcp),
        Some(name) => {
            let config = ctx.shared.upstream_tls.clone();
            let handshake = crate::tls::upstream::connect(tcp, config, name);
            match tokio::time::timeout_at(deadline, handshake).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return Err(e.to_string().into()),
                Err(_) => return Err("TLS handshake timeout".into()),
            }
        }
    };
    ctx.metrics.connect.record(t.elapsed().as_secs_f64());
    Ok(conn)
}
