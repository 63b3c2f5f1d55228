//! TLS to `https://` replicas: which roots verify them, and the client side
//! of the handshake on a fresh connection.
//!
//! With `[upstream] ca_file` set, only its certificates are trusted: a fleet
//! behind a private CA should not also accept any public certificate for the
//! same name. Without it, the system's roots are.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::ServerName;

use super::stream::HandshakeError;
use super::{MaybeTls, TlsConn};
use crate::error::Error;
use crate::io::Conn;

/// The client configuration for every replica connection.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, Error> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = super::load::read_certs("upstream.ca_file", path)?;
            let (_, ignored) = roots.add_parsable_certificates(certs);
            if roots.is_empty() {
                return Err(Error::Config(format!(
                    "upstream.ca_file {}: no usable CA certificate ({ignored} could not be parsed)",
                    path.display()
                )));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::debug!(error = %e, "system CA certificates: skipped one source");
            }
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                tracing::debug!(
                    "no system CA certificates found: https:// replicas need [upstream] ca_file"
                );
            }
        }
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(super::provider())
        .with_protocol_versions(super::VERSIONS)
        .map_err(|e| Error::Config(format!("upstream TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = super::alpn();
    Ok(Arc::new(cfg))
}

pub use kvroute_core::endpoint::{server_name, ServerNameError};

/// The client handshake on a freshly connected `io` (the caller bounds it in time).
pub async fn connect<C: Conn>(
    io: C,
    config: Arc<rustls::ClientConfig>,
    name: &ServerName<'static>,
) -> Result<MaybeTls<C>, HandshakeError> {
    let tls = rustls::ClientConnection::new(config, name.clone()).map_err(HandshakeError::Tls)?;
    let mut conn = TlsConn::client(io, tls, name.clone());
    conn.handshake().await?;
    Ok(MaybeTls::Tls(Box::new(conn)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::load::tests::{tempdir, write};

    #[test]
    fn ca_file_errors_name_the_file() {
        let d = tempdir("ca");
        let e = client_config(Some(&d.join("nope.pem")))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("upstream.ca_file") && e.contains("nope.pem"),
            "{e}"
        );
        let g = write(&d, "g.pem", "garbage");
        let e = client_config(Some(&g)).unwrap_err().to_string();
        assert!(
            e.contains("g.pem") && e.contains("no PEM certificate"),
            "{e}"
        );
        client_config(None).unwrap();
        let _ = std::fs::remove_dir_all(d);
    }
}
