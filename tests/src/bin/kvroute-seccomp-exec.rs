//! `kvroute-seccomp-exec CMD [ARGS...]`: runs CMD with io_uring forbidden the way
//! Docker's default seccomp profile forbids it (`io_uring_setup`, `io_uring_enter`
//! and `io_uring_register` fail with EPERM; everything else is allowed).
//!
//! The degraded-mode test uses it so the fallback is exercised by the kernel
//! refusing, not by a flag inside kvroute.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

fn main() {
    let mut args = std::env::args_os().skip(1);
    let Some(cmd) = args.next() else {
        eprintln!("usage: kvroute-seccomp-exec CMD [ARGS...]");
        std::process::exit(2);
    };
    let arch: TargetArch = std::env::consts::ARCH
        .try_into()
        .expect("architecture supported by seccompiler");
    // An empty rule list matches the syscall unconditionally.
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = [
        libc_nr::IO_URING_SETUP,
        libc_nr::IO_URING_ENTER,
        libc_nr::IO_URING_REGISTER,
    ]
    .into_iter()
    .map(|nr| (nr, vec![]))
    .collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc_nr::EPERM),
        arch,
    )
    .expect("seccomp filter");
    let prog: BpfProgram = filter.try_into().expect("compile seccomp filter");
    // apply_filter sets no_new_privs itself, so this works unprivileged too, and the
    // filter is inherited across exec.
    seccompiler::apply_filter(&prog).expect("install seccomp filter");
    let err = std::process::Command::new(&cmd).args(args).exec();
    eprintln!(
        "kvroute-seccomp-exec: exec {}: {err}",
        cmd.to_string_lossy()
    );
    std::process::exit(127);
}

/// io_uring syscall numbers are the same on every Linux architecture (added after
/// the unified syscall table), so no per-arch table is needed.
mod libc_nr {
    pub const IO_URING_SETUP: i64 = 425;
    pub const IO_URING_ENTER: i64 = 426;
    pub const IO_URING_REGISTER: i64 = 427;
    pub const EPERM: u32 = 1;
}
