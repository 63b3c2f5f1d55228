//! A simulated fleet for demos and benchmarks: N `kvroute-sim` replicas behind one router
//! (kvroute with a policy, or SGLang's router), on loopback, with every process's output in a
//! log file and every process stopped when the [`Fleet`] is dropped or xtask is interrupted.

pub mod child;
pub mod llama;
pub mod measure;
pub mod peers;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use kvroute_load::plan::Plan;
use kvroute_load::stats::percentile;
use kvroute_testkit::metrics_text::Samples;
use kvroute_tests::harness::{free_port, post, request};
use serde::{Deserialize, Serialize};

use self::child::Child;
use crate::procs::{cargo, sh, target_dir};

/// Bytes of prompt per simulated token: kvroute-sim has no tokenizer and counts 4 bytes a token.
pub const SIM_BYTES_PER_TOKEN: usize = 4;
/// Fixed cost of each simulated prefill, ms: `kvroute-sim`'s default, passed explicitly so
/// the TTFT floor is computed with the value the replicas run with.
pub const SIM_PREFILL_OVERHEAD_MS: f64 = 10.0;

/// Every policy name kvroute has or is getting, in the order they are compared.
pub const KNOWN_POLICIES: [&str; 4] =
    ["round-robin", "least-loaded", "consistent-hash", "kv-aware"];

/// Where benchmark output, logs and generated configs go.
pub fn bench_dir() -> PathBuf {
    target_dir().join("bench")
}

/// The release binaries a fleet is made of.
#[derive(Clone, Debug)]
pub struct Bins {
    pub kvroute: PathBuf,
    pub sim: PathBuf,
    pub load: PathBuf,
}

impl Bins {
    /// Builds them unless `skip_build`, then checks they exist.
    pub fn prepare(skip_build: bool) -> anyhow::Result<Bins> {
        if !skip_build {
            sh(cargo().args([
                "build",
                "--release",
                "-p",
                "kvroute",
                "-p",
                "kvroute-sim",
                "-p",
                "kvroute-load",
                "--bins",
            ]))?;
        }
        let dir = target_dir().join("release");
        let bins = Bins {
            kvroute: dir.join("kvroute"),
            sim: dir.join("kvroute-sim"),
            load: dir.join("kvroute-load"),
        };
        for p in [&bins.kvroute, &bins.sim, &bins.load] {
            anyhow::ensure!(
                p.exists(),
                "{} not found: build it with `cargo build --release -p kvroute -p kvroute-sim -p kvroute-load --bins` \
                 (or drop --no-build)",
                p.display()
            );
        }
        Ok(bins)
    }

    /// The `--policy` values this kvroute build accepts, read from its `-h` (clap lists them
    /// as `[possible values: a, b]`), so callers work before and after a policy lands. If the
    /// help has no such list, each of `known` is tried with `--check-config` instead (clap
    /// rejects an unknown value with exit code 2 before anything else happens).
    pub fn kvroute_policies(&self, known: &[&str]) -> anyhow::Result<Vec<String>> {
        let out = Command::new(&self.kvroute)
            .arg("-h")
            .output()
            .with_context(|| format!("run {} -h", self.kvroute.display()))?;
        if let Some(found) = parse_policy_values(&String::from_utf8_lossy(&out.stdout)) {
            return Ok(found);
        }
        let accepts = |p: &str| {
            Command::new(&self.kvroute)
                .args(["--policy", p, "--check-config", "--admin", "127.0.0.1:9"])
                .output()
                .is_ok_and(|o| o.status.success())
        };
        let found: Vec<String> = known
            .iter()
            .filter(|p| accepts(p))
            .map(|p| p.to_string())
            .collect();
        anyhow::ensure!(
            !found.is_empty(),
            "{} accepts none of the policies {known:?} (neither `-h` nor `--check-config` tell)",
            self.kvroute.display()
        );
        Ok(found)
    }
}

/// The `[possible values: …]` list of the `--policy` flag in clap's short help (`-h`; the
/// long help switches to a bulleted list once variants carry doc comments).
fn parse_policy_values(help: &str) -> Option<Vec<String>> {
    let mut lines = help
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("--policy"));
    let first = lines.next()?;
    // The flag's own text runs until the next line that starts another flag; wrapped lines of
    // a long value list are part of it, another flag's values are not.
    let mut section = first.to_owned();
    for l in lines.take_while(|l| !l.trim_start().starts_with('-')) {
        section.push(' ');
        section.push_str(l.trim());
    }
    let open = section.find("possible values:")? + "possible values:".len();
    let close = section[open..].find(']')? + open;
    Some(
        section[open..close]
            .split(',')
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .collect(),
    )
}

