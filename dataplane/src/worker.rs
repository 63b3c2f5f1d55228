//! One worker: a runtime on a pinned thread, its own listener, its own upstream
//! pools. Nothing here is shared between workers except through the handles
//! of its [`RequestPath`].

use std::cell::RefCell;
use std::io;
use std::rc::Rc;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

use crate::io::Runtime;
use crate::pool::UpstreamPool;
use crate::state::RequestPath;

/// Per-worker context handed to every connection task on this thread.
pub struct WorkerCtx<R: Runtime> {
    /// The handles every request of this worker reads.
    pub shared: RequestPath,
    pub id: usize,
    pub pool: RefCell<UpstreamPool<crate::proxy::Stream<R>>>,
    /// Replica-set generation the pool was last pruned for.
    pub pool_generation: std::cell::Cell<u64>,
    pub metrics: crate::metrics::WorkerMetrics,
    /// Requests seen for hot-prefix sampling.
    pub sampled: std::cell::Cell<u64>,
    /// The fleet's merged `/v1/models` lists, briefly reused.
    pub models: crate::models::ModelsCache,
    /// This worker's client connections by state: who is shed first.
    pub registry: Rc<crate::budget::registry::Registry>,
    /// Read buffers for connections with a request in progress.
    pub buffers: Rc<crate::budget::buffers::BufferPool>,
    /// Refusals (503 over the cap) still being written.
    pub refusing: Rc<std::cell::Cell<usize>>,
    /// Client connections allowed: this worker's share and the shedding bounds.
    pub budget: crate::budget::Caps,
}

pub fn run<R: Runtime>(
    shared: RequestPath,
    budget: crate::budget::Caps,
    id: usize,
    listener: std::net::TcpListener,
    ready: Sender<Result<(), crate::Error>>,
) -> io::Result<()> {
    R::block_on(async move {
        let listener = R::listener(listener)?;
        let up = &shared.upstream;
        let ctx = Rc::new(WorkerCtx::<R> {
            pool: RefCell::new(UpstreamPool::new(
                up.pool_max_idle,
                Duration::from_millis(up.pool_idle_timeout_ms),
            )),
            pool_generation: std::cell::Cell::new(0),
            metrics: crate::metrics::WorkerMetrics::default(),
            sampled: std::cell::Cell::new(0),
            models: Default::default(),
            registry: crate::budget::registry::Registry::new(
                budget.per_worker,
                budget.high_watermark,
                shared.stats.states.clone(),
            ),
            buffers: Rc::new(crate::budget::buffers::BufferPool::new(
                crate::proxy::READ_CHUNK,
                crate::budget::buffers::POOL_MAX,
            )),
            refusing: Default::default(),
            id,
            budget,
            shared,
        });
        let mut shutdown = ctx.shared.drain.subscribe();
        tokio::task::spawn_local(heartbeat(ctx.shared.stats.clone(), id));
        tokio::task::spawn_local(crate::budget::reclaim::run(
            ctx.registry.clone(),
            ctx.buffers.clone(),
        ));
        let _ = ready.send(Ok(()));
        tracing::debug!(worker = id, io = R::NAME, "worker accepting");
        let mut backoff = AcceptBackoff::default();
        loop {
            tokio::select! {
                accepted = R::accept(&listener) => match accepted {
                    Ok((conn, peer)) => {
                        backoff.reset();
                        match ctx.registry.admit() {
                            Some(member) => {
                                tokio::task::spawn_local(crate::proxy::serve(ctx.clone(), conn, peer, member));
                            }
                            None => crate::budget::refuse(
                                conn,
                                ctx.shared.tls.is_none(),
                                &ctx.refusing,
                                ctx.budget.closing_max,
                            ),
                        }
                        // A shed socket closes when its task next runs: give
                        // those tasks their turn before accepting more, so a
                        // fast flood cannot outrun them past the FD limit.
                        for _ in 0..8 {
                            if ctx.registry.shedding() < ctx.budget.closing_max {
                                break;
                            }
                            tokio::task::yield_now().await;
                        }
                    }
                    Err(e) => {
                        let reason = accept_error_reason(&e);
                        metrics::counter!(crate::metrics::ACCEPT_ERRORS, "reason" => reason).increment(1);
                        if let Some(wait) = backoff.next(reason) {
                            if wait == AcceptBackoff::FIRST {
                                tracing::warn!(worker = id, error = %e, "accept failed; backing off");
                            }
                            tokio::time::sleep(wait).await;
                        }
                    }
                },
                _ = shutdown.changed() => break,
            }
        }
        drop(listener);
        tracing::debug!(worker = id, "worker stopped accepting");
        // Connections finish on this runtime; the main thread ends the process
        // once every worker's count reaches zero or the grace period is over.
        std::future::pending::<()>().await;
        Ok(())
    })?
}

