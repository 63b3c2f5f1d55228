use proptest::prelude::*;

use super::*;
use crate::index::prefix_index::MAX_HOLE_BLOCKS;

fn chain(id: u64, len: usize) -> Vec<u64> {
    crate::prefix::chain_hashes(
        &id.to_le_bytes().repeat(len * 16),
        &crate::prefix::PrefixConfig { block_bytes: 128 },
    )
    .to_vec()
}

fn index(shards: usize, budget: u64) -> PrefixIndex {
    PrefixIndex::new(&IndexConfig {
        shards,
        max_entries: 1 << 20,
        default_budget: budget,
    })
}

const ALL: u128 = u128::MAX;

#[test]
fn counts_stop_at_each_replicas_first_miss() {
    let ix = index(8, 1000);
    let a = chain(1, 100);
    ix.insert(0, &a);
    ix.insert(1, &a[..37]);
    let m = ix.longest_match(&a, ALL);
    assert_eq!((m.get(0), m.get(1), m.get(2), m.best()), (100, 37, 0, 100));
    // Only candidates are counted.
    assert_eq!(ix.longest_match(&a, 1 << 1).get(0), 0);
    // A prompt that diverges after block 10 shares exactly 10 with replica 0.
    let mut b = a[..10].to_vec();
    b.extend(chain(2, 5));
    assert_eq!(ix.longest_match(&b, ALL).get(0), 10);
    assert_eq!(ix.longest_match(&[], ALL).best(), 0);
}

/// Sharded eviction leaves single-block holes in a prefix the replica still
/// holds whole: they do not end its count; a run longer than
/// `MAX_HOLE_BLOCKS` does, at the block before it.
#[test]
fn counts_step_over_short_holes_but_not_long_runs() {
    let ix = index(8, 1000);
    let hole = MAX_HOLE_BLOCKS as usize;
    let len = 40 + hole;
    let a = chain(1, len);
    ix.insert(0, &a[..3]);
    ix.insert(0, &a[4..20]); // block 3 missing
    ix.insert(0, &a[20 + hole..]); // a run of exactly MAX_HOLE_BLOCKS
    ix.insert(1, &a[..10]);
    ix.insert(1, &a[11 + hole..]); // a run one longer
    ix.insert(2, &a[1..30]); // the head block missing
    let m = ix.longest_match(&a, ALL);
    assert_eq!((m.get(0), m.get(1), m.get(2)), (len as u32, 10, 30));
    // Trailing misses shorter than a run count as misses, not as held.
    assert_eq!(ix.longest_match(&a[..32], ALL).get(2), 30);
}

/// The run-at-a-time walk looks inside a run whose last block everyone
/// counting holds when one of them has not been seen before and the run
/// reaches past the hole window: such a replica ended at block 64, as the
/// block-by-block walk has it, even though it holds the run's last block.
#[test]
fn a_replica_first_seen_past_the_window_counts_nothing() {
    let ix = index(8, 1 << 20);
    let a = chain(3, 160);
    let window = MAX_HOLE_BLOCKS as usize;
    ix.insert(0, &a);
    ix.insert(1, &a[window + 8..]);
    // Slot 2 holds the chain with a hole inside a run whose last block it holds.
    ix.insert(2, &a[..window + 3]);
    ix.insert(2, &a[window + 20..]);
    let m = ix.longest_match(&a, 0b111);
    assert_eq!(m.get(0), 160);
    assert_eq!(m.get(1), 0);
    assert_eq!(m.get(2), 160);
}

/// Nor does it skip a run while a replica is inside a run of misses begun
/// before it: slot 1's misses from block 40 pass the window inside the run
/// 96..128, whose last block it holds again (and the run 128..160 is looked
/// at block by block, since slot 0 ends in it).
#[test]
fn a_run_of_misses_ends_the_count_inside_a_run_whose_last_block_is_held() {
    let ix = index(8, 1 << 20);
    let a = chain(4, 160);
    ix.insert(0, &a[..150]);
    ix.insert(1, &a[..40]);
    ix.insert(1, &a[110..]);
    let m = ix.longest_match(&a, 0b11);
    assert_eq!((m.get(0), m.get(1)), (150, 40));
}

#[test]
fn over_budget_the_least_recent_blocks_go_first() {
    let ix = index(1, 20);
    let (a, b, c) = (chain(1, 10), chain(2, 10), chain(3, 10));
    ix.insert(0, &a);
    ix.insert(0, &b);
    ix.insert(0, &a); // a is used again, b is not
    ix.insert(0, &c);
    assert_eq!(ix.tracked(0), 20);
    assert_eq!(ix.longest_match(&a, ALL).get(0), 10);
    assert_eq!(ix.longest_match(&b, ALL).get(0), 0);
    assert_eq!(ix.longest_match(&c, ALL).get(0), 10);
}

#[test]
fn a_chain_longer_than_the_budget_keeps_its_prefix() {
    let ix = index(1, 5);
    let a = chain(1, 12);
    ix.insert(3, &a);
    assert_eq!(ix.longest_match(&a, ALL).get(3), 5);
}

#[test]
fn clear_and_budget_changes() {
    let ix = index(4, 1000);
    let a = chain(1, 50);
    ix.insert(0, &a);
    ix.insert(1, &a);
    ix.clear(0);
    let m = ix.longest_match(&a, ALL);
    assert_eq!((m.get(0), m.get(1)), (0, 50));
    assert_eq!(ix.tracked(0), 0);
    ix.set_budget(1, 10);
    assert!(ix.tracked(1) <= 10);
    ix.clear(1);
    assert_eq!(ix.stats().entries, 0, "entries with no bits are freed");
}

