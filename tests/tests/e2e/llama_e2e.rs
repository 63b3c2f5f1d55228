//! kvroute in front of two real llama.cpp replicas (`llama-server` on the random-weight test
//! model), checked from the client's side and against what the replicas themselves count.
//!
//! The server and model come from `cargo xtask llama`; `cargo xtask test` passes their paths in
//! `KVROUTE_LLAMA_SERVER` and `KVROUTE_LLAMA_MODEL`. Without them each test prints why it skips,
//! unless `KVROUTE_REQUIRE_LLAMA` is set (CI), where that is a failure. Each replica answers as
//! its own model alias (`r0`, `r1`), so a response's `model` says which replica produced it.

use std::time::{Duration, Instant};

use kvroute::admin::{ReplicaState, State};
use kvroute_testkit::metrics_text::Samples;
use kvroute_tests::harness::{filler_text, free_port, request, wait_until, Client, Kvroute, Proc};
use kvroute_tests::llama::{paths_or_skip, stream_usage, LlamaPaths, LlamaServer};
use serde_json::{json, Value};

fn two_replicas(paths: &LlamaPaths) -> [LlamaServer; 2] {
    [
        LlamaServer::start(paths, "r0", &[]),
        LlamaServer::start(paths, "r1", &[]),
    ]
}

