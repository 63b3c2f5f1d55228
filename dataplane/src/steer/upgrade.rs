//! Zero-downtime upgrade: SIGUSR2 (or `kvroute upgrade`, which finds the
//! process through the admin API and sends it) starts the binary again (the file on disk,
//! so a new version), the new process joins the listeners' reuseport group and
//! swaps its sockets into the pinned socket array, and only then does the old
//! one stop accepting and drain.
//!
//! Connections already queued on the old listeners are migrated by the kernel
//! when those listeners close (Linux 5.14+): the program is loaded in its
//! `sk_reuseport/migrate` flavour, and with that attached the kernel asks it
//! where each queued connection goes, whatever `net.ipv4.tcp_migrate_req`
//! says; it picks from the array, which by then holds only the new process's
//! listeners. Without the program (kernel steering) the same needs
//! `tcp_migrate_req = 1`, which the old process then sets if it can. Chosen over "the old process accepts its backlog before closing"
//! because migration also covers handshakes still in SYN_RECV, which no
//! accept loop can reach, and needs no timing guess of when the backlog is empty.
//!
//! Hand-off protocol (no fd passing, no unsafe): the old process starts the
//! successor with `KVROUTE_UPGRADE_READY=<file>`; the successor creates the
//! file once its workers accept and its sockets are in the array. Until the old
//! process exits the successor retries binding the admin address.
//!
//! systemd: with `NotifyAccess=all` the old process reports `MAINPID=<new>`
//! before draining, so systemd follows the new process; `KillMode=mixed` keeps
//! the draining old process alive (SIGTERM goes to the main PID only).
//! `ExecReload` stays SIGHUP (config reload); an upgrade is
//! `systemctl kill -s USR2 --kill-whom=main kvroute`.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::Steering;
use crate::config::AdminAddr;

/// Set in the successor's environment: the file to create when ready.
pub const ENV_READY: &str = "KVROUTE_UPGRADE_READY";
const READY_WITHIN: Duration = Duration::from_secs(20);

/// True in a process started by an upgrade.
pub fn is_successor() -> bool {
    std::env::var_os(ENV_READY).is_some()
}

/// Called by the successor once its workers accept: tells the old process to drain.
pub fn signal_ready() {
    if let Some(p) = std::env::var_os(ENV_READY) {
        if let Err(e) = std::fs::write(&p, std::process::id().to_string()) {
            tracing::error!(error = %e, "upgrade: cannot signal readiness");
        }
    }
}

/// The binary to start: the path this process was started from, which after a
/// package upgrade holds the new version (`/proc/self/exe` would be the old,
/// deleted inode).
fn binary() -> std::io::Result<PathBuf> {
    if let Some(p) = std::env::var_os("KVROUTE_UPGRADE_BINARY") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe()?;
    Ok(
        match exe.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
            Some(s) => PathBuf::from(s),
            None => exe,
        },
    )
}

/// Lets the kernel move a closing listener's queue to another socket of the group.
fn enable_migration() {
    const P: &str = "/proc/sys/net/ipv4/tcp_migrate_req";
    match std::fs::read_to_string(P) {
        Ok(v) if v.trim() == "1" => {}
        Ok(_) => match std::fs::write(P, "1") {
            Ok(()) => tracing::warn!(
                "upgrade: set net.ipv4.tcp_migrate_req = 1 so queued connections move to the new process; persist it in sysctl.d"
            ),
            Err(e) => tracing::warn!(
                error = %e,
                "upgrade: net.ipv4.tcp_migrate_req is 0 and cannot be set: connections queued but not yet accepted by the old process may be reset"
            ),
        },
        Err(e) => tracing::warn!(error = %e, "upgrade: no tcp_migrate_req (kernel before 5.14): queued connections may be reset"),
    }
}

/// SIGUSR2: starts the successor and waits for it. `true` when it is ready and
/// this process should stop accepting and drain; `false` keeps serving.
/// `draining`: this process is already on its way out (no second successor).
pub async fn spawn_successor(steering: &Steering, draining: bool) -> bool {
    if draining {
        return false;
    }
    if !steering.is_attached() {
        tracing::warn!("upgrade: without eBPF steering the kernel's hash splits new connections between old and new until the old listeners close");
        enable_migration();
    }
    let ready = std::env::temp_dir().join(format!("kvroute-upgrade-{}.ready", std::process::id()));
    let _ = std::fs::remove_file(&ready);
    let bin = match binary() {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "upgrade: cannot find the binary");
            return false;
        }
    };
    let mut child = match Command::new(&bin)
        .args(std::env::args_os().skip(1))
        .env(ENV_READY, &ready)
        .stdin(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(binary = %bin.display(), error = %e, "upgrade: cannot start the new process");
            return false;
        }
    };
    let pid = child.id();
    steering.set_successor(pid);
    tracing::info!(binary = %bin.display(), pid, "upgrade: new process started");
    let deadline = Instant::now() + READY_WITHIN;
    loop {
        if ready.exists() {
            let _ = std::fs::remove_file(&ready);
            break;
        }
        if let Ok(Some(st)) = child.try_wait() {
            tracing::error!(%st, "upgrade: new process exited before it was ready; keeping this one");
            take_back(steering);
            return false;
        }
        if Instant::now() > deadline {
            tracing::error!(
                pid,
                "upgrade: new process not ready in time; stopping it, keeping this one"
            );
            let _ = child.kill();
            let _ = child.wait();
            take_back(steering);
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The successor owns the map slots from here; this process's counts would
    // overwrite its numbers.
    steering.release();
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::MainPid(pid)]) {
        tracing::warn!(error = %e, "upgrade: sd_notify MAINPID failed");
    }
    // Reaps the child if this process outlives it; it is not ours to wait for.
    std::thread::spawn(move || child.wait());
    tracing::info!(pid, "upgrade: new process ready, draining this one");
    true
}

