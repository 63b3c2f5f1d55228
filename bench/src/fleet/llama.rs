//! A fleet of real llama.cpp replicas (`llama-server` on the random-weight test model) behind one
//! router, for `cargo xtask demo --engine llama-cpp` and the routing bench's real-engine cell.
//!
//! Every fleet starts its replicas fresh, so each router meets cold caches. What is measured
//! comes from both ends: the client's wall-clock TTFT (`kvroute-load`), and the replicas' own
//! prompt-token counters (`llamacpp:prompt_tokens_total`, `llamacpp:prompt_tokens_cached_total`),
//! read before and after the run. llama-server's metrics count no requests, so the requests
//! each replica served are the tasks its own log says it launched (one per completion), also
//! read before and after; the balance is reported both ways, by requests and by prompt tokens.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use kvroute_load::plan::Plan;
use kvroute_load::Summary;
use kvroute_testkit::port::free_port;
use kvroute_tests::harness::post;
use kvroute_tests::llama::{self as engine, Counters, LlamaPaths};
use serde::Serialize;

use super::child::Child;
use super::{Bins, RouterSpec, Sim};
use crate::llama::Llama;

/// The model name the workloads ask for.
const MODEL: &str = "sim-model";

/// From "router listening" to "a request goes through" (SGLang registers workers after start).
const FIRST_REQUEST: Duration = Duration::from_secs(60);

/// How every replica is started.
#[derive(Clone, Debug, Serialize)]
pub struct LlamaSpec {
    pub replicas: usize,
    /// Context tokens of each replica, shared by its slots.
    pub ctx: u32,
    /// Slots of each replica (`--parallel`).
    pub slots: u32,
}

impl LlamaSpec {
    /// What kvroute's config says of each replica's cache, as kvroute-control pushes it from
    /// `/props`: its slots and each slot's context, plus a host prompt cache the size of the
    /// slots' total (the daemon's default; llama-server's `--cache-ram` holds at least that).
    fn capacity(&self) -> String {
        let slot_tokens = self.ctx / self.slots.max(1);
        let host = u64::from(self.ctx);
        format!(
            "kv_slots = {}\nkv_slot_tokens = {slot_tokens}\nkv_host_tokens = {host}\n\
             kv_blocks = {}\nkv_block_tokens = 1\n",
            self.slots,
            u64::from(self.ctx) + host
        )
    }
}

