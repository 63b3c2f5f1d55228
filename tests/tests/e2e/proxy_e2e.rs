//! End-to-end tests of the `kvroute` binary: real processes on loopback, checked
//! from the client's side. Every test runs under both I/O runtimes.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kvroute_tests::harness::{free_port, post, request, wait_until, Client, Kvroute, Upstream};

both_io!(
    forwards_non_streaming_and_rewrites_headers,
    streams_sse_incrementally,
    reuses_connections_both_ways,
    accepts_chunked_request_bodies,
    rejects_malformed_and_smuggling_requests,
    enforces_size_limits,
    times_out_slow_clients_without_hurting_others,
    retries_refused_replica_then_502_then_503,
    ends_stream_cleanly_when_replica_dies,
    replaces_replicas_mid_traffic_without_failures,
    drains_open_stream_on_sigterm,
    handles_expect_continue_and_head,
    rejects_bad_json_and_routes_by_model,
    holds_requests_while_replicas_restart,
);

/// `--io uring` on a machine without io_uring would fail to start, so CI can tell
/// a silent fallback from a real io_uring run: the admin state must say which ran.
fn start(io: &str, extra: &[&str]) -> Kvroute {
    let mut args = vec!["--io", io, "--workers", "1"];
    args.extend_from_slice(extra);
    let k = Kvroute::start(&args);
    let state = k.admin_get("/state").json();
    let expected = if io == "uring" { "io_uring" } else { "epoll" };
    assert_eq!(state["io"], expected);
    k
}

/// [`start`] with `toml` as its config file and `up` as its one replica.
fn start_with_config(io: &str, toml: &str, up: &Upstream) -> Kvroute {
    let cfg = tempdir().join("kvroute.toml");
    std::fs::write(&cfg, toml).unwrap();
    start(
        io,
        &["--config", cfg.to_str().unwrap(), "--replica", &up.url()],
    )
}

