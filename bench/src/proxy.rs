//! `cargo xtask bench proxy`: what a proxy hop costs. One fixed upstream (nginx
//! answering `return 200` with a ~300-byte JSON body) is driven directly and
//! through kvroute (io_uring and epoll), nginx, HAProxy and SGLang's router,
//! side by side in one run so a busy host skews every row alike.
//!
//! CPU layout (2-core host): every proxy runs alone on `--proxy-cpus` (one
//! worker/thread each); the load generators and the upstream share
//! `--load-cpus`. The direct row therefore has the upstream and the generator
//! on one core, which is why ratios, not absolute numbers, are the result.
//!
//! A separate section (`steering.rs`, `--steering-only` to run it alone) runs
//! kvroute with 2 workers on both cores under long-lived streams, eBPF `p2c`
//! steering against the kernel's hash.

pub(crate) mod closed;
mod openloop;
mod report;
mod steering;
pub(crate) mod targets;

use std::fmt::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use kvroute_load::progress::{self, Counters, Job, Progress};

use crate::procs::{cargo, root, sh};
use report::{ClosedRow, OpenRow};
use targets::{Env, Target};

#[derive(clap::Args)]
pub struct Args {
    /// Seconds of measurement per target, phase and round.
    #[arg(long, default_value_t = 5)]
    duration: u32,
    /// Rounds over all targets; throughput is the median round, open-loop
    /// latencies pool every round's samples.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds of unmeasured load before each closed-loop measurement (fills pools, warms caches).
    #[arg(long, default_value_t = 2)]
    warmup: u32,
    /// wrk connections for the closed-loop (peak throughput) phase.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Open-loop arrival rates, requests per second.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000")]
    rates: Vec<u64>,
    /// Keep-alive connections the open-loop generator spreads requests over.
    #[arg(long, default_value_t = 32)]
    open_connections: usize,
    /// Targets or phases to leave out: sglang, haproxy, nginx, epoll, cache, closed, open, steering.
    #[arg(long, value_delimiter = ',')]
    skip: Vec<String>,
    /// CPUs (taskset list) for the proxy under test.
    #[arg(long, default_value = "0")]
    proxy_cpus: String,
    /// CPUs for wrk, the open-loop generator and the upstream.
    #[arg(long, default_value = "1")]
    load_cpus: String,
    /// Idle upstream connections kvroute (`upstream.pool_max_idle`) and nginx (`keepalive`)
    /// may keep; HAProxy's is unbounded. Below `--concurrency`, a proxy churns upstream connections.
    #[arg(long, default_value_t = 1024)]
    upstream_pool: u32,
    /// Python with sglang-router installed.
    #[arg(long, default_value = "python3")]
    python: String,
    /// Another kvroute binary to measure side by side (an extra `kvroute-alt (uring)` row),
    /// for A/B-testing a data-plane change.
    #[arg(long)]
    compare_bin: Option<std::path::PathBuf>,
    /// Use the existing target/release/kvroute instead of building it.
    #[arg(long)]
    no_build: bool,
    /// Also record `perf` call graphs of kvroute (io_uring) under wrk load.
    #[arg(long)]
    perf: bool,
    /// Seconds of perf recording.
    #[arg(long, default_value_t = 8)]
    perf_seconds: u32,
    /// Nice value for every benchmark process (needs root; 0 leaves priorities alone).
    /// The host is shared with builds, and at default priority their time slices
    /// land in the latency tail of whatever is being measured.
    #[arg(long, default_value_t = -20, allow_hyphen_values = true)]
    nice: i32,
    /// Copy the report to docs/bench/proxy.md. With `--steering-only`, only the
    /// steering section of docs/bench/proxy.md is replaced.
    #[arg(long)]
    publish: bool,
    /// Run only the steering section (`--skip steering` leaves it out of a full run).
    #[arg(long)]
    steering_only: bool,
    /// Steering: rounds, each with a fresh kvroute per steering mode.
    #[arg(long, default_value_t = 8)]
    steering_rounds: usize,
    /// Steering: long-lived SSE streams held open during the measurement.
    #[arg(long, default_value_t = 200)]
    steering_streams: usize,
    /// Steering: streams opened concurrently in one burst.
    #[arg(long, default_value_t = 50)]
    steering_burst: usize,
    /// Steering: milliseconds between two token events of one stream.
    #[arg(long, default_value_t = 2)]
    steering_token_ms: u64,
    /// Steering: short requests (each on a new connection) per round, for TTFB.
    #[arg(long, default_value_t = 500)]
    steering_probes: usize,
    /// Steering: short requests per second.
    #[arg(long, default_value_t = 100)]
    steering_probe_rate: u64,
}

