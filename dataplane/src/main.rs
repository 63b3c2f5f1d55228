//! The `kvroute` binary: parses the config and runs the data plane.
fn main() {}
