//! `cargo xtask bench footprint`: what kvroute costs on an edge box, side by
//! side with nginx and HAProxy proxying to the same trivial upstream on the same
//! machine: binary size, start-to-ready time, idle memory, memory after 100k
//! distinct prompts (kvroute's prefix index at its configured cap), and memory
//! under load. Writes docs/bench/footprint.md.
//!
//! A last section floods kvroute with idle connections (what each costs, and
//! whether memory returns once they close) and past a small
//! `[limits] max_connections` (whether a good client is still answered); see
//! [`flood`].
//!
//! kvroute runs twice: in its default configuration as installed (eBPF
//! steering, which needs root for CAP_BPF and bpffs; without root that row is
//! left out and the report says so) and with `steering = "kernel"`.
//!
//! The upstream is an in-process HTTP/1.1 responder, so what is measured is the
//! proxy alone. Memory is RSS summed over the process tree (nginx's master and
//! workers) and PSS, which does not count pages shared between those processes twice.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvroute_load::progress::{self, Counters, Job, Progress};
use kvroute_testkit::metrics_text::Samples;
use kvroute_testkit::port::free_addr;

mod flood;

use crate::fleet::bench_dir;
use crate::fleet::child::Child;
use crate::procs::{build_release_daemons, capture, root, sh, target_dir};

#[derive(clap::Args)]
pub struct Args {
    /// Use the release binaries already built.
    #[arg(long)]
    pub no_build: bool,
    /// Distinct prompts sent to fill kvroute's prefix index.
    #[arg(long, default_value_t = 100_000)]
    pub prompts: u64,
    /// kvroute's `[routing] index_max_blocks` for the run (each prompt adds 2 blocks).
    #[arg(long, default_value_t = 50_000)]
    pub index_max_blocks: u64,
    /// Concurrent keep-alive client connections for the load phase.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Seconds of load.
    #[arg(long, default_value_t = 10)]
    pub load_secs: u64,
    /// Start-to-ready measurements per proxy (the median is reported).
    #[arg(long, default_value_t = 7)]
    pub starts: usize,
    /// Only these proxies (kvroute, nginx, haproxy).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Where the Markdown report goes.
    #[arg(long, default_value = "docs/bench/footprint.md")]
    pub out: PathBuf,
    /// Idle connections the flood section opens (0 skips the flood sections;
    /// bounded by the open-file limit).
    #[arg(long, default_value_t = 10_000)]
    pub flood: usize,
    /// `[limits] max_connections` for the section that floods past it.
    #[arg(long, default_value_t = 200)]
    pub cap: usize,
    /// Connections that flood opens.
    #[arg(long, default_value_t = 2_000)]
    pub cap_flood: usize,
    /// Only the flood sections: the rest of the report is kept as it is.
    #[arg(long)]
    pub flood_only: bool,
}

/// Workers for every proxy: an edge box's 2 cores.
const WORKERS: usize = 2;

#[derive(Default, Clone)]
struct Mem {
    rss_kb: u64,
    pss_kb: u64,
    /// Anonymous pages (heap, stacks) of the RSS; the rest is file-backed
    /// (the binary and shared libraries).
    anon_kb: u64,
}

impl Mem {
    fn of_tree(root: u32) -> Mem {
        let mut m = Mem::default();
        for pid in tree(root) {
            let rollup = format!("/proc/{pid}/smaps_rollup");
            m.rss_kb += field_kb(&format!("/proc/{pid}/status"), "VmRSS:");
            m.pss_kb += field_kb(&rollup, "Pss:");
            m.anon_kb += field_kb(&rollup, "Anonymous:");
        }
        m
    }
    fn show(&self) -> String {
        format!(
            "{:.1} MiB (PSS {:.1})",
            self.rss_kb as f64 / 1024.0,
            self.pss_kb as f64 / 1024.0
        )
    }
}

/// A `key:  N kB` field of a /proc file (`VmRSS:` of `/proc/PID/status`), 0 when absent.
pub fn field_kb(path: &str, key: &str) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// `root` and its descendants, from /proc/*/stat parent links.
pub fn tree(root: u32) -> Vec<u32> {
    let mut parents = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // The command name may contain spaces; fields resume after the last ')'.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<u32>().ok());
            if let Some(pp) = ppid {
                parents.push((pid, pp));
            }
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    out
}

