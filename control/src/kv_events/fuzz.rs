//! Fuzz target of `decode_batch` (bolero; see fuzz/src/lib.rs for the layout):
//! any payload gives Ok or Err, never a panic; a batch is one msgpack value, so
//! bytes after it change nothing and a cut-short one is refused; a well-formed
//! batch, in either encoding (tagged arrays or `type` maps, at both levels),
//! decodes to exactly the events it was built from, with the undecodable ones
//! counted.

use std::path::Path;

use bolero::generator::TypeGenerator;
use kvroute_fuzz::gen::{self, Driver};
use kvroute_fuzz::show;
use rmpv::Value;

use super::{decode_batch, fold_digest, KvEvent};

const NAME: &str = "decode_batch";

fn dir() -> std::path::PathBuf {
    kvroute_fuzz::target_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src/kv_events"),
        NAME,
    )
}

#[test]
fn decode_batch_bytes() {
    kvroute_fuzz::expect_corpus(&dir());
    bolero::check!(name = NAME).for_each(|payload: &[u8]| check(payload, None));
}

#[test]
fn decode_batch_generated() {
    let dir = dir();
    bolero::check!(name = "decode_batch_generated")
        .with_type::<Case>()
        .for_each(|case: &Case| {
            kvroute_fuzz::keep_on_failure(&dir, &case.bytes);
            check(&case.bytes, case.expect.as_ref());
        });
}

fn check(payload: &[u8], expect: Option<&Expect>) {
    let r = decode_batch(payload);
    let Ok((batch, bad)) = &r else {
        assert!(
            expect.is_none(),
            "well-formed batch refused ({r:?}): {}",
            show(payload)
        );
        return;
    };
    // One value: what follows it is not read.
    let end = {
        let mut rd = payload;
        rmpv::decode::read_value(&mut rd).expect("decoded, so one value");
        payload.len() - rd.len()
    };
    let mut more = payload[..end].to_vec();
    more.extend_from_slice(&[0x93, 0xc0, 0x90, 0xc0]);
    // By the bits of ts: a NaN one is still the same batch.
    let key = |b: &super::EventBatch, bad: u32| (b.ts.to_bits(), b.events.clone(), b.dp_rank, bad);
    let (again, again_bad) = decode_batch(&more).expect("the same batch with bytes after it");
    assert_eq!(key(&again, again_bad), key(batch, *bad));
    for k in kvroute_fuzz::splits_from(&payload[..end], 3) {
        assert!(
            decode_batch(&payload[..k]).is_err(),
            "a batch cut to {k} bytes decoded"
        );
    }
    if let Some(x) = expect {
        assert_eq!(batch.events, x.events, "{}", show(payload));
        assert_eq!(*bad, x.bad, "undecodable count");
        assert_eq!(batch.ts.to_bits(), x.ts.to_bits(), "ts");
        assert_eq!(batch.dp_rank, x.rank, "rank");
    }
}

#[derive(Debug)]
struct Expect {
    ts: f64,
    events: Vec<KvEvent>,
    bad: u32,
    rank: Option<u32>,
}

struct Case {
    bytes: Vec<u8>,
    /// Set unless the bytes were damaged after encoding.
    expect: Option<Expect>,
}

impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (well-formed {})",
            show(&self.bytes),
            self.expect.is_some()
        )
    }
}

/// A block hash as engines publish it, and what it folds to (`None`: undecodable).
fn hash<D: Driver>(d: &mut D) -> Option<(Value, Option<u64>)> {
    Some(match gen::below(d, 8)? {
        0..=3 => {
            let h = gen::u64_any(d)? >> gen::below(d, 64)?;
            (Value::from(h), Some(h))
        }
        4 => {
            let h = -1 - (gen::u64_any(d)? >> 1) as i64;
            (Value::from(h), Some(h as u64))
        }
        5 | 6 => {
            // A digest (vLLM without int hashes): its last 8 bytes, big-endian.
            let b = gen::any_bytes(d, 40)?;
            let h = fold_digest(&b);
            (Value::Binary(b), Some(h))
        }
        _ => (Value::from("not a hash"), None),
    })
}

/// A list of hashes and what it decodes to.
fn hash_list<D: Driver>(d: &mut D) -> Option<(Option<Value>, Option<Vec<u64>>)> {
    Some(match gen::below(d, 10)? {
        0 => (None, Some(Vec::new())),
        1 => (Some(Value::Nil), Some(Vec::new())),
        2 => (Some(Value::from(7)), None),
        _ => {
            let mut vals = Vec::new();
            let mut out = Some(Vec::new());
            for _ in 0..gen::below(d, 6)? {
                let (v, h) = hash(d)?;
                vals.push(v);
                out = out.zip(h).map(|(mut o, h)| {
                    o.push(h);
                    o
                });
            }
            (Some(Value::Array(vals)), out)
        }
    })
}

/// An optional small integer as the decoder reads it (`opt_u32`).
fn opt_u32<D: Driver>(d: &mut D) -> Option<(Option<Value>, Option<u32>)> {
    Some(match gen::below(d, 6)? {
        0 => (None, None),
        1 => (Some(Value::Nil), None),
        2 => (Some(Value::from(u64::from(u32::MAX) + 1)), None),
        3 => (Some(Value::from(-1)), None),
        _ => {
            let v = gen::below(d, 1 << 16)? as u32;
            (Some(Value::from(v)), Some(v))
        }
    })
}

