//! Tables: printed and written as Markdown.

use std::fmt::Write as _;

pub struct ClosedRow {
    pub name: String,
    pub rps: f64,
    pub rps_min: f64,
    pub rps_max: f64,
    pub cpu_us_per_req: Option<f64>,
    pub cpu_util: Option<f64>,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub errors: u64,
}

pub struct OpenRow {
    pub name: String,
    pub rate: u64,
    pub achieved: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub svc_p50_us: f64,
    pub svc_p99_us: f64,
    pub lag_p99_us: f64,
    pub errors: u64,
    pub scheduled: u64,
    pub completed: u64,
}

/// Rows missing the achieved rate by more than this are flagged: their latency
/// describes a saturated target, not the one asked for.
pub const RATE_TOLERANCE: f64 = 0.02;

/// The team's added-latency budget at p99.
const GOAL_ADDED_P99_US: f64 = 100.0;

pub const KV: &str = "kvroute (uring)";
pub const DIRECT: &str = "direct";

fn ratio(x: f64, base: Option<f64>) -> String {
    match base {
        Some(b) if b > 0.0 => format!("{:.2}", x / b),
        _ => "–".into(),
    }
}

pub fn closed_table(rows: &[ClosedRow]) -> String {
    let kv = rows.iter().find(|r| r.name == KV);
    let mut s = String::new();
    let _ = writeln!(s, "| target | req/s | range | req/s ÷ kvroute's | CPU µs/req | cores busy | req/s per core | per-core ÷ kvroute's | p50 µs | p99 µs | p99.9 µs | p99 ÷ kvroute's | errors |");
    let _ = writeln!(
        s,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {:.0} | {:.0}–{:.0} | {} | {} | {} | {} | {} | {:.0} | {:.0} | {:.0} | {} | {} |",
            r.name,
            r.rps,
            r.rps_min,
            r.rps_max,
            ratio(r.rps, kv.map(|k| k.rps)),
            r.cpu_us_per_req.map_or("–".into(), |c| format!("{c:.1}")),
            r.cpu_util.map_or("–".into(), |u| format!("{u:.2}")),
            r.cpu_us_per_req.map_or("–".into(), |c| format!("{:.0}", 1e6 / c)),
            match (r.cpu_us_per_req, kv.and_then(|k| k.cpu_us_per_req)) {
                // Per-core throughput ratio is the inverse ratio of CPU per request.
                (Some(c), Some(k)) => ratio(k, Some(c)),
                _ => "–".into(),
            },
            r.p50_us,
            r.p99_us,
            r.p999_us,
            ratio(r.p99_us, kv.map(|k| k.p99_us)),
            r.errors
        );
    }
    s
}

pub fn open_table(rows: &[OpenRow]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| rate/s | target | achieved/s | p50 µs | p99 µs | p99.9 µs | added p99 µs | p99 ÷ kvroute's | from-send p50 µs | from-send p99 µs | added from-send p99 µs | gen. send lag p99 µs | errors | note |"
    );
    let _ = writeln!(
        s,
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    for r in rows {
        let direct = rows.iter().find(|d| d.rate == r.rate && d.name == DIRECT);
        let kv = rows.iter().find(|d| d.rate == r.rate && d.name == KV);
        let added = match direct {
            Some(d) if r.name != DIRECT => format!("{:+.0}", r.p99_us - d.p99_us),
            _ => "–".into(),
        };
        let added_svc = match direct {
            Some(d) if r.name != DIRECT => format!("{:+.0}", r.svc_p99_us - d.svc_p99_us),
            _ => "–".into(),
        };
        let mut note = Vec::new();
        if r.achieved < r.rate as f64 * (1.0 - RATE_TOLERANCE) {
            note.push(format!(
                "**rate missed ({:.0}%)**",
                100.0 * r.achieved / r.rate as f64
            ));
        }
        if r.completed < r.scheduled {
            note.push(format!(
                "{} of {} unanswered",
                r.scheduled - r.completed,
                r.scheduled
            ));
        }
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {:.0} | {:.0} | {} | {:.0} | {} | {} |",
            r.rate,
            r.name,
            r.achieved,
            r.p50_us,
            r.p99_us,
            r.p999_us,
            added,
            ratio(r.p99_us, kv.map(|k| k.p99_us)),
            r.svc_p50_us,
            r.svc_p99_us,
            added_svc,
            r.lag_p99_us,
            r.errors,
            note.join("; ")
        );
    }
    s
}

/// The team's targets, stated against what was measured.
pub fn goals(closed: &[ClosedRow], open: &[OpenRow]) -> String {
    let mut s = String::new();
    let get = |n: &str| closed.iter().find(|r| r.name == n).map(|r| r.rps);
    if let Some(kv) = get(KV) {
        for (who, want) in [("nginx", 1.2), ("sglang-router", 3.0)] {
            match get(who) {
                Some(o) => {
                    let x = kv / o;
                    let _ = writeln!(
                        s,
                        "- throughput ≥ {want}× {who}: {:.2}× — {}",
                        x,
                        if x >= want {
                            "reached"
                        } else {
                            "**not reached**"
                        }
                    );
                }
                None => {
                    let _ = writeln!(s, "- throughput ≥ {want}× {who}: not measured");
                }
            }
        }
    }
    let mut rates: Vec<u64> = open.iter().map(|r| r.rate).collect();
    rates.dedup();
    for rate in rates {
        let d = open.iter().find(|r| r.rate == rate && r.name == DIRECT);
        let k = open.iter().find(|r| r.rate == rate && r.name == KV);
        if let (Some(d), Some(k)) = (d, k) {
            let added = k.p99_us - d.p99_us;
            let added_p50 = k.svc_p50_us - d.svc_p50_us;
            let noise = d.lag_p99_us.max(k.lag_p99_us);
            let verdict = if noise > GOAL_ADDED_P99_US {
                // The generator's own lateness is bigger than the budget being checked.
                format!("not measurable here (generator send lag p99 {noise:.0} µs > {GOAL_ADDED_P99_US:.0} µs)")
            } else if added <= GOAL_ADDED_P99_US {
                "reached".into()
            } else {
                "**not reached**".into()
            };
            let _ = writeln!(
                s,
                "- added p99 ≤ {GOAL_ADDED_P99_US:.0} µs at {rate}/s: {added:+.0} µs — {verdict}; added p50 (from send): {added_p50:+.0} µs"
            );
        }
    }
    s
}
