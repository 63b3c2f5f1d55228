//! Keeping every data plane in step: one task per data plane pushes the full
//! replica snapshot on connect and on every change, load deltas at scrape rate,
//! and reads `/state` to notice a restart (no push record: push everything again)
//! and to pass the data plane's passive failure counts back to the daemon.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kvroute_admin_api::ReplicaSpec;
use kvroute_admin_api::{
    ClearApplied, ClearRequest, HotPrefixes, LoadApplied, LoadUpdate, ReplicaLoad, ReplicasUpdate,
    State,
};
use tokio::sync::{mpsc, watch};

use crate::error::Result;
use crate::http::{self, Target};

/// The replica set as pushed; `None` until the daemon knows enough to push.
pub type SnapshotRx = watch::Receiver<Option<Arc<Vec<ReplicaSpec>>>>;
pub type LoadRx = watch::Receiver<Arc<Vec<ReplicaLoad>>>;

#[derive(Debug, Default)]
pub struct DataplaneStats {
    pub up: AtomicU64,
    pub pushes: AtomicU64,
    pub push_errors: AtomicU64,
    pub load_pushes: AtomicU64,
    pub restarts_seen: AtomicU64,
    /// Resyncs that found another daemon's push on top of ours.
    pub foreign_pushes_seen: AtomicU64,
    pub last_generation: AtomicU64,
}

#[derive(Clone)]
pub struct Dataplane {
    pub target: Target,
    pub timeout: Duration,
}

impl Dataplane {
    pub async fn put_replicas(&self, replicas: Vec<ReplicaSpec>, me: &str) -> Result<State> {
        let body = serde_json::to_vec(&ReplicasUpdate {
            replicas,
            source: Some(me.to_string()),
        })
        .expect("serialisable");
        http::json(&self.target, "PUT", "/replicas", Some(body), self.timeout).await
    }

    pub async fn put_load(&self, loads: Vec<ReplicaLoad>) -> Result<LoadApplied> {
        let body = serde_json::to_vec(&LoadUpdate { loads }).expect("serialisable");
        http::json(&self.target, "PUT", "/load", Some(body), self.timeout).await
    }

    pub async fn state(&self) -> Result<State> {
        http::json(&self.target, "GET", "/state", None, self.timeout).await
    }

    pub async fn clear(&self, url: &str, reason: &str) -> Result<ClearApplied> {
        let body = serde_json::to_vec(&ClearRequest {
            url: url.to_string(),
            reason: Some(reason.to_string()),
        })
        .expect("serialisable");
        http::json(
            &self.target,
            "POST",
            "/replicas/clear",
            Some(body),
            self.timeout,
        )
        .await
    }

    pub async fn hot_prefixes(&self, limit: usize) -> Result<HotPrefixes> {
        http::json(
            &self.target,
            "GET",
            &format!("/hot-prefixes?limit={limit}"),
            None,
            self.timeout,
        )
        .await
    }
}

/// What a data plane task reports back.
pub struct DpReport {
    pub index: usize,
    pub state: State,
}

#[allow(clippy::too_many_arguments)]
pub async fn run(
    index: usize,
    dp: Dataplane,
    me: String,
    mut snap: SnapshotRx,
    mut load: LoadRx,
    resync: Duration,
    stats: Arc<DataplaneStats>,
    reports: mpsc::UnboundedSender<DpReport>,
) {
    let mut need_push = true;
    let mut pushed_generation: Option<u64> = None;
    // Load as this data plane last acknowledged it: only what changed goes out.
    let mut sent: HashMap<String, ReplicaLoad> = HashMap::new();
    let mut warned_foreign = false;
    let mut tick = tokio::time::interval(resync);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if need_push {
            let current = snap.borrow_and_update().clone();
            if let Some(specs) = current {
                match dp.put_replicas(specs.as_ref().clone(), &me).await {
                    Ok(state) => {
                        need_push = false;
                        pushed_generation = Some(state.generation);
                        warned_foreign = false;
                        stats.pushes.fetch_add(1, Ordering::Relaxed);
                        stats.up.store(1, Ordering::Relaxed);
                        stats
                            .last_generation
                            .store(state.generation, Ordering::Relaxed);
                        tracing::info!(dataplane = %dp.target, replicas = specs.len(), generation = state.generation, "pushed replica set");
                        // Load is per live replica object: send it again at once
                        // so new replicas do not start from zero.
                        let loads = load.borrow().clone();
                        sent.clear();
                        if !loads.is_empty() && dp.put_load(loads.as_ref().clone()).await.is_ok() {
                            sent = loads.iter().map(|l| (l.url.clone(), l.clone())).collect();
                        }
                    }
                    Err(e) => {
                        stats.push_errors.fetch_add(1, Ordering::Relaxed);
                        stats.up.store(0, Ordering::Relaxed);
                        tracing::warn!(dataplane = %dp.target, error = %e, "push failed, will retry");
                    }
                }
            }
        }
        tokio::select! {
            r = snap.changed() => {
                if r.is_err() { return }
                need_push = true;
                continue;
            }
            r = load.changed() => {
                if r.is_err() { return }
                if need_push { continue }
                let loads = load.borrow_and_update().clone();
                let delta: Vec<ReplicaLoad> = loads
                    .iter()
                    .filter(|l| sent.get(&l.url) != Some(*l))
                    .cloned()
                    .collect();
                if delta.is_empty() {
                    continue;
                }
                match dp.put_load(delta.clone()).await {
                    Ok(a) => {
                        stats.load_pushes.fetch_add(1, Ordering::Relaxed);
                        for l in delta {
                            sent.insert(l.url.clone(), l);
                        }
                        if Some(a.generation) != pushed_generation {
                            // Someone replaced the set or the process restarted:
                            // the next resync decides which.
                            tick.reset_immediately();
                        }
                    }
                    Err(_) => {
                        stats.up.store(0, Ordering::Relaxed);
                        need_push = true;
                    }
                }
            }
            _ = tick.tick() => {
                match dp.state().await {
                    Ok(state) => {
                        stats.up.store(1, Ordering::Relaxed);
                        match &state.last_push {
                            None => {
                                if pushed_generation.is_some() {
                                    stats.restarts_seen.fetch_add(1, Ordering::Relaxed);
                                    tracing::info!(dataplane = %dp.target, "data plane restarted: pushing the full state");
                                }
                                need_push = true;
                            }
                            Some(p) if p.source != me => {
                                stats.foreign_pushes_seen.fetch_add(1, Ordering::Relaxed);
                                if !warned_foreign {
                                    warned_foreign = true;
                                    tracing::warn!(dataplane = %dp.target, other = %p.source,
                                        "another pusher replaced this data plane's replica set; \
                                         one control daemon per data-plane set is the model, \
                                         so this daemon will not fight it until its own state changes");
                                }
                            }
                            Some(_) if Some(state.generation) != pushed_generation => {
                                // Ours, yet not the generation we produced: a
                                // restart that another push of ours reached first.
                                need_push = true;
                            }
                            Some(_) => {}
                        }
                        let _ = reports.send(DpReport { index, state });
                    }
                    Err(e) => {
                        if stats.up.swap(0, Ordering::Relaxed) == 1 {
                            tracing::warn!(dataplane = %dp.target, error = %e, "data plane unreachable");
                        }
                        need_push = true;
                    }
                }
            }
        }
    }
}
