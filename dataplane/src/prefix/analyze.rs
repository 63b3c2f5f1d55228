//! The proxy's single call per request: routing fields and block hashes in one pass.

use super::chain::{BlockHasher, BlockHashes, PrefixConfig};
use crate::prompt::{extract, Endpoint, ExtractError, RequestFields};

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
