use std::sync::atomic::Ordering;

use proptest::prelude::*;

use super::*;
use crate::prefix::{analyze, BlockHashes};
use crate::replica::{InFlight, ReplicaSpec, ReplicaTable};
use crate::route::RoutingConfig;
use crate::route::{Prediction, ResponseReport};
use std::sync::Arc;

fn table(n: usize) -> ReplicaTable {
    ReplicaTable::new(
        (0..n)
            .map(|i| ReplicaSpec::new(format!("http://127.0.0.1:{}", 9300 + i)))
            .collect(),
    )
    .unwrap()
}

/// The pure `(1+ε)·mean` rule (no floor), so the tests check the bound itself.
fn router() -> KvAware {
    KvAware::new(
        RoutingConfig {
            load_floor: 0,
            ..RoutingConfig::default()
        }
        .kv_aware_params(),
    )
}

const SYSTEM: &str = "You are a meticulous assistant. Follow the house style guide. ";

fn chat_hashes(system_repeat: usize, user: &str) -> BlockHashes {
    let body = format!(
        r#"{{"model":"m","messages":[{{"role":"system","content":"{}"}},{{"role":"user","content":"{user}"}}]}}"#,
        SYSTEM.repeat(system_repeat)
    );
    let a = analyze("/v1/chat/completions", body.as_bytes(), &Default::default()).unwrap();
    a.hashes
}

fn req<'a>(hashes: &'a [u64], session: Option<&'a [u8]>, now_ms: u64) -> RouteRequest<'a> {
    RouteRequest {
        path: "/v1/chat/completions",
        model: Some("m"),
        session,
        block_hashes: hashes,
        prompt_bytes: hashes.len() * 128,
        now_ms,
    }
}

/// Routes and learns, like the proxy does.
fn route(r: &KvAware, set: &ReplicaSet, rq: &RouteRequest<'_>) -> Decision {
    let d = r.pick(rq, set, &[]).expect("a replica");
    r.on_routed(rq, &d);
    d
}

#[test]
fn shared_system_prompt_sticks_to_one_replica_while_load_allows() {
    let t = table(4);
    let set = t.load();
    let r = router();
    let first = chat_hashes(60, "question 0");
    let d0 = route(&r, &set, &req(&first, None, 0));
    assert_eq!(d0.kind, DecisionKind::Consistent);
    for i in 1..50 {
        let h = chat_hashes(
            60,
            &format!("question {i} with its own details. ").repeat(10),
        );
        let d = route(&r, &set, &req(&h, None, i));
        assert_eq!(d.replica.slot, d0.replica.slot, "request {i}");
        assert_eq!(d.kind, DecisionKind::Prefix);
        // The system prompt's full blocks are predicted, the user turn is not.
        assert!(d.predicted_blocks >= (SYSTEM.len() * 60 / 128) as u32 - 1);
        assert!((d.predicted_blocks as usize) < h.len());
        assert_eq!(d.best_blocks, d.predicted_blocks);
    }
    assert_eq!(r.counters().prefix, 49);
}

#[test]
fn hot_prefix_spills_over_the_bound_and_never_exceeds_it() {
    let t = table(4);
    let set = t.load();
    let r = router();
    let mut held: Vec<InFlight> = Vec::new();
    let mut spills = 0;
    for i in 0..40 {
        let h = chat_hashes(60, &format!("q{i}"));
        let rq = req(&h, None, i);
        let cands: Vec<Candidate<'_>> = set.replicas.iter().map(Candidate::new).collect();
        let bound = LoadBound::new(&cands, RoutingConfig::default().epsilon, 0);
        let d = route(&r, &set, &rq);
        let c = cands
            .iter()
            .find(|c| c.replica.slot == d.replica.slot)
            .unwrap();
        assert!(
            c.load < bound.capacity(c.weight),
            "request {i} over the bound"
        );
        spills += usize::from(d.kind == DecisionKind::Spill);
        held.push(d.replica.begin(0));
    }
    assert!(spills > 0);
    let loads: Vec<u32> = set.replicas.iter().map(|r| r.in_flight()).collect();
    // 40 requests, mean 10, bound ⌈(1+ε)·10⌉.
    let cap = ((1.0 + RoutingConfig::default().epsilon) * 10.0_f64).ceil() as u32;
    assert!(loads.iter().all(|&l| l <= cap), "{loads:?} over {cap}");
    // Spilled replicas learned the prefix: more than one now predicts it.
    let h = chat_hashes(60, "another");
    let m = r.index().longest_match(&h, u128::MAX);
    let holders = set.replicas.iter().filter(|x| m.get(x.slot) > 0).count();
    assert!(holders >= 2, "{m:?}");
}

