//! Real llama.cpp replicas for end-to-end tests and benchmarks: how `llama-server` is started on
//! the test model, and how to read what it reports (its Prometheus counters, the usage chunk of
//! a stream).
//!
//! `cargo xtask llama` builds the server and writes the model (`tests/llama/make_model.py`);
//! `cargo xtask test` exports their paths as `KVROUTE_LLAMA_SERVER` and `KVROUTE_LLAMA_MODEL`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use kvroute_testkit::metrics_text::Samples;

use crate::harness::{free_port, request, wait_until, Proc};

pub const ENV_SERVER: &str = "KVROUTE_LLAMA_SERVER";
pub const ENV_MODEL: &str = "KVROUTE_LLAMA_MODEL";
/// Set (by CI) to make a missing server or model a test failure instead of a skip.
pub const ENV_REQUIRE: &str = "KVROUTE_REQUIRE_LLAMA";

/// Context tokens of each replica, shared by its slots.
pub const DEFAULT_CTX: u32 = 8192;
/// Slots (sequences decoded together) of each replica.
pub const DEFAULT_SLOTS: u32 = 4;
/// How long a server may take to load the model and answer `/health`.
pub const READY: Duration = Duration::from_secs(60);

/// Where the server binary and the model are.
#[derive(Clone, Debug)]
pub struct LlamaPaths {
    pub server: PathBuf,
    pub model: PathBuf,
}

impl LlamaPaths {
    /// From `KVROUTE_LLAMA_SERVER` and `KVROUTE_LLAMA_MODEL`, or the reason they are unusable.
    pub fn from_env() -> anyhow::Result<LlamaPaths> {
        let get = |k: &str| -> anyhow::Result<PathBuf> {
            let p = std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "{k} is not set (`cargo xtask test` sets it after `cargo xtask llama`)"
                    )
                })?;
            anyhow::ensure!(p.is_file(), "{k}={} is not a file", p.display());
            Ok(p)
        };
        Ok(LlamaPaths {
            server: get(ENV_SERVER)?,
            model: get(ENV_MODEL)?,
        })
    }
}

/// The server and model for a test, or `None` after printing why the test is skipped; panics
/// instead when `KVROUTE_REQUIRE_LLAMA` is set.
pub fn paths_or_skip() -> Option<LlamaPaths> {
    match LlamaPaths::from_env() {
        Ok(p) => Some(p),
        Err(why) => {
            if std::env::var_os(ENV_REQUIRE).is_some() {
                panic!("a real llama.cpp server is required ({ENV_REQUIRE}) but {why}");
            }
            eprintln!("skipped: no llama.cpp server: {why}");
            None
        }
    }
}

