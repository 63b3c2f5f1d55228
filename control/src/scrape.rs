//! Load and KV capacity from a replica's Prometheus `/metrics`, under vLLM's,
//! SGLang's or llama.cpp's names.
//!
//! The text is parsed family by family with a real exposition parser; a family
//! the parser rejects (an exotic line from some other library in the same
//! process) is skipped up to the next line and counted, so one odd metric does
//! not blind the daemon to the load.

use crate::config::Engine;
use crate::error::{ControlError, Result};

/// What one scrape says about a replica.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Scraped {
    pub running: f64,
    pub waiting: f64,
    /// 0.0..=1.0
    pub kv_usage: f64,
    /// KV capacity in blocks of `block_tokens` tokens.
    pub kv_blocks: Option<u64>,
    pub block_tokens: Option<u32>,
    /// Families the parser could not read.
    pub skipped: u32,
    /// `process_start_time_seconds`, when the engine exports it.
    pub start_time: Option<f64>,
    /// A counter that only grows for the life of the engine process (prompt
    /// tokens): when it goes down, the engine restarted and its cache is empty.
    pub monotonic: Option<f64>,
    /// The engine these figures were read as (from the config or detected).
    pub engine: Option<Engine>,
    /// Slot-based engines (llama.cpp): prompts held in slots at once, and the
    /// tokens one slot holds.
    pub slots: Option<u32>,
    pub slot_tokens: Option<u32>,
}

impl Scraped {
    /// True when `self`, scraped after `prev`, comes from a new engine process.
    pub fn restarted_since(&self, prev: &Scraped) -> bool {
        match (prev.start_time, self.start_time) {
            (Some(a), Some(b)) if a != b => return true,
            _ => {}
        }
        matches!((prev.monotonic, self.monotonic), (Some(a), Some(b)) if b < a)
    }
}

/// One sample: name, labels, value.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses an exposition into samples; returns them and the count of skipped chunks.
pub fn parse_exposition(text: &str) -> (Vec<Sample>, u32) {
    // The parser wants every line, the last included, to end in '\n', and has no
    // use for '\r'.
    let mut owned = text.replace("\r\n", "\n");
    if !owned.ends_with('\n') {
        owned.push('\n');
    }
    let mut rest: &str = &owned;
    let mut out = Vec::new();
    let mut skipped = 0;
    while !rest.is_empty() {
        let trimmed = rest.trim_start_matches('\n');
        if trimmed.is_empty() {
            break;
        }
        rest = trimmed;
        match nom_openmetrics::parser::family(rest) {
            Ok((next, family)) if next.len() < rest.len() => {
                for s in &family.samples {
                    out.push(Sample {
                        name: s.name().to_string(),
                        labels: s
                            .labels()
                            .iter()
                            .map(|l| (l.name.to_string(), l.value.clone()))
                            .collect(),
                        value: s.number(),
                    });
                }
                rest = next;
            }
            _ => {
                // A free comment, or a line the parser rejects: drop that one line
                // and carry on. Only sample lines count as lost.
                if !rest.starts_with('#') {
                    skipped += 1;
                }
                rest = rest.split_once('\n').map_or("", |(_, r)| r);
            }
        }
    }
    (out, skipped)
}

/// Metric names per engine.
pub(crate) struct Names {
    pub running: &'static [&'static str],
    pub waiting: &'static [&'static str],
    usage: &'static [&'static str],
    /// Counters that only grow while the process lives, first present wins.
    monotonic: &'static [&'static str],
}

const VLLM: Names = Names {
    running: &["vllm:num_requests_running"],
    waiting: &["vllm:num_requests_waiting"],
    // vLLM V1 renamed gpu_cache_usage_perc; both exist across the versions in use.
    usage: &["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"],
    monotonic: &["vllm:prompt_tokens_total"],
};

const SGLANG: Names = Names {
    running: &["sglang:num_running_reqs"],
    waiting: &["sglang:num_queue_reqs"],
    usage: &["sglang:token_usage"],
    monotonic: &["sglang:prompt_tokens_total"],
};

/// llama.cpp's server with `--metrics`: requests in slots and requests waiting
/// for one. Its KV usage gauge exists only in older servers; without it the
/// share of busy slots stands in (see `extract_samples`).
const LLAMACPP: Names = Names {
    running: &["llamacpp:requests_processing"],
    waiting: &["llamacpp:requests_deferred"],
    usage: &["llamacpp:kv_cache_usage_ratio"],
    monotonic: &["llamacpp:n_decode_total", "llamacpp:prompt_tokens_total"],
};

/// The metric names of an engine that has them.
pub(crate) fn names(engine: Engine) -> Option<&'static Names> {
    match engine {
        Engine::Vllm => Some(&VLLM),
        Engine::Sglang => Some(&SGLANG),
        Engine::Llamacpp => Some(&LLAMACPP),
        Engine::Auto | Engine::Openai => None,
    }
}

