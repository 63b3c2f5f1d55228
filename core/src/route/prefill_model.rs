//! Each replica's prefill speed, learned from what it does: a first token comes
//! `overhead + work / rate` seconds after dispatch, `work` being the uncached
//! prompt bytes queued ahead of the request on that replica plus its own.
//!
//! The fit is the Theil–Sen estimator (the median of the pairwise slopes, then
//! the median intercept) over the last [`WINDOW`] observations. Medians because
//! what a proxy observes is dirty: a decode-heavy burst, a garbage-collection
//! pause or a retried request gives a first token far later than its prefill
//! explains, and a least-squares fit would follow each of them. Up to about a
//! quarter of the window can be such outliers before the slope moves. Work is in
//! prompt bytes, not tokens: the queue the router sees is bytes, and a rate per
//! byte needs no guess of bytes per token (the replica's own tokenizer decides
//! both prefill time and byte count, so their ratio is what it is per replica).
//!
//! No clock and no I/O: callers hand in what was dispatched and what came back.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::replica::MAX_REPLICAS;

/// Observations a fit is made of; older ones are forgotten, so a replica that
/// changes speed (a new GPU, a co-tenant leaving) is re-learned within this many
/// responses.
pub const WINDOW: usize = 48;

/// Observations before a replica's own fit is used; until then it is predicted at
/// the fleet's median speed (or, with no fit anywhere, at a common unit speed,
/// which ranks replicas by queued work alone).
pub const MIN_OBSERVATIONS: usize = 6;

/// A first token later than this is not a prefill measurement (a stalled or
/// paused replica, a clock jump) and is ignored.
const MAX_TTFT_S: f64 = 600.0;

/// Pairs closer than this share of the window's largest work are left out of the
/// slope: their difference is noise.
const MIN_SPREAD: f64 = 0.05;

/// A replica's learned speed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fit {
    /// Seconds per uncached prompt byte (the inverse of the prefill rate).
    pub secs_per_byte: f64,
    /// Seconds of a first token that no prompt work explains: network, scheduling,
    /// the first decode step.
    pub overhead_s: f64,
}

impl Fit {
    pub fn rate_bytes_per_s(&self) -> f64 {
        1.0 / self.secs_per_byte
    }

    /// Predicted seconds from dispatch to first token for `work` bytes.
    pub fn ttft_s(&self, work_bytes: f64) -> f64 {
        self.overhead_s + work_bytes * self.secs_per_byte
    }
}

/// Why an observation was not learned from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// Not a finite, positive duration below [`MAX_TTFT_S`].
    Timing,
}

/// The observations of one replica and the fit made of them.
#[derive(Debug, Clone)]
pub struct ReplicaFit {
    work: [f64; WINDOW],
    ttft: [f64; WINDOW],
    len: usize,
    next: usize,
    fit: Option<Fit>,
}

impl Default for ReplicaFit {
    fn default() -> Self {
        ReplicaFit {
            work: [0.0; WINDOW],
            ttft: [0.0; WINDOW],
            len: 0,
            next: 0,
            fit: None,
        }
    }
}

impl ReplicaFit {
    /// Learns that `work_bytes` of prefill gave a first token after `ttft_s`.
    pub fn observe(&mut self, work_bytes: u64, ttft_s: f64) -> Result<(), Rejected> {
        if !(ttft_s.is_finite() && ttft_s > 0.0 && ttft_s < MAX_TTFT_S) {
            return Err(Rejected::Timing);
        }
        self.work[self.next] = work_bytes as f64;
        self.ttft[self.next] = ttft_s;
        self.next = (self.next + 1) % WINDOW;
        self.len = (self.len + 1).min(WINDOW);
        if self.len >= MIN_OBSERVATIONS {
            self.fit = theil_sen(&self.work[..self.len], &self.ttft[..self.len]);
        }
        Ok(())
    }

    pub fn fit(&self) -> Option<Fit> {
        self.fit
    }

    pub fn observations(&self) -> usize {
        self.len
    }
}

