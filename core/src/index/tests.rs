use proptest::prelude::*;

use super::*;
use crate::index::prefix_index::MAX_HOLE_BLOCKS;
use crate::index::{SlotModel, SlotOccupancy};

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

/// A prompt made of parts, each `blocks` blocks of one byte pattern, so prompts
/// that start with the same parts share those blocks' chain hashes.
fn prompt(parts: &[(u64, usize)]) -> Vec<u64> {
    let mut bytes = Vec::new();
    for &(id, blocks) in parts {
        bytes.extend(id.to_le_bytes().repeat(blocks * 16));
    }
    crate::prefix::chain_hashes(&bytes, &crate::prefix::PrefixConfig { block_bytes: 128 }).to_vec()
}

fn slot_index(slots: u32, slot_blocks: u32, host_blocks: u64) -> PrefixIndex {
    let ix = index(8, 1 << 20);
    ix.set_slot_model(
        0,
        Some(SlotModel {
            slots,
            slot_blocks,
            host_blocks,
        }),
    );
    ix
}

fn held(ix: &PrefixIndex, p: &[u64]) -> u32 {
    ix.longest_match(p, ALL).get(0)
}

/// With no host cache a replica holds one prompt per slot: a third unrelated
/// prompt on two slots takes the least recently used one's place, whole, where
/// a block pool of the same size would keep all three.
#[test]
fn a_slot_replica_holds_one_prompt_per_slot() {
    let ix = slot_index(2, 1000, 0);
    let (a, b, c) = (prompt(&[(1, 20)]), prompt(&[(2, 20)]), prompt(&[(3, 20)]));
    ix.insert(0, &a);
    ix.insert(0, &b);
    assert_eq!((held(&ix, &a), held(&ix, &b)), (20, 20));
    ix.insert(0, &a); // a used again: b is now the least recent
    ix.insert(0, &c);
    assert_eq!((held(&ix, &a), held(&ix, &b), held(&ix, &c)), (20, 0, 20));
    assert_eq!(ix.tracked(0), 40);
    let occ = ix.slot_occupancy(0).unwrap();
    assert_eq!((occ.in_slots, occ.in_host, occ.blocks), (2, 0, 40));
    ix.check_slot_model(0).unwrap();

    let pool = index(8, 2000);
    for p in [&a, &b, &a, &c] {
        pool.insert(0, p);
    }
    assert_eq!(pool.longest_match(&b, ALL).get(0), 20);
}

/// A prompt sharing most of itself with a slot's takes that slot, and the slot
/// keeps only the shared prefix of what it held: the same system prompt with
/// another question leaves the first question's blocks behind.
#[test]
fn a_similar_prompt_takes_the_slot_and_its_old_tail_goes() {
    let ix = slot_index(2, 1000, 0);
    let q1 = prompt(&[(7, 30), (1, 10)]);
    let q2 = prompt(&[(7, 30), (2, 10)]);
    ix.insert(0, &q1);
    ix.insert(0, &q2);
    assert_eq!((held(&ix, &q1), held(&ix, &q2)), (30, 40));
    assert_eq!(
        ix.slot_occupancy(0).unwrap().in_slots,
        1,
        "the other slot stays free"
    );
    ix.check_slot_model(0).unwrap();
}

/// A conversation's next turn extends the prompt in its slot; another
/// conversation takes the other slot, and a third the least recent one's.
#[test]
fn a_conversation_grows_in_its_slot() {
    let ix = slot_index(2, 1000, 0);
    let turn1 = prompt(&[(7, 10), (1, 10)]);
    let turn2 = prompt(&[(7, 10), (1, 10), (11, 20)]);
    let other = prompt(&[(8, 30)]);
    let third = prompt(&[(9, 30)]);
    ix.insert(0, &turn1);
    ix.insert(0, &other);
    ix.insert(0, &turn2);
    assert_eq!((held(&ix, &turn2), held(&ix, &other)), (40, 30));
    assert_eq!(ix.tracked(0), 70);
    ix.insert(0, &third);
    assert_eq!(
        (held(&ix, &turn2), held(&ix, &other), held(&ix, &third)),
        (40, 0, 30)
    );
    ix.check_slot_model(0).unwrap();
}

/// The host cache keeps prompts that leave their slots, drops its oldest ones
/// whole over its limit, and gives a prompt back to a slot that needs it.
#[test]
fn the_host_cache_keeps_prompts_and_drops_its_oldest_whole() {
    let ix = slot_index(1, 1000, 50);
    let p: Vec<Vec<u64>> = (1..=4).map(|i| prompt(&[(i, 20)])).collect();
    for x in &p {
        ix.insert(0, x);
    }
    // One slot (p4) and 50 blocks of host cache: p2 and p3; p1, the oldest, is gone whole.
    let got: Vec<u32> = p.iter().map(|x| held(&ix, x)).collect();
    assert_eq!(got, [0, 20, 20, 20]);
    let occ = ix.slot_occupancy(0).unwrap();
    assert_eq!((occ.in_slots, occ.in_host), (1, 2));
    ix.check_slot_model(0).unwrap();
}

