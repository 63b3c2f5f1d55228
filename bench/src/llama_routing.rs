//! Routing on real llama.cpp replicas: `cargo xtask demo --engine llama-cpp` (round-robin
//! against kv-aware), the routing bench on real engines (`cargo xtask bench routing --engine
//! llama-cpp`: kvroute's policies and SGLang's router), and the routing matrix's `llama-cpp`
//! cell ([`compare`]). All replay the same chat conversations (shared system prompts, multi-turn
//! histories) through a fresh fleet per router and report what the replicas themselves counted
//! (cached tokens, requests served), and the client's wall-clock TTFT.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::ValueEnum;
use kvroute_load::synthetic::SharedPrefixConfig;
use kvroute_load::{ApiMode, Workload};
use serde::Serialize;

use crate::fleet::llama::{measure, EngineMeasured, LlamaFleet, LlamaSpec};
use crate::fleet::measure::load_args;
use crate::fleet::peers::{self, Gateway};
use crate::fleet::{self, Bins, Candidate, RouterSpec};
use crate::llama::Llama;

/// What the replicas are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Engine {
    /// `kvroute-sim`, the simulated replica.
    #[default]
    Sim,
    /// `llama-server` on the random-weight test model (`cargo xtask llama` builds both).
    LlamaCpp,
}

/// The real-engine options shared by the demo and the bench.
#[derive(clap::Args, Clone, Debug)]
pub struct EngineOpts {
    /// What the replicas are: simulated, or real llama.cpp servers.
    #[arg(long, value_enum, default_value = "sim")]
    pub engine: Engine,
    /// llama-cpp: replicas.
    #[arg(long, default_value_t = 2)]
    pub llama_replicas: usize,
    /// llama-cpp: slots per replica (`--parallel`).
    #[arg(long, default_value_t = 4)]
    pub llama_slots: u32,
    /// llama-cpp: context tokens per replica, shared by its slots.
    #[arg(long, default_value_t = 16384)]
    pub llama_ctx: u32,
    /// llama-cpp: tenants, each with its own system prompt.
    #[arg(long, default_value_t = 4)]
    pub llama_groups: u32,
    /// llama-cpp: users per tenant, each holding one conversation.
    #[arg(long, default_value_t = 3)]
    pub llama_users: u32,
    /// llama-cpp: turns per conversation.
    #[arg(long, default_value_t = 3)]
    pub llama_turns: u32,
    /// llama-cpp: bytes of each tenant's system prompt.
    #[arg(long, default_value_t = 3000)]
    pub llama_system_bytes: usize,
    /// llama-cpp: new conversations per second.
    #[arg(long, default_value_t = 0.5)]
    pub llama_rate: f64,
    /// llama-cpp bench: times to run every router, the order rotated each time; the summary
    /// is the mean over runs (a real engine on a shared machine varies from run to run).
    #[arg(long, default_value_t = 1)]
    pub llama_runs: usize,
}

impl EngineOpts {
    fn spec(&self) -> LlamaSpec {
        LlamaSpec {
            replicas: self.llama_replicas,
            ctx: self.llama_ctx,
            slots: self.llama_slots,
        }
    }

    fn workload(&self) -> SharedPrefixConfig {
        SharedPrefixConfig {
            groups: self.llama_groups,
            users: self.llama_users,
            turns: self.llama_turns,
            system_bytes: self.llama_system_bytes,
            question_bytes: 200,
            answer_bytes: 200,
            rate: self.llama_rate,
            max_tokens: 16,
            seed: 0,
            ..SharedPrefixConfig::default()
        }
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.llama_replicas >= 1,
            "--llama-replicas must be at least 1"
        );
        anyhow::ensure!(self.llama_slots >= 1, "--llama-slots must be at least 1");
        anyhow::ensure!(
            self.llama_ctx >= 512 * self.llama_slots,
            "--llama-ctx must leave each slot at least 512 tokens"
        );
        anyhow::ensure!(
            self.llama_groups >= 1 && self.llama_users >= 1 && self.llama_turns >= 1,
            "--llama-groups, --llama-users and --llama-turns must be at least 1"
        );
        Ok(())
    }
}

/// One router's result, or why it has none.
#[derive(Serialize)]
pub struct Row {
    pub router: String,
    #[serde(flatten)]
    pub outcome: Outcome,
}