/// Sum over the samples of the first name present: a replica with several
/// engines (data-parallel ranks, label `engine`) reports one sample per engine.
fn sum_first(samples: &[Sample], names: &[&str]) -> Option<(f64, usize)> {
    names.iter().find_map(|n| {
        let v: Vec<f64> = samples
            .iter()
            .filter(|s| s.name == *n && s.value.is_finite())
            .map(|s| s.value)
            .collect();
        (!v.is_empty()).then(|| (v.iter().sum(), v.len()))
    })
}

#[cfg(test)]
pub fn extract(engine: Engine, text: &str, target: &str) -> Result<Scraped> {
    let (samples, skipped) = parse_exposition(text);
    extract_samples(engine, &samples, skipped, target)
}

/// Reads `samples` under `engine`'s names. `Auto` must have been resolved by
/// the caller (`detect`); `Openai` has no names and reads as no load.
pub fn extract_samples(
    engine: Engine,
    samples: &[Sample],
    skipped: u32,
    target: &str,
) -> Result<Scraped> {
    let Some(names) = names(engine) else {
        return Ok(Scraped {
            skipped,
            ..Scraped::default()
        });
    };
    let running = sum_first(samples, names.running);
    let waiting = sum_first(samples, names.waiting);
    if running.is_none() && waiting.is_none() {
        return Err(ControlError::Scrape {
            target: target.to_string(),
            msg: format!(
                "no {} or {} in {} samples (wrong engine kind?)",
                names.running[0],
                names.waiting[0],
                samples.len()
            ),
        });
    }
    // Usage is a fraction per engine: the mean is the replica's.
    let kv_usage = sum_first(samples, names.usage)
        .map(|(s, n)| s / n as f64)
        .unwrap_or(0.0)
        .clamp(0.0, 1.0);
    let (kv_blocks, block_tokens) = match engine {
        Engine::Vllm => vllm_capacity(samples),
        Engine::Sglang => sglang_capacity(samples),
        _ => (None, None),
    };
    Ok(Scraped {
        start_time: sum_first(samples, &["process_start_time_seconds"]).map(|x| x.0),
        monotonic: sum_first(samples, names.monotonic).map(|x| x.0),
        running: running.map_or(0.0, |r| r.0),
        waiting: waiting.map_or(0.0, |w| w.0),
        kv_usage,
        kv_blocks,
        block_tokens,
        skipped,
        engine: Some(engine),
        slots: None,
        slot_tokens: None,
    })
}

/// `vllm:cache_config_info` carries the cache shape as labels of a constant 1.
fn vllm_capacity(samples: &[Sample]) -> (Option<u64>, Option<u32>) {
    let infos: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.name == "vllm:cache_config_info")
        .collect();
    let blocks: Option<u64> = infos
        .iter()
        .filter_map(|s| s.label("num_gpu_blocks")?.parse::<u64>().ok())
        .reduce(|a, b| a + b);
    let size = infos
        .iter()
        .find_map(|s| s.label("block_size")?.parse::<u32>().ok());
    (blocks.filter(|b| *b > 0), size.filter(|s| *s > 0))
}