/// One event in either encoding, and what it decodes to (`None`: undecodable).
fn event<D: Driver>(d: &mut D) -> Option<(Value, Option<KvEvent>)> {
    if gen::one_in(d, 24)? {
        return Some((Value::from("neither array nor map"), None));
    }
    let map = gen::one_in(d, 2)?;
    let tag = *gen::pick(
        d,
        &[
            "BlockStored",
            "BlockStored",
            "BlockRemoved",
            "AllBlocksCleared",
            "SomethingNew",
        ],
    )?;
    // What each field decodes to; absent fields decode as these defaults.
    let (mut hashes, mut parent, mut block_size) = (Some(Vec::new()), Some(None), None);
    // Fields by name (map form) and by position from index 1 (array form).
    let mut fields: Vec<(&str, Option<Value>)> = Vec::new();
    match tag {
        "BlockStored" => {
            let (hs, h) = hash_list(d)?;
            hashes = h;
            let parent_v = match gen::below(d, 3)? {
                0 => None,
                1 => Some(Value::Nil),
                _ => {
                    let (v, h) = hash(d)?;
                    parent = h.map(Some);
                    Some(v)
                }
            };
            let (bs_v, bs) = opt_u32(d)?;
            block_size = bs;
            let tokens = Value::Array(
                (0..gen::below(d, 20)?)
                    .map(|i| Value::from(i as u32))
                    .collect(),
            );
            fields.push(("block_hashes", hs));
            fields.push(("parent_block_hash", parent_v));
            fields.push(("token_ids", Some(tokens)));
            fields.push(("block_size", bs_v));
            fields.push(("lora_id", Some(Value::Nil)));
            fields.push(("medium", Some(Value::from("GPU"))));
        }
        "BlockRemoved" => {
            let (hs, h) = hash_list(d)?;
            hashes = h;
            fields.push(("block_hashes", hs));
            fields.push(("medium", Some(Value::from("GPU"))));
        }
        _ => {}
    }
    if gen::one_in(d, 4)? {
        fields.push(("some_future_field", Some(Value::from(3))));
    }
    let mut tagged = true;
    let v = if map {
        let mut m: Vec<(Value, Value)> = fields
            .into_iter()
            .filter_map(|(k, v)| Some((Value::from(k), v?)))
            .collect();
        let at = gen::below(d, m.len() + 1)?;
        m.insert(at, (Value::from("type"), Value::from(tag)));
        if gen::one_in(d, 16)? {
            m.retain(|(k, _)| k.as_str() != Some("type"));
            tagged = false;
        }
        Value::Map(m)
    } else {
        // Positional: an absent field before a present one is nil.
        let mut a = vec![Value::from(tag)];
        a.extend(fields.into_iter().map(|(_, v)| v.unwrap_or(Value::Nil)));
        a.truncate(1 + gen::below(d, a.len())?);
        // Fields cut off read as absent.
        if a.len() <= 1 {
            hashes = Some(Vec::new());
        }
        if a.len() <= 2 {
            parent = Some(None);
        }
        if a.len() <= 4 {
            block_size = None;
        }
        if gen::one_in(d, 16)? {
            a[0] = Value::from(5);
            tagged = false;
        }
        Value::Array(a)
    };
    let expect = match tag {
        _ if !tagged => None,
        "BlockStored" => hashes
            .zip(parent)
            .map(|(block_hashes, parent)| KvEvent::Stored {
                block_hashes,
                parent,
                block_size,
            }),
        "BlockRemoved" => hashes.map(|block_hashes| KvEvent::Removed { block_hashes }),
        "AllBlocksCleared" => Some(KvEvent::AllCleared),
        other => Some(KvEvent::Other(other.to_string())),
    };
    Some((v, expect))
}

impl TypeGenerator for Case {
    fn generate<D: Driver>(d: &mut D) -> Option<Self> {
        let (ts_v, ts) = match gen::below(d, 5)? {
            0 => (None, 0.0),
            1 => {
                let t = gen::below(d, 1 << 20)? as u64;
                (Some(Value::from(t)), t as f64)
            }
            2 => (Some(Value::F32(1.5)), 1.5),
            3 => (Some(Value::from("soon")), 0.0),
            _ => {
                let t = gen::below(d, 1 << 30)? as f64 / 1024.0;
                (Some(Value::F64(t)), t)
            }
        };
        let mut events = Vec::new();
        let mut expect_events = Vec::new();
        let mut bad = 0;
        for _ in 0..gen::below(d, 6)? {
            let (v, e) = event(d)?;
            events.push(v);
            match e {
                Some(e) => expect_events.push(e),
                None => bad += 1,
            }
        }
        let (rank_v, rank) = opt_u32(d)?;
        let batch = if gen::one_in(d, 2)? {
            // An array batch's absent ts is nil, which reads as 0 too.
            let mut a = vec![ts_v.unwrap_or(Value::Nil), Value::Array(events)];
            let rank = match rank_v {
                Some(r) => {
                    a.push(r);
                    rank
                }
                None => None,
            };
            if gen::one_in(d, 4)? {
                a.push(Value::from("trailing"));
            }
            (Value::Array(a), rank)
        } else {
            let mut m = vec![(Value::from("events"), Value::Array(events))];
            if let Some(t) = ts_v {
                m.push((Value::from("ts"), t));
            }
            if let Some(r) = rank_v {
                let key = *gen::pick(d, &["data_parallel_rank", "dp_rank"])?;
                m.push((Value::from(key), r));
            }
            let n = m.len();
            m.swap(0, gen::below(d, n)?);
            (Value::Map(m), rank)
        };
        let (value, rank) = batch;
        let mut bytes = Vec::new();
        rmpv::encode::write_value(&mut bytes, &value).expect("encoding to a Vec");
        let damaged = gen::one_in(d, 4)?;
        if damaged {
            gen::mutate(d, &mut bytes)?;
        }
        Some(Case {
            bytes,
            expect: (!damaged).then_some(Expect {
                ts,
                events: expect_events,
                bad,
                rank,
            }),
        })
    }
}