/// `llama-server` flags for one replica named `name` on `addr`: one thread (the machines the
/// suite runs on have two cores for several processes), `slots` slots sharing `ctx` tokens,
/// metrics and the slot list on, loopback only. The name is the model alias, so every answer's
/// `model` field says which replica produced it.
pub fn server_args(
    paths: &LlamaPaths,
    name: &str,
    addr: SocketAddr,
    ctx: u32,
    slots: u32,
) -> Vec<String> {
    [
        "--model",
        &paths.model.display().to_string(),
        "--alias",
        name,
        "--host",
        &addr.ip().to_string(),
        "--port",
        &addr.port().to_string(),
        "--threads",
        "1",
        "--threads-batch",
        "1",
        "--ctx-size",
        &ctx.to_string(),
        "--parallel",
        &slots.to_string(),
        "--metrics",
        "--slots",
        "--no-warmup",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Whether `GET /health` answers 200 (503 while the model loads).
pub fn healthy(addr: SocketAddr) -> bool {
    request(
        addr,
        "GET /health HTTP/1.1\r\nHost: llama\r\nConnection: close\r\n\r\n",
    )
    .is_ok_and(|r| r.status == 200)
}

/// A running `llama-server`, killed when dropped.
pub struct LlamaServer {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub name: String,
}

impl LlamaServer {
    /// Starts replica `name` with [`server_args`] (plus `extra`) and waits for `/health`.
    pub fn start(paths: &LlamaPaths, name: &str, extra: &[&str]) -> LlamaServer {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let mut args = server_args(paths, name, addr, DEFAULT_CTX, DEFAULT_SLOTS);
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut cmd = Command::new(&paths.server);
        cmd.args(&args);
        let mut proc = Proc::spawn_command(cmd, &format!("llama-server {name}"));
        let up = wait_until(READY, || {
            healthy(addr) || proc.child.try_wait().ok().flatten().is_some()
        });
        assert!(
            up && proc.child.try_wait().ok().flatten().is_none(),
            "llama-server {name} did not become healthy on {addr} (KVROUTE_TEST_LOG=1 shows its log)"
        );
        LlamaServer {
            proc,
            addr,
            name: name.into(),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Its prompt-token counters now.
    pub fn counters(&self) -> Counters {
        counters(self.addr).unwrap_or_else(|e| panic!("GET /metrics of {}: {e}", self.name))
    }
}

/// A replica's own cumulative prompt-token counters (`--metrics`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// `llamacpp:prompt_tokens_total`: prompt tokens evaluated (cached ones excluded).
    pub processed: u64,
    /// `llamacpp:prompt_tokens_cached_total`: prompt tokens reused from its cache.
    pub cached: u64,
}

impl Counters {
    /// Every prompt token it was sent.
    pub fn prompt(&self) -> u64 {
        self.processed + self.cached
    }

    /// What was counted since `before`.
    pub fn since(&self, before: &Counters) -> Counters {
        Counters {
            processed: self.processed.saturating_sub(before.processed),
            cached: self.cached.saturating_sub(before.cached),
        }
    }

    /// Reads them from a `/metrics` page.
    pub fn parse(metrics: &str) -> Option<Counters> {
        let samples = Samples::parse(metrics);
        let value = |name: &str| samples.get(name, &[]).map(|v| v as u64);
        Some(Counters {
            processed: value("llamacpp:prompt_tokens_total")?,
            cached: value("llamacpp:prompt_tokens_cached_total")?,
        })
    }
}

/// `GET /metrics` of the server at `addr`, parsed.
pub fn counters(addr: SocketAddr) -> std::io::Result<Counters> {
    let r = request(
        addr,
        "GET /metrics HTTP/1.1\r\nHost: llama\r\nConnection: close\r\n\r\n",
    )?;
    if r.status != 200 {
        return Err(std::io::Error::other(format!("HTTP {}", r.status)));
    }
    Counters::parse(&r.text())
        .ok_or_else(|| std::io::Error::other("no llamacpp:prompt_tokens counters"))
}

/// The `usage` object of a server-sent-event stream (the last event that has one), if any.
pub fn stream_usage(sse: &str) -> Option<serde_json::Value> {
    sse.lines()
        .rev()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(str::trim)
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .find_map(|v| v.get("usage").filter(|u| u.is_object()).cloned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_from_a_metrics_page() {
        let page = "# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed\n\
                    # TYPE llamacpp:prompt_tokens_total counter\n\
                    llamacpp:prompt_tokens_total 1234\n\
                    llamacpp:prompt_tokens_cached_total 4321\n\
                    llamacpp:prompt_tokens_seconds 1000.5\n";
        let c = Counters::parse(page).unwrap();
        assert_eq!((c.processed, c.cached, c.prompt()), (1234, 4321, 5555));
        let later = Counters {
            processed: 2000,
            cached: 5000,
        };
        assert_eq!(
            later.since(&c),
            Counters {
                processed: 766,
                cached: 679
            }
        );
        assert_eq!(Counters::parse("llamacpp:prompt_tokens_total 1\n"), None);
    }

    #[test]
    fn usage_is_the_streams_last_usage_object() {
        let sse = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":null}\n\n\
                   data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"prompt_tokens_details\":{\"cached_tokens\":8}}}\n\n\
                   data: [DONE]\n\n";
        let u = stream_usage(sse).unwrap();
        assert_eq!(u["prompt_tokens_details"]["cached_tokens"], 8);
        assert_eq!(stream_usage("data: [DONE]\n"), None);
    }
}
