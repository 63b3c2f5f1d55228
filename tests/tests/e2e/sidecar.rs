//! Sidecar mode: one kvroute per GPU host, all with the same config (the same
//! replica list). New prefixes are placed by rendezvous hashing of their anchor
//! over the replica URLs, so independent instances agree without talking: the
//! same new prefix entering through any of them lands on the same replica.

use kvroute_tests::harness::{filler_text, free_port, post, sim_completion, Kvroute, Sim};

/// Deterministic filler text, distinct per seed (longer than the 1 KiB anchor).
fn text(seed: u64, bytes: usize) -> String {
    let mut s = format!("system prompt {seed}: ");
    s.push_str(&filler_text(seed, bytes));
    s.truncate(bytes);
    s
}

fn served_by(k: &Kvroute, body: &str) -> String {
    let r = post(k.addr, "/v1/completions", body).expect("request through kvroute");
    assert_eq!(r.status, 200, "{}", r.text());
    r.header("x-replica")
        .expect("x-replica from the sim")
        .to_string()
}

#[test]
fn three_instances_with_one_config_send_each_new_prefix_to_the_same_replica() {
    let sims: Vec<Sim> = (0..3).map(|i| Sim::start(&format!("r{i}"), &[])).collect();
    // One config file shared by the three instances, as config management would ship it.
    let dir = std::env::temp_dir().join(format!("kvroute-sidecar-{}", free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("kvroute.toml");
    let mut toml = String::from(
        "workers = 2\npin_workers = false\nsteering = \"kernel\"\n\n[routing]\npolicy = \"kv-aware\"\n",
    );
    for s in &sims {
        toml.push_str(&format!("\n[[replicas]]\nurl = \"http://{}\"\n", s.addr));
    }
    std::fs::write(&cfg, toml).unwrap();
    let cfg = cfg.display().to_string();
    let routers: Vec<Kvroute> = (0..3)
        .map(|_| Kvroute::start(&["--config", &cfg]))
        .collect();

    let mut placements = Vec::new();
    for p in 0..12u64 {
        let system = text(1000 + p, 3000);
        // Rotate which instance sees the prefix first, so "first" is never the same router.
        let order: Vec<usize> = (0..3).map(|i| (i + p as usize) % 3).collect();
        let first: Vec<String> = order
            .iter()
            .map(|&i| served_by(&routers[i], &sim_completion(&system, &format!("q{p}-{i}"))))
            .collect();
        assert!(
            first.iter().all(|r| *r == first[0]),
            "prefix {p}: instances {order:?} sent it to {first:?}"
        );
        // A second round, now that each instance has indexed it, stays there too.
        for (i, k) in routers.iter().enumerate() {
            let again = served_by(k, &sim_completion(&system, &format!("again{p}-{i}")));
            assert_eq!(again, first[0], "prefix {p}, instance {i}, second request");
        }
        placements.push(first[0].clone());
    }
    // Agreement must come from hashing, not from everything landing on one replica.
    let mut distinct = placements.clone();
    distinct.sort();
    distinct.dedup();
    assert!(
        distinct.len() >= 2,
        "12 prefixes all on {distinct:?}: placement is not spreading"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Multi-turn conversations, each turn entering through a different instance;
/// returns the replicas' cached share of all prompt tokens (from `usage`).
fn conversations_hit_ratio(instances: usize) -> f64 {
    let sims: Vec<Sim> = (0..3).map(|i| Sim::start(&format!("r{i}"), &[])).collect();
    let replicas: Vec<String> = sims.iter().map(|s| format!("http://{}", s.addr)).collect();
    let mut args = vec!["--workers", "1", "--steering", "kernel"];
    for r in &replicas {
        args.push("--replica");
        args.push(r);
    }
    let routers: Vec<Kvroute> = (0..instances).map(|_| Kvroute::start(&args)).collect();
    let (mut cached, mut prompt) = (0u64, 0u64);
    for c in 0..8u64 {
        let mut history = text(5000 + c, 2000);
        for t in 0..4usize {
            history.push_str(&format!(
                "\n\nUser: question {t} of conversation {c}\nAssistant:"
            ));
            let k = &routers[(c as usize + t) % instances];
            let r = post(k.addr, "/v1/completions", &sim_completion(&history, "")).unwrap();
            assert_eq!(r.status, 200, "{}", r.text());
            let u = &r.json()["usage"];
            cached += u["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap_or(0);
            prompt += u["prompt_tokens"].as_u64().unwrap_or(0);
            history.push_str(&format!(" answer {t} {}", text(c * 10 + t as u64, 200)));
        }
    }
    cached as f64 / prompt.max(1) as f64
}

/// The fleet-level point of sidecar mode: spreading one conversation's turns over
/// three independent instances loses (almost) no KV-cache hits against one instance.
#[test]
fn three_instances_keep_the_hit_ratio_of_one() {
    let one = conversations_hit_ratio(1);
    let three = conversations_hit_ratio(3);
    eprintln!("cached share of prompt tokens: one instance {one:.3}, three instances {three:.3}");
    assert!(one > 0.5, "the workload must be cache-friendly: {one:.3}");
    assert!(
        three >= one * 0.95,
        "three instances {three:.3} vs one {one:.3}: instances do not agree"
    );
}
