//! `kvroute-ebpf`: the connection-steering BPF program shared with the data plane.
//!
//! The `sk_reuseport` program is C (`bpf/steer.bpf.c`); its object
//! (`obj/steer.bpf.o`) is committed, built by `cargo xtask build-ebpf`, so a
//! machine without clang builds kvroute, and CI checks the object matches the
//! source (`cargo xtask build-ebpf --check`). This crate exposes the object
//! bytes and the layout of the maps both ends share, so the data plane and the
//! program are written against one definition (the C side mirrors it by hand;
//! the constants are checked against the object in this crate's tests).
#![forbid(unsafe_code)]
#![no_std]

/// ELF parsers read the object through `u64`-sized fields; `include_bytes!`
/// only guarantees byte alignment, so the bytes live in an 8-aligned wrapper.
#[repr(C, align(8))]
pub struct Aligned<const N: usize>(pub [u8; N]);

const RAW: &[u8] = include_bytes!("../obj/steer.bpf.o");
static OBJECT: Aligned<{ RAW.len() }> = Aligned(*include_bytes!("../obj/steer.bpf.o"));

/// The compiled program, 8-byte aligned.
pub fn object() -> &'static [u8] {
    &OBJECT.0
}

/// Program for plain selection (`SEC("sk_reuseport")`, Linux 4.19+).
pub const PROG_SELECT: &str = "kvr_select";
/// The same selection, also run to migrate a closing listener's queued
/// connections (`SEC("sk_reuseport/migrate")`, Linux 5.14+).
pub const PROG_SELECT_MIGRATE: &str = "kvr_select_migrate";

/// Name of the `REUSEPORT_SOCKARRAY` map holding one listener socket per worker.
pub const MAP_SOCKETS: &str = "kvr_sockets";
/// Name of the `ARRAY` map of per-worker [`LiveSlot`]s, written by the workers.
pub const MAP_LIVE_STREAMS: &str = "kvr_live";
/// Name of the `ARRAY` map of connections steered to each worker (`u32`,
/// wrapping), written by the program only.
pub const MAP_STEERED: &str = "kvr_steered";
/// Name of the single-entry config `ARRAY` map ([`SteeringConfig`]).
pub const MAP_CONFIG: &str = "kvr_config";
/// Name of the single-entry `ARRAY` map holding the pid (`u64`) of the process
/// whose listeners are in [`MAP_SOCKETS`]; stale pins are those of a dead owner.
pub const MAP_OWNER: &str = "kvr_owner";
/// Every map the object pins.
pub const MAPS: [&str; 5] = [
    MAP_SOCKETS,
    MAP_LIVE_STREAMS,
    MAP_STEERED,
    MAP_CONFIG,
    MAP_OWNER,
];
/// Most workers a reuseport group can steer between (the maps' `max_entries`).
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

/// One worker's entry of [`MAP_LIVE_STREAMS`]. Only that worker writes it.
///
/// The program's load for a worker is `live + (steered - accepted)`: the
/// connections it serves plus those steered to it and not yet accepted, so a
/// burst of SYNs that all see the same `live` still spreads.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LiveSlot {
    /// Connections open on the worker.
    pub live: u32,
    /// Connections the worker accepted (wrapping), compared with [`MAP_STEERED`].
    pub accepted: u32,
}

#[cfg(test)]
mod tests {
    extern crate std;

    #[test]
    fn object_is_an_aligned_bpf_elf() {
        let o = super::object();
        assert_eq!(o.as_ptr() as usize % 8, 0);
        assert_eq!(&o[..4], b"\x7fELF");
        // e_machine 247 = EM_BPF, little-endian.
        assert_eq!(u16::from_le_bytes([o[18], o[19]]), 247);
    }

    #[test]
    fn object_names_every_map_and_program() {
        let o = super::object();
        let has = |name: &str| o.windows(name.len()).any(|w| w == name.as_bytes());
        for m in super::MAPS {
            assert!(has(m), "map {m} missing from the object");
        }
        assert!(has(super::PROG_SELECT) && has(super::PROG_SELECT_MIGRATE));
    }
}
