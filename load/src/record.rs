//! What one request measured.

use std::fmt;
use std::time::Duration;

/// Why a request failed; the summary counts errors per kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// TCP connect refused/failed: the target (or the replica behind it) is down.
    Connect,
    /// The request did not finish within the per-request timeout.
    Timeout,
    /// Any non-200 response.
    Status(u16),
    /// The body ended (or broke) before `data: [DONE]`.
    Truncated,
    /// The stream carried an `error` object or a chunk that is not valid JSON.
    Stream,
    /// Any other transport failure (request write error, protocol violation).
    Transport,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorKind::Connect => f.write_str("connect"),
            ErrorKind::Timeout => f.write_str("timeout"),
            ErrorKind::Status(code) => write!(f, "http_{code}"),
            ErrorKind::Truncated => f.write_str("truncated"),
            ErrorKind::Stream => f.write_str("stream_error"),
            ErrorKind::Transport => f.write_str("transport"),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Record {
    /// How late the request left compared to its schedule (open-loop lag).
    pub lag: Duration,
    /// When the request actually left, as an offset from the start of the run.
    pub sent: Duration,
    /// Scheduled send time to the first SSE chunk carrying generated text.
    pub ttft: Option<Duration>,
    /// Scheduled send time to the end of the stream (or the failure).
    pub e2e: Duration,
    pub status: Option<u16>,
    pub prompt_tokens: Option<u64>,
    pub cached_tokens: Option<u64>,
    /// `x-replica` response header: which replica the router picked.
    pub replica: Option<String>,
    /// Which of the client's targets (router instances) it was sent to.
    pub target: usize,
    pub error: Option<ErrorKind>,
}
