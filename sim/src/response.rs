//! OpenAI response bodies and SSE chunks with synthetic text.

use serde_json::{json, Value};

use super::request::Endpoint;

const WORDS: [&str; 8] = [
    " the", " quick", " brown", " fox", " jumps", " over", " a", " dog",
];

/// The `i`-th synthetic output token.
pub fn token_text(i: u32) -> &'static str {
    WORDS[i as usize % WORDS.len()]
}

pub struct Meta<'a> {
    pub endpoint: Endpoint,
    pub id: &'a str,
    pub model: &'a str,
    pub created: u64,
}

pub fn usage(prompt_tokens: usize, completion_tokens: u32, cached_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens as usize,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    })
}

/// Complete (non-streaming) response.
pub fn complete(meta: &Meta<'_>, completion_tokens: u32, usage: Value) -> Vec<u8> {
    let text: String = (0..completion_tokens).map(token_text).collect();
    let v = match meta.endpoint {
        Endpoint::Completions => json!({
            "id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": "length", "stop_reason": null}],
            "usage": usage,
        }),
        Endpoint::Chat => json!({
            "id": meta.id, "object": "chat.completion", "created": meta.created, "model": meta.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": null, "finish_reason": "length", "stop_reason": null}],
            "usage": usage,
        }),
    };
    serde_json::to_vec(&v).unwrap_or_default()
}

/// One SSE event carrying token `i` (text `None` for the closing chunk with the finish reason).
pub fn chunk(meta: &Meta<'_>, text: Option<&str>, first: bool) -> Vec<u8> {
    let finish = if text.is_none() {
        json!("length")
    } else {
        Value::Null
    };
    let v = match meta.endpoint {
        Endpoint::Completions => json!({
            "id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
            "choices": [{"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish}],
        }),
        Endpoint::Chat => {
            let delta = match (first, text) {
                (true, Some(t)) => json!({"role": "assistant", "content": t}),
                (_, Some(t)) => json!({"content": t}),
                (_, None) => json!({}),
            };
            json!({
                "id": meta.id, "object": "chat.completion.chunk", "created": meta.created, "model": meta.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
            })
        }
    };
    sse(&v)
}

/// The final usage-only chunk of `stream_options.include_usage`.
pub fn usage_chunk(meta: &Meta<'_>, usage: Value) -> Vec<u8> {
    let object = match meta.endpoint {
        Endpoint::Completions => "text_completion",
        Endpoint::Chat => "chat.completion.chunk",
    };
    sse(&json!({
        "id": meta.id, "object": object, "created": meta.created, "model": meta.model,
        "choices": [], "usage": usage,
    }))
}

pub const DONE: &[u8] = b"data: [DONE]\n\n";

fn sse(v: &Value) -> Vec<u8> {
    let mut out = b"data: ".to_vec();
    // Serializing a Value into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut out, v);
    out.extend_from_slice(b"\n\n");
    out
}
