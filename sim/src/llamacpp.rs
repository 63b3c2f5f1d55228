//! llama.cpp's server surface, for `--engine llamacpp`: `/metrics` under its
//! `llamacpp:` names and number formatting, `/props`, `/slots`, `/health`, and
//! its error bodies (501 for an endpoint it was started without, 503 while the
//! model loads). Shapes follow llama.cpp's `tools/server` source; fields a
//! client of these endpoints does not need are left out.

use std::fmt::Write;

use serde_json::json;

use super::config::Config;
use super::metrics::Snapshot;

/// A number as C++'s default stream output writes a double (`%g`: six
/// significant digits, exponent form below 1e-4 and from 1e6).
pub fn cpp_number(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return if v.is_nan() {
            "nan".into()
        } else if v.is_infinite() {
            if v > 0.0 { "inf" } else { "-inf" }.into()
        } else {
            "0".into()
        };
    }
    // The exponent after rounding to six digits (which can carry into the next
    // power of ten) decides the form, as in `%g`.
    let sci = format!("{v:.5e}");
    let (mantissa, e) = sci.split_once('e').unwrap_or((&sci, "0"));
    let e: i32 = e.parse().unwrap_or(0);
    if !(-4..6).contains(&e) {
        let m = trim_zeros(mantissa);
        let sign = if e < 0 { '-' } else { '+' };
        return format!("{m}e{sign}{:02}", e.abs());
    }
    let decimals = (5 - e).max(0) as usize;
    trim_zeros(&format!("{v:.decimals$}")).to_string()
}

fn trim_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

/// `/metrics` as llama.cpp's `server_task_result_metrics::to_metrics` writes it.
pub fn render_metrics(s: &Snapshot) -> String {
    let c = &s.counters;
    let processed = c.prompt_tokens.saturating_sub(c.prefix_hits);
    // One decode for each prompt and one per further generated token.
    let decodes = c.requests_finished + c.generation_tokens;
    let counters: [(&str, &str, f64); 10] = [
        ("prompt_tokens_total", "Number of prompt tokens processed, excluding cached tokens", processed as f64),
        ("prompt_tokens_cached_total", "Number of prompt tokens reused from the cache", c.prefix_hits as f64),
        ("prompt_seconds_total", "Total time spent processing prompts", 0.0),
        ("tokens_predicted_total", "Number of generation tokens processed", c.generation_tokens as f64),
        ("tokens_predicted_seconds_total", "Total time spent generating tokens", 0.0),
        ("n_decode_total", "Total number of llama_decode() calls, excluding speculative decoding and multimodal decoding", decodes as f64),
        ("n_tokens_max", "Largest observed sequence length (prompt + generation)", c.longest_sequence as f64),
        ("spec_decode_num_draft_tokens_total", "Speculative: Total draft tokens generated", 0.0),
        ("spec_decode_num_accepted_tokens_total", "Speculative: Total draft tokens accepted by the target model", 0.0),
        ("spec_decode_num_drafts_total", "Speculative: Total speculative decoding verification steps", 0.0),
    ];
    let gauges: [(&str, &str, f64); 5] = [
        (
            "prompt_tokens_seconds",
            "Average prompt throughput in tokens/s",
            0.0,
        ),
        (
            "predicted_tokens_seconds",
            "Average generation throughput in tokens/s",
            0.0,
        ),
        (
            "requests_processing",
            "Number of requests processing",
            s.running as f64,
        ),
        (
            "requests_deferred",
            "Number of requests deferred",
            s.waiting as f64,
        ),
        (
            "n_busy_slots_per_decode",
            "Average number of busy slots per llama_decode() call",
            0.0,
        ),
    ];
    let mut out = String::with_capacity(4096);
    for (kind, items) in [("counter", &counters[..]), ("gauge", &gauges[..])] {
        for (name, help, value) in items {
            // Writing to a String cannot fail.
            let _ = write!(
                out,
                "# HELP llamacpp:{name} {help}\n# TYPE llamacpp:{name} {kind}\nllamacpp:{name} {}\n",
                cpp_number(*value)
            );
        }
    }
    out
}

/// `GET /props`.
pub fn props(config: &Config) -> serde_json::Value {
    json!({
        "default_generation_settings": {
            "n_ctx": config.slot_tokens(),
            "params": {"seed": 4294967295u32, "temperature": 0.8, "top_k": 40, "top_p": 0.95,
                       "max_tokens": -1, "n_predict": -1, "stream": false},
        },
        "total_slots": config.parallel,
        "model_alias": config.model,
        "model_path": format!("models/{}.gguf", config.model),
        "modalities": {"vision": false, "video": false, "audio": false},
        "endpoint_slots": !config.no_slots,
        "endpoint_props": false,
        "endpoint_metrics": !config.no_metrics,
        "chat_template": "",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "build_info": "kvroute-sim",
        "is_sleeping": false,
    })
}

/// `GET /slots`: the first `running` slots processing.
pub fn slots(config: &Config, running: usize) -> serde_json::Value {
    let list: Vec<serde_json::Value> = (0..config.parallel as usize)
        .map(|id| {
            json!({
                "id": id,
                "n_ctx": config.slot_tokens(),
                "speculative": false,
                "is_processing": id < running,
            })
        })
        .collect();
    serde_json::Value::Array(list)
}

/// llama.cpp's `format_error_response` body for `code`.
pub fn error_body(code: u16, message: &str) -> Vec<u8> {
    let kind = match code {
        501 => "not_supported_error",
        503 => "unavailable_error",
        _ => "server_error",
    };
    serde_json::to_vec(&json!({"error": {"code": code, "message": message, "type": kind}}))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::Counters;

    #[test]
    fn numbers_print_as_cpp_streams_do() {
        for (v, want) in [
            (0.0, "0"),
            (3.0, "3"),
            (48213.0, "48213"),
            (1203450.0, "1.20345e+06"),
            (999999.0, "999999"),
            (9999995.0, "1e+07"),
            (37.112, "37.112"),
            (2.0 / 3.0, "0.666667"),
            (0.00001, "1e-05"),
            (0.0001, "0.0001"),
        ] {
            assert_eq!(cpp_number(v), want, "{v}");
        }
    }

    #[test]
    fn metrics_have_llamacpps_names() {
        let snap = Snapshot {
            running: 2,
            waiting: 1,
            kv_usage: 0.0,
            cached_blocks: 0,
            counters: Counters {
                prompt_tokens: 100,
                prefix_hits: 40,
                generation_tokens: 8,
                requests_finished: 2,
                longest_sequence: 70,
                ..Counters::default()
            },
        };
        let text = render_metrics(&snap);
        assert!(text.contains("# TYPE llamacpp:n_tokens_max counter\nllamacpp:n_tokens_max 70\n"));
        assert!(text.contains("llamacpp:requests_processing 2\n"));
        assert!(text.contains("llamacpp:requests_deferred 1\n"));
        assert!(text.contains("llamacpp:prompt_tokens_total 60\n"));
        assert!(text.contains("llamacpp:prompt_tokens_cached_total 40\n"));
        assert!(text.contains("llamacpp:n_decode_total 10\n"));
    }
}
