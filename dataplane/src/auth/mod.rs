//! API keys with per-key limits (`[auth]`), and the credentials sent to replicas.
//!
//! The proxy asks twice per request, each a phase returning a decision:
//! [`Auth::admit`] right after the head (who is asking, and may they send a
//! request now: 401, or 429 on the key's requests per second), and
//! [`Auth::check_body`] once the body is read, before the prediction cache and
//! routing (the model the body names: 403; its prompt bytes per second: 429).
//! Keys come from [`keys_file`], are held hashed in a [`table::KeyTable`]
//! swapped whole on SIGHUP, and limited by [`limiter`] buckets.
//!
//! A key never appears in logs, metrics, `/state` or error bodies: only its name.

pub mod keys_file;
pub mod limiter;
pub mod table;
pub mod upstream;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

use crate::config::UpstreamConfig;
use crate::error::Error;
use crate::http::{ErrorKind, RequestHead};
use crate::metrics as m;
pub use table::{KeyEntry, KeyTable, Presented};
pub use upstream::{Forwarding, Secret};

/// `[auth]`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// The API keys file (syntax in `deploy/keys.example`); absent, no key is
    /// asked for. Re-read on SIGHUP; a file that does not parse then is
    /// logged and the keys already loaded stay.
    pub keys_file: Option<PathBuf>,
    /// Pass the client's `Authorization` / `x-api-key` on to the replicas
    /// (default: they are removed, the key being kvroute's). `[upstream]
    /// api_key`, when set, replaces the client's `Authorization` either way.
    pub forward_client_key: bool,
}

/// The `key` label of requests made with no key (auth off, or refused).
pub const NO_KEY: &str = "none";

/// Who a request comes from once admitted.
#[derive(Clone, Default)]
pub struct Caller(Option<Arc<KeyEntry>>);

impl Caller {
    /// The key's name, or [`NO_KEY`] when auth is off.
    pub fn label(&self) -> &str {
        self.0.as_ref().map_or(NO_KEY, |e| &e.name)
    }

    /// The prediction cache's tenant: the key's name when auth is on.
    pub fn tenant(&self) -> Option<&str> {
        self.0.as_ref().map(|e| &*e.name)
    }

    /// Whether the caller may see or use `model`.
    pub fn may_use(&self, model: &str) -> bool {
        self.0.as_ref().is_none_or(|e| e.may_use(model))
    }

    /// The models the caller is limited to; `None`: any.
    pub fn models(&self) -> Option<&[String]> {
        self.0.as_ref()?.models.as_deref()
    }
}

/// A refused request: the error to answer with.
#[derive(Debug)]
pub struct Denial {
    pub kind: ErrorKind,
    pub message: String,
    /// Seconds for `Retry-After` (rate limits).
    pub retry_after: Option<u64>,
    /// The key's name when the key was valid, for the `key` label.
    pub key: Option<Arc<str>>,
}

impl Denial {
    fn new(kind: ErrorKind, reason: &'static str, key: Option<&Arc<str>>, message: String) -> Self {
        metrics::counter!(m::AUTH_REJECTIONS, "reason" => reason, "key" => key.map_or(NO_KEY.to_string(), |k| k.to_string()))
            .increment(1);
        Denial {
            kind,
            message,
            retry_after: None,
            key: key.cloned(),
        }
    }

    fn rate_limited(
        kind: ErrorKind,
        reason: &'static str,
        e: &KeyEntry,
        wait: Duration,
        what: &str,
    ) -> Self {
        let secs = limiter::retry_after_secs(wait);
        let mut d = Denial::new(
            kind,
            reason,
            Some(&e.name),
            format!("rate limit of {what} reached for this API key; retry after {secs} s"),
        );
        d.retry_after = Some(secs);
        d
    }

    pub fn label(&self) -> &str {
        self.key.as_deref().unwrap_or(NO_KEY)
    }

    /// Header lines this answer carries besides the error's own.
    pub fn headers(&self) -> String {
        self.retry_after
            .map(|s| format!("retry-after: {s}\r\n"))
            .unwrap_or_default()
    }
}

/// The keys, when auth is on.
struct Keys {
    path: PathBuf,
    table: ArcSwap<KeyTable>,
}

/// Authentication, per-key limits and upstream credentials, for the process.
pub struct Auth {
    keys: Option<Keys>,
    forwarding: Forwarding,
}

impl Auth {
    /// Loads the keys file and the upstream key; an error refuses to start.
    pub fn new(cfg: &AuthConfig, upstream: &UpstreamConfig) -> Result<Auth, Error> {
        let keys = match &cfg.keys_file {
            Some(path) => {
                let table = load(path, None)?;
                tracing::info!(keys = table.len(), file = %path.display(), "API keys loaded");
                Some(Keys {
                    path: path.clone(),
                    table: ArcSwap::from_pointee(table),
                })
            }
            None => None,
        };
        let strip = keys.is_some() && !cfg.forward_client_key;
        Ok(Auth {
            keys,
            forwarding: Forwarding::new(strip, upstream)?,
        })
    }

