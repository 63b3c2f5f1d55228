//! `cargo xtask bench routing --matrix`: the robustness matrix. Routing defaults are judged
//! on all of it, never on one cell: a setting that wins on the trace it was tuned on and
//! loses on a fleet of mixed GPUs or on skewed tenants is not kept.
//!
//! Each cell is a workload on a fleet: simulated replicas, or real llama.cpp ones
//! (`llama_cell.rs`). kvroute's kv-aware policy runs beside SGLang's current gateway (smg's
//! cache_aware, the stronger peer) and its older router on the same fleet and the same requests
//! in the same run, and the summary reports kvroute against smg as ratios, which hold on a
//! noisy machine where absolute milliseconds do not.

use std::fmt::Write as _;

use super::llama_cell::LlamaCell;
use super::{Opts, Outcome, WorkloadArg, WorkloadResult};
use crate::fleet::measure::Measured;

/// One cell: a name, what it stands for, and what it runs on.
pub struct Cell {
    pub name: &'static str,
    pub what: &'static str,
    pub fleet: CellFleet,
}

/// What a cell's replicas are.
pub enum CellFleet {
    /// `kvroute-sim` replicas, the command line's options changed by the function.
    Simulated(fn(&mut Opts)),
    /// Real llama.cpp replicas, with the `--llama-*` workload and fleet.
    LlamaCpp,
}

/// A fleet of mixed GPU generations: the fastest replica prefills 4x the slowest.
const MIXED_SPEEDS: [f64; 4] = [2.0, 1.0, 1.0, 0.5];

fn trace(o: &mut Opts) {
    o.workload = WorkloadArg::Trace;
}

/// Long shared system prompts, and between them as many short prompts that share nothing.
fn short_and_long(o: &mut Opts) {
    o.workload = WorkloadArg::Synthetic;
    o.groups = 12;
    o.users = 16;
    o.turns = 2;
    o.system_bytes = 32 * 1024;
    o.unshared_fraction = 0.5;
    o.unshared_bytes = 1024;
    o.rate = 10.0;
}

/// Multi-turn conversations of tenants whose sizes fall as 1/rank: the largest tenant has
/// many times the smallest one's users.
fn skewed_tenants(o: &mut Opts) {
    o.workload = WorkloadArg::Synthetic;
    o.groups = 24;
    o.users = 16;
    o.turns = 4;
    o.system_bytes = 16 * 1024;
    o.tenant_skew = 1.0;
    o.rate = 20.0;
}

pub const CELLS: &[Cell] = &[
    Cell {
        name: "trace",
        what: "the shared trace, 4 alike replicas",
        fleet: CellFleet::Simulated(trace),
    },
    Cell {
        name: "trace-slow",
        what: "the shared trace on a fleet prefilling 4x slower, arriving 4x slower",
        fleet: CellFleet::Simulated(|o| {
            trace(o);
            o.prefill_tps /= 4.0;
            o.speed /= 4.0;
        }),
    },
    Cell {
        name: "trace-mixed-gpus",
        what: "the shared trace on replicas whose prefill speeds differ by 4x",
        fleet: CellFleet::Simulated(|o| {
            trace(o);
            o.prefill_speeds = MIXED_SPEEDS.to_vec();
        }),
    },
    Cell {
        name: "short-long",
        what: "half one-off short prompts between long shared ones, 4 replicas",
        fleet: CellFleet::Simulated(short_and_long),
    },
    Cell {
        name: "short-long-2",
        what: "half one-off short prompts between long shared ones, 2 replicas",
        fleet: CellFleet::Simulated(|o| {
            short_and_long(o);
            o.replicas = 2;
            o.rate /= 2.0;
        }),
    },
    Cell {
        name: "tenants",
        what: "skewed tenants' conversations, 4 replicas, with two router instances too",
        fleet: CellFleet::Simulated(|o| {
            skewed_tenants(o);
            o.instances = vec![2];
        }),
    },
    Cell {
        name: "tenants-8-mixed",
        what: "skewed tenants' conversations, 8 replicas of mixed speeds",
        fleet: CellFleet::Simulated(|o| {
            skewed_tenants(o);
            o.replicas = 8;
            o.rate *= 2.0;
            o.prefill_speeds = MIXED_SPEEDS.to_vec();
        }),
    },
    Cell {
        name: "llama-cpp",
        what: "chat conversations on real llama.cpp replicas",
        fleet: CellFleet::LlamaCpp,
    },
];

