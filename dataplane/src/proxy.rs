//! One client connection: read a request, route it, forward it, stream the
//! response back, repeat while keep-alive allows.
//!
//! Generic over [`Runtime`], so io_uring and epoll run exactly this code.

use std::borrow::Cow;
use std::io::Write as _;
use std::net::SocketAddr;
use std::ops::Range;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::time::timeout;

use crate::budget::registry::ConnState;
use crate::http::{
    self, parse_request_head, parse_response_head, BodyFraming, ChunkedDecoder, ErrorKind,
    ErrorResponse, RequestHead, ResponseFraming, ResponseHead,
};
use crate::io::{Conn, Runtime};
use crate::metrics as m;
use crate::replica::Replica;
use crate::route::{Decision, RouteRequest};
use crate::tls::MaybeTls;
use crate::worker::WorkerCtx;

mod error;
mod plan;

use error::{Cause, Error, Retry, Source};
use plan::{Action, Fleet as _, Plan, Verdict};

/// A connection on either side: plain, or TLS (a TLS listener, an `https://` replica).
pub type Stream<R> = MaybeTls<<R as Runtime>::Conn>;

/// Read granularity: big enough for a typical prompt in one read, small enough
/// that thousands of idle connections cost little.
pub(crate) const READ_CHUNK: usize = 16 * 1024;
/// Room a head read makes at least: a pooled [`READ_CHUNK`] buffer with a
/// first small read in it takes the rest of the head without growing.
const HEAD_READ_MIN: usize = 4 * 1024;
/// Bodies up to this size are copied behind the head so the upstream gets one write.
const COALESCE_BODY: usize = 16 * 1024;
/// How long a draining process waits for a request on an idle connection:
/// about the first request's flight time after the handshake on a slow path.
const DRAIN_LINGER: Duration = Duration::from_millis(500);

/// Whether the client connection lives on after a request.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    KeepAlive,
    Close,
}

struct Client<C> {
    io: C,
    /// Bytes read from the client and not yet consumed (pipelined requests stay here).
    buf: Vec<u8>,
    peer: SocketAddr,
    /// The drain signal, subscribed once per connection rather than per request.
    shutdown: tokio::sync::watch::Receiver<bool>,
    /// Its place in the worker's connection budget.
    member: crate::budget::registry::Member,
}

/// Decrements a counter when dropped, so every exit path keeps gauges right.
struct Gauge<'a>(&'a std::sync::atomic::AtomicU64);
impl<'a> Gauge<'a> {
    fn up(c: &'a std::sync::atomic::AtomicU64) -> Self {
        c.fetch_add(1, Ordering::Relaxed);
        Gauge(c)
    }
}
impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves one client connection. Between requests (and before the first) the
/// task waits in [`await_request`], which holds no read buffer (on epoll) or a
/// small one (io_uring) and whose future is small; a request's buffer comes
/// from the worker's pool and its state machine is boxed, so both exist only
/// while a request is in progress.
pub async fn serve<R: Runtime>(
    ctx: Rc<WorkerCtx<R>>,
    io: R::Conn,
    peer: SocketAddr,
    member: crate::budget::registry::Member,
) {
    let stats = &ctx.shared.workers[ctx.id];
    let _open = Gauge::up(&stats.connections);
    let _live = ctx.shared.steering.open(ctx.id);
    let limits = &ctx.shared.cfg.limits;
    let io = match &ctx.shared.tls {
        None => MaybeTls::Plain(io),
        Some(tls) => {
            let limit = Duration::from_millis(limits.head_timeout_ms);
            // Boxed in a statement of its own, so no unboxed copy of the
            // handshake's state stays part of this task's.
            let accept = Box::pin(crate::tls::accept::accept(
                io,
                tls.current(),
                limit,
                peer,
                member.shed(),
            ));
            match accept.await {
                Some(t) => MaybeTls::Tls(Box::new(t)),
                None => return,
            }
        }
    };
    let mut client = Client {
        io,
        buf: Vec::new(),
        peer,
        shutdown: ctx.shared.shutdown.subscribe(),
        member,
    };
    loop {
        if client.buf.is_empty() && !await_request(&ctx, &mut client).await {
            break;
        }
        let request = Box::pin(handle_one(&ctx, &mut client));
        if request.await == Next::Close {
            break;
        }
        if client.buf.is_empty() {
            client.member.set(ConnState::Idle);
            ctx.buffers.give(std::mem::take(&mut client.buf));
        } else {
            // A pipelined request is already here.
            client.member.set(ConnState::ReadingHead);
        }
    }
    if !client.member.is_shed() {
        match &mut client.io {
            // A TLS client gets its close_notify, unless it stopped reading
            // (boxed: the flush's state would otherwise be part of every task).
            MaybeTls::Tls(t) => {
                let write_limit = Duration::from_millis(limits.write_timeout_ms);
                let _ = timeout(write_limit, Box::pin(t.close())).await;
            }
            MaybeTls::Plain(c) => c.shutdown_write(),
        }
    }
    client.io.abort();
    ctx.buffers.give(std::mem::take(&mut client.buf));
}

