//! Which fields each endpoint carries, and the order its prompt is fed to the sink.

use super::scanner::{Literal, Scanner};
use super::{ExtractError, ITEM_SEPARATOR, ROLE_SEPARATOR};

/// Between the parts of one message's content (text parts, images, ...).
const PART_SEPARATOR: &[u8] = b"\x1d";

/// The request shapes whose prompt kvroute understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/completions`: `prompt`.
    Completions,
    /// `/v1/chat/completions`: `messages`.
    ChatCompletions,
    /// SGLang's native `/generate`: `text` or `input_ids`.
    Generate,
    /// `/v1/responses`: `instructions`, then `input`.
    Responses,
    /// Anything else: routing fields only, never a 400 from kvroute.
    Other,
}

impl Endpoint {
    pub fn from_path(path: &str) -> Endpoint {
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        let path = path.strip_suffix('/').unwrap_or(path);
        match path {
            "/v1/completions" => Endpoint::Completions,
            "/v1/chat/completions" => Endpoint::ChatCompletions,
            "/generate" => Endpoint::Generate,
            "/v1/responses" => Endpoint::Responses,
            _ => Endpoint::Other,
        }
    }
}

/// The routing-relevant fields of a body. Strings are raw JSON (escapes kept).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct RequestFields<'a> {
    pub model: Option<&'a str>,
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
    pub user: Option<&'a str>,
    /// `temperature`, or SGLang's `sampling_params.temperature`.
    pub temperature: Option<f64>,
    pub seed: Option<i64>,
    /// `max_tokens`, `max_completion_tokens`, `max_output_tokens` or SGLang's
    /// `sampling_params.max_new_tokens`.
    pub max_tokens: Option<u64>,
    pub n: Option<u64>,
}

impl RequestFields<'_> {
    /// Whether the same body always yields the same answer (cacheable response).
    pub fn is_deterministic(&self) -> bool {
        self.seed.is_some() || self.temperature == Some(0.0)
    }
}

/// Reads the routing fields of `body` and feeds its prompt to `sink` as borrowed
/// slices, in prompt order. Malformed JSON is an error for the endpoints kvroute
/// understands; for [`Endpoint::Other`] it yields default fields (not ours to judge).
pub fn extract<'a, F>(
    endpoint: Endpoint,
    body: &'a [u8],
    mut sink: F,
) -> Result<RequestFields<'a>, ExtractError>
where
    F: FnMut(&'a [u8]),
{
    if endpoint == Endpoint::Other {
        let mut scan = Scanner::new(body);
        if scan.peek() != Some(b'{') {
            return Ok(RequestFields::default());
        }
        return Ok(walk_top(endpoint, &mut scan, &mut |_| {}).unwrap_or_default());
    }
    let mut scan = Scanner::new(body);
    if scan.peek() != Some(b'{') {
        return Err(ExtractError::NotAnObject);
    }
    walk_top(endpoint, &mut scan, &mut sink)
}

fn walk_top<'a>(
    endpoint: Endpoint,
    s: &mut Scanner<'a>,
    sink: &mut dyn FnMut(&'a [u8]),
) -> Result<RequestFields<'a>, ExtractError> {
    let mut f = RequestFields::default();
    // Responses feed `instructions` before `input` whatever their order in the body.
    let mut instructions: Option<&'a [u8]> = None;
    let mut input: Option<&'a [u8]> = None;
    s.begin_object()?;
    let mut first = true;
    while let Some(key) = s.next_key(&mut first)? {
        match key {
            b"model" => f.model = opt_str(s, "model")?,
            b"stream" => f.stream = opt_bool(s, "stream")?.unwrap_or(false),
            b"user" => f.user = opt_str(s, "user")?,
            b"temperature" => f.temperature = opt_f64(s, "temperature")?,
            b"seed" => f.seed = opt_int(s, "seed")?,
            b"max_tokens" | b"max_completion_tokens" | b"max_output_tokens" => {
                f.max_tokens = opt_int(s, "max_tokens")?
            }
            b"n" => f.n = opt_int(s, "n")?,
            b"stream_options" => stream_options(s, &mut f)?,
            b"sampling_params" if endpoint == Endpoint::Generate => sampling_params(s, &mut f)?,
            b"prompt" if endpoint == Endpoint::Completions => prompt_value(s, sink)?,
            b"text" | b"input_ids" if endpoint == Endpoint::Generate => prompt_value(s, sink)?,
            b"messages" if endpoint == Endpoint::ChatCompletions => messages(s, sink)?,
            b"instructions" if endpoint == Endpoint::Responses => {
                instructions = opt_string_bytes(s, "instructions")?
            }
            b"input" if endpoint == Endpoint::Responses => input = Some(s.skip_value()?),
            _ => {
                s.skip_value()?;
            }
        }
    }
    s.expect_end()?;
    if let Some(text) = instructions {
        sink(text);
        sink(ITEM_SEPARATOR);
    }
    if let Some(raw) = input {
        // Already validated; walked again only because of the ordering rule above.
        let mut s = Scanner::new(raw);
        match s.peek() {
            Some(b'"') => sink(s.string()?),
            Some(b'[') => items(&mut s, sink)?,
            Some(b'n') => {}
            _ => {
                return Err(ExtractError::WrongType {
                    field: "input",
                    expected: "a string or an array of items",
                })
            }
        }
    }
    Ok(f)
}

