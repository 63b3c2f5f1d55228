//! Property: synthesized prompts of two trace entries share exactly the bytes their block ids
//! share. Prefixes of k×block-bytes are equal when the first k ids are equal, and the prompts
//! diverge within block k when id k differs.

use kvroute_load::body::prompt;
use kvroute_load::trace::{lower_entry, TraceEntry};
use proptest::prelude::*;

fn entry(ids: Vec<u64>, last_tokens: u64) -> TraceEntry {
    let input_length = 512 * (ids.len() as u64 - 1) + last_tokens;
    TraceEntry {
        timestamp: 0,
        input_length,
        output_length: 10,
        hash_ids: ids,
    }
}

fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

proptest! {
    #[test]
    fn prompts_share_exactly_the_shared_blocks(
        shared in proptest::collection::vec(0u64..1_000_000, 0..6),
        tail_a in proptest::collection::vec(0u64..1_000_000, 1..4),
        tail_b in proptest::collection::vec(0u64..1_000_000, 1..4),
        last_a in 1u64..=512,
        last_b in 1u64..=512,
        block_bytes in prop_oneof![Just(64usize), Just(512), 2usize..700],
    ) {
        prop_assume!(tail_a[0] != tail_b[0]);
        let k = shared.len();
        let ids_a: Vec<u64> = shared.iter().chain(&tail_a).copied().collect();
        let ids_b: Vec<u64> = shared.iter().chain(&tail_b).copied().collect();
        let a = prompt(&lower_entry(&entry(ids_a.clone(), last_a), block_bytes, 1.0));
        let b = prompt(&lower_entry(&entry(ids_b.clone(), last_b), block_bytes, 1.0));
        let boundary = k * block_bytes;
        prop_assert_eq!(&a.as_bytes()[..boundary], &b.as_bytes()[..boundary]);
        let cp = common_prefix(a.as_bytes(), b.as_bytes());
        prop_assert!(cp >= boundary);
        // Block k has different ids: the prompts diverge inside it. Two independent text
        // streams can agree on a few leading bytes by chance, never on 16 (p ≈ 27^-16); a
        // block shorter than that may be swallowed whole.
        let len_k = |ids: &[u64], last: u64| if ids.len() == k + 1 {
            kvroute_load::trace::scale_tokens(last, block_bytes).min(block_bytes)
        } else {
            block_bytes
        };
        let shorter = len_k(&ids_a, last_a).min(len_k(&ids_b, last_b));
        prop_assert!(cp < boundary + shorter.min(16) || cp == boundary + shorter,
            "diverged late: cp={} boundary={} shorter={}", cp, boundary, shorter);
        prop_assert!(cp <= boundary + shorter);
    }

    #[test]
    fn same_ids_same_prompt(
        ids in proptest::collection::vec(0u64..1_000, 1..8),
        last in 1u64..=512,
        block_bytes in 2usize..1024,
    ) {
        let e = entry(ids, last);
        let a = prompt(&lower_entry(&e, block_bytes, 1.0));
        prop_assert_eq!(&a, &prompt(&lower_entry(&e, block_bytes, 1.0)));
        let full_blocks = e.hash_ids.len() - 1;
        prop_assert_eq!(
            a.len(),
            full_blocks * block_bytes + kvroute_load::trace::scale_tokens(last, block_bytes).min(block_bytes)
        );
        prop_assert!(a.bytes().all(|c| (0x20..0x7f).contains(&c) && c != b'"' && c != b'\\'));
    }
}
