//! vLLM's KV-event replay socket: a ROUTER beside the publisher that sends back
//! the batches it still buffers (`buffer_steps`, 10,000 by default), so a
//! subscriber that saw a sequence gap can fetch what it missed.
//!
//! A request is `[empty delimiter, start seq (u64 BE)]`, what a REQ socket sends;
//! a DEALER is used because the answer is many messages. Every buffered batch
//! from that sequence number on comes back as one message, then an end marker:
//! sequence -1 (all ones) with an empty payload. vLLM up to 0.24 answers
//! `[delimiter, seq, payload]`; from 0.26 the topic comes first, as on the PUB
//! socket (`[delimiter, topic, seq, payload]`). Both are read by their last two
//! frames.

use std::time::Duration;

use bytes::Bytes;
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

use crate::error::{ControlError, Result};

/// The sequence number of the end marker: -1 as a signed 64-bit integer.
const END_SEQ: u64 = u64::MAX;

#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    Batch { seq: u64, payload: Bytes },
    End,
}

/// Why a replay fetch stopped short, under [`ControlError::Replay`].
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("{0} frames")]
    Frames(usize),
    #[error("sequence frame of {0} bytes")]
    SequenceFrame(usize),
    #[error(transparent)]
    Zmq(#[from] zeromq::ZmqError),
    /// Not a `std::error::Error`, so kept as a value rather than a source.
    #[error("{0}")]
    EmptyMessage(zeromq::ZmqEmptyMessageError),
    #[error("no end marker within {0:?}")]
    NoEndMarker(Duration),
}

pub fn parse_reply(frames: &[Bytes]) -> std::result::Result<Reply, ReplayError> {
    let n = frames.len();
    if n < 2 {
        return Err(ReplayError::Frames(n));
    }
    let seq = <[u8; 8]>::try_from(&frames[n - 2][..])
        .map(u64::from_be_bytes)
        .map_err(|_| ReplayError::SequenceFrame(frames[n - 2].len()))?;
    let payload = frames[n - 1].clone();
    if seq == END_SEQ && payload.is_empty() {
        return Ok(Reply::End);
    }
    Ok(Reply::Batch { seq, payload })
}

/// The batches numbered `from..until`, in order, as far as the publisher still
/// buffers them. Stops reading at the first batch at or past `until` (those
/// arrive on the PUB socket) or at the end marker; gives up after `timeout`.
pub async fn fetch(
    endpoint: &str,
    from: u64,
    until: u64,
    timeout: Duration,
) -> Result<Vec<(u64, Bytes)>> {
    let err = |source: ReplayError| ControlError::Replay {
        endpoint: endpoint.to_string(),
        source,
    };
    match tokio::time::timeout(timeout, fetch_within(endpoint, from, until)).await {
        Ok(r) => r.map_err(err),
        Err(_) => Err(err(ReplayError::NoEndMarker(timeout))),
    }
}

async fn fetch_within(
    endpoint: &str,
    from: u64,
    until: u64,
) -> std::result::Result<Vec<(u64, Bytes)>, ReplayError> {
    let mut sock = zeromq::DealerSocket::new();
    sock.connect(endpoint).await?;
    let request = ZmqMessage::try_from(vec![
        Bytes::new(),
        Bytes::copy_from_slice(&from.to_be_bytes()),
    ])
    .map_err(ReplayError::EmptyMessage)?;
    sock.send(request).await?;
    let mut out: Vec<(u64, Bytes)> = Vec::new();
    loop {
        let frames = sock.recv().await?.into_vec();
        match parse_reply(&frames)? {
            Reply::End => return Ok(out),
            Reply::Batch { seq, .. } if seq >= until => return Ok(out),
            // Older than asked (or repeated): nothing to apply.
            Reply::Batch { seq, .. } if seq < from || out.last().is_some_and(|l| seq <= l.0) => {}
            Reply::Batch { seq, payload } => out.push((seq, payload)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(x: &[u8]) -> Bytes {
        Bytes::copy_from_slice(x)
    }

    #[test]
    fn replies_with_and_without_the_topic_frame() {
        let seq = 7u64.to_be_bytes();
        // vLLM 0.20 and 0.24: [delimiter, seq, payload].
        assert_eq!(
            parse_reply(&[b(b""), b(&seq), b(b"p")]).unwrap(),
            Reply::Batch {
                seq: 7,
                payload: b(b"p")
            }
        );
        // vLLM 0.32: [delimiter, topic, seq, payload].
        assert_eq!(
            parse_reply(&[b(b""), b(b"kv"), b(&seq), b(b"p")]).unwrap(),
            Reply::Batch {
                seq: 7,
                payload: b(b"p")
            }
        );
        let end = (-1i64).to_be_bytes();
        assert_eq!(parse_reply(&[b(b""), b(&end), b(b"")]).unwrap(), Reply::End);
        assert_eq!(
            parse_reply(&[b(b""), b(b""), b(&end), b(b"")]).unwrap(),
            Reply::End
        );
        assert!(parse_reply(&[b(b"")]).is_err());
        assert!(parse_reply(&[b(b""), b(b"short"), b(b"p")]).is_err());
    }

    #[tokio::test]
    async fn an_endpoint_nobody_serves_is_an_error_not_a_hang() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let r = fetch(
            &format!("tcp://127.0.0.1:{port}"),
            0,
            5,
            Duration::from_secs(2),
        )
        .await;
        assert!(r.is_err());
    }
}