/// A trivial upstream: answers every request with a small completion, keep-alive.
fn upstream() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || serve_upstream(s));
        }
    });
    Ok(addr)
}

fn serve_upstream(mut s: TcpStream) {
    const BODY: &str = r#"{"id":"cmpl-0","object":"text_completion","model":"m","choices":[{"index":0,"text":"ok","finish_reason":"stop"}],"usage":{"prompt_tokens":64,"completion_tokens":1,"total_tokens":65}}"#;
    let _ = s.set_nodelay(true);
    let resp = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    let mut buf = Vec::with_capacity(4096);
    loop {
        match read_message(&mut s, &mut buf, true) {
            Ok(true) => {
                if s.write_all(resp.as_bytes()).is_err() {
                    return;
                }
            }
            _ => return,
        }
    }
}

/// Reads one HTTP/1.1 message (head + content-length or chunked body) from `s`,
/// keeping any bytes after it in `buf`. `Ok(false)` on a clean EOF.
fn read_message(s: &mut TcpStream, buf: &mut Vec<u8>, request: bool) -> std::io::Result<bool> {
    let mut tmp = [0u8; 16384];
    let (head_len, body_len, chunked) = loop {
        let mut hs = [httparse::EMPTY_HEADER; 64];
        let parsed = if request {
            let mut r = httparse::Request::new(&mut hs);
            match r.parse(buf) {
                Ok(httparse::Status::Complete(n)) => Ok(Some((n, framing(r.headers)))),
                Ok(httparse::Status::Partial) => Ok(None),
                Err(e) => Err(e),
            }
        } else {
            let mut r = httparse::Response::new(&mut hs);
            match r.parse(buf) {
                Ok(httparse::Status::Complete(n)) => Ok(Some((n, framing(r.headers)))),
                Ok(httparse::Status::Partial) => Ok(None),
                Err(e) => Err(e),
            }
        };
        match parsed {
            Ok(Some((n, (len, chunked)))) => break (n, len, chunked),
            Ok(None) => {}
            Err(e) => return Err(std::io::Error::other(e.to_string())),
        }
        let n = s.read(&mut tmp)?;
        if n == 0 {
            return Ok(false);
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let end = if chunked {
        loop {
            if let Some(i) = buf[head_len..].windows(5).position(|w| w == b"0\r\n\r\n") {
                break head_len + i + 5;
            }
            let n = s.read(&mut tmp)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            buf.extend_from_slice(&tmp[..n]);
        }
    } else {
        while buf.len() < head_len + body_len {
            let n = s.read(&mut tmp)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            buf.extend_from_slice(&tmp[..n]);
        }
        head_len + body_len
    };
    buf.drain(..end);
    Ok(true)
}

/// (content-length, chunked) of a parsed head.
fn framing(headers: &[httparse::Header]) -> (usize, bool) {
    let find = |name: &str| {
        headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).to_ascii_lowercase())
    };
    let len = find("content-length").and_then(|v| v.trim().parse::<usize>().ok());
    let chunked = find("transfer-encoding").is_some_and(|v| v.contains("chunked"));
    (len.unwrap_or(0), chunked)
}

