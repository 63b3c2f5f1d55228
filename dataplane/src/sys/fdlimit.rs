//! The process's open-file limit (`RLIMIT_NOFILE`): read it, and raise the
//! soft limit to the hard one at start so the connection budget is derived
//! from what the process may really open.

use std::io;

/// The soft and hard `RLIMIT_NOFILE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    pub soft: u64,
    pub hard: u64,
}

/// The current limit.
pub fn current() -> io::Result<FdLimit> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` through a pointer to a live,
    // properly aligned local and reads nothing else.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(FdLimit {
        soft: r.rlim_cur,
        hard: r.rlim_max,
    })
}

/// Raises the soft limit to the hard limit (a no-op when they are equal);
/// returns the limit in force afterwards. The soft limit is often 1024 for
/// compatibility with `select(2)`, which kvroute does not use.
pub fn raise_to_hard() -> io::Result<FdLimit> {
    let now = current()?;
    if now.soft >= now.hard {
        return Ok(now);
    }
    let r = libc::rlimit {
        rlim_cur: now.hard,
        rlim_max: now.hard,
    };
    // SAFETY: setrlimit reads one `rlimit` from a live local; raising the soft
    // limit up to the hard one needs no privilege and affects only this process.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    current()
}
