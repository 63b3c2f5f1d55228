//! `cargo xtask demo`: four simulated replicas, kvroute in front, a short window of the
//! Mooncake conversation trace replayed through round-robin and then kv-aware routing, and the
//! two runs side by side. Meant to finish in under two minutes on a 2-core machine.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use kvroute_load::trace::{LowerOptions, DEFAULT_BLOCK_BYTES, DEFAULT_MAX_TOKENS_SCALE};
use kvroute_load::{ApiMode, Workload};

use kvroute_bench::fleet::measure::{load_args, measure, Measured};
use kvroute_bench::fleet::{self, Bins, Fleet, RouterSpec, SimSpec};
use kvroute_bench::trace::resolve_trace;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Mooncake-format trace (default: traces/conversation_trace.jsonl in the repository).
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Trace requests to replay per policy.
    #[arg(long, default_value_t = 500)]
    pub n: usize,
    /// Trace replay speed-up (timestamps divided by this).
    #[arg(long, default_value_t = 8.0)]
    pub speed: f64,
    /// Real seconds per simulated second in the replicas.
    #[arg(long, default_value_t = 0.25)]
    pub time_scale: f64,
    /// Simulated replicas.
    #[arg(long, default_value_t = 4)]
    pub replicas: usize,
    /// kvroute worker threads.
    #[arg(long, default_value_t = 1)]
    pub kvroute_workers: usize,
    /// Use the binaries already in target/release.
    #[arg(long)]
    pub no_build: bool,
    #[command(flatten)]
    pub engine: kvroute_bench::llama_routing::EngineOpts,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.engine.engine == kvroute_bench::llama_routing::Engine::LlamaCpp {
        return kvroute_bench::llama_routing::demo(&a.engine, a.kvroute_workers, a.no_build);
    }
    let started = Instant::now();
    anyhow::ensure!(a.n >= 1, "--n must be at least 1");
    anyhow::ensure!(a.replicas >= 1, "--replicas must be at least 1");
    let trace = resolve_trace(a.trace.as_deref())?;
    fleet::child::install_signal_handler();
    let bins = Bins::prepare(a.no_build)?;

    let supported = bins.kvroute_policies(&fleet::KNOWN_POLICIES)?;
    let second = if supported.iter().any(|p| p == "kv-aware") {
        "kv-aware"
    } else {
        eprintln!(
            "note: this kvroute build has no kv-aware policy yet (it accepts: {}); \
             comparing round-robin with least-loaded instead",
            supported.join(", ")
        );
        "least-loaded"
    };
    let policies = ["round-robin", second];

    let workload = Workload::Trace {
        path: trace.clone(),
        skip: 0,
        n: Some(a.n),
        opts: LowerOptions {
            block_bytes: DEFAULT_BLOCK_BYTES,
            speed: a.speed,
            max_tokens_scale: DEFAULT_MAX_TOKENS_SCALE,
        },
    };
    let plan = workload.plan()?;
    let mut sim = SimSpec {
        replicas: a.replicas,
        kv_blocks: 0,
        block_tokens: 16,
        time_scale: a.time_scale,
        prefill_tps: 8000.0,
        prefill_overhead_ms: fleet::SIM_PREFILL_OVERHEAD_MS,
        decode_tps: 50.0,
        max_seqs: 256,
        prefill_speeds: Vec::new(),
    };
    // Half the window's working set fits in the fleet: enough to reward routing that keeps a
    // conversation on the replica holding its prefix, too little for any router to get it free.
    sim.kv_blocks = fleet::size_kv_blocks(&plan, sim.block_bytes(), a.replicas, 0.5);
    let stats = plan.stats();
    let headline = format!(
        "{} requests of {} replayed {}x faster ({:.1} req/s), {} simulated replicas x {} KV blocks",
        stats.requests,
        trace.display(),
        a.speed,
        stats.target_rps,
        a.replicas,
        sim.kv_blocks
    );
    eprintln!("demo: {headline}");

    let log_dir = fleet::bench_dir().join("logs");
    let largs = load_args(&workload, ApiMode::Completions, Duration::from_secs(60));
    let mut results: Vec<(&str, Measured)> = Vec::new();
    for policy in policies {
        let spec = RouterSpec::Kvroute {
            policy: policy.to_owned(),
            workers: a.kvroute_workers,
            instances: 1,
        };
        let t = Instant::now();
        eprintln!("demo: kvroute --policy {policy}: starting the fleet and replaying…");
        let mut f = Fleet::start(&bins, &sim, &spec, &log_dir, "demo")
            .with_context(|| format!("start the fleet for --policy {policy}"))?;
        let logs = f.logs();
        let m = measure(&bins, &mut f, &plan, &largs, &log_dir, "demo").with_context(|| {
            let shown: Vec<String> = logs.iter().map(|p| p.display().to_string()).collect();
            format!(
                "replay through --policy {policy}; logs: {}",
                shown.join(" ")
            )
        })?;
        drop(f);
        eprintln!(
            "demo: kvroute --policy {policy}: done in {:.0} s",
            t.elapsed().as_secs_f64()
        );
        results.push((policy, m));
    }
    println!(
        "\n{}",
        side_by_side(
            &headline,
            (stats.ideal_hit_ratio, fleet::lru_ceiling(&plan, &sim)),
            fleet::ttft_floor_ms(&plan, &sim),
            &results
        )
    );
    eprintln!(
        "demo: finished in {:.0} s; process logs under {}",
        started.elapsed().as_secs_f64(),
        log_dir.display()
    );
    Ok(())
}

