//! The steady load the drills run under: short completions and streams at a
//! fixed rate (open loop: each latency counts from the scheduled send), plus a
//! few long streams kept open back to back. Every request goes on its own
//! connection (`connection: close`), so a drill that breaks connections
//! (a replica killed, a hand-off) shows in the requests begun around it, and
//! each is tallied under the drill that was running when it started.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::tally::{classify, Got, Tally};

/// Requests started outside any drill's window (warm-up, recovery) count nowhere.
pub const NO_DRILL: usize = usize::MAX;
/// Requests waiting for a connection at once, at most: enough for the rate
/// times a stream's length, with room for a stall.
const SENDERS: usize = 96;
/// Longest a request may take before it counts as a timeout.
const READ_LIMIT: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
pub struct Spec {
    pub addr: SocketAddr,
    pub model: String,
    /// Requests per second, short and streamed together.
    pub rate: f64,
    /// Out of every 10 paced requests, how many stream.
    pub streams_in_10: u64,
    /// Long streams kept open at all times.
    pub long_streams: usize,
    pub drills: usize,
}

#[derive(Clone, Copy)]
enum Kind {
    Short,
    Stream,
    Long,
}

impl Kind {
    fn max_tokens(self) -> u32 {
        match self {
            Kind::Short => 8,
            Kind::Stream => 40,
            Kind::Long => 300,
        }
    }
    fn streams(self) -> bool {
        !matches!(self, Kind::Short)
    }
}

pub struct Load {
    stop: Arc<AtomicBool>,
    drill: Arc<AtomicUsize>,
    tallies: Arc<Mutex<Vec<Tally>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    pub fn start(spec: &Spec) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let drill = Arc::new(AtomicUsize::new(NO_DRILL));
        let tallies = Arc::new(Mutex::new(vec![Tally::default(); spec.drills]));
        let seq = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        let (tx, rx) = mpsc::channel::<(Instant, Kind, usize)>();
        let rx = Arc::new(Mutex::new(rx));
        {
            let (stop, drill, rate, share) = (
                stop.clone(),
                drill.clone(),
                spec.rate.max(0.1),
                spec.streams_in_10,
            );
            threads.push(std::thread::spawn(move || {
                let interval = Duration::from_secs_f64(1.0 / rate);
                let start = Instant::now();
                let mut i: u64 = 0;
                while !stop.load(Ordering::Relaxed) {
                    let due = start + interval.mul_f64(i as f64);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let kind = if i % 10 < share {
                        Kind::Stream
                    } else {
                        Kind::Short
                    };
                    if tx.send((due, kind, drill.load(Ordering::Relaxed))).is_err() {
                        return;
                    }
                    i += 1;
                }
            }));
        }
        for _ in 0..SENDERS {
            let (rx, tallies, seq, spec) = (rx.clone(), tallies.clone(), seq.clone(), spec.clone());
            threads.push(std::thread::spawn(move || loop {
                let job = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                let Ok((due, kind, drill)) = job else { return };
                let n = seq.fetch_add(1, Ordering::Relaxed);
                run_one(&spec, kind, n, due, drill, &tallies);
            }));
        }
        for _ in 0..spec.long_streams {
            let (stop, drill, tallies, seq, spec) = (
                stop.clone(),
                drill.clone(),
                tallies.clone(),
                seq.clone(),
                spec.clone(),
            );
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let n = seq.fetch_add(1, Ordering::Relaxed);
                    let d = drill.load(Ordering::Relaxed);
                    let started = Instant::now();
                    run_one(&spec, Kind::Long, n, started, d, &tallies);
                    // A refused connection returns at once: do not spin on it.
                    if started.elapsed() < Duration::from_millis(100) {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }));
        }
        Load {
            stop,
            drill,
            tallies,
            threads,
        }
    }

    /// Requests started from now on count for drill `i` (or [`NO_DRILL`]).
    pub fn set_drill(&self, i: usize) {
        self.drill.store(i, Ordering::Relaxed);
    }

    /// Stops pacing, waits for every request under way, returns the sums.
    pub fn finish(self) -> Vec<Tally> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let t = self.tallies.lock().unwrap_or_else(|e| e.into_inner());
        t.clone()
    }
}

fn run_one(
    spec: &Spec,
    kind: Kind,
    n: u64,
    due: Instant,
    drill: usize,
    tallies: &Mutex<Vec<Tally>>,
) {
    let body = format!(
        "{{\"model\":\"{}\",\"prompt\":\"Drill request {n}: summarise the incident report in three lines.\",\"max_tokens\":{},\"stream\":{}}}",
        spec.model,
        kind.max_tokens(),
        kind.streams()
    );
    let got = exchange(spec.addr, &body);
    let outcome = classify(kind.streams(), &got);
    let latency_ms = due.elapsed().as_secs_f64() * 1e3;
    if drill == NO_DRILL {
        return;
    }
    let mut t = tallies.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(t) = t.get_mut(drill) {
        t.add(kind.streams(), &outcome, latency_ms);
    }
}

