use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::ops::Range;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{reserve, Conn, Runtime};

/// tokio's epoll reactor on a current-thread runtime with a `LocalSet`.
pub struct Epoll;

pub struct EpollConn(tokio::net::TcpStream);

impl Conn for EpollConn {
    async fn read(&mut self, buf: &mut Vec<u8>, min_free: usize) -> io::Result<usize> {
        reserve(buf, min_free);
        self.0.read_buf(buf).await
    }

    async fn write_all(&mut self, buf: Vec<u8>, range: Range<usize>) -> (io::Result<()>, Vec<u8>) {
        let r = self.0.write_all(&buf[range]).await;
        (r, buf)
    }

    /// A one-byte peek rather than `readable()`: a socket tokio has just
    /// registered reports itself readable once whether or not it is, and a
    /// buffer taken on that word would be held through the whole idle wait.
    /// The peek clears a false readiness and waits again.
    async fn wait_readable(&mut self, _small: &mut Vec<u8>) -> io::Result<bool> {
        let mut probe = [0u8; 1];
        self.0.peek(&mut probe).await.map(|n| n > 0)
    }

    fn shutdown_write(&mut self) {
        let _ = socket2::SockRef::from(&self.0).shutdown(std::net::Shutdown::Write);
    }

    fn peer_closed(&self) -> bool {
        use std::os::fd::AsRawFd;
        crate::sys::peer::peer_closed(self.0.as_raw_fd())
    }

    fn abort(&mut self) {
        let _ = socket2::SockRef::from(&self.0).shutdown(std::net::Shutdown::Both);
    }
}

impl Runtime for Epoll {
    type Conn = EpollConn;
    type Listener = tokio::net::TcpListener;
    const NAME: &'static str = "epoll";

    fn block_on<F: Future>(fut: F) -> io::Result<F::Output> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let local = tokio::task::LocalSet::new();
        Ok(local.block_on(&rt, fut))
    }

    fn listener(l: std::net::TcpListener) -> io::Result<Self::Listener> {
        l.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(l)
    }

    async fn accept(l: &Self::Listener) -> io::Result<(Self::Conn, SocketAddr)> {
        let (s, a) = l.accept().await?;
        s.set_nodelay(true)?;
        Ok((EpollConn(s), a))
    }

    async fn connect(addr: SocketAddr) -> io::Result<Self::Conn> {
        let s = tokio::net::TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(EpollConn(s))
    }
}