#[test]
fn sessions_stick_and_move_when_their_replica_goes() {
    let t = table(3);
    let set = t.load();
    let r = router();
    let s: &[u8] = b"conversation-1";
    let a = chat_hashes(20, "a");
    let d1 = route(&r, &set, &req(&a, Some(s), 0));
    // A different prompt in the same session follows the session.
    let b = chat_hashes(1, "entirely different");
    let d2 = route(&r, &set, &req(&b, Some(s), 10));
    assert_eq!(d2.replica.slot, d1.replica.slot);
    assert_eq!(d2.kind, DecisionKind::Session);
    // The replica goes unhealthy: the session moves, and the table follows.
    d1.replica.healthy.store(false, Ordering::Relaxed);
    let d3 = route(&r, &set, &req(&b, Some(s), 20));
    assert_ne!(d3.replica.slot, d1.replica.slot);
    d1.replica.healthy.store(true, Ordering::Relaxed);
    let d4 = route(&r, &set, &req(&b, Some(s), 30));
    assert_eq!(
        (d4.replica.slot, d4.kind),
        (d3.replica.slot, DecisionKind::Session)
    );
    // After the TTL the session is forgotten.
    let ttl = RoutingConfig::default().session_ttl_ms;
    let d5 = r.pick(&req(&b, Some(s), 30 + ttl + 1), &set, &[]).unwrap();
    assert_ne!(d5.kind, DecisionKind::Session);
}

#[test]
fn retries_exclude_and_models_filter() {
    let mut specs: Vec<ReplicaSpec> = (0..3)
        .map(|i| ReplicaSpec::new(format!("http://127.0.0.1:{}", 9400 + i)))
        .collect();
    specs[2].models = vec!["other".into()];
    let t = ReplicaTable::new(specs).unwrap();
    let set = t.load();
    let r = router();
    let h = chat_hashes(30, "x");
    let d = route(&r, &set, &req(&h, None, 0));
    assert_ne!(d.replica.slot, 2, "replica 2 does not serve model m");
    let retry = r.pick(&req(&h, None, 1), &set, &[d.replica.slot]).unwrap();
    assert!(retry.replica.slot != d.replica.slot && retry.replica.slot != 2);
    assert_eq!(
        retry.best_blocks, 0,
        "the excluded holder is not a candidate"
    );
    assert!(r.pick(&req(&h, None, 2), &set, &[0, 1]).is_none());
}

#[test]
fn short_prompts_without_session_rotate() {
    let t = table(3);
    let set = t.load();
    let r = router();
    let slots: Vec<u16> = (0..6)
        .map(|i| route(&r, &set, &req(&[], None, i)).replica.slot)
        .collect();
    let mut uniq = slots.clone();
    uniq.sort_unstable();
    uniq.dedup();
    assert_eq!(uniq.len(), 3, "{slots:?}");
}

#[test]
fn replica_changes_clear_removed_slots_and_set_budgets() {
    let mut specs: Vec<ReplicaSpec> = (0..2)
        .map(|i| ReplicaSpec::new(format!("http://127.0.0.1:{}", 9500 + i)))
        .collect();
    specs[1].kv_blocks = Some(1000);
    specs[1].kv_block_tokens = Some(16);
    let t = ReplicaTable::new(specs.clone()).unwrap();
    let r = router();
    r.on_replicas_changed(&t.load());
    // 1000 blocks × 16 tokens × 4 bytes / 128 bytes per block.
    assert_eq!(r.index().budget(t.load().replicas[1].slot), 500);
    let h = chat_hashes(30, "x");
    r.index().insert(0, &h);
    r.index().insert(1, &h);
    let set = t
        .replace(crate::endpoint::literals(&t.load(), vec![specs[1].clone()]).unwrap())
        .unwrap();
    r.on_replicas_changed(&set);
    assert_eq!(r.index().tracked(0), 0);
    assert_eq!(r.index().tracked(1), h.len() as u64);
}

