//! AVX2 kernels, chosen at run time.
//!
//! The binary targets baseline x86-64 (SSE2), because it ships to edge boxes of
//! unknown age; most of them have AVX2, which classifies a 64-byte string chunk
//! in two 32-byte compares per byte class instead of four 16-byte ones. The
//! kernels are safe `#[target_feature]` functions; the one `unsafe` is calling
//! them from code compiled without the feature, after checking the CPU.

use std::arch::x86_64::{
    __m256i, _mm256_and_si256, _mm256_cmpeq_epi8, _mm256_min_epu8, _mm256_movemask_epi8,
    _mm256_set1_epi8, _mm256_setzero_si256, _mm256_shuffle_epi8, _mm256_srli_epi16,
};

use crate::prompt::scanner::{valid_string_end_with, ChunkMasks, STRING_CHUNK};

/// One bit per high nibble that some one-byte escape has (2: `"` `/`, 5: `\`,
/// 6: `b` `f` `n`, 7: `r` `t`), indexed by high nibble; bytes of 0x80 and up
/// get none.
pub(super) const ESCAPE_HIGH: [u8; 16] = [0, 0, 1, 0, 0, 2, 4, 8, 0, 0, 0, 0, 0, 0, 0, 0];
/// Indexed by low nibble: the `ESCAPE_HIGH` bits of the one-byte escapes with
/// that low nibble: 2 → `"` `b` `r` (0x22, 0x62, 0x72), 4 → `t`, 6 → `f`,
/// C → `\`, E → `n`, F → `/`. `u` (0x75) is left out: its four hex digits are
/// checked one escape at a time.
pub(super) const ESCAPE_LOW: [u8; 16] = [0, 0, 1 | 4 | 8, 0, 8, 0, 4, 0, 0, 0, 0, 0, 2, 0, 4, 1];

/// A 16-byte table in both 128-bit lanes, as `vpshufb` looks up per lane.
fn lanes(table: [u8; 16]) -> __m256i {
    bytemuck::cast([table, table])
}

/// Where a JSON string starting at `start` ends (see `valid_string_end_with`),
/// scanned with AVX2; `None` on a CPU without it.
#[inline]
pub(crate) fn valid_string_end(buf: &[u8], start: usize) -> Option<Result<usize, usize>> {
    if !std::arch::is_x86_feature_detected!("avx2") {
        return None;
    }
    // SAFETY: `valid_string_end_avx2` is safe apart from its target feature, and
    // the CPU has just been checked to support AVX2.
    Some(unsafe { valid_string_end_avx2(buf, start) })
}

/// The whole scan loop compiled for AVX2, so the chunk kernel inlines into it.
#[target_feature(enable = "avx2")]
fn valid_string_end_avx2(buf: &[u8], start: usize) -> Result<usize, usize> {
    valid_string_end_with(
        buf,
        start,
        |chunk| chunk_masks(chunk),
        |chunk, escaped| not_simple_escapes(chunk, escaped),
    )
}

/// `scanner::not_simple_escapes` without a step per escape: a byte is a one-byte
/// escape when its low- and high-nibble table entries share a bit (the nibble
/// lookup simdjson classifies JSON structure with).
#[target_feature(enable = "avx2")]
fn not_simple_escapes(chunk: &[u8; STRING_CHUNK], escaped: u64) -> u64 {
    let (low, high) = (lanes(ESCAPE_LOW), lanes(ESCAPE_HIGH));
    let nibble = _mm256_set1_epi8(0x0f);
    let halves: &[[u8; 32]; 2] = bytemuck::cast_ref(chunk);
    let not_simple = |half: [u8; 32]| {
        let v: __m256i = bytemuck::cast(half);
        // `vpshufb` zeroes lanes whose index byte has its top bit set: no entry
        // for bytes of 0x80 and up, which are no escape either.
        let by_low = _mm256_shuffle_epi8(low, v);
        let by_high =
            _mm256_shuffle_epi8(high, _mm256_and_si256(_mm256_srli_epi16::<4>(v), nibble));
        bits(_mm256_cmpeq_epi8(
            _mm256_and_si256(by_low, by_high),
            _mm256_setzero_si256(),
        ))
    };
    escaped & (not_simple(halves[0]) | not_simple(halves[1]) << 32)
}

/// Bit i set where byte i of the 32-byte vector compares equal (0xff).
#[target_feature(enable = "avx2")]
fn bits(v: __m256i) -> u64 {
    u64::from(_mm256_movemask_epi8(v) as u32)
}

/// The quote, backslash and control-byte masks of one chunk; as the portable
/// kernel, the exact control mask only when the chunk's minimum byte is one.
#[target_feature(enable = "avx2")]
fn chunk_masks(chunk: &[u8; STRING_CHUNK]) -> ChunkMasks {
    let halves: &[[u8; 32]; 2] = bytemuck::cast_ref(chunk);
    let lo: __m256i = bytemuck::cast(halves[0]);
    let hi: __m256i = bytemuck::cast(halves[1]);
    let pair = |needle: __m256i| {
        bits(_mm256_cmpeq_epi8(lo, needle)) | bits(_mm256_cmpeq_epi8(hi, needle)) << 32
    };
    let below_space = _mm256_set1_epi8(0x1f);
    let is_control = |x: __m256i| _mm256_cmpeq_epi8(_mm256_min_epu8(x, below_space), x);
    ChunkMasks {
        quote: pair(_mm256_set1_epi8(b'"' as i8)),
        backslash: pair(_mm256_set1_epi8(b'\\' as i8)),
        control: if bits(is_control(_mm256_min_epu8(lo, hi))) != 0 {
            bits(is_control(lo)) | bits(is_control(hi)) << 32
        } else {
            0
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompt::scanner;

    /// Every byte value at every position: the nibble tables accept exactly the
    /// bytes the portable kernel's table does.
    #[test]
    fn nibble_tables_classify_every_byte_like_the_portable_kernel() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            eprintln!("skipped: this CPU has no AVX2");
            return;
        }
        for b in 0..=255u8 {
            for at in [0usize, 15, 16, 31, 32, 63] {
                let mut chunk = [b'a'; STRING_CHUNK];
                chunk[at] = b;
                let escaped = (1u64 << at) | 1 << ((at + 7) % STRING_CHUNK);
                // SAFETY: the CPU was checked for AVX2 above.
                let fast = unsafe { not_simple_escapes(&chunk, escaped) };
                assert_eq!(
                    fast,
                    scanner::not_simple_escapes(&chunk, escaped),
                    "byte {b:#04x} at {at}"
                );
            }
        }
    }
}
