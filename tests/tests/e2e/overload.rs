//! Overload end to end: the real `kvroute` with replicas bounded by
//! `max_in_flight` in front of the scripted upstream, whose `/sse` streams
//! stay open until the test releases them. Checked from the client's side:
//! what fits streams intact, what waits is served as slots free, what is
//! beyond the queue is refused at once with 503/429, `Retry-After` and a JSON
//! body, and memory does not grow with the refusals.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvroute_tests::harness::{
    free_port, request, wait_until, Client, Kvroute, Response, TempDir, Upstream,
};

use crate::common::io_runtimes;

both_io!(
    sheds_beyond_the_queue_and_serves_the_rest,
    one_key_cannot_fill_the_queue,
    rolling_restart_and_capacity_share_one_bound,
    memory_stays_flat_under_ten_times_overload,
    queued_requests_leave_on_disconnect_and_timeout,
    a_retry_waits_for_a_full_replica,
);

/// Events in each held stream; the last one proves the stream arrived whole.
const EVENTS: usize = 4;

/// kvroute on `io` (two workers, so waiters are woken across threads) with
/// `toml` and `up` as its one replica, bounded to `max_in_flight` in its spec.
/// `{dir}` in `toml` is a fresh directory.
fn start(io: &str, toml: &str, up: &Upstream, max_in_flight: u32) -> (Kvroute, TempDir) {
    let dir = TempDir::new("overload");
    let cfg = dir.path().join("kvroute.toml");
    let toml = format!(
        "{}\n[[replicas]]\nurl = {:?}\nmax_in_flight = {max_in_flight}\n",
        toml.replace("{dir}", dir.path().to_str().unwrap()),
        up.url()
    );
    std::fs::write(&cfg, toml).unwrap();
    let k = Kvroute::start(&[
        "--io",
        io,
        "--workers",
        "2",
        "--config",
        cfg.to_str().unwrap(),
    ]);
    io_runtimes::assert_runs_on(&k, io);
    (k, dir)
}

/// What one client saw: the response (or the error) and when it ended.
struct Outcome {
    response: std::io::Result<Response>,
}

/// Starts a streaming request in its own thread, with `headers` (each ending
/// in CRLF); the handle yields what the client saw.
fn stream(k: &Kvroute, headers: &str) -> JoinHandle<Outcome> {
    let addr = k.addr;
    let headers = headers.to_string();
    std::thread::spawn(move || {
        let body = r#"{"model":"m","stream":true,"prompt":"hi"}"#;
        let raw = format!(
            "POST /sse?n={EVENTS} HTTP/1.1\r\nHost: k\r\nContent-Type: application/json\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        Outcome {
            response: request(addr, &raw),
        }
    })
}

/// A stream that arrived whole: 200 and every event.
fn assert_whole_stream(r: &Response) {
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    for i in 0..EVENTS {
        assert!(
            text.contains(&format!("\"i\":{i}")),
            "event {i} missing: {text}"
        );
    }
}

/// A refusal with `status`, OpenAI's error shape with `code`, and `Retry-After`.
fn assert_refused(r: &Response, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], code, "{}", r.text());
    assert!(r.json()["error"]["message"].is_string());
    let secs: u64 = r
        .header("retry-after")
        .unwrap_or_else(|| panic!("no retry-after: {:?}", r.headers))
        .parse()
        .expect("retry-after in seconds");
    assert!(secs >= 1, "retry-after {secs}");
}

fn queue_depth(k: &Kvroute) -> f64 {
    k.metric("kvroute_queue_depth").unwrap_or(-1.0)
}

/// Joins `handles` that have finished, keeping the others.
fn collect_finished(handles: &mut Vec<JoinHandle<Outcome>>, into: &Mutex<Vec<Response>>) {
    let mut i = 0;
    while i < handles.len() {
        if handles[i].is_finished() {
            let o = handles.swap_remove(i).join().unwrap();
            into.lock().unwrap().push(o.response.expect("answered"));
        } else {
            i += 1;
        }
    }
}

