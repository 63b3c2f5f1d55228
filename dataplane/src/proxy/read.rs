//! Read-the-request phase: the head, the body (within `[limits]`), and the
//! answer to a request refused on its head alone.

use std::ops::Range;
use std::time::Duration;

use tokio::time::timeout;

use super::error::Error;
use super::respond::{send_denial, write_client};
use super::{Client, Next, Stream, DRAIN_LINGER, HEAD_READ_MIN, READ_CHUNK};
use crate::budget::registry::ConnState;
use crate::http::{parse_request_head, BodyFraming, ChunkedDecoder, ErrorKind, RequestHead};
use crate::io::{Conn, Runtime};
use crate::worker::WorkerCtx;

/// Answers a request `[auth]` refused on its head alone. Its body is still
/// read (within `[limits]`) and dropped, so the client reads the answer
/// rather than a reset, and the connection can carry on; a client waiting for
/// `100 Continue` never gets it and the connection closes instead.
pub(super) async fn refuse_unread<R: Runtime>(
    ctx: &WorkerCtx<R>,
    client: &mut Client<Stream<R>>,
    head: &RequestHead,
    route: &'static str,
    denial: crate::auth::Denial,
) -> Next {
    let write_limit = Duration::from_millis(ctx.shared.limits.write_timeout_ms);
    let status = denial.kind.status();
    let next = if head.expect_continue && client.buf.len() == head.len {
        send_denial(client, &denial, true, write_limit).await;
        Next::Close
    } else {
        match read_body(ctx, client, head).await {
            Ok((_, consumed)) => {
                ctx.metrics.bytes_in.increment(consumed as u64);
                let keep_alive = head.keep_alive && !ctx.shared.drain.is_draining();
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
    super::log::refused(ctx, route, denial.label(), status);
    next
}

/// Waits for a complete request head. `Ok(None)`: the connection ended, idled
/// out between requests or was shed by the budget (nothing to answer).
pub(super) async fn read_head<R: Runtime>(
    ctx: &WorkerCtx<R>,
    client: &mut Client<Stream<R>>,
) -> Result<Option<RequestHead>, Error> {
    let lim = &ctx.shared.limits;
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
pub(super) enum Body {
    /// In the client buffer at this range (Content-Length bodies: no copy).
    InBuf(Range<usize>),
    /// Decoded from chunked framing.
    Decoded(Vec<u8>),
}

/// Reads the body; returns it and where the request ends in the client buffer.
pub(super) async fn read_body<R: Runtime>(
    ctx: &WorkerCtx<R>,
    client: &mut Client<Stream<R>>,
    head: &RequestHead,
) -> Result<(Body, usize), Error> {
    let lim = &ctx.shared.limits;
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
    let limit = Duration::from_millis(ctx.shared.limits.write_timeout_ms);
    let (r, _) = write_client(&mut client.io, CONTINUE.to_vec(), 0..CONTINUE.len(), limit).await;
    r.map_err(|_| Error::client(ErrorKind::BadRequest, "client went away"))
}