/// Waits for the next request's first bytes (the first request's too);
/// `false`: close instead (the client left or idled out, a drain, or the
/// budget shed the connection). Then `client.buf` is a pooled buffer holding
/// what io_uring's small read got.
async fn await_request<R: Runtime>(ctx: &WorkerCtx<R>, client: &mut Client<Stream<R>>) -> bool {
    let idle = Duration::from_millis(ctx.shared.cfg.limits.idle_timeout_ms);
    let mut draining = *client.shutdown.borrow_and_update();
    let sleep = tokio::time::sleep(if draining { DRAIN_LINGER } else { idle });
    tokio::pin!(sleep);
    let mut small = Vec::new();
    let ready = {
        // One wait for the whole idle spell: on io_uring it is a read, and a
        // second one issued after dropping the first would race it for the bytes.
        let wait = client.io.wait_readable(&mut small);
        tokio::pin!(wait);
        loop {
            tokio::select! {
                biased;
                _ = client.member.shed() => break false,
                // Not at the peer's end of stream: that closes at once, with
                // no buffer taken for a read that would only confirm it.
                r = &mut wait => break matches!(r, Ok(true)),
                _ = &mut sleep => break false,
                // Draining: an idle connection gets a short linger for a request
                // already on its way (one accepted just before an upgrade's hand-off).
                _ = client.shutdown.changed(), if !draining => {
                    draining = true;
                    sleep.as_mut().reset(tokio::time::Instant::now() + DRAIN_LINGER);
                }
            }
        }
    };
    if !ready {
        return false;
    }
    if client.buf.capacity() == 0 {
        client.buf = ctx.buffers.take();
    }
    client.buf.extend_from_slice(&small);
    client.member.set(ConnState::ReadingHead);
    true
}

async fn write_client<C: Conn>(
    c: &mut C,
    buf: Vec<u8>,
    range: Range<usize>,
    limit: Duration,
) -> (std::io::Result<()>, Vec<u8>) {
    match timeout(limit, c.write_all(buf, range)).await {
        Ok(r) => r,
        Err(_) => (
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "client write timeout",
            )),
            Vec::new(),
        ),
    }
}

async fn send_error<C: Conn>(
    client: &mut Client<C>,
    kind: ErrorKind,
    message: &str,
    close: bool,
    limit: Duration,
) {
    send_error_with(client, kind, message, "", close, limit).await
}

/// [`send_error`] with extra header lines.
async fn send_error_with<C: Conn>(
    client: &mut Client<C>,
    kind: ErrorKind,
    message: &str,
    extra_headers: &str,
    close: bool,
    limit: Duration,
) {
    metrics::counter!(m::ERRORS, "kind" => kind.code()).increment(1);
    let mut out = Vec::with_capacity(256);
    ErrorResponse::write_with(&mut out, kind, message, close, extra_headers);
    let len = out.len();
    let _ = write_client(&mut client.io, out, 0..len, limit).await;
}

async fn send_denial<C: Conn>(
    client: &mut Client<C>,
    d: &crate::auth::Denial,
    close: bool,
    limit: Duration,
) {
    send_error_with(client, d.kind, &d.message, &d.headers(), close, limit).await
}

