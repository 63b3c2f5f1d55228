//! `cargo xtask test`: the whole suite, the same command CI runs.
//!
//! The end-to-end tests start the real binaries, so those are built first;
//! both I/O runtimes are exercised by the tests themselves.

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
