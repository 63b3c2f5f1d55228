//! `kvroute.toml` and the command line that overrides it.
//!
//! Unknown keys are rejected (serde `deny_unknown_fields`), and every value is
//! validated at start with a message naming the key, so a typo never silently
//! falls back to a default in production.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::io::IoMode;
use crate::replica::ReplicaSpec;
use crate::route::{PolicyKind, RoutingConfig};
use crate::steer::{SteeringKind, SteeringPolicy};

/// Where the admin API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminAddr {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl AdminAddr {
    /// A socket address means loopback TCP; anything else is a Unix socket path.
    pub fn parse(s: &str) -> Result<Self, Error> {
        match s.parse::<SocketAddr>() {
            Ok(a) if a.ip().is_loopback() => Ok(AdminAddr::Tcp(a)),
            Ok(a) => Err(Error::Config(format!(
                "admin: {a} is not a loopback address; the admin API must not be reachable from the network"
            ))),
            Err(_) if s.starts_with('/') || s.starts_with('.') => Ok(AdminAddr::Unix(s.into())),
            Err(_) => Err(Error::Config(format!(
                "admin: {s:?} is neither a loopback ip:port nor a Unix socket path"
            ))),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request head (request line + headers) → 431 beyond.
    pub max_head_bytes: usize,
    pub max_headers: usize,
    /// Largest request body → 413 beyond.
    pub max_body_bytes: usize,
    /// Time allowed for a request head to arrive once its first byte has → 408.
    pub head_timeout_ms: u64,
    /// Time allowed for the whole body → 408.
    pub body_timeout_ms: u64,
    /// Idle keep-alive client connections are closed after this.
    pub idle_timeout_ms: u64,
    /// A client that does not take response bytes for this long is dropped.
    pub write_timeout_ms: u64,
    /// Client connections over all workers (each worker holds its share,
    /// rounded up). 0: derived from `RLIMIT_NOFILE` ([`crate::budget::Caps`]).
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head_bytes: 32 * 1024,
            max_headers: 100,
            max_body_bytes: 32 * 1024 * 1024,
            head_timeout_ms: 10_000,
            body_timeout_ms: 60_000,
            idle_timeout_ms: 75_000,
            write_timeout_ms: 60_000,
            max_connections: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    pub connect_timeout_ms: u64,
    /// Time to the first response byte; prefill of a long prompt behind a queue can take minutes.
    pub first_byte_timeout_ms: u64,
    /// Longest gap between two response reads once streaming.
    pub read_timeout_ms: u64,
    /// Idle connections kept per replica per worker. Sized above the client
    /// concurrency a worker sees: a pool smaller than that opens a new upstream
    /// connection for a third of requests at 256 clients (measured), while idle
    /// ones cost only a socket until `pool_idle_timeout_ms` closes them.
    pub pool_max_idle: usize,
    /// Below uvicorn's 5 s keep-alive (vLLM, SGLang) so kvroute closes an idle
    /// connection before the replica does, instead of racing it.
    pub pool_idle_timeout_ms: u64,
    /// Attempts on another replica when one fails before any response byte.
    pub retries: u32,
    /// When a model's replicas all are unavailable for a moment (a rolling
    /// restart) or all are at their `max_in_flight`, requests wait up to this
    /// long in the admission queue instead of a 503 at once. 0: no queue.
    pub queue_timeout_ms: u64,
    /// Most requests the admission queue holds, over all workers and both
    /// reasons to wait; more get 503 (`overloaded`, with `Retry-After`) at once.
    pub queue_max: usize,
    /// `max_in_flight` of a replica whose spec sets none: the most requests
    /// this proxy keeps in flight on it. 0 (the default): unbounded, every
    /// request goes straight to the replica and waits in the engine's queue.
    pub max_in_flight_per_replica: u32,
    /// PEM bundle of the CAs that verify `https://` replicas. When set, only
    /// these are trusted (not the system roots as well: a fleet behind a
    /// private CA should not also accept a public certificate for its names).
    /// Unset (the default): the system's roots. Read at start.
    pub ca_file: Option<PathBuf>,
    /// Sent to every replica as `Authorization: Bearer <api_key>` (replacing a
    /// client's), whether or not `[auth]` is on. Read at start.
    pub api_key: Option<crate::auth::Secret>,
    /// A file whose first line is that key, so the secret need not sit in
    /// this file; exclusive with `api_key`.
    pub api_key_file: Option<PathBuf>,
    /// Passive health: consecutive failed attempts (refused or reset
    /// connection, invalid response, first-byte timeout, a body cut off) that
    /// take a replica out of rotation; 0 turns ejection off.
    pub eject_after_failures: u32,
    /// How long the first ejection lasts; each one that follows without a
    /// success in between lasts twice as long, up to `eject_max_ms`.
    pub eject_base_ms: u64,
    pub eject_max_ms: u64,
    /// Most of the active replicas ejected at once, in percent (at least one
    /// may always be); the last replica serving a model is never ejected.
    pub eject_max_percent: u32,
}

impl UpstreamConfig {
    pub fn ejection(&self) -> crate::ejection::EjectionPolicy {
        crate::ejection::EjectionPolicy {
            after_failures: self.eject_after_failures,
            base_ms: self.eject_base_ms,
            max_ms: self.eject_max_ms,
        }
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            connect_timeout_ms: 2_000,
            first_byte_timeout_ms: 300_000,
            read_timeout_ms: 300_000,
            pool_max_idle: 1024,
            pool_idle_timeout_ms: 4_000,
            retries: 1,
            queue_timeout_ms: 5_000,
            queue_max: 1024,
            max_in_flight_per_replica: 0,
            ca_file: None,
            api_key: None,
            api_key_file: None,
            eject_after_failures: 3,
            eject_base_ms: 5_000,
            eject_max_ms: 60_000,
            eject_max_percent: 50,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub listen: SocketAddr,
    /// Worker threads; absent means one per core.
    pub workers: Option<usize>,
    /// Pin each worker to its own core.
    pub pin_workers: bool,
    pub io: IoMode,
    /// Policy, prefix hashing and index settings (`[routing]`).
    pub routing: RoutingConfig,
    /// Admin API: a Unix socket path or a loopback `ip:port`.
    pub admin: String,
    /// An optional second admin listener on loopback TCP.
    pub admin_tcp: Option<SocketAddr>,
    /// Grace period for in-flight requests on SIGTERM/SIGINT.
    pub shutdown_grace_ms: u64,
    /// Log filter (tracing-subscriber EnvFilter syntax); `RUST_LOG` wins when set.
    pub log: String,
    pub limits: Limits,
    pub upstream: UpstreamConfig,
    pub replicas: Vec<ReplicaSpec>,
    /// Which worker takes a new connection: `ebpf` (default; the kernel's hash
    /// with a warning when BPF is unavailable), `kernel`, or `ebpf-required`.
    pub steering: SteeringKind,
    /// The BPF program's choice: `p2c` (default), `hash` or `cpu`.
    pub steering_mode: SteeringPolicy,
    /// Exact-match answers for deterministic requests (`[prediction_cache]`).
    pub prediction_cache: crate::cache::PredictionCacheConfig,
    /// `[tls]`: TLS on the client listener (`cert`, `key`: PEM paths, re-read
    /// on SIGHUP). Absent (the default), the listener speaks plain HTTP.
    pub tls: Option<crate::tls::TlsConfig>,
    /// API keys with per-key limits (`[auth]`).
    pub auth: crate::auth::AuthConfig,
}

pub const DEFAULT_ADMIN: &str = "/run/kvroute/admin.sock";

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8080".parse().expect("literal"),
            workers: None,
            pin_workers: true,
            io: IoMode::Auto,
            routing: RoutingConfig::default(),
            admin: DEFAULT_ADMIN.into(),
            admin_tcp: None,
            shutdown_grace_ms: 30_000,
            log: "info".into(),
            limits: Limits::default(),
            upstream: UpstreamConfig::default(),
            replicas: Vec::new(),
            steering: SteeringKind::default(),
            steering_mode: SteeringPolicy::default(),
            prediction_cache: Default::default(),
            tls: None,
            auth: Default::default(),
        }
    }
}

