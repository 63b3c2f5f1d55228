//! Admission: the one bounded FIFO queue of requests that cannot be sent yet.
//!
//! A request waits here when every replica of its model is at its
//! `max_in_flight` bound, or when none is available at all (a rolling restart,
//! a health flap). Both share one bound, `[upstream] queue_max`, counted over
//! the whole process (all workers), so an outage and an overload together
//! cannot hold more than that many requests.
//!
//! Waiting is event driven. A finished request ([`crate::replica::InFlight`]
//! dropped) wakes the oldest waiter its replica can serve — one waiter per freed
//! slot, so a release costs one wakeup however long the queue is. A replica set
//! swap wakes every waiter (rare, and the new set may have room for many).
//! Waiters also look again every [`RECHECK`], for the changes that arrive
//! without an event (a health flag flipped in place) and to notice a client
//! that went away. Wakeups cross worker threads through
//! [`tokio::sync::Notify`], which needs no particular runtime.
//!
//! The state machine is sans-I/O: [`Admission::enter`] decides, a [`Ticket`]
//! holds the place and leaves the queue when dropped, whatever path the request
//! took.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::replica::{CapacityWaiters, Replica};

/// How often a waiter looks for capacity without being woken.
pub const RECHECK: Duration = Duration::from_millis(250);

/// Why a request was not given a place in the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The queue holds `queue_max` requests (or queueing is off).
    QueueFull,
    /// The request's API key already holds its share of the queue.
    QueueShare,
}

impl Refusal {
    /// The `reason` label of `kvroute_overload_rejections_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::QueueFull => "queue_full",
            Refusal::QueueShare => "queue_share",
        }
    }
}

/// The process-wide admission queue.
#[derive(Debug)]
pub struct Admission {
    max: usize,
    timeout: Duration,
    /// Mirror of the queue's length, read without the lock on every release.
    depth: AtomicUsize,
    state: Mutex<Queue>,
}

#[derive(Debug, Default)]
struct Queue {
    /// Oldest first.
    waiters: VecDeque<Arc<Waiter>>,
    /// Places held per API key (keys with none are removed).
    per_key: HashMap<Arc<str>, usize>,
    /// Places held per model (`None`: requests naming none), for the FIFO rule
    /// that a newcomer does not overtake a waiter of its own model.
    per_model: HashMap<Option<Box<str>>, usize>,
}

#[derive(Debug)]
struct Waiter {
    key: Option<Arc<str>>,
    model: Option<Box<str>>,
    /// Set when a wakeup was handed to this waiter and not yet used, so the next
    /// release goes to the waiter behind it.
    woken: AtomicBool,
    notify: Notify,
}

impl Admission {
    /// `max` places; a waiter gives up after `timeout`. Either 0 turns
    /// queueing off: a request that cannot be sent is refused at once.
    pub fn new(max: usize, timeout: Duration) -> Self {
        Admission {
            max,
            timeout,
            depth: AtomicUsize::new(0),
            state: Mutex::new(Queue::default()),
        }
    }

    /// No queue: what a table built without configuration (tests, tools) uses.
    pub fn disabled() -> Self {
        Admission::new(0, Duration::ZERO)
    }

    pub fn enabled(&self) -> bool {
        self.max > 0 && !self.timeout.is_zero()
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Requests waiting now, over all workers.
    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }

