//! Every `unsafe` line of the crate, each under a `// SAFETY:` comment: the few
//! system calls no safe crate wraps, and the entries to the AVX2, AVX-512 and
//! AES kernels. The rest of the crate denies `unsafe_code`.
#![allow(unsafe_code)]

/// The block hash's AES rounds on the CPU's own instructions: AES-NI on
/// x86-64, the Cryptography Extension on aarch64, one interface for both.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub(crate) mod aes {
    #[cfg(target_arch = "aarch64")]
    pub(crate) use super::aes_armv8::{block_hash, scan_block_hashes};
    #[cfg(target_arch = "x86_64")]
    pub(crate) use super::aes_ni::{block_hash, scan_block_hashes};
    // For the test that says whether the kernel was the one tested.
    #[cfg(all(test, target_arch = "aarch64"))]
    pub(crate) use super::aes_armv8::available;
    #[cfg(all(test, target_arch = "x86_64"))]
    pub(crate) use super::aes_ni::available;
}
#[cfg(target_arch = "aarch64")]
mod aes_armv8;
#[cfg(target_arch = "x86_64")]
mod aes_ni;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
pub(crate) mod steer;
