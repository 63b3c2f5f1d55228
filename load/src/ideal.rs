//! Ideal hit ratio: what one infinitely large prefix cache shared by all replicas would hit.
//! This is the ceiling a router's measured hit ratio is compared against.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::plan::PlannedRequest;

/// Fraction of segment weight (tokens for traces, bytes for synthetic workloads) whose segment
/// id already appeared in an earlier request, in the given order. Ids are prefix-chained (an
/// id implies the whole prefix before it), so a seen id means the cache holds the block with
/// its prefix. Repeats within one request do not count: a request cannot hit its own blocks.
pub fn ideal_hit_ratio<'a>(requests: impl IntoIterator<Item = &'a PlannedRequest>) -> f64 {
    let mut seen = HashSet::new();
    let (mut hit, mut total) = (0u64, 0u64);
    for req in requests {
        for g in &req.segments {
            total += g.weight;
            if seen.contains(&g.id) {
                hit += g.weight;
            }
        }
        seen.extend(req.segments.iter().map(|g| g.id));
    }
    if total == 0 {
        0.0
    } else {
        hit as f64 / total as f64
    }
}

/// Prompt bytes each request would still have to prefill with one infinite prefix cache:
/// the bytes of its segments that no earlier request carried. With a replica's prefill rate
/// this gives the TTFT floor no router can beat (perfect cache, no queueing), against which
/// a router's TTFT tail is read: how much of it is the prompts' own prefill and how much is
/// the router's doing.
pub fn ideal_uncached_bytes<'a>(
    requests: impl IntoIterator<Item = &'a PlannedRequest>,
) -> Vec<u64> {
    let mut seen = HashSet::new();
    requests
        .into_iter()
        .map(|req| {
            let uncached = req
                .segments
                .iter()
                .filter(|g| !seen.contains(&g.id))
                .map(|g| g.bytes as u64)
                .sum();
            seen.extend(req.segments.iter().map(|g| g.id));
            uncached
        })
        .collect()
}

/// Hit ratio of one LRU prefix cache holding `capacity_bytes` of prompt, shared by all
/// replicas: what the fleet's KV capacity could hit if it were a single cache. Weighted like
/// [`ideal_hit_ratio`], but a request hits only its leading segments still held (a prefix
/// cache stops at the first missing block), and each request then makes all of its segments
/// the most recent, its first segment most of all, since engines free a sequence's blocks
/// tail first. With caches of a fixed size, this, not the infinite-cache ideal, is the
/// ceiling that routers' hit ratios are read against.
pub fn lru_hit_ratio<'a>(
    requests: impl IntoIterator<Item = &'a PlannedRequest>,
    capacity_bytes: u64,
) -> f64 {
    // id -> (last use, bytes held); last use -> id, oldest first.
    let mut held: HashMap<u64, (u64, u64)> = HashMap::new();
    let mut by_age: BTreeMap<u64, u64> = BTreeMap::new();
    let (mut used, mut clock) = (0u64, 0u64);
    let (mut hit, mut total) = (0u64, 0u64);
    for req in requests {
        let leading = req
            .segments
            .iter()
            .take_while(|g| held.contains_key(&g.id))
            .count();
        hit += req.segments[..leading]
            .iter()
            .map(|g| g.weight)
            .sum::<u64>();
        total += req.segments.iter().map(|g| g.weight).sum::<u64>();
        for g in req.segments.iter().rev() {
            clock += 1;
            let bytes = g.bytes as u64;
            match held.get_mut(&g.id) {
                Some((at, size)) => {
                    by_age.remove(at);
                    *at = clock;
                    if bytes > *size {
                        used += bytes - *size;
                        *size = bytes;
                    }
                }
                None => {
                    held.insert(g.id, (clock, bytes));
                    used += bytes;
                }
            }
            by_age.insert(clock, g.id);
        }
        while used > capacity_bytes {
            let Some((_, id)) = by_age.pop_first() else {
                break;
            };
            if let Some((_, size)) = held.remove(&id) {
                used -= size;
            }
        }
    }
    if total == 0 {
        0.0
    } else {
        hit as f64 / total as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{lower_entry, TraceEntry};

    fn req(input: u64, ids: &[u64]) -> PlannedRequest {
        let e = TraceEntry {
            timestamp: 0,
            input_length: input,
            output_length: 1,
            hash_ids: ids.to_vec(),
        };
        lower_entry(&e, 512, 1.0)
    }

    /// r1: [0 1 2] = 512+512+100 tokens, nothing cached.
    /// r2: [0 1 3] = 512+512+200 tokens, blocks 0 and 1 cached: 1024 hit.
    /// r3: [0 4]   = 512+50 tokens, block 0 cached: 512 hit.
    /// r4: [5]     = 300 tokens, nothing.
    fn hand_made() -> [PlannedRequest; 4] {
        [
            req(1124, &[0, 1, 2]),
            req(1224, &[0, 1, 3]),
            req(562, &[0, 4]),
            req(300, &[5]),
        ]
    }

    #[test]
    fn hand_made_trace() {
        let rs = hand_made();
        let total = 1124 + 1224 + 562 + 300;
        let expected = (1024 + 512) as f64 / total as f64;
        assert!((ideal_hit_ratio(&rs) - expected).abs() < 1e-12);
        // At 512 bytes per 512-token block, bytes equal tokens.
        assert_eq!(ideal_uncached_bytes(&rs), [1124, 200, 50, 300]);
    }

    #[test]
    fn empty_and_no_sharing() {
        assert_eq!(ideal_hit_ratio(&[]), 0.0);
        assert!(ideal_uncached_bytes(&[]).is_empty());
        assert_eq!(ideal_hit_ratio(&[req(10, &[1]), req(10, &[2])]), 0.0);
    }

    /// The hand-made trace again, with room for less than all of it.
    #[test]
    fn lru_hits_only_what_still_fits() {
        let rs = hand_made();
        // Room for everything: the infinite-cache ideal.
        assert!((lru_hit_ratio(&rs, u64::MAX) - ideal_hit_ratio(&rs)).abs() < 1e-12);
        // Room for nothing: no hits.
        assert_eq!(lru_hit_ratio(&rs, 0), 0.0);
        // 1124 bytes: r1 fits whole; r2 hits blocks 0 and 1 and adds block 3 (200 bytes),
        // so the least recent go, block 2 and then block 3 itself; r3 hits block 0.
        let total = (1124 + 1224 + 562 + 300) as f64;
        assert!((lru_hit_ratio(&rs, 1124) - (1024 + 512) as f64 / total).abs() < 1e-12);
        // 1000 bytes: r1's least recent segments go, block 2 and then block 1 (touched
        // before block 0), so r2 and r3 each hit block 0 only.
        assert!((lru_hit_ratio(&rs, 1000) - (512 + 512) as f64 / total).abs() < 1e-12);
    }

    #[test]
    fn identical_requests() {
        // The second copy hits everything: 1/2 of the weight overall.
        assert!((ideal_hit_ratio(&[req(700, &[1, 2]), req(700, &[1, 2])]) - 0.5).abs() < 1e-12);
    }
}