/// A replica pushed with a slot shape (llama.cpp) gets the index's slot model
/// in prompt blocks, and a block budget of what its slots and host cache hold
/// when it reports no KV capacity of its own.
#[test]
fn slot_replicas_get_the_slot_model() {
    let mut spec = ReplicaSpec::new("http://127.0.0.1:9600");
    spec.kv_slots = Some(4);
    spec.kv_slot_tokens = Some(4096);
    spec.kv_host_tokens = Some(32768);
    let t = ReplicaTable::new(vec![
        spec.clone(),
        ReplicaSpec::new("http://127.0.0.1:9601"),
    ])
    .unwrap();
    let r = router();
    r.on_replicas_changed(&t.load());
    let (a, b) = (t.load().replicas[0].slot, t.load().replicas[1].slot);
    // 4096 tokens × 4 bytes / 128 bytes per block.
    let want = crate::index::SlotModel {
        slots: 4,
        slot_blocks: 128,
        host_blocks: 1024,
    };
    assert_eq!(r.index().slot_model(a), Some(want));
    assert_eq!(r.index().budget(a), 4 * 128 + 1024);
    assert_eq!(r.index().slot_model(b), None);
    // Pushed again without the shape: a block-based replica, emptied.
    r.index().insert(a, &chat_hashes(30, "x"));
    spec.kv_slots = None;
    let set = t
        .replace(
            crate::endpoint::literals(
                &t.load(),
                vec![spec, ReplicaSpec::new("http://127.0.0.1:9601")],
            )
            .unwrap(),
        )
        .unwrap();
    r.on_replicas_changed(&set);
    assert_eq!(r.index().slot_model(a), None);
    assert_eq!(r.index().tracked(a), 0);
}

#[test]
fn usage_reports_are_counted() {
    let t = table(2);
    let set = t.load();
    let r = router();
    let h = chat_hashes(30, "x");
    let d = route(&r, &set, &req(&h, None, 0));
    r.on_response(&d, &usage(500, 0));
    let d = route(&r, &set, &req(&h, None, 1));
    assert!(d.predicted_blocks > 0);
    r.on_response(&d, &usage(500, 448));
    let c = r.counters();
    assert_eq!(
        (c.usage_reports, c.predicted_hit_actual_hit, c.cached_tokens),
        (2, 1, 448)
    );
    // Predicted blocks in the engine's tokens, at the bytes per token learned
    // from these two reports.
    let bpt = r.bytes_per_token();
    assert!(bpt != crate::route::bytes_per_token::PRIOR_BYTES_PER_TOKEN);
    let want = (f64::from(d.predicted_blocks) * 128.0 / bpt) as u64;
    assert_eq!(c.predicted_tokens, want.min(500));
}

/// Everything a router tells its observer, in order.
#[derive(Default)]
struct Recording(parking_lot::Mutex<Vec<String>>);

impl crate::route::RouteObserver for Recording {
    fn routed(&self, predicted_ratio: f64, regret_ratio: f64) {
        self.0
            .lock()
            .push(format!("routed {predicted_ratio:.2} {regret_ratio:.2}"));
    }
    fn cache_report(&self, replica: &Replica, r: &crate::route::observe::CacheReport) {
        self.0.lock().push(format!(
            "cache {} {:?} {}/{}",
            replica.slot,
            r.outcome.map(|o| o.as_str()),
            r.cached_tokens,
            r.prompt_tokens
        ));
    }
    fn ttft_ratio(&self, replica: &Replica, _ratio: f64) {
        self.0.lock().push(format!("ttft {}", replica.slot));
    }
    fn report_ignored(&self) {
        self.0.lock().push("ignored".into());
    }
}

