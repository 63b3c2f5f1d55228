//! Prompt extraction and hashing (`prefix::analyze`, `prompt::extract`): any
//! body on any endpoint yields Ok or Err, never a panic, and what it yields is
//! consistent:
//! - one hash per full block of the prompt stream, none for the partial last one;
//! - the stream (separators included) never longer than the body;
//! - the hashes equal those of the whole stream hashed as one slice, so feeding
//!   it in borrowed pieces changes nothing;
//! - `extract` alone agrees with `analyze` (same fields, same error);
//! - paths kvroute does not know never fail.
//!
//! The generated check builds OpenAI-shaped bodies (chat messages with string
//! or parts content, completions with string, string-array or token prompts,
//! SGLang's `/generate`, responses; escapes, surrogate pairs, raw UTF-8,
//! strings across the scanner's 64-byte chunks, nested unknown fields, any key
//! order) and checks, besides the above, that a valid one is accepted with the
//! fields it was built with and the exact prompt stream its structure implies.

use bolero::generator::TypeGenerator;
use kvroute_core::prefix::{analyze, chain_hashes, PrefixConfig};
use kvroute_core::prompt::{extract, Endpoint, ITEM_SEPARATOR, ROLE_SEPARATOR};
use kvroute_fuzz::gen::{self, Driver};
use kvroute_fuzz::{show, Tally};

const NAME: &str = "prompt";
/// Between the parts of one message's content (private to the extractor).
const PART_SEPARATOR: &[u8] = b"\x1d";
const PATHS: &[&str] = &[
    "/v1/completions",
    "/v1/chat/completions",
    "/generate",
    "/v1/responses",
    "/v1/other",
];

/// The first byte picks the path (`% 5`: `A` completions, `B` chat, `C`
/// generate, `D` responses, `E` another path) and the block size (`16 + b / 8`);
/// the rest is the body.
#[test]
fn prompt() {
    kvroute_fuzz::expect_corpus(&kvroute_fuzz::tests_target_dir(NAME));
    bolero::check!(name = NAME).for_each(|data: &[u8]| {
        let Some((&sel, body)) = data.split_first() else {
            return;
        };
        let _ = check(
            PATHS[usize::from(sel) % 5],
            body,
            16 + usize::from(sel >> 3),
            None,
        );
    });
}

#[test]
fn prompt_generated() {
    let dir = kvroute_fuzz::tests_target_dir(NAME);
    let tally = Tally::new(&["valid accepted", "damaged accepted", "damaged refused"]);
    bolero::check!(name = "prompt_generated")
        .with_type::<Case>()
        .for_each(|case: &Case| {
            // The raw check's encoding: the selector byte, then the body.
            let mut raw = vec![selector(case.path, case.block)];
            raw.extend_from_slice(&case.body);
            kvroute_fuzz::keep_on_failure(&dir, &raw);
            let ok = check(case.path, &case.body, case.block, case.expect.as_ref());
            tally.add(match (case.expect.is_some(), ok) {
                (true, _) => 0,
                (false, true) => 1,
                (false, false) => 2,
            });
        });
    tally.report("prompt_generated");
}

/// The raw check's first byte for `path` and `block`.
fn selector(path: &str, block: usize) -> u8 {
    let which = PATHS.iter().position(|p| *p == path).unwrap();
    let base = (block - 16) * 8;
    (base..base + 8).find(|s| s % 5 == which).unwrap() as u8
}

/// Returns whether the body was accepted.
fn check(path: &str, body: &[u8], block: usize, expect: Option<&Expect>) -> bool {
    let cfg = PrefixConfig { block_bytes: block };
    let analyzed = analyze(path, body, &cfg);
    let mut stream = Vec::new();
    let extracted = extract(Endpoint::from_path(path), body, |s| {
        stream.extend_from_slice(s)
    });
    match (&analyzed, &extracted) {
        (Ok(a), Ok(fields)) => {
            assert_eq!(&a.fields, fields);
            assert_eq!(a.hashes.len(), a.prompt_bytes / cfg.block_bytes);
            assert_eq!(a.prompt_bytes, stream.len());
            assert!(a.prompt_bytes <= body.len(), "stream longer than the body");
            assert_eq!(a.hashes, chain_hashes(&stream, &cfg));
        }
        (Err(a), Err(e)) => {
            assert_eq!(a, e);
            assert_ne!(Endpoint::from_path(path), Endpoint::Other, "{a}");
        }
        _ => panic!("analyze {analyzed:?} but extract {extracted:?}"),
    }
    if let Some(x) = expect {
        let f = extracted.unwrap_or_else(|e| panic!("valid body refused ({e}): {}", show(body)));
        assert_eq!(f.model.map(str::as_bytes), x.model.as_deref(), "model");
        assert_eq!(f.user.map(str::as_bytes), x.user.as_deref(), "user");
        assert_eq!(f.stream, x.stream, "stream");
        assert_eq!(f.temperature, x.temperature, "temperature");
        assert_eq!(f.max_tokens, x.max_tokens, "max_tokens");
        assert_eq!(f.n, x.n, "n");
        assert_eq!(f.seed, x.seed, "seed");
        assert_eq!(
            stream,
            x.stream_bytes,
            "prompt stream of {}\n  got {}\n want {}",
            show(body),
            show(&stream),
            show(&x.stream_bytes)
        );
    }
    analyzed.is_ok()
}

