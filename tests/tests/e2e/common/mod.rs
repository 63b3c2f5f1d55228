//! What several areas of the end-to-end binary share.

#[macro_use]
pub mod io_runtimes;
