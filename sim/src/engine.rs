//! Timing and scheduling of one replica, free of clocks: callers pass `now` (seconds on any
//! monotonic timeline) and get back deadlines on the same timeline.
//!
//! Model: at most `max_seqs` sequences run; the rest wait FIFO. A running sequence first goes
//! through the replica's single prefill server (FIFO, uncached tokens / prefill rate + overhead),
//! which yields its first token, then decodes one token per step, a step taking longer as the
//! running batch grows. vLLM interleaves prefill and decode in one batch; a separate prefill
//! server reproduces what routing cares about (TTFT grows with uncached tokens queued ahead).

use std::collections::VecDeque;

#[derive(Debug, Clone, PartialEq)]
pub struct Timing {
    /// Prompt tokens processed per second by the prefill server.
    pub prefill_tps: f64,
    /// Fixed cost of one prefill, seconds.
    pub prefill_overhead: f64,
    /// Tokens per second of one sequence decoding alone.
    pub decode_tps: f64,
    /// Batch size at which a decode step takes twice as long as alone.
    pub decode_batch_alpha: f64,
    /// Multiplies every simulated duration; 0 means instantaneous.
    pub time_scale: f64,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            prefill_tps: 8000.0,
            prefill_overhead: 0.010,
            decode_tps: 50.0,
            decode_batch_alpha: 64.0,
            time_scale: 1.0,
        }
    }
}

pub type SeqId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Running,
    Waiting,
}

#[derive(Debug)]
pub struct Engine {
    timing: Timing,
    /// Fault knob: multiplies durations on top of `time_scale`.
    slowdown: f64,
    max_seqs: usize,
    running: usize,
    waiting: VecDeque<SeqId>,
    prefill_free_at: f64,
    /// KV blocks reserved by running sequences (what vLLM's `kv_cache_usage_perc` measures).
    reserved_blocks: usize,
}

impl Engine {
    pub fn new(timing: Timing, max_seqs: usize) -> Self {
        Self {
            timing,
            slowdown: 1.0,
            max_seqs: max_seqs.max(1),
            running: 0,
            waiting: VecDeque::new(),
            prefill_free_at: f64::NEG_INFINITY,
            reserved_blocks: 0,
        }
    }

    pub fn running(&self) -> usize {
        self.running
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn reserved_blocks(&self) -> usize {
        self.reserved_blocks
    }

    pub fn set_slowdown(&mut self, factor: f64) {
        self.slowdown = if factor.is_finite() && factor > 0.0 {
            factor
        } else {
            1.0
        };
    }

    /// A new sequence arrives; FIFO fairness: nobody overtakes a waiting sequence.
    pub fn arrive(&mut self, id: SeqId) -> Admission {
        if self.running < self.max_seqs && self.waiting.is_empty() {
            self.running += 1;
            Admission::Running
        } else {
            self.waiting.push_back(id);
            Admission::Waiting
        }
    }

    /// A waiting sequence gave up (client went away). False if it had already been promoted.
    pub fn cancel_waiting(&mut self, id: SeqId) -> bool {
        match self.waiting.iter().position(|&w| w == id) {
            Some(pos) => {
                self.waiting.remove(pos);
                true
            }
            None => false,
        }
    }

    /// A running sequence finished; returns the waiting sequence promoted into its slot.
    pub fn finish(&mut self) -> Option<SeqId> {
        self.running = self.running.saturating_sub(1);
        if self.running < self.max_seqs {
            let next = self.waiting.pop_front()?;
            self.running += 1;
            Some(next)
        } else {
            None
        }
    }

    pub fn reserve_blocks(&mut self, blocks: usize) {
        self.reserved_blocks += blocks;
    }

    pub fn release_blocks(&mut self, blocks: usize) {
        self.reserved_blocks = self.reserved_blocks.saturating_sub(blocks);
    }

    fn scaled(&self, simulated_seconds: f64) -> f64 {
        simulated_seconds * self.timing.time_scale * self.slowdown
    }

    /// Queues a prefill of `uncached_tokens` at `now`; returns when it completes.
    pub fn prefill(&mut self, now: f64, uncached_tokens: usize) -> f64 {
        let work = self.timing.prefill_overhead + uncached_tokens as f64 / self.timing.prefill_tps;
        let start = now.max(self.prefill_free_at);
        self.prefill_free_at = start + self.scaled(work);
        self.prefill_free_at
    }

    /// Duration of one decode step with the current running batch.
    pub fn decode_step(&self) -> f64 {
        let batch = self.running.max(1) as f64;
        let base = 1.0 / self.timing.decode_tps;
        self.scaled(base * (1.0 + batch / self.timing.decode_batch_alpha))
    }

    /// Forgets queued prefill work (used by a reset).
    pub fn reset_prefill(&mut self) {
        self.prefill_free_at = f64::NEG_INFINITY;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(scale: f64) -> Timing {
        Timing {
            prefill_tps: 1000.0,
            prefill_overhead: 0.01,
            decode_tps: 100.0,
            decode_batch_alpha: 4.0,
            time_scale: scale,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn prefill_is_fifo_on_one_server() {
        let mut e = Engine::new(timing(1.0), 8);
        // 500 tokens → 0.5 s + 0.01 s overhead.
        assert!(close(e.prefill(0.0, 500), 0.51));
        // Arrives while the first is still prefilling: starts at 0.51.
        assert!(close(e.prefill(0.1, 100), 0.51 + 0.11));
        // Arrives after the server went idle: starts immediately.
        assert!(close(e.prefill(5.0, 0), 5.01));
    }

    #[test]
    fn time_scale_and_slowdown_multiply_durations() {
        let mut e = Engine::new(timing(0.1), 8);
        assert!(close(e.prefill(0.0, 990), 0.1));
        e.set_slowdown(2.0);
        assert!(close(e.prefill(1.0, 990), 1.2));
        let mut z = Engine::new(timing(0.0), 8);
        assert_eq!(z.prefill(3.0, 1_000_000), 3.0);
        assert_eq!(z.decode_step(), 0.0);
    }

    #[test]
    fn decode_step_grows_with_batch() {
        let mut e = Engine::new(timing(1.0), 8);
        e.arrive(1);
        assert!(close(e.decode_step(), 0.01 * 1.25));
        for id in 2..=4 {
            e.arrive(id);
        }
        assert!(close(e.decode_step(), 0.01 * 2.0));
    }

    #[test]
    fn max_seqs_admission_is_fifo() {
        let mut e = Engine::new(timing(1.0), 2);
        assert_eq!(e.arrive(1), Admission::Running);
        assert_eq!(e.arrive(2), Admission::Running);
        assert_eq!(e.arrive(3), Admission::Waiting);
        assert_eq!(e.arrive(4), Admission::Waiting);
        assert_eq!((e.running(), e.waiting()), (2, 2));
        assert!(e.cancel_waiting(3));
        assert!(!e.cancel_waiting(3));
        assert_eq!(e.finish(), Some(4));
        assert_eq!((e.running(), e.waiting()), (2, 0));
        assert_eq!(e.finish(), None);
        assert_eq!(e.finish(), None);
        assert_eq!(e.running(), 0);
        assert_eq!(e.arrive(5), Admission::Running);
    }
}
