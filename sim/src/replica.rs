//! One simulated replica's shared state, and the lifecycle of a request through it: admission,
//! prefix lookup and prefill, cache insertion with its KV events, decode steps, release.
//!
//! Everything sits behind one mutex held for a few microseconds at a time; the simulator is
//! meant to run on one core, where a lock is uncontended.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use super::cache::{block_hashes, CacheEvent, KvCache};
use super::config::Config;
use super::engine::{Admission, Engine, SeqId};
use super::events::Batch;
use super::fault::{FaultMode, FaultRequest, Faults};
use super::metrics::Snapshot;

/// Counters reported by `/sim/stats`, zeroed by `/sim/reset`.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Stats {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    pub evictions: u64,
    pub faults_injected: u64,
}

/// Prometheus counters: monotonic for the life of the process, as Prometheus expects.
#[derive(Debug, Default, Clone)]
pub struct Counters {
    pub prefix_queries: u64,
    pub prefix_hits: u64,
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
    pub requests_finished: u64,
    /// Longest prompt plus completion admitted (llama.cpp's `n_tokens_max`).
    pub longest_sequence: u64,
}

struct Inner {
    engine: Engine,
    cache: KvCache,
    faults: Faults,
    stats: Stats,
    counters: Counters,
    /// Waiting sequences, woken when promoted to running.
    wakers: HashMap<SeqId, oneshot::Sender<()>>,
}

pub struct Replica {
    pub config: Config,
    inner: Mutex<Inner>,
    epoch: Instant,
    /// Microseconds since the Unix epoch at start: new with every process, as
    /// llama.cpp's `Process-Start-Time-Unix` header is.
    pub started_us: u64,
    next_id: AtomicU64,
    events: Option<mpsc::UnboundedSender<Batch>>,
}

/// Result of the prefill phase.
#[derive(Debug, Clone, Copy)]
pub struct Prefilled {
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
}