/// How every replica of the fleet is simulated.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SimSpec {
    pub replicas: usize,
    pub kv_blocks: usize,
    pub block_tokens: u32,
    /// Real seconds per simulated second.
    pub time_scale: f64,
    pub prefill_tps: f64,
    /// Fixed cost of each prefill, simulated milliseconds.
    pub prefill_overhead_ms: f64,
    pub decode_tps: f64,
    pub max_seqs: usize,
    /// Replica `i` prefills at `prefill_tps × prefill_speeds[i % len]` (empty: all at
    /// `prefill_tps`): a fleet of mixed GPU generations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefill_speeds: Vec<f64>,
}

impl SimSpec {
    /// Prefill throughput of replica `i`, tokens per simulated second.
    pub fn prefill_tps_of(&self, i: usize) -> f64 {
        match self.prefill_speeds.len() {
            0 => self.prefill_tps,
            n => self.prefill_tps * self.prefill_speeds[i % n],
        }
    }

    /// The spec of replica `i` alone: its own prefill speed, no per-replica list.
    pub fn replica(&self, i: usize) -> SimSpec {
        SimSpec {
            prefill_tps: self.prefill_tps_of(i),
            prefill_speeds: Vec::new(),
            ..self.clone()
        }
    }

    /// Prompt bytes per simulated KV block.
    pub fn block_bytes(&self) -> usize {
        self.block_tokens as usize * SIM_BYTES_PER_TOKEN
    }
}

/// KV blocks of the distinct prompt content of `plan`: each distinct segment counted once at
/// its full size, which is what a cache big enough for the whole run would end up holding.
pub fn working_set_blocks(plan: &Plan, block_bytes: usize) -> u64 {
    let mut seen = std::collections::HashMap::new();
    for g in plan.requests_in_order().flat_map(|r| &r.segments) {
        seen.entry(g.id).or_insert(g.full_bytes);
    }
    seen.values()
        .map(|b| b.div_ceil(block_bytes.max(1)) as u64)
        .sum()
}

