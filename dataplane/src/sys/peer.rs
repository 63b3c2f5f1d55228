//! Whether the other end of a connection has gone, without reading from it.

use std::os::fd::RawFd;

/// True when `fd`'s peer closed or reset the connection and no byte is left
/// to read: a one-byte `MSG_PEEK | MSG_DONTWAIT` receive returns 0 or fails
/// with anything but "would block". Pending bytes (a pipelined request) keep
/// the answer false and stay in the socket, so a waiting request can watch its
/// client without taking a read that io_uring could not cancel cleanly.
pub fn peer_closed(fd: RawFd) -> bool {
    let mut byte = [0u8; 1];
    // SAFETY: `byte` is a live, writable buffer of the length passed; recv
    // with MSG_PEEK | MSG_DONTWAIT neither blocks nor consumes data, and on a
    // descriptor that is not a connected socket it only returns an error.
    let n = unsafe {
        libc::recv(
            fd,
            byte.as_mut_ptr().cast(),
            byte.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => true,
        n if n > 0 => false,
        _ => !matches!(
            std::io::Error::last_os_error().kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    #[test]
    fn tells_a_closed_peer_from_a_quiet_or_talking_one() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        assert!(
            !super::peer_closed(server.as_raw_fd()),
            "quiet is not closed"
        );
        client.write_all(b"x").unwrap();
        // Pending bytes: not closed, and still there to read.
        let pending = (0..200).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(5));
            server.peek(&mut [0u8; 1]).is_ok_and(|n| n == 1)
        });
        assert!(pending);
        assert!(!super::peer_closed(server.as_raw_fd()));
        drop(client);
        assert!(
            !super::peer_closed(server.as_raw_fd()),
            "the byte is unread"
        );
        let mut buf = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut &server, &mut buf).unwrap(), 1);
        let closed = (0..200).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(5));
            super::peer_closed(server.as_raw_fd())
        });
        assert!(closed, "FIN not seen");
    }
}
