//! Plain or TLS: the connection type the proxy reads and writes, on both sides
//! (a client that came in on the listener, a pooled connection to a replica).

use std::io;
use std::ops::Range;

use rustls::pki_types::ServerName;

use super::TlsConn;
use crate::io::Conn;

pub enum MaybeTls<C> {
    Plain(C),
    /// Boxed: rustls's state is large, and most connections of a sidecar are plain.
    Tls(Box<TlsConn<C>>),
}

impl<C: Conn> MaybeTls<C> {
    /// The name a TLS connection to a replica was verified for; `None` when plain.
    pub fn server_name(&self) -> Option<&ServerName<'static>> {
        match self {
            MaybeTls::Plain(_) => None,
            MaybeTls::Tls(t) => t.server_name(),
        }
    }
}

impl<C: Conn> Conn for MaybeTls<C> {
    async fn read(&mut self, buf: &mut Vec<u8>, min_free: usize) -> io::Result<usize> {
        match self {
            MaybeTls::Plain(c) => c.read(buf, min_free).await,
            MaybeTls::Tls(t) => t.read(buf, min_free).await,
        }
    }

    async fn write_all(&mut self, buf: Vec<u8>, range: Range<usize>) -> (io::Result<()>, Vec<u8>) {
        match self {
            MaybeTls::Plain(c) => c.write_all(buf, range).await,
            MaybeTls::Tls(t) => t.write_all(buf, range).await,
        }
    }

    async fn wait_readable(&mut self, small: &mut Vec<u8>) -> io::Result<bool> {
        match self {
            MaybeTls::Plain(c) => c.wait_readable(small).await,
            MaybeTls::Tls(t) => t.wait_readable(small).await,
        }
    }

    fn shutdown_write(&mut self) {
        match self {
            MaybeTls::Plain(c) => c.shutdown_write(),
            MaybeTls::Tls(t) => t.shutdown_write(),
        }
    }

    fn peer_closed(&self) -> bool {
        match self {
            MaybeTls::Plain(c) => c.peer_closed(),
            MaybeTls::Tls(t) => t.peer_closed(),
        }
    }

    fn abort(&mut self) {
        match self {
            MaybeTls::Plain(c) => c.abort(),
            MaybeTls::Tls(t) => t.abort(),
        }
    }

    async fn close(&mut self) {
        match self {
            MaybeTls::Plain(c) => c.close().await,
            MaybeTls::Tls(t) => t.close().await,
        }
    }
}
