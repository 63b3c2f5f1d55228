//! The answer of a connection over the cap: a 503 in OpenAI's error shape with
//! `Retry-After`, written once, then the connection closes. Best effort and
//! bounded: it runs as a short task of its own so accepting goes on, and past
//! `max_in_flight` such tasks a refused connection is closed without a word.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use crate::http::{ErrorKind, ErrorResponse};
use crate::io::Conn;

/// Time for the answer to go out and for the client's request bytes to be read
/// and dropped, so closing does not reset the connection before it reads the
/// answer.
const LINGER: Duration = Duration::from_millis(250);
/// What the client may have sent that is read and dropped while lingering.
const DRAIN_BYTES: usize = 64 * 1024;
pub const MESSAGE: &str = "kvroute is at its connection limit; retry shortly";

/// Refuses `conn`: `plain` when the listener speaks plain HTTP (a TLS client
/// could not read a plain answer: it only sees the close). `in_flight`
/// counts this worker's refusals still writing, at most `max_in_flight`.
pub fn refuse<C: Conn>(
    mut conn: C,
    plain: bool,
    in_flight: &Rc<Cell<usize>>,
    max_in_flight: usize,
) {
    if !plain || in_flight.get() >= max_in_flight {
        conn.abort();
        return;
    }
    in_flight.set(in_flight.get() + 1);
    let in_flight = in_flight.clone();
    tokio::task::spawn_local(async move {
        let mut out = Vec::with_capacity(320);
        ErrorResponse::write_with(
            &mut out,
            ErrorKind::TooManyConnections,
            MESSAGE,
            true,
            "retry-after: 1\r\n",
        );
        let n = out.len();
        let _ = tokio::time::timeout(LINGER, async {
            let (r, _) = conn.write_all(out, 0..n).await;
            if r.is_ok() {
                conn.shutdown_write();
                let mut sink = Vec::new();
                let mut read = 0;
                while read < DRAIN_BYTES {
                    sink.clear();
                    match conn.read(&mut sink, 4096).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => read += n,
                    }
                }
            }
        })
        .await;
        conn.abort();
        in_flight.set(in_flight.get() - 1);
    });
}
