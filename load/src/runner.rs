//! Executes a plan: open-loop session starts, closed-loop turns within a session.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::body;
use super::client::{Client, Outgoing};
use super::config::{ApiMode, LoadConfig};
use super::ideal::ideal_hit_ratio;
use super::plan::{Plan, Session};
use super::progress::{Counters, Job, Progress};
use super::record::Record;
use super::stats::{summarize, RunInfo, Summary};

/// Plans the configured workload, runs it against `cfg.target` and summarizes.
pub async fn run(cfg: LoadConfig) -> anyhow::Result<Summary> {
    let plan = cfg.workload.plan()?;
    run_plan(&plan, &cfg).await
}

/// Like [`run`], but stops early when `stop` completes (the CLI passes Ctrl-C): no new
/// request is sent after that, requests in flight finish, and the summary covers what was sent.
pub async fn run_until(cfg: LoadConfig, stop: impl Future<Output = ()>) -> anyhow::Result<Summary> {
    let plan = cfg.workload.plan()?;
    run_plan_until(&plan, &cfg, stop).await
}

/// Runs an already built plan (for callers that construct workloads in code).
pub async fn run_plan(plan: &Plan, cfg: &LoadConfig) -> anyhow::Result<Summary> {
    run_plan_until(plan, cfg, std::future::pending()).await
}

pub async fn run_plan_until(
    plan: &Plan,
    cfg: &LoadConfig,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<Summary> {
    let ideal = ideal_hit_ratio(plan.requests_in_order());
    let client = Client::new(&cfg.targets, cfg.request_timeout)?;
    let limit = cfg
        .concurrency_limit
        .map(|c| Arc::new(Semaphore::new(c.max(1))));
    tracing::info!(
        requests = plan.request_count(),
        sessions = plan.sessions.len(),
        "starting run"
    );
    let stopping = Arc::new(AtomicBool::new(false));
    tokio::pin!(stop);
    let counters = Counters::new();
    let span = plan.sessions.last().map_or(Duration::ZERO, |s| s.start);
    let progress = Progress::start(
        Job::new(cfg.progress_label.clone())
            .planned(plan.request_count() as u64)
            .schedule(span),
        counters.clone(),
        cfg.progress,
    );
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    let mut records = Vec::with_capacity(plan.request_count());
    for session in &plan.sessions {
        let due = start + session.start;
        // The scheduler only sleeps and spawns: request bodies are rendered inside the task so
        // a large prompt never delays the next arrival.
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            _ = &mut stop => {
                stopping.store(true, Ordering::Relaxed);
                tracing::warn!("stopping early: no new requests, waiting for those in flight");
                break;
            }
        }
        tasks.spawn(run_session(
            session.clone(),
            start,
            due,
            client.clone(),
            limit.clone(),
            stopping.clone(),
            counters.clone(),
            cfg.mode,
            cfg.model.clone(),
        ));
        // Reap finished sessions as we go so a long trace does not hold every result twice.
        while let Some(done) = tasks.try_join_next() {
            records.extend(done?);
        }
    }
    while let Some(done) = tasks.join_next().await {
        records.extend(done?);
    }
    let elapsed = start.elapsed();
    progress.finish();
    let summary = summarize(
        &records,
        RunInfo {
            ideal_hit_ratio: ideal,
            target_rps: plan.target_rps,
            elapsed,
            lag_threshold: cfg.lag_threshold,
            stopped_early: stopping.load(Ordering::Relaxed),
        },
    );
    if summary.lagged_requests > 0 {
        tracing::warn!(
            lagged = summary.lagged_requests,
            max_lag_ms = summary.max_lag_ms,
            "requests left behind schedule"
        );
    }
    Ok(summary)
}

#[allow(clippy::too_many_arguments)] // one call site; a struct would only rename the list
async fn run_session(
    session: Session,
    run_start: Instant,
    due: Instant,
    client: Client,
    limit: Option<Arc<Semaphore>>,
    stopping: Arc<AtomicBool>,
    counters: Arc<Counters>,
    mode: ApiMode,
    model: String,
) -> Vec<Record> {
    let mut out = Vec::with_capacity(session.requests.len());
    let mut scheduled = due;
    for (turn, req) in session.requests.iter().enumerate() {
        if stopping.load(Ordering::Relaxed) {
            break;
        }
        let _permit = match &limit {
            Some(s) => Some(
                s.clone()
                    .acquire_owned()
                    .await
                    .expect("semaphore is never closed"),
            ),
            None => None,
        };
        let outgoing = Outgoing {
            path: body::path(mode),
            body: body::render(req, mode, &model),
            session: (mode == ApiMode::Chat).then(|| session.id.clone()),
            target: pick_target(&session.id, turn, client.targets()),
        };
        counters.sent();
        let mut rec = client.send(outgoing, scheduled).await;
        rec.sent = scheduled.saturating_duration_since(run_start) + rec.lag;
        let failed = rec.error.is_some();
        counters.finished(!failed);
        out.push(rec);
        if failed {
            // A later turn resends history the server never answered; a real user would have
            // given up too, and the remaining turns would only measure the error path.
            break;
        }
        // The next turn is due the moment this answer is complete.
        scheduled = Instant::now();
    }
    out
}

/// Which of `n` targets turn `turn` of session `id` goes to: uniform and independent per
/// request (a client behind a load balancer in front of several router instances sees no
/// affinity, which is the hard case for their caches), yet the same in every run, so every
/// router compared gets the same split.
pub fn pick_target(id: &str, turn: usize, n: usize) -> usize {
    use std::hash::{Hash, Hasher};
    if n <= 1 {
        return 0;
    }
    // SipHash with fixed keys: deterministic, and well mixed even for ids that differ in one
    // digit.
    let mut h = std::hash::DefaultHasher::new();
    (id, turn).hash(&mut h);
    (h.finish() % n as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::pick_target;

    #[test]
    fn targets_are_split_evenly_per_request_and_deterministically() {
        let n = 3;
        let mut counts = [0usize; 3];
        let mut sessions_split = 0;
        for s in 0..2000 {
            let id = format!("s{s}");
            let picks: Vec<usize> = (0..4).map(|t| pick_target(&id, t, n)).collect();
            assert_eq!(
                picks,
                (0..4).map(|t| pick_target(&id, t, n)).collect::<Vec<_>>()
            );
            if picks.iter().any(|&p| p != picks[0]) {
                sessions_split += 1;
            }
            for p in picks {
                counts[p] += 1;
            }
        }
        // 8000 picks: each target within 10 % of a third.
        for c in counts {
            assert!((2400..=2933).contains(&c), "{counts:?}");
        }
        // Turns of one conversation land on different instances (1 - 3^-3 of sessions).
        assert!(sessions_split > 1800, "{sessions_split}");
        assert_eq!(pick_target("s1", 0, 1), 0);
        assert_eq!(pick_target("s1", 0, 0), 0);
    }
}
