//! Consistent hashing with bounded load: rendezvous (highest random weight) hashing
//! of a prompt's anchor onto replicas keyed by URL, skipping replicas whose load
//! would exceed `(1+ε)·mean`.
//!
//! Why URLs, not slots: slots are this process's bookkeeping; several kvroute
//! instances (or one after a restart) given the same replica list must agree on
//! where an unseen prefix goes, so the same replica warms up for it everywhere.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use smallvec::SmallVec;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use super::{candidates, Decision, DecisionKind, RouteRequest, Router};
use crate::replica::{Replica, ReplicaSet};

/// Seeds the fallback anchor of prompts too short for a block.
const SESSION_ANCHOR_SEED: u64 = 0x5e55_1011_a7c4_0001;

/// A replica as the bound sees it, computed once per decision.
#[derive(Debug, Clone)]
pub struct Candidate<'s> {
    pub replica: &'s Arc<Replica>,
    /// See [`replica_load`].
    pub load: u64,
    pub weight: u64,
    /// The replica's reported KV cache usage, 0..=1.
    pub kv_usage: f32,
    /// See [`Replica::pending_prefill`].
    pub pending_prefill: u64,
    /// Requests the replica itself reports waiting (all proxies').
    pub waiting: u32,
}

impl<'s> Candidate<'s> {
    pub fn new(replica: &'s Arc<Replica>) -> Self {
        let ext = replica.external_load();
        Candidate {
            replica,
            // Not their sum: see `replica_load`.
            load: u64::from(replica.in_flight())
                .max(u64::from(ext.running) + u64::from(ext.waiting)),
            weight: u64::from(replica.spec.weight.max(1)),
            kv_usage: ext.kv_usage,
            pending_prefill: replica.pending_prefill(),
            waiting: ext.waiting,
        }
    }
}

/// A replica's load for the bound: this proxy's in-flight count, or the replica's
/// own running + waiting count when larger. Not their sum: the replica's count
/// already includes ours; only other proxies' requests show up there alone.
pub fn replica_load(r: &Replica) -> u64 {
    let ext = r.external_load();
    u64::from(r.in_flight()).max(u64::from(ext.running) + u64::from(ext.waiting))
}

/// The hash that identifies a replica across kvroute instances.
pub fn url_key(url: &str) -> u64 {
    xxh3_64(url.trim_end_matches('/').as_bytes())
}

/// The hash an unseen prefix is placed by: the chain hash after `anchor_blocks`
/// blocks (fewer if the prompt is shorter), so prompts sharing their first
/// ~`anchor_bytes` land together. Without a full block, the session (with the
/// model) stands in; without either there is no anchor.
pub fn anchor(
    hashes: &[u64],
    anchor_blocks: usize,
    model: Option<&str>,
    session: Option<&[u8]>,
) -> Option<u64> {
    if let Some(last) = hashes
        .get(..anchor_blocks.max(1).min(hashes.len()))
        .and_then(|h| h.last())
    {
        return Some(*last);
    }
    let session = session?;
    let m = xxh3_64_with_seed(model.unwrap_or("").as_bytes(), SESSION_ANCHOR_SEED);
    Some(xxh3_64_with_seed(session, m))
}

/// Weighted rendezvous score: `w / -ln(u)` with `u` uniform in (0,1) from the
/// (anchor, replica) pair, so a replica wins a share of anchors proportional to
/// its weight, and removing one moves only the anchors it had.
pub fn hrw_score(anchor: u64, url_key: u64, weight: u64) -> f64 {
    let h = xxh3_64_with_seed(&anchor.to_le_bytes(), url_key);
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    weight as f64 / -u.ln()
}

/// The `(1+ε)·mean` rule over one decision's candidates, this request included,
/// above an absolute floor.
#[derive(Debug, Clone, Copy)]
pub struct LoadBound {
    total_load: u64,
    total_weight: u64,
    epsilon: f64,
    floor: u64,
}

