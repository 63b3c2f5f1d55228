//! The daemon's error type: one enum, so callers can tell a bad config (exit at
//! start, keep the old one on reload) from a data plane that is not there yet.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("invalid config: {0}")]
    Invalid(String),
    #[error("replica file {path}: {msg}")]
    ReplicaFile { path: PathBuf, msg: String },
    #[error("{target}: {msg}")]
    Http { target: String, msg: String },
    #[error("{target}: HTTP {status}: {body}")]
    Status {
        target: String,
        status: u16,
        body: String,
    },
    #[error("metrics of {target}: {msg}")]
    Scrape { target: String, msg: String },
    #[error("KV event payload: {0}")]
    Decode(String),
    #[error("KV event replay from {endpoint}: {source}")]
    Replay {
        endpoint: String,
        #[source]
        source: crate::kv_replay::ReplayError,
    },
    /// An active health check answered, but not with 2xx.
    #[error("HTTP {status}")]
    Unhealthy { status: u16 },
    /// `POST /drain` of a URL the daemon does not manage.
    #[error("no replica {0}")]
    NoReplica(String),
    #[error("DNS {name}: {msg}")]
    Dns { name: String, msg: String },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = ControlError> = std::result::Result<T, E>;
