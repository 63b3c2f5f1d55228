//! Prefix hashing: the prompt byte stream cut into fixed blocks, chain-hashed so
//! equal hash at block i means equal prompt up to block i.
//!
//! - `block_hash.rs`: the hash of one block (AES rounds).
//! - `chain.rs`: the streaming block hasher.
//! - `analyze.rs`: the proxy's one call, extraction plus hashing.
#![forbid(unsafe_code)]

mod analyze;
pub(crate) mod block_hash;
mod chain;

pub use analyze::{analyze, Analyzed};
pub use block_hash::{block_hash, scan_block_hashes, scan_portable};
pub use chain::{
    chain_hashes, fold_block_hash, BlockHasher, BlockHashes, PrefixConfig, MAX_BLOCK_BYTES,
    MIN_BLOCK_BYTES, SHARD_RUN_BLOCKS, SHARD_RUN_MASK,
};
