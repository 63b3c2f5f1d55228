//! Human-readable rendering of a [`Summary`].

use std::fmt::Write;

use super::stats::Summary;

pub fn table(s: &Summary) -> String {
    let mut o = String::new();
    let pct = |x: f64| format!("{:.1} %", x * 100.0);
    let row = |o: &mut String, k: &str, v: String| {
        let _ = writeln!(o, "  {k:<22} {v}");
    };
    let _ = writeln!(o, "kvroute-load summary");
    row(&mut o, "requests", s.requests.to_string());
    let kinds: Vec<String> = s
        .errors_by_kind
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    row(
        &mut o,
        "errors",
        if kinds.is_empty() {
            s.errors.to_string()
        } else {
            format!("{} ({})", s.errors, kinds.join(", "))
        },
    );
    row(
        &mut o,
        "hit ratio",
        format!(
            "{}  ({} / {} prompt tokens cached)",
            pct(s.hit_ratio),
            s.cached_tokens,
            s.prompt_tokens
        ),
    );
    if s.missing_usage > 0 {
        row(
            &mut o,
            "missing usage",
            format!("{} successful requests reported no usage", s.missing_usage),
        );
    }
    row(
        &mut o,
        "ideal hit ratio",
        format!(
            "{}  (one infinite cache: the ceiling)",
            pct(s.ideal_hit_ratio)
        ),
    );
    row(
        &mut o,
        "TTFT ms",
        format!(
            "mean {:.1}  p50 {:.1}  p90 {:.1}  p99 {:.1}",
            s.ttft_ms.mean, s.ttft_ms.p50, s.ttft_ms.p90, s.ttft_ms.p99
        ),
    );
    row(
        &mut o,
        "e2e ms",
        format!("p50 {:.1}  p99 {:.1}", s.e2e_ms.p50, s.e2e_ms.p99),
    );
    let total: u64 = s.per_replica.values().sum();
    for (name, n) in &s.per_replica {
        row(
            &mut o,
            &format!("replica {name}"),
            format!("{n} ({})", pct(super::stats::ratio(*n, total))),
        );
    }
    if s.per_target.len() > 1 {
        let parts: Vec<String> = s.per_target.iter().map(u64::to_string).collect();
        row(&mut o, "requests per target", parts.join(" / "));
    }
    row(
        &mut o,
        "imbalance (max/mean)",
        format!("{:.2}", s.imbalance),
    );
    row(
        &mut o,
        "request rate",
        if s.target_rps > 0.0 {
            format!(
                "{:.1} req/s achieved, {:.1} req/s target",
                s.achieved_rps, s.target_rps
            )
        } else {
            format!(
                "{:.1} req/s achieved (whole schedule due at once)",
                s.achieved_rps
            )
        },
    );
    row(
        &mut o,
        "max schedule lag",
        format!(
            "{:.1} ms ({} requests over threshold)",
            s.max_lag_ms, s.lagged_requests
        ),
    );
    row(&mut o, "duration", format!("{:.2} s", s.duration_s));
    if s.stopped_early {
        let _ = writeln!(
            o,
            "NOTE: stopped early; the summary covers the requests sent so far"
        );
    }
    if s.lagged_requests > 0 {
        let _ = writeln!(
            o,
            "WARNING: {} requests left behind schedule (max {:.1} ms): the generator or --concurrency-limit, \
             not only the target, shaped this run",
            s.lagged_requests, s.max_lag_ms
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn table_lists_every_headline_number() {
        let s = Summary {
            requests: 10,
            errors: 1,
            errors_by_kind: BTreeMap::from([("http_503".into(), 1)]),
            prompt_tokens: 1000,
            cached_tokens: 250,
            hit_ratio: 0.25,
            ideal_hit_ratio: 0.5,
            per_replica: BTreeMap::from([("r0".into(), 6), ("r1".into(), 4)]),
            imbalance: 1.2,
            max_lag_ms: 60.0,
            lagged_requests: 2,
            ..Default::default()
        };
        let t = table(&s);
        for needle in [
            "requests               10",
            "1 (http_503=1)",
            "25.0 %",
            "50.0 %",
            "replica r0             6 (60.0 %)",
            "1.20",
            "WARNING: 2 requests",
        ] {
            assert!(t.contains(needle), "{needle:?} missing from\n{t}");
        }
    }
}
