//! Giving memory back after a flood. mimalloc keeps the pages a thread freed
//! for that thread's next allocations and purges them lazily, only when the
//! thread allocates again, and each worker thread has its own heap. So each
//! worker checks now and then whether its connection count fell well below
//! its peak since it last did so and, if so, drops its spare buffers and has mimalloc
//! return this thread's free pages to the OS.

use std::rc::Rc;
use std::time::Duration;

use super::buffers::BufferPool;
use super::registry::Registry;

/// How often a worker compares its connection count with its peak.
pub const CHECK_EVERY: Duration = Duration::from_secs(2);
/// A drop of fewer connections than this is not worth a collection.
const MIN_DROP: usize = 64;

/// True when `open` connections, down from `peak`, have freed enough memory to
/// be worth returning: fewer than half of the peak and at least [`MIN_DROP`] fewer.
pub fn worth_collecting(peak: usize, open: usize) -> bool {
    open < peak / 2 && peak - open >= MIN_DROP
}

/// Runs on the worker for its whole life; cheap when nothing changed (two
/// comparisons every [`CHECK_EVERY`]).
pub async fn run(registry: Rc<Registry>, buffers: Rc<BufferPool>) {
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A flood's last connections close after the check that saw most of them
    // gone (and on the way out each takes a pooled buffer for its final
    // read): one more collection a check later returns what they left.
    let mut follow_up = false;
    loop {
        tick.tick().await;
        let (peak, open) = (registry.peak(), registry.open());
        let collect = worth_collecting(peak, open);
        if collect || follow_up {
            buffers.trim();
            crate::sys::alloc::release_free_memory();
            registry.reset_peak();
            tracing::debug!(
                peak,
                open,
                "returned free memory after a drop in connections"
            );
        }
        follow_up = collect;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collects_only_after_a_large_drop() {
        assert!(worth_collecting(10_000, 0));
        assert!(worth_collecting(10_000, 4_000));
        assert!(!worth_collecting(10_000, 6_000));
        assert!(!worth_collecting(100, 60));
        assert!(!worth_collecting(50, 0));
        assert!(!worth_collecting(0, 0));
    }
}
