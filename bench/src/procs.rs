//! Process helpers the benchmarks and the xtask commands share: cargo, git and `sh` in the
//! workspace root, and the workspace's paths.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root (this crate's manifest dir's parent).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("kvroute-bench lives in the workspace")
        .to_path_buf()
}

/// Cargo's target directory: `CARGO_TARGET_DIR` (relative to the workspace root, where
/// [`cargo`] runs) or `target/`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| if p.is_relative() { root().join(p) } else { p })
        .unwrap_or_else(|| root().join("target"))
}

/// `cargo build --release` of the two daemons, the set `cargo xtask package` ships, so
/// commands that build them share one feature resolution and one set of compiled
/// dependencies.
pub fn build_release_daemons() -> anyhow::Result<()> {
    sh(cargo().args([
        "build",
        "--release",
        "-p",
        "kvroute",
        "-p",
        "kvroute-control",
    ]))
}

/// Runs a command, failing with its name when it fails.
pub fn sh(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    eprintln!("xtask: {shown}");
    let st = cmd.status().map_err(|e| anyhow::anyhow!("{shown}: {e}"))?;
    anyhow::ensure!(st.success(), "{shown} failed with {st}");
    Ok(())
}

/// Whether `tool --version` runs and succeeds: the tool is installed.
pub fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

/// `git` in the workspace root.
pub fn git() -> Command {
    let mut c = Command::new("git");
    c.current_dir(root());
    c
}

/// Runs a command and returns its trimmed stdout, failing with its name when it fails.
pub fn capture(cmd: &mut Command) -> anyhow::Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| anyhow::anyhow!("{shown}: {e}"))?;
    anyhow::ensure!(out.status.success(), "{shown} failed with {}", out.status);
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}
