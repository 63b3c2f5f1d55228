//! `control.toml`: what to push to, which replicas exist, and how to watch them.
//!
//! Every table denies unknown keys: a typo such as `interval = 500` under
//! `[health]` would otherwise be silently ignored and the default used.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kvroute_admin_api::Pool;
use serde::{Deserialize, Serialize};

use crate::error::{ControlError, Result};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Admin endpoints of the data planes: `/path/admin.sock`, `unix:/path`,
    /// `127.0.0.1:9090` or `http://127.0.0.1:9090`.
    pub dataplanes: Vec<String>,
    /// Where to serve the daemon's own `/metrics` and `/healthz`.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Name recorded by the data plane as the pusher; default `kvroute-control@HOST`.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub replicas: Vec<ReplicaConfig>,
    /// A JSON or TOML list of replicas, re-read within a second of a change.
    #[serde(default)]
    pub replicas_file: Option<PathBuf>,
    #[serde(default)]
    pub dns: Vec<DnsConfig>,
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default)]
    pub scrape: ScrapeConfig,
    #[serde(default)]
    pub push: PushConfig,
    #[serde(default)]
    pub warm: WarmConfig,
    #[serde(default)]
    pub drain: DrainConfig,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DrainConfig {
    /// A drained replica leaves once every data plane reports nothing in flight
    /// on it, or after this long whatever they report.
    pub timeout_ms: u64,
}

impl Default for DrainConfig {
    fn default() -> Self {
        DrainConfig { timeout_ms: 30_000 }
    }
}

/// Which engine a replica runs: decides metric names and where capacity comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// Decided from the metric names of the replica's first successful scrape
    /// (and again after the engine restarts); see `detect.rs`.
    #[default]
    Auto,
    Vllm,
    Sglang,
    /// llama.cpp's `llama-server`: load from `--metrics` (or `/slots`),
    /// capacity from `/props`, its slots and host prompt cache as the budget.
    #[serde(alias = "llama.cpp", alias = "llama-cpp")]
    Llamacpp,
    /// Any OpenAI-compatible server: health-checked, no metrics or events.
    Openai,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Auto => "auto",
            Engine::Vllm => "vllm",
            Engine::Sglang => "sglang",
            Engine::Llamacpp => "llamacpp",
            Engine::Openai => "openai",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaConfig {
    pub url: String,
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub pool: Pool,
    #[serde(default)]
    pub engine: Engine,
    #[serde(default = "one")]
    pub weight: u32,
    /// Default `URL/metrics` for every engine but `openai`.
    #[serde(default)]
    pub metrics_url: Option<String>,
    /// ZMQ endpoint of data-parallel rank 0, e.g. `tcp://10.0.0.5:5557`;
    /// rank r publishes on port + r.
    #[serde(default)]
    pub kv_events: Option<String>,
    /// ZMQ endpoint of rank 0's replay socket (vLLM's `replay_endpoint`), e.g.
    /// `tcp://10.0.0.5:5558`; rank r answers on port + r. Batches a sequence gap
    /// shows missing are fetched from it before the batch after them is applied.
    #[serde(default)]
    pub kv_events_replay: Option<String>,
    #[serde(default = "one")]
    pub dp_ranks: u32,
    /// Health check path for this replica, when it differs from `[health] path`.
    #[serde(default)]
    pub health_path: Option<String>,
    /// llama.cpp: tokens of prompts its host prompt cache (`--cache-ram`) keeps;
    /// 0 when started with `--cache-ram 0`. Default: the server's total context
    /// (`total_slots` × `n_ctx` per slot), the least that cache keeps while its
    /// memory lasts.
    #[serde(default)]
    pub host_cache_tokens: Option<u64>,
    /// Pushed as the replica's `max_in_flight`: the most requests each data
    /// plane keeps in flight on it (near the engine's `max_num_seqs`). Unset:
    /// the data plane's `[upstream] max_in_flight_per_replica`.
    #[serde(default)]
    pub max_in_flight: Option<u32>,
}

fn one() -> u32 {
    1
}

impl ReplicaConfig {
    pub fn metrics_url(&self) -> Option<String> {
        match (&self.metrics_url, self.engine) {
            (Some(u), _) => Some(u.clone()),
            (None, Engine::Openai) => None,
            (None, _) => Some(format!("{}/metrics", self.url.trim_end_matches('/'))),
        }
    }
}

