//! Small generators over a bolero driver, for building inputs from parts.
//! Every one returns `None` when the driver has no more input, as bolero's own
//! generators do, so `?` ends the case.

use std::ops::Bound;

pub use bolero::generator::bolero_generator::Driver;

/// A value in `0..n` (`n` > 0).
pub fn below<D: Driver>(d: &mut D, n: usize) -> Option<usize> {
    d.gen_usize(Bound::Included(&0), Bound::Excluded(&n.max(1)))
}

/// True one time in `n`.
pub fn one_in<D: Driver>(d: &mut D, n: usize) -> Option<bool> {
    Some(below(d, n)? == 0)
}

pub fn byte<D: Driver>(d: &mut D) -> Option<u8> {
    d.gen_u8(Bound::Unbounded, Bound::Unbounded)
}

pub fn u64_any<D: Driver>(d: &mut D) -> Option<u64> {
    d.gen_u64(Bound::Unbounded, Bound::Unbounded)
}

pub fn pick<'a, D: Driver, T>(d: &mut D, items: &'a [T]) -> Option<&'a T> {
    Some(&items[below(d, items.len())?])
}

/// Up to `max` bytes drawn from `alphabet`.
pub fn from_alphabet<D: Driver>(
    d: &mut D,
    alphabet: &[u8],
    min: usize,
    max: usize,
) -> Option<Vec<u8>> {
    let n = min + below(d, max - min + 1)?;
    (0..n).map(|_| pick(d, alphabet).copied()).collect()
}

/// Up to `max` arbitrary bytes.
pub fn any_bytes<D: Driver>(d: &mut D, max: usize) -> Option<Vec<u8>> {
    let n = below(d, max + 1)?;
    (0..n).map(|_| byte(d)).collect()
}

/// Damages `bytes` a little: one to four flips, truncations, deletions,
/// insertions or repeats of a slice, the edits a fuzzer's mutator makes.
pub fn mutate<D: Driver>(d: &mut D, bytes: &mut Vec<u8>) -> Option<()> {
    for _ in 0..1 + below(d, 4)? {
        let at = below(d, bytes.len() + 1)?;
        match below(d, 5)? {
            0 if at < bytes.len() => bytes[at] ^= 1 << below(d, 8)?,
            1 => bytes.truncate(at),
            2 if at < bytes.len() => {
                let n = 1 + below(d, 8)?;
                bytes.drain(at..(at + n).min(bytes.len()));
            }
            3 => {
                let b = *pick(d, b"\r\n \t:;,0\"\\{}[]\x00\xff")?;
                bytes.insert(at, b);
            }
            _ => {
                let n = below(d, 16)?.min(bytes.len() - at);
                let dup = bytes[at..at + n].to_vec();
                bytes.splice(at..at, dup);
            }
        }
    }
    Some(())
}

/// Up to `max` sorted cut points within `0..=len`.
pub fn cuts<D: Driver>(d: &mut D, len: usize, max: usize) -> Option<Vec<usize>> {
    let mut c: Vec<usize> = (0..below(d, max + 1)?)
        .map(|_| below(d, len + 1))
        .collect::<Option<_>>()?;
    c.sort_unstable();
    Some(c)
}
