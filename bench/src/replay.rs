//! Offline replay: a load plan through a kvroute router and the simulator's own cache and
//! prefill models, in simulated time, with no process, socket or clock.
//!
//! Why: the routing benchmark (`cargo xtask bench routing`) is the acceptance test, but one
//! pair of runs takes a minute and moves by ±0.4 points of hit ratio from scheduling noise
//! alone, which hides the tenths a routing default is chosen by. This replay makes the same
//! decisions against the same models deterministically in seconds, so a weight sweep shows
//! the shape of the hit/TTFT trade-off; candidates are then confirmed on the real benchmark.
//!
//! What it leaves out: the proxy's and network's latency, the load generator's lag and the
//! simulator's decode batching within a request (a request's decode steps all take the step
//! time of its first token). The router sees what it sees in the benchmark: its own in-flight
//! counts and predicted prefill; there is no control daemon, so no replica-reported load or KV
//! usage (which is why the engines' reserved blocks are not tracked either).

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap};

use kvroute_core::prefix::analyze;
use kvroute_core::replica::{InFlight, Replica, ReplicaSpec, ReplicaTable};
use kvroute_core::route::{Decision, DecisionKind, ResponseReport, RoutingConfig};

use kvroute_load::body;
use kvroute_load::plan::Plan;
use kvroute_load::stats::percentile;
use kvroute_load::ApiMode;
use kvroute_sim::cache::{block_hashes, KvCache};
use kvroute_sim::engine::{Admission, Engine, Timing};
use kvroute_sim::request::{Endpoint, SimRequest};

const MODEL: &str = "sim-model";

/// The simulated fleet, as `kvroute-sim` flags would set it.
#[derive(Clone, Debug)]
pub struct FleetModel {
    pub replicas: usize,
    pub kv_blocks: usize,
    pub block_tokens: usize,
    pub timing: Timing,
    pub max_seqs: usize,
    /// Replica `i`'s prefill runs at `timing.prefill_tps × prefill_speeds[i % len]` (empty: all
    /// at `timing.prefill_tps`), as [`crate::fleet::SimSpec::prefill_speeds`].
    pub prefill_speeds: Vec<f64>,
}

#[derive(Clone, Debug, Default)]
pub struct ReplayResult {
    pub requests: u64,
    /// Requests no replica was picked for (the proxy's 503).
    pub unrouted: u64,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub hit_ratio: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p90_ms: f64,
    pub ttft_p99_ms: f64,
    pub imbalance: f64,
    pub per_replica: Vec<u64>,
    pub decisions: BTreeMap<&'static str, u64>,
    /// Sum over decisions other than session affinity of (best overlap − chosen
    /// overlap) / prompt blocks: overlap given up for load, in prompts' worth.
    pub regret: f64,
}

/// Events at equal times run in the order they were scheduled.
struct Event {
    at: f64,
    seq: u64,
    what: What,
}

enum What {
    /// Turn `turn` of session `session` is sent.
    Arrive {
        session: usize,
        turn: usize,
    },
    /// Request `id`'s prefill is done: its first token, and its blocks enter the cache.
    Prefilled {
        id: usize,
    },
    Finish {
        id: usize,
    },
}

