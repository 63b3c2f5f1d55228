//! The I/O boundary: everything the proxy needs from a runtime, in one small
//! trait pair, so the same proxy logic runs on io_uring (tokio-uring) or on epoll
//! (tokio current-thread) and tokio-uring's API never leaks past this module.
//!
//! Buffers are owned and handed back (io_uring completes into memory the kernel
//! holds until the operation ends, so it cannot borrow a caller's slice).

mod epoll;
mod uring;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::ops::Range;

pub use epoll::Epoll;
pub use uring::{uring_available, Uring};

/// Which runtime a worker runs.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum IoMode {
    /// io_uring when the kernel and seccomp allow it, else epoll.
    Auto,
    Uring,
    Epoll,
}

/// A connected TCP stream.
pub trait Conn: 'static {
    /// Reads into `buf`'s spare capacity (reserving `min_free` first), appending.
    /// Returns the number of bytes read; 0 means end of stream.
    fn read(
        &mut self,
        buf: &mut Vec<u8>,
        min_free: usize,
    ) -> impl Future<Output = io::Result<usize>>;

    /// Writes `buf[range]` completely and hands the buffer back.
    fn write_all(
        &mut self,
        buf: Vec<u8>,
        range: Range<usize>,
    ) -> impl Future<Output = (io::Result<()>, Vec<u8>)>;

    /// Waits until a read would find bytes or the end of the stream, holding
    /// as little memory as the runtime allows meanwhile: epoll waits for
    /// readiness and reads nothing; io_uring, which has no readiness wait
    /// here, reads into `small` (appending; a buffer without spare room gets
    /// [`SMALL_READ`] bytes of it), so the caller must look there first.
    /// `Ok(false)`: the peer ended the stream (known without another read);
    /// an error is the connection's end too.
    fn wait_readable(&mut self, small: &mut Vec<u8>) -> impl Future<Output = io::Result<bool>>;

    /// Half-closes the write side (used before closing so the peer sees FIN after our last bytes).
    fn shutdown_write(&mut self);

    /// Whether the peer has closed or reset the connection, checked without
    /// reading (bytes it sent stay unread). False when it cannot tell.
    fn peer_closed(&self) -> bool {
        false
    }

    /// Shuts both directions at once: the peer sees the end now, and a read
    /// still pending on the socket (io_uring's, which dropping its future does
    /// not cancel) completes, so the socket closes when this value is dropped
    /// rather than whenever the peer next sends.
    fn abort(&mut self) {
        self.shutdown_write();
    }

    /// Ends the connection politely: a TLS connection sends its close_notify
    /// first; a plain one just half-closes.
    fn close(&mut self) -> impl Future<Output = ()> {
        self.shutdown_write();
        std::future::ready(())
    }
}

/// A runtime flavour: how to run a worker, accept and connect.
pub trait Runtime: 'static {
    type Conn: Conn;
    type Listener: 'static;
    const NAME: &'static str;

    /// Runs `fut` to completion on this thread; spawned tasks use `tokio::task::spawn_local`.
    fn block_on<F: Future>(fut: F) -> io::Result<F::Output>;
    fn listener(l: std::net::TcpListener) -> io::Result<Self::Listener>;
    fn accept(l: &Self::Listener) -> impl Future<Output = io::Result<(Self::Conn, SocketAddr)>>;
    fn connect(addr: SocketAddr) -> impl Future<Output = io::Result<Self::Conn>>;
}

/// What [`Conn::wait_readable`] reads at most on io_uring: most of a short
/// request head, and little memory for a connection that sends nothing.
pub const SMALL_READ: usize = 512;

/// Makes room for at least `min_free` more bytes, growing geometrically.
pub(crate) fn reserve(buf: &mut Vec<u8>, min_free: usize) {
    if buf.capacity() - buf.len() < min_free {
        buf.reserve(min_free.max(buf.len()));
    }
}
