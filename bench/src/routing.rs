//! `cargo xtask bench routing`: routing quality of kvroute's policies against SGLang's router,
//! on the same simulated fleet and the same requests.
//!
//! Every row starts a fresh fleet (new replicas, new router), so no router inherits a cache
//! warmed by the one before it. The replicas' KV capacity is sized from the workload so the
//! fleet holds only part of its working set: with room for everything, any router hits and
//! routing quality is invisible.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::ValueEnum;
use kvroute_core::route::RoutingConfig;
use kvroute_load::plan::Plan;
use kvroute_load::synthetic::SharedPrefixConfig;
use kvroute_load::trace::{LowerOptions, DEFAULT_BLOCK_BYTES, DEFAULT_MAX_TOKENS_SCALE};
use kvroute_load::{ApiMode, Workload};
use kvroute_sim::engine::Timing;
use serde::Serialize;

use crate::fleet::measure::{load_args, measure, Measured};
use crate::fleet::peers::{self, Gateway};
use crate::fleet::{self, Bins, Candidate, Fleet, RouterSpec, SimSpec};
use crate::replay::{replay, FleetModel};

mod llama_cell;
mod matrix;

/// kvroute's policies, in the order rows are printed; those the binary does not know are
/// skipped with a note, so the benchmark runs before and after a policy is merged.
const KVROUTE_POLICIES: &str = "round-robin,least-loaded,consistent-hash,kv-aware";
const SMG_POLICIES: &str = "cache_aware";
const SGLANG_POLICIES: &str = "cache_aware";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum WorkloadArg {
    Trace,
    Synthetic,
    Both,
}

/// Boxed so the `Bench` subcommand enum stays small (clippy's `large_enum_variant`).
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    opts: Box<Opts>,
}

#[derive(clap::Args, Clone, Debug)]
pub struct Opts {
    /// Which workload(s) to run.
    #[arg(long, value_enum, default_value = "both")]
    pub workload: WorkloadArg,
    /// Mooncake-format trace (default: traces/conversation_trace.jsonl in the repository).
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Trace requests to replay.
    #[arg(long, default_value_t = 2000)]
    pub n: usize,
    /// Trace lines to skip first.
    #[arg(long, default_value_t = 0)]
    pub skip: usize,
    /// Trace replay speed-up (timestamps divided by this). The default puts the default fleet
    /// near its knee, where queueing starts to show in TTFT but the fleet keeps up.
    #[arg(long, default_value_t = 20.0)]
    pub speed: f64,
    /// Bytes of prompt per 512-token trace block.
    #[arg(long, default_value_t = DEFAULT_BLOCK_BYTES)]
    pub block_bytes: usize,
    /// Synthetic: tenants, each with its own system prompt.
    #[arg(long, default_value_t = 32)]
    pub groups: u32,
    /// Synthetic: users per tenant.
    #[arg(long, default_value_t = 12)]
    pub users: u32,
    /// Synthetic: turns per conversation.
    #[arg(long, default_value_t = 4)]
    pub turns: u32,
    /// Synthetic: bytes of each tenant's system prompt.
    #[arg(long, default_value_t = 16384)]
    pub system_bytes: usize,
    /// Synthetic: new conversations per second.
    #[arg(long, default_value_t = 24.0)]
    pub rate: f64,
    /// Synthetic: users per tenant fall as 1 / rank^skew (same total); 0 for equal tenants.
    #[arg(long, default_value_t = 0.0)]
    pub tenant_skew: f64,
    /// Synthetic: fraction of requests that are one-off prompts sharing nothing.
    #[arg(long, default_value_t = 0.0)]
    pub unshared_fraction: f64,
    /// Synthetic: bytes of each one-off prompt.
    #[arg(long, default_value_t = 1024)]
    pub unshared_bytes: usize,
    /// Simulated replicas.
    #[arg(long, default_value_t = 4)]
    pub replicas: usize,
    /// Fraction of the workload's distinct KV blocks the whole fleet can hold.
    #[arg(long, default_value_t = 0.5)]
    pub kv_fraction: f64,
    /// KV blocks per replica (overrides --kv-fraction).
    #[arg(long)]
    pub kv_blocks: Option<usize>,
    /// Real seconds per simulated second in the replicas.
    #[arg(long, default_value_t = 0.1)]
    pub time_scale: f64,
    /// Replica prefill throughput, tokens per simulated second.
    #[arg(long, default_value_t = 8000.0)]
    pub prefill_tps: f64,
    /// Per-replica multipliers of --prefill-tps, cycled over the replicas (comma-separated,
    /// e.g. `2,1,1,0.5` for a fleet of mixed GPU generations); empty for all alike.
    #[arg(long, value_delimiter = ',')]
    pub prefill_speeds: Vec<f64>,
    /// kvroute policies to compare (comma-separated).
    #[arg(long, default_value = KVROUTE_POLICIES, value_delimiter = ',')]
    pub policies: Vec<String>,
    /// Policies of SGLang's current gateway (smg 1.13.0) to compare (comma-separated; empty
    /// to leave it out). It runs from a venv under target/bench-peers, made from PyPI.
    #[arg(long, default_value = SMG_POLICIES, value_delimiter = ',')]
    pub smg_policies: Vec<String>,
    /// Policies of SGLang's older router (sglang-router 0.3.2) to compare (comma-separated;
    /// empty to leave it out).
    #[arg(long, default_value = SGLANG_POLICIES, value_delimiter = ',')]
    pub sglang_policies: Vec<String>,
    /// Python that has `sglang-router` installed (default: a venv under target/bench-peers,
    /// made from PyPI).
    #[arg(long)]
    pub python: Option<PathBuf>,
    /// Also run the cache-aware policies (kvroute kv-aware, SGLang cache_aware) as this many
    /// independent router instances over one fleet, each request sent to one of them at
    /// random (comma-separated counts; `1` for none).
    #[arg(long, default_value = "2", value_delimiter = ',')]
    pub instances: Vec<usize>,
    /// kvroute worker threads.
    #[arg(long, default_value_t = 1)]
    pub kvroute_workers: usize,
    /// Send /v1/chat/completions with an x-session-id header instead of /v1/completions.
    #[arg(long)]
    pub chat: bool,
    /// Use the binaries already in target/release.
    #[arg(long)]
    pub no_build: bool,
    /// Benchmark this kvroute binary instead of target/release/kvroute (e.g. another branch's
    /// build); its policies are detected the same way.
    #[arg(long)]
    pub kvroute_bin: Option<PathBuf>,
    /// Run the robustness matrix (`bench/src/routing/matrix.rs`) instead of the workloads
    /// above: every cell a workload on a fleet, each with kvroute kv-aware and the peers
    /// beside it, reported as ratios against smg's cache_aware; with `--offline`, replayed.
    /// Its `llama-cpp` cell runs on real llama.cpp replicas (the `--llama-*` options), and is
    /// reported as skipped with `--offline` or where no llama.cpp server can be built.
    #[arg(long)]
    pub matrix: bool,
    /// With --matrix: only these cells (comma-separated names; default all).
    #[arg(long, value_delimiter = ',')]
    pub matrix_cells: Vec<String>,
    /// Copy the report and its chart into docs/bench/ (routing.md and routing.svg, or
    /// routing-matrix.md and routing-matrix.svg with --matrix).
    #[arg(long)]
    pub publish: bool,
    /// Print the results as one JSON object on stdout (progress goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Instead of starting processes, replay each workload offline (`/v1/completions`) through
    /// kvroute's router and the simulator's models (`bench/src/replay.rs`), once per value:
    /// `[routing]` keys separated by `;` (e.g. `w_prefill = 0.2; epsilon = 0.25`; the policy is
    /// kv-aware unless `policy = …`), `default` for none. Deterministic and seconds long, for
    /// sweeping a weight before measuring it here for real.
    #[arg(long)]
    pub offline: Vec<String>,
    #[command(flatten)]
    pub engine: crate::llama_routing::EngineOpts,
}

