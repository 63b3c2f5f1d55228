//! The `kvroute` binary: parses the configuration and runs the data plane.
#![forbid(unsafe_code)]
// The clock and DNS calls clippy.toml lists are denied in the routing-core
// modules only (see there); the I/O around the core uses them.
#![allow(clippy::disallowed_methods)]

use clap::Parser;
use kvroute::config::{Cli, Config};

// mimalloc: per-thread free lists suit thread-per-core workers that allocate
// and free request buffers on their own thread.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = Cli::parse();
    let cfg = match Config::load(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kvroute: {e}");
            std::process::exit(2);
        }
    };
    if let Some(kvroute::config::CliCommand::Upgrade) = cli.command {
        match kvroute::steer::upgrade::request(&cfg) {
            Ok(msg) => {
                println!("kvroute: {msg}");
                return;
            }
            Err(e) => {
                eprintln!("kvroute upgrade: {e}");
                std::process::exit(1);
            }
        }
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .init();
    if cli.check_config {
        // The files the configuration names are part of it (and an expired
        // certificate's warning shows here too).
        if let Err(e) = kvroute::state::load_tls(&cfg) {
            eprintln!("kvroute: {e}");
            std::process::exit(2);
        }
        // The keys file and the upstream key file too.
        if let Err(e) = kvroute::auth::Auth::new(&cfg.auth, &cfg.upstream) {
            eprintln!("kvroute: {e}");
            std::process::exit(2);
        }
        println!(
            "kvroute: configuration ok ({} replicas, {} workers)",
            cfg.replicas.len(),
            cfg.worker_count()
        );
        return;
    }
    match kvroute::server::run(cfg, cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("kvroute: {e}");
            std::process::exit(1);
        }
    }
}
