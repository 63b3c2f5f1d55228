//! The hash of one block of the prompt stream: AES rounds, as gxhash and aHash
//! build theirs, defined here bit for bit so that every kvroute computes the
//! same value whatever its CPU.
//!
//! Why not xxh3 or gxhash: xxh3's path for 17–128
//! bytes is eight 64×64→128-bit multiplies and ~40 other scalar steps per 128
//! bytes, 29 % of a 128 KiB chat request's routing; one AES round mixes 16
//! bytes in one instruction. gxhash has this design but will not compile
//! without `-C target-feature=+aes`, which a binary for unknown edge boxes
//! cannot assume, and aHash picks AES at build time for the same reason. Here
//! the CPU is checked at run time (`crate::sys::aes`: AES-NI on x86-64, the
//! Cryptography Extension on aarch64); without them the `aes` crate computes
//! the same rounds, eight blocks per call, bitsliced in software.
//! `benches/routing_core.rs` (`hash/*`) has both paths, and
//! docs/bench/routing-core.md the figures.
//!
//! The construction, for a block of `len ≥ 16` bytes and `enc(s, k)` one AES
//! encryption round of state `s` with round key `k` (x86's `AESENC`):
//! - two lanes, `a = K0 ^ len` and `c = K1`;
//! - the block's 16-byte words alternately into `a` and `c`, each as the round
//!   key of a round of its lane (`a = enc(a, word)`), so the lanes run in
//!   parallel; a tail shorter than 16 bytes enters as the block's last 16 bytes;
//! - `h = enc(a, c)`, then three rounds keyed `K1`, `K2`, `K3`;
//! - the low 64 bits of `h`.
//!
//! Every word passes through at least three rounds, and two AES rounds already
//! make every output bit depend on every input bit; the test module checks the
//! avalanche. Like xxh3 unseeded, it is not meant to resist inputs built to
//! collide: a collision only misleads routing, never what a replica answers.

use aes::hazmat::{cipher_round, cipher_round_par};
use aes::{Block, Block8};

/// Round keys: the first hexadecimal digits of π's fraction (as Blowfish's
/// P-array), so nothing about them is chosen.
const K0: [u8; 16] = key(0x243f_6a88_85a3_08d3, 0x1319_8a2e_0370_7344);
const K1: [u8; 16] = key(0xa409_3822_299f_31d0, 0x082e_fa98_ec4e_6c89);
const K2: [u8; 16] = key(0x4528_21e6_38d0_1377, 0xbe54_66cf_34e9_0c6c);
const K3: [u8; 16] = key(0xc0ac_29b7_c97c_50dd, 0x3f84_d5b5_b547_0917);

/// The smallest block the construction takes: one AES word.
pub const MIN_HASHED_BYTES: usize = 16;

const fn key(low: u64, high: u64) -> [u8; 16] {
    let (l, h) = (low.to_le_bytes(), high.to_le_bytes());
    let mut k = [0u8; 16];
    let mut i = 0;
    while i < 8 {
        k[i] = l[i];
        k[i + 8] = h[i];
        i += 1;
    }
    k
}

/// `K0` with the block length in its low 8 bytes, so blocks of different sizes
/// (a configuration change) never share hashes.
#[inline(always)]
fn first_lane(len: usize) -> [u8; 16] {
    let mut k = K0;
    let l = (len as u64).to_le_bytes();
    for i in 0..8 {
        k[i] ^= l[i];
    }
    k
}

/// The first 16 bytes of `bytes` (at least 16).
#[inline(always)]
fn word(bytes: &[u8]) -> [u8; 16] {
    match bytes.first_chunk() {
        Some(w) => *w,
        None => unreachable!("16 bytes or more"),
    }
}

