//! `cargo xtask bench tls`: what terminating TLS costs. kvroute (one worker, io_uring
//! and epoll) and nginx (one worker process) present the same certificate in front
//! of the same upstream (the proxy bench's nginx `return 200`), side by side in one
//! run, in two phases:
//!
//! - **keep-alive**: wrk over `--concurrency` TLS connections, many requests each;
//! - **handshakes**: every request on a new connection (`Connection: close`); wrk
//!   never resumes a session, so each request is a full handshake.
//!
//! The plain-HTTP rows of both proxies run in the same rounds, so the CPU time TLS
//! adds per request (and per handshake) is a difference of two same-run figures.
//! CPU layout as in the proxy bench: the proxy alone on `--proxy-cpus`, wrk and the
//! upstream on `--load-cpus`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;

use crate::procs::root;
use crate::proxy::targets::{self, Env, Target, TlsFiles};
use crate::proxy::{
    closed, ensure_tools, fresh_bench_dir, generated_line, median, release_kvroute, renice,
    tool_version,
};

#[derive(clap::Args)]
pub struct Args {
    /// Seconds of measurement per target, phase and round.
    #[arg(long, default_value_t = 5)]
    duration: u32,
    /// Rounds over all targets (the report shows each figure's median round).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds of unmeasured load before each measurement.
    #[arg(long, default_value_t = 1)]
    warmup: u32,
    /// wrk connections in the keep-alive phase.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// wrk connections in the handshake phase (each request a new connection).
    #[arg(long, default_value_t = 16)]
    handshake_concurrency: usize,
    /// Targets or phases to leave out: epoll, nginx, plain, keepalive, handshake.
    #[arg(long, value_delimiter = ',')]
    skip: Vec<String>,
    /// CPUs (taskset list) for the proxy under test.
    #[arg(long, default_value = "0")]
    proxy_cpus: String,
    /// CPUs for wrk and the upstream.
    #[arg(long, default_value = "1")]
    load_cpus: String,
    /// Use the existing target/release/kvroute instead of building it.
    #[arg(long)]
    no_build: bool,
    /// Nice value for every benchmark process (needs root; 0 leaves priorities alone).
    #[arg(long, default_value_t = -20, allow_hyphen_values = true)]
    nice: i32,
    /// The certificate's key: `ec` (ECDSA P-256) or `rsa` (RSA 2048, whose signature
    /// makes each handshake several times costlier for the server).
    #[arg(long, default_value = "ec", value_parser = ["ec", "rsa"])]
    key_type: String,
    /// Copy the report to docs/bench/tls.md.
    #[arg(long)]
    publish: bool,
}

impl Args {
    fn skips(&self, what: &str) -> bool {
        self.skip.iter().any(|s| s.eq_ignore_ascii_case(what))
    }
}

/// One measured phase.
#[derive(Clone, Copy, PartialEq)]
enum Phase {
    KeepAlive,
    Handshake,
}

impl Phase {
    fn label(self) -> &'static str {
        match self {
            Phase::KeepAlive => "keep-alive",
            Phase::Handshake => "new connection per request",
        }
    }
}

