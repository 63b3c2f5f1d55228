//! The block hash (`crate::prefix::block_hash`) on the ARMv8 Cryptography
//! Extension, chosen at run time: the same rounds as `aes_ni`, bit for bit.
//!
//! Most 64-bit ARM servers and edge boards have the extension (Graviton,
//! Ampere, Jetson, Raspberry Pi 5), but the aarch64 baseline does not promise
//! it (the Raspberry Pi 4's Cortex-A72 lacks it). Without this kernel the
//! software path takes `aes`'s eight-block calls, ~4× this loop on x86.
//!
//! ARM splits x86's `AESENC(s, k)` (ShiftRows, SubBytes, MixColumns, then
//! `^ k`) differently: `AESE(s, k)` adds the key *first*, then ShiftRows and
//! SubBytes, and `AESMC` is MixColumns. So `AESENC(s, k) = AESMC(AESE(s, 0))
//! ^ k`, the form gxhash and aHash use on ARM; the proptests compare it with
//! the software round under `qemu-aarch64` (`cargo xtask test`).

use std::arch::aarch64::{uint8x16_t, vaeseq_u8, vaesmcq_u8, vdupq_n_u8, veorq_u8};

use crate::prefix::block_hash::rounds;

/// Whether this CPU runs the kernel (else the block hash takes the software
/// path).
pub(crate) fn available() -> bool {
    std::arch::is_aarch64_feature_detected!("aes")
}

/// The hash of one block (`len ≥ 16`); `None` on a CPU without the extension.
#[inline]
pub(crate) fn block_hash(block: &[u8]) -> Option<u64> {
    if !available() {
        return None;
    }
    // SAFETY: `block_hash_armv8` is safe apart from its target feature, and
    // the CPU has just been checked to have the AES instructions.
    Some(unsafe { block_hash_armv8(block) })
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
    Ok(unsafe { scan_block_hashes_armv8(bytes, block, out, state, step) })
}

/// The loop compiled for the extension, so the rounds and the caller's `step`
/// (the chain fold) inline into it, as in `aes_ni`.
#[target_feature(enable = "aes")]
fn scan_block_hashes_armv8<S>(
    bytes: &[u8],
    block: usize,
    out: &mut [u64],
    mut state: S,
    step: &mut impl FnMut(&mut S, u64) -> u64,
) -> S {
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(block)) {
        *o = step(&mut state, block_hash_armv8(b));
    }
    state
}

#[target_feature(enable = "aes")]
#[inline]
fn block_hash_armv8(block: &[u8]) -> u64 {
    let v = |bytes: [u8; 16]| -> uint8x16_t { bytemuck::cast(bytes) };
    let zero = vdupq_n_u8(0);
    let h = rounds(
        block,
        v,
        |_, w| v(w),
        |s, k| *s = veorq_u8(vaesmcq_u8(vaeseq_u8(*s, zero)), *k),
    );
    let h: [u64; 2] = bytemuck::cast(h);
    h[0]
}
