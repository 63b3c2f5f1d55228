//! `kvroute-sim`: a simulated vLLM-like (or llama.cpp-like) replica that kvroute's tests,
//! benchmarks and demo route to.
//!
//! The cache model (`cache`) and timing model (`engine`) are pure and unit-tested; `replica`
//! ties them to the clock and to the KV event publisher (`events`); `server` is the HTTP layer,
//! serving vLLM's surface (`metrics`) or llama.cpp's (`llamacpp`).
#![forbid(unsafe_code)]

pub mod body;
pub mod cache;
pub mod config;
pub mod engine;
pub mod error;
pub mod events;
pub mod fault;
pub mod llamacpp;
pub mod metrics;
pub mod replica;
pub mod request;
pub mod response;
pub mod server;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::mpsc;

pub use config::Config;
pub use replica::Replica;

/// Runs the simulator until the process is killed.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let listener = TcpListener::bind(config.listen).await?;
    let events = match &config.kv_events {
        Some(endpoint) => {
            let socket = events::bind(endpoint).await?;
            let (tx, rx) = mpsc::unbounded_channel();
            let (bs, format) = (config.block_tokens(), config.kv_events_format);
            tokio::spawn(events::publish(socket, bs, format, rx));
            tracing::info!(%endpoint, ?format, "publishing KV events");
            Some(tx)
        }
        None => None,
    };
    tracing::info!(
        listen = %config.listen, name = %config.name, model = %config.model,
        kv_blocks = config.kv_blocks, block_tokens = config.block_tokens,
        time_scale = config.time_scale, "kvroute-sim serving"
    );
    let replica = Replica::new(config, events);
    server::serve(listener, Arc::clone(&replica)).await?;
    Ok(())
}
