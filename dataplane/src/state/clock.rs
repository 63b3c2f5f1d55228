//! The process clock handed to routers, passive health and the admin API: one
//! start instant, so every part agrees on what "now" in milliseconds means.

use std::time::Instant;

#[derive(Clone, Copy, Debug)]
pub struct Clock {
    started: Instant,
}

impl Clock {
    pub fn start() -> Clock {
        Clock {
            started: Instant::now(),
        }
    }

    /// Milliseconds since start.
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}
