//! `cargo +nightly fuzz run analyze` from `dataplane/`: any body on any endpoint
//! must yield Ok or Err, never a panic, and the stream length must fit the body.
#![no_main]

use kvroute::prefix::{analyze, PrefixConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    let path = match sel % 5 {
        0 => "/v1/completions",
        1 => "/v1/chat/completions",
        2 => "/generate",
        3 => "/v1/responses",
        _ => "/v1/other",
    };
    let cfg = PrefixConfig {
        block_bytes: 16 + usize::from(sel >> 3),
    };
    if let Ok(a) = analyze(path, body, &cfg) {
        assert_eq!(a.hashes.len(), a.prompt_bytes / cfg.block_bytes);
    }
});
