//! `parse_request_head`: any bytes under any limits give Ok or Err, never a
//! panic, and an accepted head is self-consistent and framed as its headers say
//! (RFC 9112 §6.3, the smuggling shapes a proxy must not read differently from
//! the replica behind it):
//! - incomplete (`Ok(None)`) only without a blank line, within the limit, with
//!   no bare LF; every prefix of an accepted head is incomplete;
//! - `TooLarge` only when a limit is exceeded, and exceeding one always gives it;
//!   other errors do not depend on the limits;
//! - the head ends at the first CRLFCRLF and all its ranges lie inside it;
//!   bytes after it (a body, a pipelined request) change nothing;
//! - no bare LF, bare CR or obs-fold is ever accepted;
//! - one transfer-encoding header at most, exactly `chunked`, only in HTTP/1.1
//!   and never with a content-length; all content-lengths agree; HTTP/1.1 has
//!   exactly one host; keep-alive, expect and HEAD follow the headers.

use bolero::generator::TypeGenerator;
use kvroute::http::{find_head_end, parse_request_head, BodyFraming, HeadError, RequestHead};
use kvroute_fuzz::gen::{self, Driver};
use kvroute_fuzz::{show, Tally};

const NAME: &str = "request_head";

/// The limits the raw-bytes check parses under: the proxy's default ones, and
/// small ones so random inputs reach the limit errors too.
const LIMITS: &[(usize, usize)] = &[(32 * 1024, 100), (64, 2)];

#[test]
fn request_head() {
    let dir = kvroute_fuzz::tests_target_dir(NAME);
    kvroute_fuzz::expect_corpus(&dir);
    bolero::check!(name = NAME).for_each(|buf: &[u8]| {
        for &(max_head, max_headers) in LIMITS {
            let _ = check(buf, max_head, max_headers, None);
        }
    });
}

#[test]
fn request_head_generated() {
    let dir = kvroute_fuzz::tests_target_dir(NAME);
    let tally = Tally::new(OUTCOMES);
    bolero::check!(name = "request_head_generated")
        .with_type::<Case>()
        .for_each(|case: &Case| {
            kvroute_fuzz::keep_on_failure(&dir, &case.bytes);
            let r = check(
                &case.bytes,
                case.max_head,
                case.max_headers,
                case.clean.as_ref(),
            );
            tally.add(
                r + if case.clean.is_some() {
                    0
                } else {
                    OUTCOMES.len() / 2
                },
            );
        });
    tally.report("request_head_generated");
}

const OUTCOMES: &[&str] = &[
    "clean accepted",
    "clean incomplete",
    "clean too large",
    "clean refused",
    "damaged accepted",
    "damaged incomplete",
    "damaged too large",
    "damaged refused",
];