/// Command line; every flag overrides the file.
#[derive(Parser, Debug, Default)]
#[command(
    name = "kvroute",
    version,
    about = "KV-cache-aware reverse proxy for LLM inference replicas"
)]
pub struct Cli {
    /// Path of kvroute.toml.
    #[arg(long, short, global = true)]
    pub config: Option<PathBuf>,
    /// Address clients connect to.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Worker threads (default: one per core).
    #[arg(long)]
    pub workers: Option<usize>,
    #[arg(long, value_enum)]
    pub io: Option<IoMode>,
    #[arg(long, value_parser = policy_parser())]
    pub policy: Option<PolicyKind>,
    /// A replica: `http://host:port`, optionally `=model1,model2`; repeatable.
    /// Replaces the file's replica list when given.
    #[arg(long = "replica")]
    pub replicas: Vec<String>,
    /// Admin API: Unix socket path or loopback ip:port.
    #[arg(long, global = true)]
    pub admin: Option<String>,
    /// Connection steering across workers: ebpf, kernel or ebpf-required.
    #[arg(long, value_enum)]
    pub steering: Option<SteeringKind>,
    /// The eBPF program's choice: p2c, hash or cpu.
    #[arg(long, value_enum)]
    pub steering_mode: Option<SteeringPolicy>,
    /// Validate the configuration and exit.
    #[arg(long)]
    pub check_config: bool,
    #[command(subcommand)]
    pub command: Option<CliCommand>,
}

