//! The most used prompt prefixes, with a sample request for each, so the control
//! daemon can pre-warm a standby replica before it joins rotation (admin
//! `GET /hot-prefixes`).
//!
//! Kept by the proxy rather than a routing policy because it needs the request
//! body, which policies never see. One request in [`SAMPLE_EVERY`] per worker is
//! recorded, so the shared lock is off the common path.

use std::collections::HashMap;
use std::sync::Mutex;

use kvroute_admin_api::HotPrefix;

/// Record one request in this many (per worker).
pub const SAMPLE_EVERY: u64 = 8;
/// Anchors tracked; the least used one makes room for a new one.
const CAPACITY: usize = 256;
/// Bodies larger than this are not kept as samples (the replay must stay cheap).
pub const MAX_SAMPLE_BYTES: usize = 64 * 1024;

struct Entry {
    hits: u64,
    model: Option<String>,
    path: String,
    sample_body: String,
}

#[derive(Default)]
pub struct HotPrefixes {
    entries: Mutex<HashMap<u64, Entry>>,
}

impl HotPrefixes {
    /// Counts one sampled request whose prompt starts with `anchor`; keeps its
    /// body as the anchor's sample when it has none yet.
    pub fn record(&self, anchor: u64, model: Option<&str>, path: &str, body: &[u8]) {
        if body.len() > MAX_SAMPLE_BYTES {
            return;
        }
        let mut map = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = map.get_mut(&anchor) {
            e.hits += 1;
            return;
        }
        let Ok(text) = std::str::from_utf8(body) else {
            return;
        };
        if map.len() >= CAPACITY {
            // Evict the least used, and age the rest so yesterday's hot prompt
            // does not hold its place forever.
            if let Some(&cold) = map.iter().min_by_key(|(_, e)| e.hits).map(|(k, _)| k) {
                map.remove(&cold);
            }
            for e in map.values_mut() {
                e.hits = e.hits.div_ceil(2);
            }
        }
        map.insert(
            anchor,
            Entry {
                hits: 1,
                model: model.map(str::to_owned),
                path: path.to_owned(),
                sample_body: text.to_owned(),
            },
        );
    }

    /// Hottest first, at most `limit`.
    pub fn top(&self, limit: usize) -> Vec<HotPrefix> {
        let map = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<HotPrefix> = map
            .iter()
            .map(|(&anchor, e)| HotPrefix {
                anchor,
                hits: e.hits * SAMPLE_EVERY,
                model: e.model.clone(),
                path: e.path.clone(),
                sample_body: e.sample_body.clone(),
            })
            .collect();
        v.sort_by(|a, b| b.hits.cmp(&a.hits).then(a.anchor.cmp(&b.anchor)));
        v.truncate(limit);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hottest_first_bounded_and_sampled_once() {
        let h = HotPrefixes::default();
        for _ in 0..5 {
            h.record(1, Some("m"), "/v1/completions", br#"{"prompt":"a"}"#);
        }
        h.record(2, None, "/v1/chat/completions", br#"{"messages":[]}"#);
        let top = h.top(10);
        assert_eq!(top.len(), 2);
        assert_eq!(top[0].anchor, 1);
        assert_eq!(top[0].hits, 5 * SAMPLE_EVERY);
        assert_eq!(top[0].sample_body, r#"{"prompt":"a"}"#);
        assert_eq!(h.top(1).len(), 1);
        h.record(
            3,
            None,
            "/v1/completions",
            &vec![b'x'; MAX_SAMPLE_BYTES + 1],
        );
        assert_eq!(h.top(10).len(), 2, "oversized bodies are not sampled");
        for a in 10..10 + CAPACITY as u64 {
            h.record(a, None, "/v1/completions", b"{}");
        }
        let top = h.top(usize::MAX);
        assert_eq!(top.len(), CAPACITY);
        assert_eq!(top[0].anchor, 1, "the hot anchor survives eviction");
    }
}
