//! vLLM/SGLang KV-cache events over ZMQ: decoding and the per-replica subscriber.
//!
//! vLLM's publisher sends multipart `[topic, seq (u64 BE), payload]`, the payload a
//! msgpack `EventBatch` `[ts, events, data_parallel_rank]`. Events were tagged
//! arrays (`["BlockStored", hashes, parent, token_ids, block_size, lora_id,
//! medium]`, vLLM 0.20 and before) and became maps tagged by `type` (0.24 on,
//! inside the same array batch); a router that only knew one form stopped
//! learning when engines upgraded. Both forms are read at both levels, unknown
//! trailing fields and unknown event types are ignored, and anything
//! undecodable is counted rather than fatal. `tests/tests/e2e/vllm_kv_events.rs`
//! checks all of it against vLLM's own publisher.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rmpv::Value;
use tokio::sync::{mpsc, watch};
use zeromq::{Socket, SocketRecv};

use crate::error::{ControlError, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvEvent {
    Stored {
        block_hashes: Vec<u64>,
        parent: Option<u64>,
        block_size: Option<u32>,
    },
    Removed {
        block_hashes: Vec<u64>,
    },
    AllCleared,
    /// A type this daemon does not know; counted, otherwise ignored.
    Other(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct EventBatch {
    pub ts: f64,
    pub events: Vec<KvEvent>,
    pub dp_rank: Option<u32>,
}

fn dec(msg: impl Into<String>) -> ControlError {
    ControlError::Decode(msg.into())
}

fn map_get<'a>(m: &'a [(Value, Value)], key: &str) -> Option<&'a Value> {
    m.iter()
        .find(|(k, _)| k.as_str() == Some(key))
        .map(|(_, v)| v)
}

/// Block hashes are u64, as vLLM itself reduces them: with
/// `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES` (its default) it publishes
/// `int.from_bytes(digest, "big") & (2**64 - 1)`, the digest's last 8 bytes
/// read big-endian (`maybe_convert_block_hash`); without it, the digest itself.
/// A byte-string hash is folded by the same rule, so one block has one value
/// whichever way the engine is set. Ints are taken as they are (a negative i64,
/// from engines that published Python's `hash()`, keeps its bits).
fn hash(v: &Value) -> Result<u64> {
    match v {
        Value::Integer(i) => i
            .as_u64()
            .or_else(|| i.as_i64().map(|x| x as u64))
            .ok_or_else(|| dec("block hash out of range")),
        Value::Binary(b) => Ok(fold_digest(b)),
        other => Err(dec(format!("block hash of unexpected type: {other}"))),
    }
}

/// `int.from_bytes(digest, "big") & (2**64 - 1)`: the last 8 bytes, big-endian.
pub fn fold_digest(digest: &[u8]) -> u64 {
    let tail = &digest[digest.len().saturating_sub(8)..];
    tail.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
}

fn hashes(v: Option<&Value>) -> Result<Vec<u64>> {
    match v {
        Some(Value::Array(a)) => a.iter().map(hash).collect(),
        Some(Value::Nil) | None => Ok(Vec::new()),
        Some(other) => Err(dec(format!("block_hashes is not a list: {other}"))),
    }
}

fn opt_hash(v: Option<&Value>) -> Result<Option<u64>> {
    match v {
        None | Some(Value::Nil) => Ok(None),
        Some(v) => hash(v).map(Some),
    }
}

fn opt_u32(v: Option<&Value>) -> Option<u32> {
    v.and_then(Value::as_u64)
        .and_then(|x| u32::try_from(x).ok())
}

pub fn decode_event(v: &Value) -> Result<KvEvent> {
    match v {
        Value::Array(a) => {
            let tag = a
                .first()
                .and_then(Value::as_str)
                .ok_or_else(|| dec("array event without a string tag"))?;
            Ok(match tag {
                // Positional: [tag, block_hashes, parent_block_hash, token_ids, block_size, ...]
                "BlockStored" => KvEvent::Stored {
                    block_hashes: hashes(a.get(1))?,
                    parent: opt_hash(a.get(2))?,
                    block_size: opt_u32(a.get(4)),
                },
                "BlockRemoved" => KvEvent::Removed {
                    block_hashes: hashes(a.get(1))?,
                },
                "AllBlocksCleared" => KvEvent::AllCleared,
                other => KvEvent::Other(other.to_string()),
            })
        }
        Value::Map(m) => {
            let tag = map_get(m, "type")
                .and_then(Value::as_str)
                .ok_or_else(|| dec("map event without a string `type`"))?;
            Ok(match tag {
                "BlockStored" => KvEvent::Stored {
                    block_hashes: hashes(map_get(m, "block_hashes"))?,
                    parent: opt_hash(map_get(m, "parent_block_hash"))?,
                    block_size: opt_u32(map_get(m, "block_size")),
                },
                "BlockRemoved" => KvEvent::Removed {
                    block_hashes: hashes(map_get(m, "block_hashes"))?,
                },
                "AllBlocksCleared" => KvEvent::AllCleared,
                other => KvEvent::Other(other.to_string()),
            })
        }
        other => Err(dec(format!("event is neither array nor map: {other}"))),
    }
}

/// Nesting a batch may have, counted as rmpv does (a container and each value
/// in it take one level each): a batch of events with their hash lists needs
/// under ten. rmpv's default (1024) recurses deep enough to overflow a
/// thread's stack on a payload of nested array headers.
const MAX_DEPTH: usize = 32;

/// Decodes a batch. Events that fail alone are dropped and counted in the
/// second value; only a batch whose frame is unreadable is an error.
pub fn decode_batch(payload: &[u8]) -> Result<(EventBatch, u32)> {
    let mut rd = payload;
    let v = rmpv::decode::read_value_with_max_depth(&mut rd, MAX_DEPTH)
        .map_err(|e| dec(format!("msgpack: {e}")))?;
    let (ts, events, rank) = match &v {
        Value::Array(a) => (a.first(), a.get(1), a.get(2)),
        Value::Map(m) => (
            map_get(m, "ts"),
            map_get(m, "events"),
            map_get(m, "data_parallel_rank").or_else(|| map_get(m, "dp_rank")),
        ),
        other => return Err(dec(format!("batch is neither array nor map: {other}"))),
    };
    let ts = ts.and_then(Value::as_f64).unwrap_or(0.0);
    let list = match events {
        Some(Value::Array(l)) => l,
        _ => return Err(dec("batch without an events list")),
    };
    let mut bad = 0;
    let mut out = Vec::with_capacity(list.len());
    for e in list {
        match decode_event(e) {
            Ok(ev) => out.push(ev),
            Err(_) => bad += 1,
        }
    }
    Ok((
        EventBatch {
            ts,
            events: out,
            dp_rank: opt_u32(rank),
        },
        bad,
    ))
}

/// Counters for one replica's event stream, read by `/metrics`.
#[derive(Debug, Default)]
pub struct KvStats {
    pub batches: AtomicU64,
    pub stored_blocks: AtomicU64,
    pub removed_blocks: AtomicU64,
    pub cleared: AtomicU64,
    pub other_events: AtomicU64,
    pub undecodable: AtomicU64,
    /// Messages missed, from sequence-number gaps.
    pub gap_messages: AtomicU64,
    /// Missed messages fetched again from the replay socket and applied.
    pub replayed_messages: AtomicU64,
    /// Missed messages the replay socket did not give back (none configured,
    /// unreachable, or past its buffer).
    pub unrecovered_messages: AtomicU64,
    /// The sequence went backwards: the publisher restarted.
    pub resets: AtomicU64,
    pub connected: AtomicU64,
    pub budget: std::sync::Mutex<BudgetEstimator>,
}

impl KvStats {
    /// The calibrated block budget, when evictions have shown it.
    pub fn effective_blocks(&self) -> Option<u64> {
        self.budget
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .estimate()
    }
}

/// How many blocks the engine really keeps cached: blocks stored minus blocks
/// removed is what it holds, and when it starts removing it is full, so the
/// count at each removal is its effective capacity for cached prefixes. That is
/// often well under `num_gpu_blocks`, since running sequences hold blocks too;
/// a prefix index that assumed the whole capacity would credit the replica with
/// prefixes it already evicted.
#[derive(Debug, Default, Clone)]
pub struct BudgetEstimator {
    resident: u64,
    estimate: Option<f64>,
}

impl BudgetEstimator {
    pub fn stored(&mut self, n: u64) {
        self.resident += n;
    }

    pub fn removed(&mut self, n: u64) {
        // Blocks stored before we subscribed are removed without our having seen
        // them stored: the count is a floor, never negative.
        let at_full = self.resident;
        self.resident = self.resident.saturating_sub(n);
        if at_full == 0 {
            return;
        }
        // Smoothed, so one burst of evictions under a long prompt does not
        // swing the budget.
        let x = at_full as f64;
        self.estimate = Some(match self.estimate {
            None => x,
            Some(e) => 0.8 * e + 0.2 * x,
        });
    }

    pub fn cleared(&mut self) {
        self.resident = 0;
    }

    pub fn estimate(&self) -> Option<u64> {
        self.estimate.map(|e| e.round() as u64).filter(|e| *e > 0)
    }
}

/// Sequence tracking of one rank's stream.
#[derive(Debug, Default, Clone, Copy)]
pub struct SeqTracker {
    last: Option<u64>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum SeqCheck {
    First,
    InOrder,
    Gap(u64),
    /// The publisher started over: what it told before is void.
    Reset,
}

impl SeqTracker {
    pub fn check(&mut self, seq: u64) -> SeqCheck {
        let r = match self.last {
            None => SeqCheck::First,
            Some(l) if seq == l.wrapping_add(1) => SeqCheck::InOrder,
            Some(l) if seq > l => SeqCheck::Gap(seq - l - 1),
            Some(_) => SeqCheck::Reset,
        };
        self.last = Some(seq);
        r
    }
}

/// Why a replica's cache must be forgotten.
#[derive(Debug, Clone)]
pub struct ClearNotice {
    pub url: String,
    pub reason: &'static str,
}

/// One data-parallel rank's event stream.
#[derive(Debug, Clone)]
pub struct Feed {
    /// The replica's URL, for labels and clear notices.
    pub url: String,
    /// Where the rank publishes (its PUB socket).
    pub endpoint: String,
    /// Where it answers replay requests (its ROUTER socket), when it does.
    pub replay: Option<String>,
}

/// How long one replay may take before the gap is given up as unrecovered.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(2);

/// Subscribes to one rank's endpoint until `reconnect`'s sender is dropped or
/// the task is aborted; reconnects when the
/// stream breaks or `reconnect` ticks (the replica came back after a failure,
/// and a SUB socket does not always notice its publisher went away). A gap in
/// the sequence is filled from the replay socket before the batch that showed
/// it is applied, so stores, removals and clears are applied in the engine's order.
pub async fn subscribe(
    feed: Feed,
    stats: Arc<KvStats>,
    clears: mpsc::UnboundedSender<ClearNotice>,
    mut reconnect: watch::Receiver<u64>,
) {
    let Feed {
        url,
        endpoint,
        replay,
    } = feed;
    let mut seq = SeqTracker::default();
    loop {
        let mut sock = zeromq::SubSocket::new();
        let connected = tokio::select! {
            r = sock.connect(&endpoint) => r,
            _ = reconnect.changed() => continue,
        };
        if let Err(e) = connected {
            tracing::debug!(replica = %url, %endpoint, error = %e, "KV events: connect failed");
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                r = reconnect.changed() => if r.is_err() { return },
            }
            continue;
        }
        if let Err(e) = sock.subscribe("").await {
            tracing::warn!(replica = %url, error = %e, "KV events: subscribe failed");
            continue;
        }
        stats.connected.fetch_add(1, Ordering::Relaxed);
        tracing::info!(replica = %url, %endpoint, "KV events: subscribed");
        loop {
            let msg = tokio::select! {
                m = sock.recv() => m,
                r = reconnect.changed() => {
                    if r.is_err() { return }
                    break;
                }
            };
            let msg = match msg {
                Ok(m) => m,
                Err(e) => {
                    tracing::info!(replica = %url, error = %e, "KV events: stream ended, reconnecting");
                    break;
                }
            };
            let frames: Vec<bytes::Bytes> = msg.into_vec();
            let (seq_frame, payload) = match frames.len() {
                0 | 1 => {
                    stats.undecodable.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                n => (&frames[n - 2], &frames[n - 1]),
            };
            if let Ok(b) = <[u8; 8]>::try_from(&seq_frame[..]) {
                let at = u64::from_be_bytes(b);
                match seq.check(at) {
                    SeqCheck::Gap(n) => {
                        stats.gap_messages.fetch_add(n, Ordering::Relaxed);
                        let got = match &replay {
                            Some(ep) => recover(&url, ep, at - n, at, &stats, &clears).await,
                            None => 0,
                        };
                        stats
                            .unrecovered_messages
                            .fetch_add(n.saturating_sub(got), Ordering::Relaxed);
                        tracing::warn!(replica = %url, missed = n, replayed = got, "KV events: sequence gap");
                    }
                    SeqCheck::Reset => {
                        stats.resets.fetch_add(1, Ordering::Relaxed);
                        stats
                            .budget
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .cleared();
                        let _ = clears.send(ClearNotice {
                            url: url.clone(),
                            reason: "sequence_reset",
                        });
                    }
                    SeqCheck::First | SeqCheck::InOrder => {}
                }
            }
            apply(&url, payload, &stats, &clears);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Fetches batches `from..until` from the replay socket and applies them in
/// order; returns how many were applied.
async fn recover(
    url: &str,
    endpoint: &str,
    from: u64,
    until: u64,
    stats: &KvStats,
    clears: &mpsc::UnboundedSender<ClearNotice>,
) -> u64 {
    match crate::kv_replay::fetch(endpoint, from, until, REPLAY_TIMEOUT).await {
        Ok(batches) => {
            for (_, payload) in &batches {
                apply(url, payload, stats, clears);
            }
            let n = batches.len() as u64;
            stats.replayed_messages.fetch_add(n, Ordering::Relaxed);
            n
        }
        Err(e) => {
            tracing::warn!(replica = %url, error = %e, "KV events: replay failed");
            0
        }
    }
}

fn apply(url: &str, payload: &[u8], stats: &KvStats, clears: &mpsc::UnboundedSender<ClearNotice>) {
    let (batch, bad) = match decode_batch(payload) {
        Ok(b) => b,
        Err(e) => {
            stats.undecodable.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(replica = %url, error = %e, "KV events: undecodable batch");
            return;
        }
    };
    stats.batches.fetch_add(1, Ordering::Relaxed);
    stats.undecodable.fetch_add(bad as u64, Ordering::Relaxed);
    let mut budget = stats.budget.lock().unwrap_or_else(|e| e.into_inner());
    for e in batch.events {
        match e {
            KvEvent::Stored { block_hashes, .. } => {
                let n = block_hashes.len() as u64;
                stats.stored_blocks.fetch_add(n, Ordering::Relaxed);
                budget.stored(n);
            }
            KvEvent::Removed { block_hashes } => {
                let n = block_hashes.len() as u64;
                stats.removed_blocks.fetch_add(n, Ordering::Relaxed);
                budget.removed(n);
            }
            KvEvent::AllCleared => {
                budget.cleared();
                stats.cleared.fetch_add(1, Ordering::Relaxed);
                let _ = clears.send(ClearNotice {
                    url: url.to_string(),
                    reason: "all_blocks_cleared",
                });
            }
            KvEvent::Other(_) => {
                stats.other_events.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Serialize;

    fn enc<T: Serialize>(v: &T) -> Vec<u8> {
        rmp_serde::to_vec(v).unwrap()
    }

    #[derive(Serialize)]
    struct MapStored<'a> {
        #[serde(rename = "type")]
        ty: &'a str,
        block_hashes: Vec<u64>,
        parent_block_hash: Option<u64>,
        token_ids: Vec<u32>,
        block_size: u32,
        lora_id: Option<i64>,
        medium: &'a str,
        lora_name: Option<&'a str>,
        some_future_field: u8,
    }

    #[test]
    fn legacy_arrays_with_u64_hashes_and_trailing_fields() {
        let ev = (
            "BlockStored",
            vec![1u64, u64::MAX],
            Some(7u64),
            vec![1u32, 2, 3],
            16u32,
            None::<i64>,
            "GPU",
            "future",
        );
        let payload = enc(&(
            1.5f64,
            (
                ev,
                ("BlockRemoved", vec![9u64], "GPU"),
                ("AllBlocksCleared",),
            ),
            0u32,
        ));
        let (b, bad) = decode_batch(&payload).unwrap();
        assert_eq!(bad, 0);
        assert_eq!(b.ts, 1.5);
        assert_eq!(b.dp_rank, Some(0));
        assert_eq!(
            b.events,
            vec![
                KvEvent::Stored {
                    block_hashes: vec![1, u64::MAX],
                    parent: Some(7),
                    block_size: Some(16)
                },
                KvEvent::Removed {
                    block_hashes: vec![9]
                },
                KvEvent::AllCleared
            ]
        );
    }

    #[test]
    fn maps_at_both_levels_with_unknown_fields() {
        let stored = MapStored {
            ty: "BlockStored",
            block_hashes: vec![u64::MAX - 1],
            parent_block_hash: None,
            token_ids: vec![5; 16],
            block_size: 16,
            lora_id: None,
            medium: "GPU",
            lora_name: None,
            some_future_field: 3,
        };
        #[derive(Serialize)]
        struct MapBatch<'a> {
            ts: f64,
            events: (MapStored<'a>, std::collections::BTreeMap<&'a str, &'a str>),
            data_parallel_rank: u32,
        }
        let cleared = [("type", "AllBlocksCleared")].into_iter().collect();
        let payload = rmp_serde::to_vec_named(&MapBatch {
            ts: 2.0,
            events: (stored, cleared),
            data_parallel_rank: 3,
        })
        .unwrap();
        let (b, bad) = decode_batch(&payload).unwrap();
        assert_eq!(bad, 0);
        assert_eq!(b.dp_rank, Some(3));
        assert_eq!(b.events.len(), 2);
        assert!(
            matches!(&b.events[0], KvEvent::Stored { block_hashes, parent: None, block_size: Some(16) } if block_hashes == &vec![u64::MAX - 1])
        );
        assert_eq!(b.events[1], KvEvent::AllCleared);
    }

    #[test]
    fn byte_and_negative_hashes_and_unknown_types() {
        use rmpv::Value as V;
        let batch = V::Array(vec![
            V::F64(0.0),
            V::Array(vec![
                V::Array(vec![
                    V::from("BlockRemoved"),
                    V::Array(vec![V::Binary(vec![0, 0, 0, 0, 0, 0, 1, 2, 99])]),
                ]),
                V::Array(vec![
                    V::from("BlockRemoved"),
                    V::Array(vec![V::from(-1i64)]),
                ]),
                V::Array(vec![V::from("SomethingNew"), V::from(1u8)]),
            ]),
        ]);
        let mut payload = Vec::new();
        rmpv::encode::write_value(&mut payload, &batch).unwrap();
        let (b, bad) = decode_batch(&payload).unwrap();
        assert_eq!(bad, 0);
        // Nine bytes: the last eight, big-endian, as vLLM folds a digest.
        assert_eq!(
            b.events[0],
            KvEvent::Removed {
                block_hashes: vec![0x01_02_63]
            }
        );
        assert_eq!(
            b.events[1],
            KvEvent::Removed {
                block_hashes: vec![u64::MAX]
            }
        );
        assert_eq!(b.events[2], KvEvent::Other("SomethingNew".into()));
        assert_eq!(b.dp_rank, None);
    }

    fn unhex(parts: &[&str]) -> Vec<u8> {
        let s = parts.concat();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// A BlockStored of two blocks as vLLM 0.32's own classes encode it
    /// (`tests/vllm/publish_kv_events.py --fixture`): its sha256 digests as bytes
    /// (`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0`), then in vLLM's default int form.
    const VLLM_BYTE_HASHES: &[&str] = &[
        "93cb3ff00000000000009188a474797065ab426c6f636b53746f726564ac626c6f636b5f68617368",
        "657392c420dc918a88b139e5afe60b88eda27508d4aee16c10fdc354791efea06206ac0749c420c3",
        "00ec275d7bf08af8fc63e76cdc0086911bbc7091e03c5cf892553bef84ef0cb1706172656e745f62",
        "6c6f636b5f68617368c0a9746f6b656e5f696473dc0020000102030405060708090a0b0c0d0e0f10",
        "1112131415161718191a1b1c1d1e1faa626c6f636b5f73697a6510a76c6f72615f6964c0a66d6564",
        "69756da3475055a96c6f72615f6e616d65c000",
    ];
    const VLLM_INT_HASHES: &[&str] = &[
        "93cb3ff00000000000009188a474797065ab426c6f636b53746f726564ac626c6f636b5f68617368",
        "657392cf1efea06206ac0749cff892553bef84ef0cb1706172656e745f626c6f636b5f68617368c0",
        "a9746f6b656e5f696473dc0020000102030405060708090a0b0c0d0e0f101112131415161718191a",
        "1b1c1d1e1faa626c6f636b5f73697a6510a76c6f72615f6964c0a66d656469756da3475055a96c6f",
        "72615f6e616d65c000",
    ];

    #[test]
    fn a_digest_and_vllms_int_form_of_it_are_one_block_hash() {
        let bytes = decode_batch(&unhex(VLLM_BYTE_HASHES)).unwrap();
        let ints = decode_batch(&unhex(VLLM_INT_HASHES)).unwrap();
        assert_eq!((bytes.1, ints.1), (0, 0));
        assert_eq!(bytes.0.events, ints.0.events);
        // The int forms vLLM published: the digests' last 8 bytes, big-endian.
        assert_eq!(
            ints.0.events,
            vec![KvEvent::Stored {
                block_hashes: vec![2233398808101521225, 17911472383915781900],
                parent: None,
                block_size: Some(16)
            }]
        );
        let digest = unhex(&["dc918a88b139e5afe60b88eda27508d4aee16c10fdc354791efea06206ac0749"]);
        assert_eq!(fold_digest(&digest), 2233398808101521225);
        assert_eq!(fold_digest(&[1, 2]), 0x0102);
        assert_eq!(fold_digest(&[]), 0);
    }

    #[test]
    fn undecodable_events_are_counted_and_bad_batches_rejected() {
        let payload = enc(&(
            0.0f64,
            (("BlockStored", "not a list"), 5u8, ("AllBlocksCleared",)),
        ));
        let (b, bad) = decode_batch(&payload).unwrap();
        assert_eq!(bad, 2);
        assert_eq!(b.events, vec![KvEvent::AllCleared]);
        assert!(decode_batch(&enc(&"just a string")).is_err());
        assert!(decode_batch(&[0xc1]).is_err());
        assert!(decode_batch(&enc(&(1.0f64,))).is_err());
        // Nested array headers: refused, not a stack overflow.
        assert!(decode_batch(&[0x91; 4000]).is_err());
    }

    #[test]
    fn the_simulator_encoding_decodes_in_both_forms() {
        // Bytes as kvroute-sim emits them (sim/src/events.rs), one per form.
        let map = enc(&(
            1.0f64,
            vec![[("type", "AllBlocksCleared")]
                .into_iter()
                .collect::<std::collections::BTreeMap<_, _>>()],
            Some(0u32),
        ));
        assert_eq!(
            decode_batch(&map).unwrap().0.events,
            vec![KvEvent::AllCleared]
        );
    }

    #[test]
    fn the_budget_is_what_the_engine_holds_when_it_starts_evicting() {
        let mut b = BudgetEstimator::default();
        b.stored(50);
        assert_eq!(b.estimate(), None, "no eviction yet: capacity unknown");
        b.stored(50);
        b.removed(10);
        assert_eq!(b.estimate(), Some(100));
        // Steady state at 90 resident: the estimate moves smoothly towards it.
        b.stored(10);
        b.removed(20);
        assert_eq!(b.estimate(), Some(100));
        b.stored(0);
        b.removed(10);
        assert_eq!(b.estimate(), Some(96)); // 0.8*100 + 0.2*80
        b.cleared();
        b.removed(5);
        assert_eq!(
            b.estimate(),
            Some(96),
            "removals of unseen blocks teach nothing"
        );
    }

    #[test]
    fn sequence_gaps_and_resets() {
        let mut s = SeqTracker::default();
        assert_eq!(s.check(5), SeqCheck::First);
        assert_eq!(s.check(6), SeqCheck::InOrder);
        assert_eq!(s.check(9), SeqCheck::Gap(2));
        assert_eq!(s.check(0), SeqCheck::Reset);
        assert_eq!(s.check(1), SeqCheck::InOrder);
    }
}
