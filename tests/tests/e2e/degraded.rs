//! Degraded but correct: with io_uring forbidden by seccomp (as Docker's default
//! profile does) or without BPF privilege, kvroute starts, serves and says which
//! fallback is in effect; the `-required`/`uring` settings refuse to start instead.
//!
//! Real processes throughout: the kernel refuses, not a flag inside kvroute.

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use kvroute_tests::harness::{free_port, post, request, wait_until, workspace_bin, Upstream};

/// A process started through a wrapper (seccomp helper or setpriv); killed on drop.
struct Started {
    child: std::process::Child,
    addr: SocketAddr,
    admin: SocketAddr,
    log: std::path::PathBuf,
}

impl Started {
    /// What kvroute logged so far (stderr).
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

fn kvroute_args(replica: &str, extra: &[&str]) -> (Vec<String>, SocketAddr, SocketAddr) {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut args = vec![
        workspace_bin("kvroute").display().to_string(),
        "--listen".into(),
        addr.to_string(),
        "--admin".into(),
        admin.to_string(),
        "--workers".into(),
        "2".into(),
        "--replica".into(),
        replica.into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    (args, addr, admin)
}

fn start(wrapper: &[String], replica: &str, extra: &[&str]) -> Started {
    let (args, addr, admin) = kvroute_args(replica, extra);
    let log = std::env::temp_dir().join(format!("kvroute-degraded-{}.log", addr.port()));
    let child = Command::new(&wrapper[0])
        .args(&wrapper[1..])
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("spawn wrapped kvroute");
    let s = Started {
        child,
        addr,
        admin,
        log,
    };
    let up = wait_until(Duration::from_secs(10), || {
        request(
            s.admin,
            "GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .is_ok_and(|r| r.status == 200)
    });
    assert!(up, "kvroute under {wrapper:?} did not become ready");
    s
}

/// Runs kvroute to completion under `wrapper`; it must exit non-zero. Returns stderr.
fn refused(wrapper: &[String], replica: &str, extra: &[&str]) -> String {
    let (args, _, _) = kvroute_args(replica, extra);
    let mut child = Command::new(&wrapper[0])
        .args(&wrapper[1..])
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn wrapped kvroute");
    // A kvroute that wrongly starts would block the test forever; bound it.
    let exited = wait_until(Duration::from_secs(10), || {
        child.try_wait().ok().flatten().is_some()
    });
    if !exited {
        let _ = child.kill();
    }
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        exited,
        "kvroute {extra:?} under {wrapper:?} started; it must refuse"
    );
    assert!(
        !out.status.success(),
        "kvroute {extra:?} exited 0; it must refuse: {stderr}"
    );
    stderr
}

fn state(s: &Started) -> serde_json::Value {
    request(
        s.admin,
        "GET /state HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .expect("GET /state")
    .json()
}

fn serves(s: &Started) {
    let r = post(s.addr, "/v1/completions", r#"{"prompt":"hello"}"#).expect("proxied request");
    assert_eq!(r.status, 200, "{}", r.text());
}

fn seccomp() -> Vec<String> {
    vec![workspace_bin("kvroute-seccomp-exec").display().to_string()]
}

#[test]
fn io_auto_falls_back_to_epoll_when_seccomp_forbids_io_uring() {
    let up = Upstream::start("a");
    let s = start(&seccomp(), &up.url(), &["--io", "auto"]);
    serves(&s);
    let st = state(&s);
    assert_eq!(st["io"], "epoll", "{st}");
    let log = s.log();
    assert!(
        log.contains("io_uring unavailable, falling back to epoll"),
        "the log must say which fallback is in effect: {log}"
    );
}

#[test]
fn io_uring_required_refuses_to_start_when_seccomp_forbids_it() {
    let up = Upstream::start("a");
    let err = refused(&seccomp(), &up.url(), &["--io", "uring"]);
    assert!(
        err.contains("io_uring"),
        "the refusal must name io_uring: {err}"
    );
}

/// The unprivileged half needs root to drop to `nobody`. Off CI (no
/// KVROUTE_REQUIRE_BPF) it is skipped with a printed reason when not root.
fn unprivileged() -> Option<Vec<String>> {
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    if !root {
        assert!(
            std::env::var("KVROUTE_REQUIRE_BPF").as_deref() != Ok("1"),
            "KVROUTE_REQUIRE_BPF=1 but not running as root: cannot test the unprivileged start"
        );
        eprintln!("skipping: not root, so cannot drop to an unprivileged user with setpriv");
        return None;
    }
    Some(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ]
        .map(String::from)
        .to_vec(),
    )
}

#[test]
fn without_bpf_privilege_ebpf_steering_falls_back_to_kernel_and_says_why() {
    let Some(wrap) = unprivileged() else { return };
    let up = Upstream::start("a");
    let s = start(&wrap, &up.url(), &["--steering", "ebpf"]);
    serves(&s);
    let st = state(&s);
    let steering = &st["steering"];
    assert_eq!(steering["requested"], "ebpf", "{st}");
    assert_eq!(steering["mode"], "kernel", "{st}");
    assert_eq!(steering["attached"], false, "{st}");
    let why = steering["fallback_reason"].as_str().unwrap_or("");
    assert!(!why.is_empty(), "no fallback reason in /state: {st}");
    let log = s.log();
    assert!(
        log.contains("eBPF unavailable") && log.contains(why),
        "the log must say which fallback is in effect and why: {log}"
    );
}

#[test]
fn without_bpf_privilege_ebpf_required_refuses_to_start() {
    let Some(wrap) = unprivileged() else { return };
    let up = Upstream::start("a");
    let err = refused(&wrap, &up.url(), &["--steering", "ebpf-required"]);
    assert!(
        err.to_lowercase().contains("ebpf"),
        "the refusal must name eBPF steering: {err}"
    );
}
