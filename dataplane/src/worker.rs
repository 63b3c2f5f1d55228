//! One worker: a runtime on a pinned thread, its own listener, its own upstream
//! pools. Nothing here is shared between workers except through `Shared`.

use std::cell::RefCell;
use std::io;
use std::rc::Rc;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

use crate::io::Runtime;
use crate::pool::UpstreamPool;
use crate::server::Shared;

/// Per-worker context handed to every connection task on this thread.
pub struct WorkerCtx<R: Runtime> {
    pub shared: Arc<Shared>,
    pub id: usize,
    pub pool: RefCell<UpstreamPool<crate::proxy::Stream<R>>>,
    /// Replica-set generation the pool was last pruned for.
    pub pool_generation: std::cell::Cell<u64>,
    pub metrics: crate::metrics::WorkerMetrics,
    /// Requests seen for hot-prefix sampling.
    pub sampled: std::cell::Cell<u64>,
    /// The fleet's merged `/v1/models` lists, briefly reused.
    pub models: crate::models::ModelsCache,
}

pub fn run<R: Runtime>(
    shared: Arc<Shared>,
    id: usize,
    listener: std::net::TcpListener,
    ready: Sender<Result<(), String>>,
) -> io::Result<()> {
    R::block_on(async move {
        let listener = R::listener(listener)?;
        let up = &shared.cfg.upstream;
        let ctx = Rc::new(WorkerCtx::<R> {
            pool: RefCell::new(UpstreamPool::new(
                up.pool_max_idle,
                Duration::from_millis(up.pool_idle_timeout_ms),
            )),
            pool_generation: std::cell::Cell::new(0),
            metrics: crate::metrics::WorkerMetrics::default(),
            sampled: std::cell::Cell::new(0),
            models: Default::default(),
            shared: shared.clone(),
            id,
        });
        let mut shutdown = shared.shutdown.subscribe();
        tokio::task::spawn_local(heartbeat(shared.clone(), id));
        let _ = ready.send(Ok(()));
        tracing::debug!(worker = id, io = R::NAME, "worker accepting");
        loop {
            tokio::select! {
                accepted = R::accept(&listener) => match accepted {
                    Ok((conn, peer)) => {
                        tokio::task::spawn_local(crate::proxy::serve(ctx.clone(), conn, peer));
                    }
                    Err(e) => {
                        // EMFILE/ENFILE: back off instead of spinning on a full fd table.
                        tracing::warn!(worker = id, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
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

/// Proves to the watchdog that this worker's runtime still runs tasks.
async fn heartbeat(shared: Arc<Shared>, id: usize) {
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
        shared.workers[id]
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