    /// `Retry-After` seconds for a refusal: how long a place in the queue may
    /// take to turn over, at least a second.
    pub fn retry_after_s(&self) -> u64 {
        self.timeout.as_millis().div_ceil(1000).max(1) as u64
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether requests for `model` are waiting: a newcomer for it then queues
    /// behind them instead of taking a slot that frees up first.
    pub fn has_waiters_for(&self, model: Option<&str>) -> bool {
        if self.depth() == 0 {
            return false;
        }
        self.lock().per_model.contains_key(&model.map(Box::from))
    }

    /// Takes a place at the back of the queue for a request for `model` sent
    /// with API key `key` (`None` when auth is off).
    ///
    /// A key may hold at most `max / (k + 1)` places (at least one), `k` being
    /// the number of keys with requests waiting, its own included: a tenant
    /// alone can fill half the queue, and some room always stays for a tenant
    /// that has none waiting yet.
    pub fn enter(
        self: &Arc<Self>,
        key: Option<&str>,
        model: Option<&str>,
    ) -> Result<Ticket, Refusal> {
        if !self.enabled() {
            return Err(Refusal::QueueFull);
        }
        let mut q = self.lock();
        if let Some(k) = key {
            let held = q.per_key.get(k).copied().unwrap_or(0);
            let keys = q.per_key.len() + usize::from(held == 0);
            if held >= (self.max / (keys + 1)).max(1) {
                return Err(Refusal::QueueShare);
            }
        }
        if q.waiters.len() >= self.max {
            return Err(Refusal::QueueFull);
        }
        let key: Option<Arc<str>> = key.map(|k| {
            q.per_key
                .get_key_value(k)
                .map(|(k, _)| k.clone())
                .unwrap_or_else(|| Arc::from(k))
        });
        if let Some(k) = &key {
            *q.per_key.entry(k.clone()).or_default() += 1;
        }
        let model: Option<Box<str>> = model.map(Box::from);
        *q.per_model.entry(model.clone()).or_default() += 1;
        let waiter = Arc::new(Waiter {
            key,
            model,
            woken: AtomicBool::new(false),
            notify: Notify::new(),
        });
        q.waiters.push_back(waiter.clone());
        self.depth.store(q.waiters.len(), Ordering::Relaxed);
        Ok(Ticket {
            admission: self.clone(),
            waiter,
            admitted: false,
        })
    }

    /// One request on `replica` ended: hands the freed slot to the oldest
    /// waiter it can serve that has not been woken yet.
    pub fn released(&self, replica: &Replica) {
        if self.depth() == 0 {
            return;
        }
        let q = self.lock();
        let next = q
            .waiters
            .iter()
            .find(|w| !w.woken.load(Ordering::Relaxed) && replica.serves(w.model.as_deref()));
        if let Some(w) = next {
            w.woken.store(true, Ordering::Relaxed);
            w.notify.notify_one();
        }
    }

    /// The replica set was replaced: every waiter looks again.
    pub fn replicas_changed(&self) {
        if self.depth() == 0 {
            return;
        }
        for w in &self.lock().waiters {
            w.woken.store(true, Ordering::Relaxed);
            w.notify.notify_one();
        }
    }

    /// Hands a wakeup its holder (a waiter for `model`) did not use to the next
    /// unwoken waiter the freed replica surely serves too: one for the same
    /// model or for none. A holder for `None` may have been woken by any
    /// replica: it passes to the next waiter at all, which looks and may wait on.
    fn pass_on(q: &Queue, model: Option<&str>) {
        let next = q.waiters.iter().find(|w| {
            !w.woken.load(Ordering::Relaxed)
                && (model.is_none() || w.model.is_none() || w.model.as_deref() == model)
        });
        if let Some(w) = next {
            w.woken.store(true, Ordering::Relaxed);
            w.notify.notify_one();
        }
    }
}

/// A place in the queue. Dropping it leaves the queue; a wakeup it received
/// and did not turn into a sent request goes on to the next waiter.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    waiter: Arc<Waiter>,
    admitted: bool,
}

impl Ticket {
    /// Resolves when a slot may have freed up for this waiter, or after
    /// `RECHECK` at most. Call [`Ticket::rearm`] before looking for a replica,
    /// so a slot freed during the look is not missed.
    pub async fn woken(&self) {
        let _ = tokio::time::timeout(RECHECK, self.waiter.notify.notified()).await;
    }

    /// Marks the wakeup as taken: the next release may wake this waiter again.
    /// A release between this and the next [`Ticket::woken`] leaves its permit
    /// in the `Notify`, so it is not lost.
    pub fn rearm(&self) {
        self.waiter.woken.store(false, Ordering::Relaxed);
    }

