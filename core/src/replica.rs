//! The replica set every request is routed over: an atomically swapped snapshot.
//!
//! Writers (the admin API) build a whole new [`ReplicaSet`] and swap it in; readers
//! (every request on every worker) load the current one without a lock. Replicas
//! that survive a swap keep their `Arc<Replica>`, so in-flight counts and the slot
//! used by the prefix index carry over.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use crossbeam_utils::atomic::AtomicCell;

pub use crate::endpoint::{Endpoint, Resolved};
use crate::error::Error;

/// Most replicas one data plane tracks at once: the prefix index keeps one bit
/// per replica slot, and a 128-bit set keeps an index entry small.
pub const MAX_REPLICAS: usize = 128;

pub use kvroute_admin_api::{ExternalLoad, Pool, ReplicaSpec};

/// Told when a replica may have room again, so a request waiting for one can
/// go: the data plane's admission queue. Called on the thread that freed the
/// room; an implementation hands the wakeup on and returns.
pub trait CapacityWaiters: Send + Sync + std::fmt::Debug {
    /// One of `replica`'s requests ended.
    fn released(&self, replica: &Replica);
    /// The replica set was replaced: any waiter may now find room.
    fn replicas_changed(&self);
}

/// No one waits for room: a request that finds none is refused at once.
#[derive(Debug, Default)]
pub struct NoWaiters;

impl CapacityWaiters for NoWaiters {
    fn released(&self, _replica: &Replica) {}
    fn replicas_changed(&self) {}
}

/// One replica in the live set.
#[derive(Debug)]
pub struct Replica {
    pub spec: ReplicaSpec,
    /// Stable small id (< [`MAX_REPLICAS`]) for bitsets; reused only after removal.
    pub slot: u16,
    /// The hash that identifies the replica across kvroute instances
    /// ([`crate::route::consistent::url_key`] of its URL), once per replica
    /// rather than once per candidate of every decision.
    pub url_key: u64,
    pub addr: SocketAddr,
    /// `host:port` as written in the URL, for the upstream `Host` header.
    pub authority: String,
    /// For an `https://` URL, the name its certificate is verified for.
    pub tls: Option<rustls_pki_types::ServerName<'static>>,
    /// Why the latest attempt at this replica failed (`None` once one
    /// succeeds), for `/state`. Shared across spec changes like the counters.
    pub last_error: Arc<arc_swap::ArcSwapOption<String>>,
    /// Requests this proxy has sent and not yet finished (all workers). Shared
    /// with the replica's previous `Replica` object after a spec change, since the
    /// requests begun on that object end (and decrement) there.
    pub in_flight: Arc<AtomicU32>,
    /// Prompt bytes of this proxy's in-flight requests that the router predicted the
    /// replica does not hold: prefill work queued there, the part of its load that
    /// decides a newcomer's time to first token. Shared across spec changes like
    /// `in_flight`.
    pub pending_prefill: Arc<AtomicU64>,
    /// This proxy's timed requests on the replica still waiting for their first
    /// byte. Shared across spec changes like `in_flight`.
    pub awaiting: Arc<AtomicU32>,
    /// Passive health: failures counted and, past a threshold, the replica out
    /// of rotation for a while. Shared across spec changes like the counters.
    pub ejection: Arc<crate::ejection::Ejection>,
    pub healthy: AtomicBool,
    pub requests: Arc<AtomicU64>,
    pub failures: Arc<AtomicU64>,
    /// The bound on `in_flight` in force: the spec's, else the fleet default;
    /// 0 is unbounded.
    pub max_in_flight: u32,
    /// Told when one of this replica's requests ends, to wake a waiter.
    waiters: Arc<dyn CapacityWaiters>,
    /// Read by every decision for every candidate, written once a scrape: a
    /// cell whose reads take no lock (a sequence lock for a 12-byte value).
    external: AtomicCell<ExternalLoad>,
}

impl Replica {
    pub fn is_available(&self) -> bool {
        self.spec.pool == Pool::Active && self.healthy.load(Ordering::Relaxed)
    }

    /// [`Replica::is_available`] and not ejected by passive health at `now_ms`:
    /// whether the router may send it a request.
    pub fn takes_traffic(&self, now_ms: u64) -> bool {
        self.is_available() && self.ejection.admits(now_ms)
    }

    /// Serves some model `other` serves (either serving any model counts).
    fn shares_a_model(&self, other: &Replica) -> bool {
        self.spec.models.is_empty()
            || other.spec.models.is_empty()
            || self
                .spec
                .models
                .iter()
                .any(|m| other.spec.models.contains(m))
    }