/// (a) One replica with room for 2, a queue of 4, 10× its capacity at once:
/// 2 stream, 4 wait, 14 are refused before any stream ended; once the streams
/// end the waiters are served; nothing hangs, nothing is cut short.
fn sheds_beyond_the_queue_and_serves_the_rest(io: &str) {
    let up = Upstream::start("a");
    let (k, _dir) = start(
        io,
        "[upstream]\nqueue_max = 4\nqueue_timeout_ms = 60000\n",
        &up,
        2,
    );
    let mut handles: Vec<_> = (0..20).map(|_| stream(&k, "")).collect();
    let refused = Mutex::new(Vec::new());
    // The refusals come while the replica still holds its two streams open.
    let shed = wait_until(Duration::from_secs(10), || {
        collect_finished(&mut handles, &refused);
        refused.lock().unwrap().len() >= 14
    });
    assert!(shed, "refused: {}", refused.lock().unwrap().len());
    std::thread::sleep(Duration::from_millis(200));
    collect_finished(&mut handles, &refused);
    let refused = refused.into_inner().unwrap();
    assert_eq!(
        refused.len(),
        14,
        "only what is beyond the queue is refused"
    );
    for r in &refused {
        assert_refused(r, 503, "overloaded");
    }
    assert_eq!(up.seen().len(), 2, "the replica got more than its bound");
    assert_eq!(queue_depth(&k), 4.0);
    let state = k.admin_get("/state").json();
    assert_eq!(state["queue_depth"], 4);
    assert_eq!(state["replicas"][0]["max_in_flight"], 2);
    assert_eq!(state["replicas"][0]["in_flight"], 2);
    assert_eq!(
        k.metric("kvroute_overload_rejections_total{reason=\"queue_full\"}"),
        Some(14.0)
    );
    up.release();
    for h in handles {
        assert_whole_stream(&h.join().unwrap().response.expect("answered"));
    }
    assert_eq!(up.seen().len(), 6);
    assert_eq!(queue_depth(&k), 0.0);
    // The queue recorded how long its requests waited.
    assert!(k
        .metric("kvroute_queue_wait_seconds_count")
        .is_some_and(|n| n >= 4.0));
}

const ALICE: &str = "sk-alice-overload-01";
const BOB: &str = "sk-bob-overload-0002";

/// (b) With API keys, a key flooding the queue gets 429 queue_share_exceeded
/// beyond its share, and another key's request still waits and is served.
fn one_key_cannot_fill_the_queue(io: &str) {
    let up = Upstream::start("a");
    let toml = "[upstream]\nqueue_max = 4\nqueue_timeout_ms = 60000\n\
                [auth]\nkeys_file = \"{dir}/keys\"\n";
    let dir = TempDir::new("overload-keys");
    std::fs::write(
        dir.path().join("keys"),
        format!("alice {ALICE}\nbob {BOB}\n"),
    )
    .unwrap();
    let toml = toml.replace("{dir}", dir.path().to_str().unwrap());
    let (k, _d) = start(io, &toml, &up, 2);
    let alice = format!("Authorization: Bearer {ALICE}\r\n");
    let bob = format!("Authorization: Bearer {BOB}\r\n");
    // Alice takes both slots, then half the queue (her share alone: 4 / 2).
    let mut held: Vec<_> = (0..2).map(|_| stream(&k, &alice)).collect();
    assert!(wait_until(Duration::from_secs(10), || up.seen().len() == 2));
    held.extend((0..2).map(|_| stream(&k, &alice)));
    assert!(wait_until(Duration::from_secs(10), || queue_depth(&k) == 2.0));
    // Her next ones are refused at once, on her share, not the queue's bound.
    for _ in 0..3 {
        let r = stream(&k, &alice).join().unwrap().response.unwrap();
        assert_refused(&r, 429, "queue_share_exceeded");
    }
    // Bob still gets a place, and is served once a slot frees.
    let b = stream(&k, &bob);
    assert!(wait_until(Duration::from_secs(10), || queue_depth(&k) == 3.0));
    assert_eq!(
        k.metric("kvroute_overload_rejections_total{reason=\"queue_share\"}"),
        Some(3.0)
    );
    up.release();
    assert_whole_stream(&b.join().unwrap().response.unwrap());
    for h in held {
        assert_whole_stream(&h.join().unwrap().response.unwrap());
    }
}