#[test]
fn hard_cap_bounds_entries() {
    let ix = PrefixIndex::new(&IndexConfig {
        shards: 4,
        max_entries: 100,
        default_budget: 1 << 20,
    });
    for id in 0..50 {
        ix.insert((id % 3) as u16, &chain(id, 20));
    }
    let st = ix.stats();
    assert!(st.entries <= 100, "{st:?}");
    assert_eq!(st.pairs, (0..3).map(|s| ix.tracked(s)).sum::<u64>());
}

/// Heap bytes per tracked block at a realistic fill, printed for the report
/// (`cargo test -p kvroute --lib memory_per_block -- --nocapture`).
#[test]
fn memory_per_block() {
    let ix = index(64, 1 << 22);
    let mut blocks = 0;
    for id in 0..2000u64 {
        let c = chain(id, 100);
        ix.insert((id % 4) as u16, &c);
        blocks += c.len();
    }
    let st = ix.stats();
    assert_eq!(st.entries, blocks as u64);
    let per_block = st.heap_bytes as f64 / st.entries as f64;
    println!("index: {st:?}, {per_block:.1} heap bytes per tracked block");
    assert!(per_block <= 72.0, "{per_block}");
}

#[derive(Debug, Clone)]
enum Op {
    Insert { slot: u16, id: u64, len: usize },
    Clear(u16),
    Budget(u16, u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u16..4, 0u64..12, 0usize..80).prop_map(|(slot, id, len)| Op::Insert { slot, id, len }),
        1 => (0u16..4).prop_map(Op::Clear),
        1 => (0u16..4, 0u64..120).prop_map(|(s, b)| Op::Budget(s, b)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn budgets_hold_under_random_operations(
        ops in proptest::collection::vec(op(), 1..60),
        shards in prop_oneof![Just(1usize), Just(4), Just(16)],
    ) {
        let ix = PrefixIndex::new(&IndexConfig { shards, max_entries: 10_000, default_budget: 64 });
        for op in ops {
            match op {
                Op::Insert { slot, id, len } => ix.insert(slot, &chain(id, len)),
                Op::Clear(s) => ix.clear(s),
                Op::Budget(s, b) => ix.set_budget(s, b),
            }
            let st = ix.stats();
            let mut pairs = 0;
            for s in 0..4u16 {
                prop_assert!(ix.tracked(s) <= ix.budget(s), "slot {} {} > {}", s, ix.tracked(s), ix.budget(s));
                pairs += ix.tracked(s);
            }
            prop_assert_eq!(st.pairs, pairs);
            prop_assert!(st.entries <= pairs);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Batching, skipping runs whose last block settles them, and the early
    /// stop never change the answer: each candidate's count is the one a
    /// hash-at-a-time walk finds. Chains span up to 40 runs; slots hold
    /// prefixes, suffixes and middles of the chain (several pieces per slot,
    /// so holes of every length), and misses come anywhere.
    #[test]
    fn longest_match_equals_a_hash_by_hash_walk(
        len in 0usize..1300,
        held in proptest::collection::vec((0u16..8, 0.0f64..1.0, 0.0f64..1.0), 0..10),
        candidates in any::<u128>(),
        shards in prop_oneof![Just(1usize), Just(8), Just(64)],
        scattered in any::<bool>(),
    ) {
        let ix = index(shards, 1 << 20);
        let mut a = chain(7, len);
        if scattered {
            // Hashes that are no chain's: a run's blocks in different shards.
            for (i, h) in a.iter_mut().enumerate() {
                *h = h.rotate_left(i as u32 * 7);
            }
        }
        for (slot, x, y) in held {
            let (i, j) = ((x * len as f64) as usize, (y * len as f64) as usize);
            ix.insert(slot, &a[i.min(j)..i.max(j)]);
        }
        let m = ix.longest_match(&a, candidates);
        for slot in 0..128u16 {
            let want = if candidates & (1 << slot) == 0 {
                0
            } else {
                // Up to the last held block before a run of more than
                // MAX_HOLE_BLOCKS missing ones.
                let (mut count, mut run) = (0u32, 0u32);
                for (i, &h) in a.iter().enumerate() {
                    if ix.lookup(h) & (1 << slot) != 0 {
                        (count, run) = (i as u32 + 1, 0);
                    } else {
                        run += 1;
                        if run > MAX_HOLE_BLOCKS {
                            break;
                        }
                    }
                }
                count
            };
            prop_assert_eq!(m.get(slot), want, "slot {}", slot);
        }
    }
}

/// Workers share one index: concurrent inserts, lookups and clears keep the
/// per-replica counts consistent with the tables and within budget.
#[test]
fn concurrent_workers_keep_counts_consistent() {
    let ix = std::sync::Arc::new(PrefixIndex::new(&IndexConfig {
        shards: 16,
        max_entries: 1 << 20,
        default_budget: 500,
    }));
    let threads: Vec<_> = (0..4u16)
        .map(|t| {
            let ix = ix.clone();
            std::thread::spawn(move || {
                for i in 0..300u64 {
                    let c = chain(i % 37, 10 + (i as usize % 50));
                    ix.insert((t + i as u16) % 6, &c);
                    let _ = ix.longest_match(&c, ALL);
                    if i % 97 == 0 {
                        ix.clear(t);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let st = ix.stats();
    let tracked: u64 = (0..6).map(|s| ix.tracked(s)).sum();
    assert_eq!(st.pairs, tracked);
    for s in 0..6 {
        assert!(ix.tracked(s) <= 500, "slot {s}: {}", ix.tracked(s));
    }
}
