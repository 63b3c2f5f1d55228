//! The responses kvroute writes itself: always JSON in OpenAI's error shape, so
//! an OpenAI client library surfaces a readable message instead of a parse error.

use serde::Serialize;

/// Every error the proxy answers on its own, with its status and OpenAI fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    BadRequest,
    /// A missing or invalid API key (also: every replica refused the client's).
    Unauthorized,
    /// The API key may not use the model the request names.
    ModelNotAllowed,
    /// The API key's requests per second are used up.
    RateLimitedRequests,
    /// The API key's prompt bytes per second are used up.
    RateLimitedPromptBytes,
    NotFound,
    ModelNotFound,
    Timeout,
    TooLarge,
    HeadTooLarge,
    NotImplemented,
    BadGateway,
    NoReplica,
    GatewayTimeout,
    /// Every replica is at its `max_in_flight` and the admission queue is full
    /// (or the request waited its `queue_timeout_ms` there).
    Overloaded,
    /// The API key already holds its share of the admission queue.
    QueueShareExceeded,
    /// The connection budget is spent: a new connection is refused.
    TooManyConnections,
}

impl ErrorKind {
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::BadRequest => 400,
            ErrorKind::Unauthorized => 401,
            ErrorKind::ModelNotAllowed => 403,
            ErrorKind::RateLimitedRequests
            | ErrorKind::RateLimitedPromptBytes
            | ErrorKind::QueueShareExceeded => 429,
            ErrorKind::NotFound | ErrorKind::ModelNotFound => 404,
            ErrorKind::Timeout => 408,
            ErrorKind::TooLarge => 413,
            ErrorKind::HeadTooLarge => 431,
            ErrorKind::NotImplemented => 501,
            ErrorKind::BadGateway => 502,
            ErrorKind::NoReplica | ErrorKind::Overloaded | ErrorKind::TooManyConnections => 503,
            ErrorKind::GatewayTimeout => 504,
        }
    }

    /// OpenAI's `error.type`.
    pub fn error_type(self) -> &'static str {
        match self {
            // OpenAI's own 429s say which limit: requests or tokens.
            ErrorKind::RateLimitedRequests | ErrorKind::QueueShareExceeded => return "requests",
            ErrorKind::RateLimitedPromptBytes => return "tokens",
            _ => {}
        }
        match self.status() {
            400..=499 => "invalid_request_error",
            _ => "server_error",
        }
    }

    /// OpenAI's `error.code`; also the `kind` label of `kvroute_errors_total`.
    pub fn code(self) -> &'static str {
        match self {
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::Unauthorized => "invalid_api_key",
            ErrorKind::ModelNotAllowed => "model_not_allowed",
            ErrorKind::RateLimitedRequests | ErrorKind::RateLimitedPromptBytes => {
                "rate_limit_exceeded"
            }
            ErrorKind::NotFound => "not_found",
            ErrorKind::ModelNotFound => "model_not_found",
            ErrorKind::Timeout => "request_timeout",
            ErrorKind::TooLarge => "request_too_large",
            ErrorKind::HeadTooLarge => "header_fields_too_large",
            ErrorKind::NotImplemented => "not_implemented",
            ErrorKind::BadGateway => "upstream_error",
            ErrorKind::NoReplica => "no_healthy_replica",
            ErrorKind::GatewayTimeout => "upstream_timeout",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::QueueShareExceeded => "queue_share_exceeded",
            ErrorKind::TooManyConnections => "too_many_connections",
        }
    }
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: &'a str,
}

/// A complete HTTP/1.1 error response, ready to write.
pub struct ErrorResponse;

impl ErrorResponse {
    /// Serialises status line, headers and JSON body into `out`.
    pub fn write(out: &mut Vec<u8>, kind: ErrorKind, message: &str, close: bool) {
        Self::write_with(out, kind, message, close, "")
    }

