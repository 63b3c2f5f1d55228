//! End-to-end tests of the `kvroute-load` binary against a tiny fake OpenAI-style SSE server
//! started inside the test on 127.0.0.1:0.
//!
//! The fake speaks just enough HTTP/1.1 by hand (keep-alive, chunked SSE) to also let tests
//! count connections and inject failures (503s, streams cut mid-body). It keeps one global
//! prefix cache over 512-byte chunks of the prompt, so with `--block-bytes 512` (one byte per
//! trace token) its reported hit ratio approximates the trace's ideal hit ratio.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvroute_tests::harness::workspace_bin;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// The trace vendored at the repository root (`traces/README.md`).
const TRACE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../traces/conversation_trace.jsonl"
);
const CACHE_CHUNK: usize = 512;
const REPLICAS: [&str; 3] = ["r0", "r1", "r2"];

/// Failure injection by global request sequence number (1-based).
#[derive(Clone, Copy, Default)]
struct Faults {
    /// Every n-th request gets a 503.
    status_503_every: Option<u64>,
    /// Every n-th request (that is not a 503) has its stream cut before `[DONE]`.
    truncate_every: Option<u64>,
    /// Delay before the response head, like a replica busy with prefill.
    delay_ms: u64,
}

#[derive(Default)]
struct State {
    seq: u64,
    connections: u64,
    requests: u64,
    ok: u64,
    status_503: u64,
    truncated: u64,
    prompt_tokens: u64,
    cached_tokens: u64,
    per_replica: BTreeMap<String, u64>,
    cache: HashSet<u64>,
    /// Prompt length per session id in arrival order (chat / synthetic checks).
    sessions: HashMap<String, Vec<usize>>,
    missing_session_header: u64,
    bad_shape: u64,
    first_roles: Vec<String>,
}

struct Fake {
    url: String,
    state: Arc<Mutex<State>>,
}

async fn start_fake(faults: Faults) -> Fake {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let state = Arc::new(Mutex::new(State::default()));
    let st = state.clone();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            st.lock().unwrap().connections += 1;
            tokio::spawn(serve_conn(sock, st.clone(), faults));
        }
    });
    Fake { url, state }
}