#[derive(Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    Ok(Box<EngineMeasured>),
    Skipped { reason: String },
    Failed { error: String },
}

/// Everything a run needs, prepared once.
pub struct Setup {
    bins: Bins,
    llama: Llama,
    spec: LlamaSpec,
    cfg: SharedPrefixConfig,
    headline: String,
    ideal_hit_ratio: f64,
}

/// Checks the options, then builds (unless `no_build`) or finds everything a run needs.
fn prepare(o: &EngineOpts, no_build: bool) -> anyhow::Result<Setup> {
    // Before any build: a mistyped option should not wait for one.
    o.validate()?;
    fleet::child::install_signal_handler();
    let bins = Bins::prepare(no_build)?;
    let llama = crate::llama::ensure()?;
    setup(o, bins, llama)
}

/// A run of the workload `o` describes on the replicas it describes, with these binaries and
/// this llama.cpp build.
pub fn setup(o: &EngineOpts, bins: Bins, llama: Llama) -> anyhow::Result<Setup> {
    o.validate()?;
    let spec = o.spec();
    let cfg = o.workload();
    let stats = Workload::SharedPrefix(cfg.clone()).plan()?.stats();
    let headline = format!(
        "{} chat requests ({} system prompts of {} B x {} users x {} turns, {} new conversations/s) \
         on {} llama-server {} replicas ({} slots, {}-token context, 1 thread each; random-weight \
         llama model, Phi-3 tokenizer)",
        stats.requests,
        cfg.groups,
        cfg.system_bytes,
        cfg.users,
        cfg.turns,
        cfg.rate,
        spec.replicas,
        crate::llama::VERSION,
        spec.slots,
        spec.ctx
    );
    Ok(Setup {
        bins,
        llama,
        spec,
        cfg,
        headline,
        ideal_hit_ratio: stats.ideal_hit_ratio,
    })
}

/// One fresh fleet behind `router`, the conversations replayed through it.
fn one_row(s: &Setup, router: &RouterSpec, tag: &str) -> anyhow::Result<EngineMeasured> {
    let log_dir = fleet::bench_dir().join("logs");
    let workload = Workload::SharedPrefix(s.cfg.clone());
    let plan = workload.plan()?;
    let largs = load_args(&workload, ApiMode::Chat, Duration::from_secs(120));
    let mut f = LlamaFleet::start(&s.bins, &s.llama, &s.spec, router, &log_dir, tag)
        .with_context(|| format!("start the llama.cpp fleet for {}", router.label()))?;
    let logs = f.logs();
    measure(&s.bins, &mut f, &plan, &largs, &log_dir, tag).with_context(|| {
        let shown: Vec<String> = logs.iter().map(|p| p.display().to_string()).collect();
        format!(
            "replay through {}; logs: {}",
            router.label(),
            shown.join(" ")
        )
    })
}

