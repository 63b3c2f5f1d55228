use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::ops::Range;

use tokio_uring::buf::BoundedBuf;

use super::{reserve, Conn, Runtime, SMALL_READ};

/// tokio-uring: reads and writes are io_uring submissions on owned buffers.
pub struct Uring;

pub struct UringConn(tokio_uring::net::TcpStream);

/// Submission queue depth per worker: enough for a few hundred connections'
/// concurrent reads/writes without the completion queue overflowing.
const ENTRIES: u32 = 1024;

/// Whether this process may use io_uring (kernel support, `kernel.io_uring_disabled`,
/// seccomp): creating a ring is the only reliable test.
pub fn uring_available() -> io::Result<()> {
    io_uring::IoUring::new(8).map(|_| ())
}

impl Conn for UringConn {
    async fn read(&mut self, buf: &mut Vec<u8>, min_free: usize) -> io::Result<usize> {
        reserve(buf, min_free);
        let owned = std::mem::take(buf);
        let (len, cap) = (owned.len(), owned.capacity());
        // The kernel writes into the spare capacity; the slice's set_init extends len.
        let (res, slice) = self.0.read(owned.slice(len..cap)).await;
        *buf = slice.into_inner();
        res
    }

    async fn write_all(&mut self, buf: Vec<u8>, range: Range<usize>) -> (io::Result<()>, Vec<u8>) {
        if range.is_empty() {
            return (Ok(()), buf);
        }
        let (res, slice) = self.0.write_all(buf.slice(range)).await;
        (res, slice.into_inner())
    }

    async fn wait_readable(&mut self, small: &mut Vec<u8>) -> io::Result<bool> {
        if small.capacity() == small.len() {
            small.reserve_exact(SMALL_READ);
        }
        let room = small.capacity() - small.len();
        self.read(small, room).await.map(|n| n > 0)
    }

    fn shutdown_write(&mut self) {
        let _ = self.0.shutdown(std::net::Shutdown::Write);
    }

    fn peer_closed(&self) -> bool {
        use std::os::fd::AsRawFd;
        crate::sys::peer::peer_closed(self.0.as_raw_fd())
    }

    fn abort(&mut self) {
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }
}

impl Runtime for Uring {
    type Conn = UringConn;
    type Listener = tokio_uring::net::TcpListener;
    const NAME: &'static str = "io_uring";

    fn block_on<F: Future>(fut: F) -> io::Result<F::Output> {
        let rt = tokio_uring::Runtime::new(tokio_uring::builder().entries(ENTRIES))?;
        Ok(rt.block_on(fut))
    }

    fn listener(l: std::net::TcpListener) -> io::Result<Self::Listener> {
        Ok(tokio_uring::net::TcpListener::from_std(l))
    }

    async fn accept(l: &Self::Listener) -> io::Result<(Self::Conn, SocketAddr)> {
        let (s, a) = l.accept().await?;
        s.set_nodelay(true)?;
        Ok((UringConn(s), a))
    }

    async fn connect(addr: SocketAddr) -> io::Result<Self::Conn> {
        let s = tokio_uring::net::TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(UringConn(s))
    }
}
