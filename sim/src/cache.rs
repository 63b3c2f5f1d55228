//! The KV cache model: vLLM-style automatic prefix caching over prefix-chained block hashes.
//!
//! Only full blocks are cached, a lookup matches the longest run of leading blocks, and space is
//! reclaimed least-recently-used first. Blocks of running requests are *not* pinned: the model
//! only tracks which prefixes a replica would still hold, and pinning would need per-request
//! reference counts that routing never observes.

use std::collections::{BTreeMap, HashMap};

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Seed of the first block's chain: any fixed value works, it only has to be stable so that a
/// restarted simulator produces the same hashes (like vLLM with `PYTHONHASHSEED` set).
const ROOT_HASH: u64 = 0x6b76_726f_7574_6531;

/// Recency of a block inserted but not yet stamped; never present in the LRU order.
const UNSTAMPED: u64 = u64::MAX;

/// What the cache did, in the order a vLLM publisher would report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheEvent {
    Stored {
        block_hashes: Vec<u64>,
        parent_block_hash: Option<u64>,
        /// Synthetic token ids, `block_tokens` per block.
        token_ids: Vec<u32>,
    },
    Removed {
        block_hashes: Vec<u64>,
    },
    AllCleared,
}

/// Prefix-chained hashes of the full blocks of `prompt`; the trailing partial block is left out.
pub fn block_hashes(prompt: &[u8], block_bytes: usize) -> Vec<u64> {
    let mut parent = ROOT_HASH;
    prompt
        .chunks_exact(block_bytes)
        .map(|block| {
            parent = xxh3_64_with_seed(block, parent);
            parent
        })
        .collect()
}

/// Token ids for the events: the simulator has no tokenizer, so each 4-byte group of prompt text
/// stands for one token, which keeps ids stable for equal text.
fn synthetic_token_ids(block: &[u8]) -> impl Iterator<Item = u32> + '_ {
    block.chunks(4).map(|group| {
        let mut word = [0u8; 4];
        word[..group.len()].copy_from_slice(group);
        u32::from_le_bytes(word)
    })
}

#[derive(Debug)]
pub struct KvCache {
    capacity: usize,
    block_tokens: usize,
    /// hash → recency stamp
    blocks: HashMap<u64, u64>,
    /// recency stamp → hash; the first entry is the next victim
    lru: BTreeMap<u64, u64>,
    next_stamp: u64,
    evictions: u64,
}

impl KvCache {
    pub fn new(capacity_blocks: usize, block_tokens: usize) -> Self {
        Self {
            capacity: capacity_blocks,
            block_tokens,
            blocks: HashMap::with_capacity(capacity_blocks.min(1 << 20)),
            lru: BTreeMap::new(),
            next_stamp: 0,
            evictions: 0,
        }
    }

    /// Bytes of rendered prompt text per block (the simulator counts 4 bytes per token).
    pub fn block_bytes(&self) -> usize {
        self.block_tokens * 4
    }

    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    pub fn contains(&self, hash: u64) -> bool {
        self.blocks.contains_key(&hash)
    }

    /// Number of leading blocks of `hashes` held, refreshing their recency as a hit does in vLLM.
    pub fn lookup(&mut self, hashes: &[u64]) -> usize {
        let matched = hashes
            .iter()
            .take_while(|h| self.blocks.contains_key(h))
            .count();
        self.touch_chain(&hashes[..matched]);
        matched
    }

    /// Caches every full block of `prompt` (whose hashes are `hashes`) and returns the events.
    ///
    /// A prompt longer than the whole cache keeps only its first `capacity` blocks, since the tail
    /// is useless without the head.
    pub fn insert(&mut self, prompt: &[u8], hashes: &[u64]) -> Vec<CacheEvent> {
        let hashes = &hashes[..hashes.len().min(self.capacity)];
        // Touch what is already present first so that eviction below never picks this chain.
        let present: Vec<u64> = hashes
            .iter()
            .copied()
            .filter(|h| self.blocks.contains_key(h))
            .collect();
        self.touch_chain(&present);

        let missing = hashes.len() - present.len();
        let mut events = Vec::new();
        let overflow = (self.blocks.len() + missing).saturating_sub(self.capacity);
        if overflow > 0 {
            let mut removed = Vec::with_capacity(overflow);
            for _ in 0..overflow {
                let Some((_, victim)) = self.lru.pop_first() else {
                    break;
                };
                self.blocks.remove(&victim);
                removed.push(victim);
            }
            self.evictions += removed.len() as u64;
            events.push(CacheEvent::Removed {
                block_hashes: removed,
            });
        }

        // Missing blocks form runs; each run is one BlockStored whose parent is the block before it.
        let block_bytes = self.block_bytes();
        let mut run: Option<CacheEvent> = None;
        for (i, &hash) in hashes.iter().enumerate() {
            if self.blocks.contains_key(&hash) {
                events.extend(run.take());
                continue;
            }
            self.blocks.insert(hash, UNSTAMPED);
            let text = &prompt[i * block_bytes..(i + 1) * block_bytes];
            match &mut run {
                Some(CacheEvent::Stored {
                    block_hashes,
                    token_ids,
                    ..
                }) => {
                    block_hashes.push(hash);
                    token_ids.extend(synthetic_token_ids(text));
                }
                _ => {
                    run = Some(CacheEvent::Stored {
                        block_hashes: vec![hash],
                        parent_block_hash: i.checked_sub(1).map(|p| hashes[p]),
                        token_ids: synthetic_token_ids(text).collect(),
                    });
                }
            }
        }
        events.extend(run);
        self.touch_chain(hashes);
        events
    }

