//! One worker's client connections by state, in the order they are shed.
//!
//! A connection is `ReadingHead` from accept (or from its first byte after an
//! idle spell) until its request head is complete, `Active` while a request
//! is in progress, and `Idle` between requests on a keep-alive connection.
//! Above the high watermark, each new connection first sheds the oldest
//! head-less connection, or when there is none the connection idle the
//! longest; an active one is never shed. At the cap with nothing to shed, the
//! new connection is refused.
//!
//! Single-threaded (the worker's runtime) and O(log n) per transition: each
//! sheddable state is a `BTreeMap` keyed by the sequence number the
//! connection got when it entered that state, so the oldest is the first key.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::Future;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};

use crate::metrics as m;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// No complete request head yet (also: nothing sent at all).
    ReadingHead,
    /// Keep-alive, between requests.
    Idle,
    /// A request is in progress (its body, the replica's answer, the stream).
    Active,
}

/// A worker's connections by state, for `/state` and `/metrics` (connections
/// already shed and closing are in none of them).
#[derive(Debug, Default)]
pub struct StateCounts {
    pub reading_head: AtomicU64,
    pub idle: AtomicU64,
    pub active: AtomicU64,
}

/// Why a connection was closed by the budget (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShedReason {
    /// It had not sent a complete request head.
    Headless,
    /// It was idle between requests.
    Idle,
    /// It was new, the worker was at its cap and nothing could be shed.
    OverCap,
}

impl ShedReason {
    pub fn label(self) -> &'static str {
        match self {
            ShedReason::Headless => "headless",
            ShedReason::Idle => "idle",
            ShedReason::OverCap => "over_cap",
        }
    }
}

