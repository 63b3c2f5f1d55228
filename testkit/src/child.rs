//! A supervised child process: killed and reaped when dropped, its exit and
//! readiness waited for with bounded polling, its log's tail at hand for messages.
//!
//! What the callers differ in stays with them: how output is routed (a null, a
//! terminal, a log file, a pipe read line by line), wrappers such as `setpriv
//! --pdeathsig` or `setsid`, and whether a failure panics (tests) or is an error
//! (xtask). This type is the part they share.

use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

/// A started process, killed (SIGKILL) and reaped when dropped.
///
/// It dereferences to the [`std::process::Child`] inside, so `id`, `try_wait`,
/// `kill` and `wait` are at hand.
#[derive(Debug)]
pub struct Child {
    inner: std::process::Child,
    /// Names it in messages.
    pub name: String,
    /// Where its output goes, if to a file (for [`Child::log_tail`]).
    pub log: Option<PathBuf>,
}

impl Child {
    /// Spawns `cmd` as it is set up (stdio included); `name` names it in messages.
    pub fn spawn(name: &str, cmd: &mut Command) -> std::io::Result<Child> {
        Ok(Child::adopt(name, cmd.spawn()?))
    }

    /// Supervises a process spawned by the caller.
    pub fn adopt(name: &str, inner: std::process::Child) -> Child {
        Child {
            inner,
            name: name.to_owned(),
            log: None,
        }
    }

    /// With its output known to go to `log`.
    pub fn with_log(mut self, log: &Path) -> Child {
        self.log = Some(log.to_owned());
        self
    }

    /// The exit status if the process has already exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.inner.try_wait().ok().flatten()
    }

    /// Waits up to `limit` for the process to exit by itself, checking every
    /// `every`; `None` if it is still running (it is left running).
    pub fn wait_exit(&mut self, limit: Duration, every: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + limit;
        loop {
            if let Some(st) = self.exited() {
                return Some(st);
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(every);
        }
    }

    /// Polls `ready` every `every` for up to `limit`, giving up early if the
    /// process exits.
    pub fn wait_ready(
        &mut self,
        limit: Duration,
        every: Duration,
        mut ready: impl FnMut() -> bool,
    ) -> Result<(), NotReady> {
        let end = Instant::now() + limit;
        loop {
            if let Some(st) = self.exited() {
                return Err(NotReady::Exited(st));
            }
            if ready() {
                return Ok(());
            }
            if Instant::now() >= end {
                return Err(NotReady::TimedOut);
            }
            std::thread::sleep(every);
        }
    }

    /// The last `n` lines of its log (empty without one), each indented and
    /// ending in a newline, for error messages.
    pub fn log_tail(&self, n: usize) -> String {
        self.log.as_deref().map_or_else(String::new, |l| tail(l, n))
    }
}

impl Deref for Child {
    type Target = std::process::Child;

    fn deref(&self) -> &std::process::Child {
        &self.inner
    }
}

impl DerefMut for Child {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.inner
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.inner.kill();
        let _ = self.inner.wait();
    }
}

/// Why [`Child::wait_ready`] gave up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotReady {
    /// The process exited first.
    Exited(ExitStatus),
    /// `limit` passed with the process running and not ready.
    TimedOut,
}

/// The last `n` lines of the file at `log` (empty if it cannot be read), each
/// indented by four spaces and ending in a newline.
pub fn tail(log: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| format!("    {l}\n"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Stdio;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    }

    /// Whether process `pid` exists (not reaped), as `kill -0` sees it.
    fn alive(pid: u32) -> bool {
        Command::new("kill")
            .args(["-0", &pid.to_string()])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    #[test]
    fn a_dropped_child_is_killed_and_reaped() {
        let mut c = Child::spawn("sleeper", Command::new("sleep").arg("30")).unwrap();
        let pid = c.id();
        assert!(alive(pid), "sleep 30 runs");
        assert!(c.exited().is_none());
        drop(c);
        // Reaped too: a zombie would still answer kill -0 and keep its /proc entry.
        assert!(!alive(pid), "sleep 30 outlived its Child");
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }

    #[test]
    fn exits_are_seen_within_the_limit() {
        let mut c = Child::spawn("quick", &mut sh("exit 3")).unwrap();
        let st = c.wait_exit(Duration::from_secs(10), Duration::from_millis(10));
        assert_eq!(st.and_then(|s| s.code()), Some(3));

        let mut c = Child::spawn("slow", &mut sh("exec sleep 30")).unwrap();
        let t = Instant::now();
        assert_eq!(
            c.wait_exit(Duration::from_millis(200), Duration::from_millis(10)),
            None
        );
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(alive(c.id()), "wait_exit leaves a running child running");
    }

    #[test]
    fn readiness_is_bounded_and_notices_an_exit() {
        let mut c = Child::spawn("sleeper", &mut sh("exec sleep 30")).unwrap();
        let mut polls = 0;
        let r = c.wait_ready(Duration::from_secs(10), Duration::from_millis(5), || {
            polls += 1;
            polls == 3
        });
        assert_eq!((r, polls), (Ok(()), 3));

        let t = Instant::now();
        let r = c.wait_ready(
            Duration::from_millis(200),
            Duration::from_millis(10),
            || false,
        );
        assert_eq!(r, Err(NotReady::TimedOut));
        assert!(t.elapsed() >= Duration::from_millis(200));
        assert!(t.elapsed() < Duration::from_secs(5));

        let mut c = Child::spawn("crasher", &mut sh("exit 7")).unwrap();
        let r = c.wait_ready(Duration::from_secs(10), Duration::from_millis(10), || false);
        match r {
            Err(NotReady::Exited(st)) => assert_eq!(st.code(), Some(7)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_log_tail_is_its_last_lines() {
        let dir = std::env::temp_dir().join(format!("kvroute-testkit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("tail.log");
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = sh("for i in 1 2 3 4 5; do echo line $i; done");
        cmd.stdout(file);
        let mut c = Child::spawn("echo", &mut cmd).unwrap().with_log(&log);
        assert!(c
            .wait_exit(Duration::from_secs(10), Duration::from_millis(10))
            .is_some());
        assert_eq!(c.log_tail(2), "    line 4\n    line 5\n");
        assert_eq!(c.log_tail(0), "");
        assert_eq!(tail(&dir.join("absent.log"), 3), "");
        assert_eq!(
            Child::adopt("x", sh("true").spawn().unwrap()).log_tail(3),
            ""
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