/// (c) Saturated, then a rolling restart takes the only replica out: the
/// requests waiting for a slot and those held for a replica share one bound;
/// beyond it, 503 at once. The replica's return serves them all, and the
/// streams in flight through the restart are not cut.
fn rolling_restart_and_capacity_share_one_bound(io: &str) {
    let up = Upstream::start("a");
    let (k, _dir) = start(
        io,
        "[upstream]\nqueue_max = 4\nqueue_timeout_ms = 60000\n",
        &up,
        2,
    );
    let mut handles: Vec<_> = (0..2).map(|_| stream(&k, "")).collect();
    assert!(wait_until(Duration::from_secs(10), || up.seen().len() == 2));
    // Two wait for a slot ...
    handles.extend((0..2).map(|_| stream(&k, "")));
    assert!(wait_until(Duration::from_secs(10), || queue_depth(&k) == 2.0));
    // ... then the replica drains for its restart: two more wait for it ...
    let spec = |healthy: bool| {
        format!(
            r#"{{"replicas":[{{"url":"{}","healthy":{healthy},"max_in_flight":2}}]}}"#,
            up.url()
        )
    };
    assert_eq!(k.admin_put("/replicas", &spec(false)).status, 200);
    handles.extend((0..2).map(|_| stream(&k, "")));
    assert!(wait_until(Duration::from_secs(10), || queue_depth(&k) == 4.0));
    // ... and the one bound is reached: the next is refused at once.
    let r = stream(&k, "").join().unwrap().response.unwrap();
    assert_refused(&r, 503, "no_healthy_replica");
    assert_eq!(up.seen().len(), 2, "nothing reached a draining replica");
    // Back from the restart, the streams end and every waiter is served.
    assert_eq!(k.admin_put("/replicas", &spec(true)).status, 200);
    // The bound came with the pushed spec: still two in flight, four waiting.
    let state = k.admin_get("/state").json();
    assert_eq!(state["replicas"][0]["max_in_flight"], 2);
    assert_eq!(state["queue_depth"], 4);
    assert_eq!(up.seen().len(), 2);
    up.release();
    for h in handles {
        assert_whole_stream(&h.join().unwrap().response.unwrap());
    }
    assert_eq!(up.seen().len(), 6);
    assert_eq!(queue_depth(&k), 0.0);
}

