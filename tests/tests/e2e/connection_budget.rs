//! The connection budget against the real binary, under both I/O runtimes:
//! with `[limits] max_connections = 40` on one worker (shedding above 36),
//! connections that sent no complete head are shed oldest first, then idle
//! keep-alive ones, a request in progress never is, a newcomer finding only
//! active connections gets a 503 with `Retry-After`, and the admin API
//! answers throughout.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use kvroute_tests::harness::{
    free_port, post, wait_until, workspace_bin, Client, Kvroute, Proc, TempDir, Upstream,
};

use crate::common::io_runtimes;

both_io!(
    sheds_headless_oldest_first_and_serves_a_good_client,
    sheds_idle_only_without_headless_and_never_active,
    refuses_with_503_when_nothing_can_be_shed,
    admin_answers_during_a_flood,
    sheds_silent_tls_connections_before_their_handshake,
    derived_cap_keeps_a_flood_below_a_small_fd_limit,
);

const CAP: usize = 40;
/// 90 % of the cap: from here each new connection sheds one first.
const WATERMARK: usize = 36;
const COMPLETION: &str = r#"{"model":"m","prompt":"hello"}"#;

fn start(io: &str, up: &Upstream, dir: &TempDir) -> Kvroute {
    start_with(io, up, dir, "")
}

/// [`start`] with `extra` config lines before `[limits]`.
fn start_with(io: &str, up: &Upstream, dir: &TempDir, extra: &str) -> Kvroute {
    let cfg = dir.path().join("kvroute.toml");
    std::fs::write(&cfg, format!("{extra}[limits]\nmax_connections = {CAP}\n")).unwrap();
    let k = Kvroute::start(&[
        "--io",
        io,
        "--workers",
        "1",
        "--config",
        cfg.to_str().unwrap(),
        "--replica",
        &up.url(),
    ]);
    io_runtimes::assert_runs_on(&k, io);
    let state = k.admin_get("/state").json();
    let b = &state["connection_budget"];
    assert_eq!(b["max_connections"], CAP);
    assert_eq!(b["per_worker"], CAP);
    assert_eq!(b["high_watermark"], WATERMARK);
    assert_eq!(b["derived"], false);
    k
}

/// The worker's connection counts by state, from `/state`.
fn counts(k: &Kvroute) -> (u64, u64, u64) {
    let s = k.admin_get("/state").json();
    let w = &s["workers"][0];
    let n = |f: &str| w[f].as_u64().unwrap();
    (n("reading_head"), n("idle"), n("active"))
}

fn wait_counts(k: &Kvroute, want: (u64, u64, u64)) {
    let ok = wait_until(Duration::from_secs(10), || counts(k) == want);
    assert!(
        ok,
        "connections by state: {:?}, expected {want:?}",
        counts(k)
    );
}

