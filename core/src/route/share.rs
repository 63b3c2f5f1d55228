//! Each replica's share of recent decisions, and what moving a request off a
//! replica that takes more than its share is worth.
//!
//! The in-flight bound ([`super::consistent::LoadBound`]) catches a replica
//! that is overloaded now; on a fleet with headroom it never acts (a few
//! requests in flight everywhere), and a hot prefix — the largest tenant of a
//! skewed fleet, with the smaller tenants that happened to land beside it —
//! keeps one replica at twice the others' traffic until the load rises enough
//! to hurt. The share bound spreads that traffic before it hurts, at the least
//! cache cost: a replica over `(1+ε)` times its share of the last
//! [`WINDOW`] decisions gives up those requests whose move costs the least
//! predicted time, and no others. A replica's share is in proportion to its
//! configured weight.
//!
//! What a move may cost is a price per replica, in seconds of predicted time
//! to first token, found as it goes: it rises by a share of each move refused
//! as too dear while the replica is over its share, and falls back while the
//! replica is within it. So the first moves are the free
//! ones (a new conversation of a tenant another replica also holds), then the
//! cheapest (opening a second home for a hot tenant's system prompt, paid
//! once), and the moves that would cost a conversation its history come last,
//! if ever. Instances that split the requests between them see about the same
//! shares, so they move about the same requests.
//!
//! No clock and no I/O: the router hands in each decision.
#![forbid(unsafe_code)]

use parking_lot::Mutex;

use crate::replica::MAX_REPLICAS;

/// Decisions a share is measured over (an exponential window).
pub const WINDOW: f64 = 256.0;

/// The price's fall per decision the replica is within its share: it halves in
/// about 22 such decisions.
const PRICE_DECAY: f64 = 1.0 / 32.0;

/// Of a refused move's cost, what the price rises by: after about four refusals
/// of alike moves, the next is taken.
const PRICE_STEP: f64 = 0.25;

struct State {
    share: [f64; MAX_REPLICAS],
    price: [f64; MAX_REPLICAS],
    decisions: u64,
}

/// Every slot's share and price.
pub struct Shares {
    state: Mutex<State>,
}

impl Default for Shares {
    fn default() -> Self {
        Shares {
            state: Mutex::new(State {
                share: [0.0; MAX_REPLICAS],
                price: [0.0; MAX_REPLICAS],
                decisions: 0,
            }),
        }
    }
}

/// One candidate as the share bound sees it.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub slot: u16,
    /// What the replica's share is in proportion to: its configured weight.
    pub weight: f64,
}

impl Shares {
    /// Which of `cands` are over `(1+epsilon)` times their weighted share, as a
    /// mask of positions in `cands` (bit i: `cands[i]`). None is until a window
    /// of decisions has been seen: a share of a handful is noise.
    pub fn over(&self, cands: &[Entry], epsilon: f64) -> u128 {
        let st = self.state.lock();
        if (st.decisions as f64) < WINDOW {
            return 0;
        }
        let total_weight: f64 = cands.iter().map(|c| c.weight.max(0.0)).sum();
        let total_share: f64 = cands.iter().map(|c| share_of(&st, c.slot)).sum();
        if total_weight <= 0.0 || total_share <= 0.0 {
            return 0;
        }
        cands.iter().enumerate().fold(0u128, |mask, (i, c)| {
            let fair = total_share * c.weight.max(0.0) / total_weight;
            if share_of(&st, c.slot) > (1.0 + epsilon.max(0.0)) * fair {
                mask | (1u128 << i)
            } else {
                mask
            }
        })
    }

    /// The seconds of predicted time to first token a move off `slot` may cost
    /// now.
    pub fn price(&self, slot: u16) -> f64 {
        let st = self.state.lock();
        st.price.get(usize::from(slot)).copied().unwrap_or(0.0)
    }

    /// A decision went to `chosen`, over its share or not; `refused_s` is what
    /// the move it refused would have cost (0 for none).
    pub fn record(&self, chosen: u16, chosen_over: bool, refused_s: f64) {
        let mut st = self.state.lock();
        st.decisions = st.decisions.saturating_add(1);
        let keep = 1.0 - 1.0 / WINDOW;
        for s in st.share.iter_mut() {
            *s *= keep;
        }
        let i = usize::from(chosen);
        if let Some(s) = st.share.get_mut(i) {
            *s += 1.0 / WINDOW;
        }
        if let Some(p) = st.price.get_mut(i) {
            if chosen_over {
                *p += PRICE_STEP * refused_s.max(0.0);
            } else {
                *p *= 1.0 - PRICE_DECAY;
            }
        }
    }

    /// Forget a slot (its replica was removed or replaced).
    pub fn clear(&self, slot: u16) {
        let mut st = self.state.lock();
        let i = usize::from(slot);
        if let Some(s) = st.share.get_mut(i) {
            *s = 0.0;
        }
        if let Some(p) = st.price.get_mut(i) {
            *p = 0.0;
        }
    }
}

fn share_of(st: &State, slot: u16) -> f64 {
    st.share.get(usize::from(slot)).copied().unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn four() -> [Entry; 4] {
        [0, 1, 2, 3].map(|slot| Entry { slot, weight: 1.0 })
    }

    #[test]
    fn nobody_is_over_before_a_window_of_decisions() {
        let s = Shares::default();
        for _ in 0..(WINDOW as usize - 1) {
            s.record(0, false, 1000.0);
        }
        assert_eq!(s.over(&four(), 0.25), 0);
        s.record(0, false, 1000.0);
        assert_eq!(s.over(&four(), 0.25), 0b0001);
    }

    #[test]
    fn an_even_spread_is_within_the_bound_and_a_hot_replica_is_not() {
        let s = Shares::default();
        for i in 0..2048u16 {
            s.record(i % 4, false, 1000.0);
        }
        assert_eq!(s.over(&four(), 0.25), 0);
        // Half of the decisions to slot 2, a sixth to each other: twice its
        // fair quarter.
        let others = [0u16, 1, 3];
        for i in 0..2048usize {
            let slot = if i % 2 == 0 { 2 } else { others[(i / 2) % 3] };
            s.record(slot, false, 1000.0);
        }
        assert_eq!(s.over(&four(), 0.25), 0b0100);
        // Weighted: slot 2 at weight 3 of 6 is allowed 0.5 · 1.25.
        let mut weighted = four();
        weighted[2].weight = 3.0;
        assert_eq!(s.over(&weighted, 0.25), 0);
    }

    #[test]
    fn the_share_is_of_the_candidates_only() {
        let s = Shares::default();
        for i in 0..2048u16 {
            s.record(i % 4, false, 1000.0);
        }
        // Among slots 0 and 1 alone, both hold half of their joint share.
        let two = [
            Entry {
                slot: 0,
                weight: 1.0,
            },
            Entry {
                slot: 1,
                weight: 1.0,
            },
        ];
        assert_eq!(s.over(&two, 0.25), 0);
    }

    #[test]
    fn the_price_rises_while_over_and_falls_back_within() {
        let s = Shares::default();
        assert_eq!(s.price(1), 0.0);
        for _ in 0..4 {
            s.record(1, true, 1000.0);
        }
        assert_eq!(s.price(1), 4.0 * PRICE_STEP * 1000.0);
        let high = s.price(1);
        for _ in 0..64 {
            s.record(1, false, 1000.0);
        }
        assert!(s.price(1) < high / 4.0, "{} from {high}", s.price(1));
        // Another slot's price never moved.
        assert_eq!(s.price(0), 0.0);
        s.clear(1);
        assert_eq!(s.price(1), 0.0);
    }
}
