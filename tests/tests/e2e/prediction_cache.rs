//! Prediction cache end to end: real `kvroute` in front of real `kvroute-sim`
//! replicas (or a scripted upstream where a fault is needed), on loopback.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use kvroute_testkit::metrics_text::Samples;
use kvroute_tests::harness::{free_port, request, wait_until, Client, Kvroute, Response};

/// The shared harness sim plus the stats this file reads.
struct Sim(kvroute_tests::harness::Sim);

impl std::ops::Deref for Sim {
    type Target = kvroute_tests::harness::Sim;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Sim {
    fn start(time_scale: &str) -> Sim {
        Sim(kvroute_tests::harness::Sim::start(
            "s0",
            &["--time-scale", time_scale],
        ))
    }

    fn requests(&self) -> u64 {
        let r = request(
            self.addr,
            "GET /sim/stats HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n",
        )
        .expect("stats");
        r.json()["requests"].as_u64().expect("requests")
    }
}

/// kvroute with `[prediction_cache]` set from `cache_toml` (enabled is implied).
fn kvroute(upstream: &str, cache_toml: &str) -> Kvroute {
    kvroute_with(upstream, cache_toml, &[])
}

fn kvroute_with(upstream: &str, cache_toml: &str, extra: &[&str]) -> Kvroute {
    let path = std::env::temp_dir().join(format!(
        "kvroute-pcache-{}-{}.toml",
        std::process::id(),
        free_port()
    ));
    std::fs::write(
        &path,
        format!("[prediction_cache]\nenabled = true\n{cache_toml}\n"),
    )
    .expect("config");
    let mut args = vec![
        "--config",
        path.to_str().unwrap(),
        "--workers",
        "2",
        "--replica",
        upstream,
    ];
    args.extend_from_slice(extra);
    Kvroute::start(&args)
}

fn send(addr: SocketAddr, body: &str, extra_headers: &str) -> Response {
    let raw = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: k\r\nContent-Type: application/json\r\n{extra_headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    request(addr, &raw).expect("request")
}

fn cache_header(r: &Response) -> &str {
    r.header("x-kvroute-cache").unwrap_or("none")
}

fn scrape(k: &Kvroute) -> String {
    k.admin_get("/metrics").text()
}

/// Sum of the samples of `name` that have every one of `labels` (0 when there are none).
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    Samples::parse(text).sum(name, labels)
}

#[test]
fn deterministic_requests_are_answered_from_memory() {
    let sim = Sim::start("0.01");
    let k = kvroute(&format!("http://{}", sim.addr), "");
    let body =
        r#"{"model":"sim-model","prompt":"What is a KV cache?","temperature":0,"max_tokens":8}"#;

    let a = send(k.addr, body, "");
    assert_eq!((a.status, cache_header(&a)), (200, "miss"), "{}", a.text());
    let b = send(k.addr, body, "");
    assert_eq!((b.status, cache_header(&b)), (200, "hit"));
    assert_eq!(a.body, b.body, "a hit is byte-identical in body");
    assert_eq!(sim.requests(), 1, "the hit never reached the replica");

    // Key order, whitespace, `user` and `stream_options` do not split the entry.
    let reordered = r#"{ "max_tokens": 8, "temperature": 0,
        "prompt": "What is a KV cache?", "user": "someone", "model": "sim-model" }"#;
    let c = send(k.addr, reordered, "");
    assert_eq!(cache_header(&c), "hit");
    assert_eq!(c.body, a.body);
    assert_eq!(sim.requests(), 1);

    // Sampled without a seed: never cached.
    let sampled = r#"{"model":"sim-model","prompt":"Hi","temperature":0.7,"max_tokens":4}"#;
    for _ in 0..2 {
        let r = send(k.addr, sampled, "");
        assert_eq!((r.status, cache_header(&r)), (200, "bypass"));
    }
    assert_eq!(sim.requests(), 3);
    // A seed makes sampling reproducible: cached.
    let seeded = r#"{"model":"sim-model","prompt":"Hi","temperature":0.7,"seed":7,"max_tokens":4}"#;
    assert_eq!(cache_header(&send(k.addr, seeded, "")), "miss");
    assert_eq!(cache_header(&send(k.addr, seeded, "")), "hit");
    assert_eq!(sim.requests(), 4);

