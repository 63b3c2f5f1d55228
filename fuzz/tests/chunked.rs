//! `ChunkedDecoder`: any bytes, in any split, give the same answer as when fed
//! whole (same decoded bytes, same end or error, same count of bytes that
//! belong to the body), decoding and only tracking agree, and it never panics;
//! a well-formed message decodes to exactly its chunks' data and ends where it
//! ends, whatever follows it (a pipelined request).

use bolero::generator::TypeGenerator;
use kvroute::http::{ChunkError, ChunkedDecoder};
use kvroute_fuzz::gen::{self, Driver};
use kvroute_fuzz::{show, Tally};

const NAME: &str = "chunked";

#[test]
fn chunked() {
    kvroute_fuzz::expect_corpus(&kvroute_fuzz::tests_target_dir(NAME));
    bolero::check!(name = NAME).for_each(|body: &[u8]| {
        let _ = check(body, &kvroute_fuzz::splits_from(body, 6), None);
    });
}

#[test]
fn chunked_generated() {
    let dir = kvroute_fuzz::tests_target_dir(NAME);
    let tally = Tally::new(&["whole message", "ended", "incomplete", "refused"]);
    bolero::check!(name = "chunked_generated")
        .with_type::<Case>()
        .for_each(|case: &Case| {
            kvroute_fuzz::keep_on_failure(&dir, &case.bytes);
            let expect = case.well_formed.then_some((&case.data[..], case.body_len));
            let outcome = check(&case.bytes, &case.cuts, expect);
            tally.add(if case.well_formed { 0 } else { outcome });
        });
    tally.report("chunked_generated");
}

/// What feeding a body gives: the decoded bytes, then the bytes consumed and
/// whether the body ended, or the error.
type Decoded = (Vec<u8>, Result<(usize, bool), ChunkError>);

/// Feeds `pieces` in order, stopping at the first error or the body's end.
fn feed(pieces: &[&[u8]], decode: bool) -> Decoded {
    let mut d = ChunkedDecoder::new();
    let mut out = Vec::new();
    let mut used = 0;
    for p in pieces {
        let r = d.feed(p, decode.then_some(&mut out));
        match r {
            Err(e) => return (out, Err(e)),
            Ok(n) => {
                assert!(n <= p.len());
                used += n;
                if d.is_done() {
                    // Past its end the body takes nothing more.
                    assert_eq!(d.feed(b"0\r\n\r\n", None), Ok(0));
                    return (out, Ok((used, true)));
                }
                assert_eq!(n, p.len(), "stopped inside a piece before the end");
            }
        }
    }
    (out, Ok((used, false)))
}

/// Returns the outcome: 1 ended, 2 incomplete, 3 refused.
fn check(body: &[u8], cuts: &[usize], expect: Option<(&[u8], usize)>) -> usize {
    let whole = feed(&[body], true);
    let (out, res) = &whole;
    assert!(out.len() <= body.len());
    let split = feed(&kvroute_fuzz::pieces(body, cuts), true);
    assert_eq!(split, whole, "split at {cuts:?} differs: {}", show(body));
    let bytes: Vec<&[u8]> = body.chunks(1).collect();
    assert_eq!(
        feed(&bytes, true),
        whole,
        "byte by byte differs: {}",
        show(body)
    );
    let tracked = feed(&kvroute_fuzz::pieces(body, cuts), false);
    assert_eq!(
        tracked.1,
        whole.1,
        "tracking differs from decoding: {}",
        show(body)
    );
    assert!(tracked.0.is_empty());
    if let Some((data, len)) = expect {
        assert_eq!(
            res,
            &Ok((len, true)),
            "well-formed message not decoded: {}",
            show(body)
        );
        assert_eq!(out, data, "decoded data differs: {}", show(body));
    }
    match res {
        Ok((_, true)) => 1,
        Ok((_, false)) => 2,
        Err(_) => 3,
    }
}

