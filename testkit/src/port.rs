//! Loopback ports for a process under test to listen on.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::Mutex;

/// How many probes [`free_port`] makes before it gives up.
const TRIES: usize = 64;

/// The ports handed out so far in this process.
static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());

/// A port that was free a moment ago on 127.0.0.1, never one handed out before in
/// this process.
///
/// The kernel may hand the port it just gave back out again once the probe closes,
/// so two calls in a row (a listen and an admin port) could return the same one: a
/// process that then binds both fails. Ports handed out before in this process are
/// skipped.
///
/// # Panics
///
/// If 127.0.0.1:0 cannot be bound, or no new port turns up in 64 probes.
pub fn free_port() -> u16 {
    free_port_from(|| {
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("bind 127.0.0.1:0")
    })
}

/// 127.0.0.1 and a [`free_port`].
pub fn free_addr() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()))
}

/// [`free_port`] with the kernel's probe replaced by `probe`.
fn free_port_from(mut probe: impl FnMut() -> u16) -> u16 {
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    for _ in 0..TRIES {
        let port = probe();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
    panic!("no port not handed out before in {TRIES} tries");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ports_never_repeat_in_one_process() {
        let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
        let distinct: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "a port was handed out twice");
        assert!(ports.iter().all(|&p| p != 0));
    }

    #[test]
    fn a_port_the_kernel_gives_again_is_skipped() {
        // A kernel that keeps offering one port, then a second: the second call must not
        // get the first port again. (Ports below 1024 are never ephemeral, so the kernel
        // cannot hand them to the other tests running alongside.)
        let mut offers = [101u16, 101, 101, 102].into_iter();
        let first = free_port_from(|| 101);
        let second = free_port_from(|| offers.next().unwrap_or(103));
        assert_eq!((first, second), (101, 102));
    }

    #[test]
    #[should_panic(expected = "no port not handed out before")]
    fn a_kernel_that_only_offers_used_ports_is_an_error() {
        let used = free_port();
        free_port_from(|| used);
    }

    #[test]
    fn a_free_addr_can_be_bound() {
        let addr = free_addr();
        assert!(addr.ip().is_loopback());
        TcpListener::bind(addr).expect("the port is free");
    }
}