/// A connection that sends nothing.
fn silent(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// True when kvroute closed `s` (end of stream or reset), false if it stays open
/// for `wait`.
fn closed_by_peer(s: &mut TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut b = [0u8; 512];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(n) => panic!("unexpected bytes on a shed connection: {:?}", &b[..n]),
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// A keep-alive connection that completed one request and now idles.
fn idle_client(addr: SocketAddr) -> Client {
    let mut c = Client::connect(addr).unwrap();
    c.send(
        format!(
            "POST /v1/completions HTTP/1.1\r\nHost: k\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{COMPLETION}",
            COMPLETION.len()
        )
        .as_bytes(),
    )
    .unwrap();
    let r = c.read_response(false).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(!r.closed);
    c
}

/// A streaming request held open by the upstream until `release`.
fn active_stream(addr: SocketAddr) -> Client {
    let mut c = Client::connect(addr).unwrap();
    c.send(b"GET /sse?n=3 HTTP/1.1\r\nHost: k\r\n\r\n").unwrap();
    let (status, _) = c.read_head().unwrap();
    assert_eq!(status, 200);
    assert!(c.read_chunk().unwrap().is_some(), "first event");
    c
}

fn good_request(k: &Kvroute) {
    let r = post(k.addr, "/v1/completions", COMPLETION).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
}

fn sheds_headless_oldest_first_and_serves_a_good_client(io: &str) {
    let up = Upstream::start("a");
    let dir = TempDir::new("budget");
    let k = start(io, &up, &dir);
    let mut conns: Vec<TcpStream> = (0..WATERMARK).map(|_| silent(k.addr)).collect();
    wait_counts(&k, (WATERMARK as u64, 0, 0));
    // Four more: each sheds the oldest head-less one first.
    for _ in 0..4 {
        conns.push(silent(k.addr));
        wait_counts(&k, (WATERMARK as u64, 0, 0));
    }
    for (i, c) in conns.iter_mut().enumerate().take(4) {
        assert!(
            closed_by_peer(c, Duration::from_secs(5)),
            "connection {i} was not shed"
        );
    }
    // The good client's admission sheds the next oldest; it is answered.
    good_request(&k);
    assert!(closed_by_peer(&mut conns[4], Duration::from_secs(5)));
    for c in &mut conns[5..] {
        assert!(!closed_by_peer(c, Duration::from_millis(20)));
    }
    assert_eq!(
        k.metric("kvroute_connection_sheds_total{reason=\"headless\"}")
            .unwrap_or(0.0),
        5.0
    );
    wait_counts(&k, (WATERMARK as u64 - 1, 0, 0));
}

fn sheds_idle_only_without_headless_and_never_active(io: &str) {
    let up = Upstream::start("a");
    let dir = TempDir::new("budget");
    let k = start(io, &up, &dir);
    // 6 idle keep-alive connections, 30 in the middle of a stream: 36.
    let mut idle: Vec<Client> = (0..6).map(|_| idle_client(k.addr)).collect();
    let mut streams: Vec<Client> = (0..30).map(|_| active_stream(k.addr)).collect();
    wait_counts(&k, (0, 6, 30));
    // A head-less newcomer sheds no idle one while a head-less one is older:
    // the first newcomer sheds an idle one (there is no head-less one), the
    // second sheds the first.
    let mut first = silent(k.addr);
    wait_counts(&k, (1, 5, 30));
    assert!(closed_by_peer(&mut idle[0].stream, Duration::from_secs(5)));
    let _second = silent(k.addr);
    assert!(closed_by_peer(&mut first, Duration::from_secs(5)));
    wait_counts(&k, (1, 5, 30));
    for c in &mut idle[1..] {
        assert!(!c.peer_closed());
    }
    assert_eq!(
        k.metric("kvroute_connection_sheds_total{reason=\"idle\"}")
            .unwrap_or(0.0),
        1.0
    );
    // Streams were never shed: each still gets all its events.
    up.release();
    for s in &mut streams {
        assert!(s.read_chunk().unwrap().is_some());
        assert!(s.read_chunk().unwrap().is_some());
        assert!(s.read_chunk().unwrap().is_none());
    }
}

fn refuses_with_503_when_nothing_can_be_shed(io: &str) {
    let up = Upstream::start("a");
    let dir = TempDir::new("budget");
    let k = start(io, &up, &dir);
    let mut streams: Vec<Client> = (0..CAP).map(|_| active_stream(k.addr)).collect();
    wait_counts(&k, (0, 0, CAP as u64));
    let mut c = Client::connect(k.addr).unwrap();
    c.send(b"GET /v1/models HTTP/1.1\r\nHost: k\r\n\r\n")
        .unwrap();
    let r = c.read_response(false).unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(r.closed, "a refused connection says it closes");
    let e = r.json();
    assert_eq!(e["error"]["type"], "server_error");
    assert_eq!(e["error"]["code"], "too_many_connections");
    assert!(c.peer_closed());
    assert_eq!(
        k.metric("kvroute_connection_sheds_total{reason=\"over_cap\"}")
            .unwrap_or(0.0),
        1.0
    );
    assert_eq!(counts(&k), (0, 0, CAP as u64));
    up.release();
    for s in &mut streams {
        while s.read_chunk().unwrap().is_some() {}
    }
    // Room again once they finish.
    good_request(&k);
}

fn admin_answers_during_a_flood(io: &str) {
    let up = Upstream::start("a");
    let dir = TempDir::new("budget");
    let k = start(io, &up, &dir);
    let flood: Vec<TcpStream> = (0..5 * CAP).map(|_| silent(k.addr)).collect();
    // No more than the cap once the shed ones are gone, and the admin API
    // answers throughout.
    let open = || {
        k.admin_get("/state").json()["workers"][0]["connections"]
            .as_u64()
            .unwrap()
    };
    assert!(
        wait_until(Duration::from_secs(10), || open() <= CAP as u64),
        "{}",
        open()
    );
    assert_eq!(k.admin_get("/healthz").status, 200);
    good_request(&k);
    let ok = wait_until(Duration::from_secs(10), || {
        k.metric("kvroute_connection_sheds_total{reason=\"headless\"}")
            .unwrap_or(0.0)
            >= (4 * CAP) as f64
    });
    assert!(ok, "sheds counted");
    let text = k.admin_get("/metrics").text();
    assert!(
        text.contains("kvroute_connections{state=\"reading_head\"}"),
        "{text}"
    );
    assert!(text.contains("kvroute_connections{state=\"active\"}"));
    drop(flood);
    wait_counts(&k, (0, 0, 0));
}

/// On a TLS listener a connection waiting for its ClientHello is head-less
/// too: shed oldest first, closed without a plain-HTTP answer, while a TLS
/// client still gets its 200.
fn sheds_silent_tls_connections_before_their_handshake(io: &str) {
    let up = Upstream::start("a");
    let dir = TempDir::new("budget-tls");
    let pki = kvroute_tests::pki::Pki::new("budget-tls");
    pki.write(dir.path());
    let tls = format!(
        "[tls]\ncert = {:?}\nkey = {:?}\n",
        dir.path().join("cert.pem").display().to_string(),
        dir.path().join("key.pem").display().to_string()
    );
    let k = start_with(io, &up, &dir, &tls);
    let mut conns: Vec<TcpStream> = (0..WATERMARK + 2).map(|_| silent(k.addr)).collect();
    wait_counts(&k, (WATERMARK as u64, 0, 0));
    for (i, c) in conns.iter_mut().enumerate().take(2) {
        assert!(
            closed_by_peer(c, Duration::from_secs(5)),
            "connection {i} was not shed"
        );
    }
    assert!(!closed_by_peer(&mut conns[2], Duration::from_millis(20)));
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "20", "--cacert"])
        .arg(dir.path().join("ca.pem"))
        .args(["-H", "content-type: application/json", "-d", COMPLETION])
        .arg(format!(
            "https://127.0.0.1:{}/v1/completions",
            k.addr.port()
        ))
        .output()
        .expect("curl runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"len\""));
    assert!(closed_by_peer(&mut conns[2], Duration::from_secs(5)));
    assert_eq!(
        k.metric("kvroute_connection_sheds_total{reason=\"headless\"}")
            .unwrap_or(0.0),
        3.0
    );
}

