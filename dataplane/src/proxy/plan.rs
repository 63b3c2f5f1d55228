//! Attempt planning, sans I/O: which replica a request goes to next, when it
//! waits for room in the admission queue (every replica of its model at its
//! `max_in_flight`, or none up during a rolling restart), when a failed
//! attempt goes again and when the request gives up, with which error.
//!
//! [`Plan`] never reads a clock, sleeps or touches a socket: the caller
//! passes `now` in, asks [`Plan::next`] for an [`Action`], carries it out
//! (a connection, a queue place, a wait) and reports back
//! ([`Plan::entered`], [`Plan::refused`], [`Plan::began`], [`Plan::failed`]).
//! What it needs to know of the replica set and the queue it asks a [`Fleet`],
//! which the proxy answers from the live set and the tests from a fake one.

use std::time::{Duration, Instant};

use super::error::{Error, Retry};
use crate::admission::Refusal;
use crate::http::ErrorKind;

/// The replica set as it stands, seen from one request (its model).
pub(crate) trait Fleet {
    /// A routing decision: the replica to try and why.
    type Candidate;
    /// Requests for the model already wait in the admission queue.
    fn waiters_ahead(&self) -> bool;
    /// Some replica serves the model, up or not.
    fn any_serves(&self) -> bool;
    /// The router's choice among the replicas not in `exclude` that have room.
    fn pick(&self, exclude: &[u16]) -> Option<Self::Candidate>;
    /// A replica not in `exclude` serves the model, takes traffic, and is only
    /// at its `max_in_flight` bound.
    fn untried_but_full(&self, exclude: &[u16]) -> bool;
    /// No replica of the model is up (a rolling restart, a health flap).
    fn none_up(&self) -> bool;
    /// The model the request names, if replicas exist and none serves it.
    fn unknown_model(&self) -> Option<&str>;
    /// The admission queue is on.
    fn queueing(&self) -> bool;
}

/// What the caller does next.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Action<C> {
    /// Send the request to this candidate; `fresh_only`: not on a pooled connection.
    Try { candidate: C, fresh_only: bool },
    /// Take a place in the admission queue and report [`Plan::entered`] or
    /// [`Plan::refused`]. `behind`: others wait for the model, so after
    /// entering the request waits its turn rather than looking again first.
    Enter { behind: bool },
    /// Wait in the queue for a wakeup or until `until`, then ask again.
    Wait { until: Instant },
    /// Answer the client with this.
    GiveUp(Error),
}

/// What follows a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The same candidate again on a fresh connection, without spending a retry.
    Fresh,
    /// Another replica: the failed one is excluded and a retry spent.
    Retry,
    /// No more attempts: answer with the attempt's error.
    GiveUp,
}

/// One request's attempt planning.
#[derive(Debug)]
pub(crate) struct Plan<C> {
    /// Replicas that failed this request.
    exclude: Vec<u16>,
    /// Attempts left: `1 + [upstream] retries` to begin with.
    attempts_left: u32,
    /// The next attempt takes a new connection.
    fresh_only: bool,
    /// A candidate to try again on a fresh connection.
    again: Option<C>,
    /// How long a request may stay in the admission queue.
    queue_timeout: Duration,
    /// In the admission queue, until this deadline.
    queued: Option<Instant>,
    /// An [`Action::Enter`] is out, with its `behind`.
    entering: Option<bool>,
    /// Entered behind others: wait before looking for a replica.
    wait_first: bool,
}

impl<C> Plan<C> {
    pub fn new(retries: u32, queue_timeout: Duration) -> Self {
        Plan {
            exclude: Vec::new(),
            attempts_left: 1 + retries,
            fresh_only: false,
            again: None,
            queue_timeout,
            queued: None,
            entering: None,
            wait_first: false,
        }
    }

