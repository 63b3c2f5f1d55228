//! The prefix index: which replica holds which prompt block, mirrored from what
//! kvroute sent where, with each replica's real cache budget and LRU order.
//!
//! - `shard.rs`: one lock's worth of entries and the per-replica eviction queues.
//! - `prefix_index.rs`: sharding, budgets, batched longest-prefix lookups.
//! - `slots.rs`: the slot model, for engines that keep whole prompts in a few
//!   slots and a host cache (llama.cpp) rather than blocks in one pool.
//! - `tests.rs`: budgets under random operations, memory per block.
#![forbid(unsafe_code)]

mod prefix_index;
mod shard;
mod slots;
#[cfg(test)]
mod tests;

pub use prefix_index::{IndexConfig, IndexStats, MatchCounts, PrefixIndex};
pub use slots::{SlotModel, SlotOccupancy};
