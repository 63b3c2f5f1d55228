//! `kvroute-sim`: a simulated vLLM-like (or llama.cpp-like, `--engine llamacpp`) replica for
//! kvroute's tests and benchmarks.
#![forbid(unsafe_code)]

use clap::Parser;
use kvroute_sim::{self as sim, Config};

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    // One thread by default: the simulator must sustain its load on a single core, and a
    // current-thread runtime has no cross-thread wakeups.
    let runtime = if config.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.threads as usize)
            .enable_all()
            .build()?
    };
    runtime.block_on(sim::run(config))
}