/// A prompt of two full 128-byte blocks whose first block (the anchor's start)
/// is unique to `i`, so every prompt adds new blocks to kvroute's index.
fn prompt_body(i: u64) -> String {
    let mut p = format!("distinct prompt {i:>12}: ");
    while p.len() < 300 {
        p.push_str("tell me about caches ");
    }
    format!(r#"{{"model":"m","prompt":"{p}","max_tokens":1}}"#)
}

/// Sends requests on `conns` keep-alive connections, request numbers from
/// `next` up to `until` (or until `stop`), counting them in `counters`; returns (ok, failed).
fn drive(
    addr: SocketAddr,
    conns: usize,
    next: Arc<AtomicU64>,
    until: u64,
    stop: Arc<AtomicBool>,
    counters: &Arc<Counters>,
) -> (u64, u64) {
    let handles: Vec<_> = (0..conns)
        .map(|_| {
            let next = next.clone();
            let stop = stop.clone();
            let counters = counters.clone();
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (0u64, 0u64);
                let mut conn: Option<TcpStream> = None;
                let mut buf = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= until {
                        break;
                    }
                    let body = prompt_body(i);
                    let req = format!(
                        "POST /v1/completions HTTP/1.1\r\nHost: bench\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    // A kept-alive connection the proxy closed in the meantime is
                    // not a failure: retry once on a fresh one, as HTTP clients do.
                    let mut good = false;
                    counters.sent();
                    for _ in 0..2 {
                        let reused = conn.is_some();
                        let mut s = match conn.take() {
                            Some(s) => s,
                            None => match TcpStream::connect(addr) {
                                Ok(s) => {
                                    let _ = s.set_nodelay(true);
                                    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                                    buf.clear();
                                    s
                                }
                                Err(_) => break,
                            },
                        };
                        if s.write_all(req.as_bytes()).is_ok()
                            && matches!(read_message(&mut s, &mut buf, false), Ok(true))
                        {
                            good = true;
                            conn = Some(s);
                            break;
                        }
                        buf.clear();
                        if !reused {
                            break;
                        }
                    }
                    counters.finished(good);
                    if good {
                        ok += 1;
                    } else {
                        failed += 1;
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().unwrap_or((0, 0)))
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
}

fn http_200(addr: SocketAddr, path: &str) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200")
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let _ = s.write_all(req.as_bytes());
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// One proxy under test: how to start it, where it listens, where "ready" is asked.
struct Proxy {
    /// `kvroute` (default configuration), `kvroute-kernel`, `nginx`, `haproxy`.
    name: &'static str,
    /// The report's label: version and, for kvroute, the steering configured.
    version: String,
    binary: PathBuf,
    args: Vec<String>,
    listen: SocketAddr,
    ready: SocketAddr,
    /// kvroute's admin API, for index figures.
    admin: Option<SocketAddr>,
}

impl Proxy {
    fn start(&self, log: &Path) -> anyhow::Result<(Child, Duration)> {
        let t0 = Instant::now();
        let mut c = Child::spawn(self.name, &self.binary, &self.args, log)?;
        // 1 ms polling: the figure is in milliseconds.
        let end = t0 + Duration::from_secs(10);
        loop {
            if http_200(self.ready, "/healthz") {
                return Ok((c, t0.elapsed()));
            }
            c.ensure_running()?;
            anyhow::ensure!(Instant::now() < end, "{} not ready after 10 s", self.name);
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// kvroute's steering for a run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Steering {
    /// No `steering` key: the default, the eBPF program.
    Default,
    /// `steering = "kernel"`: the kernel's SO_REUSEPORT hash.
    Kernel,
}

fn kvroute_proxy(
    bin: &Path,
    dir: &Path,
    up: SocketAddr,
    a: &Args,
    steering: Steering,
) -> anyhow::Result<Proxy> {
    let listen = free_addr();
    let admin = free_addr();
    let (name, steering_key, label) = match steering {
        Steering::Default => ("kvroute", "", "default config: eBPF steering"),
        Steering::Kernel => (
            "kvroute-kernel",
            "steering = \"kernel\"\n",
            "`steering = \"kernel\"`",
        ),
    };
    let cfg = dir.join(format!("{name}.toml"));
    // Unpinned: the box is shared with the load generator and the other proxies,
    // which are not pinned either. The two runs differ only in `steering`.
    std::fs::write(
        &cfg,
        format!(
            "listen = \"{listen}\"\nadmin = \"{admin}\"\nworkers = {WORKERS}\npin_workers = false\n\
             {steering_key}log = \"warn\"\n\n[routing]\npolicy = \"kv-aware\"\n\
             index_max_blocks = {}\n\n[[replicas]]\nurl = \"http://{up}\"\n",
            a.index_max_blocks
        ),
    )?;
    Ok(Proxy {
        name,
        version: format!("kvroute {} ({label})", env!("CARGO_PKG_VERSION")),
        binary: bin.to_path_buf(),
        args: vec!["--config".into(), cfg.display().to_string()],
        listen,
        ready: admin,
        admin: Some(admin),
    })
}

fn nginx_proxy(dir: &Path, up: SocketAddr) -> anyhow::Result<Proxy> {
    let listen = free_addr();
    let d = dir.display();
    std::fs::create_dir_all(dir.join("nginx-tmp"))?;
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes {WORKERS};\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  keepalive_requests 1000000;\n\
               client_body_temp_path {d}/nginx-tmp/body;\n  proxy_temp_path {d}/nginx-tmp/proxy;\n\
               fastcgi_temp_path {d}/nginx-tmp/fastcgi;\n  uwsgi_temp_path {d}/nginx-tmp/uwsgi;\n\
               scgi_temp_path {d}/nginx-tmp/scgi;\n\
               upstream up {{ server {up}; keepalive 64; }}\n\
               server {{\n    listen {listen} reuseport;\n\
                 location = /healthz {{ return 200 \"ok\\n\"; }}\n\
                 location / {{ proxy_pass http://up; proxy_http_version 1.1; \
                 proxy_set_header Connection \"\"; proxy_buffering off; }}\n  }}\n}}\n"
        ),
    )?;
    let version = capture(Command::new("sh").args(["-c", "nginx -v 2>&1"]))?;
    Ok(Proxy {
        name: "nginx",
        version,
        binary: which("nginx")?,
        args: vec![
            "-p".into(),
            d.to_string(),
            "-e".into(),
            format!("{d}/nginx-error.log"),
            "-c".into(),
            conf.display().to_string(),
        ],
        listen,
        ready: listen,
        admin: None,
    })
}

fn haproxy_proxy(dir: &Path, up: SocketAddr) -> anyhow::Result<Proxy> {
    let listen = free_addr();
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        [
            "global".to_string(),
            format!("  nbthread {WORKERS}"),
            // The FD limit must cover 2 x maxconn; 4096 connections is plenty here.
            "  maxconn 4096".into(),
            "defaults".into(),
            "  mode http".into(),
            "  timeout connect 2s".into(),
            "  timeout client 60s".into(),
            "  timeout server 60s".into(),
            "  option http-keep-alive".into(),
            "frontend fe".into(),
            format!("  bind {listen}"),
            "  http-request return status 200 content-type text/plain string ok if { path /healthz }"
                .into(),
            "  default_backend be".into(),
            "backend be".into(),
            "  http-reuse always".into(),
            format!("  server s1 {up}"),
            String::new(),
        ]
        .join("\n"),
    )?;
    let version = capture(Command::new("haproxy").arg("-v"))?
        .lines()
        .next()
        .unwrap_or("")
        .split(" - ")
        .next()
        .unwrap_or("")
        .to_string();
    Ok(Proxy {
        name: "haproxy",
        version,
        binary: which("haproxy")?,
        args: vec!["-db".into(), "-f".into(), cfg.display().to_string()],
        listen,
        ready: listen,
        admin: None,
    })
}

fn which(name: &str) -> anyhow::Result<PathBuf> {
    let p = capture(Command::new("sh").args(["-c", &format!("command -v {name}")]))?;
    anyhow::ensure!(!p.is_empty(), "{name} not installed");
    Ok(p.into())
}

struct Row {
    name: String,
    version: String,
    /// kvroute: what steers connections, from `GET /state` (`p2c`, `kernel`)
    /// and, when eBPF was asked for and is not in use, why.
    steering: Option<(String, Option<String>)>,
    size: String,
    ready_ms: Vec<f64>,
    idle: Mem,
    /// (prompts sent, memory, index blocks, index bytes)
    fill: Vec<(u64, Mem, String, String)>,
    load: Mem,
    /// One second after the load stopped.
    after_load: Mem,
    load_rps: f64,
    load_failed: u64,
}

/// The unlabelled gauge `name` of a `/metrics` page, "-" when absent.
fn metric(text: &str, name: &str) -> String {
    Samples::parse(text)
        .get(name, &[])
        .map_or_else(|| "-".to_owned(), |v| v.to_string())
}

fn binary_size(p: &Path, dir: &Path) -> anyhow::Result<String> {
    let size = std::fs::metadata(p)?.len();
    let stripped = dir.join(format!(
        "{}.stripped",
        p.file_name().unwrap_or_default().to_string_lossy()
    ));
    sh(Command::new("strip").arg("-o").arg(&stripped).arg(p))?;
    let s = std::fs::metadata(&stripped)?.len();
    let libs = capture(Command::new("ldd").arg(p))
        .map(|o| o.lines().filter(|l| l.contains("=>")).count())
        .unwrap_or(0);
    Ok(format!(
        "{:.1} MiB ({:.1} stripped), {libs} shared libs",
        size as f64 / 1048576.0,
        s as f64 / 1048576.0
    ))
}

fn measure(p: &Proxy, dir: &Path, a: &Args) -> anyhow::Result<Row> {
    eprintln!("xtask: footprint: {}", p.name);
    let log = dir.join(format!("{}.log", p.name));
    let mut ready_ms = Vec::new();
    for _ in 0..a.starts.max(1) {
        let (c, t) = p.start(&log)?;
        ready_ms.push(t.as_secs_f64() * 1000.0);
        drop(c);
        // Let the port be released before the next start.
        std::thread::sleep(Duration::from_millis(100));
    }
    ready_ms.sort_by(f64::total_cmp);
    let (mut child, _) = p.start(&log)?;
    let pid = child.id();
    std::thread::sleep(Duration::from_millis(500));
    let idle = Mem::of_tree(pid);
    let steering = p.admin.map(|admin| steering_state(admin, p.name));

    let mut fill = Vec::new();
    let next = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let step = (a.prompts / 10).max(1);
    let mut sent = 0;
    let progress_opts = progress::Options::from_env()?;
    let counters = Counters::new();
    let shown = Progress::start(
        Job::new(format!("footprint {}: filling the index", p.name)).planned(a.prompts),
        counters.clone(),
        progress_opts,
    );
    while sent < a.prompts {
        sent = (sent + step).min(a.prompts);
        let (_, failed) = drive(p.listen, 8, next.clone(), sent, stop.clone(), &counters);
        anyhow::ensure!(
            failed == 0,
            "{}: {failed} failed requests while filling",
            p.name
        );
        child.ensure_running()?;
        let (blocks, bytes) = match p.admin {
            Some(admin) => {
                let m = http_get(admin, "/metrics");
                (
                    metric(&m, "kvroute_index_blocks"),
                    metric(&m, "kvroute_index_bytes"),
                )
            }
            None => ("-".into(), "-".into()),
        };
        fill.push((sent, Mem::of_tree(pid), blocks, bytes));
    }
    shown.finish();

    // Load: fresh request numbers so kvroute keeps inserting (the index stays at its cap).
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(std::sync::Mutex::new(Mem::default()));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let m = Mem::of_tree(pid);
                let mut p = peak.lock().unwrap_or_else(|e| e.into_inner());
                if m.rss_kb > p.rss_kb {
                    *p = m;
                }
                drop(p);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let timer = {
        let stop = stop.clone();
        let secs = a.load_secs;
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(secs));
            stop.store(true, Ordering::Relaxed);
        })
    };
    let counters = Counters::new();
    let shown = Progress::start(
        Job::new(format!("footprint {}: load", p.name)).schedule(Duration::from_secs(a.load_secs)),
        counters.clone(),
        progress_opts,
    );
    let t0 = Instant::now();
    let (ok, failed) = drive(
        p.listen,
        a.connections,
        Arc::new(AtomicU64::new(a.prompts)),
        u64::MAX,
        stop.clone(),
        &counters,
    );
    let took = t0.elapsed().as_secs_f64();
    shown.finish();
    let _ = timer.join();
    let _ = sampler.join();
    child.ensure_running()?;
    let load = peak.lock().unwrap_or_else(|e| e.into_inner()).clone();
    std::thread::sleep(Duration::from_secs(1));
    let after_load = Mem::of_tree(pid);
    Ok(Row {
        name: p.name.into(),
        version: p.version.clone(),
        steering,
        size: binary_size(&p.binary, dir)?,
        ready_ms,
        idle,
        fill,
        load,
        after_load,
        load_rps: ok as f64 / took,
        load_failed: failed,
    })
}

/// kvroute's steering mode and fallback reason from `GET /state`.
fn steering_state(admin: SocketAddr, name: &str) -> (String, Option<String>) {
    let resp = http_get(admin, "/state");
    let body = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let st: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    let st = &st["steering"];
    let mode = st["mode"].as_str().unwrap_or("unknown").to_string();
    let why = st["fallback_reason"].as_str().map(str::to_string);
    if let Some(w) = &why {
        eprintln!("xtask: footprint: {name}: eBPF steering unavailable: {w}");
    }
    (mode, why)
}

/// The effective user id, from /proc/self/status (`Uid: real effective ...`).
fn euid() -> Option<u32> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find(|l| l.starts_with("Uid:"))?
        .split_whitespace()
        .nth(2)?
        .parse()
        .ok()
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if !a.no_build {
        build_release_daemons()?;
    }
    let bins = target_dir().join("release/kvroute");
    anyhow::ensure!(bins.exists(), "{} not built", bins.display());
    let dir = bench_dir().join("footprint");
    std::fs::create_dir_all(&dir)?;
    let up = upstream()?;
    let out = if a.out.is_relative() {
        root().join(&a.out)
    } else {
        a.out.clone()
    };
    if a.flood_only {
        let section = flood_sections(&bins, &dir, up, &a)?;
        let old = std::fs::read_to_string(&out).unwrap_or_default();
        let kept = old
            .find(FLOOD_HEADING)
            .map_or(old.as_str(), |i| &old[..i])
            .trim_end();
        let report = format!("{kept}\n\n{section}");
        println!("{section}");
        crate::report::write(&out, &report)?;
        return Ok(());
    }
    // `--only kvroute` selects both kvroute runs, `kvroute-kernel` the second alone.
    let want = |n: &str| {
        a.only.is_empty()
            || a.only.iter().any(|o| o == n)
            || (n == "kvroute-kernel" && a.only.iter().any(|o| o == "kvroute"))
    };
    let mut proxies = Vec::new();
    let mut notes = Vec::new();
    if want("kvroute") {
        if euid() == Some(0) {
            proxies.push(kvroute_proxy(&bins, &dir, up, &a, Steering::Default)?);
        } else {
            let note = "Not run as root: kvroute's default configuration steers with an eBPF \
                        program, which needs root (CAP_BPF) and bpffs, so only \
                        `steering = \"kernel\"` is measured here; run the bench as root for the \
                        figures as installed.";
            eprintln!("xtask: footprint: {note}");
            notes.push(note.to_string());
        }
    }
    if want("kvroute-kernel") {
        proxies.push(kvroute_proxy(&bins, &dir, up, &a, Steering::Kernel)?);
    }
    for (name, make) in [
        (
            "nginx",
            nginx_proxy as fn(&Path, SocketAddr) -> anyhow::Result<Proxy>,
        ),
        ("haproxy", haproxy_proxy),
    ] {
        if want(name) {
            match make(&dir, up) {
                Ok(p) => proxies.push(p),
                Err(e) => eprintln!("xtask: footprint: skipping {name}: {e}"),
            }
        }
    }
    let mut rows = Vec::new();
    for p in &proxies {
        let row = measure(p, &dir, &a);
        if p.name == "kvroute" {
            // The bench kills kvroute (SIGKILL), so it cannot remove its pins.
            let pins = Path::new(kvroute::steer::BPFFS)
                .join("kvroute")
                .join(kvroute::steer::pin_name(p.listen));
            let _ = std::fs::remove_dir_all(pins);
        }
        rows.push(row?);
    }
    let mut report = render(&rows, &notes, &a);
    if a.flood > 0 && want("kvroute-kernel") {
        report.push('\n');
        report.push_str(&flood_sections(&bins, &dir, up, &a)?);
    }
    println!("{report}");
    crate::report::write(&out, &report)?;
    Ok(())
}

fn mib(kb: u64) -> String {
    format!("{:.1}", kb as f64 / 1024.0)
}

const FLOOD_HEADING: &str = "## Connection flood";

/// The flood sections, under io_uring (when this machine allows it) and epoll.
fn flood_sections(bin: &Path, dir: &Path, up: SocketAddr, a: &Args) -> anyhow::Result<String> {
    // Room for the flood's sockets in this process, and a bound from the limit.
    let nofile = kvroute::budget::raise_fd_limit()?;
    let conns = a.flood.min(nofile.saturating_sub(512) as usize);
    let mut ios = Vec::new();
    let mut note = String::new();
    match kvroute::io::uring_available() {
        Ok(()) => ios.push("uring"),
        Err(e) => {
            note = format!("\nio_uring is unavailable here ({e}): only epoll was measured.\n")
        }
    }
    ios.push("epoll");
    let mut rows = Vec::new();
    let mut caps = Vec::new();
    for io in ios {
        rows.push(flood::measure_flood(bin, dir, up, io, conns)?);
        caps.push(flood::measure_cap(bin, dir, up, io, a.cap, a.cap_flood)?);
    }
    Ok(format!("{}{note}", flood::render(&rows, &caps)))
}

fn render(rows: &[Row], notes: &[String], a: &Args) -> String {
    let mut s = String::new();
    let host = capture(Command::new("uname").arg("-srm")).unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    s.push_str("# Edge footprint: kvroute vs nginx vs HAProxy\n\n");
    s.push_str(&format!(
        "Generated by `cargo xtask bench footprint` (this file is its output). {cpus} CPUs, {host}; \
         the machine is shared with other builds, so times are noisy. Each proxy runs {WORKERS} \
         workers (nginx `worker_processes`, HAProxy `nbthread`, kvroute `workers`) in front of \
         the same in-process HTTP/1.1 upstream. Memory is RSS summed over the process tree, with \
         PSS (shared pages split between processes) in parentheses. kvroute runs kv-aware routing \
         with `[routing] index_max_blocks = {}`; each prompt is 2 new 128-byte blocks. kvroute \
         runs twice: in its default configuration, which steers connections with its eBPF program \
         when run as root, and with `steering = \"kernel\"` (the kernel's SO_REUSEPORT hash).\n\n",
        a.index_max_blocks
    ));
    s.push_str("| | binary | start to ready (median / max of runs) | idle | after {P} distinct prompts | peak under load ({C} conns, {L} s) | 1 s after the load | load throughput |\n"
        .replace("{P}", &a.prompts.to_string())
        .replace("{C}", &a.connections.to_string())
        .replace("{L}", &a.load_secs.to_string())
        .as_str());
    s.push_str("| --- | --- | --- | --- | --- | --- | --- | --- |\n");
    for r in rows {
        let med = r.ready_ms[r.ready_ms.len() / 2];
        let max = r.ready_ms.last().copied().unwrap_or(0.0);
        let after = r.fill.last().map(|f| f.1.show()).unwrap_or_default();
        s.push_str(&format!(
            "| {} | {} | {med:.1} ms / {max:.1} ms | {} | {after} | {} | {} | {:.0} req/s{} |\n",
            r.version,
            r.size,
            r.idle.show(),
            r.load.show(),
            r.after_load.show(),
            r.load_rps,
            if r.load_failed > 0 {
                format!(", {} failed", r.load_failed)
            } else {
                String::new()
            }
        ));
    }
    for n in notes {
        s.push_str(&format!("\n{n}\n"));
    }
    s.push_str("\nThe load phase sends new distinct prompts, so kvroute's index stays at its cap while it runs; nothing scrapes `/metrics` meanwhile (kvroute drains its histogram samples itself).\n");
    s.push_str("\nReady: process start until `GET /healthz` answers 200 (kvroute: its admin API, after every worker listens; nginx and HAProxy: a `/healthz` they answer themselves on the proxy port).\n\n");

    let kv: Vec<&Row> = rows
        .iter()
        .filter(|r| r.name.starts_with("kvroute"))
        .collect();
    if !kv.is_empty() {
        s.push_str(
            "## kvroute idle memory by steering\n\n\
             Read from `/proc/PID/smaps_rollup` 0.5 s after ready: anonymous pages are heap and \
             stacks, file-backed ones the binary and shared libraries. Steering as `GET /state` \
             reports it (`p2c`: the eBPF program; `kernel`: the kernel's hash).\n\n\
             | configuration | steering in effect | idle RSS MiB | anonymous MiB | file-backed MiB | PSS MiB |\n\
             | --- | --- | --- | --- | --- | --- |\n",
        );
        for r in &kv {
            let (mode, why) = r.steering.clone().unwrap_or_default();
            let why = why
                .map(|w| format!(" (eBPF unavailable: {w})"))
                .unwrap_or_default();
            s.push_str(&format!(
                "| {} | {mode}{why} | {} | {} | {} | {} |\n",
                r.version,
                mib(r.idle.rss_kb),
                mib(r.idle.anon_kb),
                mib(r.idle.rss_kb.saturating_sub(r.idle.anon_kb)),
                mib(r.idle.pss_kb),
            ));
        }
        s.push('\n');
    }

    // The index columns and the growth goal follow the first kvroute run: the
    // default configuration when it ran.
    let primary = kv.first().map(|r| r.name.as_str()).unwrap_or("kvroute");
    s.push_str("## Memory while distinct prompts accumulate\n\n| prompts sent |");
    for r in rows {
        s.push_str(&format!(" {} RSS MiB |", r.name));
    }
    s.push_str(&format!(
        " {primary} index blocks | {primary} index bytes |\n|---|"
    ));
    for _ in rows {
        s.push_str("---|");
    }
    s.push_str("---|---|\n");
    let n = rows.iter().map(|r| r.fill.len()).max().unwrap_or(0);
    for i in 0..n {
        let sent = rows
            .iter()
            .find_map(|r| r.fill.get(i).map(|f| f.0))
            .unwrap_or(0);
        s.push_str(&format!("| {sent} |"));
        let mut idx = ("-".to_string(), "-".to_string());
        for r in rows {
            match r.fill.get(i) {
                Some(f) => {
                    s.push_str(&format!(" {} |", mib(f.1.rss_kb)));
                    if r.name == primary {
                        idx = (f.2.clone(), f.3.clone());
                    }
                }
                None => s.push_str(" - |"),
            }
        }
        s.push_str(&format!(" {} | {} |\n", idx.0, idx.1));
    }
    if kv.is_empty() {
        return s;
    }
    let met = |ok: bool| if ok { "met" } else { "missed" };
    let median = |r: &Row| r.ready_ms[r.ready_ms.len() / 2];
    let idle_mib = |r: &Row| r.idle.rss_kb as f64 / 1024.0;
    let installed = kv
        .iter()
        .find(|r| r.name == "kvroute")
        .filter(|r| r.steering.as_ref().is_some_and(|(_, why)| why.is_none()));
    let kernel = kv.iter().find(|r| r.name == "kvroute-kernel");
    s.push_str("\n## Goals (kvroute)\n\n");
    let ready_ok = kv.iter().all(|r| median(r) < 100.0);
    let ready_each: Vec<String> = kv
        .iter()
        .map(|r| format!("{}: {:.1} ms median", label(r), median(r)))
        .collect();
    s.push_str(&format!(
        "- ready in < 100 ms: **{}** ({})\n",
        met(ready_ok),
        ready_each.join("; ")
    ));
    let kernel_idle = kernel
        .map(|k| format!("; `steering = \"kernel\"`: {:.1} MiB", idle_mib(k)))
        .unwrap_or_default();
    match installed {
        Some(d) => s.push_str(&format!(
            "- idle RSS < 20 MB as installed (default config, eBPF steering attached): **{}** ({:.1} MiB{kernel_idle})\n",
            met(idle_mib(d) < 20.0),
            idle_mib(d),
        )),
        None => {
            let why = match kv.iter().find(|r| r.name == "kvroute") {
                Some(r) => format!(
                    "eBPF steering did not attach: {}",
                    r.steering
                        .as_ref()
                        .and_then(|(_, w)| w.clone())
                        .unwrap_or_else(|| "no steering state".into())
                ),
                None => "not run as root".into(),
            };
            s.push_str(&format!(
                "- idle RSS < 20 MB as installed (default config, eBPF steering attached): **not measured** ({why}{kernel_idle})\n"
            ));
        }
    }
    let k = kv[0];
    // "Stops growing": no sample in the second half of the prompts (the index
    // is at its cap by then with the default sizes) exceeds the first half's
    // peak by more than allocator noise; the allocator returning memory is fine.
    let half = k.fill.len() / 2;
    let first_peak = k.fill[..half.max(1)]
        .iter()
        .map(|f| f.1.rss_kb)
        .max()
        .unwrap_or(0);
    let later_peak = k.fill[half..].iter().map(|f| f.1.rss_kb).max().unwrap_or(0);
    let growth = (later_peak as f64 - first_peak as f64) / 1024.0;
    let idx_bytes: Vec<&str> = k.fill[half..].iter().map(|f| f.3.as_str()).collect();
    let idx_flat = idx_bytes.windows(2).all(|w| w[0] == w[1]);
    s.push_str(&format!(
        "- memory stops growing at the index cap ({}): **{}** (peak RSS over the second half of \
         the prompts {:+.1} MiB against the first half's peak; index at {} blocks, its heap bytes \
         {} over the second half)\n",
        label(k),
        met(growth < 2.0 && idx_flat),
        growth,
        k.fill.last().map(|f| f.2.as_str()).unwrap_or("-"),
        if idx_flat {
            "constant"
        } else {
            "still changing"
        },
    ));
    s
}

/// A kvroute run's configuration, as the goals name it.
fn label(r: &Row) -> &'static str {
    if r.name == "kvroute" {
        "default config"
    } else {
        "`steering = \"kernel\"`"
    }
}
