//! Runs a test body under both I/O runtimes: `both_io!(a, b)` makes `uring::a`,
//! `epoll::a`, … calling the file's `fn a(io: &str)` with `"uring"` or `"epoll"`.
//! `#[macro_use]` from `common`, so every area module of the e2e binary has
//! `both_io!`.

macro_rules! both_io {
    ($($name:ident),* $(,)?) => {
        mod uring {
            $(#[test] fn $name() { if crate::common::io_runtimes::uring_usable() { super::$name("uring") } })*
        }
        mod epoll {
            $(#[test] fn $name() { super::$name("epoll") })*
        }
    };
}

/// io_uring can be missing (old kernel, Docker's seccomp profile,
/// `kernel.io_uring_disabled`): the io_uring tests then skip and say why, unless
/// `KVROUTE_REQUIRE_URING=1` (set by CI) turns the skip into a failure.
pub fn uring_usable() -> bool {
    match kvroute::io::uring_available() {
        Ok(()) => true,
        Err(e) if std::env::var_os("KVROUTE_REQUIRE_URING").is_some() => {
            panic!("io_uring required (KVROUTE_REQUIRE_URING) but unavailable: {e}")
        }
        Err(e) => {
            eprintln!("skipped: io_uring unavailable here ({e})");
            false
        }
    }
}

/// Checks that kvroute runs the runtime `io` (`"uring"` or `"epoll"`) names:
/// no silent fallback.
#[allow(dead_code)]
pub fn assert_runs_on(k: &kvroute_tests::harness::Kvroute, io: &str) {
    let expected = if io == "uring" { "io_uring" } else { "epoll" };
    assert_eq!(k.admin_get("/state").json()["io"], expected);
}
