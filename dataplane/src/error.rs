use thiserror::Error;

/// Everything that can go wrong in the data plane outside one request's handling.
#[derive(Debug, Error)]
pub enum Error {
    #[error("config: {0}")]
    Config(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("io_uring unavailable: {0}")]
    UringUnavailable(String),
}
