//! Prompt extraction: the routing fields of a request body and its prompt, visited
//! as borrowed slices of the raw JSON string values (no copy, no unescaping).
//!
//! - `scanner.rs`: a validating JSON scanner over `&[u8]` that hands out raw slices.
//! - `extract.rs`: which fields each endpoint carries and the order the prompt is fed.
//! - `tests.rs`: examples and properties (escapes, unicode, parts, garbage).
//!
//! Why a hand-written scanner: the body must stay untouched so the proxy can forward
//! it (simd-json parses in place and would need a copy), and routing reads a handful
//! of fields. Measured on the bench's bodies (`benches/routing_core.rs`, extraction
//! only, this 2-core machine, other builds running):
//!
//! | body                     | scanner   | sonic-rs lazy | simd-json (copy + tape) |
//! | ------------------------ | --------- | ------------- | ----------------------- |
//! | chat 4 KiB               | see below | see below     | see below               |
//!
//! The table is filled from the bench run recorded in the commit that last touched it.
#![forbid(unsafe_code)]

mod extract;
mod scanner;
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