/// Every cell's options: the command line's (its fleet scale, its peers' policies,
/// `--offline`, `--no-build`, …) with the cell's workload and fleet, and kvroute's kv-aware
/// policy alone. `--matrix-cells` picks some by name.
pub fn cells(base: &Opts) -> Vec<(&'static Cell, Opts)> {
    CELLS
        .iter()
        .filter(|c| base.matrix_cells.is_empty() || base.matrix_cells.iter().any(|n| n == c.name))
        .map(|c| {
            let mut o = base.clone();
            o.policies = vec!["kv-aware".to_owned()];
            o.instances = vec![1];
            if let CellFleet::Simulated(apply) = c.fleet {
                apply(&mut o);
            }
            (c, o)
        })
        .collect()
}

/// The names `--matrix-cells` asks for that are no cell's.
pub fn unknown_cells(base: &Opts) -> Vec<&str> {
    base.matrix_cells
        .iter()
        .map(String::as_str)
        .filter(|n| !CELLS.iter().any(|c| c.name == *n))
        .collect()
}

/// The acceptance bounds, against smg's cache_aware in the same cell.
pub const MAX_HIT_DEFICIT: f64 = 0.005;
pub const MAX_P99_RATIO: f64 = 0.8;
pub const MAX_IMBALANCE: f64 = 1.3;
pub const MIN_INSTANCE_RATIO: f64 = 0.97;

pub const KVROUTE: &str = "kvroute kv-aware";
pub const SMG: &str = "smg cache_aware";

/// What a verdict reads of one router's run in one cell, whichever fleet it ran on.
#[derive(Clone, Copy, Debug, Default)]
pub struct Figures {
    pub hit_ratio: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    /// max / mean requests per replica, as the replicas counted them.
    pub imbalance: f64,
    pub errors: u64,
}

impl From<&Measured> for Figures {
    fn from(m: &Measured) -> Figures {
        Figures {
            hit_ratio: m.fleet.hit_ratio,
            ttft_p50_ms: m.client.ttft_ms.p50,
            ttft_p99_ms: m.client.ttft_ms.p99,
            imbalance: m.fleet.imbalance,
            errors: m.client.errors,
        }
    }
}

/// One cell as its verdict sees it.
pub struct CellFigures {
    pub cell: String,
    pub kvroute: Figures,
    pub smg: Figures,
    /// kvroute's hit ratio as two instances, where the cell ran two.
    pub kvroute_x2_hit: Option<f64>,
    /// The TTFT p99 no router can beat (ms), where the fleet has a model to compute it from.
    pub floor_p99_ms: Option<f64>,
}

fn measured<'a>(w: &'a WorkloadResult, router: &str) -> Option<&'a Measured> {
    w.rows.iter().find_map(|r| match &r.outcome {
        Outcome::Ok(m) if r.router == router => Some(&**m),
        _ => None,
    })
}

impl CellFigures {
    /// A simulated cell's figures; `None` unless both kvroute and smg produced some.
    fn simulated(w: &WorkloadResult) -> Option<CellFigures> {
        Some(CellFigures {
            cell: w.name.clone(),
            kvroute: measured(w, KVROUTE)?.into(),
            smg: measured(w, SMG)?.into(),
            kvroute_x2_hit: measured(w, &format!("{KVROUTE} x2")).map(|m| m.fleet.hit_ratio),
            floor_p99_ms: Some(w.ttft_floor_ms.1),
        })
    }
}

/// One cell's verdict: kvroute against smg.
pub struct Verdict {
    pub cell: String,
    pub hit: (f64, f64),
    pub p50_ratio: f64,
    pub p99_ratio: f64,
    /// TTFT p99 of kvroute and smg, and the floor no router can beat (ms) where known.
    pub p99_ms: (f64, f64, Option<f64>),
    pub imbalance: (f64, f64),
    pub errors: u64,
    /// Two instances' hit ratio over one's, where the cell ran two.
    pub instance_ratio: Option<f64>,
    pub failed: Vec<&'static str>,
}

