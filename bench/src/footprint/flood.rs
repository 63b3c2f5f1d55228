//! The connection-flood sections of `cargo xtask bench footprint`: what idle
//! connections cost kvroute and whether that memory comes back once they
//! close (under `--io uring` and `--io epoll`), and whether a good client is
//! still answered while a flood runs past `[limits] max_connections`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvroute_testkit::metrics_text::Samples;
use kvroute_testkit::port::free_addr;

use super::{http_200, http_get, Mem};
use crate::fleet::child::Child;

/// How long after the flood's connections closed memory is read.
pub const SETTLE: Duration = Duration::from_secs(20);

pub struct FloodRow {
    pub io: &'static str,
    pub conns: usize,
    pub idle: Mem,
    pub flooded: Mem,
    /// (seconds after the last connection closed, memory)
    pub after: Vec<(u64, Mem)>,
    /// kvroute's open descriptors with the flood open, and 20 s after it closed.
    pub fds: (usize, usize),
}

impl FloodRow {
    pub fn bytes_per_conn(&self) -> f64 {
        (self.flooded.rss_kb as f64 - self.idle.rss_kb as f64) * 1024.0 / self.conns.max(1) as f64
    }

    /// The first second after which RSS stayed within 10 % of idle.
    pub fn back_within_10pct(&self) -> Option<u64> {
        let limit = self.idle.rss_kb as f64 * 1.1;
        let mut first = None;
        for (t, m) in &self.after {
            if (m.rss_kb as f64) <= limit {
                first.get_or_insert(*t);
            } else {
                first = None;
            }
        }
        first
    }

    pub fn final_mem(&self) -> &Mem {
        self.after.last().map_or(&self.flooded, |(_, m)| m)
    }
}

pub struct CapRow {
    pub io: &'static str,
    pub max_connections: usize,
    pub flood: usize,
    /// Good requests during the flood: latencies of the answered ones (s).
    pub good: Vec<f64>,
    pub good_failed: u64,
    pub sheds: String,
    pub refused: String,
    /// kvroute's open connections at most, sampled while flooding.
    pub peak_open: u64,
}

