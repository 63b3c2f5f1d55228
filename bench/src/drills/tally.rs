//! What one request came to, and the sums per drill.

use std::collections::BTreeMap;

/// How a request ended, as the client saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// A non-2xx answer (`http 502`) or a transport error before or inside a
    /// non-streamed answer (`connect`, `reset`, `eof`, `timeout`, `cut body`).
    Failed(String),
    /// A streamed answer that started (2xx head) but ended without its final
    /// `data: [DONE]`: cut by the replica or the proxy.
    Broken,
}

/// What the client read: the status if a head came, the body bytes read, and
/// the error that stopped reading, if any.
#[derive(Debug, Default)]
pub struct Got {
    pub status: Option<u16>,
    pub body: Vec<u8>,
    pub error: Option<std::io::ErrorKind>,
}

fn transport_kind(e: std::io::ErrorKind) -> &'static str {
    use std::io::ErrorKind as K;
    match e {
        K::ConnectionRefused => "connect refused",
        K::ConnectionReset | K::BrokenPipe | K::ConnectionAborted => "reset",
        K::UnexpectedEof => "eof",
        K::TimedOut | K::WouldBlock => "timeout",
        _ => "io error",
    }
}

/// Sorts a finished request into ok, failed (by kind) or a broken stream.
pub fn classify(stream: bool, got: &Got) -> Outcome {
    let Some(status) = got.status else {
        let kind = got.error.map_or("no response", transport_kind);
        return Outcome::Failed(kind.to_owned());
    };
    if !(200..300).contains(&status) {
        return Outcome::Failed(format!("http {status}"));
    }
    if stream {
        // Streams end with their own terminator; a clean close of the HTTP
        // body without it is still a stream cut short.
        let done = got
            .body
            .windows(DONE.len())
            .rev()
            .take(64)
            .any(|w| w == DONE);
        if done && got.error.is_none() {
            Outcome::Ok
        } else {
            Outcome::Broken
        }
    } else if got.error.is_some() {
        Outcome::Failed("cut body".to_owned())
    } else {
        Outcome::Ok
    }
}

const DONE: &[u8] = b"data: [DONE]";

/// The sums for one drill.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    pub sent: u64,
    pub ok: u64,
    pub failed: BTreeMap<String, u64>,
    pub streams: u64,
    pub broken_streams: u64,
    /// Latency of every completed (ok) request, ms; sorted by [`Tally::p99_ms`].
    pub latencies_ms: Vec<f64>,
}

impl Tally {
    pub fn add(&mut self, stream: bool, outcome: &Outcome, latency_ms: f64) {
        self.sent += 1;
        if stream {
            self.streams += 1;
        }
        match outcome {
            Outcome::Ok => {
                self.ok += 1;
                if !stream {
                    self.latencies_ms.push(latency_ms);
                }
            }
            Outcome::Failed(kind) => *self.failed.entry(kind.clone()).or_default() += 1,
            Outcome::Broken => self.broken_streams += 1,
        }
    }

    pub fn failed_total(&self) -> u64 {
        self.failed.values().sum()
    }

    /// `kind n, kind n` or `-`.
    pub fn failed_kinds(&self) -> String {
        if self.failed.is_empty() {
            return "-".into();
        }
        self.failed
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// p99 latency of the short (non-streamed) requests that succeeded.
    pub fn p99_ms(&mut self) -> Option<f64> {
        if self.latencies_ms.is_empty() {
            return None;
        }
        self.latencies_ms.sort_by(f64::total_cmp);
        let n = self.latencies_ms.len();
        let i = ((0.99 * n as f64).ceil() as usize).clamp(1, n) - 1;
        Some(self.latencies_ms[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::ErrorKind;

    fn got(status: Option<u16>, body: &str, error: Option<ErrorKind>) -> Got {
        Got {
            status,
            body: body.as_bytes().to_vec(),
            error,
        }
    }

    #[test]
    fn a_stream_is_whole_only_with_its_done_and_no_error() {
        let whole = "data: {\"x\":1}\n\ndata: [DONE]\n\n";
        assert_eq!(classify(true, &got(Some(200), whole, None)), Outcome::Ok);
        // The proxy ended the HTTP body cleanly, but the replica died mid-stream.
        let cut = "data: {\"x\":1}\n\n";
        assert_eq!(classify(true, &got(Some(200), cut, None)), Outcome::Broken);
        assert_eq!(
            classify(true, &got(Some(200), cut, Some(ErrorKind::UnexpectedEof))),
            Outcome::Broken
        );
        // [DONE] arrived, then the connection broke before the last chunk.
        assert_eq!(
            classify(
                true,
                &got(Some(200), whole, Some(ErrorKind::ConnectionReset))
            ),
            Outcome::Broken
        );
        // A stream that never started is a failed request, not a broken stream.
        assert_eq!(
            classify(true, &got(Some(502), "{}", None)),
            Outcome::Failed("http 502".into())
        );
        assert_eq!(
            classify(true, &got(None, "", Some(ErrorKind::ConnectionRefused))),
            Outcome::Failed("connect refused".into())
        );
    }

    #[test]
    fn short_requests_fail_by_kind_and_tally_sums() {
        assert_eq!(classify(false, &got(Some(200), "{}", None)), Outcome::Ok);
        assert_eq!(
            classify(
                false,
                &got(Some(200), "{\"id\"", Some(ErrorKind::UnexpectedEof))
            ),
            Outcome::Failed("cut body".into())
        );
        assert_eq!(
            classify(false, &got(None, "", Some(ErrorKind::ConnectionReset))),
            Outcome::Failed("reset".into())
        );
        let mut t = Tally::default();
        t.add(false, &Outcome::Ok, 10.0);
        t.add(false, &Outcome::Failed("http 503".into()), 1.0);
        t.add(false, &Outcome::Failed("http 503".into()), 1.0);
        t.add(true, &Outcome::Broken, 5.0);
        t.add(true, &Outcome::Ok, 900.0);
        assert_eq!((t.sent, t.ok, t.streams, t.broken_streams), (5, 2, 2, 1));
        assert_eq!(t.failed_total(), 2);
        assert_eq!(t.failed_kinds(), "http 503 2");
        // Streams stay out of the latency figure: their length is the workload's.
        assert_eq!(t.p99_ms(), Some(10.0));
    }
}
