//! systemd integration: the sd_notify protocol (`Type=notify`) and the watchdog.
//!
//! Every call is a no-op outside systemd (`NOTIFY_SOCKET` unset), so the binary
//! behaves the same under a test, a shell or a unit.

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;

use crate::server::Shared;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

pub fn status_line(shared: &Shared) -> String {
    format!(
        "workers={} replicas={} io={} policy={}{}",
        shared.workers.len(),
        shared.table.load().replicas.len(),
        crate::server::io_name(shared),
        shared.router.name(),
        if shared.draining.load(std::sync::atomic::Ordering::Relaxed) {
            " draining"
        } else {
            ""
        }
    )
}

pub fn ready(shared: &Shared) {
    send(&[
        NotifyState::Ready,
        NotifyState::Status(&status_line(shared)),
    ]);
}

pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

pub fn stopping(shared: &Shared) {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status(&status_line(shared)),
    ]);
}

/// How often workers prove they are alive: well under any sane `WatchdogSec`.
pub const HEARTBEAT: Duration = Duration::from_millis(100);

/// Pings the watchdog at half of `WATCHDOG_USEC` while every worker's heartbeat
/// advances. A worker stuck in a loop or a blocking call stops its heartbeat, the
/// pings stop, and systemd restarts the service: a hung thread-per-core worker
/// would otherwise blackhole every connection the kernel hands its listener.
pub fn spawn_watchdog(shared: Arc<Shared>) {
    let Some(period) = sd_notify::watchdog_enabled() else {
        return;
    };
    let every = period / 2;
    tracing::info!(?period, "systemd watchdog enabled");
    std::thread::Builder::new()
        .name("kvroute-watchdog".into())
        .spawn(move || {
            let beats = |s: &Shared| -> Vec<u64> {
                s.workers
                    .iter()
                    .map(|w| w.heartbeat.load(std::sync::atomic::Ordering::Relaxed))
                    .collect()
            };
            let mut last = beats(&shared);
            loop {
                std::thread::sleep(every);
                let now = beats(&shared);
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
