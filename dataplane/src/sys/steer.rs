//! The steering path's system calls: mounting bpffs and signalling the running
//! process for `kvroute upgrade`. Everything else (loading, map updates,
//! SO_ATTACH_REUSEPORT_EBPF) goes through aya.

use std::ffi::CString;
use std::io;
use std::path::Path;

/// `mount -t bpf bpf <at>`.
pub fn mount_bpffs(at: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let target = CString::new(at.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in bpffs path"))?;
    let fstype = c"bpf";
    // SAFETY: every pointer is a NUL-terminated string that outlives the call;
    // `data` may be null for bpffs.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `kill(pid, SIGUSR2)`.
pub fn sigusr2(pid: u32) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
    if pid <= 0 {
        // 0 and negatives address process groups, never one kvroute.
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a process id",
        ));
    }
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    let rc = unsafe { libc::kill(pid, libc::SIGUSR2) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
