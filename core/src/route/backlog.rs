//! Each replica's prefill backlog as this proxy sent it: a virtual FIFO server
//! that takes each routed request's uncached bytes and drains at the replica's
//! learned rate, so the wait a newcomer faces is what is left of the queue now,
//! not the whole of what was queued (a request half prefilled is half done).
//!
//! A replica slower than its rate (stalled, swapping, shared with a burst of
//! decodes) still has requests waiting when the virtual queue is empty; it is
//! then predicted late by as long as it already is, a wait that grows for as
//! long as it stays silent, so it is never predicted fast.
#![forbid(unsafe_code)]

use parking_lot::Mutex;

use crate::replica::MAX_REPLICAS;

#[derive(Debug, Clone, Copy, Default)]
struct Queue {
    /// Uncached prompt bytes queued at `at_ms`.
    bytes: f64,
    at_ms: u64,
}

impl Queue {
    /// Seconds until the queue drains at `secs_per_byte`, negative once it
    /// should have.
    fn remaining_s(&self, now_ms: u64, secs_per_byte: f64) -> f64 {
        self.bytes * secs_per_byte - now_ms.saturating_sub(self.at_ms) as f64 / 1e3
    }
}

/// The predicted wait on one replica.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Wait {
    pub seconds: f64,
    /// Of it, the bytes still queued (0 when the replica is late).
    pub queued_bytes: f64,
}

/// Every slot's backlog.
pub struct Backlogs {
    queues: Box<[Mutex<Queue>]>,
}

impl Default for Backlogs {
    fn default() -> Self {
        Backlogs {
            queues: (0..MAX_REPLICAS).map(|_| Mutex::default()).collect(),
        }
    }
}

impl Backlogs {
    /// The wait at `now_ms` on `slot`, where `awaiting` of this proxy's requests
    /// have not had their first byte: none when nothing awaits.
    pub fn wait(&self, slot: u16, awaiting: u32, now_ms: u64, secs_per_byte: f64) -> Wait {
        let Some(q) = self.queues.get(usize::from(slot)) else {
            return Wait {
                seconds: 0.0,
                queued_bytes: 0.0,
            };
        };
        if awaiting == 0 {
            return Wait {
                seconds: 0.0,
                queued_bytes: 0.0,
            };
        }
        let r = q.lock().remaining_s(now_ms, secs_per_byte);
        Wait {
            seconds: r.abs(),
            queued_bytes: r.max(0.0) / secs_per_byte,
        }
    }

    /// A request with `bytes` to prefill joined `slot` at `now_ms`; `awaiting`
    /// counts it.
    pub fn push(&self, slot: u16, awaiting: u32, bytes: u64, now_ms: u64, secs_per_byte: f64) {
        let Some(q) = self.queues.get(usize::from(slot)) else {
            return;
        };
        let mut q = q.lock();
        let left = if awaiting <= 1 {
            0.0
        } else {
            q.remaining_s(now_ms, secs_per_byte).max(0.0) / secs_per_byte
        };
        *q = Queue {
            bytes: left + bytes as f64,
            at_ms: now_ms,
        };
    }

    pub fn clear(&self, slot: u16) {
        if let Some(q) = self.queues.get(usize::from(slot)) {
            *q.lock() = Queue::default();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPB: f64 = 1e-3; // 1,000 bytes per second

    #[test]
    fn drains_at_the_rate_and_resets_when_idle() {
        let b = Backlogs::default();
        b.push(0, 1, 2_000, 0, SPB);
        assert_eq!(b.wait(0, 1, 500, SPB).seconds, 1.5);
        b.push(0, 2, 1_000, 500, SPB);
        let w = b.wait(0, 2, 1_000, SPB);
        assert_eq!((w.seconds, w.queued_bytes), (2.0, 2_000.0));
        // Nothing awaits: nothing queued, whatever the virtual queue says.
        assert_eq!(b.wait(0, 0, 1_000, SPB).seconds, 0.0);
        b.push(0, 1, 100, 1_000, SPB);
        assert_eq!(b.wait(0, 1, 1_000, SPB).queued_bytes, 100.0);
    }

    /// Requests still wait after the queue should have drained: the replica is
    /// late, and predicted late by as long as it has been.
    #[test]
    fn a_silent_replica_is_predicted_slower_and_slower() {
        let b = Backlogs::default();
        b.push(3, 1, 1_000, 0, SPB);
        let w1 = b.wait(3, 1, 5_000, SPB);
        let w2 = b.wait(3, 1, 60_000, SPB);
        assert_eq!((w1.seconds, w1.queued_bytes), (4.0, 0.0));
        assert_eq!(w2.seconds, 59.0);
    }
}
