//! Per-worker upstream connection pools: keep-alive connections to each replica,
//! owned by one worker thread so checkout and return take no lock.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

pub struct UpstreamPool<C> {
    idle: HashMap<SocketAddr, VecDeque<(C, Instant)>>,
    max_idle: usize,
    idle_timeout: Duration,
}

impl<C> UpstreamPool<C> {
    pub fn new(max_idle: usize, idle_timeout: Duration) -> Self {
        UpstreamPool {
            idle: HashMap::new(),
            max_idle,
            idle_timeout,
        }
    }

    /// The most recently returned live connection, dropping expired ones.
    /// Most recent first: it is the least likely to have been closed by the replica.
    pub fn take(&mut self, addr: SocketAddr, now: Instant) -> Option<C> {
        let list = self.idle.get_mut(&addr)?;
        while let Some((c, since)) = list.pop_back() {
            if now.duration_since(since) < self.idle_timeout {
                return Some(c);
            }
        }
        None
    }

    pub fn put(&mut self, addr: SocketAddr, conn: C, now: Instant) {
        if self.max_idle == 0 {
            return;
        }
        let list = self.idle.entry(addr).or_default();
        if list.len() >= self.max_idle {
            // Oldest out: it is the closest to the replica's own idle timeout.
            list.pop_front();
        }
        list.push_back((conn, now));
    }

    /// Drops connections to replicas no longer in the set, and expired ones.
    pub fn prune(&mut self, keep: impl Fn(&SocketAddr) -> bool, now: Instant) {
        let timeout = self.idle_timeout;
        self.idle.retain(|a, list| {
            list.retain(|(_, since)| now.duration_since(*since) < timeout);
            keep(a) && !list.is_empty()
        });
    }

    pub fn idle_count(&self) -> usize {
        self.idle.values().map(VecDeque::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifo_bounded_and_expiring() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let t0 = Instant::now();
        let mut p = UpstreamPool::new(2, Duration::from_secs(4));
        p.put(a, 1, t0);
        p.put(a, 2, t0);
        p.put(a, 3, t0);
        assert_eq!(p.idle_count(), 2);
        assert_eq!(p.take(a, t0), Some(3));
        assert_eq!(p.take(a, t0 + Duration::from_secs(5)), None);
        assert_eq!(p.idle_count(), 0);
        p.put(a, 4, t0);
        p.prune(|_| false, t0);
        assert_eq!(p.idle_count(), 0);
    }
}
