//! The daemon's own HTTP surface: `/healthz`, `/metrics` (Prometheus text),
//! `/status` (JSON) and `POST /drain?url=...` for `kvroute-control drain`.

use std::convert::Infallible;
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::sync::{mpsc, oneshot};

use crate::daemon::{Msg, Shared};

pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<Msg>,
) {
    loop {
        let Ok((s, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let shared = shared.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                let tx = tx.clone();
                async move { Ok::<_, Infallible>(handle(req, &shared, &tx).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(s), svc)
                .await;
        });
    }
}

fn reply(status: u16, ctype: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", ctype)
        .body(Full::new(body.into()))
        .expect("static response parts")
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    shared: &Shared,
    tx: &mpsc::UnboundedSender<Msg>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    match (req.method().as_str(), path.as_str()) {
        ("GET", "/healthz") => reply(200, "text/plain", "ok\n"),
        ("GET", "/metrics") => reply(200, "text/plain; version=0.0.4", render(shared)),
        ("GET", "/status") => {
            let v = shared
                .replicas
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            reply(
                200,
                "application/json",
                serde_json::to_vec(&serde_json::json!({ "replicas": v })).unwrap_or_default(),
            )
        }
        ("POST", "/drain") => {
            let url = req
                .uri()
                .query()
                .unwrap_or("")
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| *k == "url")
                .map(|(_, v)| percent_decode(v));
            let Some(url) = url else {
                return reply(400, "text/plain", "missing url=\n");
            };
            let (rtx, rrx) = oneshot::channel();
            if tx.send(Msg::Drain { url, reply: rtx }).is_err() {
                return reply(503, "text/plain", "daemon stopping\n");
            }
            match rrx.await {
                Ok(Ok(())) => reply(200, "text/plain", "draining\n"),
                Ok(Err(e)) => reply(404, "text/plain", format!("{e}\n")),
                Err(_) => reply(503, "text/plain", "daemon stopping\n"),
            }
        }
        _ => reply(404, "text/plain", "not found\n"),
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"")
}