/// A chunked body built from chunks, serialized, maybe damaged, and where to cut it.
struct Case {
    bytes: Vec<u8>,
    cuts: Vec<usize>,
    /// The chunks' data, concatenated.
    data: Vec<u8>,
    /// Bytes of the body proper (after it: what follows on the connection).
    body_len: usize,
    well_formed: bool,
}

impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} cut at {:?} (well-formed {}, body {} bytes)",
            show(&self.bytes),
            self.cuts,
            self.well_formed,
            self.body_len
        )
    }
}

const EXTENSIONS: &[&str] = &[
    "",
    ";a=b",
    ";name=\"quoted;\\\"\"",
    " ;x",
    "\t;y",
    ";",
    "; a = b ",
];
/// Size lines no decoder may accept: a prefix, a sign, 16 digits (over 2^60),
/// a bare LF, junk.
const BAD_SIZES: &[&str] = &[
    "0x5",
    "+5",
    "-1",
    "ffffffffffffffff",
    "10000000000000000",
    "0000000000000005",
    "5\n",
    "",
    "g",
    " 5",
];

impl TypeGenerator for Case {
    fn generate<D: Driver>(d: &mut D) -> Option<Self> {
        let mut well_formed = true;
        let mut bytes = Vec::new();
        let mut data = Vec::new();
        for _ in 0..gen::below(d, 5)? {
            let chunk = if gen::one_in(d, 8)? {
                // Data that looks like framing.
                b"0\r\n\r\n".repeat(1 + gen::below(d, 3)?)
            } else {
                let mut c = gen::any_bytes(d, 40)?;
                if c.is_empty() {
                    c.push(b'x'); // a zero size would end the body
                }
                c
            };
            let mut size = match gen::below(d, 3)? {
                0 => format!("{:X}", chunk.len()),
                1 => format!("{:0w$x}", chunk.len(), w = 1 + gen::below(d, 15)?),
                _ => format!("{:x}", chunk.len()),
            };
            if gen::one_in(d, 12)? {
                well_formed = false;
                size = gen::pick(d, BAD_SIZES)?.to_string();
            } else if gen::one_in(d, 12)? {
                // Declares more or less than it carries.
                well_formed = false;
                size = format!("{:x}", chunk.len() + 1 + gen::below(d, 3)?);
            }
            bytes.extend_from_slice(size.as_bytes());
            bytes.extend_from_slice(gen::pick(d, EXTENSIONS)?.as_bytes());
            bytes.extend_from_slice(b"\r\n");
            bytes.extend_from_slice(&chunk);
            data.extend_from_slice(&chunk);
            bytes.extend_from_slice(if gen::one_in(d, 16)? {
                well_formed = false;
                gen::pick(d, &[&b"\n"[..], b"", b"\r", b"xx"])?
            } else {
                b"\r\n"
            });
        }
        bytes.extend_from_slice(gen::pick(d, &["0", "000", "0000000000"])?.as_bytes());
        bytes.extend_from_slice(gen::pick(d, EXTENSIONS)?.as_bytes());
        bytes.extend_from_slice(b"\r\n");
        for _ in 0..gen::below(d, 3)? {
            bytes.extend_from_slice(
                gen::pick(d, &["X-Trailer: 1", "Checksum: abc", "X: a: b"])?.as_bytes(),
            );
            bytes.extend_from_slice(b"\r\n");
        }
        bytes.extend_from_slice(b"\r\n");
        let body_len = bytes.len();
        match gen::below(d, 3)? {
            0 => bytes.extend_from_slice(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"),
            1 => bytes.extend(gen::any_bytes(d, 8)?),
            _ => {}
        }
        if gen::one_in(d, 5)? {
            well_formed = false;
            gen::mutate(d, &mut bytes)?;
        }
        let cuts = gen::cuts(d, bytes.len(), 6)?;
        Some(Case {
            bytes,
            cuts,
            data,
            body_len,
            well_formed,
        })
    }
}
