//! Fault injection knobs set through `POST /sim/fault`.

use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum FaultMode {
    /// Answer HTTP 500 with an OpenAI-shaped error body.
    #[default]
    #[serde(rename = "500")]
    Http500,
    /// Abort the connection before any response byte (RST).
    #[serde(rename = "reset")]
    Reset,
    /// Never answer.
    #[serde(rename = "hang")]
    Hang,
}

/// Body of `POST /sim/fault`; absent fields keep their current value.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultRequest {
    pub error_rate: Option<f64>,
    pub mode: Option<FaultMode>,
    pub slowdown: Option<f64>,
    #[serde(default)]
    pub drop_cache: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Faults {
    pub error_rate: f64,
    pub mode: FaultMode,
    pub slowdown: f64,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            error_rate: 0.0,
            mode: FaultMode::Http500,
            slowdown: 1.0,
        }
    }
}

impl Faults {
    pub fn apply(&mut self, req: &FaultRequest) {
        if let Some(rate) = req.error_rate {
            self.error_rate = if rate.is_finite() {
                rate.clamp(0.0, 1.0)
            } else {
                0.0
            };
        }
        if let Some(mode) = req.mode {
            self.mode = mode;
        }
        if let Some(s) = req.slowdown {
            self.slowdown = if s.is_finite() && s > 0.0 { s } else { 1.0 };
        }
    }

    /// The fault this request suffers, given a uniform draw in [0, 1).
    pub fn pick(&self, draw: f64) -> Option<FaultMode> {
        (draw < self.error_rate).then_some(self.mode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_updates_and_picks() {
        let mut f = Faults::default();
        let req: FaultRequest =
            serde_json::from_str(r#"{"error_rate":0.5,"mode":"reset"}"#).unwrap();
        f.apply(&req);
        assert_eq!(f.pick(0.49), Some(FaultMode::Reset));
        assert_eq!(f.pick(0.5), None);
        f.apply(&serde_json::from_str(r#"{"slowdown":3}"#).unwrap());
        assert_eq!(
            (f.error_rate, f.mode, f.slowdown),
            (0.5, FaultMode::Reset, 3.0)
        );
        assert!(serde_json::from_str::<FaultRequest>(r#"{"mode":"explode"}"#).is_err());
    }
}
