//! The server configuration new handshakes use: loaded at start, replaced on
//! SIGHUP. Connections already open keep the configuration they shook hands
//! with; a replacement that does not load leaves the running one in place.

use std::sync::Arc;

use arc_swap::ArcSwap;

use super::{load, TlsConfig};
use crate::error::Error;

pub struct ServerTls {
    current: ArcSwap<rustls::ServerConfig>,
}

impl ServerTls {
    pub fn load(tls: &TlsConfig) -> Result<ServerTls, Error> {
        Ok(ServerTls {
            current: ArcSwap::new(load::server_config(tls)?),
        })
    }

    /// The configuration for a handshake starting now.
    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        self.current.load_full()
    }

    /// Re-reads the certificate and key; on error the running ones stay.
    pub fn reload(&self, tls: &TlsConfig) -> Result<(), Error> {
        self.current.store(load::server_config(tls)?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::load::tests::{tempdir, test_pki, write};

    #[test]
    fn a_bad_replacement_keeps_the_running_config() {
        let d = tempdir("reload");
        let p = test_pki(None);
        let tls = TlsConfig {
            cert: write(&d, "cert.pem", &p.cert_pem),
            key: write(&d, "key.pem", &p.key_pem),
        };
        let s = ServerTls::load(&tls).unwrap();
        let first = s.current();
        write(&d, "cert.pem", "garbage");
        assert!(s.reload(&tls).is_err());
        assert!(Arc::ptr_eq(&first, &s.current()));
        let q = test_pki(None);
        write(&d, "cert.pem", &q.cert_pem);
        write(&d, "key.pem", &q.key_pem);
        s.reload(&tls).unwrap();
        assert!(!Arc::ptr_eq(&first, &s.current()));
        let _ = std::fs::remove_dir_all(d);
    }
}