#[derive(Serialize)]
struct Report {
    generated: String,
    git: String,
    machine: String,
    api: &'static str,
    /// The command line that produced this report.
    command: String,
    #[serde(flatten)]
    peers: Peers,
    workloads: Vec<WorkloadResult>,
    /// The matrix's real-engine cell, when it was asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    llama_cell: Option<llama_cell::LlamaCell>,
}

/// Versions of the peer gateways that ran, when they were found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Peers {
    pub smg: Option<String>,
    pub sglang_router: Option<String>,
}

#[derive(Serialize)]
struct WorkloadResult {
    name: String,
    description: String,
    requests: usize,
    target_rps: f64,
    ideal_hit_ratio: f64,
    /// See [`fleet::lru_ceiling`].
    lru_hit_ratio: f64,
    /// See [`fleet::ttft_floor_ms`]: (p50, p99).
    ttft_floor_ms: (f64, f64),
    working_set_blocks: u64,
    sim: SimSpec,
    rows: Vec<Row>,
}

#[derive(Serialize)]
struct Row {
    router: String,
    #[serde(flatten)]
    outcome: Outcome,
}

#[derive(Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
enum Outcome {
    Ok(Box<Measured>),
    Skipped { reason: String },
    Failed { error: String },
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let a = *args.opts;
    if a.engine.engine == crate::llama_routing::Engine::LlamaCpp {
        return crate::llama_routing::bench(
            &a.engine,
            &crate::llama_routing::BenchOpts {
                routers: crate::llama_routing::Routers {
                    policies: &a.policies,
                    smg_policies: &a.smg_policies,
                    sglang_policies: &a.sglang_policies,
                    python: a.python.as_deref(),
                    kvroute_workers: a.kvroute_workers,
                },
                no_build: a.no_build,
                json: a.json,
                publish: a.publish,
            },
        );
    }
    let started = Instant::now();
    anyhow::ensure!(a.replicas >= 1, "--replicas must be at least 1");
    anyhow::ensure!(a.time_scale > 0.0, "--time-scale must be positive");
    anyhow::ensure!(a.kv_fraction > 0.0, "--kv-fraction must be positive");
    let unknown = matrix::unknown_cells(&a);
    anyhow::ensure!(
        unknown.is_empty(),
        "--matrix-cells: no cell named {} (cells: {})",
        unknown.join(", "),
        matrix::CELLS
            .iter()
            .map(|c| c.name)
            .collect::<Vec<_>>()
            .join(", ")
    );
    let trace = match a.workload {
        WorkloadArg::Synthetic => None,
        _ => Some(crate::trace::resolve_trace(a.trace.as_deref())?),
    };
    if !a.offline.is_empty() {
        return offline(&a, trace);
    }
    crate::fleet::child::install_signal_handler();
    let mut bins = Bins::prepare(a.no_build)?;
    if let Some(k) = &a.kvroute_bin {
        anyhow::ensure!(k.is_file(), "--kvroute-bin {}: no such file", k.display());
        bins.kvroute = k.clone();
    }
    let out_dir = fleet::bench_dir();
    let log_dir = out_dir.join("logs");