async fn serve_conn(sock: TcpStream, st: Arc<Mutex<State>>, faults: Faults) {
    let _ = sock.set_nodelay(true);
    let mut conn = BufReader::new(sock);
    loop {
        let mut path = String::new();
        if conn.read_line(&mut path).await.unwrap_or(0) == 0 {
            return;
        }
        let path = path.split_whitespace().nth(1).unwrap_or("").to_owned();
        let mut headers = HashMap::new();
        loop {
            let mut line = String::new();
            if conn.read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
            }
        }
        let len: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        if conn.read_exact(&mut body).await.is_err() {
            return;
        }
        let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let chat = path == "/v1/chat/completions";
        let (text, first_role) = if chat {
            let msgs = req["messages"].as_array().cloned().unwrap_or_default();
            let text: String = msgs.iter().filter_map(|m| m["content"].as_str()).collect();
            (
                text,
                msgs.first()
                    .and_then(|m| m["role"].as_str())
                    .unwrap_or("")
                    .to_owned(),
            )
        } else {
            (
                req["prompt"].as_str().unwrap_or("").to_owned(),
                String::new(),
            )
        };
        let max_tokens = req["max_tokens"].as_u64().unwrap_or(0);

        let (seq, replica, prompt, cached) = {
            let mut s = st.lock().unwrap();
            s.seq += 1;
            s.requests += 1;
            let seq = s.seq;
            let replica = REPLICAS[(seq % REPLICAS.len() as u64) as usize].to_owned();
            *s.per_replica.entry(replica.clone()).or_insert(0) += 1;
            let shape_ok = req["stream"] == true
                && req["stream_options"]["include_usage"] == true
                && max_tokens >= 1
                && req["model"].is_string()
                && (path == "/v1/completions" || chat);
            if !shape_ok {
                s.bad_shape += 1;
            }
            if chat {
                match headers.get("x-session-id") {
                    Some(id) => s.sessions.entry(id.clone()).or_default().push(text.len()),
                    None => s.missing_session_header += 1,
                }
                s.first_roles.push(first_role);
            }
            // One global prefix cache: chained hashes of 512-byte chunks (the last one partial).
            let mut h = 0u64;
            let mut cached = 0usize;
            let mut still_hitting = true;
            for chunk in text.as_bytes().chunks(CACHE_CHUNK) {
                h = xxhash_rust::xxh3::xxh3_64_with_seed(chunk, h);
                if still_hitting && s.cache.contains(&h) {
                    cached += chunk.len();
                } else {
                    still_hitting = false;
                }
                s.cache.insert(h);
            }
            (seq, replica, text.len() as u64, cached as u64)
        };

        if faults.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(faults.delay_ms)).await;
        }
        let w = conn.get_mut();
        if faults.status_503_every.is_some_and(|n| seq % n == 0) {
            st.lock().unwrap().status_503 += 1;
            let msg = "overloaded";
            let head = format!(
                "HTTP/1.1 503 Service Unavailable\r\nx-replica: {replica}\r\ncontent-length: {}\r\n\r\n{msg}",
                msg.len()
            );
            if w.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            continue;
        }
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nx-replica: {replica}\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        if w.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let mut events = Vec::new();
        if chat {
            events.push(r#"{"choices":[{"index":0,"delta":{"role":"assistant"}}]}"#.to_owned());
        }
        for _ in 0..max_tokens.min(4) {
            events.push(if chat {
                r#"{"choices":[{"index":0,"delta":{"content":"tok "}}]}"#.to_owned()
            } else {
                r#"{"choices":[{"index":0,"text":"tok "}]}"#.to_owned()
            });
        }
        if faults.truncate_every.is_some_and(|n| seq % n == 0) {
            st.lock().unwrap().truncated += 1;
            for e in &events {
                let _ = write_chunk(w, &format!("data: {e}\n\n")).await;
            }
            // Close without the terminating chunk: the client must see a cut-off stream.
            let _ = w.shutdown().await;
            return;
        }
        {
            // Account before the client can see the end of the stream: the test reads these
            // totals as soon as the binary exits.
            let mut s = st.lock().unwrap();
            s.ok += 1;
            s.prompt_tokens += prompt;
            s.cached_tokens += cached;
        }
        events.push(format!(
            r#"{{"choices":[],"usage":{{"prompt_tokens":{prompt},"completion_tokens":{max_tokens},"prompt_tokens_details":{{"cached_tokens":{cached}}}}}}}"#
        ));
        events.push("[DONE]".to_owned());
        for e in &events {
            // Separate writes so the client really sees a stream, not one buffer.
            if write_chunk(w, &format!("data: {e}\n\n")).await.is_err() {
                return;
            }
        }
        if w.write_all(b"0\r\n\r\n").await.is_err() {
            return;
        }
    }
}

async fn write_chunk(w: &mut TcpStream, data: &str) -> std::io::Result<()> {
    w.write_all(format!("{:x}\r\n{data}\r\n", data.len()).as_bytes())
        .await
}

/// Runs the binary with `args`, bounded by a timeout, and parses its `--json` output.
async fn run_load(args: &[&str]) -> Value {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(workspace_bin("kvroute-load"))
            .args(args)
            .arg("--json")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("kvroute-load did not finish in 60 s")
    .expect("spawn kvroute-load");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kvroute-load failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("bad json ({e}): {stdout}"))
}

fn trace_input_tokens(n: usize) -> u64 {
    std::fs::read_to_string(TRACE)
        .unwrap()
        .lines()
        .take(n)
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["input_length"]
                .as_u64()
                .unwrap()
        })
        .sum()
}

