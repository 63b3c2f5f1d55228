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
