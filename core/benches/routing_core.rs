//! The routing core's per-request cost: extraction + hashing + index lookup, next
//! to a `memcpy` of the same bytes, the kv-aware router's decision on a warm fleet,
//! plus the extraction and hashing alternatives that were measured to choose the
//! implementation.
//!
//! `cargo bench -p kvroute-core --bench routing_core -- --measurement-time 2 --warm-up-time 1`
// The bench times itself: the clock clippy.toml bans in the core is its tool.
#![allow(clippy::disallowed_methods)]

use std::hint::black_box;

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use kvroute_core::index::{IndexConfig, PrefixIndex};
use kvroute_core::prefix::{
    analyze, chain_hashes, fold_block_hash, scan_portable, BlockHasher, PrefixConfig,
};
use kvroute_core::prompt::{extract, Endpoint, ITEM_SEPARATOR, ROLE_SEPARATOR};
use kvroute_core::replica::{ReplicaSet, ReplicaSpec, ReplicaTable};
use kvroute_core::route::{PolicyKind, Router, RoutingConfig};
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

const SIZES: [(usize, &str); 5] = [
    (1 << 10, "1KiB"),
    (4 << 10, "4KiB"),
    (32 << 10, "32KiB"),
    (128 << 10, "128KiB"),
    (512 << 10, "512KiB"),
];

/// The bench's one pseudo-random step (xorshift64): text, filler hashes.
fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Prose with what real prompts carry: newlines (escaped), quotes, non-ASCII.
fn text(len: usize, seed: u64) -> String {
    let words = [
        "the",
        "replica",
        "cache",
        "prefix",
        "tokens",
        "router",
        "é",
        "naïve",
        "\\\"quoted\\\"",
        "memory",
        "block",
        "request",
        "schedule",
        "latency",
        "warm",
        "model",
        "日本",
    ];
    let mut out = String::with_capacity(len + 16);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut line = 0;
    while out.len() < len {
        let w = words[(xorshift(&mut x) % words.len() as u64) as usize];
        out.push_str(w);
        line += w.len() + 1;
        if line > 80 {
            out.push_str("\\n");
            line = 0;
        } else {
            out.push(' ');
        }
    }
    out
}

type BodyMaker = fn(usize) -> Vec<u8>;

fn completions_body(size: usize) -> Vec<u8> {
    let head = r#"{"model":"meta-llama/Llama-3.1-8B-Instruct","stream":true,"max_tokens":256,"temperature":0.7,"prompt":""#;
    let tail = r#"","user":"bench"}"#;
    let prompt = text(size.saturating_sub(head.len() + tail.len()), 1);
    format!("{head}{prompt}{tail}").into_bytes()
}

/// A system prompt of ~40% then user/assistant turns of ~1 KiB.
fn chat_body(size: usize) -> Vec<u8> {
    let mut msgs = vec![format!(
        r#"{{"role":"system","content":"{}"}}"#,
        text(size * 2 / 5, 2)
    )];
    let mut used = msgs[0].len() + 120;
    let mut i = 0;
    while used < size {
        let role = if i % 2 == 0 { "user" } else { "assistant" };
        let m = format!(
            r#"{{"role":"{role}","content":"{}"}}"#,
            text((size - used).clamp(16, 1024), 3 + i)
        );
        used += m.len() + 1;
        msgs.push(m);
        i += 1;
    }
    format!(
        r#"{{"model":"meta-llama/Llama-3.1-8B-Instruct","messages":[{}],"stream":true,"stream_options":{{"include_usage":true}}}}"#,
        msgs.join(",")
    )
    .into_bytes()
}