    /// Whether a wakeup was handed to this waiter and not yet taken.
    pub fn is_woken(&self) -> bool {
        self.waiter.woken.load(Ordering::Relaxed)
    }

    /// The request got its replica: the place is given up with the wakeup used.
    pub fn admitted(mut self) {
        self.admitted = true;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let a = &self.admission;
        let mut q = a.lock();
        if let Some(i) = q.waiters.iter().position(|w| Arc::ptr_eq(w, &self.waiter)) {
            q.waiters.remove(i);
        }
        a.depth.store(q.waiters.len(), Ordering::Relaxed);
        if let Some(k) = &self.waiter.key {
            if let Some(n) = q.per_key.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    q.per_key.remove(k);
                }
            }
        }
        if let Some(n) = q.per_model.get_mut(&self.waiter.model) {
            *n -= 1;
            if *n == 0 {
                q.per_model.remove(&self.waiter.model);
            }
        }
        if !self.admitted && self.waiter.woken.load(Ordering::Relaxed) {
            Admission::pass_on(&q, self.waiter.model.as_deref());
        }
    }
}

/// A request's stay in the queue: its [`Ticket`], when it gives up, and the
/// time spent, recorded in `kvroute_queue_wait_seconds` when it ends.
#[derive(Debug)]
pub struct Stay {
    pub ticket: Option<Ticket>,
    pub until: tokio::time::Instant,
    since: std::time::Instant,
}

impl Stay {
    pub fn new(ticket: Ticket, timeout: Duration) -> Self {
        Stay {
            ticket: Some(ticket),
            until: tokio::time::Instant::now() + timeout,
            since: std::time::Instant::now(),
        }
    }
}

impl Drop for Stay {
    fn drop(&mut self) {
        metrics::histogram!(crate::metrics::QUEUE_WAIT).record(self.since.elapsed().as_secs_f64());
    }
}

/// The `retry-after` header line for an error kvroute answers because of load
/// or a missing replica; empty for the others.
pub fn retry_after_header(admission: &Admission, kind: crate::http::ErrorKind) -> String {
    use crate::http::ErrorKind as K;
    match kind {
        K::Overloaded | K::QueueShareExceeded | K::NoReplica => {
            format!("retry-after: {}\r\n", admission.retry_after_s())
        }
        _ => String::new(),
    }
}

/// The replica table tells the queue of freed room through this.
impl CapacityWaiters for Admission {
    fn released(&self, replica: &Replica) {
        Admission::released(self, replica);
    }

