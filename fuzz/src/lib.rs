//! What the fuzz targets share: where bolero keeps a target's inputs, keeping a
//! failing generated input as a replayable file, and the small generators the
//! structure-aware targets build their inputs from.
//!
//! Each target under `tests/` is a pair of harnessed checks (`#[test]` functions):
//! - `<name>`, over raw bytes: it replays the committed seeds in
//!   `tests/__fuzz__/<name>/corpus/` and any regression inputs in `crashes/`,
//!   then random bytes; under `cargo bolero test` the engine mutates the seeds.
//! - `<name>_generated`, over inputs built from parts, so the deep paths are
//!   reached, and with properties that only hold when the input's shape is known.
//!   Its failing input is written into `<name>`'s `crashes/` (see
//!   [`keep_on_failure`]), so committing that file makes every run replay it.
//!
//! The property functions take the raw bytes, so both checks of a target assert
//! the same things about any input.
#![forbid(unsafe_code)]

pub mod gen;

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

/// The directory bolero reads a harnessed `check!(name = name)` target's inputs
/// from: `__fuzz__/<name>/` beside the source file of the check
/// (`TargetLocation::work_dir` in bolero-engine).
pub fn target_dir(source_dir: &Path, name: &str) -> PathBuf {
    source_dir.join("__fuzz__").join(name)
}

/// The inputs of `tests/__fuzz__/<name>/` of this crate.
pub fn tests_target_dir(name: &str) -> PathBuf {
    target_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests"), name)
}

/// Fails unless `dir/corpus/` holds seed files. Bolero skips a missing
/// directory without a word, so a renamed target or a moved source file would
/// otherwise silently stop replaying its seeds.
pub fn expect_corpus(dir: &Path) {
    let corpus = dir.join("corpus");
    let seeds = std::fs::read_dir(&corpus)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.path().is_file())
                .count()
        })
        .unwrap_or(0);
    assert!(seeds > 0, "no seed files in {}", corpus.display());
}

/// When bolero has confirmed that the current input fails (its last run of it,
/// after shrinking), writes `bytes` to `dir/crashes/<hash>` and says where, so
/// the raw-bytes check of the target replays it on every later run once the
/// file is committed. Does nothing on the runs that pass.
pub fn keep_on_failure(dir: &Path, bytes: &[u8]) {
    let failing = bolero::with_context(|c| c.run_phase == bolero::RunPhase::Failure);
    if failing != Some(true) {
        return;
    }
    let dir = dir.join("crashes");
    let bytes = bytes.to_vec();
    bolero::on_failure(move || {
        // Fixed keys: the same input always gets the same name.
        let mut h = std::hash::DefaultHasher::new();
        bytes.hash(&mut h);
        let path = dir.join(format!("{:016x}", h.finish()));
        match std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, &bytes)) {
            Ok(()) => eprintln!(
                "kvroute-fuzz: failing input written to {} (commit it to keep it as a regression seed)",
                path.display()
            ),
            Err(e) => eprintln!("kvroute-fuzz: could not write {}: {e}", path.display()),
        }
    });
}

/// Cut points for feeding `len` bytes in pieces, derived from the bytes
/// themselves (the raw-bytes checks have no generator to draw them from): a
/// xorshift seeded by a hash of the input, so each input always gets the same
/// splits and replays identically.
pub fn splits_from(bytes: &[u8], pieces: usize) -> Vec<usize> {
    if bytes.is_empty() {
        return Vec::new();
    }
    let mut h = std::hash::DefaultHasher::new();
    bytes.hash(&mut h);
    let mut x = h.finish() | 1;
    let mut cuts: Vec<usize> = (0..pieces)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % bytes.len() as u64) as usize
        })
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    cuts
}

/// `bytes` cut at `cuts` (sorted, each within the slice).
pub fn pieces<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::with_capacity(cuts.len() + 1);
    let mut at = 0;
    for &c in cuts {
        let c = c.clamp(at, bytes.len());
        out.push(&bytes[at..c]);
        at = c;
    }
    out.push(&bytes[at..]);
    out
}

/// Bytes as an escaped string, for failure messages (`Debug` of a `Vec<u8>` is a
/// list of numbers nobody can read as HTTP or JSON).
pub fn show(bytes: &[u8]) -> String {
    format!("b\"{}\"", bytes.escape_ascii())
}

/// How a target's inputs came out, printed after its run: a generator that
/// stopped reaching the accepting paths would otherwise go unnoticed, since
/// every property still holds for inputs that are all refused early.
pub struct Tally {
    labels: &'static [&'static str],
    counts: Vec<std::sync::atomic::AtomicU64>,
}

impl Tally {
    pub fn new(labels: &'static [&'static str]) -> Self {
        Tally {
            labels,
            counts: labels.iter().map(|_| Default::default()).collect(),
        }
    }

    /// Counts one input under `labels[i]`.
    pub fn add(&self, i: usize) {
        self.counts[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// One line, `name: label share% ...`, on stderr (shown with `--nocapture`).
    pub fn report(&self, name: &str) {
        let counts: Vec<u64> = self
            .counts
            .iter()
            .map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
            .collect();
        let total = counts.iter().sum::<u64>().max(1);
        let shares: Vec<String> = self
            .labels
            .iter()
            .zip(&counts)
            .map(|(l, c)| format!("{l} {:.1}%", *c as f64 * 100.0 / total as f64))
            .collect();
        eprintln!(
            "{name}: {} inputs: {}",
            counts.iter().sum::<u64>(),
            shares.join(", ")
        );
    }
}