fn run_rows<'a>(
    s: &Setup,
    candidates: impl IntoIterator<Item = &'a Candidate>,
    tag: &str,
) -> Vec<Row> {
    let mut rows = Vec::new();
    for (label, spec) in candidates {
        let outcome = match spec {
            Err(reason) => {
                eprintln!("   {label}: skipped: {reason:#}");
                Outcome::Skipped {
                    reason: format!("{reason:#}"),
                }
            }
            Ok(spec) => {
                let t = Instant::now();
                eprintln!(
                    "   {label}: starting {} llama-server replicas and replaying…",
                    s.spec.replicas
                );
                match one_row(s, spec, tag) {
                    Ok(m) => {
                        eprintln!(
                            "   {label}: replicas' hit {:.1} %, TTFT p50 {:.0} ms p99 {:.0} ms, {} errors ({:.0} s)",
                            m.replicas.hit_ratio * 100.0,
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
    rows
}

fn kvroute_row(policy: &str, workers: usize) -> Candidate {
    let spec = RouterSpec::Kvroute {
        policy: policy.to_owned(),
        workers,
        instances: 1,
    };
    (spec.label(), Ok(spec))
}

/// `cargo xtask demo --engine llama-cpp`: round-robin, then kv-aware, side by side.
pub fn demo(o: &EngineOpts, kvroute_workers: usize, no_build: bool) -> anyhow::Result<()> {
    let started = Instant::now();
    let s = prepare(o, no_build)?;
    eprintln!("demo: {}", s.headline);
    let candidates = [
        kvroute_row("round-robin", kvroute_workers),
        kvroute_row("kv-aware", kvroute_workers),
    ];
    let rows = run_rows(&s, &candidates, "demo-llama");
    println!("\n{}", side_by_side(&s.headline, s.ideal_hit_ratio, &rows));
    eprintln!(
        "demo: finished in {:.0} s; process logs under {}",
        started.elapsed().as_secs_f64(),
        fleet::bench_dir().join("logs").display()
    );
    ensure_no_failures(&rows)
}

fn ensure_no_failures(rows: &[Row]) -> anyhow::Result<()> {
    let failed: Vec<&str> = rows
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Failed { .. }))
        .map(|r| r.router.as_str())
        .collect();
    anyhow::ensure!(failed.is_empty(), "failed: {}", failed.join(", "));
    Ok(())
}

/// Which routers to compare, from the routing bench's options.
pub struct Routers<'a> {
    /// kvroute policies; those this kvroute build does not accept are reported as skipped.
    pub policies: &'a [String],
    pub smg_policies: &'a [String],
    pub sglang_policies: &'a [String],
    /// Python that has `sglang-router` (default: its pinned venv).
    pub python: Option<&'a std::path::Path>,
    pub kvroute_workers: usize,
}

/// `cargo xtask bench routing --engine llama-cpp`'s options.
pub struct BenchOpts<'a> {
    pub routers: Routers<'a>,
    pub no_build: bool,
    pub json: bool,
    pub publish: bool,
}

/// The report of `cargo xtask bench routing --engine llama-cpp`.
#[derive(Serialize)]
struct BenchReport {
    generated: String,
    git: String,
    machine: String,
    command: String,
    #[serde(flatten)]
    comparison: Comparison,
}

/// The routers compared on one workload on real replicas: what ran, and what each router's
/// fleet measured.
#[derive(Serialize)]
pub struct Comparison {
    pub llama_cpp: &'static str,
    pub smg: Option<String>,
    pub sglang_router: Option<String>,
    /// The workload and the replicas, in one sentence.
    pub workload: String,
    pub ideal_hit_ratio: f64,
    pub replicas: LlamaSpec,
    /// Per router, over the runs.
    pub summary: Vec<Summarized>,
    /// Every run's rows, in the same router order.
    pub runs: Vec<Vec<Row>>,
}

/// One router over all runs: means of the per-run figures, and the spread of the hit ratio.
#[derive(Serialize)]
pub struct Summarized {
    pub router: String,
    /// Runs that produced figures.
    pub runs: usize,
    /// Why there are none, when no run did.
    pub note: Option<String>,
    pub hit_ratio: f64,
    pub hit_ratio_min: f64,
    pub hit_ratio_max: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    pub ttft_mean_ms: f64,
    pub errors: u64,
    /// max / mean requests per replica (the replicas' own count), mean over runs.
    pub request_imbalance: f64,
    /// Prompt-token share per replica, each run's shares (e.g. `25/75 %`).
    pub shares: Vec<String>,
    /// Request share per replica, each run's shares.
    pub request_shares: Vec<String>,
}

fn summarize(candidates: &[Candidate], runs: &[Vec<Row>]) -> Vec<Summarized> {
    candidates
        .iter()
        .map(|(label, _)| {
            let rows: Vec<&Row> = runs
                .iter()
                .flatten()
                .filter(|r| r.router == *label)
                .collect();
            let ok: Vec<&EngineMeasured> = rows
                .iter()
                .filter_map(|r| match &r.outcome {
                    Outcome::Ok(m) => Some(m.as_ref()),
                    _ => None,
                })
                .collect();
            let note = rows.iter().find_map(|r| match &r.outcome {
                Outcome::Skipped { reason } => Some(format!("skipped: {reason}")),
                Outcome::Failed { error } => Some(format!(
                    "FAILED: {}",
                    error.lines().next().unwrap_or_default()
                )),
                Outcome::Ok(_) => None,
            });
            let mean = |f: &dyn Fn(&EngineMeasured) -> f64| {
                ok.iter().map(|m| f(m)).sum::<f64>() / ok.len().max(1) as f64
            };
            let hits = ok.iter().map(|m| m.replicas.hit_ratio);
            Summarized {
                router: label.clone(),
                runs: ok.len(),
                note: if ok.is_empty() { note } else { None },
                hit_ratio: mean(&|m| m.replicas.hit_ratio),
                hit_ratio_min: hits.clone().fold(f64::INFINITY, f64::min).min(1.0),
                hit_ratio_max: hits.fold(0.0, f64::max),
                ttft_p50_ms: mean(&|m| m.client.ttft_ms.p50),
                ttft_p99_ms: mean(&|m| m.client.ttft_ms.p99),
                ttft_mean_ms: mean(&|m| m.client.ttft_ms.mean),
                errors: ok.iter().map(|m| m.client.errors).sum(),
                request_imbalance: mean(&|m| m.replicas.request_imbalance),
                shares: ok.iter().map(|m| m.replicas.shares()).collect(),
                request_shares: ok.iter().map(|m| m.replicas.request_shares()).collect(),
            }
        })
        .collect()
}

const SUMMARY_HEADERS: [&str; 9] = [
    "router",
    "runs",
    "hit ratio (replicas), mean",
    "min–max",
    "TTFT p50 ms",
    "TTFT p99 ms",
    "TTFT mean ms",
    "max/mean requests",
    "errors",
];

/// Per router over the runs, as an aligned text table or as a Markdown table.
pub fn summary_table(rows: &[Summarized], markdown: bool) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| match &r.note {
            Some(note) => vec![r.router.clone(), note.clone()],
            None => vec![
                r.router.clone(),
                r.runs.to_string(),
                pct(r.hit_ratio),
                format!("{}–{}", pct(r.hit_ratio_min), pct(r.hit_ratio_max)),
                format!("{:.0}", r.ttft_p50_ms),
                format!("{:.0}", r.ttft_p99_ms),
                format!("{:.0}", r.ttft_mean_ms),
                format!("{:.2}", r.request_imbalance),
                r.errors.to_string(),
            ],
        })
        .collect();
    render(&SUMMARY_HEADERS, &cells, markdown)
}