/// Commands for a running kvroute (found through its admin API).
#[derive(clap::Subcommand, Debug)]
pub enum CliCommand {
    /// Zero-downtime upgrade: the running kvroute starts its binary again, hands
    /// its listeners' socket array over, and drains (same as SIGUSR2).
    Upgrade,
}

impl Config {
    pub fn load(cli: &Cli) -> Result<Config, Error> {
        let mut cfg = match &cli.config {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| Error::Config(format!("{}: {e}", p.display())))?;
                Config::from_toml(&text).map_err(|e| match e {
                    Error::Config(m) => Error::Config(format!("{}: {m}", p.display())),
                    other => other,
                })?
            }
            None => Config::default(),
        };
        if let Some(l) = cli.listen {
            cfg.listen = l;
        }
        if cli.workers.is_some() {
            cfg.workers = cli.workers;
        }
        if let Some(io) = cli.io {
            cfg.io = io;
        }
        if let Some(p) = cli.policy {
            cfg.routing.policy = p;
        }
        if let Some(s) = cli.steering {
            cfg.steering = s;
        }
        if let Some(m) = cli.steering_mode {
            cfg.steering_mode = m;
        }
        if let Some(a) = &cli.admin {
            cfg.admin = a.clone();
        }
        if !cli.replicas.is_empty() {
            cfg.replicas = cli.replicas.iter().map(|r| parse_replica_arg(r)).collect();
        }
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_toml(text: &str) -> Result<Config, Error> {
        toml::from_str(text).map_err(|e| Error::Config(e.to_string().trim_end().to_string()))
    }

    pub fn validate(&self) -> Result<(), Error> {
        let bad = |k: &str, why: &str| Err(Error::Config(format!("{k}: {why}")));
        if self.workers == Some(0) {
            return bad("workers", "must be at least 1");
        }
        if self.workers.is_some_and(|w| w > 1024) {
            return bad("workers", "at most 1024");
        }
        if self.limits.max_head_bytes < 1024 {
            return bad("limits.max_head_bytes", "must be at least 1024");
        }
        if self.limits.max_headers == 0 {
            return bad("limits.max_headers", "must be at least 1");
        }
        if self.limits.max_body_bytes == 0 {
            return bad("limits.max_body_bytes", "must be at least 1");
        }
        for (k, v) in [
            ("limits.head_timeout_ms", self.limits.head_timeout_ms),
            ("limits.body_timeout_ms", self.limits.body_timeout_ms),
            ("limits.idle_timeout_ms", self.limits.idle_timeout_ms),
            ("limits.write_timeout_ms", self.limits.write_timeout_ms),
            (
                "upstream.connect_timeout_ms",
                self.upstream.connect_timeout_ms,
            ),
            (
                "upstream.first_byte_timeout_ms",
                self.upstream.first_byte_timeout_ms,
            ),
            ("upstream.read_timeout_ms", self.upstream.read_timeout_ms),
        ] {
            if v == 0 {
                return bad(k, "must be greater than 0");
            }
        }
        let up = &self.upstream;
        if up.eject_after_failures > 0 {
            if up.eject_base_ms == 0 {
                return bad("upstream.eject_base_ms", "must be greater than 0");
            }
            if up.eject_max_ms < up.eject_base_ms {
                return bad("upstream.eject_max_ms", "must be at least eject_base_ms");
            }
            if up.eject_max_percent > 100 {
                return bad("upstream.eject_max_percent", "at most 100");
            }
        }
        self.routing.validate()?;
        self.prediction_cache.validate()?;
        if self.upstream.api_key.is_some() && self.upstream.api_key_file.is_some() {
            return bad(
                "upstream.api_key_file",
                "api_key and api_key_file are exclusive; set one",
            );
        }
        AdminAddr::parse(&self.admin)?;
        if let Some(a) = self.admin_tcp {
            if !a.ip().is_loopback() {
                return bad("admin_tcp", "must be a loopback address");
            }
        }
        for (i, r) in self.replicas.iter().enumerate() {
            crate::resolve::endpoint(&r.url)
                .map_err(|e| Error::Config(format!("replicas[{i}].url: {e}")))?;
            if r.weight == 0 {
                return bad(&format!("replicas[{i}].weight"), "must be at least 1");
            }
        }
        // Duplicates and the replica cap, as the table refuses them.
        crate::replica::check_urls(&self.replicas)?;
        Ok(())
    }

    pub fn worker_count(&self) -> usize {
        self.workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }
}

/// `http://h:p` or `http://h:p=model-a,model-b`.
fn parse_replica_arg(s: &str) -> ReplicaSpec {
    match s.split_once('=') {
        Some((url, models)) => {
            let mut spec = ReplicaSpec::new(url);
            spec.models = models
                .split(',')
                .filter(|m| !m.is_empty())
                .map(String::from)
                .collect();
            spec
        }
        None => ReplicaSpec::new(s),
    }
}

