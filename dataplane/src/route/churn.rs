//! How much new prompt text each replica has been sent lately: the uncached
//! bytes of the requests routed to it, decayed with a half-life. That is what
//! fills a replica's KV cache and evicts what it held, so balancing it is
//! balancing cache pressure.
//!
//! Why it exists: rendezvous hashing spreads anchors evenly only on average.
//! With 32 tenants on 4 replicas, one replica routinely gets 10 or 11 system
//! prompts (binomial spread), more than its cache holds next to their
//! conversations, and thrashes while another idles with 6; the in-flight load
//! bound never notices, because each request is cheap once cached. Placing an
//! unseen prefix past replicas whose churn is above `(1+ε)·mean` evens that
//! out. It stays deterministic (bytes and a caller's clock), so instances
//! seeing similar traffic still agree, and an empty meter (a restart) is plain
//! rendezvous hashing.
#![forbid(unsafe_code)]

use parking_lot::Mutex;

use crate::replica::MAX_REPLICAS;

pub struct ChurnMeter {
    halflife_ms: f64,
    state: Mutex<State>,
}

struct State {
    /// Time of the last decay.
    at_ms: u64,
    bytes: [f64; MAX_REPLICAS],
}

impl ChurnMeter {
    pub fn new(halflife_ms: u64) -> Self {
        ChurnMeter {
            halflife_ms: halflife_ms.max(1) as f64,
            state: Mutex::new(State {
                at_ms: 0,
                bytes: [0.0; MAX_REPLICAS],
            }),
        }
    }

    fn decay(&self, s: &mut State, now_ms: u64) {
        if now_ms <= s.at_ms {
            return;
        }
        let f = (-((now_ms - s.at_ms) as f64) / self.halflife_ms).exp2();
        s.bytes.iter_mut().for_each(|b| *b *= f);
        s.at_ms = now_ms;
    }

    /// `bytes` of new prompt text sent to `slot` at `now_ms`.
    pub fn add(&self, slot: u16, bytes: u64, now_ms: u64) {
        let mut s = self.state.lock();
        self.decay(&mut s, now_ms);
        if let Some(b) = s.bytes.get_mut(usize::from(slot)) {
            *b += bytes as f64;
        }
    }

    /// Forgets a slot (its replica was removed, replaced or restarted).
    pub fn clear(&self, slot: u16) {
        if let Some(b) = self.state.lock().bytes.get_mut(usize::from(slot)) {
            *b = 0.0;
        }
    }

    /// The decayed churn of each of `slots`, in their order.
    pub fn of(
        &self,
        slots: impl Iterator<Item = u16>,
        now_ms: u64,
    ) -> smallvec::SmallVec<[f64; 16]> {
        let mut s = self.state.lock();
        self.decay(&mut s, now_ms);
        slots
            .map(|slot| s.bytes.get(usize::from(slot)).copied().unwrap_or(0.0))
            .collect()
    }
}

/// Which of `churn` may take an unseen prefix: at most `(1+ε)` times the mean.
/// The least churned always qualifies (the minimum never exceeds the mean).
pub fn within_bound(churn: &[f64], epsilon: f64) -> impl Fn(usize) -> bool + '_ {
    let mean = churn.iter().sum::<f64>() / churn.len().max(1) as f64;
    let limit = (1.0 + epsilon.max(0.0)) * mean;
    move |i| churn.get(i).is_none_or(|&c| c <= limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn churn_halves_every_halflife() {
        let m = ChurnMeter::new(1000);
        m.add(0, 1000, 0);
        m.add(1, 500, 0);
        let c = m.of([0, 1, 2].into_iter(), 1000);
        assert!((c[0] - 500.0).abs() < 1e-6, "{c:?}");
        assert!((c[1] - 250.0).abs() < 1e-6, "{c:?}");
        assert_eq!(c[2], 0.0);
        // A clock that goes backwards (another worker's older timestamp) does
        // not un-decay anything.
        m.add(0, 100, 500);
        let c = m.of([0].into_iter(), 1000);
        assert!((c[0] - 600.0).abs() < 1e-6, "{c:?}");
    }

    #[test]
    fn clear_forgets_one_slot() {
        let m = ChurnMeter::new(1000);
        m.add(3, 10, 0);
        m.add(4, 10, 0);
        m.clear(3);
        assert_eq!(m.of([3, 4].into_iter(), 0).to_vec(), vec![0.0, 10.0]);
    }

    #[test]
    fn bound_admits_the_least_churned_and_rejects_outliers() {
        let churn = [100.0, 100.0, 100.0, 300.0];
        let ok = within_bound(&churn, 0.25);
        assert!(ok(0) && ok(1) && ok(2));
        assert!(!ok(3), "300 > 1.25 x 150");
        let zeros = [0.0; 4];
        let ok = within_bound(&zeros, 0.0);
        assert!((0..4).all(ok), "an empty meter bounds nothing");
    }
}
