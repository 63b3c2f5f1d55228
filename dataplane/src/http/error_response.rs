//! The responses kvroute writes itself: always JSON in OpenAI's error shape, so
//! an OpenAI client library surfaces a readable message instead of a parse error.

use serde::Serialize;

/// Every error the proxy answers on its own, with its status and OpenAI fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    BadRequest,
    Unauthorized,
    NotFound,
    ModelNotFound,
    Timeout,
    TooLarge,
    HeadTooLarge,
    NotImplemented,
    BadGateway,
    NoReplica,
    GatewayTimeout,
}

impl ErrorKind {
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::BadRequest => 400,
            ErrorKind::Unauthorized => 401,
            ErrorKind::NotFound | ErrorKind::ModelNotFound => 404,
            ErrorKind::Timeout => 408,
            ErrorKind::TooLarge => 413,
            ErrorKind::HeadTooLarge => 431,
            ErrorKind::NotImplemented => 501,
            ErrorKind::BadGateway => 502,
            ErrorKind::NoReplica => 503,
            ErrorKind::GatewayTimeout => 504,
        }
    }

    /// OpenAI's `error.type`.
    pub fn error_type(self) -> &'static str {
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
            ErrorKind::NotFound => "not_found",
            ErrorKind::ModelNotFound => "model_not_found",
            ErrorKind::Timeout => "request_timeout",
            ErrorKind::TooLarge => "request_too_large",
            ErrorKind::HeadTooLarge => "header_fields_too_large",
            ErrorKind::NotImplemented => "not_implemented",
            ErrorKind::BadGateway => "upstream_error",
            ErrorKind::NoReplica => "no_healthy_replica",
            ErrorKind::GatewayTimeout => "upstream_timeout",
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
            "HTTP/1.1 {status} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{}\r\n",
            super::reason_phrase(status),
            body.len(),
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
}