    // Tenants never share: another Authorization value misses, then hits its own.
    let t1 = send(k.addr, body, "Authorization: Bearer tenant-1\r\n");
    assert_eq!(cache_header(&t1), "miss");
    let t1 = send(k.addr, body, "Authorization: Bearer tenant-1\r\n");
    assert_eq!(cache_header(&t1), "hit");
    let t2 = send(k.addr, body, "Authorization: Bearer tenant-2\r\n");
    assert_eq!(cache_header(&t2), "miss");
    let t3 = send(k.addr, body, "x-api-key: tenant-3\r\n");
    assert_eq!(cache_header(&t3), "miss");
    assert_eq!(sim.requests(), 7);

    // no-cache skips the lookup and refreshes; no-store neither reads nor writes.
    let r = send(k.addr, body, "Cache-Control: no-cache\r\n");
    assert_eq!(cache_header(&r), "bypass");
    let r = send(k.addr, body, "Cache-Control: no-store\r\n");
    assert_eq!(cache_header(&r), "bypass");
    assert_eq!(sim.requests(), 9);
    assert_eq!(cache_header(&send(k.addr, body, "")), "hit");

    // Other routes carry no cache header at all.
    let models = request(
        k.addr,
        "GET /v1/models HTTP/1.1\r\nHost: k\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    assert_eq!((models.status, cache_header(&models)), (200, "none"));

    // Logprobs are off by default: bypass.
    let lp = r#"{"model":"sim-model","prompt":"x","temperature":0,"logprobs":1,"max_tokens":2}"#;
    assert_eq!(cache_header(&send(k.addr, lp, "")), "bypass");

    // Streaming: stored as SSE events, replayed as the same events in order.
    let sbody = r#"{"model":"sim-model","prompt":"Stream me","temperature":0,"max_tokens":6,"stream":true}"#;
    let before = sim.requests();
    let s1 = send(k.addr, sbody, "");
    assert_eq!((s1.status, cache_header(&s1)), (200, "miss"));
    assert!(s1
        .header("content-type")
        .unwrap_or("")
        .contains("text/event-stream"));
    let s2 = send(k.addr, sbody, "");
    assert_eq!(cache_header(&s2), "hit");
    assert!(s2
        .header("content-type")
        .unwrap_or("")
        .contains("text/event-stream"));
    let events = |r: &Response| -> Vec<String> {
        r.text()
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .map(String::from)
            .collect()
    };
    assert!(events(&s1).len() > 2, "{}", s1.text());
    assert_eq!(events(&s1), events(&s2));
    assert!(events(&s2).last().unwrap().contains("[DONE]"));
    // The other mode of the same request is a miss, not a conversion.
    let plain = sbody.replace(r#","stream":true"#, "");
    assert_eq!(cache_header(&send(k.addr, &plain, "")), "miss");
    // So is a stream asking for a final usage event the stored one lacks.
    let usage = sbody.replace(
        r#","stream":true"#,
        r#","stream":true,"stream_options":{"include_usage":true}"#,
    );
    assert_eq!(cache_header(&send(k.addr, &usage, "")), "miss");
    assert_eq!(sim.requests(), before + 3);

    let m = scrape(&k);
    assert!(
        metric(
            &m,
            "kvroute_prediction_cache_requests_total",
            &[("result", "hit")]
        ) == 6.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "kvroute_prediction_cache_requests_total",
            &[("result", "bypass")]
        ) >= 5.0
    );
    assert!(metric(&m, "kvroute_prediction_cache_bytes", &[]) > 0.0);

    // Hit latency from a small keep-alive client loop (reported, not asserted).
    let mut c = Client::connect(k.addr).unwrap();
    let raw = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: k\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut lat = Vec::new();
    for _ in 0..2000 {
        let t = Instant::now();
        c.send(raw.as_bytes()).unwrap();
        let r = c.read_response(false).unwrap();
        lat.push(t.elapsed());
        assert_eq!(cache_header(&r), "hit");
    }
    lat.sort();
    println!(
        "hit latency over 2000 keep-alive requests (client round trip included): p50 {:?} p99 {:?}",
        lat[1000], lat[1980]
    );
}

#[test]
fn ttl_expiry_and_byte_budget_eviction() {
    let sim = Sim::start("0.01");
    let k = kvroute(
        &format!("http://{}", sim.addr),
        "ttl_ms = 400\nmax_bytes = 6000\nmax_entry_bytes = 3000",
    );
    let body = r#"{"model":"sim-model","prompt":"ttl","temperature":0,"max_tokens":4}"#;
    assert_eq!(cache_header(&send(k.addr, body, "")), "miss");
    assert_eq!(cache_header(&send(k.addr, body, "")), "hit");
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(
        cache_header(&send(k.addr, body, "")),
        "miss",
        "expired after the TTL"
    );

    // Far more distinct answers than the budget holds.
    let n = 40;
    let bodies: Vec<String> = (0..n)
        .map(|i| {
            format!(
                r#"{{"model":"sim-model","prompt":"budget {i}","temperature":0,"max_tokens":4}}"#
            )
        })
        .collect();
    for b in &bodies {
        let r = send(k.addr, b, "");
        assert_eq!((r.status, cache_header(&r)), (200, "miss"));
    }
    let hits = bodies
        .iter()
        .filter(|b| cache_header(&send(k.addr, b, "")) == "hit")
        .count();
    assert!(hits < n, "a 6000-byte budget cannot hold {n} answers");
    let m = scrape(&k);
    let bytes = metric(&m, "kvroute_prediction_cache_bytes", &[]);
    assert!(bytes > 0.0 && bytes <= 6000.0, "stored bytes {bytes}\n{m}");
    assert!(
        metric(
            &m,
            "kvroute_prediction_cache_evictions_total",
            &[("cause", "size")]
        ) > 0.0,
        "{m}"
    );
}

/// Answers `/v1/completions` with a chunked SSE stream that is cut after one
/// event (no terminating chunk), and counts requests.
fn cutting_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let c = c.clone();
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut tmp = [0u8; 4096];
                // Head plus a small body: enough to read until the body has arrived.
                while let Ok(n) = s.read(&mut tmp) {
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&tmp[..n]);
                    if let Some(h) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..h]).to_ascii_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        if buf.len() >= h + 4 + len {
                            break;
                        }
                    }
                }
                c.fetch_add(1, Ordering::SeqCst);
                let ev = "data: {\"choices\":[{\"text\":\"partial\"}]}\n\n";
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{ev}\r\n",
                    ev.len()
                );
                let _ = s.flush();
                std::thread::sleep(Duration::from_millis(50));
                // Dropped mid-stream.
            });
        }
    });
    (addr, count)
}

