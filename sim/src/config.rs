//! Command-line configuration of `kvroute-sim`.

use std::net::SocketAddr;

use clap::Parser;

use super::engine::Timing;
use super::events::EventFormat;

/// A simulated vLLM-like replica: OpenAI-compatible HTTP, a prefix-caching KV cache model,
/// vLLM's metric names and KV event stream, and fault injection for tests.
/// A flag given twice takes its last value, so wrappers can append overrides.
#[derive(Debug, Clone, Parser)]
#[command(name = "kvroute-sim", version, args_override_self = true)]
pub struct Config {
    /// Address to serve HTTP on.
    #[arg(long, default_value = "127.0.0.1:8001")]
    pub listen: SocketAddr,
    /// Replica name, returned in the `x-replica` header and in /sim/stats.
    #[arg(long, default_value = "r0")]
    pub name: String,
    /// Served model name; requests naming another model get 404 like vLLM.
    #[arg(long, default_value = "sim-model")]
    pub model: String,
    /// KV cache capacity in blocks (vLLM's num_gpu_blocks).
    #[arg(long, default_value_t = 8192)]
    pub kv_blocks: usize,
    /// Tokens per KV block; the simulator counts 4 bytes of rendered prompt per token.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub block_tokens: u32,
    /// Prefill throughput, prompt tokens per simulated second.
    #[arg(long, default_value_t = 8000.0)]
    pub prefill_tps: f64,
    /// Fixed cost of each prefill, simulated milliseconds.
    #[arg(long, default_value_t = 10.0)]
    pub prefill_overhead_ms: f64,
    /// Decode speed of a lone sequence, tokens per simulated second.
    #[arg(long, default_value_t = 50.0)]
    pub decode_tps: f64,
    /// Running batch size at which a decode step takes twice as long as alone
    /// (step = 1/decode_tps × (1 + batch/alpha)).
    #[arg(long, default_value_t = 64.0)]
    pub decode_batch_alpha: f64,
    /// Maximum running sequences; more wait (vllm:num_requests_waiting).
    #[arg(long, default_value_t = 256)]
    pub max_seqs: usize,
    /// Real seconds per simulated second: 0.01 runs 100× faster, 0 never sleeps.
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// Publish KV events on a ZMQ PUB socket bound at this endpoint, e.g. tcp://127.0.0.1:5557.
    #[arg(long)]
    pub kv_events: Option<String>,
    /// KV event encoding: `map` (type-tagged maps, current vLLM) or `legacy` (tagged arrays).
    #[arg(long, value_enum, default_value_t = EventFormat::Map)]
    pub kv_events_format: EventFormat,
    /// Runtime threads; 1 runs everything on one current-thread runtime.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub threads: u32,
    /// Whose surface to serve: `vllm` (vLLM's metric names, KV events) or
    /// `llamacpp` (llama.cpp's server: `llamacpp:` metrics, `/props`, `/slots`,
    /// `/health` answering 503 while loading). The cache model is the
    /// simulator's own either way.
    #[arg(long, value_enum, default_value_t = SimEngine::Vllm)]
    pub engine: SimEngine,
    /// llamacpp: slots (`--parallel`); requests beyond them wait (deferred).
    /// Each slot's context is the KV capacity divided among them.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub parallel: u32,
    /// llamacpp: serve no `/metrics` (501, as without `--metrics`).
    #[arg(long)]
    pub no_metrics: bool,
    /// llamacpp: serve no `/slots` (501, as with `--no-slots`).
    #[arg(long)]
    pub no_slots: bool,
    /// Answer every request with llama.cpp's 503 "Loading model" for this long
    /// after start (real milliseconds).
    #[arg(long, default_value_t = 0)]
    pub loading_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SimEngine {
    Vllm,
    Llamacpp,
}

impl Config {
    pub fn timing(&self) -> Timing {
        Timing {
            prefill_tps: self.prefill_tps.max(f64::MIN_POSITIVE),
            prefill_overhead: self.prefill_overhead_ms.max(0.0) / 1000.0,
            decode_tps: self.decode_tps.max(f64::MIN_POSITIVE),
            decode_batch_alpha: self.decode_batch_alpha.max(f64::MIN_POSITIVE),
            time_scale: self.time_scale.max(0.0),
        }
    }

    pub fn block_tokens(&self) -> usize {
        self.block_tokens as usize
    }

    /// Sequences that run at once: llama.cpp's slots, or `--max-seqs`.
    pub fn running_limit(&self) -> usize {
        match self.engine {
            SimEngine::Llamacpp => self.parallel as usize,
            SimEngine::Vllm => self.max_seqs,
        }
    }

    /// llamacpp: the tokens one slot holds.
    pub fn slot_tokens(&self) -> usize {
        self.kv_blocks * self.block_tokens() / self.parallel.max(1) as usize
    }
}