    /// Like [`ErrorResponse::write`], with `extra` header lines (each ending in
    /// CRLF) such as `retry-after`. A 401 always carries `www-authenticate:
    /// Bearer` (RFC 9110 §15.5.2).
    pub fn write_with(out: &mut Vec<u8>, kind: ErrorKind, message: &str, close: bool, extra: &str) {
        let body = serde_json::to_vec(&Body {
            error: Inner {
                message,
                kind: kind.error_type(),
                param: None,
                code: kind.code(),
            },
        })
        .unwrap_or_default();
        let status = kind.status();
        use std::io::Write;
        let _ = write!(
            out,
            "HTTP/1.1 {status} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{}{extra}{}\r\n",
            super::reason_phrase(status),
            body.len(),
            if kind == ErrorKind::Unauthorized {
                "www-authenticate: Bearer\r\n"
            } else {
                ""
            },
            if close { "connection: close\r\n" } else { "" }
        );
        out.extend_from_slice(&body);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_shape() {
        let mut out = Vec::new();
        ErrorResponse::write(&mut out, ErrorKind::NoReplica, "no healthy replica", true);
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
        assert!(s.contains("connection: close\r\n"));
        let body = s.split("\r\n\r\n").nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "no_healthy_replica");
        assert_eq!(v["error"]["type"], "server_error");
        assert_eq!(v["error"]["message"], "no healthy replica");
    }

    fn parts(out: Vec<u8>) -> (String, serde_json::Value) {
        let s = String::from_utf8(out).unwrap();
        let (head, body) = s.split_once("\r\n\r\n").unwrap();
        (head.to_string(), serde_json::from_str(body).unwrap())
    }

    #[test]
    fn auth_errors_carry_their_headers() {
        let mut out = Vec::new();
        ErrorResponse::write(&mut out, ErrorKind::Unauthorized, "invalid API key", false);
        let (head, v) = parts(out);
        assert!(head.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{head}");
        assert!(head.contains("\r\nwww-authenticate: Bearer"), "{head}");
        assert_eq!(
            v,
            serde_json::json!({"error": {"message": "invalid API key",
                "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}})
        );
        let mut out = Vec::new();
        let kind = ErrorKind::RateLimitedRequests;
        ErrorResponse::write_with(&mut out, kind, "slow down", true, "retry-after: 2\r\n");
        let (head, v) = parts(out);
        assert!(
            head.starts_with("HTTP/1.1 429 Too Many Requests\r\n"),
            "{head}"
        );
        assert!(
            head.contains("\r\nretry-after: 2\r\nconnection: close"),
            "{head}"
        );
        assert!(!head.contains("www-authenticate"));
        assert_eq!(v["error"]["code"], "rate_limit_exceeded");
        assert_eq!(v["error"]["type"], "requests");
        let mut out = Vec::new();
        ErrorResponse::write(&mut out, ErrorKind::ModelNotAllowed, "no", false);
        let (head, v) = parts(out);
        assert!(head.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{head}");
        assert_eq!(v["error"]["code"], "model_not_allowed");
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }
    #[test]
    fn overload_errors() {
        let mut out = Vec::new();
        let kind = ErrorKind::Overloaded;
        ErrorResponse::write_with(&mut out, kind, "busy", false, "retry-after: 5\r\n");
        let (head, v) = parts(out);
        assert!(
            head.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{head}"
        );
        assert!(head.contains("\r\nretry-after: 5"), "{head}");
        assert_eq!(v["error"]["code"], "overloaded");
        assert_eq!(v["error"]["type"], "server_error");
        let mut out = Vec::new();
        ErrorResponse::write(&mut out, ErrorKind::QueueShareExceeded, "share", false);
        let (head, v) = parts(out);
        assert!(head.starts_with("HTTP/1.1 429 "), "{head}");
        assert_eq!(v["error"]["code"], "queue_share_exceeded");
        assert_eq!(v["error"]["type"], "requests");
    }
}
