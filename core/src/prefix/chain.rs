//! `h[i] = fold(h[i-1], block_hash(block[i]))`, streamed over however many
//! slices the prompt arrives in.
//!
//! Why hash then fold rather than seeding each block's hash with `h[i-1]`
//! (with xxh3, say): the seed enters the hash's first step, so
//! every block would wait for the previous one; unseeded block hashes are
//! independent and overlap in the CPU, and only the cheap fold is serial.
//! `benches/routing_core.rs` (`hash/*`) measured seeded xxh3 at about twice the
//! time of xxh3-then-fold from 4 KiB up (741 ns against 372 ns at 4 KiB, 20.6
//! µs against 9.3 µs at 128 KiB; docs/bench/routing-core.md has the table).

use smallvec::SmallVec;

use super::block_hash::{block_hash, scan_block_hashes};

/// Seeds the first block, so a chain never starts from a block hash as it is.
const CHAIN_SEED: u64 = 0x6b76_726f_7574_6531;
/// Odd (so the multiply is a bijection), 2^64 over the golden ratio.
const FOLD_MULTIPLIER: u64 = 0x9E37_79B9_7F4A_7C15;

/// Blocks in a run whose hashes share [`SHARD_RUN_MASK`]'s bits.
pub const SHARD_RUN_BLOCKS: usize = 32;
/// The bits the prefix index picks its shard from (up to 2^16 shards). Every
/// block of a run of [`SHARD_RUN_BLOCKS`] takes them from the run's first block,
/// so a lookup or insert of a chain locks one shard per run instead of one per
/// block: 32 locks instead of ~150 for a 128 KiB prompt, whose lock atomics had
/// been a third of the lookup. The other 48 bits stay the chain's own, and runs
/// draw their 16 bits at random, so distinct prefixes still collide about as
/// rarely as 64-bit hashes.
pub const SHARD_RUN_MASK: u64 = 0xffff << 40;

pub const MIN_BLOCK_BYTES: usize = super::block_hash::MIN_HASHED_BYTES;
pub const MAX_BLOCK_BYTES: usize = 4096;

/// Inline capacity: a 4 KiB prompt at the default block size needs no allocation.
pub type BlockHashes = SmallVec<[u64; 32]>;

/// How the prompt stream is cut into blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixConfig {
    /// Clamped to `MIN_BLOCK_BYTES..=MAX_BLOCK_BYTES` by [`BlockHasher::new`].
    pub block_bytes: usize,
}

impl Default for PrefixConfig {
    fn default() -> Self {
        PrefixConfig { block_bytes: 128 }
    }
}

/// The chain step: the previous hash and this block's own hash, mixed.
///
/// Why a rotate, xor and one multiply, not another xxh3 round (seeded with
/// `prev`): this step is the chain's only serial part, so its
/// latency bounds a long prompt; xxh3 of 8 bytes is ~18 cycles of dependent
/// multiplies and shifts, this is ~5. The block hash is uniform, and for a fixed
/// `prev` (or block hash) the map is a bijection, so two chains meet only where
/// 64-bit hashes collide. `hash/*` in `benches/routing_core.rs` has both.
#[inline(always)]
pub fn fold_block_hash(prev: u64, block_hash: u64) -> u64 {
    (prev.rotate_left(23) ^ block_hash).wrapping_mul(FOLD_MULTIPLIER)
}

/// Chains block `n`, whose own hash is `block_hash`, onto the state `prev`,
/// and returns its hash as published: the new state with the shard bits of
/// its run, which block `n` sets in `run` when it starts one. The one step for
/// blocks hashed in place and for a block staged across two slices.
#[inline(always)]
fn chain_step(prev: &mut u64, run: &mut u64, n: usize, block_hash: u64) -> u64 {
    *prev = fold_block_hash(*prev, block_hash);
    if n.is_multiple_of(SHARD_RUN_BLOCKS) {
        *run = *prev & SHARD_RUN_MASK;
    }
    (*prev & !SHARD_RUN_MASK) | *run
}

/// Streaming prefix-chained block hasher. Full blocks are hashed straight from the
/// fed slices; only a block straddling two slices is staged in `pending`, a
/// buffer sized for one block on first use. Why a `Vec` and not an inline
/// array: a zeroed 4 KiB array cost ~10% at 1 KiB, and `SmallVec`'s generic
/// insert (a memmove and capacity checks per call) cost 8% of a 128 KiB chat
/// request, whose every message boundary straddles a block; the one allocation
/// measured neutral at 1 KiB.
pub struct BlockHasher {
    block: usize,
    pending: Vec<u8>,
    /// The chain's state, all 64 bits; `out` holds it with the run's shard bits.
    prev: u64,
    /// [`SHARD_RUN_MASK`]'s bits of the current run.
    run: u64,
    total: usize,
    out: BlockHashes,
}

impl BlockHasher {
    pub fn new(cfg: &PrefixConfig) -> Self {
        Self::with_capacity(cfg, 0)
    }

    /// `expected_bytes` sizes the output once (the body length bounds the prompt).
    pub fn with_capacity(cfg: &PrefixConfig, expected_bytes: usize) -> Self {
        let block = cfg.block_bytes.clamp(MIN_BLOCK_BYTES, MAX_BLOCK_BYTES);
        let mut out = BlockHashes::new();
        out.reserve(expected_bytes / block);
        BlockHasher {
            block,
            pending: Vec::new(),
            prev: CHAIN_SEED,
            run: 0,
            total: 0,
            out,
        }
    }