/// `--policy`: the names [`PolicyKind`] reads, listed in `--help` and in the
/// error for any other.
fn policy_parser() -> impl clap::builder::TypedValueParser<Value = PolicyKind> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(PolicyKind::ALL.map(PolicyKind::as_str))
        .map(|name| name.parse::<PolicyKind>().expect("one of PolicyKind::ALL"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_flag_takes_the_config_names_and_lists_them() {
        use clap::Parser;
        for kind in PolicyKind::ALL {
            let cli = Cli::try_parse_from(["kvroute", "--policy", kind.as_str()]).unwrap();
            assert_eq!(cli.policy, Some(kind));
        }
        let e = Cli::try_parse_from(["kvroute", "--policy", "kv_aware"]).unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains("[possible values: round-robin, least-loaded, kv-aware, consistent-hash]"),
            "{e}"
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = Config::from_toml("listen = \"127.0.0.1:1\"\nworkerz = 2\n").unwrap_err();
        assert!(e.to_string().contains("workerz"), "{e}");
        let e = Config::from_toml("[limits]\nmax_body = 1\n").unwrap_err();
        assert!(e.to_string().contains("max_body"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        let c = Config::from_toml("workers = 0\n").unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("workers"));
        let c = Config::from_toml("[[replicas]]\nurl = \"ftp://x\"\n").unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("replicas[0].url"));
        let c = Config::from_toml("admin = \"0.0.0.0:9090\"\n").unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("loopback"));
        let e = Config::from_toml("io = \"kqueue\"\n").unwrap_err();
        assert!(e.to_string().contains("kqueue"), "{e}");
    }

    #[test]
    fn full_file_round_trips() {
        let c = Config::from_toml(
            r#"
listen = "127.0.0.1:8080"
workers = 2
io = "epoll"
admin = "127.0.0.1:9090"
[routing]
policy = "least-loaded"
[limits]
max_body_bytes = 1048576
[upstream]
retries = 0
[[replicas]]
url = "http://127.0.0.1:8001"
models = ["llama"]
weight = 2
"#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.worker_count(), 2);
        assert_eq!(c.replicas[0].weight, 2);
        assert_eq!(c.routing.policy, PolicyKind::LeastLoaded);
        assert_eq!(
            AdminAddr::parse(&c.admin).unwrap(),
            AdminAddr::Tcp("127.0.0.1:9090".parse().unwrap())
        );
    }

    /// The shipped, commented config is the documentation of every key: it must
    /// stay valid and equal to the defaults (but for its one example replica).
    #[test]
    fn shipped_default_config_is_valid_and_matches_defaults() {
        let c = Config::from_toml(include_str!("../../deploy/kvroute.toml")).unwrap();
        c.validate().unwrap();
        let expected = Config {
            replicas: c.replicas.clone(),
            ..Config::default()
        };
        assert_eq!(c.replicas.len(), 1);
        assert_eq!(c, expected);
    }

    /// The example configs under deploy/sidecar/ parse and validate as shipped
    /// (their TLS and key files are the operator's to provide).
    #[test]
    fn shipped_example_configs_are_valid() {
        for (name, text) in [
            ("edge.toml", include_str!("../../deploy/sidecar/edge.toml")),
            (
                "kvroute.toml",
                include_str!("../../deploy/sidecar/kvroute.toml"),
            ),
        ] {
            let c = Config::from_toml(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            c.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn max_connections_is_derived_unless_set() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.limits.max_connections, 0);
        let c = Config::from_toml("[limits]\nmax_connections = 0\n").unwrap();
        c.validate().unwrap();
        assert_eq!(c.limits.max_connections, 0);
        let c = Config::from_toml("workers = 4\n[limits]\nmax_connections = 40\n").unwrap();
        c.validate().unwrap();
        assert_eq!(c.limits.max_connections, 40);
        let caps = crate::budget::caps(c.limits.max_connections, c.worker_count(), 1024);
        assert_eq!((caps.max_connections, caps.per_worker), (40, 10));
        let e = Config::from_toml("[limits]\nmax_connections = -1\n").unwrap_err();
        assert!(e.to_string().contains("max_connections"), "{e}");
        let e = Config::from_toml("[limits]\nmax_connections = \"many\"\n").unwrap_err();
        assert!(e.to_string().contains("max_connections"), "{e}");
    }

    #[test]
    fn cli_replica_with_models() {
        let r = parse_replica_arg("http://127.0.0.1:1=a,b");
        assert_eq!(r.url, "http://127.0.0.1:1");
        assert_eq!(r.models, vec!["a", "b"]);
    }
}
