//! `kvroute-ebpf`: the connection-steering BPF program shared with the data plane.
//!
//! The `sk_reuseport` program itself (C source, committed object built by
//! `cargo xtask build-ebpf`) lands with the eBPF steering issue. What is fixed
//! already is the layout of the maps the data plane and the program share, so
//! that both ends are written against one definition.
#![forbid(unsafe_code)]
#![no_std]

/// Name of the `REUSEPORT_SOCKARRAY` map holding one listener socket per worker.
pub const MAP_SOCKETS: &str = "kvr_sockets";
/// Name of the `ARRAY` map of per-worker live-stream counts (`u32` per slot).
pub const MAP_LIVE_STREAMS: &str = "kvr_live";
/// Name of the single-entry config `ARRAY` map ([`SteeringConfig`]).
pub const MAP_CONFIG: &str = "kvr_config";
/// Most workers a reuseport group can steer between.
pub const MAX_WORKERS: u32 = 256;

/// How the program chooses a worker socket.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SteeringMode {
    /// Two candidates from the connection hash, the one with fewer live streams wins.
    PowerOfTwo = 0,
    /// The connection hash alone (what the kernel does without a program).
    Hash = 1,
    /// The worker of the CPU that took the SYN.
    Cpu = 2,
}

/// Value of the config map's only entry; `repr(C)` because the BPF side reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SteeringConfig {
    pub workers: u32,
    pub mode: u32,
}
