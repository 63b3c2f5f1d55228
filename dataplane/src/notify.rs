//! systemd integration: the sd_notify protocol (`Type=notify`) and the watchdog.
//!
//! Every call is a no-op outside systemd (`NOTIFY_SOCKET` unset), so the binary
//! behaves the same under a test, a shell or a unit.

use std::time::Duration;

use sd_notify::NotifyState;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

/// READY=1, with `status` as the line `systemctl status` shows.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// How often workers prove they are alive: well under any sane `WatchdogSec`.
pub const HEARTBEAT: Duration = Duration::from_millis(100);

/// Pings the watchdog at half of `WATCHDOG_USEC` while every worker's heartbeat
/// (`heartbeats`, one count per worker) advances. A worker stuck in a loop or a
/// blocking call stops its heartbeat, the pings stop, and systemd restarts the
/// service: a hung thread-per-core worker would otherwise blackhole every
/// connection the kernel hands its listener.
pub fn spawn_watchdog(heartbeats: impl Fn() -> Vec<u64> + Send + 'static) {
    let Some(period) = sd_notify::watchdog_enabled() else {
        return;
    };
    let every = period / 2;
    tracing::info!(?period, "systemd watchdog enabled");
    std::thread::Builder::new()
        .name("kvroute-watchdog".into())
        .spawn(move || {
            let mut last = heartbeats();
            loop {
                std::thread::sleep(every);
                let now = heartbeats();
                let stuck: Vec<usize> = now
                    .iter()
                    .zip(&last)
                    .enumerate()
                    .filter(|(_, (n, l))| n == l)
                    .map(|(i, _)| i)
                    .collect();
                if stuck.is_empty() {
                    send(&[NotifyState::Watchdog]);
                } else {
                    tracing::error!(
                        ?stuck,
                        "worker heartbeat stalled: withholding watchdog ping"
                    );
                }
                last = now;
            }
        })
        .expect("spawn watchdog thread");
}
