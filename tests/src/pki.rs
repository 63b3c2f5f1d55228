//! Test certificates made at test time with rcgen: a CA per test and a server
//! certificate it signs for `127.0.0.1` and `localhost`, optionally outside its
//! validity (expired), written as PEM files kvroute, nginx and clients read.

use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

/// A test CA and a server certificate it signed for 127.0.0.1 and localhost.
pub struct Pki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl Pki {
    pub fn new(tag: &str) -> Pki {
        Pki::with_validity(tag, None)
    }

    /// With `years = Some((from, to))` the server certificate is valid from
    /// January 1st of `from` to January 1st of `to`.
    pub fn with_validity(tag: &str, years: Option<(i32, i32)>) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // Distinct names per CA, so another CA is an unknown issuer.
        ca.distinguished_name.push(
            DnType::CommonName,
            format!("kvroute test CA {tag} {}", crate::harness::free_port()),
        );
        let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = KeyPair::generate().expect("server key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("server params");
        if let Some((from, to)) = years {
            params.not_before = rcgen::date_time_ymd(from, 1, 1);
            params.not_after = rcgen::date_time_ymd(to, 1, 1);
        }
        let cert = params.signed_by(&key, &issuer).expect("server certificate");
        Pki {
            ca_pem: ca_cert.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    pub fn cert_der(&self) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).expect("our own PEM")
    }

    /// Writes ca.pem, cert.pem and key.pem into `dir` (replacing them atomically).
    pub fn write(&self, dir: &Path) {
        for (name, text) in [
            ("ca.pem", &self.ca_pem),
            ("cert.pem", &self.cert_pem),
            ("key.pem", &self.key_pem),
        ] {
            write_atomic(&dir.join(name), text);
        }
    }
}

/// Replaces `path` with `text` in one rename, so a reader sees the old file or the new one.
pub fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}
