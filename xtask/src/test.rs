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
    sh(cargo().args(["build", "--workspace", "--bins"]))?;
    let mut t = cargo();
    t.args(["test", "--workspace"]);
    if !a.rest.is_empty() {
        t.arg("--").args(&a.rest);
    }
    sh(&mut t)
}
