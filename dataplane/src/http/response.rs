//! Upstream response heads and how their bodies are delimited (RFC 9112 §6.3).

use std::ops::Range;

use super::has_bare_lf;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFraming {
    /// No body: HEAD, 1xx, 204, 304, or `Content-Length: 0`.
    None,
    Length(u64),
    Chunked,
    /// Delimited by the replica closing the connection.
    UntilClose,
}

#[derive(Debug, Clone)]
pub struct ResponseHead {
    pub len: usize,
    pub status: u16,
    pub headers: Vec<(Range<usize>, Range<usize>)>,
    pub framing: ResponseFraming,
    /// The replica will keep the connection open after this response.
    pub keep_alive: bool,
    pub content_type_sse: bool,
    pub content_type_json: bool,
}

fn offset(base: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - base.as_ptr() as usize;
    start..start + part.len()
}

/// Parses a response head at the start of `buf`; `Ok(None)` when incomplete.
/// `request_was_head` decides framing for HEAD responses.
pub fn parse_response_head(
    buf: &[u8],
    max_head: usize,
    request_was_head: bool,
) -> Result<Option<ResponseHead>, &'static str> {
    let Some(end) = super::find_head_end(buf) else {
        if buf.len() > max_head {
            return Err("response head too large");
        }
        return Ok(None);
    };
    // Also when complete: otherwise a head over the limit would pass or fail
    // depending on how much of it the first read happened to bring.
    if end > max_head {
        return Err("response head too large");
    }
    let head = &buf[..end];
    if has_bare_lf(head) {
        return Err("bare LF in response head");
    }
    let mut storage = [httparse::EMPTY_HEADER; 128];
    let mut res = httparse::Response::new(&mut storage);
    match res.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err("incomplete response head"),
        Err(_) => return Err("malformed response head"),
    }
    let status = res.code.ok_or("no status")?;
    let version = res.version.unwrap_or(1);
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut keep_alive = version == 1;
    let mut sse = false;
    let mut json = false;
    let mut headers = Vec::with_capacity(res.headers.len());
    for h in res.headers.iter() {
        headers.push((offset(buf, h.name.as_bytes()), offset(buf, h.value)));
        let n = h.name;
        if n.eq_ignore_ascii_case("content-length") {
            let s = std::str::from_utf8(h.value).map_err(|_| "bad content-length")?;
            let v: u64 = s.trim().parse().map_err(|_| "bad content-length")?;
            if content_length.is_some_and(|p| p != v) {
                return Err("conflicting content-length");
            }
            content_length = Some(v);
        } else if n.eq_ignore_ascii_case("transfer-encoding") {
            let last = h.value.rsplit(|b| *b == b',').next().unwrap_or(b"");
            if last.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                chunked = true;
            } else {
                // Not chunked-terminated: the body runs until close (RFC 9112 §6.3 rule 4).
                keep_alive = false;
            }
        } else if n.eq_ignore_ascii_case("connection") {
            for t in h.value.split(|b| *b == b',') {
                let t = t.trim_ascii();
                if t.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if t.eq_ignore_ascii_case(b"keep-alive") && version == 0 {
                    keep_alive = true;
                }
            }
        } else if n.eq_ignore_ascii_case("content-type") {
            let v = h.value.trim_ascii_start();
            sse = starts_with_ci(v, b"text/event-stream");
            json = starts_with_ci(v, b"application/json");
        }
    }
    let framing =
        if request_was_head || (100..200).contains(&status) || status == 204 || status == 304 {
            ResponseFraming::None
        } else if chunked {
            ResponseFraming::Chunked
        } else if let Some(n) = content_length {
            if n == 0 {
                ResponseFraming::None
            } else {
                ResponseFraming::Length(n)
            }
        } else {
            keep_alive = false;
            ResponseFraming::UntilClose
        };
    Ok(Some(ResponseHead {
        len: end,
        status,
        headers,
        framing,
        keep_alive,
        content_type_sse: sse,
        content_type_json: json,
    }))
}

fn starts_with_ci(v: &[u8], p: &[u8]) -> bool {
    v.len() >= p.len() && v[..p.len()].eq_ignore_ascii_case(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_rules() {
        let p = |s: &str, head: bool| {
            parse_response_head(s.as_bytes(), 8192, head)
                .unwrap()
                .unwrap()
        };
        assert_eq!(
            p("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", false).framing,
            ResponseFraming::Length(3)
        );
        assert_eq!(
            p("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", true).framing,
            ResponseFraming::None
        );
        assert_eq!(
            p(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
                false
            )
            .framing,
            ResponseFraming::Chunked
        );
        let r = p(
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n",
            false,
        );
        assert_eq!(r.framing, ResponseFraming::UntilClose);
        assert!(!r.keep_alive && r.content_type_sse);
        assert_eq!(
            p("HTTP/1.1 204 No Content\r\n\r\n", false).framing,
            ResponseFraming::None
        );
        assert!(
            !p(
                "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
                false
            )
            .keep_alive
        );
        assert!(parse_response_head(b"HTTP/1.1 200 OK\r\n", 8192, false)
            .unwrap()
            .is_none());
        assert!(parse_response_head(b"garbage\r\n\r\n", 8192, false).is_err());
    }

    #[test]
    fn a_head_over_the_limit_is_refused_whole_or_in_pieces() {
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        let max = head.len() - 1;
        assert!(parse_response_head(&head[..max + 1], max, false).is_err());
        assert!(parse_response_head(head, max, false).is_err());
        assert!(parse_response_head(head, head.len(), false)
            .unwrap()
            .is_some());
    }
}
