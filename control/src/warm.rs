//! Warm-pool decisions: when to promote a standby and when to send it back.
//!
//! Pure: the daemon hands in what it knows and a clock value, so the hysteresis
//! is tested without processes or sleeps.
// The clock is the caller's (control/clippy.toml).
#![deny(clippy::disallowed_methods)]

use std::time::{Duration, Instant};

use crate::config::WarmConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// An active replica failed.
    Failure,
    /// The active pool's queues stayed long.
    Overload,
}

#[derive(Debug, Clone)]
pub struct Candidate {
    pub url: String,
    /// Configured in pool `warm`.
    pub warm: bool,
    pub promoted: Option<Reason>,
    /// A pre-warm is running for it.
    pub promoting: bool,
    pub known: bool,
    pub healthy: bool,
    pub healthy_since: Instant,
    pub waiting: f64,
    pub draining: bool,
}

#[derive(Debug, Default)]
pub struct WarmState {
    overload_since: Option<Instant>,
    calm_since: Option<Instant>,
    surplus_since: Option<Instant>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Promote(String, Reason),
    Demote(String),
}

fn held(since: &mut Option<Instant>, now: Instant, window: Duration) -> bool {
    let s = *since.get_or_insert(now);
    if now.duration_since(s) >= window {
        *since = None;
        true
    } else {
        false
    }
}

