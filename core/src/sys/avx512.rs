//! AVX-512 kernels (AVX512BW), chosen at run time before the AVX2 ones.
//!
//! A 64-byte string chunk is one register, and each byte class is one compare
//! straight into a bit mask: no movemask, no shifting halves together. Server
//! CPUs of GPU hosts (Intel since Skylake-SP, AMD since Zen 4) have it; where it
//! is missing the AVX2 or portable kernel runs. Like `avx2`, the kernels are
//! safe `#[target_feature]` functions over `bytemuck` casts; the one `unsafe`
//! is the call into them after checking the CPU.

use std::arch::x86_64::{
    __m512i, _mm512_and_si512, _mm512_cmpeq_epi8_mask, _mm512_cmplt_epu8_mask, _mm512_set1_epi8,
    _mm512_shuffle_epi8, _mm512_srli_epi16, _mm512_test_epi8_mask,
};

use super::avx2::{ESCAPE_HIGH, ESCAPE_LOW};
use crate::prompt::scanner::{valid_string_end_with, ChunkMasks, STRING_CHUNK};

/// A 16-byte table in all four 128-bit lanes, as `vpshufb` looks up per lane.
fn lanes(table: [u8; 16]) -> __m512i {
    bytemuck::cast([table; 4])
}

/// Where a JSON string starting at `start` ends (see `valid_string_end_with`),
/// scanned with AVX-512; `None` on a CPU without AVX512BW.
#[inline]
pub(crate) fn valid_string_end(buf: &[u8], start: usize) -> Option<Result<usize, usize>> {
    if !std::arch::is_x86_feature_detected!("avx512bw") {
        return None;
    }
    // SAFETY: `valid_string_end_avx512` is safe apart from its target feature,
    // and the CPU has just been checked to support AVX512BW.
    Some(unsafe { valid_string_end_avx512(buf, start) })
}

/// The whole scan loop compiled for AVX512BW, so the chunk kernel inlines into it.
#[target_feature(enable = "avx512bw")]
fn valid_string_end_avx512(buf: &[u8], start: usize) -> Result<usize, usize> {
    valid_string_end_with(
        buf,
        start,
        |chunk| chunk_masks(chunk),
        |chunk, escaped| not_simple_escapes(chunk, escaped),
    )
}

/// The quote, backslash and control-byte masks of one chunk, all exact.
#[target_feature(enable = "avx512bw")]
fn chunk_masks(chunk: &[u8; STRING_CHUNK]) -> ChunkMasks {
    let v: __m512i = bytemuck::cast(*chunk);
    ChunkMasks {
        quote: _mm512_cmpeq_epi8_mask(v, _mm512_set1_epi8(b'"' as i8)),
        backslash: _mm512_cmpeq_epi8_mask(v, _mm512_set1_epi8(b'\\' as i8)),
        control: _mm512_cmplt_epu8_mask(v, _mm512_set1_epi8(0x20)),
    }
}

/// `avx2::not_simple_escapes` on the whole chunk at once: a byte is a one-byte
/// escape when its low- and high-nibble table entries share a bit.
#[target_feature(enable = "avx512bw")]
fn not_simple_escapes(chunk: &[u8; STRING_CHUNK], escaped: u64) -> u64 {
    let v: __m512i = bytemuck::cast(*chunk);
    // `vpshufb` zeroes lanes whose index byte has its top bit set: no entry for
    // bytes of 0x80 and up, which are no escape either.
    let by_low = _mm512_shuffle_epi8(lanes(ESCAPE_LOW), v);
    let high = _mm512_and_si512(_mm512_srli_epi16::<4>(v), _mm512_set1_epi8(0x0f));
    let by_high = _mm512_shuffle_epi8(lanes(ESCAPE_HIGH), high);
    escaped & !_mm512_test_epi8_mask(by_low, by_high)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompt::scanner;

    /// Every byte value at every position: the masks and the nibble tables
    /// classify exactly as the portable kernel does.
    #[test]
    fn masks_and_escapes_classify_every_byte_like_the_portable_kernel() {
        if !std::arch::is_x86_feature_detected!("avx512bw") {
            eprintln!("skipped: this CPU has no AVX512BW");
            return;
        }
        for b in 0..=255u8 {
            for at in [0usize, 15, 16, 31, 32, 47, 48, 63] {
                let mut chunk = [b'a'; STRING_CHUNK];
                chunk[at] = b;
                let escaped = (1u64 << at) | 1 << ((at + 7) % STRING_CHUNK);
                // SAFETY: the CPU was checked for AVX512BW above.
                let (fast, masks) =
                    unsafe { (not_simple_escapes(&chunk, escaped), chunk_masks(&chunk)) };
                assert_eq!(
                    fast,
                    scanner::not_simple_escapes(&chunk, escaped),
                    "byte {b:#04x} at {at}"
                );
                let bit = 1u64 << at;
                assert_eq!(
                    (
                        masks.quote & bit != 0,
                        masks.backslash & bit != 0,
                        masks.control & bit != 0
                    ),
                    (b == b'"', b == b'\\', b < 0x20),
                    "byte {b:#04x} at {at}"
                );
                assert_eq!(masks.quote & !bit, 0);
                assert_eq!(masks.backslash & !bit, 0);
                assert_eq!(masks.control & !bit, 0);
            }
        }
    }
}
