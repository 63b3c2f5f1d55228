//! Where replicas come from besides the static list: a watched file and DNS.
//!
//! Each source sends its complete current list; the daemon merges sources. A
//! source that fails (a half-written file, a DNS timeout) sends nothing, so the
//! replicas it last reported stay: losing a whole pool because a resolver blinked
//! would be worse than serving a stale list for a few seconds.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;

use crate::config::{load_replica_file, DnsConfig, DnsRecord, ReplicaConfig};
use crate::error::{ControlError, Result};

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    Static,
    File,
    Dns(usize),
}

#[derive(Debug)]
pub struct Discovered {
    pub source: Source,
    pub replicas: Vec<ReplicaConfig>,
}

/// Polls the file's modification time, length and content: inotify would be
/// quicker, but editors that write a temp file and rename over the original,
/// bind mounts and ConfigMap symlink swaps all show up in a poll.
pub async fn watch_file(
    path: PathBuf,
    poll: Duration,
    out: mpsc::UnboundedSender<crate::daemon::Msg>,
) {
    let mut last: Option<(Option<SystemTime>, u64, u64)> = None;
    loop {
        let meta = tokio::fs::metadata(&path).await;
        let key = match &meta {
            Ok(m) => {
                let content = tokio::fs::read(&path).await.unwrap_or_default();
                Some((m.modified().ok(), m.len(), fnv(&content)))
            }
            Err(_) => None,
        };
        if key.is_some() && key != last {
            match load_replica_file(&path) {
                Ok(replicas) => {
                    tracing::info!(file = %path.display(), replicas = replicas.len(), "replica file loaded");
                    last = key;
                    let msg = crate::daemon::Msg::Discovered(Discovered {
                        source: Source::File,
                        replicas,
                    });
                    if out.send(msg).is_err() {
                        return;
                    }
                }
                // Not remembered as seen: the next write (the rest of the file) retries.
                Err(e) => {
                    tracing::warn!(error = %e, "replica file rejected, keeping the last good list")
                }
            }
        } else if key.is_none() && last.is_some() {
            tracing::warn!(file = %path.display(), "replica file missing, keeping the last good list");
            last = None;
        }
        tokio::time::sleep(poll).await;
    }
}

fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf29ce484222325u64, |h, x| {
        (h ^ u64::from(*x)).wrapping_mul(0x100000001b3)
    })
}

pub type Lookup<'a, T = Vec<IpAddr>> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// Name resolution, behind a trait so tests can script answers.
pub trait Resolver: Send + Sync + 'static {
    fn lookup_ip<'a>(&'a self, name: &'a str) -> Lookup<'a>;
    /// SRV records as (target host, port), from `nameserver` when given (Consul
    /// answers on its own port) or the system's resolvers.
    fn lookup_srv<'a>(
        &'a self,
        name: &'a str,
        nameserver: Option<SocketAddr>,
    ) -> Lookup<'a, Vec<(String, u16)>>;
}

