//! A TLS connection over any [`Conn`]: rustls's buffer API (`read_tls`,
//! `process_new_packets`, `reader`, `writer`, `write_tls`) on in-memory
//! buffers, with the inner connection moving ciphertext in owned buffers, so
//! it works the same on io_uring and epoll.

use std::io::{self, Read, Write};
use std::ops::Range;

use rustls::pki_types::ServerName;

use crate::io::{reserve, Conn};

/// Ciphertext read granularity: one TLS record and then some.
const READ_CHUNK: usize = 32 * 1024;

/// Why a handshake did not complete.
#[derive(Debug)]
pub enum HandshakeError {
    /// The peer closed the connection first.
    Closed,
    Io(io::Error),
    /// The peer's messages were refused by rustls (or it sent an alert).
    Tls(rustls::Error),
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandshakeError::Closed => f.write_str("connection closed during the TLS handshake"),
            HandshakeError::Io(e) => write!(f, "TLS handshake: {e}"),
            HandshakeError::Tls(rustls::Error::InvalidCertificate(e)) => {
                write!(f, "certificate verify failed: {e}")
            }
            HandshakeError::Tls(e) => write!(f, "TLS handshake failed: {e}"),
        }
    }
}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> Self {
        HandshakeError::Io(e)
    }
}

pub struct TlsConn<C> {
    io: C,
    tls: rustls::Connection,
    /// Ciphertext read from `io` and not yet taken by rustls.
    incoming: Vec<u8>,
    /// Ciphertext rustls produced, handed to `io` (and back) on each flush.
    outgoing: Vec<u8>,
    /// `io` reached end of stream.
    eof: bool,
    /// The name an upstream connection was verified for (an IP address too,
    /// though it is sent as no SNI); `None` on the server side.
    server_name: Option<ServerName<'static>>,
}

impl<C: Conn> TlsConn<C> {
    /// A server side whose first bytes (`already_read`, the start of the
    /// ClientHello) were read by the caller to tell TLS from plain HTTP.
    pub fn server(io: C, tls: rustls::ServerConnection, already_read: Vec<u8>) -> Self {
        TlsConn {
            io,
            tls: tls.into(),
            incoming: already_read,
            outgoing: Vec::new(),
            eof: false,
            server_name: None,
        }
    }

    pub fn client(io: C, tls: rustls::ClientConnection, name: ServerName<'static>) -> Self {
        TlsConn {
            io,
            tls: tls.into(),
            incoming: Vec::with_capacity(READ_CHUNK),
            outgoing: Vec::new(),
            eof: false,
            server_name: Some(name),
        }
    }

    /// The name an upstream connection was verified for.
    pub fn server_name(&self) -> Option<&ServerName<'static>> {
        self.server_name.as_ref()
    }

    /// Runs the handshake to its end (the caller bounds it in time).
    pub async fn handshake(&mut self) -> Result<(), HandshakeError> {
        while self.tls.is_handshaking() {
            self.flush().await?;
            if !self.tls.is_handshaking() {
                break;
            }
            if !self.tls.wants_read() {
                return Err(HandshakeError::Tls(rustls::Error::HandshakeNotComplete));
            }
            if self.incoming.is_empty() && self.io.read(&mut self.incoming, READ_CHUNK).await? == 0
            {
                self.eof = true;
                return Err(HandshakeError::Closed);
            }
            if let Err(e) = self.feed() {
                // The alert rustls queued tells the peer why.
                let _ = self.flush().await;
                return Err(e);
            }
        }
        // The last flight (the client's Finished, the server's session tickets).
        self.flush().await?;
        Ok(())
    }

    /// Writes every byte of ciphertext rustls has ready.
    async fn flush(&mut self) -> io::Result<()> {
        while self.tls.wants_write() {
            self.outgoing.clear();
            self.tls.write_tls(&mut self.outgoing)?;
            let out = std::mem::take(&mut self.outgoing);
            let n = out.len();
            let (r, out) = self.io.write_all(out, 0..n).await;
            self.outgoing = out;
            r?;
        }
        Ok(())
    }

    /// Hands rustls what ciphertext there is (or the end of stream) and
    /// processes it.
    fn feed(&mut self) -> Result<(), HandshakeError> {
        if self.incoming.is_empty() {
            if self.eof {
                // An empty read tells rustls the transport has ended.
                self.tls.read_tls(&mut &b""[..])?;
            }
        } else {
            let mut rest = &self.incoming[..];
            self.tls.read_tls(&mut rest)?;
            let used = self.incoming.len() - rest.len();
            self.incoming.drain(..used);
        }
        self.tls
            .process_new_packets()
            .map(|_| ())
            .map_err(HandshakeError::Tls)
    }
}

fn to_io(e: HandshakeError) -> io::Error {
    match e {
        HandshakeError::Io(e) => e,
        HandshakeError::Closed => io::ErrorKind::UnexpectedEof.into(),
        e => io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
    }
}

