//! How much new prompt content each replica has been handed lately: the blocks
//! routed there that its cache did not hold, each forgotten as the fleet takes
//! more writes, at `e^(−w/H)` after `w` more blocks written anywhere, `H` being
//! what the whole fleet's caches hold.
//!
//! Why this and not the blocks each replica holds: once every cache is full,
//! every replica holds its budget, and the count says nothing. What does differ
//! is the churn: a replica given the big tenants evicts faster than one given
//! the small ones, and a new prefix placed there pushes out someone's prefix
//! that is still in use. The horizon is the fleet's own capacity, so no
//! default depends on a fleet's size, speed or prompt sizes: a write older than
//! a fleet's worth of writes is, under LRU, as good as gone anyway.
//!
//! Instances with no shared state see each about their share of the traffic,
//! so their pressures are in about the same proportions, and a choice between
//! two rendezvous candidates by a clear difference in pressure is the same in
//! each.
#![forbid(unsafe_code)]

use parking_lot::Mutex;

use crate::replica::MAX_REPLICAS;

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    /// Decayed blocks written, as of the fleet's write count `at`.
    blocks: f64,
    at: f64,
}

#[derive(Debug)]
struct State {
    /// Blocks written to any replica since start: the clock decay runs on.
    written: f64,
    /// The fleet's cache capacity in blocks (at least 1).
    horizon: f64,
    slots: [Slot; MAX_REPLICAS],
}

/// Every slot's write pressure.
#[derive(Debug)]
pub struct WritePressure {
    state: Mutex<State>,
}

impl Default for WritePressure {
    fn default() -> Self {
        WritePressure {
            state: Mutex::new(State {
                written: 0.0,
                horizon: 1.0,
                slots: [Slot::default(); MAX_REPLICAS],
            }),
        }
    }
}

impl State {
    fn decayed(&self, s: &Slot) -> f64 {
        s.blocks * (-(self.written - s.at) / self.horizon).exp()
    }
}

impl WritePressure {
    /// Sets the fleet's cache capacity in blocks, the horizon of the decay.
    pub fn set_horizon(&self, blocks: u64) {
        self.state.lock().horizon = (blocks as f64).max(1.0);
    }

    /// `blocks` new blocks were routed to `slot`.
    pub fn record(&self, slot: u16, blocks: u64) {
        if blocks == 0 {
            return;
        }
        let mut st = self.state.lock();
        st.written += blocks as f64;
        let Some(s) = st.slots.get(usize::from(slot)).copied() else {
            return;
        };
        let now = Slot {
            blocks: st.decayed(&s) + blocks as f64,
            at: st.written,
        };
        st.slots[usize::from(slot)] = now;
    }

    /// The decayed blocks written to `slot`.
    pub fn get(&self, slot: u16) -> f64 {
        let st = self.state.lock();
        st.slots
            .get(usize::from(slot))
            .map_or(0.0, |s| st.decayed(s))
    }

    /// Forgets `slot` (its replica was removed or restarted).
    pub fn clear(&self, slot: u16) {
        if let Some(s) = self.state.lock().slots.get_mut(usize::from(slot)) {
            *s = Slot::default();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_add_up_and_are_forgotten_over_a_fleets_worth_of_writes() {
        let p = WritePressure::default();
        p.set_horizon(1000);
        p.record(0, 100);
        assert!((p.get(0) - 100.0).abs() < 1e-9);
        assert_eq!(p.get(1), 0.0);
        // Writes elsewhere age slot 0's: after one horizon, to 1/e.
        p.record(1, 1000);
        assert!((p.get(0) - 100.0 / std::f64::consts::E).abs() < 1e-6);
        assert!((p.get(1) - 1000.0).abs() < 1e-9);
        // Its own writes add to what is left.
        p.record(0, 10);
        let after = 100.0 * (-1.01f64).exp() + 10.0;
        assert!((p.get(0) - after).abs() < 1e-6, "{}", p.get(0));
        p.clear(1);
        assert_eq!(p.get(1), 0.0);
    }

    #[test]
    fn out_of_range_slots_and_empty_writes_change_nothing() {
        let p = WritePressure::default();
        p.record(0, 0);
        p.record(u16::MAX, 5);
        assert_eq!(p.get(0), 0.0);
        assert_eq!(p.get(u16::MAX), 0.0);
        p.clear(u16::MAX);
    }
}