    /// Auth off, nothing changed towards replicas: for tests and tools.
    pub fn off() -> Auth {
        Auth {
            keys: None,
            forwarding: Forwarding::default(),
        }
    }

    pub fn is_on(&self) -> bool {
        self.keys.is_some()
    }

    pub fn forwarding(&self) -> &Forwarding {
        &self.forwarding
    }

    /// SIGHUP: re-reads the keys file. A bad file is logged and the running
    /// table kept.
    pub fn reload(&self) {
        let Some(k) = &self.keys else { return };
        let old = k.table.load();
        match load(&k.path, Some(&old)) {
            Ok(t) => {
                tracing::info!(keys = t.len(), file = %k.path.display(), "SIGHUP: API keys reloaded");
                k.table.store(Arc::new(t));
            }
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: keys file rejected, keeping the loaded keys")
            }
        }
    }

    /// Phase 1, right after the request head: the key (401) and its requests
    /// per second (429).
    pub fn admit(&self, head: &RequestHead, buf: &[u8], now: Instant) -> Result<Caller, Denial> {
        let Some(k) = &self.keys else {
            return Ok(Caller(None));
        };
        let presented = Presented::of(head, buf);
        let table = k.table.load();
        let Some(entry) = presented.verify(&table) else {
            let (reason, message) = if presented.is_empty() {
                (
                    "missing_key",
                    "missing API key: send it as `Authorization: Bearer KEY` or `x-api-key: KEY`",
                )
            } else {
                ("invalid_key", "invalid API key")
            };
            return Err(Denial::new(
                ErrorKind::Unauthorized,
                reason,
                None,
                message.into(),
            ));
        };
        if let Err(wait) = entry.limiter.request(now) {
            return Err(Denial::rate_limited(
                ErrorKind::RateLimitedRequests,
                "rate_requests",
                entry,
                wait,
                &format!("{} requests per second", rate(&entry.limiter.requests)),
            ));
        }
        Ok(Caller(Some(entry.clone())))
    }

    /// Phase 2, once the body is read: the model it names (403; a key limited
    /// to some models must name one) and its prompt bytes per second (429).
    pub fn check_body(
        &self,
        caller: &Caller,
        model: Option<&str>,
        prompt_bytes: usize,
        now: Instant,
    ) -> Result<(), Denial> {
        let Some(e) = &caller.0 else { return Ok(()) };
        if e.models.is_some() {
            match model {
                Some(m) if e.may_use(m) => {}
                Some(m) => {
                    return Err(Denial::new(
                        ErrorKind::ModelNotAllowed,
                        "model_not_allowed",
                        Some(&e.name),
                        format!("this API key may not use model {m:?}"),
                    ))
                }
                None => {
                    return Err(Denial::new(
                        ErrorKind::ModelNotAllowed,
                        "model_not_allowed",
                        Some(&e.name),
                        "this API key is limited to some models; the request must name one in \"model\"".into(),
                    ))
                }
            }
        }
        if let Err(wait) = e.limiter.prompt(prompt_bytes, now) {
            return Err(Denial::rate_limited(
                ErrorKind::RateLimitedPromptBytes,
                "rate_prompt_bytes",
                e,
                wait,
                &format!("{} prompt bytes per second", rate(&e.limiter.prompt_bytes)),
            ));
        }
        Ok(())
    }
}

fn rate(b: &Option<limiter::TokenBucket>) -> f64 {
    b.as_ref().map_or(0.0, limiter::TokenBucket::rate)
}

/// The keys file at `path` as a table (keeping `previous`'s buckets), and the
/// key count gauge set.
fn load(path: &Path, previous: Option<&KeyTable>) -> Result<KeyTable, Error> {
    let specs = keys_file::load(path).map_err(|e| Error::Config(format!("auth.keys_file: {e}")))?;
    warn_if_readable_by_others(path);
    let t = KeyTable::build(specs, previous, Instant::now());
    if t.is_empty() {
        tracing::warn!(file = %path.display(), "the keys file holds no key: every request is refused");
    }
    metrics::gauge!(m::AUTH_KEYS).set(t.len() as f64);
    Ok(t)
}

fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o004 != 0 {
            tracing::warn!(file = %path.display(), "the keys file is readable by every user: chmod o-r it");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::parse_request_head;

    fn auth(keys: &str) -> (Auth, PathBuf) {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("kvroute-auth-{}-{n}", std::process::id()));
        std::fs::write(&path, keys).unwrap();
        let cfg = AuthConfig {
            keys_file: Some(path.clone()),
            forward_client_key: false,
        };
        (Auth::new(&cfg, &UpstreamConfig::default()).unwrap(), path)
    }

    fn admit(a: &Auth, headers: &str, now: Instant) -> Result<Caller, Denial> {
        let raw = format!("POST /v1/completions HTTP/1.1\r\nHost: a\r\n{headers}\r\n");
        let head = parse_request_head(raw.as_bytes(), 8192, 64)
            .unwrap()
            .unwrap();
        a.admit(&head, raw.as_bytes(), now)
    }

    #[test]
    fn off_admits_everyone_with_no_label() {
        let a = Auth::off();
        let c = admit(&a, "", Instant::now()).unwrap();
        assert_eq!((c.label(), c.tenant()), (NO_KEY, None));
        assert!(c.may_use("any"));
        a.check_body(&c, None, usize::MAX, Instant::now()).unwrap();
        a.reload();
    }

    #[test]
    fn phases_decide_401_403_429() {
        let (a, path) =
            auth("alice sk-alice-0001 rps=1\nbob sk-bob-000002 models=m1 prompt_bytes_per_s=100\n");
        let t0 = Instant::now();
        let d = admit(&a, "", t0).err().unwrap();
        assert_eq!((d.kind, d.label()), (ErrorKind::Unauthorized, NO_KEY));
        assert!(d.message.contains("missing"));
        let d = admit(&a, "x-api-key: sk-alice-0002\r\n", t0).err().unwrap();
        assert_eq!(d.kind, ErrorKind::Unauthorized);
        assert_eq!(d.message, "invalid API key");

        let alice = admit(&a, "Authorization: Bearer sk-alice-0001\r\n", t0).unwrap();
        assert_eq!((alice.label(), alice.tenant()), ("alice", Some("alice")));
        a.check_body(&alice, None, 1 << 20, t0).unwrap();
        let d = admit(&a, "Authorization: Bearer sk-alice-0001\r\n", t0)
            .err()
            .unwrap();
        assert_eq!(d.kind, ErrorKind::RateLimitedRequests);
        assert_eq!((d.retry_after, d.label()), (Some(1), "alice"));
        assert_eq!(d.headers(), "retry-after: 1\r\n");
        admit(
            &a,
            "Authorization: Bearer sk-alice-0001\r\n",
            t0 + Duration::from_secs(1),
        )
        .unwrap();

        let bob = admit(&a, "x-api-key: sk-bob-000002\r\n", t0).unwrap();
        assert_eq!(bob.models(), Some(&["m1".to_string()][..]));
        let d = a.check_body(&bob, Some("m2"), 1, t0).unwrap_err();
        assert_eq!((d.kind, d.label()), (ErrorKind::ModelNotAllowed, "bob"));
        assert!(d.message.contains("\"m2\""));
        let d = a.check_body(&bob, None, 1, t0).unwrap_err();
        assert_eq!(d.kind, ErrorKind::ModelNotAllowed);
        a.check_body(&bob, Some("m1"), 60, t0).unwrap();
        let d = a.check_body(&bob, Some("m1"), 60, t0).unwrap_err();
        assert_eq!(
            (d.kind, d.retry_after),
            (ErrorKind::RateLimitedPromptBytes, Some(1))
        );
        assert!(!d.message.contains("sk-"), "{}", d.message);

        // Reload: a new key works, a removed one is refused; a bad file keeps the table.
        std::fs::write(&path, "carol sk-carol-0003\n").unwrap();
        a.reload();
        assert!(admit(&a, "x-api-key: sk-bob-000002\r\n", t0).is_err());
        assert_eq!(
            admit(&a, "x-api-key: sk-carol-0003\r\n", t0)
                .unwrap()
                .label(),
            "carol"
        );
        std::fs::write(&path, "dave\n").unwrap();
        a.reload();
        assert_eq!(
            admit(&a, "x-api-key: sk-carol-0003\r\n", t0)
                .unwrap()
                .label(),
            "carol"
        );
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_bad_keys_file_refuses_start_naming_file_and_line() {
        let (_, path) = auth("alice sk-alice-0001\n");
        std::fs::write(&path, "alice sk-alice-0001\nbob sk-secret-777 rps=x\n").unwrap();
        let cfg = AuthConfig {
            keys_file: Some(path.clone()),
            forward_client_key: false,
        };
        let e = Auth::new(&cfg, &UpstreamConfig::default())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(&format!("{}:2:", path.display())), "{e}");
        assert!(!e.contains("sk-secret"), "{e}");
        let _ = std::fs::remove_file(&path);
    }
}