impl PartialEq for Event {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Event {}
impl PartialOrd for Event {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Event {
    /// Reversed: `BinaryHeap` pops the largest, the replay wants the earliest.
    fn cmp(&self, o: &Self) -> Ordering {
        o.at.total_cmp(&self.at).then(o.seq.cmp(&self.seq))
    }
}

struct Sim {
    cache: KvCache,
    engine: Engine,
}

struct Live {
    session: usize,
    turn: usize,
    replica: usize,
    arrived: f64,
    prompt: Vec<u8>,
    hashes: Vec<u64>,
    prompt_tokens: usize,
    max_tokens: u32,
    in_flight: InFlight,
    decision: Decision,
    cached_tokens: usize,
}

/// Simulated seconds on the millisecond clock routers are given.
fn ms(t: f64) -> u64 {
    (t * 1e3) as u64
}

/// Replays `plan` (completions API) through the policy `routing` configures.
pub fn replay(plan: &Plan, fleet: &FleetModel, routing: &RoutingConfig) -> ReplayResult {
    let specs = (0..fleet.replicas)
        .map(|i| ReplicaSpec {
            models: vec![MODEL.into()],
            kv_blocks: Some(fleet.kv_blocks as u64),
            kv_block_tokens: Some(fleet.block_tokens as u32),
            ..ReplicaSpec::new(format!("http://127.0.0.1:{}", 20000 + i))
        })
        .collect();
    let table = ReplicaTable::new(specs).expect("distinct replica urls");
    let set = table.load();
    let router = routing.build();
    router.on_replicas_changed(&set);
    let slot_index: BTreeMap<u16, usize> = set
        .replicas
        .iter()
        .enumerate()
        .map(|(i, r)| (r.slot, i))
        .collect();
    let mut sims: Vec<Sim> = (0..fleet.replicas)
        .map(|i| {
            let mut timing = fleet.timing.clone();
            if !fleet.prefill_speeds.is_empty() {
                timing.prefill_tps *= fleet.prefill_speeds[i % fleet.prefill_speeds.len()];
            }
            Sim {
                cache: KvCache::new(fleet.kv_blocks, fleet.block_tokens),
                engine: Engine::new(timing, fleet.max_seqs),
            }
        })
        .collect();
    let prefix = routing.prefix();
    let path = body::path(ApiMode::Completions);

    let mut out = ReplayResult {
        per_replica: vec![0; fleet.replicas],
        ..Default::default()
    };
    let mut ttft_ms = Vec::with_capacity(plan.request_count());
    let mut heap = BinaryHeap::new();
    let mut seq = 0u64;
    let mut push = |heap: &mut BinaryHeap<Event>, at: f64, what: What| {
        seq += 1;
        heap.push(Event { at, seq, what });
    };
    for (s, session) in plan.sessions.iter().enumerate() {
        if !session.requests.is_empty() {
            push(
                &mut heap,
                session.start.as_secs_f64(),
                What::Arrive {
                    session: s,
                    turn: 0,
                },
            );
        }
    }
    // Indexed by request id, which is also the engines' sequence id.
    let mut live: Vec<Option<Live>> = Vec::new();

    // Lookup and prefill of a running request; returns when its first token is out.
    let start_prefill = |sim: &mut Sim, l: &mut Live, now: f64, out: &mut ReplayResult| -> f64 {
        let matched = sim.cache.lookup(&l.hashes);
        let cached = (matched * fleet.block_tokens).min(l.prompt_tokens);
        l.cached_tokens = cached;
        out.prompt_tokens += l.prompt_tokens as u64;
        out.cached_tokens += cached as u64;
        sim.engine.prefill(now, l.prompt_tokens - cached)
    };

    while let Some(Event { at: now, what, .. }) = heap.pop() {
        match what {
            What::Arrive { session, turn } => {
                let req = &plan.sessions[session].requests[turn];
                out.requests += 1;
                let body = body::render(req, ApiMode::Completions, MODEL);
                let analyzed = analyze(path, &body, &prefix).expect("rendered bodies parse");
                let rr = analyzed.route_request(path, None, ms(now));
                let Some(decision) = router.pick(&rr, &set, &[]) else {
                    out.unrouted += 1;
                    if turn + 1 < plan.sessions[session].requests.len() {
                        push(
                            &mut heap,
                            now,
                            What::Arrive {
                                session,
                                turn: turn + 1,
                            },
                        );
                    }
                    continue;
                };
                *out.decisions.entry(decision.kind.as_str()).or_default() += 1;
                if decision.kind != DecisionKind::Session && !rr.block_hashes.is_empty() {
                    out.regret +=
                        f64::from(decision.regret_blocks()) / rr.block_hashes.len() as f64;
                }
                let replica = slot_index[&decision.replica.slot];
                out.per_replica[replica] += 1;
                // What the simulator makes of the body: its prompt bytes and tokens.
                let sim_req = SimRequest::parse(Endpoint::Completions, &body)
                    .expect("the simulator parses rendered bodies");
                let prompt_tokens = sim_req.prompt_tokens();
                let prompt = sim_req.prompt;
                let hashes = block_hashes(&prompt, sims[replica].cache.block_bytes());
                let in_flight =
                    Replica::begin_at(&decision.replica, decision.prefill_bytes, ms(now));
                // After `begin`, as the proxy does once the request is sent.
                router.on_routed(&rr, &decision);
                let id = live.len();
                let l = Live {
                    session,
                    turn,
                    replica,
                    arrived: now,
                    prompt,
                    hashes,
                    prompt_tokens,
                    max_tokens: req.max_tokens,
                    in_flight,
                    decision,
                    cached_tokens: 0,
                };
                let sim = &mut sims[replica];
                let mut l = l;
                match sim.engine.arrive(id as u64) {
                    Admission::Running => {
                        let done = start_prefill(sim, &mut l, now, &mut out);
                        push(&mut heap, done, What::Prefilled { id });
                    }
                    // Started by the `Finish` that frees a running slot.
                    Admission::Waiting => {}
                }
                live.push(Some(l));
            }
            What::Prefilled { id } => {
                let l = live[id].as_mut().expect("live until finished");
                let sim = &mut sims[l.replica];
                sim.cache.insert(&l.prompt, &l.hashes);
                l.in_flight.prefill_done_at(ms(now));
                ttft_ms.push((now - l.arrived) * 1e3);
                let decode = f64::from(l.max_tokens.saturating_sub(1)) * sim.engine.decode_step();
                push(&mut heap, now + decode, What::Finish { id });
            }
            What::Finish { id } => {
                let l = live[id].take().expect("finishes once");
                let sim = &mut sims[l.replica];
                if let Some(next) = sim.engine.finish() {
                    let nid = next as usize;
                    let nl = live[nid].as_mut().expect("a waiting request is live");
                    let done = start_prefill(sim, nl, now, &mut out);
                    push(&mut heap, done, What::Prefilled { id: nid });
                }
                // What the proxy reports of a streamed response with usage.
                let report = ResponseReport {
                    prompt_tokens: Some(l.prompt_tokens as u64),
                    cached_tokens: Some(l.cached_tokens as u64),
                    ttft_ms: l.in_flight.ttft_ms(),
                };
                router.on_response(&l.decision, &report);
                drop(l.in_flight);
                if l.turn + 1 < plan.sessions[l.session].requests.len() {
                    push(
                        &mut heap,
                        now,
                        What::Arrive {
                            session: l.session,
                            turn: l.turn + 1,
                        },
                    );
                }
            }
        }
    }

    out.hit_ratio = out.cached_tokens as f64 / out.prompt_tokens.max(1) as f64;
    ttft_ms.sort_by(f64::total_cmp);
    out.ttft_p50_ms = percentile(&ttft_ms, 50.0);
    out.ttft_p90_ms = percentile(&ttft_ms, 90.0);
    out.ttft_p99_ms = percentile(&ttft_ms, 99.0);
    let routed: u64 = out.per_replica.iter().sum();
    let max = out.per_replica.iter().copied().max().unwrap_or(0);
    out.imbalance = if routed == 0 {
        0.0
    } else {
        max as f64 * fleet.replicas as f64 / routed as f64
    };
    out
}

#[cfg(test)]
mod tests {
    use kvroute_core::route::PolicyKind;
    use kvroute_load::synthetic::{plan, SharedPrefixConfig};

