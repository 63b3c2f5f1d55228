//! Incremental parsing of an OpenAI-style SSE stream: `data: {json}` lines, `data: [DONE]` last.

use serde::Deserialize;

#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// The payload of one `data:` line (without the prefix and surrounding whitespace).
    Data(Vec<u8>),
    Done,
}

/// Splits an arbitrary chunking of the body into `data:` events. Comment lines, `event:`/`id:`
/// fields and blank separators are skipped: the OpenAI streams only use `data:`.
#[derive(Default)]
pub struct SseParser {
    buf: Vec<u8>,
}

impl SseParser {
    pub fn feed(&mut self, chunk: &[u8], mut on_event: impl FnMut(Event)) {
        self.buf.extend_from_slice(chunk);
        let mut start = 0;
        while let Some(nl) = self.buf[start..].iter().position(|&b| b == b'\n') {
            let line = trim(&self.buf[start..start + nl]);
            start += nl + 1;
            if let Some(rest) = line.strip_prefix(b"data:") {
                let payload = trim(rest);
                if payload == b"[DONE]" {
                    on_event(Event::Done);
                } else if !payload.is_empty() {
                    on_event(Event::Data(payload.to_vec()));
                }
            }
        }
        self.buf.drain(..start);
    }
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = s {
        if first.is_ascii_whitespace() {
            s = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = s {
        if last.is_ascii_whitespace() {
            s = rest;
        } else {
            break;
        }
    }
    s
}

/// The fields of a completion chunk the load generator cares about; everything else is ignored
/// so both `/v1/completions` and `/v1/chat/completions` chunks parse.
#[derive(Debug, Default, Deserialize)]
pub struct Chunk {
    #[serde(default)]
    pub choices: Vec<Choice>,
    #[serde(default)]
    pub usage: Option<Usage>,
    #[serde(default)]
    pub error: Option<serde_json::Value>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Choice {
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub delta: Option<Delta>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Delta {
    #[serde(default)]
    pub content: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

#[derive(Debug, Default, Deserialize)]
pub struct PromptTokensDetails {
    #[serde(default)]
    pub cached_tokens: Option<u64>,
}

impl Chunk {
    /// Whether this chunk carries generated text (a role-only first chat delta does not).
    pub fn has_content(&self) -> bool {
        self.choices.iter().any(|c| {
            c.text.as_deref().is_some_and(|t| !t.is_empty())
                || c.delta
                    .as_ref()
                    .and_then(|d| d.content.as_deref())
                    .is_some_and(|t| !t.is_empty())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(chunks: &[&[u8]]) -> Vec<Event> {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        for c in chunks {
            p.feed(c, |e| out.push(e));
        }
        out
    }

    #[test]
    fn splits_across_arbitrary_chunk_boundaries() {
        let whole: &[u8] =
            b"data: {\"a\":1}\n\n: comment\nevent: x\ndata:{\"b\":2}\r\n\r\ndata: [DONE]\n\n";
        let expected = vec![
            Event::Data(b"{\"a\":1}".to_vec()),
            Event::Data(b"{\"b\":2}".to_vec()),
            Event::Done,
        ];
        assert_eq!(events(&[whole]), expected);
        for cut in 1..whole.len() {
            assert_eq!(
                events(&[&whole[..cut], &whole[cut..]]),
                expected,
                "cut={cut}"
            );
        }
    }

    #[test]
    fn incomplete_last_line_is_not_emitted() {
        assert_eq!(
            events(&[b"data: {\"a\":1}\n", b"data: [DO"]),
            vec![Event::Data(b"{\"a\":1}".to_vec())]
        );
    }

    #[test]
    fn chunk_content_and_usage() {
        let c: Chunk = serde_json::from_str(r#"{"choices":[{"index":0,"text":"hi"}]}"#).unwrap();
        assert!(c.has_content());
        let c: Chunk =
            serde_json::from_str(r#"{"choices":[{"delta":{"role":"assistant"}}]}"#).unwrap();
        assert!(!c.has_content());
        let c: Chunk = serde_json::from_str(r#"{"choices":[{"delta":{"content":"x"}}]}"#).unwrap();
        assert!(c.has_content());
        let c: Chunk = serde_json::from_str(
            r#"{"choices":[],"usage":{"prompt_tokens":10,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":4}}}"#,
        )
        .unwrap();
        let u = c.usage.unwrap();
        assert_eq!(
            (
                u.prompt_tokens,
                u.prompt_tokens_details.unwrap().cached_tokens
            ),
            (10, Some(4))
        );
        let c: Chunk = serde_json::from_str(r#"{"choices":[],"usage":null}"#).unwrap();
        assert!(c.usage.is_none());
    }
}
