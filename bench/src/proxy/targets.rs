//! The upstream and the proxies under test: generated configs, process start,
//! readiness, and cleanup (every process is owned by a [`Proc`] that kills it on drop).

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use kvroute_testkit::child::{Child, NotReady};
use kvroute_testkit::port::free_port;

/// Process groups started and not yet stopped, for the signal handler: a Ctrl-C
/// or SIGTERM skips destructors, and the servers run in their own sessions, so
/// nothing else would stop them.
static LIVE: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

fn kill_group(pgid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([sig, "--", &format!("-{pgid}")])
        .stderr(Stdio::null())
        .status();
}

/// On SIGINT/SIGTERM/SIGHUP: stop every live server, then exit.
pub fn cleanup_on_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Registered here, before returning, so no signal can arrive unhandled in between.
    let (mut int, mut term, mut hup) = rt.block_on(async {
        anyhow::Ok((
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
            signal(SignalKind::hangup())?,
        ))
    })?;
    std::thread::spawn(move || {
        rt.block_on(async {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
                _ = hup.recv() => {}
            }
        });
        let groups = LIVE.lock().map(|g| g.clone()).unwrap_or_default();
        eprintln!(
            "xtask: signal: stopping {} benchmark processes",
            groups.len()
        );
        for &g in &groups {
            kill_group(g, "-TERM");
        }
        std::thread::sleep(Duration::from_millis(500));
        for &g in &groups {
            kill_group(g, "-KILL");
        }
        std::process::exit(130);
    });
    Ok(())
}

/// The upstream's response body: about the size of a short non-streamed completion.
pub const UPSTREAM_BODY: &str = r#"{"id":"cmpl-bench-0001","object":"text_completion","created":1700000000,"model":"bench-model","choices":[{"index":0,"text":" The quick brown fox jumps over the lazy dog, and then it rests under the old oak tree.","logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":20,"total_tokens":32}}"#;

/// A started process; killed (and its process group, so nginx/haproxy workers
/// go too) when dropped, so a failing benchmark leaves nothing behind.
pub struct Proc {
    pub name: String,
    /// Killed and reaped on drop too (the leader only), after the group is.
    child: Child,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails with the log tail if the process already exited (bad config, port taken).
    fn check_alive(&mut self, log: &Path) -> anyhow::Result<()> {
        if let Some(st) = self.child.try_wait()? {
            let tail = fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!("{} exited with {st}:\n{}", self.name, tail.join("\n"));
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // The whole group: the processes were started as group leaders (setsid via `setsid`),
            // and nginx's master leaves its worker running if only it dies.
            let pgid = self.child.id();
            kill_group(pgid, "-TERM");
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            kill_group(pgid, "-KILL");
            let _ = self.child.wait();
        }
        if let Ok(mut g) = LIVE.lock() {
            g.retain(|&p| p != self.child.id());
        }
    }
}

/// Starts `argv` pinned to `cpus` (taskset), in its own process group, output to `log`.
pub fn spawn(name: &str, cpus: &str, argv: &[String], log: &Path) -> anyhow::Result<Proc> {
    let out = fs::File::create(log).with_context(|| format!("{}", log.display()))?;
    // setsid: a new group per server so Drop can kill it whole; taskset: the
    // proxy's core is the only thing that separates it from the load generator.
    let mut cmd = Command::new("setsid");
    cmd.arg("taskset").arg("-c").arg(cpus).args(argv);
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    eprintln!("xtask: start {name}: taskset -c {cpus} {}", argv.join(" "));
    let child = Child::spawn(name, &mut cmd).with_context(|| format!("starting {name}"))?;
    if let Ok(mut g) = LIVE.lock() {
        g.push(child.id());
    }
    Ok(Proc {
        name: name.to_string(),
        child,
    })
}

/// Waits until `url_path` on `port` answers 200 (so the next hop is wired up too).
pub fn wait_ready(
    p: &mut Proc,
    port: u16,
    path: &str,
    log: &Path,
    limit: Duration,
) -> anyhow::Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_until_ready(p, &format!("{addr}{path}"), log, limit, || {
        probe(addr, path).unwrap_or(false)
    })
}

/// Polls `ready` until it holds, failing with the log's tail if `p` exits and
/// with `what` named once `limit` has passed.
fn wait_until_ready(
    p: &mut Proc,
    what: &str,
    log: &Path,
    limit: Duration,
    ready: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    match p.child.wait_ready(limit, Duration::from_millis(100), ready) {
        Ok(()) => Ok(()),
        // Fails with the log's tail: the exit status stays known once seen.
        Err(NotReady::Exited(_)) => p.check_alive(log),
        Err(NotReady::TimedOut) => bail!(
            "{} did not answer 200 on {what} within {limit:?} (log: {})",
            p.name,
            log.display()
        ),
    }
}

