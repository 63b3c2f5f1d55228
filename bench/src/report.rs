//! What the benchmarks' reports share: writing a report and saying where it went,
//! publishing it into `docs/bench/`, the stamp of when and from which commit it was
//! made, and markdown tables.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use anyhow::Context;

use crate::procs::{capture, git, root};

/// Writes `text` to `path` (creating its directory), without a word.
pub fn save(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
}

/// Writes `text` to `path` and prints where it went.
pub fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    save(path, text)?;
    eprintln!("xtask: wrote {}", path.display());
    Ok(())
}

/// Copies each `(file, name)` to `docs/bench/<name>` and prints where they went.
pub fn publish(files: &[(&Path, &str)]) -> anyhow::Result<()> {
    let docs = root().join("docs/bench");
    std::fs::create_dir_all(&docs)?;
    for (from, to) in files {
        std::fs::copy(from, docs.join(to))
            .with_context(|| format!("copy {} to {}", from.display(), docs.display()))?;
    }
    eprintln!("published to {}", docs.display());
    Ok(())
}

/// Now, as `YYYY-MM-DD HH:MM UTC`; empty if `date` fails.
pub fn generated() -> String {
    capture(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"])).unwrap_or_default()
}

/// The checked-out commit, abbreviated; empty outside a git checkout.
pub fn git_commit() -> String {
    capture(git().args(["rev-parse", "--short", "HEAD"])).unwrap_or_default()
}

/// A markdown table: `headers`, the first column left-aligned and the others right-aligned,
/// then `rows`, each padded with empty cells to the headers' width.
pub fn markdown_table<S: AsRef<str>>(headers: &[S], rows: &[Vec<String>]) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "{}", table_row(headers));
    let _ = writeln!(o, "| --- |{}", " ---: |".repeat(headers.len() - 1));
    for row in rows {
        let mut cells = row.clone();
        cells.resize(headers.len(), String::new());
        let _ = writeln!(o, "{}", table_row(&cells));
    }
    o
}

/// `| a | b | c |`.
pub fn table_row<S: AsRef<str>>(cells: &[S]) -> String {
    let cells: Vec<&str> = cells.iter().map(AsRef::as_ref).collect();
    format!("| {} |", cells.join(" | "))
}
