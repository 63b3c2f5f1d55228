//! Integration tests of the real `kvroute-sim` binary over loopback.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{HeaderMap, Request, StatusCode};
use hyper_util::rt::TokioIo;
use kvroute_testkit::child::Child;
use kvroute_testkit::metrics_text::{Sample, Samples};
use kvroute_testkit::port::free_port;
use kvroute_tests::harness::workspace_bin;
use serde_json::{json, Value};
use zeromq::{Socket, SocketRecv};

/// Block of 16 tokens = 64 bytes of prompt text.
const BLOCK_BYTES: usize = 64;

/// A running simulator, killed on drop (by its [`Child`]).
struct Sim {
    _child: Child,
    addr: SocketAddr,
}

impl Sim {
    async fn start(extra: &[&str]) -> Sim {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut cmd = Command::new(workspace_bin("kvroute-sim"));
        cmd.args([
            "--listen",
            &addr.to_string(),
            "--name",
            "r7",
            "--model",
            "m",
        ])
        .args(["--block-tokens", "16", "--time-scale", "0.001"])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
        let child = Child::spawn("kvroute-sim", &mut cmd).expect("spawn kvroute-sim");
        let sim = Sim {
            _child: child,
            addr,
        };
        for _ in 0..100 {
            if let Ok((StatusCode::OK, _, body)) = sim.get("/health").await {
                assert_eq!(&body[..], b"ok");
                return sim;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("kvroute-sim did not become healthy on {addr}");
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Bytes,
    ) -> Result<(StatusCode, HeaderMap, Bytes), Box<dyn std::error::Error + Send + Sync>> {
        let stream = tokio::net::TcpStream::connect(self.addr).await?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string())
            .header("content-type", "application/json")
            .body(Full::new(body))?;
        let resp = send.send_request(req).await?;
        let (parts, body) = resp.into_parts();
        let body = tokio::time::timeout(Duration::from_secs(10), body.collect())
            .await??
            .to_bytes();
        Ok((parts.status, parts.headers, body))
    }

    async fn get(
        &self,
        path: &str,
    ) -> Result<(StatusCode, HeaderMap, Bytes), Box<dyn std::error::Error + Send + Sync>> {
        self.call("GET", path, Bytes::new()).await
    }

    async fn post(&self, path: &str, body: &Value) -> (StatusCode, HeaderMap, Bytes) {
        self.call("POST", path, Bytes::from(body.to_string()))
            .await
            .expect("request")
    }

    async fn post_json(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let (status, headers, body) = self.post(path, body).await;
        assert_eq!(headers["x-replica"], "r7");
        (status, serde_json::from_slice(&body).expect("JSON body"))
    }
}

fn text(blocks: usize, tag: &str) -> String {
    let mut s = format!("{tag}:");
    while s.len() < blocks * BLOCK_BYTES {
        s.push_str(" lorem ipsum");
    }
    s.truncate(blocks * BLOCK_BYTES);
    s
}

fn cached(v: &Value) -> u64 {
    v["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .expect("usage.prompt_tokens_details.cached_tokens")
}

#[tokio::test]
async fn repeated_prompt_hits_the_cache() {
    let sim = Sim::start(&[]).await;
    // 5 full blocks and a partial one.
    let prompt = format!("{}tail", text(5, "rep"));
    let req = json!({"model": "m", "prompt": prompt, "max_tokens": 3});
    let (status, first) = sim.post_json("/v1/completions", &req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(cached(&first), 0);
    assert_eq!(first["usage"]["prompt_tokens"], 81);
    assert_eq!(first["usage"]["completion_tokens"], 3);
    assert_eq!(first["usage"]["total_tokens"], 84);
    assert_eq!(first["choices"][0]["finish_reason"], "length");

    let (_, second) = sim.post_json("/v1/completions", &req).await;
    assert_eq!(cached(&second), 5 * 16, "the partial block is not cached");

    // A chat conversation's next turn reuses the previous turn's blocks.
    let turn1 = json!([{"role": "user", "content": text(3, "chat")}]);
    let turn2 = json!([
        {"role": "user", "content": text(3, "chat")},
        {"role": "assistant", "content": [{"type": "text", "text": "fine"}]},
        {"role": "user", "content": "more"},
    ]);
    let (_, a) = sim
        .post_json("/v1/chat/completions", &json!({"messages": turn1}))
        .await;
    assert_eq!(cached(&a), 0);
    assert_eq!(a["choices"][0]["message"]["role"], "assistant");
    let (_, b) = sim
        .post_json("/v1/chat/completions", &json!({"messages": turn2}))
        .await;
    assert_eq!(cached(&b), 3 * 16);

    let (_, _, stats) = sim.get("/sim/stats").await.unwrap();
    let stats: Value = serde_json::from_slice(&stats).unwrap();
    assert_eq!(stats["name"], "r7");
    assert_eq!(stats["requests"], 4);
    assert_eq!(stats["cached_tokens"], 5 * 16 + 3 * 16);
}

#[tokio::test]
async fn a_full_cache_evicts_least_recent_blocks() {
    let sim = Sim::start(&["--kv-blocks", "4"]).await;
    let a = json!({"prompt": text(3, "a"), "max_tokens": 1});
    let b = json!({"prompt": text(3, "b"), "max_tokens": 1});
    sim.post_json("/v1/completions", &a).await;
    // B needs 3 blocks of 4 with A holding 3: A loses two, tail first.
    sim.post_json("/v1/completions", &b).await;
    let (_, again) = sim.post_json("/v1/completions", &a).await;
    assert_eq!(cached(&again), 16, "only A's head block survived");
    let (_, _, stats) = sim.get("/sim/stats").await.unwrap();
    let stats: Value = serde_json::from_slice(&stats).unwrap();
    assert!(stats["evictions"].as_u64().unwrap() >= 2);
}

#[tokio::test]
async fn streaming_yields_chunks_then_usage_and_done() {
    let sim = Sim::start(&[]).await;
    for (path, req) in [
        (
            "/v1/completions",
            json!({"prompt": text(2, "s"), "max_tokens": 5, "stream": true,
                   "stream_options": {"include_usage": true}}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                   "stream": true, "stream_options": {"include_usage": true}}),
        ),
    ] {
        let (status, headers, body) = sim.post(path, &req).await;
        assert_eq!(status, StatusCode::OK);
        assert!(headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        let body = String::from_utf8(body.to_vec()).unwrap();
        let events: Vec<&str> = body
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| e.strip_prefix("data: ").expect("SSE data line"))
            .collect();
        assert_eq!(events.last(), Some(&"[DONE]"));
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        let with_text = chunks
            .iter()
            .filter(|c| {
                let choice = &c["choices"][0];
                choice["text"].as_str().is_some_and(|t| !t.is_empty())
                    || choice["delta"]["content"].is_string()
            })
            .count();
        assert_eq!(with_text, 5, "{path}: one chunk per token");
        let usage = &chunks.last().unwrap()["usage"];
        assert_eq!(usage["completion_tokens"], 5);
        assert!(usage["prompt_tokens"].as_u64().unwrap() > 0);
        assert!(usage["prompt_tokens_details"]["cached_tokens"].is_u64());
    }
    // Without include_usage there is no usage chunk.
    let (_, _, body) = sim
        .post(
            "/v1/completions",
            &json!({"prompt": "x", "max_tokens": 2, "stream": true}),
        )
        .await;
    let body = String::from_utf8(body.to_vec()).unwrap();
    assert!(!body.contains("\"usage\""));
    assert!(body.ends_with("data: [DONE]\n\n"));
}

/// The samples of a `/metrics` page; every line must be a sample, a comment or blank.
fn parse_metrics(text: &str) -> Samples {
    Samples::try_parse(text).unwrap_or_else(|e| panic!("/metrics: {e}"))
}

#[tokio::test]
async fn metrics_use_vllm_names() {
    let sim = Sim::start(&["--kv-blocks", "500"]).await;
    let req = json!({"prompt": text(4, "metrics"), "max_tokens": 2});
    sim.post_json("/v1/completions", &req).await;
    sim.post_json("/v1/completions", &req).await;
    let (status, _, body) = sim.get("/metrics").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let metrics = parse_metrics(std::str::from_utf8(&body).unwrap());
    let value = |name: &str| {
        let s = metrics
            .named(name)
            .next()
            .unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(s.label("model_name"), Some("m"), "{name} has model_name");
        s.value
    };
    assert_eq!(value("vllm:num_requests_running"), 0.0);
    assert_eq!(value("vllm:num_requests_waiting"), 0.0);
    let usage = value("vllm:kv_cache_usage_perc");
    assert!((0.0..=1.0).contains(&usage));
    // Two queries of 64 tokens each, the second fully cached.
    assert_eq!(value("vllm:prefix_cache_queries_total"), 128.0);
    assert_eq!(value("vllm:prefix_cache_hits_total"), 64.0);
    assert_eq!(value("vllm:cache_config_info"), 1.0);
    let info: &Sample = metrics.named("vllm:cache_config_info").next().unwrap();
    assert_eq!(info.label("num_gpu_blocks"), Some("500"));
    assert_eq!(info.label("block_size"), Some("16"));
}

#[tokio::test]
async fn running_and_waiting_follow_max_seqs() {
    // Slow decode so that two requests overlap: 4 tokens at 10 tok/s = 0.3 s real at scale 1.
    let sim = Sim::start(&["--max-seqs", "1", "--time-scale", "1", "--decode-tps", "10"]).await;
    let req = json!({"prompt": "x", "max_tokens": 4});
    let a = sim.post_json("/v1/completions", &req);
    let b = sim.post_json("/v1/completions", &req);
    let probe = async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let (_, _, body) = sim.get("/metrics").await.unwrap();
        parse_metrics(std::str::from_utf8(&body).unwrap())
    };
    let (_, _, metrics) = tokio::join!(a, b, probe);
    let get = |name: &str| metrics.named(name).next().unwrap().value;
    assert_eq!(get("vllm:num_requests_running"), 1.0);
    assert_eq!(get("vllm:num_requests_waiting"), 1.0);
    assert!(get("vllm:kv_cache_usage_perc") > 0.0);
}

async fn subscriber(endpoint: &str) -> zeromq::SubSocket {
    let mut sub = zeromq::SubSocket::new();
    sub.connect(endpoint).await.expect("connect SUB");
    sub.subscribe("").await.expect("subscribe");
    sub
}

/// Sends distinct 3-block prompts until a batch arrives (a new subscriber misses what was
/// published before its subscription reached the publisher); returns the decoded batches.
async fn first_batch(sim: &Sim, sub: &mut zeromq::SubSocket) -> (u64, Value) {
    for attempt in 0..50 {
        let req = json!({"prompt": text(3, &format!("ev{attempt}")), "max_tokens": 1});
        sim.post_json("/v1/completions", &req).await;
        if let Ok(msg) = tokio::time::timeout(Duration::from_millis(200), sub.recv()).await {
            return decode(msg.expect("recv"));
        }
    }
    panic!("no KV event batch received");
}

fn decode(msg: zeromq::ZmqMessage) -> (u64, Value) {
    let frames = msg.into_vec();
    assert_eq!(frames.len(), 3, "[topic, seq, payload]");
    let seq = u64::from_be_bytes(frames[1][..].try_into().expect("8-byte sequence number"));
    let batch: Value = rmp_serde::from_slice(&frames[2]).expect("msgpack batch");
    assert!(batch[0].is_f64(), "ts is a float");
    assert_eq!(batch.as_array().unwrap().len(), 3, "[ts, events, dp_rank]");
    (seq, batch)
}

#[tokio::test]
async fn kv_events_map_format() {
    let endpoint = format!("tcp://127.0.0.1:{}", free_port());
    let sim = Sim::start(&["--kv-events", &endpoint]).await;
    let mut sub = subscriber(&endpoint).await;
    let (seq, batch) = first_batch(&sim, &mut sub).await;
    let ev = &batch[1][0];
    assert_eq!(ev["type"], "BlockStored");
    assert_eq!(ev["block_hashes"].as_array().unwrap().len(), 3);
    assert_eq!(ev["token_ids"].as_array().unwrap().len(), 3 * 16);
    assert_eq!(ev["block_size"], 16);
    assert!(ev["parent_block_hash"].is_null());

    // Dropping the cache is announced as AllBlocksCleared; sequence numbers keep increasing
    // (batches of earlier attempts may still be in flight before it).
    let (status, _) = sim
        .post_json("/sim/fault", &json!({"drop_cache": true}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let mut last = seq;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), sub.recv())
            .await
            .expect("AllBlocksCleared within 5 s")
            .unwrap();
        let (next, batch) = decode(msg);
        assert!(next > last, "sequence numbers increase");
        last = next;
        if batch[1][0]["type"] == "AllBlocksCleared" {
            break;
        }
    }
}

