//! A replica gone bad: it passes its health check (`GET /health` 200) but
//! answers every other request with bytes that are not HTTP, or with a
//! response cut off inside its body, alternately. Until it is switched on it
//! fails its health check, so the control daemon keeps it out of rotation.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub struct Garbage {
    pub addr: SocketAddr,
    on: Arc<AtomicBool>,
    /// Requests under `/v1/` it answered with garbage.
    answered: Arc<AtomicU64>,
}

const NOT_HTTP: &[u8] = b"\x00\x01garbage from a confused replica\r\n\r\n";
const CUT: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 400\r\n\r\n{\"id\":\"cmpl-cut\",\"choices\":[";

impl Garbage {
    pub fn start() -> anyhow::Result<Garbage> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?;
        let on = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let (on2, answered2) = (on.clone(), answered.clone());
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { continue };
                let (on, answered) = (on2.clone(), answered2.clone());
                std::thread::spawn(move || serve(s, &on, &answered));
            }
        });
        Ok(Garbage { addr, on, answered })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn switch(&self, on: bool) {
        self.on.store(on, Ordering::SeqCst);
    }

    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }
}

fn serve(mut s: TcpStream, on: &AtomicBool, answered: &AtomicU64) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut buf = Vec::new();
    let mut tmp = [0u8; 8192];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut tmp) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    }
    let line = String::from_utf8_lossy(&buf[..buf.iter().position(|b| *b == b'\r').unwrap_or(0)])
        .into_owned();
    let path = line.split(' ').nth(1).unwrap_or("");
    let on = on.load(Ordering::SeqCst);
    let reply: &[u8] = if path.starts_with("/health") || path.starts_with("/metrics") {
        if on {
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        } else {
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        }
    } else if !path.starts_with("/v1/") {
        // The control daemon's engine probes (`/props`): not what the drill is about.
        b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    } else if answered.fetch_add(1, Ordering::Relaxed).is_multiple_of(2) {
        NOT_HTTP
    } else {
        CUT
    };
    let _ = s.write_all(reply);
}
