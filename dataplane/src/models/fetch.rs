//! One replica's own `GET /v1/models`, over the worker's runtime.
//!
//! A fresh connection with `connection: close` per fetch rather than one from the
//! worker's pool: fetches are rare (the merged list is cached), and a fresh
//! connection needs no stale-connection retry or body-draining rules to be
//! handed back.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use super::merge::{parse_listing, Listing};
use crate::http::{parse_response_head, ChunkedDecoder, ResponseFraming};
use crate::io::{Conn, Runtime};
use crate::tls::MaybeTls;
use rustls::pki_types::ServerName;

/// Largest model list accepted from one replica (a vLLM with hundreds of LoRA
/// adapters lists a few hundred KiB).
const MAX_BODY: usize = 4 << 20;
const MAX_HEAD: usize = 64 * 1024;
const READ_CHUNK: usize = 16 * 1024;

/// Where a replica is and what to send it.
pub struct Target {
    pub addr: SocketAddr,
    /// `host:port` for the `Host` header.
    pub authority: String,
    /// An `https://` replica's TLS name, and what verifies it.
    pub tls: Option<(ServerName<'static>, Arc<rustls::ClientConfig>)>,
}

/// Asks the replica at `target` for its models within `limit`. `credentials`
/// are the credential header lines a forwarded request would carry (the
/// client's, `[upstream] api_key`), so a replica that requires an API key
/// answers as it would to a forwarded request.
pub async fn fetch<R: Runtime>(target: Target, credentials: Rc<[u8]>, limit: Duration) -> Listing {
    match tokio::time::timeout(limit, exchange::<R>(&target, &credentials)).await {
        Ok(Some((status, body))) => parse_listing(status, &body),
        Ok(None) | Err(_) => Listing::Failed,
    }
}

/// Request out, status and whole body back; `None` on any transport or framing error.
async fn exchange<R: Runtime>(target: &Target, credentials: &[u8]) -> Option<(u16, Vec<u8>)> {
    let tcp = R::connect(target.addr).await.ok()?;
    let mut conn = match &target.tls {
        None => MaybeTls::Plain(tcp),
        Some((name, config)) => crate::tls::upstream::connect(tcp, config.clone(), name)
            .await
            .ok()?,
    };
    let mut req = Vec::with_capacity(160 + credentials.len());
    req.extend_from_slice(b"GET /v1/models HTTP/1.1\r\nhost: ");
    req.extend_from_slice(target.authority.as_bytes());
    req.extend_from_slice(
        b"\r\naccept: application/json\r\nuser-agent: kvroute\r\nconnection: close\r\n",
    );
    req.extend_from_slice(credentials);
    req.extend_from_slice(b"\r\n");
    let n = req.len();
    conn.write_all(req, 0..n).await.0.ok()?;

    let mut buf = Vec::with_capacity(READ_CHUNK);
    let head = loop {
        if conn.read(&mut buf, READ_CHUNK).await.ok()? == 0 {
            return None;
        }
        match parse_response_head(&buf, MAX_HEAD, false) {
            // Interim responses (100, 103): the final one follows.
            Ok(Some(h)) if (100..200).contains(&h.status) => {
                buf.drain(..h.len);
            }
            Ok(Some(h)) => break h,
            Ok(None) => {}
            Err(_) => return None,
        }
    };
    buf.drain(..head.len);
    let body = match head.framing {
        ResponseFraming::None => Vec::new(),
        ResponseFraming::Length(n) => {
            let n = usize::try_from(n).ok().filter(|n| *n <= MAX_BODY)?;
            while buf.len() < n {
                if conn.read(&mut buf, READ_CHUNK).await.ok()? == 0 {
                    return None;
                }
            }
            buf.truncate(n);
            buf
        }
        ResponseFraming::Chunked => {
            let mut dec = ChunkedDecoder::new();
            let mut body = Vec::new();
            loop {
                dec.feed(&buf, Some(&mut body)).ok()?;
                if dec.is_done() {
                    break body;
                }
                if body.len() > MAX_BODY {
                    return None;
                }
                buf.clear();
                if conn.read(&mut buf, READ_CHUNK).await.ok()? == 0 {
                    return None;
                }
            }
        }
        ResponseFraming::UntilClose => loop {
            if buf.len() > MAX_BODY {
                return None;
            }
            if conn.read(&mut buf, READ_CHUNK).await.ok()? == 0 {
                break buf;
            }
        },
    };
    Some((head.status, body))
}
