//! Request heads: parsed by httparse, then checked for every framing ambiguity
//! RFC 9112 §6.3 warns about, since a proxy that reads a body differently from
//! the replica behind it lets one client smuggle a request into another's stream.

use std::ops::Range;

use thiserror::Error;

use super::has_bare_lf;

/// How the request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    None,
    Length(u64),
    Chunked,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum HeadError {
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    #[error("request head larger than {0} bytes or more than the allowed header count")]
    TooLarge(usize),
    #[error("unsupported transfer-coding (only chunked is accepted)")]
    UnsupportedEncoding,
}

/// A parsed request head. Ranges index the connection's read buffer, which
/// keeps the head bytes in place until the request is forwarded: no copy.
#[derive(Debug, Clone)]
pub struct RequestHead {
    /// Bytes of the head including the final CRLFCRLF.
    pub len: usize,
    pub method: Range<usize>,
    pub path: Range<usize>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    pub headers: Vec<(Range<usize>, Range<usize>)>,
    pub framing: BodyFraming,
    /// The client wants the connection kept open after this exchange.
    pub keep_alive: bool,
    pub expect_continue: bool,
    pub is_head: bool,
}

impl RequestHead {
    pub fn method<'b>(&self, buf: &'b [u8]) -> &'b str {
        std::str::from_utf8(&buf[self.method.clone()]).unwrap_or("")
    }
    pub fn path<'b>(&self, buf: &'b [u8]) -> &'b str {
        std::str::from_utf8(&buf[self.path.clone()]).unwrap_or("")
    }
    /// Header pairs as slices of `buf` (names are ASCII per httparse).
    pub fn header_iter<'s, 'b: 's>(
        &'s self,
        buf: &'b [u8],
    ) -> impl Iterator<Item = (&'b str, &'b [u8])> + 's {
        self.headers.iter().map(move |(n, v)| {
            (
                std::str::from_utf8(&buf[n.clone()]).unwrap_or(""),
                &buf[v.clone()],
            )
        })
    }
    pub fn header<'b>(&self, buf: &'b [u8], name: &str) -> Option<&'b [u8]> {
        self.header_iter(buf)
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }
}

fn offset(base: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - base.as_ptr() as usize;
    start..start + part.len()
}