/// What a valid generated body must extract to.
#[derive(Debug, Default)]
struct Expect {
    model: Option<Vec<u8>>,
    user: Option<Vec<u8>>,
    stream: bool,
    temperature: Option<f64>,
    max_tokens: Option<u64>,
    n: Option<u64>,
    seed: Option<i64>,
    stream_bytes: Vec<u8>,
}

struct Case {
    path: &'static str,
    block: usize,
    body: Vec<u8>,
    /// Set when the body is valid (not damaged).
    expect: Option<Expect>,
}

impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} (block {}, valid {})",
            self.path,
            show(&self.body),
            self.block,
            self.expect.is_some()
        )
    }
}

/// The pieces strings are made of: plain text, every JSON escape, surrogate
/// pairs, raw UTF-8, separators' look-alikes escaped.
const STRING_PIECES: &[&str] = &[
    "hello",
    " ",
    "KV cache",
    "a",
    "\\n",
    "\\\"",
    "\\\\",
    "\\/",
    "\\b\\f\\r\\t",
    "\\u00e9",
    "\\u001f",
    "\\ud83d\\ude00",
    "\\uD834\\uDD1E",
    "é",
    "日本語",
    "😀",
    "\\\\\\\"",
    "{\\\"a\\\":[1]}",
    "[",
    "]",
];

/// A raw JSON string's contents (what the extractor hands out: escapes kept).
fn json_string<D: Driver>(d: &mut D) -> Option<Vec<u8>> {
    let mut s = Vec::new();
    if gen::one_in(d, 6)? {
        // Long: escapes fall on the scanner's 64-byte chunk boundaries.
        let n = 60 + gen::below(d, 140)?;
        while s.len() < n {
            s.extend_from_slice(gen::pick(d, STRING_PIECES)?.as_bytes());
        }
    } else {
        for _ in 0..gen::below(d, 6)? {
            s.extend_from_slice(gen::pick(d, STRING_PIECES)?.as_bytes());
        }
    }
    Some(s)
}

fn quoted(s: &[u8]) -> Vec<u8> {
    let mut q = b"\"".to_vec();
    q.extend_from_slice(s);
    q.push(b'"');
    q
}

/// Whitespace JSON allows between tokens.
fn ws<D: Driver>(d: &mut D) -> Option<&'static [u8]> {
    Some(match gen::below(d, 8)? {
        0 => b" ",
        1 => b"\n  ",
        2 => b"\t\r\n",
        _ => b"",
    })
}

/// A value the extractor must skip: nested arrays and objects, numbers, literals.
fn junk<D: Driver>(d: &mut D, depth: usize) -> Option<Vec<u8>> {
    Some(match gen::below(d, if depth > 3 { 4 } else { 6 })? {
        0 => quoted(&json_string(d)?),
        1 => gen::pick(
            d,
            &[
                "0",
                "-1.5e+3",
                "1E-2",
                "123456789012345678901234567890",
                "-0",
            ],
        )?
        .as_bytes()
        .to_vec(),
        2 => gen::pick(d, &["true", "false", "null"])?
            .as_bytes()
            .to_vec(),
        3 => b"[[[[]]],{}]".to_vec(),
        4 => {
            let mut v = b"[".to_vec();
            for i in 0..gen::below(d, 4)? {
                if i > 0 {
                    v.push(b',');
                }
                v.extend_from_slice(ws(d)?);
                v.extend(junk(d, depth + 1)?);
            }
            v.push(b']');
            v
        }
        _ => {
            let mut v = b"{".to_vec();
            for i in 0..gen::below(d, 3)? {
                if i > 0 {
                    v.push(b',');
                }
                v.extend(quoted(&json_string(d)?));
                v.push(b':');
                v.extend(junk(d, depth + 1)?);
            }
            v.push(b'}');
            v
        }
    })
}