    /// The next step at `now`.
    pub fn next(&mut self, now: Instant, fleet: &impl Fleet<Candidate = C>) -> Action<C> {
        if let Some(candidate) = self.again.take() {
            return self.try_(candidate);
        }
        if std::mem::take(&mut self.wait_first) {
            return self.hold(now, fleet, true);
        }
        // FIFO: a newcomer does not overtake requests already waiting for its
        // model; it queues behind them.
        if self.queued.is_none()
            && self.exclude.is_empty()
            && fleet.waiters_ahead()
            && fleet.any_serves()
        {
            return self.hold(now, fleet, true);
        }
        if let Some(candidate) = fleet.pick(&self.exclude) {
            return self.try_(candidate);
        }
        // Replicas of this model exist but none has room (all at their
        // `max_in_flight`) or none is available (a rolling restart, a health
        // flap): wait in the bounded admission queue.
        if self.exclude.is_empty() && fleet.any_serves() {
            return self.hold(now, fleet, false);
        }
        // A retry whose remaining replicas are up but all at their bound waits
        // for room like a first attempt would, rather than turning another
        // replica's failure into a 502.
        if !self.exclude.is_empty() && fleet.untried_but_full(&self.exclude) {
            return self.hold(now, fleet, false);
        }
        if self.exclude.is_empty() {
            return Action::GiveUp(match fleet.unknown_model() {
                Some(model) => Error::refused(
                    ErrorKind::ModelNotFound,
                    format!("model {model:?} is not served here"),
                    None,
                ),
                None => Error::refused(ErrorKind::NoReplica, "no healthy replica available", None),
            });
        }
        Action::GiveUp(Error::refused(
            ErrorKind::BadGateway,
            "upstream replica failed before responding",
            None,
        ))
    }

    fn try_(&self, candidate: C) -> Action<C> {
        Action::Try {
            candidate,
            fresh_only: self.fresh_only,
        }
    }

    /// Waits for room: enters the queue first, and gives up once its time there is up.
    fn hold(&mut self, now: Instant, fleet: &impl Fleet, behind: bool) -> Action<C> {
        let Some(until) = self.queued else {
            self.entering = Some(behind);
            return Action::Enter { behind };
        };
        if now < until {
            return Action::Wait { until };
        }
        // No replica of the model up, rather than all of them busy: answered
        // as without a queue, 503 no_healthy_replica.
        let (kind, message) = if fleet.none_up() {
            (ErrorKind::NoReplica, "no healthy replica available")
        } else {
            (
                ErrorKind::Overloaded,
                "every replica stayed at capacity for queue_timeout_ms; retry later",
            )
        };
        Action::GiveUp(Error::refused(kind, message, Some("queue_timeout")))
    }

    /// The queue took the request at `now`; it may stay `queue_timeout`.
    pub fn entered(&mut self, now: Instant) {
        let behind = self.entering.take().unwrap_or(false);
        self.queued = Some(now + self.queue_timeout);
        // A slot freed between the look and taking the place woke nobody:
        // look once more before waiting. A request that queued behind others
        // of its model without looking waits its turn.
        self.wait_first = behind;
    }

    /// The queue refused the request: what the client is told.
    pub fn refused(&mut self, why: Refusal, fleet: &impl Fleet) -> Error {
        self.entering = None;
        let none_up = || fleet.none_up();
        match why {
            // Queueing off: a missing replica is refused as it always was.
            _ if !fleet.queueing() && none_up() => {
                Error::refused(ErrorKind::NoReplica, "no healthy replica available", None)
            }
            Refusal::QueueFull if none_up() => Error::refused(
                ErrorKind::NoReplica,
                "no healthy replica available, and the queue is full",
                Some(why.reason()),
            ),
            Refusal::QueueFull => Error::refused(
                ErrorKind::Overloaded,
                "every replica is at capacity and the queue is full; retry later",
                Some(why.reason()),
            ),
            Refusal::QueueShare => Error::refused(
                ErrorKind::QueueShareExceeded,
                "this API key holds its share of the request queue; retry later",
                Some(why.reason()),
            ),
        }
    }

    /// The candidate of the last [`Action::Try`] had room: the request leaves
    /// the queue, if it was in it.
    pub fn began(&mut self) {
        self.queued = None;
    }

    /// Whether the request holds a place in the admission queue.
    pub fn is_queued(&self) -> bool {
        self.queued.is_some()
    }

