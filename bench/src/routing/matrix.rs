//! `cargo xtask bench routing --matrix`: the robustness matrix. Routing defaults are judged
//! on all of it, never on one cell: a setting that wins on the trace it was tuned on and
//! loses on a fleet of mixed GPUs or on skewed tenants is not kept.
//!
//! Each cell is a workload on a fleet. kvroute's kv-aware policy runs beside SGLang's current
//! gateway (smg's cache_aware, the stronger peer) and its older router on the same fleet and
//! the same requests in the same run, and the summary reports kvroute against smg as ratios,
//! which hold on a noisy machine where absolute milliseconds do not.

use std::fmt::Write as _;

use super::{Opts, Outcome, WorkloadArg, WorkloadResult};
use crate::fleet::measure::Measured;

/// One cell: a name, what it stands for, and how it changes the command line's options.
pub struct Cell {
    pub name: &'static str,
    pub what: &'static str,
    apply: fn(&mut Opts),
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
        apply: trace,
    },
    Cell {
        name: "trace-slow",
        what: "the shared trace on a fleet prefilling 4x slower, arriving 4x slower",
        apply: |o| {
            trace(o);
            o.prefill_tps /= 4.0;
            o.speed /= 4.0;
        },
    },
    Cell {
        name: "trace-mixed-gpus",
        what: "the shared trace on replicas whose prefill speeds differ by 4x",
        apply: |o| {
            trace(o);
            o.prefill_speeds = MIXED_SPEEDS.to_vec();
        },
    },
    Cell {
        name: "short-long",
        what: "half one-off short prompts between long shared ones, 4 replicas",
        apply: short_and_long,
    },
    Cell {
        name: "short-long-2",
        what: "half one-off short prompts between long shared ones, 2 replicas",
        apply: |o| {
            short_and_long(o);
            o.replicas = 2;
            o.rate /= 2.0;
        },
    },
    Cell {
        name: "tenants",
        what: "skewed tenants' conversations, 4 replicas, with two router instances too",
        apply: |o| {
            skewed_tenants(o);
            o.instances = vec![2];
        },
    },
    Cell {
        name: "tenants-8-mixed",
        what: "skewed tenants' conversations, 8 replicas of mixed speeds",
        apply: |o| {
            skewed_tenants(o);
            o.replicas = 8;
            o.rate *= 2.0;
            o.prefill_speeds = MIXED_SPEEDS.to_vec();
        },
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
            (c.apply)(&mut o);
            (c, o)
        })
        .collect()
}

/// The acceptance bounds, against smg's cache_aware in the same cell.
pub const MAX_HIT_DEFICIT: f64 = 0.005;
pub const MAX_P99_RATIO: f64 = 0.8;
pub const MAX_IMBALANCE: f64 = 1.3;
pub const MIN_INSTANCE_RATIO: f64 = 0.97;

pub const KVROUTE: &str = "kvroute kv-aware";
pub const SMG: &str = "smg cache_aware";

fn measured<'a>(w: &'a WorkloadResult, router: &str) -> Option<&'a Measured> {
    w.rows.iter().find_map(|r| match &r.outcome {
        Outcome::Ok(m) if r.router == router => Some(&**m),
        _ => None,
    })
}

/// One cell's verdict: kvroute against smg.
pub struct Verdict {
    pub cell: String,
    pub hit: (f64, f64),
    pub p50_ratio: f64,
    pub p99_ratio: f64,
    /// TTFT p99 of kvroute and smg, and the floor no router can beat (ms).
    pub p99_ms: (f64, f64, f64),
    pub imbalance: (f64, f64),
    pub errors: u64,
    /// Two instances' hit ratio over one's, where the cell ran two.
    pub instance_ratio: Option<f64>,
    pub failed: Vec<&'static str>,
}

pub fn verdicts(workloads: &[WorkloadResult]) -> Vec<Verdict> {
    workloads
        .iter()
        .filter_map(|w| {
            let (k, s) = (measured(w, KVROUTE)?, measured(w, SMG)?);
            let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::INFINITY };
            let instance_ratio = measured(w, &format!("{KVROUTE} x2"))
                .map(|m2| ratio(m2.fleet.hit_ratio, k.fleet.hit_ratio));
            let mut v = Verdict {
                cell: w.name.clone(),
                hit: (k.fleet.hit_ratio, s.fleet.hit_ratio),
                p50_ratio: ratio(k.client.ttft_ms.p50, s.client.ttft_ms.p50),
                p99_ratio: ratio(k.client.ttft_ms.p99, s.client.ttft_ms.p99),
                p99_ms: (
                    k.client.ttft_ms.p99,
                    s.client.ttft_ms.p99,
                    w.ttft_floor_ms.1,
                ),
                imbalance: (k.fleet.imbalance, s.fleet.imbalance),
                errors: k.client.errors,
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
            Some(v)
        })
        .collect()
}

/// The matrix as a markdown table, kvroute against smg in each cell, with the acceptance
/// verdict; `None` when no cell ran both.
pub fn summary(workloads: &[WorkloadResult]) -> Option<String> {
    let v = verdicts(workloads);
    if v.is_empty() {
        return None;
    }
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
    for c in &v {
        let _ = writeln!(
            o,
            "| {} | {:.1} / {:.1} % | {:.2}x | {:.2}x | {:.0} / {:.0} / {:.0} | {:.2} / {:.2} | {} | \
             {} | {} |",
            c.cell,
            c.hit.0 * 100.0,
            c.hit.1 * 100.0,
            c.p50_ratio,
            c.p99_ratio,
            c.p99_ms.0,
            c.p99_ms.1,
            c.p99_ms.2,
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
    let _ = writeln!(
        o,
        "\nMean hit ratio over the cells: kvroute {:.1} %, smg {:.1} %; {} of {} cells within \
         bounds. The floor is the TTFT p99 of one infinite cache with no queueing: where \
         {MAX_P99_RATIO}x smg's p99 is below it, no router meets that bound.",
        k / n * 100.0,
        s / n * 100.0,
        v.iter().filter(|c| c.failed.is_empty()).count(),
        v.len()
    );
    Some(o)
}

#[cfg(test)]
mod tests {
    use super::super::{Row, WorkloadResult};
    use super::*;
    use crate::fleet::measure::FleetCounts;
    use crate::fleet::SimSpec;
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
        let md = summary(&cells).unwrap();
        assert!(
            md.contains("| good | 49.6 / 50.0 % | 0.50x | 0.70x | 70 / 100 / 40 |"),
            "{md}"
        );
        assert!(md.contains("no: hit ratio, TTFT p99, max/mean, errors, two instances"));
        assert!(md.contains("1 of 2 cells within bounds"));
        assert!(summary(&cells[2..]).is_none());
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
}
