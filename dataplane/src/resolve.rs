//! Replica URLs turned into socket addresses: the one place the data plane
//! resolves a replica's host name (blocking, through the system resolver).
//!
//! Callers resolve a replica-set update here before they hand it to
//! [`ReplicaTable::replace`](crate::replica::ReplicaTable::replace), so the
//! table and the routing core around it only ever see resolved addresses. A
//! name is resolved once, when its URL first joins the set; the control daemon
//! owns re-resolution.

use std::net::SocketAddr;

use crate::error::Error;
use crate::replica::{ReplicaSet, ReplicaSpec};

/// Where a replica URL points and how to speak to it.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// `host:port` as written, for the `Host` header.
    pub authority: String,
    /// `https://`: the name the replica's certificate must be valid for.
    pub tls: Option<rustls::pki_types::ServerName<'static>>,
}

impl Endpoint {
    /// Parses `http://host:port[/]` or `https://host:port[/]` (port 80 and 443
    /// when left out) and resolves a host name to its first address.
    pub fn parse(url: &str) -> Result<Endpoint, Error> {
        let bad = |why: &str| Error::Config(format!("replica url {url:?}: {why}"));
        let u = kvroute_admin_api::ReplicaUrl::parse(url).map_err(|e| bad(&e.to_string()))?;
        let tls = if u.tls {
            Some(crate::tls::upstream::server_name(u.host).map_err(|e| bad(&e.to_string()))?)
        } else {
            None
        };
        use std::net::ToSocketAddrs;
        let addr = u
            .host_port
            .to_socket_addrs()
            .map_err(|e| bad(&format!("cannot resolve: {e}")))?
            .next()
            .ok_or_else(|| bad("resolved to no address"))?;
        Ok(Endpoint {
            addr,
            authority: u.authority.to_string(),
            tls,
        })
    }
}

/// A replica spec with its URL resolved: what the replica table takes.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub spec: ReplicaSpec,
    pub endpoint: Endpoint,
}

/// Resolves `specs`, the replica set that is to replace `current`. A URL
/// already in `current` keeps that replica's endpoint (no lookup: a replica
/// that stays keeps its address); a new one goes through [`Endpoint::parse`].
///
/// What the table refuses anyway (too many replicas, a URL twice) is refused
/// first, as the table does, so such an update looks up no name and reports
/// the same error as when the table resolved.
pub fn replicas(current: &ReplicaSet, specs: Vec<ReplicaSpec>) -> Result<Vec<Resolved>, Error> {
    crate::replica::check_urls(&specs)?;
    specs
        .into_iter()
        .map(|spec| {
            let endpoint = match current.replicas.iter().find(|r| r.spec.url == spec.url) {
                Some(r) => Endpoint {
                    addr: r.addr,
                    authority: r.authority.clone(),
                    tls: r.tls.clone(),
                },
                None => Endpoint::parse(&spec.url)?,
            };
            Ok(Resolved { spec, endpoint })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::ReplicaTable;

    #[test]
    fn parses_and_resolves_urls() {
        assert!(Endpoint::parse("ftp://x:1").is_err());
        assert!(Endpoint::parse("http://127.0.0.1:1/v1").is_err());
        let e = Endpoint::parse("http://127.0.0.1:8001/").unwrap();
        assert_eq!(e.addr.port(), 8001);
        assert_eq!(e.authority, "127.0.0.1:8001");
        assert!(e.tls.is_none());
        let e = Endpoint::parse("https://127.0.0.1:8443/").unwrap();
        assert_eq!(e.addr.port(), 8443);
        assert_eq!(e.authority, "127.0.0.1:8443");
        assert!(matches!(
            e.tls,
            Some(rustls::pki_types::ServerName::IpAddress(_))
        ));
        let e = Endpoint::parse("https://localhost").unwrap();
        assert_eq!(e.addr.port(), 443);
        assert_eq!(e.authority, "localhost");
        assert!(matches!(
            e.tls,
            Some(rustls::pki_types::ServerName::DnsName(_))
        ));
        assert_eq!(Endpoint::parse("https://[::1]:9").unwrap().addr.port(), 9);
        assert_eq!(Endpoint::parse("http://127.0.0.1:1").unwrap().tls, None);
        let e = Endpoint::parse("http://no-such-host.invalid:1").unwrap_err();
        assert!(
            e.to_string().starts_with(
                "config: replica url \"http://no-such-host.invalid:1\": cannot resolve: "
            ),
            "{e}"
        );
    }

    #[test]
    fn replicas_already_in_the_set_are_not_looked_up_again() {
        // A table whose replica's address differs from what its URL resolves to:
        // what the table holds wins.
        let t = ReplicaTable::default();
        let held: SocketAddr = "127.0.0.2:9".parse().unwrap();
        let url = "http://127.0.0.1:8001";
        t.replace(vec![Resolved {
            spec: ReplicaSpec::new(url),
            endpoint: Endpoint {
                addr: held,
                ..Endpoint::parse(url).unwrap()
            },
        }])
        .unwrap();
        let got = replicas(
            &t.load(),
            vec![
                ReplicaSpec::new(url),
                ReplicaSpec::new("http://127.0.0.1:8002"),
            ],
        )
        .unwrap();
        assert_eq!(got[0].endpoint.addr, held);
        assert_eq!(
            got[1].endpoint,
            Endpoint::parse("http://127.0.0.1:8002").unwrap()
        );
        // Refused before any lookup, with the table's message.
        let e = replicas(
            &t.load(),
            vec![
                ReplicaSpec::new("http://no-such-host.invalid:1"),
                ReplicaSpec::new("http://127.0.0.1:1"),
                ReplicaSpec::new("http://127.0.0.1:1"),
            ],
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "config: replicas: duplicate url http://127.0.0.1:1"
        );
    }
}
