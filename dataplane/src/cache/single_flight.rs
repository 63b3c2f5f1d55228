//! Concurrent identical requests: the first goes upstream, the rest wait for it.

use std::collections::HashMap;

use parking_lot::Mutex;
use tokio::sync::watch;

#[derive(Default)]
pub struct SingleFlight {
    // A watch channel, not a Notify: a waiter that subscribes just after the leader
    // finished still sees the sender gone, so no wake-up can be missed.
    inflight: Mutex<HashMap<u128, watch::Receiver<()>>>,
}

pub enum Role<'a> {
    /// Go upstream; waiters are released when this drops (after the store).
    Leader(Flight<'a>),
    Wait(watch::Receiver<()>),
}

pub struct Flight<'a> {
    owner: &'a SingleFlight,
    key: u128,
    _tx: watch::Sender<()>,
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        self.owner.inflight.lock().remove(&self.key);
    }
}

impl SingleFlight {
    pub fn join(&self, key: u128) -> Role<'_> {
        let mut map = self.inflight.lock();
        if let Some(rx) = map.get(&key) {
            return Role::Wait(rx.clone());
        }
        let (tx, rx) = watch::channel(());
        map.insert(key, rx);
        Role::Leader(Flight {
            owner: self,
            key,
            _tx: tx,
        })
    }

    pub fn len(&self) -> usize {
        self.inflight.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Waits until the leader is done (or `limit` passes); true if it finished.
pub async fn wait(mut rx: watch::Receiver<()>, limit: std::time::Duration) -> bool {
    // The leader never sends: `changed` ends with an error when it drops.
    matches!(tokio::time::timeout(limit, rx.changed()).await, Ok(Err(_)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn followers_wake_when_the_leader_drops() {
        let sf = SingleFlight::default();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let leader = match sf.join(1) {
            Role::Leader(f) => f,
            Role::Wait(_) => panic!("first is the leader"),
        };
        let Role::Wait(rx) = sf.join(1) else {
            panic!("second waits")
        };
        assert!(matches!(sf.join(2), Role::Leader(_)));
        assert!(!rt.block_on(wait(rx.clone(), Duration::from_millis(10))));
        drop(leader);
        assert!(rt.block_on(wait(rx, Duration::from_secs(5))));
        assert!(sf.is_empty());
    }
}