/// Wakes a connection's task when the registry sheds it.
#[derive(Default)]
struct ShedSignal {
    shed: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

impl ShedSignal {
    fn fire(&self) {
        self.shed.set(true);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

pub struct Registry {
    cap: usize,
    watermark: usize,
    next_seq: Cell<u64>,
    headless: RefCell<BTreeMap<u64, Rc<ShedSignal>>>,
    idle: RefCell<BTreeMap<u64, Rc<ShedSignal>>>,
    active: Cell<usize>,
    /// Registered connections, shed ones not yet closed included.
    open: Cell<usize>,
    /// Shed, their tasks not yet gone.
    shedding: Cell<usize>,
    /// Most connections open since [`Registry::reset_peak`] last ran.
    peak: Cell<usize>,
    counts: Arc<StateCounts>,
    sheds: [metrics::Counter; 3],
}

impl Registry {
    /// A registry holding at most `cap` connections, shedding above `watermark`.
    pub fn new(cap: usize, watermark: usize, counts: Arc<StateCounts>) -> Rc<Registry> {
        let shed = |r: ShedReason| metrics::counter!(m::CONNECTION_SHEDS, "reason" => r.label());
        Rc::new(Registry {
            cap,
            watermark: watermark.min(cap),
            next_seq: Cell::new(0),
            headless: RefCell::default(),
            idle: RefCell::default(),
            active: Cell::new(0),
            open: Cell::new(0),
            shedding: Cell::new(0),
            peak: Cell::new(0),
            counts,
            sheds: [
                shed(ShedReason::Headless),
                shed(ShedReason::Idle),
                shed(ShedReason::OverCap),
            ],
        })
    }

    /// Registers a new connection as `ReadingHead`, shedding first when the
    /// worker is above its watermark. `None`: refuse it, the worker is full of
    /// connections that may not be shed.
    pub fn admit(self: &Rc<Self>) -> Option<Member> {
        if self.live() >= self.watermark {
            self.shed_one();
        }
        if self.live() >= self.cap {
            self.count_shed(ShedReason::OverCap);
            return None;
        }
        let signal = Rc::new(ShedSignal::default());
        let seq = self.seq();
        self.headless.borrow_mut().insert(seq, signal.clone());
        self.open.set(self.open.get() + 1);
        self.peak.set(self.peak.get().max(self.open.get()));
        self.publish();
        Some(Member {
            registry: self.clone(),
            signal,
            state: Cell::new(ConnState::ReadingHead),
            seq: Cell::new(seq),
        })
    }

    /// Sheds the oldest head-less connection, else the one idle the longest.
    fn shed_one(&self) -> Option<ShedReason> {
        let victim = {
            let first = self.headless.borrow_mut().pop_first();
            match first {
                Some((_, s)) => Some((s, ShedReason::Headless)),
                None => self
                    .idle
                    .borrow_mut()
                    .pop_first()
                    .map(|(_, s)| (s, ShedReason::Idle)),
            }
        };
        let (signal, reason) = victim?;
        self.shedding.set(self.shedding.get() + 1);
        self.count_shed(reason);
        self.publish();
        signal.fire();
        Some(reason)
    }

    fn count_shed(&self, r: ShedReason) {
        let i = match r {
            ShedReason::Headless => 0,
            ShedReason::Idle => 1,
            ShedReason::OverCap => 2,
        };
        self.sheds[i].increment(1);
    }

    /// Open connections that are not being shed.
    pub fn live(&self) -> usize {
        self.open.get() - self.shedding.get()
    }

    /// Shed connections whose tasks have not yet closed them.
    pub fn shedding(&self) -> usize {
        self.shedding.get()
    }

    /// Connections open (shed ones still closing included).
    pub fn open(&self) -> usize {
        self.open.get()
    }

    /// The most connections open since the last [`Registry::reset_peak`].
    pub fn peak(&self) -> usize {
        self.peak.get()
    }

    /// Starts the peak over from the connections open now.
    pub fn reset_peak(&self) {
        self.peak.set(self.open.get());
    }

    fn seq(&self) -> u64 {
        let s = self.next_seq.get();
        self.next_seq.set(s + 1);
        s
    }

    fn publish(&self) {
        let c = &self.counts;
        c.reading_head
            .store(self.headless.borrow().len() as u64, Ordering::Relaxed);
        c.idle
            .store(self.idle.borrow().len() as u64, Ordering::Relaxed);
        c.active.store(self.active.get() as u64, Ordering::Relaxed);
    }

    /// Takes `signal` (at `seq`) out of `state`'s place.
    fn leave(&self, state: ConnState, seq: u64) {
        match state {
            ConnState::ReadingHead => {
                self.headless.borrow_mut().remove(&seq);
            }
            ConnState::Idle => {
                self.idle.borrow_mut().remove(&seq);
            }
            ConnState::Active => self.active.set(self.active.get() - 1),
        }
    }

    /// Puts `signal` in `state`'s place; returns its sequence number there.
    fn enter(&self, state: ConnState, signal: &Rc<ShedSignal>) -> u64 {
        let seq = self.seq();
        match state {
            ConnState::ReadingHead => {
                self.headless.borrow_mut().insert(seq, signal.clone());
            }
            ConnState::Idle => {
                self.idle.borrow_mut().insert(seq, signal.clone());
            }
            ConnState::Active => self.active.set(self.active.get() + 1),
        }
        seq
    }
}

/// A connection's place in its worker's registry; leaving it (drop) is closing.
pub struct Member {
    registry: Rc<Registry>,
    signal: Rc<ShedSignal>,
    state: Cell<ConnState>,
    seq: Cell<u64>,
}

impl Member {
    /// Moves the connection to `state`; entering a sheddable state makes it
    /// the youngest there. A shed connection stays out of every state.
    pub fn set(&self, state: ConnState) {
        if self.state.get() == state || self.is_shed() {
            self.state.set(state);
            return;
        }
        let r = &self.registry;
        r.leave(self.state.get(), self.seq.get());
        self.seq.set(r.enter(state, &self.signal));
        self.state.set(state);
        r.publish();
    }

    pub fn state(&self) -> ConnState {
        self.state.get()
    }

    /// The registry shed this connection: it should close now.
    pub fn is_shed(&self) -> bool {
        self.signal.shed.get()
    }

    /// Completes once the registry sheds this connection.
    pub fn shed(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.signal.shed.get() {
                return Poll::Ready(());
            }
            let w = match self.signal.waker.take() {
                Some(w) if w.will_wake(cx.waker()) => w,
                _ => cx.waker().clone(),
            };
            self.signal.waker.set(Some(w));
            Poll::Pending
        })
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let r = &self.registry;
        if self.is_shed() {
            r.shedding.set(r.shedding.get() - 1);
        } else {
            r.leave(self.state.get(), self.seq.get());
        }
        r.open.set(r.open.get() - 1);
        r.publish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(cap: usize, watermark: usize) -> (Rc<Registry>, Arc<StateCounts>) {
        let counts = Arc::new(StateCounts::default());
        (Registry::new(cap, watermark, counts.clone()), counts)
    }

    fn shed_ones(members: &[Member]) -> Vec<usize> {
        (0..members.len())
            .filter(|&i| members[i].is_shed())
            .collect()
    }

    #[test]
    fn sheds_oldest_headless_first_then_longest_idle_never_active() {
        let (r, counts) = registry(6, 4);
        let m: Vec<Member> = (0..4).map(|_| r.admit().unwrap()).collect();
        // 0 idle first, then 2 idle; 1 active; 3 still reading its head.
        m[0].set(ConnState::Active);
        m[0].set(ConnState::Idle);
        m[1].set(ConnState::Active);
        m[2].set(ConnState::Active);
        m[2].set(ConnState::Idle);
        assert_eq!(counts.idle.load(Ordering::Relaxed), 2);
        assert_eq!(counts.active.load(Ordering::Relaxed), 1);
        assert_eq!(counts.reading_head.load(Ordering::Relaxed), 1);
        // At the watermark: each admission sheds one, head-less first.
        let n4 = r.admit().unwrap();
        assert_eq!(shed_ones(&m), vec![3]);
        // A head-less newcomer is younger than the idle ones, and goes next.
        let n5 = r.admit().unwrap();
        assert!(n4.is_shed());
        n5.set(ConnState::Active);
        // No head-less one left: the one idle the longest, then the next.
        let n6 = r.admit().unwrap();
        assert_eq!(shed_ones(&m), vec![0, 3]);
        n6.set(ConnState::Active);
        let n7 = r.admit().unwrap();
        assert_eq!(shed_ones(&m), vec![0, 2, 3]);
        n7.set(ConnState::Active);
        // Only active ones: never shed; admitted up to the cap, then refused.
        let n8 = r.admit().unwrap();
        n8.set(ConnState::Active);
        let n9 = r.admit().unwrap();
        n9.set(ConnState::Active);
        assert!(r.admit().is_none());
        assert!([&m[1], &n5, &n6, &n7, &n8, &n9]
            .iter()
            .all(|x| !x.is_shed()));
        assert_eq!(counts.active.load(Ordering::Relaxed), 6);
    }

    #[test]
    fn refuses_at_the_cap_when_nothing_can_be_shed() {
        let (r, counts) = registry(3, 2);
        let m: Vec<Member> = (0..3).map(|_| r.admit().unwrap()).collect();
        // The third admission shed the first (above the watermark).
        assert_eq!(shed_ones(&m), vec![0]);
        for x in &m[1..] {
            x.set(ConnState::Active);
        }
        let n = r.admit().unwrap();
        n.set(ConnState::Active);
        assert_eq!(r.live(), 3);
        // Full of active connections: refused, and nothing was shed.
        assert!(r.admit().is_none());
        assert_eq!(counts.active.load(Ordering::Relaxed), 3);
        drop(m);
        assert_eq!((r.open(), r.live()), (1, 1));
        assert!(r.admit().is_some());
    }

    #[test]
    fn a_shed_connection_is_counted_until_it_closes() {
        let (r, counts) = registry(2, 1);
        let a = r.admit().unwrap();
        let b = r.admit().unwrap();
        assert!(a.is_shed() && !b.is_shed());
        assert_eq!((r.open(), r.live()), (2, 1));
        assert_eq!(counts.reading_head.load(Ordering::Relaxed), 1);
        // Its task may still move it about before noticing: no effect.
        a.set(ConnState::Active);
        assert_eq!(counts.active.load(Ordering::Relaxed), 0);
        drop(a);
        assert_eq!((r.open(), r.live()), (1, 1));
        drop(b);
        assert_eq!(r.open(), 0);
        assert_eq!(counts.reading_head.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn re_entering_a_state_makes_it_the_youngest() {
        let (r, _) = registry(10, 3);
        let a = r.admit().unwrap();
        let b = r.admit().unwrap();
        let c = r.admit().unwrap();
        // a goes idle and comes back with a new head: b is now the oldest head-less.
        a.set(ConnState::Idle);
        a.set(ConnState::ReadingHead);
        let _d = r.admit().unwrap();
        assert!(b.is_shed() && !a.is_shed() && !c.is_shed());
    }

    #[test]
    fn a_shed_wakes_the_waiting_task() {
        let (r, _) = registry(2, 1);
        let a = r.admit().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async {
            let r2 = r.clone();
            let waiter = async { a.shed().await };
            let shedder = async move {
                tokio::task::yield_now().await;
                r2.admit()
            };
            let ((), b) = tokio::join!(waiter, shedder);
            assert!(b.is_some());
        });
        assert!(a.is_shed());
    }

    #[test]
    fn peak_starts_over_when_reset() {
        let (r, _) = registry(100, 90);
        let m: Vec<Member> = (0..10).map(|_| r.admit().unwrap()).collect();
        drop(m);
        assert_eq!(r.peak(), 10);
        r.reset_peak();
        assert_eq!(r.peak(), 0);
    }
}
