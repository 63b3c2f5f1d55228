//! TLS on both sides of the proxy, with rustls (ring provider) driven through
//! its buffer API over any [`Conn`](crate::io::Conn), so the same code runs on
//! io_uring and epoll.
//!
//! - [`load`]: the `[tls]` section, and reading its certificate chain and key.
//! - [`reload`]: the server configuration new handshakes use, swapped on SIGHUP.
//! - [`accept`]: a client connection's handshake (or the answer to plain HTTP).
//! - [`upstream`]: verifying `https://` replicas and connecting to them.
//! - [`stream`]: the TLS connection wrapper itself.
//! - [`maybe`]: plain or TLS, the one connection type the proxy handles.

pub mod accept;
pub mod load;
pub mod maybe;
pub mod reload;
pub mod stream;
pub mod upstream;

pub use load::TlsConfig;
pub use maybe::MaybeTls;
pub use reload::ServerTls;
pub use stream::TlsConn;

/// The crypto provider of every TLS configuration kvroute builds.
pub(crate) fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS 1.3 and 1.2: 1.2 still matters for older clients and load balancers.
pub(crate) const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// HTTP/1.1 is all kvroute speaks on either side.
pub(crate) fn alpn() -> Vec<Vec<u8>> {
    vec![b"http/1.1".to_vec()]
}
