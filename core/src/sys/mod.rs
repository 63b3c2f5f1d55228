//! Every `unsafe` line of the routing core, each under a `// SAFETY:` comment:
//! the entries to the AVX2, AVX-512 and AES kernels, behind a run-time CPU
//! check. The rest of the crate denies `unsafe_code`.
// Opts out of the workspace `unsafe_code = "deny"`: the SIMD/AES kernel entries need it.
#![allow(unsafe_code)]

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub(crate) mod aes;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
