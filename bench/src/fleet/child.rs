//! Child processes that never outlive xtask.
//!
//! Three layers, because each covers a way of dying the others miss:
//! - [`Child`]'s `Drop` kills and reaps: normal return and `?` errors;
//! - a SIGINT/SIGTERM handler kills every registered child, then exits: Ctrl-C, `kill PID`,
//!   and panics are covered by `Drop` as long as the panic unwinds;
//! - `setpriv --pdeathsig KILL` (util-linux) wraps each child when available, so the kernel
//!   kills it even when xtask itself is SIGKILLed and no Rust code runs at all.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use anyhow::Context;
use kvroute_testkit::child::NotReady;

/// PIDs of children alive right now, for the signal handler (which cannot reach the `Child`
/// values owned by whatever stack frame is running).
static LIVE: Mutex<Vec<u32>> = Mutex::new(Vec::new());

fn live() -> std::sync::MutexGuard<'static, Vec<u32>> {
    // A panic while holding the lock leaves plain PIDs behind: still usable.
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Installs the SIGINT/SIGTERM handler once per process.
pub fn install_signal_handler() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let spawned = std::thread::Builder::new()
            .name("xtask-signals".into())
            .spawn(|| {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                let sig = rt.block_on(async {
                    use tokio::signal::unix::{signal, SignalKind};
                    let (Ok(mut int), Ok(mut term)) = (
                        signal(SignalKind::interrupt()),
                        signal(SignalKind::terminate()),
                    ) else {
                        return None;
                    };
                    tokio::select! {
                        _ = int.recv() => Some("SIGINT"),
                        _ = term.recv() => Some("SIGTERM"),
                    }
                });
                if let Some(sig) = sig {
                    // Holding the lock until exit: nothing can register a new child after the sweep.
                    let pids = live();
                    eprintln!(
                        "xtask: {sig}: stopping {} child process(es) and exiting",
                        pids.len()
                    );
                    for pid in pids.iter() {
                        let _ = Command::new("kill")
                            .args(["-KILL", &pid.to_string()])
                            .stderr(Stdio::null())
                            .status();
                    }
                    std::process::exit(130);
                }
            });
        if let Err(e) = spawned {
            eprintln!("xtask: warning: no signal handler ({e}); Ctrl-C may leave children behind");
        }
    });
}

/// `setpriv` from util-linux, when it supports `--pdeathsig`.
fn setpriv() -> Option<&'static Path> {
    static FOUND: OnceLock<Option<PathBuf>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            let ok = Command::new("setpriv")
                .args(["--pdeathsig", "KILL", "--", "true"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            ok.then(|| PathBuf::from("setpriv"))
        })
        .as_deref()
}

/// A started process, killed and reaped on drop; stdout and stderr go to `log`.
pub struct Child {
    /// Kills and reaps on drop too, after this type's own `Drop` has.
    inner: kvroute_testkit::child::Child,
    pub name: String,
    pub log: PathBuf,
}

impl Child {
    /// Spawns `program args…` with its output appended to `log`. Must be called from the main
    /// thread: the kernel's parent-death signal fires when the *thread* that forked exits.
    pub fn spawn(
        name: &str,
        program: impl AsRef<std::ffi::OsStr>,
        args: &[String],
        log: &Path,
    ) -> anyhow::Result<Child> {
        Self::spawn_with_stdout(name, program, args, log, None)
    }

    /// Like [`Child::spawn`], with stdout kept apart in `stdout` when given (for a child whose
    /// output is its result).
    pub fn spawn_with_stdout(
        name: &str,
        program: impl AsRef<std::ffi::OsStr>,
        args: &[String],
        log: &Path,
        stdout: Option<&Path>,
    ) -> anyhow::Result<Child> {
        Self::spawn_inner(name, program.as_ref(), args, log, stdout, None)
    }

    /// Like [`Child::spawn_with_stdout`], with every stderr line offered to `take` first: the
    /// lines it returns true for are its own (a child's progress counters), the rest go to `log`.
    pub fn spawn_taking_stderr(
        name: &str,
        program: impl AsRef<std::ffi::OsStr>,
        args: &[String],
        log: &Path,
        stdout: Option<&Path>,
        take: impl FnMut(&str) -> bool + Send + 'static,
    ) -> anyhow::Result<Child> {
        Self::spawn_inner(
            name,
            program.as_ref(),
            args,
            log,
            stdout,
            Some(Box::new(take)),
        )
    }