    let mut results = Vec::new();
    let mut peers = Peers::default();
    for Case {
        name,
        description,
        opts: c,
        workload,
    } in cases(&a, trace.as_deref())
    {
        let (candidates, found) = candidates(&c, &bins)?;
        peers.smg = peers.smg.or(found.smg);
        peers.sglang_router = peers.sglang_router.or(found.sglang_router);
        let plan = workload
            .plan()
            .with_context(|| format!("plan the {name} workload"))?;
        let (sim, ws) = sim_spec(&c, &plan);
        let stats = plan.stats();
        let floor = fleet::ttft_floor_ms(&plan, &sim);
        let lru = fleet::lru_ceiling(&plan, &sim);
        eprintln!(
            "\n== {name}: {description}\n   {} requests, {:.1} req/s target, ideal hit ratio {:.1} %, \
             fleet-sized LRU {:.1} %, TTFT floor p50 {:.1} ms p99 {:.1} ms, \
             working set {ws} KV blocks, {} replicas x {} blocks, time scale {}",
            stats.requests,
            stats.target_rps,
            stats.ideal_hit_ratio * 100.0,
            lru * 100.0,
            floor.0,
            floor.1,
            c.replicas,
            sim.kv_blocks,
            c.time_scale
        );
        let mode = if c.chat {
            ApiMode::Chat
        } else {
            ApiMode::Completions
        };
        let largs = load_args(&workload, mode, Duration::from_secs(120));
        let mut rows = Vec::new();
        for (label, spec) in &candidates {
            let outcome = match spec {
                Err(reason) => {
                    eprintln!("   {label}: skipped: {reason:#}");
                    Outcome::Skipped {
                        reason: format!("{reason:#}"),
                    }
                }
                Ok(spec) => {
                    let t = Instant::now();
                    // Whole lines only: the progress lines of the run come in between.
                    eprintln!("   {label}: starting the fleet and replaying…");
                    match one_row(&bins, &sim, spec, &log_dir, &name, &plan, &largs) {
                        Ok(m) => {
                            eprintln!(
                                "   {label}: hit {:.1} %, TTFT p50 {:.1} ms p99 {:.1} ms, {} errors ({:.0} s)",
                                m.fleet.hit_ratio * 100.0,
                                m.client.ttft_ms.p50,
                                m.client.ttft_ms.p99,
                                m.client.errors,
                                t.elapsed().as_secs_f64()
                            );
                            Outcome::Ok(Box::new(m))
                        }
                        Err(e) => {
                            eprintln!("   {label}: FAILED: {e:#}");
                            Outcome::Failed {
                                error: format!("{e:#}"),
                            }
                        }
                    }
                }
            };
            rows.push(Row {
                router: label.clone(),
                outcome,
            });
        }
        results.push(WorkloadResult {
            name,
            description,
            requests: stats.requests,
            target_rps: stats.target_rps,
            ideal_hit_ratio: stats.ideal_hit_ratio,
            lru_hit_ratio: lru,
            ttft_floor_ms: floor,
            working_set_blocks: ws,
            sim,
            rows,
        });
    }
    let llama_cell = match llama_cell(&a) {
        Some((cell, o)) => Some(llama_cell::run(cell.name, cell.what, &o, &bins)?),
        None => None,
    };
    if let Some(found) = llama_cell.as_ref().map(llama_cell::LlamaCell::peers) {
        peers.smg = peers.smg.or(found.smg);
        peers.sglang_router = peers.sglang_router.or(found.sglang_router);
    }

    let report = Report {
        generated: crate::report::generated(),
        git: crate::report::git_commit(),
        machine: format!(
            "{} cores",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        ),
        api: if a.chat {
            "/v1/chat/completions"
        } else {
            "/v1/completions"
        },
        command: std::iter::once("cargo xtask".to_owned())
            .chain(std::env::args().skip(1))
            .collect::<Vec<_>>()
            .join(" "),
        peers,
        workloads: results,
        llama_cell,
    };
    std::fs::create_dir_all(&out_dir)?;
    let md = markdown(&report);
    // The matrix is a report of its own: publishing it must not replace the workloads' report.
    let stem = if a.matrix {
        "routing-matrix"
    } else {
        "routing"
    };
    let (md_name, svg_name) = (format!("{stem}.md"), format!("{stem}.svg"));
    let md_path = out_dir.join(&md_name);
    let svg_path = out_dir.join(&svg_name);
    let json_path = out_dir.join(format!("{stem}.json"));
    crate::report::save(&md_path, &md)?;
    chart(&report, &svg_path).with_context(|| format!("draw {}", svg_path.display()))?;
    let json = serde_json::to_string_pretty(&report)?;
    std::fs::write(&json_path, &json)?;
    if a.json {
        println!("{json}");
    } else {
        println!("\n{}", terminal_tables(&report));
        if let Some(c) = &report.llama_cell {
            println!("{}", c.terminal());
        }
        if let Some(m) = matrix::summary(&report.workloads, report.llama_cell.as_ref()) {
            println!("{m}");
        }
    }
    eprintln!(
        "wrote {}, {} and {} ({:.0} s in all)",
        md_path.display(),
        svg_path.display(),
        json_path.display(),
        started.elapsed().as_secs_f64()
    );
    if a.publish {
        crate::report::publish(&[(&md_path, &md_name), (&svg_path, &svg_name)])?;
    }
    let failed: Vec<String> = report
        .workloads
        .iter()
        .flat_map(|w| {
            w.rows
                .iter()
                .filter(|r| matches!(r.outcome, Outcome::Failed { .. }))
                .map(move |r| format!("{} / {}", w.name, r.router))
        })
        .chain(report.llama_cell.iter().flat_map(|c| c.failed_rows()))
        .collect();
    anyhow::ensure!(
        failed.is_empty(),
        "{} row(s) failed: {} (logs under {})",
        failed.len(),
        failed.join(", "),
        log_dir.display()
    );
    Ok(())
}