/// kvroute against smg in one cell, against the acceptance bounds.
pub fn verdict(c: &CellFigures) -> Verdict {
    let (k, s) = (&c.kvroute, &c.smg);
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::INFINITY };
    let instance_ratio = c.kvroute_x2_hit.map(|h2| ratio(h2, k.hit_ratio));
    let mut v = Verdict {
        cell: c.cell.clone(),
        hit: (k.hit_ratio, s.hit_ratio),
        p50_ratio: ratio(k.ttft_p50_ms, s.ttft_p50_ms),
        p99_ratio: ratio(k.ttft_p99_ms, s.ttft_p99_ms),
        p99_ms: (k.ttft_p99_ms, s.ttft_p99_ms, c.floor_p99_ms),
        imbalance: (k.imbalance, s.imbalance),
        errors: k.errors,
        instance_ratio,
        failed: Vec::new(),
    };
    if v.hit.0 < v.hit.1 - MAX_HIT_DEFICIT {
        v.failed.push("hit ratio");
    }
    if v.p99_ratio > MAX_P99_RATIO {
        v.failed.push("TTFT p99");
    }
    if v.imbalance.0 > MAX_IMBALANCE {
        v.failed.push("max/mean");
    }
    if v.errors > 0 {
        v.failed.push("errors");
    }
    if instance_ratio.is_some_and(|r| r < MIN_INSTANCE_RATIO) {
        v.failed.push("two instances");
    }
    v
}

/// The simulated cells' verdicts; a cell where kvroute or smg has no figures (skipped,
/// failed) has none rather than a made-up one.
pub fn verdicts(workloads: &[WorkloadResult]) -> Vec<Verdict> {
    workloads
        .iter()
        .filter_map(CellFigures::simulated)
        .map(|c| verdict(&c))
        .collect()
}

/// One line of the summary: a verdict, or what a cell that has none says instead.
enum Line {
    Judged(Verdict),
    Unjudged { cell: String, why: String },
}

/// The matrix as a markdown table, kvroute against smg in each cell, with the acceptance
/// verdict; the llama.cpp cell, when it was asked for, is a line either way (a verdict, or
/// why it has none). `None` when there is nothing to show.
pub fn summary(workloads: &[WorkloadResult], llama: Option<&LlamaCell>) -> Option<String> {
    let mut lines: Vec<Line> = verdicts(workloads).into_iter().map(Line::Judged).collect();
    if let Some(l) = llama {
        lines.push(match l.figures() {
            Ok(c) => Line::Judged(verdict(&c)),
            Err(why) => Line::Unjudged {
                cell: l.name.clone(),
                why: why.to_string(),
            },
        });
    }
    if lines.is_empty() {
        return None;
    }
    let v: Vec<&Verdict> = lines
        .iter()
        .filter_map(|l| match l {
            Line::Judged(v) => Some(v),
            Line::Unjudged { .. } => None,
        })
        .collect();
    let mut o = String::new();
    let _ = writeln!(
        o,
        "kvroute kv-aware against smg cache_aware, same fleet, same requests, same run. Bounds: \
         hit ratio at least smg's - {:.1} point, TTFT p99 at most {MAX_P99_RATIO}x smg's, \
         max/mean requests at most {MAX_IMBALANCE}, no errors, two instances keep \
         {MIN_INSTANCE_RATIO}x one's hit ratio.\n",
        MAX_HIT_DEFICIT * 100.0
    );
    let _ = writeln!(
        o,
        "| cell | hit kvroute / smg | TTFT p50 ratio | TTFT p99 ratio | TTFT p99 ms kvroute / \
         smg / floor | max/mean kvroute / smg | errors | x2 / x1 hit | within bounds |"
    );
    let _ = writeln!(
        o,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    );
    for line in &lines {
        let c = match line {
            Line::Judged(c) => c,
            Line::Unjudged { cell, why } => {
                // One cell of text in a table row: its first line, no column separators.
                let why = why.lines().next().unwrap_or_default().replace('|', "/");
                let mut cells = vec![cell.clone(), why];
                cells.resize(9, String::new());
                let _ = writeln!(o, "{}", crate::report::table_row(&cells));
                continue;
            }
        };
        let _ = writeln!(
            o,
            "| {} | {:.1} / {:.1} % | {:.2}x | {:.2}x | {:.0} / {:.0} / {} | {:.2} / {:.2} | {} | \
             {} | {} |",
            c.cell,
            c.hit.0 * 100.0,
            c.hit.1 * 100.0,
            c.p50_ratio,
            c.p99_ratio,
            c.p99_ms.0,
            c.p99_ms.1,
            c.p99_ms
                .2
                .map_or_else(|| "-".to_owned(), |f| format!("{f:.0}")),
            c.imbalance.0,
            c.imbalance.1,
            c.errors,
            c.instance_ratio
                .map_or_else(|| "-".to_owned(), |r| format!("{r:.3}")),
            if c.failed.is_empty() {
                "yes".to_owned()
            } else {
                format!("no: {}", c.failed.join(", "))
            }
        );
    }
    let n = v.len() as f64;
    let (k, s) = v
        .iter()
        .fold((0.0, 0.0), |(k, s), c| (k + c.hit.0, s + c.hit.1));
    o.push('\n');
    if !v.is_empty() {
        let _ = write!(
            o,
            "Mean hit ratio over the cells: kvroute {:.1} %, smg {:.1} %; ",
            k / n * 100.0,
            s / n * 100.0,
        );
    }
    let _ = write!(
        o,
        "{} of {} cells within bounds",
        v.iter().filter(|c| c.failed.is_empty()).count(),
        v.len()
    );
    if lines.len() > v.len() {
        let _ = write!(o, ", {} without a verdict", lines.len() - v.len());
    }
    let _ = writeln!(
        o,
        ". The floor is the TTFT p99 of one infinite cache with no queueing (simulated fleets \
         only): where {MAX_P99_RATIO}x smg's p99 is below it, no router meets that bound. On \
         real llama.cpp replicas, max/mean counts the requests each replica's log shows it \
         served."
    );
    Some(o)
}

