//! TLS end to end: kvroute terminating TLS for curl and a rustls client (both
//! I/O runtimes), refusing bad certificate files, answering plain HTTP on the
//! TLS port, keeping slow handshakes from delaying others, reloading its
//! certificate on SIGHUP, and speaking TLS to `https://` replicas (nginx in
//! front of the simulator). Certificates are made here with rcgen.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvroute_testkit::metrics_text::Samples;
use kvroute_tests::harness::{
    free_port, post, request, wait_until, workspace_bin, Kvroute, NotifySocket, Proc, Sim, TempDir,
};
use kvroute_tests::pki::Pki;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

both_io!(
    curl_and_a_rustls_client_over_tls,
    plain_http_and_slow_handshakes,
    sighup_reloads_the_certificate,
    https_replicas_behind_nginx,
);

// ---------------------------------------------------------------- a TLS client

fn client_config(cas: &[&str]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// A blocking HTTP/1.1 client over rustls: several requests on one connection.
struct TlsClient {
    tls: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    buf: Vec<u8>,
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, n: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.as_str())
    }
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

impl TlsClient {
    fn connect(addr: SocketAddr, cfg: Arc<rustls::ClientConfig>) -> std::io::Result<TlsClient> {
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        tcp.set_read_timeout(Some(Duration::from_secs(20)))?;
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let conn = rustls::ClientConnection::new(cfg, name).map_err(std::io::Error::other)?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock)?;
        }
        Ok(TlsClient {
            tls,
            buf: Vec::new(),
        })
    }

    /// The leaf certificate the server presented.
    fn peer_cert(&self) -> CertificateDer<'static> {
        self.tls.conn.peer_certificates().expect("a certificate")[0].clone()
    }

    fn fill(&mut self) -> std::io::Result<usize> {
        let mut tmp = [0u8; 16384];
        let n = self.tls.read(&mut tmp)?;
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(n)
    }

    fn post(&mut self, path: &str, body: &str) -> std::io::Result<Reply> {
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: kvroute\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.tls.write_all(req.as_bytes())?;
        self.tls.flush()?;
        self.read_reply()
    }

    fn read_reply(&mut self) -> std::io::Result<Reply> {
        let (status, headers) = loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let mut hs = [httparse::EMPTY_HEADER; 64];
                let mut r = httparse::Response::new(&mut hs);
                r.parse(&self.buf[..end + 4])
                    .map_err(std::io::Error::other)?;
                let status = r.code.unwrap_or(0);
                let headers: Vec<(String, String)> = r
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_string(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                self.buf.drain(..end + 4);
                break (status, headers);
            }
            if self.fill()? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        };
        let get = |n: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(n))
                .map(|(_, v)| v.clone())
        };
        let mut body = Vec::new();
        if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            loop {
                let line_end = loop {
                    if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                        break i;
                    }
                    if self.fill()? == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                };
                let line = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
                let size = usize::from_str_radix(line.split(';').next().unwrap().trim(), 16)
                    .map_err(std::io::Error::other)?;
                let need = line_end + 2 + size + 2;
                while self.buf.len() < need {
                    if self.fill()? == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                }
                body.extend_from_slice(&self.buf[line_end + 2..line_end + 2 + size]);
                self.buf.drain(..need);
                if size == 0 {
                    break;
                }
            }
        } else {
            let len: usize = get("content-length")
                .map(|v| v.trim().parse().unwrap())
                .unwrap_or(0);
            while self.buf.len() < len {
                if self.fill()? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
            }
            body = self.buf.drain(..len).collect();
        }
        Ok(Reply {
            status,
            headers,
            body,
        })
    }
}

// ---------------------------------------------------------------- kvroute

const COMPLETION: &str = r#"{"prompt":"hello over tls","max_tokens":4}"#;

