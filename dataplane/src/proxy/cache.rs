//! Prediction cache phase: a request looked up, and a stored answer written
//! back without upstream contact.

use std::io::Write as _;
use std::time::Duration;

use super::respond::write_local;
use super::{log, Client, Next, Request, Stream};
use crate::io::{Conn, Runtime};
use crate::worker::WorkerCtx;

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

/// Looks the request up when its plan says so. A hit is answered here,
/// before routing, with no upstream contact: `Err` with what the connection
/// does next. A miss may lead a single flight, held until the response is stored.
pub(super) async fn lookup<'s, R: Runtime>(
    ctx: &'s WorkerCtx<R>,
    client: &mut Client<Stream<R>>,
    rq: &Request<'_>,
    plan: crate::cache::Plan,
) -> Result<Option<crate::cache::single_flight::Flight<'s>>, Next> {
    let (
        Some(cache),
        crate::cache::Plan::Use {
            key,
            delivery,
            lookup: true,
        },
    ) = (&ctx.shared.cache, plan)
    else {
        return Ok(None);
    };
    match cache.lookup(key, delivery).await {
        crate::cache::Lookup::Hit(entry) => {
            let (sent, next) =
                answer_from_cache(client, &entry, rq.keep_alive, rq.write_limit).await;
            rq.done(client);
            ctx.metrics.bytes_out.increment(sent as u64);
            // Answered from the prediction cache: its own "replica" label.
            log::finish(ctx, rq, 200, Some((u16::MAX - 1, "cache")));
            Err(next)
        }
        crate::cache::Lookup::Miss(f) => Ok(f),
    }
}
