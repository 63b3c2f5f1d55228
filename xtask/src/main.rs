//! `cargo xtask`: the project's automation.
//!
//! - `build-ebpf [--check]`: the steering BPF object (committed) and its reproducibility check
//! - `test`: the whole suite, as CI runs it (builds the binaries the end-to-end tests start)
//! - `demo`: simulated replicas + data plane + a real workload, with a printed report
//!   (`--engine llama-cpp`: real llama.cpp replicas instead)
//! - `llama`: llama.cpp's server and the test model, built once and cached
//! - `bench proxy|routing|footprint|tls|drills`: the benchmarks whose figures the README quotes
//!   (in `kvroute-bench`)
//! - `package`: the Debian package (binaries, systemd units, default configs)
#![forbid(unsafe_code)]

mod build_ebpf;
mod demo;
mod package;
mod test;

use clap::{Parser, Subcommand};
use kvroute_bench::{drills, footprint, llama, proxy, routing, tls};

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
    Proxy(proxy::Args),
    /// Routing quality on the shared trace: kvroute policies vs SGLang's router.
    Routing(routing::Args),
    /// Edge footprint: binary size, start-to-ready, memory idle, at the index cap and under load, vs nginx and HAProxy.
    Footprint(footprint::Args),
    /// TLS termination: handshakes and keep-alive requests per second, CPU per request, vs nginx.
    Tls(tls::Args),
    /// Drills under load: a replica killed, the control daemon killed, a rolling upgrade, a connection flood, a garbage replica.
    Drills(drills::Args),
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
        } => proxy::run(a),
        Cmd::Bench {
            which: Bench::Routing(a),
        } => routing::run(a),
        Cmd::Bench {
            which: Bench::Footprint(a),
        } => footprint::run(a),
        Cmd::Bench {
            which: Bench::Tls(a),
        } => tls::run(a),
        Cmd::Bench {
            which: Bench::Drills(a),
        } => drills::run(a),
    }
}