/// The system resolver (getaddrinfo: `/etc/hosts`, then DNS), A and AAAA.
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn lookup_ip<'a>(&'a self, name: &'a str) -> Lookup<'a> {
        Box::pin(async move {
            let addrs =
                tokio::net::lookup_host((name, 0))
                    .await
                    .map_err(|e| ControlError::Dns {
                        name: name.to_string(),
                        msg: e.to_string(),
                    })?;
            let mut ips: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
            ips.sort();
            ips.dedup();
            Ok(ips)
        })
    }

    fn lookup_srv<'a>(
        &'a self,
        name: &'a str,
        nameserver: Option<SocketAddr>,
    ) -> Lookup<'a, Vec<(String, u16)>> {
        use hickory_resolver::config::{NameServerConfig, ResolverConfig};
        use hickory_resolver::name_server::TokioConnectionProvider;
        use hickory_resolver::proto::xfer::Protocol;
        Box::pin(async move {
            let err = |msg: String| ControlError::Dns {
                name: name.to_string(),
                msg,
            };
            let provider = TokioConnectionProvider::default();
            let mut builder = match nameserver {
                Some(ns) => {
                    let mut cfg = ResolverConfig::new();
                    cfg.add_name_server(NameServerConfig::new(ns, Protocol::Udp));
                    cfg.add_name_server(NameServerConfig::new(ns, Protocol::Tcp));
                    hickory_resolver::Resolver::builder_with_config(cfg, provider)
                }
                None => hickory_resolver::Resolver::builder(provider)
                    .map_err(|e| err(format!("system resolver config: {e}")))?,
            };
            // A fresh resolver per lookup: the answer's TTL is the interval's
            // business, and a cached answer would hide a scale-down.
            let opts = builder.options_mut();
            opts.cache_size = 0;
            opts.timeout = Duration::from_secs(2);
            opts.attempts = 1;
            let resolver = builder.build();
            let answer = resolver
                .srv_lookup(name)
                .await
                .map_err(|e| err(e.to_string()))?;
            let mut out: Vec<(String, u16)> = answer
                .iter()
                .map(|srv| {
                    let t = srv.target().to_utf8();
                    (t.trim_end_matches('.').to_string(), srv.port())
                })
                .collect();
            out.sort();
            out.dedup();
            Ok(out)
        })
    }
}

