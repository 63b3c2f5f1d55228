//! Connection steering: which worker's listener takes a new connection.
//!
//! With `steering = "ebpf"` the `sk_reuseport` program of `kvroute-ebpf` picks
//! the worker (default `p2c`: the less loaded of two hash-derived candidates),
//! reading the live-stream counts the workers publish here. The kernel's own
//! hash spreads connections, not load; long LLM streams make the difference.
//! When BPF is impossible (no CAP_BPF, no bpffs, an old kernel) the data plane
//! still starts on the kernel's hash and says why, unless `ebpf-required`.
//!
//! Maps are pinned under `/sys/fs/bpf/kvroute/<listen-addr>/` (dots as `_`,
//! see [`pin_name`]) so that an
//! upgraded process opening listeners on the same address finds them and
//! swaps its sockets into the same array.

pub mod upgrade;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use aya::maps::{Array, Map, MapData, MapError, ReusePortSockArray};
use aya::programs::{ProgramError, SkReuseport};
use aya::{Ebpf, EbpfError, EbpfLoader};
use kvroute_ebpf as abi;
use serde::{Deserialize, Serialize};

use crate::error::Error;

/// `steering` in kvroute.toml.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SteeringKind {
    /// The BPF program when possible, else the kernel's hash with a warning.
    /// Default: the fallback costs nothing where BPF is unavailable, and where
    /// it is available long streams spread evenly without any configuration.
    #[default]
    Ebpf,
    /// The kernel's SO_REUSEPORT hash.
    Kernel,
    /// The BPF program or refuse to start.
    EbpfRequired,
}

/// `steering_mode` in kvroute.toml: the program's choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SteeringPolicy {
    /// Power of two choices on live streams.
    #[default]
    P2c,
    /// The connection hash alone, for comparison.
    Hash,
    /// The worker of the CPU that took the SYN.
    Cpu,
}

impl SteeringPolicy {
    fn abi(self) -> abi::SteeringMode {
        match self {
            SteeringPolicy::P2c => abi::SteeringMode::PowerOfTwo,
            SteeringPolicy::Hash => abi::SteeringMode::Hash,
            SteeringPolicy::Cpu => abi::SteeringMode::Cpu,
        }
    }
    fn name(self) -> &'static str {
        match self {
            SteeringPolicy::P2c => "p2c",
            SteeringPolicy::Hash => "hash",
            SteeringPolicy::Cpu => "cpu",
        }
    }
}

pub use kvroute_admin_api::{SteeringState, SteeringWorker};