impl Replica {
    pub fn new(config: Config, events: Option<mpsc::UnboundedSender<Batch>>) -> Arc<Self> {
        let engine = Engine::new(config.timing(), config.running_limit());
        let cache = KvCache::new(config.kv_blocks, config.block_tokens());
        Arc::new(Self {
            config,
            inner: Mutex::new(Inner {
                engine,
                cache,
                faults: Faults::default(),
                stats: Stats::default(),
                counters: Counters::default(),
                wakers: HashMap::new(),
            }),
            epoch: Instant::now(),
            started_us: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_micros() as u64)
                .unwrap_or(0),
            next_id: AtomicU64::new(1),
            events,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain counters behind, still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }

    fn instant(&self, t: f64) -> Instant {
        self.epoch + Duration::from_secs_f64(t.max(0.0))
    }

    /// Sleeps until simulated deadline `t`, skipping the timer when it has already passed (the
    /// common case at `--time-scale 0`).
    pub async fn sleep_until(&self, t: f64) {
        if t > self.now() {
            tokio::time::sleep_until(self.instant(t).into()).await;
        }
    }

    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn publish(&self, events: Vec<CacheEvent>) {
        if let (Some(tx), false) = (&self.events, events.is_empty()) {
            let ts = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            // The publisher only goes away at shutdown, when losing events does not matter.
            let _ = tx.send(Batch { ts, events });
        }
    }

    /// Decides whether this request is hit by an injected fault.
    pub fn draw_fault(&self) -> Option<FaultMode> {
        let mut inner = self.lock();
        let fault = inner.faults.pick(rand::random::<f64>());
        if fault.is_some() {
            inner.stats.faults_injected += 1;
        }
        fault
    }

    /// Waits for a running slot; the slot reserves the request's KV blocks until dropped.
    pub async fn admit(self: &Arc<Self>, prompt_tokens: usize, max_tokens: u32) -> Slot {
        let id = self.next_id();
        let bt = self.config.block_tokens();
        let blocks = (prompt_tokens + max_tokens as usize).div_ceil(bt);
        let rx = {
            let mut inner = self.lock();
            let seq = (prompt_tokens + max_tokens as usize) as u64;
            inner.counters.longest_sequence = inner.counters.longest_sequence.max(seq);
            match inner.engine.arrive(id) {
                Admission::Running => None,
                Admission::Waiting => {
                    let (tx, rx) = oneshot::channel();
                    inner.wakers.insert(id, tx);
                    Some(rx)
                }
            }
        };
        let mut slot = Slot {
            replica: Arc::clone(self),
            id,
            blocks,
            running: rx.is_none(),
        };
        if let Some(rx) = rx {
            // The sender lives in `wakers` until promotion, so an error cannot happen; either way
            // the slot is running after this point.
            let _ = rx.await;
            slot.running = true;
        }
        self.lock().engine.reserve_blocks(blocks);
        slot
    }

    /// Looks the prompt up in the cache and queues its prefill; returns the counts and when the
    /// prefill (and so the first token) completes.
    pub fn start_prefill(&self, hashes: &[u64], prompt_tokens: usize) -> (Prefilled, f64) {
        let now = self.now();
        let mut inner = self.lock();
        let matched = inner.cache.lookup(hashes);
        let cached_tokens = matched * inner.cache.block_tokens();
        let deadline = inner.engine.prefill(now, prompt_tokens - cached_tokens);
        inner.stats.requests += 1;
        inner.stats.prompt_tokens += prompt_tokens as u64;
        inner.stats.cached_tokens += cached_tokens as u64;
        inner.counters.prefix_queries += prompt_tokens as u64;
        inner.counters.prefix_hits += cached_tokens as u64;
        inner.counters.prompt_tokens += prompt_tokens as u64;
        (
            Prefilled {
                prompt_tokens,
                cached_tokens,
            },
            deadline,
        )
    }

    /// After prefill the prompt's full blocks are in the cache, as in vLLM.
    pub fn finish_prefill(&self, prompt: &[u8], hashes: &[u64]) {
        let mut inner = self.lock();
        let events = inner.cache.insert(prompt, hashes);
        for e in &events {
            if let CacheEvent::Removed { block_hashes } = e {
                inner.stats.evictions += block_hashes.len() as u64;
            }
        }
        drop(inner);
        self.publish(events);
    }

    /// Runs the prefill phase of a request: lookup, wait for the prefill server, insert.
    pub async fn prefill(&self, prompt: &[u8], prompt_tokens: usize) -> (Prefilled, f64) {
        let hashes = block_hashes(prompt, self.config.block_tokens() * 4);
        let (p, deadline) = self.start_prefill(&hashes, prompt_tokens);
        self.sleep_until(deadline).await;
        self.finish_prefill(prompt, &hashes);
        (p, deadline)
    }

    /// Duration of the next decode step with the current batch.
    pub fn decode_step(&self) -> f64 {
        self.lock().engine.decode_step()
    }

    pub fn record_completion(&self, completion_tokens: u32) {
        let mut inner = self.lock();
        inner.stats.completion_tokens += u64::from(completion_tokens);
        inner.counters.generation_tokens += u64::from(completion_tokens);
        inner.counters.requests_finished += 1;
    }

    pub fn apply_fault(&self, req: &FaultRequest) -> Faults {
        let mut inner = self.lock();
        inner.faults.apply(req);
        let slowdown = inner.faults.slowdown;
        inner.engine.set_slowdown(slowdown);
        let cleared = req.drop_cache.then(|| inner.cache.clear());
        let faults = inner.faults.clone();
        drop(inner);
        self.publish(cleared.into_iter().collect());
        faults
    }

    /// Clears faults, cache and stats; in-flight requests carry on.
    pub fn reset(&self) {
        let mut inner = self.lock();
        inner.faults = Faults::default();
        inner.engine.set_slowdown(1.0);
        inner.engine.reset_prefill();
        inner.stats = Stats::default();
        let cleared = inner.cache.clear();
        drop(inner);
        self.publish(vec![cleared]);
    }

    pub fn stats(&self) -> Stats {
        self.lock().stats.clone()
    }

    /// True while `--loading-ms` has not passed since start.
    pub fn loading(&self) -> bool {
        self.epoch.elapsed() < Duration::from_millis(self.config.loading_ms)
    }

    pub fn snapshot(&self) -> Snapshot {
        let inner = self.lock();
        Snapshot {
            running: inner.engine.running(),
            waiting: inner.engine.waiting(),
            kv_usage: if self.config.kv_blocks == 0 {
                0.0
            } else {
                (inner.engine.reserved_blocks() as f64 / self.config.kv_blocks as f64).min(1.0)
            },
            cached_blocks: inner.cache.len(),
            counters: inner.counters.clone(),
        }
    }
}

/// A sequence's place in the engine; dropping it (finished, or client gone) frees the place.
pub struct Slot {
    replica: Arc<Replica>,
    id: SeqId,
    blocks: usize,
    running: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut inner = self.replica.lock();
        if !self.running && inner.engine.cancel_waiting(self.id) {
            inner.wakers.remove(&self.id);
            return;
        }
        if self.running {
            inner.engine.release_blocks(self.blocks);
        }
        // Promote the next waiting sequence; skip any whose waiter vanished without cancelling.
        let mut promoted = inner.engine.finish();
        while let Some(next) = promoted {
            match inner.wakers.remove(&next).map(|tx| tx.send(())) {
                Some(Ok(())) => break,
                _ => promoted = inner.engine.finish(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn replica(args: &[&str]) -> Arc<Replica> {
        let mut argv = vec!["kvroute-sim", "--time-scale", "0"];
        argv.extend_from_slice(args);
        Replica::new(Config::parse_from(argv), None)
    }

    #[tokio::test]
    async fn slots_queue_cancel_and_promote() {
        let r = replica(&[
            "--max-seqs",
            "1",
            "--kv-blocks",
            "100",
            "--block-tokens",
            "4",
        ]);
        let first = r.admit(10, 6).await; // 16 tokens = 4 blocks
        assert_eq!(r.snapshot().running, 1);
        assert_eq!(r.snapshot().kv_usage, 0.04);

        // A waiter that gives up leaves no trace.
        let gone = tokio::spawn({
            let r = Arc::clone(&r);
            async move { r.admit(1, 1).await }
        });
        let waiter = tokio::spawn({
            let r = Arc::clone(&r);
            async move { r.admit(1, 1).await }
        });
        tokio::task::yield_now().await;
        assert_eq!(r.snapshot().waiting, 2);
        gone.abort();
        let _ = gone.await;
        assert_eq!(r.snapshot().waiting, 1);

        // Finishing the running slot promotes the remaining waiter.
        drop(first);
        let second = waiter.await.unwrap();
        let s = r.snapshot();
        assert_eq!((s.running, s.waiting), (1, 0));
        drop(second);
        let s = r.snapshot();
        assert_eq!((s.running, s.waiting, s.kv_usage), (0, 0, 0.0));
    }

    #[tokio::test]
    async fn prefill_counts_hits_and_reset_clears() {
        let r = replica(&["--block-tokens", "2"]);
        let prompt = b"AAAAAAAABBBBBBBBc";
        let (p, _) = r.prefill(prompt, 5).await;
        assert_eq!((p.prompt_tokens, p.cached_tokens), (5, 0));
        let (p, _) = r.prefill(prompt, 5).await;
        assert_eq!(p.cached_tokens, 4);
        let s = r.stats();
        assert_eq!((s.requests, s.prompt_tokens, s.cached_tokens), (2, 10, 4));
        r.reset();
        assert_eq!(r.stats().requests, 0);
        assert_eq!(r.snapshot().cached_blocks, 0);
        // Prometheus counters survive a reset.
        assert_eq!(r.snapshot().counters.prefix_hits, 4);
    }
}