/// An object from its members, in the order given, with whitespace.
fn object<D: Driver>(d: &mut D, members: &[(Vec<u8>, Vec<u8>)]) -> Option<Vec<u8>> {
    let mut o = b"{".to_vec();
    for (i, (k, v)) in members.iter().enumerate() {
        if i > 0 {
            o.push(b',');
        }
        o.extend_from_slice(ws(d)?);
        o.extend(quoted(k));
        o.extend_from_slice(ws(d)?);
        o.push(b':');
        o.extend_from_slice(ws(d)?);
        o.extend_from_slice(v);
    }
    o.extend_from_slice(ws(d)?);
    o.push(b'}');
    Some(o)
}

fn array(items: &[Vec<u8>]) -> Vec<u8> {
    let mut a = b"[".to_vec();
    a.extend(items.join(&b","[..]));
    a.push(b']');
    a
}

fn shuffle<D: Driver, T>(d: &mut D, v: &mut [T]) -> Option<()> {
    for i in (1..v.len()).rev() {
        v.swap(i, gen::below(d, i + 1)?);
    }
    Some(())
}

/// Content parts: text parts, bare strings, image parts (fed as their raw text).
fn parts<D: Driver>(d: &mut D, stream: &mut Vec<u8>) -> Option<Vec<u8>> {
    let mut items = Vec::new();
    for _ in 0..gen::below(d, 4)? {
        match gen::below(d, 3)? {
            0 => {
                let t = json_string(d)?;
                let mut m = vec![
                    (b"type".to_vec(), quoted(b"text")),
                    (b"text".to_vec(), quoted(&t)),
                ];
                shuffle(d, &mut m)?;
                items.push(object(d, &m)?);
                stream.extend_from_slice(&t);
            }
            1 => {
                let t = json_string(d)?;
                items.push(quoted(&t));
                stream.extend_from_slice(&t);
            }
            _ => {
                let url = object(
                    d,
                    &[(
                        b"url".to_vec(),
                        quoted(b"data:image/png;base64,iVBORw0KGgo="),
                    )],
                )?;
                let o = object(
                    d,
                    &[
                        (b"type".to_vec(), quoted(b"image_url")),
                        (b"image_url".to_vec(), url),
                    ],
                )?;
                stream.extend_from_slice(&o);
                items.push(o);
            }
        }
        stream.extend_from_slice(PART_SEPARATOR);
    }
    Some(array(&items))
}

/// One chat message (or responses item): role and content in either order.
fn message<D: Driver>(d: &mut D, stream: &mut Vec<u8>) -> Option<Vec<u8>> {
    let role = gen::pick(
        d,
        &[
            &b"system"[..],
            b"user",
            b"assistant",
            b"tool",
            b"us\\u0065r",
        ],
    )?
    .to_vec();
    let mut content_stream = Vec::new();
    let content = match gen::below(d, 3)? {
        0 => {
            let t = json_string(d)?;
            content_stream.extend_from_slice(&t);
            quoted(&t)
        }
        1 => parts(d, &mut content_stream)?,
        _ => b"null".to_vec(),
    };
    let mut m = vec![
        (b"role".to_vec(), quoted(&role)),
        (b"content".to_vec(), content),
    ];
    if gen::one_in(d, 3)? {
        m.push((b"name".to_vec(), junk(d, 0)?));
    }
    shuffle(d, &mut m)?;
    stream.extend_from_slice(&role);
    stream.extend_from_slice(ROLE_SEPARATOR);
    stream.extend(content_stream);
    stream.extend_from_slice(ITEM_SEPARATOR);
    object(d, &m)
}

/// A string prompt, strings, token ids or token-id arrays.
fn prompt_value<D: Driver>(d: &mut D, stream: &mut Vec<u8>) -> Option<Vec<u8>> {
    Some(match gen::below(d, 4)? {
        0 => {
            let t = json_string(d)?;
            stream.extend_from_slice(&t);
            quoted(&t)
        }
        1 => {
            let mut items = Vec::new();
            for _ in 0..gen::below(d, 4)? {
                let t = json_string(d)?;
                stream.extend_from_slice(&t);
                stream.extend_from_slice(ITEM_SEPARATOR);
                items.push(quoted(&t));
            }
            array(&items)
        }
        2 => {
            // Token ids: fed as the array's raw text.
            let ids: Vec<Vec<u8>> = (0..1 + gen::below(d, 20)?)
                .map(|_| Some(gen::below(d, 200_000)?.to_string().into_bytes()))
                .collect::<Option<_>>()?;
            let a = array(&ids);
            stream.extend_from_slice(&a);
            a
        }
        _ => {
            let mut items = Vec::new();
            for _ in 0..1 + gen::below(d, 3)? {
                let ids: Vec<Vec<u8>> = (0..gen::below(d, 6)?)
                    .map(|_| Some(gen::below(d, 1000)?.to_string().into_bytes()))
                    .collect::<Option<_>>()?;
                let a = array(&ids);
                stream.extend_from_slice(&a);
                stream.extend_from_slice(ITEM_SEPARATOR);
                items.push(a);
            }
            array(&items)
        }
    })
}

