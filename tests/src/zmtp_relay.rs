//! A TCP relay between a ZeroMQ publisher and one subscriber that can drop
//! whole messages on the way, as a PUB socket does past its high-water mark or
//! while its subscriber reconnects: the subscriber then sees a sequence gap.
//!
//! Both ends connect to the relay (a vLLM publisher given `tcp://host:port`
//! connects rather than binds), each on its own loopback port, and each pair of
//! connections is relayed until either side closes. From the publisher to the
//! subscriber the ZMTP 3 stream is read frame by frame: the 64-byte greeting and
//! command frames (the handshake) pass as they are, and a message (frames up to
//! one without the MORE flag) is either passed whole or dropped whole. From the
//! subscriber to the publisher (subscriptions) bytes are copied unread.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const GREETING: usize = 64;
const MORE: u8 = 0x01;
const LONG: u8 = 0x02;
const COMMAND: u8 = 0x04;

#[derive(Default)]
struct Counters {
    drop_next: AtomicU64,
    dropped: AtomicU64,
    forwarded: AtomicU64,
}

impl Counters {
    /// Whether the message starting now is one of those to drop.
    fn take_drop(&self) -> bool {
        self.drop_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

pub struct ZmtpRelay {
    /// The port the publisher connects to.
    pub publisher_port: u16,
    /// The port the subscriber connects to.
    pub subscriber_port: u16,
    counters: Arc<Counters>,
}

impl ZmtpRelay {
    /// Listens on two free loopback ports and relays in a background thread.
    pub fn start() -> io::Result<ZmtpRelay> {
        let publishers = TcpListener::bind("127.0.0.1:0")?;
        let subscribers = TcpListener::bind("127.0.0.1:0")?;
        let relay = ZmtpRelay {
            publisher_port: publishers.local_addr()?.port(),
            subscriber_port: subscribers.local_addr()?.port(),
            counters: Arc::default(),
        };
        let counters = relay.counters.clone();
        std::thread::spawn(move || loop {
            // A publisher's bytes wait in its socket until its subscriber is there.
            let (Ok((publisher, _)), Ok((subscriber, _))) =
                (publishers.accept(), subscribers.accept())
            else {
                return;
            };
            let counters = counters.clone();
            std::thread::spawn(move || relay_pair(publisher, subscriber, &counters));
        });
        Ok(relay)
    }

    /// Drops the next `n` messages from the publisher.
    pub fn drop_next(&self, n: u64) {
        self.counters.drop_next.fetch_add(n, Ordering::SeqCst);
    }

    /// Messages dropped so far.
    pub fn dropped(&self) -> u64 {
        self.counters.dropped.load(Ordering::SeqCst)
    }

    /// Messages passed to the subscriber so far.
    pub fn forwarded(&self) -> u64 {
        self.counters.forwarded.load(Ordering::SeqCst)
    }
}

fn relay_pair(publisher: TcpStream, subscriber: TcpStream, counters: &Counters) {
    let (Ok(mut sub_read), Ok(mut pub_write)) = (subscriber.try_clone(), publisher.try_clone())
    else {
        return;
    };
    let upstream = std::thread::spawn(move || {
        let _ = io::copy(&mut sub_read, &mut pub_write);
        let _ = pub_write.shutdown(Shutdown::Both);
    });
    let _ = relay_messages(&publisher, &subscriber, counters);
    let _ = subscriber.shutdown(Shutdown::Both);
    let _ = publisher.shutdown(Shutdown::Both);
    let _ = upstream.join();
}

fn relay_messages(mut from: &TcpStream, mut to: &TcpStream, counters: &Counters) -> io::Result<()> {
    // The greeting goes over in parts (a peer sends its signature, then waits
    // for the other's before the rest), so it is passed on as it comes.
    let mut greeting = [0u8; GREETING];
    let mut passed = 0;
    while passed < GREETING {
        let n = from.read(&mut greeting[passed..])?;
        if n == 0 {
            return Ok(());
        }
        to.write_all(&greeting[passed..passed + n])?;
        passed += n;
    }
    let mut dropping: Option<bool> = None;
    loop {
        let mut flags = [0u8; 1];
        from.read_exact(&mut flags)?;
        let mut head = vec![flags[0]];
        let size = if flags[0] & LONG != 0 {
            let mut s = [0u8; 8];
            from.read_exact(&mut s)?;
            head.extend_from_slice(&s);
            u64::from_be_bytes(s)
        } else {
            let mut s = [0u8; 1];
            from.read_exact(&mut s)?;
            head.push(s[0]);
            u64::from(s[0])
        };
        let mut body = vec![0u8; size as usize];
        from.read_exact(&mut body)?;
        if flags[0] & COMMAND != 0 {
            to.write_all(&head)?;
            to.write_all(&body)?;
            continue;
        }
        let drop = *dropping.get_or_insert_with(|| counters.take_drop());
        if !drop {
            to.write_all(&head)?;
            to.write_all(&body)?;
        }
        if flags[0] & MORE == 0 {
            dropping = None;
            let count = if drop {
                &counters.dropped
            } else {
                &counters.forwarded
            };
            count.fetch_add(1, Ordering::SeqCst);
        }
    }
}