fn per_replica(v: &Value) -> BTreeMap<String, u64> {
    serde_json::from_value(v["per_replica"].clone()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_replay_completions_matches_server() {
    let fake = start_fake(Faults::default()).await;
    let v = run_load(&[
        "--trace", TRACE, "--target", &fake.url, "--n", "60", "--speed", "1000",
    ])
    .await;
    let s = fake.state.lock().unwrap();
    assert_eq!(v["requests"], 60);
    assert_eq!(v["errors"], 0);
    assert_eq!(s.requests, 60);
    assert_eq!(s.bad_shape, 0);
    assert_eq!(per_replica(&v), s.per_replica);
    // At 512 bytes per block the prompt has exactly one byte per trace token.
    assert_eq!(v["prompt_tokens"].as_u64().unwrap(), trace_input_tokens(60));
    assert_eq!(v["prompt_tokens"].as_u64().unwrap(), s.prompt_tokens);
    assert_eq!(v["cached_tokens"].as_u64().unwrap(), s.cached_tokens);
    assert_eq!(v["missing_usage"], 0);
    let hit = v["hit_ratio"].as_f64().unwrap();
    assert!((hit - s.cached_tokens as f64 / s.prompt_tokens as f64).abs() < 1e-12);
    // The fake's single global cache is the ideal cache up to partial-last-block effects and
    // arrival order, so the synthesized prompts must reproduce the trace's sharing.
    let ideal = v["ideal_hit_ratio"].as_f64().unwrap();
    assert!(
        ideal > 0.0 && (hit - ideal).abs() < 0.02,
        "hit {hit} vs ideal {ideal}"
    );
    let ttft = &v["ttft_ms"];
    assert!(ttft["p50"].as_f64().unwrap() > 0.0);
    assert!(ttft["p50"].as_f64().unwrap() <= ttft["p99"].as_f64().unwrap());
    assert!(v["e2e_ms"]["p99"].as_f64().unwrap() >= ttft["p99"].as_f64().unwrap());
    assert!(v["imbalance"].as_f64().unwrap() >= 1.0);
    assert!(v["achieved_rps"].as_f64().unwrap() > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_replay_chat_sends_sessions_and_system_prompt() {
    let fake = start_fake(Faults::default()).await;
    let v = run_load(&[
        "--trace", TRACE, "--target", &fake.url, "--n", "20", "--speed", "1000", "--chat",
    ])
    .await;
    let s = fake.state.lock().unwrap();
    assert_eq!(v["requests"], 20);
    assert_eq!(v["errors"], 0);
    assert_eq!(s.bad_shape, 0);
    assert_eq!(s.missing_session_header, 0);
    // Every one of the first 20 lines has at least two blocks, block 0 being the system prompt.
    assert!(
        s.first_roles.iter().all(|r| r == "system"),
        "{:?}",
        s.first_roles
    );
    assert_eq!(per_replica(&v), s.per_replica);
    assert_eq!(v["cached_tokens"].as_u64().unwrap(), s.cached_tokens);
    assert_eq!(v["prompt_tokens"].as_u64().unwrap(), s.prompt_tokens);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synthetic_shared_prefix_sends_turns_in_order_over_reused_connections() {
    let fake = start_fake(Faults::default()).await;
    let common = [
        "--synthetic",
        "shared-prefix",
        "--target",
        &fake.url,
        "--groups",
        "2",
        "--users",
        "3",
        "--turns",
        "3",
        "--system-bytes",
        "1024",
        "--question-bytes",
        "100",
        "--answer-bytes",
        "60",
        "--rate",
        "200",
        "--seed",
        "7",
        "--chat",
    ];
    let v = run_load(&common).await;
    let s = fake.state.lock().unwrap();
    assert_eq!(v["requests"], 18);
    assert_eq!(v["errors"], 0);
    assert_eq!(s.requests, 18);
    assert_eq!(s.bad_shape, 0);
    assert_eq!(per_replica(&v), s.per_replica);
    assert_eq!(v["cached_tokens"].as_u64().unwrap(), s.cached_tokens);
    assert!((v["target_rps"].as_f64().unwrap() - 600.0).abs() < 1e-9);
    // Six conversations, each seen as three turns whose history grows by answer + question.
    assert_eq!(s.sessions.len(), 6);
    for (id, lens) in &s.sessions {
        assert_eq!(lens, &vec![1124, 1284, 1444], "session {id}");
    }
    // Turns are closed-loop, so connections are reused across turns.
    assert!(
        s.connections < s.requests,
        "{} connections for {} requests",
        s.connections,
        s.requests
    );
    // Later turns repeat earlier ones and users share system prompts: plenty to hit.
    assert!(v["hit_ratio"].as_f64().unwrap() > 0.3);
    assert!(v["ideal_hit_ratio"].as_f64().unwrap() > 0.5);
}

/// Several targets (router instances sharing one fleet): every request goes to exactly one,
/// turns of one conversation are spread over them independently, and the summary counts
/// requests per target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_targets_split_requests_and_count_them() {
    let a = start_fake(Faults::default()).await;
    let b = start_fake(Faults::default()).await;
    let targets = format!("{},{}", a.url, b.url);
    let v = run_load(&[
        "--synthetic",
        "shared-prefix",
        "--target",
        &targets,
        "--groups",
        "4",
        "--users",
        "5",
        "--turns",
        "4",
        "--system-bytes",
        "512",
        "--rate",
        "400",
        "--chat",
    ])
    .await;
    let (sa, sb) = (a.state.lock().unwrap(), b.state.lock().unwrap());
    assert_eq!(v["requests"], 80);
    assert_eq!(v["errors"], 0);
    let per_target: Vec<u64> = v["per_target"]
        .as_array()
        .expect("per_target")
        .iter()
        .map(|n| n.as_u64().unwrap())
        .collect();
    assert_eq!(per_target, vec![sa.requests, sb.requests]);
    assert_eq!(sa.requests + sb.requests, 80);
    // 80 fair coin flips: each side well away from 0 and 80.
    assert!(
        (20..=60).contains(&sa.requests),
        "split {} / {}",
        sa.requests,
        sb.requests
    );
    // Conversations are not pinned to one target: most show up on both.
    let both = sa
        .sessions
        .keys()
        .filter(|id| sb.sessions.contains_key(*id))
        .count();
    assert!(
        both >= 10,
        "{both} of 20 conversations reached both targets"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_counted_by_kind() {
    let fake = start_fake(Faults {
        status_503_every: Some(4),
        truncate_every: Some(5),
        ..Faults::default()
    })
    .await;
    let v = run_load(&[
        "--trace", TRACE, "--target", &fake.url, "--n", "20", "--speed", "1000",
    ])
    .await;
    let s = fake.state.lock().unwrap();
    // Of 20: multiples of 4 → 5 × 503; multiples of 5 not of 4 → 5, 10, 15 → 3 cut streams.
    assert_eq!((s.status_503, s.truncated), (5, 3));
    assert_eq!(v["requests"], 20);
    assert_eq!(v["errors"], 8);
    assert_eq!(v["errors_by_kind"]["http_503"], 5);
    assert_eq!(v["errors_by_kind"]["truncated"], 3);
    // Failed requests still report the replica that failed them.
    assert_eq!(per_replica(&v), s.per_replica);
    assert_eq!(v["prompt_tokens"].as_u64().unwrap(), s.prompt_tokens);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failures_are_counted() {
    // Bind then drop to get a loopback port nothing listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let target = format!("http://127.0.0.1:{port}");
    let v = run_load(&[
        "--trace",
        TRACE,
        "--target",
        &target,
        "--n",
        "5",
        "--speed",
        "1000",
        "--timeout-s",
        "5",
    ])
    .await;
    assert_eq!(v["requests"], 5);
    assert_eq!(v["errors"], 5);
    assert_eq!(v["errors_by_kind"]["connect"], 5);
    assert_eq!(v["hit_ratio"], 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_is_open_loop_and_paced() {
    // Lines 0-9 are due at 0 ms, lines 10-25 at 3000 ms / 30 = 100 ms. Each answer takes 300 ms,
    // so an open-loop replayer has all 26 in flight at once, while anything that waits for
    // answers would send the second batch at least 300 ms late. The bound leaves room for a
    // loaded 2-core CI machine without letting a closed loop pass.
    let fake = start_fake(Faults {
        delay_ms: 300,
        ..Faults::default()
    })
    .await;
    let v = run_load(&[
        "--trace",
        TRACE,
        "--target",
        &fake.url,
        "--n",
        "26",
        "--speed",
        "30",
        "--lag-threshold-ms",
        "250",
    ])
    .await;
    assert_eq!(v["requests"], 26);
    assert_eq!(v["errors"], 0);
    assert!(v["max_lag_ms"].as_f64().unwrap() < 250.0, "{v}");
    assert_eq!(v["lagged_requests"], 0, "{v}");
    assert!((v["target_rps"].as_f64().unwrap() - 250.0).abs() < 1e-6);
    let duration = v["duration_s"].as_f64().unwrap();
    assert!((0.39..1.5).contains(&duration), "{v}");
    // TTFT counts from the scheduled time and includes the replica's 300 ms.
    assert!(v["ttft_ms"]["p50"].as_f64().unwrap() >= 300.0, "{v}");

    // With one request in flight at a time the schedule cannot be kept: the lag must show.
    let fake = start_fake(Faults {
        delay_ms: 100,
        ..Faults::default()
    })
    .await;
    let v = run_load(&[
        "--trace",
        TRACE,
        "--target",
        &fake.url,
        "--n",
        "10",
        "--speed",
        "30",
        "--concurrency-limit",
        "1",
    ])
    .await;
    assert_eq!(v["errors"], 0);
    // The 10th request waits for the 9 before it: about 900 ms late.
    assert!(v["max_lag_ms"].as_f64().unwrap() > 700.0, "{v}");
    assert!(v["lagged_requests"].as_u64().unwrap() >= 8, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_stops_early_with_a_summary() {
    // Lines 0-9 are due at once, line 10 only after 3 s: interrupt in between.
    let fake = start_fake(Faults::default()).await;
    let child = tokio::process::Command::new(workspace_bin("kvroute-load"))
        .args([
            "--trace", TRACE, "--target", &fake.url, "--n", "30", "--json",
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("kvroute-load did not stop within 10 s of SIGINT")
        .unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["stopped_early"], true);
    assert_eq!(v["requests"], 10);
    assert_eq!(v["errors"], 0);
    assert!(v["duration_s"].as_f64().unwrap() < 3.0, "{v}");
}

/// Throughput probe, not a CI check: `cargo test -p kvroute-tests --release --test e2e
/// -- --ignored --nocapture load_cli::throughput`. By default replays 2000 lines as fast as 64
/// connections allow; `LOAD_PROBE_ARGS="--n 4000 --speed 300"` replaces the workload flags.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn throughput() {
    let fake = start_fake(Faults::default()).await;
    let extra = std::env::var("LOAD_PROBE_ARGS")
        .unwrap_or_else(|_| "--n 2000 --speed 1000000 --concurrency-limit 64".to_owned());
    let mut args = vec!["--trace", TRACE, "--target", &fake.url];
    args.extend(extra.split_whitespace());
    let v = run_load(&args).await;
    eprintln!("{v:#}");
    assert_eq!(v["errors"], 0);
}

/// The library entry point the xtask benchmark uses, called in-process on a built plan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn library_run_in_process() {
    use kvroute_load::synthetic::{self, SharedPrefixConfig};
    use kvroute_load::{runner, ApiMode, LoadConfig, Workload};

    let fake = start_fake(Faults::default()).await;
    let sp = SharedPrefixConfig {
        groups: 1,
        users: 4,
        turns: 2,
        rate: 0.0,
        ..SharedPrefixConfig::default()
    };
    let plan = synthetic::plan(&sp);
    let mut cfg = LoadConfig::new(fake.url.clone(), Workload::SharedPrefix(sp));
    cfg.mode = ApiMode::Completions;
    cfg.request_timeout = Duration::from_secs(10);
    let summary = tokio::time::timeout(Duration::from_secs(30), runner::run_plan(&plan, &cfg))
        .await
        .expect("run finished in time")
        .unwrap();
    let s = fake.state.lock().unwrap();
    assert_eq!(summary.requests, 8);
    assert_eq!(summary.errors, 0);
    assert_eq!(summary.per_replica, s.per_replica);
    assert_eq!(summary.prompt_tokens, s.prompt_tokens);
    assert_eq!(summary.cached_tokens, s.cached_tokens);
    assert_eq!(summary.ideal_hit_ratio, plan.stats().ideal_hit_ratio);
}

/// Runs the binary with stderr piped (not a terminal), returning (parsed `--json`, stderr).
async fn run_load_with_stderr(args: &[&str], env: &[(&str, &str)]) -> (Value, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(workspace_bin("kvroute-load"))
            .args(args)
            .arg("--json")
            .envs(env.iter().copied())
            .env_remove("KVROUTE_PROGRESS")
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("kvroute-load did not finish in 60 s")
    .expect("spawn kvroute-load");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "kvroute-load failed: {stderr}\n{stdout}"
    );
    let v =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("bad json ({e}): {stdout}"));
    (v, stderr)
}

/// `sent`, `completed` and `errors` of a plain progress line.
fn progress_counts(line: &str) -> (u64, u64, u64) {
    let num = |key: &str| -> u64 {
        let rest = &line[line
            .find(key)
            .unwrap_or_else(|| panic!("no {key} in {line:?}"))
            + key.len()..];
        rest.trim_start()
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no number after {key} in {line:?}"))
    };
    (num("sent"), num("completed"), num("errors"))
}

/// With stderr not a terminal, progress comes as plain lines at the configured interval
/// (here 0.1 s from the environment), counted by the run itself while it goes, and a final
/// line with the whole run's counts; stdout carries the same JSON report as without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_is_plain_periodic_lines_when_stderr_is_not_a_terminal() {
    // Four conversations of three turns, all starting at once, each answer 250 ms: about 0.8 s.
    let fake = start_fake(Faults {
        delay_ms: 250,
        ..Faults::default()
    })
    .await;
    let args = [
        "--synthetic",
        "shared-prefix",
        "--target",
        &fake.url,
        "--groups",
        "1",
        "--users",
        "4",
        "--turns",
        "3",
        "--rate",
        "0",
        "--progress-label",
        "e2e",
    ];
    let (v, stderr) = run_load_with_stderr(&args, &[("KVROUTE_PROGRESS_INTERVAL_S", "0.1")]).await;
    assert_eq!(v["requests"], 12);
    assert_eq!(v["errors"], 0);
    assert!(
        !stderr.contains('\r'),
        "carriage return in piped progress: {stderr:?}"
    );
    let periodic: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("e2e: sent "))
        .collect();
    assert!(
        periodic.len() >= 3,
        "expected lines every 0.1 s over ~0.8 s:\n{stderr}"
    );
    let counts: Vec<(u64, u64, u64)> = periodic.iter().map(|l| progress_counts(l)).collect();
    // Live counts: seen part-way, never going back, never more finished than sent.
    assert!(counts.iter().any(|&(_, done, _)| done < 12), "{stderr}");
    assert!(
        counts
            .windows(2)
            .all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1),
        "{stderr}"
    );
    assert!(counts
        .iter()
        .all(|&(sent, done, err)| done + err <= sent && sent <= 12));
    for l in &periodic {
        assert!(
            l.contains("/12, completed") && l.contains(" elapsed"),
            "{l}"
        );
    }
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with("e2e: done in "), "{stderr}");
    assert_eq!(progress_counts(last), (12, 12, 0), "{last}");

    // `--progress off`: nothing on stderr at all; the report is unchanged.
    let mut quiet = args.to_vec();
    quiet.extend(["--progress", "off", "--progress-interval-s", "0.1"]);
    let (v2, stderr) = run_load_with_stderr(&quiet, &[]).await;
    assert_eq!(stderr, "");
    assert_eq!(v2["requests"], 12);
}

/// `--progress json` (what xtask reads from its `kvroute-load` child): one counters object a
/// line, the last of them equal to the report's counts, errors included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_progress_lines_carry_the_runs_counters() {
    use kvroute_load::progress::Snapshot;
    let fake = start_fake(Faults {
        status_503_every: Some(4),
        delay_ms: 150,
        ..Faults::default()
    })
    .await;
    let (v, stderr) = run_load_with_stderr(
        &[
            "--trace",
            TRACE,
            "--target",
            &fake.url,
            "--n",
            "30",
            "--speed",
            "10",
            "--progress",
            "json",
            "--progress-interval-s",
            "0.2",
        ],
        &[],
    )
    .await;
    let snaps: Vec<Snapshot> = stderr.lines().filter_map(Snapshot::from_wire).collect();
    assert!(snaps.len() >= 2, "{stderr}");
    let last = snaps.last().copied().unwrap_or_default();
    let requests = v["requests"].as_u64().unwrap();
    let errors = v["errors"].as_u64().unwrap();
    assert!(errors > 0, "{v}");
    assert_eq!(last.sent, requests, "{stderr}");
    assert_eq!(last.errors, errors, "{stderr}");
    assert_eq!(last.completed + last.errors, requests, "{stderr}");
}