/// TTFT no router can beat on `plan` with this fleet, ms at p50 and p99: every request
/// prefills only what one infinite cache would not hold, with nobody queued ahead of it.
/// The simulator turns prompt bytes into tokens at `SIM_BYTES_PER_TOKEN`.
pub fn ttft_floor_ms(plan: &Plan, sim: &SimSpec) -> (f64, f64) {
    let mut ms: Vec<f64> = kvroute_load::ideal::ideal_uncached_bytes(plan.requests_in_order())
        .into_iter()
        .map(|bytes| {
            let tokens = bytes as f64 / SIM_BYTES_PER_TOKEN as f64;
            (sim.prefill_overhead_ms / 1000.0 + tokens / sim.prefill_tps) * sim.time_scale * 1000.0
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    (percentile(&ms, 50.0), percentile(&ms, 99.0))
}

/// Hit ratio of one LRU cache as large as the whole fleet's KV capacity on `plan`: the
/// ceiling for caches of this size, where the infinite-cache ideal is not reachable.
pub fn lru_ceiling(plan: &Plan, sim: &SimSpec) -> f64 {
    let capacity = (sim.kv_blocks * sim.replicas * sim.block_bytes()) as u64;
    kvroute_load::ideal::lru_hit_ratio(plan.requests_in_order(), capacity)
}

/// KV blocks of the largest single prompt of `plan`.
pub fn largest_request_blocks(plan: &Plan, block_bytes: usize) -> u64 {
    plan.requests_in_order()
        .map(|r| r.segments.iter().map(|g| g.bytes).sum::<usize>())
        .max()
        .unwrap_or(0)
        .div_ceil(block_bytes.max(1)) as u64
}

/// Per-replica KV capacity so the fleet as a whole holds `fraction` of the working set, but
/// never less than two of the largest prompts (a replica that cannot hold one prompt measures
/// nothing but thrashing).
pub fn size_kv_blocks(plan: &Plan, block_bytes: usize, replicas: usize, fraction: f64) -> usize {
    let ws = working_set_blocks(plan, block_bytes) as f64;
    let per = (ws * fraction / replicas.max(1) as f64).ceil() as u64;
    per.max(2 * largest_request_blocks(plan, block_bytes))
        .max(64) as usize
}

/// `name`, with ` xN` when it runs as `n > 1` instances.
pub fn instances_label(name: String, n: usize) -> String {
    if n > 1 {
        format!("{name} x{n}")
    } else {
        name
    }
}

/// A router row to run: its label, and its spec or the reason it cannot run (reported as a
/// skipped row, shown with `{:#}`).
pub type Candidate = (String, anyhow::Result<RouterSpec>);

/// The router in front of the replicas: `instances` copies of it with the same configuration,
/// each knowing only what passed through it (clients pick one per request).
#[derive(Clone, Debug)]
pub enum RouterSpec {
    Kvroute {
        policy: String,
        workers: usize,
        instances: usize,
    },
    /// One of SGLang's gateways, run by `python` (see [`peers`]).
    Sglang {
        gateway: peers::Gateway,
        policy: String,
        python: PathBuf,
        instances: usize,
    },
}

impl RouterSpec {
    pub fn label(&self) -> String {
        let (name, n) = match self {
            RouterSpec::Kvroute {
                policy, instances, ..
            } => (format!("kvroute {policy}"), *instances),
            RouterSpec::Sglang {
                gateway,
                policy,
                instances,
                ..
            } => (format!("{} {policy}", gateway.name()), *instances),
        };
        instances_label(name, n)
    }

    pub fn instances(&self) -> usize {
        match self {
            RouterSpec::Kvroute { instances, .. } | RouterSpec::Sglang { instances, .. } => {
                (*instances).max(1)
            }
        }
    }

    fn slug(&self) -> String {
        self.label().replace([' ', '_'], "-")
    }
}

/// One replica.
pub struct Sim {
    pub name: String,
    pub addr: SocketAddr,
    pub child: Child,
}

impl Sim {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// What a replica reports at `GET /sim/stats` (counters since start or the last reset).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SimStats {
    #[serde(default)]
    pub name: String,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    pub evictions: u64,
}

/// Replicas plus a router; dropping it stops all of them (router first, so it never sees its
/// replicas vanish while it still serves).
pub struct Fleet {
    routers: Vec<Child>,
    urls: Vec<String>,
    /// Admin API of each kvroute instance (none for SGLang).
    admins: Vec<SocketAddr>,
    pub sims: Vec<Sim>,
    pub label: String,
}

const SIM_READY: Duration = Duration::from_secs(15);
const KVROUTE_READY: Duration = Duration::from_secs(15);
/// From "router listening" to "a request goes through": SGLang registers workers after start.
const FIRST_REQUEST: Duration = Duration::from_secs(60);

impl Fleet {
    /// Starts `spec.replicas` simulators and `router` in front of them, waits until a request
    /// goes through end to end, then resets the simulators so the run starts cold.
    /// Logs go to `log_dir/<tag>-<process>.log`.
    pub fn start(
        bins: &Bins,
        spec: &SimSpec,
        router: &RouterSpec,
        log_dir: &Path,
        tag: &str,
    ) -> anyhow::Result<Fleet> {
        std::fs::create_dir_all(log_dir)
            .with_context(|| format!("create {}", log_dir.display()))?;
        let log = |what: &str| log_dir.join(format!("{tag}-{}-{what}.log", router.slug()));
        let mut sims = Vec::with_capacity(spec.replicas);
        for i in 0..spec.replicas {
            sims.push(start_sim(
                bins,
                &spec.replica(i),
                &format!("r{i}"),
                &log(&format!("r{i}")),
            )?);
        }
        let mut routers = Vec::new();
        let mut urls = Vec::new();
        let mut admins = Vec::new();
        for i in 0..router.instances() {
            // One instance keeps the historical file names; more get an index each.
            let suffix = if router.instances() > 1 {
                format!("-{i}")
            } else {
                String::new()
            };
            let (child, url) = match router {
                RouterSpec::Kvroute {
                    policy, workers, ..
                } => {
                    let (child, url, admin) = start_kvroute(
                        bins,
                        &format!(
                            "kv_blocks = {}\nkv_block_tokens = {}\n",
                            spec.kv_blocks, spec.block_tokens
                        ),
                        &sims,
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
                } => peers::start(
                    *gateway,
                    python,
                    &sims,
                    policy,
                    &log(&format!("{}{suffix}", gateway.name())),
                )?,
            };
            routers.push(child);
            urls.push(url);
        }
        let mut fleet = Fleet {
            routers,
            urls,
            admins,
            sims,
            label: router.label(),
        };
        fleet.smoke()?;
        fleet.reset_sims()?;
        Ok(fleet)
    }

    /// Base URLs clients send to, one per router instance.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// Sends one tiny completion through every router instance until it succeeds: proves the
    /// whole path works before a benchmark is spent on it.
    fn smoke(&mut self) -> anyhow::Result<()> {
        let body = r#"{"model":"sim-model","prompt":"kvroute fleet smoke test","max_tokens":1}"#;
        let label = self.label.clone();
        for (router, url) in self.routers.iter_mut().zip(&self.urls) {
            let addr: SocketAddr = url
                .trim_start_matches("http://")
                .parse()
                .expect("router URL is http://ip:port");
            let mut last = String::from("no answer");
            let res = router.wait_ready("a first completion", FIRST_REQUEST, || {
                match post(addr, "/v1/completions", body) {
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
                format!("{label}: a completion through the router at {url} failed (last: {last})")
            })?;
        }
        Ok(())
    }

    /// Clears every replica's cache and counters.
    pub fn reset_sims(&self) -> anyhow::Result<()> {
        for s in &self.sims {
            let r = post(s.addr, "/sim/reset", "{}")
                .with_context(|| format!("POST /sim/reset to {}", s.name))?;
            anyhow::ensure!(
                r.status == 200,
                "POST /sim/reset to {}: HTTP {}",
                s.name,
                r.status
            );
        }
        Ok(())
    }

    /// kvroute's routing decisions by kind and its prediction outcomes, summed
    /// over instances, as one line for the progress log (empty for SGLang): where
    /// a policy's hits were won or lost.
    pub fn decision_summary(&self) -> String {
        decision_summary(&self.admins)
    }

    pub fn sim_stats(&self) -> anyhow::Result<Vec<SimStats>> {
        self.sims
            .iter()
            .map(|s| {
                let r = request(
                    s.addr,
                    "GET /sim/stats HTTP/1.1\r\nHost: sim\r\nConnection: close\r\n\r\n",
                )
                .with_context(|| format!("GET /sim/stats from {}", s.name))?;
                anyhow::ensure!(
                    r.status == 200,
                    "GET /sim/stats from {}: HTTP {}",
                    s.name,
                    r.status
                );
                let mut st: SimStats = serde_json::from_slice(&r.body)
                    .with_context(|| format!("/sim/stats of {}", s.name))?;
                st.name.clone_from(&s.name);
                Ok(st)
            })
            .collect()
    }

    /// Fails naming the first process that died, with its log.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        for r in &mut self.routers {
            r.ensure_running()?;
        }
        for s in &mut self.sims {
            s.child.ensure_running()?;
        }
        Ok(())
    }

    /// Log files of every process, for "see …" hints after a failure.
    pub fn logs(&self) -> Vec<PathBuf> {
        self.routers
            .iter()
            .map(|r| r.log.clone())
            .chain(self.sims.iter().map(|s| s.child.log.clone()))
            .collect()
    }
}

/// Starts one replica and waits for its health check. `free_port` only says a port *was*
/// free, and a dozen fleets come and go in one benchmark: a replica that lost the race for
/// its port is retried on another one instead of failing the row.
fn start_sim(bins: &Bins, spec: &SimSpec, name: &str, log: &Path) -> anyhow::Result<Sim> {
    start_sim_on(bins, spec, name, log, None)
}

/// One replica on `at` (a replica started again where the fleet knows it), or
/// on a free port, tried again on another when that one was taken meanwhile.
pub fn start_sim_on(
    bins: &Bins,
    spec: &SimSpec,
    name: &str,
    log: &Path,
    at: Option<SocketAddr>,
) -> anyhow::Result<Sim> {
    const ATTEMPTS: usize = 3;
    let mut attempt = 1;
    loop {
        let addr: SocketAddr = match at {
            Some(a) => a,
            None => format!("127.0.0.1:{}", free_port()).parse()?,
        };
        let args: Vec<String> = [
            "--listen",
            &addr.to_string(),
            "--name",
            name,
            "--kv-blocks",
            &spec.kv_blocks.to_string(),
            "--block-tokens",
            &spec.block_tokens.to_string(),
            "--prefill-tps",
            &spec.prefill_tps.to_string(),
            "--prefill-overhead-ms",
            &spec.prefill_overhead_ms.to_string(),
            "--decode-tps",
            &spec.decode_tps.to_string(),
            "--max-seqs",
            &spec.max_seqs.to_string(),
            "--time-scale",
            &spec.time_scale.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut child = Child::spawn(&format!("kvroute-sim {name}"), &bins.sim, &args, log)?;
        match child.wait_ready("GET /health", SIM_READY, || http_ok(addr, "/health")) {
            Ok(()) => {
                return Ok(Sim {
                    name: name.to_owned(),
                    addr,
                    child,
                })
            }
            Err(e) if at.is_none() && attempt < ATTEMPTS && child.exited().is_some() => {
                eprintln!("xtask: kvroute-sim {name} did not start on {addr}, retrying: {e:#}");
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// kvroute's routing decisions by kind and its prediction outcomes, summed over the instances
/// whose admin API is at `admins`, as one line for the progress log.
fn decision_summary(admins: &[SocketAddr]) -> String {
    let mut sums = BTreeMap::new();
    for admin in admins {
        if let Ok(r) = request(
            *admin,
            "GET /metrics HTTP/1.1\r\nHost: fleet\r\nConnection: close\r\n\r\n",
        ) {
            add_decision_counts(&r.text(), &mut sums);
        }
    }
    sums.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn http_ok(addr: SocketAddr, path: &str) -> bool {
    request(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: fleet\r\nConnection: close\r\n\r\n"),
    )
    .is_ok_and(|r| r.status == 200)
}

/// kvroute in front of `sims`, each replica's entry given the `capacity` keys (its KV blocks
/// and block size; for a slot-based engine, its slots too).
#[allow(clippy::too_many_arguments)]
fn start_kvroute(
    bins: &Bins,
    capacity: &str,
    sims: &[Sim],
    policy: &str,
    workers: usize,
    log: &Path,
    log_dir: &Path,
    tag: &str,
) -> anyhow::Result<(Child, String, SocketAddr)> {
    let listen = format!("127.0.0.1:{}", free_port());
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    // A config file rather than `--replica` flags: only the file can tell the KV-aware policy
    // each replica's real capacity, so its index budget mirrors the simulators'.
    let mut toml = format!(
        "listen = \"{listen}\"\nadmin = \"{admin}\"\nworkers = {workers}\n\
         # Sharing two cores with the replicas and the load generator: let the scheduler place it.\n\
         pin_workers = false\n"
    );
    for s in sims {
        toml.push_str(&format!(
            "\n[[replicas]]\nurl = \"{}\"\nmodels = [\"sim-model\"]\n{capacity}",
            s.url(),
        ));
    }
    // Tuning hook: extra `[routing]` keys (e.g. "w_load = 0.2") for weight sweeps,
    // so candidate defaults are measured on this same harness before they change.
    if let Ok(extra) = std::env::var("KVROUTE_BENCH_ROUTING") {
        toml.push_str(&format!("\n[routing]\n{}\n", extra.replace(';', "\n")));
    }
    let config = log_dir.join(format!("{tag}-kvroute-{policy}.toml"));
    std::fs::write(&config, toml).with_context(|| format!("write {}", config.display()))?;
    let args = vec![
        "--config".to_owned(),
        config.display().to_string(),
        "--policy".to_owned(),
        policy.to_owned(),
    ];
    let mut child = Child::spawn(
        &format!("kvroute --policy {policy}"),
        &bins.kvroute,
        &args,
        log,
    )?;
    child.wait_ready("GET /healthz on the admin API", KVROUTE_READY, || {
        http_ok(admin, "/healthz")
    })?;
    Ok((child, format!("http://{listen}"), admin))
}

/// Adds the decision and prediction counters of one Prometheus text page to
/// `sums`, keyed `<kind>` and `predicted <outcome>`, and the prompt tokens the
/// index predicted cached against those the replicas reported, over all
/// replicas, as `tokens predicted` and `tokens cached`, and the decisions'
/// summed regret (prompts' worth of overlap given up) as `regret`.
fn add_decision_counts(metrics: &str, sums: &mut BTreeMap<String, f64>) {
    let samples = Samples::parse(metrics);
    for (name, key) in [
        ("kvroute_prefix_predicted_tokens_sum", "tokens predicted"),
        ("kvroute_prefix_cached_tokens_sum", "tokens cached"),
        ("kvroute_routing_regret_ratio_sum", "regret"),
    ] {
        if samples.named(name).next().is_some() {
            *sums.entry(key.to_owned()).or_default() += samples.sum(name, &[]);
        }
    }
    for (name, label, key) in [
        ("kvroute_routing_decisions_total", "kind", ""),
        ("kvroute_prefix_prediction_total", "outcome", "predicted "),
    ] {
        for (value, n) in samples.sum_by(name, &[], label) {
            *sums.entry(format!("{key}{value}")).or_default() += n;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn decision_counts_sum_over_instances() {
        let page = "# TYPE kvroute_routing_decisions_total counter\n\
            kvroute_routing_decisions_total{kind=\"prefix\"} 10\n\
            kvroute_routing_decisions_total{kind=\"spill\"} 2\n\
            kvroute_prefix_prediction_total{outcome=\"hit_miss\"} 3\n\
            kvroute_prefix_predicted_tokens_sum{replica=\"http://a\"} 1500\n\
            kvroute_prefix_predicted_tokens_sum{replica=\"http://b\"} 500\n\
            kvroute_prefix_cached_tokens_sum{replica=\"http://a\"} 1200\n\
            kvroute_prefix_cached_tokens_count{replica=\"http://a\"} 7\n\
            kvroute_requests_total{status=\"200\"} 99\n";
        let mut sums = BTreeMap::new();
        add_decision_counts(page, &mut sums);
        add_decision_counts(page, &mut sums);
        let got: Vec<(&str, f64)> = sums.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        assert_eq!(
            got,
            vec![
                ("predicted hit_miss", 6.0),
                ("prefix", 20.0),
                ("spill", 4.0),
                ("tokens cached", 2400.0),
                ("tokens predicted", 4000.0)
            ]
        );
    }
    use super::*;

    /// Two requests sharing their first segment: the second prefills only its own tail.
    #[test]
    fn ttft_floor_counts_only_what_an_infinite_cache_lacks() {
        use kvroute_load::plan::{PlannedRequest, Role, Segment, Session};
        let seg = |id, bytes| Segment {
            id,
            bytes,
            full_bytes: bytes,
            weight: bytes as u64,
            role: Role::User,
        };
        let session = |id: &str, segments| Session {
            start: Duration::ZERO,
            id: id.into(),
            requests: vec![PlannedRequest {
                segments,
                max_tokens: 1,
            }],
        };
        let plan = Plan {
            sessions: vec![
                session("a", vec![seg(1, 32_000), seg(2, 8_000)]),
                session("b", vec![seg(1, 32_000), seg(3, 4_000)]),
            ],
            target_rps: 1.0,
        };
        let sim = SimSpec {
            replicas: 2,
            kv_blocks: 100,
            block_tokens: 16,
            time_scale: 0.5,
            prefill_tps: 1000.0,
            prefill_overhead_ms: 10.0,
            decode_tps: 50.0,
            max_seqs: 8,
            prefill_speeds: Vec::new(),
        };
        // 40 000 B = 10 000 tokens = 10 s + 10 ms, at half speed: 5005 ms.
        // 4 000 B = 1 000 tokens = 1 s + 10 ms: 505 ms.
        let (p50, p99) = ttft_floor_ms(&plan, &sim);
        assert!((p50 - 505.0).abs() < 1e-9, "{p50}");
        assert!((p99 - 5005.0).abs() < 1e-9, "{p99}");
    }

    #[test]
    fn policy_values_from_clap_help() {
        let help = "Options:\n  -c, --config <CONFIG>      Path of kvroute.toml\n      \
                    --io <IO>  [possible values: auto, epoll, io-uring]\n      \
                    --policy <POLICY>  [possible values: round-robin, least-loaded,\n          \
                    kv-aware]\n      --replica <REPLICAS>  A replica\n";
        assert_eq!(
            parse_policy_values(help).unwrap(),
            vec!["round-robin", "least-loaded", "kv-aware"]
        );
        let short =
            "  --policy <POLICY>  [possible values: round-robin, least-loaded]\n  --admin <A>\n";
        assert_eq!(
            parse_policy_values(short).unwrap(),
            vec!["round-robin", "least-loaded"]
        );
        // A --policy without a value list must not borrow the next flag's values.
        let none = "  --policy <POLICY>\n  --io <IO>  [possible values: epoll]\n";
        assert_eq!(parse_policy_values(none), None);
    }
}
