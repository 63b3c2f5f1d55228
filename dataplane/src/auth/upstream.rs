//! Credentials towards the replicas: whether the client's key headers pass on,
//! and kvroute's own `[upstream] api_key` (or `api_key_file`) as a Bearer token.

use serde::{Deserialize, Serialize, Serializer};

use crate::config::UpstreamConfig;
use crate::error::Error;

/// A config value that is a secret: never shown by `Debug` or `Serialize`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(redacted)")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("redacted")
    }
}

/// The client credential headers kvroute itself reads when `[auth]` is on.
const CLIENT_KEY_HEADERS: [&str; 2] = ["authorization", "x-api-key"];

/// What changes in the credential headers of a request on its way to a replica.
#[derive(Default)]
pub struct Forwarding {
    /// Drop the client's `authorization` and `x-api-key` (auth on, and not
    /// `forward_client_key`): the key was kvroute's, not the replica's.
    strip_client_key: bool,
    /// `authorization: Bearer <[upstream] api_key>\r\n`, replacing any client one.
    upstream_line: Option<Box<[u8]>>,
}

impl std::fmt::Debug for Forwarding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarding")
            .field("strip_client_key", &self.strip_client_key)
            .field("upstream_key", &self.upstream_line.is_some())
            .finish()
    }
}

impl Forwarding {
    /// `strip_client_key`: auth is on and the client's key is not forwarded.
    pub fn new(strip_client_key: bool, upstream: &UpstreamConfig) -> Result<Forwarding, Error> {
        let upstream_line = upstream_key(upstream)?.map(|k| {
            let mut line = b"authorization: Bearer ".to_vec();
            line.extend_from_slice(k.expose().as_bytes());
            line.extend_from_slice(b"\r\n");
            line.into_boxed_slice()
        });
        Ok(Forwarding {
            strip_client_key,
            upstream_line,
        })
    }

    /// Whether the client's header `name` stays out of the upstream request.
    pub fn drops(&self, name: &str) -> bool {
        (self.strip_client_key
            && CLIENT_KEY_HEADERS
                .iter()
                .any(|h| name.eq_ignore_ascii_case(h)))
            || (self.upstream_line.is_some() && name.eq_ignore_ascii_case("authorization"))
    }

    /// Header lines (CRLF-terminated) kvroute adds to every upstream request.
    pub fn lines(&self) -> &[u8] {
        self.upstream_line.as_deref().unwrap_or_default()
    }
}

/// `[upstream] api_key`, or the first line of `api_key_file`.
pub fn upstream_key(cfg: &UpstreamConfig) -> Result<Option<Secret>, Error> {
    let bad = |why: String| Error::Config(why);
    let key = match (&cfg.api_key, &cfg.api_key_file) {
        (Some(_), Some(_)) => {
            return Err(bad(
                "upstream: api_key and api_key_file are exclusive; set one".into(),
            ))
        }
        (Some(k), None) => ("upstream.api_key".to_string(), k.clone()),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| bad(format!("upstream.api_key_file: {}: {e}", path.display())))?;
            let first = text.lines().next().unwrap_or("").trim();
            (
                format!("upstream.api_key_file: {}", path.display()),
                Secret::new(first),
            )
        }
        (None, None) => return Ok(None),
    };
    let (what, secret) = key;
    let v = secret.expose();
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_graphic()) {
        // Never echoed: the message says what is wrong, not what was there.
        return Err(bad(format!(
            "{what}: must be a non-empty token of printable ASCII without spaces"
        )));
    }
    Ok(Some(secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(key: Option<&str>, file: Option<std::path::PathBuf>) -> UpstreamConfig {
        UpstreamConfig {
            api_key: key.map(Secret::new),
            api_key_file: file,
            ..Default::default()
        }
    }

    #[test]
    fn secrets_never_show() {
        let s = Secret::new("sk-upstream-1");
        assert!(!format!("{s:?}").contains("sk-upstream"));
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"redacted\"");
        let c = cfg(Some("sk-upstream-1"), None);
        assert!(!format!("{c:?}").contains("sk-upstream"));
    }

    #[test]
    fn upstream_key_from_config_or_file() {
        assert_eq!(upstream_key(&cfg(None, None)).unwrap(), None);
        let k = upstream_key(&cfg(Some("sk-up-1"), None)).unwrap().unwrap();
        assert_eq!(k.expose(), "sk-up-1");
        let path = std::env::temp_dir().join(format!("kvroute-apikey-{}", std::process::id()));
        std::fs::write(&path, "sk-from-file\n").unwrap();
        let k = upstream_key(&cfg(None, Some(path.clone())))
            .unwrap()
            .unwrap();
        assert_eq!(k.expose(), "sk-from-file");
        let e = upstream_key(&cfg(Some("a"), Some(path.clone()))).unwrap_err();
        assert!(e.to_string().contains("exclusive"), "{e}");
        std::fs::write(&path, "sk bad key\n").unwrap();
        let e = upstream_key(&cfg(None, Some(path.clone()))).unwrap_err();
        assert!(e.to_string().contains("api_key_file") && !e.to_string().contains("bad key"));
        let _ = std::fs::remove_file(&path);
        let e = upstream_key(&cfg(None, Some(path))).unwrap_err();
        assert!(e.to_string().contains("api_key_file"), "{e}");
        assert!(
            upstream_key(&cfg(Some("a\r\nx: y"), None)).is_err(),
            "no header injection"
        );
    }

    #[test]
    fn what_passes_to_the_replica() {
        let off = Forwarding::new(false, &cfg(None, None)).unwrap();
        assert!(!off.drops("Authorization") && !off.drops("x-api-key"));
        assert!(off.lines().is_empty());
        let on = Forwarding::new(true, &cfg(None, None)).unwrap();
        assert!(on.drops("Authorization") && on.drops("X-API-KEY"));
        assert!(!on.drops("api-key") && !on.drops("content-type"));
        let ours = Forwarding::new(false, &cfg(Some("sk-up-1"), None)).unwrap();
        assert!(ours.drops("authorization") && !ours.drops("x-api-key"));
        assert_eq!(ours.lines(), b"authorization: Bearer sk-up-1\r\n");
        assert!(!format!("{ours:?}").contains("sk-up-1"));
    }
}