/// Why the program could not be attached (the fallback reason in `/state`
/// and the log) or could not take the group back after a failed upgrade.
///
/// As with [`Error`], the message is complete on its own and the underlying
/// error stays the source. aya's errors are shown with their own sources and
/// without the verifier's log (see [`chain`]), so the reason fits one line.
/// aya's errors are boxed: several are large, and this travels in
/// `Result`s and in [`Error`].
#[derive(Debug, thiserror::Error)]
pub enum SteerError {
    #[error("forced off by KVROUTE_STEERING_FORCE_FALLBACK")]
    ForcedOff,
    #[error("{0} workers; the program steers 1 to {max}", max = abi::MAX_WORKERS)]
    Workers(usize),
    #[error("creating {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bpffs is not mounted at {BPFFS} and mounting it failed: {0}")]
    MountBpffs(#[source] std::io::Error),
    #[error("loading the BPF object: {}", chain(.0))]
    LoadObject(#[source] Box<EbpfError>),
    #[error("program {0} missing from the object")]
    ProgramMissing(&'static str),
    #[error("program {name}: {source}")]
    ProgramType {
        name: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("loading program {name}: {}", chain(.source))]
    LoadProgram {
        name: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("map {0} missing from the object")]
    MapMissing(&'static str),
    #[error("map {0} is not an array")]
    NotAnArray(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<MapError>,
    },
    #[error("writing {name}: {source}")]
    MapWrite {
        name: &'static str,
        #[source]
        source: Box<MapError>,
    },
    #[error("dup live map fd: {0}")]
    DupLiveMapFd(#[source] std::io::Error),
    #[error("live map: {0}")]
    LiveMap(#[source] Box<MapError>),
    #[error("adding worker {worker}'s listener to {}: {source}", abi::MAP_SOCKETS)]
    AddListener {
        worker: u32,
        #[source]
        source: Box<MapError>,
    },
    #[error("worker {worker}'s listener into {}: {}", abi::MAP_SOCKETS, chain(.source))]
    PutBackListener {
        worker: u32,
        #[source]
        source: Box<MapError>,
    },
    #[error("SO_ATTACH_REUSEPORT_EBPF: {}", chain(.0))]
    Attach(#[source] Box<ProgramError>),
    #[error("dup listener: {0}")]
    DupListener(#[source] std::io::Error),
    #[error("draining: listeners already given up")]
    ListenersGone,
}

impl SteerError {
    fn map(name: &'static str) -> impl FnOnce(MapError) -> SteerError {
        move |e| SteerError::Map {
            name,
            source: Box::new(e),
        }
    }
    fn map_write(name: &'static str) -> impl FnOnce(MapError) -> SteerError {
        move |e| SteerError::MapWrite {
            name,
            source: Box::new(e),
        }
    }
    fn program_type(name: &'static str) -> impl FnOnce(ProgramError) -> SteerError {
        move |e| SteerError::ProgramType {
            name,
            source: Box::new(e),
        }
    }
}

/// Metric names (Prometheus).
pub const METRIC_LIVE: &str = "kvroute_worker_live_streams";
pub const METRIC_ACCEPTED: &str = "kvroute_worker_accepted_total";

/// Root of kvroute's pins on bpffs.
pub const BPFFS: &str = "/sys/fs/bpf";

/// Per-worker counters, kept whether or not BPF steers, so `/state` compares
/// kernel and BPF steering on the same numbers.
struct WorkerSlot {
    live: AtomicU64,
    accepted: AtomicU64,
    gauge: metrics::Gauge,
    counter: metrics::Counter,
    /// This worker's entry of the live map, written only with the lock held so
    /// the published (live, accepted) pair is never older than the counters.
    writer: OnceLock<Mutex<SlotWriter>>,
}

struct SlotWriter {
    map: Array<MapData, u64>,
    live: u32,
    /// Compared by the program with its steered count; see [`abi::LiveSlot`].
    accepted: u32,
}

impl SlotWriter {
    fn publish(&mut self, index: u32) {
        // u64 with the struct's in-memory layout: aya's `Pod` is an unsafe
        // trait, a u64 already is one.
        let v = pack(self.live, self.accepted);
        if let Err(e) = self.map.set(index, v, 0) {
            tracing::debug!(worker = index, error = %e, "steering: live map update failed");
        }
    }
}

fn pack(lo: u32, hi: u32) -> u64 {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&lo.to_ne_bytes());
    b[4..].copy_from_slice(&hi.to_ne_bytes());
    u64::from_ne_bytes(b)
}

struct Attached {
    steered: Array<MapData, u32>,
    pin_dir: PathBuf,
    /// What [`Steering::reclaim`] needs to take the group back after a failed
    /// upgrade; the listeners are dropped when this process starts draining.
    group: Mutex<Group>,
    /// The loaded program, which [`Steering::reclaim`] attaches again; its
    /// maps are taken out, so what is left is its fd and a few KB of
    /// instructions.
    ebpf: Ebpf,
}

struct Group {
    sockets: ReusePortSockArray<MapData>,
    config: Array<MapData, u64>,
    owner: Array<MapData, u64>,
    prog_name: &'static str,
    /// Duplicates of the workers' listener fds. Kept only while this process
    /// accepts: a duplicate would keep a closing listener open, and with it
    /// the kernel would neither reset nor migrate its queued connections.
    listeners: Vec<TcpListener>,
}

/// The steering state: handed to the workers, the admin API and the upgrade.
pub struct Steering {
    requested: SteeringKind,
    policy: SteeringPolicy,
    workers: Vec<WorkerSlot>,
    attached: OnceLock<Attached>,
    fallback: OnceLock<String>,
    /// Set once another process owns the map slots (after an upgrade hand-off),
    /// so this one stops overwriting them.
    released: AtomicBool,
    /// Pid of the process the last upgrade started.
    successor: std::sync::atomic::AtomicU32,
}

impl Steering {
    pub fn new(requested: SteeringKind, policy: SteeringPolicy, workers: usize) -> Arc<Steering> {
        Arc::new(Steering {
            requested,
            policy,
            workers: (0..workers)
                .map(|i| {
                    let w = i.to_string();
                    WorkerSlot {
                        live: AtomicU64::new(0),
                        accepted: AtomicU64::new(0),
                        gauge: metrics::gauge!(METRIC_LIVE, "worker" => w.clone()),
                        counter: metrics::counter!(METRIC_ACCEPTED, "worker" => w),
                        writer: OnceLock::new(),
                    }
                })
                .collect(),
            attached: OnceLock::new(),
            fallback: OnceLock::new(),
            released: AtomicBool::new(false),
            successor: std::sync::atomic::AtomicU32::new(0),
        })
    }

    /// Loads and attaches the program to the group of `listeners` (one per
    /// worker, as `bind_listeners` made them). Errors only for `ebpf-required`;
    /// otherwise a failure leaves the kernel's hash in charge, logged with why.
    pub fn attach(
        self: &Arc<Self>,
        listen: SocketAddr,
        listeners: &[TcpListener],
    ) -> Result<(), Error> {
        if self.requested == SteeringKind::Kernel {
            tracing::info!("steering: kernel SO_REUSEPORT hash (configured)");
            return Ok(());
        }
        let attached = self.try_attach(listen, listeners);
        // aya's `EbpfLoader::new` parses the kernel's BTF
        // (/sys/kernel/btf/vmlinux, ~13 MB of heap, ~23 MB at its peak)
        // although this object has no CO-RE relocations to apply. It is freed
        // once loading ends, attached or not, but the allocator keeps the pages
        // until this thread (later the admin API's) allocates again, which an
        // idle proxy does not do.
        crate::sys::alloc::release_free_memory();
        match attached {
            Ok(a) => {
                tracing::info!(
                    mode = self.policy.name(),
                    pin_dir = %a.pin_dir.display(),
                    workers = listeners.len(),
                    "steering: eBPF program attached"
                );
                let _ = self.attached.set(a);
                spawn_reconciler(self.clone());
                Ok(())
            }
            Err(why) if self.requested == SteeringKind::EbpfRequired => {
                Err(Error::SteeringRequired(why))
            }
            Err(why) => {
                // Rendered once: the log and `/state` show the same reason.
                let why = why.to_string();
                tracing::warn!(reason = %why, "steering: eBPF unavailable, using the kernel's SO_REUSEPORT hash");
                let _ = self.fallback.set(why);
                Ok(())
            }
        }
    }

    fn try_attach(
        &self,
        listen: SocketAddr,
        listeners: &[TcpListener],
    ) -> Result<Attached, SteerError> {
        if std::env::var_os("KVROUTE_STEERING_FORCE_FALLBACK").is_some() {
            // Lets tests exercise the fallback path on a machine where BPF works.
            return Err(SteerError::ForcedOff);
        }
        let n = listeners.len();
        if n == 0 || n > abi::MAX_WORKERS as usize {
            return Err(SteerError::Workers(n));
        }
        let pin_dir = ensure_pin_dir(listen)?;
        let fresh = std::fs::read_dir(&pin_dir).is_ok_and(|mut d| d.next().is_none());
        let mut res = self.load_and_attach(&pin_dir, listeners);
        if let (Err(why), false) = (&res, fresh) {
            // Pins this object cannot use (another kvroute version's layout, say,
            // across an upgrade). A running owner keeps its own fds, so fresh
            // pins cost it nothing, and our program then replaces its program
            // in the group, steering to our listeners only.
            tracing::warn!(reason = %why, pins = %pin_dir.display(), "steering: pinned maps unusable, replacing them");
            let _ = std::fs::remove_dir_all(&pin_dir);
            std::fs::create_dir_all(&pin_dir).map_err(|source| SteerError::CreateDir {
                path: pin_dir.clone(),
                source,
            })?;
            res = self.load_and_attach(&pin_dir, listeners);
        }
        if res.is_err() {
            // Half-made pins would be picked up by the next start as if a
            // running kvroute owned them.
            let _ = std::fs::remove_dir_all(&pin_dir);
        }
        let (ebpf, steered, group) = res?;
        Ok(Attached {
            steered,
            pin_dir,
            group: Mutex::new(group),
            ebpf,
        })
    }

    fn load_and_attach(
        &self,
        pin_dir: &Path,
        listeners: &[TcpListener],
    ) -> Result<(Ebpf, Array<MapData, u32>, Group), SteerError> {
        let n = listeners.len();
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(abi::object())
            .map_err(|e| SteerError::LoadObject(Box::new(e)))?;
        // The migrate flavour also rescues an old listener's queued connections
        // during an upgrade; kernels before 5.14 only know the plain one.
        let mut prog_name = abi::PROG_SELECT_MIGRATE;
        let mut loaded = load_prog(&mut ebpf, prog_name);
        if let Err(e) = &loaded {
            tracing::debug!(error = %e, "steering: migrate program rejected, trying the plain one");
            prog_name = abi::PROG_SELECT;
            loaded = load_prog(&mut ebpf, prog_name);
        }
        loaded?;

        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(SteerError::MapMissing(name))
        };
        let mut sockets = ReusePortSockArray::try_from(take(&mut ebpf, abi::MAP_SOCKETS)?)
            .map_err(SteerError::map(abi::MAP_SOCKETS))?;
        let live_map = take(&mut ebpf, abi::MAP_LIVE_STREAMS)?;
        let steered: Array<MapData, u32> = Array::try_from(take(&mut ebpf, abi::MAP_STEERED)?)
            .map_err(SteerError::map(abi::MAP_STEERED))?;
        let mut config: Array<MapData, u64> = Array::try_from(take(&mut ebpf, abi::MAP_CONFIG)?)
            .map_err(SteerError::map(abi::MAP_CONFIG))?;

        // Each worker gets its own fd on the live map, so publishing never
        // contends across workers.
        let live_fd = match &live_map {
            Map::Array(d) => d.fd(),
            _ => return Err(SteerError::NotAnArray(abi::MAP_LIVE_STREAMS)),
        };
        for (i, w) in self.workers.iter().enumerate() {
            let fd = std::os::fd::AsFd::as_fd(live_fd)
                .try_clone_to_owned()
                .map_err(SteerError::DupLiveMapFd)?;
            let live_map = |e| SteerError::LiveMap(Box::new(e));
            let data = MapData::from_fd(fd).map_err(live_map)?;
            let map: Array<MapData, u64> = Array::try_from(Map::Array(data)).map_err(live_map)?;
            // Start with nothing pending: whatever the program counted for this
            // slot before (a previous process) is not this worker's load.
            let s = steered.get(&(i as u32), 0).unwrap_or(0);
            let mut wr = SlotWriter {
                map,
                live: w.live.load(Ordering::Relaxed) as u32,
                accepted: s,
            };
            wr.publish(i as u32);
            let _ = w.writer.set(Mutex::new(wr));
        }
        let cfg = abi::SteeringConfig {
            workers: n as u32,
            mode: self.policy.abi() as u32,
        };
        config
            .set(0, pack(cfg.workers, cfg.mode), 0)
            .map_err(SteerError::map_write(abi::MAP_CONFIG))?;
        for (i, l) in listeners.iter().enumerate() {
            let worker = i as u32;
            sockets
                .set(worker, l, 0)
                .map_err(|e| SteerError::AddListener {
                    worker,
                    source: Box::new(e),
                })?;
        }
        let prog: &SkReuseport = ebpf
            .program(prog_name)
            .ok_or(SteerError::ProgramMissing(prog_name))?
            .try_into()
            .map_err(SteerError::program_type(prog_name))?;
        prog.attach(&listeners[0])
            .map_err(|e| SteerError::Attach(Box::new(e)))?;
        let mut owner: Array<MapData, u64> = Array::try_from(take(&mut ebpf, abi::MAP_OWNER)?)
            .map_err(SteerError::map(abi::MAP_OWNER))?;
        owner
            .set(0, u64::from(std::process::id()), 0)
            .map_err(SteerError::map_write(abi::MAP_OWNER))?;
        let listeners = listeners
            .iter()
            .map(TcpListener::try_clone)
            .collect::<Result<_, _>>()
            .map_err(SteerError::DupListener)?;
        let group = Group {
            sockets,
            config,
            owner,
            prog_name,
            listeners,
        };
        Ok((ebpf, steered, group))
    }

    /// After an upgrade that failed once the new process had put its listeners
    /// into the socket array (it exited or was stopped before it was ready):
    /// its listeners left the array when they closed, and with empty slots the
    /// program leaves every choice to the kernel's hash. This puts ours back,
    /// rewrites the config and owner (the new process may have run another
    /// worker count or replaced the pins), re-attaches our program (the group
    /// runs the last one attached), and restarts the load counts from what
    /// the program has steered so far. Returns what was done, for the log.
    pub fn reclaim(&self) -> Result<String, SteerError> {
        let Some(a) = self.attached.get() else {
            return Ok("kernel steering: nothing to reclaim".into());
        };
        let mut g = a.group.lock().unwrap_or_else(|p| p.into_inner());
        if g.listeners.len() != self.workers.len() {
            return Err(SteerError::ListenersGone);
        }
        let cfg = abi::SteeringConfig {
            workers: g.listeners.len() as u32,
            mode: self.policy.abi() as u32,
        };
        g.config
            .set(0, pack(cfg.workers, cfg.mode), 0)
            .map_err(SteerError::map_write(abi::MAP_CONFIG))?;
        let Group {
            sockets, listeners, ..
        } = &mut *g;
        for (i, l) in listeners.iter().enumerate() {
            let i = i as u32;
            // EBUSY: our listener is still in our array, because the new process
            // made maps of its own (pins it could not use, or pins gone) and its
            // program, attached to the group, looked only at its own array.
            // A socket sits in one slot at a time, so it leaves and comes back.
            let set = sockets.set(i, l, 0).or_else(|_| {
                sockets.clear_index(&i)?;
                sockets.set(i, l, 0)
            });
            set.map_err(|e| SteerError::PutBackListener {
                worker: i,
                source: Box::new(e),
            })?;
        }
        for i in listeners.len() as u32..abi::MAX_WORKERS {
            // Slots of a new process with more workers: already empty once its
            // listeners closed; cleared anyway in case one is still open.
            let _ = sockets.clear_index(&i);
        }
        let prog: &SkReuseport = a
            .ebpf
            .program(g.prog_name)
            .ok_or(SteerError::ProgramMissing(g.prog_name))?
            .try_into()
            .map_err(SteerError::program_type(g.prog_name))?;
        prog.attach(&g.listeners[0])
            .map_err(|e| SteerError::Attach(Box::new(e)))?;
        g.owner
            .set(0, u64::from(std::process::id()), 0)
            .map_err(SteerError::map_write(abi::MAP_OWNER))?;
        drop(g);
        for i in 0..self.workers.len() {
            let s = a.steered.get(&(i as u32), 0).unwrap_or(0);
            let live = self.workers[i].live.load(Ordering::Relaxed) as u32;
            self.publish(i, |w| {
                w.live = live;
                w.accepted = s;
            });
        }
        Ok(format!(
            "{} listeners back in {}",
            self.workers.len(),
            abi::MAP_SOCKETS
        ))
    }

    /// Drops the duplicated listener fds so the workers' close really closes
    /// them (called when this process starts draining).
    pub fn forget_listeners(&self) {
        if let Some(a) = self.attached.get() {
            a.group
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .listeners
                .clear();
        }
    }

    /// Counts a connection on `worker` until the guard drops.
    pub fn open(&self, worker: usize) -> LiveStream<'_> {
        let w = &self.workers[worker];
        let live = w.live.fetch_add(1, Ordering::Relaxed) + 1;
        w.accepted.fetch_add(1, Ordering::Relaxed);
        w.gauge.set(live as f64);
        w.counter.increment(1);
        self.publish(worker, |s| {
            s.live = s.live.wrapping_add(1);
            s.accepted = s.accepted.wrapping_add(1);
        });
        LiveStream { s: self, worker }
    }

    fn close(&self, worker: usize) {
        let w = &self.workers[worker];
        let live = w.live.fetch_sub(1, Ordering::Relaxed) - 1;
        w.gauge.set(live as f64);
        self.publish(worker, |s| s.live = s.live.saturating_sub(1));
    }

    fn publish(&self, worker: usize, f: impl FnOnce(&mut SlotWriter)) {
        if self.released.load(Ordering::Relaxed) {
            return;
        }
        if let Some(m) = self.workers[worker].writer.get() {
            let mut s = m.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut s);
            s.publish(worker as u32);
        }
    }

    /// A SYN steered to a worker that never reaches accept (handshake timeout,
    /// full backlog) would count as load forever. When the program has sent a
    /// worker nothing for a whole period, every connection steered to it has
    /// been accepted or lost, so its pending count is reset to zero.
    fn reconcile(&self, last: &mut [u32]) {
        let Some(a) = self.attached.get() else { return };
        for (i, seen) in last.iter_mut().enumerate() {
            let Ok(s) = a.steered.get(&(i as u32), 0) else {
                continue;
            };
            // Republished every period even when nothing changed: heals a slot
            // overwritten by a process that had not yet released it (upgrade).
            self.publish(i, |w| {
                if s == *seen {
                    w.accepted = s;
                }
            });
            *seen = s;
        }
    }

    fn set_successor(&self, pid: u32) {
        self.successor.store(pid, Ordering::Relaxed);
    }

    /// Stops writing the map slots: a newer process owns them now.
    pub fn release(&self) {
        self.released.store(true, Ordering::Relaxed);
        self.forget_listeners();
    }

    /// Removes the pins on a clean exit, so a later start gets fresh maps.
    /// Not after an upgrade hand-off: the new process uses them.
    pub fn cleanup(&self) {
        if self.released.load(Ordering::Relaxed) {
            return;
        }
        if let Some(a) = self.attached.get() {
            let _ = std::fs::remove_dir_all(&a.pin_dir);
        }
    }

    pub fn is_attached(&self) -> bool {
        self.attached.get().is_some()
    }

    pub fn state(&self) -> SteeringState {
        let attached = self.attached.get();
        SteeringState {
            requested: match self.requested {
                SteeringKind::Ebpf => "ebpf",
                SteeringKind::Kernel => "kernel",
                SteeringKind::EbpfRequired => "ebpf-required",
            }
            .into(),
            mode: if attached.is_some() {
                self.policy.name()
            } else {
                "kernel"
            }
            .into(),
            attached: attached.is_some(),
            fallback_reason: self.fallback.get().cloned(),
            pin_dir: attached.map(|a| a.pin_dir.display().to_string()),
            workers: self
                .workers
                .iter()
                .enumerate()
                .map(|(id, w)| SteeringWorker {
                    id,
                    live_streams: w.live.load(Ordering::Relaxed),
                    accepted_total: w.accepted.load(Ordering::Relaxed),
                    steered: attached
                        .and_then(|a| a.steered.get(&(id as u32), 0).ok())
                        .unwrap_or(0) as u64,
                })
                .collect(),
            pid: std::process::id(),
            released: self.released.load(Ordering::Relaxed),
            successor_pid: self.successor.load(Ordering::Relaxed),
        }
    }
}

/// A connection counted on its worker; uncounted on drop, whatever the exit path.
pub struct LiveStream<'a> {
    s: &'a Steering,
    worker: usize,
}

impl Drop for LiveStream<'_> {
    fn drop(&mut self) {
        self.s.close(self.worker);
    }
}

fn spawn_reconciler(st: Arc<Steering>) {
    let spawned = std::thread::Builder::new()
        .name("kvroute-steer".into())
        .spawn(move || {
            let mut last = vec![0; st.workers.len()];
            loop {
                std::thread::sleep(Duration::from_millis(250));
                st.reconcile(&mut last);
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "steering: no reconciler thread; leaked handshakes will skew p2c");
    }
}

fn load_prog(ebpf: &mut Ebpf, name: &'static str) -> Result<(), SteerError> {
    let p: &mut SkReuseport = ebpf
        .program_mut(name)
        .ok_or(SteerError::ProgramMissing(name))?
        .try_into()
        .map_err(SteerError::program_type(name))?;
    p.load().map_err(|e| SteerError::LoadProgram {
        name,
        source: Box::new(e),
    })
}

/// `/sys/fs/bpf/kvroute/<listen>`, mounting bpffs first if nothing is there.
fn ensure_pin_dir(listen: SocketAddr) -> Result<PathBuf, SteerError> {
    let root = Path::new(BPFFS);
    if !bpffs_mounted(root) {
        std::fs::create_dir_all(root).map_err(|source| SteerError::CreateDir {
            path: root.to_path_buf(),
            source,
        })?;
        crate::sys::steer::mount_bpffs(root).map_err(SteerError::MountBpffs)?;
        tracing::info!("steering: mounted bpffs at {BPFFS}");
    }
    sweep_stale(&root.join("kvroute"));
    let dir = root.join("kvroute").join(pin_name(listen));
    std::fs::create_dir_all(&dir).map_err(|source| SteerError::CreateDir {
        path: dir.clone(),
        source,
    })?;
    Ok(dir)
}

const UNOWNED_PINS_STALE_AFTER: Duration = Duration::from_secs(60);

/// Removes pin dirs whose owner process is gone: a kvroute killed with SIGKILL
/// cannot remove its own, and each holds a set of maps in kernel memory.
/// An owner of 0 is a process killed between loading and attaching, or one
/// loading right now (the loader pins the maps before we can write the owner;
/// on a busy machine that takes a while): only old ones are stale. Removing a
/// live process's pins made its next upgrade start from fresh maps.
fn sweep_stale(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let Ok(data) = MapData::from_pin(path.join(abi::MAP_OWNER)) else {
            // Not ours or mid-creation by another start: leave it.
            continue;
        };
        let Ok(owner) = Array::<MapData, u64>::try_from(Map::Array(data)) else {
            continue;
        };
        let pid = owner.get(&0, 0).unwrap_or(0);
        let stale = if pid == 0 {
            std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > UNOWNED_PINS_STALE_AFTER))
        } else {
            !Path::new("/proc").join(pid.to_string()).exists()
        };
        if stale {
            match std::fs::remove_dir_all(&path) {
                Ok(()) => {
                    tracing::info!(pins = %path.display(), pid, "steering: removed stale pins")
                }
                Err(e) => {
                    tracing::debug!(pins = %path.display(), error = %e, "steering: stale pins kept")
                }
            }
        }
    }
}