#[test]
fn the_observer_hears_decisions_and_reports_and_scrape_reads_the_state() {
    let t = table(2);
    let set = t.load();
    let seen = Arc::new(Recording::default());
    let r = router().observed(seen.clone());
    let h = chat_hashes(30, "x");
    let d0 = route(&r, &set, &req(&h, None, 0));
    r.on_response(&d0, &usage(500, 0));
    let d1 = route(&r, &set, &req(&h, None, 1));
    r.on_response(&d1, &usage(500, 448));
    r.on_response(&d1, &usage(100, 101));
    let slot = d1.replica.slot;
    let ratio = f64::from(d1.predicted_blocks) / h.len() as f64;
    assert_eq!(
        *seen.0.lock(),
        vec![
            "routed 0.00 0.00".to_string(),
            format!("cache {} None 0/500", d0.replica.slot),
            format!("routed {ratio:.2} 0.00"),
            format!("cache {slot} Some(\"hit_hit\") 448/500"),
            "ignored".to_string(),
        ]
    );
    let st = r.scrape(&set).expect("kv-aware keeps state");
    assert_eq!(st.replicas.len(), 2);
    assert_eq!(st.index, r.index().stats());
    let held = st
        .replicas
        .iter()
        .find(|x| x.url == d1.replica.spec.url)
        .unwrap();
    assert_eq!(held.blocks, r.index().tracked(slot));
    assert!(held.blocks >= u64::from(d1.predicted_blocks));
    assert_eq!(st.bytes_per_token, r.bytes_per_token());
    // Policies without state have nothing to scrape.
    assert!(crate::route::RoundRobin::default().scrape(&set).is_none());
}

fn usage(prompt: u64, cached: u64) -> ResponseReport {
    ResponseReport {
        prompt_tokens: Some(prompt),
        cached_tokens: Some(cached),
        ttft_ms: None,
    }
}

/// A streamed response: usage and the time to its first byte.
fn streamed(prompt: u64, cached: u64, ttft_ms: u64) -> ResponseReport {
    ResponseReport {
        ttft_ms: Some(ttft_ms),
        ..usage(prompt, cached)
    }
}

/// Reports no engine could make are ignored and counted, and move nothing.
#[test]
fn impossible_usage_is_ignored_and_counted() {
    let t = table(2);
    let set = t.load();
    let r = router();
    let h = chat_hashes(30, "x");
    let d = route(&r, &set, &req(&h, None, 0));
    let before = r.bytes_per_token();
    for bad in [
        usage(0, 0),
        usage(100, 101),
        // 30 blocks of 128 bytes as 2 tokens: no tokenizer.
        usage(2, 0),
        streamed(500, 0, 10_000_000),
    ] {
        r.on_response(&d, &bad);
    }
    let c = r.counters();
    assert_eq!(c.ignored_reports, 4);
    assert_eq!(c.ttft_observations, 0);
    // The last one's usage was fine and counted; its timing was not.
    assert_eq!(c.usage_reports, 1);
    assert!(r.fit(d.replica.slot).is_none());
    assert!((r.bytes_per_token() - before).abs() > 0.0);
    // Without usage there is nothing to learn and nothing to count.
    r.on_response(&d, &ResponseReport::default());
    assert_eq!(r.counters().ignored_reports, 4);
}

/// First tokens teach the router each replica's prefill rate: a replica whose
/// first tokens take 4x as long per uncached byte is learned as 4x slower.
#[test]
fn prefill_rates_are_learned_from_first_tokens() {
    let t = table(2);
    let set = t.load();
    let r = router();
    for i in 0..40u64 {
        for (replica, ms_per_kib) in [(0usize, 2u64), (1, 8)] {
            let h = chat_hashes(10 + i as usize % 30, &format!("user {i}"));
            let rq = req(&h, None, i * 1000);
            let mut d = r.pick(&rq, &set, &[]).unwrap();
            d.replica = set.replicas[replica].clone();
            let _g = d.replica.begin_at(d.prefill_bytes, rq.now_ms);
            r.on_routed(&rq, &d);
            let kib = rq.prompt_bytes as u64 / 1024;
            r.on_response(
                &d,
                &streamed(rq.prompt_bytes as u64 / 4, 0, 5 + kib * ms_per_kib),
            );
        }
    }
    let fast = r.fit(set.replicas[0].slot).expect("learned");
    let slow = r.fit(set.replicas[1].slot).expect("learned");
    let ratio = fast.rate_bytes_per_s() / slow.rate_bytes_per_s();
    assert!((3.0..5.0).contains(&ratio), "{fast:?} {slow:?}");
    assert_eq!(r.counters().ttft_observations, 80);
    assert!(r.learned(set.replicas[0].slot).is_some());
}

