//! `cargo +nightly fuzz run analyze` from `dataplane/`: any body on any endpoint
//! must yield Ok or Err, never a panic, and what it yields must be consistent:
//! - one hash per full block of the prompt stream, none for the partial last one;
//! - the stream (separators included) never longer than the body;
//! - the hashes equal those of the whole stream hashed as one slice, so feeding
//!   it in borrowed pieces changes nothing;
//! - `extract` alone agrees with `analyze` (same fields, same error);
//! - paths kvroute does not know never fail.
#![no_main]

use kvroute::prefix::{analyze, chain_hashes, PrefixConfig};
use kvroute::prompt::{extract, Endpoint};
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
    let analyzed = analyze(path, body, &cfg);
    let mut stream = Vec::new();
    let extracted = extract(Endpoint::from_path(path), body, |s| {
        stream.extend_from_slice(s)
    });
    match (&analyzed, &extracted) {
        (Ok(a), Ok(fields)) => {
            assert_eq!(&a.fields, fields);
            assert_eq!(a.hashes.len(), a.prompt_bytes / cfg.block_bytes);
            assert_eq!(a.prompt_bytes, stream.len());
            assert!(a.prompt_bytes <= body.len(), "stream longer than the body");
            assert_eq!(a.hashes, chain_hashes(&stream, &cfg));
        }
        (Err(a), Err(e)) => {
            assert_eq!(a, e);
            assert_ne!(Endpoint::from_path(path), Endpoint::Other, "{a}");
        }
        _ => panic!("analyze {analyzed:?} but extract {extracted:?}"),
    }
});
