//! `parse_response_head`: any bytes give Ok or Err, never a panic, and an
//! accepted head is framed as RFC 9112 §6.3 says for a response:
//! - incomplete only without a blank line and within the limit; every prefix of
//!   an accepted head is incomplete, so the answer does not depend on how the
//!   replica's bytes were split into reads (a head over the limit is refused
//!   whether it arrives whole or in pieces);
//! - the head ends at the first CRLFCRLF, ranges lie inside it, bytes after it
//!   change nothing, no bare LF is accepted;
//! - no body for HEAD, 1xx, 204 and 304; else chunked when a transfer-encoding
//!   ends in chunked, else the agreeing content-lengths, else until close;
//! - keep-alive only for a body whose end the proxy can find, never after
//!   `Connection: close` (HTTP/1.1) or a transfer-encoding not ending in chunked.

use bolero::generator::TypeGenerator;
use kvroute::http::{find_head_end, parse_response_head, ResponseFraming, ResponseHead};
use kvroute_fuzz::gen::{self, Driver};
use kvroute_fuzz::{show, Tally};

const NAME: &str = "response_head";
const MAX_HEAD: &[usize] = &[64 * 1024, 48];

#[test]
fn response_head() {
    kvroute_fuzz::expect_corpus(&kvroute_fuzz::tests_target_dir(NAME));
    bolero::check!(name = NAME).for_each(|buf: &[u8]| {
        for &max in MAX_HEAD {
            for head_request in [false, true] {
                check(buf, max, head_request);
            }
        }
    });
}

#[test]
fn response_head_generated() {
    let dir = kvroute_fuzz::tests_target_dir(NAME);
    let tally = Tally::new(&["accepted", "incomplete", "refused"]);
    bolero::check!(name = "response_head_generated")
        .with_type::<Case>()
        .for_each(|case: &Case| {
            kvroute_fuzz::keep_on_failure(&dir, &case.bytes);
            tally.add(check(&case.bytes, case.max_head, case.head_request));
        });
    tally.report("response_head_generated");
}

/// Returns the outcome: 0 accepted, 1 incomplete, 2 refused.
fn check(buf: &[u8], max_head: usize, head_request: bool) -> usize {
    let r = parse_response_head(buf, max_head, head_request);
    let end = find_head_end(buf);
    if let Some(e) = end {
        let mut more = buf[..e].to_vec();
        more.extend_from_slice(b"HTTP/1.1 200 OK\r\n\r\nbody");
        let again = parse_response_head(&more, max_head, head_request);
        assert_eq!(summary(&again), summary(&r), "{}", show(buf));
        if e > max_head {
            assert!(r.is_err(), "a head over the limit accepted: {}", show(buf));
        }
    }
    match &r {
        Ok(None) => {
            assert!(end.is_none() && buf.len() <= max_head);
            1
        }
        Err(_) => 2,
        Ok(Some(h)) => {
            accepted(buf, h, max_head, head_request);
            0
        }
    }
}