/// SGLang counts its KV pool in tokens (`max_total_num_tokens`), so a "block" is
/// one token; without that gauge, used / usage gives the same number.
fn sglang_capacity(samples: &[Sample]) -> (Option<u64>, Option<u32>) {
    if let Some((total, _)) = sum_first(samples, &["sglang:max_total_num_tokens"]) {
        if total >= 1.0 {
            return (Some(total as u64), Some(1));
        }
    }
    match (
        sum_first(samples, &["sglang:num_used_tokens"]),
        sum_first(samples, &["sglang:token_usage"]),
    ) {
        (Some((used, _)), Some((usage, n))) if usage / n as f64 > 0.01 && used >= 1.0 => {
            (Some((used / (usage / n as f64)).round() as u64), Some(1))
        }
        _ => (None, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VLLM_V1: &str = include_str!("../../tests/fixtures/metrics/vllm_v1.txt");
    const VLLM_V0: &str = include_str!("../../tests/fixtures/metrics/vllm_v0.txt");
    const SGLANG: &str = include_str!("../../tests/fixtures/metrics/sglang.txt");

    #[test]
    fn vllm_v1_fixture() {
        let s = extract(Engine::Vllm, VLLM_V1, "t").unwrap();
        assert_eq!(s.running, 3.0);
        assert_eq!(s.waiting, 2.0);
        assert!((s.kv_usage - 0.125).abs() < 1e-9, "{s:?}");
        assert_eq!(s.kv_blocks, Some(27895));
        assert_eq!(s.block_tokens, Some(16));
        assert_eq!(s.skipped, 0);
    }

    #[test]
    fn vllm_v0_fixture_uses_the_old_usage_name() {
        let s = extract(Engine::Vllm, VLLM_V0, "t").unwrap();
        assert_eq!(s.running, 1.0);
        assert_eq!(s.waiting, 0.0);
        assert!((s.kv_usage - 0.42).abs() < 1e-9, "{s:?}");
        assert_eq!(s.kv_blocks, Some(2048));
        assert_eq!(s.block_tokens, Some(32));
    }

    #[test]
    fn sglang_fixture() {
        let s = extract(Engine::Sglang, SGLANG, "t").unwrap();
        assert_eq!(s.running, 162.0);
        assert_eq!(s.waiting, 2826.0);
        assert!((s.kv_usage - 0.28).abs() < 1e-9);
        assert_eq!(s.kv_blocks, Some(442354));
        assert_eq!(s.block_tokens, Some(1));
    }

    const LLAMACPP: &str = include_str!("../../tests/fixtures/metrics/llamacpp.txt");

    /// llama.cpp's exposition (counter types on names without `_total`, C++
    /// number formatting) parses whole; its load is processing and deferred.
    #[test]
    fn llamacpp_fixture() {
        let (samples, skipped) = parse_exposition(LLAMACPP);
        assert_eq!(skipped, 0);
        assert_eq!(samples.len(), 15, "{samples:?}");
        let s = extract(Engine::Llamacpp, LLAMACPP, "t").unwrap();
        assert_eq!((s.running, s.waiting), (3.0, 2.0));
        assert_eq!(s.kv_usage, 0.0, "no usage gauge in current servers");
        assert_eq!(s.monotonic, Some(10234.0), "n_decode_total");
        assert_eq!((s.kv_blocks, s.block_tokens), (None, None));
        assert_eq!(s.engine, Some(Engine::Llamacpp));
        let cached = samples
            .iter()
            .find(|x| x.name == "llamacpp:prompt_tokens_cached_total")
            .unwrap();
        assert_eq!(cached.value, 1.20345e6);
        // Older servers export a usage ratio, which is read when present.
        let old = "llamacpp:requests_processing 1\nllamacpp:kv_cache_usage_ratio 0.5\n";
        assert_eq!(extract(Engine::Llamacpp, old, "t").unwrap().kv_usage, 0.5);
    }

    #[test]
    fn restarts_show_in_start_time_or_a_counter_going_down() {
        let a = Scraped {
            monotonic: Some(100.0),
            ..Scraped::default()
        };
        let later = Scraped {
            monotonic: Some(150.0),
            ..Scraped::default()
        };
        assert!(!later.restarted_since(&a));
        let reset = Scraped {
            monotonic: Some(3.0),
            ..Scraped::default()
        };
        assert!(reset.restarted_since(&a));
        let t1 = Scraped {
            start_time: Some(1.0),
            monotonic: Some(500.0),
            ..Scraped::default()
        };
        let t2 = Scraped {
            start_time: Some(2.0),
            monotonic: Some(900.0),
            ..Scraped::default()
        };
        assert!(t2.restarted_since(&t1));
        let s = extract(Engine::Sglang, SGLANG, "t").unwrap();
        assert_eq!(s.monotonic, Some(8.128902e6));
    }

    #[test]
    fn wrong_engine_is_an_error_not_zero_load() {
        let e = extract(Engine::Sglang, VLLM_V1, "r1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("sglang:num_running_reqs"), "{e}");
    }

    #[test]
    fn data_parallel_engines_are_summed_and_usage_averaged() {
        let text = "# TYPE vllm:num_requests_running gauge\n\
            vllm:num_requests_running{engine=\"0\"} 2\n\
            vllm:num_requests_running{engine=\"1\"} 5\n\
            vllm:num_requests_waiting{engine=\"0\"} 1\n\
            vllm:kv_cache_usage_perc{engine=\"0\"} 0.2\n\
            vllm:kv_cache_usage_perc{engine=\"1\"} 0.4\n";
        let s = extract(Engine::Vllm, text, "t").unwrap();
        assert_eq!(s.running, 7.0);
        assert!((s.kv_usage - 0.3).abs() < 1e-9);
    }

    #[test]
    fn a_bad_family_is_skipped_not_fatal() {
        let text = "# HELP x odd\nthis is not a metric line\n\
            vllm:num_requests_running 4\n# a free comment\nvllm:num_requests_waiting 1\r\n";
        let s = extract(Engine::Vllm, text, "t").unwrap();
        assert_eq!((s.running, s.waiting), (4.0, 1.0));
        assert_eq!(s.skipped, 1);
    }
}