fn start(
    bin: &Path,
    dir: &Path,
    up: SocketAddr,
    io: &str,
    max_connections: usize,
) -> anyhow::Result<(Child, SocketAddr, SocketAddr)> {
    let listen = free_addr();
    let admin = free_addr();
    let cfg = dir.join(format!("flood-{io}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "listen = \"{listen}\"\nadmin = \"{admin}\"\nworkers = 2\npin_workers = false\n\
             io = \"{io}\"\nsteering = \"kernel\"\nlog = \"warn\"\n\n[limits]\nmax_connections = {max_connections}\n\n\
             [[replicas]]\nurl = \"http://{up}\"\n"
        ),
    )?;
    let log = dir.join(format!("flood-{io}.log"));
    let mut c = Child::spawn(
        "kvroute",
        bin,
        &["--config".into(), cfg.display().to_string()],
        &log,
    )?;
    let end = Instant::now() + Duration::from_secs(10);
    while !http_200(admin, "/healthz") {
        c.ensure_running()?;
        anyhow::ensure!(
            Instant::now() < end,
            "kvroute --io {io} not ready after 10 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok((c, listen, admin))
}

/// Open client connections over all workers, from `/state`.
fn open_connections(admin: SocketAddr) -> u64 {
    let resp = http_get(admin, "/state");
    let body = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let st: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    st["workers"]
        .as_array()
        .map(|ws| ws.iter().filter_map(|w| w["connections"].as_u64()).sum())
        .unwrap_or(0)
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn one_request(addr: SocketAddr) -> anyhow::Result<()> {
    let body = r#"{"model":"m","prompt":"hello","max_tokens":1}"#;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(
        format!(
            "POST /v1/completions HTTP/1.1\r\nHost: bench\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    anyhow::ensure!(
        out.starts_with(b"HTTP/1.1 200"),
        "answer: {}",
        String::from_utf8_lossy(&out[..out.len().min(200)])
    );
    Ok(())
}

/// `n` connections to `addr` that send nothing.
fn open_silent(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok())
        .collect()
}

/// Idle cost and memory return under `io` with `conns` silent connections.
pub fn measure_flood(
    bin: &Path,
    dir: &Path,
    up: SocketAddr,
    io: &'static str,
    conns: usize,
) -> anyhow::Result<FloodRow> {
    eprintln!("xtask: footprint: flood of {conns} idle connections, --io {io}");
    // A cap above the flood: this section measures memory, not shedding.
    let (mut child, listen, admin) = start(bin, dir, up, io, 2 * conns + 64)?;
    let pid = child.id();
    for _ in 0..16 {
        one_request(listen)?;
    }
    std::thread::sleep(Duration::from_secs(2));
    let idle = Mem::of_tree(pid);
    let flood = open_silent(listen, conns);
    let opened = flood.len();
    let end = Instant::now() + Duration::from_secs(30);
    while open_connections(admin) < opened as u64 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(1));
    child.ensure_running()?;
    let flooded = Mem::of_tree(pid);
    let fds_open = fds(pid);
    drop(flood);
    let end = Instant::now() + Duration::from_secs(30);
    while open_connections(admin) > 0 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    let closed = Instant::now();
    let mut after = Vec::new();
    for t in 1..=SETTLE.as_secs() {
        let until = closed + Duration::from_secs(t);
        std::thread::sleep(until.saturating_duration_since(Instant::now()));
        after.push((t, Mem::of_tree(pid)));
    }
    child.ensure_running()?;
    Ok(FloodRow {
        io,
        conns: opened,
        idle,
        flooded,
        after,
        fds: (fds_open, fds(pid)),
    })
}

/// A flood of `flood` silent connections past `max_connections` while a good
/// client sends a request every 50 ms.
pub fn measure_cap(
    bin: &Path,
    dir: &Path,
    up: SocketAddr,
    io: &'static str,
    max_connections: usize,
    flood: usize,
) -> anyhow::Result<CapRow> {
    eprintln!(
        "xtask: footprint: flood of {flood} past max_connections = {max_connections}, --io {io}"
    );
    let (mut child, listen, admin) = start(bin, dir, up, io, max_connections)?;
    one_request(listen)?;
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(open_connections(admin), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let flooder = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            // Kept open, as an attacker would: kvroute must close them itself.
            let mut held = Vec::new();
            while held.len() < flood && !stop.load(Ordering::Relaxed) {
                held.extend(open_silent(listen, 50));
            }
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(20));
            }
            held.len()
        })
    };
    let mut good = Vec::new();
    let mut good_failed = 0;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(5) {
        let t = Instant::now();
        match one_request(listen) {
            Ok(()) => good.push(t.elapsed().as_secs_f64()),
            Err(_) => good_failed += 1,
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    let opened = flooder.join().unwrap_or(0);
    let _ = sampler.join();
    child.ensure_running()?;
    let m = Samples::parse(&http_get(admin, "/metrics"));
    let shed = |reason: &str| -> String {
        let v = m.sum("kvroute_connection_sheds_total", &[("reason", reason)]);
        format!("{v:.0}")
    };
    let sheds = format!("{} head-less, {} idle", shed("headless"), shed("idle"));
    let refused = shed("over_cap");
    Ok(CapRow {
        io,
        max_connections,
        flood: opened,
        good,
        good_failed,
        sheds,
        refused,
        peak_open: peak.load(Ordering::Relaxed),
    })
}

fn mib(kb: u64) -> String {
    format!("{:.1}", kb as f64 / 1024.0)
}

/// The report's flood section.
pub fn render(rows: &[FloodRow], caps: &[CapRow]) -> String {
    let mut s = String::from("## Connection flood\n\n");
    s.push_str(
        "kvroute (release, 2 workers, `steering = \"kernel\"`, `max_connections` above N so \
         nothing is shed) with N client connections that connect and send nothing, kept open, \
         then all closed by the client. RSS idle is read \
         after 16 requests and 2 s; with the flood open once every connection is accepted; after \
         it, each second for 20 s once `/state` counts no connection. Run alone with \
         `cargo xtask bench footprint --flood-only` (the bench raises its own and kvroute raises \
         its open-file limit to the hard limit).\n\n\
         | io | N | RSS idle MiB | RSS with N open MiB | bytes per idle connection | RSS 2 s / 5 s / 20 s after close MiB | back within 10 % of idle after | kvroute fds open / after |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for r in rows {
        let back = r
            .back_within_10pct()
            .map_or("not within 20 s".to_string(), |t| format!("{t} s"));
        let at = |t: u64| {
            r.after
                .iter()
                .find(|(s, _)| *s == t)
                .map_or("-".to_string(), |(_, m)| mib(m.rss_kb))
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {:.0} | {} / {} / {} | {back} | {} / {} |\n",
            r.io,
            r.conns,
            mib(r.idle.rss_kb),
            mib(r.flooded.rss_kb),
            r.bytes_per_conn(),
            at(2),
            at(5),
            mib(r.final_mem().rss_kb),
            r.fds.0,
            r.fds.1,
        ));
    }
    if !caps.is_empty() {
        s.push_str(
            "\n### A flood past `[limits] max_connections`\n\n\
             The same kvroute with a small `max_connections`; a flood opens silent connections \
             (kept open by the flooder) while a good client sends a request on a new connection \
             every 50 ms for 5 s. kvroute sheds the oldest head-less connections above 90 % of a \
             worker's share and refuses (503) only when nothing can be shed.\n\n\
             | io | max_connections | flood connections | good requests answered | failed | latency median / max | open at most | shed | refused (503) |\n\
             | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
        );
        for c in caps {
            let mut l = c.good.clone();
            l.sort_by(f64::total_cmp);
            let med = l.get(l.len() / 2).copied().unwrap_or(0.0) * 1000.0;
            let max = l.last().copied().unwrap_or(0.0) * 1000.0;
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {med:.1} ms / {max:.1} ms | {} | {} | {} |\n",
                c.io,
                c.max_connections,
                c.flood,
                c.good.len(),
                c.good_failed,
                c.peak_open,
                c.sheds,
                c.refused
            ));
        }
    }
    s
}
