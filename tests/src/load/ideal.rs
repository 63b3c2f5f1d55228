//! Ideal hit ratio: what one infinitely large prefix cache shared by all replicas would hit.
//! This is the ceiling a router's measured hit ratio is compared against.

use std::collections::HashSet;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::trace::{lower_entry, TraceEntry};

    fn req(input: u64, ids: &[u64]) -> PlannedRequest {
        let e = TraceEntry {
            timestamp: 0,
            input_length: input,
            output_length: 1,
            hash_ids: ids.to_vec(),
        };
        lower_entry(&e, 512, 1.0)
    }

    #[test]
    fn hand_made_trace() {
        // r1: [0 1 2] = 512+512+100 tokens, nothing cached.
        // r2: [0 1 3] = 512+512+200 tokens, blocks 0 and 1 cached: 1024 hit.
        // r3: [0 4]   = 512+50 tokens, block 0 cached: 512 hit.
        // r4: [5]     = 300 tokens, nothing.
        let rs = [
            req(1124, &[0, 1, 2]),
            req(1224, &[0, 1, 3]),
            req(562, &[0, 4]),
            req(300, &[5]),
        ];
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

    #[test]
    fn identical_requests() {
        // The second copy hits everything: 1/2 of the weight overall.
        assert!((ideal_hit_ratio(&[req(700, &[1, 2]), req(700, &[1, 2])]) - 0.5).abs() < 1e-12);
    }
}