struct Row {
    target: String,
    tls: bool,
    phase: Phase,
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_us_per_req: f64,
    errors: u64,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    ensure_tools(false)?;
    targets::cleanup_on_signal()?;
    let bin = release_kvroute(a.no_build)?;
    let dir = fresh_bench_dir("tls")?;
    let tls = make_certificate(&dir, &a.key_type)?;
    renice(a.nice);
    let env = Env {
        dir: dir.clone(),
        upstream_pool: a.concurrency.max(a.handshake_concurrency),
        proxy_cpus: a.proxy_cpus.clone(),
        upstream_cpus: a.load_cpus.clone(),
    };
    let upstream = targets::upstream(&env)?;
    let up = upstream.port;
    // (target, speaks TLS)
    let mut list: Vec<(Target, bool)> =
        vec![(targets::kvroute_tls(&env, &bin, "uring", up, &tls)?, true)];
    if !a.skips("epoll") {
        list.push((targets::kvroute_tls(&env, &bin, "epoll", up, &tls)?, true));
    }
    if !a.skips("nginx") {
        list.push((targets::nginx_tls_proxy(&env, up, &tls)?, true));
    }
    if !a.skips("plain") {
        list.push((targets::kvroute(&env, &bin, "uring", up)?, false));
        if !a.skips("epoll") {
            list.push((targets::kvroute(&env, &bin, "epoll", up)?, false));
        }
        if !a.skips("nginx") {
            list.push((targets::nginx_proxy(&env, up)?, false));
        }
    }
    let keepalive_script = dir.join("keepalive.lua");
    closed::write_script(&keepalive_script)?;
    let close_script = dir.join("close.lua");
    closed::write_script_with(&close_script, r#"wrk.headers["Connection"] = "close""#)?;

    let mut phases = Vec::new();
    if !a.skips("keepalive") {
        phases.push((Phase::KeepAlive, &keepalive_script, a.concurrency));
    }
    if !a.skips("handshake") {
        phases.push((Phase::Handshake, &close_script, a.handshake_concurrency));
    }
    let dur = Duration::from_secs(a.duration.into());
    let tck = targets::clock_ticks();
    let n = list.len();
    let mut rows = Vec::new();
    for &(phase, script, conns) in &phases {
        // Per target: each round's (result, CPU seconds).
        let mut runs: Vec<Vec<(closed::WrkResult, f64)>> = (0..n).map(|_| Vec::new()).collect();
        for r in 0..a.rounds {
            // Rotated order per round, so a burst of foreign load lands on different targets.
            for i in (0..n).map(|i| (i + r) % n) {
                let (t, is_tls) = &list[i];
                let url = format!(
                    "{}://127.0.0.1:{}/",
                    if *is_tls { "https" } else { "http" },
                    t.port
                );
                eprintln!(
                    "xtask: {} round {}/{}, {} (wrk -c{conns} {}s)",
                    phase.label(),
                    r + 1,
                    a.rounds,
                    t.name,
                    a.duration
                );
                if a.warmup > 0 {
                    closed::run_url(
                        &a.load_cpus,
                        script,
                        &url,
                        conns,
                        Duration::from_secs(a.warmup.into()),
                    )?;
                }
                let pgid = t
                    .proc
                    .as_ref()
                    .map(|p| p.pid())
                    .context("target has a process")?;
                let before = targets::group_cpu_ticks(pgid);
                let res = closed::run_url(&a.load_cpus, script, &url, conns, dur)
                    .with_context(|| format!("wrk against {}", t.name))?;
                let cpu = targets::group_cpu_ticks(pgid).saturating_sub(before) as f64 / tck;
                eprintln!(
                    "xtask:   {:.0} req/s, p99 {:.0} µs, {:.1} µs CPU per request",
                    res.rps,
                    res.p99_us,
                    cpu * 1e6 / (res.rps * dur.as_secs_f64()).max(1.0)
                );
                runs[i].push((res, cpu));
            }
        }
        for (i, runs) in runs.iter().enumerate() {
            let med =
                |f: &dyn Fn(&(closed::WrkResult, f64)) -> f64| median(runs.iter().map(f).collect());
            rows.push(Row {
                target: list[i].0.name.clone(),
                tls: list[i].1,
                phase,
                rps: med(&|(w, _)| w.rps),
                p50_us: med(&|(w, _)| w.p50_us),
                p99_us: med(&|(w, _)| w.p99_us),
                cpu_us_per_req: med(&|(w, c)| c * 1e6 / (w.rps * dur.as_secs_f64()).max(1.0)),
                errors: runs.iter().map(|(w, _)| w.errors).sum(),
            });
        }
    }
    drop(list);
    drop(upstream);
    let md = render(&a, &rows);
    println!("{md}");
    crate::report::write(&root().join("target/bench/tls.md"), &md)?;
    if a.publish {
        let docs = root().join(if a.key_type == "rsa" {
            "docs/bench/tls-rsa.md"
        } else {
            "docs/bench/tls.md"
        });
        crate::report::write(&docs, &md)?;
    }
    Ok(())
}

/// A test CA and a server certificate for 127.0.0.1 it signs, with an ECDSA
/// P-256 key (`ec`) or an RSA 2048 one (`rsa`), made with the openssl
/// command-line tool.
fn make_certificate(dir: &Path, key_type: &str) -> anyhow::Result<TlsFiles> {
    let p = |name: &str| -> PathBuf { dir.join(name) };
    let ossl = |args: &[&str]| -> anyhow::Result<()> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .context("running openssl (apt-get install openssl)")?;
        anyhow::ensure!(
            out.status.success(),
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    let new_key: &[&str] = if key_type == "rsa" {
        &["-newkey", "rsa:2048", "-nodes"]
    } else {
        &[
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ]
    };
    ossl(
        &[
            &["req", "-x509"],
            new_key,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=kvroute bench CA",
            ],
        ]
        .concat(),
    )?;
    ossl(
        &[
            &["req"],
            new_key,
            &[
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
        ]
        .concat(),
    )?;
    std::fs::write(
        p("ext.cnf"),
        "subjectAltName = IP:127.0.0.1, DNS:localhost\n",
    )?;
    ossl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ])?;
    Ok(TlsFiles {
        cert: p("server.pem"),
        key: p("server.key"),
        ca: p("ca.pem"),
    })
}

