//! The shared backend: a minimal RESP2 client (GET, SET PX, AUTH, SELECT) over
//! tokio's TCP, with one idle-connection list per worker thread.
//!
//! Hand-written rather than a client crate: the data plane needs four commands,
//! a hard per-call deadline of a few milliseconds and nothing that spawns its own
//! tasks or runtime, and the worker runtimes are per-thread (tokio-uring or
//! current-thread tokio), where a multiplexing client's background task would be
//! tied to whichever worker first created it.

use std::cell::RefCell;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::metrics as m;

/// After a failure the backend is skipped this long, so a dead Redis costs one
/// timeout per interval rather than one per request.
const BACKOFF: Duration = Duration::from_millis(1000);
/// Idle connections kept per worker thread.
const MAX_IDLE: usize = 8;

thread_local! {
    static IDLE: RefCell<Vec<(SocketAddr, TcpStream)>> = const { RefCell::new(Vec::new()) };
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisUrl {
    pub host: String,
    pub port: u16,
    pub db: u32,
    pub password: Option<String>,
}

/// Why `prediction_cache.backend` cannot be used. The messages never carry the
/// URL's password.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("must start with redis:// or valkey://")]
    Scheme,
    #[error("bad database number {0:?}")]
    Database(String),
    #[error("bad port {0:?}")]
    Port(String),
    #[error("no host")]
    NoHost,
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot resolve {0}")]
    NoAddress(String),
}

/// `redis://[[user]:password@]host[:port][/db]` (also `valkey://`).
pub fn parse_url(s: &str) -> Result<RedisUrl, BackendError> {
    let rest = s
        .strip_prefix("redis://")
        .or_else(|| s.strip_prefix("valkey://"))
        .ok_or(BackendError::Scheme)?;
    let (auth, rest) = match rest.rsplit_once('@') {
        Some((a, r)) => (Some(a), r),
        None => (None, rest),
    };
    let password = auth.and_then(|a| {
        let p = a.split_once(':').map_or(a, |(_, p)| p);
        (!p.is_empty()).then(|| p.to_string())
    });
    let (hostport, db) = match rest.split_once('/') {
        Some((h, "")) => (h, 0),
        Some((h, d)) => (
            h,
            d.parse()
                .map_err(|_| BackendError::Database(d.to_string()))?,
        ),
        None => (rest, 0),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
            (h, p.parse().map_err(|_| BackendError::Port(p.to_string()))?)
        }
        _ => (hostport, 6379),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(BackendError::NoHost);
    }
    Ok(RedisUrl {
        host: host.into(),
        port,
        db,
        password,
    })
}

pub struct Backend {
    addr: SocketAddr,
    url: RedisUrl,
    timeout: Duration,
    started: Instant,
    /// Milliseconds since `started` before which the backend is not tried.
    down_until: AtomicU64,
}

enum Reply {
    Ok,
    Nil,
    Bulk(Vec<u8>),
}