/// `ideal`: the hit ratio of one infinite cache, and of one LRU cache the fleet's size;
/// `floor`: TTFT p50 and p99 with one infinite cache and no queueing, ms.
fn side_by_side(
    headline: &str,
    ideal: (f64, f64),
    floor: (f64, f64),
    runs: &[(&str, Measured)],
) -> String {
    const COL: usize = 16;
    let pct = |x: f64| format!("{:.1} %", x * 100.0);
    let mut o = String::new();
    let _ = writeln!(o, "kvroute demo: {headline}\n");
    let _ = write!(o, "  {:<24}", "policy");
    for (p, _) in runs {
        let _ = write!(o, "{p:>COL$}");
    }
    o.push('\n');
    let mut row = |name: &str, f: &dyn Fn(&Measured) -> String, note: &str| {
        let _ = write!(o, "  {name:<24}");
        for (_, m) in runs {
            let _ = write!(o, "{:>COL$}", f(m));
        }
        let _ = writeln!(o, "  {note}");
    };
    row(
        "KV cache hit ratio",
        &|m| pct(m.fleet.hit_ratio),
        &format!(
            "(ideal {}: one infinite cache; {}: one LRU the fleet's size)",
            pct(ideal.0),
            pct(ideal.1)
        ),
    );
    row(
        "TTFT p50 ms",
        &|m| format!("{:.1}", m.client.ttft_ms.p50),
        &format!("(floor {:.1}: that cache, nothing queued)", floor.0),
    );
    row(
        "TTFT p99 ms",
        &|m| format!("{:.1}", m.client.ttft_ms.p99),
        &format!("(floor {:.1})", floor.1),
    );
    row("e2e p99 ms", &|m| format!("{:.1}", m.client.e2e_ms.p99), "");
    row(
        "imbalance (max/mean)",
        &|m| format!("{:.2}", m.fleet.imbalance),
        "(1.00 = even)",
    );
    row("errors", &|m| m.client.errors.to_string(), "");
    row(
        "share r0/r1/r2/...",
        &|m| m.fleet.shares(),
        "(requests per replica)",
    );
    row(
        "achieved req/s",
        &|m| format!("{:.1}", m.client.achieved_rps),
        "",
    );
    o.lines().map(str::trim_end).collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvroute_bench::fleet::measure::FleetCounts;

    /// One column per policy, and the ceilings beside the rows they bound.
    #[test]
    fn report_sets_each_policy_against_the_ideal_and_the_floor() {
        let run = |hit: f64, p99: f64| {
            let mut client = kvroute_load::stats::Summary::default();
            client.ttft_ms.p99 = p99;
            Measured {
                client,
                fleet: FleetCounts {
                    hit_ratio: hit,
                    ..Default::default()
                },
            }
        };
        let out = side_by_side(
            "h",
            (0.294, 0.271),
            (14.6, 271.8),
            &[
                ("round-robin", run(0.062, 900.0)),
                ("kv-aware", run(0.116, 400.0)),
            ],
        );
        let line = |name: &str| {
            out.lines()
                .find(|l| l.trim_start().starts_with(name))
                .unwrap_or_else(|| panic!("no {name} row in\n{out}"))
                .to_owned()
        };
        let hit = line("KV cache hit ratio");
        assert!(hit.contains("6.2 %") && hit.contains("11.6 %"), "{hit}");
        assert!(hit.contains("(ideal 29.4 %"), "{hit}");
        assert!(hit.contains("27.1 %: one LRU the fleet's size)"), "{hit}");
        let p99 = line("TTFT p99 ms");
        assert!(p99.contains("900.0") && p99.contains("400.0"), "{p99}");
        assert!(p99.contains("(floor 271.8)"), "{p99}");
        assert!(line("TTFT p50 ms").contains("(floor 14.6:"), "{out}");
    }
}