    use super::*;

    fn workload() -> Plan {
        plan(&SharedPrefixConfig {
            groups: 6,
            users: 4,
            turns: 3,
            system_bytes: 8192,
            question_bytes: 256,
            answer_bytes: 256,
            rate: 50.0,
            max_tokens: 8,
            seed: 7,
            ..SharedPrefixConfig::default()
        })
    }

    fn fleet(kv_blocks: usize) -> FleetModel {
        FleetModel {
            replicas: 3,
            kv_blocks,
            block_tokens: 16,
            timing: Timing {
                time_scale: 0.1,
                ..Timing::default()
            },
            max_seqs: 4,
            prefill_speeds: Vec::new(),
        }
    }

    fn policy(p: PolicyKind) -> RoutingConfig {
        RoutingConfig {
            policy: p,
            ..RoutingConfig::default()
        }
    }

    /// One running sequence per replica, so most requests wait for a slot first.
    #[test]
    fn every_request_is_served_once_and_counted() {
        let plan = workload();
        let f = FleetModel {
            max_seqs: 1,
            ..fleet(4096)
        };
        let r = replay(&plan, &f, &policy(PolicyKind::KvAware));
        let n = plan.request_count() as u64;
        assert_eq!((r.requests, r.unrouted), (n, 0));
        assert_eq!(r.per_replica.iter().sum::<u64>(), n);
        assert_eq!(r.decisions.values().sum::<u64>(), n);
        let tokens: usize = plan
            .requests_in_order()
            .map(|q| body::prompt(q).len().div_ceil(4).max(1))
            .sum();
        assert_eq!(r.prompt_tokens, tokens as u64);
        assert!(r.ttft_p50_ms > 0.0 && r.ttft_p50_ms <= r.ttft_p99_ms);
    }

    /// Simulated time, no clock: the same inputs give the same numbers, which is
    /// what makes small differences between settings readable.
    #[test]
    fn replay_is_deterministic() {
        let plan = workload();
        let run = || {
            let r = replay(&plan, &fleet(512), &policy(PolicyKind::KvAware));
            (r.cached_tokens, r.per_replica, r.ttft_p99_ms.to_bits())
        };
        assert_eq!(run(), run());
    }

    /// Tenants' system prompts fit one replica's cache but not every replica's at
    /// once: kv-aware keeps each tenant on one replica and hits far more often than
    /// round-robin, which makes every replica hold every tenant.
    #[test]
    fn kv_aware_hits_more_than_round_robin_when_caches_are_tight() {
        let plan = workload();
        let f = fleet(1200);
        let kv = replay(&plan, &f, &policy(PolicyKind::KvAware));
        let rr = replay(&plan, &f, &policy(PolicyKind::RoundRobin));
        assert!(
            kv.hit_ratio > rr.hit_ratio + 0.1,
            "kv-aware {:.3}, round-robin {:.3}",
            kv.hit_ratio,
            rr.hit_ratio
        );
    }
}