#[tokio::test]
async fn kv_events_legacy_format() {
    let endpoint = format!("tcp://127.0.0.1:{}", free_port());
    let sim = Sim::start(&["--kv-events", &endpoint, "--kv-events-format", "legacy"]).await;
    let mut sub = subscriber(&endpoint).await;
    let (_, batch) = first_batch(&sim, &mut sub).await;
    let ev = batch[1][0].as_array().expect("legacy events are arrays");
    assert_eq!(ev[0], "BlockStored");
    assert_eq!(ev[1].as_array().unwrap().len(), 3, "block_hashes");
    assert!(ev[2].is_null(), "parent_block_hash");
    assert_eq!(ev[3].as_array().unwrap().len(), 3 * 16, "token_ids");
    assert_eq!(ev[4], 16, "block_size");
    assert!(ev[5].is_null(), "lora_id");
    assert_eq!(ev[6], "GPU", "medium");
}

#[tokio::test]
async fn faults_and_errors() {
    let sim = Sim::start(&[]).await;
    let req = json!({"prompt": "hello", "max_tokens": 1});

    let (status, _, body) = sim
        .call("POST", "/v1/completions", Bytes::from_static(b"{not json"))
        .await
        .unwrap();
    let err: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(err["error"]["type"], "invalid_request_error");
    assert!(err["error"]["message"].is_string());

    let (status, err) = sim
        .post_json("/v1/completions", &json!({"model": "other", "prompt": "x"}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(err["error"]["message"].as_str().unwrap().contains("other"));

    sim.post_json("/sim/fault", &json!({"error_rate": 1.0, "mode": "500"}))
        .await;
    for _ in 0..3 {
        let (status, err) = sim.post_json("/v1/completions", &req).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(err["error"]["message"].is_string());
    }
    // Non-inference endpoints are not affected.
    assert_eq!(sim.get("/health").await.unwrap().0, StatusCode::OK);

    sim.post_json("/sim/fault", &json!({"mode": "reset"})).await;
    assert!(
        sim.call("POST", "/v1/completions", Bytes::from(req.to_string()))
            .await
            .is_err(),
        "reset mode closes the connection without a response"
    );

    let (status, _) = sim.post_json("/sim/reset", &json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, ok) = sim.post_json("/v1/completions", &req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ok["usage"]["completion_tokens"], 1);
    let (_, _, stats) = sim.get("/sim/stats").await.unwrap();
    let stats: Value = serde_json::from_slice(&stats).unwrap();
    assert_eq!(stats["requests"], 1, "reset zeroes the stats");
}
