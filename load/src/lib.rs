//! `kvroute-load`: Mooncake trace replayer and synthetic load generator.
//!
//! Library-first so the xtask benchmark and the end-to-end tests can drive a run in-process
//! (`run(LoadConfig) -> Summary`); the `kvroute-load` binary is only a clap wrapper.
//!
//! Pipeline: a workload (`trace` or `synthetic`) becomes a list of [`plan::Session`]s made of
//! [`plan::Segment`]s (id + length), `text` turns ids into deterministic bytes, `body` renders
//! OpenAI requests, `runner` sends them on schedule through `client`, `stats` folds the
//! per-request [`record::Record`]s into a [`stats::Summary`], `report` prints it; `progress`
//! shows the run's live counts on stderr meanwhile.
#![forbid(unsafe_code)]

pub mod body;
pub mod client;
pub mod config;
pub mod ideal;
pub mod plan;
pub mod progress;
pub mod record;
pub mod report;
pub mod runner;
pub mod sse;
pub mod stats;
pub mod synthetic;
pub mod text;
pub mod trace;

pub use config::{ApiMode, LoadConfig, Workload};
pub use runner::{run, run_plan, run_until};
pub use stats::Summary;