    /// The attempt at `candidate` (replica `slot`) failed with `error` before
    /// any response byte; `reused`: on a pooled connection.
    pub fn failed(&mut self, candidate: C, slot: u16, error: &Error, reused: bool) -> Verdict {
        match error.retry() {
            // A pooled connection the replica had already closed: not the
            // replica's fault, so it goes again on a fresh one, free.
            Retry::FreshIfReused if reused && !self.fresh_only => {
                self.fresh_only = true;
                self.again = Some(candidate);
                Verdict::Fresh
            }
            Retry::Never => Verdict::GiveUp,
            Retry::FreshIfReused | Retry::Elsewhere => {
                self.exclude.push(slot);
                self.fresh_only = false;
                self.attempts_left -= 1;
                if self.attempts_left == 0 {
                    Verdict::GiveUp
                } else {
                    Verdict::Retry
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;
    use crate::proxy::error::Cause;

    /// One replica of the request's model, as the fake fleet sees it.
    #[derive(Debug, Clone, Copy)]
    struct Fake {
        slot: u16,
        serves: bool,
        up: bool,
        full: bool,
    }

    fn replica(slot: u16) -> Fake {
        Fake {
            slot,
            serves: true,
            up: true,
            full: false,
        }
    }

    struct FakeFleet {
        replicas: Vec<Fake>,
        waiters: bool,
        queueing: bool,
        model: Option<&'static str>,
        picks: Cell<usize>,
    }

    impl FakeFleet {
        fn new(replicas: Vec<Fake>) -> Self {
            FakeFleet {
                replicas,
                waiters: false,
                queueing: true,
                model: Some("m"),
                picks: Cell::new(0),
            }
        }
        fn get(&mut self, slot: u16) -> &mut Fake {
            self.replicas.iter_mut().find(|r| r.slot == slot).unwrap()
        }
    }

    impl Fleet for FakeFleet {
        type Candidate = u16;
        fn waiters_ahead(&self) -> bool {
            self.waiters
        }
        fn any_serves(&self) -> bool {
            self.replicas.iter().any(|r| r.serves)
        }
        fn pick(&self, exclude: &[u16]) -> Option<u16> {
            self.picks.set(self.picks.get() + 1);
            self.replicas
                .iter()
                .find(|r| r.serves && r.up && !r.full && !exclude.contains(&r.slot))
                .map(|r| r.slot)
        }
        fn untried_but_full(&self, exclude: &[u16]) -> bool {
            self.replicas
                .iter()
                .any(|r| !exclude.contains(&r.slot) && r.serves && r.up && r.full)
        }
        fn none_up(&self) -> bool {
            !self.replicas.iter().any(|r| r.serves && r.up)
        }
        fn unknown_model(&self) -> Option<&str> {
            (!self.replicas.is_empty() && !self.any_serves())
                .then_some(self.model)
                .flatten()
        }
        fn queueing(&self) -> bool {
            self.queueing
        }
    }

    const QUEUE: Duration = Duration::from_secs(2);

    fn try_of(a: Action<u16>) -> (u16, bool) {
        match a {
            Action::Try {
                candidate,
                fresh_only,
            } => (candidate, fresh_only),
            other => panic!("expected a try, got {other:?}"),
        }
    }

    fn give_up(a: Action<u16>) -> Error {
        match a {
            Action::GiveUp(e) => e,
            other => panic!("expected to give up, got {other:?}"),
        }
    }

    #[test]
    fn the_first_pick_is_tried_and_succeeds() {
        let t0 = Instant::now();
        let fleet = FakeFleet::new(vec![replica(1), replica(2)]);
        let mut plan = Plan::new(2, QUEUE);
        assert_eq!(try_of(plan.next(t0, &fleet)), (1, false));
        plan.began();
        assert!(!plan.is_queued());
        assert_eq!(fleet.picks.get(), 1);
    }

    #[test]
    fn a_connect_failure_excludes_the_replica_and_retries_another() {
        let t0 = Instant::now();
        let fleet = FakeFleet::new(vec![replica(1), replica(2)]);
        let mut plan = Plan::new(1, QUEUE);
        let (c, _) = try_of(plan.next(t0, &fleet));
        plan.began();
        let e = Error::upstream_io("connect refused");
        assert_eq!(plan.failed(c, 1, &e, false), Verdict::Retry);
        assert_eq!(try_of(plan.next(t0, &fleet)), (2, false));
    }

    #[test]
    fn a_stale_pooled_connection_goes_again_fresh_without_spending_a_retry() {
        let t0 = Instant::now();
        let fleet = FakeFleet::new(vec![replica(1), replica(2)]);
        // No retries at all: the free one still happens.
        let mut plan = Plan::new(0, QUEUE);
        let (c, fresh) = try_of(plan.next(t0, &fleet));
        assert!(!fresh);
        let e = Error::upstream_io("connection closed before response");
        assert_eq!(plan.failed(c, 1, &e, true), Verdict::Fresh);
        // The same candidate, without asking the router again.
        assert_eq!(try_of(plan.next(t0, &fleet)), (1, true));
        assert_eq!(fleet.picks.get(), 1);
        // A second failure, fresh this time, is the replica's: no retry left.
        assert_eq!(plan.failed(1, 1, &e, false), Verdict::GiveUp);
    }

    #[test]
    fn an_exhausted_retry_budget_gives_up_with_the_last_error() {
        let t0 = Instant::now();
        let fleet = FakeFleet::new(vec![replica(1), replica(2), replica(3)]);
        let mut plan = Plan::new(1, QUEUE);
        let (a, _) = try_of(plan.next(t0, &fleet));
        let e = Error::upstream_io("connect refused");
        assert_eq!(plan.failed(a, a, &e, false), Verdict::Retry);
        let (b, _) = try_of(plan.next(t0, &fleet));
        assert_ne!(a, b);
        let e = Error::bad_response("malformed status line");
        assert_eq!(plan.failed(b, b, &e, false), Verdict::GiveUp);
        // The caller answers with the attempt's own error: a 502.
        assert_eq!(e.kind.status(), 502);
    }

    #[test]
    fn every_replica_failing_gives_up_with_a_502() {
        let t0 = Instant::now();
        let fleet = FakeFleet::new(vec![replica(1), replica(2)]);
        let mut plan = Plan::new(5, QUEUE);
        for slot in [1, 2] {
            let (c, _) = try_of(plan.next(t0, &fleet));
            assert_eq!(c, slot);
            let e = Error::upstream_io("connect refused");
            assert_eq!(plan.failed(c, c, &e, false), Verdict::Retry);
        }
        let e = give_up(plan.next(t0, &fleet));
        assert_eq!(e.kind, ErrorKind::BadGateway);
        assert_eq!(e.message, "upstream replica failed before responding");
    }

    #[test]
    fn nothing_is_retried_once_the_replica_may_have_worked_or_answered() {
        let t0 = Instant::now();
        let fleet = FakeFleet::new(vec![replica(1), replica(2)]);
        let mut plan = Plan::new(3, QUEUE);
        let (c, _) = try_of(plan.next(t0, &fleet));
        // No response head in time: the replica may be prefilling it.
        let e = Error::first_byte_timeout();
        assert_eq!(plan.failed(c, c, &e, true), Verdict::GiveUp);
        assert_eq!(e.kind.status(), 504);
        // The body broke after its head arrived: the response is the client's.
        let mut plan = Plan::new(3, QUEUE);
        let (c, _) = try_of(plan.next(t0, &fleet));
        assert_eq!(plan.failed(c, c, &Error::framing(), false), Verdict::GiveUp);
    }

    #[test]
    fn every_replica_full_holds_in_the_queue_until_the_deadline_then_gives_up() {
        let t0 = Instant::now();
        let mut fleet = FakeFleet::new(vec![replica(1), replica(2)]);
        fleet.get(1).full = true;
        fleet.get(2).full = true;
        let mut plan = Plan::new(1, QUEUE);
        assert_eq!(plan.next(t0, &fleet), Action::Enter { behind: false });
        plan.entered(t0);
        assert!(plan.is_queued());
        // Entered without others ahead: one more look before waiting.
        let until = t0 + QUEUE;
        assert_eq!(plan.next(t0, &fleet), Action::Wait { until });
        // Woken (or rechecking) before the deadline: still full, wait on.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(plan.next(t1, &fleet), Action::Wait { until });
        let e = give_up(plan.next(until, &fleet));
        assert_eq!(e.kind, ErrorKind::Overloaded);
        assert_eq!(e.kind.status(), 503);
        assert_eq!(e.cause, Cause::Refused(Some("queue_timeout")));
        assert_eq!(
            e.message,
            "every replica stayed at capacity for queue_timeout_ms; retry later"
        );
    }

    #[test]
    fn a_rolling_restart_holds_and_gives_up_with_no_healthy_replica() {
        let t0 = Instant::now();
        let mut fleet = FakeFleet::new(vec![replica(1), replica(2)]);
        fleet.get(1).up = false;
        fleet.get(2).up = false;
        let mut plan = Plan::new(1, QUEUE);
        assert_eq!(plan.next(t0, &fleet), Action::Enter { behind: false });
        plan.entered(t0);
        let until = t0 + QUEUE;
        assert_eq!(plan.next(t0, &fleet), Action::Wait { until });
        let e = give_up(plan.next(until + Duration::from_millis(1), &fleet));
        assert_eq!(e.kind, ErrorKind::NoReplica);
        assert_eq!(e.kind.status(), 503);
        assert_eq!(e.message, "no healthy replica available");
    }

    #[test]
    fn a_replica_that_comes_back_while_holding_is_tried() {
        let t0 = Instant::now();
        let mut fleet = FakeFleet::new(vec![replica(1), replica(2)]);
        fleet.get(1).up = false;
        fleet.get(2).up = false;
        let mut plan = Plan::new(1, QUEUE);
        assert_eq!(plan.next(t0, &fleet), Action::Enter { behind: false });
        plan.entered(t0);
        assert_eq!(plan.next(t0, &fleet), Action::Wait { until: t0 + QUEUE });
        // Replica 2 finished restarting; the wakeup comes before the deadline.
        fleet.get(2).up = true;
        let t1 = t0 + Duration::from_millis(1500);
        assert_eq!(try_of(plan.next(t1, &fleet)), (2, false));
        plan.began();
        assert!(!plan.is_queued());
    }

    #[test]
    fn a_newcomer_queues_behind_waiters_and_waits_before_looking() {
        let t0 = Instant::now();
        let mut fleet = FakeFleet::new(vec![replica(1)]);
        fleet.waiters = true;
        let mut plan = Plan::new(1, QUEUE);
        assert_eq!(plan.next(t0, &fleet), Action::Enter { behind: true });
        plan.entered(t0);
        assert_eq!(plan.next(t0, &fleet), Action::Wait { until: t0 + QUEUE });
        assert_eq!(fleet.picks.get(), 0);
        // Its turn: a look, even with others still waiting (it is queued).
        assert_eq!(
            try_of(plan.next(t0 + Duration::from_millis(10), &fleet)),
            (1, false)
        );
    }

    #[test]
    fn a_retry_whose_other_replicas_are_full_waits_for_room() {
        let t0 = Instant::now();
        let mut fleet = FakeFleet::new(vec![replica(1), replica(2)]);
        fleet.get(2).full = true;
        let mut plan = Plan::new(1, QUEUE);
        let (c, _) = try_of(plan.next(t0, &fleet));
        plan.began();
        let e = Error::upstream_io("connect refused");
        assert_eq!(plan.failed(c, c, &e, false), Verdict::Retry);
        assert_eq!(plan.next(t0, &fleet), Action::Enter { behind: false });
        plan.entered(t0);
        fleet.get(2).full = false;
        assert_eq!(try_of(plan.next(t0, &fleet)), (2, false));
    }

    #[test]
    fn a_slot_lost_to_another_worker_after_the_pick_means_looking_again() {
        let t0 = Instant::now();
        let mut fleet = FakeFleet::new(vec![replica(1), replica(2)]);
        fleet.get(1).full = true;
        fleet.get(2).full = true;
        let mut plan = Plan::new(1, QUEUE);
        assert_eq!(plan.next(t0, &fleet), Action::Enter { behind: false });
        plan.entered(t0);
        fleet.get(1).full = false;
        // Picked while queued; another worker takes the slot before it is
        // claimed (no `began`): the request keeps its place and looks again.
        assert_eq!(try_of(plan.next(t0, &fleet)), (1, false));
        fleet.get(1).full = true;
        fleet.get(2).full = true;
        assert!(plan.is_queued());
        assert_eq!(plan.next(t0, &fleet), Action::Wait { until: t0 + QUEUE });
    }

    #[test]
    fn queue_refusals_keep_their_statuses() {
        let mut fleet = FakeFleet::new(vec![replica(1)]);
        fleet.get(1).full = true;
        let mut plan: Plan<u16> = Plan::new(1, QUEUE);
        let e = plan.refused(Refusal::QueueFull, &fleet);
        assert_eq!((e.kind, e.kind.status()), (ErrorKind::Overloaded, 503));
        assert_eq!(e.cause, Cause::Refused(Some("queue_full")));
        let e = plan.refused(Refusal::QueueShare, &fleet);
        assert_eq!(e.kind, ErrorKind::QueueShareExceeded);
        assert_eq!(e.cause, Cause::Refused(Some("queue_share")));
        fleet.get(1).up = false;
        let e = plan.refused(Refusal::QueueFull, &fleet);
        assert_eq!(e.kind, ErrorKind::NoReplica);
        assert_eq!(
            e.message,
            "no healthy replica available, and the queue is full"
        );
        // Queueing off: no replica up is the plain 503, not counted as overload.
        fleet.queueing = false;
        let e = plan.refused(Refusal::QueueFull, &fleet);
        assert_eq!(e.kind, ErrorKind::NoReplica);
        assert_eq!(e.cause, Cause::Refused(None));
    }

    #[test]
    fn no_replica_of_the_model_gives_up_at_once() {
        let t0 = Instant::now();
        let mut fleet = FakeFleet::new(vec![replica(1)]);
        fleet.get(1).serves = false;
        let mut plan = Plan::new(1, QUEUE);
        let e = give_up(plan.next(t0, &fleet));
        assert_eq!(e.kind, ErrorKind::ModelNotFound);
        assert_eq!(e.message, "model \"m\" is not served here");
        let fleet = FakeFleet::new(vec![]);
        let mut plan = Plan::new(1, QUEUE);
        let e = give_up(plan.next(t0, &fleet));
        assert_eq!(e.kind, ErrorKind::NoReplica);
    }
}
