//! Run configuration, shared by the CLI and in-process callers (xtask bench, e2e tests).

use std::path::PathBuf;
use std::time::Duration;

use super::progress;
use super::synthetic::SharedPrefixConfig;
use super::trace::{self, LowerOptions};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApiMode {
    /// `/v1/completions` with the whole prompt as one string.
    Completions,
    /// `/v1/chat/completions` with the prompt split into system/user/assistant messages.
    Chat,
}

#[derive(Clone, Debug)]
pub enum Workload {
    /// Replay lines `skip .. skip + n` of a Mooncake trace file open-loop.
    Trace {
        path: PathBuf,
        skip: usize,
        n: Option<usize>,
        opts: LowerOptions,
    },
    /// The shared-prefix multi-turn synthetic generator.
    SharedPrefix(SharedPrefixConfig),
}

impl Workload {
    pub fn plan(&self) -> anyhow::Result<super::plan::Plan> {
        match self {
            Workload::Trace {
                path,
                skip,
                n,
                opts,
            } => {
                anyhow::ensure!(opts.speed > 0.0, "--speed must be positive");
                anyhow::ensure!(opts.block_bytes >= 2, "--block-bytes must be at least 2");
                let entries = trace::load(path, *skip, *n)?;
                anyhow::ensure!(
                    !entries.is_empty(),
                    "no trace lines selected from {}",
                    path.display()
                );
                Ok(trace::plan(&entries, *opts))
            }
            Workload::SharedPrefix(cfg) => Ok(super::synthetic::plan(cfg)),
        }
    }
}

#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// Base URLs of the proxy or replica, e.g. `http://127.0.0.1:8080`. With several (router
    /// instances in front of one fleet), each request goes to one picked by
    /// [`super::runner::pick_target`].
    pub targets: Vec<String>,
    pub workload: Workload,
    pub mode: ApiMode,
    pub model: String,
    /// Cap on requests in flight; requests over the cap wait (and the wait shows up as lag).
    pub concurrency_limit: Option<usize>,
    pub request_timeout: Duration,
    /// Requests that leave later than this behind schedule are counted as lagged.
    pub lag_threshold: Duration,
    /// Live counts on stderr while the run goes (off by default: in-process callers and tests
    /// report for themselves).
    pub progress: progress::Options,
    /// Names the run in its progress lines.
    pub progress_label: String,
}

impl LoadConfig {
    pub fn new(target: impl Into<String>, workload: Workload) -> Self {
        Self {
            targets: vec![target.into()],
            workload,
            mode: ApiMode::Completions,
            // kvroute-sim's default `--model`: the simulator rejects any other name with 404.
            model: "sim-model".to_owned(),
            concurrency_limit: None,
            request_timeout: Duration::from_secs(60),
            lag_threshold: Duration::from_millis(50),
            progress: progress::Options::OFF,
            progress_label: "kvroute-load".to_owned(),
        }
    }
}