impl Args {
    fn skips(&self, what: &str) -> bool {
        self.skip.iter().any(|s| s.eq_ignore_ascii_case(what))
    }
}

pub fn run(a: Args) -> anyhow::Result<()> {
    ensure_tools(a.perf)?;
    targets::cleanup_on_signal()?;
    let bin = release_kvroute(a.no_build)?;
    let dir = fresh_bench_dir("proxy")?;

    renice(a.nice);

    // Before the pinning below: this section spreads over every core.
    let mut steering_md = None;
    if a.steering_only || !a.skips("steering") {
        let p = steering::Params {
            rounds: a.steering_rounds,
            streams: a.steering_streams,
            burst: a.steering_burst.max(1),
            token_ms: a.steering_token_ms.max(1),
            probes: a.steering_probes,
            probe_rate: a.steering_probe_rate,
        };
        let rows = steering::run(&bin, &dir, &p)?;
        let generated = if a.steering_only {
            generated_line()
        } else {
            String::new()
        };
        steering_md = Some(steering::render(&p, &rows, &generated));
    }
    if a.steering_only {
        let md = steering_md.unwrap_or_default();
        println!("{md}");
        crate::report::write(&root().join("target/bench/proxy-steering.md"), &md)?;
        if a.publish {
            let docs = root().join("docs/bench/proxy.md");
            let old = std::fs::read_to_string(&docs).unwrap_or_default();
            crate::report::save(&docs, &steering::splice(&old, &md, NOTES_MARKER))?;
            eprintln!("xtask: wrote the steering section of {}", docs.display());
        }
        return Ok(());
    }

    // The in-process open-loop generator must not share the proxy's core; threads
    // created later (tokio, the pacer) inherit this mask.
    sh(Command::new("taskset")
        .args([
            "-a",
            "-p",
            "-c",
            &a.load_cpus,
            &std::process::id().to_string(),
        ])
        .stdout(Stdio::null()))?;
    let env = Env {
        dir: dir.clone(),
        upstream_pool: a.upstream_pool as usize,
        proxy_cpus: a.proxy_cpus.clone(),
        upstream_cpus: a.load_cpus.clone(),
    };
    let mut skipped: Vec<(String, String)> = Vec::new();
    let direct = targets::upstream(&env)?;
    let up = direct.port;
    let mut list: Vec<Target> = Vec::new();
    let mut try_start = |name: &str, key: &str, f: &dyn Fn() -> anyhow::Result<Target>| {
        if a.skips(key) {
            skipped.push((name.into(), "--skip".into()));
            return;
        }
        match f() {
            Ok(t) => list.push(t),
            Err(e) => {
                eprintln!("xtask: skipping {name}: {e:#}");
                skipped.push((
                    name.into(),
                    format!("{e:#}").lines().next().unwrap_or("").into(),
                ));
            }
        }
    };
    try_start(report::KV, "uring", &|| {
        targets::kvroute(&env, &bin, "uring", up)
    });
    try_start("kvroute (epoll)", "epoll", &|| {
        targets::kvroute(&env, &bin, "epoll", up)
    });
    try_start("kvroute cache hits (uring)", "cache", &|| {
        targets::kvroute_cache_hits(&env, &bin, up)
    });
    if let Some(alt) = &a.compare_bin {
        try_start("kvroute-alt (uring)", "alt", &|| {
            let mut t = targets::kvroute(&env, alt, "uring", up)?;
            t.name = "kvroute-alt (uring)".into();
            Ok(t)
        });
    }
    try_start("nginx", "nginx", &|| targets::nginx_proxy(&env, up));
    try_start("haproxy", "haproxy", &|| targets::haproxy(&env, up));
    try_start("sglang-router", "sglang", &|| {
        targets::sglang(&env, &a.python, up)
    });
    let mut all = vec![direct];
    all.extend(list);

    let script = dir.join("post.lua");
    closed::write_script(&script)?;
    let dur = Duration::from_secs(a.duration.into());

    let n = all.len();
    let progress_opts = progress::Options::from_env()?;
    // Measured phases of the whole run, for the `[k/N]` of the progress line.
    let phases = a.rounds
        * n
        * (usize::from(!a.skips("closed")) + a.rates.len() * usize::from(!a.skips("open")));
    let mut phase = 0;
    // Round r visits the targets in an order rotated by r, so a burst of foreign
    // load on this shared host lands on different targets in different rounds.
    let order = |r: usize| (0..n).map(move |i| (i + r) % n);

    let mut closed_runs: Vec<Vec<closed::WrkResult>> = (0..n).map(|_| Vec::new()).collect();
    // Per target and round: CPU seconds the target's processes used during the measurement.
    let mut cpu_runs: Vec<Vec<f64>> = (0..n).map(|_| Vec::new()).collect();
    let tck = targets::clock_ticks();
    if !a.skips("closed") {
        for r in 0..a.rounds {
            for i in order(r) {
                let t = &all[i];
                eprintln!(
                    "xtask: closed loop round {}/{}, {} (wrk -c{} {}s)",
                    r + 1,
                    a.rounds,
                    t.name,
                    a.concurrency,
                    a.duration
                );
                phase += 1;
                // wrk reports at its end, so the line shows the phase and its time only.
                let shown = Progress::start(
                    Job::new(format!("[{phase}/{phases}] closed loop, {}", t.name))
                        .schedule(Duration::from_secs((a.warmup + a.duration).into()))
                        .uncounted(),
                    Counters::new(),
                    progress_opts,
                );
                if a.warmup > 0 {
                    closed::run(
                        &a.load_cpus,
                        &script,
                        t.port,
                        a.concurrency,
                        Duration::from_secs(a.warmup.into()),
                    )?;
                }
                let pgid = t.proc.as_ref().map(|p| p.pid());
                let before = pgid.map(targets::group_cpu_ticks);
                let res = closed::run(&a.load_cpus, &script, t.port, a.concurrency, dur)
                    .with_context(|| format!("wrk against {}", t.name))?;
                // The result line below replaces the progress line.
                drop(shown);
                if let (Some(g), Some(b)) = (pgid, before) {
                    cpu_runs[i].push(targets::group_cpu_ticks(g).saturating_sub(b) as f64 / tck);
                }
                eprintln!("xtask:   {:.0} req/s, p99 {:.0} µs", res.rps, res.p99_us);
                closed_runs[i].push(res);
            }
        }
    }
    let closed_rows: Vec<ClosedRow> = all
        .iter()
        .zip(closed_runs.iter().zip(&cpu_runs))
        .filter(|(_, (runs, _))| !runs.is_empty())
        .map(|(t, (runs, cpu))| {
            let med = |f: fn(&closed::WrkResult) -> f64| median(runs.iter().map(f).collect());
            // CPU per request pairs each round's CPU time with that round's request count.
            let per_req: Vec<f64> = runs
                .iter()
                .zip(cpu)
                .map(|(w, c)| c * 1e6 / (w.rps * dur.as_secs_f64()).max(1.0))
                .collect();
            ClosedRow {
                cpu_us_per_req: (!per_req.is_empty()).then(|| median(per_req)),
                cpu_util: (!cpu.is_empty()).then(|| median(cpu.clone()) / dur.as_secs_f64()),
                name: t.name.clone(),
                rps: med(|w| w.rps),
                rps_min: runs.iter().map(|w| w.rps).fold(f64::MAX, f64::min),
                rps_max: runs.iter().map(|w| w.rps).fold(0.0, f64::max),
                p50_us: med(|w| w.p50_us),
                p99_us: med(|w| w.p99_us),
                p999_us: med(|w| w.p999_us),
                errors: runs.iter().map(|w| w.errors).sum(),
            }
        })
        .collect();

    let mut open_rows = Vec::new();
    if !a.skips("open") {
        let request = Arc::new(
            format!(
                "POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{}",
                closed::REQUEST_BODY.len(),
                closed::REQUEST_BODY
            )
            .into_bytes(),
        );
        for &rate in &a.rates {
            let mut merged: Vec<openloop::Outcome> =
                (0..n).map(|_| openloop::Outcome::default()).collect();
            let mut worst_rate = vec![f64::MAX; n];
            for r in 0..a.rounds {
                for i in order(r) {
                    let t = &all[i];
                    eprintln!(
                        "xtask: open loop round {}/{}, {} at {rate}/s for {}s",
                        r + 1,
                        a.rounds,
                        t.name,
                        a.duration
                    );
                    phase += 1;
                    let counters = Counters::new();
                    let p = openloop::Params {
                        addr: ([127, 0, 0, 1], t.port).into(),
                        rate,
                        duration: dur,
                        connections: a.open_connections,
                        request: request.clone(),
                        counters: counters.clone(),
                    };
                    let shown = Progress::start(
                        Job::new(format!(
                            "[{phase}/{phases}] open loop, {} at {rate}/s",
                            t.name
                        ))
                        .planned(rate * dur.as_secs())
                        .schedule(dur),
                        counters,
                        progress_opts,
                    );
                    let o = openloop::run(&p)
                        .with_context(|| format!("open loop against {}", t.name))?;
                    // The result line below replaces the progress line.
                    drop(shown);
                    eprintln!(
                        "xtask:   achieved {:.0}/s, p99 {:.0} µs",
                        o.achieved_rate,
                        openloop::pct(&o.latencies_ns, 99.0) as f64 / 1e3
                    );
                    worst_rate[i] = worst_rate[i].min(o.achieved_rate);
                    let m = &mut merged[i];
                    m.latencies_ns.extend(o.latencies_ns);
                    m.service_ns.extend(o.service_ns);
                    m.send_lag_ns.extend(o.send_lag_ns);
                    m.scheduled += o.scheduled;
                    m.errors += o.errors;
                }
            }
            for (i, o) in merged.iter_mut().enumerate() {
                o.latencies_ns.sort_unstable();
                o.service_ns.sort_unstable();
                o.send_lag_ns.sort_unstable();
                let us = |v: &[u64], q: f64| openloop::pct(v, q) as f64 / 1e3;
                open_rows.push(OpenRow {
                    name: all[i].name.clone(),
                    rate,
                    // The worst round: a row is only as good as its worst measurement.
                    achieved: worst_rate[i],
                    p50_us: us(&o.latencies_ns, 50.0),
                    p99_us: us(&o.latencies_ns, 99.0),
                    p999_us: us(&o.latencies_ns, 99.9),
                    svc_p50_us: us(&o.service_ns, 50.0),
                    svc_p99_us: us(&o.service_ns, 99.0),
                    lag_p99_us: us(&o.send_lag_ns, 99.0),
                    errors: o.errors,
                    scheduled: o.scheduled,
                    completed: o.latencies_ns.len() as u64,
                });
            }
        }
    }

    let mut perf_summary = None;
    if a.perf {
        match all.iter().find(|t| t.name == report::KV) {
            Some(t) => perf_summary = Some(profile(&a, &dir, &script, t)?),
            None => eprintln!("xtask: --perf: kvroute (uring) not running, nothing to profile"),
        }
    }

    let mut md = render(
        &a,
        &closed_rows,
        &open_rows,
        &skipped,
        perf_summary.as_deref(),
    );
    if let Some(sec) = &steering_md {
        md.push_str(sec);
        md.push('\n');
    }
    drop(all);
    println!("{md}");
    crate::report::write(&root().join("target/bench/proxy.md"), &md)?;
    if a.publish {
        let docs = root().join("docs/bench/proxy.md");
        // Hand-written analysis below the marker survives a re-publish.
        let notes = std::fs::read_to_string(&docs)
            .ok()
            .and_then(|old| old.find(NOTES_MARKER).map(|i| old[i..].to_string()));
        let published = match notes {
            Some(n) => format!("{md}\n{n}"),
            None => md.clone(),
        };
        crate::report::write(&docs, &published)?;
    }
    Ok(())
}