fn render(a: &Args, rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# TLS termination: kvroute and nginx, one worker each\n");
    s.push_str(&generated_line());
    let _ = writeln!(
        s,
        "Same {} certificate, same upstream (nginx `return 200`), TLS 1.3 as wrk \
         ({}) negotiates it, {} rounds of {} s per target and phase (medians). The proxy runs \
         alone on CPU {}, wrk and the upstream on CPU {}. CPU µs per request is the proxy's \
         user + system time over the requests it served. {}.\n",
        if a.key_type == "rsa" {
            "RSA 2048"
        } else {
            "ECDSA P-256"
        },
        tool_version(&["wrk", "-v"]),
        a.rounds,
        a.duration,
        a.proxy_cpus,
        a.load_cpus,
        tool_version(&["nginx", "-v"]),
    );
    for phase in [Phase::KeepAlive, Phase::Handshake] {
        let these: Vec<&Row> = rows.iter().filter(|r| r.phase == phase).collect();
        if these.is_empty() {
            continue;
        }
        let conns = if phase == Phase::KeepAlive {
            a.concurrency
        } else {
            a.handshake_concurrency
        };
        let _ = writeln!(s, "## {} ({conns} connections)\n", phase.label());
        let nginx_tls = these
            .iter()
            .find(|r| r.target == "nginx TLS")
            .map(|r| r.rps);
        let _ = writeln!(
            s,
            "| target | req/s | ÷ nginx TLS | p50 µs | p99 µs | CPU µs/req | TLS adds µs/req | errors |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|");
        for r in &these {
            // The plain row of the same proxy in the same phase.
            let plain = these.iter().find(|p| {
                !p.tls
                    && r.tls
                    && proxy_of(&p.target) == proxy_of(&r.target)
                    && io_of(&p.target) == io_of(&r.target)
            });
            let ratio = nginx_tls
                .filter(|_| r.tls)
                .map(|b| format!("{:.2}", r.rps / b))
                .unwrap_or_else(|| "–".into());
            let adds = plain
                .map(|p| format!("{:.1}", r.cpu_us_per_req - p.cpu_us_per_req))
                .unwrap_or_else(|| "–".into());
            let _ = writeln!(
                s,
                "| {} | {:.0} | {ratio} | {:.0} | {:.0} | {:.1} | {adds} | {} |",
                r.target, r.rps, r.p50_us, r.p99_us, r.cpu_us_per_req, r.errors
            );
        }
        s.push('\n');
    }
    let _ = writeln!(
        s,
        "The plain rows are the same proxies without TLS, for the \"TLS adds\" column \
         (TLS row's CPU per request minus the plain row's, same phase, same run)."
    );
    s
}

fn proxy_of(name: &str) -> &str {
    name.split_whitespace().next().unwrap_or(name)
}

/// `uring`/`epoll` for kvroute rows, empty for nginx.
fn io_of(name: &str) -> &str {
    name.rsplit_once('(')
        .map(|(_, r)| r.trim_end_matches(')'))
        .unwrap_or("")
}