    /// Drops everything (a cache reset); the caller reports it as AllBlocksCleared.
    pub fn clear(&mut self) -> CacheEvent {
        self.blocks.clear();
        self.lru.clear();
        CacheEvent::AllCleared
    }

    /// Makes `chain` the most recent blocks, its head most recent of all: vLLM frees a request's
    /// blocks tail first, so a prefix loses its tail before its head and stays matchable.
    fn touch_chain(&mut self, chain: &[u64]) {
        for &hash in chain.iter().rev() {
            let stamp = self.next_stamp;
            self.next_stamp += 1;
            match self.blocks.insert(hash, stamp) {
                Some(old) if old != UNSTAMPED => {
                    self.lru.remove(&old);
                }
                _ => {}
            }
            self.lru.insert(stamp, hash);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2 tokens per block → 8 bytes per block.
    fn cache(capacity: usize) -> KvCache {
        KvCache::new(capacity, 2)
    }

    /// Every cached block is in the LRU order exactly once, within capacity.
    fn check(c: &KvCache) {
        assert_eq!(c.lru.len(), c.blocks.len());
        assert!(c.blocks.len() <= c.capacity);
        for (stamp, hash) in &c.lru {
            assert_eq!(c.blocks.get(hash), Some(stamp));
        }
    }

    fn stored(events: &[CacheEvent]) -> Vec<u64> {
        events
            .iter()
            .flat_map(|e| match e {
                CacheEvent::Stored { block_hashes, .. } => block_hashes.clone(),
                _ => vec![],
            })
            .collect()
    }

    fn removed(events: &[CacheEvent]) -> Vec<u64> {
        events
            .iter()
            .flat_map(|e| match e {
                CacheEvent::Removed { block_hashes } => block_hashes.clone(),
                _ => vec![],
            })
            .collect()
    }

    #[test]
    fn hashes_are_prefix_chained_and_skip_the_partial_block() {
        let a = block_hashes(b"AAAAAAAABBBBBBBBccc", 8);
        let b = block_hashes(b"AAAAAAAABBBBBBBB", 8);
        let c = block_hashes(b"XAAAAAAABBBBBBBB", 8);
        assert_eq!(a.len(), 2);
        assert_eq!(a, b);
        assert_ne!(
            a[1], c[1],
            "same block text after a different prefix hashes differently"
        );
        assert_eq!(a[0], xxh3_64_with_seed(b"AAAAAAAA", ROOT_HASH));
        assert_eq!(a[1], xxh3_64_with_seed(b"BBBBBBBB", a[0]));
        assert!(block_hashes(b"short", 8).is_empty());
    }

    #[test]
    fn hand_computed_sequence() {
        let mut c = cache(4);
        let p1 = b"AAAAAAAABBBBBBBBxyz"; // 2 full blocks + partial
        let h1 = block_hashes(p1, c.block_bytes());

        // First time: nothing cached; after prefill both full blocks are stored, the partial is not.
        assert_eq!(c.lookup(&h1), 0);
        let ev = c.insert(p1, &h1);
        assert_eq!(
            ev,
            vec![CacheEvent::Stored {
                block_hashes: h1.clone(),
                parent_block_hash: None,
                token_ids: vec![
                    u32::from_le_bytes(*b"AAAA"),
                    u32::from_le_bytes(*b"AAAA"),
                    u32::from_le_bytes(*b"BBBB"),
                    u32::from_le_bytes(*b"BBBB"),
                ],
            }]
        );
        assert_eq!(c.len(), 2);

        // Same prompt again: 2 blocks hit = 4 cached tokens; nothing new to store.
        assert_eq!(c.lookup(&h1) * c.block_tokens(), 4);
        assert!(c.insert(p1, &h1).is_empty());

        // Shared first block, different second: 1 block hit, one new block with parent h1[0].
        let p2 = b"AAAAAAAACCCCCCCCDDDDDDDD";
        let h2 = block_hashes(p2, c.block_bytes());
        assert_eq!(c.lookup(&h2), 1);
        let ev = c.insert(p2, &h2);
        assert_eq!(stored(&ev), vec![h2[1], h2[2]]);
        assert!(matches!(
            &ev[0],
            CacheEvent::Stored { parent_block_hash: Some(p), .. } if *p == h1[0]
        ));
        assert_eq!(c.len(), 4);
        assert_eq!(c.evictions(), 0);
        check(&c);

        // Recency now (old → new): h1[1], h2[2], h2[1], h1[0] (P2's hit refreshed only h1[0]).
        // A third prompt of 3 blocks evicts the first three; the shared head survives.
        let p3 = b"XXXXXXXXYYYYYYYYZZZZZZZZ";
        let h3 = block_hashes(p3, c.block_bytes());
        let ev = c.insert(p3, &h3);
        assert_eq!(removed(&ev), vec![h1[1], h2[2], h2[1]]);
        check(&c);
        assert_eq!(c.lookup(&h1), 1);
    }

    #[test]
    fn lru_evicts_least_recent_and_tail_first() {
        let mut c = cache(3);
        let bb = c.block_bytes();
        let pa = b"AAAAAAAAaaaaaaaa";
        let pb = b"BBBBBBBB";
        let pc = b"CCCCCCCCcccccccc";
        let (ha, hb, hc) = (
            block_hashes(pa, bb),
            block_hashes(pb, bb),
            block_hashes(pc, bb),
        );
        c.insert(pa, &ha); // recency (old → new): a1 a0
        check(&c);
        assert_eq!(
            c.lru.values().copied().collect::<Vec<_>>(),
            vec![ha[1], ha[0]]
        );
        c.insert(pb, &hb); // a1 a0 b0
        check(&c);
        assert_eq!(c.lookup(&ha), 2); // b0 a1 a0: the hit refreshes A
        assert_eq!(
            c.lru.values().copied().collect::<Vec<_>>(),
            vec![hb[0], ha[1], ha[0]]
        );

        // C needs 2 blocks in a full cache: victims are b0 (oldest), then a1 (A's tail before its head).
        let ev = c.insert(pc, &hc);
        assert_eq!(removed(&ev), vec![hb[0], ha[1]]);
        assert_eq!(stored(&ev), hc);
        assert!(
            matches!(ev[0], CacheEvent::Removed { .. }),
            "removals come first"
        );
        assert_eq!(c.evictions(), 2);
        check(&c);
        assert_eq!(c.lookup(&hb), 0);
        assert_eq!(c.lookup(&ha), 1, "A's head survives its tail");
        assert_eq!(c.lookup(&hc), 2);
    }

    #[test]
    fn prompt_longer_than_the_cache_keeps_its_head() {
        let mut c = cache(2);
        let p = b"AAAAAAAABBBBBBBBCCCCCCCC";
        let h = block_hashes(p, c.block_bytes());
        let ev = c.insert(p, &h);
        assert_eq!(stored(&ev), h[..2].to_vec());
        assert_eq!(c.lookup(&h), 2);
    }

    #[test]
    fn gaps_in_a_chain_are_stored_as_separate_runs() {
        let mut c = cache(8);
        let p = b"AAAAAAAABBBBBBBBCCCCCCCC";
        let h = block_hashes(p, c.block_bytes());
        // Only the middle block is present (its head was evicted by someone else's traffic).
        c.insert(&p[..16], &h[..2]);
        c.blocks.remove(&h[0]);
        c.lru.retain(|_, v| *v != h[0]);
        let ev = c.insert(p, &h);
        assert_eq!(ev.len(), 2);
        assert!(
            matches!(&ev[0], CacheEvent::Stored { block_hashes, parent_block_hash: None, .. } if block_hashes == &vec![h[0]])
        );
        assert!(
            matches!(&ev[1], CacheEvent::Stored { block_hashes, parent_block_hash: Some(p), .. } if block_hashes == &vec![h[2]] && *p == h[1])
        );
    }

    #[test]
    fn clear_empties_the_cache() {
        let mut c = cache(4);
        let p = b"AAAAAAAA";
        let h = block_hashes(p, c.block_bytes());
        c.insert(p, &h);
        assert_eq!(c.clear(), CacheEvent::AllCleared);
        assert!(c.is_empty());
        assert_eq!(c.lookup(&h), 0);
    }

    proptest::proptest! {
        /// Whatever the traffic, the LRU order mirrors the block set, capacity holds, and a
        /// just-inserted prompt is fully matched (when it fits).
        #[test]
        fn invariants_hold_under_random_traffic(
            prompts in proptest::collection::vec(proptest::collection::vec(0u8..3, 0..40), 1..40),
            capacity in 1usize..8,
        ) {
            let mut c = cache(capacity);
            for p in &prompts {
                let h = block_hashes(p, c.block_bytes());
                c.lookup(&h);
                c.insert(p, &h);
                check(&c);
                proptest::prop_assert_eq!(c.lookup(&h), h.len().min(capacity));
            }
        }
    }
}
