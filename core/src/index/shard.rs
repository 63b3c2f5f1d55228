//! One shard: block hash → replica bitset, and per replica a CLOCK queue that holds
//! exactly one item per block the replica is believed to cache.
//!
//! Why CLOCK with one stamp per entry: exact per-(block, replica) recency would
//! need a stamp per pair; instead an entry remembers when anyone last touched it
//! and a queue item when it was queued. At the front of a replica's queue, a block
//! touched since it was queued gets a second chance (requeued), otherwise it loses
//! that replica's bit. Each item is requeued at most once per touch, so eviction is
//! O(1) amortized, and the entry stays at 24 bytes.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use crate::replica::MAX_REPLICAS;

/// Keys are already uniform 64-bit hashes; hashing them again is wasted work.
#[derive(Default)]
pub(super) struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// One bit per replica slot, as two words so an entry is 8-byte aligned (a `u128`
/// would pad every map bucket to 48 bytes).
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct SlotBits([u64; 2]);

impl SlotBits {
    pub fn single(slot: u16) -> Self {
        let mut b = SlotBits::default();
        b.set(slot);
        b
    }
    pub fn has(self, slot: u16) -> bool {
        self.0[usize::from(slot >> 6)] & (1 << (slot & 63)) != 0
    }
    pub fn set(&mut self, slot: u16) {
        self.0[usize::from(slot >> 6)] |= 1 << (slot & 63);
    }
    pub fn clear(&mut self, slot: u16) {
        self.0[usize::from(slot >> 6)] &= !(1 << (slot & 63));
    }
    pub fn is_empty(self) -> bool {
        self.0 == [0, 0]
    }
    pub fn as_u128(self) -> u128 {
        u128::from(self.0[0]) | (u128::from(self.0[1]) << 64)
    }
}

pub(super) struct Entry {
    pub bits: SlotBits,
    /// Shard clock at the last touch by any replica.
    pub touch: u32,
}

/// A queued (block, replica) pair; 12 bytes instead of a padded `(u64, u32)`.
#[derive(Clone, Copy)]
pub(super) struct QueueItem {
    hash: [u32; 2],
    stamp: u32,
}

impl QueueItem {
    fn new(hash: u64, stamp: u32) -> Self {
        QueueItem {
            hash: [hash as u32, (hash >> 32) as u32],
            stamp,
        }
    }
    fn hash(self) -> u64 {
        u64::from(self.hash[0]) | (u64::from(self.hash[1]) << 32)
    }
}

/// Serial-number order, so the 32-bit clock may wrap.
fn after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

pub(super) struct Shard {
    pub map: HashMap<u64, Entry, BuildHasherDefault<IdentityHasher>>,
    /// Indexed by slot; empty queues own no memory.
    pub queues: Vec<VecDeque<QueueItem>>,
    /// Advanced once per insert call that reaches this shard.
    clock: u32,
}

impl Default for Shard {
    fn default() -> Self {
        Shard {
            map: HashMap::default(),
            queues: (0..MAX_REPLICAS).map(|_| VecDeque::new()).collect(),
            clock: 0,
        }
    }
}

impl Shard {
    pub fn lookup(&self, hash: u64) -> u128 {
        self.map.get(&hash).map_or(0, |e| e.bits.as_u128())
    }

    pub fn tick(&mut self) {
        self.clock = self.clock.wrapping_add(1);
    }

    /// Marks `hash` as held by `slot`. Returns (pair newly tracked, pairs of `slot`
    /// evicted to respect `max_entries`).
    pub fn touch(&mut self, slot: u16, hash: u64, max_entries: usize) -> (bool, u64) {
        let stamp = self.clock;
        let mut evicted = 0;
        if let Some(e) = self.map.get_mut(&hash) {
            e.touch = stamp;
            if e.bits.has(slot) {
                return (false, 0);
            }
            e.bits.set(slot);
        } else {
            // The hard cap: make room from this replica's own oldest blocks; if they
            // are all shared with other replicas, the new block goes untracked.
            let mut tries = 8;
            while self.map.len() >= max_entries && tries > 0 && self.evict_one(slot, false) {
                evicted += 1;
                tries -= 1;
            }
            if self.map.len() >= max_entries {
                return (false, evicted);
            }
            self.map.insert(
                hash,
                Entry {
                    bits: SlotBits::single(slot),
                    touch: stamp,
                },
            );
        }
        self.queues[usize::from(slot)].push_back(QueueItem::new(hash, stamp));
        (true, evicted)
    }

    /// Drops `slot`'s least recently used block in this shard (honouring second
    /// chances when `second_chance`). False when the slot has nothing here.
    pub fn evict_one(&mut self, slot: u16, second_chance: bool) -> bool {
        let clock = self.clock;
        let queue = &mut self.queues[usize::from(slot)];
        while let Some(item) = queue.pop_front() {
            let hash = item.hash();
            let Some(e) = self.map.get_mut(&hash) else {
                debug_assert!(false, "queued block without an entry");
                continue;
            };
            if second_chance && after(e.touch, item.stamp) {
                // Requeued at the current clock, which no touch can be after until
                // the next insert call: every item is requeued at most once here.
                queue.push_back(QueueItem::new(hash, clock));
                continue;
            }
            e.bits.clear(slot);
            if e.bits.is_empty() {
                self.map.remove(&hash);
            }
            return true;
        }
        false
    }

    /// Takes `slot`'s bit off each of `hashes` (and their queue items, one per
    /// pair); returns how many it held.
    pub fn remove(&mut self, slot: u16, hashes: &[u64]) -> u64 {
        let mut n = 0;
        for h in hashes {
            let Some(e) = self.map.get_mut(h) else {
                continue;
            };
            if !e.bits.has(slot) {
                continue;
            }
            e.bits.clear(slot);
            n += 1;
            if e.bits.is_empty() {
                self.map.remove(h);
            }
        }
        if n > 0 {
            let map = &self.map;
            self.queues[usize::from(slot)]
                .retain(|item| map.get(&item.hash()).is_some_and(|e| e.bits.has(slot)));
        }
        n
    }

    /// Removes every block of `slot`; returns how many.
    pub fn clear(&mut self, slot: u16) -> u64 {
        let queue = std::mem::take(&mut self.queues[usize::from(slot)]);
        let n = queue.len() as u64;
        for item in queue {
            let hash = item.hash();
            if let Some(e) = self.map.get_mut(&hash) {
                e.bits.clear(slot);
                if e.bits.is_empty() {
                    self.map.remove(&hash);
                }
            }
        }
        n
    }

    pub fn queued(&self, slot: u16) -> usize {
        self.queues[usize::from(slot)].len()
    }

    /// Bytes this shard's tables own (buckets plus control bytes, queue buffers).
    pub fn heap_bytes(&self) -> usize {
        let bucket = std::mem::size_of::<(u64, Entry)>() + 1;
        // `capacity` is what fits before growing: 7/8 of a power-of-two bucket count.
        let cap = self.map.capacity();
        let buckets = if cap == 0 {
            0
        } else if cap < 8 {
            cap + 1
        } else {
            (cap * 8 / 7).next_power_of_two()
        };
        let queues: usize = self
            .queues
            .iter()
            .map(|q| q.capacity() * std::mem::size_of::<QueueItem>())
            .sum();
        buckets * bucket + queues
    }
}
