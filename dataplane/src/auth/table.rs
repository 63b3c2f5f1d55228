//! The key table: who a presented key belongs to, and what it may do.
//!
//! Keys are held only as SHA-256 digests. A presented key is hashed and looked
//! up by the first 8 bytes of its digest, then compared in full in constant
//! time. Why the lookup leaks nothing about a key: what the map hashes and
//! compares is the digest of the *presented* key, never a key. Timing could at
//! most tell a caller that the digest of its own guess shares leading bits
//! with some stored digest (and `HashMap`'s random hash seed blurs even that),
//! and turning digest bits into a key needs a SHA-256 preimage.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use subtle::ConstantTimeEq;

use super::keys_file::{digest, KeyDigest, KeySpec};
use super::limiter::Limiter;
use crate::http::RequestHead;

/// One key of the table.
pub struct KeyEntry {
    /// The key's name from the keys file: its only name in logs and metrics.
    pub name: Arc<str>,
    digest: KeyDigest,
    /// `None`: any model.
    pub models: Option<Box<[String]>>,
    /// Shared with the previous table on reload when the limits did not change.
    pub limiter: Arc<Limiter>,
}

impl KeyEntry {
    pub fn may_use(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|m| m.iter().any(|allowed| allowed == model))
    }
}

#[derive(Default)]
pub struct KeyTable {
    /// First 8 digest bytes → the entries with them (almost always one).
    by_prefix: HashMap<u64, Vec<Arc<KeyEntry>>>,
    len: usize,
}

fn prefix(d: &KeyDigest) -> u64 {
    u64::from_le_bytes(d[..8].try_into().expect("32-byte digest"))
}

impl KeyTable {
    /// The table of `specs`. A name also in `previous` with the same limits
    /// keeps its buckets, so a reload neither refills nor resets them.
    pub fn build(specs: Vec<KeySpec>, previous: Option<&KeyTable>, now: Instant) -> KeyTable {
        let old: HashMap<&str, &Arc<Limiter>> = previous
            .into_iter()
            .flat_map(|t| t.by_prefix.values().flatten())
            .map(|e| (&*e.name, &e.limiter))
            .collect();
        let mut t = KeyTable::default();
        for s in specs {
            let limiter = match old.get(s.name.as_str()) {
                Some(l) if l.same_limits(s.rps, s.prompt_bytes_per_s) => Arc::clone(l),
                _ => Arc::new(Limiter::new(s.rps, s.prompt_bytes_per_s, now)),
            };
            let e = Arc::new(KeyEntry {
                name: s.name.into(),
                digest: s.digest,
                models: s.models.map(Vec::into_boxed_slice),
                limiter,
            });
            t.by_prefix.entry(prefix(&e.digest)).or_default().push(e);
            t.len += 1;
        }
        t
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The entry `key` belongs to.
    pub fn verify(&self, key: &[u8]) -> Option<&Arc<KeyEntry>> {
        let d = digest(key);
        let candidates = self.by_prefix.get(&prefix(&d))?;
        let mut found = None;
        // Every candidate compared, and in constant time.
        for e in candidates {
            if bool::from(e.digest.ct_eq(&d)) {
                found = Some(e);
            }
        }
        found
    }
}

/// The keys a request presents: `Authorization: Bearer KEY` and `x-api-key: KEY`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Presented<'b> {
    pub bearer: Option<&'b [u8]>,
    pub x_api_key: Option<&'b [u8]>,
}

impl<'b> Presented<'b> {
    /// Header names are matched in any case, and so is the `Bearer` scheme
    /// (RFC 9110 §11.1). An `Authorization` of another scheme presents no key.
    pub fn of(head: &RequestHead, buf: &'b [u8]) -> Presented<'b> {
        let bearer = head.header(buf, "authorization").and_then(|v| {
            let v = v.trim_ascii();
            let (scheme, rest) = v.split_at(v.iter().position(|&b| b == b' ')?);
            scheme
                .eq_ignore_ascii_case(b"bearer")
                .then(|| rest.trim_ascii())
        });
        let x_api_key = head.header(buf, "x-api-key").map(<[u8]>::trim_ascii);
        Presented {
            bearer: bearer.filter(|k| !k.is_empty()),
            x_api_key: x_api_key.filter(|k| !k.is_empty()),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.bearer.is_none() && self.x_api_key.is_none()
    }

    /// The entry of the first presented key that is valid (Bearer first).
    pub fn verify<'t>(&self, table: &'t KeyTable) -> Option<&'t Arc<KeyEntry>> {
        [self.bearer, self.x_api_key]
            .into_iter()
            .flatten()
            .find_map(|k| table.verify(k))
    }
}