/// Answers a request `[auth]` refused on its head alone. Its body is still
/// read (within `[limits]`) and dropped, so the client reads the answer
/// rather than a reset, and the connection can carry on; a client waiting for
/// `100 Continue` never gets it and the connection closes instead.
async fn refuse_unread<R: Runtime>(
    ctx: &WorkerCtx<R>,
    client: &mut Client<Stream<R>>,
    head: &RequestHead,
    route: &'static str,
    denial: crate::auth::Denial,
) -> Next {
    let write_limit = Duration::from_millis(ctx.shared.cfg.limits.write_timeout_ms);
    let status = denial.kind.status();
    let next = if head.expect_continue && client.buf.len() == head.len {
        send_denial(client, &denial, true, write_limit).await;
        Next::Close
    } else {
        match read_body(ctx, client, head).await {
            Ok((_, consumed)) => {
                ctx.metrics.bytes_in.increment(consumed as u64);
                let keep_alive = head.keep_alive && !ctx.shared.draining.load(Ordering::Relaxed);
                send_denial(client, &denial, !keep_alive, write_limit).await;
                client.buf.drain(..consumed.min(client.buf.len()));
                if keep_alive {
                    Next::KeepAlive
                } else {
                    Next::Close
                }
            }
            Err(_) => {
                send_denial(client, &denial, true, write_limit).await;
                Next::Close
            }
        }
    };
    ctx.metrics.request(route, status, None, denial.label());
    next
}