/// `cargo xtask bench routing --engine llama-cpp`: every kvroute policy this build accepts and
/// SGLang's router (where installed), each on a fresh fleet of real replicas.
pub fn bench(o: &EngineOpts, b: &BenchOpts) -> anyhow::Result<()> {
    let started = Instant::now();
    let s = prepare(o, b.no_build)?;
    let comparison = compare(&s, &b.routers, o.llama_runs)?;
    let report = BenchReport {
        generated: crate::report::generated(),
        git: crate::report::git_commit(),
        machine: format!(
            "{} cores",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        ),
        command: std::iter::once("cargo xtask".to_owned())
            .chain(std::env::args().skip(1))
            .collect::<Vec<_>>()
            .join(" "),
        comparison,
    };
    let out_dir = fleet::bench_dir();
    std::fs::create_dir_all(&out_dir)?;
    let md = markdown(&report);
    let md_path = out_dir.join("routing-llama-cpp.md");
    let json_path = out_dir.join("routing-llama-cpp.json");
    crate::report::save(&md_path, &md)?;
    let json = serde_json::to_string_pretty(&report)?;
    std::fs::write(&json_path, &json)?;
    if b.json {
        println!("{json}");
    } else {
        println!("\n{}", summary_table(&report.comparison.summary, false));
    }
    eprintln!(
        "wrote {} and {} ({:.0} s in all)",
        md_path.display(),
        json_path.display(),
        started.elapsed().as_secs_f64()
    );
    if b.publish {
        crate::report::publish(&[(&md_path, "routing-llama-cpp.md")])?;
    }
    report.comparison.ensure_no_failures()
}

