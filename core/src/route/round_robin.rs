use std::sync::atomic::{AtomicUsize, Ordering};

use super::{candidates, Decision, DecisionKind, RouteRequest, Router};
use crate::replica::ReplicaSet;

/// Each request to the next available replica, weights ignored.
#[derive(Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl Router for RoundRobin {
    fn name(&self) -> &'static str {
        "round-robin"
    }

    fn pick(&self, req: &RouteRequest<'_>, set: &ReplicaSet, exclude: &[u16]) -> Option<Decision> {
        let n = candidates(set, req.model, exclude, req.now_ms).count();
        if n == 0 {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let r = candidates(set, req.model, exclude, req.now_ms).nth(i)?;
        Some(Decision::simple(r.clone(), DecisionKind::RoundRobin))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::test_util::table;

    #[test]
    fn cycles_and_skips_excluded() {
        let t = table(3);
        let set = t.load();
        let rr = RoundRobin::default();
        let req = RouteRequest::default();
        let picks: Vec<u16> = (0..6)
            .map(|_| rr.pick(&req, &set, &[]).unwrap().replica.slot)
            .collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
        for _ in 0..4 {
            assert_ne!(rr.pick(&req, &set, &[1]).unwrap().replica.slot, 1);
        }
        assert!(rr.pick(&req, &set, &[0, 1, 2]).is_none());
    }
}
