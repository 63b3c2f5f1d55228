//! Sharding, per-replica budgets and longest-prefix lookups over the shards.

use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_utils::CachePadded;
use parking_lot::Mutex;
use smallvec::SmallVec;

use super::shard::Shard;
use crate::prefix::SHARD_RUN_BLOCKS;
use crate::replica::MAX_REPLICAS;

/// First lookup batch; each next one is `BATCH_GROWTH` times larger, so a prompt
/// sharing only a short prefix costs a small multiple of that prefix, not the
/// whole prompt.
const FIRST_BATCH: usize = 8;
const BATCH_GROWTH: usize = 4;
/// Longest run of missing blocks [`PrefixIndex::longest_match`] steps over: two
/// shard runs. Sharded eviction takes a replica's oldest blocks shard by shard,
/// and a chain lives in a shard a run of `SHARD_RUN_BLOCKS` at a time, so an
/// aging chain loses whole runs (tail first) in an order the engine, which
/// evicts the chain's own tail first, does not. With the window this had for
/// single-block holes (4), a missing run ended the count: the routing bench's
/// predictions fell from 1 % to 8 % under the tokens the replicas reported
/// cached, and the hit ratio by about a point. A prompt
/// that really diverges misses every block from there on, so the cost of a
/// wider window is only the extra blocks looked up past the divergence.
pub const MAX_HOLE_BLOCKS: u32 = 2 * SHARD_RUN_BLOCKS as u32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexConfig {
    /// Rounded up to a power of two; many more than workers so locks rarely meet.
    pub shards: usize,
    /// Hard cap on tracked blocks (entries) over all replicas.
    pub max_entries: usize,
    /// Block budget of a replica whose KV capacity is unknown.
    pub default_budget: u64,
}

impl Default for IndexConfig {
    fn default() -> Self {
        IndexConfig {
            shards: 64,
            max_entries: 4 << 20,
            default_budget: 1 << 16,
        }
    }
}

/// Per replica slot: how many leading blocks of the prompt it holds.
#[derive(Clone, PartialEq, Eq)]
pub struct MatchCounts {
    counts: [u32; MAX_REPLICAS],
}

impl Default for MatchCounts {
    fn default() -> Self {
        MatchCounts {
            counts: [0; MAX_REPLICAS],
        }
    }
}

impl std::fmt::Debug for MatchCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.counts.iter().enumerate().filter(|(_, c)| **c > 0))
            .finish()
    }
}

