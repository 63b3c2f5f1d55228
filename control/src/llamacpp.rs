//! llama.cpp's server beyond `/metrics`: `GET /props` for its slot shape, and
//! `GET /slots` for its load when it runs without `--metrics`.
//!
//! Shapes as `tools/server` writes them: `/props` has `total_slots` (`--parallel`)
//! and `default_generation_settings.n_ctx`, the context of one slot (with a
//! unified KV cache, the whole pool each slot may use); `/slots` is an array with
//! per slot `id`, `n_ctx` and `is_processing`. Both answer 503 while the model
//! loads; `/slots` answers 501 when the server runs with `--no-slots`. Other
//! fields are ignored, so newer servers parse as long as these stay.

use serde::Deserialize;

use crate::error::{ControlError, Result};

/// What `/props` says about the slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Props {
    pub total_slots: u32,
    /// Tokens one slot holds.
    pub slot_tokens: u32,
}

#[derive(Deserialize)]
struct PropsJson {
    total_slots: u32,
    default_generation_settings: Generation,
}

#[derive(Deserialize)]
struct Generation {
    n_ctx: u32,
}

#[derive(Deserialize)]
struct SlotJson {
    #[serde(default)]
    n_ctx: u32,
    #[serde(default)]
    is_processing: bool,
}

/// What `/slots` says: how many there are and how many are busy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slots {
    pub total: u32,
    pub busy: u32,
    /// The largest slot context listed.
    pub slot_tokens: u32,
}

fn bad(target: &str, what: &str, e: impl std::fmt::Display) -> ControlError {
    ControlError::Scrape {
        target: target.to_string(),
        msg: format!("{what}: {e}"),
    }
}

pub fn parse_props(body: &[u8], target: &str) -> Result<Props> {
    let p: PropsJson = serde_json::from_slice(body).map_err(|e| bad(target, "/props", e))?;
    if p.total_slots == 0 || p.default_generation_settings.n_ctx == 0 {
        return Err(bad(target, "/props", "total_slots and n_ctx must be > 0"));
    }
    Ok(Props {
        total_slots: p.total_slots,
        slot_tokens: p.default_generation_settings.n_ctx,
    })
}

pub fn parse_slots(body: &[u8], target: &str) -> Result<Slots> {
    let v: Vec<SlotJson> = serde_json::from_slice(body).map_err(|e| bad(target, "/slots", e))?;
    Ok(Slots {
        total: v.len() as u32,
        busy: v.iter().filter(|s| s.is_processing).count() as u32,
        slot_tokens: v.iter().map(|s| s.n_ctx).max().unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn props_fixture() {
        let p = parse_props(
            include_bytes!("../../tests/fixtures/llamacpp/props.json"),
            "t",
        )
        .unwrap();
        assert_eq!(
            p,
            Props {
                total_slots: 4,
                slot_tokens: 1024
            }
        );
    }

    #[test]
    fn slots_fixture() {
        let s = parse_slots(
            include_bytes!("../../tests/fixtures/llamacpp/slots.json"),
            "t",
        )
        .unwrap();
        assert_eq!(
            s,
            Slots {
                total: 4,
                busy: 2,
                slot_tokens: 1024
            }
        );
    }

    #[test]
    fn errors_name_the_endpoint() {
        // The body llama.cpp sends while loading.
        let loading =
            br#"{"error":{"message":"Loading model","type":"unavailable_error","code":503}}"#;
        let e = parse_props(loading, "http://r").unwrap_err().to_string();
        assert!(e.contains("/props") && e.contains("http://r"), "{e}");
        assert!(parse_slots(loading, "t").is_err());
        let zero = br#"{"total_slots":0,"default_generation_settings":{"n_ctx":512}}"#;
        assert!(parse_props(zero, "t").is_err());
    }
}
