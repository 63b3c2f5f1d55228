//! The slot model: one replica whose engine keeps whole prompts in a fixed
//! number of slots plus a host-memory prompt cache (llama.cpp's server), mirrored
//! so the index forgets a prompt when the engine does.
//!
//! What it mirrors, from llama.cpp's `get_available_slot` and `server_prompt_cache`:
//! - A request takes the idle slot whose prompt shares the largest fraction of
//!   the new prompt (above [`SIMILARITY`]), else the least recently used slot.
//! - The slot keeps the common prefix and then holds the new prompt: what it held
//!   past that prefix is gone, unless the host cache has it.
//! - The slot's prompt is saved to the host cache first when the slot was taken
//!   by LRU or would keep less than [`KEEP_TO_SAVE`] of its prompt; then the cached
//!   prompt that keeps the most of the new one (and at least [`KEEP_TO_LOAD`] of
//!   itself) is restored into the slot and leaves the cache.
//! - Each time a request starts, every other slot's prompt is saved to the host
//!   cache too (`--cache-idle-slots`, on by default).
//! - A save skips a prompt that a cached one already contains, and drops the
//!   cached prompts the saved one contains. Over its limit the cache drops its
//!   oldest prompts whole; a prompt larger than the whole limit is not saved.
//! - A prompt longer than a slot's context is not held past it.
//!
//! Busy slots are not modelled (the index does not see requests end): every slot
//! but the one taken is treated as idle. With a unified KV cache llama.cpp also
//! empties idle slots after saving them; what the replica holds, slots and host
//! cache together, is the same either way.
//!
//! The blocks of a prompt are chain hashes: equal at block `i` means equal up to
//! `i`, so common prefixes are found by binary search.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasherDefault;

use super::shard::IdentityHasher;

/// A slot is picked by similarity when more than this fraction of the new
/// prompt is already in it (llama.cpp's `--slot-prompt-similarity` default).
pub const SIMILARITY: f64 = 0.1;
/// A slot picked by similarity that would keep less than this fraction of its
/// prompt saves the prompt to the host cache first.
pub const KEEP_TO_SAVE: f64 = 0.5;
/// A cached prompt is restored only if the new prompt keeps at least this
/// fraction of it ("don't trash large prompts").
pub const KEEP_TO_LOAD: f64 = 0.25;

/// The shape of a slot-based replica's cache, in index blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotModel {
    /// Prompts held in slots at once (llama.cpp's `total_slots`); at least 1.
    pub slots: u32,
    /// Longest prompt one slot holds.
    pub slot_blocks: u32,
    /// Blocks of prompts the host prompt cache keeps; 0 when it has none.
    pub host_blocks: u64,
}

impl SlotModel {
    /// The most blocks the replica can hold at once: full slots and a full cache.
    pub fn max_blocks(&self) -> u64 {
        u64::from(self.slots.max(1)) * u64::from(self.slot_blocks) + self.host_blocks
    }
}

/// How many prompts a slot-based replica is believed to hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SlotOccupancy {
    /// Slots holding a prompt.
    pub in_slots: u32,
    pub in_host: u32,
    /// Distinct blocks over all of them.
    pub blocks: u64,
}

#[derive(Default)]
struct Slot {
    prompt: Vec<u64>,
    last_use: u64,
}

/// One replica's slots and host cache, and how many of its prompts hold each block.
pub(super) struct SlotCache {
    model: SlotModel,
    slots: Vec<Slot>,
    /// Oldest first.
    host: VecDeque<Vec<u64>>,
    host_len: u64,
    /// Block → prompts (slots and host cache) that contain it.
    refs: HashMap<u64, u32, BuildHasherDefault<IdentityHasher>>,
    clock: u64,
}