/// Every router `r` asks for, each on fresh fleets of the real replicas `s` describes, `runs`
/// times in rotated order; a router that cannot run is a skipped row, one that fails a failed
/// row (see [`Comparison::ensure_no_failures`]).
pub fn compare(s: &Setup, r: &Routers, runs: usize) -> anyhow::Result<Comparison> {
    anyhow::ensure!(runs >= 1, "--llama-runs must be at least 1");
    eprintln!("\n== llama-cpp: {}", s.headline);
    let supported = s.bins.kvroute_policies(&fleet::KNOWN_POLICIES)?;
    let mut candidates = Vec::new();
    for p in r.policies.iter().filter(|p| !p.is_empty()) {
        let (label, spec) = kvroute_row(p, r.kvroute_workers);
        let spec = spec.and_then(|spec| {
            if supported.iter().any(|s| s == p) {
                Ok(spec)
            } else {
                Err(anyhow::anyhow!(
                    "this kvroute build does not accept --policy {p} (it accepts: {})",
                    supported.join(", ")
                ))
            }
        });
        candidates.push((label, spec));
    }
    let once = |_: &str| std::iter::once(1);
    let (smg, smg_version) = peers::rows(Gateway::Smg, r.smg_policies, None, once);
    let (sglang, sglang_router) =
        peers::rows(Gateway::SglangRouter, r.sglang_policies, r.python, once);
    candidates.extend(smg.into_iter().chain(sglang).map(|(_, c)| c));
    let mut all = Vec::new();
    for run in 0..runs {
        let mut order: Vec<&Candidate> = candidates.iter().collect();
        let n = order.len().max(1);
        order.rotate_left(run % n);
        if runs > 1 {
            eprintln!("-- run {} of {runs}", run + 1);
        }
        let mut rows = run_rows(s, order, &format!("routing-llama-{run}"));
        // Each run's rows in the candidates' order, whatever order they ran in.
        rows.sort_by_key(|r| candidates.iter().position(|(l, _)| *l == r.router));
        all.push(rows);
    }
    Ok(Comparison {
        llama_cpp: crate::llama::VERSION,
        smg: smg_version,
        sglang_router,
        workload: s.headline.clone(),
        ideal_hit_ratio: s.ideal_hit_ratio,
        replicas: s.spec.clone(),
        summary: summarize(&candidates, &all),
        runs: all,
    })
}

impl Comparison {
    /// Fails naming the routers whose rows failed, in any run.
    pub fn ensure_no_failures(&self) -> anyhow::Result<()> {
        for rows in &self.runs {
            ensure_no_failures(rows)?;
        }
        Ok(())
    }

    /// The summary and every run's rows as Markdown, under headings of `level`.
    pub fn markdown_tables(&self, level: &str) -> String {
        let mut o = String::new();
        if self.runs.len() > 1 {
            let _ = writeln!(
                o,
                "Over {} runs, the order of the routers rotated each run (figures are means of \
                 the runs' figures):\n",
                self.runs.len()
            );
        }
        o.push_str(&summary_table(&self.summary, true));
        for (i, rows) in self.runs.iter().enumerate() {
            let _ = writeln!(o, "\n{level} Run {}\n", i + 1);
            o.push_str(&table(rows, true));
        }
        o
    }
}

fn pct(x: f64) -> String {
    format!("{:.1} %", x * 100.0)
}

const HEADERS: [&str; 11] = [
    "router",
    "hit ratio (replicas)",
    "cached / prompt tokens",
    "TTFT p50 ms",
    "TTFT p99 ms",
    "TTFT mean ms",
    "e2e p99 ms",
    "errors",
    "prompt-token share",
    "request share",
    "max/mean requests",
];

fn cells(r: &Row) -> Vec<String> {
    match &r.outcome {
        Outcome::Ok(m) => vec![
            r.router.clone(),
            pct(m.replicas.hit_ratio),
            format!(
                "{} / {}",
                m.replicas.cached_tokens, m.replicas.prompt_tokens
            ),
            format!("{:.0}", m.client.ttft_ms.p50),
            format!("{:.0}", m.client.ttft_ms.p99),
            format!("{:.0}", m.client.ttft_ms.mean),
            format!("{:.0}", m.client.e2e_ms.p99),
            m.client.errors.to_string(),
            m.replicas.shares(),
            m.replicas.request_shares(),
            format!("{:.2}", m.replicas.request_imbalance),
        ],
        Outcome::Skipped { reason } => vec![r.router.clone(), format!("skipped: {reason}")],
        Outcome::Failed { error } => {
            let first = error.lines().next().unwrap_or_default();
            vec![r.router.clone(), format!("FAILED: {first}")]
        }
    }
}

