use std::time::Duration;

use thiserror::Error;

/// Everything that can go wrong in the data plane outside one request's handling.
///
/// The message is complete on its own: the binary prints it as `kvroute: {e}`
/// (and logs it the same way), so a variant that wraps another error repeats
/// that error's text after its own context, and also keeps it as the
/// [`source`](std::error::Error::source) for callers that look at the kind
/// (an `io::ErrorKind`, say) rather than the text.
#[derive(Debug, Error)]
pub enum Error {
    #[error("config: {0}")]
    Config(String),
    /// What the routing core refuses (a routing setting, a replica set); its
    /// message already says `config: `.
    #[error(transparent)]
    Core(#[from] kvroute_core::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("io_uring unavailable: {0}")]
    UringUnavailable(#[source] std::io::Error),
    /// A worker thread's runtime or listener failed before it accepted.
    #[error("config: worker {id}: {source}")]
    Worker {
        id: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("config: a worker did not start within {} s", .0.as_secs())]
    WorkerTimeout(Duration),
    /// `steering = "ebpf-required"` and the program could not be attached.
    #[error("config: steering = \"ebpf-required\" but eBPF steering is unavailable: {0}")]
    SteeringRequired(#[source] crate::steer::SteerError),
    /// `prediction_cache.backend` does not parse or does not resolve.
    #[error("config: prediction_cache.backend: {0}")]
    CacheBackend(#[source] crate::cache::redis::BackendError),
}
