//! Folds per-request records into the run summary. Pure: everything here is unit-tested on
//! hand-computed inputs.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::record::Record;

/// Field names are a stable interface: the xtask benchmark and CI parse `--json` output.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub requests: u64,
    pub errors: u64,
    /// Error count per kind (`connect`, `timeout`, `http_503`, `truncated`, ...).
    pub errors_by_kind: BTreeMap<String, u64>,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    /// Successful requests whose stream carried no usage (the target ignored
    /// `stream_options.include_usage`); they are left out of `hit_ratio`.
    pub missing_usage: u64,
    /// Σ cached / Σ prompt tokens over successful requests, as reported by the replicas.
    pub hit_ratio: f64,
    /// Hit ratio of one infinite cache over the same requests: the ceiling for `hit_ratio`.
    pub ideal_hit_ratio: f64,
    pub ttft_ms: TtftMs,
    pub e2e_ms: E2eMs,
    /// Responses per `x-replica` header value.
    pub per_replica: BTreeMap<String, u64>,
    /// Requests sent to each target (router instance), in `--target` order.
    #[serde(default)]
    pub per_target: Vec<u64>,
    /// max / mean of `per_replica` (1.0 is perfectly even; 0 when no replica was reported).
    pub imbalance: f64,
    /// Send rate: (requests − 1) / (last send − first send), comparable to `target_rps`.
    pub achieved_rps: f64,
    /// Request rate the schedule asks for: (requests − 1) / schedule span for traces,
    /// sessions/s × turns for the synthetic workload; 0 when everything is due at once.
    pub target_rps: f64,
    pub max_lag_ms: f64,
    /// Requests that left more than the lag threshold behind schedule.
    pub lagged_requests: u64,
    pub duration_s: f64,
    /// The run was stopped (Ctrl-C) before the schedule was complete.
    pub stopped_early: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TtftMs {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct E2eMs {
    pub p50: f64,
    pub p99: f64,
}

/// Nearest-rank percentile of an ascending slice (`p` in 0..=100): the smallest value with at
/// least p % of the samples at or below it. Never interpolates, so it is always an observed
/// value; 0 for an empty slice.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        0.0
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

/// max / mean over the replicas that served at least one request.
pub fn imbalance(counts: &BTreeMap<String, u64>) -> f64 {
    let max = counts.values().copied().max().unwrap_or(0);
    let total: u64 = counts.values().sum();
    if total == 0 {
        0.0
    } else {
        max as f64 * counts.len() as f64 / total as f64
    }
}

pub fn ratio(num: u64, den: u64) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

/// Requests per second actually sent, measured the way the target rate is defined: intervals
/// between the first and the last send, so a long final request does not dilute it. A run whose
/// sends all happened in the same instant falls back to requests / run time.
pub fn send_rate(records: &[Record], elapsed: Duration) -> f64 {
    let first = records.iter().map(|r| r.sent).min();
    let last = records.iter().map(|r| r.sent).max();
    match (first, last) {
        (Some(a), Some(b)) if b > a && records.len() > 1 => {
            (records.len() - 1) as f64 / (b - a).as_secs_f64()
        }
        _ if !elapsed.is_zero() => records.len() as f64 / elapsed.as_secs_f64(),
        _ => 0.0,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// Inputs of a summary that are not per-request.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunInfo {
    pub ideal_hit_ratio: f64,
    pub target_rps: f64,
    pub elapsed: Duration,
    pub lag_threshold: Duration,
    pub stopped_early: bool,
}

pub fn summarize(records: &[Record], info: RunInfo) -> Summary {
    let ok: Vec<&Record> = records.iter().filter(|r| r.error.is_none()).collect();
    let mut errors_by_kind = BTreeMap::new();
    for e in records.iter().filter_map(|r| r.error.as_ref()) {
        *errors_by_kind.entry(e.to_string()).or_insert(0) += 1;
    }
    let mut per_replica = BTreeMap::new();
    for name in records.iter().filter_map(|r| r.replica.as_ref()) {
        *per_replica.entry(name.clone()).or_insert(0) += 1;
    }
    let prompt_tokens: u64 = ok.iter().filter_map(|r| r.prompt_tokens).sum();
    let cached_tokens: u64 = ok.iter().filter_map(|r| r.cached_tokens).sum();
    let ttft = sorted(ok.iter().filter_map(|r| r.ttft).map(ms).collect());
    let e2e = sorted(ok.iter().map(|r| ms(r.e2e)).collect());
    let elapsed = info.elapsed.as_secs_f64();
    Summary {
        requests: records.len() as u64,
        errors: (records.len() - ok.len()) as u64,
        errors_by_kind,
        prompt_tokens,
        cached_tokens,
        missing_usage: ok.iter().filter(|r| r.prompt_tokens.is_none()).count() as u64,
        hit_ratio: ratio(cached_tokens, prompt_tokens),
        ideal_hit_ratio: info.ideal_hit_ratio,
        ttft_ms: TtftMs {
            mean: mean(&ttft),
            p50: percentile(&ttft, 50.0),
            p90: percentile(&ttft, 90.0),
            p99: percentile(&ttft, 99.0),
        },
        e2e_ms: E2eMs {
            p50: percentile(&e2e, 50.0),
            p99: percentile(&e2e, 99.0),
        },
        imbalance: imbalance(&per_replica),
        per_replica,
        per_target: {
            let n = records.iter().map(|r| r.target + 1).max().unwrap_or(0);
            let mut v = vec![0; n];
            for r in records {
                v[r.target] += 1;
            }
            v
        },
        achieved_rps: send_rate(records, info.elapsed),
        target_rps: info.target_rps,
        max_lag_ms: records.iter().map(|r| ms(r.lag)).fold(0.0, f64::max),
        lagged_requests: records
            .iter()
            .filter(|r| r.lag > info.lag_threshold)
            .count() as u64,
        duration_s: elapsed,
        stopped_early: info.stopped_early,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::ErrorKind;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 5.0);
        assert_eq!(percentile(&v, 90.0), 9.0);
        assert_eq!(percentile(&v, 99.0), 10.0);
        assert_eq!(percentile(&v, 100.0), 10.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
        // 100 samples 1..=100: p99 is the 99th value.
        let h: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&h, 99.0), 99.0);
        assert_eq!(percentile(&h, 50.0), 50.0);
    }

    #[test]
    fn imbalance_is_max_over_mean() {
        let m = |xs: &[(&str, u64)]| {
            xs.iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect::<BTreeMap<_, _>>()
        };
        assert_eq!(imbalance(&m(&[("a", 5), ("b", 5)])), 1.0);
        // mean 4, max 6
        assert_eq!(imbalance(&m(&[("a", 6), ("b", 2), ("c", 4)])), 1.5);
        assert_eq!(imbalance(&m(&[])), 0.0);
    }

    fn rec(ttft_ms: u64, e2e_ms: u64, prompt: u64, cached: u64, replica: &str) -> Record {
        Record {
            ttft: Some(Duration::from_millis(ttft_ms)),
            e2e: Duration::from_millis(e2e_ms),
            status: Some(200),
            prompt_tokens: Some(prompt),
            cached_tokens: Some(cached),
            replica: Some(replica.to_owned()),
            ..Default::default()
        }
    }

    #[test]
    fn summary_on_hand_computed_records() {
        let mut records = vec![
            rec(10, 100, 100, 50, "r0"),
            rec(20, 200, 300, 0, "r1"),
            rec(30, 300, 100, 100, "r0"),
            rec(40, 400, 500, 250, "r0"),
        ];
        // Errors count toward requests and their kind but never toward tokens or latency.
        records.push(Record {
            error: Some(ErrorKind::Status(503)),
            status: Some(503),
            replica: Some("r1".into()),
            prompt_tokens: Some(1000),
            lag: Duration::from_millis(70),
            ..Default::default()
        });
        records.push(Record {
            error: Some(ErrorKind::Connect),
            ..Default::default()
        });
        // A success without usage counts as a request but not toward the hit ratio.
        records.push(Record {
            ttft: Some(Duration::from_millis(25)),
            e2e: Duration::from_millis(250),
            replica: Some("r1".into()),
            ..Default::default()
        });
        let s = summarize(
            &records,
            RunInfo {
                ideal_hit_ratio: 0.6,
                target_rps: 3.0,
                elapsed: Duration::from_secs(2),
                lag_threshold: Duration::from_millis(50),
                stopped_early: false,
            },
        );
        assert_eq!(s.requests, 7);
        assert_eq!(s.errors, 2);
        assert_eq!(
            s.errors_by_kind,
            BTreeMap::from([("connect".into(), 1), ("http_503".into(), 1)])
        );
        assert_eq!((s.prompt_tokens, s.cached_tokens), (1000, 400));
        assert_eq!(s.missing_usage, 1);
        assert_eq!(s.hit_ratio, 0.4);
        assert_eq!(
            s.ttft_ms,
            TtftMs {
                mean: 25.0,
                p50: 25.0,
                p90: 40.0,
                p99: 40.0
            }
        );
        assert_eq!(
            s.e2e_ms,
            E2eMs {
                p50: 250.0,
                p99: 400.0
            }
        );
        assert_eq!(
            s.per_replica,
            BTreeMap::from([("r0".into(), 3), ("r1".into(), 3)])
        );
        assert_eq!(s.imbalance, 1.0);
        assert_eq!(s.achieved_rps, 3.5);
        assert_eq!(s.max_lag_ms, 70.0);
        assert_eq!(s.lagged_requests, 1);
    }

    #[test]
    fn send_rate_counts_intervals() {
        let at = |ms| Record {
            sent: Duration::from_millis(ms),
            ..Default::default()
        };
        // 5 sends over 2 s: 4 intervals → 2 req/s, however long the run lasted.
        let rs: Vec<_> = [0, 500, 1000, 1500, 2000].into_iter().map(at).collect();
        assert_eq!(send_rate(&rs, Duration::from_secs(10)), 2.0);
        // All at once: fall back to requests / run time.
        assert_eq!(send_rate(&[at(0), at(0)], Duration::from_secs(4)), 0.5);
        assert_eq!(send_rate(&[], Duration::ZERO), 0.0);
    }

    #[test]
    fn json_field_names_are_stable() {
        let v = serde_json::to_value(Summary::default()).unwrap();
        for k in [
            "requests",
            "errors",
            "hit_ratio",
            "ideal_hit_ratio",
            "ttft_ms",
            "e2e_ms",
            "per_replica",
            "imbalance",
            "achieved_rps",
            "target_rps",
            "max_lag_ms",
        ] {
            assert!(v.get(k).is_some(), "{k}");
        }
        for k in ["mean", "p50", "p90", "p99"] {
            assert!(v["ttft_ms"].get(k).is_some(), "{k}");
        }
    }
}
