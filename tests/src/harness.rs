//! Helpers for end-to-end tests: start the real binaries on loopback, a scriptable
//! upstream server, and a raw HTTP/1.1 client that shows exactly what a client sees.
//!
//! The client is blocking std I/O on purpose: tests send malformed bytes and
//! observe chunk arrival, which a full HTTP client library would hide.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvroute_testkit::metrics_text::Samples;

/// A port that was free a moment ago on 127.0.0.1, never one handed out before in
/// this process (it is [`kvroute_testkit::port::free_port`], re-exported for the
/// tests and xtask that import it from here).
pub use kvroute_testkit::port::free_port;

/// Path of a workspace binary next to the test executable (`target/<profile>/NAME`).
/// `cargo xtask test` builds every binary before running tests.
pub fn workspace_bin(name: &str) -> PathBuf {
    if let Ok(p) = std::env::var(format!(
        "KVROUTE_BIN_{}",
        name.replace('-', "_").to_uppercase()
    )) {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not found: build the workspace binaries first (`cargo build --workspace --bins`, which `cargo xtask test` does)",
        p.display()
    );
    p
}

/// A BPF test cannot run here because of `why`: a failure when `KVROUTE_REQUIRE_BPF` is set
/// (CI), else a printed skip; the caller returns.
pub fn skip_without_bpf(why: &str) {
    if std::env::var_os("KVROUTE_REQUIRE_BPF").is_some() {
        panic!("eBPF steering required (KVROUTE_REQUIRE_BPF) but {why}");
    }
    eprintln!("skipped: {why}");
}

/// Whether `steering` (the `steering` object of `/state`) has the BPF program attached; if
/// not, [`skip_without_bpf`] with kvroute's own fallback reason.
pub fn bpf_attached(steering: &serde_json::Value) -> bool {
    if steering["attached"] == true {
        return true;
    }
    let why = steering["fallback_reason"].as_str().unwrap_or("unknown");
    skip_without_bpf(&format!("eBPF steering is unavailable here ({why})"));
    false
}

/// Polls `f` every 20 ms until it is true or `limit` passes.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// A child process killed when dropped (by its [`kvroute_testkit::child::Child`]).
pub struct Proc {
    pub child: kvroute_testkit::child::Child,
    pub name: String,
}

impl Proc {
    pub fn spawn(bin: &str, args: &[String]) -> Proc {
        Self::spawn_env(bin, args, &[])
    }

    /// Like [`Proc::spawn`], with extra environment variables.
    pub fn spawn_env(bin: &str, args: &[String], env: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new(workspace_bin(bin));
        cmd.args(args).envs(env.iter().copied());
        Self::spawn_command(cmd, bin)
    }

