//! Prediction cache phase: a stored answer written back without upstream contact.

use std::io::Write as _;
use std::time::Duration;

use super::respond::write_local;
use super::{Client, Next};
use crate::io::Conn;

/// Writes a stored answer; returns the bytes sent and what the connection does next.
pub(super) async fn answer_from_cache<C: Conn>(
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