/// DNS discovery: every address `name` resolves to becomes a replica.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    pub name: String,
    /// Replica port for A/AAAA records (SRV records carry their own).
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub record: DnsRecord,
    #[serde(default = "default_dns_interval")]
    pub interval_ms: u64,
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub pool: Pool,
    #[serde(default)]
    pub engine: Engine,
    /// KV events port of each resolved host (rank 0), when engines publish them.
    #[serde(default)]
    pub kv_events_port: Option<u16>,
    /// KV events replay port of each resolved host (rank 0), when engines serve one.
    #[serde(default)]
    pub kv_events_replay_port: Option<u16>,
    /// DNS server for SRV lookups (e.g. Consul's `127.0.0.1:8600`); default the
    /// system's (`/etc/resolv.conf`).
    #[serde(default)]
    pub nameserver: Option<SocketAddr>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DnsRecord {
    /// A and AAAA through the system resolver (`/etc/hosts` included).
    #[default]
    A,
    /// SRV records (a Kubernetes headless Service's named port, Consul): each
    /// target and port becomes a replica, targets resolved as A/AAAA.
    Srv,
}

fn default_dns_interval() -> u64 {
    5000
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// Consecutive successes that bring a failed replica back.
    pub rise: u32,
    /// Consecutive failures that take a replica out.
    pub fall: u32,
    pub path: String,
    /// Also take a replica out when the data planes report failed attempts on
    /// it in `fall` consecutive reads of their `/state` (back after `rise` quiet ones).
    pub passive: bool,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval_ms: 500,
            timeout_ms: 400,
            rise: 2,
            fall: 2,
            path: "/health".into(),
            passive: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScrapeConfig {
    pub interval_ms: u64,
    pub timeout_ms: u64,
}

impl Default for ScrapeConfig {
    fn default() -> Self {
        ScrapeConfig {
            interval_ms: 500,
            timeout_ms: 400,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PushConfig {
    /// How often each data plane's `/state` is read to notice a restart.
    pub resync_ms: u64,
    pub timeout_ms: u64,
}

impl Default for PushConfig {
    fn default() -> Self {
        PushConfig {
            resync_ms: 500,
            timeout_ms: 2000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WarmConfig {
    /// Promote a standby when an active replica fails.
    pub promote_on_failure: bool,
    /// Promote when the active pool's mean waiting queue stays above this...
    pub promote_waiting: f64,
    /// ...for this long.
    pub promote_window_ms: u64,
    /// Demote an overload promotion once the mean waiting stays below this...
    pub demote_waiting: f64,
    /// ...for this long (hysteresis: longer than the promote window).
    pub demote_window_ms: u64,
    /// Hot prefixes replayed to a standby before it is promoted.
    pub prewarm_prefixes: usize,
    /// Bound on the whole pre-warm; a standby that does not finish is not promoted.
    pub prewarm_timeout_ms: u64,
}

impl Default for WarmConfig {
    fn default() -> Self {
        WarmConfig {
            promote_on_failure: true,
            promote_waiting: 8.0,
            promote_window_ms: 5000,
            demote_waiting: 1.0,
            demote_window_ms: 30000,
            prewarm_prefixes: 16,
            prewarm_timeout_ms: 5000,
        }
    }
}

pub fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

impl Config {
    pub fn load(path: &Path) -> Result<Config> {
        let err = |msg: String| ControlError::Config {
            path: path.to_path_buf(),
            msg,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let cfg: Config = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        cfg.validate().map_err(|e| err(e.to_string()))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ControlError::Invalid(m));
        if self.dataplanes.is_empty() {
            return bad("dataplanes: at least one data plane admin address is needed".into());
        }
        for d in &self.dataplanes {
            crate::http::Target::parse_admin(d)?;
        }
        let h = &self.health;
        if h.interval_ms == 0 || h.timeout_ms == 0 || h.rise == 0 || h.fall == 0 {
            return bad("health: interval_ms, timeout_ms, rise and fall must be > 0".into());
        }
        if !h.path.starts_with('/') {
            return bad(format!("health.path {:?} must start with /", h.path));
        }
        if !(10..=60_000).contains(&self.scrape.interval_ms) || self.scrape.timeout_ms == 0 {
            return bad("scrape: interval_ms must be 10..=60000 and timeout_ms > 0".into());
        }
        if self.push.resync_ms == 0 || self.push.timeout_ms == 0 {
            return bad("push: resync_ms and timeout_ms must be > 0".into());
        }
        let mut seen = std::collections::HashSet::new();
        for r in &self.replicas {
            validate_replica(r)?;
            if !seen.insert(r.url.as_str()) {
                return bad(format!("replicas: duplicate url {}", r.url));
            }
        }
        for d in &self.dns {
            if d.name.is_empty() || d.interval_ms == 0 {
                return bad("dns: name must be set and interval_ms > 0".into());
            }
            if d.record == DnsRecord::A && d.port.is_none() {
                return bad(format!("dns {:?}: A/AAAA records need a port", d.name));
            }
        }
        if self.warm.demote_waiting > self.warm.promote_waiting {
            return bad("warm: demote_waiting must not exceed promote_waiting".into());
        }
        Ok(())
    }
}

/// The address of a plain `http://host[:port][/]` URL (port 80 when left out),
/// resolved once: the daemon's own requests to replicas are plain HTTP, and a
/// name that does not resolve at start is a config error.
pub fn http_url_addr(url: &str) -> Result<SocketAddr> {
    let bad = |why: &str| ControlError::Invalid(format!("replica {url}: {why}"));
    if !url.starts_with("http://") {
        return Err(bad("must start with http://"));
    }
    let u = kvroute_admin_api::ReplicaUrl::parse(url).map_err(|e| bad(&e.to_string()))?;
    use std::net::ToSocketAddrs;
    u.host_port
        .to_socket_addrs()
        .map_err(|e| bad(&format!("cannot resolve: {e}")))?
        .next()
        .ok_or_else(|| bad("resolved to no address"))
}

pub fn validate_replica(r: &ReplicaConfig) -> Result<()> {
    http_url_addr(&r.url)?;
    if let Some(ev) = &r.kv_events {
        kv_endpoint(ev, 0)?;
    }
    if let Some(ev) = &r.kv_events_replay {
        if r.kv_events.is_none() {
            return Err(ControlError::Invalid(format!(
                "replica {}: kv_events_replay needs kv_events",
                r.url
            )));
        }
        kv_endpoint(ev, 0)?;
    }
    if r.health_path.as_ref().is_some_and(|p| !p.starts_with('/')) {
        return Err(ControlError::Invalid(format!(
            "replica {}: health_path must start with /",
            r.url
        )));
    }
    if r.dp_ranks == 0 || r.dp_ranks > 256 {
        return Err(ControlError::Invalid(format!(
            "replica {}: dp_ranks must be 1..=256",
            r.url
        )));
    }
    Ok(())
}

/// The endpoint data-parallel rank `rank` publishes on: base port + rank.
pub fn kv_endpoint(base: &str, rank: u32) -> Result<String> {
    let bad = || ControlError::Invalid(format!("kv_events {base:?}: expected tcp://host:port"));
    let rest = base.strip_prefix("tcp://").ok_or_else(bad)?;
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    let port: u32 = port.parse().map_err(|_| bad())?;
    let p = port + rank;
    if host.is_empty() || p > u16::MAX as u32 {
        return Err(bad());
    }
    Ok(format!("tcp://{host}:{p}"))
}

/// A replica list file: JSON (`[...]` or `{"replicas": [...]}`) when the name ends
/// in `.json`, else TOML (`[[replicas]]`).
pub fn load_replica_file(path: &Path) -> Result<Vec<ReplicaConfig>> {
    let err = |msg: String| ControlError::ReplicaFile {
        path: path.to_path_buf(),
        msg,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Wrapped {
        #[serde(default)]
        replicas: Vec<ReplicaConfig>,
    }
    let list = if path.extension().is_some_and(|e| e == "json") {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Json {
            List(Vec<ReplicaConfig>),
            Wrapped(Wrapped),
        }
        match serde_json::from_str::<Json>(&text) {
            Ok(Json::List(l)) => l,
            Ok(Json::Wrapped(w)) => w.replicas,
            // Untagged errors say nothing useful; the list form's error does.
            Err(_) => {
                serde_json::from_str::<Vec<ReplicaConfig>>(&text).map_err(|e| err(e.to_string()))?
            }
        }
    } else {
        toml::from_str::<Wrapped>(&text)
            .map_err(|e| err(e.to_string()))?
            .replicas
    };
    let mut seen = std::collections::HashSet::new();
    for r in &list {
        validate_replica(r).map_err(|e| err(e.to_string()))?;
        if !seen.insert(r.url.clone()) {
            return Err(err(format!("duplicate url {}", r.url)));
        }
    }
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config> {
        let c: Config = toml::from_str(s).map_err(|e| ControlError::Invalid(e.to_string()))?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn replica_urls_are_plain_http_with_no_path() {
        assert!(http_url_addr("https://127.0.0.1:1").is_err());
        assert!(http_url_addr("http://127.0.0.1:1/v1").is_err());
        assert!(http_url_addr("http://").is_err());
        assert_eq!(
            http_url_addr("http://127.0.0.1:8001/").unwrap().port(),
            8001
        );
        assert_eq!(http_url_addr("http://127.0.0.1").unwrap().port(), 80);
        assert_eq!(http_url_addr("http://[::1]:9").unwrap().port(), 9);
    }

    #[test]
    fn issue_shape_parses_with_defaults() {
        let c = parse(
            r#"
            dataplanes = ["127.0.0.1:9090", "/run/kvroute/admin.sock"]
            [[replicas]]
            url = "http://10.0.0.5:8000"
            pool = "active"
            engine = "vllm"
            [health]
            interval_ms = 500
            "#,
        )
        .unwrap();
        assert_eq!(c.dataplanes.len(), 2);
        assert_eq!(c.replicas[0].engine, Engine::Vllm);
        assert_eq!(c.health.fall, 2);
        assert_eq!(
            c.replicas[0].metrics_url().as_deref(),
            Some("http://10.0.0.5:8000/metrics")
        );
    }

    #[test]
    fn the_example_config_is_valid() {
        let c = parse(include_str!("../control.example.toml")).unwrap();
        assert_eq!(c.dns[1].record, DnsRecord::Srv);
        assert_eq!(c.replicas[1].pool, Pool::Warm);
    }

    #[test]
    fn typos_and_bad_values_are_rejected_with_the_key() {
        let e = parse("dataplanes=[\"127.0.0.1:1\"]\n[health]\ninterval=5\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("interval"), "{e}");
        let e = parse("dataplanes=[]\n").unwrap_err().to_string();
        assert!(e.contains("dataplanes"), "{e}");
        let e = parse("dataplanes=[\"127.0.0.1:1\"]\n[[replicas]]\nurl=\"https://x:1\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("http://"), "{e}");
        let e = parse(
            "dataplanes=[\"127.0.0.1:1\"]\n[[replicas]]\nurl=\"http://127.0.0.1:1\"\nengine=\"tgi\"\n",
        )
        .unwrap_err().to_string();
        assert!(e.contains("tgi"), "{e}");
        let e = parse("dataplanes=[\"127.0.0.1:1\"]\n[[dns]]\nname=\"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("port"), "{e}");
        assert!(parse("dataplanes=[\"nonsense\"]\n").is_err());
        let e = parse(
            "dataplanes=[\"127.0.0.1:1\"]\n[[replicas]]\nurl=\"http://127.0.0.1:1\"\nkv_events_replay=\"tcp://127.0.0.1:5558\"\n",
        )
        .unwrap_err().to_string();
        assert!(e.contains("needs kv_events"), "{e}");
    }

    #[test]
    fn engines_default_to_auto_and_llamacpp_has_its_keys() {
        let c = parse(
            "dataplanes=[\"127.0.0.1:1\"]\n[[replicas]]\nurl=\"http://127.0.0.1:2\"\n\
             [[replicas]]\nurl=\"http://127.0.0.1:3\"\nengine=\"llamacpp\"\nhost_cache_tokens=0\nmax_in_flight=4\n\
             [[replicas]]\nurl=\"http://127.0.0.1:4\"\nengine=\"llama.cpp\"\n",
        )
        .unwrap();
        assert_eq!(c.replicas[0].engine, Engine::Auto);
        assert_eq!(
            c.replicas[0].metrics_url().as_deref(),
            Some("http://127.0.0.1:2/metrics")
        );
        assert_eq!(c.replicas[1].engine, Engine::Llamacpp);
        assert_eq!(c.replicas[1].host_cache_tokens, Some(0));
        assert_eq!(c.replicas[1].max_in_flight, Some(4));
        assert_eq!(c.replicas[0].max_in_flight, None);
        assert_eq!(c.replicas[2].engine, Engine::Llamacpp);
        let d = parse("dataplanes=[\"127.0.0.1:1\"]\n[[dns]]\nname=\"x\"\nport=1\n").unwrap();
        assert_eq!(d.dns[0].engine, Engine::Auto);
    }

    #[test]
    fn kv_endpoint_adds_the_rank() {
        assert_eq!(
            kv_endpoint("tcp://127.0.0.1:5557", 2).unwrap(),
            "tcp://127.0.0.1:5559"
        );
        assert!(kv_endpoint("ipc:///x", 0).is_err());
        assert!(kv_endpoint("tcp://h:65535", 1).is_err());
    }

    #[test]
    fn replica_files_in_json_and_toml() {
        let dir = std::env::temp_dir().join(format!("kvrc-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let j = dir.join("r.json");
        std::fs::write(&j, r#"[{"url":"http://127.0.0.1:1","pool":"warm"}]"#).unwrap();
        assert_eq!(load_replica_file(&j).unwrap()[0].pool, Pool::Warm);
        std::fs::write(&j, r#"{"replicas":[{"url":"http://127.0.0.1:2"}]}"#).unwrap();
        assert_eq!(load_replica_file(&j).unwrap()[0].url, "http://127.0.0.1:2");
        std::fs::write(&j, r#"[{"url":"http://127.0.0.1:1","colour":1}]"#).unwrap();
        let e = load_replica_file(&j).unwrap_err().to_string();
        assert!(e.contains("colour"), "{e}");
        let t = dir.join("r.toml");
        std::fs::write(
            &t,
            "[[replicas]]\nurl=\"http://127.0.0.1:3\"\nengine=\"sglang\"\n",
        )
        .unwrap();
        assert_eq!(load_replica_file(&t).unwrap()[0].engine, Engine::Sglang);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
