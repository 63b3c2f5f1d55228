//! Prompt bytes per engine token, learned per model from the `usage.prompt_tokens`
//! replicas report against the prompt bytes kvroute hashed.
//!
//! Real tokenizers give 2–5 bytes per token depending on language and content
//! (code and CJK text sit at opposite ends), so a constant puts the index's
//! capacity budgets and its predicted-versus-cached comparisons off by up to
//! twofold. The estimate is a ratio of exponentially decayed sums (bytes over
//! tokens), so long prompts weigh by their size and the last few hundred
//! reports dominate.
#![forbid(unsafe_code)]

use std::collections::HashMap;

use parking_lot::Mutex;

/// The ratio used before any report: 4 bytes per token (English prose under
/// BPE tokenizers), weighted as [`PRIOR_TOKENS`] tokens, so the first report of
/// a prompt of a few hundred tokens already outweighs it.
pub const PRIOR_BYTES_PER_TOKEN: f64 = 4.0;
const PRIOR_TOKENS: f64 = 256.0;

/// Each report scales the past by `1 - DECAY`.
const DECAY: f64 = 1.0 / 256.0;

/// Ratios outside this range are not a tokenizer (a replica reporting the wrong
/// field, a prompt the proxy did not see whole) and are ignored.
const PLAUSIBLE: std::ops::RangeInclusive<f64> = 0.5..=32.0;

/// Most models tracked; beyond it new models share the fleet-wide estimate.
const MAX_MODELS: usize = 256;

#[derive(Debug, Clone, Copy)]
struct Sums {
    bytes: f64,
    tokens: f64,
}

impl Default for Sums {
    fn default() -> Self {
        Sums {
            bytes: PRIOR_BYTES_PER_TOKEN * PRIOR_TOKENS,
            tokens: PRIOR_TOKENS,
        }
    }
}

impl Sums {
    fn add(&mut self, bytes: f64, tokens: f64) {
        self.bytes = self.bytes * (1.0 - DECAY) + bytes;
        self.tokens = self.tokens * (1.0 - DECAY) + tokens;
    }

    fn ratio(&self) -> f64 {
        self.bytes / self.tokens
    }
}

/// The learned ratios, keyed by a hash of the model name (0: no model given).
#[derive(Default)]
pub struct BytesPerToken {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    all: Sums,
    by_model: HashMap<u64, Sums>,
}

impl BytesPerToken {
    /// Learns from one report; `false` (nothing learned) when it is implausible.
    pub fn observe(&self, model: u64, prompt_bytes: u64, prompt_tokens: u64) -> bool {
        if prompt_bytes == 0 || prompt_tokens == 0 {
            return false;
        }
        let (b, t) = (prompt_bytes as f64, prompt_tokens as f64);
        if !PLAUSIBLE.contains(&(b / t)) {
            return false;
        }
        let mut g = self.inner.lock();
        g.all.add(b, t);
        let full = g.by_model.len() >= MAX_MODELS;
        if let Some(s) = g.by_model.get_mut(&model) {
            s.add(b, t);
        } else if !full {
            let mut s = Sums::default();
            s.add(b, t);
            g.by_model.insert(model, s);
        }
        true
    }

    /// The model's ratio, else the fleet-wide one.
    pub fn get(&self, model: u64) -> f64 {
        let g = self.inner.lock();
        g.by_model.get(&model).unwrap_or(&g.all).ratio()
    }

    /// The fleet-wide ratio over every model.
    pub fn overall(&self) -> f64 {
        self.inner.lock().all.ratio()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_at_the_prior_and_learns_each_model() {
        let b = BytesPerToken::default();
        assert_eq!(b.get(1), PRIOR_BYTES_PER_TOKEN);
        for _ in 0..50 {
            assert!(b.observe(1, 2_500, 1_000));
            assert!(b.observe(2, 4_800, 1_000));
        }
        assert!((b.get(1) - 2.5).abs() < 0.05, "{}", b.get(1));
        assert!((b.get(2) - 4.8).abs() < 0.05, "{}", b.get(2));
        let all = b.overall();
        assert!(all > 3.0 && all < 4.3, "{all}");
        // An unknown model gets the fleet-wide ratio.
        assert_eq!(b.get(3), all);
    }

    #[test]
    fn implausible_reports_change_nothing() {
        let b = BytesPerToken::default();
        b.observe(1, 3_000, 1_000);
        let before = b.get(1);
        for (bytes, tokens) in [(0, 10), (10, 0), (100_000, 10), (10, 100)] {
            assert!(!b.observe(1, bytes, tokens));
        }
        assert_eq!(b.get(1), before);
    }
}
