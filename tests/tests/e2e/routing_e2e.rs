//! KV-aware routing end to end: real `kvroute`, real `kvroute-sim` replicas,
//! real `kvroute-load`, checked from the client's side.

use std::process::Command;

use kvroute_tests::harness::{
    filler_text, post, sim_completion, workspace_bin, Client, Kvroute, Sim,
};

fn kvroute(policy: &str, sims: &[&Sim]) -> Kvroute {
    let mut args = vec![
        "--policy".to_string(),
        policy.to_string(),
        "--workers".into(),
        "2".into(),
    ];
    for s in sims {
        args.push("--replica".into());
        args.push(s.url());
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Kvroute::start(&refs)
}

#[test]
fn shared_system_prompt_lands_on_one_replica() {
    let sims: Vec<Sim> = (0..3).map(|i| Sim::start(&format!("r{i}"), &[])).collect();
    let k = kvroute("kv-aware", &sims.iter().collect::<Vec<_>>());
    for (g, system) in [filler_text(1, 3000), filler_text(2, 3000)]
        .iter()
        .enumerate()
    {
        let mut served = Vec::new();
        for q in 0..8 {
            let r = post(
                k.addr,
                "/v1/completions",
                &sim_completion(system, &format!("user {q} asks {g}")),
            )
            .unwrap();
            assert_eq!(r.status, 200, "{}", r.text());
            served.push(r.header("x-replica").unwrap().to_string());
        }
        assert!(
            served.iter().all(|s| *s == served[0]),
            "group {g} spread: {served:?}"
        );
        // The replica reports the shared prefix as cached from the second request on.
        let r = post(
            k.addr,
            "/v1/completions",
            &sim_completion(system, "one more"),
        )
        .unwrap();
        let cached = r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap();
        assert!(cached >= 500, "cached_tokens {cached}");
    }
    let m = k.admin_get("/metrics").text();
    assert!(
        m.contains("kvroute_routing_decisions_total{kind=\"prefix\"}"),
        "{m}"
    );
    // The index's accuracy is visible: predicted hits the replicas confirmed.
    let hit_hit = m
        .lines()
        .find(|l| l.starts_with("kvroute_prefix_prediction_total{outcome=\"hit_hit\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(hit_hit >= 14.0, "confirmed predictions {hit_hit}: {m}");
    // The admin API lists the hot prefixes with a replayable sample request, which
    // the control daemon uses to pre-warm a standby.
    let hot = k.admin_get("/hot-prefixes?limit=4").json();
    let top = &hot["prefixes"][0];
    assert!(top["hits"].as_u64().unwrap() >= 8, "{hot}");
    assert_eq!(top["path"], "/v1/completions");
    let sample: serde_json::Value =
        serde_json::from_str(top["sample_body"].as_str().unwrap()).unwrap();
    let prompt = sample["prompt"].as_str().unwrap();
    assert!(
        prompt.starts_with(&filler_text(1, 3000)) || prompt.starts_with(&filler_text(2, 3000)),
        "sample is not one of the shared prompts"
    );
    for name in [
        "kvroute_index_blocks ",
        "kvroute_index_bytes ",
        "kvroute_index_replica_blocks{",
        "kvroute_prefix_cached_ratio_bucket{",
        "kvroute_routing_regret_ratio_bucket{",
        "kvroute_prefix_predicted_ratio_bucket{",
    ] {
        assert!(m.contains(name), "{name} missing");
    }
}

#[test]
fn conversation_sticks_and_moves_when_its_replica_dies() {
    let mut sims: Vec<Sim> = (0..3).map(|i| Sim::start(&format!("r{i}"), &[])).collect();
    let k = kvroute("kv-aware", &sims.iter().collect::<Vec<_>>());
    let mut c = Client::connect(k.addr).unwrap();
    let mut messages = vec![serde_json::json!({"role": "system", "content": filler_text(7, 1500)})];
    let turn = |c: &mut Client, messages: &mut Vec<serde_json::Value>, i: usize| -> (u16, String) {
        messages.push(serde_json::json!({"role": "user", "content": format!("turn {i}: {}", filler_text(100 + i as u64, 200))}));
        let body = serde_json::json!({"model": "sim-model", "messages": messages, "max_tokens": 2})
            .to_string();
        c.send(
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nx-session-id: conv-42\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .unwrap();
        let r = c.read_response(false).unwrap();
        messages.push(serde_json::json!({"role": "assistant", "content": "ok"}));
        (r.status, r.header("x-replica").unwrap_or("").to_string())
    };
    let (status, first) = turn(&mut c, &mut messages, 0);
    assert_eq!(status, 200);
    for i in 1..5 {
        assert_eq!(
            turn(&mut c, &mut messages, i),
            (200, first.clone()),
            "turn {i} moved"
        );
    }
    // Kill the conversation's replica: the next turn must still succeed, elsewhere,
    // and the conversation then stays on its new replica.
    let idx = sims.iter().position(|s| s.name == first).unwrap();
    let dead = sims.remove(idx);
    drop(dead.proc);
    let (status, moved) = turn(&mut c, &mut messages, 5);
    assert_eq!(status, 200);
    assert_ne!(moved, first);
    for i in 6..9 {
        assert_eq!(
            turn(&mut c, &mut messages, i),
            (200, moved.clone()),
            "turn {i} after the move"
        );
    }
}

/// `kvroute-load` through `kvroute` against 2 sims on a shared-prefix workload:
/// no errors, and kv-aware beats round-robin's hit ratio.
#[test]
fn load_smoke_kv_aware_beats_round_robin() {
    let run = |policy: &str| -> serde_json::Value {
        // Small caches so round-robin's duplicated prefixes cost it real hits.
        let sims: Vec<Sim> = (0..2)
            .map(|i| Sim::start(&format!("r{i}"), &["--kv-blocks", "400"]))
            .collect();
        let k = kvroute(policy, &sims.iter().collect::<Vec<_>>());
        let out = Command::new(workspace_bin("kvroute-load"))
            .args([
                "--synthetic",
                "shared-prefix",
                "--groups",
                "6",
                "--users",
                "6",
                "--turns",
                "3",
                "--system-bytes",
                "4096",
                "--rate",
                "40",
                "--json",
                "--target",
                &format!("http://{}", k.addr),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let rr = run("round-robin");
    let kv = run("kv-aware");
    for s in [&rr, &kv] {
        assert_eq!(s["errors"], 0, "{s}");
        assert!(s["requests"].as_u64().unwrap() >= 100, "{s}");
    }
    let (h_rr, h_kv) = (
        rr["hit_ratio"].as_f64().unwrap(),
        kv["hit_ratio"].as_f64().unwrap(),
    );
    eprintln!("hit ratio: round-robin {h_rr:.3}, kv-aware {h_kv:.3}");
    assert!(h_kv > h_rr, "kv-aware {h_kv} not above round-robin {h_rr}");
}

/// The queued prefill the kv-aware score weighs is real bookkeeping: a prompt the
/// replica does not hold counts against it from routing until its first output
/// byte, not while it decodes, and nothing is left over once the request ends.
#[test]
fn queued_prefill_is_counted_until_the_first_output_byte() {
    // 2,000 tokens/s of prefill and 5 tokens/s of decode at real time: a 12 KB
    // (3,000-token) prompt prefills for 1.5 s, then streams 8 tokens over 1.6 s.
    let sim = Sim::start(
        "r0",
        &[
            "--time-scale",
            "1",
            "--prefill-tps",
            "2000",
            "--decode-tps",
            "5",
        ],
    );
    let k = kvroute("kv-aware", &[&sim]);
    let prompt = filler_text(7, 12_000);
    let body = serde_json::json!({
        "model": "sim-model", "prompt": prompt, "max_tokens": 8, "stream": true
    })
    .to_string();
    let addr = k.addr;
    let client = std::thread::spawn(move || post(addr, "/v1/completions", &body).unwrap());
    let replica = |k: &Kvroute| k.admin_get("/state").json()["replicas"][0].clone();
    let limit = std::time::Duration::from_secs(10);
    let mut queued = 0;
    assert!(
        kvroute_tests::harness::wait_until(limit, || {
            queued = replica(&k)["pending_prefill_bytes"].as_u64().unwrap();
            queued > 0
        }),
        "the prompt never showed up as queued prefill"
    );
    // Nothing cached yet: the whole prompt, give or take the JSON around it.
    assert!((11_900..=12_100).contains(&queued), "queued {queued}");
    let m = k.admin_get("/metrics").text();
    assert!(
        m.contains("kvroute_replica_pending_prefill_bytes{"),
        "gauge missing: {m}"
    );
    // Prefill done, decode going: still in flight, no longer queued.
    assert!(
        kvroute_tests::harness::wait_until(limit, || {
            let r = replica(&k);
            r["pending_prefill_bytes"] == 0 && r["in_flight"] == 1
        }),
        "queued prefill not released at the first output byte: {}",
        replica(&k)
    );
    let r = client.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("[DONE]"));
    // The proxy takes the request off its books right after relaying the last byte.
    assert!(
        kvroute_tests::harness::wait_until(limit, || {
            let r = replica(&k);
            r["pending_prefill_bytes"] == 0 && r["in_flight"] == 0
        }),
        "request left on the books: {}",
        replica(&k)
    );
}

/// kv-aware learns each replica's prefill speed from its streamed first tokens:
/// of two replicas that differ 4x in prefill speed, `/state` and `/metrics`
/// show the slow one's learned rate well under the fast one's, and each
/// decision's prediction is checked against what came back.
#[test]
fn prefill_speed_is_learned_per_replica() {
    let sim = |model: &str, tps: &str| {
        Sim::start(
            model,
            &[
                "--model",
                model,
                "--time-scale",
                "1",
                "--prefill-tps",
                tps,
                "--decode-tps",
                "1000",
            ],
        )
    };
    let (fast, slow) = (sim("fast", "40000"), sim("slow", "10000"));
    let k = Kvroute::start(&[
        "--policy",
        "kv-aware",
        "--workers",
        "1",
        "--replica",
        &format!("{}=fast", fast.url()),
        "--replica",
        &format!("{}=slow", slow.url()),
    ]);
    for i in 0..10usize {
        for model in ["fast", "slow"] {
            // 2–20 KB prompts (500–5,000 tokens), each new to the replica.
            let prompt = filler_text(100 + i as u64, 2_000 * (i + 1));
            let body = serde_json::json!({
                "model": model, "prompt": format!("{model} {i} {prompt}"), "max_tokens": 2,
                "stream": true, "stream_options": {"include_usage": true}
            })
            .to_string();
            let r = post(k.addr, "/v1/completions", &body).unwrap();
            assert_eq!(r.status, 200, "{}", r.text());
        }
    }
    let state = k.admin_get("/state").json();
    let rate = |url: String| {
        let r = state["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["url"] == url.as_str())
            .unwrap()
            .clone();
        r["learned"]["prefill_bytes_per_s"]
            .as_f64()
            .unwrap_or_else(|| panic!("nothing learned: {r}"))
    };
    let (f, s) = (rate(fast.url()), rate(slow.url()));
    assert!(f > 2.0 * s, "fast {f} B/s, slow {s} B/s");
    let m = k.admin_get("/metrics").text();
    for name in [
        "kvroute_replica_prefill_rate_bytes_per_second{",
        "kvroute_ttft_prediction_ratio_count{",
        "kvroute_bytes_per_token ",
    ] {
        assert!(m.contains(name), "{name} missing from /metrics");
    }
}