/// Feeds the block's 16-byte words, with their offsets, alternately to lanes
/// `a` and `c`; a tail shorter than a word enters, as the block's last 16
/// bytes, the lane whose turn it is. The eight-block rounds load each offset
/// from eight blocks. The words come from `chunks_exact`, whose lengths the
/// compiler knows: loading them by offset instead cost the AES-NI kernel 15 %
/// at 128 KiB in bounds checks. Two named lanes (not an array indexed by
/// turn) stay in registers.
#[inline(always)]
fn absorb<S>(block: &[u8], a: &mut S, c: &mut S, mut enc: impl FnMut(&mut S, usize, [u8; 16])) {
    let mut pairs = block.chunks_exact(32);
    let mut at = 0;
    for pair in &mut pairs {
        enc(a, at, word(pair));
        enc(c, at + 16, word(&pair[16..]));
        at += 32;
    }
    let rest = pairs.remainder();
    let last = block.len().saturating_sub(16);
    if rest.len() >= 16 {
        enc(a, at, word(rest));
        if rest.len() > 16 {
            enc(c, last, word(&block[last..]));
        }
    } else if !rest.is_empty() {
        enc(a, last, word(&block[last..]));
    }
}

/// The construction (module comment) over any AES round, the one definition
/// of its order for the AES-NI, software and eight-block paths: `lane(k)` is
/// a state holding the 16 bytes `k`, `word(at, w)` the state of the block's
/// word `w` at offset `at` (the eight-block path loads that offset from each
/// block), and `enc(s, k)` one round of `s` keyed by `k`. Returns the final
/// state; the hash is its low 64 bits.
#[inline(always)]
pub(crate) fn rounds<S>(
    block: &[u8],
    lane: impl Fn([u8; 16]) -> S,
    word: impl Fn(usize, [u8; 16]) -> S,
    mut enc: impl FnMut(&mut S, &S),
) -> S {
    let (mut h, mut c) = (lane(first_lane(block.len())), lane(K1));
    absorb(block, &mut h, &mut c, |s, at, w| enc(s, &word(at, w)));
    enc(&mut h, &c);
    for k in [K1, K2, K3] {
        enc(&mut h, &lane(k));
    }
    h
}

/// The hash of one block of at least [`MIN_HASHED_BYTES`] bytes (panics on
/// less). On the CPU's AES instructions where it has them.
#[inline]
pub fn block_hash(block: &[u8]) -> u64 {
    assert!(
        block.len() >= MIN_HASHED_BYTES,
        "a block of 16 bytes or more"
    );
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    if let Some(h) = crate::sys::aes::block_hash(block) {
        return h;
    }
    block_hash_portable(block)
}

/// For each full `block`-byte block `i` of `bytes`, in order, writes
/// `step(&mut state, hash of block i)` to `out[i]`, and returns the state
/// (`block ≥ 16`, `out` one slot per full block): `Iterator::scan` over the
/// block hashes, which is how a chain folds them. The whole loop runs on the
/// CPU's AES instructions where it has them, so the rounds and `step` inline,
/// and `state` stays in registers.
#[inline]
pub fn scan_block_hashes<S>(
    bytes: &[u8],
    block: usize,
    out: &mut [u64],
    state: S,
    mut step: impl FnMut(&mut S, u64) -> u64,
) -> S {
    assert!(block >= MIN_HASHED_BYTES, "a block of 16 bytes or more");
    assert_eq!(out.len(), bytes.len() / block, "one slot per full block");
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    let state = match crate::sys::aes::scan_block_hashes(bytes, block, out, state, &mut step) {
        Ok(state) => return state,
        Err(state) => state,
    };
    scan_portable(bytes, block, out, state, step)
}

/// Blocks the software path hashes together: `aes::hazmat::cipher_round_par`
/// runs eight rounds per call, pipelined on the CPU's AES instructions where
/// `aes` finds them and bitsliced where not. One round per call was ~20×
/// slower than inlined AES-NI (a feature check and a call per round, and no
/// overlap), and the bitsliced round one at a time ~400× (a standalone copy:
/// 52 µs and 950 µs per 128 KiB of blocks, against 2.5 µs inlined).
const PAR: usize = 8;