    fn replicas_changed(&self) {
        Admission::replicas_changed(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::{ReplicaSpec, ReplicaTable};

    fn queue(max: usize) -> Arc<Admission> {
        Arc::new(Admission::new(max, Duration::from_secs(5)))
    }

    fn replica(models: &[&str]) -> Arc<Replica> {
        let spec = ReplicaSpec {
            models: models.iter().map(|m| m.to_string()).collect(),
            ..ReplicaSpec::new("http://127.0.0.1:9")
        };
        ReplicaTable::new(vec![spec]).unwrap().load().replicas[0].clone()
    }

    #[test]
    fn bound_is_shared_and_places_come_back() {
        let q = queue(2);
        let a = q.enter(None, None).unwrap();
        let _b = q.enter(None, Some("m")).unwrap();
        assert_eq!(q.depth(), 2);
        assert_eq!(q.enter(None, None).unwrap_err(), Refusal::QueueFull);
        drop(a);
        assert_eq!(q.depth(), 1);
        assert!(q.enter(None, None).is_ok());
    }

    #[test]
    fn disabled_refuses() {
        let q = Arc::new(Admission::disabled());
        assert_eq!(q.enter(None, None).unwrap_err(), Refusal::QueueFull);
        let q = Arc::new(Admission::new(4, Duration::ZERO));
        assert!(!q.enabled());
        assert_eq!(q.retry_after_s(), 1);
        assert_eq!(
            Admission::new(4, Duration::from_millis(2500)).retry_after_s(),
            3
        );
    }

    #[test]
    fn release_wakes_oldest_servable_waiter_once() {
        let q = queue(8);
        let a = q.enter(None, Some("llama")).unwrap();
        let b = q.enter(None, Some("qwen")).unwrap();
        let c = q.enter(None, Some("qwen")).unwrap();
        let qwen = replica(&["qwen"]);
        q.released(&qwen);
        assert!(!a.is_woken(), "a qwen slot does not wake a llama waiter");
        assert!(
            b.is_woken() && !c.is_woken(),
            "FIFO: the oldest qwen waiter"
        );
        // A second release skips the waiter already woken.
        q.released(&qwen);
        assert!(c.is_woken());
        // A replica serving any model wakes the head.
        q.released(&replica(&[]));
        assert!(a.is_woken());
    }

    #[test]
    fn unused_wakeup_passes_to_the_next_waiter() {
        let q = queue(8);
        let a = q.enter(None, Some("m")).unwrap();
        let b = q.enter(None, Some("m")).unwrap();
        q.released(&replica(&[]));
        assert!(a.is_woken() && !b.is_woken());
        drop(a); // timed out, or its client left, holding the wakeup
        assert!(b.is_woken());
        // A wakeup that was used goes nowhere.
        let c = q.enter(None, Some("m")).unwrap();
        b.admitted();
        assert!(!c.is_woken());
    }

    #[test]
    fn newcomers_queue_behind_their_model() {
        let q = queue(8);
        assert!(!q.has_waiters_for(Some("m")));
        let a = q.enter(None, Some("m")).unwrap();
        assert!(q.has_waiters_for(Some("m")));
        assert!(!q.has_waiters_for(Some("other")));
        assert!(!q.has_waiters_for(None));
        drop(a);
        assert!(!q.has_waiters_for(Some("m")));
    }

    #[test]
    fn one_key_holds_at_most_its_share() {
        let q = queue(6);
        // Alone, a key may take half the queue.
        let mut held: Vec<_> = (0..3).map(|_| q.enter(Some("a"), None).unwrap()).collect();
        assert_eq!(q.enter(Some("a"), None).unwrap_err(), Refusal::QueueShare);
        // Another key still gets in; with two keys waiting each may hold 6/3 = 2.
        let b = q.enter(Some("b"), None).unwrap();
        let _b2 = q.enter(Some("b"), None).unwrap();
        assert_eq!(q.enter(Some("b"), None).unwrap_err(), Refusal::QueueShare);
        held.pop();
        assert_eq!(q.enter(Some("a"), None).unwrap_err(), Refusal::QueueShare);
        drop(b);
        held.pop();
        assert!(q.enter(Some("a"), None).is_ok());
        // A tiny queue still lets every key have one place.
        let q = queue(1);
        let _x = q.enter(Some("x"), None).unwrap();
        assert_eq!(q.enter(Some("x"), None).unwrap_err(), Refusal::QueueShare);
        assert_eq!(q.enter(Some("y"), None).unwrap_err(), Refusal::QueueFull);
    }

    #[test]
    fn wakeup_crosses_threads_and_is_not_lost() {
        let q = queue(4);
        let t = q.enter(None, None).unwrap();
        let r = replica(&[]);
        // Released before the waiter awaits: the permit stays in the Notify.
        t.rearm();
        q.released(&r);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let started = std::time::Instant::now();
        rt.block_on(t.woken());
        assert!(started.elapsed() < RECHECK, "the stored wakeup was lost");
        // Woken from another thread while waiting.
        t.rearm();
        let (q2, r2) = (q.clone(), r.clone());
        let waker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            q2.released(&r2);
        });
        rt.block_on(async {
            loop {
                t.woken().await;
                if t.is_woken() {
                    break;
                }
            }
        });
        waker.join().unwrap();
    }

    #[test]
    fn replica_set_change_wakes_everyone() {
        let q = queue(4);
        let a = q.enter(None, Some("x")).unwrap();
        let b = q.enter(None, None).unwrap();
        q.replicas_changed();
        assert!(a.is_woken() && b.is_woken());
    }
}