    /// Starts `cmd` with no stdin or stdout, and its stderr shown only under
    /// `KVROUTE_TEST_LOG`; `name` names it in messages.
    pub fn spawn_command(cmd: Command, name: &str) -> Proc {
        let stderr = if std::env::var_os("KVROUTE_TEST_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        };
        Self::spawn_with_stderr(cmd, name, stderr)
    }

    /// Like [`Proc::spawn_command`], with stderr written to the file `log`, for
    /// tests that read what the process logged.
    pub fn spawn_command_logged(cmd: Command, name: &str, log: &std::path::Path) -> Proc {
        let file =
            std::fs::File::create(log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        Self::spawn_with_stderr(cmd, name, Stdio::from(file))
    }

    fn spawn_with_stderr(mut cmd: Command, name: &str, stderr: Stdio) -> Proc {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Proc::adopt(child, name)
    }

    /// Supervises a process the caller spawned; `name` names it in messages.
    pub fn adopt(child: std::process::Child, name: &str) -> Proc {
        Proc {
            child: kvroute_testkit::child::Child::adopt(name, child),
            name: name.into(),
        }
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([format!("-{sig}"), self.child.id().to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill -{sig} {}", self.name);
    }

    /// Waits for exit up to `limit`; `None` if still running.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        self.child
            .wait_exit(limit, Duration::from_millis(20))
            .map(|st| st.code().unwrap_or(-1))
    }
}

/// A running `kvroute` with its listen and admin addresses.
pub struct Kvroute {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
}

impl Kvroute {
    /// A kvroute process, started however the caller needed (another user, a
    /// namespace, a wrapper), that listens on loopback `port` with its admin API
    /// on `admin`.
    pub fn on(proc: Proc, port: u16, admin: u16) -> Kvroute {
        Kvroute {
            proc,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin)),
        }
    }

    /// Spawns kvroute on loopback `port` and `admin` with `extra` arguments and
    /// `env`, without waiting for it: for tests that choose the ports first or
    /// expect it not to become ready.
    pub fn spawn_on(port: u16, admin: u16, extra: &[&str], env: &[(&str, &str)]) -> Kvroute {
        let mut args = vec![
            "--listen".to_string(),
            format!("127.0.0.1:{port}"),
            "--admin".to_string(),
            format!("127.0.0.1:{admin}"),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Kvroute::on(Proc::spawn_env("kvroute", &args, env), port, admin)
    }

    /// Starts kvroute on free ports with `extra` arguments and waits until it serves.
    pub fn start(extra: &[&str]) -> Kvroute {
        let k = Kvroute::spawn_on(free_port(), free_port(), extra, &[]);
        k.wait_ready();
        k
    }

    /// Spawns kvroute on free ports with `extra` arguments and `env`, its
    /// stderr written to the file `log`, without waiting for it.
    pub fn spawn_logged(extra: &[&str], env: &[(&str, &str)], log: &std::path::Path) -> Kvroute {
        let (port, admin) = (free_port(), free_port());
        let mut cmd = Command::new(workspace_bin("kvroute"));
        cmd.args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin", &format!("127.0.0.1:{admin}")])
            .args(extra)
            .envs(env.iter().copied());
        Kvroute::on(Proc::spawn_command_logged(cmd, "kvroute", log), port, admin)
    }

    /// Waits until the admin API answers `/healthz`.
    pub fn wait_ready(&self) {
        let up = wait_until(Duration::from_secs(10), || {
            request(
                self.admin,
                "GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            )
            .map(|r| r.status == 200)
            .unwrap_or(false)
        });
        assert!(up, "kvroute did not become ready");
    }

    pub fn admin_get(&self, path: &str) -> Response {
        request(
            self.admin,
            &format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"),
        )
        .expect("admin request")
    }

    /// The value of the Prometheus sample `series` (its name and labels as
    /// `/metrics` writes them), if it is exported.
    pub fn metric(&self, series: &str) -> Option<f64> {
        Samples::parse(&self.admin_get("/metrics").text()).series(series)
    }

    pub fn admin_put(&self, path: &str, body: &str) -> Response {
        request(
            self.admin,
            &format!(
                "PUT {path} HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
        )
        .expect("admin request")
    }
}

/// A response as a client saw it.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The response said `connection: close`.
    pub closed: bool,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// A client connection that reads responses one at a time.
pub struct Client {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> std::io::Result<Client> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        stream.set_nodelay(true)?;
        Ok(Client {
            stream,
            buf: Vec::new(),
        })
    }

    pub fn send(&mut self, raw: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(raw)
    }

    fn fill(&mut self) -> std::io::Result<usize> {
        let mut tmp = [0u8; 16384];
        loop {
            // A signal sent by the test (SIGTERM to kvroute) can interrupt this read.
            match self.stream.read(&mut tmp) {
                Ok(n) => {
                    self.buf.extend_from_slice(&tmp[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads a response head; returns status and headers.
    pub fn read_head(&mut self) -> std::io::Result<(u16, Vec<(String, String)>)> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let mut hs = [httparse::EMPTY_HEADER; 64];
                let mut r = httparse::Response::new(&mut hs);
                r.parse(&self.buf[..end + 4])
                    .map_err(|e| std::io::Error::other(format!("bad response head: {e}")))?;
                let status = r.code.unwrap_or(0);
                let headers = header_pairs(r.headers);
                self.buf.drain(..end + 4);
                return Ok((status, headers));
            }
            if self.fill()? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Reads the next chunk of a chunked body (`None` at the terminating chunk).
    pub fn read_chunk(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(line_end) = find(&self.buf, b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
                let size =
                    usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                        .map_err(|_| std::io::Error::other(format!("bad chunk line {line:?}")))?;
                let need = line_end + 2 + size + 2;
                while self.buf.len() < need {
                    if self.fill()? == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                }
                let data = self.buf[line_end + 2..line_end + 2 + size].to_vec();
                self.buf.drain(..need);
                return Ok(if size == 0 { None } else { Some(data) });
            }
            if self.fill()? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Reads one complete response.
    pub fn read_response(&mut self, head_request: bool) -> std::io::Result<Response> {
        let (status, headers) = self.read_head()?;
        let get = |n: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(n))
                .map(|(_, v)| v.clone())
        };
        let close = get("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let mut body = Vec::new();
        if head_request || status == 204 || status == 304 || (100..200).contains(&status) {
        } else if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            while let Some(c) = self.read_chunk()? {
                body.extend_from_slice(&c);
            }
        } else if let Some(len) = get("content-length") {
            let len: usize = len.trim().parse().map_err(std::io::Error::other)?;
            while self.buf.len() < len {
                if self.fill()? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
            }
            body = self.buf.drain(..len).collect();
        } else {
            while self.fill()? > 0 {}
            body = std::mem::take(&mut self.buf);
        }
        Ok(Response {
            status,
            headers,
            body,
            closed: close,
        })
    }

    /// True when the server has closed (EOF within 200 ms with no data pending).
    pub fn peer_closed(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let _ = self
            .stream
            .set_read_timeout(Some(Duration::from_millis(200)));
        let mut tmp = [0u8; 1];
        let r = match self.stream.peek(&mut tmp) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        };
        let _ = self.stream.set_read_timeout(Some(Duration::from_secs(20)));
        r
    }
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// One request on a new connection; returns the response.
pub fn request(addr: SocketAddr, raw: &str) -> std::io::Result<Response> {
    let mut c = Client::connect(addr)?;
    c.send(raw.as_bytes())?;
    c.read_response(raw.starts_with("HEAD "))
}

/// `POST path` with a JSON body on a new connection.
pub fn post(addr: SocketAddr, path: &str, body: &str) -> std::io::Result<Response> {
    request(
        addr,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: kvroute\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
}

/// What a scripted upstream saw in one request.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl SeenRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A small upstream whose behaviour is chosen by the request path:
/// - `/sse?n=N`: chunked `text/event-stream`, first event at once, the rest after [`Upstream::release`]
/// - `/die`: one SSE event, then the connection is dropped mid-stream
/// - `/reset`: closes without answering
/// - anything else: 200 JSON `{"name", "path", "len"}` with Content-Length
///
/// Every response carries `x-upstream: NAME`.
pub struct Upstream {
    pub addr: SocketAddr,
    pub name: String,
    pub connections: Arc<AtomicUsize>,
    pub requests: Arc<Mutex<Vec<SeenRequest>>>,
    gate: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Upstream {
    pub fn start(name: &str) -> Upstream {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
        let addr = l.local_addr().expect("addr");
        let u = Upstream {
            addr,
            name: name.to_string(),
            connections: Arc::new(AtomicUsize::new(0)),
            requests: Arc::new(Mutex::new(Vec::new())),
            gate: Arc::new(AtomicBool::new(false)),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let (conns, reqs, gate, stop, name) = (
            u.connections.clone(),
            u.requests.clone(),
            u.gate.clone(),
            u.stop.clone(),
            u.name.clone(),
        );
        l.set_nonblocking(true).expect("nonblocking");
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((s, _)) => {
                        conns.fetch_add(1, Ordering::Relaxed);
                        let (reqs, gate, name, stop) =
                            (reqs.clone(), gate.clone(), name.clone(), stop.clone());
                        std::thread::spawn(move || upstream_conn(s, &name, &reqs, &gate, &stop));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        u
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Lets held SSE streams send their remaining events.
    pub fn release(&self) {
        self.gate.store(true, Ordering::SeqCst);
    }

    pub fn seen(&self) -> Vec<SeenRequest> {
        self.requests.lock().expect("lock").clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One read (or read timeout) into `buf`; false when the peer closed, the read failed,
/// or the upstream is stopping.
fn read_more(s: &mut TcpStream, buf: &mut Vec<u8>, tmp: &mut [u8], stop: &AtomicBool) -> bool {
    match s.read(tmp) {
        Ok(0) => false,
        Ok(n) => {
            buf.extend_from_slice(&tmp[..n]);
            true
        }
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            !stop.load(Ordering::Relaxed)
        }
        Err(_) => false,
    }
}

fn upstream_conn(
    mut s: TcpStream,
    name: &str,
    reqs: &Mutex<Vec<SeenRequest>>,
    gate: &AtomicBool,
    stop: &AtomicBool,
) {
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = Vec::new();
    let mut tmp = [0u8; 65536];
    loop {
        let end = loop {
            if let Some(e) = find(&buf, b"\r\n\r\n") {
                break e + 4;
            }
            if !read_more(&mut s, &mut buf, &mut tmp, stop) {
                return;
            }
        };
        let mut hs = [httparse::EMPTY_HEADER; 64];
        let mut r = httparse::Request::new(&mut hs);
        if r.parse(&buf[..end]).is_err() {
            return;
        }
        let method = r.method.unwrap_or("").to_string();
        let path = r.path.unwrap_or("").to_string();
        let headers = header_pairs(r.headers);
        let len: usize = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < end + len {
            if !read_more(&mut s, &mut buf, &mut tmp, stop) {
                return;
            }
        }
        let body: Vec<u8> = buf[end..end + len].to_vec();
        buf.drain(..end + len);
        reqs.lock().expect("lock").push(SeenRequest {
            method: method.clone(),
            path: path.clone(),
            headers,
            body: body.clone(),
        });
        let route = path.split('?').next().unwrap_or("");
        let ok = match route {
            "/reset" => return,
            "/sse" | "/die" => {
                let n: usize = path
                    .split("n=")
                    .nth(1)
                    .and_then(|v| v.split('&').next()?.parse().ok())
                    .unwrap_or(3);
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\nx-upstream: {name}\r\n\r\n"
                );
                let ev = |i: usize| {
                    let d = format!("data: {{\"i\":{i}}}\n\n");
                    format!("{:x}\r\n{d}\r\n", d.len())
                };
                if s.write_all(format!("{head}{}", ev(0)).as_bytes()).is_err() {
                    return;
                }
                if route == "/die" {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                    return;
                }
                let end = Instant::now() + Duration::from_secs(15);
                while !gate.load(Ordering::SeqCst) && Instant::now() < end {
                    std::thread::sleep(Duration::from_millis(5));
                }
                let mut rest = String::new();
                for i in 1..n {
                    rest.push_str(&ev(i));
                }
                rest.push_str("0\r\n\r\n");
                s.write_all(rest.as_bytes()).is_ok()
            }
            _ => {
                let body = if method == "HEAD" {
                    String::new()
                } else {
                    serde_json::json!({"name": name, "path": path, "len": body.len()}).to_string()
                };
                let clen = if method == "HEAD" { 42 } else { body.len() };
                s.write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {clen}\r\nx-upstream: {name}\r\nkeep-alive: timeout=5\r\n\r\n{body}"
                    )
                    .as_bytes(),
                )
                .is_ok()
            }
        };
        if !ok {
            return;
        }
    }
}

/// A running `kvroute-sim` replica, killed when dropped.
pub struct Sim {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub name: String,
}

impl Sim {
    /// Starts a sim named `name` at a 0.01 time scale (override with `extra`,
    /// where a repeated flag's last value wins) and waits for `/health`.
    pub fn start(name: &str, extra: &[&str]) -> Sim {
        let port = free_port();
        let mut args = vec![
            "--listen".to_string(),
            format!("127.0.0.1:{port}"),
            "--name".into(),
            name.into(),
            "--time-scale".into(),
            "0.01".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let proc = Proc::spawn("kvroute-sim", &args);
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        assert!(
            wait_until(Duration::from_secs(10), || {
                request(
                    addr,
                    "GET /health HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n",
                )
                .is_ok_and(|r| r.status == 200)
            }),
            "sim {name} did not start"
        );
        Sim {
            proc,
            addr,
            name: name.into(),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// A test-owned `NOTIFY_SOCKET`: stands in for systemd to receive sd_notify messages.
pub struct NotifySocket {
    sock: std::os::unix::net::UnixDatagram,
    pub path: PathBuf,
}

impl Default for NotifySocket {
    fn default() -> Self {
        Self::new()
    }
}

impl NotifySocket {
    pub fn new() -> NotifySocket {
        let path = std::env::temp_dir().join(format!(
            "kvroute-notify-{}-{}",
            std::process::id(),
            free_port()
        ));
        let _ = std::fs::remove_file(&path);
        let sock = std::os::unix::net::UnixDatagram::bind(&path).expect("bind notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("read timeout");
        NotifySocket { sock, path }
    }

    /// Messages received within `limit`, stopping early once `until` matches one.
    pub fn collect(&self, limit: Duration, until: impl Fn(&str) -> bool) -> Vec<String> {
        let end = Instant::now() + limit;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < end {
            if let Ok(n) = self.sock.recv(&mut buf) {
                let m = String::from_utf8_lossy(&buf[..n]).into_owned();
                let stop = until(&m);
                out.push(m);
                if stop {
                    break;
                }
            }
        }
        out
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A `/v1/completions` body for kvroute-sim (`sim-model`, 2 tokens): `system` (the
/// shared prefix), then `question`.
pub fn sim_completion(system: &str, question: &str) -> String {
    serde_json::json!({
        "model": "sim-model",
        "prompt": format!("{system}\n\nQuestion: {question}"),
        "max_tokens": 2
    })
    .to_string()
}

/// Deterministic word-like filler text of exactly `bytes` bytes, distinct per seed.
pub fn filler_text(seed: u64, bytes: usize) -> String {
    let words = [
        "kv", "cache", "prefix", "token", "route", "replica", "block", "prompt",
    ];
    let mut s = String::with_capacity(bytes + 8);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while s.len() < bytes {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push_str(words[(x % 8) as usize]);
        s.push(' ');
    }
    s.truncate(bytes);
    s
}

/// httparse headers as owned (name, value) pairs.
fn header_pairs(headers: &[httparse::Header<'_>]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|h| {
            (
                h.name.to_string(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect()
}

/// A fresh directory under the system temp dir, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!(
            "kvroute-{tag}-{}-{}",
            std::process::id(),
            free_port()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("create the temp dir");
        TempDir(d)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