/// Waits for a complete request head. `Ok(None)`: the connection ended, idled
/// out between requests or was shed by the budget (nothing to answer).
async fn read_head<R: Runtime>(
    ctx: &WorkerCtx<R>,
    client: &mut Client<Stream<R>>,
) -> Result<Option<RequestHead>, Error> {
    let lim = &ctx.shared.cfg.limits;
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        if !client.buf.is_empty() {
            if let Some(h) = parse_request_head(&client.buf, lim.max_head_bytes, lim.max_headers)? {
                client.member.set(ConnState::Active);
                return Ok(Some(h));
            }
            deadline.get_or_insert_with(|| {
                tokio::time::Instant::now() + Duration::from_millis(lim.head_timeout_ms)
            });
        }
        if client.member.is_shed() {
            return Ok(None);
        }
        let read = client.io.read(&mut client.buf, HEAD_READ_MIN);
        let n = match deadline {
            // Between requests: idle keep-alive, ended early by a drain. Draining
            // still reads a request already on its way (a connection accepted just
            // before an upgrade's hand-off): closing with unread bytes would reset it.
            None => {
                let draining = *client.shutdown.borrow_and_update();
                let idle = if draining {
                    DRAIN_LINGER
                } else {
                    Duration::from_millis(lim.idle_timeout_ms)
                };
                tokio::select! {
                    biased;
                    _ = client.member.shed() => return Ok(None),
                    r = timeout(idle, read) => match r {
                        Ok(r) => r,
                        Err(_) => return Ok(None),
                    },
                    _ = client.shutdown.changed(), if !draining => continue,
                }
            }
            Some(d) => tokio::select! {
                biased;
                _ = client.member.shed() => return Ok(None),
                r = tokio::time::timeout_at(d, read) => match r {
                    Ok(r) => r,
                    Err(_) => {
                        return Err(Error::client(
                            ErrorKind::Timeout,
                            "request head not received in time",
                        ))
                    }
                },
            },
        };
        match n {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
}

/// Where the request body is once read.
enum Body {
    /// In the client buffer at this range (Content-Length bodies: no copy).
    InBuf(Range<usize>),
    /// Decoded from chunked framing.
    Decoded(Vec<u8>),
}

/// Reads the body; returns it and where the request ends in the client buffer.
async fn read_body<R: Runtime>(
    ctx: &WorkerCtx<R>,
    client: &mut Client<Stream<R>>,
    head: &RequestHead,
) -> Result<(Body, usize), Error> {
    let lim = &ctx.shared.cfg.limits;
    let too_large = || {
        Error::client(
            ErrorKind::TooLarge,
            format!("request body larger than {} bytes", lim.max_body_bytes),
        )
    };
    let deadline = tokio::time::Instant::now() + Duration::from_millis(lim.body_timeout_ms);
    let start = head.len;
    // The client waits for our go-ahead only if it has sent nothing of the body yet.
    if head.expect_continue && client.buf.len() == start {
        write_continue(ctx, client).await?;
    }
    match head.framing {
        BodyFraming::None => Ok((Body::InBuf(start..start), start)),
        BodyFraming::Length(n) => {
            if n > lim.max_body_bytes as u64 {
                return Err(too_large());
            }
            let end = start + n as usize;
            while client.buf.len() < end {
                // Reserve what is announced, capped, so a lying Content-Length costs little.
                let want = (end - client.buf.len()).clamp(READ_CHUNK, 1 << 20);
                read_body_bytes(client, deadline, want).await?;
            }
            Ok((Body::InBuf(start..end), end))
        }
        BodyFraming::Chunked => {
            let mut dec = ChunkedDecoder::new();
            let mut body = Vec::new();
            let mut pos = start;
            loop {
                let used = dec.feed(&client.buf[pos..], Some(&mut body)).map_err(|e| {
                    Error::client(ErrorKind::BadRequest, format!("bad chunked body: {e}"))
                })?;
                pos += used;
                if body.len() > lim.max_body_bytes {
                    return Err(too_large());
                }
                if dec.is_done() {
                    return Ok((Body::Decoded(body), pos));
                }
                // Framing bytes already decoded are dropped (the head stays: its
                // ranges are still in use), so the buffer holds one read at most.
                client.buf.drain(start..pos);
                pos = start;
                read_body_bytes(client, deadline, READ_CHUNK).await?;
            }
        }
    }
}

/// One read of body bytes before `deadline`: EOF inside a body is a 400, a slow
/// client a 408.
async fn read_body_bytes<C: Conn>(
    client: &mut Client<C>,
    deadline: tokio::time::Instant,
    want: usize,
) -> Result<(), Error> {
    match tokio::time::timeout_at(deadline, client.io.read(&mut client.buf, want)).await {
        Ok(Ok(0)) | Ok(Err(_)) => Err(Error::client(
            ErrorKind::BadRequest,
            "connection closed inside the body",
        )),
        Ok(Ok(_)) => Ok(()),
        Err(_) => Err(Error::client(
            ErrorKind::Timeout,
            "request body not received in time",
        )),
    }
}

async fn write_continue<R: Runtime>(
    ctx: &WorkerCtx<R>,
    client: &mut Client<Stream<R>>,
) -> Result<(), Error> {
    const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
    let limit = Duration::from_millis(ctx.shared.cfg.limits.write_timeout_ms);
    let (r, _) = write_client(&mut client.io, CONTINUE.to_vec(), 0..CONTINUE.len(), limit).await;
    r.map_err(|_| Error::client(ErrorKind::BadRequest, "client went away"))
}

/// Handles one request on the connection.
async fn handle_one<R: Runtime>(ctx: &Rc<WorkerCtx<R>>, client: &mut Client<Stream<R>>) -> Next {
    let shared = &ctx.shared;
    let write_limit = Duration::from_millis(shared.cfg.limits.write_timeout_ms);
    let head = match read_head(ctx, client).await {
        Ok(Some(h)) => h,
        Ok(None) => return Next::Close,
        Err(rej) => {
            send_error(client, rej.kind, &rej.message, true, write_limit).await;
            return Next::Close;
        }
    };
    let stats = &shared.workers[ctx.id];
    let _active = Gauge::up(&stats.active_requests);
    stats.requests.fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    let route = m::route_label(head.path(&client.buf));
    // Auth, phase 1: the key, before any body work.
    let caller = match shared.auth.admit(&head, &client.buf, Instant::now()) {
        Ok(c) => c,
        Err(denial) => return refuse_unread(ctx, client, &head, route, denial).await,
    };
    let key_label = caller.label();

    let (body, consumed) = match read_body(ctx, client, &head).await {
        Ok(b) => b,
        Err(rej) => {
            send_error(client, rej.kind, &rej.message, true, write_limit).await;
            ctx.metrics
                .request(route, rej.kind.status(), None, key_label);
            return Next::Close;
        }
    };
    let body_len = match &body {
        Body::InBuf(r) => r.len(),
        Body::Decoded(v) => v.len(),
    };
    ctx.metrics.bytes_in.increment(consumed as u64);

    let keep_alive = head.keep_alive && !shared.draining.load(Ordering::Relaxed);
    let path = head.path(&client.buf).to_string();
    let is_head = head.is_head;

    if let Some(query) = crate::models::Query::of(head.method(&client.buf), &path) {
        let credentials =
            crate::models::Credentials::of(&head, &client.buf, shared.auth.forwarding());
        client.buf.drain(..consumed.min(client.buf.len()));
        let (out, status) =
            crate::models::answer(ctx, &query, credentials, &caller, keep_alive, is_head).await;
        let (sent, next) = write_local(client, out, keep_alive, write_limit).await;
        ctx.metrics.bytes_out.increment(sent as u64);
        let fleet = crate::models::METRICS_REPLICA;
        ctx.metrics.request(route, status, Some(fleet), key_label);
        ctx.metrics.duration(route, started.elapsed().as_secs_f64());
        return next;
    }

    // Prompt extraction and hashing read the body where it lies; only the few
    // fields routing keeps past this point are copied out.
    let body_bytes: &[u8] = match &body {
        Body::InBuf(r) => &client.buf[r.clone()],
        Body::Decoded(v) => v,
    };
    let next_local = if keep_alive {
        Next::KeepAlive
    } else {
        Next::Close
    };
    let a = match crate::prefix::analyze(&path, body_bytes, &shared.prefix) {
        Ok(a) => a,
        Err(e) => {
            let kind = ErrorKind::BadRequest;
            send_error(
                client,
                kind,
                &format!("invalid request body: {e}"),
                !keep_alive,
                write_limit,
            )
            .await;
            client.buf.drain(..consumed.min(client.buf.len()));
            ctx.metrics.request(route, 400, None, key_label);
            return next_local;
        }
    };
    // Auth, phase 2: the model and the prompt bytes, before the cache and
    // routing. Bodies whose prompt kvroute does not extract count whole.
    let charged = if a.endpoint == crate::prompt::Endpoint::Other {
        body_len
    } else {
        a.prompt_bytes
    };
    if let Err(d) = shared
        .auth
        .check_body(&caller, a.fields.model, charged, Instant::now())
    {
        send_denial(client, &d, !keep_alive, write_limit).await;
        client.buf.drain(..consumed.min(client.buf.len()));
        ctx.metrics.request(route, d.kind.status(), None, key_label);
        return next_local;
    }
    let cache_plan = match &shared.cache {
        Some(c) => c.plan(&head, &client.buf, &path, &a, body_bytes, caller.tenant()),
        None => crate::cache::Plan::Off,
    };
    let (model, hashes, prompt_bytes, user) = (
        a.fields.model.map(str::to_owned),
        a.hashes,
        a.prompt_bytes,
        a.fields.user.map(|u| u.as_bytes().to_vec()),
    );
    // Sampled for pre-warming standbys: the anchor (the system prompt's blocks)
    // and one request body that starts with it.
    if !hashes.is_empty() && matches!(route, "completions" | "chat_completions") {
        let n = ctx.sampled.get().wrapping_add(1);
        ctx.sampled.set(n);
        if n % crate::hot::SAMPLE_EVERY == 1 {
            let k = shared.cfg.routing.anchor_blocks().min(hashes.len());
            shared
                .hot
                .record(hashes[k - 1], model.as_deref(), &path, body_bytes);
        }
    }
    let session = head
        .header(&client.buf, &shared.cfg.routing.session_header)
        .map(<[u8]>::to_vec)
        .or(user);
    // A hit answers here, before routing, with no upstream contact. A miss may
    // lead a single flight, held until the response is stored.
    let mut _flight = None;
    if let (
        Some(cache),
        crate::cache::Plan::Use {
            key,
            delivery,
            lookup: true,
        },
    ) = (&shared.cache, cache_plan)
    {
        match cache.lookup(key, delivery).await {
            crate::cache::Lookup::Hit(entry) => {
                let (sent, next) = answer_from_cache(client, &entry, keep_alive, write_limit).await;
                client.buf.drain(..consumed.min(client.buf.len()));
                ctx.metrics.bytes_out.increment(sent as u64);
                // Answered from the prediction cache: its own "replica" label.
                ctx.metrics
                    .request(route, 200, Some((u16::MAX - 1, "cache")), key_label);
                metrics::histogram!(m::REQUEST_DURATION, "route" => route)
                    .record(started.elapsed().as_secs_f64());
                return next;
            }
            crate::cache::Lookup::Miss(f) => _flight = f,
        }
    }
    let tap = crate::cache::Tap::new(shared.cache.as_ref(), cache_plan);
    let upstream_head = build_upstream_head(
        &head,
        &client.buf,
        client.peer,
        body_len,
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
            path: &path,
            model: model.as_deref(),
            session: session.as_deref(),
            block_hashes: &hashes,
            prompt_bytes,
            now_ms: shared.now_ms(),
        },
        head: &upstream_head,
        body: body_buf,
        body_range,
        is_head,
        client_keep_alive: keep_alive,
        tap: &tap,
        key: caller.tenant(),
    };
    let outcome = forward(ctx, client, &mut x).await;
    if in_client_buf {
        client.buf = std::mem::take(&mut x.body);
    }
    // Drop this request's bytes; a pipelined next request stays at the front.
    client.buf.drain(..consumed.min(client.buf.len()));

    let (status, replica_label, next) = match outcome {
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
            let extra = crate::admission::retry_after_header(&shared.table.admission, kind);
            send_error_with(
                client,
                kind,
                &error.message,
                &extra,
                !keep_alive,
                write_limit,
            )
            .await;
            (
                kind.status(),
                replica,
                if keep_alive {
                    Next::KeepAlive
                } else {
                    Next::Close
                },
            )
        }
        Outcome::ClientGone { status, replica } => (status, replica, Next::Close),
    };
    ctx.metrics.request(
        route,
        status,
        replica_label
            .as_deref()
            .map(|r| (r.slot, r.spec.url.as_str())),
        key_label,
    );
    ctx.metrics.duration(route, started.elapsed().as_secs_f64());
    next
}