fn kvroute_over(replicas: &[LlamaServer]) -> Kvroute {
    let mut args = vec!["--policy".to_string(), "kv-aware".into()];
    args.extend(["--workers".into(), "1".into()]);
    for r in replicas {
        args.extend(["--replica".into(), r.url()]);
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Kvroute::start(&refs)
}

/// `POST /v1/chat/completions` with `body` on `c`, with an `x-session-id` when given.
fn send_chat(c: &mut Client, body: &Value, session: Option<&str>) {
    let body = body.to_string();
    let session = session.map_or(String::new(), |s| format!("x-session-id: {s}\r\n"));
    c.send(
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: kvroute\r\nContent-Type: application/json\r\n\
             {session}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .expect("send");
}

/// A non-streaming chat: (which replica answered, prompt tokens, cached tokens).
fn chat(c: &mut Client, messages: &[Value], session: Option<&str>) -> (String, u64, u64) {
    send_chat(
        c,
        &json!({"model": "test", "messages": messages, "max_tokens": 2}),
        session,
    );
    let r = c.read_response(false).expect("response");
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let usage = &v["usage"];
    (
        v["model"].as_str().expect("model").to_owned(),
        usage["prompt_tokens"].as_u64().expect("prompt_tokens"),
        usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .expect("cached_tokens"),
    )
}

fn system(text: String) -> Value {
    json!({"role": "system", "content": text})
}

fn user(text: String) -> Value {
    json!({"role": "user", "content": text})
}

/// The sum of a Prometheus series (`name` or `name{labels}`) over the label sets that
/// have the labels given.
fn metric_sum(page: &str, series: &str) -> f64 {
    Samples::parse(page).series_sum(series)
}

/// Which of `replicas` answers as `name`.
fn index_of(replicas: &[LlamaServer], name: &str) -> usize {
    replicas
        .iter()
        .position(|r| r.name == name)
        .unwrap_or_else(|| panic!("no replica answers as {name}"))
}

#[test]
fn shared_system_prompt_lands_on_one_replica_which_reports_it_cached() {
    let Some(paths) = paths_or_skip() else { return };
    let replicas = two_replicas(&paths);
    let k = kvroute_over(&replicas);
    let before = replicas.each_ref().map(LlamaServer::counters);
    let mut c = Client::connect(k.addr).unwrap();
    let prompt = filler_text(1, 3000);
    let mut served = Vec::new();
    for q in 0..5 {
        let messages = [
            system(prompt.clone()),
            user(format!("question {q}: {}", filler_text(100 + q, 150))),
        ];
        served.push(chat(&mut c, &messages, None));
    }
    let home = served[0].0.clone();
    assert!(
        served.iter().all(|(r, ..)| *r == home),
        "the shared prompt spread over replicas: {served:?}"
    );
    // From the second request on, the replica holding the system prompt reuses it.
    let first_prompt = served[0].1;
    assert!(first_prompt > 300, "{served:?}");
    for (_, prompt_tokens, cached) in &served[1..] {
        assert!(
            *cached * 10 >= first_prompt * 8 && cached < prompt_tokens,
            "a later request reused only {cached} of the ~{first_prompt}-token prefix: {served:?}"
        );
    }
    // The replicas' own counters agree: everything went to one, which counted the reuse.
    let h = index_of(&replicas, &home);
    let used = replicas[h].counters().since(&before[h]);
    let reported: u64 = served.iter().map(|(_, _, c)| c).sum();
    assert_eq!(
        used.cached, reported,
        "{used:?} vs the responses' {served:?}"
    );
    let idle = replicas[1 - h].counters().since(&before[1 - h]);
    assert_eq!(
        idle.prompt(),
        0,
        "{} was sent prompt tokens",
        replicas[1 - h].name
    );
    // kvroute predicted those hits and the replica's usage confirmed them.
    let m = k.admin_get("/metrics").text();
    let confirmed = metric_sum(&m, "kvroute_prefix_prediction_total{outcome=\"hit_hit\"}");
    assert!(confirmed >= 4.0, "confirmed predictions {confirmed}:\n{m}");
}

#[test]
fn a_conversations_second_turn_hits_on_its_first_turns_replica() {
    let Some(paths) = paths_or_skip() else { return };
    let replicas = two_replicas(&paths);
    let k = kvroute_over(&replicas);
    let mut c = Client::connect(k.addr).unwrap();
    // Three conversations, interleaved: their second turns do not come back in the order
    // their first turns went out, so only routing that follows the conversation hits.
    let mut conversations: Vec<Vec<Value>> = (0..3)
        .map(|i| {
            vec![
                system(filler_text(10 + i, 2000)),
                user(format!("first question of conversation {i}")),
            ]
        })
        .collect();
    let mut first = Vec::new();
    for (i, messages) in conversations.iter_mut().enumerate() {
        let (r, prompt_tokens, _) = chat(&mut c, messages, Some(&format!("conv-{i}")));
        messages.push(json!({"role": "assistant", "content": "noted"}));
        messages.push(user(format!(
            "second question of conversation {i}: {}",
            filler_text(20 + i as u64, 200)
        )));
        first.push((r, prompt_tokens));
    }
    for (i, messages) in conversations.iter().enumerate().rev() {
        let (r, prompt_tokens, cached) = chat(&mut c, messages, Some(&format!("conv-{i}")));
        let (home, first_prompt) = &first[i];
        assert_eq!(
            &r, home,
            "conversation {i}'s second turn went to {r}, its first to {home}"
        );
        assert!(
            cached * 10 >= first_prompt * 9 && cached < prompt_tokens,
            "conversation {i}'s second turn reused {cached} of its first turn's {first_prompt} tokens"
        );
    }
}

#[test]
fn streaming_chat_usage_is_passed_through_and_learned_from() {
    let Some(paths) = paths_or_skip() else { return };
    let replicas = two_replicas(&paths);
    let k = kvroute_over(&replicas);
    let prompt = filler_text(3, 3000);
    let mut reported = Vec::new();
    for q in 0..3 {
        let body = json!({
            "model": "test",
            "messages": [system(prompt.clone()), user(format!("streamed question {q}"))],
            "max_tokens": 8,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        let mut c = Client::connect(k.addr).unwrap();
        send_chat(&mut c, &body, None);
        let r = c.read_response(false).unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(
            r.header("content-type")
                .is_some_and(|t| t.starts_with("text/event-stream")),
            "{:?}",
            r.headers
        );
        let text = r.text();
        assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
        // The usage travels as its own chunk with no choices, as OpenAI sends it.
        let usage_chunk = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .find(|v| v["usage"].is_object())
            .unwrap_or_else(|| panic!("no usage chunk in {text}"));
        assert_eq!(usage_chunk["choices"], json!([]), "{usage_chunk}");
        let usage = stream_usage(&text).unwrap();
        reported.push((
            usage["prompt_tokens"].as_u64().unwrap(),
            usage["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap(),
        ));
    }
    let (first_prompt, _) = reported[0];
    for (_, cached) in &reported[1..] {
        assert!(
            cached * 10 >= first_prompt * 8,
            "streamed repeats reused too little: {reported:?}"
        );
    }
    // kvroute read each stream's usage: what it recorded as cached is what the replica said.
    // It records a stream's usage once the stream is through, so the last one may land just
    // after the client has read it.
    let said: u64 = reported.iter().map(|(_, c)| c).sum();
    let mut m = String::new();
    let learned_all = wait_until(Duration::from_secs(5), || {
        m = k.admin_get("/metrics").text();
        metric_sum(&m, "kvroute_prefix_cached_tokens_sum") == said as f64
            && metric_sum(&m, "kvroute_prefix_cached_tokens_count") == reported.len() as f64
    });
    assert!(
        learned_all,
        "the streams reported {reported:?}; kvroute:\n{m}"
    );
    let confirmed = metric_sum(&m, "kvroute_prefix_prediction_total{outcome=\"hit_hit\"}");
    assert!(confirmed >= 2.0, "confirmed predictions {confirmed}:\n{m}");
}

#[test]
fn a_replica_killed_mid_stream_ends_the_stream_and_the_next_request_goes_elsewhere() {
    let Some(paths) = paths_or_skip() else { return };
    let replicas = two_replicas(&paths);
    let k = kvroute_over(&replicas);
    let messages = [
        system(filler_text(4, 1500)),
        user("tell a long story".into()),
    ];
    // Long enough to be killed mid-way: generation runs until the slot's context is full.
    let body = json!({
        "model": "test",
        "messages": messages,
        "max_tokens": 1500,
        "ignore_eos": true,
        "stream": true,
    });
    let mut c = Client::connect(k.addr).unwrap();
    send_chat(&mut c, &body, None);
    let (status, _) = c.read_head().unwrap();
    assert_eq!(status, 200);
    let mut streamed = String::new();
    let serving = loop {
        let chunk = c
            .read_chunk()
            .unwrap()
            .expect("the stream ended before a token");
        streamed.push_str(&String::from_utf8_lossy(&chunk));
        let model = streamed
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .find_map(|v| v["model"].as_str().map(str::to_owned));
        if let Some(m) = model {
            break m;
        }
    };
    replicas[index_of(&replicas, &serving)].proc.signal("KILL");
    // The client's stream ends (the terminating chunk, then the connection closes) instead of
    // hanging on a replica that is gone.
    let t = Instant::now();
    while c
        .read_chunk()
        .expect("stream cut without its terminating chunk")
        .is_some()
    {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the stream still runs after its replica was killed"
        );
    }
    assert!(
        c.peer_closed(),
        "the connection stays open after a broken stream"
    );
    let m = k.admin_get("/metrics").text();
    assert!(
        m.contains("kvroute_errors_total{kind=\"upstream_midstream\"} 1"),
        "{m}"
    );
    // The same prompt again: its prefix is on the dead replica, so this request tests that
    // kvroute goes elsewhere rather than to the best-matching replica.
    let mut c = Client::connect(k.addr).unwrap();
    let (r, ..) = chat(&mut c, &messages, None);
    assert_ne!(r, serving, "the next request went to the killed replica");
}

/// `kvroute-control` in front of the data plane, engine detection left to it (`auto`): it
/// recognises both replicas as llama.cpp, pushes their slot shape (4 slots of 2,048 tokens,
/// from `/props`) into the data plane's index, and their load (`llamacpp:requests_processing`
/// and `requests_deferred`) into its routing.
#[test]
fn the_control_daemon_pushes_the_real_engines_load_and_slot_shape() {
    let Some(paths) = paths_or_skip() else { return };
    let replicas = two_replicas(&paths);
    let dp = Kvroute::start(&["--workers", "1"]);
    let dir = std::env::temp_dir().join(format!(
        "kvroute-llama-control-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let mut config = format!(
        "dataplanes = [\"{}\"]\nlisten = \"{listen}\"\nname = \"ctl-llama\"\n\
         [health]\ninterval_ms = 100\ntimeout_ms = 1000\nrise = 2\nfall = 2\n\
         [scrape]\ninterval_ms = 100\ntimeout_ms = 1000\n[push]\nresync_ms = 100\n",
        dp.admin
    );
    for r in &replicas {
        config.push_str(&format!("[[replicas]]\nurl = \"{}\"\n", r.url()));
    }
    let config_path = dir.join("control.toml");
    std::fs::write(&config_path, config).unwrap();
    let _ctl = Proc::spawn(
        "kvroute-control",
        &["--config".to_string(), config_path.display().to_string()],
    );
    let state = |url: &str| -> Option<ReplicaState> {
        let r = dp.admin_get("/state");
        let s: State = serde_json::from_slice(&r.body).ok()?;
        s.replicas.into_iter().find(|r| r.url == url)
    };
    // 8,192 context tokens over 4 slots; the host cache defaults to the slots' total.
    let shaped = |r: &ReplicaState| {
        r.healthy
            && r.kv_slots == Some(4)
            && r.kv_slot_tokens == Some(2048)
            && r.kv_host_tokens == Some(8192)
            && r.kv_blocks == Some(2 * 8192)
            && r.kv_block_tokens == Some(1)
    };
    for r in &replicas {
        assert!(
            wait_until(Duration::from_secs(15), || state(&r.url())
                .is_some_and(|s| shaped(&s))),
            "{}'s slot shape not pushed: {:?}",
            r.name,
            state(&r.url())
        );
    }
    let status = request(
        listen.parse().unwrap(),
        "GET /status HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n",
    )
    .unwrap()
    .json();
    for r in &replicas {
        let engine = status["replicas"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["url"] == r.url()))
            .map(|x| x["detected_engine"].clone());
        assert_eq!(engine, Some(json!("llamacpp")), "{status}");
    }
    // Six long generations straight to r0: its four slots run four, two wait.
    let busy = &replicas[0];
    let body = json!({
        "messages": [user("count slowly".into())],
        "max_tokens": 1500,
        "ignore_eos": true,
        "stream": true,
    });
    let streams: Vec<Client> = (0..6)
        .map(|_| {
            let mut c = Client::connect(busy.addr).unwrap();
            send_chat(&mut c, &body, None);
            c
        })
        .collect();
    let loaded = wait_until(Duration::from_secs(15), || {
        state(&busy.url())
            .is_some_and(|s| s.external_load.running == 4 && s.external_load.waiting == 2)
    });
    assert!(
        loaded,
        "r0's load not pushed: {:?}",
        state(&busy.url()).map(|s| s.external_load)
    );
    assert!(state(&replicas[1].url()).is_some_and(|s| s.external_load.running == 0));
    // The clients go away; llama-server cancels their generations and the load drains.
    drop(streams);
    assert!(
        wait_until(Duration::from_secs(15), || state(&busy.url()).is_some_and(
            |s| s.external_load.running == 0 && s.external_load.waiting == 0
        )),
        "r0's load did not drain: {:?}",
        state(&busy.url()).map(|s| s.external_load)
    );
    // The pushed replicas serve through the data plane.
    let mut c = Client::connect(dp.addr).unwrap();
    let (r, ..) = chat(&mut c, &[user("hello".into())], None);
    assert!(r == "r0" || r == "r1", "{r}");
    let _ = std::fs::remove_dir_all(&dir);
}