/// Every router the run asks for, each either ready to start or with the reason it is not,
/// and the peers' versions found.
fn candidates(a: &Opts, bins: &Bins) -> anyhow::Result<(Vec<Candidate>, Peers)> {
    let supported = bins.kvroute_policies(&fleet::KNOWN_POLICIES)?;
    // One instance of every policy; more only of those whose quality depends on what each
    // instance has learned: the multi-instance rows ask how much survives the split.
    let instance_counts = |p: &str| {
        let cache_aware = p == "kv-aware" || p == "cache_aware";
        let multi = a
            .instances
            .iter()
            .copied()
            .filter(move |&n| n > 1 && cache_aware);
        std::iter::once(1).chain(multi)
    };
    let mut out: Vec<(usize, Candidate)> = Vec::new();
    for p in a.policies.iter().filter(|p| !p.is_empty()) {
        for instances in instance_counts(p) {
            let spec = RouterSpec::Kvroute {
                policy: p.clone(),
                workers: a.kvroute_workers,
                instances,
            };
            let label = spec.label();
            let spec = if supported.iter().any(|s| s == p) {
                Ok(spec)
            } else {
                Err(anyhow::anyhow!(
                    "this kvroute build does not accept --policy {p} (it accepts: {})",
                    supported.join(", ")
                ))
            };
            out.push((instances, (label, spec)));
        }
    }
    let mut versions = Peers::default();
    let (smg, v) = peers::rows(Gateway::Smg, &a.smg_policies, None, instance_counts);
    out.extend(smg);
    versions.smg = v;
    let (sglang, v) = peers::rows(
        Gateway::SglangRouter,
        &a.sglang_policies,
        a.python.as_deref(),
        instance_counts,
    );
    out.extend(sglang);
    versions.sglang_router = v;
    // Single-instance rows first (the comparison the table has always had), then the
    // multi-instance ones, each group in the order asked for (the sort is stable).
    out.sort_by_key(|(instances, _)| *instances > 1);
    Ok((out.into_iter().map(|(_, c)| c).collect(), versions))
}

