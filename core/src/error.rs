//! The routing core's one error type: a configuration or replica-set update it
//! refuses. Nothing in the core is retried, so it carries no retryability.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum Error {
    /// A routing setting out of range, or a replica set the table cannot hold
    /// (too many replicas, a URL twice, a URL that is not an address).
    #[error("config: {0}")]
    Config(String),
}