/// Blocks two chains share from the start.
fn common_prefix(a: &[u64], b: &[u64]) -> usize {
    let n = a.len().min(b.len());
    if n == 0 || a[0] != b[0] {
        return 0;
    }
    if a[n - 1] == b[n - 1] {
        return n;
    }
    // a[lo] == b[lo] and a[hi] != b[hi]; equality is monotone along a chain.
    let (mut lo, mut hi) = (0, n - 1);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if a[mid] == b[mid] {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    hi
}

impl SlotCache {
    pub fn new(model: SlotModel) -> SlotCache {
        SlotCache {
            slots: (0..model.slots.max(1)).map(|_| Slot::default()).collect(),
            model,
            host: VecDeque::new(),
            host_len: 0,
            refs: HashMap::default(),
            clock: 0,
        }
    }

    pub fn model(&self) -> SlotModel {
        self.model
    }

    pub fn occupancy(&self) -> SlotOccupancy {
        SlotOccupancy {
            in_slots: self.slots.iter().filter(|s| !s.prompt.is_empty()).count() as u32,
            in_host: self.host.len() as u32,
            blocks: self.refs.len() as u64,
        }
    }

    fn hold(&mut self, prompt: &[u64]) {
        for &h in prompt {
            *self.refs.entry(h).or_insert(0) += 1;
        }
    }

    /// Takes one reference off each block of `prompt`; the blocks no prompt holds
    /// any more go to `dropped`.
    fn release(&mut self, prompt: &[u64], dropped: &mut Vec<u64>) {
        for &h in prompt {
            if let Some(n) = self.refs.get_mut(&h) {
                *n -= 1;
                if *n == 0 {
                    self.refs.remove(&h);
                    dropped.push(h);
                }
            }
        }
    }

    /// The engine runs `chain`: returns how many of its leading blocks the
    /// replica now holds, and puts the blocks it no longer holds in `dropped`.
    pub fn admit(&mut self, chain: &[u64], dropped: &mut Vec<u64>) -> usize {
        let held = chain.len().min(self.model.slot_blocks as usize);
        let new = &chain[..held];
        if new.is_empty() {
            return 0;
        }
        self.clock += 1;
        // Held first, so blocks it shares with what leaves are never dropped.
        self.hold(new);
        let (i, save) = self.pick(new);
        if save && self.model.host_blocks > 0 {
            self.save(i, dropped);
            self.load(i, new, dropped);
        }
        let old = std::mem::replace(&mut self.slots[i].prompt, new.to_vec());
        self.release(&old, dropped);
        self.slots[i].last_use = self.clock;
        if self.model.host_blocks > 0 {
            for j in 0..self.slots.len() {
                if j != i {
                    self.save(j, dropped);
                }
            }
        }
        held
    }

    /// The slot a request takes, and whether its prompt is saved to the host
    /// cache before it is overwritten.
    fn pick(&self, new: &[u64]) -> (usize, bool) {
        let mut best: Option<(usize, f64)> = None;
        for (i, s) in self.slots.iter().enumerate() {
            if s.prompt.is_empty() {
                continue;
            }
            let sim = common_prefix(&s.prompt, new) as f64 / new.len() as f64;
            if sim > SIMILARITY && best.is_none_or(|(_, b)| sim > b) {
                best = Some((i, sim));
            }
        }
        if let Some((i, sim)) = best {
            let keep = sim * new.len() as f64 / self.slots[i].prompt.len() as f64;
            return (i, keep < KEEP_TO_SAVE);
        }
        // Least recently used; among equals the last, as llama.cpp's `<=` scan.
        let mut lru = 0;
        for (i, s) in self.slots.iter().enumerate() {
            if s.last_use <= self.slots[lru].last_use {
                lru = i;
            }
        }
        (lru, true)
    }

    /// Copies slot `i`'s prompt into the host cache.
    fn save(&mut self, i: usize, dropped: &mut Vec<u64>) {
        let len = self.slots[i].prompt.len();
        if len == 0 || len as u64 > self.model.host_blocks {
            return;
        }
        let prompt = &self.slots[i].prompt;
        if self.host.iter().any(|c| common_prefix(c, prompt) == len) {
            return;
        }
        let prompt = prompt.clone();
        let mut k = 0;
        while k < self.host.len() {
            if common_prefix(&self.host[k], &prompt) == self.host[k].len() {
                let gone = self.host.remove(k).unwrap_or_default();
                self.host_len -= gone.len() as u64;
                self.release(&gone, dropped);
            } else {
                k += 1;
            }
        }
        while self.host_len + len as u64 > self.model.host_blocks {
            let Some(gone) = self.host.pop_front() else {
                break;
            };
            self.host_len -= gone.len() as u64;
            self.release(&gone, dropped);
        }
        self.hold(&prompt);
        self.host_len += len as u64;
        self.host.push_back(prompt);
    }

    /// Restores into slot `i` the cached prompt that keeps more of `new`, and
    /// more of itself, than the slot's own prompt does.
    fn load(&mut self, i: usize, new: &[u64], dropped: &mut Vec<u64>) {
        let cur = &self.slots[i].prompt;
        let lcp = common_prefix(cur, new) as f64;
        let mut keep_best = if cur.is_empty() {
            -1.0
        } else {
            lcp / cur.len() as f64
        };
        let mut sim_best = lcp / new.len() as f64;
        let mut found = None;
        for (k, c) in self.host.iter().enumerate() {
            let lcp = common_prefix(c, new) as f64;
            let keep = lcp / c.len() as f64;
            let sim = lcp / new.len() as f64;
            if keep < KEEP_TO_LOAD {
                continue;
            }
            if keep_best < keep && sim_best < sim {
                (keep_best, sim_best, found) = (keep, sim, Some(k));
            }
        }
        let Some(k) = found else { return };
        let restored = self.host.remove(k).unwrap_or_default();
        self.host_len -= restored.len() as u64;
        // Its references move with it; the slot's old prompt loses its own.
        let old = std::mem::replace(&mut self.slots[i].prompt, restored);
        self.release(&old, dropped);
    }

    /// True when some prompt the replica holds contains `hash`.
    #[cfg(test)]
    pub fn holds(&self, hash: u64) -> bool {
        self.refs.contains_key(&hash)
    }

    /// Checks the reference counts against the prompts (tests).
    #[cfg(test)]
    pub fn check(&self) -> Result<(), Inconsistency> {
        let mut want: HashMap<u64, u32> = HashMap::new();
        for p in self.slots.iter().map(|s| &s.prompt).chain(self.host.iter()) {
            for &h in p {
                *want.entry(h).or_insert(0) += 1;
            }
        }
        let have: HashMap<u64, u32> = self.refs.iter().map(|(k, v)| (*k, *v)).collect();
        if want != have {
            return Err(Inconsistency::Refs {
                refs: have.len(),
                prompts: want.len(),
            });
        }
        let host: u64 = self.host.iter().map(|p| p.len() as u64).sum();
        if host != self.host_len || host > self.model.host_blocks {
            return Err(Inconsistency::Host {
                host,
                counted: self.host_len,
                budget: self.model.host_blocks,
            });
        }
        if let Some(p) = self
            .slots
            .iter()
            .find(|s| s.prompt.len() > self.model.slot_blocks as usize)
        {
            return Err(Inconsistency::SlotPrompt(p.prompt.len()));
        }
        Ok(())
    }
}

/// What a consistency check of the slot model (and the index's view of it)
/// found wrong (tests).
#[cfg(test)]
#[derive(Debug, thiserror::Error)]
pub enum Inconsistency {
    #[error("refs {refs} vs prompts {prompts}")]
    Refs { refs: usize, prompts: usize },
    #[error("host {host} (counted {counted}) over {budget}")]
    Host {
        host: u64,
        counted: u64,
        budget: u64,
    },
    #[error("slot prompt of {0} blocks")]
    SlotPrompt(usize),
    #[error("model holds {model}, index {index}")]
    Tracked { model: u64, index: u64 },
    #[error("index holds {0:x}, the model does not")]
    Untracked(u64),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_prefix_of_chains() {
        let a: Vec<u64> = (0..100).collect();
        let mut b = a.clone();
        assert_eq!(common_prefix(&a, &b), 100);
        for cut in [0usize, 1, 37, 99] {
            for h in b.iter_mut().skip(cut) {
                *h += 1000;
            }
            assert_eq!(common_prefix(&a, &b), cut, "cut {cut}");
            b = a.clone();
        }
        assert_eq!(common_prefix(&a[..10], &a), 10);
        assert_eq!(common_prefix(&[], &a), 0);
    }
}
