//! One client connection: read a request, route it, forward it, stream the
//! response back, repeat while keep-alive allows.
//!
//! Generic over [`Runtime`], so io_uring and epoll run exactly this code.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::time::timeout;

use crate::budget::registry::ConnState;
use crate::http::ErrorKind;
use crate::io::{Conn, Runtime};
use crate::metrics as m;
use crate::route::RouteRequest;
use crate::tls::MaybeTls;
use crate::worker::WorkerCtx;

mod cache;
mod error;
mod plan;
mod read;
mod relay;
mod respond;
mod upstream;

use cache::answer_from_cache;
use read::{read_body, read_head, refuse_unread, Body};
use respond::{send_denial, send_error, send_error_with, write_local};
use upstream::{build_upstream_head, forward, Exchange, Outcome};

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