/// A prefix no replica holds goes to its first rendezvous choice while the
/// replicas are alike, and to the second when the first is predicted busy.
#[test]
fn a_new_prefix_takes_the_sooner_of_two_rendezvous_choices() {
    let t = table(4);
    let set = t.load();
    // The default load floor: one request in flight is never over the bound,
    // so only the prediction moves the prefix.
    let r = KvAware::new(RoutingConfig::default().kv_aware_params());
    let h = chat_hashes(30, "fresh");
    let rq = req(&h, None, 0);
    let first = r.pick(&rq, &set, &[]).unwrap();
    assert_eq!(first.kind, DecisionKind::Consistent);
    // The first choice gets a long prefill queued (by this proxy), and has not
    // answered it.
    let busy = Arc::clone(&first.replica);
    let _g = busy.begin_at(1 << 20, 0);
    let big = Decision {
        prefill_bytes: 1 << 20,
        ..first.clone()
    };
    r.on_routed(&req(&[], None, 0), &big);
    let then = r.pick(&req(&h, None, 1), &set, &[]).unwrap();
    assert_ne!(then.replica.slot, busy.slot);
    assert_eq!(then.kind, DecisionKind::LeastLoaded);
    // Once it answered (nothing awaits), the prefix goes back to its place.
    drop(_g);
    let back = r.pick(&req(&h, None, 2), &set, &[]).unwrap();
    assert_eq!(back.replica.slot, busy.slot);
}

/// Tenant `k`'s first request: its own system prompt, so its own anchor.
fn tenant_hashes(k: usize) -> BlockHashes {
    let body = format!(
        r#"{{"model":"m","messages":[{{"role":"system","content":"{}"}},{{"role":"user","content":"hi"}}]}}"#,
        format!("Tenant {k} system prompt, with its house rules. ").repeat(40)
    );
    analyze("/v1/chat/completions", body.as_bytes(), &Default::default())
        .unwrap()
        .hashes
}

/// A new prefix stays where it is placed, and its tenant follows it there. With
/// room on its first rendezvous choice the hash decides, so instances agree;
/// when that cache is nearly full and the second choice's clearly is not, the
/// prefix goes to the second rather than evict others' blocks.
#[test]
fn a_new_prefix_avoids_a_nearly_full_first_choice_for_one_with_room() {
    let t = table(2);
    let set = t.load();
    let params = RoutingConfig::default().kv_aware_params();
    // Where each tenant's anchor hashes first, seen by a router holding nothing.
    let first_choice = |k: usize| {
        let h = tenant_hashes(k);
        let d = router().pick(&req(&h, None, 0), &set, &[]).unwrap();
        assert_eq!(d.kind, DecisionKind::Consistent);
        d.replica.slot
    };
    let home = first_choice(0);
    let same = (1..64)
        .find(|&k| first_choice(k) == home)
        .expect("a tenant hashing to the same replica");
    let other = (1..64)
        .find(|&k| first_choice(k) != home)
        .expect("a tenant hashing to the other replica");

    // Room everywhere: both tenants go where their anchors hash.
    let roomy = KvAware::new(params.clone());
    roomy.on_replicas_changed(&set);
    route(&roomy, &set, &req(&tenant_hashes(0), None, 0));
    let d = route(&roomy, &set, &req(&tenant_hashes(same), None, 1));
    assert_eq!((d.replica.slot, d.kind), (home, DecisionKind::Consistent));

    // The first tenant's prompt fills its replica's budget; the other is empty.
    let r = KvAware::new(params);
    let d0 = route(&r, &set, &req(&tenant_hashes(0), None, 0));
    assert_eq!((d0.replica.slot, d0.kind), (home, DecisionKind::Consistent));
    let blocks = r.index().tracked(home);
    for s in &set.replicas {
        r.index().set_budget(s.slot, blocks);
    }
    let d1 = route(&r, &set, &req(&tenant_hashes(same), None, 1));
    assert_ne!(d1.replica.slot, home);
    assert_eq!(d1.kind, DecisionKind::LeastLoaded);
    // Both full now, about alike: the hash decides again.
    assert!(r.index().tracked(d1.replica.slot) as f64 >= 0.8 * blocks as f64);
    let d2 = r
        .pick(&req(&tenant_hashes(other), None, 2), &set, &[])
        .unwrap();
    assert_eq!(d2.kind, DecisionKind::Consistent);
    assert_ne!(d2.replica.slot, home);
}

