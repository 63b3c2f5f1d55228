//! Health of one replica from active checks and the data plane's passive signal,
//! with rise/fall thresholds so one lost probe does not flap a replica.

use std::time::{Duration, Instant};

use crate::error::{ControlError, Result};
use crate::http::{self, Target};

#[derive(Debug, Clone)]
pub struct Health {
    /// `None` until the first observation: a replica is neither pushed as
    /// healthy nor as failed before anything is known about it.
    healthy: Option<bool>,
    ok_streak: u32,
    fail_streak: u32,
    /// When the current state began (the longest-healthy standby is promoted first).
    since: Instant,
    rise: u32,
    fall: u32,
}

impl Health {
    /// A replica first seen at `now`, nothing known of it yet.
    pub fn new(rise: u32, fall: u32, now: Instant) -> Health {
        Health {
            healthy: None,
            ok_streak: 0,
            fail_streak: 0,
            since: now,
            rise: rise.max(1),
            fall: fall.max(1),
        }
    }

    pub fn set_thresholds(&mut self, rise: u32, fall: u32) {
        self.rise = rise.max(1);
        self.fall = fall.max(1);
    }

    pub fn known(&self) -> bool {
        self.healthy.is_some()
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy == Some(true)
    }

    /// Known to have failed (unknown is not down).
    pub fn is_down(&self) -> bool {
        self.healthy == Some(false)
    }

    pub fn since(&self) -> Instant {
        self.since
    }

    /// Records one observation; returns true when the state changed. The first
    /// observation decides at once: waiting `rise` checks before a freshly started
    /// daemon lets any traffic through would be an outage of its own making.
    pub fn observe(&mut self, ok: bool, now: Instant) -> bool {
        if ok {
            self.ok_streak += 1;
            self.fail_streak = 0;
        } else {
            self.fail_streak += 1;
            self.ok_streak = 0;
        }
        let next = match self.healthy {
            None => Some(ok),
            Some(true) if self.fail_streak >= self.fall => Some(false),
            Some(false) if self.ok_streak >= self.rise => Some(true),
            cur => cur,
        };
        if next != self.healthy {
            self.healthy = next;
            self.since = now;
            true
        } else {
            false
        }
    }
}

/// One active check: `GET path` answered 2xx within `timeout`. A failure is
/// the request's own error, or [`ControlError::Unhealthy`] for an answer
/// other than 2xx.
pub async fn probe(target: &Target, path: &str, timeout: Duration) -> Result<()> {
    let r = http::request(target, "GET", path, None, timeout).await?;
    if (200..300).contains(&r.status) {
        Ok(())
    } else {
        Err(ControlError::Unhealthy { status: r.status })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_observation_decides_then_thresholds_apply() {
        let t = Instant::now();
        let mut h = Health::new(2, 3, t);
        assert!(!h.known());
        assert!(h.observe(true, t));
        assert!(h.is_healthy());
        // Two failures are under fall=3; a success in between resets the streak.
        assert!(!h.observe(false, t));
        assert!(!h.observe(false, t));
        assert!(!h.observe(true, t));
        assert!(!h.observe(false, t));
        assert!(!h.observe(false, t));
        assert!(h.observe(false, t));
        assert!(!h.is_healthy());
        // rise=2
        assert!(!h.observe(true, t));
        assert!(!h.observe(false, t));
        assert!(!h.observe(true, t));
        assert!(h.observe(true, t));
        assert!(h.is_healthy());
    }

    #[test]
    fn first_failure_marks_down_at_once() {
        let t = Instant::now();
        let mut h = Health::new(2, 2, t);
        assert!(h.observe(false, t));
        assert!(h.known() && !h.is_healthy());
    }
}
