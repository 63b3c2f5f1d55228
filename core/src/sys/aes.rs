//! The block hash (`crate::prefix::block_hash`) on the CPU's AES instructions,
//! chosen at run time: AES-NI on x86-64, the Cryptography Extension on aarch64.
//! Both compute the same rounds, bit for bit.
//!
//! Neither baseline target promises them. x86-64 CPUs have had AES-NI since
//! 2010–2011 (Intel Westmere, AMD Bulldozer). Most 64-bit ARM servers and edge
//! boards have the extension (Graviton, Ampere, Jetson, Raspberry Pi 5), but
//! the Raspberry Pi 4's Cortex-A72 lacks it. Like `avx2`, the kernels are safe
//! `#[target_feature]` functions over `bytemuck` casts; the one `unsafe` is the
//! call into them after checking the CPU. Both architectures name the feature
//! `aes`, so one kernel serves both; only the round differs (`arch::enc`).

use crate::prefix::block_hash::rounds;

#[cfg(target_arch = "x86_64")]
mod arch {
    use std::arch::x86_64::{__m128i, _mm_aesenc_si128};

    pub(super) type Lane = __m128i;

    pub(super) fn available() -> bool {
        std::arch::is_x86_feature_detected!("aes")
    }

    /// One round, x86's `AESENC`: ShiftRows, SubBytes, MixColumns, then `^ k`.
    #[target_feature(enable = "aes")]
    #[inline]
    pub(super) fn enc(s: &mut Lane, k: &Lane) {
        *s = _mm_aesenc_si128(*s, *k);
    }
}

#[cfg(target_arch = "aarch64")]
mod arch {
    use std::arch::aarch64::{uint8x16_t, vaeseq_u8, vaesmcq_u8, vdupq_n_u8, veorq_u8};

    pub(super) type Lane = uint8x16_t;

    pub(super) fn available() -> bool {
        std::arch::is_aarch64_feature_detected!("aes")
    }

    /// x86's `AESENC` on ARM: `AESE(s, k)` adds the key first, then ShiftRows
    /// and SubBytes, and `AESMC` is MixColumns, so `AESENC(s, k) =
    /// AESMC(AESE(s, 0)) ^ k`, the form gxhash and aHash use on ARM. The
    /// proptests compare it with the software round under `qemu-aarch64`
    /// (`cargo xtask test`).
    #[target_feature(enable = "aes")]
    #[inline]
    pub(super) fn enc(s: &mut Lane, k: &Lane) {
        *s = veorq_u8(vaesmcq_u8(vaeseq_u8(*s, vdupq_n_u8(0))), *k);
    }
}

/// Whether this CPU runs the kernel (else the block hash takes the software
/// path).
pub(crate) fn available() -> bool {
    arch::available()
}

/// The hash of one block (`len ≥ 16`); `None` on a CPU without the AES
/// instructions.
#[inline]
pub(crate) fn block_hash(block: &[u8]) -> Option<u64> {
    if !available() {
        return None;
    }
    // SAFETY: `block_hash_kernel` is safe apart from its target feature, and
    // the CPU has just been checked to have the AES instructions.
    Some(unsafe { block_hash_kernel(block) })
}

/// `prefix::scan_block_hashes` on the AES instructions; the state back as
/// `Err` (and `step` not called) on a CPU without them.
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
    // SAFETY: as above, the CPU has just been checked to have them.
    Ok(unsafe { scan_block_hashes_kernel(bytes, block, out, state, step) })
}

/// The loop compiled for the AES instructions, so the rounds and the caller's
/// `step` (the chain fold) inline into it and consecutive blocks overlap in the
/// CPU.
#[target_feature(enable = "aes")]
fn scan_block_hashes_kernel<S>(
    bytes: &[u8],
    block: usize,
    out: &mut [u64],
    mut state: S,
    step: &mut impl FnMut(&mut S, u64) -> u64,
) -> S {
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(block)) {
        *o = step(&mut state, block_hash_kernel(b));
    }
    state
}

#[target_feature(enable = "aes")]
#[inline]
fn block_hash_kernel(block: &[u8]) -> u64 {
    let v = |bytes: [u8; 16]| -> arch::Lane { bytemuck::cast(bytes) };
    let h = rounds(block, v, |_, w| v(w), |s, k| arch::enc(s, k));
    // The low 64 bits: lane bytes 0..8, on both (little-endian) targets.
    let h: [u64; 2] = bytemuck::cast(h);
    h[0]
}