fn probe(addr: SocketAddr, path: &str) -> std::io::Result<bool> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(300))?;
    s.set_read_timeout(Some(Duration::from_millis(1000)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    Ok(buf.starts_with(b"HTTP/1.1 200") || buf.starts_with(b"HTTP/1.0 200"))
}

/// One thing wrk and the open-loop generator can be pointed at.
pub struct Target {
    pub name: String,
    pub port: u16,
    /// Process to profile / keep alive; `None` for the direct row (the upstream itself).
    pub proc: Option<Proc>,
}

pub struct Env {
    pub dir: PathBuf,
    /// Idle upstream connections each proxy may keep: at least the load's
    /// concurrency, so no proxy closes and reopens upstream connections under load.
    pub upstream_pool: usize,
    pub proxy_cpus: String,
    pub upstream_cpus: String,
}

impl Env {
    fn log(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }
}

/// nginx's per-instance prefix: temp dirs and pid file under the bench dir, so
/// nothing touches /var/lib/nginx and two instances never collide.
fn nginx_common(env: &Env, name: &str) -> anyhow::Result<(PathBuf, String)> {
    let prefix = env.dir.join(name);
    fs::create_dir_all(&prefix)?;
    let p = prefix.display();
    let head = format!(
        "daemon off;\nmaster_process on;\nworker_processes 1;\nuser root;\npid {p}/nginx.pid;\n\
         error_log {p}/error.log warn;\nworker_rlimit_nofile 16384;\n\
         events {{ worker_connections 8192; multi_accept on; }}\n"
    );
    let http = format!(
        "access_log off;\nclient_body_temp_path {p}/body;\nproxy_temp_path {p}/proxy;\n\
         fastcgi_temp_path {p}/fastcgi;\nuwsgi_temp_path {p}/uwsgi;\nscgi_temp_path {p}/scgi;\n\
         keepalive_requests 100000000;\nkeepalive_timeout 300s;\n"
    );
    Ok((prefix, format!("{head}http {{\n{http}")))
}

fn start_nginx(env: &Env, name: &str, cpus: &str, body: &str) -> anyhow::Result<(Proc, PathBuf)> {
    let (prefix, mut conf) = nginx_common(env, name)?;
    conf.push_str(body);
    conf.push_str("}\n");
    let path = prefix.join("nginx.conf");
    fs::write(&path, conf)?;
    let argv = vec![
        "nginx".into(),
        "-p".into(),
        prefix.display().to_string(),
        "-e".into(),
        prefix.join("error.log").display().to_string(),
        "-c".into(),
        path.display().to_string(),
    ];
    let log = env.log(name);
    Ok((spawn(name, cpus, &argv, &log)?, log))
}

/// The fixed upstream every row ends at.
pub fn upstream(env: &Env) -> anyhow::Result<Target> {
    let port = free_port();
    // `return` answers without reading a file or the body buffer; the body is read
    // and discarded, as an inference server would consume the prompt.
    let body = UPSTREAM_BODY.replace('\'', "\\'");
    let server = format!(
        "server {{\n listen 127.0.0.1:{port} reuseport backlog=4096;\n\
         location / {{ default_type application/json; return 200 '{body}'; }}\n}}\n"
    );
    let (mut p, log) = start_nginx(env, "upstream", &env.upstream_cpus, &server)?;
    wait_ready(&mut p, port, "/health", &log, Duration::from_secs(10))?;
    Ok(Target {
        name: "direct".into(),
        port,
        proc: Some(p),
    })
}

pub fn nginx_proxy(env: &Env, upstream: u16) -> anyhow::Result<Target> {
    let port = free_port();
    let pool = env.upstream_pool;
    let server = format!(
        "upstream replicas {{ server 127.0.0.1:{upstream}; keepalive {pool}; keepalive_requests 100000000; }}\n\
         server {{\n listen 127.0.0.1:{port} reuseport backlog=4096;\n\
         location / {{ proxy_pass http://replicas; proxy_http_version 1.1;\n\
         proxy_set_header Connection \"\"; proxy_set_header Host $host; }}\n}}\n"
    );
    let (mut p, log) = start_nginx(env, "nginx-proxy", &env.proxy_cpus, &server)?;
    wait_ready(&mut p, port, "/health", &log, Duration::from_secs(10))?;
    Ok(Target {
        name: "nginx".into(),
        port,
        proc: Some(p),
    })
}

pub fn haproxy(env: &Env, upstream: u16) -> anyhow::Result<Target> {
    let port = free_port();
    // maxconn stays at 4096: the host's fd limit is 20000 and each proxied
    // connection costs HAProxy two descriptors.
    let conf = format!(
        "global\n  nbthread 1\n  maxconn 4096\n\n\
         defaults\n  mode http\n  option http-keep-alive\n  http-reuse always\n\
         timeout connect 5s\n  timeout client 300s\n  timeout server 300s\n  timeout http-keep-alive 300s\n\n\
         frontend fe\n  bind 127.0.0.1:{port}\n  default_backend be\n\n\
         backend be\n  server up1 127.0.0.1:{upstream} maxconn 4096\n"
    );
    let path = env.dir.join("haproxy.cfg");
    fs::write(&path, conf)?;
    let argv = vec![
        "haproxy".into(),
        "-db".into(),
        "-f".into(),
        path.display().to_string(),
    ];
    let log = env.log("haproxy");
    let mut p = spawn("haproxy", &env.proxy_cpus, &argv, &log)?;
    wait_ready(&mut p, port, "/health", &log, Duration::from_secs(10))?;
    Ok(Target {
        name: "haproxy".into(),
        port,
        proc: Some(p),
    })
}

pub fn kvroute(env: &Env, bin: &Path, io: &str, upstream: u16) -> anyhow::Result<Target> {
    kvroute_with(env, bin, io, upstream, "", "")
}

/// A certificate and key (PEM) both TLS terminators present, and the CA that signed it.
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// nginx terminating TLS with `tls`'s certificate in front of `upstream`, otherwise
/// configured as [`nginx_proxy`]. Session caches and tickets are off, as they are
/// for a client that never resumes: every new connection is a full handshake.
pub fn nginx_tls_proxy(env: &Env, upstream: u16, tls: &TlsFiles) -> anyhow::Result<Target> {
    let port = free_port();
    let pool = env.upstream_pool;
    let server = format!(
        "upstream replicas {{ server 127.0.0.1:{upstream}; keepalive {pool}; keepalive_requests 100000000; }}\n\
         server {{\n listen 127.0.0.1:{port} ssl reuseport backlog=4096;\n\
         ssl_certificate {cert};\n ssl_certificate_key {key};\n\
         ssl_protocols TLSv1.2 TLSv1.3;\n ssl_session_cache off;\n ssl_session_tickets off;\n\
         location / {{ proxy_pass http://replicas; proxy_http_version 1.1;\n\
         proxy_set_header Connection \"\"; proxy_set_header Host $host; }}\n}}\n",
        cert = tls.cert.display(),
        key = tls.key.display(),
    );
    let (mut p, log) = start_nginx(env, "nginx-tls", &env.proxy_cpus, &server)?;
    wait_ready_tls(&mut p, port, &tls.ca, &log, Duration::from_secs(10))?;
    Ok(Target {
        name: "nginx TLS".into(),
        port,
        proc: Some(p),
    })
}

/// kvroute terminating TLS with `tls`'s certificate.
pub fn kvroute_tls(
    env: &Env,
    bin: &Path,
    io: &str,
    upstream: u16,
    tls: &TlsFiles,
) -> anyhow::Result<Target> {
    let section = format!(
        "\n[tls]\ncert = {:?}\nkey = {:?}\n",
        tls.cert.display().to_string(),
        tls.key.display().to_string()
    );
    let tag = "-tls";
    let (mut p, port, log) = start_kvroute(env, bin, io, upstream, &section, tag)?;
    wait_ready_tls(&mut p, port, &tls.ca, &log, Duration::from_secs(15))?;
    Ok(Target {
        name: format!("kvroute TLS ({io})"),
        port,
        proc: Some(p),
    })
}

/// Waits until `GET /health` over TLS (verified against `ca`) answers 200.
pub fn wait_ready_tls(
    p: &mut Proc,
    port: u16,
    ca: &Path,
    log: &Path,
    limit: Duration,
) -> anyhow::Result<()> {
    let url = format!("https://127.0.0.1:{port}/health");
    wait_until_ready(p, &url, log, limit, || {
        Command::new("curl")
            .args(["-sf", "-o", "/dev/null", "--max-time", "2", "--cacert"])
            .arg(ca)
            .arg(&url)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// kvroute with its prediction cache on: the request is deterministic
/// (`temperature: 0`), so after the first one every request is a hit, and the row
/// measures a hit against the direct call and against the plain kvroute row (the
/// miss path).
pub fn kvroute_cache_hits(env: &Env, bin: &Path, upstream: u16) -> anyhow::Result<Target> {
    let mut t = kvroute_with(
        env,
        bin,
        "uring",
        upstream,
        "\n[prediction_cache]\nenabled = true\n",
        "-cache",
    )?;
    t.name = "kvroute cache hits (uring)".into();
    Ok(t)
}

fn kvroute_with(
    env: &Env,
    bin: &Path,
    io: &str,
    upstream: u16,
    extra_toml: &str,
    tag: &str,
) -> anyhow::Result<Target> {
    let (mut p, port, log) = start_kvroute(env, bin, io, upstream, extra_toml, tag)?;
    wait_ready(&mut p, port, "/health", &log, Duration::from_secs(15))?;
    Ok(Target {
        name: format!("kvroute ({io})"),
        port,
        proc: Some(p),
    })
}

/// kvroute with one worker on the proxy CPUs in front of `upstream`: the process,
/// its port and its log.
fn start_kvroute(
    env: &Env,
    bin: &Path,
    io: &str,
    upstream: u16,
    extra_toml: &str,
    tag: &str,
) -> anyhow::Result<(Proc, u16, PathBuf)> {
    let port = free_port();
    let admin = free_port();
    // Upstream pools are sized equally for every proxy (`--upstream-pool`).
    let conf = env.dir.join(format!("kvroute{tag}.toml"));
    fs::write(
        &conf,
        format!(
            "[upstream]\npool_max_idle = {}\n{extra_toml}",
            env.upstream_pool
        ),
    )?;
    let argv = vec![
        bin.display().to_string(),
        "--config".into(),
        conf.display().to_string(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--admin".into(),
        format!("127.0.0.1:{admin}"),
        "--workers".into(),
        "1".into(),
        "--io".into(),
        io.into(),
        "--policy".into(),
        "round-robin".into(),
        "--replica".into(),
        format!("http://127.0.0.1:{upstream}"),
    ];
    let name = format!("kvroute-{io}{tag}");
    let log = env.log(&name);
    let p = spawn(&name, &env.proxy_cpus, &argv, &log)?;
    Ok((p, port, log))
}

/// SGLang's router, or why it cannot run here.
pub fn sglang(env: &Env, python: &str, upstream: u16) -> anyhow::Result<Target> {
    let ok = Command::new(python)
        .args(["-c", "import sglang_router"])
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        bail!(
            "python module sglang_router not importable with {python} (pip install sglang-router)"
        );
    }
    let port = free_port();
    let argv = vec![
        python.into(),
        "-m".into(),
        "sglang_router.launch_router".into(),
        "--worker-urls".into(),
        format!("http://127.0.0.1:{upstream}"),
        "--policy".into(),
        "round_robin".into(),
        "--host".into(),
        "127.0.0.1".into(),
        "--port".into(),
        port.to_string(),
        // Its default `info` writes two log lines per request; the other proxies log nothing per request.
        "--log-level".into(),
        "warn".into(),
    ];
    let log = env.log("sglang-router");
    let mut p = spawn("sglang-router", &env.proxy_cpus, &argv, &log)?;
    // It waits for the worker's /health before serving, which the upstream answers.
    wait_ready(&mut p, port, "/health", &log, Duration::from_secs(60))?;
    // /health is answered by the router itself; check that proxying works too.
    wait_ready(&mut p, port, "/v1/models", &log, Duration::from_secs(30))?;
    Ok(Target {
        name: "sglang-router".into(),
        port,
        proc: Some(p),
    })
}

/// CPU time (user + system, in clock ticks) used so far by every process in
/// process group `pgid` (each server was started as a group leader, so this
/// covers nginx's worker and all threads of a multi-threaded router).
/// On a host shared with other work this is steadier than req/s: waiting for a
/// CPU costs the proxy latency and throughput but not CPU time.
pub fn group_cpu_ticks(pgid: u32) -> u64 {
    let Ok(dir) = fs::read_dir("/proc") else {
        return 0;
    };
    let mut total = 0;
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The command name may contain spaces and parentheses; fields resume after the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        // After ')': state ppid pgrp ... utime is the 12th, stime the 13th (stat fields 14 and 15).
        if f.len() > 12 && f[2].parse::<u32>().ok() == Some(pgid) {
            total += f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0);
        }
    }
    total
}

/// Clock ticks per second for /proc/*/stat times.
pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}
