//! `kvroute-load`: replays a Mooncake trace or a synthetic shared-prefix workload against an
//! OpenAI-compatible endpoint and reports cache hit ratio, TTFT and routing balance.
//! All logic lives in `kvroute_load`; this is only the command line.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use kvroute_load::synthetic::SharedPrefixConfig;
use kvroute_load::trace::{LowerOptions, DEFAULT_BLOCK_BYTES, DEFAULT_MAX_TOKENS_SCALE};
use kvroute_load::{progress, report, run_until, ApiMode, LoadConfig, Workload};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Synthetic {
    SharedPrefix,
}

#[derive(Parser, Debug)]
#[command(
    name = "kvroute-load",
    about = "Trace replayer and load generator for kvroute"
)]
struct Args {
    /// Mooncake-format JSONL trace to replay open-loop.
    #[arg(
        long,
        conflicts_with = "synthetic",
        required_unless_present = "synthetic"
    )]
    trace: Option<PathBuf>,
    /// Generate a synthetic workload instead of replaying a trace.
    #[arg(long, value_enum)]
    synthetic: Option<Synthetic>,
    /// Base URL of the proxy or replica. Several (comma-separated or repeated) put one
    /// request at a time on a pseudo-random one of them: router instances sharing a fleet.
    #[arg(long, default_value = "http://127.0.0.1:8080", value_delimiter = ',')]
    target: Vec<String>,
    /// Number of trace lines to replay (default: all after --skip).
    #[arg(long)]
    n: Option<usize>,
    /// Trace lines to skip first.
    #[arg(long, default_value_t = 0)]
    skip: usize,
    /// Divide trace timestamps by this factor.
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
    /// Bytes of prompt text per 512-token trace block.
    #[arg(long, default_value_t = DEFAULT_BLOCK_BYTES)]
    block_bytes: usize,
    /// max_tokens = round(output_length × this), at least 1.
    #[arg(long, default_value_t = DEFAULT_MAX_TOKENS_SCALE)]
    max_tokens_scale: f64,
    /// Use /v1/chat/completions with multi-turn messages and an x-session-id header.
    #[arg(long)]
    chat: bool,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
    /// Build the plan and print its statistics (ideal hit ratio, rate) without sending.
    #[arg(long)]
    dry_run: bool,
    /// `model` field of every request (kvroute-sim answers 404 to any name but its own).
    #[arg(long, default_value = "sim-model")]
    model: String,
    /// Maximum requests in flight (default: unlimited, pure open loop).
    #[arg(long)]
    concurrency_limit: Option<usize>,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 60.0)]
    timeout_s: f64,
    /// Requests leaving later than this behind schedule are reported as lagged.
    #[arg(long, default_value_t = 50)]
    lag_threshold_ms: u64,
    /// Progress on stderr while the run goes: a line redrawn in place on a terminal and plain
    /// lines otherwise (auto), plain lines, JSON counters a line (for a parent process), or off.
    #[arg(long, value_enum, env = progress::STYLE_ENV, default_value = "auto")]
    progress: progress::Style,
    /// Seconds between two plain or JSON progress lines.
    #[arg(long, env = progress::INTERVAL_ENV, default_value = "10", value_parser = progress::parse_interval)]
    progress_interval_s: Duration,
    /// Names the run in its progress lines.
    #[arg(long, default_value = "kvroute-load")]
    progress_label: String,
    /// Synthetic: number of shared system prompts.
    #[arg(long, default_value_t = 4)]
    groups: u32,
    /// Synthetic: users per system prompt.
    #[arg(long, default_value_t = 8)]
    users: u32,
    /// Synthetic: turns per user conversation.
    #[arg(long, default_value_t = 3)]
    turns: u32,
    /// Synthetic: bytes of each shared system prompt.
    #[arg(long, default_value_t = 2048)]
    system_bytes: usize,
    /// Synthetic: bytes of each user question.
    #[arg(long, default_value_t = 128)]
    question_bytes: usize,
    /// Synthetic: bytes of each (synthesized) assistant answer kept in the history.
    #[arg(long, default_value_t = 128)]
    answer_bytes: usize,
    /// Synthetic: new conversations per second (0 = all at once).
    #[arg(long, default_value_t = 8.0)]
    rate: f64,
    /// Synthetic: max_tokens of every request.
    #[arg(long, default_value_t = 8)]
    max_tokens: u32,
    /// Synthetic: seed of prompt text and arrival times (same seed, same bytes and schedule).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Synthetic: users per tenant fall as 1 / rank^skew (same total); 0 for equal tenants.
    #[arg(long, default_value_t = 0.0)]
    tenant_skew: f64,
    /// Synthetic: fraction of requests that are one-off prompts sharing nothing.
    #[arg(long, default_value_t = 0.0)]
    unshared_fraction: f64,
    /// Synthetic: bytes of each one-off prompt.
    #[arg(long, default_value_t = 512)]
    unshared_bytes: usize,
}

impl Args {
    fn workload(&self) -> Workload {
        match (&self.trace, self.synthetic) {
            (Some(path), _) => Workload::Trace {
                path: path.clone(),
                skip: self.skip,
                n: self.n,
                opts: LowerOptions {
                    block_bytes: self.block_bytes,
                    speed: self.speed,
                    max_tokens_scale: self.max_tokens_scale,
                },
            },
            (None, Some(Synthetic::SharedPrefix) | None) => {
                Workload::SharedPrefix(SharedPrefixConfig {
                    groups: self.groups,
                    users: self.users,
                    turns: self.turns,
                    system_bytes: self.system_bytes,
                    question_bytes: self.question_bytes,
                    answer_bytes: self.answer_bytes,
                    rate: self.rate,
                    max_tokens: self.max_tokens,
                    seed: self.seed,
                    tenant_skew: self.tenant_skew,
                    unshared_fraction: self.unshared_fraction,
                    unshared_bytes: self.unshared_bytes,
                })
            }
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    anyhow::ensure!(args.timeout_s > 0.0, "--timeout-s must be positive");
    let workload = args.workload();
    if args.dry_run {
        let stats = workload.plan()?.stats();
        println!("{}", serde_json::to_string_pretty(&stats)?);
        return Ok(());
    }
    let mut cfg = LoadConfig::new(args.target[0].clone(), workload);
    cfg.targets.clone_from(&args.target);
    cfg.mode = if args.chat {
        ApiMode::Chat
    } else {
        ApiMode::Completions
    };
    cfg.model = args.model.clone();
    cfg.concurrency_limit = args.concurrency_limit;
    cfg.request_timeout = Duration::from_secs_f64(args.timeout_s);
    cfg.lag_threshold = Duration::from_millis(args.lag_threshold_ms);
    cfg.progress = progress::Options {
        style: args.progress,
        interval: args.progress_interval_s,
    };
    cfg.progress_label.clone_from(&args.progress_label);
    // Ctrl-C ends an hour-long replay with a summary of what was sent instead of nothing.
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let summary = run_until(cfg, ctrl_c).await?;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print!("{}", report::table(&summary));
    }
    Ok(())
}
