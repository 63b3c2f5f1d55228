//! One client connection: read a request, route it, forward it, stream the
//! response back, repeat while keep-alive allows.
//!
//! A request goes through named phases around one `Request` context, each
//! in a file of its own: `read` (head and body), `route` (what routing
//! needs, auth's second look, the cache's plan), `cache` (a prediction
//! cache hit answered), `upstream` (attempts at replicas, as the sans-I/O
//! `plan` decides them), `relay` (the response streamed back) and `log`.
//! `error` is their one error type, `respond` the answers kvroute writes.
//!
//! Generic over [`Runtime`], so io_uring and epoll run exactly this code.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::time::timeout;

use crate::budget::registry::ConnState;
use crate::io::{Conn, Runtime};
use crate::metrics as m;
use crate::tls::MaybeTls;
use crate::worker::WorkerCtx;

mod cache;
mod error;
mod log;
mod plan;
mod read;
mod relay;
mod respond;
mod route;
mod upstream;

use read::{read_body, read_head, refuse_unread};
use respond::send_error;

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
    let stats = &ctx.shared.stats;
    let _open = Gauge::up(&stats.connections);
    let _live = ctx.shared.steering.open(ctx.id);
    let limits = &ctx.shared.limits;
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
        shutdown: ctx.shared.drain.subscribe(),
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
    let idle = Duration::from_millis(ctx.shared.limits.idle_timeout_ms);
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

/// One request's context, from its head to its log line, as its phases pass it on.
struct Request<'c> {
    /// When its head was in.
    started: Instant,
    /// Its route, as metrics label it.
    route: &'static str,
    /// The API key's name, as metrics label it.
    key_label: &'c str,
    /// The connection lives on after the answer: the client asked, and no drain.
    keep_alive: bool,
    is_head: bool,
    path: String,
    /// Where the request ends in the client buffer.
    consumed: usize,
    write_limit: Duration,
}

impl Request<'_> {
    /// What the connection does after an answer kvroute wrote itself.
    fn next(&self) -> Next {
        if self.keep_alive {
            Next::KeepAlive
        } else {
            Next::Close
        }
    }

    /// Drops this request's bytes from the client buffer; a pipelined next
    /// request stays at the front.
    fn done<C>(&self, client: &mut Client<C>) {
        client.buf.drain(..self.consumed.min(client.buf.len()));
    }
}

/// Handles one request on the connection, phase by phase: read it
/// ([`read`]), route it ([`route`]), the prediction cache ([`cache`]), the
/// upstream attempts ([`upstream`], planned by [`plan`]) and the relay
/// ([`relay`]), then count it ([`log`]).
async fn handle_one<R: Runtime>(ctx: &Rc<WorkerCtx<R>>, client: &mut Client<Stream<R>>) -> Next {
    let shared = &ctx.shared;
    let write_limit = Duration::from_millis(shared.limits.write_timeout_ms);
    let head = match read_head(ctx, client).await {
        Ok(Some(h)) => h,
        Ok(None) => return Next::Close,
        Err(rej) => {
            send_error(client, rej.kind, &rej.message, true, write_limit).await;
            return Next::Close;
        }
    };
    let stats = &shared.stats;
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
            log::refused(ctx, route, key_label, rej.kind.status());
            return Next::Close;
        }
    };
    ctx.metrics.bytes_in.increment(consumed as u64);
    let rq = Request {
        started,
        route,
        key_label,
        keep_alive: head.keep_alive && !shared.drain.is_draining(),
        is_head: head.is_head,
        path: head.path(&client.buf).to_string(),
        consumed,
        write_limit,
    };

    if let Some(query) = crate::models::Query::of(head.method(&client.buf), &rq.path) {
        return route::answer_models(ctx, client, &rq, &head, &caller, query).await;
    }
    let routing = match route::prepare(ctx, &client.buf, &head, &body, &caller, &rq) {
        Ok(r) => r,
        Err(refusal) => return route::refuse(ctx, client, &rq, refusal).await,
    };
    let _flight = match cache::lookup(ctx, client, &rq, routing.cache_plan).await {
        Ok(flight) => flight,
        Err(answered) => return answered,
    };
    let (status, replica, next) =
        upstream::send(ctx, client, &rq, &head, body, &routing, &caller).await;
    log::finish(
        ctx,
        &rq,
        status,
        replica.as_deref().map(|r| (r.slot, r.spec.url.as_str())),
    );
    next
}
