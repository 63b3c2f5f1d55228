//! Every `unsafe` line of the crate, each under a `// SAFETY:` comment: the few
//! system calls no safe crate wraps, and the entries to the AVX2, AVX-512 and
//! AES kernels. The rest of the crate denies `unsafe_code`.
// Opts out of the workspace `unsafe_code = "deny"`: syscalls and SIMD/AES kernel entries need it.
#![allow(unsafe_code)]

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub(crate) mod aes;
pub(crate) mod alloc;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
pub(crate) mod fdlimit;
pub(crate) mod peer;
pub(crate) mod steer;