fn wrong(field: &'static str, expected: &'static str) -> ExtractError {
    ExtractError::WrongType { field, expected }
}

fn opt_string_bytes<'a>(
    s: &mut Scanner<'a>,
    field: &'static str,
) -> Result<Option<&'a [u8]>, ExtractError> {
    match s.peek() {
        Some(b'"') => s.string().map(Some),
        Some(b'n') if s.literal()? == Literal::Null => Ok(None),
        _ => Err(wrong(field, "a string")),
    }
}

fn opt_str<'a>(s: &mut Scanner<'a>, field: &'static str) -> Result<Option<&'a str>, ExtractError> {
    match opt_string_bytes(s, field)? {
        None => Ok(None),
        Some(b) => std::str::from_utf8(b)
            .map(Some)
            .map_err(|_| wrong(field, "valid UTF-8")),
    }
}

fn opt_bool(s: &mut Scanner<'_>, field: &'static str) -> Result<Option<bool>, ExtractError> {
    if !matches!(s.peek(), Some(b't' | b'f' | b'n')) {
        return Err(wrong(field, "a boolean"));
    }
    Ok(match s.literal()? {
        Literal::True => Some(true),
        Literal::False => Some(false),
        Literal::Null => None,
    })
}

fn opt_number<'a>(
    s: &mut Scanner<'a>,
    field: &'static str,
) -> Result<Option<&'a str>, ExtractError> {
    match s.peek() {
        Some(b'-' | b'0'..=b'9') => {
            let raw = s.number()?;
            // The scanner only accepts ASCII number characters.
            Ok(Some(
                std::str::from_utf8(raw).map_err(|_| wrong(field, "a number"))?,
            ))
        }
        Some(b'n') if s.literal()? == Literal::Null => Ok(None),
        _ => Err(wrong(field, "a number")),
    }
}

fn opt_f64(s: &mut Scanner<'_>, field: &'static str) -> Result<Option<f64>, ExtractError> {
    opt_number(s, field)?
        .map(|t| t.parse::<f64>().map_err(|_| wrong(field, "a number")))
        .transpose()
}

fn opt_int<T: std::str::FromStr>(
    s: &mut Scanner<'_>,
    field: &'static str,
) -> Result<Option<T>, ExtractError> {
    opt_number(s, field)?
        .map(|t| {
            t.parse::<T>()
                .map_err(|_| wrong(field, "an integer in range"))
        })
        .transpose()
}

fn stream_options(s: &mut Scanner<'_>, f: &mut RequestFields<'_>) -> Result<(), ExtractError> {
    if s.peek() == Some(b'n') {
        s.literal()?;
        return Ok(());
    }
    if s.peek() != Some(b'{') {
        return Err(wrong("stream_options", "an object"));
    }
    s.begin_object()?;
    let mut first = true;
    while let Some(key) = s.next_key(&mut first)? {
        if key == b"include_usage" {
            f.include_usage = opt_bool(s, "stream_options.include_usage")?.unwrap_or(false);
        } else {
            s.skip_value()?;
        }
    }
    Ok(())
}

fn sampling_params(s: &mut Scanner<'_>, f: &mut RequestFields<'_>) -> Result<(), ExtractError> {
    if s.peek() != Some(b'{') {
        s.skip_value()?;
        return Ok(());
    }
    s.begin_object()?;
    let mut first = true;
    while let Some(key) = s.next_key(&mut first)? {
        match key {
            b"temperature" => f.temperature = opt_f64(s, "sampling_params.temperature")?,
            b"max_new_tokens" => f.max_tokens = opt_int(s, "sampling_params.max_new_tokens")?,
            _ => {
                s.skip_value()?;
            }
        }
    }
    Ok(())
}

/// `prompt` / `text` / `input_ids`: a string, or an array of strings, token ids or
/// token-id arrays. Token ids are fed as the array's raw text: the same ids always
/// print the same way for one client, and a longer id list extends a shorter one.
fn prompt_value<'a>(
    s: &mut Scanner<'a>,
    sink: &mut dyn FnMut(&'a [u8]),
) -> Result<(), ExtractError> {
    match s.peek() {
        Some(b'"') => sink(s.string()?),
        Some(b'[') => {
            let start = s.pos();
            s.begin_array()?;
            if matches!(s.peek(), Some(b'-' | b'0'..=b'9')) {
                // Token ids: one raw slice for the whole array, validated by skipping.
                let mut first = true;
                while s.next_element(&mut first)? {
                    s.number()?;
                }
                sink(s.slice_from(start));
                return Ok(());
            }
            let mut first = true;
            while s.next_element(&mut first)? {
                if s.peek() == Some(b'"') {
                    sink(s.string()?);
                } else {
                    sink(s.skip_value()?);
                }
                sink(ITEM_SEPARATOR);
            }
        }
        Some(b'n') => {
            s.literal()?;
        }
        _ => return Err(wrong("prompt", "a string or an array")),
    }
    Ok(())
}