/// [`scan_block_hashes`] as a CPU without AES-NI runs it (public for the
/// hashing bench, which measures it beside the kernel).
#[doc(hidden)]
pub fn scan_portable<S>(
    bytes: &[u8],
    block: usize,
    out: &mut [u64],
    mut state: S,
    mut step: impl FnMut(&mut S, u64) -> u64,
) -> S {
    let mut groups = bytes.chunks_exact(block * PAR);
    let mut slots = out.chunks_exact_mut(PAR);
    for (group, slots) in (&mut groups).zip(&mut slots) {
        let blocks: [&[u8]; PAR] = std::array::from_fn(|i| &group[i * block..(i + 1) * block]);
        for (o, h) in slots.iter_mut().zip(block_hashes_par(blocks)) {
            *o = step(&mut state, h);
        }
    }
    let rest = groups.remainder().chunks_exact(block);
    for (o, b) in slots.into_remainder().iter_mut().zip(rest) {
        *o = step(&mut state, block_hash_portable(b));
    }
    state
}

/// [`block_hash_portable`] of eight blocks of one length, a round of each per call.
fn block_hashes_par(blocks: [&[u8]; PAR]) -> [u64; PAR] {
    let h = rounds(
        blocks[0],
        |k| Block8::from([Block::from(k); PAR]),
        |at, _| Block8::from(blocks.map(|b| Block::from(word(&b[at..])))),
        cipher_round_par,
    );
    std::array::from_fn(|i| low_64(&h[i]))
}

fn low_64(b: &Block) -> u64 {
    match b[..8].try_into() {
        Ok(l) => u64::from_le_bytes(l),
        Err(_) => unreachable!("an 8-byte slice"),
    }
}