impl LoadBound {
    /// `floor`: a replica with fewer requests than this is never over the bound.
    /// At low load the pure rule is a hair trigger (with 3 idle replicas and one
    /// request still finishing, a second request on the same replica already
    /// "exceeds" it) and would scatter a prefix for no gain: an inference engine
    /// batches dozens of sequences at the cost of one.
    pub fn new(cands: &[Candidate<'_>], epsilon: f64, floor: u64) -> Self {
        LoadBound {
            total_load: cands.iter().map(|c| c.load).sum(),
            total_weight: cands.iter().map(|c| c.weight).sum::<u64>().max(1),
            epsilon: epsilon.max(0.0),
            floor,
        }
    }

    /// Most load a replica of `weight` may carry after taking this request:
    /// `max(⌈(1+ε)·(L+1)·w/W⌉, floor)`. The ceiling guarantees some candidate
    /// always fits, since loads are whole numbers summing to L < Σ capacities.
    pub fn capacity(&self, weight: u64) -> u64 {
        let share = (self.total_load + 1) as f64 * weight as f64 / self.total_weight as f64;
        (((1.0 + self.epsilon) * share).ceil() as u64)
            .max(self.floor)
            .max(1)
    }

    pub fn admits(&self, c: &Candidate<'_>) -> bool {
        c.load < self.capacity(c.weight)
    }
}

/// Whether rank `a` beats `b`: higher first component, then higher second. Equal
/// ranks do not, so the earliest of equals stays chosen.
pub fn outranks(a: (f64, f64), b: (f64, f64)) -> bool {
    a.0 > b.0 || (a.0 == b.0 && a.1 > b.1)
}

/// Among `cands`, the best by `rank` (higher wins) and the best by `rank` that the
/// bound admits, in one pass; `None` when there are no candidates.
pub fn best_admitted<F: Fn(&Candidate<'_>) -> (f64, f64)>(
    cands: &[Candidate<'_>],
    bound: &LoadBound,
    rank: F,
) -> Option<(usize, usize)> {
    let mut preferred: Option<(usize, (f64, f64))> = None;
    let mut admitted: Option<(usize, (f64, f64))> = None;
    for (i, c) in cands.iter().enumerate() {
        let r = rank(c);
        if preferred.is_none_or(|(_, p)| outranks(r, p)) {
            preferred = Some((i, r));
        }
        if bound.admits(c) && admitted.is_none_or(|(_, p)| outranks(r, p)) {
            admitted = Some((i, r));
        }
    }
    let (p, _) = preferred?;
    // The bound always admits someone; should float rounding ever disagree, the
    // preferred replica takes it rather than failing the request.
    let (a, _) = admitted.unwrap_or((p, (0.0, 0.0)));
    Some((p, a))
}

/// The index of the best by `rank` among the candidates `keep` accepts (the
/// earliest of equals); `None` when it accepts none.
pub fn best_where<F: Fn(&Candidate<'_>) -> (f64, f64)>(
    cands: &[Candidate<'_>],
    keep: impl Fn(usize) -> bool,
    rank: F,
) -> Option<usize> {
    let mut best: Option<(usize, (f64, f64))> = None;
    for (i, c) in cands.iter().enumerate() {
        if !keep(i) {
            continue;
        }
        let r = rank(c);
        if best.is_none_or(|(_, b)| outranks(r, b)) {
            best = Some((i, r));
        }
    }
    best.map(|(i, _)| i)
}

/// Places `anchor` by rendezvous hashing under the bound: (index, spilled).
pub fn place(anchor: u64, cands: &[Candidate<'_>], bound: &LoadBound) -> Option<(usize, bool)> {
    let (p, a) = best_admitted(cands, bound, |c| {
        (hrw_score(anchor, c.replica.url_key, c.weight), 0.0)
    })?;
    Some((a, a != p))
}

/// Requests without an anchor rotate over the replicas the bound admits.
pub fn rotate(next: &AtomicUsize, cands: &[Candidate<'_>], bound: &LoadBound) -> Option<usize> {
    if cands.is_empty() {
        return None;
    }
    let start = next.fetch_add(1, Ordering::Relaxed);
    (0..cands.len())
        .map(|i| (start + i) % cands.len())
        .find(|&i| bound.admits(&cands[i]))
        .or(Some(start % cands.len()))
}

/// The `consistent-hash` policy: every request placed by its anchor under the
/// load bound, no prefix index. Deterministic across kvroute instances.
pub struct ConsistentHash {
    anchor_blocks: usize,
    epsilon: f64,
    load_floor: u64,
    next: AtomicUsize,
}

impl ConsistentHash {
    pub fn new(anchor_blocks: usize, epsilon: f64, load_floor: u64) -> Self {
        ConsistentHash {
            anchor_blocks,
            epsilon,
            load_floor,
            next: AtomicUsize::new(0),
        }
    }
}

impl Router for ConsistentHash {
    fn name(&self) -> &'static str {
        "consistent-hash"
    }

    fn pick(&self, req: &RouteRequest<'_>, set: &ReplicaSet, exclude: &[u16]) -> Option<Decision> {
        let cands: SmallVec<[Candidate<'_>; 16]> = candidates(set, req.model, exclude, req.now_ms)
            .map(Candidate::new)
            .collect();
        let bound = LoadBound::new(&cands, self.epsilon, self.load_floor);
        let (i, kind) = match anchor(req.block_hashes, self.anchor_blocks, req.model, req.session) {
            Some(a) => {
                let (i, spilled) = place(a, &cands, &bound)?;
                (
                    i,
                    if spilled {
                        DecisionKind::Spill
                    } else {
                        DecisionKind::Consistent
                    },
                )
            }
            None => (
                rotate(&self.next, &cands, &bound)?,
                DecisionKind::RoundRobin,
            ),
        };
        Some(Decision::simple(cands[i].replica.clone(), kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::{ReplicaSpec, ReplicaTable};
    use proptest::prelude::*;

    #[test]
    fn best_where_takes_the_best_kept_and_the_earliest_of_equals() {
        let t = table([7001, 7002, 7003, 7004]);
        let set = t.load();
        let cands: Vec<Candidate<'_>> = set.replicas.iter().map(Candidate::new).collect();
        // Ranks by port: 7001 → (1, 0), 7002 → (2, 5), 7003 → (2, 5), 7004 → (2, 9).
        let rank = |c: &Candidate<'_>| match c.replica.addr.port() {
            7001 => (1.0, 0.0),
            7002 | 7003 => (2.0, 5.0),
            _ => (2.0, 9.0),
        };
        assert_eq!(best_where(&cands, |_| true, rank), Some(3));
        assert_eq!(best_where(&cands, |i| i != 3, rank), Some(1));
        assert_eq!(best_where(&cands, |i| i == 0 || i == 2, rank), Some(2));
        assert_eq!(best_where(&cands, |_| false, rank), None);
        assert!(outranks((2.0, 0.0), (1.0, 9.0)) && !outranks((2.0, 5.0), (2.0, 5.0)));
    }

    fn table(ports: impl IntoIterator<Item = u16>) -> ReplicaTable {
        ReplicaTable::new(
            ports
                .into_iter()
                .map(|p| ReplicaSpec::new(format!("http://127.0.0.1:{p}")))
                .collect(),
        )
        .unwrap()
    }

    fn owners(set: &ReplicaSet, anchors: &[u64]) -> Vec<String> {
        let cands: Vec<Candidate<'_>> = set.replicas.iter().map(Candidate::new).collect();
        let bound = LoadBound::new(&cands, 0.25, 0);
        anchors
            .iter()
            .map(|&a| {
                cands[place(a, &cands, &bound).unwrap().0]
                    .replica
                    .spec
                    .url
                    .clone()
            })
            .collect()
    }

    #[test]
    fn membership_change_moves_about_one_nth() {
        let anchors: Vec<u64> = (0..20_000u64).map(|i| xxh3_64(&i.to_le_bytes())).collect();
        let n = 10;
        let before = owners(&table(9000..9000 + n).load(), &anchors);
        // Remove one: only its anchors move.
        let after = owners(&table(9001..9000 + n).load(), &anchors);
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        let on_removed = before.iter().filter(|u| u.ends_with(":9000")).count();
        assert_eq!(moved, on_removed);
        let frac = moved as f64 / anchors.len() as f64;
        assert!((0.08..0.12).contains(&frac), "removal moved {frac}");
        // Add one: only anchors that go to the newcomer move.
        let grown = owners(&table(9000..9001 + n).load(), &anchors);
        let moved: Vec<_> = before.iter().zip(&grown).filter(|(a, b)| a != b).collect();
        assert!(moved
            .iter()
            .all(|(_, b)| b.ends_with(&format!(":{}", 9000 + n))));
        let frac = moved.len() as f64 / anchors.len() as f64;
        assert!((0.07..0.11).contains(&frac), "addition moved {frac}");
    }

    #[test]
    fn slots_do_not_matter_urls_do() {
        let anchors: Vec<u64> = (0..500u64).collect();
        let a = owners(&table([9000, 9001, 9002]).load(), &anchors);
        let b = owners(&table([9002, 9000, 9001]).load(), &anchors);
        assert_eq!(a, b);
    }

    #[test]
    fn anchor_prefers_the_kth_block_then_session() {
        let h = [1, 2, 3, 4];
        assert_eq!(anchor(&h, 2, None, None), Some(2));
        assert_eq!(anchor(&h, 8, None, None), Some(4));
        assert_eq!(anchor(&[], 8, None, None), None);
        let s1 = anchor(&[], 8, Some("m"), Some(b"s"));
        assert!(s1.is_some());
        assert_ne!(s1, anchor(&[], 8, Some("m2"), Some(b"s")));
    }

    #[test]
    fn weights_shift_shares() {
        let mut specs: Vec<ReplicaSpec> = (0..2)
            .map(|i| ReplicaSpec::new(format!("http://127.0.0.1:{}", 9100 + i)))
            .collect();
        specs[1].weight = 3;
        let t = ReplicaTable::new(specs).unwrap();
        let anchors: Vec<u64> = (0..8000u64).map(|i| xxh3_64(&i.to_le_bytes())).collect();
        let heavy = owners(&t.load(), &anchors)
            .iter()
            .filter(|u| u.ends_with(":9101"))
            .count();
        let frac = heavy as f64 / anchors.len() as f64;
        assert!((0.70..0.80).contains(&frac), "{frac}");
    }

    proptest! {
        /// Requests arrive and finish at random; every placement respects the bound
        /// computed at that moment, and a hot anchor spreads instead of piling up.
        #[test]
        fn bound_is_never_exceeded(
            n in 2usize..12,
            eps in prop_oneof![Just(0.0), Just(0.25), Just(1.0)],
            events in proptest::collection::vec((any::<bool>(), 0u64..4, any::<u16>()), 1..300),
        ) {
            let t = table(9200..9200 + n as u16);
            let set = t.load();
            let mut guards: Vec<crate::replica::InFlight> = Vec::new();
            for (arrive, anchor_id, pick) in events {
                if arrive || guards.is_empty() {
                    let cands: Vec<Candidate<'_>> = set.replicas.iter().map(Candidate::new).collect();
                    let bound = LoadBound::new(&cands, eps, 0);
                    let (i, _) = place(anchor_id, &cands, &bound).unwrap();
                    let c = &cands[i];
                    prop_assert!(c.load < bound.capacity(c.weight));
                    let total: u64 = cands.iter().map(|c| c.load).sum::<u64>() + 1;
                    let mean = total as f64 / n as f64;
                    prop_assert!((c.load + 1) as f64 <= ((1.0 + eps) * mean).ceil());
                    guards.push(c.replica.begin(0));
                } else {
                    let k = usize::from(pick) % guards.len();
                    guards.swap_remove(k);
                }
            }
        }
    }
}