/// Chat `messages`: each message as role, separator, content, then its tool calls.
fn messages<'a>(s: &mut Scanner<'a>, sink: &mut dyn FnMut(&'a [u8])) -> Result<(), ExtractError> {
    if s.peek() != Some(b'[') {
        return Err(wrong("messages", "an array"));
    }
    s.begin_array()?;
    let mut first = true;
    while s.next_element(&mut first)? {
        if s.peek() != Some(b'{') {
            return Err(wrong("messages", "an array of objects"));
        }
        message(s, sink)?;
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum Content<'a> {
    None,
    Text(&'a [u8]),
    /// Raw text of a parts array seen before the role; walked once the role is known.
    Parts(&'a [u8]),
}

/// One message object (chat) or one item (responses). Content is fed as it is
/// scanned once the role is known, the common key order; otherwise it is held and
/// fed at the end so the stream is always role first.
fn message<'a>(s: &mut Scanner<'a>, sink: &mut dyn FnMut(&'a [u8])) -> Result<(), ExtractError> {
    let start = s.pos();
    let mut role: Option<&'a [u8]> = None;
    let mut role_fed = false;
    let mut content = Content::None;
    let mut has_content = false;
    let mut tool_calls: Option<&'a [u8]> = None;
    s.begin_object()?;
    let mut first = true;
    while let Some(key) = s.next_key(&mut first)? {
        match key {
            b"role" => role = opt_string_bytes(s, "messages[].role")?,
            b"content" => {
                has_content = true;
                if let Some(r) = role.filter(|_| !role_fed) {
                    sink(r);
                    sink(ROLE_SEPARATOR);
                    role_fed = true;
                }
                match s.peek() {
                    Some(b'"') if role_fed => sink(s.string()?),
                    Some(b'"') => content = Content::Text(s.string()?),
                    Some(b'[') if role_fed => parts(s, sink)?,
                    Some(b'[') => content = Content::Parts(s.skip_value()?),
                    Some(b'n') if s.literal()? == Literal::Null => {}
                    _ => return Err(wrong("messages[].content", "a string or an array")),
                }
            }
            b"tool_calls" => tool_calls = Some(s.skip_value()?),
            _ => {
                s.skip_value()?;
            }
        }
    }
    if !role_fed {
        if role.is_none() && !has_content {
            // Not a message (a responses item such as a function call output):
            // its raw text stands for it.
            sink(s.slice_from(start));
            sink(ITEM_SEPARATOR);
            return Ok(());
        }
        sink(role.unwrap_or_default());
        sink(ROLE_SEPARATOR);
        match content {
            Content::None => {}
            Content::Text(t) => sink(t),
            Content::Parts(raw) => parts(&mut Scanner::new(raw), sink)?,
        }
    }
    if let Some(raw) = tool_calls {
        sink(ROLE_SEPARATOR);
        sink(raw);
    }
    sink(ITEM_SEPARATOR);
    Ok(())
}

/// Content parts: a part's `text` when it has one, else its raw JSON (an image or
/// audio part: the same attachment always hashes the same).
fn parts<'a>(s: &mut Scanner<'a>, sink: &mut dyn FnMut(&'a [u8])) -> Result<(), ExtractError> {
    s.begin_array()?;
    let mut first = true;
    while s.next_element(&mut first)? {
        match s.peek() {
            Some(b'{') => {
                let start = s.pos();
                let mut text = None;
                s.begin_object()?;
                let mut first_key = true;
                while let Some(key) = s.next_key(&mut first_key)? {
                    if key == b"text" && s.peek() == Some(b'"') {
                        text = Some(s.string()?);
                    } else {
                        s.skip_value()?;
                    }
                }
                sink(text.unwrap_or_else(|| s.slice_from(start)));
            }
            Some(b'"') => sink(s.string()?),
            _ => sink(s.skip_value()?),
        }
        sink(PART_SEPARATOR);
    }
    Ok(())
}

/// Responses `input` array: message-like items, other items by their raw text.
fn items<'a>(s: &mut Scanner<'a>, sink: &mut dyn FnMut(&'a [u8])) -> Result<(), ExtractError> {
    s.begin_array()?;
    let mut first = true;
    while s.next_element(&mut first)? {
        if s.peek() == Some(b'{') {
            message(s, sink)?;
        } else {
            sink(s.skip_value()?);
            sink(ITEM_SEPARATOR);
        }
    }
    Ok(())
}
