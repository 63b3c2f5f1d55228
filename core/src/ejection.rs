//! Passive health: a replica that keeps failing leaves rotation for a while
//! (outlier ejection, after Envoy's).
//!
//! After `eject_after_failures` consecutive failed attempts the replica is
//! ejected for `eject_base_ms`, doubled on each ejection that follows without a
//! success in between, up to `eject_max_ms`. When the time is up it is
//! half-open: one request (the probe) may go to it; its success readmits the
//! replica and resets the backoff, its failure ejects it again at once.
//!
//! The state is a handful of atomics shared by every worker, with time passed
//! in (`now_ms`), so the machine is tested without I/O or a real clock.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwapOption;

/// When to eject and for how long (`[upstream] eject_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EjectionPolicy {
    /// Consecutive failures that eject; 0 turns ejection off.
    pub after_failures: u32,
    pub base_ms: u64,
    pub max_ms: u64,
}

/// What a failure did to the replica's standing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Still in rotation (below the threshold, ejection off, or kept as the
    /// last replica standing).
    Kept,
    /// Out of rotation until this time, from now on.
    Ejected { until_ms: u64 },
    /// Already out until this time (a request begun before the ejection
    /// ending badly).
    AlreadyOut { until_ms: u64 },
}

pub use kvroute_admin_api::EjectionState;

/// Per-replica ejection state, shared across spec changes of the replica.
#[derive(Debug, Default)]
pub struct Ejection {
    /// Failed attempts since the last success.
    consecutive_failures: AtomicU32,
    /// Out of rotation until this time; 0: in rotation.
    until_ms: AtomicU64,
    /// Ejections since the last success: the backoff's exponent.
    streak: AtomicU32,
    /// While half-open, a probe was sent and no other may go before this time
    /// (a lease, so a probe whose request vanished does not block readmission).
    probe_until_ms: AtomicU64,
    /// Ejections ever, for `kvroute_replica_ejections_total`.
    total: AtomicU64,
    /// Why the latest ejection happened, for `/state`.
    reason: ArcSwapOption<String>,
}

impl Ejection {
    /// Whether a request may be routed to the replica at `now_ms`: in rotation,
    /// or half-open with no probe under way.
    pub fn admits(&self, now_ms: u64) -> bool {
        let until = self.until_ms.load(Ordering::Acquire);
        until == 0 || (now_ms >= until && now_ms >= self.probe_until_ms.load(Ordering::Acquire))
    }

    /// A request is being sent to the replica: if it is half-open, this one is
    /// the probe, and others wait until its lease (`lease_ms`) runs out.
    pub fn on_attempt(&self, now_ms: u64, lease_ms: u64) {
        if self.until_ms.load(Ordering::Acquire) != 0 {
            self.probe_until_ms
                .store(now_ms.saturating_add(lease_ms.max(1)), Ordering::Release);
        }
    }

    /// A response came back whole at `now_ms`: the replica is in rotation, its
    /// backoff reset. One begun before an ejection and ending inside it
    /// changes nothing: the ejection runs its course and the probe decides.
    pub fn on_success(&self, now_ms: u64) {
        let until = self.until_ms.load(Ordering::Acquire);
        if until != 0 && now_ms < until {
            return;
        }
        self.consecutive_failures.store(0, Ordering::Relaxed);
        if until != 0 {
            self.until_ms.store(0, Ordering::Release);
            self.probe_until_ms.store(0, Ordering::Release);
        }
        self.streak.store(0, Ordering::Relaxed);
    }

    /// An attempt failed at `now_ms` for `reason`. `may_eject` says whether the
    /// rest of the fleet can take the replica's share (asked only when the
    /// threshold is reached).
    pub fn on_failure(
        &self,
        now_ms: u64,
        policy: &EjectionPolicy,
        reason: &str,
        may_eject: impl FnOnce() -> bool,
    ) -> Verdict {
        let failures = self
            .consecutive_failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if policy.after_failures == 0 {
            return Verdict::Kept;
        }
        let until = self.until_ms.load(Ordering::Acquire);
        if until != 0 && now_ms < until {
            return Verdict::AlreadyOut { until_ms: until };
        }
        // Half-open (a failed probe) ejects at once; in rotation, the threshold.
        let half_open = until != 0;
        if !half_open && failures < policy.after_failures {
            return Verdict::Kept;
        }
        if !may_eject() {
            return Verdict::Kept;
        }
        let streak = self.streak.fetch_add(1, Ordering::Relaxed);
        let span = policy
            .base_ms
            .max(1)
            .saturating_mul(1u64 << streak.min(32))
            .min(policy.max_ms.max(policy.base_ms).max(1));
        let until_ms = now_ms.saturating_add(span).max(1);
        self.until_ms.store(until_ms, Ordering::Release);
        self.probe_until_ms.store(0, Ordering::Release);
        self.total.fetch_add(1, Ordering::Relaxed);
        self.reason.store(Some(Arc::new(reason.to_string())));
        Verdict::Ejected { until_ms }
    }

