//! OpenAI request bodies, and the rendering of their prompt into the byte stream the cache sees.

use serde::Deserialize;

use super::error::SimError;

/// Output length when the request names none (vLLM's default for completions is 16).
pub const DEFAULT_MAX_TOKENS: u32 = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

#[derive(Debug, Deserialize)]
struct RawRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    prompt: Option<Prompt>,
    #[serde(default)]
    messages: Option<Vec<Message>>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Texts(Vec<String>),
    TokenIds(Vec<u32>),
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// What the simulator needs from a request.
#[derive(Debug)]
pub struct SimRequest {
    pub endpoint: Endpoint,
    pub model: Option<String>,
    /// Rendered prompt: cut into blocks for the cache; its length/4 is the token count.
    pub prompt: Vec<u8>,
    pub max_tokens: u32,
    pub stream: bool,
    pub include_usage: bool,
}

impl SimRequest {
    pub fn parse(endpoint: Endpoint, body: &[u8]) -> Result<Self, SimError> {
        let raw: RawRequest =
            serde_json::from_slice(body).map_err(|e| SimError::BadRequest(e.to_string()))?;
        let prompt = match endpoint {
            Endpoint::Completions => render_prompt(
                raw.prompt
                    .ok_or_else(|| SimError::BadRequest("`prompt` is required".into()))?,
            ),
            Endpoint::Chat => render_chat(
                raw.messages
                    .ok_or_else(|| SimError::BadRequest("`messages` is required".into()))?,
            ),
        };
        Ok(Self {
            endpoint,
            model: raw.model,
            prompt,
            max_tokens: raw
                .max_completion_tokens
                .or(raw.max_tokens)
                .unwrap_or(DEFAULT_MAX_TOKENS),
            stream: raw.stream.unwrap_or(false),
            include_usage: raw
                .stream_options
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
        })
    }

    /// Prompt tokens at ~4 bytes of text per token, at least one as for any real tokenizer.
    pub fn prompt_tokens(&self) -> usize {
        self.prompt.len().div_ceil(4).max(1)
    }
}

/// A prompt array is treated as one sequence (concatenated), the way the proxy hashes it; vLLM
/// would run it as a batch, which routing cannot tell apart from consecutive requests anyway.
fn render_prompt(prompt: Prompt) -> Vec<u8> {
    match prompt {
        Prompt::Text(s) => s.into_bytes(),
        Prompt::Texts(v) => v.concat().into_bytes(),
        Prompt::TokenIds(ids) => ids.iter().flat_map(|id| id.to_le_bytes()).collect(),
    }
}

/// Role marker then content per message, in order, so a conversation's next turn extends the
/// previous turn's byte stream and shares its blocks, as a chat template does.
fn render_chat(messages: Vec<Message>) -> Vec<u8> {
    let mut out = Vec::new();
    for m in messages {
        out.extend_from_slice(b"<|");
        out.extend_from_slice(m.role.as_bytes());
        out.extend_from_slice(b"|>");
        match m.content {
            Some(Content::Text(s)) => out.extend_from_slice(s.as_bytes()),
            Some(Content::Parts(parts)) => {
                for p in parts {
                    if let Some(t) = p.text {
                        out.extend_from_slice(t.as_bytes());
                    }
                }
            }
            None => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_prompt_forms() {
        let r = SimRequest::parse(Endpoint::Completions, br#"{"prompt":"abcdefgh"}"#).unwrap();
        assert_eq!(r.prompt, b"abcdefgh");
        assert_eq!(r.prompt_tokens(), 2);
        assert_eq!(r.max_tokens, DEFAULT_MAX_TOKENS);
        assert!(!r.stream);
        let r = SimRequest::parse(
            Endpoint::Completions,
            br#"{"prompt":["ab","cde"],"max_tokens":3,"stream":true,"stream_options":{"include_usage":true}}"#,
        )
        .unwrap();
        assert_eq!(r.prompt, b"abcde");
        assert_eq!(r.prompt_tokens(), 2);
        assert_eq!(r.max_tokens, 3);
        assert!(r.stream && r.include_usage);
    }

    #[test]
    fn chat_is_rendered_with_role_markers_in_order() {
        let r = SimRequest::parse(
            Endpoint::Chat,
            br#"{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":[{"type":"text","text":"hi "},{"type":"text","text":"there"}]}]}"#,
        )
        .unwrap();
        assert_eq!(r.prompt, b"<|system|>be brief<|user|>hi there");
        assert_eq!(r.model.as_deref(), Some("m"));
    }

    #[test]
    fn malformed_or_incomplete_bodies_are_bad_requests() {
        for body in [&b"{not json"[..], br#"{"messages":[]}"#, br#"{"prompt":3}"#] {
            assert!(matches!(
                SimRequest::parse(Endpoint::Completions, body),
                Err(SimError::BadRequest(_))
            ));
        }
        assert!(SimRequest::parse(Endpoint::Chat, br#"{"prompt":"x"}"#).is_err());
    }
}
