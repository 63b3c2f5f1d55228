//! A minimal HTTP/1.1 client over TCP or a Unix socket: one connection per request.
//!
//! The daemon talks to loopback admin APIs and to replicas at a few requests per
//! second each, so connection reuse buys nothing and a fresh connection makes
//! every failure (a restarted peer, a half-closed socket) visible at once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

use crate::error::{ControlError, Result};

/// Where to connect.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    Tcp { addr: String },
    Unix(PathBuf),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Tcp { addr } => write!(f, "{addr}"),
            Target::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl Target {
    /// An admin address as written in `dataplanes`.
    pub fn parse_admin(s: &str) -> Result<Target> {
        if let Some(p) = s.strip_prefix("unix:") {
            return Ok(Target::Unix(p.into()));
        }
        // As kvroute's --admin reads it: a path when it starts with / or .
        if s.starts_with('/') || s.starts_with('.') {
            return Ok(Target::Unix(s.into()));
        }
        let hostport = s.strip_prefix("http://").unwrap_or(s).trim_end_matches('/');
        hostport.parse::<SocketAddr>().map_err(|_| {
            ControlError::Invalid(format!(
                "data plane {s:?}: expected a Unix socket path or IP:PORT (an admin API \
                 has no authentication, so no host names)"
            ))
        })?;
        Ok(Target::Tcp {
            addr: hostport.to_string(),
        })
    }
}

/// Splits `http://host:port/path` into a TCP target and the path.
pub fn split_url(url: &str) -> Result<(Target, String)> {
    let bad = || ControlError::Invalid(format!("url {url:?}: expected http://host:port[/path]"));
    let rest = url.strip_prefix("http://").ok_or_else(bad)?;
    let (auth, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if auth.is_empty() {
        return Err(bad());
    }
    let addr = if auth
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        auth.to_string()
    } else {
        format!("{auth}:80")
    };
    Ok((Target::Tcp { addr }, path.to_string()))
}

pub struct Reply {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)?.to_str().ok()
    }
}

/// One request with a deadline covering connect, send and the whole body.
pub async fn request(
    target: &Target,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<Reply> {
    let err = |msg: String| ControlError::Http {
        target: format!("{target}{path}"),
        msg,
    };
    tokio::time::timeout(timeout, async {
        let host = match target {
            Target::Tcp { addr } => addr.clone(),
            Target::Unix(_) => "localhost".to_string(),
        };
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", host)
            .header("user-agent", "kvroute-control")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| err(e.to_string()))?;
        let resp = match target {
            Target::Tcp { addr } => {
                let s = tokio::net::TcpStream::connect(addr.as_str())
                    .await
                    .map_err(|e| err(format!("connect: {e}")))?;
                let _ = s.set_nodelay(true);
                send(s, req).await
            }
            Target::Unix(p) => {
                let s = tokio::net::UnixStream::connect(p)
                    .await
                    .map_err(|e| err(format!("connect: {e}")))?;
                send(s, req).await
            }
        }
        .map_err(|e| err(e.to_string()))?;
        let status = resp.status().as_u16();
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| err(format!("body: {e}")))?
            .to_bytes();
        Ok(Reply {
            status,
            headers: parts.headers,
            body,
        })
    })
    .await
    .map_err(|_| err(format!("timed out after {timeout:?}")))?
}

async fn send<S>(
    s: S,
    req: hyper::Request<Full<Bytes>>,
) -> std::result::Result<hyper::Response<hyper::body::Incoming>, hyper::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
    tokio::spawn(async move {
        // The connection ends with the response; its error, if any, surfaced there.
        let _ = conn.await;
    });
    sender.send_request(req).await
}

/// A request whose answer must be 2xx JSON of type `T`.
pub async fn json<T: serde::de::DeserializeOwned>(
    target: &Target,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<T> {
    let r = request(target, method, path, body, timeout).await?;
    if !(200..300).contains(&r.status) {
        return Err(ControlError::Status {
            target: format!("{target}{path}"),
            status: r.status,
            body: String::from_utf8_lossy(&r.body[..r.body.len().min(300)]).into_owned(),
        });
    }
    serde_json::from_slice(&r.body).map_err(|e| ControlError::Http {
        target: format!("{target}{path}"),
        msg: format!("bad JSON: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_targets() {
        assert_eq!(
            Target::parse_admin("/run/a.sock").unwrap(),
            Target::Unix("/run/a.sock".into())
        );
        assert_eq!(
            Target::parse_admin("unix:/x").unwrap(),
            Target::Unix("/x".into())
        );
        assert_eq!(
            Target::parse_admin("http://127.0.0.1:9/").unwrap(),
            Target::Tcp {
                addr: "127.0.0.1:9".into()
            }
        );
        assert!(Target::parse_admin("localhost:9").is_err());
    }

    #[test]
    fn urls_split_into_target_and_path() {
        let (t, p) = split_url("http://127.0.0.1:8000/metrics").unwrap();
        assert_eq!(t.to_string(), "127.0.0.1:8000");
        assert_eq!(p, "/metrics");
        let (t, p) = split_url("http://host").unwrap();
        assert_eq!(t.to_string(), "host:80");
        assert_eq!(p, "/");
        assert!(split_url("https://x").is_err());
    }
}