#[cfg(test)]
mod tests {
    use super::super::llama_cell::{self, LlamaCell};
    use super::super::{Row, WorkloadResult};
    use super::*;
    use crate::fleet::llama::LlamaSpec;
    use crate::fleet::measure::FleetCounts;
    use crate::fleet::SimSpec;
    use crate::llama_routing::{Comparison, Summarized};
    use kvroute_load::Summary;

    fn row(router: &str, hit: f64, p50: f64, p99: f64, imbalance: f64, errors: u64) -> Row {
        let mut client = Summary::default();
        client.ttft_ms.p50 = p50;
        client.ttft_ms.p99 = p99;
        client.errors = errors;
        Row {
            router: router.into(),
            outcome: Outcome::Ok(Box::new(Measured {
                client,
                fleet: FleetCounts {
                    hit_ratio: hit,
                    per_replica: Default::default(),
                    imbalance,
                    evictions: 0,
                },
            })),
        }
    }

    fn cell(name: &str, rows: Vec<Row>) -> WorkloadResult {
        WorkloadResult {
            name: name.into(),
            description: String::new(),
            requests: 1,
            target_rps: 1.0,
            ideal_hit_ratio: 1.0,
            lru_hit_ratio: 1.0,
            ttft_floor_ms: (1.0, 40.0),
            working_set_blocks: 1,
            sim: SimSpec {
                replicas: 4,
                kv_blocks: 1,
                block_tokens: 16,
                time_scale: 0.1,
                prefill_tps: 8000.0,
                prefill_overhead_ms: 10.0,
                decode_tps: 50.0,
                max_seqs: 1,
                prefill_speeds: Vec::new(),
            },
            rows,
        }
    }

