//! One measured run: a workload replayed through a fleet's router, summarized from both ends
//! (the client's latencies and errors, the replicas' own cache and request counters).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use kvroute_load::plan::Plan;
use kvroute_load::progress::{self, Counters, Job, Progress, Snapshot};
use kvroute_load::{ApiMode, Summary, Workload};
use serde::Serialize;

use super::child::Child;
use super::{Bins, Fleet, SimStats};

/// What the replicas themselves counted during the run. The hit ratio and the balance are
/// taken from here rather than from the client: every router is judged by the same counters,
/// whether or not it passes `usage` and `x-replica` through untouched.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FleetCounts {
    /// Σ cached / Σ prompt tokens over all replicas.
    pub hit_ratio: f64,
    /// Requests per replica, every replica listed (an idle one counts as 0).
    pub per_replica: BTreeMap<String, u64>,
    /// max / mean of `per_replica`, idle replicas included.
    pub imbalance: f64,
    pub evictions: u64,
}

impl FleetCounts {
    pub fn from_stats(stats: &[SimStats]) -> FleetCounts {
        let prompt: u64 = stats.iter().map(|s| s.prompt_tokens).sum();
        let cached: u64 = stats.iter().map(|s| s.cached_tokens).sum();
        let per_replica: BTreeMap<String, u64> =
            stats.iter().map(|s| (s.name.clone(), s.requests)).collect();
        let total: u64 = per_replica.values().sum();
        let max = per_replica.values().copied().max().unwrap_or(0);
        FleetCounts {
            hit_ratio: if prompt == 0 {
                0.0
            } else {
                cached as f64 / prompt as f64
            },
            imbalance: if total == 0 {
                0.0
            } else {
                max as f64 * per_replica.len() as f64 / total as f64
            },
            per_replica,
            evictions: stats.iter().map(|s| s.evictions).sum(),
        }
    }

    /// Each replica's share of the requests, e.g. `24/26/25/25 %`.
    pub fn shares(&self) -> String {
        percent_shares(self.per_replica.values().copied())
    }
}

/// Counts as whole-percent shares of their sum, e.g. `24/26/25/25 %`.
pub fn percent_shares(counts: impl Iterator<Item = u64> + Clone) -> String {
    let total = counts.clone().sum::<u64>().max(1);
    let parts: Vec<String> = counts
        .map(|n| format!("{:.0}", n as f64 * 100.0 / total as f64))
        .collect();
    format!("{} %", parts.join("/"))
}

#[derive(Clone, Debug, Serialize)]
pub struct Measured {
    pub client: Summary,
    pub fleet: FleetCounts,
}

/// The `kvroute-load` flags that replay `w` (everything but `--target` and `--json`).
pub fn load_args(w: &Workload, mode: ApiMode, timeout: Duration) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut kv = |k: &str, v: String| {
        a.push(k.to_owned());
        a.push(v);
    };
    match w {
        Workload::Trace {
            path,
            skip,
            n,
            opts,
        } => {
            kv("--trace", path.display().to_string());
            kv("--skip", skip.to_string());
            if let Some(n) = n {
                kv("--n", n.to_string());
            }
            kv("--speed", opts.speed.to_string());
            kv("--block-bytes", opts.block_bytes.to_string());
            kv("--max-tokens-scale", opts.max_tokens_scale.to_string());
        }
        Workload::SharedPrefix(c) => {
            kv("--synthetic", "shared-prefix".into());
            kv("--groups", c.groups.to_string());
            kv("--users", c.users.to_string());
            kv("--turns", c.turns.to_string());
            kv("--system-bytes", c.system_bytes.to_string());
            kv("--question-bytes", c.question_bytes.to_string());
            kv("--answer-bytes", c.answer_bytes.to_string());
            kv("--rate", c.rate.to_string());
            kv("--max-tokens", c.max_tokens.to_string());
            kv("--seed", c.seed.to_string());
            kv("--tenant-skew", c.tenant_skew.to_string());
            kv("--unshared-fraction", c.unshared_fraction.to_string());
            kv("--unshared-bytes", c.unshared_bytes.to_string());
        }
    }
    kv("--timeout-s", timeout.as_secs_f64().to_string());
    if mode == ApiMode::Chat {
        a.push("--chat".into());
    }
    a
}