pub fn decide(
    st: &mut WarmState,
    cands: &[Candidate],
    cfg: &WarmConfig,
    now: Instant,
) -> Option<Action> {
    if cands.iter().any(|c| c.promoting) {
        return None;
    }
    // A promoted standby that failed itself serves nobody: back to the warm pool
    // at once, so another standby can take its place.
    if let Some(c) = cands
        .iter()
        .find(|c| c.promoted.is_some() && c.known && !c.healthy)
    {
        return Some(Action::Demote(c.url.clone()));
    }
    let standby = cands
        .iter()
        .filter(|c| c.warm && c.promoted.is_none() && c.known && c.healthy && !c.draining)
        .min_by_key(|c| c.healthy_since);
    let failed = cands
        .iter()
        .filter(|c| !c.warm && !c.draining && c.known && !c.healthy)
        .count();
    let for_failure: Vec<&Candidate> = cands
        .iter()
        .filter(|c| c.promoted == Some(Reason::Failure))
        .collect();

    if cfg.promote_on_failure && failed > for_failure.len() {
        st.surplus_since = None;
        if let Some(s) = standby {
            return Some(Action::Promote(s.url.clone(), Reason::Failure));
        }
    } else if failed < for_failure.len() {
        // The failed replica is back: keep the standby a while in case it flaps.
        if held(&mut st.surplus_since, now, ms(cfg.demote_window_ms)) {
            return Some(Action::Demote(for_failure[0].url.clone()));
        }
    } else {
        st.surplus_since = None;
    }

    let serving: Vec<&Candidate> = cands
        .iter()
        .filter(|c| (!c.warm || c.promoted.is_some()) && c.healthy && !c.draining)
        .collect();
    if serving.is_empty() {
        st.overload_since = None;
        st.calm_since = None;
        return None;
    }
    let mean = serving.iter().map(|c| c.waiting).sum::<f64>() / serving.len() as f64;
    if mean > cfg.promote_waiting {
        st.calm_since = None;
        if standby.is_some() && held(&mut st.overload_since, now, ms(cfg.promote_window_ms)) {
            return standby.map(|s| Action::Promote(s.url.clone(), Reason::Overload));
        }
        return None;
    }
    st.overload_since = None;
    let overload_promoted = cands.iter().find(|c| c.promoted == Some(Reason::Overload));
    match overload_promoted {
        Some(p) if mean < cfg.demote_waiting => {
            if held(&mut st.calm_since, now, ms(cfg.demote_window_ms)) {
                return Some(Action::Demote(p.url.clone()));
            }
        }
        _ => st.calm_since = None,
    }
    None
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

#[cfg(test)]
// One real `Instant` as the fake clock's origin; every later time is an offset.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    fn c(url: &str, warm: bool, healthy: bool, since_s: u64, t0: Instant) -> Candidate {
        Candidate {
            url: url.into(),
            warm,
            promoted: None,
            promoting: false,
            known: true,
            healthy,
            healthy_since: t0 + Duration::from_secs(since_s),
            waiting: 0.0,
            draining: false,
        }
    }

    fn cfg() -> WarmConfig {
        WarmConfig {
            promote_window_ms: 1000,
            demote_window_ms: 3000,
            promote_waiting: 4.0,
            demote_waiting: 1.0,
            ..WarmConfig::default()
        }
    }

    #[test]
    fn failure_promotes_the_longest_healthy_standby_then_demotes_after_the_window() {
        let t0 = Instant::now();
        let mut st = WarmState::default();
        let mut v = vec![
            c("a", false, false, 0, t0),
            c("w1", true, true, 5, t0),
            c("w2", true, true, 2, t0),
        ];
        assert_eq!(
            decide(&mut st, &v, &cfg(), t0),
            Some(Action::Promote("w2".into(), Reason::Failure))
        );
        v[2].promoted = Some(Reason::Failure);
        // Still failed: nothing more to do (one promotion per failed replica).
        assert_eq!(decide(&mut st, &v, &cfg(), t0), None);
        // Back: the standby stays for the demote window, then goes.
        v[0].healthy = true;
        assert_eq!(decide(&mut st, &v, &cfg(), t0), None);
        assert_eq!(
            decide(&mut st, &v, &cfg(), t0 + Duration::from_secs(2)),
            None
        );
        assert_eq!(
            decide(&mut st, &v, &cfg(), t0 + Duration::from_secs(3)),
            Some(Action::Demote("w2".into()))
        );
    }

    #[test]
    fn flapping_resets_the_demote_window() {
        let t0 = Instant::now();
        let mut st = WarmState::default();
        let mut v = vec![c("a", false, true, 0, t0), c("w", true, true, 0, t0)];
        v[1].promoted = Some(Reason::Failure);
        assert_eq!(decide(&mut st, &v, &cfg(), t0), None);
        v[0].healthy = false;
        assert_eq!(
            decide(&mut st, &v, &cfg(), t0 + Duration::from_secs(2)),
            None
        );
        v[0].healthy = true;
        assert_eq!(
            decide(&mut st, &v, &cfg(), t0 + Duration::from_secs(4)),
            None
        );
        assert_eq!(
            decide(&mut st, &v, &cfg(), t0 + Duration::from_secs(7)),
            Some(Action::Demote("w".into()))
        );
    }

    #[test]
    fn overload_must_last_the_window_and_calm_must_last_longer() {
        let t0 = Instant::now();
        let s = |x: u64| t0 + Duration::from_millis(x);
        let mut st = WarmState::default();
        let mut v = vec![c("a", false, true, 0, t0), c("w", true, true, 0, t0)];
        v[0].waiting = 10.0;
        assert_eq!(decide(&mut st, &v, &cfg(), s(0)), None);
        // A dip resets the window.
        v[0].waiting = 2.0;
        assert_eq!(decide(&mut st, &v, &cfg(), s(500)), None);
        v[0].waiting = 10.0;
        assert_eq!(decide(&mut st, &v, &cfg(), s(600)), None);
        assert_eq!(decide(&mut st, &v, &cfg(), s(1500)), None);
        assert_eq!(
            decide(&mut st, &v, &cfg(), s(1600)),
            Some(Action::Promote("w".into(), Reason::Overload))
        );
        v[1].promoted = Some(Reason::Overload);
        // Between the thresholds: no demotion however long.
        v[0].waiting = 2.0;
        v[1].waiting = 2.0;
        assert_eq!(decide(&mut st, &v, &cfg(), s(2000)), None);
        assert_eq!(decide(&mut st, &v, &cfg(), s(9000)), None);
        v[0].waiting = 0.0;
        v[1].waiting = 0.0;
        assert_eq!(decide(&mut st, &v, &cfg(), s(9100)), None);
        assert_eq!(
            decide(&mut st, &v, &cfg(), s(12100)),
            Some(Action::Demote("w".into()))
        );
    }

    #[test]
    fn a_promoted_standby_that_fails_is_replaced() {
        let t0 = Instant::now();
        let mut st = WarmState::default();
        let mut v = vec![
            c("a", false, false, 0, t0),
            c("w1", true, false, 0, t0),
            c("w2", true, true, 1, t0),
        ];
        v[1].promoted = Some(Reason::Failure);
        assert_eq!(
            decide(&mut st, &v, &cfg(), t0),
            Some(Action::Demote("w1".into()))
        );
        v[1].promoted = None;
        assert_eq!(
            decide(&mut st, &v, &cfg(), t0),
            Some(Action::Promote("w2".into(), Reason::Failure))
        );
    }

    #[test]
    fn an_unhealthy_or_promoting_standby_is_not_used() {
        let t0 = Instant::now();
        let mut st = WarmState::default();
        let mut v = vec![c("a", false, false, 0, t0), c("w", true, false, 0, t0)];
        assert_eq!(decide(&mut st, &v, &cfg(), t0), None);
        v[1].healthy = true;
        v[1].promoting = true;
        assert_eq!(decide(&mut st, &v, &cfg(), t0), None);
    }
}