/// `y ≈ a + b·x` by the median of pairwise slopes and the median intercept; the
/// slope is kept positive (more work never makes a first token earlier). Where
/// the work hardly varies (every prompt alike, nothing queued), the slope is
/// not identifiable apart from the overhead, and the fit is the median ratio
/// `y / x` with no overhead, which predicts right at the work seen.
fn theil_sen(x: &[f64], y: &[f64]) -> Option<Fit> {
    let n = x.len();
    let max_x = x.iter().copied().fold(0.0, f64::max);
    if max_x <= 0.0 {
        return None;
    }
    let min_dx = MIN_SPREAD * max_x;
    let mut slopes = Vec::with_capacity(n * (n - 1) / 2);
    for i in 0..n {
        for j in i + 1..n {
            let dx = x[j] - x[i];
            if dx.abs() > min_dx {
                slopes.push((y[j] - y[i]) / dx);
            }
        }
    }
    let floor = f64::MIN_POSITIVE;
    if slopes.len() >= n {
        let b = median(&mut slopes).max(floor);
        let mut residuals: Vec<f64> = x.iter().zip(y).map(|(x, y)| y - b * x).collect();
        let a = median(&mut residuals).max(0.0);
        return Some(Fit {
            secs_per_byte: b,
            overhead_s: a,
        });
    }
    let mut ratios: Vec<f64> = x
        .iter()
        .zip(y)
        .filter(|(x, _)| **x > 0.0)
        .map(|(x, y)| y / x)
        .collect();
    if ratios.is_empty() {
        return None;
    }
    Some(Fit {
        secs_per_byte: median(&mut ratios).max(floor),
        overhead_s: 0.0,
    })
}

fn median(v: &mut [f64]) -> f64 {
    let mid = v.len() / 2;
    let (_, m, _) = v.select_nth_unstable_by(mid, f64::total_cmp);
    *m
}

/// Every replica slot's fit: written under a lock per slot when a response
/// reports, read lock-free by every decision.
pub struct FleetFits {
    fits: Box<[Mutex<ReplicaFit>]>,
    /// The published fit per slot as two `f64` bit patterns; 0 bits: none yet.
    published: Box<[[AtomicU64; 2]]>,
}

impl Default for FleetFits {
    fn default() -> Self {
        FleetFits {
            fits: (0..MAX_REPLICAS).map(|_| Mutex::default()).collect(),
            published: (0..MAX_REPLICAS)
                .map(|_| [AtomicU64::new(0), AtomicU64::new(0)])
                .collect(),
        }
    }
}

impl FleetFits {
    pub fn observe(&self, slot: u16, work_bytes: u64, ttft_s: f64) -> Result<(), Rejected> {
        let s = usize::from(slot);
        let Some(cell) = self.fits.get(s) else {
            return Ok(());
        };
        let mut f = cell.lock();
        f.observe(work_bytes, ttft_s)?;
        if let Some(fit) = f.fit() {
            self.published[s][0].store(fit.secs_per_byte.to_bits(), Ordering::Relaxed);
            self.published[s][1].store(fit.overhead_s.to_bits(), Ordering::Relaxed);
        }
        Ok(())
    }

    /// The slot's own fit, once it has [`MIN_OBSERVATIONS`].
    pub fn get(&self, slot: u16) -> Option<Fit> {
        let p = self.published.get(usize::from(slot))?;
        let b = p[0].load(Ordering::Relaxed);
        (b != 0).then(|| Fit {
            secs_per_byte: f64::from_bits(b),
            overhead_s: f64::from_bits(p[1].load(Ordering::Relaxed)),
        })
    }

    /// Forgets a slot (its replica was removed, or its slot reused).
    pub fn clear(&self, slot: u16) {
        let s = usize::from(slot);
        if let Some(cell) = self.fits.get(s) {
            *cell.lock() = ReplicaFit::default();
            self.published[s][0].store(0, Ordering::Relaxed);
            self.published[s][1].store(0, Ordering::Relaxed);
        }
    }

    pub fn observations(&self, slot: u16) -> usize {
        self.fits
            .get(usize::from(slot))
            .map_or(0, |f| f.lock().observations())
    }
}

