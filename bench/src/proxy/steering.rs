//! The steering section of `cargo xtask bench proxy`: kvroute with 2 workers
//! (pinned, one per core) under long-lived SSE streams, eBPF `p2c` steering
//! against the kernel's `SO_REUSEPORT` hash.
//!
//! Per round and steering, a fresh kvroute (the kernel's hash of a connection's
//! 4-tuple is random per connection, so one run says little): `streams` SSE
//! streams opened in bursts of `burst` concurrent connects, live streams per
//! worker read from `GET /state`; then, while the streams flow, short requests
//! on new connections (each one steered like any connection) measure the time
//! to the first response byte, and each worker thread's CPU time over that
//! window is read from /proc.
//!
//! The upstream runs in this process: streams get one token event every
//! `token_ms` until the client goes away; other requests get a small JSON body
//! at once, so the TTFB is kvroute's, not a model's.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::targets;

pub struct Params {
    pub rounds: usize,
    pub streams: usize,
    pub burst: usize,
    pub token_ms: u64,
    pub probes: usize,
    pub probe_rate: u64,
}

/// One steering mode over every round.
pub struct Row {
    pub name: String,
    /// Per round: live streams per worker once every stream is open.
    pub spreads: Vec<Vec<u64>>,
    /// Per round: CPU time of each worker thread over the probe window, ÷ wall time.
    pub busy: Vec<Vec<f64>>,
    /// Every round's probe TTFBs, pooled and sorted.
    pub ttfb_ns: Vec<u64>,
    pub errors: u64,
    /// Why the row did not run as asked (eBPF unavailable).
    pub note: Option<String>,
}

const MODES: [(&str, &str); 2] = [("eBPF `p2c`", "ebpf-required"), ("kernel hash", "kernel")];
const WORKERS: usize = 2;

pub fn run(bin: &Path, dir: &Path, p: &Params) -> anyhow::Result<Vec<Row>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let upstream = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let up_port = upstream.local_addr()?.port();
    rt.spawn(serve_upstream(upstream, Duration::from_millis(p.token_ms)));

    let mut rows: Vec<Row> = MODES
        .iter()
        .map(|(name, _)| Row {
            name: name.to_string(),
            spreads: Vec::new(),
            busy: Vec::new(),
            ttfb_ns: Vec::new(),
            errors: 0,
            note: None,
        })
        .collect();
    for r in 0..p.rounds {
        // Alternate which mode goes first, so drift on the host hits both alike.
        for k in 0..MODES.len() {
            let i = (k + r) % MODES.len();
            if rows[i].note.is_some() {
                continue;
            }
            eprintln!(
                "xtask: steering round {}/{}, {} ({} streams, a token every {} ms)",
                r + 1,
                p.rounds,
                MODES[i].0,
                p.streams,
                p.token_ms
            );
            match one_round(&rt, bin, dir, MODES[i].1, up_port, p) {
                Ok(m) => {
                    eprintln!(
                        "xtask:   live streams per worker {:?}, worker CPU {:?}, TTFB p99 {:.0} µs",
                        m.spread,
                        m.busy
                            .iter()
                            .map(|b| format!("{:.0}%", b * 100.0))
                            .collect::<Vec<_>>(),
                        pct(&sorted(m.ttfb_ns.clone()), 99.0) as f64 / 1e3
                    );
                    let row = &mut rows[i];
                    row.spreads.push(m.spread);
                    row.busy.push(m.busy);
                    row.ttfb_ns.extend(m.ttfb_ns);
                    row.errors += m.errors;
                }
                Err(e) => {
                    eprintln!("xtask: steering {}: {e:#}", MODES[i].0);
                    rows[i].note = Some(format!("{e:#}").lines().next().unwrap_or("").into());
                }
            }
        }
    }
    for row in &mut rows {
        row.ttfb_ns.sort_unstable();
    }
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(rows)
}

struct Measured {
    spread: Vec<u64>,
    busy: Vec<f64>,
    ttfb_ns: Vec<u64>,
    errors: u64,
}

