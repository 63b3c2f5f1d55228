//! Closed-loop peak throughput with wrk. Its Lua `done` hook prints one
//! machine-readable line, because wrk's own text output rounds latencies and
//! has no p99.9.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};

/// Request used by both load generators: a small completion request.
pub const REQUEST_BODY: &str =
    r#"{"model":"bench-model","prompt":"Say something short.","max_tokens":16,"temperature":0}"#;

#[derive(Clone)]
pub struct WrkResult {
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub errors: u64,
}

pub fn write_script(path: &Path) -> anyhow::Result<()> {
    write_script_with(path, "")
}

/// The script with `extra_headers` (Lua statements setting `wrk.headers[...]`),
/// e.g. `Connection: close` so every request opens a new connection.
pub fn write_script_with(path: &Path, extra_headers: &str) -> anyhow::Result<()> {
    let body = REQUEST_BODY.replace('\'', "\\'");
    let lua = format!(
        r#"wrk.method = "POST"
wrk.path = "/v1/completions"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
{extra_headers}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("XTASK requests=%d duration_us=%d errors=%d p50=%d p99=%d p999=%d\n",
    summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
"#
    );
    std::fs::write(path, lua)?;
    Ok(())
}

pub fn run(
    cpus: &str,
    script: &Path,
    port: u16,
    conns: usize,
    duration: Duration,
) -> anyhow::Result<WrkResult> {
    run_url(
        cpus,
        script,
        &format!("http://127.0.0.1:{port}/"),
        conns,
        duration,
    )
}

/// [`run`] against any base URL (`https://` makes wrk speak TLS; it does not verify
/// the certificate and does not resume sessions, so a new connection is a full handshake).
pub fn run_url(
    cpus: &str,
    script: &Path,
    url: &str,
    conns: usize,
    duration: Duration,
) -> anyhow::Result<WrkResult> {
    let secs = duration.as_secs().max(1);
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", cpus, "wrk", "-t1"])
        .arg(format!("-c{conns}"))
        .arg(format!("-d{secs}s"))
        .arg("--timeout")
        .arg("5s")
        .arg("-s")
        .arg(script)
        .arg(url);
    let out = cmd.output().context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk failed: {}\n{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let line = text
        .lines()
        .find(|l| l.starts_with("XTASK "))
        .with_context(|| format!("no summary line in wrk output:\n{text}"))?;
    let field = |k: &str| -> anyhow::Result<f64> {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
            .with_context(|| format!("{k} missing in {line}"))?
            .parse::<f64>()
            .with_context(|| format!("{k} in {line}"))
    };
    let requests = field("requests")?;
    let dur = field("duration_us")? / 1e6;
    Ok(WrkResult {
        rps: requests / dur.max(1e-9),
        p50_us: field("p50")?,
        p99_us: field("p99")?,
        p999_us: field("p999")?,
        errors: field("errors")? as u64,
    })
}
