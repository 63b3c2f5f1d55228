//! Passive health end to end: a replica that answers garbage (bytes that are
//! not HTTP, or a response cut off) leaves rotation after a few failures, is
//! probed once when its ejection runs out, and goes out again for longer.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kvroute_tests::harness::{post, wait_until, Kvroute, TempDir, Upstream};
use serde_json::Value;

use crate::common::io_runtimes;

both_io!(
    garbage_replica_is_ejected_probed_and_ejected_again,
    truncated_responses_eject_and_the_last_replica_stays,
);

/// A TCP server that reads a request and answers `reply`, then closes;
/// counts the connections it took.
struct Garbage {
    url: String,
    connections: Arc<AtomicUsize>,
}

impl Garbage {
    fn start(reply: &'static [u8]) -> Garbage {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", l.local_addr().expect("addr"));
        let connections = Arc::new(AtomicUsize::new(0));
        let seen = connections.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                seen.fetch_add(1, Ordering::SeqCst);
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                let _ = s.write_all(reply);
            }
        });
        Garbage { url, connections }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

fn start(io: &str, replicas: &[&str], dir: &TempDir) -> Kvroute {
    let mut toml = format!(
        "io = \"{io}\"\nworkers = 2\n[routing]\npolicy = \"round-robin\"\n\
         [upstream]\neject_after_failures = 3\neject_base_ms = 2000\neject_max_ms = 8000\n",
    );
    for r in replicas {
        toml.push_str(&format!("[[replicas]]\nurl = {r:?}\n"));
    }
    let cfg = dir.path().join("kvroute.toml");
    std::fs::write(&cfg, toml).expect("write config");
    let k = Kvroute::spawn_logged(
        &["--config", cfg.to_str().expect("utf-8 path")],
        &[],
        &dir.path().join("kvroute.log"),
    );
    k.wait_ready();
    io_runtimes::assert_runs_on(&k, io);
    k
}

fn completion(k: &Kvroute) -> u16 {
    post(
        k.addr,
        "/v1/completions",
        r#"{"model":"m","prompt":"hello"}"#,
    )
    .map(|r| r.status)
    .unwrap_or(0)
}

/// The `/state` entry of the replica at `url`.
fn replica_state(k: &Kvroute, url: &str) -> Value {
    let state = k.admin_get("/state").json();
    state["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .find(|r| r["url"] == url)
        .expect("replica in /state")
        .clone()
}

fn garbage_replica_is_ejected_probed_and_ejected_again(io: &str) {
    let dir = TempDir::new("ejection-garbage");
    let garbage = Garbage::start(b"SSH-2.0-OpenSSH_9.6\r\n\r\nnot http at all\r\n\r\n");
    let good = Upstream::start("good");
    let k = start(io, &[&garbage.url, &good.url()], &dir);

    // An invalid response before any byte reached the client is retried on the
    // other replica: every request succeeds, and the garbage one is ejected.
    for i in 0..30 {
        assert_eq!(completion(&k), 200, "request {i}");
    }
    let st = replica_state(&k, &garbage.url);
    let ej = &st["ejection"];
    let total = ej["ejections_total"].as_u64().expect("ejections_total");
    assert!(total >= 1, "{st}");
    // Three failures eject it; each ejection after the first is one failed probe.
    assert_eq!(garbage.connections() as u64, 2 + total, "{st}");
    assert!(ej["reason"]
        .as_str()
        .is_some_and(|r| r.contains("invalid response")));
    let metrics = k.admin_get("/metrics").text();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("kvroute_replica_ejections_total") && l.contains(&garbage.url))
        .expect("ejections metric");
    assert!(line.ends_with(&format!(" {total}")), "{line}");
    assert!(metrics
        .lines()
        .any(|l| l.starts_with("kvroute_replica_ejected{") && l.contains(&garbage.url)));
    // The good replica keeps its standing.
    assert_eq!(replica_state(&k, &good.url())["ejection"]["ejected"], false);

    // When the ejection runs out, one request probes the replica; it fails, is
    // retried on the good one, and the replica goes out again, for longer.
    assert!(
        wait_until(Duration::from_secs(20), || replica_state(&k, &garbage.url)
            ["ejection"]["ejected_for_ms"]
            .is_null()),
        "the ejection never ran out"
    );
    let before = garbage.connections();
    for i in 0..10 {
        assert_eq!(completion(&k), 200, "request {i} after the ejection");
    }
    assert_eq!(garbage.connections(), before + 1, "exactly one probe");
    let ej = replica_state(&k, &garbage.url)["ejection"].clone();
    assert_eq!(ej["ejected"], true, "{ej}");
    assert_eq!(ej["ejections_total"].as_u64(), Some(total + 1), "{ej}");
    let left = ej["ejected_for_ms"].as_u64().expect("ejected_for_ms");
    assert!(left > 2000 && left <= 8000, "the backoff doubled: {ej}");
}

fn truncated_responses_eject_and_the_last_replica_stays(io: &str) {
    let dir = TempDir::new("ejection-truncated");
    // A valid head, then the connection closes inside the body: the head went
    // to the client, so those requests fail, but only until the ejection.
    let cut = Garbage::start(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"id\":",
    );
    let good = Upstream::start("good");
    let k = start(io, &[&cut.url, &good.url()], &dir);
    let mut failed = 0;
    for _ in 0..30 {
        if completion(&k) != 200 {
            failed += 1;
        }
    }
    let st = replica_state(&k, &cut.url);
    let total = st["ejection"]["ejections_total"].as_u64().expect("total");
    assert!(total >= 1, "{st}");
    assert_eq!(failed as u64, 2 + total, "{st}");
    assert!(st["ejection"]["reason"]
        .as_str()
        .is_some_and(|r| r.contains("cut off")));

    // Alone, a failing replica is never ejected: that would turn its share of
    // failures into every request failing.
    let dir = TempDir::new("ejection-alone");
    let k = start(io, &[&cut.url], &dir);
    for _ in 0..5 {
        assert_ne!(completion(&k), 200);
    }
    let st = replica_state(&k, &cut.url);
    assert_eq!(st["ejection"]["ejections_total"], 0, "{st}");
    assert_eq!(st["ejection"]["ejected"], false, "{st}");
    assert!(st["ejection"]["consecutive_failures"].as_u64() >= Some(5));
}