    pub fn feed(&mut self, mut bytes: &[u8]) {
        self.total += bytes.len();
        if !self.pending.is_empty() {
            let take = (self.block - self.pending.len()).min(bytes.len());
            self.pending.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.pending.len() < self.block {
                return;
            }
            let n = self.out.len();
            let h = chain_step(&mut self.prev, &mut self.run, n, block_hash(&self.pending));
            self.out.push(h);
            self.pending.clear();
        }
        // Full blocks straight from the slice, into slots made once.
        let whole = bytes.len() - bytes.len() % self.block;
        let first = self.out.len();
        self.out.resize(first + whole / self.block, 0);
        (self.prev, self.run, _) = scan_block_hashes(
            &bytes[..whole],
            self.block,
            &mut self.out[first..],
            (self.prev, self.run, first),
            |(prev, run, n), h| {
                *n += 1;
                chain_step(prev, run, *n - 1, h)
            },
        );
        let rest = &bytes[whole..];
        if !rest.is_empty() {
            // Sized once for a whole block, so completing it never reallocates.
            self.pending.reserve_exact(self.block);
            self.pending.extend_from_slice(rest);
        }
    }

    /// Bytes fed so far, including the partial last block.
    pub fn total_bytes(&self) -> usize {
        self.total
    }

    /// The full blocks' hashes; the partial last block is not hashed.
    pub fn finish(self) -> BlockHashes {
        self.out
    }
}

/// The chain of one contiguous byte string (tests, benches, pre-warming).
pub fn chain_hashes(bytes: &[u8], cfg: &PrefixConfig) -> BlockHashes {
    let mut h = BlockHasher::with_capacity(cfg, bytes.len());
    h.feed(bytes);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg(block_bytes: usize) -> PrefixConfig {
        PrefixConfig { block_bytes }
    }

    #[test]
    fn partial_block_is_not_hashed() {
        assert_eq!(chain_hashes(&[7; 127], &cfg(128)).len(), 0);
        assert_eq!(chain_hashes(&[7; 128], &cfg(128)).len(), 1);
        assert_eq!(chain_hashes(&[7; 1000], &cfg(128)).len(), 7);
    }

    #[test]
    fn equal_blocks_at_different_positions_hash_differently() {
        let h = chain_hashes(&[7; 512], &cfg(128));
        assert_eq!(h.len(), 4);
        let mut uniq = h.to_vec();
        uniq.sort_unstable();
        uniq.dedup();
        assert_eq!(uniq.len(), 4);
    }

    /// Runs of `SHARD_RUN_BLOCKS` share their shard bits and differ from the
    /// next run's; the rest of each hash is its own.
    #[test]
    fn runs_of_blocks_share_their_shard_bits() {
        let data: Vec<u8> = (0..200 * 128).map(|i| (i * 7 % 251) as u8).collect();
        let h = chain_hashes(&data, &cfg(128));
        assert_eq!(h.len(), 200);
        let run_bits: Vec<u64> = h.iter().map(|x| x & SHARD_RUN_MASK).collect();
        for (i, bits) in run_bits.iter().enumerate() {
            assert_eq!(*bits, run_bits[i / SHARD_RUN_BLOCKS * SHARD_RUN_BLOCKS]);
        }
        let mut firsts: Vec<u64> = run_bits.iter().step_by(SHARD_RUN_BLOCKS).copied().collect();
        firsts.dedup();
        assert_eq!(firsts.len(), 200_usize.div_ceil(SHARD_RUN_BLOCKS));
        let mut own: Vec<u64> = h.iter().map(|x| x & !SHARD_RUN_MASK).collect();
        own.sort_unstable();
        own.dedup();
        assert_eq!(own.len(), 200);
    }

    proptest! {
        #[test]
        fn slicing_does_not_change_the_chain(
            data in proptest::collection::vec(any::<u8>(), 0..2000),
            cuts in proptest::collection::vec(0usize..2000, 0..8),
            block in 16usize..300,
        ) {
            let whole = chain_hashes(&data, &cfg(block));
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(data.len())).collect();
            cuts.sort_unstable();
            let mut h = BlockHasher::new(&cfg(block));
            let mut at = 0;
            for c in cuts.into_iter().chain([data.len()]) {
                h.feed(&data[at..c]);
                at = c;
            }
            prop_assert_eq!(h.total_bytes(), data.len());
            prop_assert_eq!(h.finish(), whole);
        }

        #[test]
        fn chains_agree_exactly_up_to_the_common_full_blocks(
            common in proptest::collection::vec(any::<u8>(), 0..1500),
            a in proptest::collection::vec(any::<u8>(), 0..600),
            b in proptest::collection::vec(any::<u8>(), 0..600),
            block in 16usize..200,
        ) {
            let x: Vec<u8> = common.iter().chain(&a).copied().collect();
            let y: Vec<u8> = common.iter().chain(&b).copied().collect();
            let hx = chain_hashes(&x, &cfg(block));
            let hy = chain_hashes(&y, &cfg(block));
            let shared_bytes = x.iter().zip(&y).take_while(|(p, q)| p == q).count();
            let shared_blocks = shared_bytes / block;
            for i in 0..hx.len().min(hy.len()) {
                prop_assert_eq!(hx[i] == hy[i], i < shared_blocks, "block {}", i);
            }
        }
    }
}
