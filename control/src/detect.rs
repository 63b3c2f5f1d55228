//! `engine = "auto"`: which engine a replica runs, from the metric names on its
//! `/metrics` page.
//!
//! An engine is recognised by its load metrics (what the daemon needs from it):
//! vLLM's `vllm:num_requests_*`, SGLang's `sglang:num_running_reqs` /
//! `sglang:num_queue_reqs`, llama.cpp's `llamacpp:requests_processing` /
//! `llamacpp:requests_deferred`. A page with none of them (another exporter,
//! an engine kvroute does not know) is no engine: the replica is then only
//! health-checked. The scraper keeps a decision while the page still fits it
//! ([`fits`]), so a page that happened to carry two engines' names would not
//! flip between them, and decides again when it no longer does (an engine
//! restarted as another) or after a failed scrape.

use crate::config::Engine;
use crate::scrape::{names, Sample};

/// Engines that can be recognised, in the order ties are settled.
const KNOWN: [Engine; 3] = [Engine::Vllm, Engine::Sglang, Engine::Llamacpp];

/// True when `samples` carry `engine`'s load metrics.
pub fn fits(engine: Engine, samples: &[Sample]) -> bool {
    let Some(n) = names(engine) else {
        return false;
    };
    samples
        .iter()
        .any(|s| n.running.contains(&s.name.as_str()) || n.waiting.contains(&s.name.as_str()))
}

/// The engine whose load metrics are on the page; when several are, the one
/// with the most samples under its prefix.
pub fn detect(samples: &[Sample]) -> Option<Engine> {
    let prefix_count = |e: Engine| {
        let p = format!("{}:", e.name());
        samples.iter().filter(|s| s.name.starts_with(&p)).count()
    };
    KNOWN
        .iter()
        .copied()
        .filter(|e| fits(*e, samples))
        .map(|e| (prefix_count(e), e))
        .reduce(|best, next| if next.0 > best.0 { next } else { best })
        .map(|(_, e)| e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scrape::parse_exposition;

    fn detect_text(text: &str) -> Option<Engine> {
        detect(&parse_exposition(text).0)
    }

    #[test]
    fn each_engines_own_page_is_recognised() {
        for (text, want) in [
            (
                include_str!("../../tests/fixtures/metrics/vllm_v1.txt"),
                Engine::Vllm,
            ),
            (
                include_str!("../../tests/fixtures/metrics/vllm_v0.txt"),
                Engine::Vllm,
            ),
            (
                include_str!("../../tests/fixtures/metrics/sglang.txt"),
                Engine::Sglang,
            ),
            (
                include_str!("../../tests/fixtures/metrics/llamacpp.txt"),
                Engine::Llamacpp,
            ),
        ] {
            assert_eq!(detect_text(text), Some(want));
        }
    }

    #[test]
    fn a_page_without_an_engines_load_metrics_is_no_engine() {
        assert_eq!(detect_text(""), None);
        // A process exporter, and an engine kvroute does not read (TGI).
        let other = "# TYPE process_start_time_seconds gauge\nprocess_start_time_seconds 1.7e9\n\
                     # TYPE tgi_queue_size gauge\ntgi_queue_size 3\n";
        assert_eq!(detect_text(other), None);
        // An engine's prefix alone is not enough: the load is what the daemon reads.
        assert_eq!(detect_text("llamacpp:prompt_tokens_total 10\n"), None);
        assert_eq!(detect_text("vllm:prompt_tokens_total 10\n"), None);
    }

    #[test]
    fn two_engines_names_go_to_the_one_with_more_and_a_decision_holds_while_it_fits() {
        let both = "sglang:num_running_reqs 1\nvllm:num_requests_running 2\n\
                    vllm:num_requests_waiting 0\nvllm:kv_cache_usage_perc 0.1\n";
        let samples = parse_exposition(both).0;
        assert_eq!(detect(&samples), Some(Engine::Vllm));
        assert!(fits(Engine::Sglang, &samples));
        assert!(!fits(Engine::Llamacpp, &samples));
        assert!(!fits(Engine::Openai, &samples));
    }
}
