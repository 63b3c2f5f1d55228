//! Sharding, per-replica budgets and longest-prefix lookups over the shards.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crossbeam_utils::CachePadded;
use parking_lot::Mutex;

use super::shard::Shard;
use super::slots::{SlotCache, SlotModel, SlotOccupancy};
use crate::prefix::SHARD_RUN_BLOCKS;
use crate::replica::MAX_REPLICAS;

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
    /// (block, replica) pairs dropped for a budget, the entry cap or a slot-based
    /// replica's prompt leaving it, since start.
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
    /// Per replica, the slots and host cache of a slot-based engine (see
    /// `slots.rs`); `None` for engines that keep blocks, not prompts. Locked
    /// before any shard, and held while the shards are brought in line with it.
    slot_caches: Box<[Mutex<Option<SlotCache>>]>,
    /// Whether `slot_caches[s]` is set, so other replicas' inserts skip its lock.
    modelled: [AtomicBool; MAX_REPLICAS],
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
            slot_caches: (0..MAX_REPLICAS).map(|_| Mutex::new(None)).collect(),
            modelled: std::array::from_fn(|_| AtomicBool::new(false)),
        }
    }

    /// Bits 40.. pick the shard: the map inside uses the low bits for buckets and
    /// the top seven as tags, so the three stay independent. Chains keep these
    /// bits over runs of `prefix::SHARD_RUN_BLOCKS` blocks, so consecutive blocks
    /// share a shard and a chain is locked a run at a time (see [`Self::lookup_run`]).
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
        let mut model = self.slot_caches[s].lock();
        if let Some(c) = model.as_mut() {
            *c = SlotCache::new(c.model());
        }
        self.clear_blocks(slot);
    }

    fn clear_blocks(&self, slot: u16) {
        let s = usize::from(slot);
        for shard in self.shards.iter() {
            let n = shard.lock().clear(slot);
            self.live[s].fetch_sub(n, Ordering::Relaxed);
        }
    }

    /// Makes `slot` a slot-based replica (`Some`) or a block-based one (`None`).
    /// A change of shape empties what the index credits it with: the engine
    /// restarted with that shape, and the prompts tracked before are not known
    /// as prompts.
    pub fn set_slot_model(&self, slot: u16, model: Option<SlotModel>) {
        let s = usize::from(slot);
        if s >= MAX_REPLICAS {
            return;
        }
        let mut cur = self.slot_caches[s].lock();
        if cur.as_ref().map(|c| c.model()) == model {
            return;
        }
        *cur = model.map(SlotCache::new);
        self.modelled[s].store(cur.is_some(), Ordering::Relaxed);
        self.clear_blocks(slot);
    }

    pub fn slot_model(&self, slot: u16) -> Option<SlotModel> {
        let s = usize::from(slot);
        if s >= MAX_REPLICAS || !self.modelled[s].load(Ordering::Relaxed) {
            return None;
        }
        self.slot_caches[s].lock().as_ref().map(|c| c.model())
    }

    /// The prompts a slot-based replica is believed to hold.
    pub fn slot_occupancy(&self, slot: u16) -> Option<SlotOccupancy> {
        let s = usize::from(slot);
        if s >= MAX_REPLICAS || !self.modelled[s].load(Ordering::Relaxed) {
            return None;
        }
        self.slot_caches[s].lock().as_ref().map(|c| c.occupancy())
    }

    /// Records that `slot` now holds the chain `hashes` (after routing a request
    /// there). A slot-based replica takes it as its engine does (`slots.rs`),
    /// and the blocks of the prompts that leaves go. Blocks are touched tail
    /// first so a replica's oldest blocks are a chain's tail, as engines evict
    /// them: what survives is still a prefix.
    pub fn insert(&self, slot: u16, hashes: &[u64]) {
        let s = usize::from(slot);
        if s >= MAX_REPLICAS || hashes.is_empty() {
            return;
        }
        if self.modelled[s].load(Ordering::Relaxed) {
            let mut model = self.slot_caches[s].lock();
            if let Some(cache) = model.as_mut() {
                let mut dropped = Vec::new();
                let held = cache.admit(hashes, &mut dropped);
                self.remove_pairs(slot, &mut dropped);
                self.insert_chain(slot, &hashes[..held]);
                return;
            }
        }
        self.insert_chain(slot, hashes);
    }

    /// Takes `slot`'s bit off each of `hashes`, one lock per shard.
    fn remove_pairs(&self, slot: u16, hashes: &mut [u64]) {
        let s = usize::from(slot);
        hashes.sort_unstable_by_key(|&h| self.shard_of(h));
        for group in hashes.chunk_by(|&a, &b| self.shard_of(a) == self.shard_of(b)) {
            let n = self.shards[self.shard_of(group[0])]
                .lock()
                .remove(slot, group);
            self.live[s].fetch_sub(n, Ordering::Relaxed);
            self.evictions.fetch_add(n, Ordering::Relaxed);
        }
    }

    fn insert_chain(&self, slot: u16, hashes: &[u64]) {
        let s = usize::from(slot);
        if hashes.is_empty() {
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
    ///
    /// The walk goes a shard run ([`SHARD_RUN_BLOCKS`]) at a time, and looks at
    /// each run's last block first: when every replica still counting holds it,
    /// none is inside a run of misses, and each has been seen holding a block
    /// (which the walk requires of them past [`MAX_HOLE_BLOCKS`]), the blocks
    /// before it cannot change any count. A hole among them is shorter than a
    /// run, so every replica would step over it, and the walk skips them
    /// unlooked-at. Only the runs where something changes (the first two, and
    /// those where a prompt leaves a replica's cache) are looked up block by
    /// block. A prompt all of whose blocks a replica holds costs one lookup per
    /// 32 blocks, where each is a probe into a map that, at fleet scale, is a
    /// cache miss. The result is the block-by-block walk's, exactly (the
    /// `longest_match_equals_a_hash_by_hash_walk` proptest).
    pub fn longest_match(&self, hashes: &[u64], candidates: u128) -> MatchCounts {
        let mut out = MatchCounts::default();
        if candidates == 0 {
            return out;
        }
        let mut w = Walk {
            alive: candidates,
            seen: 0,
            missing: 0,
            run_start: [0; MAX_REPLICAS],
        };
        let mut bits = [0u128; SHARD_RUN_BLOCKS];
        for (k, run) in hashes.chunks(SHARD_RUN_BLOCKS).enumerate() {
            let start = k * SHARD_RUN_BLOCKS;
            let past_window = start + run.len() > MAX_HOLE_BLOCKS as usize;
            // Copies, so the walk's state is not borrowed and stays in registers.
            let (missing, alive, seen) = (w.missing, w.alive, w.seen);
            let settled = |last: u128| {
                missing == 0 && alive & !last == 0 && (!past_window || alive & !seen == 0)
            };
            if self.lookup_run(run, &mut bits[..run.len()], settled) {
                w.seen |= w.alive;
                continue;
            }
            for (i, &b) in bits[..run.len()].iter().enumerate() {
                w.step((start + i) as u32, b, &mut out);
                if w.alive == 0 {
                    return out;
                }
            }
        }
        w.finish(hashes.len() as u32, &mut out);
        out
    }

    /// One hash's holders, one lock.
    pub(super) fn lookup(&self, hash: u64) -> u128 {
        self.shards[self.shard_of(hash)].lock().lookup(hash)
    }

    /// The holders of the run's last block, then, unless `settled` says that
    /// is enough (returning true), of every block (`out`, one per block). One
    /// lock where the run lives in one shard, as a chain's runs do; never two
    /// at once.
    fn lookup_run(
        &self,
        run: &[u64],
        out: &mut [u128],
        settled: impl FnOnce(u128) -> bool,
    ) -> bool {
        let Some((&last_hash, inner)) = run.split_last() else {
            return true;
        };
        let shard = self.shard_of(last_hash);
        let sh = self.shards[shard].lock();
        let last = sh.lookup(last_hash);
        if settled(last) {
            return true;
        }
        let mut elsewhere = false;
        for (o, &h) in out.iter_mut().zip(inner) {
            if self.shard_of(h) == shard {
                *o = sh.lookup(h);
            } else {
                elsewhere = true;
            }
        }
        drop(sh);
        if elsewhere {
            for (o, &h) in out.iter_mut().zip(inner) {
                if self.shard_of(h) != shard {
                    *o = self.lookup(h);
                }
            }
        }
        out[inner.len()] = last;
        false
    }

    /// Checks a slot-based replica's model against the index (tests): its
    /// prompts and counts agree, and the index credits the replica with exactly
    /// the blocks of those prompts.
    #[cfg(test)]
    pub(super) fn check_slot_model(&self, slot: u16) -> Result<(), super::slots::Inconsistency> {
        use super::slots::Inconsistency;
        let s = usize::from(slot);
        let model = self.slot_caches[s].lock();
        let Some(cache) = model.as_ref() else {
            return Ok(());
        };
        cache.check()?;
        let held = cache.occupancy().blocks;
        if held != self.tracked(slot) {
            return Err(Inconsistency::Tracked {
                model: held,
                index: self.tracked(slot),
            });
        }
        for shard in self.shards.iter() {
            let sh = shard.lock();
            for (h, e) in sh.map.iter() {
                if e.bits.has(slot) && !cache.holds(*h) {
                    return Err(Inconsistency::Untracked(*h));
                }
            }
        }
        Ok(())
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

/// [`PrefixIndex::longest_match`]'s state between blocks.
struct Walk {
    /// Candidates still counting.
    alive: u128,
    /// Slots seen holding a block so far. The others are tracked by mask only:
    /// their run of misses began at block 0, so they all end together, and a
    /// lookup over many candidates costs no per-slot work for them.
    seen: u128,
    /// Seen slots of `alive` inside a run of misses, and where each run began.
    missing: u128,
    run_start: [u32; MAX_REPLICAS],
}

impl Walk {
    /// Block `at`, held by the slots in `b`; the counts that end there into `out`.
    #[inline(always)]
    fn step(&mut self, at: u32, b: u128, out: &mut MatchCounts) {
        self.seen |= self.alive & b;
        // The common case, every live slot present and none in a run: nothing.
        if self.alive & !b == 0 && self.missing == 0 {
            return;
        }
        if at >= MAX_HOLE_BLOCKS {
            self.alive &= self.seen;
        }
        self.missing &= !b;
        let absent = self.alive & self.seen & !b;
        let mut newly = absent & !self.missing;
        while newly != 0 {
            self.run_start[newly.trailing_zeros() as usize] = at;
            newly &= newly - 1;
        }
        self.missing |= absent;
        let mut runs = self.missing;
        while runs != 0 {
            let slot = runs.trailing_zeros() as usize;
            runs &= runs - 1;
            if at - self.run_start[slot] >= MAX_HOLE_BLOCKS {
                out.counts[slot] = self.run_start[slot];
                self.alive &= !(1u128 << slot);
                self.missing &= !(1u128 << slot);
            }
        }
    }

    /// Counts for the slots still counting at the chain's end, `len` blocks.
    fn finish(&self, len: u32, out: &mut MatchCounts) {
        let mut held = self.alive & self.seen;
        while held != 0 {
            let slot = held.trailing_zeros() as usize;
            out.counts[slot] = if self.missing & (1u128 << slot) != 0 {
                self.run_start[slot]
            } else {
                len
            };
            held &= held - 1;
        }
    }
}
