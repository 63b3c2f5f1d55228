//! Where a replica URL points: what [`ReplicaTable::replace`] takes, already
//! resolved.
//!
//! The core never looks a name up. The data plane resolves a replica's host
//! (`kvroute::resolve`, through the system resolver) and hands the address in;
//! [`Endpoint::literal`] takes URLs whose host is an IP address, for tools and
//! tests that have no name to resolve.
//!
//! [`ReplicaTable::replace`]: crate::replica::ReplicaTable::replace

use std::net::SocketAddr;

use kvroute_admin_api::ReplicaUrl;
use rustls_pki_types::{InvalidDnsNameError, ServerName};

use crate::error::Error;
use crate::replica::{ReplicaSet, ReplicaSpec};

/// Where a replica URL points and how to speak to it.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// `host:port` as written, for the `Host` header.
    pub authority: String,
    /// `https://`: the name the replica's certificate must be valid for.
    pub tls: Option<ServerName<'static>>,
}

/// A replica spec with its URL resolved: what the replica table takes.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub spec: ReplicaSpec,
    pub endpoint: Endpoint,
}

impl Endpoint {
    /// Parses `http://host:port[/]` or `https://host:port[/]` (port 80 and 443
    /// when left out) and asks `lookup` for the address of its `host:port`.
    /// `lookup`'s error is the reason, reported after the URL.
    pub fn new<E: std::fmt::Display>(
        url: &str,
        lookup: impl FnOnce(&str) -> Result<SocketAddr, E>,
    ) -> Result<Endpoint, Error> {
        let bad = |why: &str| Error::Config(format!("replica url {url:?}: {why}"));
        let u = ReplicaUrl::parse(url).map_err(|e| bad(&e.to_string()))?;
        let tls = if u.tls {
            Some(server_name(u.host).map_err(|e| bad(&e.to_string()))?)
        } else {
            None
        };
        let addr = lookup(&u.host_port).map_err(|why| bad(&why.to_string()))?;
        Ok(Endpoint {
            addr,
            authority: u.authority.to_string(),
            tls,
        })
    }

    /// [`Endpoint::new`] for a URL whose host is an IP address; a host name is
    /// refused, not looked up.
    pub fn literal(url: &str) -> Result<Endpoint, Error> {
        Endpoint::new(url, |host_port| host_port.parse().map_err(|_| NotAnAddress))
    }
}

/// A host that [`Endpoint::literal`] would have to look up.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("not an IP address (host names are resolved by the data plane)")]
pub struct NotAnAddress;

/// Why a replica URL's host cannot be used for TLS.
#[derive(Debug, thiserror::Error)]
pub enum ServerNameError {
    #[error("not a TLS server name: {0}")]
    Invalid(#[source] InvalidDnsNameError),
}

/// The TLS name of a URL's host: a DNS name is sent as SNI and verified; an IP
/// address is sent as no SNI and verified against the certificate's IP names.
pub fn server_name(host: &str) -> Result<ServerName<'static>, ServerNameError> {
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    ServerName::try_from(host.to_string()).map_err(ServerNameError::Invalid)
}

/// Resolves `specs`, the replica set that is to replace `current`. A URL
/// already in `current` keeps that replica's endpoint (no lookup: a replica
/// that stays keeps its address); a new one goes through `resolve`.
///
/// What the table refuses anyway (too many replicas, a URL twice) is refused
/// first, as the table does, so such an update looks up no name and reports
/// the same error as the table would.
pub fn resolve_with<E: From<Error>>(
    current: &ReplicaSet,
    specs: Vec<ReplicaSpec>,
    mut resolve: impl FnMut(&str) -> Result<Endpoint, E>,
) -> Result<Vec<Resolved>, E> {
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
                None => resolve(&spec.url)?,
            };
            Ok(Resolved { spec, endpoint })
        })
        .collect()
}

/// [`resolve_with`] through [`Endpoint::literal`]: IP-address URLs only.
pub fn literals(current: &ReplicaSet, specs: Vec<ReplicaSpec>) -> Result<Vec<Resolved>, Error> {
    resolve_with(current, specs, Endpoint::literal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_literal_urls_and_refuses_names() {
        assert!(Endpoint::literal("ftp://x:1").is_err());
        assert!(Endpoint::literal("http://127.0.0.1:1/v1").is_err());
        let e = Endpoint::literal("http://127.0.0.1:8001/").unwrap();
        assert_eq!(e.addr.port(), 8001);
        assert_eq!(e.authority, "127.0.0.1:8001");
        assert!(e.tls.is_none());
        let e = Endpoint::literal("https://127.0.0.1:8443/").unwrap();
        assert!(matches!(e.tls, Some(ServerName::IpAddress(_))));
        assert_eq!(Endpoint::literal("https://[::1]:9").unwrap().addr.port(), 9);
        let e = Endpoint::literal("http://localhost:1").unwrap_err();
        assert_eq!(
            e.to_string(),
            "config: replica url \"http://localhost:1\": not an IP address (host names are resolved by the data plane)"
        );
    }

    #[test]
    fn server_names() {
        assert!(matches!(
            server_name("127.0.0.1").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("[::1]").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("replica-0.example").unwrap(),
            ServerName::DnsName(_)
        ));
        let e = server_name("bad name").unwrap_err().to_string();
        assert!(e.starts_with("not a TLS server name: "), "{e}");
    }
}