    fn spawn_inner(
        name: &str,
        program: &std::ffi::OsStr,
        args: &[String],
        log: &Path,
        stdout: Option<&Path>,
        take: Option<LineFilter>,
    ) -> anyhow::Result<Child> {
        install_signal_handler();
        if let Some(dir) = log.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        let err = File::create(log).with_context(|| format!("create {}", log.display()))?;
        let out = match stdout {
            Some(p) => File::create(p).with_context(|| format!("create {}", p.display()))?,
            None => err.try_clone()?,
        };
        let mut cmd = match setpriv() {
            Some(sp) => {
                let mut c = Command::new(sp);
                c.args(["--pdeathsig", "KILL", "--"]).arg(program);
                c
            }
            None => Command::new(program),
        };
        let forward = match take {
            Some(take) => {
                cmd.stderr(Stdio::piped());
                Some((take, err))
            }
            None => {
                cmd.stderr(Stdio::from(err));
                None
            }
        };
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::from(out));
        let mut registry = live();
        let mut inner =
            kvroute_testkit::child::Child::spawn(name, &mut cmd).with_context(|| {
                format!(
                    "{name}: cannot start {} (log {})",
                    Path::new(program).display(),
                    log.display()
                )
            })?;
        registry.push(inner.id());
        if let (Some((take, log_file)), Some(pipe)) = (forward, inner.stderr.take()) {
            // Ends at end of file, when the child exits (or is killed).
            std::thread::Builder::new()
                .name(format!("{name}-stderr"))
                .spawn(move || forward_stderr(pipe, take, log_file))
                .context("start the stderr reader")?;
        }
        Ok(Child {
            inner: inner.with_log(log),
            name: name.to_owned(),
            log: log.to_owned(),
        })
    }

    /// The process id (setpriv execs the program, so it is the program's own).
    pub fn id(&self) -> u32 {
        self.inner.id()
    }

    /// The exit status if the process has already exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.inner.exited()
    }

    /// Fails, naming the process and its log, when it is no longer running.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        match self.exited() {
            None => Ok(()),
            Some(st) => anyhow::bail!(
                "{} exited ({st}); log {}:\n{}",
                self.name,
                self.log.display(),
                self.log_tail(15)
            ),
        }
    }

    /// Waits up to `limit` for the process to exit by itself; kills it and fails otherwise.
    pub fn wait_exit(&mut self, limit: Duration) -> anyhow::Result<ExitStatus> {
        if let Some(st) = self.inner.wait_exit(limit, Duration::from_millis(100)) {
            return Ok(st);
        }
        let _ = self.inner.kill();
        anyhow::bail!(
            "{} still running after {:.0} s, killed; log {}:\n{}",
            self.name,
            limit.as_secs_f64(),
            self.log.display(),
            self.log_tail(15)
        );
    }

    /// The last `n` lines of the log, indented, for error messages.
    pub fn log_tail(&self, n: usize) -> String {
        kvroute_testkit::child::tail(&self.log, n)
    }

    /// Polls `ready` every 50 ms for up to `limit`, failing early (with the log) if the process
    /// exits and with a timeout error naming it otherwise.
    pub fn wait_ready(
        &mut self,
        what: &str,
        limit: Duration,
        ready: impl FnMut() -> bool,
    ) -> anyhow::Result<()> {
        match self
            .inner
            .wait_ready(limit, Duration::from_millis(50), ready)
        {
            Ok(()) => Ok(()),
            // The same message as `ensure_running`'s.
            Err(NotReady::Exited(_)) => self.ensure_running(),
            Err(NotReady::TimedOut) => anyhow::bail!(
                "{}: {what} not ready after {:.0} s; log {}:\n{}",
                self.name,
                limit.as_secs_f64(),
                self.log.display(),
                self.log_tail(15)
            ),
        }
    }
}

/// Decides whether a child's stderr line is taken by the parent (true) or logged.
type LineFilter = Box<dyn FnMut(&str) -> bool + Send>;

fn forward_stderr(pipe: std::process::ChildStderr, mut take: LineFilter, mut log: File) {
    use std::io::{BufRead, Write};
    let mut reader = std::io::BufReader::new(pipe);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if !take(&String::from_utf8_lossy(&line)) {
            let _ = log.write_all(&line);
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let pid = self.inner.id();
        let _ = self.inner.kill();
        let _ = self.inner.wait();
        live().retain(|p| *p != pid);
    }
}
