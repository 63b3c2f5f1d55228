//! Captures a response while it streams to the client, so a complete 200 can be
//! stored without holding the client back.

use std::sync::Arc;

use crate::http::{ChunkedDecoder, ResponseFraming};

use super::store::{Delivery, Entry};

/// Response headers that describe this transfer or this moment, not the answer.
fn skip_header(name: &str) -> bool {
    [
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "date",
        "set-cookie",
        "x-kvroute-cache",
    ]
    .iter()
    .any(|h| name.eq_ignore_ascii_case(h))
}

pub struct Recorder {
    /// The body arrives chunked: the stored copy is the decoded bytes (for SSE, the events).
    chunked: Option<ChunkedDecoder>,
    head: Vec<u8>,
    body: Vec<u8>,
    limit: usize,
    /// Past the per-entry limit or badly framed: finish yields nothing.
    spoiled: bool,
    delivery: Delivery,
}

impl Recorder {
    /// `None` for framings whose end cannot be told from a cut-off (read until close).
    pub fn new(framing: ResponseFraming, limit: usize, delivery: Delivery) -> Option<Recorder> {
        let chunked = match framing {
            ResponseFraming::Chunked => Some(ChunkedDecoder::new()),
            ResponseFraming::Length(n) if n as usize <= limit => None,
            _ => return None,
        };
        Some(Recorder {
            chunked,
            head: Vec::with_capacity(256),
            body: Vec::new(),
            limit,
            spoiled: false,
            delivery,
        })
    }

    /// An end-to-end header as relayed to the client.
    pub fn header(&mut self, name: &str, value: &[u8]) {
        // A replica (or a gateway behind us) that marks an answer no-store knows
        // something about it we do not.
        if name.eq_ignore_ascii_case("cache-control")
            && value
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"no-store"))
        {
            self.spoiled = true;
        }
        if skip_header(name) {
            return;
        }
        self.head.extend_from_slice(name.as_bytes());
        self.head.extend_from_slice(b": ");
        self.head.extend_from_slice(value);
        self.head.extend_from_slice(b"\r\n");
    }

    /// Body bytes exactly as relayed (still in the upstream's framing).
    pub fn push(&mut self, bytes: &[u8]) {
        if self.spoiled {
            return;
        }
        match &mut self.chunked {
            Some(d) => {
                if d.feed(bytes, Some(&mut self.body)).is_err() {
                    self.spoiled = true;
                }
            }
            None => self.body.extend_from_slice(bytes),
        }
        if self.head.len() + self.body.len() > self.limit {
            self.spoiled = true;
            self.body = Vec::new();
        }
    }

    /// The entry, if the body arrived whole. The caller calls this only once the
    /// upstream framing says the body is complete.
    pub fn finish(self) -> Option<Arc<Entry>> {
        if self.spoiled || self.chunked.as_ref().is_some_and(|d| !d.is_done()) {
            return None;
        }
        Some(Arc::new(Entry {
            delivery: self.delivery,
            head: self.head.into(),
            body: self.body.into(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_sse_is_stored_decoded_and_cut_streams_are_not() {
        let mut r = Recorder::new(ResponseFraming::Chunked, 1 << 20, Delivery::Stream).unwrap();
        r.header("Content-Type", b"text/event-stream");
        r.header("Transfer-Encoding", b"chunked");
        r.header("Date", b"now");
        r.push(b"8\r\ndata: a\n\r\n");
        r.push(b"8\r\ndata: b\n\r\n0\r\n\r\n");
        let e = r.finish().unwrap();
        assert_eq!(&e.body[..], b"data: a\ndata: b\n");
        assert_eq!(&e.head[..], b"Content-Type: text/event-stream\r\n");
        assert_eq!(e.delivery, Delivery::Stream);

        let mut r = Recorder::new(ResponseFraming::Chunked, 1 << 20, Delivery::Stream).unwrap();
        r.push(b"8\r\ndata: a\n\r\n");
        assert!(r.finish().is_none());
    }

    #[test]
    fn a_replica_no_store_is_honoured() {
        let mut r = Recorder::new(ResponseFraming::Length(2), 100, Delivery::Plain).unwrap();
        r.header("Cache-Control", b"private, no-store");
        r.push(b"{}");
        assert!(r.finish().is_none());
    }

    #[test]
    fn limits_and_unframed_bodies_are_not_stored() {
        assert!(Recorder::new(ResponseFraming::UntilClose, 100, Delivery::Plain).is_none());
        assert!(Recorder::new(ResponseFraming::Length(101), 100, Delivery::Plain).is_none());
        let mut r = Recorder::new(ResponseFraming::Chunked, 10, Delivery::Plain).unwrap();
        r.push(b"b\r\nhello world\r\n0\r\n\r\n");
        assert!(r.finish().is_none());
    }
}
