//! What the decisions ask of the runner. Every task, channel send and reply of
//! the daemon goes through one of these, so the decisions stay free of I/O and
//! can be tested by reading the list they return.
#![deny(clippy::disallowed_methods)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kvroute_admin_api::{ReplicaLoad, ReplicaSpec};
use tokio::sync::oneshot;

use super::ReplicaView;
use crate::config::{DnsConfig, HealthConfig, PushConfig, ReplicaConfig, ScrapeConfig};
use crate::error::ControlError;
use crate::kv_events::ClearNotice;

/// One thing for the runner to do, in the order the decisions returned it:
/// a view published after a replica's tasks started shows their KV counters.
#[derive(Debug)]
pub(super) enum Effect {
    /// Replace every data plane's push task with one per address in `admin`.
    StartDataplanes {
        admin: Vec<String>,
        push: PushConfig,
    },
    /// Replace the discovery watchers: the replica file and one per DNS name
    /// (the `n`th reports as `Source::Dns(n)`).
    StartDiscovery {
        file: Option<PathBuf>,
        dns: Vec<DnsConfig>,
    },
    /// Replace the replica's health probe, scraper and KV-event subscribers;
    /// their reports carry `gen`. `health` has the replica's own path applied.
    StartReplicaTasks {
        replica: ReplicaConfig,
        gen: u64,
        health: HealthConfig,
        scrape: ScrapeConfig,
    },
    /// The replica is gone: stop its tasks.
    StopReplicaTasks { url: String },
    /// Make the replica's KV-event subscribers reconnect: its engine restarted,
    /// and its event stream with it.
    ReconnectKvEvents { url: String },
    /// Tell every data plane to forget what it indexed for the replica.
    Clear(ClearNotice),
    /// Replay the data planes' hottest prefixes (at most `prefixes`, within
    /// `timeout`) to the standby at `url`, then report `Msg::Prewarmed`.
    Prewarm {
        url: String,
        prefixes: usize,
        timeout: Duration,
    },
    /// Answer a drain request.
    ReplyDrain {
        reply: oneshot::Sender<Result<(), ControlError>>,
        result: Result<(), ControlError>,
    },
    /// A replica set that differs from the one the push tasks have.
    PushSnapshot(Arc<Vec<ReplicaSpec>>),
    /// Load figures that differ from the ones the push tasks have.
    PushLoad(Arc<Vec<ReplicaLoad>>),
    /// What `/metrics` and `/status` show; each view's `kv` is the runner's to
    /// fill in from the replica's KV-event subscribers.
    PublishViews(Vec<ReplicaView>),
}