/// A prompt with no anchor goes where it is answered soonest, not by rotation.
#[test]
fn an_unanchored_prompt_goes_to_the_soonest_replica() {
    let t = table(3);
    let set = t.load();
    let r = router();
    let mut guards = Vec::new();
    for (i, bytes) in [(0usize, 1u64 << 20), (2, 1 << 16)] {
        let rp = &set.replicas[i];
        guards.push(rp.begin_at(bytes, 0));
        let d = Decision {
            prefill_bytes: bytes,
            prediction: Some(Prediction {
                ttft_s: 0.0,
                secs_per_byte: 1.0,
                learned: false,
                queued_ahead_bytes: 0,
                over_share: false,
                refused_move_s: 0.0,
            }),
            ..Decision::simple(rp.clone(), DecisionKind::LeastLoaded)
        };
        r.on_routed(&req(&[], None, 0), &d);
    }
    for now in 1..10 {
        let d = r.pick(&req(&[], None, now), &set, &[]).unwrap();
        assert_eq!(d.replica.slot, set.replicas[1].slot);
        assert_eq!(d.kind, DecisionKind::LeastLoaded);
    }
}

/// A replica that stops answering is predicted slower the longer it is silent,
/// until a replica with a longer queue is preferred to it.
#[test]
fn a_silent_replica_is_never_predicted_fast() {
    let t = table(2);
    let set = t.load();
    let r = router();
    // Teach both replicas 1 MB/s.
    for i in 0..10u64 {
        for rp in &set.replicas {
            let d = Decision {
                prompt_bytes: 10_000,
                prefill_bytes: 10_000,
                prediction: Some(Prediction {
                    ttft_s: 0.01,
                    secs_per_byte: 1e-6,
                    learned: false,
                    queued_ahead_bytes: 0,
                    over_share: false,
                    refused_move_s: 0.0,
                }),
                ..Decision::simple(rp.clone(), DecisionKind::LeastLoaded)
            };
            r.on_response(&d, &streamed(2_500, 0, 10 + i % 2));
        }
    }
    let (a, b) = (&set.replicas[0], &set.replicas[1]);
    // `a` gets 10 ms of work and never answers; `b` gets 100 ms of work.
    let queue = |rp: &Arc<Replica>, bytes: u64| {
        let g = rp.begin_at(bytes, 0);
        let d = Decision {
            prefill_bytes: bytes,
            prediction: Some(Prediction {
                ttft_s: 0.0,
                secs_per_byte: 1e-6,
                learned: true,
                queued_ahead_bytes: 0,
                over_share: false,
                refused_move_s: 0.0,
            }),
            ..Decision::simple(rp.clone(), DecisionKind::LeastLoaded)
        };
        r.on_routed(&req(&[], None, 0), &d);
        g
    };
    let _ga = queue(a, 10_000);
    let _gb = queue(b, 100_000);
    assert_eq!(
        r.pick(&req(&[], None, 5), &set, &[]).unwrap().replica.slot,
        a.slot
    );
    // At 1 s, `b` should have answered long ago too, but `a` is 990 ms late
    // against `b`'s 900: `b` is sooner.
    let d = r.pick(&req(&[], None, 1000), &set, &[]).unwrap();
    assert_eq!(d.replica.slot, b.slot);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    /// Whatever the mix of prefixes, sessions and finishing requests, no decision
    /// puts a replica over the bound computed at that moment.
    #[test]
    fn kv_aware_respects_the_bound(
        n in 2usize..6,
        events in proptest::collection::vec((0u8..5, 0u8..4, any::<bool>(), any::<u16>()), 1..120),
    ) {
        let t = table(n);
        let set = t.load();
        let r = router();
        let families: Vec<BlockHashes> = (0..5).map(|f| chat_hashes(10 + f * 7, "q")).collect();
        let mut held: Vec<InFlight> = Vec::new();
        for (i, (family, session, finish, k)) in events.into_iter().enumerate() {
            if finish && !held.is_empty() {
                let k = usize::from(k) % held.len();
                held.swap_remove(k);
                continue;
            }
            let s = [session];
            let rq = req(&families[usize::from(family)], (session > 0).then_some(&s[..]), i as u64);
            let cands: Vec<Candidate<'_>> = set.replicas.iter().map(Candidate::new).collect();
            let bound = LoadBound::new(&cands, RoutingConfig::default().epsilon, 0);
            let d = route(&r, &set, &rq);
            let c = cands.iter().find(|c| c.replica.slot == d.replica.slot).unwrap();
            prop_assert!(c.load < bound.capacity(c.weight));
            prop_assert!(d.predicted_blocks <= d.best_blocks);
            held.push(d.replica.begin(0));
        }
    }
}