/// One POST on a new connection, read until the server closes it.
fn exchange(addr: SocketAddr, body: &str) -> Got {
    let mut raw = Vec::new();
    let error = (|| -> std::io::Result<()> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(READ_LIMIT))?;
        s.set_nodelay(true)?;
        write!(
            s,
            "POST /v1/completions HTTP/1.1\r\nhost: drills\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )?;
        let mut buf = [0u8; 16 * 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(k) => raw.extend_from_slice(&buf[..k]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    })()
    .err()
    .map(|e| e.kind());
    parse_response(&raw, error)
}

/// A response read to the connection's end: its status, its body (chunked
/// framing removed), and an error when the body is shorter than its framing
/// says (or reading failed).
pub fn parse_response(raw: &[u8], error: Option<std::io::ErrorKind>) -> Got {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut r = httparse::Response::new(&mut headers);
    let head_len = match r.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => {
            return Got {
                status: None,
                body: Vec::new(),
                error: Some(error.unwrap_or(std::io::ErrorKind::UnexpectedEof)),
            }
        }
    };
    let header = |name: &str| {
        r.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).to_ascii_lowercase())
    };
    let rest = &raw[head_len..];
    let (body, whole) = if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        dechunk(rest)
    } else if let Some(len) = header("content-length").and_then(|v| v.trim().parse().ok()) {
        let len: usize = len;
        (rest[..len.min(rest.len())].to_vec(), rest.len() >= len)
    } else {
        (rest.to_vec(), true)
    };
    let error = error.or((!whole).then_some(std::io::ErrorKind::UnexpectedEof));
    Got {
        status: r.code,
        body,
        error,
    }
}

/// The data of a chunked body, and whether its last chunk arrived.
fn dechunk(mut b: &[u8]) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return (out, false);
        };
        let line = String::from_utf8_lossy(&b[..eol]);
        let Ok(size) = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
        else {
            return (out, false);
        };
        if size == 0 {
            return (out, true);
        }
        let start = eol + 2;
        if b.len() < start + size + 2 {
            out.extend_from_slice(&b[start..b.len().min(start + size)]);
            return (out, false);
        }
        out.extend_from_slice(&b[start..start + size]);
        b = &b[start + size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::super::tally::Outcome;
    use super::*;

    #[test]
    fn chunked_stream_cut_before_done_is_broken_even_when_framing_ends() {
        let head = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
        let ev = "data: {\"x\":1}\n\n";
        let done = "data: [DONE]\n\n";
        let whole = format!(
            "{head}{:x}\r\n{ev}\r\n{:x}\r\n{done}\r\n0\r\n\r\n",
            ev.len(),
            done.len()
        );
        let got = parse_response(whole.as_bytes(), None);
        assert_eq!(got.status, Some(200));
        assert_eq!(classify(true, &got), Outcome::Ok);
        // kvroute ends a stream its replica cut with a clean last chunk.
        let ended = format!("{head}{:x}\r\n{ev}\r\n0\r\n\r\n", ev.len());
        let got = parse_response(ended.as_bytes(), None);
        assert_eq!(got.error, None);
        assert_eq!(classify(true, &got), Outcome::Broken);
        // The connection closed inside a chunk.
        let cut = format!("{head}{:x}\r\n{}", ev.len(), &ev[..5]);
        let got = parse_response(cut.as_bytes(), None);
        assert_eq!(got.error, Some(std::io::ErrorKind::UnexpectedEof));
        assert_eq!(classify(true, &got), Outcome::Broken);
    }

    #[test]
    fn short_answers_by_length_and_no_head_at_all() {
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(classify(false, &parse_response(ok, None)), Outcome::Ok);
        let short = b"HTTP/1.1 200 OK\r\ncontent-length: 20\r\n\r\n{}";
        assert_eq!(
            classify(false, &parse_response(short, None)),
            Outcome::Failed("cut body".into())
        );
        let err = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(
            classify(false, &parse_response(err, None)),
            Outcome::Failed("http 503".into())
        );
        assert_eq!(
            classify(
                false,
                &parse_response(b"", Some(std::io::ErrorKind::ConnectionReset))
            ),
            Outcome::Failed("reset".into())
        );
        assert_eq!(
            classify(false, &parse_response(b"HTTP/1.1 2", None)),
            Outcome::Failed("eof".into())
        );
    }
}
