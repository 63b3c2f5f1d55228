//! `cargo xtask`: the project's automation (test, demo, bench, build-ebpf).
fn main() {}