/// For each router run as several instances, its combined hit ratio against the same
/// router as one instance, e.g. `kvroute kv-aware x2: 27.0 % vs 27.3 % (0.99x)`.
fn instance_ratios(w: &WorkloadResult) -> Vec<String> {
    let hit = |label: &str| {
        w.rows.iter().find_map(|r| match &r.outcome {
            Outcome::Ok(m) if r.router == label => Some(m.fleet.hit_ratio),
            _ => None,
        })
    };
    w.rows
        .iter()
        .filter_map(|r| {
            let (base, n) = r.router.rsplit_once(" x")?;
            n.parse::<usize>().ok()?;
            let (multi, single) = (hit(&r.router)?, hit(base)?);
            Some(format!(
                "{}: {} vs {} as one instance ({:.2}x)",
                r.router,
                pct(multi),
                pct(single),
                if single > 0.0 { multi / single } else { 0.0 }
            ))
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn one_row(
    bins: &Bins,
    sim: &SimSpec,
    spec: &RouterSpec,
    log_dir: &Path,
    tag: &str,
    plan: &kvroute_load::plan::Plan,
    load_args: &[String],
) -> anyhow::Result<Measured> {
    let mut fleet = Fleet::start(bins, sim, spec, log_dir, tag)?;
    let logs = fleet.logs();
    measure(bins, &mut fleet, plan, load_args, log_dir, tag).with_context(|| {
        let shown: Vec<String> = logs.iter().map(|p| p.display().to_string()).collect();
        format!("logs: {}", shown.join(" "))
    })
}

fn pct(x: f64) -> String {
    format!("{:.1} %", x * 100.0)
}

const HEADERS: [&str; 10] = [
    "router",
    "hit ratio",
    "TTFT p50 ms",
    "TTFT p90 ms",
    "TTFT p99 ms",
    "e2e p99 ms",
    "imbalance",
    "errors",
    "req/s",
    "share r0/r1/…",
];

fn cells(r: &Row) -> Vec<String> {
    match &r.outcome {
        Outcome::Ok(m) => vec![
            r.router.clone(),
            pct(m.fleet.hit_ratio),
            format!("{:.1}", m.client.ttft_ms.p50),
            format!("{:.1}", m.client.ttft_ms.p90),
            format!("{:.1}", m.client.ttft_ms.p99),
            format!("{:.1}", m.client.e2e_ms.p99),
            format!("{:.2}", m.fleet.imbalance),
            m.client.errors.to_string(),
            format!("{:.1}", m.client.achieved_rps),
            m.fleet.shares(),
        ],
        Outcome::Skipped { reason } => vec![r.router.clone(), format!("skipped: {reason}")],
        Outcome::Failed { error } => {
            let first = error.lines().next().unwrap_or_default();
            vec![r.router.clone(), format!("FAILED: {first}")]
        }
    }
}

fn workload_header(w: &WorkloadResult) -> String {
    format!(
        "{}: {} requests at {:.1} req/s; ideal hit ratio {} (one infinite cache), {} with one LRU cache \
         the size of the fleet's; TTFT floor p50 {:.1} ms, p99 {:.1} ms (one infinite cache, no queueing); {} replicas x {} KV blocks of {} tokens ({:.0} % of the {}-block working set fits the fleet); \
         replica time scale {}, prefill {} tokens/s{}",
        w.description,
        w.requests,
        w.target_rps,
        pct(w.ideal_hit_ratio),
        pct(w.lru_hit_ratio),
        w.ttft_floor_ms.0,
        w.ttft_floor_ms.1,
        w.sim.replicas,
        w.sim.kv_blocks,
        w.sim.block_tokens,
        (w.sim.kv_blocks * w.sim.replicas) as f64 * 100.0 / w.working_set_blocks.max(1) as f64,
        w.working_set_blocks,
        w.sim.time_scale,
        w.sim.prefill_tps,
        if w.sim.prefill_speeds.is_empty() {
            String::new()
        } else {
            let x: Vec<String> = w.sim.prefill_speeds.iter().map(|v| format!("{v}")).collect();
            format!(" x ({}) by replica", x.join(", "))
        }
    )
}

fn terminal_tables(r: &Report) -> String {
    let mut o = String::new();
    for w in &r.workloads {
        let _ = writeln!(o, "{} workload", w.name);
        let _ = writeln!(o, "  {}", workload_header(w));
        let rows: Vec<Vec<String>> = w.rows.iter().map(cells).collect();
        let mut width: Vec<usize> = HEADERS.iter().map(|h| h.chars().count()).collect();
        for row in rows.iter().filter(|r| r.len() == HEADERS.len()) {
            for (i, c) in row.iter().enumerate() {
                width[i] = width[i].max(c.chars().count());
            }
        }
        width[0] = width[0].max(rows.iter().map(|r| r[0].chars().count()).max().unwrap_or(0));
        let line = |o: &mut String, row: &[String]| {
            let mut s = String::from(" ");
            for (i, c) in row.iter().enumerate() {
                if i == 0 {
                    let _ = write!(s, " {c:<w$}", w = width[0]);
                } else if row.len() == HEADERS.len() {
                    let _ = write!(s, "  {c:>w$}", w = width[i]);
                } else {
                    let _ = write!(s, "  {c}");
                }
            }
            let _ = writeln!(o, "{}", s.trim_end());
        };
        line(&mut o, &HEADERS.map(String::from));
        for row in &rows {
            line(&mut o, row);
        }
        for r in instance_ratios(w) {
            let _ = writeln!(o, "  {r}");
        }
        o.push('\n');
    }
    o
}

fn markdown(r: &Report) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "# Routing quality: kvroute policies vs SGLang's router\n"
    );
    let _ = writeln!(
        o,
        "Generated by `cargo xtask bench routing` on {} ({}, commit {}). Every row runs on a \
         fresh fleet of `kvroute-sim` replicas (cold caches) with the same requests, sent to `{}` \
         with streaming. Hit ratio, per-replica share and imbalance (max/mean requests per \
         replica) are the replicas' own counters; TTFT and e2e are measured by the client in \
         wall-clock ms (simulated time runs at the stated time scale).\n",
        r.generated, r.machine, r.git, r.api
    );
    if let Some(m) = matrix::summary(&r.workloads, r.llama_cell.as_ref()) {
        let _ = writeln!(o, "## Against smg, cell by cell\n\n{m}");
    }
    for w in &r.workloads {
        let _ = writeln!(o, "## {}\n", w.name);
        let _ = writeln!(o, "{}\n", workload_header(w));
        let rows: Vec<Vec<String>> = w.rows.iter().map(cells).collect();
        o.push_str(&crate::report::markdown_table(&HEADERS, &rows));
        o.push('\n');
        let ratios = instance_ratios(w);
        if !ratios.is_empty() {
            let _ = writeln!(
                o,
                "Several router instances over this fleet (each request to one of them, picked \
                 at random), combined hit ratio against one instance:\n"
            );
            for line in ratios {
                let _ = writeln!(o, "- {line}");
            }
            o.push('\n');
        }
    }
    if let Some(c) = &r.llama_cell {
        let _ = writeln!(o, "{}", c.markdown());
    }
    let _ = writeln!(o, "## Notes\n");
    let _ = writeln!(o, "- Reproduce: `{}`", r.command);
    if let Some(v) = &r.peers.smg {
        let _ = writeln!(
            o,
            "- SGLang's current gateway is the `smg` {v} package from PyPI (\"Shepherd Model \
             Gateway\"), started with `smg launch --worker-urls … --policy P` and its default \
             tuning."
        );
    }
    if let Some(v) = &r.peers.sglang_router {
        let _ = writeln!(
            o,
            "- SGLang's router is the `sglang-router` {v} package from PyPI, started with \
             `python -m sglang_router.launch_router --worker-urls … --policy P` and its default \
             tuning. On a reused keep-alive connection it often holds a streamed response for \
             about 40 ms (the TCP delayed-ACK signature; also seen with a raw-socket client, not \
             with a fresh connection per request), which sets the floor of its TTFT here. Hit \
             ratio and balance are not affected."
        );
    }
    let skipped = r
        .workloads
        .iter()
        .flat_map(|w| &w.rows)
        .any(|row| matches!(row.outcome, Outcome::Skipped { .. }));
    if skipped {
        let _ = writeln!(
            o,
            "- Skipped rows name what was missing when this was generated; they fill in when the \
             benchmark is re-run with a kvroute build (or Python) that has them."
        );
    }
    o
}

/// Per workload, two horizontal bar panels: TTFT p50/p99 and hit ratio (with the ideal as a
/// line). Horizontal so router names fit as axis labels.
fn chart(r: &Report, path: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;

    let measured: Vec<(&WorkloadResult, Vec<(&str, &Measured)>)> = r
        .workloads
        .iter()
        .map(|w| {
            let rows = w
                .rows
                .iter()
                .filter_map(|row| match &row.outcome {
                    Outcome::Ok(m) => Some((row.router.as_str(), m.as_ref())),
                    _ => None,
                })
                .collect();
            (w, rows)
        })
        .collect();
    let panel_h = 60
        + 46 * measured
            .iter()
            .map(|(_, v)| v.len())
            .max()
            .unwrap_or(1)
            .max(1) as u32;
    let root =
        SVGBackend::new(path, (1200, panel_h * measured.len().max(1) as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let light = RGBColor(120, 170, 220);
    let dark = RGBColor(30, 80, 150);
    let hit = RGBColor(60, 150, 90);
    for (area, (w, rows)) in root
        .split_evenly((measured.len().max(1), 1))
        .into_iter()
        .zip(&measured)
    {
        let (left, right) = area.split_horizontally(660);
        let n = rows.len().max(1) as f64;
        let names: Vec<String> = rows.iter().rev().map(|(n, _)| n.to_string()).collect();
        let label_of = move |y: &f64| -> String {
            let i = y.floor();
            if (y - i - 0.5).abs() < 1e-6 && i >= 0.0 && (i as usize) < names.len() {
                names[i as usize].clone()
            } else {
                String::new()
            }
        };
        let max_ttft = rows
            .iter()
            .map(|(_, m)| m.client.ttft_ms.p99)
            .fold(1.0, f64::max)
            * 1.1;
        let mut c = ChartBuilder::on(&left)
            .caption(
                format!("{}: TTFT ms (light: p50, dark: p99)", w.name),
                ("sans-serif", 18),
            )
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(190)
            .build_cartesian_2d(0.0..max_ttft, 0.0..n)?;
        c.configure_mesh()
            .disable_y_mesh()
            .light_line_style(TRANSPARENT)
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_labels(2 * rows.len() + 1)
            .y_label_formatter(&label_of)
            .draw()?;
        // Table order top to bottom: the first row gets the highest y.
        let at = |i: usize| n - 1.0 - i as f64;
        c.draw_series(rows.iter().enumerate().map(|(i, (_, m))| {
            Rectangle::new(
                [(0.0, at(i) + 0.52), (m.client.ttft_ms.p50, at(i) + 0.85)],
                light.filled(),
            )
        }))?;
        c.draw_series(rows.iter().enumerate().map(|(i, (_, m))| {
            Rectangle::new(
                [(0.0, at(i) + 0.15), (m.client.ttft_ms.p99, at(i) + 0.48)],
                dark.filled(),
            )
        }))?;

        let mut h = ChartBuilder::on(&right)
            .caption(
                format!("{}: hit ratio % (line: ideal)", w.name),
                ("sans-serif", 18),
            )
            .margin(10)
            .margin_right(25)
            .x_label_area_size(30)
            .y_label_area_size(10)
            .build_cartesian_2d(0.0..100.0, 0.0..n)?;
        h.configure_mesh()
            .disable_y_mesh()
            .light_line_style(TRANSPARENT)
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_labels(0)
            .draw()?;
        h.draw_series(rows.iter().enumerate().map(|(i, (_, m))| {
            Rectangle::new(
                [(0.0, at(i) + 0.2), (m.fleet.hit_ratio * 100.0, at(i) + 0.8)],
                hit.filled(),
            )
        }))?;
        let ideal = w.ideal_hit_ratio * 100.0;
        h.draw_series(std::iter::once(PathElement::new(
            vec![(ideal, 0.0), (ideal, n)],
            BLACK.stroke_width(2),
        )))?;
        h.draw_series(rows.iter().enumerate().map(|(i, (_, m))| {
            Text::new(
                format!("{:.1}", m.fleet.hit_ratio * 100.0),
                (m.fleet.hit_ratio * 100.0 + 1.0, at(i) + 0.62),
                ("sans-serif", 13),
            )
        }))?;
    }
    root.present()?;
    Ok(())
}

/// `--offline`: each workload replayed in simulated time through the configured router, once per
/// set of `[routing]` overrides; prints one line per set (see [`crate::replay`]).
fn offline(a: &Opts, trace: Option<PathBuf>) -> anyhow::Result<()> {
    anyhow::ensure!(
        !a.chat,
        "--offline replays /v1/completions only; drop --chat"
    );
    let mut configs = Vec::new();
    for o in &a.offline {
        let keys = if o == "default" { "" } else { o.as_str() };
        let cfg: RoutingConfig = toml::from_str(&keys.replace(';', "\n"))
            .with_context(|| format!("--offline {o:?}: not [routing] keys"))?;
        cfg.validate()?;
        configs.push((o.as_str(), cfg));
    }
    for Case {
        name,
        description,
        opts,
        workload,
    } in cases(a, trace.as_deref())
    {
        let plan = workload
            .plan()
            .with_context(|| format!("plan the {name} workload"))?;
        let (sim, _) = sim_spec(&opts, &plan);
        let model = FleetModel {
            replicas: sim.replicas,
            kv_blocks: sim.kv_blocks,
            block_tokens: sim.block_tokens as usize,
            timing: Timing {
                prefill_tps: sim.prefill_tps,
                prefill_overhead: sim.prefill_overhead_ms / 1e3,
                decode_tps: sim.decode_tps,
                time_scale: sim.time_scale,
                ..Timing::default()
            },
            max_seqs: sim.max_seqs,
            prefill_speeds: sim.prefill_speeds.clone(),
        };
        println!(
            "== {name} (offline): {description}; fleet-sized LRU {:.2} %",
            fleet::lru_ceiling(&plan, &sim) * 100.0
        );
        for (label, cfg) in &configs {
            let r = replay(&plan, &model, cfg);
            println!(
                "   hit {:6.2} %  TTFT p50 {:6.1} p90 {:6.1} p99 {:6.1} ms  imbalance {:.2}  \
                 regret {:6.1}  unrouted {}  {:?}  [{label}]",
                r.hit_ratio * 100.0,
                r.ttft_p50_ms,
                r.ttft_p90_ms,
                r.ttft_p99_ms,
                r.imbalance,
                r.regret,
                r.unrouted,
                r.decisions,
            );
        }
    }
    if let Some((cell, _)) = llama_cell(a) {
        println!(
            "== {} (offline): skipped: {}",
            cell.name,
            llama_cell::OFFLINE
        );
    }
    Ok(())
}

/// One workload on one fleet: a table of the report.
pub struct Case {
    pub name: String,
    pub description: String,
    /// The options of this case (the command line's, or a matrix cell's).
    pub opts: Opts,
    pub workload: Workload,
}

/// What the run measures: the workloads `--workload` selects on the fleet the options
/// describe, or with `--matrix`, every cell of the robustness matrix.
fn cases(a: &Opts, trace: Option<&Path>) -> Vec<Case> {
    if a.matrix {
        return matrix::cells(a)
            .into_iter()
            .filter(|(cell, _)| matches!(cell.fleet, matrix::CellFleet::Simulated(_)))
            .flat_map(|(cell, opts)| {
                workloads(&opts, trace)
                    .into_iter()
                    .map(move |(_, description, workload)| Case {
                        name: cell.name.to_owned(),
                        description: format!("{}: {description}", cell.what),
                        opts: opts.clone(),
                        workload,
                    })
            })
            .collect();
    }
    workloads(a, trace)
        .into_iter()
        .map(|(name, description, workload)| Case {
            name: name.to_owned(),
            description,
            opts: a.clone(),
            workload,
        })
        .collect()
}

/// With `--matrix`, the real-engine cell and its options, when it is among the cells asked for.
fn llama_cell(a: &Opts) -> Option<(&'static matrix::Cell, Opts)> {
    if !a.matrix {
        return None;
    }
    matrix::cells(a)
        .into_iter()
        .find(|(cell, _)| matches!(cell.fleet, matrix::CellFleet::LlamaCpp))
}

/// The workloads `--workload` selects, with their descriptions.
fn workloads(a: &Opts, trace: Option<&Path>) -> Vec<(&'static str, String, Workload)> {
    let mut workloads = Vec::new();
    if let Some(path) = trace.filter(|_| a.workload != WorkloadArg::Synthetic) {
        let w = Workload::Trace {
            path: path.to_path_buf(),
            skip: a.skip,
            n: Some(a.n),
            opts: LowerOptions {
                block_bytes: a.block_bytes,
                speed: a.speed,
                max_tokens_scale: DEFAULT_MAX_TOKENS_SCALE,
            },
        };
        let desc = format!(
            "Mooncake conversation trace, requests {}..{}, replayed {}x faster",
            a.skip,
            a.skip + a.n,
            a.speed
        );
        workloads.push(("trace", desc, w));
    }
    if a.workload != WorkloadArg::Trace {
        let mut desc = format!(
            "synthetic shared prefix: {} tenants x {} users x {} turns, {} B system prompts, \
             {} new conversations/s",
            a.groups, a.users, a.turns, a.system_bytes, a.rate
        );
        if a.tenant_skew > 0.0 {
            let _ = write!(desc, ", tenant sizes falling as 1/rank^{}", a.tenant_skew);
        }
        if a.unshared_fraction > 0.0 {
            let _ = write!(
                desc,
                ", {:.0} % of requests one-off {} B prompts",
                a.unshared_fraction * 100.0,
                a.unshared_bytes
            );
        }
        let cfg = SharedPrefixConfig {
            groups: a.groups,
            users: a.users,
            turns: a.turns,
            system_bytes: a.system_bytes,
            question_bytes: 256,
            answer_bytes: 256,
            rate: a.rate,
            max_tokens: 16,
            seed: 0,
            tenant_skew: a.tenant_skew,
            unshared_fraction: a.unshared_fraction,
            unshared_bytes: a.unshared_bytes,
        };
        workloads.push(("synthetic", desc, Workload::SharedPrefix(cfg)));
    }

    workloads
}

/// The simulated fleet for `plan`, and the plan's working set in KV blocks.
fn sim_spec(a: &Opts, plan: &Plan) -> (SimSpec, u64) {
    let mut sim = SimSpec {
        replicas: a.replicas,
        kv_blocks: 0,
        block_tokens: 16,
        time_scale: a.time_scale,
        prefill_tps: a.prefill_tps,
        prefill_overhead_ms: fleet::SIM_PREFILL_OVERHEAD_MS,
        decode_tps: 50.0,
        max_seqs: 256,
        prefill_speeds: a.prefill_speeds.clone(),
    };
    let ws = fleet::working_set_blocks(plan, sim.block_bytes());
    sim.kv_blocks = a.kv_blocks.unwrap_or_else(|| {
        fleet::size_kv_blocks(plan, sim.block_bytes(), a.replicas, a.kv_fraction)
    });
    (sim, ws)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::measure::FleetCounts;
    use kvroute_load::Summary;

    fn report() -> Report {
        let mut client = Summary::default();
        client.ttft_ms.p50 = 12.34;
        client.ttft_ms.p99 = 99.0;
        client.errors = 2;
        let fleet = FleetCounts {
            hit_ratio: 0.25,
            per_replica: [("r0".into(), 3), ("r1".into(), 1)].into(),
            imbalance: 1.5,
            evictions: 0,
        };
        Report {
            generated: "now".into(),
            git: "abc".into(),
            machine: "2 cores".into(),
            api: "/v1/completions",
            command: "cargo xtask bench routing".into(),
            peers: Peers::default(),
            llama_cell: None,
            workloads: vec![WorkloadResult {
                name: "trace".into(),
                description: "d".into(),
                requests: 4,
                target_rps: 1.0,
                ideal_hit_ratio: 0.5,
                lru_hit_ratio: 0.4,
                ttft_floor_ms: (1.5, 20.5),
                working_set_blocks: 100,
                sim: SimSpec {
                    replicas: 2,
                    kv_blocks: 25,
                    block_tokens: 16,
                    time_scale: 0.1,
                    prefill_tps: 8000.0,
                    prefill_overhead_ms: 10.0,
                    decode_tps: 50.0,
                    max_seqs: 256,
                    prefill_speeds: Vec::new(),
                },
                rows: vec![
                    Row {
                        router: "kvroute round-robin".into(),
                        outcome: Outcome::Ok(Box::new(Measured { client, fleet })),
                    },
                    Row {
                        router: "kvroute kv-aware".into(),
                        outcome: Outcome::Skipped {
                            reason: "not in this build".into(),
                        },
                    },
                ],
            }],
        }
    }

    #[test]
    fn markdown_has_a_full_row_per_router_and_the_ideal() {
        let md = markdown(&report());
        assert!(
            md.contains("| kvroute round-robin | 25.0 % | 12.3 | 0.0 | 99.0 | 0.0 | 1.50 | 2 | 0.0 | 75/25 % |"),
            "{md}"
        );
        assert!(
            md.contains("| kvroute kv-aware | skipped: not in this build |"),
            "{md}"
        );
        assert!(md.contains("ideal hit ratio 50.0 %"), "{md}");
        assert!(md.contains("TTFT floor p50 1.5 ms, p99 20.5 ms"), "{md}");
        assert!(
            md.contains("40.0 % with one LRU cache the size of the fleet's"),
            "{md}"
        );
        // 2 × 25 blocks of a 100-block working set.
        assert!(md.contains("(50 % of the 100-block working set"), "{md}");
        assert!(md.contains("Skipped rows"), "{md}");
    }

    /// A row run as several instances is set against the same router's single-instance row.
    #[test]
    fn multi_instance_rows_are_compared_with_one_instance() {
        let mut r = report();
        let w = &mut r.workloads[0];
        let Outcome::Ok(single) = &w.rows[0].outcome else {
            unreachable!()
        };
        let single = single.as_ref().clone();
        let mut multi = single.clone();
        multi.fleet.hit_ratio = 0.2;
        let spec = RouterSpec::Kvroute {
            policy: "round-robin".into(),
            workers: 1,
            instances: 3,
        };
        assert_eq!(spec.label(), "kvroute round-robin x3");
        w.rows.push(Row {
            router: spec.label(),
            outcome: Outcome::Ok(Box::new(multi)),
        });
        // The single-instance kv-aware row was skipped: nothing to compare with, so the
        // x2 row is left out rather than guessed.
        w.rows.push(Row {
            router: "kvroute kv-aware x2".into(),
            outcome: Outcome::Ok(Box::new(single)),
        });
        assert_eq!(
            instance_ratios(w),
            vec!["kvroute round-robin x3: 20.0 % vs 25.0 % as one instance (0.80x)"]
        );
        let md = markdown(&r);
        assert!(
            md.contains("combined hit ratio against one instance"),
            "{md}"
        );
        assert!(md.contains("- kvroute round-robin x3: 20.0 %"), "{md}");
    }

    /// The matrix's llama.cpp cell is in the published report: a row of the verdict table and
    /// a section of its own.
    #[test]
    fn markdown_has_the_llama_cell_even_when_skipped() {
        let mut r = report();
        r.llama_cell = Some(llama_cell::LlamaCell {
            name: "llama-cpp".into(),
            description: "chat conversations on real llama.cpp replicas".into(),
            outcome: llama_cell::Outcome::Skipped {
                reason: "no llama.cpp server: no cmake".into(),
            },
        });
        let md = markdown(&r);
        assert!(md.contains("## Against smg, cell by cell"), "{md}");
        assert!(
            md.contains("| llama-cpp | skipped: no llama.cpp server: no cmake |"),
            "{md}"
        );
        assert!(
            md.contains("## llama-cpp\n\nchat conversations on real llama.cpp replicas: skipped"),
            "{md}"
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["llama_cell"]["status"], "skipped");
        assert!(serde_json::to_value(report())
            .unwrap()
            .get("llama_cell")
            .is_none());
    }

    #[test]
    fn chart_renders_with_and_without_measured_rows() {
        let dir = std::env::temp_dir().join(format!("xtask-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut r = report();
        chart(&r, &dir.join("a.svg")).unwrap();
        let svg = std::fs::read_to_string(dir.join("a.svg")).unwrap();
        assert!(svg.contains("kvroute round-robin"));
        r.workloads[0].rows.remove(0);
        chart(&r, &dir.join("b.svg")).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
