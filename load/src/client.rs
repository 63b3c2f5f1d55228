//! HTTP side of one request: send the body, stream the SSE answer, measure it.
//!
//! One pooled hyper client for the whole run: HTTP/1.1 keep-alive connections are reused, and
//! an open-loop burst simply opens more of them, so the generator never queues behind its own
//! connection pool.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

use super::record::{ErrorKind, Record};
use super::sse::{Chunk, Event, SseParser};

#[derive(Clone)]
pub struct Client {
    inner: HyperClient<HttpConnector, Full<Bytes>>,
    /// Base URLs; each request names the one it goes to (several router instances in front
    /// of one fleet).
    bases: Vec<String>,
    timeout: Duration,
}

/// One request ready to go.
pub struct Outgoing {
    pub path: &'static str,
    pub body: Vec<u8>,
    pub session: Option<String>,
    /// Index into the client's targets.
    pub target: usize,
}

impl Client {
    /// `targets` are base URLs, e.g. `http://127.0.0.1:8080`.
    pub fn new(targets: &[String], timeout: Duration) -> anyhow::Result<Self> {
        anyhow::ensure!(!targets.is_empty(), "at least one target is needed");
        let mut bases = Vec::with_capacity(targets.len());
        for target in targets {
            let base = target.trim_end_matches('/').to_owned();
            let probe: Uri = format!("{base}/v1/completions").parse()?;
            anyhow::ensure!(
                probe.scheme_str() == Some("http"),
                "only http:// targets are supported: {target}"
            );
            bases.push(base);
        }
        let mut conn = HttpConnector::new();
        // Small requests and SSE chunks: Nagle would add up to 40 ms to TTFT.
        conn.set_nodelay(true);
        conn.set_connect_timeout(Some(timeout.min(Duration::from_secs(5))));
        let inner = HyperClient::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(usize::MAX)
            .build(conn);
        Ok(Self {
            inner,
            bases,
            timeout,
        })
    }

    pub fn targets(&self) -> usize {
        self.bases.len()
    }

    /// Sends `req` now; times are measured from `scheduled`, so open-loop lag counts against
    /// TTFT and latency as a user would see it.
    pub async fn send(&self, req: Outgoing, scheduled: Instant) -> Record {
        let mut rec = Record {
            lag: Instant::now().saturating_duration_since(scheduled),
            target: req.target,
            ..Default::default()
        };
        let outcome =
            tokio::time::timeout(self.timeout, self.exchange(req, scheduled, &mut rec)).await;
        rec.error = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(kind)) => Some(kind),
            Err(_) => Some(ErrorKind::Timeout),
        };
        rec.e2e = scheduled.elapsed();
        rec
    }

    async fn exchange(
        &self,
        req: Outgoing,
        scheduled: Instant,
        rec: &mut Record,
    ) -> Result<(), ErrorKind> {
        let base = &self.bases[req.target % self.bases.len()];
        let uri = format!("{base}{}", req.path);
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header("accept", "text/event-stream");
        if let Some(s) = &req.session {
            builder = builder.header("x-session-id", s.as_str());
        }
        let request = builder
            .body(Full::new(Bytes::from(req.body)))
            .map_err(|_| ErrorKind::Transport)?;
        let resp = self.inner.request(request).await.map_err(|e| {
            if e.is_connect() {
                ErrorKind::Connect
            } else {
                ErrorKind::Transport
            }
        })?;
        let status = resp.status();
        rec.status = Some(status.as_u16());
        rec.replica = resp
            .headers()
            .get("x-replica")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let mut body = resp.into_body();
        if status != StatusCode::OK {
            // Drain so the connection can go back to the pool; the content is not needed.
            while let Some(Ok(_)) = body.frame().await {}
            return Err(ErrorKind::Status(status.as_u16()));
        }
        let mut parser = SseParser::default();
        let mut done = false;
        let mut failed = false;
        // Read to the end of the body even after `[DONE]`: a body dropped early closes the
        // connection instead of returning it to the pool.
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|_| ErrorKind::Truncated)?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            parser.feed(data, |event| match event {
                Event::Done => done = true,
                Event::Data(payload) => match serde_json::from_slice::<Chunk>(&payload) {
                    Ok(chunk) => {
                        if chunk.error.is_some() {
                            failed = true;
                        }
                        if rec.ttft.is_none() && chunk.has_content() {
                            rec.ttft = Some(scheduled.elapsed());
                        }
                        if let Some(u) = chunk.usage {
                            rec.prompt_tokens = Some(u.prompt_tokens);
                            rec.cached_tokens = Some(
                                u.prompt_tokens_details
                                    .and_then(|d| d.cached_tokens)
                                    .unwrap_or(0),
                            );
                        }
                    }
                    Err(_) => failed = true,
                },
            });
        }
        if failed {
            Err(ErrorKind::Stream)
        } else if !done {
            Err(ErrorKind::Truncated)
        } else {
            Ok(())
        }
    }
}
