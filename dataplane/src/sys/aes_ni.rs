//! The block hash (`crate::prefix::block_hash`) on AES-NI, chosen at run time.
//!
//! x86-64 CPUs have had AES-NI since 2010–2011 (Intel Westmere, AMD
//! Bulldozer), but the baseline target does not promise it. Like `avx2`, the kernels are safe
//! `#[target_feature]` functions over `bytemuck` casts; the one `unsafe` is
//! the call into them after checking the CPU.

use std::arch::x86_64::{__m128i, _mm_aesenc_si128, _mm_cvtsi128_si64};

use crate::prefix::block_hash::rounds;

/// Whether this CPU runs the kernel (else the block hash takes the software
/// path).
pub(crate) fn available() -> bool {
    std::arch::is_x86_feature_detected!("aes")
}

/// The hash of one block (`len ≥ 16`); `None` on a CPU without AES-NI.
#[inline]
pub(crate) fn block_hash(block: &[u8]) -> Option<u64> {
    if !available() {
        return None;
    }
    // SAFETY: `block_hash_aesni` is safe apart from its target feature, and the
    // CPU has just been checked to support AES-NI.
    Some(unsafe { block_hash_aesni(block) })
}

/// `prefix::scan_block_hashes` on AES-NI; the state back as `Err` (and `step`
/// not called) on a CPU without it.
#[inline]
pub(crate) fn scan_block_hashes<S>(
    bytes: &[u8],
    block: usize,
    out: &mut [u64],
    state: S,
    step: &mut impl FnMut(&mut S, u64) -> u64,
) -> Result<S, S> {
    if !available() {
        return Err(state);
    }
    // SAFETY: as above, the CPU has just been checked to support AES-NI.
    Ok(unsafe { scan_block_hashes_aesni(bytes, block, out, state, step) })
}

/// The loop compiled for AES-NI, so the rounds and the caller's `step` (the
/// chain fold) inline into it and consecutive blocks overlap in the CPU.
#[target_feature(enable = "aes")]
fn scan_block_hashes_aesni<S>(
    bytes: &[u8],
    block: usize,
    out: &mut [u64],
    mut state: S,
    step: &mut impl FnMut(&mut S, u64) -> u64,
) -> S {
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(block)) {
        *o = step(&mut state, block_hash_aesni(b));
    }
    state
}

#[target_feature(enable = "aes")]
#[inline]
fn block_hash_aesni(block: &[u8]) -> u64 {
    let v = |bytes: [u8; 16]| -> __m128i { bytemuck::cast(bytes) };
    let h = rounds(block, v, |_, w| v(w), |s, k| *s = _mm_aesenc_si128(*s, *k));
    _mm_cvtsi128_si64(h) as u64
}
