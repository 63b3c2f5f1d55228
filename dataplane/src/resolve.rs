//! Replica URLs turned into socket addresses: the one place the data plane
//! resolves a replica's host name (blocking, through the system resolver).
//!
//! Callers resolve a replica-set update here before they hand it to
//! [`ReplicaTable::replace`](crate::replica::ReplicaTable::replace), so the
//! table and the routing core around it only ever see resolved addresses. A
//! name is resolved once, when its URL first joins the set; the control daemon
//! owns re-resolution.

use std::net::ToSocketAddrs;

pub use kvroute_core::endpoint::{Endpoint, Resolved};

use crate::error::Error;
use crate::replica::{ReplicaSet, ReplicaSpec};

/// Parses `http://host:port[/]` or `https://host:port[/]` (port 80 and 443 when
/// left out) and resolves a host name to its first address.
pub fn endpoint(url: &str) -> Result<Endpoint, Error> {
    Ok(Endpoint::new(url, |host_port| {
        host_port
            .to_socket_addrs()
            .map_err(LookupError::Resolve)?
            .next()
            .ok_or(LookupError::NoAddress)
    })?)
}

/// Why a replica's host name gave no address.
#[derive(Debug, thiserror::Error)]
enum LookupError {
    #[error("cannot resolve: {0}")]
    Resolve(#[source] std::io::Error),
    #[error("resolved to no address")]
    NoAddress,
}

/// Resolves `specs`, the replica set that is to replace `current`. A URL
/// already in `current` keeps that replica's endpoint (no lookup: a replica
/// that stays keeps its address); a new one goes through [`endpoint`].
///
/// What the table refuses anyway (too many replicas, a URL twice) is refused
/// first, as the table does, so such an update looks up no name and reports
/// the same error as the table would.
pub fn replicas(current: &ReplicaSet, specs: Vec<ReplicaSpec>) -> Result<Vec<Resolved>, Error> {
    kvroute_core::endpoint::resolve_with(current, specs, endpoint)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::replica::ReplicaTable;

    #[test]
    fn parses_and_resolves_urls() {
        assert!(endpoint("ftp://x:1").is_err());
        assert!(endpoint("http://127.0.0.1:1/v1").is_err());
        let e = endpoint("http://127.0.0.1:8001/").unwrap();
        assert_eq!(e.addr.port(), 8001);
        assert_eq!(e.authority, "127.0.0.1:8001");
        assert!(e.tls.is_none());
        let e = endpoint("https://127.0.0.1:8443/").unwrap();
        assert_eq!(e.addr.port(), 8443);
        assert_eq!(e.authority, "127.0.0.1:8443");
        assert!(matches!(
            e.tls,
            Some(rustls::pki_types::ServerName::IpAddress(_))
        ));
        let e = endpoint("https://localhost").unwrap();
        assert_eq!(e.addr.port(), 443);
        assert_eq!(e.authority, "localhost");
        assert!(matches!(
            e.tls,
            Some(rustls::pki_types::ServerName::DnsName(_))
        ));
        assert_eq!(endpoint("https://[::1]:9").unwrap().addr.port(), 9);
        assert_eq!(endpoint("http://127.0.0.1:1").unwrap().tls, None);
        let e = endpoint("http://no-such-host.invalid:1").unwrap_err();
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
                ..endpoint(url).unwrap()
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
        assert_eq!(got[1].endpoint, endpoint("http://127.0.0.1:8002").unwrap());
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
