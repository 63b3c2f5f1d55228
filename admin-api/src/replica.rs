//! A replica as configured or pushed, and the load it reports.

use serde::{Deserialize, Serialize};

/// Whether a replica takes traffic or stands by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pool {
    #[default]
    Active,
    Warm,
}

/// What a replica is, as configured or pushed by the control daemon.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaSpec {
    /// `http://host:port`, or `https://host:port` for a replica behind TLS
    /// (verified against `[upstream] ca_file` or the system roots).
    pub url: String,
    /// Model names it serves; empty means "any model".
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub pool: Pool,
    /// Set false by the control daemon's health checks.
    #[serde(default = "default_true")]
    pub healthy: bool,
    /// KV capacity in blocks of `kv_block_tokens` tokens, when known.
    #[serde(default)]
    pub kv_blocks: Option<u64>,
    #[serde(default)]
    pub kv_block_tokens: Option<u32>,
    /// Set for an engine that keeps whole prompts in a fixed number of slots
    /// (llama.cpp's server: `total_slots`): the index then holds at most this
    /// many prompts in slots, plus what `kv_host_tokens` keeps, and forgets a
    /// prompt the way the engine does rather than block by block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_slots: Option<u32>,
    /// Tokens one slot holds (llama.cpp's `n_ctx` per slot); a longer prompt is
    /// held up to it. Unset: no limit but the block budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_slot_tokens: Option<u32>,
    /// Tokens of prompts the engine keeps in host memory after they leave a slot
    /// (llama.cpp's `--cache-ram` prompt cache); unset or 0: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_host_tokens: Option<u64>,
    /// Most requests this proxy keeps in flight on the replica at once; a
    /// replica at its bound is skipped by routing and requests wait in the
    /// admission queue. Unset: `[upstream] max_in_flight_per_replica`; 0:
    /// unbounded. Set near the engine's batch size (vLLM `max_num_seqs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u32>,
}

fn default_weight() -> u32 {
    1
}
fn default_true() -> bool {
    true
}

impl ReplicaSpec {
    pub fn new(url: impl Into<String>) -> Self {
        ReplicaSpec {
            url: url.into(),
            models: Vec::new(),
            weight: 1,
            pool: Pool::Active,
            healthy: true,
            kv_blocks: None,
            kv_block_tokens: None,
            kv_slots: None,
            kv_slot_tokens: None,
            kv_host_tokens: None,
            max_in_flight: None,
        }
    }
}

/// Load reported by the replica itself (scraped by the control daemon).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ExternalLoad {
    pub running: u32,
    pub waiting: u32,
    /// KV cache usage, 0.0..=1.0.
    pub kv_usage: f32,
}

/// A replica URL, `http(s)://host[:port][/]`, split the way both ends read it:
/// the data plane to connect (and verify TLS), the control daemon to probe.
/// Splitting only; resolving the host is the caller's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaUrl<'a> {
    /// `https://`.
    pub tls: bool,
    /// The host as written (an IPv6 address keeps its brackets).
    pub host: &'a str,
    /// `host[:port]` as written, for the `Host` header.
    pub authority: &'a str,
    /// `host:port` with the scheme's port (80, 443) filled in when left out:
    /// what to resolve.
    pub host_port: String,
}

/// Why a replica URL does not split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaUrlError {
    Scheme,
    Path,
}

impl std::fmt::Display for ReplicaUrlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReplicaUrlError::Scheme => "must start with http:// or https://",
            ReplicaUrlError::Path => "expected http(s)://host:port with no path",
        })
    }
}

impl std::error::Error for ReplicaUrlError {}

impl<'a> ReplicaUrl<'a> {
    pub fn parse(url: &'a str) -> Result<ReplicaUrl<'a>, ReplicaUrlError> {
        let (rest, default_port, tls) = if let Some(r) = url.strip_prefix("http://") {
            (r, 80, false)
        } else if let Some(r) = url.strip_prefix("https://") {
            (r, 443, true)
        } else {
            return Err(ReplicaUrlError::Scheme);
        };
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') {
            return Err(ReplicaUrlError::Path);
        }
        let (host, host_port) = match authority.rsplit_once(':') {
            Some((h, p))
                if !h.is_empty()
                    && !p.is_empty()
                    && p.bytes().all(|b| b.is_ascii_digit())
                    && (!h.contains(':') || h.ends_with(']')) =>
            {
                (h, authority.to_string())
            }
            _ => (authority, format!("{authority}:{default_port}")),
        };
        Ok(ReplicaUrl {
            tls,
            host,
            authority,
            host_port,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_with_only_a_url_takes_the_defaults() {
        let s: ReplicaSpec = serde_json::from_str(r#"{"url":"http://127.0.0.1:8001"}"#).unwrap();
        assert_eq!(s, ReplicaSpec::new("http://127.0.0.1:8001"));
        assert_eq!((s.weight, s.pool, s.healthy), (1, Pool::Active, true));
        let warm: ReplicaSpec =
            serde_json::from_str(r#"{"url":"http://h:1","pool":"warm","healthy":false}"#).unwrap();
        assert_eq!((warm.pool, warm.healthy), (Pool::Warm, false));
    }

    #[test]
    fn urls_split_into_host_authority_and_the_address_to_resolve() {
        let u = ReplicaUrl::parse("http://127.0.0.1:8001/").unwrap();
        assert_eq!(
            (u.tls, u.host, u.authority),
            (false, "127.0.0.1", "127.0.0.1:8001")
        );
        assert_eq!(u.host_port, "127.0.0.1:8001");
        let u = ReplicaUrl::parse("https://localhost").unwrap();
        assert_eq!(
            (u.tls, u.host, u.host_port.as_str()),
            (true, "localhost", "localhost:443")
        );
        assert_eq!(
            ReplicaUrl::parse("http://[::1]").unwrap().host_port,
            "[::1]:80"
        );
        assert_eq!(ReplicaUrl::parse("http://[::1]:9").unwrap().host, "[::1]");
        assert_eq!(ReplicaUrl::parse("ftp://x:1"), Err(ReplicaUrlError::Scheme));
        assert_eq!(
            ReplicaUrl::parse("http://h:1/v1"),
            Err(ReplicaUrlError::Path)
        );
        assert_eq!(ReplicaUrl::parse("http://"), Err(ReplicaUrlError::Path));
    }

    #[test]
    fn an_unknown_field_is_refused() {
        assert!(serde_json::from_str::<ReplicaSpec>(r#"{"url":"http://h:1","wieght":2}"#).is_err());
    }
}
