//! Process wiring: the shared state ([`crate::state`]), one pinned worker thread
//! per core (each with its own runtime and SO_REUSEPORT listener), the admin
//! API, signals and drain.

// Wires the process: builds the state and hands each subsystem its handles.
#![allow(clippy::disallowed_types)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use crate::config::{AdminAddr, Config};
use crate::error::Error;
use crate::io::{uring_available, Epoll, IoMode, Runtime, Uring};
use crate::state::Shared;

/// Binds `n` listeners on one address with SO_REUSEPORT, so the kernel (or the
/// eBPF steering program) spreads connections across workers.
pub fn bind_listeners(addr: SocketAddr, n: usize) -> Result<Vec<std::net::TcpListener>, Error> {
    let mut out = Vec::with_capacity(n);
    let mut addr = addr;
    for _ in 0..n {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        s.set_tcp_nodelay(true)?;
        s.set_nonblocking(true)?;
        s.bind(&addr.into())
            .map_err(|e| Error::Config(format!("listen: cannot bind {addr}: {e}")))?;
        s.listen(4096)?;
        let l: std::net::TcpListener = s.into();
        // Port 0: every later socket must join the port the first one got.
        addr = l.local_addr()?;
        out.push(l);
    }
    Ok(out)
}

/// Chooses the runtime for `--io`.
pub fn resolve_io(mode: IoMode) -> Result<&'static str, Error> {
    match mode {
        IoMode::Epoll => Ok(Epoll::NAME),
        IoMode::Uring => uring_available()
            .map(|_| Uring::NAME)
            .map_err(Error::UringUnavailable),
        IoMode::Auto => match uring_available() {
            Ok(()) => Ok(Uring::NAME),
            Err(e) => {
                tracing::warn!(error = %e, "io_uring unavailable, falling back to epoll");
                Ok(Epoll::NAME)
            }
        },
    }
}

/// How long a worker may take to start accepting.
const WORKER_START_WITHIN: Duration = Duration::from_secs(10);

/// Starts the workers; returns once every worker is accepting.
pub fn start_workers(
    shared: &Arc<Shared>,
    listeners: Vec<std::net::TcpListener>,
) -> Result<(), Error> {
    let io = *shared.io_name.get().expect("io resolved before start");
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), Error>>();
    for (id, l) in listeners.into_iter().enumerate() {
        let (handles, budget) = (shared.request_path(id), shared.budget);
        let core = if shared.cfg.pin_workers && !cores.is_empty() {
            Some(cores[id % cores.len()])
        } else {
            None
        };
        let ready = ready_tx.clone();
        std::thread::Builder::new()
            .name(format!("kvroute-w{id}"))
            .spawn(move || {
                if let Some(c) = core {
                    if !core_affinity::set_for_current(c) {
                        tracing::warn!(worker = id, "could not pin worker to a core");
                    }
                }
                let res = if io == Uring::NAME {
                    crate::worker::run::<Uring>(handles, budget, id, l, ready.clone())
                } else {
                    crate::worker::run::<Epoll>(handles, budget, id, l, ready.clone())
                };
                if let Err(e) = res {
                    let _ = ready.send(Err(Error::Worker { id, source: e }));
                }
            })?;
    }
    drop(ready_tx);
    for _ in 0..shared.workers.len() {
        match ready_rx.recv_timeout(WORKER_START_WITHIN) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(Error::WorkerTimeout(WORKER_START_WITHIN)),
        }
    }
    Ok(())
}

/// Runs the whole data plane until a signal drains it. Returns the exit code.
pub fn run(cfg: Config, cli: crate::config::Cli) -> Result<i32, Error> {
    if let Err(e) = crate::sys::alloc::disable_transparent_huge_pages() {
        tracing::debug!(error = %e, "transparent huge pages stay allowed");
    }
    crate::metrics::install();
    if let Err(e) = crate::budget::raise_fd_limit() {
        tracing::warn!(error = %e, "cannot read or raise the open-file limit");
    }
    let io = resolve_io(cfg.io)?;
    let listeners = bind_listeners(cfg.listen, cfg.worker_count())?;
    let local = listeners[0].local_addr()?;
    let shared = Shared::new(cfg)?;
    let _ = shared.io_name.set(io);
    shared.steering.attach(local, &listeners)?;
    start_workers(&shared, listeners)?;
    crate::steer::upgrade::signal_ready();
    tracing::info!(
        listen = %local,
        workers = shared.workers.len(),
        io,
        steering = %shared.steering.state().mode,
        policy = shared.router.name(),
        replicas = shared.table.load().replicas.len(),
        "kvroute ready"
    );
    log_budget(&shared.budget);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let code = rt.block_on(control_loop(shared.clone(), cli));
    shared.steering.cleanup();
    code
}