/// The same extraction through sonic-rs's lazy, immutable-input iterators.
fn extract_sonic(body: &[u8], hasher: &mut BlockHasher) -> Option<bool> {
    use sonic_rs::JsonValueTrait;
    let mut stream = false;
    for kv in sonic_rs::to_object_iter(body) {
        let (k, v) = kv.ok()?;
        match &*k {
            "model" | "user" => {
                black_box(v.as_raw_str());
            }
            "stream" => stream = v.as_bool()?,
            "prompt" => {
                let raw = v.as_raw_str().as_bytes();
                hasher.feed(&raw[1..raw.len() - 1]);
            }
            "messages" => {
                for m in v.into_array_iter()? {
                    for kv in m.ok()?.into_object_iter()? {
                        let (k, v) = kv.ok()?;
                        let raw = v.as_raw_str().as_bytes();
                        if v.is_str() {
                            hasher.feed(&raw[1..raw.len() - 1]);
                            hasher.feed(if k == "role" {
                                ROLE_SEPARATOR
                            } else {
                                ITEM_SEPARATOR
                            });
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Some(stream)
}

/// The same through simd-json, which parses in place: the body must be copied
/// first so the original can still be forwarded. Strings come back unescaped.
fn extract_simd_json(body: &[u8], scratch: &mut Vec<u8>, hasher: &mut BlockHasher) -> Option<bool> {
    use simd_json::prelude::*;
    scratch.clear();
    scratch.extend_from_slice(body);
    let v = simd_json::to_borrowed_value(scratch).ok()?;
    black_box(v.get_str("model"));
    if let Some(p) = v.get_str("prompt") {
        hasher.feed(p.as_bytes());
    }
    if let Some(msgs) = v.get_array("messages") {
        for m in msgs {
            hasher.feed(m.get_str("role")?.as_bytes());
            hasher.feed(ROLE_SEPARATOR);
            hasher.feed(m.get_str("content")?.as_bytes());
            hasher.feed(ITEM_SEPARATOR);
        }
    }
    v.get_bool("stream")
}

/// A chain over 128-byte blocks as a bare loop: `step(prev, block)` gives
/// the next hash. The hashing bench's alternatives to `chain_hashes`.
fn bare_chain(data: &[u8], mut step: impl FnMut(u64, &[u8]) -> u64) -> Vec<u64> {
    let mut prev = 0u64;
    let mut out = Vec::with_capacity(data.len() / 128);
    for block in black_box(data).chunks_exact(128) {
        prev = step(prev, block);
        out.push(prev);
    }
    black_box(out)
}

/// An index at fleet scale: eight replicas' budgets full, 2M tracked blocks
/// (~120 MB, `index/memory_per_block`), so a probe misses the CPU's caches as
/// it does on a proxy mirroring eight GPUs' KV caches, unlike the small warm
/// index the pipeline cases use. Filler chains keep a chain's shard bits over
/// runs of 32 blocks, as real chains do.
fn fleet_index() -> PrefixIndex {
    let index = PrefixIndex::new(&IndexConfig {
        default_budget: 1 << 18,
        ..IndexConfig::default()
    });
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || xorshift(&mut x);
    let shard_bits = 0xffff_u64 << 40;
    for chain in 0..2048u64 {
        let mut run = 0;
        let filler: Vec<u64> = (0..1024)
            .map(|i| {
                if i % 32 == 0 {
                    run = next() & shard_bits;
                }
                (next() & !shard_bits) | run
            })
            .collect();
        index.insert((chain % 8) as u16, &filler);
    }
    index
}

/// A kv-aware router on a warm fleet of `replicas`, with the bodies of a prompt
/// it has routed (`held`) and of one it has never seen (`new`), 4 KiB each.
struct DecisionFixture {
    router: std::sync::Arc<dyn Router>,
    set: std::sync::Arc<ReplicaSet>,
    held: Vec<u8>,
    new: Vec<u8>,
}

const DECISION_FLEETS: [(usize, &str); 2] = [(8, "8-replicas"), (64, "64-replicas")];
const DECISION_BODY: usize = 4 << 10;

fn decision_fixture(replicas: usize) -> DecisionFixture {
    let cfg = RoutingConfig {
        policy: PolicyKind::KvAware,
        ..RoutingConfig::default()
    };
    let specs = (0..replicas)
        .map(|i| ReplicaSpec {
            models: vec!["meta-llama/Llama-3.1-8B-Instruct".into()],
            kv_blocks: Some(20_000),
            kv_block_tokens: Some(16),
            ..ReplicaSpec::new(format!("http://127.0.0.1:{}", 20_000 + i))
        })
        .collect();
    let set = ReplicaTable::new(specs).expect("distinct urls").load();
    let router = cfg.build();
    router.on_replicas_changed(&set);
    let prefix = cfg.prefix();
    let path = "/v1/completions";
    // Not `completions_body`: its `user` field is a session key, which would
    // pin every request and measure session affinity instead.
    let body = |seed: u64| {
        let head = r#"{"model":"meta-llama/Llama-3.1-8B-Instruct","stream":true,"prompt":""#;
        let tail = r#""}"#;
        let prompt = text(DECISION_BODY - head.len() - tail.len(), seed);
        format!("{head}{prompt}{tail}").into_bytes()
    };
    // Warm: 32 conversations a replica, each routed and recorded as the proxy does.
    for seed in 0..(32 * replicas as u64) {
        let b = body(1000 + seed);
        let a = analyze(path, &b, &prefix).unwrap();
        let rr = a.route_request(path, None, seed);
        if let Some(d) = router.pick(&rr, &set, &[]) {
            router.on_routed(&rr, &d);
        }
    }
    DecisionFixture {
        router,
        set,
        held: body(1000),
        new: body(7),
    }
}

fn bench_decision(c: &mut Criterion) {
    let prefix = RoutingConfig::default().prefix();
    let path = "/v1/completions";
    let mut g = c.benchmark_group("decide");
    for (replicas, label) in DECISION_FLEETS {
        let f = decision_fixture(replicas);
        for (case, body) in [("held-prefix", &f.held), ("new-prefix", &f.new)] {
            let a = analyze(path, body, &prefix).unwrap();
            let rr = a.route_request(path, None, 1_000_000);
            g.bench_function(BenchmarkId::new(case, label), |b| {
                b.iter(|| black_box(f.router.pick(black_box(&rr), &f.set, &[])))
            });
        }
    }
    g.finish();
}

fn bench(c: &mut Criterion) {
    let cfg = PrefixConfig::default();
    let kinds: [(&str, &str, BodyMaker); 2] = [
        ("chat", "/v1/chat/completions", chat_body),
        ("completions", "/v1/completions", completions_body),
    ];

    let mut g = c.benchmark_group("pipeline");
    for (size, label) in SIZES {
        for (kind, path, make) in kinds {
            let body = make(size);
            // Warm index: a replica holds the whole prompt, so the lookup walks it all.
            let index = PrefixIndex::new(&IndexConfig::default());
            let hashes = analyze(path, &body, &cfg).unwrap().hashes;
            index.insert(0, &hashes);
            index.insert(1, &hashes[..hashes.len() / 2]);
            g.throughput(Throughput::Bytes(body.len() as u64));
            g.bench_function(
                BenchmarkId::new(format!("{kind}/analyze+lookup"), label),
                |b| {
                    b.iter(|| {
                        let a = analyze(path, black_box(&body), &cfg).unwrap();
                        black_box(index.longest_match(&a.hashes, u128::MAX))
                    })
                },
            );
        }
        let body = chat_body(size);
        let mut dst = vec![0u8; body.len()];
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(BenchmarkId::new("memcpy", label), |b| {
            b.iter(|| {
                dst.copy_from_slice(black_box(&body));
                black_box(&dst);
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("extract");
    for (size, label) in SIZES {
        let body = chat_body(size);
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(BenchmarkId::new("scanner+hash", label), |b| {
            b.iter(|| {
                let mut h = BlockHasher::with_capacity(&cfg, body.len());
                extract(Endpoint::ChatCompletions, black_box(&body), |s| h.feed(s)).unwrap();
                black_box(h.finish())
            })
        });
        g.bench_function(BenchmarkId::new("sonic-rs+hash", label), |b| {
            b.iter(|| {
                let mut h = BlockHasher::with_capacity(&cfg, body.len());
                extract_sonic(black_box(&body), &mut h).unwrap();
                black_box(h.finish())
            })
        });
        let mut scratch = Vec::with_capacity(body.len());
        g.bench_function(BenchmarkId::new("simd-json-copy+hash", label), |b| {
            b.iter(|| {
                let mut h = BlockHasher::with_capacity(&cfg, body.len());
                extract_simd_json(black_box(&body), &mut scratch, &mut h).unwrap();
                black_box(h.finish())
            })
        });
        g.bench_function(BenchmarkId::new("scanner-only", label), |b| {
            b.iter(|| {
                let mut n = 0usize;
                extract(Endpoint::ChatCompletions, black_box(&body), |s| {
                    n += s.len()
                })
                .unwrap();
                black_box(n)
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("hash");
    for (size, label) in SIZES {
        let data = text(size, 9).into_bytes();
        g.throughput(Throughput::Bytes(data.len() as u64));
        // What kvroute ships: each block hashed alone (AES rounds), then folded
        // into the chain.
        g.bench_function(BenchmarkId::new("aes-then-fold", label), |b| {
            b.iter(|| black_box(chain_hashes(black_box(&data), &cfg)))
        });
        // The same hashes as a CPU without AES-NI computes them: eight blocks
        // per `aes` round call (here `aes` runs those on AES-NI; built with
        // `--cfg aes_force_soft`, on its bitsliced software round).
        g.bench_function(BenchmarkId::new("aes-portable-then-fold", label), |b| {
            b.iter(|| {
                let mut out = vec![0u64; data.len() / 128];
                let data = black_box(&data[..data.len() / 128 * 128]);
                scan_portable(data, 128, &mut out, 0u64, |prev, h| {
                    *prev = fold_block_hash(*prev, h);
                    *prev
                });
                black_box(out)
            })
        });
        // The block hash kvroute shipped before: xxh3, then the same fold.
        g.bench_function(BenchmarkId::new("xxh3-then-fold", label), |b| {
            b.iter(|| bare_chain(&data, |prev, block| fold_block_hash(prev, xxh3_64(block))))
        });
        // The fold kvroute shipped before: another xxh3 round, seeded with `prev`.
        g.bench_function(BenchmarkId::new("xxh3-then-xxh3-fold", label), |b| {
            b.iter(|| {
                bare_chain(&data, |prev, block| {
                    xxh3_64_with_seed(&xxh3_64(block).to_le_bytes(), prev)
                })
            })
        });
        g.bench_function(BenchmarkId::new("xxh3-seeded-chain", label), |b| {
            b.iter(|| bare_chain(&data, |prev, block| xxh3_64_with_seed(block, prev)))
        });
        // ahash with fixed seeds, then the same fold. Without `+aes` at build time
        // (a binary for unknown CPUs) it runs its folded-multiply fallback.
        let seeds = ahash::RandomState::with_seeds(1, 2, 3, 4);
        g.bench_function(BenchmarkId::new("ahash-then-fold", label), |b| {
            b.iter(|| {
                bare_chain(&data, |prev, block| {
                    fold_block_hash(prev, seeds.hash_one(block))
                })
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("index");
    let index = PrefixIndex::new(&IndexConfig::default());
    let warm: Vec<Vec<u64>> = (0..2000u64)
        .map(|i| chain_hashes(text(4096, 100 + i).as_bytes(), &cfg).to_vec())
        .collect();
    for (i, h) in warm.iter().enumerate() {
        index.insert((i % 8) as u16, h);
    }
    let fresh = chain_hashes(text(128 << 10, 7).as_bytes(), &cfg).to_vec();
    g.throughput(Throughput::Elements(fresh.len() as u64));
    g.bench_function("insert-1024-blocks", |b| {
        let mut slot = 0u16;
        b.iter(|| {
            slot = (slot + 1) % 8;
            index.insert(slot, black_box(&fresh));
        })
    });
    g.bench_function("lookup-1024-blocks-warm", |b| {
        b.iter(|| black_box(index.longest_match(black_box(&fresh), u128::MAX)))
    });
    let fleet = fleet_index();
    fleet.insert(0, &fresh);
    fleet.insert(1, &fresh[..fresh.len() / 2]);
    g.bench_function("lookup-1024-blocks-2M-entries", |b| {
        b.iter(|| black_box(fleet.longest_match(black_box(&fresh), u128::MAX)))
    });
    g.finish();
}

/// On a shared, loaded machine wall-clock medians swing 2x; user-mode cycles of
/// a fixed run do not. `KVROUTE_BENCH_CASE=chat/128KiB KVROUTE_BENCH_ITERS=2000
/// perf stat -e cycles:u,instructions:u <bench binary>` runs one pipeline case
/// (or `memcpy/128KiB`) that many times and nothing else, and prints the fastest
/// of 100 batches (where the VM has no cycle counters, the steadiest figure).
fn fixed_run(case: &str, iters: u64) {
    let cfg = PrefixConfig::default();
    let (kind, label) = case.split_once('/').expect("KIND/SIZE");
    if let Some(which) = kind.strip_prefix("decide-") {
        fixed_decision(which, label, iters);
        return;
    }
    let size = SIZES
        .iter()
        .find(|(_, l)| *l == label)
        .expect("size label")
        .0;
    let (path, body) = match kind {
        "chat" => ("/v1/chat/completions", chat_body(size)),
        "completions" => ("/v1/completions", completions_body(size)),
        "memcpy" => ("", chat_body(size)),
        _ => panic!("kind: chat, completions or memcpy"),
    };
    if kind == "memcpy" {
        let mut dst = vec![0u8; body.len()];
        for _ in 0..iters {
            dst.copy_from_slice(black_box(&body));
            black_box(&dst);
        }
        return;
    }
    // `KVROUTE_BENCH_FLEET_INDEX=1`: look the prompt up in an index at fleet
    // scale instead of one holding only it.
    let index = if std::env::var_os("KVROUTE_BENCH_FLEET_INDEX").is_some() {
        fleet_index()
    } else {
        PrefixIndex::new(&IndexConfig::default())
    };
    let hashes = analyze(path, &body, &cfg).unwrap().hashes;
    index.insert(0, &hashes);
    index.insert(1, &hashes[..hashes.len() / 2]);
    let best = fastest_batch(iters, || {
        let a = analyze(path, black_box(&body), &cfg).unwrap();
        black_box(index.longest_match(&a.hashes, u128::MAX));
    });
    eprintln!(
        "{case}: {} body bytes x {iters}, fastest batch {:.3} µs/iter",
        body.len(),
        best * 1e6
    );
}

/// Seconds per call of `f` in the fastest of 100 batches of `iters` calls in all: what
/// the code costs when no other process interrupts it, the figure to compare across
/// runs on a shared machine.
fn fastest_batch(iters: u64, mut f: impl FnMut()) -> f64 {
    let batch = (iters / 100).max(1);
    let mut best = f64::MAX;
    let mut done = 0;
    while done < iters {
        let t = std::time::Instant::now();
        for _ in 0..batch {
            f();
        }
        best = best.min(t.elapsed().as_secs_f64() / batch as f64);
        done += batch;
    }
    best
}

/// The fixed run of one decision: `decide-held/8-replicas`, `decide-new/64-replicas`, ….
fn fixed_decision(which: &str, fleet: &str, iters: u64) {
    let replicas = DECISION_FLEETS
        .iter()
        .find(|(_, l)| *l == fleet)
        .expect("8-replicas or 64-replicas")
        .0;
    let f = decision_fixture(replicas);
    let body = match which {
        "held" => &f.held,
        "new" => &f.new,
        _ => panic!("decide-held or decide-new"),
    };
    let path = "/v1/completions";
    let a = analyze(path, body, &RoutingConfig::default().prefix()).unwrap();
    let rr = a.route_request(path, None, 1_000_000);
    let kind = f.router.pick(&rr, &f.set, &[]).map(|d| d.kind.as_str());
    let best = fastest_batch(iters, || {
        black_box(f.router.pick(black_box(&rr), &f.set, &[]));
    });
    eprintln!(
        "decide-{which}/{fleet} ({}): x {iters}, fastest batch {:.3} µs/decision",
        kind.unwrap_or("none"),
        best * 1e6
    );
}

criterion_group!(benches, bench, bench_decision);

fn main() {
    if let (Ok(case), Ok(iters)) = (
        std::env::var("KVROUTE_BENCH_CASE"),
        std::env::var("KVROUTE_BENCH_ITERS"),
    ) {
        fixed_run(&case, iters.parse().expect("KVROUTE_BENCH_ITERS: a number"));
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
