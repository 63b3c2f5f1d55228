//! Session affinity: session key → the replica that served it, bounded in size and
//! expiring after a TTL of inactivity on the caller's clock.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::hash::BuildHasherDefault;

use parking_lot::Mutex;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Keeps session keys (user-controlled) from aligning with block hashes.
const SESSION_KEY_SEED: u64 = 0x5e55_1075_4b65_7931;
const SHARDS: usize = 16;

/// Where a session goes: the slot, checked against the replica's URL key so a
/// slot reused by another replica does not inherit the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pin {
    pub slot: u16,
    pub url_key: u64,
    expires_ms: u64,
}

type Shard = HashMap<u64, Pin, BuildHasherDefault<PassThrough>>;

/// Session keys are already hashed; hashing them again is wasted work.
#[derive(Default)]
struct PassThrough(u64);

impl std::hash::Hasher for PassThrough {
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

pub struct SessionTable {
    shards: Box<[Mutex<Shard>]>,
    capacity_per_shard: usize,
    ttl_ms: u64,
}

impl SessionTable {
    pub fn new(capacity: usize, ttl_ms: u64) -> Self {
        SessionTable {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            capacity_per_shard: capacity.div_ceil(SHARDS).max(1),
            ttl_ms,
        }
    }

    fn key(session: &[u8]) -> u64 {
        xxh3_64_with_seed(session, SESSION_KEY_SEED)
    }

    fn shard(&self, key: u64) -> &Mutex<Shard> {
        &self.shards[(key >> 48) as usize % SHARDS]
    }

    /// The live pin of `session`, if any.
    pub fn get(&self, session: &[u8], now_ms: u64) -> Option<Pin> {
        let key = Self::key(session);
        let mut shard = self.shard(key).lock();
        match shard.get(&key) {
            Some(p) if p.expires_ms > now_ms => Some(*p),
            Some(_) => {
                shard.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Pins (or re-pins, refreshing the TTL) `session` to a replica.
    pub fn put(&self, session: &[u8], slot: u16, url_key: u64, now_ms: u64) {
        let key = Self::key(session);
        let pin = Pin {
            slot,
            url_key,
            expires_ms: now_ms.saturating_add(self.ttl_ms),
        };
        let mut shard = self.shard(key).lock();
        if shard.len() >= self.capacity_per_shard && !shard.contains_key(&key) {
            make_room(&mut shard, self.capacity_per_shard, now_ms);
        }
        shard.insert(key, pin);
    }

    /// Sessions currently held (expired ones included until swept).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Drops expired sessions, then if still full the eighth closest to expiry:
/// an O(n) sweep at most once per n/8 inserts, so O(1) amortized.
fn make_room(shard: &mut Shard, capacity: usize, now_ms: u64) {
    shard.retain(|_, p| p.expires_ms > now_ms);
    if shard.len() < capacity {
        return;
    }
    let mut by_expiry: Vec<(u64, u64)> = shard.iter().map(|(k, p)| (p.expires_ms, *k)).collect();
    let cut = (by_expiry.len() / 8).max(1);
    by_expiry.select_nth_unstable(cut - 1);
    for (_, k) in &by_expiry[..cut] {
        shard.remove(k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_expire_and_refresh() {
        let t = SessionTable::new(100, 1000);
        t.put(b"s", 3, 33, 0);
        assert_eq!(t.get(b"s", 999).map(|p| p.slot), Some(3));
        assert_eq!(t.get(b"s", 1000), None);
        t.put(b"s", 4, 44, 1000);
        t.put(b"s", 5, 55, 1900);
        assert_eq!(t.get(b"s", 2800).map(|p| p.slot), Some(5));
        assert_eq!(t.get(b"other", 0), None);
    }

    #[test]
    fn capacity_is_bounded() {
        let t = SessionTable::new(64, 1_000_000);
        for i in 0..10_000u32 {
            t.put(&i.to_le_bytes(), 0, 0, u64::from(i));
        }
        assert!(t.len() <= 64, "{}", t.len());
        // The most recent sessions survive.
        assert!(t.get(&9_999u32.to_le_bytes(), 10_000).is_some());
    }
}
