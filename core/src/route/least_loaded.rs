use super::{candidates, Decision, DecisionKind, RouteRequest, Router};
use crate::replica::ReplicaSet;

/// Fewest in-flight requests from this proxy, weighted; ties by snapshot order
/// rotated by the clock so equal replicas share the load.
pub struct LeastLoaded;

impl Router for LeastLoaded {
    fn name(&self) -> &'static str {
        "least-loaded"
    }

    fn pick(&self, req: &RouteRequest<'_>, set: &ReplicaSet, exclude: &[u16]) -> Option<Decision> {
        let n = set.replicas.len().max(1);
        let best = candidates(set, req.model, exclude, req.now_ms).min_by_key(|r| {
            let w = r.spec.weight.max(1) as u64;
            // in_flight / weight compared without division; then rotate ties.
            let load = (r.in_flight() as u64 * 1_000_000) / w;
            let tie = (r.slot as u64 + req.now_ms) % n as u64;
            (load, tie)
        })?;
        Some(Decision::simple(best.clone(), DecisionKind::LeastLoaded))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::test_util::table;

    #[test]
    fn picks_fewest_in_flight() {
        let t = table(3);
        let set = t.load();
        let _a = set.replicas[0].begin(0);
        let _b = set.replicas[0].begin(0);
        let _c = set.replicas[2].begin(0);
        let d = LeastLoaded
            .pick(&RouteRequest::default(), &set, &[])
            .unwrap();
        assert_eq!(d.replica.slot, 1);
        let d = LeastLoaded
            .pick(&RouteRequest::default(), &set, &[1])
            .unwrap();
        assert_eq!(d.replica.slot, 2);
    }
}