impl<C: Conn> Conn for TlsConn<C> {
    async fn read(&mut self, buf: &mut Vec<u8>, min_free: usize) -> io::Result<usize> {
        loop {
            reserve(buf, min_free);
            let len = buf.len();
            let room = (buf.capacity() - len).min(min_free.max(READ_CHUNK));
            buf.resize(len + room, 0);
            let r = self.tls.reader().read(&mut buf[len..]);
            match r {
                // Ok(0): the peer's close_notify, a clean end.
                Ok(n) => {
                    buf.truncate(len + n);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => buf.truncate(len),
                // UnexpectedEof: the transport ended without close_notify.
                Err(e) => {
                    buf.truncate(len);
                    return Err(e);
                }
            }
            // Anything rustls wants sent first (alerts, key updates).
            self.flush().await?;
            if self.incoming.is_empty() && !self.eof {
                let n = self.io.read(&mut self.incoming, READ_CHUNK).await?;
                self.eof = n == 0;
            }
            if let Err(e) = self.feed() {
                let _ = self.flush().await;
                return Err(to_io(e));
            }
        }
    }

    async fn write_all(&mut self, buf: Vec<u8>, range: Range<usize>) -> (io::Result<()>, Vec<u8>) {
        let mut pos = range.start;
        while pos < range.end {
            let n = match self.tls.writer().write(&buf[pos..range.end]) {
                Ok(n) => n,
                Err(e) => return (Err(e), buf),
            };
            pos += n;
            if n == 0 && !self.tls.wants_write() {
                return (Err(io::ErrorKind::WriteZero.into()), buf);
            }
            if let Err(e) = self.flush().await {
                return (Err(e), buf);
            }
        }
        (Ok(()), buf)
    }

    /// Ready at once with ciphertext or plaintext already buffered (or the
    /// transport ended); else waits on the transport, whose io_uring bytes
    /// land in `incoming`, where [`Conn::read`] looks first. Always `true`
    /// when it returns `Ok`: the end of the transport is for rustls to judge
    /// (a close_notify or a truncation), which the next read reports.
    async fn wait_readable(&mut self, _small: &mut Vec<u8>) -> io::Result<bool> {
        if !self.incoming.is_empty() || self.eof {
            return Ok(true);
        }
        match self.tls.process_new_packets() {
            Ok(s) if s.plaintext_bytes_to_read() == 0 && !s.peer_has_closed() => {}
            // Buffered plaintext, the peer's close_notify, or an error that the
            // next read reports.
            _ => return Ok(true),
        }
        if !self.io.wait_readable(&mut self.incoming).await? {
            self.eof = true;
        }
        Ok(true)
    }

    fn shutdown_write(&mut self) {
        self.io.shutdown_write();
    }

    /// The socket's view: a reset or a bare FIN shows; a close_notify still
    /// unread counts as data, so that close is noticed only once its FIN is
    /// the last thing left.
    fn peer_closed(&self) -> bool {
        self.eof || self.io.peer_closed()
    }

    fn abort(&mut self) {
        self.io.abort();
    }

    async fn close(&mut self) {
        self.tls.send_close_notify();
        let _ = self.flush().await;
        self.io.shutdown_write();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::VecDeque;
    use std::rc::Rc;
    use std::sync::Arc;

    /// One direction of an in-memory duplex: bytes and whether the writer closed.
    #[derive(Default)]
    struct Pipe {
        bytes: VecDeque<u8>,
        closed: bool,
        waker: Option<std::task::Waker>,
    }

    /// An in-memory connection: reads from one pipe, writes to the other, in
    /// small pieces so records arrive split.
    struct Duplex {
        rx: Rc<RefCell<Pipe>>,
        tx: Rc<RefCell<Pipe>>,
    }

    fn duplex() -> (Duplex, Duplex) {
        let a = Rc::new(RefCell::new(Pipe::default()));
        let b = Rc::new(RefCell::new(Pipe::default()));
        (
            Duplex {
                rx: a.clone(),
                tx: b.clone(),
            },
            Duplex { rx: b, tx: a },
        )
    }

    impl Conn for Duplex {
        async fn read(&mut self, buf: &mut Vec<u8>, _min_free: usize) -> io::Result<usize> {
            std::future::poll_fn(|cx| {
                let mut p = self.rx.borrow_mut();
                if p.bytes.is_empty() {
                    if p.closed {
                        return std::task::Poll::Ready(Ok(0));
                    }
                    p.waker = Some(cx.waker().clone());
                    return std::task::Poll::Pending;
                }
                let n = p.bytes.len().min(1000);
                buf.extend(p.bytes.drain(..n));
                std::task::Poll::Ready(Ok(n))
            })
            .await
        }

        async fn write_all(
            &mut self,
            buf: Vec<u8>,
            range: Range<usize>,
        ) -> (io::Result<()>, Vec<u8>) {
            let mut p = self.tx.borrow_mut();
            p.bytes.extend(&buf[range]);
            if let Some(w) = p.waker.take() {
                w.wake();
            }
            (Ok(()), buf)
        }

        async fn wait_readable(&mut self, small: &mut Vec<u8>) -> io::Result<bool> {
            self.read(small, 1).await.map(|n| n > 0)
        }

        fn shutdown_write(&mut self) {
            let mut p = self.tx.borrow_mut();
            p.closed = true;
            if let Some(w) = p.waker.take() {
                w.wake();
            }
        }
    }

    fn configs() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        let d = crate::tls::load::tests::tempdir("stream");
        let p = crate::tls::load::tests::test_pki(None);
        let w = crate::tls::load::tests::write;
        let server = crate::tls::load::server_config(&crate::tls::TlsConfig {
            cert: w(&d, "cert.pem", &p.cert_pem),
            key: w(&d, "key.pem", &p.key_pem),
        })
        .unwrap();
        let client =
            crate::tls::upstream::client_config(Some(&w(&d, "ca.pem", &p.ca_pem))).unwrap();
        let _ = std::fs::remove_dir_all(d);
        (server, client)
    }

    fn run<F: std::future::Future>(f: F) -> F::Output {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        tokio::task::LocalSet::new().block_on(&rt, f)
    }

    async fn read_exact<C: Conn>(c: &mut C, n: usize) -> Vec<u8> {
        let mut buf = Vec::new();
        while buf.len() < n {
            assert!(c.read(&mut buf, 4096).await.unwrap() > 0, "early end");
        }
        buf
    }

    #[test]
    fn handshake_and_data_both_ways_then_clean_close() {
        let (server_cfg, client_cfg) = configs();
        run(async move {
            let (a, b) = duplex();
            let server = tokio::task::spawn_local(async move {
                let mut s = TlsConn::server(
                    a,
                    rustls::ServerConnection::new(server_cfg).unwrap(),
                    Vec::new(),
                );
                s.handshake().await.unwrap();
                let got = read_exact(&mut s, 100_000).await;
                assert!(got.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
                let reply = b"pong".to_vec();
                let (r, _) = s.write_all(reply, 0..4).await;
                r.unwrap();
                // The client's close_notify: a clean end of stream.
                let mut rest = Vec::new();
                assert_eq!(s.read(&mut rest, 10).await.unwrap(), 0);
                s.close().await;
            });
            let name = ServerName::try_from("localhost").unwrap();
            let mut c = TlsConn::client(
                b,
                rustls::ClientConnection::new(client_cfg, name.clone()).unwrap(),
                name,
            );
            c.handshake().await.unwrap();
            assert_eq!(c.tls.alpn_protocol(), Some(&b"http/1.1"[..]));
            let big: Vec<u8> = (0..100_000).map(|i| (i % 251) as u8).collect();
            let (r, back) = c.write_all(big, 0..100_000).await;
            r.unwrap();
            assert_eq!(back.len(), 100_000, "the buffer comes back");
            assert_eq!(read_exact(&mut c, 4).await, b"pong");
            c.close().await;
            server.await.unwrap();
        });
    }

    #[test]
    fn garbage_and_an_unknown_issuer_fail_the_handshake() {
        let (server_cfg, _) = configs();
        let (_, other_client) = configs();
        run(async move {
            // Bytes that look like a record header but are no ClientHello.
            let (a, mut b) = duplex();
            let (r, _) = b
                .write_all(b"\x16\x03\x01\x00\x05hello".to_vec(), 0..10)
                .await;
            r.unwrap();
            let mut s = TlsConn::server(
                a,
                rustls::ServerConnection::new(server_cfg.clone()).unwrap(),
                Vec::new(),
            );
            assert!(matches!(s.handshake().await, Err(HandshakeError::Tls(_))));

            // A peer that closes halfway.
            let (a, mut b) = duplex();
            b.shutdown_write();
            let mut s = TlsConn::server(
                a,
                rustls::ServerConnection::new(server_cfg.clone()).unwrap(),
                b"\x16\x03\x01".to_vec(),
            );
            assert!(matches!(s.handshake().await, Err(HandshakeError::Closed)));

            // A client trusting another CA.
            let (a, b) = duplex();
            let server = tokio::task::spawn_local(async move {
                let mut s = TlsConn::server(
                    a,
                    rustls::ServerConnection::new(server_cfg).unwrap(),
                    Vec::new(),
                );
                s.handshake().await.is_err()
            });
            let name = ServerName::try_from("127.0.0.1").unwrap();
            let mut c = TlsConn::client(
                b,
                rustls::ClientConnection::new(other_client, name.clone()).unwrap(),
                name,
            );
            let e = c.handshake().await.unwrap_err();
            assert_eq!(
                e.to_string(),
                "certificate verify failed: UnknownIssuer",
                "{e:?}"
            );
            drop(c);
            assert!(server.await.unwrap());
        });
    }
}
