//! `/metrics` in Prometheus text format under vLLM's metric names, so that scrapers written
//! for vLLM read the simulator unchanged.

use std::fmt::Write;

use super::replica::Counters;

/// Point-in-time view of a replica for the exposition.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub running: usize,
    pub waiting: usize,
    /// Fraction (0..=1) of KV blocks reserved by running sequences, as vLLM reports it.
    pub kv_usage: f64,
    pub cached_blocks: usize,
    pub counters: Counters,
}

pub fn render(model: &str, num_gpu_blocks: usize, block_size: usize, s: &Snapshot) -> String {
    let mut out = String::with_capacity(2048);
    let label = format!("model_name=\"{}\"", escape(model));
    let mut metric = |name: &str, kind: &str, help: &str, value: String| {
        // Writing to a String cannot fail.
        let _ = write!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{{label}}} {value}\n"
        );
    };
    metric(
        "vllm:num_requests_running",
        "gauge",
        "Number of requests in model execution batches.",
        s.running.to_string(),
    );
    metric(
        "vllm:num_requests_waiting",
        "gauge",
        "Number of requests waiting to be processed.",
        s.waiting.to_string(),
    );
    metric(
        "vllm:kv_cache_usage_perc",
        "gauge",
        "KV-cache usage. 1 means 100 percent usage.",
        format!("{:?}", s.kv_usage),
    );
    let c = &s.counters;
    metric(
        "vllm:prefix_cache_queries_total",
        "counter",
        "Prefix cache queries, in terms of number of queried tokens.",
        format!("{:?}", c.prefix_queries as f64),
    );
    metric(
        "vllm:prefix_cache_hits_total",
        "counter",
        "Prefix cache hits, in terms of number of cached tokens.",
        format!("{:?}", c.prefix_hits as f64),
    );
    metric(
        "vllm:prompt_tokens_total",
        "counter",
        "Number of prefill tokens processed.",
        format!("{:?}", c.prompt_tokens as f64),
    );
    metric(
        "vllm:generation_tokens_total",
        "counter",
        "Number of generation tokens processed.",
        format!("{:?}", c.generation_tokens as f64),
    );
    metric(
        "vllm:request_success_total",
        "counter",
        "Count of successfully processed requests.",
        format!("{:?}", c.requests_finished as f64),
    );
    let _ = write!(
        out,
        "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n\
         # TYPE vllm:cache_config_info gauge\n\
         vllm:cache_config_info{{block_size=\"{block_size}\",enable_prefix_caching=\"True\",\
         {label},num_gpu_blocks=\"{num_gpu_blocks}\"}} 1.0\n"
    );
    let _ = write!(
        out,
        "# HELP kvroute_sim_cached_blocks Blocks held by the simulated prefix cache.\n\
         # TYPE kvroute_sim_cached_blocks gauge\n\
         kvroute_sim_cached_blocks{{{label}}} {}\n",
        s.cached_blocks
    );
    out
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_vllm_names_and_labels() {
        let snap = Snapshot {
            running: 3,
            waiting: 1,
            kv_usage: 0.25,
            cached_blocks: 7,
            counters: Counters {
                prefix_queries: 100,
                prefix_hits: 32,
                ..Counters::default()
            },
        };
        let text = render("m", 1000, 16, &snap);
        assert!(text.contains("vllm:num_requests_running{model_name=\"m\"} 3\n"));
        assert!(text.contains("vllm:num_requests_waiting{model_name=\"m\"} 1\n"));
        assert!(text.contains("vllm:kv_cache_usage_perc{model_name=\"m\"} 0.25\n"));
        assert!(text.contains("vllm:prefix_cache_queries_total{model_name=\"m\"} 100.0\n"));
        assert!(text.contains("vllm:prefix_cache_hits_total{model_name=\"m\"} 32.0\n"));
        assert!(text.contains("num_gpu_blocks=\"1000\""));
        assert!(text.contains("block_size=\"16\""));
        assert!(text.contains("} 1.0\n"));
    }
}