#[test]
fn load_reported_by_the_replica_counts_toward_the_bound() {
    let t = table(3);
    let set = t.load();
    let r = router();
    let h = chat_hashes(30, "x");
    let d = route(&r, &set, &req(&h, None, 0));
    // Other proxies keep the holder busy: its own running + waiting count shows it.
    d.replica.set_external_load(crate::replica::ExternalLoad {
        running: 40,
        waiting: 10,
        kv_usage: 0.9,
    });
    let d2 = route(&r, &set, &req(&h, None, 1));
    assert_ne!(d2.replica.slot, d.replica.slot);
    assert_eq!(d2.kind, DecisionKind::Spill);
    assert_eq!(d2.best_blocks, h.len() as u32);
    assert_eq!(d2.predicted_blocks, 0);
}

#[test]
fn load_floor_keeps_a_prefix_together_at_low_load() {
    let t = table(3);
    let set = t.load();
    let kv = KvAware::new(RoutingConfig::default().kv_aware_params());
    let hashes: Vec<u64> = (0..16).collect();
    let req = RouteRequest {
        block_hashes: &hashes,
        prompt_bytes: 16 * 128,
        ..RouteRequest::default()
    };
    let first = kv.pick(&req, &set, &[]).unwrap();
    kv.on_routed(&req, &first);
    // Up to the floor, requests of one prefix share a replica even though the
    // pure rule would already spill the second one.
    let floor = RoutingConfig::default().load_floor;
    let mut guards = vec![first.replica.begin(0)];
    for _ in 1..floor {
        let d = kv.pick(&req, &set, &[]).unwrap();
        assert_eq!(d.replica.slot, first.replica.slot);
        assert_eq!(d.kind, DecisionKind::Prefix);
        guards.push(d.replica.begin(0));
    }
    let d = kv.pick(&req, &set, &[]).unwrap();
    assert_ne!(
        d.replica.slot, first.replica.slot,
        "over the floor it spills"
    );
    assert_eq!(d.kind, DecisionKind::Spill);
}

#[test]
fn pending_prefill_is_taken_back_once_at_first_output_or_at_the_end() {
    let t = table(1);
    let set = t.load();
    let r = &set.replicas[0];
    let mut a = r.begin(4096);
    let b = r.begin(1000);
    assert_eq!(r.pending_prefill(), 5096);
    a.prefill_done();
    a.prefill_done();
    assert_eq!(r.pending_prefill(), 1000);
    assert_eq!(r.in_flight(), 2, "a request decoding is still in flight");
    drop(a);
    drop(b);
    assert_eq!(r.pending_prefill(), 0);
    assert_eq!(r.in_flight(), 0);
}

#[test]
fn the_chosen_replica_is_charged_only_the_prompt_it_does_not_hold() {
    let t = table(2);
    let set = t.load();
    let r = router();
    let h = chat_hashes(60, "first question");
    let d0 = route(&r, &set, &req(&h, None, 0));
    assert_eq!(
        d0.prefill_bytes,
        (h.len() * 128) as u64,
        "nothing cached yet"
    );
    let d1 = route(&r, &set, &req(&h, None, 1));
    assert_eq!(d1.replica.slot, d0.replica.slot);
    assert_eq!(d1.prefill_bytes, 0, "the whole prompt is predicted cached");
}

/// With `w_prefill`, of two replicas holding the same prefix and carrying one request
/// each, the one still prefilling a long prompt loses to the one that is not,
/// whichever of them rendezvous order would prefer.
#[test]
fn queued_prefill_steers_a_request_to_the_idle_replica() {
    let t = table(2);
    let set = t.load();
    let with = router();
    // The same prefix on both replicas: the request is scored (not placed by
    // consistent hashing), with equal overlap on both.
    let shared = chat_hashes(20, "shared");
    with.index().insert(0, &shared);
    with.index().insert(1, &shared);
    for busy in 0..2u16 {
        let _long = set.replicas[usize::from(busy)].begin(256 * 1024);
        let _short = set.replicas[usize::from(1 - busy)].begin(0);
        let d = with.pick(&req(&shared, None, 0), &set, &[]).unwrap();
        assert_eq!(d.replica.slot, 1 - busy, "busy replica {busy}");
    }
}

