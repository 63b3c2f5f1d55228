//! The proxy's single call per request: routing fields and block hashes in one pass.
//!
//! Per request, the proxy does:
//! ```text
//! let a = analyze(path, &body, &routing.prefix())?;            // Err → 400 with e.to_string()
//! let req = a.route_request(path, header(&routing.session_header), now_ms);
//! let d = router.pick(&req, &replicas.load(), &tried)?;        // None → 503
//! router.on_routed(&req, &d);                                  // then forward to d.replica
//! ...
//! router.on_usage_predicted(&d, prompt_tokens, cached_tokens); // if the response had usage
//! ```

use super::chain::{BlockHasher, BlockHashes, PrefixConfig};
use crate::prompt::{extract, Endpoint, ExtractError, RequestFields};
use crate::route::RouteRequest;

/// What routing needs to know about one request body.
#[derive(Debug, Clone, PartialEq)]
pub struct Analyzed<'a> {
    pub endpoint: Endpoint,
    pub fields: RequestFields<'a>,
    /// Prefix-chained hashes of the prompt's full blocks (`RouteRequest::block_hashes`).
    pub hashes: BlockHashes,
    /// Prompt stream length including separators and the partial last block
    /// (`RouteRequest::prompt_bytes`).
    pub prompt_bytes: usize,
}

/// Extracts the routing fields of `body` (sent to `path`) and hashes its prompt.
/// `Err` means a malformed body the proxy answers with 400 and the error's text;
/// a path kvroute does not know yields `Ok` with no prompt.
pub fn analyze<'a>(
    path: &str,
    body: &'a [u8],
    cfg: &PrefixConfig,
) -> Result<Analyzed<'a>, ExtractError> {
    let endpoint = Endpoint::from_path(path);
    let mut hasher = BlockHasher::with_capacity(
        cfg,
        if endpoint == Endpoint::Other {
            0
        } else {
            body.len()
        },
    );
    let fields = extract(endpoint, body, |slice| hasher.feed(slice))?;
    let prompt_bytes = hasher.total_bytes();
    Ok(Analyzed {
        endpoint,
        fields,
        hashes: hasher.finish(),
        prompt_bytes,
    })
}

impl Analyzed<'_> {
    /// The router's view of this request. The session key is the session header's
    /// value when the client sent one, else the body's `user`.
    pub fn route_request<'r>(
        &'r self,
        path: &'r str,
        session_header: Option<&'r [u8]>,
        now_ms: u64,
    ) -> RouteRequest<'r> {
        RouteRequest {
            path,
            model: self.fields.model,
            session: session_header.or(self.fields.user.map(str::as_bytes)),
            block_hashes: &self.hashes,
            prompt_bytes: self.prompt_bytes,
            now_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_turns_share_every_full_block() {
        let cfg = PrefixConfig { block_bytes: 16 };
        let t1 = r#"{"model":"m","user":"u","messages":[{"role":"user","content":"What is a KV cache, in one paragraph?"}]}"#;
        let t2 = r#"{"model":"m","user":"u","messages":[{"role":"user","content":"What is a KV cache, in one paragraph?"},{"role":"assistant","content":"It stores attention keys and values."},{"role":"user","content":"And prefix caching?"}]}"#;
        let a = analyze("/v1/chat/completions", t1.as_bytes(), &cfg).unwrap();
        let b = analyze("/v1/chat/completions", t2.as_bytes(), &cfg).unwrap();
        assert!(!a.hashes.is_empty());
        assert_eq!(&b.hashes[..a.hashes.len()], &a.hashes[..]);
        assert_eq!(a.hashes.len(), a.prompt_bytes / 16);
        let r = b.route_request("/v1/chat/completions", None, 5);
        assert_eq!(
            (r.model, r.session, r.now_ms),
            (Some("m"), Some(&b"u"[..]), 5)
        );
        let r = b.route_request("/v1/chat/completions", Some(b"s"), 5);
        assert_eq!(r.session, Some(&b"s"[..]));
    }

    #[test]
    fn unknown_paths_have_no_prompt_and_bad_bodies_fail() {
        let a = analyze("/v1/models", b"", &PrefixConfig::default()).unwrap();
        assert!(a.hashes.is_empty() && a.prompt_bytes == 0);
        let e = analyze("/v1/completions", b"{\"prompt\":", &PrefixConfig::default());
        assert!(e.is_err());
    }
}