/// Checks one parse; returns its outcome: 0 accepted, 1 incomplete, 2 too large, 3 refused.
fn check(buf: &[u8], max_head: usize, max_headers: usize, clean: Option<&Parts>) -> usize {
    let r = parse_request_head(buf, max_head, max_headers);
    let end = find_head_end(buf);
    match &r {
        Ok(None) => {
            assert!(
                end.is_none(),
                "complete head {} reported incomplete",
                show(buf)
            );
            assert!(buf.len() <= max_head, "over the limit but incomplete");
            assert!(!kvroute::http::has_bare_lf(buf), "bare LF waited on");
        }
        Err(HeadError::TooLarge(m)) => {
            assert_eq!(*m, max_head);
            let over = match end {
                None => buf.len() > max_head,
                // More header lines than slots: at least max_headers + 1 of them
                // besides the request line and the blank line.
                Some(e) => e > max_head || line_ends(&buf[..e]) > max_headers + 2,
            };
            assert!(over, "TooLarge within the limits: {}", show(buf));
        }
        Err(e) => {
            // Not about size: the same answer whatever the limits.
            let e2 = parse_request_head(buf, usize::MAX, line_ends(buf) + 1).unwrap_err();
            assert_eq!(e, &e2, "the error depends on the limits: {}", show(buf));
            if let Some(p) = clean {
                // Every part is one httparse accepts: only the framing rules refuse.
                let msg = e.to_string();
                assert!(
                    [
                        "content-length",
                        "transfer-encoding",
                        "transfer-coding",
                        "host",
                        "expectation"
                    ]
                    .iter()
                    .any(|w| msg.contains(w)),
                    "clean head refused ({msg}): {}, parts {p:?}",
                    show(buf)
                );
            }
        }
        Ok(Some(h)) => accepted(buf, h, max_head, max_headers, clean),
    }
    if let (Some(e), Ok(_) | Err(HeadError::Malformed(_) | HeadError::UnsupportedEncoding)) =
        (end, &r)
    {
        // A complete head decides alone: a body or a pipelined request after it
        // changes nothing.
        if e <= max_head {
            let mut more = buf[..e].to_vec();
            more.extend_from_slice(b"POST / HTTP/1.1\r\nHost: y\r\n\r\n");
            let again = parse_request_head(&more, max_head, max_headers);
            assert_eq!(summary(&again), summary(&r), "{}", show(buf));
        }
    }
    match r {
        Ok(Some(_)) => 0,
        Ok(None) => 1,
        Err(HeadError::TooLarge(_)) => 2,
        Err(_) => 3,
    }
}