impl TypeGenerator for Case {
    fn generate<D: Driver>(d: &mut D) -> Option<Self> {
        let which = gen::below(d, PATHS.len())?;
        let path = PATHS[which];
        let mut x = Expect::default();
        let mut members: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        // Routing fields, each maybe.
        if gen::below(d, 4)? > 0 {
            let m = gen::pick(d, &[&b"llama-3"[..], b"org/model:q4", b"m\\u00e9"])?.to_vec();
            members.push((b"model".to_vec(), quoted(&m)));
            x.model = Some(m);
        }
        if gen::one_in(d, 3)? {
            x.stream = gen::one_in(d, 2)?;
            members.push((b"stream".to_vec(), x.stream.to_string().into_bytes()));
        }
        if gen::one_in(d, 3)? {
            let t = *gen::pick(d, &["0", "0.7", "1e0", "-0.0", "2.5E-1"])?;
            x.temperature = Some(t.parse().unwrap());
            members.push((b"temperature".to_vec(), t.as_bytes().to_vec()));
        }
        if gen::one_in(d, 3)? {
            let n = gen::u64_any(d)? >> gen::below(d, 64)?;
            x.max_tokens = Some(n);
            let key = *gen::pick(
                d,
                &[
                    &b"max_tokens"[..],
                    b"max_completion_tokens",
                    b"max_output_tokens",
                ],
            )?;
            members.push((key.to_vec(), n.to_string().into_bytes()));
        }
        if gen::one_in(d, 4)? {
            let n = gen::below(d, 8)? as u64;
            x.n = Some(n);
            members.push((b"n".to_vec(), n.to_string().into_bytes()));
        }
        if gen::one_in(d, 4)? {
            let s = gen::u64_any(d)? as i64;
            x.seed = Some(s);
            members.push((b"seed".to_vec(), s.to_string().into_bytes()));
        }
        if gen::one_in(d, 4)? {
            let u = json_string(d)?;
            // Must be UTF-8 to be taken; the pieces all are.
            x.user = Some(u.clone());
            members.push((b"user".to_vec(), quoted(&u)));
        }
        for _ in 0..gen::below(d, 3)? {
            let k =
                gen::pick(d, &[&b"tools"[..], b"logit_bias", b"metadata", b"x-extra"])?.to_vec();
            members.push((k, junk(d, 0)?));
        }
        // The prompt, in the endpoint's shape.
        let mut s = Vec::new();
        match path {
            "/v1/chat/completions" => {
                let msgs: Vec<Vec<u8>> = (0..gen::below(d, 5)?)
                    .map(|_| message(d, &mut s))
                    .collect::<Option<_>>()?;
                members.push((b"messages".to_vec(), array(&msgs)));
            }
            "/v1/completions" => members.push((b"prompt".to_vec(), prompt_value(d, &mut s)?)),
            "/generate" => {
                let key = *gen::pick(d, &[&b"text"[..], b"input_ids"])?;
                members.push((key.to_vec(), prompt_value(d, &mut s)?));
            }
            "/v1/responses" => {
                // `instructions` is fed before `input` wherever it stands.
                let mut instr = Vec::new();
                if gen::one_in(d, 2)? {
                    let t = json_string(d)?;
                    instr.extend_from_slice(&t);
                    instr.extend_from_slice(ITEM_SEPARATOR);
                    members.push((b"instructions".to_vec(), quoted(&t)));
                }
                let mut input = Vec::new();
                let v = if gen::one_in(d, 2)? {
                    let t = json_string(d)?;
                    input.extend_from_slice(&t);
                    quoted(&t)
                } else {
                    let items: Vec<Vec<u8>> = (0..gen::below(d, 4)?)
                        .map(|_| message(d, &mut input))
                        .collect::<Option<_>>()?;
                    array(&items)
                };
                members.push((b"input".to_vec(), v));
                s.extend(instr);
                s.extend(input);
            }
            _ => {}
        }
        shuffle(d, &mut members)?;
        if path == "/v1/other" {
            // Not ours to read: no prompt, whatever the body says.
            s.clear();
        }
        x.stream_bytes = s;
        let mut body = Vec::new();
        body.extend_from_slice(ws(d)?);
        body.extend(object(d, &members)?);
        body.extend_from_slice(ws(d)?);
        let damaged = gen::one_in(d, 4)?;
        if damaged {
            gen::mutate(d, &mut body)?;
        }
        let block = 16 + gen::below(d, 4)? * 8;
        Some(Case {
            path,
            block,
            body,
            expect: (!damaged).then_some(x),
        })
    }
}