impl Backend {
    /// Resolves the host once, at start: a lookup per request would cost more than the budget.
    pub fn new(url: &str, timeout: Duration) -> Result<Backend, BackendError> {
        let url = parse_url(url)?;
        let addr = (url.host.as_str(), url.port)
            .to_socket_addrs()
            .map_err(|source| BackendError::Resolve {
                host: url.host.clone(),
                source,
            })?
            .next()
            .ok_or_else(|| BackendError::NoAddress(url.host.clone()))?;
        Ok(Backend {
            addr,
            url,
            timeout,
            started: Instant::now(),
            down_until: AtomicU64::new(0),
        })
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn available(&self) -> bool {
        self.now_ms() >= self.down_until.load(Ordering::Relaxed)
    }

    fn failed(&self, op: &'static str) {
        metrics::counter!(m::CACHE_BACKEND_ERRORS, "op" => op).increment(1);
        self.down_until.store(
            self.now_ms() + BACKOFF.as_millis() as u64,
            Ordering::Relaxed,
        );
    }

    fn redis_key(key: u128) -> Vec<u8> {
        format!("kvroute:pc:{key:032x}").into_bytes()
    }

    pub async fn get(&self, key: u128) -> Option<Vec<u8>> {
        if !self.available() {
            return None;
        }
        let k = Self::redis_key(key);
        match tokio::time::timeout(self.timeout, self.call(&[b"GET", &k])).await {
            Ok(Ok(Reply::Bulk(v))) => Some(v),
            Ok(Ok(_)) => None,
            Ok(Err(_)) | Err(_) => {
                self.failed("get");
                None
            }
        }
    }

    pub async fn set(&self, key: u128, value: &[u8], ttl: Duration) {
        if !self.available() {
            return;
        }
        let k = Self::redis_key(key);
        let px = ttl.as_millis().max(1).to_string();
        // Writes happen after the client has its answer, so they get more room.
        let limit = self.timeout * 4;
        match tokio::time::timeout(limit, self.call(&[b"SET", &k, value, b"PX", px.as_bytes()]))
            .await
        {
            Ok(Ok(Reply::Ok)) => {}
            _ => self.failed("set"),
        }
    }

    async fn connect(&self) -> std::io::Result<TcpStream> {
        let mut s = TcpStream::connect(self.addr).await?;
        s.set_nodelay(true)?;
        let mut buf = Vec::new();
        if let Some(p) = &self.url.password {
            roundtrip(&mut s, &[b"AUTH", p.as_bytes()], &mut buf).await?;
        }
        if self.url.db != 0 {
            let db = self.url.db.to_string();
            roundtrip(&mut s, &[b"SELECT", db.as_bytes()], &mut buf).await?;
        }
        Ok(s)
    }

    /// One command on an idle or new connection. A connection goes back to the
    /// idle list only after a whole reply: one cut by the timeout is dropped.
    async fn call(&self, args: &[&[u8]]) -> std::io::Result<Reply> {
        let idle = IDLE.with(|i| {
            let mut i = i.borrow_mut();
            let pos = i.iter().position(|(a, _)| *a == self.addr)?;
            Some(i.swap_remove(pos).1)
        });
        let mut s = match idle {
            Some(s) => s,
            None => self.connect().await?,
        };
        let mut buf = Vec::new();
        let r = roundtrip(&mut s, args, &mut buf).await?;
        IDLE.with(|i| {
            let mut i = i.borrow_mut();
            if i.len() < MAX_IDLE {
                i.push((self.addr, s));
            }
        });
        Ok(r)
    }
}

fn bad(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string())
}

async fn roundtrip(s: &mut TcpStream, args: &[&[u8]], buf: &mut Vec<u8>) -> std::io::Result<Reply> {
    let mut out = Vec::with_capacity(32 + args.iter().map(|a| a.len() + 16).sum::<usize>());
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    s.write_all(&out).await?;
    buf.clear();
    loop {
        if let Some(r) = parse_reply(buf)? {
            return Ok(r);
        }
        buf.reserve(16 * 1024);
        if s.read_buf(buf).await? == 0 {
            return Err(bad("redis closed the connection"));
        }
    }
}

/// A complete reply at the start of `buf`, `None` if more bytes are needed.
fn parse_reply(buf: &[u8]) -> std::io::Result<Option<Reply>> {
    let Some(eol) = memchr::memmem::find(buf, b"\r\n") else {
        return Ok(None);
    };
    let line = &buf[1..eol];
    match buf.first() {
        Some(b'+') => Ok(Some(Reply::Ok)),
        Some(b'-') => Err(bad("redis error reply")),
        Some(b'$') => {
            let n: i64 = std::str::from_utf8(line)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad("bad bulk length"))?;
            if n < 0 {
                return Ok(Some(Reply::Nil));
            }
            let start = eol + 2;
            let end = start + n as usize;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            Ok(Some(Reply::Bulk(buf[start..end].to_vec())))
        }
        _ => Err(bad("unexpected redis reply")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = parse_url("redis://127.0.0.1:6380/2").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.db, u.password),
            ("127.0.0.1", 6380, 2, None)
        );
        let u = parse_url("redis://:pw@cache").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.password.as_deref()),
            ("cache", 6379, Some("pw"))
        );
        let u = parse_url("valkey://user:pw@[::1]:7000").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 7000));
        assert!(parse_url("http://x").is_err());
        assert!(parse_url("redis://x:notaport").is_err());
    }

    #[test]
    fn replies() {
        assert!(matches!(parse_reply(b"+OK\r\n").unwrap(), Some(Reply::Ok)));
        assert!(matches!(parse_reply(b"$-1\r\n").unwrap(), Some(Reply::Nil)));
        assert!(parse_reply(b"$5\r\nhel").unwrap().is_none());
        match parse_reply(b"$5\r\nhello\r\n").unwrap() {
            Some(Reply::Bulk(v)) => assert_eq!(v, b"hello"),
            _ => panic!(),
        }
        assert!(parse_reply(b"-ERR x\r\n").is_err());
    }
}
