//! KV cache events in the shape of vLLM's ZMQ publisher.
//!
//! Each message is `[topic, seq as u64 big-endian, msgpack batch]`, the batch being
//! `[ts, events, dp_rank]`. Events are maps tagged by a `type` key (vLLM after PR #42892), or in
//! the legacy form arrays whose first element is the tag, fields following in declaration order.

use bytes::Bytes;
use serde::ser::{SerializeMap, SerializeTuple};
use serde::{Serialize, Serializer};
use tokio::sync::mpsc;
use zeromq::{Socket, SocketSend, ZmqMessage};

use super::cache::CacheEvent;

/// vLLM reports GPU-resident blocks with this medium.
const MEDIUM_GPU: &str = "GPU";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum EventFormat {
    /// `{"type":"BlockStored", ...}` (current vLLM)
    #[default]
    Map,
    /// `["BlockStored", ...]` (vLLM before the 2026 encoding change)
    Legacy,
}

/// One event ready for encoding; `block_size` travels with it because BlockStored carries it.
struct Wire<'a> {
    event: &'a CacheEvent,
    block_size: usize,
    format: EventFormat,
}

impl Serialize for Wire<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let lora_id: Option<i64> = None;
        match (self.format, self.event) {
            (
                EventFormat::Map,
                CacheEvent::Stored {
                    block_hashes,
                    parent_block_hash,
                    token_ids,
                },
            ) => {
                let mut m = s.serialize_map(Some(8))?;
                m.serialize_entry("type", "BlockStored")?;
                m.serialize_entry("block_hashes", block_hashes)?;
                m.serialize_entry("parent_block_hash", parent_block_hash)?;
                m.serialize_entry("token_ids", token_ids)?;
                m.serialize_entry("block_size", &self.block_size)?;
                m.serialize_entry("lora_id", &lora_id)?;
                m.serialize_entry("medium", MEDIUM_GPU)?;
                // Current vLLM always sends it (no default); LoRA is not simulated.
                m.serialize_entry("lora_name", &None::<&str>)?;
                m.end()
            }
            (EventFormat::Map, CacheEvent::Removed { block_hashes }) => {
                let mut m = s.serialize_map(Some(3))?;
                m.serialize_entry("type", "BlockRemoved")?;
                m.serialize_entry("block_hashes", block_hashes)?;
                m.serialize_entry("medium", MEDIUM_GPU)?;
                m.end()
            }
            (EventFormat::Map, CacheEvent::AllCleared) => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("type", "AllBlocksCleared")?;
                m.end()
            }
            (
                EventFormat::Legacy,
                CacheEvent::Stored {
                    block_hashes,
                    parent_block_hash,
                    token_ids,
                },
            ) => {
                let mut t = s.serialize_tuple(7)?;
                t.serialize_element("BlockStored")?;
                t.serialize_element(block_hashes)?;
                t.serialize_element(parent_block_hash)?;
                t.serialize_element(token_ids)?;
                t.serialize_element(&self.block_size)?;
                t.serialize_element(&lora_id)?;
                t.serialize_element(MEDIUM_GPU)?;
                t.end()
            }
            (EventFormat::Legacy, CacheEvent::Removed { block_hashes }) => {
                let mut t = s.serialize_tuple(3)?;
                t.serialize_element("BlockRemoved")?;
                t.serialize_element(block_hashes)?;
                t.serialize_element(MEDIUM_GPU)?;
                t.end()
            }
            (EventFormat::Legacy, CacheEvent::AllCleared) => {
                let mut t = s.serialize_tuple(1)?;
                t.serialize_element("AllBlocksCleared")?;
                t.end()
            }
        }
    }
}

/// Encodes one batch: `[ts, events, dp_rank]`.
pub fn encode_batch(
    ts: f64,
    events: &[CacheEvent],
    block_size: usize,
    format: EventFormat,
) -> Vec<u8> {
    let wire: Vec<Wire<'_>> = events
        .iter()
        .map(|event| Wire {
            event,
            block_size,
            format,
        })
        .collect();
    // A single simulated engine is data-parallel rank 0, as vLLM fills in by default.
    rmp_serde::to_vec(&(ts, wire, Some(0u32))).unwrap_or_default()
}

/// A batch waiting to be published.
pub struct Batch {
    pub ts: f64,
    pub events: Vec<CacheEvent>,
}

/// Binds the PUB socket; done before serving so that a subscriber that saw `/health` succeed
/// can already connect.
pub async fn bind(endpoint: &str) -> anyhow::Result<zeromq::PubSocket> {
    let mut socket = zeromq::PubSocket::new();
    socket.bind(endpoint).await?;
    Ok(socket)
}

/// Publishes batches from `rx` until every sender is gone.
pub async fn publish(
    mut socket: zeromq::PubSocket,
    block_size: usize,
    format: EventFormat,
    mut rx: mpsc::UnboundedReceiver<Batch>,
) {
    let mut seq: u64 = 0;
    while let Some(batch) = rx.recv().await {
        let payload = encode_batch(batch.ts, &batch.events, block_size, format);
        let mut msg = ZmqMessage::from(Bytes::new());
        msg.push_back(Bytes::copy_from_slice(&seq.to_be_bytes()));
        msg.push_back(Bytes::from(payload));
        seq += 1;
        // PUB drops messages nobody subscribed to; an error here is a transport failure worth a
        // log line but not worth stopping the replica.
        if let Err(e) = socket.send(msg).await {
            tracing::warn!(error = %e, "KV event publish failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored() -> CacheEvent {
        CacheEvent::Stored {
            block_hashes: vec![1, u64::MAX],
            parent_block_hash: None,
            token_ids: vec![7; 4],
        }
    }

    #[test]
    fn map_form_is_tagged_by_type() {
        let bytes = encode_batch(
            1.5,
            &[stored(), CacheEvent::AllCleared],
            2,
            EventFormat::Map,
        );
        let v: serde_json::Value = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(v[0], 1.5);
        assert_eq!(v[2], 0);
        assert_eq!(v[1][0]["type"], "BlockStored");
        assert_eq!(v[1][0]["block_hashes"][1], u64::MAX);
        assert_eq!(v[1][0]["parent_block_hash"], serde_json::Value::Null);
        assert_eq!(v[1][0]["block_size"], 2);
        assert_eq!(v[1][0]["medium"], "GPU");
        assert_eq!(v[1][1]["type"], "AllBlocksCleared");
    }

    #[test]
    fn legacy_form_is_positional() {
        let removed = CacheEvent::Removed {
            block_hashes: vec![9],
        };
        let bytes = encode_batch(2.0, &[stored(), removed], 2, EventFormat::Legacy);
        let v: serde_json::Value = rmp_serde::from_slice(&bytes).unwrap();
        let ev = &v[1][0];
        assert_eq!(ev[0], "BlockStored");
        assert_eq!(ev[1].as_array().unwrap().len(), 2);
        assert_eq!(ev[2], serde_json::Value::Null);
        assert_eq!(ev[3].as_array().unwrap().len(), 4);
        assert_eq!(ev[4], 2);
        assert_eq!(ev[5], serde_json::Value::Null);
        assert_eq!(ev[6], "GPU");
        assert_eq!(v[1][1], serde_json::json!(["BlockRemoved", [9], "GPU"]));
    }
}