fn accepted(buf: &[u8], h: &ResponseHead, max_head: usize, head_request: bool) {
    let head = &buf[..h.len];
    assert_eq!(Some(h.len), find_head_end(buf));
    assert!(h.len <= max_head);
    assert!(
        !kvroute::http::has_bare_lf(head),
        "bare LF accepted: {}",
        show(head)
    );
    // httparse takes any three digits, 000 included.
    assert!(h.status <= 999);
    for (n, v) in &h.headers {
        assert!(n.end <= h.len && v.end <= h.len && n.start <= n.end && v.start <= v.end);
    }
    let hs: Vec<(&[u8], &[u8])> = h
        .headers
        .iter()
        .map(|(n, v)| (&buf[n.clone()], &buf[v.clone()]))
        .collect();
    let named = |name: &str| -> Vec<&[u8]> {
        hs.iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| *v)
            .collect()
    };
    let last_coding = |v: &[u8]| {
        v.rsplit(|b| *b == b',')
            .next()
            .unwrap_or(b"")
            .trim_ascii()
            .to_ascii_lowercase()
    };
    let te = named("transfer-encoding");
    let chunked = te.iter().any(|v| last_coding(v) == b"chunked");
    let te_not_chunked = te.iter().any(|v| last_coding(v) != b"chunked");
    let lengths: Vec<u64> = named("content-length")
        .iter()
        .map(|v| {
            std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .expect("an unreadable content-length accepted")
        })
        .collect();
    assert!(
        lengths.windows(2).all(|w| w[0] == w[1]),
        "conflicting content-lengths accepted"
    );
    let no_body =
        head_request || (100..200).contains(&h.status) || h.status == 204 || h.status == 304;
    let expect = if no_body {
        ResponseFraming::None
    } else if chunked {
        ResponseFraming::Chunked
    } else {
        match lengths.first() {
            Some(0) => ResponseFraming::None,
            Some(&n) => ResponseFraming::Length(n),
            None => ResponseFraming::UntilClose,
        }
    };
    assert_eq!(h.framing, expect, "{}", show(head));
    if h.keep_alive {
        assert_ne!(h.framing, ResponseFraming::UntilClose);
    }
    let close = named("connection")
        .iter()
        .flat_map(|v| v.split(|b| *b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
    // HTTP/1.0 only: a later `Connection: keep-alive` turns it back on.
    if head.starts_with(b"HTTP/1.1") {
        assert!(
            !(close && h.keep_alive),
            "kept alive after Connection: close"
        );
        assert!(
            !(te_not_chunked && h.keep_alive),
            "kept alive after a transfer-encoding not ending in chunked"
        );
    }
    if let Some(ct) = named("content-type").last() {
        let ct = ct.trim_ascii_start().to_ascii_lowercase();
        assert_eq!(h.content_type_sse, ct.starts_with(b"text/event-stream"));
        assert_eq!(h.content_type_json, ct.starts_with(b"application/json"));
    } else {
        assert!(!h.content_type_sse && !h.content_type_json);
    }
    for k in kvroute_fuzz::splits_from(head, 4) {
        assert!(
            matches!(
                parse_response_head(&buf[..k], max_head, head_request),
                Ok(None)
            ),
            "prefix of {k} bytes of an accepted head: {}",
            show(head)
        );
    }
}

fn summary(r: &Result<Option<ResponseHead>, &'static str>) -> String {
    match r {
        Ok(Some(h)) => format!(
            "{} {} {:?} {:?} {} {} {}",
            h.len,
            h.status,
            h.headers,
            h.framing,
            h.keep_alive,
            h.content_type_sse,
            h.content_type_json
        ),
        other => format!("{other:?}"),
    }
}

/// A response head built from parts, serialized, maybe damaged.
struct Case {
    bytes: Vec<u8>,
    max_head: usize,
    head_request: bool,
}

impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (max_head {}, HEAD {})",
            show(&self.bytes),
            self.max_head,
            self.head_request
        )
    }
}

const HEADERS: &[(&str, &[&str])] = &[
    (
        "Content-Length",
        &[
            "0",
            "3",
            "5",
            " 5 ",
            "+5",
            "5, 5",
            "-1",
            "x",
            "18446744073709551615",
        ],
    ),
    (
        "Transfer-Encoding",
        &[
            "chunked",
            "gzip, chunked",
            "chunked, gzip",
            "gzip",
            "Chunked ",
            "",
        ],
    ),
    (
        "Connection",
        &["close", "keep-alive", "Keep-Alive, close", "upgrade"],
    ),
    (
        "Content-Type",
        &[
            "text/event-stream",
            "application/json; charset=utf-8",
            "TEXT/EVENT-STREAM",
            "text/plain",
        ],
    ),
    ("X-Request-Id", &["1", ""]),
];

impl TypeGenerator for Case {
    fn generate<D: Driver>(d: &mut D) -> Option<Self> {
        let status = *gen::pick(
            d,
            &[200u16, 200, 200, 101, 100, 204, 304, 404, 500, 503, 999],
        )?;
        let version = match gen::below(d, 12)? {
            0 => "HTTP/2",
            1 => "HTTP/1.1 ",
            2..=4 => "HTTP/1.0",
            _ => "HTTP/1.1",
        };
        let mut bytes = format!(
            "{version} {status} {}\r\n",
            kvroute::http::reason_phrase(status)
        )
        .into_bytes();
        for _ in 0..gen::below(d, 7)? {
            let (name, values) = gen::pick(d, HEADERS)?;
            let name = if gen::one_in(d, 3)? {
                name.to_ascii_lowercase()
            } else {
                name.to_string()
            };
            let value = if gen::one_in(d, 8)? {
                gen::any_bytes(d, 12)?
            } else {
                gen::pick(d, values)?.as_bytes().to_vec()
            };
            bytes.extend_from_slice(name.as_bytes());
            bytes.extend_from_slice(b": ");
            bytes.extend_from_slice(&value);
            bytes.extend_from_slice(match gen::below(d, 24)? {
                0 => b"\n",
                1 => b"\r\n\tfold\r\n",
                _ => b"\r\n",
            });
        }
        bytes.extend_from_slice(b"\r\n");
        let head_len = bytes.len();
        if gen::one_in(d, 2)? {
            bytes.extend(gen::any_bytes(d, 16)?);
        }
        if gen::one_in(d, 6)? {
            gen::mutate(d, &mut bytes)?;
        }
        let max_head = match gen::below(d, 8)? {
            0 => head_len.saturating_sub(1),
            1 => head_len,
            _ => 64 * 1024,
        };
        Some(Case {
            bytes,
            max_head,
            head_request: gen::one_in(d, 6)?,
        })
    }
}
