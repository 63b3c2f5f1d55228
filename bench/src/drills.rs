//! `cargo xtask bench drills`: a bad day, rehearsed. Against a steady load
//! with streams open, through a release kvroute (2 workers) in front of
//! kvroute-sim replicas managed by kvroute-control, one drill after another:
//! a replica SIGKILLed, the control daemon SIGKILLed, a rolling upgrade of
//! kvroute (SIGUSR2 hand-off), a flood of idle connections, and a replica that
//! passes its health checks but answers garbage. Each drill has a warm-up, an
//! observation window (the action 2 s into it), and a recovery; the report
//! gives per drill the requests sent, failed ones by kind, broken streams,
//! p99 latency of the short requests, and kvroute's peak RSS and RSS after.

mod garbage;
mod load;
mod tally;

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use kvroute_testkit::port::free_port;
use kvroute_tests::harness::request;

use crate::fleet::child::{install_signal_handler, Child};
use crate::fleet::{bench_dir, http_ok, start_sim_on, Bins, Sim, SimSpec};
use crate::footprint::{field_kb, tree};
use crate::procs::{build_release_daemons, root, target_dir};

#[derive(clap::Args)]
pub struct Args {
    /// Use the release binaries already built.
    #[arg(long)]
    pub no_build: bool,
    /// Seconds each drill is observed (its action comes 2 s in).
    #[arg(long, default_value_t = 20)]
    pub duration: u64,
    /// Seconds of load before each drill's window, not counted.
    #[arg(long, default_value_t = 5)]
    pub warmup: u64,
    /// Paced requests per second (3 in 10 stream, the rest are short).
    #[arg(long, default_value_t = 30.0)]
    pub rate: f64,
    /// Long streams (about 6 s each) kept open back to back.
    #[arg(long, default_value_t = 6)]
    pub long_streams: usize,
    /// kvroute-sim replicas.
    #[arg(long, default_value_t = 3)]
    pub replicas: usize,
    /// Idle connections the flood opens and holds.
    #[arg(long, default_value_t = 3000)]
    pub flood: usize,
    /// Only these drills (replica-kill, control-kill, upgrade, flood, garbage).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Where the Markdown report goes.
    #[arg(long, default_value = "docs/bench/drills.md")]
    pub out: PathBuf,
}

/// The drills, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Drill {
    ReplicaKill,
    ControlKill,
    Upgrade,
    Flood,
    Garbage,
}

const ALL: [Drill; 5] = [
    Drill::ReplicaKill,
    Drill::ControlKill,
    Drill::Upgrade,
    Drill::Flood,
    Drill::Garbage,
];

impl Drill {
    fn name(self) -> &'static str {
        match self {
            Drill::ReplicaKill => "replica-kill",
            Drill::ControlKill => "control-kill",
            Drill::Upgrade => "upgrade",
            Drill::Flood => "flood",
            Drill::Garbage => "garbage",
        }
    }
    fn what(self, a: &Args) -> String {
        match self {
            Drill::ReplicaKill => "replica r0 SIGKILLed, started again after the window".into(),
            Drill::ControlKill => {
                "kvroute-control SIGKILLed, started again after the window".into()
            }
            Drill::Upgrade => "SIGUSR2: kvroute hands its listeners to a new process".into(),
            Drill::Flood => format!("{} idle connections opened and held", a.flood),
            Drill::Garbage => {
                "a replica passes health checks, answers non-HTTP bytes or cut-off bodies".into()
            }
        }
    }
}

/// The action comes this far into the window: load before it shows the normal state.
const ACTION_AT: Duration = Duration::from_secs(2);
/// From the window's end (drill undone) to the "RSS after" sample.
const SETTLE: Duration = Duration::from_secs(3);
const MODEL: &str = "sim-model";

