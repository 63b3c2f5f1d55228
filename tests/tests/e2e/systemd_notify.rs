//! sd_notify and SIGHUP against the real binary: a test-owned NOTIFY_SOCKET
//! stands in for systemd.

use std::time::Duration;

use kvroute_tests::harness::{
    free_port, post, wait_until, Client, NotifySocket as Notify, Proc, Upstream,
};

fn start(n: &Notify, extra: &[String], env: &[(&str, &str)]) -> (Proc, std::net::SocketAddr) {
    let port = free_port();
    let mut args = vec![
        "--listen".to_string(),
        format!("127.0.0.1:{port}"),
        "--admin".into(),
        format!("127.0.0.1:{}", free_port()),
        "--workers".into(),
        "2".into(),
    ];
    args.extend_from_slice(extra);
    let mut envs = vec![("NOTIFY_SOCKET", n.path.to_str().unwrap())];
    envs.extend_from_slice(env);
    let p = Proc::spawn_env("kvroute", &args, &envs);
    (p, format!("127.0.0.1:{port}").parse().unwrap())
}

#[test]
fn ready_after_listening_then_watchdog_then_stopping() {
    let n = Notify::new();
    let up = Upstream::start("a");
    let (p, addr) = start(
        &n,
        &["--replica".into(), up.url()],
        &[("WATCHDOG_USEC", "400000")],
    );
    let msgs = n.collect(Duration::from_secs(10), |m| m.contains("READY=1"));
    let ready = msgs.last().expect("no notification at all");
    assert!(ready.contains("READY=1"), "{msgs:?}");
    assert!(ready.contains("STATUS=workers=2 replicas=1"), "{ready}");
    // READY means the listeners accept: a request right now must succeed.
    assert_eq!(post(addr, "/v1/completions", "{}").unwrap().status, 200);
    let pings = n.collect(Duration::from_millis(1500), |_| false);
    let count = pings.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    assert!(
        count >= 3,
        "watchdog pings at half of 400 ms expected, got {pings:?}"
    );
    p.signal("TERM");
    let msgs = n.collect(Duration::from_secs(5), |m| m.contains("STOPPING=1"));
    assert!(msgs.iter().any(|m| m.contains("STOPPING=1")), "{msgs:?}");
}

#[test]
fn a_hung_worker_stops_the_watchdog_pings() {
    let n = Notify::new();
    let up = Upstream::start("a");
    let (_p, _addr) = start(
        &n,
        &["--replica".into(), up.url()],
        &[
            ("WATCHDOG_USEC", "400000"),
            ("KVROUTE_FAULT_HANG_WORKER", "1"),
        ],
    );
    let msgs = n.collect(Duration::from_secs(10), |m| m.contains("READY=1"));
    assert!(msgs.iter().any(|m| m.contains("READY=1")));
    // The hook hangs worker 1 one second after start; allow a watchdog period for it to show.
    std::thread::sleep(Duration::from_millis(1700));
    let _ = n.collect(Duration::from_millis(10), |_| false);
    let later = n.collect(Duration::from_millis(1500), |_| false);
    assert!(
        !later.iter().any(|m| m.contains("WATCHDOG=1")),
        "pings continued with a hung worker: {later:?}"
    );
}

#[test]
fn sighup_reloads_replicas_without_dropping_connections() {
    let n = Notify::new();
    let a = Upstream::start("a");
    let b = Upstream::start("b");
    let dir = std::env::temp_dir().join(format!(
        "kvroute-hup-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("kvroute.toml");
    std::fs::write(&cfg, format!("[[replicas]]\nurl = \"{}\"\n", a.url())).unwrap();
    let (p, addr) = start(&n, &["--config".into(), cfg.to_str().unwrap().into()], &[]);
    let _ = n.collect(Duration::from_secs(10), |m| m.contains("READY=1"));
    let mut c = Client::connect(addr).unwrap();
    c.send(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!(
        c.read_response(false).unwrap().header("x-upstream"),
        Some("a")
    );

    std::fs::write(&cfg, format!("[[replicas]]\nurl = \"{}\"\n", b.url())).unwrap();
    p.signal("HUP");
    let msgs = n.collect(Duration::from_secs(5), |m| m.contains("READY=1"));
    assert!(msgs.iter().any(|m| m.contains("RELOADING=1")), "{msgs:?}");
    // The same client connection keeps working and now reaches the new replica.
    assert!(wait_until(Duration::from_secs(5), || {
        c.send(b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        c.read_response(false).unwrap().header("x-upstream") == Some("b")
    }));
    // A broken file is rejected and the running set stays.
    std::fs::write(&cfg, "replicas = 3\n").unwrap();
    p.signal("HUP");
    let _ = n.collect(Duration::from_secs(5), |m| m.contains("READY=1"));
    c.send(b"GET /three HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!(
        c.read_response(false).unwrap().header("x-upstream"),
        Some("b")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sighup_keeps_the_command_lines_replicas() {
    // `--replica` overrides the file's (empty) replica list at start, and a
    // reload applies the command line to the re-read file again: the replica
    // set stays the command line's instead of becoming the file's.
    let n = Notify::new();
    let a = Upstream::start("a");
    let dir = std::env::temp_dir().join(format!(
        "kvroute-hup-cli-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("kvroute.toml");
    std::fs::write(&cfg, "[limits]\nmax_headers = 100\n").unwrap();
    let (p, addr) = start(
        &n,
        &[
            "--config".into(),
            cfg.to_str().unwrap().into(),
            "--replica".into(),
            a.url(),
        ],
        &[],
    );
    let _ = n.collect(Duration::from_secs(10), |m| m.contains("READY=1"));
    let mut c = Client::connect(addr).unwrap();
    c.send(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!(c.read_response(false).unwrap().status, 200);

    p.signal("HUP");
    let msgs = n.collect(Duration::from_secs(5), |m| m.contains("READY=1"));
    assert!(msgs.iter().any(|m| m.contains("RELOADING=1")), "{msgs:?}");
    for path in ["/two", "/three"] {
        c.send(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .unwrap();
        let r = c.read_response(false).unwrap();
        assert_eq!(r.status, 200, "after SIGHUP: {}", r.text());
        assert_eq!(r.header("x-upstream"), Some("a"));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