/// Replays a workload through `fleet` (which must be cold) with the release `kvroute-load`
/// binary, and collects both views. The generator runs as its own optimized process: xtask is
/// a debug build, and a debug load generator would measure itself.
pub fn measure(
    bins: &Bins,
    fleet: &mut Fleet,
    plan: &Plan,
    load_args: &[String],
    log_dir: &Path,
    tag: &str,
) -> anyhow::Result<Measured> {
    let progress_opts = progress::Options::from_env()?;
    let mut args = load_args.to_vec();
    args.extend(["--target".into(), fleet.urls().join(","), "--json".into()]);
    // The child sends its live counters as JSON lines on stderr; this process shows them, on
    // its own stderr (a terminal or not), and logs the child's other lines as before.
    args.extend(["--progress".into(), "json".into()]);
    args.extend(["--progress-interval-s".into(), "0.5".into()]);
    let slug = fleet.label.replace([' ', '_'], "-");
    let log = log_dir.join(format!("{tag}-{slug}-kvroute-load.log"));
    let out = log_dir.join(format!("{tag}-{slug}-kvroute-load.json"));
    let counters = Counters::new();
    let seen = counters.clone();
    let mut load = Child::spawn_taking_stderr(
        "kvroute-load",
        &bins.load,
        &args,
        &log,
        Some(&out),
        move |line| Snapshot::from_wire(line).map(|s| seen.set(s)).is_some(),
    )?;
    let span = plan.sessions.last().map_or(Duration::ZERO, |s| s.start);
    let shown = Progress::start(
        Job::new(format!("{tag} {}", fleet.label))
            .planned(plan.request_count() as u64)
            .schedule(span),
        counters.clone(),
        progress_opts,
    );
    // The schedule, plus room for the last requests to finish and for a slow shared machine.
    let st = load.wait_exit(span * 2 + Duration::from_secs(300))?;
    anyhow::ensure!(
        st.success(),
        "kvroute-load exited with {st}; log {}:\n{}",
        log.display(),
        load.log_tail(15)
    );
    let text = std::fs::read_to_string(&out).with_context(|| format!("read {}", out.display()))?;
    let client: Summary = serde_json::from_str(text.trim())
        .with_context(|| format!("kvroute-load summary in {}", out.display()))?;
    // The final line shows the summary's counts: the child's last progress line may still be
    // in the pipe.
    counters.set(Snapshot {
        sent: client.requests,
        completed: client.requests.saturating_sub(client.errors),
        errors: client.errors,
    });
    shown.finish();
    // A router or replica that died mid-run would otherwise show up only as a pile of errors.
    fleet.ensure_running()?;
    let fleet_counts = FleetCounts::from_stats(&fleet.sim_stats()?);
    let decisions = fleet.decision_summary();
    if !decisions.is_empty() {
        eprintln!("   {}: {decisions}", fleet.label);
    }
    Ok(Measured {
        client,
        fleet: fleet_counts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(name: &str, requests: u64, prompt: u64, cached: u64) -> SimStats {
        SimStats {
            name: name.into(),
            requests,
            prompt_tokens: prompt,
            cached_tokens: cached,
            ..Default::default()
        }
    }

    #[test]
    fn load_args_cover_both_workloads() {
        use kvroute_load::synthetic::SharedPrefixConfig;
        use kvroute_load::trace::LowerOptions;
        let t = Workload::Trace {
            path: "/t.jsonl".into(),
            skip: 5,
            n: Some(10),
            opts: LowerOptions {
                block_bytes: 512,
                speed: 20.0,
                max_tokens_scale: 0.05,
            },
        };
        let a = load_args(&t, ApiMode::Completions, Duration::from_secs(60)).join(" ");
        assert_eq!(
            a,
            "--trace /t.jsonl --skip 5 --n 10 --speed 20 --block-bytes 512 \
             --max-tokens-scale 0.05 --timeout-s 60"
        );
        let s = Workload::SharedPrefix(SharedPrefixConfig::default());
        let a = load_args(&s, ApiMode::Chat, Duration::from_secs(1));
        assert_eq!(&a[..2], ["--synthetic", "shared-prefix"]);
        assert_eq!(a.last().map(String::as_str), Some("--chat"));
        assert!(a.windows(2).any(|w| w == ["--system-bytes", "2048"]));
    }

    #[test]
    fn counts_include_idle_replicas() {
        let c = FleetCounts::from_stats(&[
            st("r0", 6, 600, 300),
            st("r1", 2, 200, 0),
            st("r2", 0, 0, 0),
            st("r3", 0, 0, 0),
        ]);
        assert_eq!(c.hit_ratio, 300.0 / 800.0);
        // mean 2, max 6
        assert_eq!(c.imbalance, 3.0);
        assert_eq!(c.shares(), "75/25/0/0 %");
        assert_eq!(FleetCounts::from_stats(&[]).imbalance, 0.0);
    }
}