/// After a failed upgrade: the new process may have put its listeners into the
/// socket array before it died, so this one puts its own back. `/state` shows
/// no successor only once that is done.
fn take_back(steering: &Steering) {
    match steering.reclaim() {
        Ok(what) => tracing::info!("upgrade: steering taken back: {what}"),
        Err(e) => tracing::error!(
            error = %e,
            "upgrade: could not take steering back; new connections follow the kernel's hash"
        ),
    }
    steering.set_successor(0);
}

/// Why `kvroute upgrade` did not see a hand-off (printed as
/// `kvroute upgrade: {e}`).
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// The configured `admin` address does not parse.
    #[error(transparent)]
    Config(#[from] crate::Error),
    #[error("the admin API does not report a pid (kvroute too old for `upgrade`)")]
    NoPid,
    /// The successor's pid as the admin API reports it.
    #[error("pid {pid} already handed over to pid {successor}")]
    AlreadyHandedOver {
        pid: u32,
        successor: serde_json::Value,
    },
    #[error("signalling pid {pid}: {source}")]
    Signal {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("pid {pid} did not hand over within {} s; see its log (it keeps serving)", .within.as_secs())]
    NotHandedOver { pid: u32, within: Duration },
    #[error("admin API {addr:?}: {source}")]
    Admin {
        addr: AdminAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("admin API: malformed response")]
    MalformedResponse,
    #[error("admin API /state: {0}")]
    State(#[source] serde_json::Error),
}

/// `kvroute upgrade`: asks the admin API of the configured kvroute for its
/// pid, sends it SIGUSR2, and waits for the hand-off to the new process.
pub fn request(cfg: &crate::config::Config) -> Result<String, UpgradeError> {
    let addr = AdminAddr::parse(&cfg.admin)?;
    let st = admin_state(&addr)?;
    let pid = st["pid"]
        .as_u64()
        .and_then(|p| u32::try_from(p).ok())
        .ok_or(UpgradeError::NoPid)?;
    if st["released"] == true {
        return Err(UpgradeError::AlreadyHandedOver {
            pid,
            successor: st["successor_pid"].clone(),
        });
    }
    crate::sys::steer::sigusr2(pid).map_err(|source| UpgradeError::Signal { pid, source })?;
    let within = READY_WITHIN + Duration::from_secs(5);
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        // The old process answers until it exits; then the new one takes the address.
        let Ok(now) = admin_state(&addr) else {
            continue;
        };
        if now["pid"] == pid && now["released"] == true {
            return Ok(format!(
                "upgrade: pid {pid} handed over to pid {} and is draining",
                now["successor_pid"]
            ));
        }
        if now["pid"].as_u64().is_some_and(|p| p != u64::from(pid)) {
            return Ok(format!(
                "upgrade: pid {} now serves (was {pid})",
                now["pid"]
            ));
        }
    }
    Err(UpgradeError::NotHandedOver { pid, within })
}

/// `GET /state` on the admin API, `steering` part, over std blocking sockets:
/// this runs in the CLI, outside any runtime.
fn admin_state(addr: &AdminAddr) -> Result<serde_json::Value, UpgradeError> {
    use std::io::{Read, Write};
    const REQ: &[u8] = b"GET /state HTTP/1.1\r\nHost: kvroute\r\nConnection: close\r\n\r\n";
    let timeout = Some(Duration::from_secs(5));
    let mut raw = Vec::new();
    let res = match addr {
        AdminAddr::Tcp(a) => std::net::TcpStream::connect_timeout(a, Duration::from_secs(5))
            .and_then(|mut s| {
                s.set_read_timeout(timeout)?;
                s.write_all(REQ)?;
                s.read_to_end(&mut raw)
            }),
        AdminAddr::Unix(p) => std::os::unix::net::UnixStream::connect(p).and_then(|mut s| {
            s.set_read_timeout(timeout)?;
            s.write_all(REQ)?;
            s.read_to_end(&mut raw)
        }),
    };
    res.map_err(|source| UpgradeError::Admin {
        addr: addr.clone(),
        source,
    })?;
    let body = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| &raw[i + 4..])
        .ok_or(UpgradeError::MalformedResponse)?;
    let v: serde_json::Value = serde_json::from_slice(body).map_err(UpgradeError::State)?;
    Ok(v["steering"].clone())
}