const NOTES_MARKER: &str = "<!-- notes: kept by --publish -->";

/// target/release/kvroute, built first unless `no_build`.
pub(crate) fn release_kvroute(no_build: bool) -> anyhow::Result<std::path::PathBuf> {
    if !no_build {
        sh(cargo().args(["build", "--release", "-p", "kvroute"]))?;
    }
    let bin = root().join("target/release/kvroute");
    anyhow::ensure!(
        bin.exists(),
        "{} missing (build it or drop --no-build)",
        bin.display()
    );
    Ok(bin)
}

/// target/bench/NAME, emptied: one run's configs, logs and reports.
pub(crate) fn fresh_bench_dir(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let dir = root().join("target/bench").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Gives this process (and the servers, wrk and threads it starts from here on,
/// which inherit it) nice value `nice`; 0 leaves priorities alone. Needs root
/// for a negative value, and says so instead of failing.
pub(crate) fn renice(nice: i32) {
    if nice == 0 {
        return;
    }
    if let Err(e) = sh(Command::new("renice")
        .args([
            "-n",
            &nice.to_string(),
            "-p",
            &std::process::id().to_string(),
        ])
        .stdout(Stdio::null()))
    {
        eprintln!("xtask: running at default priority: {e:#}");
    }
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Installs what is missing when root (Debian), else says what to install.
pub(crate) fn ensure_tools(perf: bool) -> anyhow::Result<()> {
    let mut need: Vec<(&str, &str)> = vec![
        ("nginx", "nginx"),
        ("haproxy", "haproxy"),
        ("wrk", "wrk"),
        ("taskset", "util-linux"),
    ];
    if perf {
        need.push(("perf", "linux-perf"));
    }
    let missing: Vec<&str> = need
        .iter()
        .filter(|(bin, _)| !on_path(bin))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if !is_root {
        bail!(
            "missing tools; install with: sudo apt-get install -y {}",
            missing.join(" ")
        );
    }
    sh(Command::new("apt-get").arg("update"))?;
    sh(Command::new("apt-get")
        .args(["install", "-y"])
        .args(&missing))
}

fn on_path(bin: &str) -> bool {
    let sbin = ["/usr/sbin", "/sbin", "/usr/local/sbin"];
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
        || sbin.iter().any(|d| Path::new(d).join(bin).is_file())
}

/// Records kvroute under closed-loop load; returns the report's top lines.
fn profile(a: &Args, dir: &Path, script: &Path, t: &Target) -> anyhow::Result<String> {
    let pid = t.proc.as_ref().expect("kvroute runs as a process").pid();
    let data = dir.join("perf-kvroute-uring.data");
    // cpu-clock: this host (a VM) exposes no hardware counters; DWARF unwinding
    // because the release build has no frame pointers but does have line tables.
    let mut rec = Command::new("perf")
        .args([
            "record",
            "-e",
            "cpu-clock",
            "-F",
            "1999",
            "--call-graph",
            "dwarf,16384",
            "-o",
        ])
        .arg(&data)
        .args([
            "-p",
            &pid.to_string(),
            "--",
            "sleep",
            &a.perf_seconds.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting perf record")?;
    let load = closed::run(
        &a.load_cpus,
        script,
        t.port,
        a.concurrency,
        Duration::from_secs(u64::from(a.perf_seconds) + 1),
    );
    let st = rec.wait()?;
    anyhow::ensure!(st.success(), "perf record failed with {st}");
    load?;
    let mut out = String::new();
    for (file, args) in [
        (
            "perf-self.txt",
            vec!["--no-children", "--sort", "dso,symbol"],
        ),
        ("perf-children.txt", vec!["--children", "--sort", "symbol"]),
    ] {
        let rep = Command::new("perf")
            .args([
                "report",
                "--stdio",
                "--percent-limit",
                "0.5",
                "-g",
                "none",
                "-i",
            ])
            .arg(&data)
            .args(&args)
            .output()
            .context("perf report")?;
        let text = String::from_utf8_lossy(&rep.stdout).to_string();
        std::fs::write(dir.join(file), &text)?;
        if file == "perf-self.txt" {
            let top: Vec<&str> = text
                .lines()
                .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
                // perf pads unused sort columns with "-"; they carry nothing here.
                .map(|l| l.trim_end_matches(['-', ' ']))
                .take(30)
                .collect();
            let _ = writeln!(out, "```\n{}\n```", top.join("\n"));
        }
    }
    let _ = writeln!(
        out,
        "Full reports (relative to the workspace): `{}` and `perf-children.txt` (call graphs: `perf report -i {}`).",
        rel(&dir.join("perf-self.txt")),
        rel(&data)
    );
    Ok(out)
}

fn rel(p: &Path) -> String {
    p.strip_prefix(root()).unwrap_or(p).display().to_string()
}

pub(crate) fn tool_version(argv: &[&str]) -> String {
    Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .map(|o| {
            let s = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            s.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_else(|_| "?".into())
}

/// "Generated by `cargo xtask …` on <date> (<kernel>, <n> CPUs)." and a blank line.
pub(crate) fn generated_line() -> String {
    let cmdline: Vec<String> = std::env::args().skip(1).collect();
    format!(
        "Generated by `cargo xtask {}` on {} (`{}`, {} CPUs, load average {}).\n\n",
        cmdline.join(" "),
        tool_version(&["date", "-u", "+%Y-%m-%d %H:%M UTC"]),
        tool_version(&["uname", "-sr"]),
        tool_version(&["nproc", "--all"]),
        std::fs::read_to_string("/proc/loadavg")
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|_| "?".into())
    )
}

fn render(
    a: &Args,
    closed: &[ClosedRow],
    open: &[OpenRow],
    skipped: &[(String, String)],
    perf: Option<&str>,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Proxy overhead benchmark\n");
    let _ = writeln!(s, "{}", generated_line());
    let _ = writeln!(
        s,
        "Setup: one upstream (nginx, 1 worker, `return 200` with a {}-byte JSON body) reached directly \
         and through each proxy, all on 127.0.0.1. Each proxy runs one worker/thread pinned to CPU {} \
         (`taskset`); wrk, the open-loop generator and the upstream share CPU {}; every benchmark process runs at \
         nice {}. Logging is off in every proxy (nginx `access_log off`, HAProxy no `log`, SGLang \
         `--log-level warn`, kvroute's default `info` logs nothing per request). Upstream keep-alive pools: \
         kvroute `upstream.pool_max_idle = {}`, nginx `keepalive {}`, HAProxy `http-reuse always` (unbounded), \
         SGLang's router its default client pool. Versions: {}; {}; {}; \
         sglang-router {}.\n",
        targets::UPSTREAM_BODY.len(),
        a.proxy_cpus,
        a.load_cpus,
        a.nice,
        a.upstream_pool,
        a.upstream_pool,
        tool_version(&["nginx", "-v"]),
        tool_version(&["haproxy", "-v"]),
        tool_version(&["wrk", "--version"]),
        tool_version(&[&a.python, "-c", "import importlib.metadata as m; print(m.version('sglang-router'))"]),
    );
    for (n, why) in skipped {
        let _ = writeln!(s, "- **{n} skipped**: {why}");
    }
    if !skipped.is_empty() {
        s.push('\n');
    }
    if !closed.is_empty() {
        let _ = writeln!(
            s,
            "## Peak throughput (closed loop)\n\n`wrk -t1 -c{} -d{}s` POSTing a {}-byte JSON body to `/v1/completions`, \
             after {} s of warm-up, {} rounds; figures are the median round (range: slowest–fastest round). \
             Latency is wrk's (closed loop: it hides queueing; see the open-loop table). \
             \"CPU µs/req\" is the CPU time (user + system, all processes and threads of the target) \
             per request during the measurement, and \"cores busy\" the same time over the wall time: on a \
             shared host these are steadier than req/s, and 10⁶ ÷ CPU µs/req is the req/s one fully \
             available core would sustain. For the direct row they describe the upstream.\n",
            a.concurrency,
            a.duration,
            closed::REQUEST_BODY.len(),
            a.warmup,
            a.rounds
        );
        s.push_str(&report::closed_table(closed));
        s.push('\n');
    }
    if !open.is_empty() {
        let _ = writeln!(
            s,
            "## Added latency (open loop)\n\nConstant arrival rate for {} s × {} rounds (samples pooled) over {} keep-alive connections; \
             latency runs from each request's *scheduled* send time to its last response byte, so stalls are \
             not hidden by coordinated omission. \"gen. send lag\" is how late the generator itself sent \
             (its own noise floor); \"from-send\" latency starts at the actual send instead, excluding that \
             lateness (a lower bound, not coordinated-omission safe). Rows whose achieved rate is more than {:.0}% below target are flagged.\n",
            a.duration,
            a.rounds,
            a.open_connections,
            report::RATE_TOLERANCE * 100.0
        );
        s.push_str(&report::open_table(open));
        s.push('\n');
    }
    let goals = report::goals(closed, open);
    if !goals.is_empty() {
        let _ = writeln!(s, "## Goals\n\n{goals}");
    }
    if let Some(p) = perf {
        let _ = writeln!(
            s,
            "## Profile: kvroute (io_uring) under wrk load, self time\n\n{p}"
        );
    }
    s
}
