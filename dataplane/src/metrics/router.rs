//! The routing core's events and state as Prometheus series: per-request
//! events through [`RouterMetrics`] (the core's [`RouteObserver`]), the
//! router's state as gauges when `/metrics` is scraped ([`export_router_stats`]).

use kvroute_core::replica::Replica;
use kvroute_core::route::observe::CacheReport;
use kvroute_core::route::{RouteObserver, RouterStats};

/// Records the router's per-request events (histograms labelled by replica URL).
#[derive(Debug, Default, Clone, Copy)]
pub struct RouterMetrics;

impl RouteObserver for RouterMetrics {
    fn routed(&self, predicted_ratio: f64, regret_ratio: f64) {
        metrics::histogram!("kvroute_prefix_predicted_ratio").record(predicted_ratio);
        metrics::histogram!("kvroute_routing_regret_ratio").record(regret_ratio);
    }

    fn cache_report(&self, replica: &Replica, r: &CacheReport) {
        if let Some(outcome) = r.outcome {
            metrics::counter!("kvroute_prefix_prediction_total", "outcome" => outcome.as_str())
                .increment(1);
        }
        let url = replica.spec.url.clone();
        metrics::histogram!("kvroute_prefix_predicted_tokens", "replica" => url.clone())
            .record(r.predicted_tokens as f64);
        metrics::histogram!("kvroute_prefix_cached_tokens", "replica" => url.clone())
            .record(r.cached_tokens as f64);
        metrics::histogram!("kvroute_prefix_cached_ratio", "replica" => url)
            .record(r.cached_tokens as f64 / r.prompt_tokens as f64);
    }

    fn ttft_ratio(&self, replica: &Replica, ratio: f64) {
        metrics::histogram!("kvroute_ttft_prediction_ratio", "replica" => replica.spec.url.clone())
            .record(ratio);
    }

    fn report_ignored(&self) {
        metrics::counter!("kvroute_routing_reports_ignored_total").increment(1);
    }
}

/// Sets the gauges of the router's state, read at scrape time.
pub fn export_router_stats(st: &RouterStats) {
    metrics::gauge!("kvroute_index_blocks").set(st.index.entries as f64);
    metrics::gauge!("kvroute_index_pairs").set(st.index.pairs as f64);
    metrics::gauge!("kvroute_index_bytes").set(st.index.heap_bytes as f64);
    metrics::gauge!("kvroute_index_evictions").set(st.index.evictions as f64);
    for r in &st.replicas {
        let url = r.url.clone();
        metrics::gauge!("kvroute_index_replica_blocks", "replica" => url.clone())
            .set(r.blocks as f64);
        metrics::gauge!("kvroute_index_replica_budget_blocks", "replica" => url.clone())
            .set(r.budget_blocks as f64);
        if let Some(o) = r.prompts {
            metrics::gauge!("kvroute_index_replica_prompts", "replica" => url.clone(), "place" => "slot")
                .set(f64::from(o.in_slots));
            metrics::gauge!("kvroute_index_replica_prompts", "replica" => url.clone(), "place" => "host")
                .set(f64::from(o.in_host));
        }
        if let Some(s) = r.speed {
            metrics::gauge!("kvroute_replica_prefill_rate_bytes_per_second", "replica" => url.clone())
                .set(s.prefill_bytes_per_s);
            metrics::gauge!("kvroute_replica_ttft_overhead_seconds", "replica" => url)
                .set(s.ttft_overhead_s);
        }
    }
    metrics::gauge!("kvroute_bytes_per_token").set(st.bytes_per_token);
}
