//! The prediction cache's key: a 128-bit xxh3 of the path, the tenant scope and
//! the body in a canonical form, so key order and whitespace never split
//! entries. Here rather than in the data plane's cache because it walks the
//! body with the prompt scanner.

use xxhash_rust::xxh3::xxh3_128;

use super::scanner::{Literal, Scanner, MAX_DEPTH};
use super::ExtractError;

/// Top-level fields that change how the answer is delivered or attributed, not
/// what it says.
const IGNORED: [&[u8]; 3] = [b"user", b"stream", b"stream_options"];

/// What the key walk learns about the body on the way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BodyFacts {
    /// `logprobs` is present and not `false`/`null`/`0`.
    pub logprobs: bool,
}

/// Key of a request: `scope` is the tenant (the API key's name, else the
/// credential headers) or `None` when entries are shared across tenants.
pub fn cache_key(
    path: &str,
    scope: Option<&[u8]>,
    body: &[u8],
) -> Result<(u128, BodyFacts), ExtractError> {
    let mut out = Vec::with_capacity(body.len() + path.len() + 64);
    out.extend_from_slice(path.as_bytes());
    out.push(0);
    match scope {
        // Length-prefixed so no scope/body split can collide with another.
        Some(s) => {
            out.push(1);
            out.extend_from_slice(&(s.len() as u64).to_le_bytes());
            out.extend_from_slice(s);
        }
        None => out.push(0),
    }
    let mut facts = BodyFacts::default();
    let mut s = Scanner::new(body);
    canon_top(&mut s, &mut out, &mut facts)?;
    s.expect_end()?;
    Ok((xxh3_128(&out), facts))
}

fn canon_top(
    s: &mut Scanner<'_>,
    out: &mut Vec<u8>,
    facts: &mut BodyFacts,
) -> Result<(), ExtractError> {
    if s.peek() != Some(b'{') {
        return Err(ExtractError::NotAnObject);
    }
    s.begin_object()?;
    let base = out.len();
    let mut fields: Vec<(&[u8], usize, usize)> = Vec::new();
    let mut first = true;
    while let Some(k) = s.next_key(&mut first)? {
        if IGNORED.contains(&k) {
            s.skip_value()?;
            continue;
        }
        let start = out.len();
        canon(s, out, 1)?;
        if k == b"logprobs" {
            facts.logprobs = !matches!(&out[start..], b"false" | b"null" | b"0");
        }
        fields.push((k, start, out.len()));
    }
    emit_sorted(out, base, &mut fields);
    Ok(())
}

/// Rewrites `out[base..]` (the values, in body order) as `{"k":v,...}` in key order.
fn emit_sorted(out: &mut Vec<u8>, base: usize, fields: &mut [(&[u8], usize, usize)]) {
    // Stable, so duplicate keys keep their relative order (the last one wins upstream).
    fields.sort_by(|a, b| a.0.cmp(b.0));
    let values = out.split_off(base);
    out.push(b'{');
    for (i, (k, start, end)) in fields.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'"');
        out.extend_from_slice(k);
        out.extend_from_slice(b"\":");
        out.extend_from_slice(&values[start - base..end - base]);
    }
    out.push(b'}');
}

fn canon(s: &mut Scanner<'_>, out: &mut Vec<u8>, depth: usize) -> Result<(), ExtractError> {
    if depth > MAX_DEPTH {
        return Err(ExtractError::TooDeep {
            offset: s.pos(),
            max: MAX_DEPTH,
        });
    }
    match s.peek() {
        Some(b'{') => {
            s.begin_object()?;
            let base = out.len();
            let mut fields: Vec<(&[u8], usize, usize)> = Vec::new();
            let mut first = true;
            while let Some(k) = s.next_key(&mut first)? {
                let start = out.len();
                canon(s, out, depth + 1)?;
                fields.push((k, start, out.len()));
            }
            emit_sorted(out, base, &mut fields);
        }
        Some(b'[') => {
            s.begin_array()?;
            out.push(b'[');
            let mut first = true;
            while s.next_element(&mut first)? {
                if out.last() != Some(&b'[') {
                    out.push(b',');
                }
                canon(s, out, depth + 1)?;
            }
            out.push(b']');
        }
        Some(b'"') => {
            let raw = s.string()?;
            out.push(b'"');
            out.extend_from_slice(raw);
            out.push(b'"');
        }
        Some(b't' | b'f' | b'n') => out.extend_from_slice(match s.literal()? {
            Literal::True => b"true",
            Literal::False => b"false",
            Literal::Null => b"null",
        }),
        _ => out.extend_from_slice(s.number()?),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/v1/chat/completions";

    fn k(body: &str) -> u128 {
        cache_key(P, None, body.as_bytes()).unwrap().0
    }

    #[test]
    fn key_order_whitespace_and_delivery_fields_do_not_split() {
        let a = k(r#"{"model":"m","temperature":0,"messages":[{"role":"user","content":"hi"}]}"#);
        let b = k(r#"{ "messages" : [ { "content":"hi", "role":"user" } ],
                      "temperature":0, "model":"m", "stream":true,
                      "stream_options":{"include_usage":true}, "user":"u7" }"#);
        assert_eq!(a, b);
    }

    #[test]
    fn content_path_and_scope_split() {
        let body = r#"{"model":"m","temperature":0,"prompt":"a"}"#;
        let base = k(body);
        assert_ne!(base, k(r#"{"model":"m","temperature":0,"prompt":"b"}"#));
        assert_ne!(
            base,
            k(r#"{"model":"m","temperature":0,"prompt":"a","max_tokens":3}"#)
        );
        assert_ne!(base, k(r#"{"model":"m","temperature":0,"prompt":["a"]}"#));
        let other = cache_key("/v1/completions", None, body.as_bytes())
            .unwrap()
            .0;
        assert_ne!(base, other);
        let t1 = cache_key(P, Some(b"Bearer a"), body.as_bytes()).unwrap().0;
        let t2 = cache_key(P, Some(b"Bearer b"), body.as_bytes()).unwrap().0;
        assert!(t1 != t2 && t1 != base);
        // Nested arrays keep their order: it is content.
        assert_ne!(
            k(r#"{"messages":[{"content":"a"},{"content":"b"}]}"#),
            k(r#"{"messages":[{"content":"b"},{"content":"a"}]}"#)
        );
    }

    #[test]
    fn logprobs_is_reported_and_bad_json_fails() {
        let f = |b: &str| cache_key(P, None, b.as_bytes()).unwrap().1.logprobs;
        assert!(f(r#"{"logprobs":true}"#));
        assert!(f(r#"{"logprobs":5}"#));
        assert!(!f(r#"{"logprobs":false}"#));
        assert!(!f(r#"{"logprobs":null}"#));
        assert!(!f(r#"{"prompt":"x"}"#));
        assert!(cache_key(P, None, b"{\"a\":").is_err());
        assert!(cache_key(P, None, b"[1]").is_err());
        assert!(cache_key(P, None, b"{} x").is_err());
    }
}