/// The rows as an aligned text table, or as a Markdown table.
fn table(rows: &[Row], markdown: bool) -> String {
    let cells: Vec<Vec<String>> = rows.iter().map(cells).collect();
    render(&HEADERS, &cells, markdown)
}

/// `cells` under `headers`; a row shorter than the headers (a skip, a failure) is printed as
/// it is.
fn render(headers: &[&str], cells: &[Vec<String>], markdown: bool) -> String {
    let mut o = String::new();
    if markdown {
        return crate::report::markdown_table(headers, cells);
    }
    let mut width: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in cells.iter().filter(|r| r.len() == headers.len()) {
        for (i, c) in row.iter().enumerate() {
            width[i] = width[i].max(c.chars().count());
        }
    }
    width[0] = width[0].max(
        cells
            .iter()
            .map(|r| r[0].chars().count())
            .max()
            .unwrap_or(0),
    );
    let headers: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&headers[..]).chain(cells.iter().map(Vec::as_slice)) {
        let mut s = String::from(" ");
        for (i, c) in row.iter().enumerate() {
            if i == 0 {
                let _ = write!(s, " {c:<w$}", w = width[0]);
            } else if row.len() == headers.len() {
                let _ = write!(s, "  {c:>w$}", w = width[i]);
            } else {
                let _ = write!(s, "  {c}");
            }
        }
        let _ = writeln!(o, "{}", s.trim_end());
    }
    o
}

/// What every figure of a [`Comparison`] is, in one paragraph.
pub const METHOD: &str = "Every row starts fresh replicas (cold caches) and replays the same \
     conversations as streaming `/v1/chat/completions` with `stream_options.include_usage`. The \
     hit ratio and the prompt-token share are the replicas' own counters \
     (`llamacpp:prompt_tokens_cached_total` over all prompt tokens); the requests per replica are \
     the tasks each replica's own log shows it launched, whatever the router; TTFT and e2e are \
     the client's wall-clock ms.";

fn markdown(r: &BenchReport) -> String {
    let c = &r.comparison;
    let mut o = String::new();
    let _ = writeln!(o, "# Routing quality on real llama.cpp replicas\n");
    let _ = writeln!(
        o,
        "Generated by `{}` on {} ({}, commit {}). {}. {METHOD} One infinite cache would hit {} \
         of the prompt bytes.\n",
        r.command,
        r.generated,
        r.machine,
        r.git,
        c.workload,
        pct(c.ideal_hit_ratio)
    );
    o.push_str(&c.markdown_tables("###"));
    o
}