    /// Out of rotation at `now_ms` (half-open with a probe under way counts).
    pub fn is_ejected(&self, now_ms: u64) -> bool {
        !self.admits(now_ms)
    }

    /// When the current ejection ends, if one was decided and no success has
    /// readmitted the replica since (it may be half-open by now).
    pub fn until_ms(&self) -> Option<u64> {
        Some(self.until_ms.load(Ordering::Acquire)).filter(|u| *u != 0)
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// The `/state` view at `now_ms`.
    pub fn state(&self, now_ms: u64) -> EjectionState {
        EjectionState {
            ejected: self.is_ejected(now_ms),
            ejected_for_ms: self
                .until_ms()
                .map(|u| u.saturating_sub(now_ms))
                .filter(|left| *left > 0),
            reason: self.reason(),
            consecutive_failures: self.consecutive_failures(),
            ejections_total: self.total(),
        }
    }

    /// Why the replica was last ejected, while it is not readmitted.
    pub fn reason(&self) -> Option<String> {
        self.until_ms()?;
        self.reason.load_full().map(|r| r.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: EjectionPolicy = EjectionPolicy {
        after_failures: 3,
        base_ms: 5_000,
        max_ms: 12_000,
    };

    fn fail(e: &Ejection, now: u64) -> Verdict {
        e.on_failure(now, &POLICY, "invalid response", || true)
    }

    #[test]
    fn ejects_after_threshold_and_probes_once_when_time_is_up() {
        let e = Ejection::default();
        assert_eq!(fail(&e, 100), Verdict::Kept);
        assert_eq!(fail(&e, 200), Verdict::Kept);
        assert!(e.admits(200));
        assert_eq!(fail(&e, 300), Verdict::Ejected { until_ms: 5_300 });
        assert!(!e.admits(300));
        assert!(!e.admits(5_299));
        assert_eq!(e.reason().as_deref(), Some("invalid response"));
        assert_eq!(e.total(), 1);
        // Half-open: one probe goes, the next request waits for its outcome.
        assert!(e.admits(5_300));
        e.on_attempt(5_300, 1_000);
        assert!(!e.admits(5_301));
        // The probe fails: out again at once, for twice as long.
        assert_eq!(fail(&e, 5_400), Verdict::Ejected { until_ms: 15_400 });
        assert!(!e.admits(15_399));
        // Doubling stops at the maximum.
        assert!(e.admits(15_400));
        e.on_attempt(15_400, 1_000);
        assert_eq!(fail(&e, 15_500), Verdict::Ejected { until_ms: 27_500 });
        assert_eq!(e.total(), 3);
        // A successful probe readmits and resets the backoff.
        e.on_attempt(27_500, 1_000);
        e.on_success(27_600);
        assert!(e.admits(27_501));
        assert_eq!(e.until_ms(), None);
        assert_eq!(e.reason(), None);
        assert_eq!(e.consecutive_failures(), 0);
        assert_eq!(fail(&e, 30_000), Verdict::Kept);
        assert_eq!(fail(&e, 30_001), Verdict::Kept);
        assert_eq!(fail(&e, 30_002), Verdict::Ejected { until_ms: 35_002 });
    }

    #[test]
    fn success_between_failures_resets_the_count() {
        let e = Ejection::default();
        fail(&e, 1);
        fail(&e, 2);
        e.on_success(3);
        assert_eq!(fail(&e, 3), Verdict::Kept);
        assert_eq!(fail(&e, 4), Verdict::Kept);
        assert!(e.admits(4));
    }

    #[test]
    fn a_probe_that_never_reports_releases_its_lease() {
        let e = Ejection::default();
        for t in 0..3 {
            fail(&e, t);
        }
        e.on_attempt(5_002, 800);
        assert!(!e.admits(5_500));
        assert!(e.admits(5_802));
    }

    #[test]
    fn failures_while_ejected_do_not_extend_it() {
        let e = Ejection::default();
        for t in 0..3 {
            fail(&e, t);
        }
        assert_eq!(fail(&e, 10), Verdict::AlreadyOut { until_ms: 5_002 });
        assert_eq!(e.total(), 1);
        // Nor does a success inside it end it early.
        e.on_success(20);
        assert!(!e.admits(20));
        let st = e.state(2_002);
        assert!(st.ejected);
        assert_eq!(st.ejected_for_ms, Some(3_000));
        assert_eq!(st.reason.as_deref(), Some("invalid response"));
        assert_eq!(st.ejections_total, 1);
    }

    #[test]
    fn last_replica_standing_and_zero_threshold_stay_in() {
        let e = Ejection::default();
        for t in 0..5 {
            assert_eq!(
                e.on_failure(t, &POLICY, "connect refused", || false),
                Verdict::Kept
            );
        }
        assert!(e.admits(5));
        assert_eq!(e.total(), 0);
        let off = EjectionPolicy {
            after_failures: 0,
            ..POLICY
        };
        let e = Ejection::default();
        for t in 0..10 {
            assert_eq!(e.on_failure(t, &off, "x", || true), Verdict::Kept);
        }
        assert_eq!(e.consecutive_failures(), 10);
    }
}
