use proptest::prelude::*;

use super::*;

fn run(endpoint: Endpoint, body: &str) -> Result<(RequestFields<'_>, Vec<u8>), ExtractError> {
    let mut stream = Vec::new();
    let f = extract(endpoint, body.as_bytes(), |s| stream.extend_from_slice(s))?;
    Ok((f, stream))
}

fn chat_body(turns: &[(&str, &str)]) -> String {
    let msgs: Vec<String> = turns
        .iter()
        .map(|(r, c)| format!(r#"{{"role":{},"content":{}}}"#, json(r), json(c)))
        .collect();
    format!(
        r#"{{"model":"m","messages":[{}],"stream":true}}"#,
        msgs.join(",")
    )
}

fn json(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

#[test]
fn completions_fields_and_prompt() {
    let body = r#"{"model":"llama","prompt":"Hello \"world\"\n","stream":true,
        "stream_options":{"include_usage":true},"user":"u1","temperature":0,
        "seed":-3,"max_tokens":16,"n":2,"logprobs":null,"extra":{"a":[1,{"b":2}]}}"#;
    let (f, stream) = run(Endpoint::Completions, body).unwrap();
    assert_eq!(f.model, Some("llama"));
    assert!(f.stream && f.include_usage);
    assert_eq!(f.user, Some("u1"));
    assert_eq!(f.temperature, Some(0.0));
    assert_eq!(f.seed, Some(-3));
    assert_eq!(f.max_tokens, Some(16));
    assert_eq!(f.n, Some(2));
    assert!(f.is_deterministic());
    // Escapes are kept raw: no unescaping, no copy.
    assert_eq!(stream, br#"Hello \"world\"\n"#);
}

#[test]
fn completions_prompt_shapes() {
    let (_, s) = run(Endpoint::Completions, r#"{"prompt":["ab","cd"]}"#).unwrap();
    assert_eq!(s, b"ab\x1ecd\x1e");
    let (_, s) = run(Endpoint::Completions, r#"{"prompt":[1, 2,3]}"#).unwrap();
    assert_eq!(s, b"[1, 2,3]");
    let (_, s) = run(Endpoint::Completions, r#"{"prompt":[[1,2],[3]]}"#).unwrap();
    assert_eq!(s, b"[1,2]\x1e[3]\x1e");
    let (_, s) = run(Endpoint::Completions, r#"{"prompt":null}"#).unwrap();
    assert!(s.is_empty());
    assert!(run(Endpoint::Completions, r#"{"prompt":[1,"a"]}"#).is_err());
    assert!(run(Endpoint::Completions, r#"{"prompt":3}"#).is_err());
}

#[test]
fn chat_role_then_content_in_order() {
    let body = r#"{"messages":[{"content":"be brief","role":"system"},
        {"role":"user","content":[{"type":"text","text":"hi"},{"type":"image_url","image_url":{"url":"data:x"}}]},
        {"content":[{"text":"late role"}],"role":"user","name":"n"},
        {"role":"assistant","content":null,"tool_calls":[{"id":"1"}]}],"model":"m"}"#;
    let (f, s) = run(Endpoint::ChatCompletions, body).unwrap();
    assert_eq!(f.model, Some("m"));
    let expected: &[u8] = b"system\x1fbe brief\x1e\
user\x1fhi\x1d{\"type\":\"image_url\",\"image_url\":{\"url\":\"data:x\"}}\x1d\x1e\
user\x1flate role\x1d\x1e\
assistant\x1f\x1f[{\"id\":\"1\"}]\x1e";
    assert_eq!(
        String::from_utf8_lossy(&s),
        String::from_utf8_lossy(expected)
    );
}

#[test]
fn generate_and_responses() {
    let (f, s) = run(
        Endpoint::Generate,
        r#"{"text":"abc","sampling_params":{"temperature":0.5,"max_new_tokens":8},"stream":false}"#,
    )
    .unwrap();
    assert_eq!(s, b"abc");
    assert_eq!(f.temperature, Some(0.5));
    assert_eq!(f.max_tokens, Some(8));
    // `input` before `instructions` in the body; the stream still starts with instructions.
    let body = r#"{"input":[{"role":"user","content":[{"type":"input_text","text":"q"}]},
        {"type":"function_call_output","output":"r"}],"instructions":"sys","model":"m"}"#;
    let (_, s) = run(Endpoint::Responses, body).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&s),
        "sys\x1euser\x1fq\x1d\x1e{\"type\":\"function_call_output\",\"output\":\"r\"}\x1e"
    );
    let (_, s) = run(Endpoint::Responses, r#"{"input":"plain"}"#).unwrap();
    assert_eq!(s, b"plain");
}

#[test]
fn errors_are_clear_and_unknown_paths_lenient() {
    let e = run(
        Endpoint::ChatCompletions,
        r#"{"messages":[{"role":"user","content":"x"}"#,
    )
    .unwrap_err();
    assert!(e.to_string().starts_with("invalid JSON at byte"), "{e}");
    assert_eq!(
        run(Endpoint::ChatCompletions, "[1]").unwrap_err(),
        ExtractError::NotAnObject
    );
    let e = run(Endpoint::Completions, r#"{"model":5}"#).unwrap_err();
    assert_eq!(
        e.to_string(),
        "field `model` has the wrong type: expected a string"
    );
    assert!(run(Endpoint::Completions, r#"{"a":1} x"#).is_err());
    // No prompt at all is fine: routed by load alone.
    let (f, s) = run(Endpoint::ChatCompletions, r#"{"model":"m"}"#).unwrap();
    assert_eq!(f.model, Some("m"));
    assert!(s.is_empty());
    // Other endpoints never fail, and still yield the model when they can.
    let (f, _) = run(Endpoint::Other, "\u{0}garbage").unwrap();
    assert_eq!(f, RequestFields::default());
    let (f, _) = run(Endpoint::Other, r#"{"model":"emb","input":"x"}"#).unwrap();
    assert_eq!(f.model, Some("emb"));
}

#[test]
fn paths_map_to_endpoints() {
    assert_eq!(
        Endpoint::from_path("/v1/chat/completions?x=1"),
        Endpoint::ChatCompletions
    );
    assert_eq!(
        Endpoint::from_path("/v1/completions/"),
        Endpoint::Completions
    );
    assert_eq!(Endpoint::from_path("/generate"), Endpoint::Generate);
    assert_eq!(Endpoint::from_path("/v1/responses"), Endpoint::Responses);
    assert_eq!(Endpoint::from_path("/v1/models"), Endpoint::Other);
}

#[test]
fn huge_prompt_is_one_slice() {
    let text = "lorem ipsum \\n dolor ".repeat(50_000);
    let body = format!(r#"{{"model":"m","prompt":"{text}"}}"#);
    let mut slices = 0;
    let mut len = 0;
    extract(Endpoint::Completions, body.as_bytes(), |s| {
        slices += 1;
        len += s.len();
    })
    .unwrap();
    assert_eq!((slices, len), (1, text.len()));
}

proptest! {
    #[test]
    fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        for ep in [Endpoint::Completions, Endpoint::ChatCompletions, Endpoint::Generate,
                   Endpoint::Responses, Endpoint::Other] {
            let _ = extract(ep, &bytes, |_| {});
        }
    }

    #[test]
    fn never_panics_on_mutated_json(
        cut in 0usize..400,
        flip in 0usize..400,
        byte in any::<u8>(),
    ) {
        let body = chat_body(&[("system", "sé \"q\" \\ \u{1F600}"), ("user", "x\ny")]);
        let mut b = body.into_bytes();
        let flip = flip % b.len();
        b[flip] = byte;
        b.truncate(cut.min(b.len()));
        let _ = extract(Endpoint::ChatCompletions, &b, |_| {});
        let _ = extract(Endpoint::Responses, &b, |_| {});
    }

    #[test]
    fn valid_json_agrees_with_serde(text in "\\PC{0,200}", role in "[a-z]{1,8}") {
        // serde_json escapes the text; whatever it wrote, we must accept and
        // hand back exactly the raw bytes between the quotes.
        let body = chat_body(&[(&role, &text)]);
        let (_, s) = run(Endpoint::ChatCompletions, &body).unwrap();
        let raw = json(&text);
        let expected = format!("{role}\x1f{}\x1e", &raw[1..raw.len() - 1]);
        prop_assert_eq!(String::from_utf8_lossy(&s), expected);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        prop_assert_eq!(v["messages"][0]["content"].as_str().unwrap(), text.as_str());
    }

    #[test]
    fn next_chat_turn_extends_the_stream(
        turns in proptest::collection::vec(("[a-z]{1,9}", "\\PC{0,300}"), 1..6),
        next in "\\PC{0,300}",
    ) {
        let t: Vec<(&str, &str)> = turns.iter().map(|(r, c)| (r.as_str(), c.as_str())).collect();
        let (_, a) = run(Endpoint::ChatCompletions, &chat_body(&t)).unwrap();
        let mut t2 = t.clone();
        t2.push(("user", &next));
        let (_, b) = run(Endpoint::ChatCompletions, &chat_body(&t2)).unwrap();
        prop_assert!(b.starts_with(&a));
    }

    #[test]
    fn serde_rejects_what_we_reject(bytes in proptest::collection::vec(
        prop_oneof![Just(b'{'), Just(b'}'), Just(b'['), Just(b']'), Just(b'"'), Just(b':'),
                    Just(b','), Just(b'1'), Just(b'a'), Just(b' '), Just(b'\\'), Just(b'n')], 0..40)) {
        // Our scanner validates structure exactly like serde_json for these alphabets
        // (UTF-8 aside, which both see identically here).
        let mut sc = super::scanner::Scanner::new(&bytes);
        let ours_full = sc.skip_value().is_ok() && sc.expect_end().is_ok();
        let theirs = serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_ok();
        prop_assert_eq!(ours_full, theirs, "{:?}", String::from_utf8_lossy(&bytes));
    }
}
