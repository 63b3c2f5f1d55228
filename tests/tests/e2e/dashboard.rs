//! Every metric the Grafana dashboard queries is one the binaries export: a
//! renamed metric would otherwise leave a silently empty panel.
//!
//! Starts kvroute, kvroute-control and a sim, sends traffic that exercises every
//! path a panel shows (routed requests, cached prefixes, an error), scrapes both
//! /metrics and checks the names in the dashboard's PromQL against them.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use kvroute_tests::harness::{free_port, post, request, wait_until, Client, Kvroute, Proc, Sim};

fn get(addr: SocketAddr, path: &str) -> String {
    request(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"),
    )
    .map(|r| r.text())
    .unwrap_or_default()
}

/// Every `expr`/`query` string anywhere in the dashboard (panels, rows, variables).
fn queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr" | "query" | "definition", serde_json::Value::String(s)) => {
                        out.push(s.clone())
                    }
                    _ => queries(x, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| queries(x, out)),
        _ => {}
    }
}

/// `kvroute_…` identifiers in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("kvroute_") {
        // A preceding identifier character means it is part of a longer name.
        let prev = rest[..i].chars().last();
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        if !prev.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.insert(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    out
}

/// Sample names and `# TYPE` families in a Prometheus text exposition.
fn exported(text: &str, samples: &mut BTreeSet<String>, types: &mut Vec<(String, String)>) {
    for line in text.lines() {
        if let Some(t) = line.strip_prefix("# TYPE ") {
            let mut it = t.split_whitespace();
            if let (Some(n), Some(k)) = (it.next(), it.next()) {
                types.push((n.to_string(), k.to_string()));
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            samples.insert(line[..end].to_string());
        }
    }
}

#[test]
fn every_metric_the_dashboard_queries_is_exported() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/kvroute.json"
    );
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("dashboard JSON");
    let mut exprs = Vec::new();
    queries(&dash, &mut exprs);
    let wanted: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    assert!(
        wanted.len() >= 15,
        "too few metrics found in the dashboard: {wanted:?}"
    );

    let sim_proc = Sim::start("r0", &[]);
    let sim = sim_proc.addr;
    let k = Kvroute::start(&["--workers", "2", "--replica", &format!("http://{sim}")]);
    let dir = std::env::temp_dir().join(format!("kvroute-dash-{}", free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let ctl_listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let cfg = dir.join("control.toml");
    std::fs::write(
        &cfg,
        format!(
            "dataplanes = [\"{}\"]\nlisten = \"{ctl_listen}\"\n[health]\ninterval_ms = 100\n\
             [scrape]\ninterval_ms = 100\n[push]\nresync_ms = 100\n\
             [[replicas]]\nurl = \"http://{sim}\"\n",
            k.admin
        ),
    )
    .unwrap();
    let _ctl = Proc::spawn(
        "kvroute-control",
        &["--config".to_string(), cfg.display().to_string()],
    );
    assert!(
        wait_until(Duration::from_secs(10), || get(ctl_listen, "/metrics")
            .contains("kvroute_control_pushes_total")),
        "kvroute-control did not serve /metrics"
    );

    // Repeated prefixes produce predictions and cached-token reports; a malformed
    // request produces an error response.
    let system = "You are a helpful assistant. ".repeat(60);
    for i in 0..6 {
        let body = serde_json::json!({
            "model": "sim-model",
            "prompt": format!("{system}\nQuestion {i}"),
            "max_tokens": 2
        })
        .to_string();
        let r = post(k.addr, "/v1/completions", &body).unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let mut bad = Client::connect(k.addr).unwrap();
    bad.send(b"NOT HTTP AT ALL\r\n\r\n").unwrap();
    let _ = bad.read_response(false);

    let mut samples = BTreeSet::new();
    let mut types = Vec::new();
    let ok = wait_until(Duration::from_secs(10), || {
        samples.clear();
        types.clear();
        exported(&get(k.admin, "/metrics"), &mut samples, &mut types);
        exported(&get(ctl_listen, "/metrics"), &mut samples, &mut types);
        wanted.iter().all(|w| samples.contains(w))
    });
    let missing: Vec<&String> = wanted.iter().filter(|w| !samples.contains(*w)).collect();
    assert!(
        ok,
        "the dashboard queries metrics nobody exports: {missing:?}"
    );
    // `histogram_quantile` over `_bucket` needs a histogram, not a summary.
    for w in &wanted {
        if let Some(family) = w.strip_suffix("_bucket") {
            assert!(
                types.iter().any(|(n, k)| n == family && k == "histogram"),
                "{w}: {family} is not exported as a histogram"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn metric_names_are_found_in_promql() {
    let n = metric_names(
        "histogram_quantile(0.9, sum by (le) (rate(kvroute_a_bucket{job=~\"$job\"}[5m]))) / x_kvroute_b + kvroute_c",
    );
    assert_eq!(
        n.into_iter().collect::<Vec<_>>(),
        ["kvroute_a_bucket", "kvroute_c"]
    );
}
