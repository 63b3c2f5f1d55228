//! `cargo xtask`: the project's automation.
//!
//! - `build-ebpf [--check]`: the steering BPF object (committed) and its reproducibility check
//! - `test`: the whole suite, as CI runs it (builds the binaries the end-to-end tests start)
//! - `demo`: simulated replicas + data plane + a real workload, with a printed report
//!   (`--engine llama-cpp`: real llama.cpp replicas instead)
//! - `llama`: llama.cpp's server and the test model, built once and cached
//! - `bench proxy|routing|footprint|tls|drills`: the benchmarks whose figures the README quotes
//! - `package`: the Debian package (binaries, systemd units, default configs)
#![forbid(unsafe_code)]

mod bench_drills;
mod bench_footprint;
mod bench_proxy;
mod bench_routing;
mod bench_tls;
mod build_ebpf;
mod demo;
mod fleet;
mod llama;
mod llama_routing;
mod package;
mod procs;
mod replay;
mod test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "kvroute project automation")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Compile the steering BPF program into ebpf/obj (or --check it matches).
    BuildEbpf(build_ebpf::Args),
    /// Run the whole test suite (what CI runs).
    Test(test::Args),
    /// Start simulated replicas and kvroute, replay a trace window, print a report.
    Demo(demo::Args),
    /// Build llama.cpp's server and the random-weight test model (cached), and check them.
    Llama(llama::Args),
    /// Build the .deb (binaries, systemd units, /etc/kvroute configs) and check it.
    Package(package::Args),
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        which: Bench,
    },
}

#[derive(Subcommand)]
enum Bench {
    /// Proxy overhead: kvroute vs nginx, HAProxy, SGLang's router, direct.
    Proxy(bench_proxy::Args),
    /// Routing quality on the shared trace: kvroute policies vs SGLang's router.
    Routing(bench_routing::Args),
    /// Edge footprint: binary size, start-to-ready, memory idle, at the index cap and under load, vs nginx and HAProxy.
    Footprint(bench_footprint::Args),
    /// TLS termination: handshakes and keep-alive requests per second, CPU per request, vs nginx.
    Tls(bench_tls::Args),
    /// Drills under load: a replica killed, the control daemon killed, a rolling upgrade, a connection flood, a garbage replica.
    Drills(bench_drills::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::BuildEbpf(a) => build_ebpf::run(a),
        Cmd::Test(a) => test::run(a),
        Cmd::Demo(a) => demo::run(a),
        Cmd::Llama(a) => llama::run(a),
        Cmd::Package(a) => package::run(a),
        Cmd::Bench {
            which: Bench::Proxy(a),
        } => bench_proxy::run(a),
        Cmd::Bench {
            which: Bench::Routing(a),
        } => bench_routing::run(a),
        Cmd::Bench {
            which: Bench::Footprint(a),
        } => bench_footprint::run(a),
        Cmd::Bench {
            which: Bench::Tls(a),
        } => bench_tls::run(a),
        Cmd::Bench {
            which: Bench::Drills(a),
        } => bench_drills::run(a),
    }
}
