//! The peer routers kvroute is measured against: SGLang's gateway in its current release
//! (`smg`, the "Shepherd Model Gateway") and its older `sglang-router` release, each in a
//! Python venv of its own under `target/bench-peers/` (the two packages cannot share one: the
//! older one overwrites the newer one's `smg` entry point).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use kvroute_testkit::port::free_port;

use super::child::Child;
use super::{http_ok, Sim};
use crate::procs::{sh, target_dir};

/// The SGLang gateway release the routing bench compares with.
pub const SMG_PIN: &str = "smg==1.13.0";
/// Its January release, which older reports were measured against.
pub const SGLANG_ROUTER_PIN: &str = "sglang-router==0.3.2";

/// Python start-up plus the router's first worker health checks.
const READY: Duration = Duration::from_secs(90);

/// Which gateway a row runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gateway {
    /// `smg launch` (smg 1.13.0).
    Smg,
    /// `python -m sglang_router.launch_router` (sglang-router 0.3.2).
    SglangRouter,
}

impl Gateway {
    pub fn name(self) -> &'static str {
        match self {
            Gateway::Smg => "smg",
            Gateway::SglangRouter => "sglang-router",
        }
    }
}

/// A venv under `target/bench-peers/<pin>` with `pin` installed from PyPI, made on first use;
/// returns its directory. A stamp file records the pin, so a changed pin makes a new venv.
pub fn venv(pin: &str) -> anyhow::Result<PathBuf> {
    let dir = target_dir()
        .join("bench-peers")
        .join(pin.replace("==", "-"));
    let stamp = dir.join("kvroute-pin.txt");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == pin) {
        return Ok(dir);
    }
    eprintln!("xtask: installing {pin} into {} (PyPI)", dir.display());
    let _ = std::fs::remove_dir_all(&dir);
    sh(Command::new("python3").args(["-m", "venv"]).arg(&dir))
        .context("python3 -m venv (Debian: apt-get install python3-venv)")?;
    sh(Command::new(dir.join("bin/python")).args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        pin,
    ]))
    .with_context(|| format!("pip install {pin}"))?;
    std::fs::write(&stamp, pin)?;
    Ok(dir)
}

/// The installed version of `package` for `python`.
pub fn version(python: &Path, package: &str) -> anyhow::Result<String> {
    let out = Command::new(python)
        .args([
            "-c",
            &format!("import importlib.metadata as m; print(m.version('{package}'))"),
        ])
        .output()
        .with_context(|| format!("cannot run {}", python.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "{package} is not installed for {}",
        python.display()
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The Python that runs `gateway` and the gateway's version: `python` when given (it must
/// have the package), else the pinned venv, made on first use.
pub fn resolve(gateway: Gateway, python: Option<&Path>) -> anyhow::Result<(PathBuf, String)> {
    let (pin, package) = match gateway {
        Gateway::Smg => (SMG_PIN, "smg"),
        Gateway::SglangRouter => (SGLANG_ROUTER_PIN, "sglang-router"),
    };
    let python = match python {
        Some(p) => p.to_path_buf(),
        None => venv(pin)?.join("bin/python"),
    };
    let v = version(&python, package)?;
    Ok((python, v))
}

/// Starts `gateway` with `policy` over `sims` from the venv (or Python) at `python`, and
/// waits for its health check; returns it and its base URL.
pub fn start(
    gateway: Gateway,
    python: &Path,
    sims: &[Sim],
    policy: &str,
    log: &Path,
) -> anyhow::Result<(Child, String)> {
    let port = free_port();
    let (program, mut args): (PathBuf, Vec<String>) = match gateway {
        Gateway::Smg => (
            python.with_file_name("smg"),
            vec!["launch".into(), "--worker-urls".into()],
        ),
        Gateway::SglangRouter => (
            python.to_path_buf(),
            vec![
                "-m".into(),
                "sglang_router.launch_router".into(),
                "--worker-urls".into(),
            ],
        ),
    };
    args.extend(sims.iter().map(Sim::url));
    for (k, v) in [
        ("--policy", policy.to_owned()),
        ("--host", "127.0.0.1".to_owned()),
        ("--port", port.to_string()),
        // Its metrics listener defaults to 0.0.0.0:29000: loopback only, and a fresh port so
        // two rows (or two engineers) never collide.
        ("--prometheus-host", "127.0.0.1".to_owned()),
        ("--prometheus-port", free_port().to_string()),
        // The replicas are already up; the default 30 s between start-up checks would only
        // add dead time to every row.
        ("--worker-startup-check-interval", "1".to_owned()),
        ("--worker-startup-timeout-secs", "60".to_owned()),
        ("--log-level", "warn".to_owned()),
    ] {
        args.push(k.into());
        args.push(v);
    }
    let label = format!("{} {policy}", gateway.name());
    let mut child = Child::spawn(&label, &program, &args, log)
        .with_context(|| format!("start {}", program.display()))?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    child.wait_ready("GET /health", READY, || http_ok(addr, "/health"))?;
    Ok((child, format!("http://{addr}")))
}

/// The rows of `gateway` for `policies`, each with the instance counts `instances(policy)`
/// gives, ready to start or with the reason it cannot (printed and reported as skipped), and
/// the gateway's version when it was found.
pub fn rows<I: IntoIterator<Item = usize>>(
    gateway: Gateway,
    policies: &[String],
    python: Option<&Path>,
    instances: impl Fn(&str) -> I,
) -> (Vec<(usize, super::Candidate)>, Option<String>) {
    let policies: Vec<&String> = policies.iter().filter(|p| !p.is_empty()).collect();
    if policies.is_empty() {
        return (Vec::new(), None);
    }
    let found = resolve(gateway, python);
    match &found {
        Ok((_, v)) => eprintln!("{} {v} found", gateway.name()),
        Err(e) => eprintln!("{}: {e:#}", gateway.name()),
    }
    let mut out = Vec::new();
    for p in policies {
        for n in instances(p) {
            // Each row its own copy of why the gateway cannot run.
            let spec = match &found {
                Ok((python, _)) => Ok(super::RouterSpec::Sglang {
                    gateway,
                    policy: p.clone(),
                    python: python.clone(),
                    instances: n,
                }),
                Err(e) => Err(anyhow::anyhow!("{e:#}")),
            };
            let label = super::instances_label(format!("{} {p}", gateway.name()), n);
            out.push((n, (label, spec)));
        }
    }
    (out, found.ok().map(|(_, v)| v))
}
