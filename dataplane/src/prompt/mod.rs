//! Prompt extraction: the routing fields of a request body and its prompt, visited
//! as borrowed slices of the raw JSON string values (no copy, no unescaping).
//!
//! - `scanner.rs`: a validating JSON scanner over `&[u8]` that hands out raw slices.
//! - `extract.rs`: which fields each endpoint carries and the order the prompt is fed.
//! - `tests.rs`: examples and properties (escapes, unicode, parts, garbage).
//!
//! Why a hand-written scanner: the body must stay untouched so the proxy can forward
//! it (simd-json parses in place, so it needs a copy first), and routing reads a
//! handful of fields, so a full DOM or tape is wasted work. sonic-rs's lazy
//! iterators fit the zero-copy design but were slower here: without `-C target-cpu`
//! (a shipped binary cannot assume AVX2) its SIMD paths fall back. Same bodies, same
//! block hasher, one criterion run (`cargo bench -p kvroute --bench routing_core --
//! --measurement-time 2 --warm-up-time 1`, group `extract`, chat bodies with an
//! escape every ~30 bytes; 2-core VM shared with other builds, load average ~5, so
//! absolute figures are about 2x a quiet machine's; compare the columns):
//!
//! | chat body | scanner + hash | sonic-rs lazy + hash | simd-json (copy + parse) + hash |
//! | --------- | -------------- | -------------------- | ------------------------------- |
//! | 1 KiB     | 1.31 µs        | 3.20 µs              | 2.23 µs                         |
//! | 4 KiB     | 2.52 µs        | 4.69 µs              | 4.57 µs                         |
//! | 32 KiB    | 22.3 µs        | 55.1 µs              | 45.9 µs                         |
//! | 128 KiB   | 80.4 µs        | 232.9 µs             | 177.1 µs                        |
//! | 512 KiB   | 532 µs         | 1222 µs              | 922 µs                          |
//!
//! Strings are scanned 64 bytes at a time as bit masks of quotes, backslashes and
//! control bytes (`scanner::chunk_masks`, SSE2/NEON through `wide`, or AVX-512 /
//! AVX2 in `crate::sys` when the CPU has it); the escaped bytes come from the
//! backslash mask by simdjson's carry trick, so there is no branch per escape, and
//! the AVX kernels check every escaped byte of a chunk at once with a nibble-table
//! lookup. Stopping at each special with a bytewise search or `memchr2`
//! ran 2-5x slower on escape-dense text; the previous multiply-packed mask with a
//! step per special ran ~5.5 GB/s, this one ~8.5 GB/s on the bench's prose (one
//! escape every ~30 bytes) and ~12 GB/s on plain text.
#![forbid(unsafe_code)]

mod extract;
// Crate-visible: the prediction cache walks bodies with it for its canonical key.
pub(crate) mod scanner;
#[cfg(test)]
mod tests;

pub use extract::{extract, Endpoint, RequestFields};

/// Fed between chat roles and contents and after each message, so turn n's stream is
/// a prefix of turn n+1's and a role can never run into its content. Raw JSON strings
/// cannot contain control bytes, so these never collide with prompt text.
pub const ROLE_SEPARATOR: &[u8] = b"\x1f";
pub const ITEM_SEPARATOR: &[u8] = b"\x1e";

/// A body the proxy must reject with 400; the message names what and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtractError {
    #[error("invalid JSON at byte {offset}: {what}")]
    Syntax { offset: usize, what: &'static str },
    #[error("invalid JSON at byte {offset}: nesting deeper than {max}")]
    TooDeep { offset: usize, max: usize },
    #[error("request body must be a JSON object")]
    NotAnObject,
    #[error("field `{field}` has the wrong type: expected {expected}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
    },
}