/// Parses a request head from the start of `buf`.
/// `Ok(None)`: incomplete, read more (unless `buf` already exceeds `max_head`).
pub fn parse_request_head(
    buf: &[u8],
    max_head: usize,
    max_headers: usize,
) -> Result<Option<RequestHead>, HeadError> {
    let Some(end) = super::find_head_end(buf) else {
        if buf.len() > max_head {
            return Err(HeadError::TooLarge(max_head));
        }
        // A bare LF seen early is rejected early instead of waiting for more bytes.
        if has_bare_lf(buf) {
            return Err(HeadError::Malformed("bare LF in request head"));
        }
        return Ok(None);
    };
    if end > max_head {
        return Err(HeadError::TooLarge(max_head));
    }
    let head = &buf[..end];
    if has_bare_lf(head) {
        return Err(HeadError::Malformed("bare LF in request head"));
    }
    let mut storage = vec![httparse::EMPTY_HEADER; max_headers];
    let mut req = httparse::Request::new(&mut storage);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(HeadError::Malformed("incomplete head")),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge(max_head)),
        Err(httparse::Error::HeaderName) => {
            return Err(HeadError::Malformed(
                "invalid header name (obs-fold or whitespace)",
            ))
        }
        Err(httparse::Error::HeaderValue) => {
            return Err(HeadError::Malformed("invalid header value"))
        }
        Err(httparse::Error::Version) => {
            return Err(HeadError::Malformed("unsupported HTTP version"))
        }
        Err(httparse::Error::Token) => return Err(HeadError::Malformed("invalid method token")),
        Err(_) => return Err(HeadError::Malformed("invalid request line")),
    }
    let method = req.method.ok_or(HeadError::Malformed("no method"))?;
    let path = req.path.ok_or(HeadError::Malformed("no request target"))?;
    let version = req.version.ok_or(HeadError::Malformed("no version"))?;
    if path.is_empty() {
        return Err(HeadError::Malformed("empty request target"));
    }

    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut te_seen = false;
    let mut hosts = 0;
    let mut keep_alive = version == 1;
    let mut expect_continue = false;
    let mut headers = Vec::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let name = h.name;
        headers.push((offset(buf, name.as_bytes()), offset(buf, h.value)));
        if name.eq_ignore_ascii_case("content-length") {
            // "5, 5" and repeated identical headers are one length; anything else is ambiguous.
            for part in h.value.split(|b| *b == b',') {
                let v = parse_decimal(trim(part))
                    .ok_or(HeadError::Malformed("invalid content-length"))?;
                match content_length {
                    Some(prev) if prev != v => {
                        return Err(HeadError::Malformed("conflicting content-length headers"))
                    }
                    _ => content_length = Some(v),
                }
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if te_seen || chunked {
                // A second TE header would make the coding list ambiguous to a downstream parser.
                return Err(HeadError::Malformed("multiple transfer-encoding headers"));
            }
            te_seen = true;
            let codings: Vec<&[u8]> = h
                .value
                .split(|b| *b == b',')
                .map(trim)
                .filter(|c| !c.is_empty())
                .collect();
            match codings.last() {
                Some(last) if last.eq_ignore_ascii_case(b"chunked") => {
                    if codings.len() > 1 {
                        return Err(HeadError::UnsupportedEncoding);
                    }
                    chunked = true;
                }
                _ => {
                    return Err(HeadError::Malformed(
                        "transfer-encoding does not end in chunked",
                    ))
                }
            }
        } else if name.eq_ignore_ascii_case("host") {
            hosts += 1;
        } else if name.eq_ignore_ascii_case("connection") {
            for t in h.value.split(|b| *b == b',').map(trim) {
                if t.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if t.eq_ignore_ascii_case(b"keep-alive") && version == 0 {
                    keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case("expect") {
            if trim(h.value).eq_ignore_ascii_case(b"100-continue") {
                expect_continue = version == 1;
            } else {
                return Err(HeadError::Malformed("unsupported expectation"));
            }
        }
    }
    if chunked && content_length.is_some() {
        return Err(HeadError::Malformed(
            "both content-length and transfer-encoding",
        ));
    }
    if version == 1 && hosts != 1 {
        return Err(HeadError::Malformed(
            "HTTP/1.1 request needs exactly one host header",
        ));
    }
    if chunked && version == 0 {
        return Err(HeadError::Malformed(
            "chunked transfer-encoding in HTTP/1.0",
        ));
    }
    let framing = if chunked {
        BodyFraming::Chunked
    } else {
        match content_length {
            Some(0) | None => BodyFraming::None,
            Some(n) => BodyFraming::Length(n),
        }
    };
    Ok(Some(RequestHead {
        len: end,
        method: offset(buf, method.as_bytes()),
        path: offset(buf, path.as_bytes()),
        version,
        headers,
        framing,
        keep_alive,
        expect_continue: expect_continue && framing != BodyFraming::None,
        is_head: method == "HEAD",
    }))
}

fn trim(v: &[u8]) -> &[u8] {
    let s = v
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(v.len());
    let e = v
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(s, |p| p + 1);
    &v[s..e]
}

/// Strict decimal: digits only (no sign, no spaces inside), at most 18 of them.
fn parse_decimal(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0u64, |a, d| a * 10 + (d - b'0') as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Option<RequestHead>, HeadError> {
        parse_request_head(s.as_bytes(), 8192, 64)
    }

    #[test]
    fn parses_post_with_length() {
        let raw = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\nX-A: b\r\n\r\n{\"a\":1}";
        let h = parse(raw).unwrap().unwrap();
        let buf = raw.as_bytes();
        assert_eq!(h.method(buf), "POST");
        assert_eq!(h.path(buf), "/v1/completions");
        assert_eq!(h.framing, BodyFraming::Length(12));
        assert!(h.keep_alive);
        assert_eq!(h.header(buf, "x-a"), Some(&b"b"[..]));
        assert_eq!(&buf[h.len..], b"{\"a\":1}");
    }

    #[test]
    fn incomplete_then_too_large() {
        assert!(parse("GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(9000));
        assert_eq!(parse(&big).unwrap_err(), HeadError::TooLarge(8192));
    }

    #[test]
    fn rejects_each_smuggling_shape() {
        let bad = [
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 6\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0x5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\nHost: x\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nX-A: b\r\n c\r\n\r\n",
            "POST / HTTP/1.1\r\nHost : x\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        ];
        for raw in bad {
            assert!(
                matches!(parse(raw), Err(HeadError::Malformed(_))),
                "accepted: {raw:?}"
            );
        }
        assert_eq!(
            parse("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
                .unwrap_err(),
            HeadError::UnsupportedEncoding
        );
    }

    #[test]
    fn accepts_repeated_identical_length_and_keepalive_rules() {
        let h =
            parse("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n")
                .unwrap()
                .unwrap();
        assert_eq!(h.framing, BodyFraming::Length(5));
        let h = parse("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!h.keep_alive);
        let h = parse("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.keep_alive);
        let h = parse("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive);
        let h = parse(
            "POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert!(h.expect_continue);
        let h = parse("HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.is_head);
    }
}
