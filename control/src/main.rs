//! `kvroute-control`: the slim control daemon of docs/architecture.md.
//!
//! It owns everything slow (discovery, health checks, `/metrics` scraping, KV
//! events, warm pools) and pushes the result to data planes through their admin
//! API, whose types it shares with the data plane (`kvroute-admin-api`).
//!
//! One daemon per set of data planes is the model. A second daemon pushing to the
//! same data plane is visible in the data plane's `/state` (`last_push.sources`)
//! and in this daemon's `kvroute_control_foreign_pushes_total`; this daemon does
//! not push back until its own view changes, so two daemons do not fight in a loop.
#![forbid(unsafe_code)]
// The clock calls clippy.toml lists are banned per module: the decision modules under daemon/ deny them.
#![allow(clippy::disallowed_methods)]

mod config;
mod daemon;
mod detect;
mod discovery;
mod error;
mod health;
mod http;
mod kv_events;
mod kv_replay;
mod llamacpp;
mod notify;
mod push;
mod scrape;
mod scraper;
mod surface;
mod warm;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "kvroute control daemon (discovery, health, load, KV events, warm pools)"
)]
struct Args {
    /// Path of control.toml.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Log one JSON object per line (for log shippers) instead of text.
    #[arg(long, global = true, env = "KVROUTE_CONTROL_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the daemon (the default).
    Run,
    /// Validate the configuration and exit.
    Check,
    /// Ask a running daemon to drain a replica: no new requests, in-flight ones
    /// finish, then it leaves (unless still listed, where it stays out of rotation).
    Drain {
        url: String,
        /// The daemon's `listen` address; read from --config when not given.
        #[arg(long)]
        control: Option<SocketAddr>,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if args.log_json {
        logs.json().init();
    } else {
        logs.init();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async_main(args))
}

fn need_config(args: &Args) -> anyhow::Result<(PathBuf, config::Config)> {
    let path = args
        .config
        .clone()
        .ok_or_else(|| anyhow::anyhow!("--config PATH is required"))?;
    let cfg = config::Config::load(&path)?;
    Ok((path, cfg))
}

async fn async_main(args: Args) -> anyhow::Result<()> {
    match &args.cmd {
        Some(Cmd::Check) => {
            let (path, cfg) = need_config(&args)?;
            println!("{}: ok ({})", path.display(), daemon::describe(&cfg));
            Ok(())
        }
        Some(Cmd::Drain { url, control }) => {
            let addr = match control {
                Some(a) => *a,
                None => need_config(&args)?.1.listen.ok_or_else(|| {
                    anyhow::anyhow!("the config has no `listen`; pass --control ADDR")
                })?,
            };
            println!("{}", surface::drain(addr, url).await?);
            Ok(())
        }
        None | Some(Cmd::Run) => run(args).await,
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let (path, cfg) = need_config(&args)?;
    let listen = cfg.listen;
    let d = daemon::Daemon::new(cfg, Arc::new(discovery::SystemResolver));
    let shared = d.shared.clone();
    let tx = d.sender();
    if let Some(addr) = listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("listen {addr}: {e}"))?;
        tracing::info!(%addr, "serving /metrics, /healthz, /status, /drain");
        tokio::spawn(surface::serve(l, shared.clone(), tx.clone()));
    }
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let reload_tx = tx.clone();
    let reload_shared = shared.clone();
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            notify::reloading();
            match config::Config::load(&path) {
                Ok(c) => {
                    if c.listen != listen {
                        tracing::warn!("`listen` changes need a restart; keeping the old address");
                    }
                    let _ = reload_tx.send(daemon::Msg::Reload(Box::new(c)));
                }
                Err(e) => {
                    reload_shared.reload_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %e, "reload rejected, keeping the running configuration");
                }
            }
            // Either way the daemon runs on (new or old configuration): back to ready.
            notify::reloaded();
        }
    });
    tokio::spawn(notify::run(shared.clone()));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = d.run() => {}
        _ = term.recv() => tracing::info!("SIGTERM: stopping (data planes keep their last state)"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: stopping"),
    }
    notify::stopping();
    Ok(())
}