/// The construction one round per call: the definition the hardware kernel
/// and the eight-block path are tested against.
pub(crate) fn block_hash_portable(block: &[u8]) -> u64 {
    let h = rounds(block, Block::from, |_, w| Block::from(w), cipher_round);
    low_64(&h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Pinned values: every kvroute, on any CPU and in any later version that
    /// keeps this construction, must compute these (several instances agree on
    /// where unseen prefixes go only if they hash alike). A change here is a
    /// change of every chain hash, for the README's upgrade note.
    #[test]
    fn known_values() {
        let zeros = [0u8; 128];
        let counting: Vec<u8> = (0..128u8).collect();
        let got = [
            block_hash_portable(&zeros),
            block_hash_portable(&counting),
            block_hash_portable(&counting[..16]),
            block_hash_portable(&counting[..100]),
        ];
        assert_eq!(got, KNOWN, "{got:#018x?}");
        assert_eq!(
            [
                block_hash(&zeros),
                block_hash(&counting),
                block_hash(&counting[..16]),
                block_hash(&counting[..100]),
            ],
            KNOWN
        );
    }

    const KNOWN: [u64; 4] = [
        0x5d79_c61e_00f5_448f,
        0x7a9a_dffd_3079_fd08,
        0x80d3_cbec_6063_b6ff,
        0xc021_b8b1_83bc_74ba,
    ];

    /// Flipping any one input bit flips each output bit with probability ½:
    /// over 128 random blocks per input bit, every output bit's flip rate stays
    /// within 0.5 ± 0.25 for each input bit (5.7 standard deviations: about
    /// one chance in 100 that one of the 190,000 pairs strays there by
    /// chance; a bit that fails to reach an output flips it 0 or 128 times),
    /// and the mean within 0.5 ± 0.01.
    #[test]
    fn every_input_bit_reaches_every_output_bit() {
        for len in [16usize, 40, 128] {
            let mut total = 0u64;
            let mut samples = 0u64;
            for bit in 0..len * 8 {
                let mut flips = [0u32; 64];
                for s in 0..128u64 {
                    let mut b = bytes(len, 1000 + s * 7919 + bit as u64);
                    let before = block_hash(&b);
                    b[bit / 8] ^= 1 << (bit % 8);
                    let diff = before ^ block_hash(&b);
                    for (o, f) in flips.iter_mut().enumerate() {
                        *f += (diff >> o & 1) as u32;
                    }
                }
                for (o, &f) in flips.iter().enumerate() {
                    assert!(
                        (32..=96).contains(&f),
                        "len {len}: input bit {bit} flips output bit {o} in {f} of 128"
                    );
                }
                total += flips.iter().map(|&f| u64::from(f)).sum::<u64>();
                samples += 128 * 64;
            }
            let rate = total as f64 / samples as f64;
            assert!(
                (rate - 0.5).abs() < 0.01,
                "len {len}: mean flip rate {rate}"
            );
        }
    }

    /// Blocks that differ little (a counter in one word, as prompts that differ
    /// by a number do) spread evenly over the bits the prefix index shards by.
    #[test]
    fn near_identical_blocks_spread_over_shard_bits() {
        let mut counts = [0u32; 64];
        let mut seen = std::collections::HashSet::new();
        let mut block = [b'a'; 128];
        for i in 0..64_000u32 {
            block[60..64].copy_from_slice(&i.to_le_bytes());
            let h = block_hash(&block);
            assert!(seen.insert(h), "collision at {i}");
            counts[(h >> 40) as usize & 63] += 1;
        }
        // Expected 1000 each; a chi-square over 63 degrees of freedom above
        // 110 happens by chance about once in 5,000.
        let chi2: f64 = counts
            .iter()
            .map(|&c| (f64::from(c) - 1000.0).powi(2) / 1000.0)
            .sum();
        assert!(chi2 < 110.0, "chi-square {chi2}: {counts:?}");
    }

    #[test]
    fn lengths_and_tails_all_count() {
        let b = bytes(200, 5);
        let mut seen = std::collections::HashSet::new();
        for len in 16..=200 {
            assert!(seen.insert(block_hash(&b[..len])), "length {len}");
        }
        // A tail word overlaps the word before it; its last byte still counts.
        let mut c = b[..100].to_vec();
        let h = block_hash(&c);
        c[99] ^= 1;
        assert_ne!(block_hash(&c), h);
    }

    #[test]
    #[should_panic(expected = "16 bytes or more")]
    fn short_blocks_are_refused() {
        block_hash(&[0; 15]);
    }

    /// Without the CPU's AES instructions, `hardware_rounds_equal_the_definition`
    /// compares the software path with itself and proves nothing about the
    /// kernel: say so, and fail where the run requires the kernel
    /// (`KVROUTE_REQUIRE_AES`: set by CI, and by `cargo xtask test` for its
    /// `qemu-aarch64` run).
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    #[test]
    fn hardware_kernel_is_what_is_tested() {
        if crate::sys::aes::available() {
            return;
        }
        let why = "this CPU has no AES instructions, so the AES kernel is untested";
        assert!(
            std::env::var_os("KVROUTE_REQUIRE_AES").is_none(),
            "KVROUTE_REQUIRE_AES is set but {why}"
        );
        eprintln!("skipped: {why}");
    }

    proptest! {
        /// The dispatched hash (the AES kernel, where the CPU has it) is the
        /// software definition, at every length and for every block of a slice.
        #[test]
        fn hardware_rounds_equal_the_definition(
            data in proptest::collection::vec(any::<u8>(), 16..1200),
            block in 16usize..300,
        ) {
            prop_assert_eq!(block_hash(&data), block_hash_portable(&data));
            let mut got = vec![0; data.len() / block];
            let calls = scan_block_hashes(&data, block, &mut got, 0usize, |calls, h| {
                *calls += 1;
                h
            });
            let want: Vec<u64> = data.chunks_exact(block).map(block_hash_portable).collect();
            prop_assert_eq!(calls, want.len());
            prop_assert_eq!(&got, &want);
            // The software path a CPU without AES instructions takes, eight at a time.
            let mut soft = vec![0; data.len() / block];
            scan_portable(&data, block, &mut soft, (), |_, h| h);
            prop_assert_eq!(soft, want);
        }
    }
}