fn rss_kb(k: &Kvroute) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", k.proc.child.id())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// (d) RSS under 10× the fleet's capacity in streams, thousands of them
/// refused, stays near what 2× (the capacity plus a full queue) costs.
fn memory_stays_flat_under_ten_times_overload(io: &str) {
    let up = Upstream::start("a");
    const CAP: usize = 10;
    let (k, _dir) = start(
        io,
        "[upstream]\nqueue_max = 10\nqueue_timeout_ms = 60000\n",
        &up,
        CAP as u32,
    );
    // 2×: every slot streaming, the queue full.
    let mut handles: Vec<_> = (0..2 * CAP).map(|_| stream(&k, "")).collect();
    assert!(wait_until(Duration::from_secs(10), || queue_depth(&k)
        == CAP as f64
        && up.seen().len() == CAP));
    let at_2x = rss_kb(&k);
    // 10×, and then wave after wave of refused requests on top.
    let refused = Arc::new(Mutex::new(0usize));
    let extra: Vec<_> = (0..8 * CAP).map(|_| stream(&k, "")).collect();
    for h in extra {
        assert_refused(&h.join().unwrap().response.unwrap(), 503, "overloaded");
    }
    let waves: Vec<_> = (0..4)
        .map(|_| {
            let (addr, refused) = (k.addr, refused.clone());
            std::thread::spawn(move || {
                for _ in 0..400 {
                    let mut c = Client::connect(addr).unwrap();
                    let body = r#"{"model":"m","stream":true}"#;
                    c.send(
                        format!(
                            "POST /sse HTTP/1.1\r\nHost: k\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .unwrap();
                    let r = c.read_response(false).unwrap();
                    assert_eq!(r.status, 503);
                    *refused.lock().unwrap() += 1;
                }
            })
        })
        .collect();
    for w in waves {
        w.join().unwrap();
    }
    let at_10x = rss_kb(&k);
    eprintln!(
        "RSS at 2x: {at_2x} kB; at 10x after {} refusals: {at_10x} kB",
        *refused.lock().unwrap() + 8 * CAP
    );
    // Generous: refusals must not pile up memory (a leak per refusal of even
    // 1 KB would add 1.7 MB here); allocator noise stays well under this.
    assert!(
        at_10x < at_2x + at_2x / 2,
        "RSS grew from {at_2x} kB to {at_10x} kB"
    );
    assert_eq!(up.seen().len(), CAP);
    up.release();
    for h in handles.drain(..) {
        assert_whole_stream(&h.join().unwrap().response.unwrap());
    }
}

/// A waiting request whose client goes away gives up its place (the next
/// waiter moves up); one that waits out `queue_timeout_ms` gets a 503 with
/// `Retry-After`.
fn queued_requests_leave_on_disconnect_and_timeout(io: &str) {
    let up = Upstream::start("a");
    let (k, _dir) = start(
        io,
        "[upstream]\nqueue_max = 1\nqueue_timeout_ms = 1500\n",
        &up,
        1,
    );
    let held = stream(&k, "");
    assert!(wait_until(Duration::from_secs(10), || up.seen().len() == 1));
    // A waiter that hangs up ...
    let mut gone = Client::connect(k.addr).unwrap();
    let body = r#"{"model":"m"}"#;
    gone.send(
        format!(
            "POST /sse HTTP/1.1\r\nHost: k\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .unwrap();
    assert!(wait_until(Duration::from_secs(10), || queue_depth(&k) == 1.0));
    drop(gone);
    // ... frees its place, on its leaving rather than its timeout.
    assert!(wait_until(Duration::from_secs(5), || queue_depth(&k) == 0.0));
    assert_eq!(
        k.metric("kvroute_overload_rejections_total{reason=\"queue_timeout\"}"),
        None,
        "the waiter that left was timed out instead"
    );
    // The next waits out the timeout: 503 overloaded, with Retry-After.
    let t = std::time::Instant::now();
    let r = stream(&k, "").join().unwrap().response.unwrap();
    assert_refused(&r, 503, "overloaded");
    assert!(
        t.elapsed() >= Duration::from_millis(1000),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(
        k.metric("kvroute_overload_rejections_total{reason=\"queue_timeout\"}"),
        Some(1.0)
    );
    assert_eq!(up.seen().len(), 1, "the one who left was never sent");
    up.release();
    assert_whole_stream(&held.join().unwrap().response.unwrap());
}

/// A retry whose only untried replica is at its bound waits in the queue for
/// it, rather than answering 502: the first replica refuses connections, the
/// second is full with a held stream; once that stream ends, the retried
/// request is served there.
fn a_retry_waits_for_a_full_replica(io: &str) {
    let up = Upstream::start("a");
    let dead = free_port();
    let toml = format!(
        "[upstream]\nqueue_max = 4\nqueue_timeout_ms = 60000\nretries = 1\n\
         [[replicas]]\nurl = \"http://127.0.0.1:{dead}\"\nmax_in_flight = 4\n"
    );
    let (k, _dir) = start(io, &toml, &up, 1);
    let held = stream(&k, "");
    assert!(wait_until(Duration::from_secs(10), || up.seen().len() == 1));
    // Only the dead replica has room: the request tries it, fails, and waits.
    let retried = stream(&k, "");
    assert!(
        wait_until(Duration::from_secs(10), || queue_depth(&k) == 1.0),
        "the retry did not queue: depth {}",
        queue_depth(&k)
    );
    assert!(!retried.is_finished(), "answered before room was made");
    up.release();
    assert_whole_stream(&held.join().unwrap().response.unwrap());
    assert_whole_stream(&retried.join().unwrap().response.unwrap());
    assert_eq!(up.seen().len(), 2);
}