/// With no `max_connections` the cap comes from `RLIMIT_NOFILE`: under a hard
/// limit of 128, `(128 - 32) / 2 = 48`. A flood of many times that never
/// reaches `EMFILE`, and the admin API and a good client are answered.
fn derived_cap_keeps_a_flood_below_a_small_fd_limit(io: &str) {
    let up = Upstream::start("a");
    let (port, admin) = (free_port(), free_port());
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg("ulimit -n 128 && exec \"$0\" \"$@\"")
        .arg(workspace_bin("kvroute"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--admin", &format!("127.0.0.1:{admin}")])
        .args(["--io", io, "--workers", "1", "--replica", &up.url()]);
    let k = Kvroute::on(Proc::spawn_command(cmd, "kvroute"), port, admin);
    k.wait_ready();
    let b = &k.admin_get("/state").json()["connection_budget"];
    assert_eq!(b["nofile"], 128);
    assert_eq!(b["derived"], true);
    assert_eq!(b["max_connections"], 48);
    let flood: Vec<TcpStream> = (0..300).map(|_| silent(k.addr)).collect();
    assert_eq!(k.admin_get("/healthz").status, 200);
    good_request(&k);
    assert_eq!(
        k.metric("kvroute_accept_errors_total{reason=\"emfile\"}")
            .unwrap_or(0.0),
        0.0
    );
    assert!(
        k.metric("kvroute_connection_sheds_total{reason=\"headless\"}")
            .unwrap_or(0.0)
            >= 250.0
    );
    drop(flood);
}
