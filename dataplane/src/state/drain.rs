//! The drain signal: one flag every request reads before keeping a connection
//! alive, and one watch every connection and worker waits on. Only the holder
//! of [`Drain`] (the control loop, the admin API) can start a drain; the
//! request path gets a [`DrainSignal`], which can only read it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

struct Inner {
    /// Read per request, so an atomic rather than the watch's lock.
    draining: AtomicBool,
    started: watch::Sender<bool>,
}

/// Starts the drain, and reads it.
pub struct Drain(Arc<Inner>);

/// Reads the drain, and waits for it; cannot start one.
#[derive(Clone)]
pub struct DrainSignal(Arc<Inner>);

impl Default for Drain {
    fn default() -> Self {
        Drain(Arc::new(Inner {
            draining: AtomicBool::new(false),
            started: watch::channel(false).0,
        }))
    }
}

impl Drain {
    /// Marks the process draining and wakes every subscriber. Idempotent.
    pub fn begin(&self) {
        self.0.draining.store(true, Ordering::SeqCst);
        let _ = self.0.started.send(true);
    }

    pub fn is_draining(&self) -> bool {
        self.0.draining.load(Ordering::Relaxed)
    }

    /// The read-only side, for the workers.
    pub fn signal(&self) -> DrainSignal {
        DrainSignal(self.0.clone())
    }
}

impl DrainSignal {
    pub fn is_draining(&self) -> bool {
        self.0.draining.load(Ordering::Relaxed)
    }

    /// A receiver whose value turns `true` when the drain begins.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.0.started.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signal_sees_the_drain_and_wakes_every_subscriber() {
        let drain = Drain::default();
        let signal = drain.signal();
        let (mut early, late_signal) = (signal.subscribe(), signal.clone());
        assert!(!signal.is_draining() && !drain.is_draining());
        assert!(!*early.borrow_and_update());
        drain.begin();
        assert!(signal.is_draining() && late_signal.is_draining() && drain.is_draining());
        assert!(
            early.has_changed().unwrap(),
            "a subscriber from before the drain hears it"
        );
        assert!(*early.borrow_and_update());
        // Subscribed after the drain began: the value is already there.
        assert!(*late_signal.subscribe().borrow());
        drain.begin();
        assert!(drain.is_draining());
    }
}
