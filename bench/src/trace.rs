//! The trace the demo and the routing bench replay by default.

use std::path::{Path, PathBuf};

use crate::procs::root;

/// The vendored trace, relative to the workspace root (see `traces/README.md`).
pub const DEFAULT_TRACE: &str = "traces/conversation_trace.jsonl";

/// `--trace` if given, else the trace vendored in the repository; a clear error if missing.
pub fn resolve_trace(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let path = match given {
        Some(p) => p.to_path_buf(),
        None => root().join(DEFAULT_TRACE),
    };
    anyhow::ensure!(
        path.is_file(),
        "trace not found: {} (pass --trace FILE, a Mooncake-format JSONL trace such as \
         conversation_trace.jsonl; by default it is looked up at {DEFAULT_TRACE} relative to the \
         workspace root)",
        path.display()
    );
    Ok(path)
}