pub fn render(shared: &Shared) -> String {
    let mut o = String::with_capacity(4096);
    let family = |o: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    let reps = shared
        .replicas
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    family(
        &mut o,
        "kvroute_control_replica_healthy",
        "gauge",
        "1 healthy, 0 failed, -1 not checked yet.",
    );
    for r in &reps {
        let v = match r.healthy {
            Some(true) => 1,
            Some(false) => 0,
            None => -1,
        };
        let _ = writeln!(
            o,
            "kvroute_control_replica_healthy{{replica=\"{}\"}} {v}",
            esc(&r.url)
        );
    }
    family(
        &mut o,
        "kvroute_control_replica_active",
        "gauge",
        "1 when the replica is in the active pool (configured or promoted).",
    );
    for r in &reps {
        let v = u8::from(r.pool == kvroute_admin_api::Pool::Active && !r.draining);
        let _ = writeln!(
            o,
            "kvroute_control_replica_active{{replica=\"{}\"}} {v}",
            esc(&r.url)
        );
    }
    family(
        &mut o,
        "kvroute_control_replica_engine",
        "gauge",
        "1 for the engine the replica's metrics are read as (configured, or detected with engine = \"auto\"); \
         engine=\"unknown\" for a metrics page with no engine's load metrics.",
    );
    for r in &reps {
        if let Some(e) = r.detected_engine {
            let _ = writeln!(
                o,
                "kvroute_control_replica_engine{{replica=\"{}\",engine=\"{e}\",configured=\"{}\"}} 1",
                esc(&r.url),
                r.engine.name()
            );
        }
    }
    for (name, help, f) in [
        (
            "kvroute_control_replica_running",
            "Running requests the replica reports.",
            (|r: &crate::daemon::ReplicaView| r.running) as fn(&crate::daemon::ReplicaView) -> f64,
        ),
        (
            "kvroute_control_replica_waiting",
            "Waiting requests the replica reports.",
            |r| r.waiting,
        ),
        (
            "kvroute_control_replica_kv_usage",
            "KV cache usage the replica reports, 0..1.",
            |r| r.kv_usage,
        ),
        (
            "kvroute_control_replica_kv_blocks",
            "KV capacity in blocks (0 when unknown).",
            |r| r.kv_blocks.unwrap_or(0) as f64,
        ),
        (
            "kvroute_control_replica_kv_effective_blocks",
            "Block budget calibrated from KV events (0 until evictions show it).",
            |r| r.kv_effective_blocks.unwrap_or(0) as f64,
        ),
        (
            "kvroute_control_health_checks_failed_total",
            "Failed active health checks.",
            |r| r.checks_failed as f64,
        ),
        (
            "kvroute_control_scrapes_failed_total",
            "Failed /metrics scrapes.",
            |r| r.scrapes_failed as f64,
        ),
        (
            "kvroute_control_prewarm_requests_total",
            "Pre-warm requests replayed to the replica.",
            |r| r.prewarm_requests as f64,
        ),
    ] {
        let kind = if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        family(&mut o, name, kind, help);
        for r in &reps {
            let _ = writeln!(o, "{name}{{replica=\"{}\"}} {}", esc(&r.url), f(r));
        }
    }
    type KvField = fn(&crate::kv_events::KvStats) -> u64;
    let kv_fields: [(&str, &str, KvField); 10] = [
        (
            "kvroute_control_kv_batches_total",
            "KV event batches received.",
            |k| k.batches.load(Ordering::Relaxed),
        ),
        (
            "kvroute_control_kv_blocks_stored_total",
            "Blocks reported stored.",
            |k| k.stored_blocks.load(Ordering::Relaxed),
        ),
        (
            "kvroute_control_kv_blocks_removed_total",
            "Blocks reported removed (eviction pressure).",
            |k| k.removed_blocks.load(Ordering::Relaxed),
        ),
        (
            "kvroute_control_kv_cleared_total",
            "AllBlocksCleared events.",
            |k| k.cleared.load(Ordering::Relaxed),
        ),
        (
            "kvroute_control_kv_undecodable_total",
            "Batches or events that could not be decoded.",
            |k| k.undecodable.load(Ordering::Relaxed),
        ),
        (
            "kvroute_control_kv_gap_messages_total",
            "Messages missed according to sequence numbers.",
            |k| k.gap_messages.load(Ordering::Relaxed),
        ),
        (
            "kvroute_control_kv_replayed_messages_total",
            "Missed messages fetched again from the engine's replay socket.",
            |k| k.replayed_messages.load(Ordering::Relaxed),
        ),
        (
            "kvroute_control_kv_unrecovered_messages_total",
            "Missed messages the replay socket did not give back.",
            |k| k.unrecovered_messages.load(Ordering::Relaxed),
        ),
        (
            "kvroute_control_kv_sequence_resets_total",
            "Sequence restarts (publisher restarted).",
            |k| k.resets.load(Ordering::Relaxed),
        ),
        (
            "kvroute_control_kv_other_events_total",
            "Events of types this daemon does not use.",
            |k| k.other_events.load(Ordering::Relaxed),
        ),
    ];
    for (name, help, f) in kv_fields {
        family(&mut o, name, "counter", help);
        for r in &reps {
            if let Some(k) = &r.kv {
                let _ = writeln!(o, "{name}{{replica=\"{}\"}} {}", esc(&r.url), f(k));
            }
        }
    }
    let dps = shared
        .dataplanes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    type DpField = fn(&crate::push::DataplaneStats) -> u64;
    let dp_fields: [(&str, &str, &str, DpField); 6] = [
        (
            "kvroute_control_dataplane_up",
            "gauge",
            "1 when the data plane's admin API answered last time.",
            |d| d.up.load(Ordering::Relaxed),
        ),
        (
            "kvroute_control_pushes_total",
            "counter",
            "Full replica-set pushes that succeeded.",
            |d| d.pushes.load(Ordering::Relaxed),
        ),
        (
            "kvroute_control_push_errors_total",
            "counter",
            "Full replica-set pushes that failed.",
            |d| d.push_errors.load(Ordering::Relaxed),
        ),
        (
            "kvroute_control_load_pushes_total",
            "counter",
            "Load updates delivered.",
            |d| d.load_pushes.load(Ordering::Relaxed),
        ),
        (
            "kvroute_control_dataplane_restarts_total",
            "counter",
            "Data plane restarts noticed (state re-pushed).",
            |d| d.restarts_seen.load(Ordering::Relaxed),
        ),
        (
            "kvroute_control_foreign_pushes_total",
            "counter",
            "Resyncs that found another pusher's state.",
            |d| d.foreign_pushes_seen.load(Ordering::Relaxed),
        ),
    ];
    for (name, kind, help, f) in dp_fields {
        family(&mut o, name, kind, help);
        for (addr, d) in &dps {
            let _ = writeln!(o, "{name}{{dataplane=\"{}\"}} {}", esc(addr), f(d));
        }
    }
    for (name, help, v) in [
        (
            "kvroute_control_promotions_total",
            "Standbys promoted.",
            &shared.promotions,
        ),
        (
            "kvroute_control_demotions_total",
            "Promoted standbys sent back.",
            &shared.demotions,
        ),
        (
            "kvroute_control_prewarm_failures_total",
            "Standbys that failed pre-warming.",
            &shared.prewarm_failures,
        ),
        (
            "kvroute_control_clears_total",
            "Replica cache clears sent to the data planes.",
            &shared.clears_sent,
        ),
        (
            "kvroute_control_reloads_total",
            "Configuration reloads (SIGHUP).",
            &shared.reloads,
        ),
        (
            "kvroute_control_reload_errors_total",
            "Reloads rejected (the old configuration stays).",
            &shared.reload_errors,
        ),
        (
            "kvroute_control_discovery_updates_total",
            "Replica lists received from the file and DNS.",
            &shared.discovery_updates,
        ),
    ] {
        family(&mut o, name, "counter", help);
        let _ = writeln!(o, "{name} {}", v.load(Ordering::Relaxed));
    }
    o
}

/// Asks a running daemon to drain a replica.
pub async fn drain(control: SocketAddr, url: &str) -> Result<String, crate::error::ControlError> {
    let target = crate::http::Target::Tcp {
        addr: control.to_string(),
    };
    let enc: String = url
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    let r = crate::http::request(
        &target,
        "POST",
        &format!("/drain?url={enc}"),
        None,
        std::time::Duration::from_secs(5),
    )
    .await?;
    let text = String::from_utf8_lossy(&r.body).trim().to_string();
    if r.status == 200 {
        Ok(text)
    } else {
        Err(crate::error::ControlError::Status {
            target: control.to_string(),
            status: r.status,
            body: text,
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn percent_decoding() {
        assert_eq!(
            super::percent_decode("http%3A%2F%2F127.0.0.1%3A80"),
            "http://127.0.0.1:80"
        );
        assert_eq!(super::percent_decode("a%2"), "a%2");
    }
}