/// Writes a stored answer; returns the bytes sent and what the connection does next.
async fn answer_from_cache<C: Conn>(
    client: &mut Client<C>,
    e: &crate::cache::Entry,
    keep_alive: bool,
    limit: Duration,
) -> (usize, Next) {
    let mut out = Vec::with_capacity(e.head.len() + e.body.len() + 128);
    out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    out.extend_from_slice(&e.head);
    let _ = write!(
        out,
        "x-kvroute-cache: hit\r\ncontent-length: {}\r\n",
        e.body.len()
    );
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&e.body);
    write_local(client, out, keep_alive, limit).await
}

/// Writes a response kvroute made itself; returns the bytes sent and what the
/// connection does next.
async fn write_local<C: Conn>(
    client: &mut Client<C>,
    out: Vec<u8>,
    keep_alive: bool,
    limit: Duration,
) -> (usize, Next) {
    let n = out.len();
    let (r, _) = write_client(&mut client.io, out, 0..n, limit).await;
    let next = if r.is_ok() && keep_alive {
        Next::KeepAlive
    } else {
        Next::Close
    };
    (n, next)
}

enum Outcome {
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
struct Exchange<'a> {
    /// What the router sees of it.
    req: RouteRequest<'a>,
    /// Request line and headers for the replica, without `host` and the final
    /// CRLF (see [`build_upstream_head`]).
    head: &'a [u8],
    /// The body is `body[body_range]`: the client's buffer, lent for the
    /// duration, or a decoded chunked body.
    body: Vec<u8>,
    body_range: Range<usize>,
    is_head: bool,
    client_keep_alive: bool,
    tap: &'a crate::cache::Tap,
    /// The API key's tenant, for its share of the admission queue.
    key: Option<&'a str>,
}

