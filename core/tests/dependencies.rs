//! The routing core links no runtime, socket, BPF, HTTP, metrics or CLI crate,
//! directly or through a dependency: what it needs from those arrives as
//! arguments (resolved addresses, clock values) or leaves as plain structs.

use std::process::Command;

/// Crates the core must never link.
const BANNED: &[&str] = &[
    "tokio",
    "tokio-uring",
    "io-uring",
    "mio",
    "socket2",
    "aya",
    "hyper",
    "httparse",
    "metrics",
    "clap",
    "rustls",
    "tracing",
];

#[test]
fn links_no_runtime_socket_bpf_http_metrics_or_cli_crate() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "tree",
            "-p",
            "kvroute-core",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--locked",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8(out.stdout).unwrap();
    let linked: Vec<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(linked.contains(&"kvroute-core"), "{tree}");
    let bad: Vec<&&str> = BANNED.iter().filter(|b| linked.contains(b)).collect();
    assert!(bad.is_empty(), "kvroute-core links {bad:?}:\n{tree}");
}