    pub fn serves(&self, model: Option<&str>) -> bool {
        match model {
            None => true,
            Some(m) => self.spec.models.is_empty() || self.spec.models.iter().any(|x| x == m),
        }
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Whether one more request fits under `max_in_flight` right now (routing
    /// skips a replica without room; [`Replica::try_begin_at`] enforces it).
    pub fn has_capacity(&self) -> bool {
        self.max_in_flight == 0 || self.in_flight() < self.max_in_flight
    }

    pub fn external_load(&self) -> ExternalLoad {
        self.external.load()
    }

    pub fn set_external_load(&self, load: ExternalLoad) {
        self.external.store(load);
    }

    /// This proxy's requests on the replica waiting for their first byte.
    pub fn awaiting(&self) -> u32 {
        self.awaiting.load(Ordering::Relaxed)
    }

    pub fn pending_prefill(&self) -> u64 {
        self.pending_prefill.load(Ordering::Relaxed)
    }

    /// Marks the start of a request that brings `prefill_bytes` of uncached prompt;
    /// the guard ends it. Not timed: see [`Replica::begin_at`].
    pub fn begin(self: &Arc<Self>, prefill_bytes: u64) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.started(prefill_bytes)
    }

    /// [`Replica::begin`] for a request sent at `now_ms`: the guard records when its
    /// first byte came, and until then it counts in `awaiting`.
    pub fn begin_at(self: &Arc<Self>, prefill_bytes: u64, now_ms: u64) -> InFlight {
        let g = self.begin(prefill_bytes);
        self.timed(g, now_ms)
    }

    /// [`Replica::begin_at`] if the replica is under its `max_in_flight`, the
    /// slot taken atomically: workers racing for the last one cannot both get it.
    pub fn try_begin_at(self: &Arc<Self>, prefill_bytes: u64, now_ms: u64) -> Option<InFlight> {
        if self.max_in_flight == 0 {
            return Some(self.begin_at(prefill_bytes, now_ms));
        }
        let max = self.max_in_flight;
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        let g = self.started(prefill_bytes);
        Some(self.timed(g, now_ms))
    }

    /// The guard of a request already counted in `in_flight`.
    fn started(self: &Arc<Self>, prefill_bytes: u64) -> InFlight {
        self.pending_prefill
            .fetch_add(prefill_bytes, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        InFlight {
            replica: self.clone(),
            prefill_bytes,
            sent_ms: None,
            first_byte_ms: None,
            awaiting: false,
        }
    }

    fn timed(&self, mut g: InFlight, now_ms: u64) -> InFlight {
        self.awaiting.fetch_add(1, Ordering::Relaxed);
        g.sent_ms = Some(now_ms);
        g.awaiting = true;
        g
    }
}

/// Takes the request back off the replica's in-flight count and pending prefill when
/// dropped, whatever path the request took.
pub struct InFlight {
    replica: Arc<Replica>,
    prefill_bytes: u64,
    sent_ms: Option<u64>,
    first_byte_ms: Option<u64>,
    /// Counted in the replica's `awaiting` until the first byte or the end.
    awaiting: bool,
}

impl InFlight {
    /// The replica has started answering (first body byte): its prefill of this
    /// prompt is done, though the request stays in flight while it decodes.
    pub fn prefill_done(&mut self) {
        let b = std::mem::take(&mut self.prefill_bytes);
        if b > 0 {
            self.replica.pending_prefill.fetch_sub(b, Ordering::Relaxed);
        }
        if std::mem::take(&mut self.awaiting) {
            self.replica.awaiting.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// [`InFlight::prefill_done`] at `now_ms`, which is kept as the first byte's
    /// time (the first call counts).
    pub fn prefill_done_at(&mut self, now_ms: u64) {
        if self.awaiting {
            self.first_byte_ms = Some(now_ms);
        }
        self.prefill_done();
    }

    /// Milliseconds from send to first byte, for a request begun with a time whose
    /// first byte was seen with one.
    pub fn ttft_ms(&self) -> Option<u64> {
        Some(self.first_byte_ms?.saturating_sub(self.sent_ms?))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.prefill_done();
        self.replica.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.replica.waiters.released(&self.replica);
    }
}

/// An immutable snapshot of the replica set.
#[derive(Debug, Default)]
pub struct ReplicaSet {
    pub replicas: Vec<Arc<Replica>>,
    /// Bumped on every swap, so per-worker caches (pools) know to prune.
    pub generation: u64,
}

impl ReplicaSet {
    pub fn by_slot(&self, slot: u16) -> Option<&Arc<Replica>> {
        self.replicas.iter().find(|r| r.slot == slot)
    }
    pub fn any_serves(&self, model: Option<&str>) -> bool {
        self.replicas.iter().any(|r| r.serves(model))
    }

    /// Whether passive health may take `replica` out of rotation at `now_ms`:
    /// another replica taking traffic serves one of its models (ejecting the
    /// last one standing would turn some failures into a certain 503), and the
    /// ejected stay within `max_percent` of the active replicas, at least one.
    pub fn may_eject(&self, replica: &Replica, now_ms: u64, max_percent: u32) -> bool {
        let others_up = self.replicas.iter().any(|r| {
            r.slot != replica.slot && r.takes_traffic(now_ms) && r.shares_a_model(replica)
        });
        if !others_up {
            return false;
        }
        let active = self
            .replicas
            .iter()
            .filter(|r| r.spec.pool == Pool::Active)
            .count();
        let ejected = self
            .replicas
            .iter()
            .filter(|r| r.slot != replica.slot && r.ejection.is_ejected(now_ms))
            .count();
        let cap = (active * max_percent.min(100) as usize / 100).max(1);
        ejected < cap
    }
}

/// The shared, swappable replica set.
pub struct ReplicaTable {
    current: ArcSwap<ReplicaSet>,
    /// Serialises writers so slot allocation and the swap are one step.
    write: Mutex<()>,
    /// `max_in_flight` for a spec that sets none (0: unbounded).
    default_max_in_flight: u32,
    /// Where requests wait for a replica with room; told of releases and swaps.
    waiters: Arc<dyn CapacityWaiters>,
}

impl Default for ReplicaTable {
    fn default() -> Self {
        ReplicaTable::with_waiters(0, Arc::new(NoWaiters))
    }
}

impl ReplicaTable {
    /// A table of `specs` whose URLs name IP addresses ([`Endpoint::literal`]:
    /// no lookup), with no one waiting for room: for tools and tests. The data
    /// plane builds its table with [`ReplicaTable::with_waiters`] and fills it
    /// through [`ReplicaTable::replace`] with the addresses it resolved.
    pub fn new(specs: Vec<ReplicaSpec>) -> Result<Self, Error> {
        let t = ReplicaTable::default();
        t.replace(crate::endpoint::literals(&t.load(), specs)?)?;
        Ok(t)
    }

    /// An empty table whose replicas are bounded by `default_max_in_flight`
    /// unless their spec says otherwise, telling `waiters` when room frees.
    pub fn with_waiters(default_max_in_flight: u32, waiters: Arc<dyn CapacityWaiters>) -> Self {
        ReplicaTable {
            current: ArcSwap::from_pointee(ReplicaSet::default()),
            write: Mutex::new(()),
            default_max_in_flight,
            waiters,
        }
    }

    pub fn load(&self) -> Arc<ReplicaSet> {
        self.current.load_full()
    }

    /// Replaces the whole set atomically with the specs in `resolved` (from
    /// [`crate::endpoint::resolve_with`] against the current set). Replicas whose URL
    /// is unchanged keep their identity (slot, counters, address); the rest get
    /// fresh slots and the address they were resolved to.
    pub fn replace(&self, resolved: Vec<Resolved>) -> Result<Arc<ReplicaSet>, Error> {
        let _w = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let (specs, endpoints): (Vec<ReplicaSpec>, Vec<Endpoint>) =
            resolved.into_iter().map(|r| (r.spec, r.endpoint)).unzip();
        check_urls(&specs)?;
        let old = self.current.load_full();
        let mut used = [false; MAX_REPLICAS];
        let mut next: Vec<Option<Arc<Replica>>> = Vec::with_capacity(specs.len());
        for spec in &specs {
            let kept = old.replicas.iter().find(|r| r.spec.url == spec.url);
            match kept {
                Some(r) if r.spec == *spec => {
                    used[r.slot as usize] = true;
                    next.push(Some(r.clone()));
                }
                Some(r) => {
                    // Same replica, new attributes: keep slot and counters.
                    used[r.slot as usize] = true;
                    let fresh = Replica {
                        spec: spec.clone(),
                        slot: r.slot,
                        url_key: r.url_key,
                        addr: r.addr,
                        authority: r.authority.clone(),
                        tls: r.tls.clone(),
                        last_error: r.last_error.clone(),
                        in_flight: r.in_flight.clone(),
                        pending_prefill: r.pending_prefill.clone(),
                        awaiting: r.awaiting.clone(),
                        ejection: r.ejection.clone(),
                        healthy: AtomicBool::new(spec.healthy),
                        requests: r.requests.clone(),
                        failures: r.failures.clone(),
                        max_in_flight: spec.max_in_flight.unwrap_or(self.default_max_in_flight),
                        waiters: self.waiters.clone(),
                        external: AtomicCell::new(r.external_load()),
                    };
                    next.push(Some(Arc::new(fresh)));
                }
                None => next.push(None),
            }
        }
        let mut free = (0..MAX_REPLICAS).filter(|s| !used[*s]);
        let mut replicas = Vec::with_capacity(specs.len());
        for ((spec, endpoint), kept) in specs.into_iter().zip(endpoints).zip(next) {
            if let Some(r) = kept {
                replicas.push(r);
                continue;
            }
            let Endpoint {
                addr,
                authority,
                tls,
            } = endpoint;
            let slot = free.next().expect("checked count above") as u16;
            let max_in_flight = spec.max_in_flight.unwrap_or(self.default_max_in_flight);
            replicas.push(Arc::new(Replica {
                healthy: AtomicBool::new(spec.healthy),
                url_key: crate::route::consistent::url_key(&spec.url),
                spec,
                slot,
                addr,
                authority,
                tls,
                last_error: Arc::default(),
                in_flight: Arc::default(),
                pending_prefill: Arc::default(),
                awaiting: Arc::default(),
                ejection: Arc::default(),
                requests: Arc::default(),
                failures: Arc::default(),
                max_in_flight,
                waiters: self.waiters.clone(),
                external: AtomicCell::new(ExternalLoad::default()),
            }));
        }
        let set = Arc::new(ReplicaSet {
            replicas,
            generation: old.generation + 1,
        });
        self.current.store(set.clone());
        self.waiters.replicas_changed();
        Ok(set)
    }
}

/// What [`ReplicaTable::replace`] refuses whatever the addresses: more than
/// [`MAX_REPLICAS`] replicas, or a URL twice.
pub fn check_urls(specs: &[ReplicaSpec]) -> Result<(), Error> {
    if specs.len() > MAX_REPLICAS {
        return Err(Error::Config(format!(
            "replicas: {} given, at most {MAX_REPLICAS} supported",
            specs.len()
        )));
    }
    let mut seen = std::collections::HashSet::new();
    for spec in specs {
        if !seen.insert(spec.url.as_str()) {
            return Err(Error::Config(format!(
                "replicas: duplicate url {}",
                spec.url
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `specs` resolved against what `t` holds, as the callers of `replace` do.
    fn resolved(t: &ReplicaTable, specs: Vec<ReplicaSpec>) -> Vec<Resolved> {
        crate::endpoint::literals(&t.load(), specs).unwrap()
    }

    #[test]
    fn swap_keeps_identity_of_unchanged_replicas() {
        let t = ReplicaTable::new(vec![
            ReplicaSpec::new("http://127.0.0.1:8001"),
            ReplicaSpec::new("http://127.0.0.1:8002"),
        ])
        .unwrap();
        let a = t.load();
        let _g = a.replicas[1].begin(0);
        let b = t
            .replace(resolved(
                &t,
                vec![
                    ReplicaSpec::new("http://127.0.0.1:8002"),
                    ReplicaSpec::new("http://127.0.0.1:8003"),
                ],
            ))
            .unwrap();
        assert!(Arc::ptr_eq(&a.replicas[1], &b.replicas[0]));
        assert_eq!(b.replicas[0].in_flight(), 1);
        // A spec change makes a new object; requests begun on the old one still
        // end on the shared counter.
        let g = b.replicas[1].begin(0);
        let mut spec = ReplicaSpec::new("http://127.0.0.1:8003");
        spec.healthy = false;
        let c = t
            .replace(resolved(
                &t,
                vec![ReplicaSpec::new("http://127.0.0.1:8002"), spec],
            ))
            .unwrap();
        assert!(!Arc::ptr_eq(&b.replicas[1], &c.replicas[1]));
        assert_eq!(c.replicas[1].in_flight(), 1);
        drop(g);
        assert_eq!(c.replicas[1].in_flight(), 0);
        // 8003 reuses no live slot.
        assert_ne!(b.replicas[1].slot, b.replicas[0].slot);
        assert_eq!(b.generation, a.generation + 1);
        // Every object carries the key instances place by, a spec change's too.
        for r in a.replicas.iter().chain(&b.replicas).chain(&c.replicas) {
            assert_eq!(r.url_key, crate::route::consistent::url_key(&r.spec.url));
        }
        assert_ne!(c.replicas[0].url_key, c.replicas[1].url_key);
    }

    #[test]
    fn max_in_flight_is_a_hard_bound_across_threads() {
        let spec = ReplicaSpec {
            max_in_flight: Some(3),
            ..ReplicaSpec::new("http://127.0.0.1:8001")
        };
        let t = ReplicaTable::new(vec![spec, ReplicaSpec::new("http://127.0.0.1:8002")]).unwrap();
        let set = t.load();
        let (bounded, free) = (&set.replicas[0], &set.replicas[1]);
        assert_eq!((bounded.max_in_flight, free.max_in_flight), (3, 0));
        // Eight threads race for three slots: exactly three win.
        let won: usize = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| s.spawn(|| bounded.try_begin_at(0, 0)))
                .collect();
            let guards: Vec<_> = hs.into_iter().filter_map(|h| h.join().unwrap()).collect();
            assert!(!bounded.has_capacity());
            guards.len()
        });
        assert_eq!(won, 3);
        assert!(bounded.has_capacity() && bounded.in_flight() == 0);
        // Unbounded: always room.
        let gs: Vec<_> = (0..100).map(|_| free.try_begin_at(0, 0).unwrap()).collect();
        assert!(free.has_capacity());
        drop(gs);
        // The fleet default applies where the spec sets none; the spec wins.
        let t = ReplicaTable::with_waiters(5, Arc::new(NoWaiters));
        let set = t
            .replace(resolved(
                &t,
                vec![
                    ReplicaSpec::new("http://127.0.0.1:8001"),
                    ReplicaSpec {
                        max_in_flight: Some(0),
                        ..ReplicaSpec::new("http://127.0.0.1:8002")
                    },
                ],
            ))
            .unwrap();
        assert_eq!(set.replicas[0].max_in_flight, 5);
        assert_eq!(set.replicas[1].max_in_flight, 0);
    }

    #[test]
    fn waiters_hear_of_every_release_and_every_swap() {
        #[derive(Debug, Default)]
        struct Counting {
            released: std::sync::Mutex<Vec<u16>>,
            swaps: AtomicU32,
        }
        impl CapacityWaiters for Counting {
            fn released(&self, replica: &Replica) {
                self.released.lock().unwrap().push(replica.slot);
            }
            fn replicas_changed(&self) {
                self.swaps.fetch_add(1, Ordering::Relaxed);
            }
        }
        let w = Arc::new(Counting::default());
        let t = ReplicaTable::with_waiters(0, w.clone());
        let set = t
            .replace(resolved(
                &t,
                vec![
                    ReplicaSpec::new("http://127.0.0.1:8001"),
                    ReplicaSpec::new("http://127.0.0.1:8002"),
                ],
            ))
            .unwrap();
        assert_eq!(w.swaps.load(Ordering::Relaxed), 1);
        let a = set.replicas[0].begin(10);
        let b = set.replicas[1].try_begin_at(0, 5).unwrap();
        assert!(w.released.lock().unwrap().is_empty());
        drop(b);
        drop(a);
        assert_eq!(
            *w.released.lock().unwrap(),
            vec![set.replicas[1].slot, set.replicas[0].slot]
        );
        // A replica kept across a spec change tells the same waiters.
        let mut spec = ReplicaSpec::new("http://127.0.0.1:8001");
        spec.weight = 2;
        let next = t.replace(resolved(&t, vec![spec])).unwrap();
        assert_eq!(w.swaps.load(Ordering::Relaxed), 2);
        drop(next.replicas[0].begin(0));
        assert_eq!(w.released.lock().unwrap().len(), 3);
    }

    #[test]
    fn rejects_duplicates_and_too_many() {
        let t = ReplicaTable::default();
        let one = |url: &str| Resolved {
            spec: ReplicaSpec::new(url),
            endpoint: Endpoint::literal(url).unwrap(),
        };
        let e = t
            .replace(vec![one("http://127.0.0.1:1"), one("http://127.0.0.1:1")])
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "config: replicas: duplicate url http://127.0.0.1:1"
        );
        let many = (0..=MAX_REPLICAS as u16)
            .map(|p| one(&format!("http://127.0.0.1:{}", 1000 + p)))
            .collect();
        let e = t.replace(many).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("config: replicas: 129 given, at most {MAX_REPLICAS} supported")
        );
        assert!(ReplicaTable::new(vec![ReplicaSpec::new("ftp://x:1")]).is_err());
    }
}