/// A response head from a replica, and the bytes read with it (`buf[..head.len]`
/// is the head; what follows is the start of the body).
struct Response {
    head: ResponseHead,
    buf: Vec<u8>,
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

/// The live replica set and admission queue, as the planner sees them for one request.
struct View<'a, R: Runtime> {
    ctx: &'a WorkerCtx<R>,
    req: &'a RouteRequest<'a>,
    set: &'a crate::replica::ReplicaSet,
}

impl<R: Runtime> plan::Fleet for View<'_, R> {
    type Candidate = Decision;

    fn waiters_ahead(&self) -> bool {
        self.ctx
            .shared
            .table
            .admission
            .has_waiters_for(self.req.model)
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
        self.ctx.shared.table.admission.enabled()
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
    let up_cfg = &shared.cfg.upstream;
    let admission = &shared.table.admission;
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
    let up_cfg = &ctx.shared.cfg.upstream;
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
fn passive_failure<R: Runtime>(ctx: &WorkerCtx<R>, replica: &Replica, why: &str) {
    let shared = &ctx.shared;
    let up = &shared.cfg.upstream;
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
    let limit = Duration::from_millis(ctx.shared.cfg.upstream.connect_timeout_ms);
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

/// Streams the response to the client as it arrives.
async fn relay<R: Runtime>(
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
    let cfg = &ctx.shared.cfg;
    let write_limit = Duration::from_millis(cfg.limits.write_timeout_ms);
    let read_limit = Duration::from_millis(cfg.upstream.read_timeout_ms);
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
        return (
            Outcome::ClientGone {
                status,
                replica: replica_label,
            },
            false,
        );
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
            return (
                Outcome::ClientGone {
                    status,
                    replica: replica_label,
                },
                false,
            );
        }
        let take = match tracker.advance(&ubuf[..read]) {
            Ok(t) => t,
            Err(_) => {
                metrics::counter!(m::ERRORS, "kind" => "upstream_framing").increment(1);
                passive_failure(ctx, replica, "invalid chunked framing");
                return (
                    Outcome::ClientGone {
                        status,
                        replica: replica_label,
                    },
                    false,
                );
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
            return (
                Outcome::ClientGone {
                    status,
                    replica: replica_label,
                },
                false,
            );
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