#[cfg(test)]
mod tests {
    use super::super::keys_file::parse;
    use super::*;
    use crate::http::parse_request_head;

    fn table(text: &str) -> KeyTable {
        KeyTable::build(parse(text.as_bytes(), "k").unwrap(), None, Instant::now())
    }

    fn who<'t>(t: &'t KeyTable, headers: &str) -> (bool, Option<&'t str>) {
        let raw = format!("GET /v1/models HTTP/1.1\r\nHost: a\r\n{headers}\r\n");
        let buf = raw.as_bytes();
        let head = parse_request_head(buf, 8192, 64).unwrap().unwrap();
        let p = Presented::of(&head, buf);
        (p.is_empty(), p.verify(t).map(|e| &*e.name))
    }

    const KEYS: &str = "alice sk-alice-0001\nbob sk-bob-000002 models=m1\n";

    #[test]
    fn bearer_and_x_api_key_in_any_case() {
        let t = table(KEYS);
        assert_eq!(t.len(), 2);
        for h in [
            "Authorization: Bearer sk-alice-0001\r\n",
            "authorization: bearer sk-alice-0001\r\n",
            "AUTHORIZATION: BEARER   sk-alice-0001  \r\n",
            "x-api-key: sk-alice-0001\r\n",
            "X-Api-Key: sk-alice-0001\r\n",
            // A valid key in either header is enough.
            "Authorization: Bearer sk-wrong-0001\r\nx-api-key: sk-alice-0001\r\n",
        ] {
            assert_eq!(who(&t, h), (false, Some("alice")), "{h:?}");
        }
        assert_eq!(
            who(
                &t,
                "x-api-key: sk-bob-000002\r\nAuthorization: Bearer sk-alice-0001\r\n"
            ),
            (false, Some("alice")),
            "Bearer first"
        );
    }

    #[test]
    fn missing_and_wrong_keys() {
        let t = table(KEYS);
        assert_eq!(who(&t, ""), (true, None));
        assert_eq!(who(&t, "Authorization: Bearer \r\n"), (true, None));
        assert_eq!(
            who(&t, "Authorization: Basic c2stYWxpY2UtMDAwMQ==\r\n"),
            (true, None)
        );
        assert_eq!(who(&t, "Authorization: sk-alice-0001\r\n"), (true, None));
        for wrong in [
            "Authorization: Bearer sk-alice-000\r\n",
            "Authorization: Bearer sk-alice-00011\r\n",
            "Authorization: Bearer SK-ALICE-0001\r\n",
            "x-api-key: Bearer sk-alice-0001\r\n",
            "Authorization: Bearer sk-alice-0001 x\r\n",
        ] {
            assert_eq!(who(&t, wrong), (false, None), "{wrong:?}");
        }
        assert!(table("").verify(b"anything").is_none());
    }

    #[test]
    fn models_and_limiter_state_across_a_reload() {
        let t0 = Instant::now();
        let specs = |s: &str| parse(s.as_bytes(), "k").unwrap();
        let a = KeyTable::build(
            specs("alice sk-alice-0001 rps=1\nbob sk-bob-000002 models=m1,m2 rps=1\n"),
            None,
            t0,
        );
        let bob = a.verify(b"sk-bob-000002").unwrap();
        assert!(bob.may_use("m2") && !bob.may_use("m3"));
        assert!(a.verify(b"sk-alice-0001").unwrap().may_use("anything"));
        a.verify(b"sk-alice-0001")
            .unwrap()
            .limiter
            .request(t0)
            .unwrap();
        bob.limiter.request(t0).unwrap();
        // alice keeps her (empty) bucket under a new key; bob's limit changed.
        let b = KeyTable::build(
            specs("alice sk-alice-0002 rps=1\nbob sk-bob-000002 rps=2\n"),
            Some(&a),
            t0,
        );
        assert!(b.verify(b"sk-alice-0001").is_none());
        let alice = b.verify(b"sk-alice-0002").unwrap();
        assert!(alice.limiter.request(t0).is_err(), "bucket carried over");
        assert!(b
            .verify(b"sk-bob-000002")
            .unwrap()
            .limiter
            .request(t0)
            .is_ok());
    }
}