/// Resolves SRV targets to addresses: a target may be an address already.
async fn srv_addresses(
    resolver: &dyn Resolver,
    name: &str,
    nameserver: Option<SocketAddr>,
) -> Result<Vec<(IpAddr, u16)>> {
    let mut out = Vec::new();
    for (target, port) in resolver.lookup_srv(name, nameserver).await? {
        match target.parse::<IpAddr>() {
            Ok(ip) => out.push((ip, port)),
            Err(_) => {
                for ip in resolver.lookup_ip(&target).await? {
                    out.push((ip, port));
                }
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The replicas one DNS answer stands for.
pub fn replicas_for(d: &DnsConfig, addrs: &[(IpAddr, u16)]) -> Vec<ReplicaConfig> {
    addrs
        .iter()
        .map(|(ip, port)| {
            let host = SocketAddr::new(*ip, *port);
            ReplicaConfig {
                url: format!("http://{host}"),
                models: d.models.clone(),
                pool: d.pool,
                engine: d.engine,
                weight: 1,
                metrics_url: None,
                kv_events: d
                    .kv_events_port
                    .map(|p| format!("tcp://{}", SocketAddr::new(*ip, p))),
                kv_events_replay: d
                    .kv_events_port
                    .and(d.kv_events_replay_port)
                    .map(|p| format!("tcp://{}", SocketAddr::new(*ip, p))),
                dp_ranks: 1,
                health_path: None,
                host_cache_tokens: None,
                max_in_flight: None,
            }
        })
        .collect()
}

pub async fn watch_dns(
    index: usize,
    d: DnsConfig,
    resolver: Arc<dyn Resolver>,
    out: mpsc::UnboundedSender<crate::daemon::Msg>,
) {
    let mut last: Option<Vec<(IpAddr, u16)>> = None;
    loop {
        let answer = match d.record {
            DnsRecord::A => resolver.lookup_ip(&d.name).await.map(|ips| {
                let port = d.port.unwrap_or(80);
                ips.into_iter().map(|ip| (ip, port)).collect::<Vec<_>>()
            }),
            DnsRecord::Srv => srv_addresses(resolver.as_ref(), &d.name, d.nameserver).await,
        };
        match answer {
            Ok(addrs) if Some(&addrs) != last.as_ref() => {
                tracing::info!(name = %d.name, addresses = ?addrs, "DNS answer changed");
                let msg = crate::daemon::Msg::Discovered(Discovered {
                    source: Source::Dns(index),
                    replicas: replicas_for(&d, &addrs),
                });
                last = Some(addrs);
                if out.send(msg).is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "DNS lookup failed, keeping the last answer"),
        }
        tokio::time::sleep(Duration::from_millis(d.interval_ms)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct Scripted(Mutex<Vec<Result<Vec<IpAddr>>>>);

    impl Resolver for Scripted {
        fn lookup_srv<'a>(
            &'a self,
            name: &'a str,
            _ns: Option<SocketAddr>,
        ) -> Lookup<'a, Vec<(String, u16)>> {
            // SRV for "svc": two pods, one by name (resolved through lookup_ip), one by address.
            let ans = if name == "svc" {
                Ok(vec![
                    ("pod-a".to_string(), 8001),
                    ("10.9.9.9".to_string(), 8002),
                ])
            } else {
                Err(ControlError::Dns {
                    name: name.into(),
                    msg: "NXDOMAIN".into(),
                })
            };
            Box::pin(async move { ans })
        }

        fn lookup_ip<'a>(&'a self, _name: &'a str) -> Lookup<'a> {
            let next = {
                let mut q = self.0.lock().unwrap();
                if q.len() > 1 {
                    q.remove(0)
                } else {
                    match &q[0] {
                        Ok(v) => Ok(v.clone()),
                        Err(_) => Err(ControlError::Dns {
                            name: "x".into(),
                            msg: "down".into(),
                        }),
                    }
                }
            };
            Box::pin(async move { next })
        }
    }

    fn dns() -> DnsConfig {
        toml::from_str(
            "name = \"vllm.default.svc\"\nport = 8000\ninterval_ms = 10\nkv_events_port = 5557\nkv_events_replay_port = 5558\npool = \"warm\"\n",
        )
        .unwrap()
    }

    #[test]
    fn answers_become_replicas_v4_and_v6() {
        let r = replicas_for(
            &dns(),
            &[
                ("10.0.0.5".parse().unwrap(), 8000),
                ("fd00::1".parse().unwrap(), 8000),
            ],
        );
        assert_eq!(r[0].url, "http://10.0.0.5:8000");
        assert_eq!(r[0].kv_events.as_deref(), Some("tcp://10.0.0.5:5557"));
        assert_eq!(
            r[0].kv_events_replay.as_deref(),
            Some("tcp://10.0.0.5:5558")
        );
        assert_eq!(r[1].url, "http://[fd00::1]:8000");
        assert_eq!(r[1].pool, kvroute_admin_api::Pool::Warm);
    }

    #[tokio::test]
    async fn changes_are_sent_failures_keep_the_last_answer() {
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let script = Scripted(Mutex::new(vec![
            Ok(vec![a]),
            Ok(vec![a]),
            Err(ControlError::Dns {
                name: "x".into(),
                msg: "timeout".into(),
            }),
            Ok(vec![a, b]),
        ]));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(watch_dns(0, dns(), Arc::new(script), tx));
        let mut seen = Vec::new();
        for _ in 0..2 {
            let m = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("a DNS update")
                .unwrap();
            let crate::daemon::Msg::Discovered(d) = m else {
                panic!("unexpected message")
            };
            seen.push(d.replicas.len());
        }
        // Same answer twice and an error produce nothing in between.
        assert_eq!(seen, vec![1, 2]);
        assert!(
            tokio::time::timeout(Duration::from_millis(100), rx.recv())
                .await
                .is_err(),
            "no update without a change"
        );
        task.abort();
    }

    #[tokio::test]
    async fn srv_targets_are_resolved_to_addresses() {
        let r = Scripted(Mutex::new(vec![Ok(vec!["10.0.0.7".parse().unwrap()])]));
        let got = srv_addresses(&r, "svc", None).await.unwrap();
        assert_eq!(
            got,
            vec![
                ("10.0.0.7".parse().unwrap(), 8001),
                ("10.9.9.9".parse().unwrap(), 8002)
            ]
        );
        assert!(srv_addresses(&r, "nope", None).await.is_err());
    }

    #[tokio::test]
    async fn system_resolver_reads_etc_hosts() {
        let ips = SystemResolver.lookup_ip("localhost").await.unwrap();
        assert!(ips.iter().any(|ip| ip.is_loopback()), "{ips:?}");
    }
}