/// The fit to predict a replica with: its own, else the median of the others'
/// (a new replica is assumed as fast as the fleet's middle until it shows
/// otherwise), else one second per byte for all, which ranks them by work alone.
pub fn fit_or_prior(own: Option<Fit>, fleet: &[Fit]) -> Fit {
    if let Some(f) = own {
        return f;
    }
    if fleet.is_empty() {
        return Fit {
            secs_per_byte: 1.0,
            overhead_s: 0.0,
        };
    }
    let mut b: Vec<f64> = fleet.iter().map(|f| f.secs_per_byte).collect();
    let mut a: Vec<f64> = fleet.iter().map(|f| f.overhead_s).collect();
    Fit {
        secs_per_byte: median(&mut b),
        overhead_s: median(&mut a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic stream in 0..1.
    fn noise(i: u64) -> f64 {
        let h = xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes());
        (h >> 11) as f64 / (1u64 << 53) as f64
    }

    fn learn(f: &mut ReplicaFit, rate: f64, overhead: f64, n: u64, from: u64) {
        for i in from..from + n {
            let work = (1000.0 + 200_000.0 * noise(i)).round();
            f.observe(work as u64, overhead + work / rate).unwrap();
        }
    }

    #[test]
    fn learns_rate_and_overhead() {
        let mut f = ReplicaFit::default();
        learn(&mut f, 50_000.0, 0.02, 40, 0);
        let fit = f.fit().unwrap();
        assert!(
            (fit.rate_bytes_per_s() / 50_000.0 - 1.0).abs() < 1e-6,
            "{fit:?}"
        );
        assert!((fit.overhead_s - 0.02).abs() < 1e-6, "{fit:?}");
    }

    #[test]
    fn no_fit_before_enough_observations() {
        let mut f = ReplicaFit::default();
        learn(&mut f, 50_000.0, 0.02, MIN_OBSERVATIONS as u64 - 1, 0);
        assert_eq!(f.fit(), None);
        learn(&mut f, 50_000.0, 0.02, 1, 99);
        assert!(f.fit().is_some());
    }

    /// A fifth of the first tokens delayed tenfold (decode bursts, pauses) leave
    /// the fit within a few per cent; a mean would be off by nearly threefold.
    #[test]
    fn outliers_do_not_move_the_fit() {
        let mut f = ReplicaFit::default();
        for i in 0..WINDOW as u64 {
            let work = 1000.0 + 200_000.0 * noise(i);
            let mut t = 0.01 + work / 80_000.0;
            if i % 5 == 0 {
                t *= 10.0;
            }
            f.observe(work as u64, t).unwrap();
        }
        let fit = f.fit().unwrap();
        assert!(
            (fit.rate_bytes_per_s() / 80_000.0 - 1.0).abs() < 0.1,
            "{fit:?}"
        );
    }

    /// The window forgets: a replica that became 4x slower is learned as such
    /// once a window of its new speed has been seen.
    #[test]
    fn a_changed_speed_is_relearned_within_a_window() {
        let mut f = ReplicaFit::default();
        learn(&mut f, 80_000.0, 0.01, 100, 0);
        learn(&mut f, 20_000.0, 0.01, WINDOW as u64, 1000);
        let fit = f.fit().unwrap();
        assert!((fit.rate_bytes_per_s() / 20_000.0 - 1.0).abs() < 1e-6);
    }

    #[test]
    fn impossible_timings_are_rejected_and_change_nothing() {
        let mut f = ReplicaFit::default();
        learn(&mut f, 50_000.0, 0.02, 20, 0);
        let before = f.fit();
        for t in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e9] {
            assert_eq!(f.observe(1000, t), Err(Rejected::Timing));
        }
        assert_eq!(f.fit(), before);
        assert_eq!(f.observations(), 20);
    }

    /// Every prompt alike and nothing queued: the overhead cannot be told from
    /// the slope, and the fit predicts the work it saw.
    #[test]
    fn constant_work_predicts_what_it_saw() {
        let mut f = ReplicaFit::default();
        for i in 0..10 {
            f.observe(4096, 0.1 + 0.001 * noise(i)).unwrap();
        }
        let fit = f.fit().unwrap();
        assert!((fit.ttft_s(4096.0) - 0.1).abs() < 0.002, "{fit:?}");
    }

    #[test]
    fn a_new_replica_takes_the_fleet_median() {
        let fits = [2.0, 1.0, 9.0].map(|b| Fit {
            secs_per_byte: b,
            overhead_s: b / 10.0,
        });
        let p = fit_or_prior(None, &fits);
        assert_eq!((p.secs_per_byte, p.overhead_s), (2.0, 0.2));
        let own = fits[2];
        assert_eq!(fit_or_prior(Some(own), &fits), own);
        assert_eq!(fit_or_prior(None, &[]).secs_per_byte, 1.0);
    }

    #[test]
    fn fleet_fits_publish_and_clear() {
        let fleet = FleetFits::default();
        for i in 0..10u64 {
            let work = 10_000 * (i + 1);
            fleet.observe(3, work, 0.01 + work as f64 / 1e5).unwrap();
        }
        let fit = fleet.get(3).unwrap();
        assert!((fit.rate_bytes_per_s() - 1e5).abs() < 1.0);
        assert_eq!(fleet.get(4), None);
        fleet.clear(3);
        assert_eq!((fleet.get(3), fleet.observations(3)), (None, 0));
    }
}
