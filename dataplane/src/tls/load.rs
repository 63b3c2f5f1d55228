//! The `[tls]` section and loading what it names: a PEM certificate chain and
//! its private key, checked to belong together before anything listens.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use crate::error::Error;

/// `[tls]`: terminate TLS on the client listener. Absent, the listener speaks
/// plain HTTP (a loopback sidecar, or TLS terminated in front of kvroute).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file: the server certificate first, then its intermediates (the full
    /// chain clients need to reach their trusted root). Re-read on SIGHUP.
    pub cert: PathBuf,
    /// PEM file: the certificate's private key (PKCS#8, PKCS#1 RSA or SEC1 EC).
    /// Re-read on SIGHUP.
    pub key: PathBuf,
}

fn problem(key: &str, path: &Path, why: impl std::fmt::Display) -> Error {
    Error::Config(format!("{key} {}: {why}", path.display()))
}

fn read(key: &str, path: &Path) -> Result<Vec<u8>, Error> {
    let bytes = std::fs::read(path).map_err(|e| problem(key, path, e))?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(problem(key, path, "file is empty"));
    }
    Ok(bytes)
}

fn pem_problem(key: &str, path: &Path, what: &str, e: pem::Error) -> Error {
    match e {
        pem::Error::NoItemsFound => problem(key, path, format!("no PEM {what} found")),
        e => problem(key, path, format!("not valid PEM: {e}")),
    }
}

/// Every certificate in a PEM file, in order; `key` names the setting in errors.
pub fn read_certs(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let bytes = read(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_problem(key, path, "certificate", e))?;
    if certs.is_empty() {
        return Err(pem_problem(
            key,
            path,
            "certificate",
            pem::Error::NoItemsFound,
        ));
    }
    Ok(certs)
}

/// Builds the server configuration `tls` describes. Refuses a file that is
/// missing, unreadable, not PEM, or a key that is not the certificate's.
pub fn server_config(tls: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, Error> {
    let chain = read_certs("tls.cert", &tls.cert)?;
    let not_after = x509_parser::parse_x509_certificate(&chain[0])
        .map_err(|e| {
            problem(
                "tls.cert",
                &tls.cert,
                format!("not an X.509 certificate: {e}"),
            )
        })?
        .1
        .validity()
        .not_after;
    let key_pem = read("tls.key", &tls.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| pem_problem("tls.key", &tls.key, "private key", e))?;
    let provider = super::provider();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| problem("tls.key", &tls.key, format!("unusable private key: {e}")))?;
    let certified = rustls::sign::CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) => {}
        // The provider cannot derive this key type's public half: nothing to compare.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(problem(
                "tls.key",
                &tls.key,
                format!(
                    "private key does not match the certificate in {}",
                    tls.cert.display()
                ),
            ))
        }
        Err(e) => return Err(problem("tls.cert", &tls.cert, e)),
    }
    // An expired certificate is logged, not refused: refusing would turn a
    // lapsed renewal (which clients already reject) into a full outage at the
    // next restart or reload, also for clients that do not verify (health
    // checks, internal callers) and for a host whose clock is wrong at boot.
    if not_after.timestamp() < now_unix() {
        tracing::warn!(
            cert = %tls.cert.display(),
            not_after = %not_after,
            "tls.cert: the certificate has expired; clients that verify it will refuse to connect"
        );
    }
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(super::VERSIONS)
        .map_err(|e| problem("tls.cert", &tls.cert, e))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
    cfg.alpn_protocols = super::alpn();
    Ok(Arc::new(cfg))
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A CA and a server certificate for 127.0.0.1/localhost it signed, as PEM.
    pub struct TestPki {
        pub ca_pem: String,
        pub cert_pem: String,
        pub key_pem: String,
    }

    pub fn test_pki(validity: Option<(i32, i32)>) -> TestPki {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // Distinct names: a CA of the same name would be found as the issuer
        // (a bad signature, not an unknown issuer).
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, format!("kvroute test CA {n}"));
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        if let Some((from, to)) = validity {
            params.not_before = rcgen::date_time_ymd(from, 1, 1);
            params.not_after = rcgen::date_time_ymd(to, 1, 1);
        }
        let cert = params.signed_by(&key, &issuer).unwrap();
        TestPki {
            ca_pem: ca_cert.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    pub fn tempdir(tag: &str) -> PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "kvroute-tls-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn err(tls: &TlsConfig) -> String {
        server_config(tls).unwrap_err().to_string()
    }

    #[test]
    fn loads_a_matching_pair() {
        let d = tempdir("ok");
        let p = test_pki(None);
        let tls = TlsConfig {
            cert: write(&d, "cert.pem", &p.cert_pem),
            key: write(&d, "key.pem", &p.key_pem),
        };
        let cfg = server_config(&tls).unwrap();
        assert_eq!(cfg.alpn_protocols, vec![b"http/1.1".to_vec()]);
        // An expired certificate is only warned about.
        let old = test_pki(Some((2000, 2001)));
        let tls = TlsConfig {
            cert: write(&d, "old.pem", &old.cert_pem),
            key: write(&d, "oldkey.pem", &old.key_pem),
        };
        server_config(&tls).unwrap();
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn bad_files_are_named_with_the_problem() {
        let d = tempdir("bad");
        let p = test_pki(None);
        let other = test_pki(None);
        let cert = write(&d, "cert.pem", &p.cert_pem);
        let key = write(&d, "key.pem", &p.key_pem);
        let missing = d.join("missing.pem");
        let e = err(&TlsConfig {
            cert: missing.clone(),
            key: key.clone(),
        });
        assert!(e.contains("tls.cert") && e.contains("missing.pem"), "{e}");
        let e = err(&TlsConfig {
            cert: cert.clone(),
            key: missing,
        });
        assert!(e.contains("tls.key") && e.contains("missing.pem"), "{e}");
        let empty = write(&d, "empty.pem", "\n");
        let e = err(&TlsConfig {
            cert: empty.clone(),
            key: key.clone(),
        });
        assert!(e.contains("empty.pem") && e.contains("empty"), "{e}");
        let garbage = write(&d, "garbage.pem", "this is not PEM at all\n");
        let e = err(&TlsConfig {
            cert: garbage.clone(),
            key: key.clone(),
        });
        assert!(
            e.contains("garbage.pem") && e.contains("no PEM certificate"),
            "{e}"
        );
        let e = err(&TlsConfig {
            cert: cert.clone(),
            key: garbage,
        });
        assert!(
            e.contains("garbage.pem") && e.contains("no PEM private key"),
            "{e}"
        );
        // A key where the certificate belongs, and the other way round.
        let e = err(&TlsConfig {
            cert: key.clone(),
            key: key.clone(),
        });
        assert!(
            e.contains("tls.cert") && e.contains("no PEM certificate"),
            "{e}"
        );
        let bad_block = write(
            &d,
            "block.pem",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        );
        let e = err(&TlsConfig {
            cert: bad_block,
            key: key.clone(),
        });
        assert!(e.contains("block.pem") && e.contains("X.509"), "{e}");
        let wrong = write(&d, "wrong.pem", &other.key_pem);
        let e = err(&TlsConfig { cert, key: wrong });
        assert!(
            e.contains("wrong.pem") && e.contains("does not match") && e.contains("cert.pem"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(d);
    }
}