fn one_round(
    rt: &tokio::runtime::Runtime,
    bin: &Path,
    dir: &Path,
    steering: &str,
    up_port: u16,
    p: &Params,
) -> anyhow::Result<Measured> {
    let port = kvroute_testkit::port::free_port();
    let admin = kvroute_testkit::port::free_port();
    let conf = dir.join("kvroute-steering.toml");
    std::fs::write(
        &conf,
        "pin_workers = true\nshutdown_grace_ms = 2000\n[upstream]\npool_max_idle = 1024\n",
    )?;
    let mut argv: Vec<String> = [
        "--config",
        &conf.display().to_string(),
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--admin",
        &format!("127.0.0.1:{admin}"),
        "--workers",
        &WORKERS.to_string(),
        "--policy",
        "round-robin",
        "--replica",
        &format!("http://127.0.0.1:{up_port}"),
        "--steering",
        steering,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if steering != "kernel" {
        argv.extend(["--steering-mode".into(), "p2c".into()]);
    }
    argv.insert(0, bin.display().to_string());
    let log = dir.join(format!("kvroute-steering-{steering}.log"));
    // Every CPU: kvroute pins worker k to core k itself.
    let cpus = format!("0-{}", std::thread::available_parallelism()?.get() - 1);
    let mut proc = targets::spawn(&format!("kvroute-{steering}"), &cpus, &argv, &log)?;
    targets::wait_ready(&mut proc, port, "/health", &log, Duration::from_secs(15))?;
    let admin: SocketAddr = ([127, 0, 0, 1], admin).into();
    let st = state(admin)?;
    if steering != "kernel" && st["attached"] != true {
        bail!("eBPF steering unavailable: {}", st["fallback_reason"]);
    }

    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let stop = Arc::new(AtomicBool::new(false));
    let mut streams = Vec::with_capacity(p.streams);
    let mut opened = 0;
    while opened < p.streams {
        let n = p.burst.min(p.streams - opened);
        let first: Vec<_> = (0..n)
            .map(|_| {
                let (tx, rx) = tokio::sync::oneshot::channel();
                streams.push(rt.spawn(stream(addr, tx, stop.clone())));
                rx
            })
            .collect();
        for rx in first {
            rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), rx).await })
                .context("a stream got no first event in 10 s")?
                .context("a stream failed before its first event")?;
        }
        opened += n;
        std::thread::sleep(Duration::from_millis(100));
    }
    let live = |st: &serde_json::Value| -> Vec<u64> {
        st["workers"]
            .as_array()
            .map(|w| {
                w.iter()
                    .filter_map(|w| w["live_streams"].as_u64())
                    .collect()
            })
            .unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let spread = loop {
        let l = live(&state(admin)?);
        if l.iter().sum::<u64>() == p.streams as u64 {
            break l;
        }
        if Instant::now() > deadline {
            bail!("live streams never reached {}: {l:?}", p.streams);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Let the streams reach a steady state before measuring.
    std::thread::sleep(Duration::from_secs(1));
    let before = worker_ticks(proc.pid());
    let t0 = Instant::now();
    let (ttfb_ns, errors) = probe(addr, p.probes, p.probe_rate);
    let wall = t0.elapsed().as_secs_f64();
    let after = worker_ticks(proc.pid());
    let tck = targets::clock_ticks();
    let busy = (0..WORKERS)
        .map(|w| after[w].saturating_sub(before[w]) as f64 / tck / wall)
        .collect();

    stop.store(true, Ordering::Relaxed);
    for s in streams {
        s.abort();
    }
    // Closed client connections end the streams; then a quick clean exit (pins removed).
    std::thread::sleep(Duration::from_millis(300));
    drop(proc);
    Ok(Measured {
        spread,
        busy,
        ttfb_ns,
        errors,
    })
}

/// One SSE stream through kvroute: signals its first event, then reads until stopped.
async fn stream(
    addr: SocketAddr,
    first: tokio::sync::oneshot::Sender<()>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let body = r#"{"model":"bench-model","prompt":"Tell me a long story.","max_tokens":100000,"stream":true}"#;
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(
        format!(
            "POST /v1/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await?;
    let mut buf = vec![0u8; 16384];
    let mut seen = Vec::new();
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            bail!("closed before the first event");
        }
        seen.extend_from_slice(&buf[..n]);
        if find(&seen, b"data: ").is_some() {
            break;
        }
    }
    anyhow::ensure!(seen.starts_with(b"HTTP/1.1 200"), "not a 200");
    let _ = first.send(());
    while !stop.load(Ordering::Relaxed) {
        if s.read(&mut buf).await? == 0 {
            break;
        }
    }
    Ok(())
}

/// Short requests, each on a new connection, paced at `rate` per second:
/// time from connect to the first response byte.
fn probe(addr: SocketAddr, n: usize, rate: u64) -> (Vec<u64>, u64) {
    let body = r#"{"model":"bench-model","prompt":"Hi","max_tokens":1}"#;
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let every = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let start = Instant::now();
    let mut out = Vec::with_capacity(n);
    let mut errors = 0;
    for i in 0..n {
        let at = start + every * i as u32;
        if let Some(d) = at.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
        let one = || -> std::io::Result<u64> {
            let t0 = Instant::now();
            let mut s = TcpStream::connect(addr)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(req.as_bytes())?;
            let mut b = [0u8; 4096];
            let k = s.read(&mut b)?;
            let ttfb = t0.elapsed().as_nanos() as u64;
            let mut rest = Vec::new();
            s.read_to_end(&mut rest)?;
            if k == 0 || !b.starts_with(b"HTTP/1.1 200") {
                return Err(std::io::Error::other("not a 200"));
            }
            Ok(ttfb)
        };
        match one() {
            Ok(t) => out.push(t),
            Err(_) => errors += 1,
        }
    }
    (out, errors)
}

/// The upstream: SSE token events for `"stream":true`, a small JSON body otherwise.
async fn serve_upstream(l: tokio::net::TcpListener, token: Duration) {
    while let Ok((s, _)) = l.accept().await {
        tokio::spawn(async move {
            let _ = upstream_conn(s, token).await;
        });
    }
}

async fn upstream_conn(mut s: tokio::net::TcpStream, token: Duration) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(4096);
    let mut tmp = vec![0u8; 16384];
    loop {
        let (end, clen) = loop {
            if let Some(e) = find(&buf, b"\r\n\r\n") {
                break (e + 4, content_length(&buf[..e]));
            }
            let n = s.read(&mut tmp).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&tmp[..n]);
        };
        while buf.len() < end + clen {
            let n = s.read(&mut tmp).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&tmp[..n]);
        }
        let streaming = find(&buf[end..end + clen], b"\"stream\":true").is_some();
        buf.drain(..end + clen);
        if !streaming {
            let body = targets::UPSTREAM_BODY;
            s.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )
            .await?;
            continue;
        }
        const EVENT: &str = "data: {\"id\":\"cmpl-bench-0001\",\"object\":\"text_completion\",\"created\":1700000000,\"model\":\"bench-model\",\"choices\":[{\"index\":0,\"text\":\" token\",\"logprobs\":null,\"finish_reason\":null}]}\n\n";
        let chunk = format!("{:x}\r\n{EVENT}\r\n", EVENT.len());
        s.write_all(
            format!("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n{chunk}")
                .as_bytes(),
        )
        .await?;
        let mut tick = tokio::time::interval(token);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        // Until kvroute closes the connection (its client went away); a read
        // returning 0 or an error, or a failed write, ends it.
        loop {
            tokio::select! {
                _ = tick.tick() => s.write_all(chunk.as_bytes()).await?,
                r = s.read(&mut tmp) => {
                    if r? == 0 {
                        return Ok(());
                    }
                }
            }
        }
    }
}

