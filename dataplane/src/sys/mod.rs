//! Every `unsafe` line of the crate, each under a `// SAFETY:` comment: the few
//! system calls no safe crate wraps. The rest of the crate denies
//! `unsafe_code` (the SIMD and AES kernels are in `kvroute-core`'s `sys`).
// Opts out of the workspace `unsafe_code = "deny"`: the syscalls need it.
#![allow(unsafe_code)]

pub(crate) mod alloc;
pub(crate) mod fdlimit;
pub(crate) mod peer;
pub(crate) mod steer;