/// kvroute with `config` (TOML) on free ports, `io` runtime and one worker,
/// once its admin API answers.
fn start_kvroute(dir: &Path, io: &str, config: &str, env: &[(&str, &str)]) -> Kvroute {
    let path = dir.join(format!("kvroute-{}.toml", free_port()));
    std::fs::write(&path, config).unwrap();
    let p = path.display().to_string();
    let k = Kvroute::spawn_on(
        free_port(),
        free_port(),
        &["--config", &p, "--io", io, "--workers", "1"],
        env,
    );
    let up = wait_until(Duration::from_secs(10), || {
        request(
            k.admin,
            "GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .is_ok_and(|r| r.status == 200)
    });
    assert!(up, "kvroute did not become ready");
    k
}

fn tls_section(dir: &Path) -> String {
    format!(
        "[tls]\ncert = {:?}\nkey = {:?}\n",
        dir.join("cert.pem").display().to_string(),
        dir.join("key.pem").display().to_string()
    )
}

fn replicas(urls: &[String]) -> String {
    urls.iter()
        .map(|u| format!("[[replicas]]\nurl = {u:?}\n"))
        .collect()
}

/// A counter's value in kvroute's `/metrics` (0 when absent): `series` is its name and
/// labels as `/metrics` writes them.
fn metric(k: &Kvroute, series: &str) -> f64 {
    Samples::parse(&k.admin_get("/metrics").text())
        .series(series)
        .unwrap_or(0.0)
}

fn curl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .output()
        .expect("curl runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The SSE events of a completion stream: every `data:` payload, `[DONE]` last.
fn sse_events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            e.trim()
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not an SSE data event: {e:?}"))
                .to_string()
        })
        .collect()
}

