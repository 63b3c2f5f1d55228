//! The one error type of the request path: what the client is told (an
//! [`ErrorKind`], so its status and OpenAI-shaped body, and a message), what
//! caused it, and from that whether it may be retried.

use std::borrow::Cow;

use crate::http::{ErrorKind, HeadError};

/// Whose side a failure is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// The client: its request, or its connection.
    Client,
    /// The replica an attempt went to.
    Upstream,
    /// kvroute itself: no replica to send to, or the admission queue said no.
    Proxy,
}

/// Whether an attempt that failed with it may go again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retry {
    /// No: not the replica's doing, or the replica may be working on it
    /// (retrying would double the GPU work).
    Never,
    /// On another replica, spending one of `[upstream] retries`.
    Elsewhere,
    /// On a pooled connection, the same replica again on a new connection at
    /// no cost (the replica had closed the pooled one); otherwise [`Retry::Elsewhere`].
    FreshIfReused,
}

/// What went wrong, in the proxy's words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Cause {
    /// The client's request could not be read or was refused.
    Client,
    /// Connecting, writing the request, or reading the response head failed
    /// with nothing back: nothing was processed as far as we can tell.
    UpstreamIo(Cow<'static, str>),
    /// Bytes came back but they were not (usable) HTTP.
    BadResponse(&'static str),
    /// No response head within `first_byte_timeout_ms`.
    FirstByteTimeout,
    /// The response head arrived but its body broke before any byte reached the client.
    Framing,
    /// No replica to send to, or the admission queue refused (with the
    /// `reason` label of `kvroute_overload_rejections_total`, if counted there).
    Refused(Option<&'static str>),
}

/// An error the proxy answers itself (unless the client is gone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Error {
    pub kind: ErrorKind,
    pub message: Cow<'static, str>,
    pub cause: Cause,
}

impl Error {
    /// The client's request is at fault (head, body, `100 Continue`).
    pub fn client(kind: ErrorKind, message: impl Into<Cow<'static, str>>) -> Self {
        Error {
            kind,
            message: message.into(),
            cause: Cause::Client,
        }
    }

    /// kvroute answers without a replica (none to send to, a queue refusal).
    pub fn refused(
        kind: ErrorKind,
        message: impl Into<Cow<'static, str>>,
        overload: Option<&'static str>,
    ) -> Self {
        Error {
            kind,
            message: message.into(),
            cause: Cause::Refused(overload),
        }
    }

    /// An attempt failed with nothing back (connect, TLS, write, an early close).
    pub fn upstream_io(why: impl Into<Cow<'static, str>>) -> Self {
        let why = why.into();
        Error {
            kind: ErrorKind::BadGateway,
            message: format!("upstream replica failed before responding: {why}").into(),
            cause: Cause::UpstreamIo(why),
        }
    }

    /// An attempt got bytes back that were not a usable response head.
    pub fn bad_response(reason: &'static str) -> Self {
        Error {
            kind: ErrorKind::BadGateway,
            message: format!("invalid response from upstream replica: {reason}").into(),
            cause: Cause::BadResponse(reason),
        }
    }

    /// No response head within `first_byte_timeout_ms`.
    pub fn first_byte_timeout() -> Self {
        Error {
            kind: ErrorKind::GatewayTimeout,
            message: "upstream replica did not respond in time".into(),
            cause: Cause::FirstByteTimeout,
        }
    }

    /// The response body's framing broke before anything reached the client.
    pub fn framing() -> Self {
        Error {
            kind: ErrorKind::BadGateway,
            message: "invalid chunked framing from upstream replica".into(),
            cause: Cause::Framing,
        }
    }

    pub fn source(&self) -> Source {
        match self.cause {
            Cause::Client => Source::Client,
            Cause::UpstreamIo(_)
            | Cause::BadResponse(_)
            | Cause::FirstByteTimeout
            | Cause::Framing => Source::Upstream,
            Cause::Refused(_) => Source::Proxy,
        }
    }

    pub fn retry(&self) -> Retry {
        match self.cause {
            Cause::UpstreamIo(_) => Retry::FreshIfReused,
            // This replica answered nothing usable and dropping its connection
            // aborts the request there, so a retry costs at most a prefill that
            // was lost anyway, and the client gets an answer instead of a 502.
            Cause::BadResponse(_) => Retry::Elsewhere,
            Cause::Client | Cause::FirstByteTimeout | Cause::Framing | Cause::Refused(_) => {
                Retry::Never
            }
        }
    }

    /// Why an upstream attempt failed, as logged and kept as the replica's
    /// last error; `None` for the other sources.
    pub fn why(&self) -> Option<Cow<'static, str>> {
        match &self.cause {
            Cause::UpstreamIo(why) => Some(why.clone()),
            Cause::BadResponse(reason) => Some(format!("invalid response: {reason}").into()),
            Cause::FirstByteTimeout => Some("no response before first_byte_timeout_ms".into()),
            Cause::Framing => Some("invalid chunked framing".into()),
            Cause::Client | Cause::Refused(_) => None,
        }
    }
}

impl From<HeadError> for Error {
    fn from(e: HeadError) -> Self {
        let kind = match e {
            HeadError::Malformed(_) => ErrorKind::BadRequest,
            HeadError::TooLarge(_) => ErrorKind::HeadTooLarge,
            HeadError::UnsupportedEncoding => ErrorKind::NotImplemented,
        };
        Error::client(kind, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryability_follows_the_cause() {
        assert_eq!(
            Error::upstream_io("connect refused").retry(),
            Retry::FreshIfReused
        );
        assert_eq!(Error::bad_response("x").retry(), Retry::Elsewhere);
        assert_eq!(Error::first_byte_timeout().retry(), Retry::Never);
        assert_eq!(Error::framing().retry(), Retry::Never);
        assert_eq!(
            Error::client(ErrorKind::BadRequest, "bad").retry(),
            Retry::Never
        );
        assert_eq!(
            Error::refused(ErrorKind::NoReplica, "none", None).retry(),
            Retry::Never
        );
    }

    #[test]
    fn messages_and_sources_are_the_ones_clients_and_logs_saw() {
        let e = Error::upstream_io("connect refused");
        assert_eq!(e.kind, ErrorKind::BadGateway);
        assert_eq!(
            e.message,
            "upstream replica failed before responding: connect refused"
        );
        assert_eq!(e.why().as_deref(), Some("connect refused"));
        assert_eq!(e.source(), Source::Upstream);
        let e = Error::bad_response("protocol upgrade is not supported");
        assert_eq!(
            e.message,
            "invalid response from upstream replica: protocol upgrade is not supported"
        );
        assert_eq!(
            e.why().as_deref(),
            Some("invalid response: protocol upgrade is not supported")
        );
        let e = Error::first_byte_timeout();
        assert_eq!(e.kind, ErrorKind::GatewayTimeout);
        assert_eq!(e.message, "upstream replica did not respond in time");
        assert_eq!(
            e.why().as_deref(),
            Some("no response before first_byte_timeout_ms")
        );
        assert_eq!(
            Error::client(ErrorKind::Timeout, "slow").source(),
            Source::Client
        );
        assert_eq!(
            Error::refused(ErrorKind::Overloaded, "full", Some("queue_full")).source(),
            Source::Proxy
        );
    }
}
