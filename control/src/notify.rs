//! sd_notify for `Type=notify` (kvroute-control.service).
//!
//! `READY=1` once the first push round is over: every data plane has either taken
//! the replica set or refused it. Waiting for successes only would keep the unit
//! "activating" until systemd's start timeout whenever a data plane is down, and
//! the daemon exists precisely to bring such a data plane in step when it returns.
//! `WATCHDOG=1` at half of `WATCHDOG_USEC`, only while the daemon loop's heartbeat
//! advances: a wedged loop stops the pings and systemd restarts the daemon.
//! Everything is a no-op without `NOTIFY_SOCKET`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;

use crate::daemon::Shared;

fn notify(states: &[NotifyState]) {
    // Nothing to do without systemd; a send error must not stop the daemon.
    let _ = sd_notify::notify(states);
}

fn status(shared: &Shared) -> (bool, String) {
    let dps = shared.dataplanes.lock().unwrap_or_else(|e| e.into_inner());
    let answered = dps
        .iter()
        .filter(|(_, s)| {
            s.pushes.load(Ordering::Relaxed) > 0 || s.push_errors.load(Ordering::Relaxed) > 0
        })
        .count();
    let pushed = dps
        .iter()
        .filter(|(_, s)| s.up.load(Ordering::Relaxed) > 0)
        .count();
    let replicas = shared
        .replicas
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .len();
    // An empty list is the daemon not yet started, not a round over: the
    // configuration names at least one data plane.
    (
        !dps.is_empty() && answered == dps.len(),
        format!("dataplanes={pushed}/{} up replicas={replicas}", dps.len()),
    )
}

/// Runs for the daemon's lifetime: readiness, status updates and watchdog pings.
pub async fn run(shared: Arc<Shared>) {
    // Half of WATCHDOG_USEC, so one late tick does not trip systemd.
    let ping_every = sd_notify::watchdog_enabled().map(|w| w / 2);
    let tick = ping_every
        .unwrap_or(Duration::from_secs(1))
        .min(Duration::from_millis(250));
    let mut ready = false;
    let mut last_status = String::new();
    let mut last_beat = shared.heartbeat.load(Ordering::Relaxed);
    let mut last_ping = tokio::time::Instant::now();
    let mut beat_seen_since_ping = true;
    let mut iv = tokio::time::interval(tick);
    loop {
        iv.tick().await;
        let (done, st) = status(&shared);
        if !ready && done {
            ready = true;
            tracing::info!(status = %st, "ready (first push round over)");
            notify(&[NotifyState::Ready, NotifyState::Status(&st)]);
            last_status = st;
        } else if ready && st != last_status {
            notify(&[NotifyState::Status(&st)]);
            last_status = st;
        }
        let beat = shared.heartbeat.load(Ordering::Relaxed);
        if beat != last_beat {
            beat_seen_since_ping = true;
            last_beat = beat;
        }
        if let Some(every) = ping_every {
            if last_ping.elapsed() >= every && beat_seen_since_ping {
                notify(&[NotifyState::Watchdog]);
                last_ping = tokio::time::Instant::now();
                beat_seen_since_ping = false;
            }
        }
    }
}

/// `MONOTONIC_USEC` lets systemd match the reload to its `READY=1` (Type=notify-reload).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now]),
        Err(_) => notify(&[NotifyState::Reloading]),
    }
}

pub fn reloaded() {
    notify(&[NotifyState::Ready]);
}

pub fn stopping() {
    notify(&[NotifyState::Stopping]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::push::DataplaneStats;

    #[test]
    fn not_ready_before_the_data_planes_are_known_nor_before_each_answered() {
        let shared = Shared::default();
        assert_eq!(
            status(&shared),
            (false, "dataplanes=0/0 up replicas=0".to_owned())
        );
        let stats = Arc::new(DataplaneStats::default());
        shared
            .dataplanes
            .lock()
            .unwrap()
            .push(("127.0.0.1:1".to_owned(), stats.clone()));
        assert!(!status(&shared).0);
        stats.push_errors.fetch_add(1, Ordering::Relaxed);
        assert_eq!(
            status(&shared),
            (true, "dataplanes=0/1 up replicas=0".to_owned())
        );
    }
}