/// A stream of `max_tokens` 5 is five text chunks, then `[DONE]`.
fn assert_full_stream(body: &str) {
    let events = sse_events(body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{body}");
    let texts = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<serde_json::Value>(e).unwrap())
        .filter(|c| {
            c["choices"][0]["text"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
        })
        .count();
    assert_eq!(texts, 5, "one event per token: {body}");
}

const STREAM: &str = r#"{"prompt":"stream over tls","max_tokens":5,"stream":true}"#;

// ---------------------------------------------------------------- tests

fn curl_and_a_rustls_client_over_tls(io: &str) {
    let dir = TempDir::new("curl");
    let pki = Pki::new("curl");
    pki.write(&dir.0);
    let sim = Sim::start("s0", &[]);
    let k = start_kvroute(
        &dir.0,
        io,
        &format!("{}{}", tls_section(&dir.0), replicas(&[sim.url()])),
        &[],
    );
    let url = format!("https://127.0.0.1:{}/v1/completions", k.addr.port());
    let ca = dir.0.join("ca.pem").display().to_string();

    let (ok, out, err) = curl(&[
        "--cacert",
        &ca,
        "-H",
        "content-type: application/json",
        "-d",
        COMPLETION,
        &url,
    ]);
    assert!(ok, "curl failed: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert!(v["choices"][0]["text"].is_string(), "{out}");

    let (ok, out, err) = curl(&[
        "-N",
        "--cacert",
        &ca,
        "-H",
        "content-type: application/json",
        "-d",
        STREAM,
        &url,
    ]);
    assert!(ok, "curl stream failed: {err}");
    assert_full_stream(&out);

    // curl trusting nothing but the system roots refuses the test CA's certificate.
    let (ok, _, err) = curl(&["-d", COMPLETION, &url]);
    assert!(!ok && err.contains("certificate"), "{err}");

    // Keep-alive: several requests, one connection, one handshake.
    let before = metric(&k, "kvroute_tls_handshakes_total");
    let mut c = TlsClient::connect(k.addr, client_config(&[&pki.ca_pem])).unwrap();
    assert_eq!(c.tls.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
    for i in 0..4 {
        let r = c.post("/v1/completions", COMPLETION).unwrap();
        assert_eq!(
            r.status,
            200,
            "request {i}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert!(r.json()["choices"][0]["text"].is_string());
        assert_ne!(r.header("connection"), Some("close"));
    }
    let r = c.post("/v1/completions", STREAM).unwrap();
    assert_eq!(r.status, 200);
    assert_full_stream(&String::from_utf8_lossy(&r.body));
    assert!(wait_until(Duration::from_secs(5), || {
        metric(&k, "kvroute_tls_handshakes_total") == before + 1.0
    }));
}

/// The first bytes of a real ClientHello, for a client that stops halfway.
fn partial_client_hello() -> Vec<u8> {
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut c = rustls::ClientConnection::new(client_config(&[]), name).unwrap();
    let mut hello = Vec::new();
    c.write_tls(&mut hello).unwrap();
    assert_eq!(hello[0], 0x16);
    hello.truncate(hello.len() / 2);
    hello
}

/// True once the server has closed `s` (EOF or reset), false while it is open.
fn closed_now(s: &mut TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 64];
    let r = match s.read(&mut b) {
        Ok(_) => true,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    s.set_nonblocking(false).unwrap();
    r
}

fn plain_http_and_slow_handshakes(io: &str) {
    let dir = TempDir::new("slow");
    let pki = Pki::new("slow");
    pki.write(&dir.0);
    let sim = Sim::start("s0", &[]);
    let head_timeout_ms = 3000;
    let k = start_kvroute(
        &dir.0,
        io,
        &format!(
            "[limits]\nhead_timeout_ms = {head_timeout_ms}\n{}{}",
            tls_section(&dir.0),
            replicas(&[sim.url()])
        ),
        &[],
    );

    // Plain HTTP on the TLS port: a plain 400 that says why, then the close.
    let mut plain = kvroute_tests::harness::Client::connect(k.addr).unwrap();
    plain
        .send(b"GET /v1/models HTTP/1.1\r\nHost: kvroute\r\n\r\n")
        .unwrap();
    let r = plain.read_response(false).unwrap();
    assert_eq!(r.status, 400);
    assert!(r.closed, "connection: close");
    let e = &r.json()["error"];
    assert!(e["message"].as_str().unwrap().contains("TLS port"), "{e}");
    assert_eq!(e["type"], "invalid_request_error");
    assert!(wait_until(Duration::from_secs(5), || plain.peer_closed()));
    assert!(wait_until(Duration::from_secs(5), || {
        metric(
            &k,
            "kvroute_tls_handshake_failures_total{reason=\"plain_http\"}",
        ) == 1.0
    }));

    // One client sends nothing, one half a ClientHello; another's request
    // goes through meanwhile.
    let opened = Instant::now();
    let mut silent = TcpStream::connect(k.addr).unwrap();
    let mut half = TcpStream::connect(k.addr).unwrap();
    half.write_all(&partial_client_hello()).unwrap();
    let mut c = TlsClient::connect(k.addr, client_config(&[&pki.ca_pem])).unwrap();
    let r = c.post("/v1/completions", COMPLETION).unwrap();
    assert_eq!(r.status, 200);
    if opened.elapsed() < Duration::from_millis(head_timeout_ms * 2 / 3) {
        assert!(!closed_now(&mut silent), "the silent client is still open");
        assert!(
            !closed_now(&mut half),
            "the half-hello client is still open"
        );
    }
    // Both are closed after the head timeout.
    for s in [&mut silent, &mut half] {
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut b = [0u8; 64];
        match s.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("expected the server to close, got {other:?}"),
        }
    }
    assert!(
        opened.elapsed() >= Duration::from_millis(head_timeout_ms),
        "closed only once limits.head_timeout_ms had passed"
    );
    assert!(
        metric(
            &k,
            "kvroute_tls_handshake_failures_total{reason=\"timeout\"}"
        ) >= 2.0
    );
    // The other connection is unaffected.
    assert_eq!(c.post("/v1/completions", COMPLETION).unwrap().status, 200);
}

fn sighup_reloads_the_certificate(io: &str) {
    let dir = TempDir::new("reload");
    let a = Pki::new("a");
    let b = Pki::new("b");
    a.write(&dir.0);
    let sim = Sim::start("s0", &[]);
    let notify = NotifySocket::new();
    let sock = notify.path.display().to_string();
    let k = start_kvroute(
        &dir.0,
        io,
        &format!("{}{}", tls_section(&dir.0), replicas(&[sim.url()])),
        &[("NOTIFY_SOCKET", &sock)],
    );
    let _ = notify.collect(Duration::from_secs(10), |m| m.contains("READY=1"));
    let both = client_config(&[&a.ca_pem, &b.ca_pem]);

    let mut kept = TlsClient::connect(k.addr, client_config(&[&a.ca_pem])).unwrap();
    assert_eq!(
        kept.post("/v1/completions", COMPLETION).unwrap().status,
        200
    );
    assert_eq!(kept.peer_cert(), a.cert_der());

    // Continuous traffic, a new connection per request, through the reload.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let traffic = {
        let (stop, ok, failed, both, addr) = (
            stop.clone(),
            ok.clone(),
            failed.clone(),
            both.clone(),
            k.addr,
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let r = TlsClient::connect(addr, both.clone())
                    .and_then(|mut c| c.post("/v1/completions", COMPLETION));
                match r {
                    Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    other => {
                        eprintln!("failed during reload: {:?}", other.map(|r| r.status));
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        })
    };
    assert!(wait_until(Duration::from_secs(10), || ok
        .load(Ordering::Relaxed)
        >= 3));

    b.write(&dir.0);
    k.proc.signal("HUP");
    let msgs = notify.collect(Duration::from_secs(10), |m| m.contains("READY=1"));
    assert!(msgs.iter().any(|m| m.contains("RELOADING=1")), "{msgs:?}");
    let fresh = TlsClient::connect(k.addr, both.clone()).unwrap();
    assert_eq!(
        fresh.peer_cert(),
        b.cert_der(),
        "new connections get the new certificate"
    );
    // The connection from before the reload still works.
    assert_eq!(
        kept.post("/v1/completions", COMPLETION).unwrap().status,
        200
    );
    let at_reload = ok.load(Ordering::Relaxed);
    assert!(wait_until(Duration::from_secs(10), || {
        ok.load(Ordering::Relaxed) >= at_reload + 3
    }));
    stop.store(true, Ordering::Relaxed);
    traffic.join().unwrap();
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no request failed across the reload"
    );

    // A bad replacement: logged, and the running certificate stays.
    std::fs::write(dir.0.join("cert.pem"), "not a certificate\n").unwrap();
    k.proc.signal("HUP");
    let msgs = notify.collect(Duration::from_secs(10), |m| m.contains("READY=1"));
    assert!(msgs.iter().any(|m| m.contains("RELOADING=1")), "{msgs:?}");
    let mut after = TlsClient::connect(k.addr, both).unwrap();
    assert_eq!(after.peer_cert(), b.cert_der());
    assert_eq!(
        after.post("/v1/completions", COMPLETION).unwrap().status,
        200
    );
}

/// kvroute refuses to start on a certificate or key that does not load, and
/// says which file and why; an expired certificate is only a warning.
#[test]
fn refuses_to_start_on_bad_certificate_files() {
    let dir = TempDir::new("refuse");
    let pki = Pki::new("refuse");
    pki.write(&dir.0);
    let d = &dir.0;
    let other = Pki::new("other");
    std::fs::write(d.join("other-key.pem"), &other.key_pem).unwrap();
    std::fs::write(d.join("garbage.pem"), "hello, I am not PEM\n").unwrap();
    std::fs::write(d.join("empty.pem"), "").unwrap();
    std::fs::create_dir_all(d.join("a-directory.pem")).unwrap();
    let old = Pki::with_validity("old", Some((2001, 2002)));
    std::fs::write(d.join("old-cert.pem"), &old.cert_pem).unwrap();
    std::fs::write(d.join("old-key.pem"), &old.key_pem).unwrap();

    let run = |cert: &str, key: &str, check: bool| {
        let cfg = d.join(format!("cfg-{}.toml", free_port()));
        std::fs::write(
            &cfg,
            format!(
                "listen = \"127.0.0.1:{}\"\nadmin = \"127.0.0.1:{}\"\n[tls]\ncert = {:?}\nkey = {:?}\n",
                free_port(),
                free_port(),
                d.join(cert).display().to_string(),
                d.join(key).display().to_string()
            ),
        )
        .unwrap();
        let mut cmd = Command::new(workspace_bin("kvroute"));
        cmd.args(["--config", &cfg.display().to_string(), "--io", "epoll"]);
        if check {
            cmd.arg("--check-config");
        }
        let mut child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // A start that wrongly succeeds would run forever: bounded.
        let exited = wait_until(Duration::from_secs(10), || {
            child.try_wait().ok().flatten().is_some()
        });
        if !exited {
            let _ = child.kill();
        }
        let out = child.wait_with_output().unwrap();
        (
            exited.then(|| out.status.code()).flatten(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for (cert, key, file, why) in [
        ("missing.pem", "key.pem", "missing.pem", "No such file"),
        ("a-directory.pem", "key.pem", "a-directory.pem", "directory"),
        ("empty.pem", "key.pem", "empty.pem", "empty"),
        (
            "garbage.pem",
            "key.pem",
            "garbage.pem",
            "no PEM certificate",
        ),
        (
            "cert.pem",
            "garbage.pem",
            "garbage.pem",
            "no PEM private key",
        ),
        (
            "cert.pem",
            "other-key.pem",
            "other-key.pem",
            "does not match",
        ),
    ] {
        for check in [true, false] {
            let (code, stderr) = run(cert, key, check);
            assert!(
                code.is_some_and(|c| c != 0),
                "{cert}/{key} (check {check}): exit {code:?}, {stderr}"
            );
            assert!(
                stderr.contains(file) && stderr.contains(why),
                "{cert}/{key}: stderr should name {file} and say {why:?}: {stderr}"
            );
        }
    }
    let (code, stderr) = run("old-cert.pem", "old-key.pem", true);
    assert_eq!(code, Some(0), "an expired certificate only warns: {stderr}");
    assert!(
        stderr.contains("expired") && stderr.contains("old-cert.pem") && stderr.contains("2002"),
        "the warning names the file and its notAfter: {stderr}"
    );
}

// ---------------------------------------------------------------- https replicas

/// nginx in front of the simulator, serving TLS with the given certificates on
/// each port; its access log has each request's connection and its number on it.
struct Nginx {
    _proc: Proc,
    log: PathBuf,
}

fn nginx_or_skip() -> Option<&'static str> {
    const NGINX: &str = "/usr/sbin/nginx";
    if Path::new(NGINX).exists() {
        return Some(NGINX);
    }
    if std::env::var_os("KVROUTE_REQUIRE_NGINX").is_some() {
        panic!("nginx required (KVROUTE_REQUIRE_NGINX) but {NGINX} is missing");
    }
    eprintln!("skipped: nginx is not installed ({NGINX} missing; apt-get install nginx)");
    None
}

impl Nginx {
    fn start(bin: &str, dir: &Path, upstream: SocketAddr, servers: &[(u16, &Pki, &str)]) -> Nginx {
        let mut blocks = String::new();
        for (port, pki, tag) in servers {
            let cert = dir.join(format!("nginx-{tag}-cert.pem"));
            let key = dir.join(format!("nginx-{tag}-key.pem"));
            std::fs::write(&cert, &pki.cert_pem).unwrap();
            std::fs::write(&key, &pki.key_pem).unwrap();
            blocks.push_str(&format!(
                "  server {{\n    listen 127.0.0.1:{port} ssl;\n    ssl_certificate {};\n    ssl_certificate_key {};\n    keepalive_requests 10000;\n    keepalive_timeout 60s;\n    location / {{\n      proxy_pass http://{upstream};\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_buffering off;\n    }}\n  }}\n",
                cert.display(),
                key.display()
            ));
        }
        let log = dir.join("access.log");
        let conf = format!(
            "pid {d}/nginx.pid;\nerror_log {d}/error.log;\nworker_processes 1;\nevents {{ worker_connections 256; }}\nhttp {{\n  log_format conn '$connection $connection_requests $status $request';\n  access_log {log} conn;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n{blocks}}}\n",
            d = dir.display(),
            log = log.display(),
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let mut cmd = Command::new(bin);
        cmd.args([
            "-p",
            &dir.display().to_string(),
            "-c",
            &dir.join("nginx.conf").display().to_string(),
            "-g",
            "daemon off;",
        ]);
        let proc = Proc::spawn_command(cmd, "nginx");
        for (port, _, _) in servers {
            let addr = SocketAddr::from(([127, 0, 0, 1], *port));
            assert!(
                wait_until(Duration::from_secs(10), || TcpStream::connect(addr).is_ok()),
                "nginx did not listen on {addr}: {}",
                std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
            );
        }
        Nginx { _proc: proc, log }
    }

    /// The most requests nginx has served on one client connection.
    fn max_requests_per_connection(&self) -> u64 {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(1)?.parse().ok())
            .max()
            .unwrap_or(0)
    }
}

fn https_replicas_behind_nginx(io: &str) {
    let Some(bin) = nginx_or_skip() else { return };
    let dir = TempDir::new("nginx");
    let good = Pki::new("replica");
    let rogue = Pki::new("rogue");
    // Signed by a CA in ca_file, but its validity ended in 2001.
    let expired = Pki::with_validity("expired", Some((2000, 2001)));
    std::fs::write(
        dir.0.join("replica-ca.pem"),
        format!("{}{}", good.ca_pem, expired.ca_pem),
    )
    .unwrap();
    let sim = Sim::start("s0", &[]);
    let (good_port, rogue_port, expired_port) = (free_port(), free_port(), free_port());
    let nginx = Nginx::start(
        bin,
        &dir.0,
        sim.addr,
        &[
            (good_port, &good, "good"),
            (rogue_port, &rogue, "rogue"),
            (expired_port, &expired, "expired"),
        ],
    );
    let good_url = format!("https://127.0.0.1:{good_port}");
    let rogue_url = format!("https://127.0.0.1:{rogue_port}");
    let expired_url = format!("https://127.0.0.1:{expired_port}");
    let upstream = format!(
        "[upstream]\nca_file = {:?}\n",
        dir.0.join("replica-ca.pem").display().to_string()
    );

    // Through a trusted replica: plain and streamed, over pooled connections.
    let k = start_kvroute(
        &dir.0,
        io,
        &format!("{upstream}{}", replicas(std::slice::from_ref(&good_url))),
        &[],
    );
    for i in 0..5 {
        let r = post(k.addr, "/v1/completions", COMPLETION).unwrap();
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert!(r.json()["choices"][0]["text"].is_string());
    }
    let r = post(k.addr, "/v1/completions", STREAM).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_full_stream(&r.text());
    assert!(
        wait_until(Duration::from_secs(5), || nginx
            .max_requests_per_connection()
            >= 2),
        "kvroute reused its TLS connection to nginx: {}",
        std::fs::read_to_string(&nginx.log).unwrap_or_default()
    );
    drop(k);

    // A replica whose certificate another CA signed fails like a refused one:
    // the request goes to the other replica, and /state says why.
    let k = start_kvroute(
        &dir.0,
        io,
        &format!(
            "[routing]\npolicy = \"round-robin\"\n{upstream}{}",
            replicas(&[rogue_url.clone(), good_url.clone()])
        ),
        &[],
    );
    for i in 0..4 {
        let r = post(k.addr, "/v1/completions", COMPLETION).unwrap();
        assert_eq!(r.status, 200, "request {i} fails over: {}", r.text());
    }
    let state = k.admin_get("/state").json();
    let replica = |url: &str| {
        state["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["url"] == url)
            .cloned()
            .unwrap()
    };
    let bad = replica(&rogue_url);
    assert_eq!(
        bad["last_error"], "certificate verify failed: UnknownIssuer",
        "{bad}"
    );
    assert!(bad["failures_total"].as_u64().unwrap() >= 1);
    assert!(replica(&good_url).get("last_error").is_none());
    drop(k);

    // kvroute with `url` as its only replica and no retry.
    let only = |url: &str| {
        start_kvroute(
            &dir.0,
            io,
            &format!(
                "[upstream]\nretries = 0\nca_file = {:?}\n{}",
                dir.0.join("replica-ca.pem").display().to_string(),
                replicas(&[url.to_string()])
            ),
            &[],
        )
    };

    // With only that replica: an OpenAI-shaped 502 naming the reason.
    let k = only(&rogue_url);
    let r = post(k.addr, "/v1/completions", COMPLETION).unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    let e = &r.json()["error"];
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("certificate verify failed"),
        "{e}"
    );
    assert_eq!(e["type"], "server_error");
    drop(k);

    // An expired replica certificate from a trusted CA: refused the same way,
    // and the reason says it expired.
    let k = only(&expired_url);
    let r = post(k.addr, "/v1/completions", COMPLETION).unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    let state = k.admin_get("/state").json();
    let reason = state["replicas"][0]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_lowercase();
    assert!(
        reason.contains("certificate verify failed") && reason.contains("expired"),
        "{state}"
    );
}