fn content_length(head: &[u8]) -> usize {
    String::from_utf8_lossy(head)
        .lines()
        .find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0)
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// `GET /state` → `steering`, over a blocking socket.
fn state(admin: SocketAddr) -> anyhow::Result<serde_json::Value> {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /state HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let at = find(&raw, b"\r\n\r\n").context("admin API: malformed response")?;
    let v: serde_json::Value = serde_json::from_slice(&raw[at + 4..])?;
    Ok(v["steering"].clone())
}

/// CPU ticks (user + system) of each worker thread (`kvroute-w<k>`) of `pid`.
fn worker_ticks(pid: u32) -> Vec<u64> {
    let mut out = vec![0; WORKERS];
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        let (Some(l), Some(r)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let Some(k) = stat[l + 1..r]
            .strip_prefix("kvroute-w")
            .and_then(|k| k.parse::<usize>().ok())
            .filter(|&k| k < WORKERS)
        else {
            continue;
        };
        let f: Vec<&str> = stat[r + 1..].split_whitespace().collect();
        if f.len() > 12 {
            out[k] = f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0);
        }
    }
    out
}

fn sorted(mut v: Vec<u64>) -> Vec<u64> {
    v.sort_unstable();
    v
}

fn pct(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((q / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn max_over_min(v: &[u64]) -> f64 {
    let (max, min) = (
        v.iter().copied().max().unwrap_or(0) as f64,
        v.iter().copied().min().unwrap_or(0) as f64,
    );
    if min == 0.0 {
        f64::INFINITY
    } else {
        max / min
    }
}

fn max_over_mean(v: &[u64]) -> f64 {
    let mean = v.iter().sum::<u64>() as f64 / v.len().max(1) as f64;
    v.iter().copied().max().unwrap_or(0) as f64 / mean.max(f64::MIN_POSITIVE)
}

pub const BEGIN: &str = "<!-- steering: begin -->";
pub const END: &str = "<!-- steering: end -->";

/// The report section, between [`BEGIN`] and [`END`] so a steering-only
/// `--publish` can replace it in an existing report.
pub fn render(p: &Params, rows: &[Row], generated: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{BEGIN}");
    let _ = writeln!(
        s,
        "## Connection steering under long-lived streams\n\n{generated}kvroute with {WORKERS} workers, \
         pinned one per core (`pin_workers`), `--policy round-robin`, in front of an upstream in the bench \
         process that sends one ~200-byte SSE token event every {} ms per stream. Per round and steering, \
         a fresh kvroute: {} streams opened in bursts of {} concurrent connects (100 ms apart), live streams \
         per worker read from `GET /state`; then, while the streams flow, {} short non-streamed requests \
         at {}/s, each on a new connection (so steered like any other), measure the time from connect to the \
         first response byte (TTFB, pooled over rounds). \"worker CPU\" is each worker thread's CPU time \
         over the probe window ÷ wall time, max/min of the two. {} rounds, the order of the two rows \
         alternating.\n",
        p.token_ms, p.streams, p.burst, p.probes, p.probe_rate, p.rounds
    );
    let kernel_p99 = rows
        .iter()
        .find(|r| r.name == MODES[1].0 && !r.ttfb_ns.is_empty())
        .map(|r| pct(&r.ttfb_ns, 99.0) as f64);
    let _ = writeln!(
        s,
        "| steering | live streams per worker, each round | max/min mean | max/min worst | max/mean worst | worker CPU max/min mean | TTFB p50 µs | TTFB p99 µs | p99 ÷ kernel's | errors |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        if let Some(n) = &r.note {
            let _ = writeln!(s, "| {} | not measured: {n} | | | | | | | | |", r.name);
            continue;
        }
        if r.spreads.is_empty() {
            continue;
        }
        let mm: Vec<f64> = r.spreads.iter().map(|v| max_over_min(v)).collect();
        let mmean: Vec<f64> = r.spreads.iter().map(|v| max_over_mean(v)).collect();
        let cpu: Vec<f64> = r
            .busy
            .iter()
            .map(|b| {
                let max = b.iter().copied().fold(0.0, f64::max);
                let min = b.iter().copied().fold(f64::MAX, f64::min);
                max / min.max(f64::MIN_POSITIVE)
            })
            .collect();
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let worst = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
        let spreads: Vec<String> = r
            .spreads
            .iter()
            .map(|v| {
                v.iter()
                    .map(|x| x.to_string())
                    .collect::<Vec<_>>()
                    .join("/")
            })
            .collect();
        let p99 = pct(&r.ttfb_ns, 99.0) as f64;
        let _ = writeln!(
            s,
            "| {} | {} | {:.3} | {:.3} | {:.3} | {:.2} | {:.0} | {:.0} | {} | {} |",
            r.name,
            spreads.join(", "),
            mean(&mm),
            worst(&mm),
            worst(&mmean),
            mean(&cpu),
            pct(&r.ttfb_ns, 50.0) as f64 / 1e3,
            p99 / 1e3,
            match kernel_p99 {
                Some(k) if k > 0.0 => format!("{:.2}", p99 / k),
                _ => "–".into(),
            },
            r.errors
        );
    }
    let _ = writeln!(s, "{END}");
    s
}

/// `old` with its steering section replaced by `section` (inserted before
/// `notes_marker`, or appended, when it has none).
pub fn splice(old: &str, section: &str, notes_marker: &str) -> String {
    if let (Some(b), Some(e)) = (old.find(BEGIN), old.find(END)) {
        if b < e {
            let after = &old[e + END.len()..];
            let after = after.strip_prefix('\n').unwrap_or(after);
            return format!("{}{section}{after}", &old[..b]);
        }
    }
    match old.find(notes_marker) {
        Some(i) => format!("{}{section}\n{}", &old[..i], &old[i..]),
        None => format!("{old}\n{section}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splice_replaces_only_the_steering_section() {
        let old = format!("# R\n\n## A\n\n{BEGIN}\nold\n{END}\n## B\n\n<!-- n -->\nnotes\n");
        let new = format!("{BEGIN}\nnew\n{END}\n");
        let out = splice(&old, &new, "<!-- n -->");
        assert_eq!(
            out,
            format!("# R\n\n## A\n\n{BEGIN}\nnew\n{END}\n## B\n\n<!-- n -->\nnotes\n")
        );
        let out = splice("# R\n\n<!-- n -->\nnotes\n", &new, "<!-- n -->");
        assert_eq!(out, format!("# R\n\n{new}\n<!-- n -->\nnotes\n"));
    }

    #[test]
    fn spread_ratios() {
        assert_eq!(max_over_min(&[100, 100]), 1.0);
        assert!((max_over_min(&[116, 84]) - 116.0 / 84.0).abs() < 1e-9);
        assert!((max_over_mean(&[116, 84]) - 1.16).abs() < 1e-9);
        assert_eq!(pct(&[1, 2, 3, 4, 5], 50.0), 3);
    }
}
