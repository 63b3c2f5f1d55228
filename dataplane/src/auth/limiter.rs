//! Per-key token buckets: requests per second and prompt bytes per second.
//!
//! A bucket holds at most one second's worth (`burst = rate`) and starts full.
//! A request costing more than the whole bucket (a prompt larger than a
//! second's bytes) is let through when the bucket is full and leaves it in
//! debt, so huge prompts are slowed to the rate rather than refused forever.
//!
//! A small lock per bucket rather than the `governor` crate: governor refuses a
//! cost above its burst outright (`InsufficientCapacity`), which is the one
//! rule here it cannot express, and its clock is its own, while these buckets
//! take `now` from the caller, so tests drive them with no sleeps. The lock is
//! held for a few arithmetic operations and shared only by the requests of one
//! key, across the worker threads.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

pub struct TokenBucket {
    /// Tokens added per second; also the bucket's size.
    rate: f64,
    state: Mutex<State>,
}

struct State {
    /// Negative while in debt after an oversized request.
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket of `rate` tokens refilled at `rate` per second.
    pub fn new(rate: f64, now: Instant) -> TokenBucket {
        TokenBucket {
            rate,
            state: Mutex::new(State {
                tokens: rate,
                at: now,
            }),
        }
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Takes `cost` tokens at `now`, or says how long until they are there.
    pub fn take(&self, cost: f64, now: Instant) -> Result<(), Duration> {
        let mut s = self.state.lock();
        // Another thread may have taken its `now` earlier but the lock later:
        // time never runs backwards here.
        let elapsed = now.saturating_duration_since(s.at).as_secs_f64();
        s.tokens = (s.tokens + elapsed * self.rate).min(self.rate);
        s.at = s.at.max(now);
        let full = s.tokens >= self.rate;
        if s.tokens >= cost || (cost > self.rate && full) {
            s.tokens -= cost;
            return Ok(());
        }
        // An oversized request waits for a full bucket, any other for its cost.
        let need = cost.min(self.rate) - s.tokens;
        Err(Duration::from_secs_f64(need / self.rate))
    }
}

/// `Retry-After` in whole seconds: rounded up so a client that waits that
/// long finds the tokens there, and at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_nanos().div_ceil(1_000_000_000) as u64).max(1)
}

/// One key's buckets; absent where the key has no such limit.
pub struct Limiter {
    pub requests: Option<TokenBucket>,
    pub prompt_bytes: Option<TokenBucket>,
}

impl Limiter {
    pub fn new(rps: Option<f64>, prompt_bytes_per_s: Option<f64>, now: Instant) -> Limiter {
        Limiter {
            requests: rps.map(|r| TokenBucket::new(r, now)),
            prompt_bytes: prompt_bytes_per_s.map(|r| TokenBucket::new(r, now)),
        }
    }

    /// Whether this limiter enforces the same limits (a reload keeps its state then).
    pub fn same_limits(&self, rps: Option<f64>, prompt_bytes_per_s: Option<f64>) -> bool {
        self.requests.as_ref().map(TokenBucket::rate) == rps
            && self.prompt_bytes.as_ref().map(TokenBucket::rate) == prompt_bytes_per_s
    }

    /// One request at `now`; `Err` is the wait.
    pub fn request(&self, now: Instant) -> Result<(), Duration> {
        self.requests.as_ref().map_or(Ok(()), |b| b.take(1.0, now))
    }

    /// `bytes` of prompt at `now`; `Err` is the wait.
    pub fn prompt(&self, bytes: usize, now: Instant) -> Result<(), Duration> {
        self.prompt_bytes
            .as_ref()
            .map_or(Ok(()), |b| b.take(bytes as f64, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// `r` is a wait of `want`, to within float rounding.
    fn waits(r: Result<(), Duration>, want: Duration) {
        let got = r.expect_err("should wait");
        assert!(
            got.abs_diff(want) < Duration::from_micros(1),
            "{got:?} != {want:?}"
        );
    }

    #[test]
    fn burst_is_one_second_then_the_rate() {
        let t0 = Instant::now();
        let b = TokenBucket::new(10.0, t0);
        for _ in 0..10 {
            assert_eq!(b.take(1.0, t0), Ok(()));
        }
        waits(b.take(1.0, t0), 100 * MS);
        // Refused requests cost nothing: still 100 ms to wait.
        waits(b.take(1.0, t0), 100 * MS);
        waits(b.take(1.0, t0 + 50 * MS), 50 * MS);
        assert_eq!(b.take(1.0, t0 + 100 * MS), Ok(()));
        // A long pause refills to the burst, not beyond.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..10 {
            assert_eq!(b.take(1.0, later), Ok(()));
        }
        assert!(b.take(1.0, later).is_err());
    }

    #[test]
    fn fractional_rates_and_costs() {
        let t0 = Instant::now();
        // Half a request per second: the bucket holds less than one request,
        // which then passes only from a full bucket, once every two seconds.
        let b = TokenBucket::new(0.5, t0);
        assert_eq!(b.take(1.0, t0), Ok(()));
        waits(b.take(1.0, t0), Duration::from_secs(2));
        assert!(b.take(1.0, t0 + 1999 * MS).is_err());
        assert_eq!(b.take(1.0, t0 + 2000 * MS), Ok(()));
    }

    #[test]
    fn an_oversized_cost_passes_a_full_bucket_and_leaves_debt() {
        let t0 = Instant::now();
        let b = TokenBucket::new(1000.0, t0);
        assert_eq!(b.take(5000.0, t0), Ok(()), "full: let through");
        // 4000 in debt: a small request waits for the debt and its own cost ...
        waits(b.take(10.0, t0), 4010 * MS);
        // ... another oversized one for the debt and a full bucket.
        waits(b.take(5000.0, t0), Duration::from_secs(5));
        assert_eq!(b.take(5000.0, t0 + Duration::from_secs(5)), Ok(()));
        // Not full: an oversized cost waits for it to be.
        let b = TokenBucket::new(1000.0, t0);
        b.take(1.0, t0).unwrap();
        waits(b.take(1e6, t0), MS);
        assert_eq!(b.take(1e6, t0 + MS), Ok(()));
    }

    #[test]
    fn time_never_runs_backwards() {
        let t0 = Instant::now();
        let b = TokenBucket::new(1.0, t0 + Duration::from_secs(1));
        assert_eq!(b.take(1.0, t0), Ok(()));
        assert!(b.take(1.0, t0).is_err());
        assert_eq!(b.take(1.0, t0 + Duration::from_secs(2)), Ok(()));
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(MS), 1);
        assert_eq!(retry_after_secs(1000 * MS), 1);
        assert_eq!(retry_after_secs(1001 * MS), 2);
        assert_eq!(retry_after_secs(Duration::from_nanos(1_000_000_001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs_f64(4.01)), 5);
    }

    #[test]
    fn limiter_without_limits_allows_everything() {
        let t0 = Instant::now();
        let l = Limiter::new(None, None, t0);
        for _ in 0..1000 {
            assert_eq!(l.request(t0), Ok(()));
            assert_eq!(l.prompt(1 << 30, t0), Ok(()));
        }
        assert!(l.same_limits(None, None));
        let l = Limiter::new(Some(2.0), Some(100.0), t0);
        assert!(l.same_limits(Some(2.0), Some(100.0)));
        assert!(!l.same_limits(Some(2.0), None));
        assert_eq!(l.prompt(60, t0), Ok(()));
        waits(l.prompt(60, t0), 200 * MS);
    }
}
