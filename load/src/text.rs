//! Deterministic prompt text: every id owns an endless stream of word-like printable ASCII, and a
//! segment of `n` bytes is the first `n` bytes of its id's stream (a full trace block ends in a
//! space). Equal ids therefore give equal bytes and a cut-off last block is a prefix of the full
//! block, which is what keeps the trace's prefix-sharing structure intact at the byte level.
//!
//! The PRNG is a hand-rolled splitmix64 rather than `rand`: `rand` does not promise stable streams
//! across versions, and benchmark prompts must not change when a dependency is bumped.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Domain separator so ids hashed here never collide with ids hashed for other purposes.
const TEXT_SEED: u64 = 0x6b76_726f_7574_6521;

/// Letters only (plus the space and light punctuation added by the generator): never a quote,
/// backslash or control character, so the text is JSON-safe without escaping.
const LETTERS: &[u8; 26] = b"abcdefghijklmnopqrstuvwxyz";

/// splitmix64: tiny, fast, and good enough to make text that never repeats by accident.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (multiply-shift; the bias is irrelevant for text and arrival jitter).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Appends the first `n` bytes of `id`'s text stream to `out`.
pub fn push_stream(out: &mut String, id: u64, n: usize) {
    let mut rng = SplitMix64::new(xxh3_64_with_seed(&id.to_le_bytes(), TEXT_SEED));
    let start = out.len();
    out.reserve(n);
    while out.len() - start < n {
        // Words of 1..=9 letters; an occasional comma or period makes it look like prose to a
        // human reading a capture, at no cost.
        let word_len = 1 + rng.below(9) as usize;
        for _ in 0..word_len {
            out.push(LETTERS[rng.below(26) as usize] as char);
        }
        match rng.below(16) {
            0 => out.push(','),
            1 => out.push('.'),
            _ => {}
        }
        out.push(' ');
    }
    out.truncate(start + n);
}

/// Appends segment `id` of `n` bytes where a complete segment is `full` bytes long: the complete
/// segment ends in a space so words never straddle two blocks, and a shorter cut is a byte
/// prefix of the complete segment.
pub fn push_segment(out: &mut String, id: u64, n: usize, full: usize) {
    if n == 0 {
        return;
    }
    if n >= full {
        push_stream(out, id, full - 1);
        out.push(' ');
    } else {
        push_stream(out, id, n);
    }
}

/// The text of segment `id`, `n` bytes of a `full`-byte segment (see [`push_segment`]).
pub fn segment_text(id: u64, n: usize, full: usize) -> String {
    let mut s = String::with_capacity(n);
    push_segment(&mut s, id, n, full);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_id_same_bytes_and_exact_length() {
        for n in [0, 1, 7, 511, 512, 4096] {
            let a = segment_text(42, n, 512.max(n));
            assert_eq!(a.len(), n);
            assert_eq!(a, segment_text(42, n, 512.max(n)));
        }
    }

    #[test]
    fn cut_segment_is_prefix_of_full_segment() {
        let full = segment_text(7, 512, 512);
        assert!(full.ends_with(' '));
        for n in [1, 100, 300, 511] {
            assert!(full.starts_with(&segment_text(7, n, 512)), "n={n}");
        }
    }

    #[test]
    fn text_is_json_safe_printable_ascii() {
        for id in 0..200 {
            let s = segment_text(id, 512, 512);
            assert!(s
                .bytes()
                .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\'));
        }
    }

    #[test]
    fn different_ids_give_different_text() {
        let a = segment_text(1, 512, 512);
        let b = segment_text(2, 512, 512);
        assert_ne!(a, b);
        // Two independent streams agree on a handful of leading bytes at most.
        let common = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
        assert!(common < 16, "{common}");
    }

    #[test]
    fn splitmix_is_stable() {
        // Pinned so a refactor that silently changes every benchmark prompt fails here.
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xe220_a839_7b1d_cdaf);
    }
}
