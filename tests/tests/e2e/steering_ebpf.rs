//! eBPF connection steering against the real binary: the program loads and
//! attaches, spreads long-lived streams evenly (p2c vs the kernel's hash), and
//! the data plane falls back to kernel steering, and says so, without privileges.
//!
//! Loading BPF needs root (CAP_BPF + CAP_NET_ADMIN) and bpffs. Where that is
//! missing the BPF tests skip and print why, unless `KVROUTE_REQUIRE_BPF=1`
//! (set by CI), which turns a skip into a failure.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use kvroute_tests::harness::{
    bpf_attached, free_port, skip_without_bpf, wait_until, workspace_bin, Client, Kvroute, Proc,
    Upstream,
};
use serde_json::Value;

const STREAMS: usize = 200;
const BURST: usize = 50;

fn steering(k: &Kvroute) -> Value {
    k.admin_get("/state").json()["steering"].clone()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Starts kvroute with `extra` and, for BPF runs, checks the program attached;
/// `None` (skip, reason printed) when it could not and BPF is not required.
fn start_bpf(extra: &[&str]) -> Option<Kvroute> {
    let k = Kvroute::start(extra);
    bpf_attached(&steering(&k)).then_some(k)
}

/// SIGTERM, so kvroute removes its pins (SIGKILL on drop would leave them).
fn stop(mut k: Kvroute) {
    k.proc.signal("TERM");
    assert!(
        k.proc.wait_exit(Duration::from_secs(10)).is_some(),
        "kvroute did not exit"
    );
}

#[test]
fn program_loads_attaches_and_pins_its_maps() {
    let Some(k) = start_bpf(&["--workers", "2", "--steering", "ebpf-required"]) else {
        return;
    };
    let st = steering(&k);
    assert_eq!(st["mode"], "p2c", "{st}");
    assert_eq!(st["requested"], "ebpf-required");
    assert!(st["fallback_reason"].is_null(), "{st}");
    let pin_dir = st["pin_dir"].as_str().expect("pin_dir").to_string();
    assert!(pin_dir.starts_with("/sys/fs/bpf/kvroute/"), "{pin_dir}");
    for m in [
        "kvr_sockets",
        "kvr_live",
        "kvr_steered",
        "kvr_config",
        "kvr_owner",
    ] {
        assert!(
            Path::new(&pin_dir).join(m).exists(),
            "{m} not pinned in {pin_dir}"
        );
    }
    // A connection is steered by the program and counted on its worker.
    let c = Client::connect(k.addr).unwrap();
    assert!(wait_until(Duration::from_secs(5), || {
        let st = steering(&k);
        let w = st["workers"].as_array().unwrap();
        w.iter()
            .map(|w| w["live_streams"].as_u64().unwrap())
            .sum::<u64>()
            == 1
            && w.iter()
                .map(|w| w["steered"].as_u64().unwrap())
                .sum::<u64>()
                == 1
    }));
    drop(c);
    let metrics = k.admin_get("/metrics").text();
    assert!(
        metrics.contains("kvroute_worker_accepted_total"),
        "{metrics}"
    );
    stop(k);
    assert!(
        !Path::new(&pin_dir).exists(),
        "pins left behind after a clean exit"
    );
}

/// Opens `STREAMS` SSE streams in bursts of `BURST` concurrent connects, waits
/// until every stream has its first event, and returns live streams per worker.
fn spread(k: &Kvroute, up: &Upstream) -> (Vec<u64>, Vec<Client>) {
    let mut clients = Vec::with_capacity(STREAMS);
    for _ in 0..STREAMS / BURST {
        let handles: Vec<_> = (0..BURST)
            .map(|_| {
                let addr = k.addr;
                std::thread::spawn(move || {
                    let mut c = Client::connect(addr).expect("connect");
                    c.send(b"POST /sse?n=3 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
                        .expect("send");
                    let (status, _) = c.read_head().expect("head");
                    assert_eq!(status, 200);
                    c.read_chunk().expect("first event").expect("first event");
                    c
                })
            })
            .collect();
        clients.extend(handles.into_iter().map(|h| h.join().expect("stream")));
        std::thread::sleep(Duration::from_millis(100));
    }
    let live = |k: &Kvroute| -> Vec<u64> {
        steering(k)["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["live_streams"].as_u64().unwrap())
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(5), || live(k).iter().sum::<u64>()
            == STREAMS as u64),
        "live streams never reached {STREAMS}: {:?}",
        live(k)
    );
    let _ = up;
    (live(k), clients)
}

fn ratio(per_worker: &[u64]) -> f64 {
    let max = *per_worker.iter().max().unwrap() as f64;
    let min = *per_worker.iter().min().unwrap() as f64;
    if min == 0.0 {
        f64::INFINITY
    } else {
        max / min
    }
}

/// Every stream ends with all its events once the upstream lets them go.
fn finish(up: &Upstream, clients: Vec<Client>) {
    up.release();
    for mut c in clients {
        let mut rest = Vec::new();
        while let Some(ch) = c.read_chunk().expect("stream") {
            rest.extend_from_slice(&ch);
        }
        assert_eq!(String::from_utf8_lossy(&rest).matches("data: ").count(), 2);
    }
}

#[test]
fn p2c_spreads_long_streams_evenly_kernel_hash_for_comparison() {
    // Kernel hash first: no privilege needed, printed for comparison.
    {
        let up = Upstream::start("a");
        let k = Kvroute::start(&[
            "--workers",
            "2",
            "--steering",
            "kernel",
            "--replica",
            &up.url(),
        ]);
        assert_eq!(steering(&k)["mode"], "kernel");
        let (per, clients) = spread(&k, &up);
        println!(
            "kernel steering: live streams per worker {per:?}, max/min {:.3}",
            ratio(&per)
        );
        finish(&up, clients);
        stop(k);
    }
    let up = Upstream::start("a");
    let Some(k) = start_bpf(&[
        "--workers",
        "2",
        "--steering",
        "ebpf",
        "--steering-mode",
        "p2c",
        "--replica",
        &up.url(),
    ]) else {
        return;
    };
    let (per, clients) = spread(&k, &up);
    let r = ratio(&per);
    println!("p2c steering: live streams per worker {per:?}, max/min {r:.3}");
    assert!(r <= 1.2, "p2c spread {per:?}: max/min {r:.3} > 1.2");
    finish(&up, clients);
    stop(k);
}

/// `KVROUTE_STEERING_FORCE_FALLBACK` takes the BPF path away on any machine.
#[test]
fn forced_fallback_starts_on_kernel_steering_and_says_why() {
    let k = Kvroute::spawn_on(
        free_port(),
        free_port(),
        &["--workers", "2"],
        &[("KVROUTE_STEERING_FORCE_FALLBACK", "1")],
    );
    let st = wait_state(&k);
    assert_eq!(st["mode"], "kernel", "{st}");
    assert_eq!(st["attached"], false);
    assert!(
        st["fallback_reason"]
            .as_str()
            .unwrap()
            .contains("FORCE_FALLBACK"),
        "{st}"
    );
    // And ebpf-required refuses to start instead.
    let out = Command::new(workspace_bin("kvroute"))
        .args(["--listen", &format!("127.0.0.1:{}", free_port()), "--admin"])
        .arg(format!("127.0.0.1:{}", free_port()))
        .args(["--workers", "2", "--steering", "ebpf-required"])
        .env("KVROUTE_STEERING_FORCE_FALLBACK", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ebpf-required") && err.contains("FORCE_FALLBACK"),
        "{err}"
    );
}

fn wait_state(k: &Kvroute) -> Value {
    let mut st = Value::Null;
    let ok = wait_until(
        Duration::from_secs(10),
        || match kvroute_tests::harness::request(
            k.admin,
            "GET /state HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        ) {
            Ok(r) if r.status == 200 => {
                st = r.json()["steering"].clone();
                true
            }
            _ => false,
        },
    );
    assert!(ok, "kvroute did not serve /state");
    st
}

/// As an unprivileged user (nobody) the program cannot load: kernel steering,
/// the reason in /state, and traffic still served.
#[test]
fn unprivileged_starts_on_kernel_steering_and_says_so() {
    if !is_root() {
        // Already unprivileged: the plain start is the unprivileged start.
        let k = Kvroute::start(&["--workers", "2"]);
        let st = steering(&k);
        assert_eq!(st["mode"], "kernel", "{st}");
        assert!(st["fallback_reason"].is_string(), "{st}");
        return;
    }
    let (dir, bin) = world_readable_kvroute("unpriv");
    let up = Upstream::start("a");
    let (port, admin) = (free_port(), free_port());
    let child = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(&bin)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--admin", &format!("127.0.0.1:{admin}")])
        .args(["--workers", "2", "--replica", &up.url()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("setpriv (util-linux)");
    let k = Kvroute::on(Proc::adopt(child, "kvroute (nobody)"), port, admin);
    let st = wait_state(&k);
    assert_eq!(st["requested"], "ebpf", "{st}");
    assert_eq!(st["mode"], "kernel", "{st}");
    assert_eq!(st["attached"], false, "{st}");
    let why = st["fallback_reason"].as_str().expect("a reason");
    println!("unprivileged fallback reason: {why}");
    assert!(!why.is_empty());
    let r = kvroute_tests::harness::post(k.addr, "/v1/completions", "{}").unwrap();
    assert_eq!(r.status, 200);
    drop(k);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A SIGKILLed kvroute cannot remove its pins; the next start does.
#[test]
fn pins_of_a_killed_process_are_swept_by_the_next_start() {
    let Some(k) = start_bpf(&["--workers", "1"]) else {
        return;
    };
    let dead_dir = steering(&k)["pin_dir"].as_str().unwrap().to_string();
    drop(k); // SIGKILL
    assert!(Path::new(&dead_dir).exists());
    let Some(k2) = start_bpf(&["--workers", "1"]) else {
        return;
    };
    assert!(!Path::new(&dead_dir).exists(), "{dead_dir} not swept");
    stop(k2);
}

/// Pins whose owner is still 0 belong to a kvroute that is loading right now
/// (the loader pins the maps before the owner can be written) unless they are
/// old: a start must leave fresh ones alone, or a kvroute starting next to
/// another one removes its pins and its next upgrade starts from fresh maps.
/// Needs bpftool to forge them.
#[test]
fn unowned_pins_are_swept_only_once_old() {
    let dirs: Vec<String> = (0..2)
        .map(|_| format!("/sys/fs/bpf/kvroute/127_0_0_1:{}", free_port()))
        .collect();
    let clean = || {
        for d in &dirs {
            let _ = std::fs::remove_dir_all(d);
        }
    };
    for d in &dirs {
        let made = std::fs::create_dir_all(d).is_ok()
            && Command::new("bpftool")
                .args(["map", "create", &format!("{d}/kvr_owner")])
                .args([
                    "type",
                    "array",
                    "key",
                    "4",
                    "value",
                    "8",
                    "entries",
                    "1",
                    "name",
                    "kvr_owner",
                ])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
        if !made {
            clean();
            if std::env::var_os("KVROUTE_REQUIRE_BPF").is_some() {
                panic!("KVROUTE_REQUIRE_BPF is set but bpftool cannot create pins in {d}");
            }
            eprintln!("skipped: bpftool missing or cannot create pins in {d}");
            return;
        }
    }
    let (loading, abandoned) = (&dirs[0], &dirs[1]);
    let aged = Command::new("touch")
        .args(["-d", "2 minutes ago", abandoned])
        .status()
        .unwrap();
    assert!(aged.success());
    let Some(k) = start_bpf(&["--workers", "1"]) else {
        clean();
        return;
    };
    let kept = Path::new(loading).exists();
    let swept = !Path::new(abandoned).exists();
    stop(k);
    clean();
    assert!(kept, "{loading}: pins of a start in progress were swept");
    assert!(swept, "{abandoned}: unowned pins two minutes old were kept");
}

/// `hash` and `cpu` modes load and steer every connection (no spread asserted:
/// `hash` is the kernel's behaviour and `cpu` follows where SYNs are processed).
#[test]
fn hash_and_cpu_modes_steer_every_connection() {
    for mode in ["hash", "cpu"] {
        let Some(k) = start_bpf(&["--workers", "2", "--steering-mode", mode]) else {
            return;
        };
        assert_eq!(steering(&k)["mode"], mode);
        let clients: Vec<Client> = (0..20).map(|_| Client::connect(k.addr).unwrap()).collect();
        let counts = |k: &Kvroute, key: &str| -> u64 {
            steering(k)["workers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|w| w[key].as_u64().unwrap())
                .sum()
        };
        assert!(
            wait_until(Duration::from_secs(5), || counts(&k, "live_streams") == 20),
            "{mode}: {}",
            steering(&k)
        );
        assert_eq!(counts(&k, "steered"), 20, "{mode}: {}", steering(&k));
        drop(clients);
        stop(k);
    }
}

/// More workers than two is where the kernel's hash hurts: with 8 workers and
/// 25 streams each on average, some worker routinely gets half again the mean.
/// Printed for both; p2c (two choices of eight, not exact least-loaded) must
/// stay within 1.5.
#[test]
fn p2c_vs_kernel_with_eight_workers() {
    let mut rows = Vec::new();
    for steer in ["kernel", "ebpf"] {
        let up = Upstream::start("a");
        let args = [
            "--workers",
            "8",
            "--steering",
            steer,
            "--replica",
            &up.url(),
        ];
        let k = if steer == "ebpf" {
            match start_bpf(&args) {
                Some(k) => k,
                None => return,
            }
        } else {
            Kvroute::start(&args)
        };
        let (per, clients) = spread(&k, &up);
        println!(
            "8 workers, {steer} steering: live streams per worker {per:?}, max/min {:.3}",
            ratio(&per)
        );
        rows.push(ratio(&per));
        finish(&up, clients);
        stop(k);
    }
    assert!(rows[1] <= 1.5, "p2c with 8 workers: max/min {:.3}", rows[1]);
}

/// Pins left with a layout this object cannot use (another kvroute version)
/// are replaced instead of forcing kernel steering. Needs bpftool to forge them.
#[test]
fn unusable_pins_are_replaced() {
    let port = free_port();
    let dir = format!("/sys/fs/bpf/kvroute/127_0_0_1:{port}");
    if std::fs::create_dir_all(&dir).is_err() {
        eprintln!("skipped: cannot create {dir}");
        return;
    }
    // kvr_live with 4-byte values; the object's has 8.
    let made = Command::new("bpftool")
        .args(["map", "create", &format!("{dir}/kvr_live")])
        .args([
            "type", "array", "key", "4", "value", "4", "entries", "256", "name", "kvr_live",
        ])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !made {
        let _ = std::fs::remove_dir_all(&dir);
        if std::env::var_os("KVROUTE_REQUIRE_BPF").is_some() {
            panic!("KVROUTE_REQUIRE_BPF is set but bpftool cannot create maps in {dir}");
        }
        eprintln!("skipped: bpftool missing or cannot create maps");
        return;
    }
    let k = Kvroute::spawn_on(port, free_port(), &["--workers", "2"], &[]);
    let st = wait_state(&k);
    assert_eq!(st["attached"], true, "{st}");
    stop(k);
    assert!(!Path::new(&dir).exists());
}

/// The optional systemd drop-in grants enough: as a non-root user (nobody)
/// holding only the ambient capabilities of kvroute.service plus the drop-in,
/// after the drop-in's own `ExecStartPre=+` command, the program attaches on a
/// bpffs mounted the way systemd mounts it (mode 0700, root's). Runs in a
/// private mount namespace with a bpffs of its own, so the host's is untouched.
#[test]
fn systemd_dropin_privileges_are_enough_for_a_non_root_user() {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd");
    let unit = std::fs::read_to_string(deploy.join("kvroute.service")).unwrap();
    let dropin =
        std::fs::read_to_string(deploy.join("kvroute.service.d/ebpf-steering.conf")).unwrap();
    let values = |text: &str, key: &str| -> Vec<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(str::to_string)
            .collect()
    };
    // Every capability the two files grant, as setpriv spells them.
    let caps: Vec<String> = values(&unit, "AmbientCapabilities")
        .iter()
        .chain(&values(&dropin, "AmbientCapabilities"))
        .flat_map(|v| v.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    assert!(caps.contains(&"+bpf".to_string()), "{caps:?}");
    assert!(!caps.contains(&"+net_admin".to_string()), "{caps:?}");
    let pre = values(&dropin, "ExecStartPre");
    assert_eq!(pre.len(), 1, "{pre:?}");
    // `+`: runs as root outside the sandbox. The dynamic user is nobody here.
    let pre = pre[0].strip_prefix('+').expect("a privileged ExecStartPre");
    let pre_here = pre
        .replace("-o kvroute -g kvroute", "-o 65534 -g 65534")
        .replace("kvroute:kvroute", "65534:65534");
    assert!(
        !pre_here.contains(" kvroute ") && !pre_here.contains("kvroute:"),
        "ExecStartPre names the user in an unexpected way: {pre}"
    );

    let tools = ["unshare", "setpriv", "mount"].iter().all(|t| {
        Command::new(t)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    });
    if !is_root() || !tools {
        let why = if tools {
            "needs root"
        } else {
            "needs unshare, setpriv and mount (util-linux)"
        };
        skip_without_bpf(&format!("this test {why}"));
        return;
    }
    let (dir, bin) = world_readable_kvroute("dropin");
    let up = Upstream::start("a");
    let (port, admin) = (free_port(), free_port());
    let script = format!(
        "set -e\nmount -t bpf -o mode=0700 bpf /sys/fs/bpf\n{pre_here}\n\
         exec setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps={caps} --ambient-caps={caps} \
         '{bin}' --listen 127.0.0.1:{port} --admin 127.0.0.1:{admin} --workers 2 --steering ebpf --replica {up}\n",
        caps = caps.join(","),
        bin = bin.display(),
        up = up.url(),
    );
    // No --fork: the shell, then kvroute, keep unshare's pid.
    let child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let k = Kvroute::on(
        Proc::adopt(child, "kvroute (nobody, drop-in privileges)"),
        port,
        admin,
    );
    let st = wait_state(&k);
    assert_eq!(
        st["attached"], true,
        "not attached with the drop-in's privileges: {st}"
    );
    assert_eq!(st["mode"], "p2c", "{st}");
    let c = Client::connect(k.addr).unwrap();
    assert!(wait_until(Duration::from_secs(5), || {
        steering(&k)["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["steered"].as_u64().unwrap())
            .sum::<u64>()
            == 1
    }));
    drop(c);
    stop(k);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A copy of the kvroute binary that user nobody can run: target/ may not be
/// readable by nobody, a world-readable temp dir is. Returns (dir, binary).
fn world_readable_kvroute(tag: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("kvroute-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin = dir.join("kvroute");
    std::fs::copy(workspace_bin("kvroute"), &bin).unwrap();
    let _ = Command::new("chmod")
        .arg("755")
        .arg(&dir)
        .arg(&bin)
        .status();
    (dir, bin)
}