fn forwards_non_streaming_and_rewrites_headers(io: &str) {
    let up = Upstream::start("a");
    let k = start(io, &["--replica", &up.url()]);
    let mut c = Client::connect(k.addr).unwrap();
    let body = r#"{"model":"m","prompt":"hello"}"#;
    c.send(
        format!(
            "POST /v1/completions HTTP/1.1\r\nHost: client.example\r\nConnection: keep-alive, X-Secret\r\n\
             X-Secret: s\r\nKeep-Alive: timeout=9\r\nX-Forwarded-For: 10.1.1.1\r\nX-Keep: yes\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .unwrap();
    let r = c.read_response(false).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-upstream"), Some("a"));
    assert_eq!(r.json()["len"], body.len());
    // The replica's hop-by-hop `keep-alive` header must not reach the client.
    assert!(r.header("keep-alive").is_none());
    assert!(!r.closed);
    let seen = &up.seen()[0];
    assert_eq!(seen.body, body.as_bytes());
    assert_eq!(seen.header("x-forwarded-for"), Some("10.1.1.1, 127.0.0.1"));
    assert_eq!(seen.header("host"), Some(up.addr.to_string().as_str()));
    assert_eq!(seen.header("x-keep"), Some("yes"));
    for hop in ["x-secret", "keep-alive", "connection", "transfer-encoding"] {
        assert!(seen.header(hop).is_none(), "{hop} forwarded");
    }
}

fn streams_sse_incrementally(io: &str) {
    let up = Upstream::start("a");
    let k = start(io, &["--replica", &up.url()]);
    let mut c = Client::connect(k.addr).unwrap();
    c.send(b"POST /sse?n=4 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        .unwrap();
    let (status, headers) = c.read_head().unwrap();
    assert_eq!(status, 200);
    assert!(headers
        .iter()
        .any(|(n, v)| n == "content-type" && v == "text/event-stream"));
    // The upstream holds its remaining events until released: a proxy that buffered
    // the body would never deliver this first chunk and the read would time out.
    let first = c.read_chunk().unwrap().expect("first event");
    assert_eq!(first, b"data: {\"i\":0}\n\n");
    up.release();
    let mut rest = Vec::new();
    while let Some(ch) = c.read_chunk().unwrap() {
        rest.extend_from_slice(&ch);
    }
    let text = String::from_utf8(rest).unwrap();
    assert_eq!(text.matches("data: ").count(), 3, "{text}");
    // Keep-alive survives the stream.
    c.send(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!(c.read_response(false).unwrap().status, 200);
}

fn reuses_connections_both_ways(io: &str) {
    let up = Upstream::start("a");
    let k = start(io, &["--replica", &up.url()]);
    let mut c = Client::connect(k.addr).unwrap();
    for i in 0..20 {
        let body = format!("{{\"i\":{i}}}");
        c.send(
            format!(
                "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .unwrap();
        let r = c.read_response(false).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["len"], body.len());
    }
    // Two pipelined requests in one write are answered in order.
    c.send(b"GET /p1 HTTP/1.1\r\nHost: x\r\n\r\nGET /p2 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert_eq!(c.read_response(false).unwrap().json()["path"], "/p1");
    assert_eq!(c.read_response(false).unwrap().json()["path"], "/p2");
    assert_eq!(
        up.connections.load(Ordering::Relaxed),
        1,
        "upstream connection not reused"
    );
    let metrics = k.admin_get("/metrics").text();
    assert!(
        metrics.contains("kvroute_upstream_pool_total{result=\"reuse\"} 21"),
        "{metrics}"
    );
}

fn accepts_chunked_request_bodies(io: &str) {
    let up = Upstream::start("a");
    let k = start(io, &["--replica", &up.url()]);
    let mut c = Client::connect(k.addr).unwrap();
    c.send(b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    c.send(b"7;ext=1\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\n")
        .unwrap();
    let r = c.read_response(false).unwrap();
    assert_eq!(r.status, 200);
    let seen = &up.seen()[0];
    assert_eq!(seen.body, b"hello, world");
    assert_eq!(seen.header("content-length"), Some("12"));
    assert!(seen.header("transfer-encoding").is_none());
}

fn expect_error(r: &kvroute_tests::harness::Response, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    let v = r.json();
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    assert!(v["error"]["type"].is_string());
}

fn rejects_malformed_and_smuggling_requests(io: &str) {
    let up = Upstream::start("a");
    let k = start(io, &["--replica", &up.url()]);
    let cases = [
        "garbage\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        "GET / HTTP/1.1\nHost: x\n\n",
        "GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n folded\r\n\r\n",
        "GET / HTTP/1.1\r\n\r\n",
    ];
    for raw in cases {
        let r = request(k.addr, raw).unwrap();
        expect_error(&r, 400, "bad_request");
        assert!(r.closed, "connection left open after {raw:?}");
    }
    assert!(
        up.seen().is_empty(),
        "a malformed request reached the replica"
    );
    // The proxy still serves well-formed requests afterwards.
    assert_eq!(post(k.addr, "/ok", "{}").unwrap().status, 200);
}

fn enforces_size_limits(io: &str) {
    let up = Upstream::start("a");
    let k = start_with_config(
        io,
        "[limits]\nmax_body_bytes = 1000\nmax_head_bytes = 2048\n",
        &up,
    );
    let big = "x".repeat(1001);
    expect_error(
        &post(k.addr, "/v1/completions", &big).unwrap(),
        413,
        "request_too_large",
    );
    let chunked = format!(
        "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3e9\r\n{big}\r\n0\r\n\r\n"
    );
    expect_error(
        &request(k.addr, &chunked).unwrap(),
        413,
        "request_too_large",
    );
    let long_head = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(3000)
    );
    expect_error(
        &request(k.addr, &long_head).unwrap(),
        431,
        "header_fields_too_large",
    );
    assert_eq!(
        post(k.addr, "/upload", &"y".repeat(1000)).unwrap().status,
        200
    );
}

fn times_out_slow_clients_without_hurting_others(io: &str) {
    let up = Upstream::start("a");
    let k = start_with_config(
        io,
        "[limits]\nhead_timeout_ms = 300\nbody_timeout_ms = 300\n",
        &up,
    );
    let mut slow_head = Client::connect(k.addr).unwrap();
    slow_head
        .send(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let mut slow_body = Client::connect(k.addr).unwrap();
    slow_body
        .send(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        .unwrap();
    // Meanwhile, another client is served normally.
    for _ in 0..5 {
        assert_eq!(post(k.addr, "/v1/completions", "{}").unwrap().status, 200);
    }
    let r = slow_head.read_response(false).unwrap();
    expect_error(&r, 408, "request_timeout");
    assert!(r.closed);
    let r = slow_body.read_response(false).unwrap();
    expect_error(&r, 408, "request_timeout");
    assert!(r.closed);
}

fn retries_refused_replica_then_502_then_503(io: &str) {
    let up = Upstream::start("live");
    let dead = format!("http://127.0.0.1:{}", free_port());
    let k = start(io, &["--replica", &dead, "--replica", &up.url()]);
    // Round-robin alternates; every request must still succeed through the retry.
    for _ in 0..6 {
        let r = post(k.addr, "/v1/completions", "{}").unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-upstream"), Some("live"));
    }
    let state = k.admin_get("/state").json();
    let dead_state = state["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["url"] == dead.as_str())
        .unwrap()
        .clone();
    assert!(
        dead_state["failures_total"].as_u64().unwrap() >= 3,
        "{dead_state}"
    );
    // A replica that resets before answering counts the same as a refused one.
    let r = post(k.addr, "/reset", "{}").unwrap();
    expect_error(&r, 502, "upstream_error");
    // Only dead replicas: 502 after the retry.
    let dead2 = format!("http://127.0.0.1:{}", free_port());
    let body = format!(r#"{{"replicas":[{{"url":"{dead}"}},{{"url":"{dead2}"}}]}}"#);
    assert_eq!(k.admin_put("/replicas", &body).status, 200);
    expect_error(
        &post(k.addr, "/v1/completions", "{}").unwrap(),
        502,
        "upstream_error",
    );
    // No replica at all: 503.
    assert_eq!(k.admin_put("/replicas", r#"{"replicas":[]}"#).status, 200);
    expect_error(
        &post(k.addr, "/v1/completions", "{}").unwrap(),
        503,
        "no_healthy_replica",
    );
    let m = k.admin_get("/metrics").text();
    assert!(m.contains("kvroute_upstream_retries_total"), "{m}");
}

fn ends_stream_cleanly_when_replica_dies(io: &str) {
    let up = Upstream::start("a");
    let k = start(io, &["--replica", &up.url()]);
    let mut c = Client::connect(k.addr).unwrap();
    c.send(b"POST /die HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        .unwrap();
    let r = c.read_response(false).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"data: {\"i\":0}\n\n");
    assert!(
        c.peer_closed(),
        "client connection must close after a broken stream"
    );
    let m = k.admin_get("/metrics").text();
    assert!(
        m.contains("kvroute_errors_total{kind=\"upstream_midstream\"} 1"),
        "{m}"
    );
    assert_eq!(post(k.addr, "/v1/completions", "{}").unwrap().status, 200);
}

fn replaces_replicas_mid_traffic_without_failures(io: &str) {
    let a = Upstream::start("a");
    let b = Upstream::start("b");
    let k = Arc::new(start(io, &["--replica", &a.url()]));
    let failures = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let traffic: Vec<_> = (0..3)
        .map(|_| {
            let (k, failures, done) = (k.clone(), failures.clone(), done.clone());
            std::thread::spawn(move || {
                let mut c = Client::connect(k.addr).unwrap();
                for _ in 0..150 {
                    c.send(
                        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
                    )
                    .unwrap();
                    match c.read_response(false) {
                        Ok(r) if r.status == 200 => {}
                        _ => {
                            failures.fetch_add(1, Ordering::Relaxed);
                            c = Client::connect(k.addr).unwrap();
                        }
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    assert!(wait_until(Duration::from_secs(10), || done
        .load(Ordering::Relaxed)
        > 100));
    let body = format!(
        r#"{{"replicas":[{{"url":"{}"}},{{"url":"{}"}}]}}"#,
        a.url(),
        b.url()
    );
    assert_eq!(k.admin_put("/replicas", &body).status, 200);
    assert!(wait_until(Duration::from_secs(10), || done
        .load(Ordering::Relaxed)
        > 250));
    let body = format!(r#"{{"replicas":[{{"url":"{}"}}]}}"#, b.url());
    let r = k.admin_put("/replicas", &body);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["replicas"][0]["url"], b.url());
    for t in traffic {
        t.join().unwrap();
    }
    assert_eq!(failures.load(Ordering::Relaxed), 0);
    assert!(!b.seen().is_empty(), "new replica never used");
    let before = a.seen().len();
    for _ in 0..5 {
        assert_eq!(
            post(k.addr, "/v1/completions", "{}")
                .unwrap()
                .header("x-upstream"),
            Some("b")
        );
    }
    assert_eq!(
        a.seen().len(),
        before,
        "removed replica still receives traffic"
    );
    // A bad update is refused and changes nothing.
    let r = k.admin_put("/replicas", r#"{"replicas":[{"url":"ftp://x"}]}"#);
    assert_eq!(r.status, 400);
    assert_eq!(post(k.addr, "/v1/completions", "{}").unwrap().status, 200);
}

fn drains_open_stream_on_sigterm(io: &str) {
    let up = Upstream::start("a");
    let mut k = start(io, &["--replica", &up.url()]);
    let mut c = Client::connect(k.addr).unwrap();
    c.send(b"POST /sse?n=5 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        .unwrap();
    assert_eq!(c.read_head().unwrap().0, 200);
    assert!(c.read_chunk().unwrap().is_some());
    k.proc.signal("TERM");
    // New connections are refused once draining has started.
    assert!(wait_until(Duration::from_secs(5), || Client::connect(
        k.addr
    )
    .is_err()));
    assert!(
        k.proc.wait_exit(Duration::from_millis(300)).is_none(),
        "exited with a stream open"
    );
    up.release();
    let mut n = 1;
    while let Some(_ch) = c.read_chunk().unwrap() {
        n += 1;
    }
    assert_eq!(n, 5, "stream cut short by the drain");
    assert_eq!(k.proc.wait_exit(Duration::from_secs(10)), Some(0));
}

fn handles_expect_continue_and_head(io: &str) {
    let up = Upstream::start("a");
    let k = start(io, &["--replica", &up.url()]);
    let mut c = Client::connect(k.addr).unwrap();
    c.send(
        b"POST /upload HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
    )
    .unwrap();
    let (status, _) = c.read_head().unwrap();
    assert_eq!(status, 100);
    c.stream.write_all(b"hello").unwrap();
    let r = c.read_response(false).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["len"], 5);
    c.send(b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let r = c.read_response(true).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("42"));
    assert!(r.body.is_empty());
    // The connection is still in sync after a bodiless response.
    c.send(b"GET /after-head HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert_eq!(
        c.read_response(false).unwrap().json()["path"],
        "/after-head"
    );
}

fn tempdir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "kvroute-test-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn rejects_bad_json_and_routes_by_model(io: &str) {
    let a = Upstream::start("a");
    let b = Upstream::start("b");
    let k = start(
        io,
        &[
            "--replica",
            &format!("{}=llama", a.url()),
            "--replica",
            &format!("{}=qwen", b.url()),
        ],
    );
    let mut c = Client::connect(k.addr).unwrap();
    let bad = r#"{"model":"llama","prompt":"unterminated}"#;
    c.send(
        format!(
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{bad}",
            bad.len()
        )
        .as_bytes(),
    )
    .unwrap();
    let r = c.read_response(false).unwrap();
    expect_error(&r, 400, "bad_request");
    assert!(
        !r.closed,
        "a complete request with a bad body keeps the connection"
    );
    for (model, name) in [("llama", "a"), ("qwen", "b"), ("llama", "a"), ("qwen", "b")] {
        let body = format!(r#"{{"model":"{model}","prompt":"hello there"}}"#);
        c.send(
            format!(
                "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .unwrap();
        let r = c.read_response(false).unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-upstream"), Some(name), "model {model}");
    }
    let r = post(
        k.addr,
        "/v1/chat/completions",
        r#"{"model":"gpt-x","messages":[{"role":"user","content":"hi"}]}"#,
    )
    .unwrap();
    expect_error(&r, 404, "model_not_found");
    assert!(a
        .seen()
        .iter()
        .chain(b.seen().iter())
        .all(|s| !String::from_utf8_lossy(&s.body).contains("unterminated")));
}

fn holds_requests_while_replicas_restart(io: &str) {
    let up = Upstream::start("a");
    let k = Arc::new(start_with_config(
        io,
        "[upstream]\nqueue_timeout_ms = 3000\n",
        &up,
    ));
    let down = format!(
        r#"{{"replicas":[{{"url":"{}","healthy":false}}]}}"#,
        up.url()
    );
    let back = format!(r#"{{"replicas":[{{"url":"{}"}}]}}"#, up.url());
    assert_eq!(k.admin_put("/replicas", &down).status, 200);
    // A request arriving while the only replica is out is held, not failed ...
    let k2 = k.clone();
    let waiter = std::thread::spawn(move || post(k2.addr, "/v1/completions", "{}").unwrap());
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !waiter.is_finished(),
        "answered while no replica was available"
    );
    // ... and served once the replica returns.
    assert_eq!(k.admin_put("/replicas", &back).status, 200);
    let r = waiter.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    // Past the queue timeout it is a 503.
    assert_eq!(k.admin_put("/replicas", &down).status, 200);
    let t = std::time::Instant::now();
    expect_error(
        &post(k.addr, "/v1/completions", "{}").unwrap(),
        503,
        "no_healthy_replica",
    );
    assert!(
        t.elapsed() >= Duration::from_millis(2500),
        "not held: {:?}",
        t.elapsed()
    );
}