impl MatchCounts {
    pub fn get(&self, slot: u16) -> u32 {
        self.counts.get(usize::from(slot)).copied().unwrap_or(0)
    }
    pub fn best(&self) -> u32 {
        self.counts.iter().copied().max().unwrap_or(0)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IndexStats {
    /// Distinct blocks tracked.
    pub entries: u64,
    /// (block, replica) pairs tracked.
    pub pairs: u64,
    /// Heap bytes owned by the index tables.
    pub heap_bytes: u64,
    /// (block, replica) pairs dropped for a budget or the entry cap, since start.
    pub evictions: u64,
}

/// Block hash → replicas holding it, shared by all workers.
pub struct PrefixIndex {
    /// Padded to a cache line each: neighbouring shards' locks would otherwise
    /// share a line (a `Mutex<Shard>` is 72 bytes), and workers locking different
    /// shards would still contend for it.
    shards: Box<[CachePadded<Mutex<Shard>>]>,
    shard_mask: usize,
    max_entries_per_shard: usize,
    /// Pairs tracked per slot, against `budget`.
    live: [AtomicU64; MAX_REPLICAS],
    /// Pairs evicted (budget or cap), for the metric.
    evictions: AtomicU64,
    budget: [AtomicU64; MAX_REPLICAS],
}

impl PrefixIndex {
    pub fn new(cfg: &IndexConfig) -> Self {
        let shards = cfg.shards.clamp(1, 1 << 16).next_power_of_two();
        PrefixIndex {
            shards: (0..shards)
                .map(|_| CachePadded::new(Mutex::new(Shard::default())))
                .collect(),
            shard_mask: shards - 1,
            max_entries_per_shard: cfg.max_entries.div_ceil(shards).max(1),
            live: std::array::from_fn(|_| AtomicU64::new(0)),
            evictions: AtomicU64::new(0),
            budget: std::array::from_fn(|_| AtomicU64::new(cfg.default_budget)),
        }
    }

    /// Bits 40.. pick the shard: the map inside uses the low bits for buckets and
    /// the top seven as tags, so the three stay independent. Chains keep these
    /// bits over runs of `prefix::SHARD_RUN_BLOCKS` blocks, so consecutive blocks
    /// share a shard and a chain is locked a run at a time (see [`Self::runs`]).
    #[inline]
    fn shard_of(&self, hash: u64) -> usize {
        (hash >> 40) as usize & self.shard_mask
    }

    /// `hashes` cut into maximal runs living in one shard: (shard, end) from the
    /// front, each run ending where the next begins. Any hashes are correct
    /// here; chains make the runs long.
    fn runs<'h>(&'h self, hashes: &'h [u64]) -> impl Iterator<Item = (usize, usize)> + 'h {
        let mut at = 0;
        std::iter::from_fn(move || {
            let shard = self.shard_of(*hashes.get(at)?);
            at += 1;
            while hashes.get(at).is_some_and(|&h| self.shard_of(h) == shard) {
                at += 1;
            }
            Some((shard, at))
        })
    }

    pub fn budget(&self, slot: u16) -> u64 {
        self.budget[usize::from(slot)].load(Ordering::Relaxed)
    }

    /// Blocks tracked for `slot`.
    pub fn tracked(&self, slot: u16) -> u64 {
        self.live[usize::from(slot)].load(Ordering::Relaxed)
    }

    /// Sets a replica's block budget, evicting its least recent blocks if over.
    pub fn set_budget(&self, slot: u16, blocks: u64) {
        let s = usize::from(slot);
        if s >= MAX_REPLICAS {
            return;
        }
        self.budget[s].store(blocks, Ordering::Relaxed);
        // Spread the trim over the shards so what stays is still uniform.
        loop {
            let live = self.live[s].load(Ordering::Relaxed);
            if live <= blocks {
                return;
            }
            let per_shard = (live - blocks).div_ceil(self.shards.len() as u64);
            let mut progress = false;
            for shard in self.shards.iter() {
                let mut sh = shard.lock();
                for _ in 0..per_shard {
                    if self.live[s].load(Ordering::Relaxed) <= blocks || !sh.evict_one(slot, true) {
                        break;
                    }
                    self.live[s].fetch_sub(1, Ordering::Relaxed);
                    progress = true;
                }
            }
            if !progress {
                return;
            }
        }
    }

    /// Drops every block of `slot` (replica removed, restarted or cache reset).
    pub fn clear(&self, slot: u16) {
        let s = usize::from(slot);
        if s >= MAX_REPLICAS {
            return;
        }
        for shard in self.shards.iter() {
            let n = shard.lock().clear(slot);
            self.live[s].fetch_sub(n, Ordering::Relaxed);
        }
    }

    /// Records that `slot` now holds the chain `hashes` (after routing a request
    /// there). Blocks are touched tail first so a replica's oldest blocks are a
    /// chain's tail, as engines evict them: what survives is still a prefix.
    pub fn insert(&self, slot: u16, hashes: &[u64]) {
        let s = usize::from(slot);
        if s >= MAX_REPLICAS || hashes.is_empty() {
            return;
        }
        let budget = &self.budget[s];
        let live = &self.live[s];
        let apply = |sh: &mut Shard, hash: u64| {
            let (new, evicted) = sh.touch(slot, hash, self.max_entries_per_shard);
            let mut n = live.load(Ordering::Relaxed);
            if new {
                n = live.fetch_add(1, Ordering::Relaxed) + 1;
            }
            if evicted > 0 {
                n = live.fetch_sub(evicted, Ordering::Relaxed) - evicted;
                self.evictions.fetch_add(evicted, Ordering::Relaxed);
            }
            while n > budget.load(Ordering::Relaxed) && sh.evict_one(slot, true) {
                n = live.fetch_sub(1, Ordering::Relaxed) - 1;
                self.evictions.fetch_add(1, Ordering::Relaxed);
            }
        };
        // Tail first, a run (one lock) at a time.
        let mut end = hashes.len();
        while end > 0 {
            let shard = self.shard_of(hashes[end - 1]);
            let mut start = end - 1;
            while start > 0 && self.shard_of(hashes[start - 1]) == shard {
                start -= 1;
            }
            let mut sh = self.shards[shard].lock();
            sh.tick();
            for &h in hashes[start..end].iter().rev() {
                apply(&mut sh, h);
            }
            end = start;
        }
    }

    /// For each replica in `candidates` (bit per slot), how many leading blocks of
    /// `hashes` it holds: up to its last block before a run of more than
    /// [`MAX_HOLE_BLOCKS`] missing ones (or the end).
    ///
    /// Why holes are skipped rather than ending the count: a chain hash names its
    /// whole prefix, so a replica that holds block `i` once held blocks `0..i`, and
    /// an engine evicts a prefix from its tail (vLLM frees a sequence's blocks in
    /// reverse), so it still holds them. The index evicts per shard (the victim is
    /// the least recent entry of the shard the new block lands in, not the
    /// replica's globally oldest), which leaves holes (pieces of shard runs) in
    /// prefixes the replica still has whole. Stopping at the first of those made
    /// a hot system prompt look absent: on the synthetic benchmark about one
    /// request in twenty was then placed as if its prefix were new, a miss each.
    pub fn longest_match(&self, hashes: &[u64], candidates: u128) -> MatchCounts {
        let mut out = MatchCounts::default();
        let mut alive = candidates;
        // Slots seen holding a block so far. The others are tracked by mask
        // only: their run of misses began at block 0, so they all end together,
        // and a lookup over many candidates costs no per-slot work for them.
        let mut seen = 0u128;
        // Seen slots of `alive` inside a run of misses, and where each run began.
        let mut missing = 0u128;
        let mut run_start = [0u32; MAX_REPLICAS];
        let mut bits: SmallVec<[u128; FIRST_BATCH * BATCH_GROWTH]> = SmallVec::new();
        let mut start = 0;
        let mut batch = FIRST_BATCH;
        while start < hashes.len() && alive != 0 {
            let mut end = (start + batch).min(hashes.len());
            if start > 0 && hashes.len() - end < batch * BATCH_GROWTH {
                // After the first batch, a rest smaller than the next batch would
                // be joins this one.
                end = hashes.len();
            }
            bits.clear();
            bits.resize(end - start, 0);
            self.lookup_batch(&hashes[start..end], &mut bits);
            for (i, &b) in bits.iter().enumerate() {
                let at = (start + i) as u32;
                seen |= alive & b;
                // The common case, every live slot present and none in a run: nothing.
                if alive & !b == 0 && missing == 0 {
                    continue;
                }
                if at >= MAX_HOLE_BLOCKS {
                    alive &= seen;
                }
                missing &= !b;
                let absent = alive & seen & !b;
                let mut newly = absent & !missing;
                while newly != 0 {
                    run_start[newly.trailing_zeros() as usize] = at;
                    newly &= newly - 1;
                }
                missing |= absent;
                let mut runs = missing;
                while runs != 0 {
                    let slot = runs.trailing_zeros() as usize;
                    runs &= runs - 1;
                    if at - run_start[slot] >= MAX_HOLE_BLOCKS {
                        out.counts[slot] = run_start[slot];
                        alive &= !(1u128 << slot);
                        missing &= !(1u128 << slot);
                    }
                }
                if alive == 0 {
                    break;
                }
            }
            start = end;
            batch *= BATCH_GROWTH;
        }
        let mut held = alive & seen;
        while held != 0 {
            let slot = held.trailing_zeros() as usize;
            out.counts[slot] = if missing & (1u128 << slot) != 0 {
                run_start[slot]
            } else {
                hashes.len() as u32
            };
            held &= held - 1;
        }
        out
    }

    /// One hash's holders, one lock: the reference the batched lookup is tested
    /// against.
    #[cfg(test)]
    pub(super) fn lookup_one(&self, hash: u64) -> u128 {
        self.shards[self.shard_of(hash)].lock().lookup(hash)
    }

    /// Each hash's holders, one lock per run.
    fn lookup_batch(&self, hashes: &[u64], out: &mut [u128]) {
        let mut start = 0;
        for (shard, end) in self.runs(hashes) {
            let sh = self.shards[shard].lock();
            for (o, &h) in out[start..end].iter_mut().zip(&hashes[start..end]) {
                *o = sh.lookup(h);
            }
            start = end;
        }
    }

    pub fn stats(&self) -> IndexStats {
        let mut st = IndexStats {
            evictions: self.evictions.load(Ordering::Relaxed),
            ..IndexStats::default()
        };
        for shard in self.shards.iter() {
            let sh = shard.lock();
            st.entries += sh.map.len() as u64;
            st.pairs += (0..MAX_REPLICAS as u16)
                .map(|s| sh.queued(s) as u64)
                .sum::<u64>();
            st.heap_bytes += sh.heap_bytes() as u64;
        }
        st
    }
}