/// The queue is charged squared, in units of the larger of the prompt and
/// `prefill_scale_bytes`: a queue a few times a short prompt's size (but small
/// against the scale) does not move the request off the replica holding all of it
/// to one holding half, nor does one well short of the scale, while a queue past
/// the scale does. In units of the prompt alone (a scale of 1 byte), the short
/// queue would have moved it too.
#[test]
fn a_short_queue_keeps_the_cache_and_a_long_one_moves_the_request() {
    let t = table(2);
    let set = t.load();
    let h = chat_hashes(20, "the same conversation");
    let prompt = h.len() * 128;
    assert!(prompt < 4 << 10, "a short prompt: {prompt} bytes");
    let pick = |scale: usize, queued: u64| {
        let r = KvAware::new(
            RoutingConfig {
                load_floor: 0,
                prefill_scale_bytes: scale,
                ..RoutingConfig::default()
            }
            .kv_aware_params(),
        );
        r.index().insert(0, &h);
        r.index().insert(1, &h[..h.len() / 2]);
        let _busy = set.replicas[0].begin(queued);
        let _other = set.replicas[1].begin(0);
        r.pick(&req(&h, None, 0), &set, &[]).unwrap().replica.slot
    };
    let default = RoutingConfig::default().prefill_scale_bytes;
    assert_eq!(pick(default, 16 << 10), 0, "16 KiB queued stays");
    // 0.625 of the scale costs 0.39 squared, under the half a prompt at stake
    // (charged linearly, 0.625 would have moved it).
    assert_eq!(pick(default, 80 << 10), 0, "80 KiB queued stays");
    assert_eq!(pick(default, 256 << 10), 1, "256 KiB queued moves");
    assert_eq!(pick(1, 16 << 10), 1, "per prompt, 16 KiB queued moves");
}

const SHARE_EPSILON: f64 = 0.25;

/// One tenant's requests, one after another (never two in flight, so the
/// in-flight bound never acts): where each went and what each cost.
fn one_tenant(r: &KvAware, set: &ReplicaSet, n: usize) -> (Vec<u16>, usize) {
    let mut slots = Vec::new();
    let mut costly = 0;
    for i in 0..n {
        let h = chat_hashes(60, &format!("question {i}"));
        let d = route(r, set, &req(&h, None, i as u64));
        costly += usize::from(d.predicted_blocks < d.best_blocks);
        slots.push(d.replica.slot);
    }
    (slots, costly)
}

#[test]
fn a_replica_over_its_share_gives_up_the_cheapest_moves_and_few_costly_ones() {
    let t = table(4);
    let set = t.load();
    let r = KvAware::new(
        RoutingConfig {
            load_floor: 0,
            share_epsilon: Some(SHARE_EPSILON),
            ..RoutingConfig::default()
        }
        .kv_aware_params(),
    );
    let (slots, costly) = one_tenant(&r, &set, 4096);
    // Each replica opened as a home of the tenant's prompt once; after that
    // moves between homes cost nothing.
    assert!(
        (1..=6).contains(&costly),
        "{costly} moves re-prefilled the prompt"
    );
    let last = &slots[2048..];
    for s in 0..4u16 {
        let share = last.iter().filter(|&&x| x == s).count() as f64 / last.len() as f64;
        assert!(
            share <= 0.25 * (1.0 + SHARE_EPSILON) + 0.05,
            "slot {s} took {share:.3} of the last 2048"
        );
    }
    assert!(r.counters().spill > 0);
}

#[test]
fn without_the_share_bound_a_tenant_stays_on_one_replica() {
    let t = table(4);
    let set = t.load();
    let r = router();
    assert_eq!(RoutingConfig::default().share_epsilon, None);
    let (slots, costly) = one_tenant(&r, &set, 1024);
    assert_eq!(costly, 0);
    assert!(slots.iter().all(|&s| s == slots[0]));
}
