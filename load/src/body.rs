//! Renders a planned request as an OpenAI-style streaming request body.

use serde_json::json;

use super::config::ApiMode;
use super::plan::{PlannedRequest, Role};
use super::text::push_segment;

/// The prompt of `req` as one string: all segments concatenated (completions mode).
pub fn prompt(req: &PlannedRequest) -> String {
    let mut s = String::with_capacity(req.segments.iter().map(|g| g.bytes).sum());
    for g in &req.segments {
        push_segment(&mut s, g.id, g.bytes, g.full_bytes);
    }
    s
}

/// Chat messages of `req`: consecutive segments with the same role form one message, so a
/// message boundary always coincides with a segment boundary.
pub fn messages(req: &PlannedRequest) -> Vec<(Role, String)> {
    let mut out: Vec<(Role, String)> = Vec::new();
    for g in &req.segments {
        match out.last_mut() {
            Some((role, text)) if *role == g.role => {
                push_segment(text, g.id, g.bytes, g.full_bytes)
            }
            _ => {
                let mut text = String::with_capacity(g.bytes);
                push_segment(&mut text, g.id, g.bytes, g.full_bytes);
                out.push((g.role, text));
            }
        }
    }
    out
}

pub fn path(mode: ApiMode) -> &'static str {
    match mode {
        ApiMode::Completions => "/v1/completions",
        ApiMode::Chat => "/v1/chat/completions",
    }
}

pub fn render(req: &PlannedRequest, mode: ApiMode, model: &str) -> Vec<u8> {
    let body = match mode {
        ApiMode::Completions => json!({
            "model": model,
            "prompt": prompt(req),
            "max_tokens": req.max_tokens,
            "stream": true,
            "stream_options": {"include_usage": true},
        }),
        ApiMode::Chat => json!({
            "model": model,
            "messages": messages(req)
                .into_iter()
                .map(|(role, content)| json!({"role": role.as_str(), "content": content}))
                .collect::<Vec<_>>(),
            "max_tokens": req.max_tokens,
            "stream": true,
            "stream_options": {"include_usage": true},
        }),
    };
    serde_json::to_vec(&body).expect("a json! value always serializes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{lower_entry, TraceEntry};

    fn req(ids: &[u64], input: u64) -> PlannedRequest {
        let e = TraceEntry {
            timestamp: 0,
            input_length: input,
            output_length: 40,
            hash_ids: ids.to_vec(),
        };
        lower_entry(&e, 64, 0.5)
    }

    #[test]
    fn completions_body_shape() {
        let r = req(&[0, 1, 2], 512 * 2 + 256);
        let v: serde_json::Value =
            serde_json::from_slice(&render(&r, ApiMode::Completions, "m")).unwrap();
        assert_eq!(v["model"], "m");
        assert_eq!(v["max_tokens"], 20);
        assert_eq!(v["stream"], true);
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["prompt"].as_str().unwrap().len(), 64 + 64 + 32);
    }

    #[test]
    fn chat_messages_merge_trailing_blocks_into_final_user_turn() {
        let r = req(&[0, 1, 2, 3, 4], 512 * 5);
        let m = messages(&r);
        let roles: Vec<_> = m.iter().map(|(r, _)| *r).collect();
        assert_eq!(
            roles,
            vec![Role::System, Role::User, Role::Assistant, Role::User]
        );
        assert_eq!(m[3].1.len(), 128);
        let v: serde_json::Value = serde_json::from_slice(&render(&r, ApiMode::Chat, "m")).unwrap();
        assert_eq!(v["messages"][0]["role"], "system");
        assert_eq!(v["messages"].as_array().unwrap().len(), 4);
    }

    #[test]
    fn chat_earlier_turn_is_a_message_prefix_of_later_turn() {
        // Turn 1 ends on block 3 (a user position); turn 2 extends the same conversation.
        let t1 = messages(&req(&[0, 1, 2, 3], 512 * 4));
        let t2 = messages(&req(&[0, 1, 2, 3, 4, 5], 512 * 6));
        assert_eq!(t1[..3], t2[..3]);
        assert!(t2[3].1.starts_with(&t1[3].1));
    }
}