/// The main thread: admin API, signals, and the drain that ends the process.
async fn control_loop(shared: Arc<Shared>, cli: crate::config::Cli) -> Result<i32, Error> {
    use tokio::signal::unix::{signal, SignalKind};
    let explicit_admin = shared.cfg.admin != crate::config::DEFAULT_ADMIN;
    let mut admin_addrs = vec![AdminAddr::parse(&shared.cfg.admin)?];
    if let Some(t) = shared.cfg.admin_tcp {
        admin_addrs.push(AdminAddr::Tcp(t));
    }
    for (i, a) in admin_addrs.into_iter().enumerate() {
        match crate::admin::server::bind(&a).await {
            Ok(l) => {
                tracing::info!(admin = ?a, "admin API listening");
                tokio::spawn(crate::admin::server::serve(l, shared.clone()));
            }
            // An upgrade's successor: the old process holds the address until it exits.
            Err(_) if crate::steer::upgrade::is_successor() => {
                let within = Duration::from_millis(shared.cfg.shutdown_grace_ms) * 2;
                tokio::spawn(crate::admin::server::serve_once_free(
                    a,
                    within,
                    shared.clone(),
                ));
            }
            // The default socket path needs /run/kvroute; a quick start as a normal
            // user should still proxy, so only an admin address the user chose is fatal.
            Err(e) if i == 0 && !explicit_admin => {
                tracing::warn!(admin = ?a, error = %e, "admin API disabled: cannot bind default socket")
            }
            Err(e) => return Err(Error::Config(format!("admin: cannot listen on {a:?}: {e}"))),
        }
    }
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut usr2 = signal(SignalKind::user_defined2())?;
    crate::notify::ready(&shared.status_line());
    let watched = shared.clone();
    crate::notify::spawn_watchdog(move || watched.heartbeats());
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: draining"); break }
            _ = int.recv() => { tracing::info!("SIGINT: draining"); break }
            _ = usr2.recv() => {
                tracing::info!("SIGUSR2: upgrading");
                let draining = shared.drain.is_draining();
                if crate::steer::upgrade::spawn_successor(&shared.steering, draining).await { break }
            }
            _ = hup.recv() => {
                crate::notify::reloading();
                reload(&shared, &cli);
                crate::notify::ready(&shared.status_line());
            }
        }
    }
    shared.begin_drain();
    crate::notify::stopping(&shared.status_line());
    let grace = Duration::from_millis(shared.cfg.shutdown_grace_ms);
    let deadline = Instant::now() + grace;
    loop {
        let open = shared.open_connections();
        if open == 0 {
            tracing::info!("drained, exiting");
            return Ok(0);
        }
        if Instant::now() >= deadline {
            tracing::warn!(open, "grace period over, exiting with connections open");
            return Ok(0);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// SIGHUP: re-reads the API keys file (whether or not the config changed),
/// the TLS certificate and key, and the config file, and applies what can
/// change without a restart (the keys, the certificate, the replica set);
/// connections are untouched. Keys that need a restart are reported, not
/// half-applied. The command line's overrides (`--replica` and the rest) are
/// applied to the file again, as at start, so a reload never drops them.
fn reload(shared: &Shared, cli: &crate::config::Cli) {
    shared.auth.reload();
    if cli.config.is_none() {
        tracing::info!("SIGHUP: no config file to reload");
        return;
    }
    let fresh = Config::load(cli);
    let fresh = match fresh {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP: config rejected, keeping the running one");
            return;
        }
    };
    let old = &shared.cfg;
    if fresh.listen != old.listen
        || fresh.workers != old.workers
        || fresh.io != old.io
        || fresh.routing != old.routing
        || fresh.steering != old.steering
        || fresh.steering_mode != old.steering_mode
    {
        tracing::warn!(
            "SIGHUP: listen, workers, io, [routing] and steering changes take effect on restart"
        );
    }
    if fresh.limits != old.limits || fresh.upstream != old.upstream || fresh.auth != old.auth {
        tracing::warn!(
            "SIGHUP: [limits], [upstream] and [auth] changes take effect on restart (the keys file's content is reloaded)"
        );
    }
    match (&shared.tls, &fresh.tls) {
        (Some(running), Some(files)) => match running.reload(files) {
            Ok(()) => {
                tracing::info!(cert = %files.cert.display(), "SIGHUP: TLS certificate reloaded")
            }
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: TLS certificate rejected, keeping the running one")
            }
        },
        (None, None) => {}
        _ => tracing::warn!("SIGHUP: adding or removing [tls] takes effect on restart"),
    }
    let resolved = crate::resolve::replicas(&shared.table.load(), fresh.replicas);
    match resolved.and_then(|r| Ok(shared.table.replace(r)?)) {
        Ok(set) => {
            shared.router.on_replicas_changed(&set);
            tracing::info!(
                replicas = set.replicas.len(),
                generation = set.generation,
                "SIGHUP: replica set reloaded"
            );
        }
        Err(e) => tracing::error!(error = %e, "SIGHUP: replica set rejected"),
    }
}

fn log_budget(b: &crate::budget::Caps) {
    tracing::info!(
        max_connections = b.max_connections,
        per_worker = b.per_worker,
        shed_above = b.high_watermark,
        nofile = b.nofile,
        derived = b.derived,
        "connection budget"
    );
    if crate::budget::exceeds_fd_limit(b) {
        tracing::warn!(
            max_connections = b.max_connections,
            nofile = b.nofile,
            allowed = crate::budget::derived_max_connections(b.nofile),
            "[limits] max_connections needs more file descriptors than RLIMIT_NOFILE allows: EMFILE may come first; raise LimitNOFILE"
        );
    }
}
