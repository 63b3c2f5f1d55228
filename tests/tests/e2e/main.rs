//! The end-to-end tests: the real binaries (`kvroute`, `kvroute-control`,
//! `kvroute-sim`, `kvroute-load`) started on loopback and checked from the
//! client's side. One test binary, one module per area: run an area with
//! `cargo test -p kvroute-tests --test e2e -- <area>::`, e.g. `proxy_e2e::`.
//!
//! All areas share one process: a test that changes something process-wide
//! (an environment variable, the working directory) would now reach tests of
//! every other area, not only its own file's; none does. Ports come from
//! `harness::free_port`, which never hands the same one out twice in a process,
//! and BPF pins are named after the listen port.

// Before the areas: `both_io!` is in scope textually.
#[macro_use]
mod common;

mod auth_e2e;
mod connection_budget;
mod control_e2e;
mod control_notify;
mod dashboard;
mod degraded;
mod ejection_e2e;
mod fleet_models;
mod llama_e2e;
mod load_cli;
mod load_prompt_props;
mod openai_sdk;
mod overload;
mod prediction_cache;
mod proxy_e2e;
mod routing_e2e;
mod sidecar;
mod sim_http;
mod steering_ebpf;
mod steering_upgrade;
mod systemd_notify;
mod systemd_units;
mod tls_e2e;
mod vllm_kv_events;