/// kvroute's memory, sampled every 200 ms: the sum over the processes in
/// `pids` (two during an upgrade) and their children.
struct RssSampler {
    pids: Arc<Mutex<Vec<u32>>>,
    peak_kb: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let s = RssSampler {
            pids: Arc::new(Mutex::new(vec![pid])),
            peak_kb: Arc::new(AtomicU64::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let (pids, peak, stop) = (s.pids.clone(), s.peak_kb.clone(), s.stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let now = rss_kb(&pids.lock().unwrap_or_else(|e| e.into_inner()));
                peak.fetch_max(now, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        s
    }
    fn set_pids(&self, pids: Vec<u32>) {
        *self.pids.lock().unwrap_or_else(|e| e.into_inner()) = pids;
    }
    fn now_kb(&self) -> u64 {
        rss_kb(&self.pids.lock().unwrap_or_else(|e| e.into_inner()))
    }
    /// The peak since the last call, and a fresh start from the current value.
    fn take_peak(&self) -> u64 {
        let now = self.now_kb();
        self.peak_kb.swap(now, Ordering::Relaxed).max(now)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn rss_kb(pids: &[u32]) -> u64 {
    let mut all: Vec<u32> = pids.iter().flat_map(|p| tree(*p)).collect();
    all.sort_unstable();
    all.dedup();
    all.iter()
        .map(|p| field_kb(&format!("/proc/{p}/status"), "VmRSS:"))
        .sum()
}

/// A kvroute started by an upgrade is not our child: it is stopped by pid.
struct Successor(u32);

impl Drop for Successor {
    fn drop(&mut self) {
        if self.0 == 0 {
            return;
        }
        let pid = self.0.to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        for _ in 0..50 {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("kill").args(["-KILL", &pid]).status();
    }
}

struct Rig {
    bins: Bins,
    control_bin: PathBuf,
    dir: PathBuf,
    spec: SimSpec,
    sims: Vec<Sim>,
    garbage: garbage::Garbage,
    control: Option<Child>,
    control_config: PathBuf,
    kvroute: Option<Child>,
    successor: Successor,
    listen: SocketAddr,
    admin: SocketAddr,
}

impl Rig {
    fn start(a: &Args, bins: Bins, control_bin: PathBuf, dir: PathBuf) -> anyhow::Result<Rig> {
        let spec = SimSpec {
            replicas: a.replicas,
            kv_blocks: 8192,
            block_tokens: 16,
            time_scale: 1.0,
            prefill_tps: 8000.0,
            prefill_overhead_ms: crate::fleet::SIM_PREFILL_OVERHEAD_MS,
            decode_tps: 50.0,
            max_seqs: 256,
            prefill_speeds: Vec::new(),
        };
        let mut sims = Vec::new();
        for i in 0..a.replicas {
            let name = format!("r{i}");
            let log = dir.join(format!("{name}.log"));
            sims.push(start_sim_on(&bins, &spec, &name, &log, None)?);
        }
        let garbage = garbage::Garbage::start()?;
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let mut toml = format!(
            "listen = \"{listen}\"\nadmin = \"{admin}\"\nworkers = 2\npin_workers = false\n\
             # Long enough for the longest stream to finish on the old process.\n\
             shutdown_grace_ms = 20000\n"
        );
        for s in &sims {
            toml.push_str(&format!(
                "\n[[replicas]]\nurl = \"{}\"\nmodels = [\"{MODEL}\"]\n",
                s.url()
            ));
        }
        let kv_config = dir.join("kvroute.toml");
        std::fs::write(&kv_config, toml)?;
        let mut kvroute = Child::spawn(
            "kvroute",
            &bins.kvroute,
            &["--config".to_owned(), kv_config.display().to_string()],
            &dir.join("kvroute.log"),
        )?;
        kvroute.wait_ready(
            "GET /healthz on the admin API",
            Duration::from_secs(15),
            || http_ok(admin, "/healthz"),
        )?;
        let control_listen = free_port();
        let mut ctoml = format!(
            "dataplanes = [\"{admin}\"]\nlisten = \"127.0.0.1:{control_listen}\"\nname = \"drills\"\n\
             [health]\ninterval_ms = 250\ntimeout_ms = 500\nrise = 2\nfall = 2\n\
             [scrape]\ninterval_ms = 500\ntimeout_ms = 500\n[push]\nresync_ms = 500\n"
        );
        for url in sims.iter().map(Sim::url).chain([garbage.url()]) {
            ctoml.push_str(&format!(
                "\n[[replicas]]\nurl = \"{url}\"\nmodels = [\"{MODEL}\"]\n"
            ));
        }
        let control_config = dir.join("control.toml");
        std::fs::write(&control_config, ctoml)?;
        let mut rig = Rig {
            bins,
            control_bin,
            dir,
            spec,
            sims,
            garbage,
            control: None,
            control_config,
            kvroute: Some(kvroute),
            successor: Successor(0),
            listen,
            admin,
        };
        rig.start_control()?;
        Ok(rig)
    }

    fn start_control(&mut self) -> anyhow::Result<()> {
        let listen: SocketAddr = std::fs::read_to_string(&self.control_config)?
            .lines()
            .find_map(|l| {
                l.strip_prefix("listen = \"")?
                    .strip_suffix('"')?
                    .parse()
                    .ok()
            })
            .context("control listen address")?;
        let mut c = Child::spawn(
            "kvroute-control",
            &self.control_bin,
            &[
                "--config".to_owned(),
                self.control_config.display().to_string(),
            ],
            &self.dir.join("control.log"),
        )?;
        c.wait_ready("GET /healthz", Duration::from_secs(15), || {
            http_ok(listen, "/healthz")
        })?;
        self.control = Some(c);
        Ok(())
    }

    fn state(&self) -> Option<serde_json::Value> {
        let r = request(
            self.admin,
            "GET /state HTTP/1.1\r\nHost: drills\r\nConnection: close\r\n\r\n",
        )
        .ok()?;
        serde_json::from_slice(&r.body).ok()
    }

    fn kvroute_pid(&self) -> Option<u32> {
        Some(self.state()?["steering"]["pid"].as_u64()? as u32)
    }

    /// Replicas kvroute routes to right now (healthy, not ejected).
    fn routable(&self) -> usize {
        self.state()
            .and_then(|s| {
                Some(
                    s["replicas"]
                        .as_array()?
                        .iter()
                        .filter(|r| r["healthy"] == true && r["ejection"]["ejected"] != true)
                        .count(),
                )
            })
            .unwrap_or(0)
    }

    fn wait_routable(&self, n: usize, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if self.routable() >= n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }
}

/// One drill's figures.
struct Row {
    drill: Drill,
    tally: tally::Tally,
    peak_kb: u64,
    after_kb: u64,
    note: String,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    install_signal_handler();
    if !a.no_build {
        build_release_daemons()?;
    }
    let bins = Bins::prepare(a.no_build)?;
    let control_bin = target_dir().join("release/kvroute-control");
    anyhow::ensure!(
        control_bin.exists(),
        "{} not found (drop --no-build)",
        control_bin.display()
    );
    let drills: Vec<Drill> = ALL
        .into_iter()
        .filter(|d| a.only.is_empty() || a.only.iter().any(|o| o == d.name()))
        .collect();
    anyhow::ensure!(!drills.is_empty(), "--only matches no drill");
    let dir = bench_dir().join("drills");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut rig = Rig::start(&a, bins, control_bin, dir.clone())?;
    anyhow::ensure!(
        rig.wait_routable(a.replicas, Duration::from_secs(15)),
        "kvroute never saw its {} replicas as healthy",
        a.replicas
    );
    let pid = rig.kvroute_pid().context("kvroute pid from /state")?;
    let rss = RssSampler::start(pid);
    let idle_kb = rss.now_kb();
    let load = load::Load::start(&load::Spec {
        addr: rig.listen,
        model: MODEL.into(),
        rate: a.rate,
        streams_in_10: 3,
        long_streams: a.long_streams,
        drills: drills.len(),
    });
    let mut rows = Vec::new();
    for (i, d) in drills.iter().enumerate() {
        eprintln!("xtask: drill {}: warm-up {} s", d.name(), a.warmup);
        std::thread::sleep(Duration::from_secs(a.warmup));
        rss.take_peak();
        load.set_drill(i);
        let t0 = Instant::now();
        std::thread::sleep(ACTION_AT);
        eprintln!("xtask: drill {}: {}", d.name(), d.what(&a));
        let note = drill(&mut rig, *d, &a, t0, &rss)?;
        load.set_drill(load::NO_DRILL);
        let peak_kb = rss.take_peak();
        std::thread::sleep(SETTLE);
        let after_kb = rss.now_kb();
        rows.push(Row {
            drill: *d,
            tally: tally::Tally::default(),
            peak_kb,
            after_kb,
            note,
        });
    }
    eprintln!("xtask: drills done; waiting for the requests under way");
    let tallies = load.finish();
    for (row, t) in rows.iter_mut().zip(tallies) {
        row.tally = t;
    }
    drop(rss);
    let table = render_table(&mut rows);
    println!(
        "\nkvroute idle before the load: {}\n\n{table}",
        mib(idle_kb)
    );
    let report = render(&a, &rows, idle_kb, &table);
    let out = if a.out.is_relative() {
        root().join(&a.out)
    } else {
        a.out.clone()
    };
    crate::report::save(&out, &report)?;
    eprintln!("xtask: wrote {}; logs in {}", out.display(), dir.display());
    // kvroute first, so it never serves a request with its replicas gone.
    drop(rig.kvroute.take());
    drop(std::mem::replace(&mut rig.successor, Successor(0)));
    Ok(())
}

/// Runs drill `d`, whose window began at `t0` and is now `ACTION_AT` in,
/// until the window ends; undoes it; returns a note for the report.
fn drill(
    rig: &mut Rig,
    d: Drill,
    a: &Args,
    t0: Instant,
    rss: &RssSampler,
) -> anyhow::Result<String> {
    let window_end = t0 + Duration::from_secs(a.duration.max(ACTION_AT.as_secs() + 1));
    let rest = || {
        if let Some(w) = window_end.checked_duration_since(Instant::now()) {
            std::thread::sleep(w);
        }
    };
    match d {
        Drill::ReplicaKill => {
            let victim = rig.sims.remove(0);
            let addr = victim.addr;
            let name = victim.name.clone();
            let pid = victim.child.id().to_string();
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
            drop(victim);
            rest();
            let log = rig.dir.join(format!("{name}-again.log"));
            let again = start_sim_on(&rig.bins, &rig.spec, &name, &log, Some(addr))?;
            rig.sims.insert(0, again);
            let back = rig.wait_routable(rig.sims.len(), Duration::from_secs(20));
            Ok(if back {
                "started again on its port; back in rotation".into()
            } else {
                "started again, not back in rotation within 20 s".into()
            })
        }
        Drill::ControlKill => {
            let c = rig.control.take().context("control running")?;
            let pid = c.id().to_string();
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
            drop(c);
            rest();
            let kept = rig.routable();
            rig.start_control()?;
            Ok(format!(
                "{kept} replicas still routed with the daemon gone; daemon started again"
            ))
        }
        Drill::Upgrade => {
            let old = rig.kvroute_pid().context("kvroute pid")?;
            let _ = Command::new("kill")
                .args(["-USR2", &old.to_string()])
                .status();
            // The successor is the old process's child until the old one exits.
            let mut new = 0;
            let end = Instant::now() + Duration::from_secs(20);
            while Instant::now() < end {
                if let Some(s) = rig.state() {
                    let succ = s["steering"]["successor_pid"].as_u64().unwrap_or(0) as u32;
                    let pid = s["steering"]["pid"].as_u64().unwrap_or(0) as u32;
                    if pid != old && pid != 0 {
                        new = pid;
                        break;
                    }
                    if succ != 0 {
                        new = succ;
                        rss.set_pids(vec![old, succ]);
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let note = if new == 0 {
                "no successor within 20 s: hand-off failed".to_owned()
            } else {
                rig.successor = Successor(new);
                // The old process drains its streams, then exits.
                let drained = rig
                    .kvroute
                    .as_mut()
                    .map(|c| c.wait_exit(Duration::from_secs(25)));
                rss.set_pids(vec![new]);
                match drained {
                    Some(Ok(st)) => format!("old process drained and exited ({st})"),
                    Some(Err(e)) => format!("old process did not exit: {e:#}"),
                    None => "old process already gone".into(),
                }
            };
            rest();
            Ok(note)
        }
        Drill::Flood => {
            let mut held = Vec::with_capacity(a.flood);
            let mut refused = 0usize;
            for _ in 0..a.flood {
                match TcpStream::connect_timeout(&rig.listen, Duration::from_millis(500)) {
                    Ok(s) => held.push(s),
                    Err(_) => refused += 1,
                }
            }
            let opened = held.len();
            let during = rss.now_kb();
            rest();
            drop(held);
            Ok(format!(
                "{opened} held ({refused} not opened); RSS with them open {}",
                mib(during)
            ))
        }
        Drill::Garbage => {
            rig.garbage.switch(true);
            rest();
            rig.garbage.switch(false);
            let ej = rig
                .state()
                .and_then(|s| {
                    s["replicas"]
                        .as_array()?
                        .iter()
                        .find(|r| r["url"] == rig.garbage.url())
                        .map(|r| r["ejection"]["ejections_total"].as_u64().unwrap_or(0))
                })
                .unwrap_or(0);
            Ok(format!(
                "{} requests reached it; ejected {ej} time(s)",
                rig.garbage.answered()
            ))
        }
    }
}

fn mib(kb: u64) -> String {
    format!("{:.1} MiB", kb as f64 / 1024.0)
}

fn render_table(rows: &mut [Row]) -> String {
    let mut t = String::from(
        "| drill | sent | failed | failed by kind | broken streams | p99 short (ms) | peak RSS | RSS after |\n\
         |---|---:|---:|---|---:|---:|---:|---:|\n",
    );
    for r in rows.iter_mut() {
        let p99 = r
            .tally
            .p99_ms()
            .map_or("-".to_owned(), |p| format!("{p:.0}"));
        t.push_str(&format!(
            "| {} | {} | {} | {} | {} of {} | {} | {} | {} |\n",
            r.drill.name(),
            r.tally.sent,
            r.tally.failed_total(),
            r.tally.failed_kinds(),
            r.tally.broken_streams,
            r.tally.streams,
            p99,
            mib(r.peak_kb),
            mib(r.after_kb),
        ));
    }
    t
}

fn render(a: &Args, rows: &[Row], idle_kb: u64, table: &str) -> String {
    let mut notes = String::new();
    for r in rows {
        notes.push_str(&format!(
            "- **{}**: {}; {}.\n",
            r.drill.name(),
            r.drill.what(a),
            r.note
        ));
    }
    let generated = crate::report::generated();
    format!(
        "# Drills: failures under load\n\n\
         Generated by `cargo xtask bench drills --duration {} --warmup {} --rate {} --long-streams {} \
         --replicas {} --flood {}` ({generated}).\n\n\
         A release kvroute (2 workers, default config but `shutdown_grace_ms = 20000`) in front of \
         {} kvroute-sim replicas (decode 50 tokens/s per sequence, time scale 1), managed by \
         kvroute-control (health every 250 ms, rise and fall 2), plus one more replica the control \
         daemon knows that fails its health check until the garbage drill. The load: {} requests/s \
         on new connections, 3 in 10 streamed (40 tokens, about 0.8 s), the rest short (8 tokens), \
         plus {} long streams (300 tokens, about 6 s) kept open back to back. Each drill: {} s of \
         warm-up, then a {} s window with the action 2 s in, then recovery. A request counts for \
         the drill whose window it started in.\n\n\
         - **failed**: a non-2xx answer or a transport error (by kind: `http N`, `connect refused`, \
         `reset`, `eof` before a head, `cut body` for a short answer cut off).\n\
         - **broken streams**: a streamed answer that started (2xx) but ended without its final \
         `data: [DONE]`.\n\
         - **p99 short**: latency of the short requests that succeeded, from their scheduled send \
         (open loop).\n\
         - **RSS**: kvroute's (both processes during the upgrade), sampled every 200 ms; \
         \"after\" is {} s after the drill was undone. Idle before the load: {}.\n\n\
         {table}\n\
         {notes}",
        a.duration,
        a.warmup,
        a.rate,
        a.long_streams,
        a.replicas,
        a.flood,
        a.replicas,
        a.rate,
        a.long_streams,
        a.warmup,
        a.duration,
        SETTLE.as_secs(),
        mib(idle_kb),
    )
}