/// The demo's report: one column per policy.
fn side_by_side(headline: &str, ideal: f64, rows: &[Row]) -> String {
    const COL: usize = 16;
    let mut o = String::new();
    let _ = writeln!(o, "kvroute demo on real llama.cpp replicas: {headline}\n");
    let _ = write!(o, "  {:<28}", "policy");
    for r in rows {
        let name = r.router.strip_prefix("kvroute ").unwrap_or(&r.router);
        let _ = write!(o, "{name:>COL$}");
    }
    o.push('\n');
    let mut line = |name: &str, f: &dyn Fn(&EngineMeasured) -> String, note: &str| {
        let _ = write!(o, "  {name:<28}");
        for r in rows {
            let cell = match &r.outcome {
                Outcome::Ok(m) => f(m),
                Outcome::Skipped { .. } => "skipped".into(),
                Outcome::Failed { .. } => "FAILED".into(),
            };
            let _ = write!(o, "{cell:>COL$}");
        }
        let _ = writeln!(o, "  {note}");
    };
    line(
        "hit ratio (replicas' count)",
        &|m| pct(m.replicas.hit_ratio),
        &format!(
            "(cached / prompt tokens as llama-server counts them; one infinite cache: {} of the bytes)",
            pct(ideal)
        ),
    );
    line(
        "cached prompt tokens",
        &|m| m.replicas.cached_tokens.to_string(),
        "",
    );
    line(
        "hit ratio (client's usage)",
        &|m| pct(m.client.hit_ratio),
        "(usage.prompt_tokens_details.cached_tokens in the streams)",
    );
    line(
        "TTFT p50 ms",
        &|m| format!("{:.0}", m.client.ttft_ms.p50),
        "(wall clock)",
    );
    line(
        "TTFT p99 ms",
        &|m| format!("{:.0}", m.client.ttft_ms.p99),
        "",
    );
    line(
        "TTFT mean ms",
        &|m| format!("{:.0}", m.client.ttft_ms.mean),
        "",
    );
    line("e2e p99 ms", &|m| format!("{:.0}", m.client.e2e_ms.p99), "");
    line("errors", &|m| m.client.errors.to_string(), "");
    line("prompt-token share r0/r1/...", &|m| m.replicas.shares(), "");
    o.lines().map(str::trim_end).collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::llama::EngineCounts;
    use kvroute_load::Summary;

    fn row(router: &str, hit: f64, p99: f64) -> Row {
        let mut client = Summary::default();
        client.ttft_ms.p99 = p99;
        Row {
            router: router.into(),
            outcome: Outcome::Ok(Box::new(EngineMeasured {
                client,
                replicas: EngineCounts {
                    hit_ratio: hit,
                    prompt_tokens: 1000,
                    cached_tokens: (hit * 1000.0) as u64,
                    ..Default::default()
                },
            })),
        }
    }

    /// One column per policy, the replicas' count first, a skipped router named as such.
    #[test]
    fn demo_report_sets_policies_side_by_side() {
        let rows = [
            row("kvroute round-robin", 0.41, 900.0),
            row("kvroute kv-aware", 0.72, 300.0),
            Row {
                router: "sglang-router cache_aware".into(),
                outcome: Outcome::Skipped {
                    reason: "not installed".into(),
                },
            },
        ];
        let out = side_by_side("h", 0.8, &rows);
        let line = |name: &str| {
            out.lines()
                .find(|l| l.trim_start().starts_with(name))
                .unwrap_or_else(|| panic!("no {name} row in\n{out}"))
                .to_owned()
        };
        let header = line("policy");
        assert!(
            header.contains("round-robin") && header.contains("kv-aware"),
            "{header}"
        );
        let hit = line("hit ratio (replicas' count)");
        assert!(hit.contains("41.0 %") && hit.contains("72.0 %"), "{hit}");
        assert!(
            hit.contains("skipped") && hit.contains("80.0 % of the bytes"),
            "{hit}"
        );
        let p99 = line("TTFT p99 ms");
        assert!(p99.contains("900") && p99.contains("300"), "{p99}");
        assert!(line("cached prompt tokens").contains("720"), "{out}");
    }

    #[test]
    fn summary_is_the_mean_over_runs() {
        let candidates = vec![
            kvroute_row("kv-aware", 1),
            (
                "sglang-router cache_aware".to_owned(),
                Err(anyhow::anyhow!("not installed")),
            ),
        ];
        let skipped = || Row {
            router: "sglang-router cache_aware".into(),
            outcome: Outcome::Skipped {
                reason: "not installed".into(),
            },
        };
        let runs = vec![
            vec![row("kvroute kv-aware", 0.5, 100.0), skipped()],
            vec![row("kvroute kv-aware", 0.7, 300.0), skipped()],
        ];
        let s = summarize(&candidates, &runs);
        assert_eq!(s[0].runs, 2);
        assert!((s[0].hit_ratio - 0.6).abs() < 1e-9, "{}", s[0].hit_ratio);
        assert_eq!((s[0].hit_ratio_min, s[0].hit_ratio_max), (0.5, 0.7));
        assert_eq!(s[0].ttft_p99_ms, 200.0);
        assert_eq!(s[1].runs, 0);
        assert_eq!(s[1].note.as_deref(), Some("skipped: not installed"));
        let text = summary_table(&s, false);
        assert!(
            text.contains("60.0 %") && text.contains("50.0 %–70.0 %"),
            "{text}"
        );
    }

    #[test]
    fn markdown_table_has_a_cell_per_header() {
        let md = table(&[row("kvroute kv-aware", 0.5, 10.0)], true);
        let lines: Vec<&str> = md.lines().collect();
        assert_eq!(lines.len(), 3, "{md}");
        for l in &lines {
            assert_eq!(l.matches('|').count(), HEADERS.len() + 1, "{l}");
        }
        assert!(lines[2].contains("500 / 1000"), "{md}");
    }
}