    #[test]
    fn each_bound_is_checked_against_smg_in_the_same_cell() {
        let cells = vec![
            // Within every bound: a hit ratio 0.4 point under smg's is allowed.
            cell(
                "good",
                vec![
                    row(KVROUTE, 0.496, 5.0, 70.0, 1.2, 0),
                    row(SMG, 0.5, 10.0, 100.0, 1.5, 0),
                ],
            ),
            cell(
                "bad",
                vec![
                    row(KVROUTE, 0.49, 5.0, 81.0, 1.31, 1),
                    row(SMG, 0.5, 10.0, 100.0, 1.1, 0),
                    row(&format!("{KVROUTE} x2"), 0.47, 5.0, 81.0, 1.0, 0),
                ],
            ),
            // No smg row (skipped or failed): no verdict rather than a made-up one.
            cell("no-peer", vec![row(KVROUTE, 0.5, 1.0, 1.0, 1.0, 0)]),
        ];
        let v = verdicts(&cells);
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].cell, "good");
        assert!(v[0].failed.is_empty(), "{:?}", v[0].failed);
        assert!((v[0].p99_ratio - 0.7).abs() < 1e-9);
        assert_eq!(
            v[1].failed,
            [
                "hit ratio",
                "TTFT p99",
                "max/mean",
                "errors",
                "two instances"
            ]
        );
        let ratio = v[1].instance_ratio.unwrap();
        assert!((ratio - 0.47 / 0.49).abs() < 1e-9);
        let md = summary(&cells, None).unwrap();
        assert!(
            md.contains("| good | 49.6 / 50.0 % | 0.50x | 0.70x | 70 / 100 / 40 |"),
            "{md}"
        );
        assert!(md.contains("no: hit ratio, TTFT p99, max/mean, errors, two instances"));
        assert!(md.contains("1 of 2 cells within bounds"));
        assert!(summary(&cells[2..], None).is_none());
    }

    #[test]
    fn cells_take_the_command_line_and_set_their_own_fleet() {
        use clap::{Args as _, FromArgMatches as _};
        let cmd = super::super::Args::augment_args(clap::Command::new("routing"));
        let m = cmd.get_matches_from(["routing", "--time-scale", "0.2", "--smg-policies", "x"]);
        let mut base = *super::super::Args::from_arg_matches(&m).unwrap().opts;
        base.matrix_cells = vec!["trace-slow".into(), "tenants".into()];
        let c = cells(&base);
        let names: Vec<&str> = c.iter().map(|(c, _)| c.name).collect();
        assert_eq!(names, ["trace-slow", "tenants"]);
        let (slow, tenants) = (&c[0].1, &c[1].1);
        assert_eq!(slow.prefill_tps, base.prefill_tps / 4.0);
        assert_eq!(slow.time_scale, 0.2);
        assert_eq!(slow.smg_policies, ["x"]);
        assert_eq!(slow.policies, ["kv-aware"]);
        assert_eq!(slow.instances, [1]);
        assert_eq!(tenants.instances, [2]);
        assert!(tenants.tenant_skew > 0.0);
        assert!(CELLS.iter().any(|c| c.name == "tenants-8-mixed"));
    }

    /// One router's line of the llama bench's summary, as `llama_routing::summarize` makes it.
    fn llama_router(router: &str, hit: f64, p50: f64, p99: f64, imbalance: f64) -> Summarized {
        Summarized {
            router: router.into(),
            runs: 1,
            note: None,
            hit_ratio: hit,
            hit_ratio_min: hit,
            hit_ratio_max: hit,
            ttft_p50_ms: p50,
            ttft_p99_ms: p99,
            ttft_mean_ms: p50,
            errors: 0,
            request_imbalance: imbalance,
            shares: vec!["50/50 %".into()],
            request_shares: vec!["50/50 %".into()],
        }
    }

    fn llama_ran(summary: Vec<Summarized>) -> LlamaCell {
        LlamaCell {
            name: "llama-cpp".into(),
            description: "chat conversations on real llama.cpp replicas".into(),
            outcome: llama_cell::Outcome::Ran(Box::new(Comparison {
                llama_cpp: crate::llama::VERSION,
                smg: Some("1.13.0".into()),
                sglang_router: None,
                workload: "36 chat requests".into(),
                ideal_hit_ratio: 0.8,
                replicas: LlamaSpec {
                    replicas: 2,
                    ctx: 16384,
                    slots: 4,
                },
                summary,
                runs: Vec::new(),
            })),
        }
    }

    #[test]
    fn the_llama_cell_is_picked_by_name_and_keeps_the_engine_options() {
        use clap::{Args as _, FromArgMatches as _};
        let cmd = super::super::Args::augment_args(clap::Command::new("routing"));
        let m = cmd.get_matches_from([
            "routing",
            "--matrix",
            "--matrix-cells",
            "llama-cpp,trace",
            "--llama-replicas",
            "3",
            "--sglang-policies",
            "",
        ]);
        let base = *super::super::Args::from_arg_matches(&m).unwrap().opts;
        let c = cells(&base);
        // In the matrix's order, whatever the order asked for.
        let names: Vec<&str> = c.iter().map(|(c, _)| c.name).collect();
        assert_eq!(names, ["trace", "llama-cpp"]);
        let (llama, o) = &c[1];
        assert!(matches!(llama.fleet, CellFleet::LlamaCpp));
        assert!(matches!(c[0].0.fleet, CellFleet::Simulated(_)));
        assert_eq!(o.policies, ["kv-aware"]);
        assert_eq!(o.smg_policies, ["cache_aware"]);
        assert_eq!(o.engine.llama_replicas, 3);
        // A real fleet's options are left as the command line gave them.
        assert_eq!(o.workload, base.workload);
        assert!(unknown_cells(&base).is_empty());
        // By default the matrix includes it.
        let mut all = base.clone();
        all.matrix_cells.clear();
        assert_eq!(cells(&all).last().map(|(c, _)| c.name), Some("llama-cpp"));
        all.matrix_cells = vec!["llama".into(), "trace".into()];
        assert_eq!(unknown_cells(&all), ["llama"]);
    }

    #[test]
    fn the_llama_cells_verdict_is_a_row_of_the_summary() {
        let sim = vec![cell(
            "good",
            vec![
                row(KVROUTE, 0.496, 5.0, 70.0, 1.2, 0),
                row(SMG, 0.5, 10.0, 100.0, 1.5, 0),
            ],
        )];
        let within = llama_ran(vec![
            llama_router(KVROUTE, 0.62, 250.0, 700.0, 1.1),
            llama_router(SMG, 0.60, 500.0, 1000.0, 1.5),
        ]);
        let c = within.figures().unwrap();
        assert_eq!(c.floor_p99_ms, None);
        assert_eq!(c.kvroute.imbalance, 1.1);
        let v = verdict(&c);
        assert!(v.failed.is_empty(), "{:?}", v.failed);
        assert!((v.p99_ratio - 0.7).abs() < 1e-9);
        let md = summary(&sim, Some(&within)).unwrap();
        // The simulated cell's row is as it was.
        assert!(
            md.contains("| good | 49.6 / 50.0 % | 0.50x | 0.70x | 70 / 100 / 40 |"),
            "{md}"
        );
        assert!(
            md.contains(
                "| llama-cpp | 62.0 / 60.0 % | 0.50x | 0.70x | 700 / 1000 / - | 1.10 / 1.50 | 0 \
                 | - | yes |"
            ),
            "{md}"
        );
        assert!(md.contains("2 of 2 cells within bounds."), "{md}");
        assert!(md.contains("kvroute 55.8 %, smg 55.0 %"), "{md}");

        // Requests piled on one real replica fail the balance bound like a simulated one.
        let piled = llama_ran(vec![
            llama_router(KVROUTE, 0.62, 250.0, 700.0, 1.8),
            llama_router(SMG, 0.60, 500.0, 1000.0, 1.0),
        ]);
        let md = summary(&[], Some(&piled)).unwrap();
        assert!(
            md.contains("| 1.80 / 1.00 | 0 | - | no: max/mean |"),
            "{md}"
        );
        assert!(md.contains("0 of 1 cells within bounds."), "{md}");
    }

    /// A llama cell that could not run, or ran without smg, is a row that says so: never a
    /// verdict made up from nothing, never left out.
    #[test]
    fn a_llama_cell_without_figures_says_why() {
        let skipped = LlamaCell {
            name: "llama-cpp".into(),
            description: String::new(),
            outcome: llama_cell::Outcome::Skipped {
                reason: "no llama.cpp server: building llama-server needs tools this machine \
                         lacks: cmake | ninja\nsecond line"
                    .into(),
            },
        };
        let md = summary(&[], Some(&skipped)).unwrap();
        let line = md
            .lines()
            .find(|l| l.starts_with("| llama-cpp |"))
            .unwrap_or_else(|| panic!("no llama-cpp row in\n{md}"));
        assert_eq!(
            line,
            "| llama-cpp | skipped: no llama.cpp server: building llama-server needs tools this \
             machine lacks: cmake / ninja |  |  |  |  |  |  |  |"
        );
        assert_eq!(line.matches('|').count(), 10, "{line}");
        assert!(
            md.contains("0 of 0 cells within bounds, 1 without a verdict."),
            "{md}"
        );
        assert!(!md.contains("Mean hit ratio"), "{md}");

        let mut no_smg = llama_router(SMG, 0.0, 0.0, 0.0, 0.0);
        no_smg.runs = 0;
        no_smg.note = Some("skipped: smg is not installed".into());
        let without_smg = llama_ran(vec![llama_router(KVROUTE, 0.6, 1.0, 2.0, 1.0), no_smg]);
        let sim = vec![cell(
            "good",
            vec![
                row(KVROUTE, 0.496, 5.0, 70.0, 1.2, 0),
                row(SMG, 0.5, 10.0, 100.0, 1.5, 0),
            ],
        )];
        let md = summary(&sim, Some(&without_smg)).unwrap();
        assert!(
            md.contains(
                "| llama-cpp | no verdict: smg cache_aware skipped: smg is not installed |"
            ),
            "{md}"
        );
        assert!(
            md.contains("1 of 1 cells within bounds, 1 without a verdict."),
            "{md}"
        );
    }
}