fn accepted(
    buf: &[u8],
    h: &RequestHead,
    max_head: usize,
    max_headers: usize,
    clean: Option<&Parts>,
) {
    let head = &buf[..h.len];
    assert_eq!(
        Some(h.len),
        find_head_end(buf),
        "head does not end at the first CRLFCRLF"
    );
    assert!(h.len <= max_head && h.headers.len() <= max_headers);
    assert!(h.version <= 1);
    for r in [&h.method, &h.path]
        .into_iter()
        .chain(h.headers.iter().flat_map(|(n, v)| [n, v]))
    {
        assert!(
            r.start <= r.end && r.end <= h.len,
            "range {r:?} outside the head"
        );
    }
    assert_eq!(h.method.start, 0);
    assert!(!h.method.is_empty() && !h.path.is_empty());
    // Line structure: every CR ends a line, every LF follows a CR, and no line
    // continues the one before (obs-fold).
    for (i, &b) in head.iter().enumerate() {
        match b {
            b'\r' => assert_eq!(
                head.get(i + 1),
                Some(&b'\n'),
                "bare CR accepted: {}",
                show(head)
            ),
            b'\n' => {
                assert!(
                    i > 0 && head[i - 1] == b'\r',
                    "bare LF accepted: {}",
                    show(head)
                );
                assert!(
                    !matches!(head.get(i + 1), Some(b' ' | b'\t')),
                    "obs-fold accepted: {}",
                    show(head)
                );
            }
            0 => panic!("NUL accepted: {}", show(head)),
            _ => {}
        }
    }
    let hs: Vec<(&str, &[u8])> = h.header_iter(buf).collect();
    for (n, v) in &hs {
        assert!(
            !n.is_empty() && n.bytes().all(is_tchar),
            "header name {n:?}"
        );
        assert!(
            !v.iter().any(|b| matches!(b, b'\r' | b'\n' | 0)),
            "header value {}",
            show(v)
        );
    }
    let named = |name: &str| -> Vec<&[u8]> {
        hs.iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
            .collect()
    };
    let te = named("transfer-encoding");
    let cl = named("content-length");
    assert!(te.len() <= 1, "several transfer-encoding headers accepted");
    if let Some(v) = te.first() {
        let codings: Vec<&[u8]> = v
            .split(|b| *b == b',')
            .map(<[u8]>::trim_ascii)
            .filter(|c| !c.is_empty())
            .collect();
        assert!(
            codings.len() == 1 && codings[0].eq_ignore_ascii_case(b"chunked"),
            "transfer-encoding {} accepted",
            show(v)
        );
        assert!(
            cl.is_empty(),
            "transfer-encoding and content-length both accepted"
        );
        assert_eq!(h.version, 1, "chunked in HTTP/1.0");
        assert_eq!(h.framing, BodyFraming::Chunked);
    } else {
        assert_ne!(h.framing, BodyFraming::Chunked);
        let lengths: Vec<u64> = cl
            .iter()
            .flat_map(|v| v.split(|b| *b == b','))
            .map(|p| strict_decimal(p.trim_ascii()).expect("a content-length that is not digits"))
            .collect();
        assert!(
            lengths.windows(2).all(|w| w[0] == w[1]),
            "conflicting content-lengths accepted"
        );
        let expect = match lengths.first() {
            None | Some(0) => BodyFraming::None,
            Some(&n) => BodyFraming::Length(n),
        };
        assert_eq!(h.framing, expect);
    }
    if h.version == 1 {
        assert_eq!(named("host").len(), 1, "HTTP/1.1 without exactly one host");
    }
    let expects = named("expect");
    assert!(expects
        .iter()
        .all(|v| v.trim_ascii().eq_ignore_ascii_case(b"100-continue")));
    assert_eq!(
        h.expect_continue,
        !expects.is_empty() && h.version == 1 && h.framing != BodyFraming::None
    );
    let tokens: Vec<&[u8]> = named("connection")
        .into_iter()
        .flat_map(|v| v.split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .collect();
    let close = tokens.iter().any(|t| t.eq_ignore_ascii_case(b"close"));
    let ka = tokens.iter().any(|t| t.eq_ignore_ascii_case(b"keep-alive"));
    if h.version == 1 {
        assert_eq!(h.keep_alive, !close);
    } else {
        // HTTP/1.0 keeps the connection only when asked to.
        assert!(!h.keep_alive || ka);
    }
    assert_eq!(h.is_head, h.method(buf) == "HEAD");

    // The limits: the head fits exactly its own size and header count, and one
    // less of either is too large, never malformed.
    let same = parse_request_head(buf, h.len, h.headers.len());
    assert_eq!(summary(&same), summary(&Ok(Some(h.clone()))));
    assert_eq!(
        parse_request_head(buf, h.len - 1, max_headers).unwrap_err(),
        HeadError::TooLarge(h.len - 1)
    );
    if !h.headers.is_empty() {
        assert_eq!(
            parse_request_head(buf, max_head, h.headers.len() - 1).unwrap_err(),
            HeadError::TooLarge(max_head)
        );
    }
    // Arriving in pieces: every prefix is incomplete, never an error.
    for k in kvroute_fuzz::splits_from(head, 4) {
        assert!(
            matches!(
                parse_request_head(&buf[..k], max_head, max_headers),
                Ok(None)
            ),
            "prefix of {k} bytes of an accepted head: {}",
            show(head)
        );
    }

    if let Some(p) = clean {
        assert_eq!(h.method(buf).as_bytes(), &p.method[..]);
        assert_eq!(h.path(buf).as_bytes(), &p.path[..]);
        assert_eq!(h.version, p.version);
        assert_eq!(hs.len(), p.headers.len());
        for ((n, v), (pn, pv)) in hs.iter().zip(&p.headers) {
            assert_eq!(n.as_bytes(), &pn[..]);
            assert_eq!(v.trim_ascii(), pv.trim_ascii());
        }
    }
}

/// What two parses are compared by (the head has no `PartialEq`).
fn summary(r: &Result<Option<RequestHead>, HeadError>) -> String {
    match r {
        Ok(Some(h)) => format!(
            "{} {:?} {:?} {} {:?} {:?} {} {} {}",
            h.len,
            h.method,
            h.path,
            h.version,
            h.headers,
            h.framing,
            h.keep_alive,
            h.expect_continue,
            h.is_head
        ),
        other => format!("{other:?}"),
    }
}

fn line_ends(head: &[u8]) -> usize {
    head.iter().filter(|b| **b == b'\n').count()
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn strict_decimal(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// A request head built from parts, serialized, maybe damaged.
struct Case {
    bytes: Vec<u8>,
    max_head: usize,
    max_headers: usize,
    /// The parts, when every one of them is one httparse accepts, every line
    /// ends in CRLF and nothing was damaged: then only the framing rules may
    /// refuse the head, and an accepted one must give back exactly these parts.
    clean: Option<Parts>,
}

#[derive(Debug)]
struct Parts {
    method: Vec<u8>,
    path: Vec<u8>,
    version: u8,
    headers: Vec<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (max_head {}, max_headers {}, clean {})",
            show(&self.bytes),
            self.max_head,
            self.max_headers,
            self.clean.is_some()
        )
    }
}

const METHODS: &[&[u8]] = &[
    b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE",
];
/// The headers the proxy reads or treats specially.
const SPECIAL: &[&str] = &[
    "content-length",
    "transfer-encoding",
    "connection",
    "expect",
    "host",
    "upgrade",
    "te",
    "x-forwarded-for",
    "authorization",
];
const TOKEN: &[u8] =
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-.^_`|~";
const PATH: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789/._~-%?=&;:@!$'()*+,";
const VISIBLE: &[u8] =
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \t!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";

fn value_for(name: &str) -> &'static [&'static str] {
    match name {
        "content-length" => &[
            "0",
            "5",
            "12",
            "5, 5",
            "5,5",
            "5, 6",
            "+5",
            "-1",
            "0x5",
            " 7 ",
            "",
            "007",
            "123456789012345678",
            "1234567890123456789",
            "18446744073709551616",
            "5 5",
        ],
        "transfer-encoding" => &[
            "chunked",
            "Chunked",
            "gzip, chunked",
            "chunked, gzip",
            "identity",
            "xchunked",
            " chunked ",
            "chunked,",
            ",chunked",
            "",
            "chunked, chunked",
        ],
        "connection" => &[
            "close",
            "keep-alive",
            "Upgrade, close",
            "keep-alive, close",
            "x-a",
        ],
        "expect" => &["100-continue", "100-Continue", " 100-continue", "nope", ""],
        "host" => &["x", "a:1", "", "[::1]:8080"],
        "upgrade" => &["websocket", "h2c"],
        "te" => &["trailers", "gzip"],
        _ => &["1", "a, b", "Bearer sk-x"],
    }
}

impl TypeGenerator for Case {
    fn generate<D: Driver>(d: &mut D) -> Option<Self> {
        // A third of the cases carry invalid parts, a few each; the others only
        // valid ones, so most reach the framing rules.
        let dirty = gen::one_in(d, 3)?;
        let bad = |d: &mut D| -> Option<bool> { Some(dirty && gen::one_in(d, 4)?) };
        let mut clean = true;
        let method = match gen::below(d, 7)? {
            _ if bad(d)? => {
                clean = false;
                gen::any_bytes(d, 8)?
            }
            0..=5 => gen::pick(d, METHODS)?.to_vec(),
            _ => gen::from_alphabet(d, b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", 1, 8)?,
        };
        let path = match gen::below(d, 7)? {
            _ if bad(d)? => {
                clean = false;
                gen::any_bytes(d, 12)?
            }
            0..=3 => gen::pick(
                d,
                &[
                    &b"/"[..],
                    b"/v1/completions",
                    b"/v1/chat/completions",
                    b"*",
                    b"/v1/models/a%2Fb?x=1",
                ],
            )?
            .to_vec(),
            _ => {
                let mut p = b"/".to_vec();
                p.extend(gen::from_alphabet(d, PATH, 0, 24)?);
                p
            }
        };
        let (version, vtext): (u8, &[u8]) = match gen::below(d, 4)? {
            _ if bad(d)? => {
                clean = false;
                (
                    9,
                    gen::pick(
                        d,
                        &[
                            &b"HTTP/2.0"[..],
                            b"HTTP/1.2",
                            b"http/1.1",
                            b"HTTP/1",
                            b"HTTP/1.1 ",
                            b"",
                        ],
                    )?,
                )
            }
            0..=2 => (1, b"HTTP/1.1"),
            _ => (0, b"HTTP/1.0"),
        };
        let mut headers = Vec::new();
        for _ in 0..gen::below(d, 10)? {
            let name = match gen::below(d, 7)? {
                _ if bad(d)? => {
                    clean = false;
                    gen::any_bytes(d, 8)?
                }
                0..=4 => {
                    let n = *gen::pick(d, SPECIAL)?;
                    match gen::below(d, 3)? {
                        0 => n.to_ascii_uppercase(),
                        1 => title_case(n),
                        _ => n.to_string(),
                    }
                    .into_bytes()
                }
                _ => gen::from_alphabet(d, TOKEN, 1, 12)?,
            };
            let lname = String::from_utf8_lossy(&name).to_ascii_lowercase();
            let value = match gen::below(d, 7)? {
                _ if bad(d)? => {
                    clean = false;
                    gen::any_bytes(d, 16)?
                }
                0..=4 => gen::pick(d, value_for(&lname))?.as_bytes().to_vec(),
                _ => gen::from_alphabet(d, VISIBLE, 0, 16)?,
            };
            headers.push((name, value));
            if gen::one_in(d, 8)? {
                // The same header again, as smuggling attempts send it.
                let dup = headers[gen::below(d, headers.len())?].clone();
                headers.push(dup);
            }
        }
        // HTTP/1.1 needs its one host: most heads get it, so they pass that rule.
        let has_host = headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(b"host"));
        if !has_host && gen::below(d, 4)? > 0 {
            let at = gen::below(d, headers.len() + 1)?;
            headers.insert(at, (b"Host".to_vec(), b"kvroute".to_vec()));
        }
        let eol = |d: &mut D, clean: &mut bool| -> Option<&'static [u8]> {
            if !bad(d)? {
                return Some(b"\r\n");
            }
            Some(match gen::below(d, 3)? {
                0 => {
                    *clean = false;
                    b"\n"
                }
                1 => {
                    *clean = false;
                    b"\r"
                }
                _ => {
                    *clean = false;
                    // obs-fold: the next line continues this one.
                    b"\r\n \tfolded\r\n"
                }
            })
        };
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&method);
        bytes.push(b' ');
        bytes.extend_from_slice(&path);
        bytes.push(b' ');
        bytes.extend_from_slice(vtext);
        bytes.extend_from_slice(eol(d, &mut clean)?);
        for (n, v) in &headers {
            bytes.extend_from_slice(n);
            let sep: &[u8] = match gen::below(d, 8)? {
                _ if bad(d)? => {
                    clean = false;
                    b" : "
                }
                0 => b":",
                _ => b": ",
            };
            bytes.extend_from_slice(sep);
            bytes.extend_from_slice(v);
            bytes.extend_from_slice(eol(d, &mut clean)?);
        }
        bytes.extend_from_slice(eol(d, &mut clean)?);
        let head_len = bytes.len();
        match gen::below(d, 4)? {
            0 => bytes.extend_from_slice(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"),
            1 => bytes.extend(gen::any_bytes(d, 16)?),
            _ => {}
        }
        if bad(d)? {
            clean = false;
            gen::mutate(d, &mut bytes)?;
        }
        let n = headers.len();
        let max_head = match gen::below(d, 12)? {
            0 => head_len.saturating_sub(1),
            1 => head_len,
            2 => 1 + gen::below(d, 256)?,
            _ => 32 * 1024,
        };
        let max_headers = match gen::below(d, 12)? {
            0 => n.saturating_sub(1),
            1 => n,
            2 => gen::below(d, 16)?,
            _ => 100,
        };
        Some(Case {
            bytes,
            max_head,
            max_headers,
            clean: clean.then_some(Parts {
                method,
                path,
                version,
                headers,
            }),
        })
    }
}

fn title_case(name: &str) -> String {
    name.split('-')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join("-")
}