/// Starts `llama-server` as replica `name` and waits for `/health` (a replica that lost the race
/// for its port is retried on another one).
pub fn spawn_server(
    llama: &Llama,
    name: &str,
    log: &Path,
    spec: Option<&LlamaSpec>,
) -> anyhow::Result<Sim> {
    const ATTEMPTS: usize = 3;
    let paths = LlamaPaths {
        server: llama.server.clone(),
        model: llama.model.clone(),
    };
    let (ctx, slots) = spec.map_or((engine::DEFAULT_CTX, engine::DEFAULT_SLOTS), |s| {
        (s.ctx, s.slots)
    });
    let mut attempt = 1;
    loop {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        // Every replica serves the model the workload names: a gateway that routes by the
        // model ids its workers report (smg) finds none under a per-replica alias.
        let args = engine::server_args(&paths, MODEL, addr, ctx, slots);
        let mut child = Child::spawn(&format!("llama-server {name}"), &llama.server, &args, log)?;
        match child.wait_ready("GET /health", engine::READY, || engine::healthy(addr)) {
            Ok(()) => {
                return Ok(Sim {
                    name: name.to_owned(),
                    addr,
                    child,
                })
            }
            Err(e) if attempt < ATTEMPTS && child.exited().is_some() => {
                eprintln!("xtask: llama-server {name} did not start on {addr}, retrying: {e:#}");
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// What llama-server logs when a slot starts on a task; every completion request is one task.
const TASK_LAUNCHED: &str = "launch_slot_:";

/// Tasks a llama-server log says were launched: the requests that replica served.
pub fn launched_tasks(log: &str) -> u64 {
    log.lines().filter(|l| l.contains(TASK_LAUNCHED)).count() as u64
}

/// What one replica counted over a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplicaCounts {
    pub tokens: Counters,
    /// Requests it served, from its log (see [`launched_tasks`]).
    pub requests: u64,
}

/// The replicas' prompt tokens, cached tokens and requests over one run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct EngineCounts {
    /// Σ cached / Σ prompt tokens over all replicas.
    pub hit_ratio: f64,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    /// Prompt tokens each replica was sent.
    pub per_replica_prompt_tokens: BTreeMap<String, u64>,
    /// max / mean of `per_replica_prompt_tokens`.
    pub imbalance: f64,
    /// Requests each replica served, every replica listed (an idle one counts as 0).
    pub per_replica_requests: BTreeMap<String, u64>,
    /// max / mean of `per_replica_requests`: the balance the routing matrix bounds, as it
    /// does the simulated fleets'.
    pub request_imbalance: f64,
}

/// max / mean of `per`, 0 when it is all zeros.
fn max_over_mean(per: &BTreeMap<String, u64>) -> f64 {
    let total: u64 = per.values().sum();
    let max = per.values().copied().max().unwrap_or(0);
    if total == 0 {
        0.0
    } else {
        max as f64 * per.len() as f64 / total as f64
    }
}

impl EngineCounts {
    pub fn from_counts(runs: &[(String, ReplicaCounts)]) -> EngineCounts {
        let prompt: u64 = runs.iter().map(|(_, c)| c.tokens.prompt()).sum();
        let cached: u64 = runs.iter().map(|(_, c)| c.tokens.cached).sum();
        let per_tokens: BTreeMap<String, u64> = runs
            .iter()
            .map(|(n, c)| (n.clone(), c.tokens.prompt()))
            .collect();
        let per_requests: BTreeMap<String, u64> =
            runs.iter().map(|(n, c)| (n.clone(), c.requests)).collect();
        EngineCounts {
            hit_ratio: if prompt == 0 {
                0.0
            } else {
                cached as f64 / prompt as f64
            },
            prompt_tokens: prompt,
            cached_tokens: cached,
            imbalance: max_over_mean(&per_tokens),
            per_replica_prompt_tokens: per_tokens,
            request_imbalance: max_over_mean(&per_requests),
            per_replica_requests: per_requests,
        }
    }

    /// Each replica's share of the prompt tokens, e.g. `48/52 %`.
    pub fn shares(&self) -> String {
        super::measure::percent_shares(self.per_replica_prompt_tokens.values().copied())
    }

    /// Each replica's share of the requests, e.g. `50/50 %`.
    pub fn request_shares(&self) -> String {
        super::measure::percent_shares(self.per_replica_requests.values().copied())
    }
}

/// One measured run on real replicas.
#[derive(Clone, Debug, Serialize)]
pub struct EngineMeasured {
    pub client: Summary,
    pub replicas: EngineCounts,
}

/// llama.cpp replicas plus a router; dropping it stops all of them (router first).
pub struct LlamaFleet {
    routers: Vec<Child>,
    urls: Vec<String>,
    admins: Vec<SocketAddr>,
    replicas: Vec<Sim>,
    /// Each replica's counts once the fleet was proven to work, subtracted from the run's.
    baseline: Vec<ReplicaCounts>,
    pub label: String,
}

impl LlamaFleet {
    /// Starts `spec.replicas` servers and `router` in front of them, sends one request through
    /// every router instance, then records the replicas' counters as the run's zero.
    pub fn start(
        bins: &Bins,
        llama: &Llama,
        spec: &LlamaSpec,
        router: &RouterSpec,
        log_dir: &Path,
        tag: &str,
    ) -> anyhow::Result<LlamaFleet> {
        std::fs::create_dir_all(log_dir)
            .with_context(|| format!("create {}", log_dir.display()))?;
        let slug = router.label().replace([' ', '_'], "-");
        let log = |what: &str| log_dir.join(format!("{tag}-{slug}-{what}.log"));
        let mut replicas = Vec::with_capacity(spec.replicas);
        for i in 0..spec.replicas {
            let name = format!("r{i}");
            replicas.push(spawn_server(llama, &name, &log(&name), Some(spec))?);
        }
        let mut routers = Vec::new();
        let mut urls = Vec::new();
        let mut admins = Vec::new();
        for i in 0..router.instances() {
            let suffix = if router.instances() > 1 {
                format!("-{i}")
            } else {
                String::new()
            };
            let (child, url) = match router {
                RouterSpec::Kvroute {
                    policy, workers, ..
                } => {
                    let (child, url, admin) = super::start_kvroute(
                        bins,
                        &spec.capacity(),
                        &replicas,
                        policy,
                        *workers,
                        &log(&format!("kvroute{suffix}")),
                        log_dir,
                        &format!("{tag}{suffix}"),
                    )?;
                    admins.push(admin);
                    (child, url)
                }
                RouterSpec::Sglang {
                    gateway,
                    policy,
                    python,
                    ..
                } => super::peers::start(
                    *gateway,
                    python,
                    &replicas,
                    policy,
                    &log(&format!("{}{suffix}", gateway.name())),
                )?,
            };
            routers.push(child);
            urls.push(url);
        }
        let mut fleet = LlamaFleet {
            routers,
            urls,
            admins,
            replicas,
            baseline: Vec::new(),
            label: router.label(),
        };
        fleet.smoke()?;
        fleet.baseline = fleet.counters()?;
        Ok(fleet)
    }

    /// One short chat through every router instance until it succeeds.
    fn smoke(&mut self) -> anyhow::Result<()> {
        let body = serde_json::json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": "kvroute fleet smoke test"}],
            "max_tokens": 1,
        })
        .to_string();
        let label = self.label.clone();
        for (router, url) in self.routers.iter_mut().zip(&self.urls) {
            let addr: SocketAddr = url
                .trim_start_matches("http://")
                .parse()
                .expect("router URL is http://ip:port");
            let mut last = String::from("no answer");
            let res = router.wait_ready("a first chat completion", FIRST_REQUEST, || {
                match post(addr, "/v1/chat/completions", &body) {
                    Ok(r) if r.status == 200 => true,
                    Ok(r) => {
                        last = format!("HTTP {}: {}", r.status, r.text().trim());
                        std::thread::sleep(Duration::from_millis(200));
                        false
                    }
                    Err(e) => {
                        last = e.to_string();
                        false
                    }
                }
            });
            res.with_context(|| {
                format!("{label}: a chat through the router at {url} failed (last: {last})")
            })?;
        }
        Ok(())
    }

    /// Each replica's cumulative counts: its metrics, and the tasks its log shows (the log
    /// is appended to across runs, so only differences mean anything).
    fn counters(&self) -> anyhow::Result<Vec<ReplicaCounts>> {
        self.replicas
            .iter()
            .map(|r| {
                let tokens = engine::counters(r.addr)
                    .with_context(|| format!("GET /metrics of {}", r.name))?;
                let log = std::fs::read_to_string(&r.child.log)
                    .with_context(|| format!("read {}", r.child.log.display()))?;
                Ok(ReplicaCounts {
                    tokens,
                    requests: launched_tasks(&log),
                })
            })
            .collect()
    }

    /// What the replicas counted since the fleet started.
    pub fn counts(&self) -> anyhow::Result<EngineCounts> {
        let now = self.counters()?;
        let runs: Vec<(String, ReplicaCounts)> = self
            .replicas
            .iter()
            .zip(now.iter().zip(&self.baseline))
            .map(|(r, (n, b))| {
                let since = ReplicaCounts {
                    tokens: n.tokens.since(&b.tokens),
                    requests: n.requests.saturating_sub(b.requests),
                };
                (r.name.clone(), since)
            })
            .collect();
        Ok(EngineCounts::from_counts(&runs))
    }

    /// kvroute's decision and prediction counters as one line (empty for SGLang).
    pub fn decision_summary(&self) -> String {
        super::decision_summary(&self.admins)
    }

    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// Fails naming the first process that died, with its log.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        for r in &mut self.routers {
            r.ensure_running()?;
        }
        for s in &mut self.replicas {
            s.child.ensure_running()?;
        }
        Ok(())
    }

    /// Log files of every process.
    pub fn logs(&self) -> Vec<PathBuf> {
        self.routers
            .iter()
            .map(|r| r.log.clone())
            .chain(self.replicas.iter().map(|s| s.child.log.clone()))
            .collect()
    }
}

