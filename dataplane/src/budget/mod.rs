//! The connection budget: how many client connections kvroute holds, derived
//! from the open-file limit so a flood meets a decision (shed the cheapest
//! connections, then refuse with a 503) instead of `EMFILE`, and with file
//! descriptors left for upstream connections, the admin API and the BPF maps.
//!
//! - [`Caps`]: the global and per-worker caps, from `[limits] max_connections`
//!   or derived from `RLIMIT_NOFILE`.
//! - [`registry::Registry`]: one per worker, the connections by state, and who
//!   is shed first.
//! - [`buffers::BufferPool`]: one per worker, the read buffers of connections
//!   with a request in progress.
//! - [`reclaim`]: gives memory back once a flood has ended.
//! - [`refuse`]: the answer of a connection over the cap.

pub mod buffers;
pub mod reclaim;
mod refuse;
pub mod registry;

pub use refuse::refuse;

/// Descriptors kept out of the client budget for everything that is not a
/// client or its upstream connection: the admin API's listeners and its
/// clients (`/metrics` scrapes, `/state`, the control daemon's pushes), the
/// BPF program and maps, each worker's epoll or io_uring descriptor and
/// listener, log files, the prediction cache's backend connections.
pub const FD_RESERVE: u64 = 256;

/// Share of the per-worker cap above which the oldest head-less, then idle
/// connections are shed to make room for new ones, in percent.
pub const HIGH_WATERMARK_PERCENT: usize = 90;

/// The caps in force: `/state` shows them as they are (the admin API's
/// `ConnectionBudget`), so they are defined once, there.
pub use kvroute_admin_api::ConnectionBudget as Caps;

/// The global cap `RLIMIT_NOFILE` allows: `(nofile - reserve) / 2`, where the
/// reserve is [`FD_RESERVE`] (a quarter of `nofile` when that is smaller), and
/// the halving leaves each client connection room for one upstream
/// connection. Idle pooled upstream connections fit in that half too: a
/// worker's pool holds at most the connections its past requests used, which
/// were each paired with a client, and closes them within
/// `[upstream] pool_idle_timeout_ms`. At least 1.
pub fn derived_max_connections(nofile: u64) -> usize {
    let reserve = FD_RESERVE.min(nofile / 4);
    (nofile.saturating_sub(reserve) / 2).clamp(1, usize::MAX as u64) as usize
}

/// The caps for `configured` (`[limits] max_connections`, 0 = derive) on
/// `workers` workers with `nofile` descriptors allowed.
pub fn caps(configured: usize, workers: usize, nofile: u64) -> Caps {
    let derived = configured == 0;
    let max_connections = if derived {
        derived_max_connections(nofile)
    } else {
        configured
    };
    let per_worker = max_connections.div_ceil(workers.max(1));
    Caps {
        max_connections,
        per_worker,
        high_watermark: high_watermark(per_worker),
        nofile,
        closing_max: closing_max(nofile, workers),
        derived,
    }
}

/// True when a configured cap needs more descriptors than `nofile` allows,
/// so `EMFILE` would come first.
pub fn exceeds_fd_limit(c: &Caps) -> bool {
    !c.derived && c.max_connections > derived_max_connections(c.nofile)
}

/// A quarter of the reserve split over the workers, between 1 and 64.
fn closing_max(nofile: u64, workers: usize) -> usize {
    let reserve = FD_RESERVE.min(nofile / 4) as usize;
    (reserve / 4 / workers.max(1)).clamp(1, 64)
}

/// [`HIGH_WATERMARK_PERCENT`] of `cap`, rounded down, at least 1 below the cap
/// when the cap allows it (so a full worker always tries to shed first).
fn high_watermark(cap: usize) -> usize {
    let w = cap.saturating_mul(HIGH_WATERMARK_PERCENT) / 100;
    w.min(cap.saturating_sub(1)).max(1).min(cap)
}

/// Raises this process's soft open-file limit to its hard limit; returns the
/// soft limit in force afterwards (what the derived caps are based on).
pub fn raise_fd_limit() -> std::io::Result<u64> {
    crate::sys::fdlimit::raise_to_hard().map(|l| l.soft)
}

/// The soft open-file limit now.
pub fn fd_limit() -> std::io::Result<u64> {
    crate::sys::fdlimit::current().map(|l| l.soft)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_cap_leaves_the_reserve_and_an_upstream_per_client() {
        assert_eq!(derived_max_connections(1024), (1024 - 256) / 2);
        assert_eq!(derived_max_connections(65_536), (65_536 - 256) / 2);
        assert_eq!(derived_max_connections(1_048_576), (1_048_576 - 256) / 2);
        // A small limit keeps a quarter in reserve instead of all of it.
        assert_eq!(caps(0, 1, 128).closing_max, 8);
        assert_eq!(caps(0, 2, 20_000).closing_max, 32);
        assert_eq!(caps(0, 1, 1 << 20).closing_max, 64);
        assert_eq!(caps(0, 64, 128).closing_max, 1);
        assert_eq!(derived_max_connections(100), (100 - 25) / 2);
        assert_eq!(derived_max_connections(0), 1);
        assert_eq!(derived_max_connections(2), 1);
    }

    #[test]
    fn per_worker_cap_rounds_up_and_watermark_is_below_it() {
        let c = caps(0, 2, 20_000);
        assert!(c.derived);
        assert_eq!(c.max_connections, (20_000 - 256) / 2);
        assert_eq!(c.per_worker, c.max_connections.div_ceil(2));
        assert_eq!(c.high_watermark, c.per_worker * 9 / 10);

        let c = caps(41, 4, 20_000);
        assert!(!c.derived);
        assert_eq!(c.per_worker, 11);
        assert_eq!(c.high_watermark, 9);
        assert!(!exceeds_fd_limit(&c));

        let c = caps(40, 1, 20_000);
        assert_eq!((c.per_worker, c.high_watermark), (40, 36));
        // Tiny caps still shed before refusing.
        assert_eq!(caps(1, 1, 1024).high_watermark, 1);
        assert_eq!(caps(2, 1, 1024).high_watermark, 1);
        assert_eq!(caps(5, 1, 1024).high_watermark, 4);
    }

    #[test]
    fn a_configured_cap_above_the_fd_limit_is_flagged() {
        assert!(exceeds_fd_limit(&caps(10_000, 2, 1024)));
        assert!(!exceeds_fd_limit(&caps(384, 2, 1024)));
    }
}