#[test]
fn a_truncated_stream_is_not_stored() {
    let (up, count) = cutting_upstream();
    let k = kvroute(&format!("http://{up}"), "");
    let body = r#"{"model":"m","prompt":"cut","temperature":0,"stream":true}"#;
    for i in 1..=2 {
        let mut c = Client::connect(k.addr).unwrap();
        let raw = format!(
            "POST /v1/completions HTTP/1.1\r\nHost: k\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        c.send(raw.as_bytes()).unwrap();
        let (status, headers) = c.read_head().unwrap();
        assert_eq!(status, 200);
        let h = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("x-kvroute-cache"))
            .map(|(_, v)| v.as_str());
        assert_eq!(h, Some("miss"), "request {i}");
        // Read whatever arrives until the proxy ends the stream.
        while let Ok(Some(_)) = c.read_chunk() {}
        assert_eq!(count.load(Ordering::SeqCst), i, "request {i} went upstream");
    }
    let m = scrape(&k);
    assert_eq!(
        metric(&m, "kvroute_prediction_cache_stores_total", &[]),
        0.0,
        "{m}"
    );
}

#[test]
fn concurrent_identical_requests_make_one_upstream_request() {
    // 40 tokens at 50 tok/s simulated, x0.2: about 160 ms upstream.
    let sim = Sim::start("0.2");
    let k = kvroute(&format!("http://{}", sim.addr), "");
    let body = r#"{"model":"sim-model","prompt":"Everyone asks this at once","temperature":0,"max_tokens":40}"#;
    let n = 50;
    let gate = Arc::new(Barrier::new(n));
    let addr = k.addr;
    let threads: Vec<_> = (0..n)
        .map(|_| {
            let gate = gate.clone();
            std::thread::spawn(move || {
                gate.wait();
                send(addr, body, "")
            })
        })
        .collect();
    let rs: Vec<Response> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(rs.iter().all(|r| r.status == 200));
    assert!(
        rs.iter().all(|r| r.body == rs[0].body),
        "every waiter got the leader's answer"
    );
    assert_eq!(rs.iter().filter(|r| cache_header(r) == "miss").count(), 1);
    assert_eq!(sim.requests(), 1, "exactly one upstream request");
    let m = scrape(&k);
    assert!(
        metric(
            &m,
            "kvroute_prediction_cache_single_flight_waits_total",
            &[("result", "hit")]
        ) >= 1.0,
        "{m}"
    );
}

/// A private redis-server; `None` (test skipped) when it is not installed,
/// except under CI where that is a failure.
struct Redis {
    child: std::process::Child,
    port: u16,
}

