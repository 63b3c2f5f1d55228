//! HTTP/1.1 framing for the proxy: request heads, chunked bodies, response heads,
//! and the error responses kvroute itself produces.
//!
//! Pure functions over byte buffers: no sockets, so every smuggling shape of
//! RFC 9112 §6.3 is unit-tested here rather than through processes.

pub mod chunked;
pub mod error_response;
pub mod request;
pub mod response;
pub mod usage;

pub use chunked::{ChunkError, ChunkedDecoder};
pub use error_response::{ErrorKind, ErrorResponse};
pub use request::{parse_request_head, BodyFraming, HeadError, RequestHead};
pub use response::{parse_response_head, ResponseFraming, ResponseHead};

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1);
/// never forwarded. `transfer-encoding` is re-added by the proxy when it frames
/// a body as chunked itself.
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// True when `name` is hop-by-hop, either by definition or because the
/// message's `Connection` header lists it.
pub fn is_hop_by_hop(name: &str, connection_tokens: &[&str]) -> bool {
    HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
        || connection_tokens
            .iter()
            .any(|t| name.eq_ignore_ascii_case(t))
}

/// Tokens of all `Connection` headers, trimmed.
pub fn connection_tokens<'a>(headers: &[httparse::Header<'a>]) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .filter_map(|h| std::str::from_utf8(h.value).ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect()
}

/// Rejects a bare LF (one not preceded by CR) in a message head: RFC 9112 lets a
/// recipient accept it, but a proxy that does while the next hop doesn't is a
/// request-smuggling vector, so kvroute refuses it.
pub fn has_bare_lf(head: &[u8]) -> bool {
    memchr::memchr_iter(b'\n', head).any(|i| i == 0 || head[i - 1] != b'\r')
}

/// Finds the end of a head (index just past `\r\n\r\n`), if complete.
pub fn find_head_end(buf: &[u8]) -> Option<usize> {
    memchr::memmem::find(buf, b"\r\n\r\n").map(|i| i + 4)
}

pub fn reason_phrase(code: u16) -> &'static str {
    match code {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_lf_detection() {
        assert!(!has_bare_lf(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(has_bare_lf(b"GET / HTTP/1.1\nHost: a\r\n\r\n"));
        assert!(has_bare_lf(b"\n"));
    }

    #[test]
    fn hop_by_hop_includes_connection_listed() {
        let hs = [httparse::Header {
            name: "Connection",
            value: b"close, X-Foo",
        }];
        let toks = connection_tokens(&hs);
        assert!(is_hop_by_hop("x-foo", &toks));
        assert!(is_hop_by_hop("Keep-Alive", &toks));
        assert!(!is_hop_by_hop("content-type", &toks));
    }
}
