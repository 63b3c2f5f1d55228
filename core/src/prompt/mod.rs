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
//! (a shipped binary cannot assume AVX2) its SIMD paths fall back. The scanner is
//! the fastest of the three at every body size in the routing-core bench (group
//! `extract`; figures in docs/bench/routing-core.md).
//!
//! Strings are scanned 64 bytes at a time as bit masks of quotes, backslashes and
//! control bytes (`scanner::chunk_masks`, SSE2/NEON through `wide`, or AVX-512 /
//! AVX2 in `crate::sys` when the CPU has it); the escaped bytes come from the
//! backslash mask by simdjson's carry trick, so there is no branch per escape, and
//! the AVX kernels check every escaped byte of a chunk at once with a nibble-table
//! lookup. Stopping at each special with a bytewise search or `memchr2` is
//! several times slower on escape-dense text, such as prompts with a `\n` or `\"`
//! every few dozen bytes.
#![forbid(unsafe_code)]

pub mod cache_key;
mod extract;
// Crate-visible only: functions internal to the crate let the compiler inline
// the scanner into extraction; public ones cost extraction ~3 % in the
// routing-core bench.
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
