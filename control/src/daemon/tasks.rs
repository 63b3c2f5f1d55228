//! The tasks that watch one replica (health probe, scraper, one KV-event
//! subscriber per data-parallel rank) and what they share with the runner.
//! Every report carries the generation the tasks were started with, so the
//! decisions can ignore a replaced task's last words.

use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::Msg;
use crate::config::{kv_endpoint, ms, HealthConfig, ReplicaConfig, ScrapeConfig};
use crate::health;
use crate::http;
use crate::kv_events::{self, ClearNotice, KvStats};
use crate::scraper::Scraper;

/// One replica's running tasks; dropping it stops them.
pub(super) struct ReplicaTasks {
    tasks: Vec<JoinHandle<()>>,
    /// Counters of the KV-event subscribers, shown in `/metrics` and read for
    /// the calibrated block budget.
    kv_stats: Option<Arc<KvStats>>,
    /// Bumped to make the subscribers reconnect; outlives task restarts, so a
    /// subscriber started later still sees the next bump.
    kv_reconnect: watch::Sender<u64>,
}

impl ReplicaTasks {
    /// No tasks yet.
    pub(super) fn new() -> ReplicaTasks {
        ReplicaTasks {
            tasks: Vec::new(),
            kv_stats: None,
            kv_reconnect: watch::channel(0).0,
        }
    }

    pub(super) fn kv_stats(&self) -> Option<&Arc<KvStats>> {
        self.kv_stats.as_ref()
    }

    /// Makes the KV-event subscribers reconnect.
    pub(super) fn reconnect_kv_events(&self) {
        self.kv_reconnect.send_modify(|g| *g += 1);
    }

    /// Stops the running tasks and starts new ones for `replica`, reporting as
    /// generation `gen` on `msgs` (probes, scrapes) and `clears` (KV events).
    pub(super) fn restart(
        &mut self,
        replica: &ReplicaConfig,
        gen: u64,
        hc: HealthConfig,
        sc: ScrapeConfig,
        msgs: &mpsc::UnboundedSender<Msg>,
        clears: &mpsc::UnboundedSender<ClearNotice>,
    ) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        let url = &replica.url;
        if let Ok((target, _)) = http::split_url(url) {
            let tx = msgs.clone();
            let u = url.clone();
            self.tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(ms(hc.interval_ms));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let result = health::probe(&target, &hc.path, ms(hc.timeout_ms)).await;
                    if tx
                        .send(Msg::Probe {
                            url: u.clone(),
                            gen,
                            result,
                        })
                        .is_err()
                    {
                        return;
                    }
                }
            }));
        }
        if replica.metrics_url().is_some() {
            let mut scraper = Scraper::new(replica, ms(sc.timeout_ms));
            let tx = msgs.clone();
            let u = url.clone();
            self.tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(ms(sc.interval_ms));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let report = scraper.once().await;
                    if tx
                        .send(Msg::Scrape {
                            url: u.clone(),
                            gen,
                            report,
                        })
                        .is_err()
                    {
                        return;
                    }
                }
            }));
        }
        self.kv_stats = None;
        if let Some(base) = &replica.kv_events {
            let stats = Arc::new(KvStats::default());
            for rank in 0..replica.dp_ranks {
                let Ok(endpoint) = kv_endpoint(base, rank) else {
                    continue;
                };
                let replay = replica
                    .kv_events_replay
                    .as_ref()
                    .and_then(|b| kv_endpoint(b, rank).ok());
                self.tasks.push(tokio::spawn(kv_events::subscribe(
                    kv_events::Feed {
                        url: url.clone(),
                        endpoint,
                        replay,
                    },
                    stats.clone(),
                    clears.clone(),
                    self.kv_reconnect.subscribe(),
                )));
            }
            self.kv_stats = Some(stats);
        }
    }
}

impl Drop for ReplicaTasks {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}
