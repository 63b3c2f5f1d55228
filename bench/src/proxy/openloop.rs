//! Open-loop load: requests are scheduled at a constant rate regardless of how
//! fast answers come back, and each latency is measured from the request's
//! *scheduled* time, so a stall shows up in the latency of every request it
//! delayed (no coordinated omission).
//!
//! A dedicated OS thread keeps the schedule (std's sleep is an hrtimer, tokio's
//! timer wheel has 1 ms granularity, which would dwarf a ~100 µs overhead) and
//! hands due requests to a fixed pool of keep-alive connections on a
//! current-thread tokio runtime. How late the generator itself sends is recorded
//! separately, so its own noise is visible next to the results.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use kvroute_load::progress::Counters;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Mutex};

pub struct Params {
    pub addr: SocketAddr,
    pub rate: u64,
    pub duration: Duration,
    pub connections: usize,
    pub request: Arc<Vec<u8>>,
    /// Sent, completed and failed requests as the run goes (for its progress line).
    pub counters: Arc<Counters>,
}

#[derive(Default)]
pub struct Outcome {
    /// Latency from scheduled send to the response's last byte, in ns (sorted).
    pub latencies_ns: Vec<u64>,
    /// Latency from the actual send (excludes the generator's own lateness; not
    /// coordinated-omission safe, so it is a lower bound), in ns (sorted).
    pub service_ns: Vec<u64>,
    /// How late the request left the generator relative to its schedule, in ns (sorted).
    pub send_lag_ns: Vec<u64>,
    pub scheduled: u64,
    pub errors: u64,
    /// Completions per second over the schedule's duration plus the drain time.
    pub achieved_rate: f64,
}

pub fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[i.clamp(1, sorted.len()) - 1]
}

pub fn run(p: &Params) -> anyhow::Result<Outcome> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(p))
}

async fn run_async(p: &Params) -> anyhow::Result<Outcome> {
    let mut conns = Vec::with_capacity(p.connections);
    for _ in 0..p.connections {
        let s = TcpStream::connect(p.addr)
            .await
            .with_context(|| format!("connect {}", p.addr))?;
        s.set_nodelay(true)?;
        conns.push(s);
    }
    let (tx, rx) = mpsc::unbounded_channel::<Instant>();
    let rx = Arc::new(Mutex::new(rx));
    let total = p.rate * p.duration.as_secs_f64() as u64;
    let interval = Duration::from_secs_f64(1.0 / p.rate as f64);
    // Small lead so the first sends are not late because connections are still being polled.
    let start = Instant::now() + Duration::from_millis(20);
    let pacer = std::thread::spawn(move || {
        for i in 0..total {
            let due = start + interval.mul_f64(i as f64);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if tx.send(due).is_err() {
                break;
            }
        }
    });
    let mut tasks = Vec::with_capacity(conns.len());
    for s in conns {
        let rx = rx.clone();
        let req = p.request.clone();
        tasks.push(tokio::spawn(conn_loop(s, rx, req, p.counters.clone())));
    }
    let mut out = Outcome {
        scheduled: total,
        ..Default::default()
    };
    for t in tasks {
        let (lat, svc, lag, errs) = t.await?;
        out.latencies_ns.extend(lat);
        out.service_ns.extend(svc);
        out.send_lag_ns.extend(lag);
        out.errors += errs;
    }
    let _ = pacer.join();
    let elapsed = start.elapsed().as_secs_f64();
    out.latencies_ns.sort_unstable();
    out.send_lag_ns.sort_unstable();
    out.service_ns.sort_unstable();
    out.achieved_rate = out.latencies_ns.len() as f64 / elapsed.max(1e-9);
    if out.latencies_ns.is_empty() {
        bail!("no request completed against {}", p.addr);
    }
    Ok(out)
}

/// One keep-alive connection: take the next due request, send, read the response.
/// A broken connection ends this worker (the others carry the load, and the
/// lost requests show as errors and as a missed rate).
async fn conn_loop(
    mut s: TcpStream,
    rx: Arc<Mutex<mpsc::UnboundedReceiver<Instant>>>,
    req: Arc<Vec<u8>>,
    counters: Arc<Counters>,
) -> (Vec<u64>, Vec<u64>, Vec<u64>, u64) {
    let mut lat = Vec::new();
    let mut svc = Vec::new();
    let mut lag = Vec::new();
    let mut errors = 0;
    let mut buf = Vec::with_capacity(4096);
    loop {
        let due = {
            let mut g = rx.lock().await;
            match g.recv().await {
                Some(d) => d,
                None => break,
            }
        };
        let sent = Instant::now();
        counters.sent();
        lag.push(sent.saturating_duration_since(due).as_nanos() as u64);
        let result = exchange(&mut s, &req, &mut buf).await;
        counters.finished(result.is_ok());
        match result {
            Ok(()) => {
                let end = Instant::now();
                lat.push(end.saturating_duration_since(due).as_nanos() as u64);
                svc.push(end.saturating_duration_since(sent).as_nanos() as u64);
            }
            Err(_) => {
                errors += 1;
                break;
            }
        }
    }
    (lat, svc, lag, errors)
}

async fn exchange(s: &mut TcpStream, req: &[u8], buf: &mut Vec<u8>) -> anyhow::Result<()> {
    s.write_all(req).await?;
    buf.clear();
    let (head_len, body_len) = loop {
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(4096);
        }
        if s.read_buf(buf).await? == 0 {
            bail!("connection closed");
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(n) = resp.parse(buf)? {
            if resp.code != Some(200) {
                bail!("status {:?}", resp.code);
            }
            let cl = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .context("response without content-length")?;
            let cl: usize = std::str::from_utf8(cl.value)?.trim().parse()?;
            break (n, cl);
        }
    };
    while buf.len() < head_len + body_len {
        buf.reserve(head_len + body_len - buf.len());
        if s.read_buf(buf).await? == 0 {
            bail!("connection closed inside the body");
        }
    }
    // One request in flight per connection, so nothing may follow the body.
    if buf.len() != head_len + body_len {
        bail!("unexpected bytes after the response");
    }
    Ok(())
}
