//! A client connection on a TLS listener up to the end of its handshake.
//!
//! The whole of it, from accept to the last handshake byte, is bounded by
//! `limits.head_timeout_ms`: a client that sends nothing or half a ClientHello
//! is closed then, and being a task of its own it delays no other connection.
//! A first byte that cannot start a TLS record (0x16) is plain HTTP sent to
//! the TLS port: it gets a plain-HTTP 400 that says so, then the connection
//! closes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{timeout_at, Instant};

use super::stream::HandshakeError;
use super::TlsConn;
use crate::http::{ErrorKind, ErrorResponse};
use crate::io::Conn;
use crate::metrics as m;

/// The first byte of a TLS handshake record.
const HANDSHAKE_RECORD: u8 = 0x16;
const FIRST_READ: usize = 16 * 1024;
/// How long a plain-HTTP client's remaining bytes are read (and dropped) after
/// its 400, so closing does not reset the connection before it reads the answer.
const LINGER: Duration = Duration::from_millis(500);

pub const PLAIN_HTTP_MESSAGE: &str =
    "this port speaks HTTPS: the plain HTTP request was sent to a TLS port; use https://";

/// Runs the server side of the handshake on `io`; `None` when the connection
/// is done (failed, timed out, shed, or was plain HTTP and has been answered).
/// `shed` completes when the connection budget sheds this connection, which
/// it may until the handshake ends.
pub async fn accept<C: Conn>(
    mut io: C,
    config: Arc<rustls::ServerConfig>,
    limit: Duration,
    peer: SocketAddr,
    shed: impl std::future::Future<Output = ()>,
) -> Option<TlsConn<C>> {
    tokio::pin!(shed);
    let deadline = Instant::now() + limit;
    let fail = |reason: &'static str, why: &dyn std::fmt::Display| {
        metrics::counter!(m::TLS_HANDSHAKE_FAILURES, "reason" => reason).increment(1);
        tracing::debug!(%peer, reason, error = %why, "TLS handshake failed");
    };
    // No buffer of FIRST_READ until the ClientHello starts to arrive.
    let mut first = Vec::new();
    let first_bytes = async {
        if !io.wait_readable(&mut first).await? {
            return Ok(0);
        }
        if first.is_empty() {
            return io.read(&mut first, FIRST_READ).await;
        }
        Ok(first.len())
    };
    let got = tokio::select! {
        biased;
        _ = &mut shed => None,
        r = timeout_at(deadline, first_bytes) => Some(r),
    };
    let Some(got) = got else {
        io.abort();
        return None;
    };
    match got {
        Err(_) => {
            fail("timeout", &"no ClientHello before limits.head_timeout_ms");
            // Now, in both directions: on io_uring the abandoned read keeps
            // the socket open until it completes.
            io.abort();
            return None;
        }
        Ok(Ok(0)) => {
            fail("closed", &"closed before sending anything");
            return None;
        }
        Ok(Err(e)) => {
            fail("io", &e);
            return None;
        }
        Ok(Ok(_)) => {}
    }
    if first[0] != HANDSHAKE_RECORD {
        fail("plain_http", &"a plain HTTP request on the TLS port");
        answer_plain_http(io, deadline).await;
        return None;
    }
    let server = match rustls::ServerConnection::new(config) {
        Ok(s) => s,
        Err(e) => {
            fail("protocol", &e);
            return None;
        }
    };
    let mut conn = TlsConn::server(io, server, first);
    let handshake = tokio::select! {
        biased;
        _ = &mut shed => None,
        r = timeout_at(deadline, conn.handshake()) => Some(r),
    };
    let Some(handshake) = handshake else {
        conn.abort();
        return None;
    };
    match handshake {
        Ok(Ok(())) => {
            metrics::counter!(m::TLS_HANDSHAKES).increment(1);
            Some(conn)
        }
        Ok(Err(e)) => {
            fail(reason(&e), &e);
            conn.shutdown_write();
            None
        }
        Err(_) => {
            fail(
                "timeout",
                &"handshake not finished before limits.head_timeout_ms",
            );
            conn.shutdown_write();
            None
        }
    }
}

/// The `reason` label of a failed handshake: a fixed set.
fn reason(e: &HandshakeError) -> &'static str {
    match e {
        HandshakeError::Closed => "closed",
        HandshakeError::Io(_) => "io",
        HandshakeError::Tls(rustls::Error::AlertReceived(_)) => "alert_received",
        HandshakeError::Tls(rustls::Error::PeerIncompatible(_))
        | HandshakeError::Tls(rustls::Error::NoApplicationProtocol) => "incompatible",
        HandshakeError::Tls(_) => "protocol",
    }
}

async fn answer_plain_http<C: Conn>(mut io: C, deadline: Instant) {
    let mut out = Vec::with_capacity(320);
    ErrorResponse::write(&mut out, ErrorKind::BadRequest, PLAIN_HTTP_MESSAGE, true);
    metrics::counter!(m::ERRORS, "kind" => ErrorKind::BadRequest.code()).increment(1);
    let n = out.len();
    let write_until = deadline.max(Instant::now() + LINGER);
    if timeout_at(write_until, io.write_all(out, 0..n))
        .await
        .is_err()
    {
        return;
    }
    io.shutdown_write();
    let linger_until = Instant::now() + LINGER;
    let mut sink = Vec::with_capacity(FIRST_READ);
    while let Ok(Ok(n)) = timeout_at(linger_until, io.read(&mut sink, FIRST_READ)).await {
        if n == 0 || sink.len() > 16 * FIRST_READ {
            break;
        }
        sink.clear();
    }
}