impl Drop for LlamaFleet {
    fn drop(&mut self) {
        // Routers first, so none sees its replicas vanish while it still serves.
        self.routers.clear();
    }
}

/// Replays a workload through `fleet` with the release `kvroute-load` and collects the client's
/// and the replicas' views.
pub fn measure(
    bins: &Bins,
    fleet: &mut LlamaFleet,
    plan: &Plan,
    load_args: &[String],
    log_dir: &Path,
    tag: &str,
) -> anyhow::Result<EngineMeasured> {
    let mut args = load_args.to_vec();
    args.extend(["--target".into(), fleet.urls().join(","), "--json".into()]);
    let slug = fleet.label.replace([' ', '_'], "-");
    let log = log_dir.join(format!("{tag}-{slug}-kvroute-load.log"));
    let out = log_dir.join(format!("{tag}-{slug}-kvroute-load.json"));
    let mut load = Child::spawn_with_stdout("kvroute-load", &bins.load, &args, &log, Some(&out))?;
    let span = plan.sessions.last().map_or(0.0, |s| s.start.as_secs_f64());
    let st = load.wait_exit(Duration::from_secs_f64(span * 2.0 + 600.0))?;
    anyhow::ensure!(
        st.success(),
        "kvroute-load exited with {st}; log {}:\n{}",
        log.display(),
        load.log_tail(15)
    );
    let text = std::fs::read_to_string(&out).with_context(|| format!("read {}", out.display()))?;
    let client: Summary = serde_json::from_str(text.trim())
        .with_context(|| format!("kvroute-load summary in {}", out.display()))?;
    fleet.ensure_running()?;
    let replicas = fleet.counts()?;
    let decisions = fleet.decision_summary();
    if !decisions.is_empty() {
        eprintln!("   {}: {decisions}", fleet.label);
    }
    Ok(EngineMeasured { client, replicas })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_the_replicas_prompt_tokens_and_requests() {
        let c = EngineCounts::from_counts(&[
            (
                "r0".into(),
                ReplicaCounts {
                    tokens: Counters {
                        processed: 100,
                        cached: 500,
                    },
                    requests: 3,
                },
            ),
            (
                "r1".into(),
                ReplicaCounts {
                    tokens: Counters {
                        processed: 200,
                        cached: 0,
                    },
                    requests: 9,
                },
            ),
            // An idle replica counts in the mean.
            ("r2".into(), ReplicaCounts::default()),
        ]);
        assert_eq!((c.prompt_tokens, c.cached_tokens), (800, 500));
        assert_eq!(c.hit_ratio, 500.0 / 800.0);
        // prompt tokens: mean 800/3, max 600
        assert!((c.imbalance - 600.0 * 3.0 / 800.0).abs() < 1e-9);
        assert_eq!(c.shares(), "75/25/0 %");
        // requests: mean 4, max 9
        assert_eq!(c.request_imbalance, 2.25);
        assert_eq!(c.request_shares(), "25/75/0 %");
        let none = EngineCounts::from_counts(&[]);
        assert_eq!((none.imbalance, none.request_imbalance), (0.0, 0.0));
    }

    /// Lines as llama-server 11434 logs them: one `launch_slot_` per request, whatever else
    /// the slot says about it.
    #[test]
    fn requests_are_the_tasks_the_log_launched() {
        let log = "\
0.01.044.549 I slot get_availabl: id  1 | task -1 | selected slot by LRU, t_last = -1
0.01.044.654 I slot launch_slot_: id  1 | task 0 | processing task, is_child = 0
0.01.078.133 I slot      release: id  1 | task 0 | stop processing: n_tokens = 15, truncated = 0
0.01.095.294 I slot launch_slot_: id  1 | task 5 | processing task, is_child = 0
0.01.095.307 W slot   operator(): id  1 | task 5 | need to evaluate at least 1 token
0.01.120.303 I slot      release: id  1 | task 5 | stop processing: n_tokens = 15, truncated = 0
";
        assert_eq!(launched_tasks(log), 2);
        assert_eq!(launched_tasks(""), 0);
    }
}
