//! Answers kvroute writes itself: errors (OpenAI-shaped), denials, local
//! responses, all within the client write timeout.

use std::ops::Range;
use std::time::Duration;

use tokio::time::timeout;

use super::{Client, Next};
use crate::http::{ErrorKind, ErrorResponse};
use crate::io::Conn;
use crate::metrics as m;

pub(super) async fn write_client<C: Conn>(
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

pub(super) async fn send_error<C: Conn>(
    client: &mut Client<C>,
    kind: ErrorKind,
    message: &str,
    close: bool,
    limit: Duration,
) {
    send_error_with(client, kind, message, "", close, limit).await
}

/// [`send_error`] with extra header lines.
pub(super) async fn send_error_with<C: Conn>(
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

pub(super) async fn send_denial<C: Conn>(
    client: &mut Client<C>,
    d: &crate::auth::Denial,
    close: bool,
    limit: Duration,
) {
    send_error_with(client, d.kind, &d.message, &d.headers(), close, limit).await
}

/// Writes a response kvroute made itself; returns the bytes sent and what the
/// connection does next.
pub(super) async fn write_local<C: Conn>(
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