impl Redis {
    fn start() -> Option<Redis> {
        let port = free_port();
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) => {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "redis-server is required under CI: {e}"
                );
                println!("skipped: redis-server not available ({e})");
                return None;
            }
        };
        let up = wait_until(Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(up, "redis-server did not start");
        Some(Redis { child, port })
    }

    /// Keys held, through an inline command.
    fn dbsize(&self) -> u64 {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return 0;
        };
        let _ = s.write_all(b"DBSIZE\r\n");
        let mut b = [0u8; 64];
        let n = s.read(&mut b).unwrap_or(0);
        std::str::from_utf8(&b[..n])
            .ok()
            .and_then(|r| r.trim().strip_prefix(':')?.parse().ok())
            .unwrap_or(0)
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn redis_backend_is_shared_and_a_dead_redis_is_a_miss() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let sim = Sim::start("0.01");
    let url = format!("http://{}", sim.addr);
    // Generous read budget: two engineers' builds share this machine's two cores.
    let cfg = format!(
        "backend = \"redis://127.0.0.1:{}/0\"\nbackend_timeout_ms = 50",
        redis.port
    );
    let a = kvroute(&url, &cfg);
    // The other runtime flavour: backend calls run on tokio's reactor in both.
    let b = kvroute_with(&url, &cfg, &["--io", "epoll"]);
    let body = r#"{"model":"sim-model","prompt":"Shared answer","temperature":0,"max_tokens":6}"#;
    let ra = send(a.addr, body, "");
    assert_eq!(cache_header(&ra), "miss");
    // The backend write happens after the client's answer.
    assert!(
        wait_until(Duration::from_secs(5), || redis.dbsize() == 1),
        "a's answer reached redis"
    );
    let rb = send(b.addr, body, "");
    assert_eq!(
        cache_header(&rb),
        "hit",
        "instance b found a's answer in redis"
    );
    assert_eq!(ra.body, rb.body);
    assert_eq!(sim.requests(), 1);

    redis.stop();
    let mut slowest = Duration::ZERO;
    for i in 0..5 {
        let body = format!(
            r#"{{"model":"sim-model","prompt":"after redis died {i}","temperature":0,"max_tokens":2}}"#
        );
        let t = Instant::now();
        let r = send(b.addr, &body, "");
        let took = t.elapsed();
        assert_eq!((r.status, cache_header(&r)), (200, "miss"), "{}", r.text());
        assert!(
            took < Duration::from_secs(2),
            "a dead redis delayed a request {took:?}"
        );
        slowest = slowest.max(took);
    }
    println!("slowest miss with redis stopped (sim answer included): {slowest:?}");
    // Local memory still answers.
    assert_eq!(cache_header(&send(a.addr, body, "")), "hit");
    let m = scrape(&b);
    assert!(
        metric(&m, "kvroute_prediction_cache_backend_errors_total", &[]) >= 1.0,
        "{m}"
    );
}

/// Hits per second at one worker, from 4 keep-alive client threads. A
/// measurement, not a check: run with `--ignored --nocapture`, ideally with
/// `KVROUTE_BIN_KVROUTE` pointing at a release build.
#[test]
#[ignore]
fn hit_throughput_at_one_worker() {
    let sim = Sim::start("0.01");
    let path =
        std::env::temp_dir().join(format!("kvroute-pcache-tput-{}.toml", std::process::id()));
    std::fs::write(&path, "[prediction_cache]\nenabled = true\n").unwrap();
    let url = format!("http://{}", sim.addr);
    let k = Kvroute::start(&[
        "--config",
        path.to_str().unwrap(),
        "--workers",
        "1",
        "--replica",
        &url,
    ]);
    let body = r#"{"model":"sim-model","prompt":"throughput","temperature":0,"max_tokens":8}"#;
    assert_eq!(cache_header(&send(k.addr, body, "")), "miss");
    let raw = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: k\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let run = Duration::from_secs(3);
    let addr = k.addr;
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let raw = raw.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect(addr).unwrap();
                let t = Instant::now();
                let mut n = 0u64;
                while t.elapsed() < run {
                    c.send(raw.as_bytes()).unwrap();
                    let r = c.read_response(false).unwrap();
                    assert_eq!(r.status, 200);
                    n += 1;
                }
                n
            })
        })
        .collect();
    let total: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    println!(
        "hits/s at 1 worker, 4 client threads: {:.0}",
        total as f64 / run.as_secs_f64()
    );
    assert_eq!(sim.requests(), 1);
}
