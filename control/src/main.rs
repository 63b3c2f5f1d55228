//! `kvroute-control`: the slim control daemon of ARCHITECTURE.md.
//!
//! It owns everything slow (discovery, health checks, `/metrics` scraping, KV
//! events, warm pools) and pushes the result to data planes through their admin
//! API, whose types it shares with the data plane (`kvroute::admin`). This first
//! version only validates its command line; the daemon proper is its own issue.
#![forbid(unsafe_code)]

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "kvroute control daemon (discovery, health, load, KV events)"
)]
struct Args {
    /// Path of control.toml.
    #[arg(long)]
    config: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::bail!(
        "kvroute-control is not implemented yet (config {:?}); run kvroute with --replica instead",
        args.config
    )
}
