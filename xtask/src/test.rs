//! `cargo xtask test`: the whole suite, the same command CI runs.
//!
//! The end-to-end tests start the real binaries, so those are built first;
//! both I/O runtimes are exercised by the tests themselves. Then the block
//! hash again on the software AES round, and the data plane's library tests
//! built for aarch64 and run under `qemu-aarch64` where the cross tools are
//! installed (`.ci/run` installs them).

use crate::procs::{cargo, sh};

#[derive(clap::Args)]
pub struct Args {
    /// Also run clippy with warnings denied and check formatting.
    #[arg(long)]
    pub lint: bool,
    /// Extra arguments passed to `cargo test` (after `--`).
    #[arg(last = true)]
    pub rest: Vec<String>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.lint {
        sh(cargo().args(["fmt", "--all", "--check"]))?;
        sh(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    // The committed BPF object must match its source wherever clang-19 is
    // installed; without it the check skips with a note (building needs no clang).
    crate::build_ebpf::check(true)?;
    sh(cargo().args(["build", "--workspace", "--bins"]))?;
    let mut t = cargo();
    t.args(["test", "--workspace"]);
    if !a.rest.is_empty() {
        t.arg("--").args(&a.rest);
    }
    sh(&mut t)?;
    if a.rest.is_empty() {
        software_block_hash()?;
        aarch64_lib()?;
    }
    Ok(())
}

/// The block hash once more with the `aes` crate's software round in place of
/// AES-NI (its `aes_force_soft` flag): the hardware kernel must still equal
/// the definition and the pinned values, which is what CPUs without AES
/// instructions compute. Without this run, a kernel that drifted from the
/// software rounds would pass (both sides of the test would use AES-NI), and
/// kvroute instances on different CPUs would silently route apart. A target
/// directory of its own, so the flag does not rebuild the main one.
fn software_block_hash() -> anyhow::Result<()> {
    let target = crate::procs::target_dir().join("aes-soft");
    let mut t = cargo();
    t.env("RUSTFLAGS", "--cfg aes_force_soft")
        .env("CARGO_TARGET_DIR", target)
        .args(["test", "-p", "kvroute", "--lib", "prefix::block_hash"]);
    sh(&mut t)
}

const AARCH64: &str = "aarch64-unknown-linux-gnu";
const AARCH64_GCC: &str = "aarch64-linux-gnu-gcc";
const QEMU_AARCH64: &str = "qemu-aarch64";

/// The data plane's library tests (prompt scanning without the x86 string
/// kernels, the index, the routers, the block hash on the ARMv8 AES kernel)
/// built for aarch64 and run under `qemu-aarch64`, whose CPUs all have the AES
/// instructions, so `KVROUTE_REQUIRE_AES` makes sure the kernel is what the
/// block-hash tests compared. Skipped, saying what is missing, where the target
/// or the cross tools are not installed; `KVROUTE_REQUIRE_AARCH64` (CI) makes
/// that a failure.
fn aarch64_lib() -> anyhow::Result<()> {
    let missing = aarch64_missing()?;
    if !missing.is_empty() {
        let why = format!(
            "aarch64 tests skipped: {} not installed (rustup target add {AARCH64}; \
             apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user)",
            missing.join(", ")
        );
        anyhow::ensure!(
            std::env::var_os("KVROUTE_REQUIRE_AARCH64").is_none(),
            "KVROUTE_REQUIRE_AARCH64 is set but {why}"
        );
        eprintln!("xtask: {why}");
        return Ok(());
    }
    let mut t = cargo();
    // RUSTFLAGS meant for this machine (`-C target-cpu=native`, say) would break
    // the cross build. And without `aes_armv8` (kvroute does not set it), the
    // `aes` round the block-hash tests compare the ARMv8 kernel with is the
    // crate's bitsliced software one, independent of the instructions tested.
    t.env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER", AARCH64_GCC)
        .env(
            "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER",
            format!("{QEMU_AARCH64} -L /usr/aarch64-linux-gnu"),
        )
        .env("CC_aarch64_unknown_linux_gnu", AARCH64_GCC)
        .env("KVROUTE_REQUIRE_AES", "1")
        .env(
            "CARGO_TARGET_DIR",
            crate::procs::target_dir().join("aarch64"),
        )
        .args(["test", "-p", "kvroute", "--lib", "--target", AARCH64]);
    sh(&mut t)
}

/// What of the aarch64 run's tools this machine lacks.
fn aarch64_missing() -> anyhow::Result<Vec<String>> {
    let sysroot = crate::procs::capture(
        std::process::Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
            .args(["--print", "sysroot"]),
    )?;
    let std_lib = std::path::Path::new(&sysroot).join(format!("lib/rustlib/{AARCH64}/lib"));
    let mut missing = Vec::new();
    if !std_lib.is_dir() {
        missing.push(format!("the {AARCH64} standard library"));
    }
    for tool in [AARCH64_GCC, QEMU_AARCH64] {
        if !crate::procs::have(tool) {
            missing.push(tool.to_owned());
        }
    }
    Ok(missing)
}