/// A prompt that diverges from a slot's keeps that slot's old tail when the
/// slot was saved to the host cache while idle (another request started).
#[test]
fn idle_slots_are_saved_to_the_host_cache() {
    let ix = slot_index(2, 1000, 1000);
    let q1 = prompt(&[(7, 30), (1, 10)]);
    let q2 = prompt(&[(7, 30), (2, 10)]);
    let other = prompt(&[(8, 10)]);
    ix.insert(0, &q1);
    ix.insert(0, &other); // q1's slot is idle: copied to the host cache
    ix.insert(0, &q2); // takes q1's slot by similarity
    assert_eq!(
        (held(&ix, &q1), held(&ix, &q2), held(&ix, &other)),
        (40, 40, 10)
    );
    ix.check_slot_model(0).unwrap();

    // Without the idle save in between, q1's tail is lost.
    let ix = slot_index(2, 1000, 1000);
    ix.insert(0, &q1);
    ix.insert(0, &q2);
    assert_eq!(held(&ix, &q1), 30);
}

/// A prompt restored from the host cache into the slot it is needed in leaves
/// the cache; the slot's own prompt, saved first, stays held.
#[test]
fn a_cached_prompt_is_restored_into_the_slot() {
    let ix = slot_index(1, 1000, 1000);
    let a = prompt(&[(1, 20)]);
    let b = prompt(&[(2, 20)]);
    let a2 = prompt(&[(1, 20), (3, 5)]);
    ix.insert(0, &a);
    ix.insert(0, &b); // a saved to the host cache
    ix.insert(0, &a2); // b saved; a restored, then extended
    assert_eq!((held(&ix, &a2), held(&ix, &b)), (25, 20));
    let occ = ix.slot_occupancy(0).unwrap();
    assert_eq!((occ.in_slots, occ.in_host, occ.blocks), (1, 1, 45));
    ix.check_slot_model(0).unwrap();
}

#[test]
fn a_prompt_longer_than_a_slot_is_held_up_to_its_context() {
    let ix = slot_index(2, 16, 0);
    let long = prompt(&[(1, 40)]);
    ix.insert(0, &long);
    assert_eq!(held(&ix, &long), 16);
    assert_eq!(ix.tracked(0), 16);
    ix.check_slot_model(0).unwrap();
}

#[test]
fn clear_and_a_new_shape_reset_the_slot_model() {
    let ix = slot_index(2, 100, 100);
    let a = prompt(&[(1, 20)]);
    ix.insert(0, &a);
    ix.insert(1, &a); // a block-based replica beside it
    ix.clear(0);
    assert_eq!((ix.tracked(0), held(&ix, &a)), (0, 0));
    assert_eq!(ix.slot_occupancy(0), Some(SlotOccupancy::default()));
    ix.insert(0, &a);
    // The same shape again changes nothing; another empties the replica.
    let model = ix.slot_model(0).unwrap();
    ix.set_slot_model(0, Some(model));
    assert_eq!(ix.tracked(0), 20);
    ix.set_slot_model(0, Some(SlotModel { slots: 4, ..model }));
    assert_eq!(ix.tracked(0), 0);
    ix.insert(0, &a);
    ix.set_slot_model(0, None);
    assert_eq!((ix.tracked(0), ix.slot_occupancy(0)), (0, None));
    assert_eq!(ix.longest_match(&a, 1 << 1).get(1), 20);
    ix.check_slot_model(0).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Under random prompts (sharing prefixes, conversations that grow) and
    /// clears, a slot-based replica's model stays consistent (reference counts,
    /// the host limit, the slot context) and the index credits it with exactly
    /// the blocks of the prompts the model holds, beside a block-based replica.
    #[test]
    fn the_index_holds_what_the_slot_model_holds(
        ops in proptest::collection::vec(
            (0u16..2, proptest::collection::vec((0u64..4, 1usize..12), 1..4), 0u8..20),
            1..50,
        ),
        slots in 1u32..4,
        slot_blocks in 4u32..40,
        host_blocks in prop_oneof![Just(0u64), 1u64..30, 30u64..200],
    ) {
        let ix = index(8, 1 << 20);
        let model = SlotModel { slots, slot_blocks, host_blocks };
        ix.set_slot_model(0, Some(model));
        for (replica, parts, clear) in ops {
            if clear == 0 {
                ix.clear(replica);
            } else {
                ix.insert(replica, &prompt(&parts));
            }
            prop_assert!(ix.check_slot_model(0).is_ok(), "{:?}", ix.check_slot_model(0));
            let occ = ix.slot_occupancy(0).unwrap();
            prop_assert!(occ.in_slots <= slots);
            prop_assert!(occ.blocks <= model.max_blocks());
            let st = ix.stats();
            prop_assert_eq!(st.pairs, ix.tracked(0) + ix.tracked(1));
        }
    }
}
