//! Local memory: a moka (W-TinyLFU) cache weighed in bytes, with a TTL.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use moka::notification::RemovalCause;
use moka::sync::Cache;

use crate::metrics as m;

/// Bookkeeping per entry beyond its bytes (key, Arc, moka's node), so a budget
/// of many tiny entries still bounds real memory.
const ENTRY_OVERHEAD: usize = 128;

/// How an answer was delivered: a stored answer replays only to a request
/// asking for the same, since each form's bytes differ (SSE events, and with
/// `include_usage` a final usage event).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Plain = 0,
    Stream = 1,
    StreamWithUsage = 2,
}

impl Delivery {
    pub fn of(stream: bool, include_usage: bool) -> Delivery {
        match (stream, include_usage) {
            (false, _) => Delivery::Plain,
            (true, false) => Delivery::Stream,
            (true, true) => Delivery::StreamWithUsage,
        }
    }
}

/// One stored answer.
#[derive(Debug, PartialEq, Eq)]
pub struct Entry {
    /// For `Stream*`, the body is the SSE events.
    pub delivery: Delivery,
    /// End-to-end response headers, each `name: value\r\n`.
    pub head: Bytes,
    /// The decoded body.
    pub body: Bytes,
}

const MAGIC: &[u8; 4] = b"kvp1";

impl Entry {
    pub fn weight(&self) -> usize {
        self.head.len() + self.body.len() + ENTRY_OVERHEAD
    }

    /// Serialised form for the shared backend.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.head.len() + self.body.len() + 16);
        v.extend_from_slice(MAGIC);
        v.push(self.delivery as u8);
        v.extend_from_slice(&(self.head.len() as u32).to_le_bytes());
        v.extend_from_slice(&self.head);
        v.extend_from_slice(&self.body);
        v
    }

    /// Anything malformed (another writer, another version) is no entry at all.
    pub fn decode(b: &[u8]) -> Option<Entry> {
        let rest = b.strip_prefix(MAGIC)?;
        let (&delivery, rest) = rest.split_first()?;
        let delivery = match delivery {
            0 => Delivery::Plain,
            1 => Delivery::Stream,
            2 => Delivery::StreamWithUsage,
            _ => return None,
        };
        let (len, rest) = rest.split_first_chunk::<4>()?;
        let len = u32::from_le_bytes(*len) as usize;
        if rest.len() < len {
            return None;
        }
        Some(Entry {
            delivery,
            head: Bytes::copy_from_slice(&rest[..len]),
            body: Bytes::copy_from_slice(&rest[len..]),
        })
    }
}

pub struct Store {
    cache: Cache<u128, Arc<Entry>>,
}

impl Store {
    pub fn new(max_bytes: u64, ttl: Duration) -> Store {
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_k: &u128, e: &Arc<Entry>| e.weight().min(u32::MAX as usize) as u32)
            .time_to_live(ttl)
            .eviction_listener(|_k, _v, cause| {
                let cause = match cause {
                    RemovalCause::Size => "size",
                    RemovalCause::Expired => "expired",
                    // Replaced or removed on purpose: not an eviction.
                    RemovalCause::Replaced | RemovalCause::Explicit => return,
                };
                metrics::counter!(m::CACHE_EVICTIONS, "cause" => cause).increment(1);
            })
            .build();
        Store { cache }
    }

    pub fn get(&self, key: u128) -> Option<Arc<Entry>> {
        self.cache.get(&key)
    }

    pub fn insert(&self, key: u128, e: Arc<Entry>) {
        self.cache.insert(key, e);
    }

    /// Bytes and entries held, after applying pending evictions (scrape time).
    pub fn usage(&self) -> (u64, u64) {
        self.cache.run_pending_tasks();
        (self.cache.weighted_size(), self.cache.entry_count())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: usize) -> Arc<Entry> {
        Arc::new(Entry {
            delivery: Delivery::Plain,
            head: Bytes::from_static(b"content-type: application/json\r\n"),
            body: Bytes::from(vec![b'x'; n]),
        })
    }

    #[test]
    fn entries_round_trip_and_garbage_is_rejected() {
        let e = entry(10);
        assert_eq!(Entry::decode(&e.encode()).as_ref(), Some(&*e));
        assert!(Entry::decode(b"nope").is_none());
        assert!(Entry::decode(b"kvp1\x01\xff\xff\x00\x00").is_none());
        assert!(Entry::decode(b"kvp1\x03\x00\x00\x00\x00").is_none());
    }

    #[test]
    fn byte_budget_holds() {
        let s = Store::new(10_000, Duration::from_secs(60));
        for k in 0..100u128 {
            s.insert(k, entry(900));
        }
        let (bytes, n) = s.usage();
        assert!(bytes <= 10_000, "{bytes}");
        assert!(n <= 10);
    }
}