/// The `reason` label of an accept error.
fn accept_error_reason(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EMFILE) => "emfile",
        Some(libc::ENFILE) => "enfile",
        Some(libc::ENOMEM) | Some(libc::ENOBUFS) => "enomem",
        Some(libc::ECONNABORTED) | Some(libc::EPROTO) => "aborted",
        _ => "other",
    }
}

/// How long accepting pauses after an error: a full descriptor table or no
/// memory is not over on the next try, so retrying at once would spin. The
/// pause doubles from [`AcceptBackoff::FIRST`] up to [`AcceptBackoff::MAX`]
/// while errors continue and starts over after an accept succeeds.
#[derive(Default)]
struct AcceptBackoff {
    current: Option<Duration>,
}

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_millis(500);

    /// The pause after an error with `reason`; `None`: accept again at once
    /// (the peer reset its connection before it was accepted).
    fn next(&mut self, reason: &str) -> Option<Duration> {
        if reason == "aborted" {
            return None;
        }
        let d = self.current.map_or(Self::FIRST, |d| (d * 2).min(Self::MAX));
        self.current = Some(d);
        Some(d)
    }

    fn reset(&mut self) {
        self.current = None;
    }
}

/// Proves to the watchdog that this worker's runtime still runs tasks.
async fn heartbeat(stats: Arc<crate::state::WorkerStats>, id: usize) {
    // Test-only fault hook: `KVROUTE_FAULT_HANG_WORKER=<id>` blocks that worker's
    // thread after a second, as a stuck worker would, so the watchdog path can be
    // tested against the real binary.
    let hang = std::env::var("KVROUTE_FAULT_HANG_WORKER")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        == Some(id);
    let started = std::time::Instant::now();
    let mut tick = tokio::time::interval(crate::notify::HEARTBEAT);
    loop {
        tick.tick().await;
        stats
            .heartbeat
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if hang && started.elapsed() > Duration::from_secs(1) {
            tracing::warn!(worker = id, "fault hook: hanging this worker");
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_backoff_doubles_to_a_bound_and_starts_over() {
        let mut b = AcceptBackoff::default();
        let waits: Vec<_> = (0..8).map(|_| b.next("emfile").unwrap()).collect();
        assert_eq!(waits[0], AcceptBackoff::FIRST);
        assert_eq!(waits[1], AcceptBackoff::FIRST * 2);
        assert!(waits.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*waits.last().unwrap(), AcceptBackoff::MAX);
        assert_eq!(b.next("aborted"), None);
        b.reset();
        assert_eq!(b.next("enfile"), Some(AcceptBackoff::FIRST));
    }

    #[test]
    fn accept_errors_are_classified() {
        let e = |n| io::Error::from_raw_os_error(n);
        assert_eq!(accept_error_reason(&e(libc::EMFILE)), "emfile");
        assert_eq!(accept_error_reason(&e(libc::ENFILE)), "enfile");
        assert_eq!(accept_error_reason(&e(libc::ENOBUFS)), "enomem");
        assert_eq!(accept_error_reason(&e(libc::ECONNABORTED)), "aborted");
        assert_eq!(accept_error_reason(&e(libc::EINVAL)), "other");
    }
}