/// The listen address as a bpffs directory name: bpffs refuses names with a
/// dot (EPERM, reserved by the kernel), so `127.0.0.1:8080` is `127_0_0_1:8080`.
pub fn pin_name(listen: SocketAddr) -> String {
    listen.to_string().replace('.', "_")
}

fn bpffs_mounted(at: &Path) -> bool {
    // Field 5 of mountinfo is the mount point; the fs type follows the " - ".
    std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|m| {
        m.lines().any(|l| {
            let mut halves = l.splitn(2, " - ");
            let (left, right) = (halves.next().unwrap_or(""), halves.next().unwrap_or(""));
            left.split(' ').nth(4) == Some(&*at.to_string_lossy())
                && right.split(' ').next() == Some("bpf")
        })
    })
}

/// An error with its sources, so "permission denied" is not hidden behind
/// "the BPF_PROG_LOAD syscall failed".
/// The verifier's log, which aya appends, is cut: the reason ends up on one
/// log line and in `/state` (the full log is at debug level).
fn chain(e: &dyn std::error::Error) -> String {
    let full = {
        let mut s = e.to_string();
        let mut cur = e.source();
        while let Some(c) = cur {
            s.push_str(": ");
            s.push_str(&c.to_string());
            cur = c.source();
        }
        s
    };
    let short = full
        .split(" Verifier output")
        .next()
        .unwrap_or("")
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    if short.len() < full.len() {
        tracing::debug!(error = %full, "steering: full error");
    }
    short
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_matches_the_c_struct_layout() {
        let v = pack(7, 9);
        let b = v.to_ne_bytes();
        assert_eq!(u32::from_ne_bytes(b[..4].try_into().unwrap()), 7);
        assert_eq!(u32::from_ne_bytes(b[4..].try_into().unwrap()), 9);
        assert_eq!(
            std::mem::size_of::<abi::LiveSlot>(),
            std::mem::size_of::<u64>()
        );
        assert_eq!(
            std::mem::size_of::<abi::SteeringConfig>(),
            std::mem::size_of::<u64>()
        );
    }

    #[test]
    fn config_keys_parse_and_reject_typos() {
        let c = crate::config::Config::from_toml(
            "steering = \"ebpf-required\"\nsteering_mode = \"cpu\"\n",
        )
        .unwrap();
        assert_eq!(c.steering, SteeringKind::EbpfRequired);
        assert_eq!(c.steering_mode, SteeringPolicy::Cpu);
        let d = crate::config::Config::default();
        assert_eq!(
            (d.steering, d.steering_mode),
            (SteeringKind::Ebpf, SteeringPolicy::P2c)
        );
        let e = crate::config::Config::from_toml("steering = \"bpf\"\n").unwrap_err();
        assert!(e.to_string().contains("bpf"), "{e}");
    }

    #[test]
    fn pin_names_have_no_dots() {
        assert_eq!(
            pin_name("127.0.0.1:8080".parse().unwrap()),
            "127_0_0_1:8080"
        );
        assert_eq!(pin_name("[::1]:8080".parse().unwrap()), "[::1]:8080");
    }

    #[test]
    fn kernel_steering_counts_without_bpf() {
        let s = Steering::new(SteeringKind::Kernel, SteeringPolicy::P2c, 2);
        s.attach("127.0.0.1:0".parse().unwrap(), &[]).unwrap();
        {
            let _a = s.open(1);
            let _b = s.open(1);
            let st = s.state();
            assert_eq!(st.workers[1].live_streams, 2);
            assert_eq!(st.mode, "kernel");
            assert!(!st.attached);
        }
        assert_eq!(s.state().workers[1].live_streams, 0);
        assert_eq!(s.state().workers[1].accepted_total, 2);
    }
}
