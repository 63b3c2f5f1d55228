//! The `usage` a replica reports at the end of a response (the JSON body, or the
//! final SSE event with `stream_options.include_usage`), read from the body's
//! tail without parsing the whole response: `usage` comes last in vLLM's and
//! SGLang's output, and the tail is all the proxy keeps while streaming.

/// Bytes of the response tail kept for the scan.
pub const TAIL_BYTES: usize = 4096;

/// The last [`TAIL_BYTES`] of a response body.
#[derive(Default)]
pub struct UsageTail {
    buf: Vec<u8>,
}

impl UsageTail {
    pub fn push(&mut self, bytes: &[u8]) {
        if bytes.len() >= TAIL_BYTES {
            self.buf.clear();
            self.buf
                .extend_from_slice(&bytes[bytes.len() - TAIL_BYTES..]);
            return;
        }
        let over = (self.buf.len() + bytes.len()).saturating_sub(TAIL_BYTES);
        self.buf.drain(..over);
        self.buf.extend_from_slice(bytes);
    }

    /// `usage.prompt_tokens`, when the tail has it.
    pub fn prompt_tokens(&self) -> Option<u64> {
        last_number(&self.buf, b"\"prompt_tokens\"")
    }

    /// `cached_tokens` (in `prompt_tokens_details`), when the tail has it.
    pub fn cached_tokens(&self) -> Option<u64> {
        last_number(&self.buf, b"\"cached_tokens\"")
    }

    /// `(prompt_tokens, cached_tokens)` when the tail reports both.
    pub fn usage(&self) -> Option<(u64, u64)> {
        Some((self.prompt_tokens()?, self.cached_tokens()?))
    }
}

/// The integer after the last occurrence of `key` and a colon.
fn last_number(hay: &[u8], key: &[u8]) -> Option<u64> {
    let at = memchr::memmem::rfind(hay, key)? + key.len();
    let rest = &hay[at..];
    let rest = &rest[rest.iter().position(|b| !b.is_ascii_whitespace())?..];
    let rest = rest.strip_prefix(b":")?;
    let start = rest.iter().position(|b| !b.is_ascii_whitespace())?;
    let digits = rest[start..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    if digits == 0 || digits > 18 {
        return None;
    }
    std::str::from_utf8(&rest[start..start + digits])
        .ok()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_json_and_sse_usage() {
        let mut t = UsageTail::default();
        t.push(br#"{"id":"x","choices":[],"usage":{"prompt_tokens": 120,"completion_tokens":5,"#);
        t.push(br#""prompt_tokens_details":{"cached_tokens":96}}}"#);
        assert_eq!(t.usage(), Some((120, 96)));

        let mut t = UsageTail::default();
        t.push(b"data: {\"choices\":[{\"text\":\"a\"}]}\n\n");
        t.push(b"data: {\"usage\":{\"prompt_tokens\":64,\"prompt_tokens_details\":{\"cached_tokens\":0}}}\n\ndata: [DONE]\n\n");
        assert_eq!(t.usage(), Some((64, 0)));
    }

    #[test]
    fn keeps_only_the_tail_and_rejects_garbage() {
        let mut t = UsageTail::default();
        t.push(br#"{"usage":{"prompt_tokens":1,"prompt_tokens_details":{"cached_tokens":1}}}"#);
        t.push(&vec![b' '; TAIL_BYTES]);
        assert_eq!(t.usage(), None);
        let mut t = UsageTail::default();
        t.push(br#""prompt_tokens":"x","cached_tokens":3"#);
        assert_eq!(t.usage(), None);
        let mut t = UsageTail::default();
        t.push(br#""prompt_tokens":null,"cached_tokens":3"#);
        assert_eq!(t.usage(), None);
    }
}
