//! Sharding, per-replica budgets and longest-prefix lookups over the shards.

use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_utils::CachePadded;
use parking_lot::Mutex;
use smallvec::SmallVec;

use super::shard::Shard;
use crate::replica::MAX_REPLICAS;

/// Below this many hashes a lookup batch locks per hash; above, it groups the
/// batch by shard so each shard lock is taken once.
const GROUP_THRESHOLD: usize = 32;
/// First lookup batch; each next one is `BATCH_GROWTH` times larger, so a prompt
/// sharing only a short prefix costs a small multiple of that prefix, not the
/// whole prompt.
const FIRST_BATCH: usize = 8;
/// Why 4 and not 2: a shard lock (an uncontended lock + unlock, two atomic
/// read-modify-writes) costs about as much as five map lookups, and a grouped
/// batch takes about `min(batch, shards)` of them. Doubling from 8 took ~280
/// locks for 1024 blocks (half of `longest_match`'s time); growing 4x, and
/// taking a remainder smaller than the next batch along, takes ~150.
const BATCH_GROWTH: usize = 4;
/// Longest run of missing blocks [`PrefixIndex::longest_match`] steps over. The
/// holes sharded eviction leaves are single blocks scattered over the shards:
/// a run of five, which ends a count, starts at about one position in a
/// thousand even with a quarter of a prefix's blocks gone at random, while a
/// prompt that really diverges misses every block from there on.
pub const MAX_HOLE_BLOCKS: u32 = 4;

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

/// Buffers of [`PrefixIndex::group_into`].
#[derive(Default)]
struct GroupScratch {
    order: Vec<u32>,
    starts: Vec<u32>,
    fill: Vec<u32>,
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
    /// the top seven as tags, so the three stay independent.
    #[inline]
    fn shard_of(&self, hash: u64) -> usize {
        (hash >> 40) as usize & self.shard_mask
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
        if hashes.len() < GROUP_THRESHOLD {
            for &h in hashes.iter().rev() {
                let mut sh = self.shards[self.shard_of(h)].lock();
                sh.tick();
                apply(&mut sh, h);
            }
            return;
        }
        let (order, starts) = self.group_by_shard(hashes);
        for (shard, range) in starts.windows(2).enumerate() {
            let (a, b) = (range[0] as usize, range[1] as usize);
            if a == b {
                continue;
            }
            let mut sh = self.shards[shard].lock();
            sh.tick();
            for &i in order[a..b].iter().rev() {
                apply(&mut sh, hashes[i as usize]);
            }
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
    /// replica's globally oldest), which leaves scattered single-block holes in
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
        let mut scratch = GroupScratch::default();
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
            self.lookup_batch(&hashes[start..end], &mut bits, &mut scratch);
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

    fn lookup_batch(&self, hashes: &[u64], out: &mut [u128], scratch: &mut GroupScratch) {
        if hashes.len() < GROUP_THRESHOLD {
            for (o, &h) in out.iter_mut().zip(hashes) {
                *o = self.shards[self.shard_of(h)].lock().lookup(h);
            }
            return;
        }
        self.group_into(hashes, scratch);
        let GroupScratch { order, starts, .. } = scratch;
        for (shard, range) in starts.windows(2).enumerate() {
            let (a, b) = (range[0] as usize, range[1] as usize);
            if a == b {
                continue;
            }
            let sh = self.shards[shard].lock();
            for &i in &order[a..b] {
                out[i as usize] = sh.lookup(hashes[i as usize]);
            }
        }
    }

    /// A stable counting sort of positions by shard: `order[starts[s]..starts[s+1]]`
    /// are the positions (ascending) of the hashes living in shard `s`.
    fn group_by_shard(&self, hashes: &[u64]) -> (Vec<u32>, Vec<u32>) {
        let mut scratch = GroupScratch::default();
        self.group_into(hashes, &mut scratch);
        (scratch.order, scratch.starts)
    }

    /// [`Self::group_by_shard`] into buffers reused across a lookup's batches.
    fn group_into(&self, hashes: &[u64], scratch: &mut GroupScratch) {
        let n = self.shards.len();
        let GroupScratch {
            order,
            starts,
            fill,
        } = scratch;
        starts.clear();
        starts.resize(n + 1, 0);
        for &h in hashes {
            starts[self.shard_of(h) + 1] += 1;
        }
        for s in 0..n {
            starts[s + 1] += starts[s];
        }
        fill.clear();
        fill.extend_from_slice(&starts[..n]);
        order.clear();
        order.resize(hashes.len(), 0);
        for (i, &h) in hashes.iter().enumerate() {
            let s = self.shard_of(h);
            order[fill[s] as usize] = i as u32;
            fill[s] += 1;
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
