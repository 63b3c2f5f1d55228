//! End-to-end tests of `kvroute-control` with real processes on loopback: the
//! simulator as replicas, the real `kvroute` data plane, the real daemon.
//! Build the binaries first (`cargo build --workspace --bins`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use kvroute::admin::State;
use kvroute_testkit::metrics_text::Samples;
use kvroute_tests::harness::{free_port, post, request, wait_until, Proc, Response};

const MODEL: &str = "m";

struct Sim {
    proc: Proc,
    port: u16,
    name: String,
    args: Vec<String>,
}

impl Sim {
    fn start(name: &str, extra: &[&str]) -> Sim {
        Sim::start_on(name, free_port(), extra)
    }

    fn start_on(name: &str, port: u16, extra: &[&str]) -> Sim {
        let mut args: Vec<String> = [
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--name",
            name,
            "--model",
            MODEL,
            "--time-scale",
            "0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let proc = Proc::spawn("kvroute-sim", &args);
        let s = Sim {
            proc,
            port,
            name: name.into(),
            args,
        };
        assert!(
            wait_until(Duration::from_secs(10), || get(s.addr(), "/health")
                .is_ok_and(|r| r.status == 200)),
            "kvroute-sim {name} did not start"
        );
        s
    }

    fn kill(&mut self) {
        let _ = self.proc.child.kill();
        let _ = self.proc.child.wait();
    }

    /// Kills the process and starts the same command again (same ports).
    fn restart(&mut self) {
        self.kill();
        self.proc = Proc::spawn("kvroute-sim", &self.args);
        assert!(
            wait_until(Duration::from_secs(10), || get(self.addr(), "/health")
                .is_ok_and(|r| r.status == 200)),
            "kvroute-sim {} did not restart",
            self.name
        );
    }

    fn addr(&self) -> SocketAddr {
        format!("127.0.0.1:{}", self.port).parse().unwrap()
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

fn get(addr: SocketAddr, path: &str) -> std::io::Result<Response> {
    request(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"),
    )
}

/// A data plane on fixed ports, so a test can restart it in place.
struct Dp {
    _proc: Proc,
    listen: SocketAddr,
    admin: SocketAddr,
}

impl Dp {
    fn start() -> Dp {
        Dp::start_on(free_port(), free_port())
    }

    fn start_on(port: u16, admin_port: u16) -> Dp {
        let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
        let args: Vec<String> = [
            "--listen",
            &listen.to_string(),
            "--admin",
            &admin.to_string(),
            "--io",
            "epoll",
            "--workers",
            "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let proc = Proc::spawn("kvroute", &args);
        assert!(
            wait_until(Duration::from_secs(10), || get(admin, "/healthz")
                .is_ok_and(|r| r.status == 200)),
            "kvroute did not start"
        );
        Dp {
            _proc: proc,
            listen,
            admin,
        }
    }

    fn state(&self) -> Option<State> {
        let r = get(self.admin, "/state").ok()?;
        serde_json::from_slice(&r.body).ok()
    }

    fn replica(&self, url: &str) -> Option<kvroute::admin::ReplicaState> {
        self.state()?.replicas.into_iter().find(|r| r.url == url)
    }

    fn healthy(&self, url: &str) -> bool {
        self.replica(url).is_some_and(|r| r.healthy)
    }

    /// Waits until every one of `sims` is in the table and healthy; fails with
    /// `what` and the table as it stands.
    fn await_healthy(&self, sims: &[&Sim], within: Duration, what: &str) {
        let all = || sims.iter().all(|s| self.healthy(&s.url()));
        assert!(
            wait_until(within, all),
            "{what}: not all of {:?} healthy within {within:?}; replicas: {:?}",
            sims.iter().map(|s| s.url()).collect::<Vec<_>>(),
            self.state().map(|s| s.replicas)
        );
    }

    fn complete(&self, prompt: &str) -> Response {
        let body = format!(r#"{{"model":"{MODEL}","prompt":"{prompt}","max_tokens":2}}"#);
        post(self.listen, "/v1/completions", &body).expect("request through kvroute")
    }
}

struct Control {
    proc: Proc,
    config: PathBuf,
    listen: SocketAddr,
    dir: PathBuf,
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn test_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kvrc-{tag}-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Fast timings so the bounds can be tight: checks every 100 ms, fall 2, rise 2.
fn base_config(dp: &Dp, listen: SocketAddr, name: &str) -> String {
    format!(
        r#"dataplanes = ["{}"]
listen = "{listen}"
name = "{name}"
[health]
interval_ms = 100
timeout_ms = 300
rise = 2
fall = 2
[scrape]
interval_ms = 100
timeout_ms = 300
[push]
resync_ms = 100
[drain]
timeout_ms = 2000
"#,
        dp.admin
    )
}

fn replica_toml(url: &str, extra: &str) -> String {
    format!("[[replicas]]\nurl = \"{url}\"\nmodels = [\"{MODEL}\"]\n{extra}\n")
}

/// `n` completions of `max_tokens` tokens sent straight to `sim` at once, each
/// from its own thread, so the engine has them running and waiting while the
/// test watches what the daemon pushes. [`Sent::all_ok`] waits for them.
fn send_at_once(sim: &Sim, n: usize, tag: &str, max_tokens: u32) -> Sent {
    let addr = sim.addr();
    Sent(
        (0..n)
            .map(|i| {
                let body = format!(
                    r#"{{"model":"{MODEL}","prompt":"{tag} {i}","max_tokens":{max_tokens}}}"#
                );
                std::thread::spawn(move || post(addr, "/v1/completions", &body))
            })
            .collect(),
    )
}

struct Sent(Vec<std::thread::JoinHandle<std::io::Result<Response>>>);

impl Sent {
    fn all_ok(self) {
        for h in self.0 {
            assert_eq!(h.join().unwrap().unwrap().status, 200);
        }
    }
}

impl Control {
    fn start(tag: &str, body: impl FnOnce(SocketAddr) -> String) -> Control {
        let dir = test_dir(tag);
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config = dir.join("control.toml");
        std::fs::write(&config, body(listen)).unwrap();
        Control::spawn(dir, config, listen)
    }

    fn spawn(dir: PathBuf, config: PathBuf, listen: SocketAddr) -> Control {
        let proc = Proc::spawn(
            "kvroute-control",
            &["--config".to_string(), config.display().to_string()],
        );
        let c = Control {
            proc,
            config,
            listen,
            dir,
        };
        assert!(
            wait_until(Duration::from_secs(10), || get(c.listen, "/healthz")
                .is_ok_and(|r| r.status == 200)),
            "kvroute-control did not start"
        );
        c
    }

    fn restart(&mut self) {
        let _ = self.proc.child.kill();
        let _ = self.proc.child.wait();
        self.proc = Proc::spawn(
            "kvroute-control",
            &["--config".to_string(), self.config.display().to_string()],
        );
        let listen = self.listen;
        assert!(
            wait_until(Duration::from_secs(10), || get(listen, "/healthz")
                .is_ok_and(|r| r.status == 200)),
            "kvroute-control did not restart"
        );
    }

    /// The sum of the samples of `name` that have `labels` (0 when there are none).
    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let text = get(self.listen, "/metrics")
            .map(|r| r.text())
            .unwrap_or_default();
        Samples::parse(&text).sum(name, labels)
    }
}

fn replica_header(r: &Response) -> String {
    r.header("x-replica").unwrap_or("").to_string()
}

#[test]
fn control_pushes_static_replicas_and_traffic_survives_the_daemon() {
    let a = Sim::start("a", &[]);
    let b = Sim::start("b", &[]);
    let dp = Dp::start();
    assert_eq!(dp.complete("before any push").status, 503);
    let ctl = Control::start("static", |l| {
        format!(
            "{}{}{}",
            base_config(&dp, l, "ctl-static"),
            replica_toml(&a.url(), ""),
            replica_toml(&b.url(), "")
        )
    });
    dp.await_healthy(&[&a, &b], Duration::from_secs(5), "replicas not pushed");
    let st = dp.state().unwrap();
    let push = st.last_push.expect("push recorded");
    assert_eq!(push.source, "ctl-static");
    let mut seen = std::collections::HashSet::new();
    for i in 0..10 {
        let r = dp.complete(&format!("hello {i}"));
        assert_eq!(r.status, 200, "{}", r.text());
        seen.insert(replica_header(&r));
    }
    assert_eq!(seen.len(), 2, "both replicas serve: {seen:?}");

    // The daemon dies: the data plane keeps its last state.
    drop(ctl);
    for i in 0..10 {
        assert_eq!(dp.complete(&format!("after daemon {i}")).status, 200);
    }
    assert_eq!(dp.state().unwrap().replicas.len(), 2);
}

#[test]
fn control_repushes_when_a_dataplane_restarts_and_when_it_restarts_itself() {
    let a = Sim::start("a", &[]);
    let mut dp = Dp::start();
    let (port, admin) = (dp.listen.port(), dp.admin.port());
    let ctl = Control::start("repush", |l| {
        format!(
            "{}{}",
            base_config(&dp, l, "ctl-repush"),
            replica_toml(&a.url(), "")
        )
    });
    dp.await_healthy(&[&a], Duration::from_secs(5), "replicas not healthy");

    // Data plane restarted in place: it comes back empty and is refilled.
    drop(dp);
    dp = Dp::start_on(port, admin);
    let t = Instant::now();
    dp.await_healthy(
        &[&a],
        Duration::from_secs(5),
        "state not re-pushed after a data plane restart",
    );
    eprintln!("re-pushed {:?} after the data plane came back", t.elapsed());
    assert_eq!(dp.complete("again").status, 200);
    assert!(ctl.metric("kvroute_control_dataplane_restarts_total", &[]) >= 1.0);

    // Daemon restarted: it pushes again (a new generation) without a blip.
    let gen_before = dp.state().unwrap().generation;
    let mut ctl = ctl;
    ctl.restart();
    assert!(
        wait_until(Duration::from_secs(5), || dp
            .state()
            .is_some_and(|s| s.generation > gen_before)),
        "restarted daemon did not push"
    );
    assert!(dp.healthy(&a.url()));
    assert_eq!(dp.complete("after daemon restart").status, 200);
}

#[test]
fn control_takes_a_killed_replica_out_within_the_bound_and_back_after_rise() {
    let mut a = Sim::start("a", &[]);
    let b = Sim::start("b", &[]);
    let dp = Dp::start();
    let ctl = Control::start("health", |l| {
        format!(
            "{}{}{}",
            base_config(&dp, l, "ctl-health"),
            replica_toml(&a.url(), ""),
            replica_toml(&b.url(), "")
        )
    });
    dp.await_healthy(&[&a, &b], Duration::from_secs(5), "replicas not healthy");

    let _ = a.proc.child.kill();
    let _ = a.proc.child.wait();
    let t = Instant::now();
    // interval × fall = 200 ms; allow the probe timeout, one push and a busy box.
    assert!(
        wait_until(Duration::from_millis(1500), || !dp.healthy(&a.url())),
        "killed replica still in rotation after {:?}",
        t.elapsed()
    );
    eprintln!("killed replica out of rotation after {:?}", t.elapsed());
    for i in 0..20 {
        let r = dp.complete(&format!("after kill {i}"));
        assert_eq!(r.status, 200);
        assert_eq!(
            replica_header(&r),
            "b",
            "request {i} went to the dead replica"
        );
    }

    a.restart();
    let t = Instant::now();
    assert!(
        wait_until(Duration::from_millis(1500), || dp.healthy(&a.url())),
        "restarted replica not back after {:?}",
        t.elapsed()
    );
    eprintln!("restarted replica back after {:?}", t.elapsed());
    let back = (0..20).any(|i| replica_header(&dp.complete(&format!("back {i}"))) == "a");
    assert!(back, "restarted replica gets no traffic");
    assert!(
        ctl.metric(
            "kvroute_control_health_checks_failed_total",
            &[("replica", &a.url())]
        ) >= 2.0
    );
}

#[test]
fn control_pushes_scraped_load_and_kv_capacity() {
    // Real time so a request stays running long enough to be seen.
    let a = Sim::start(
        "a",
        &[
            "--kv-blocks",
            "1234",
            "--block-tokens",
            "16",
            "--time-scale",
            "1",
            "--decode-tps",
            "20",
        ],
    );
    let dp = Dp::start();
    let _ctl = Control::start("load", |l| {
        format!(
            "{}{}",
            base_config(&dp, l, "ctl-load"),
            replica_toml(&a.url(), "")
        )
    });
    assert!(
        wait_until(Duration::from_secs(5), || dp.replica(&a.url()).is_some_and(
            |r| r.kv_blocks == Some(1234) && r.kv_block_tokens == Some(16)
        )),
        "capacity not pushed: {:?}",
        dp.replica(&a.url())
    );
    // Two requests of 60 tokens at 20 tokens/s run for ~3 s.
    let sent = send_at_once(&a, 2, "slow", 60);
    assert!(
        wait_until(Duration::from_secs(3), || dp.replica(&a.url()).is_some_and(
            |r| r.external_load.running == 2 && r.external_load.kv_usage > 0.0
        )),
        "load not pushed: {:?}",
        dp.replica(&a.url())
    );
    sent.all_ok();
    assert!(
        wait_until(Duration::from_secs(3), || dp
            .replica(&a.url())
            .is_some_and(|r| r.external_load.running == 0)),
        "finished load not pushed"
    );
}

/// Serves a fixed exposition on `/metrics` (500 once `broken` is set) and `ok`
/// on `/ready`, as an SGLang server with `--enable-metrics` would; 404 elsewhere.
fn fixture_server(
    text: &'static str,
    broken: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> SocketAddr {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf).unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]);
            let (status, body) = if req.starts_with("GET /metrics") {
                if broken.load(std::sync::atomic::Ordering::Relaxed) {
                    ("500 Internal Server Error", "down")
                } else {
                    ("200 OK", text)
                }
            } else if req.starts_with("GET /ready") {
                ("200 OK", "ok")
            } else {
                ("404 Not Found", "")
            };
            let _ = s.write_all(
                format!(
                    "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
        }
    });
    addr
}

#[test]
fn control_scrapes_sglang_metrics() {
    let broken = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sg = fixture_server(
        include_str!("../../fixtures/metrics/sglang.txt"),
        broken.clone(),
    );
    let dp = Dp::start();
    let url = format!("http://{sg}");
    let _ctl = Control::start("sglang", |l| {
        format!(
            "{}{}",
            base_config(&dp, l, "ctl-sglang"),
            replica_toml(&url, "engine = \"sglang\"\nhealth_path = \"/ready\"")
        )
    });
    assert!(
        wait_until(Duration::from_secs(5), || dp.replica(&url).is_some_and(
            |r| {
                r.healthy
                    && r.external_load.running == 162
                    && r.external_load.waiting == 2826
                    && (r.external_load.kv_usage - 0.28).abs() < 1e-6
                    && r.kv_blocks == Some(442354)
                    && r.kv_block_tokens == Some(1)
            }
        )),
        "SGLang load not pushed: {:?}",
        dp.replica(&url)
    );
    // Metrics gone, engine still healthy: its old load figures are dropped, not kept.
    broken.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(
        wait_until(Duration::from_secs(3), || dp.replica(&url).is_some_and(
            |r| { r.healthy && r.external_load.running == 0 && r.external_load.waiting == 0 }
        )),
        "stale load kept: {:?}",
        dp.replica(&url)
    );
}

fn status_engine(ctl: &Control, url: &str) -> Option<String> {
    let v = get(ctl.listen, "/status").ok()?.json();
    v["replicas"].as_array()?.iter().find(|r| r["url"] == url)?["detected_engine"]
        .as_str()
        .map(str::to_string)
}

/// The data plane's own metric line for `name` with both labels, if any.
fn dp_metric(dp: &Dp, name: &str, label: &str, label2: &str) -> Option<f64> {
    let text = get(dp.admin, "/metrics").ok()?.text();
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label) && l.contains(label2))
        .find_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
}

/// `engine` unset (auto): a llama.cpp replica and a vLLM one are each read under
/// their own names; the llama.cpp one's load (slots processing, requests
/// deferred) reaches `PUT /load` and its slot shape the data plane's index.
#[test]
fn control_detects_llamacpp_and_vllm_and_pushes_their_load_and_capacity() {
    let a = Sim::start(
        "a",
        &[
            "--engine",
            "llamacpp",
            "--parallel",
            "2",
            "--kv-blocks",
            "512",
            "--block-tokens",
            "16",
            "--time-scale",
            "1",
            "--decode-tps",
            "20",
        ],
    );
    let b = Sim::start("b", &["--kv-blocks", "1234", "--block-tokens", "16"]);
    let dp = Dp::start();
    let ctl = Control::start("llamacpp", |l| {
        format!(
            "{}{}{}",
            base_config(&dp, l, "ctl-llamacpp"),
            replica_toml(&a.url(), "host_cache_tokens = 1000"),
            replica_toml(&b.url(), "")
        )
    });
    // 512 blocks × 16 tokens over 2 slots: 4096 tokens a slot.
    assert!(
        wait_until(Duration::from_secs(5), || dp.replica(&a.url()).is_some_and(
            |r| r.kv_slots == Some(2)
                && r.kv_slot_tokens == Some(4096)
                && r.kv_host_tokens == Some(1000)
                && r.kv_blocks == Some(2 * 4096 + 1000)
                && r.kv_block_tokens == Some(1)
        )),
        "llama.cpp shape not pushed: {:?}",
        dp.replica(&a.url())
    );
    let rb = dp.replica(&b.url()).unwrap();
    assert_eq!((rb.kv_blocks, rb.kv_block_tokens), (Some(1234), Some(16)));
    assert_eq!(rb.kv_slots, None);
    assert_eq!(status_engine(&ctl, &a.url()).as_deref(), Some("llamacpp"));
    assert_eq!(status_engine(&ctl, &b.url()).as_deref(), Some("vllm"));
    assert_eq!(
        ctl.metric("kvroute_control_replica_engine", &[("engine", "llamacpp")]),
        1.0
    );
    // The data plane's index models the replica's two slots.
    assert!(
        dp_metric(
            &dp,
            "kvroute_index_replica_prompts",
            &a.url(),
            "place=\"slot\""
        )
        .is_some_and(|v| v <= 2.0),
        "no slot model for the llama.cpp replica"
    );
    assert_eq!(
        dp_metric(
            &dp,
            "kvroute_index_replica_prompts",
            &b.url(),
            "place=\"slot\""
        ),
        None
    );

    // Three requests of 60 tokens at 20 tokens/s on two slots: two run, one waits.
    let sent = send_at_once(&a, 3, "slow", 60);
    assert!(
        wait_until(Duration::from_secs(3), || dp.replica(&a.url()).is_some_and(
            |r| r.external_load.running == 2
                && r.external_load.waiting == 1
                && (r.external_load.kv_usage - 1.0).abs() < 1e-6
        )),
        "llama.cpp load not pushed: {:?}",
        dp.replica(&a.url())
    );
    sent.all_ok();
    assert!(
        wait_until(Duration::from_secs(3), || dp.replica(&a.url()).is_some_and(
            |r| r.external_load.running == 0 && r.external_load.waiting == 0
        )),
        "finished load not pushed"
    );
}

/// llama.cpp without `--metrics`, started while its model loads: out of
/// rotation while `/health` answers 503, in once it answers 200, recognised
/// (engine auto) by its `/props`, its load read from `/slots`; a restart into
/// another shape is read anew.
#[test]
fn control_follows_a_loading_llamacpp_replica_without_metrics() {
    let port = free_port();
    let args = |parallel: &str| -> Vec<String> {
        [
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--name",
            "a",
            "--model",
            MODEL,
            "--engine",
            "llamacpp",
            "--no-metrics",
            "--parallel",
            parallel,
            "--loading-ms",
            "4000",
            "--time-scale",
            "1",
            "--decode-tps",
            "20",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let mut a = Proc::spawn("kvroute-sim", &args("3"));
    let url = format!("http://127.0.0.1:{port}");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(wait_until(Duration::from_secs(10), || get(addr, "/health")
        .is_ok_and(|r| r.status == 503)));
    let dp = Dp::start();
    let ctl = Control::start("llamacpp-loading", |l| {
        format!(
            "{}{}",
            base_config(&dp, l, "ctl-llamacpp-loading"),
            replica_toml(&url, "")
        )
    });
    assert!(
        wait_until(Duration::from_secs(3), || dp
            .replica(&url)
            .is_some_and(|r| !r.healthy)),
        "a loading replica must be pushed out of rotation: {:?}",
        dp.replica(&url)
    );
    assert!(
        wait_until(Duration::from_secs(5), || dp
            .replica(&url)
            .is_some_and(|r| r.healthy && r.kv_slots == Some(3))),
        "loaded replica not in rotation with its shape: {:?}",
        dp.replica(&url)
    );
    assert_eq!(status_engine(&ctl, &url).as_deref(), Some("llamacpp"));
    let h = std::thread::spawn(move || {
        post(
            addr,
            "/v1/completions",
            &format!(r#"{{"model":"{MODEL}","prompt":"slow","max_tokens":40}}"#),
        )
    });
    assert!(
        wait_until(Duration::from_secs(3), || dp
            .replica(&url)
            .is_some_and(|r| r.external_load.running == 1)),
        "load from /slots not pushed: {:?}",
        dp.replica(&url)
    );
    assert_eq!(h.join().unwrap().unwrap().status, 200);

    // Restarted with one slot: the new shape replaces the old.
    let _ = a.child.kill();
    let _ = a.child.wait();
    a = Proc::spawn("kvroute-sim", &args("1"));
    assert!(
        wait_until(Duration::from_secs(12), || dp
            .replica(&url)
            .is_some_and(|r| r.healthy && r.kv_slots == Some(1))),
        "restarted shape not pushed: {:?}",
        dp.replica(&url)
    );
    drop(a);
}

/// A metrics page without any engine's load metrics is no error: the replica
/// stays in rotation on its health checks, with no load or capacity, and the
/// daemon shows it as `unknown`.
#[test]
fn control_health_checks_a_replica_whose_metrics_name_no_engine() {
    let broken = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let other = fixture_server(
        "# HELP tgi_queue_size Queue size\n# TYPE tgi_queue_size gauge\ntgi_queue_size 3\n",
        broken,
    );
    let url = format!("http://{other}");
    let dp = Dp::start();
    let ctl = Control::start("unknown", |l| {
        format!(
            "{}{}",
            base_config(&dp, l, "ctl-unknown"),
            replica_toml(&url, "health_path = \"/ready\"")
        )
    });
    assert!(
        wait_until(Duration::from_secs(5), || status_engine(&ctl, &url)
            .as_deref()
            == Some("unknown")),
        "unknown page not shown"
    );
    let r = dp.replica(&url).expect("pushed");
    assert!(r.healthy, "{r:?}");
    assert_eq!((r.kv_blocks, r.kv_slots), (None, None));
    assert_eq!(
        ctl.metric("kvroute_control_scrapes_failed_total", &[("replica", &url)]),
        0.0
    );
    assert_eq!(
        ctl.metric("kvroute_control_replica_engine", &[("engine", "unknown")]),
        1.0
    );
}

/// Sends requests in a loop until told to stop; returns (ok, failed).
fn load_thread(
    dp_listen: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(u32, Vec<String>)> {
    std::thread::spawn(move || {
        let (mut ok, mut failed) = (0, Vec::new());
        let mut i = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            i += 1;
            let body = format!(r#"{{"model":"{MODEL}","prompt":"load {i}","max_tokens":2}}"#);
            match post(dp_listen, "/v1/completions", &body) {
                Ok(r) if r.status == 200 => ok += 1,
                Ok(r) => failed.push(format!("{} {}", r.status, r.text())),
                Err(e) => failed.push(e.to_string()),
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        (ok, failed)
    })
}

#[test]
fn control_follows_a_replica_file_under_load_without_failed_requests() {
    let a = Sim::start("a", &[]);
    let b = Sim::start("b", &[]);
    let dp = Dp::start();
    let dir = test_dir("file-list");
    let file = dir.join("replicas.json");
    let write = |urls: &[&str]| {
        let list: Vec<serde_json::Value> = urls
            .iter()
            .map(|u| serde_json::json!({"url": u, "models": [MODEL]}))
            .collect();
        // Written in place on purpose: the watcher must cope with partial writes.
        std::fs::write(&file, serde_json::to_string(&list).unwrap()).unwrap();
    };
    write(&[&a.url()]);
    let file_s = file.display().to_string();
    let ctl = Control::start("file", |l| {
        format!(
            "replicas_file = \"{file_s}\"\n{}",
            base_config(&dp, l, "ctl-file")
        )
    });
    dp.await_healthy(&[&a], Duration::from_secs(5), "replicas not healthy");

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = load_thread(dp.listen, stop.clone());
    std::thread::sleep(Duration::from_millis(300));

    write(&[&a.url(), &b.url()]);
    let t = Instant::now();
    dp.await_healthy(&[&b], Duration::from_secs(3), "added replica not pushed");
    eprintln!("file addition live after {:?}", t.elapsed());
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    std::thread::sleep(Duration::from_millis(300));

    write(&[&b.url()]);
    let t = Instant::now();
    assert!(
        wait_until(Duration::from_secs(3), || !dp.healthy(&a.url())),
        "removed replica still in rotation"
    );
    eprintln!("file removal out of rotation after {:?}", t.elapsed());
    std::thread::sleep(Duration::from_millis(200));
    eprintln!(
        "removed replica as the data plane sees it while draining: {:?}",
        dp.replica(&a.url())
    );
    assert!(
        wait_until(Duration::from_secs(5), || dp.replica(&a.url()).is_none()),
        "drained replica never removed"
    );
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = load.join().unwrap();
    assert!(ok > 20, "too little load to mean anything: {ok}");
    assert!(
        failed.is_empty(),
        "{} of {} failed: {:?}",
        failed.len(),
        ok,
        &failed[..failed.len().min(5)]
    );
    // A broken file keeps the last good list.
    std::fs::write(&file, "[{\"url\": ").unwrap();
    std::thread::sleep(Duration::from_millis(600));
    assert!(dp.healthy(&b.url()));
    assert!(ctl.metric("kvroute_control_discovery_updates_total", &[]) >= 3.0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn control_discovers_replicas_through_the_system_resolver() {
    let a = Sim::start("a", &[]);
    let dp = Dp::start();
    let port = a.port;
    let _ctl = Control::start("dns", |l| {
        format!(
            "{}[[dns]]\nname = \"localhost\"\nport = {port}\ninterval_ms = 200\nmodels = [\"{MODEL}\"]\n",
            base_config(&dp, l, "ctl-dns")
        )
    });
    // /etc/hosts maps localhost to 127.0.0.1 (and maybe ::1, where no sim listens).
    dp.await_healthy(&[&a], Duration::from_secs(5), "localhost not discovered");
    assert_eq!(dp.complete("via dns").status, 200);
}

fn kv_config(dp: &Dp, l: SocketAddr, name: &str, sim: &Sim, kv_port: u16) -> String {
    format!(
        "{}{}",
        base_config(dp, l, name),
        replica_toml(
            &sim.url(),
            &format!("kv_events = \"tcp://127.0.0.1:{kv_port}\"")
        )
    )
}

fn kv_events_clear_the_replica(format: &str) {
    let kv_port = free_port();
    let ep = format!("tcp://127.0.0.1:{kv_port}");
    let mut a = Sim::start("a", &["--kv-events", &ep, "--kv-events-format", format]);
    let dp = Dp::start();
    let ctl = Control::start(&format!("kv-{format}"), |l| {
        kv_config(&dp, l, &format!("ctl-kv-{format}"), &a, kv_port)
    });
    dp.await_healthy(&[&a], Duration::from_secs(5), "replicas not healthy");
    // ZMQ subscriptions take a moment: keep sending until the daemon has seen a batch.
    let mut n = 0;
    let seen = wait_until(Duration::from_secs(10), || {
        n += 1;
        dp.complete(&format!("{n} {}", "x".repeat(300))).status == 200
            && ctl.metric(
                "kvroute_control_kv_blocks_stored_total",
                &[("replica", &a.url())],
            ) > 0.0
    });
    assert!(seen, "no KV events decoded");
    assert_eq!(
        ctl.metric(
            "kvroute_control_kv_undecodable_total",
            &[("replica", &a.url())]
        ),
        0.0
    );
    let before = dp.replica(&a.url()).unwrap().clears_total;

    let r = post(a.addr(), "/sim/fault", r#"{"drop_cache":true}"#).unwrap();
    assert_eq!(r.status, 200);
    assert!(
        wait_until(Duration::from_secs(3), || dp
            .replica(&a.url())
            .is_some_and(|r| r.clears_total > before)),
        "AllBlocksCleared did not clear the replica in the data plane"
    );
    assert!(ctl.metric("kvroute_control_kv_cleared_total", &[("replica", &a.url())]) >= 1.0);

    // An engine restart (down long enough for the health checks to see, as a
    // real engine's reload is) starts its event sequence over: seen as a reset.
    // The old stream must be ahead of what the new one sends before it is
    // seen, or a restart looks like a gap: 40 batches, one per new prompt.
    for i in 0..40 {
        assert_eq!(dp.complete(&format!("{i} {}", "z".repeat(300))).status, 200);
    }
    let clears = dp.replica(&a.url()).unwrap().clears_total;
    a.kill();
    assert!(wait_until(Duration::from_secs(3), || !dp.healthy(&a.url())));
    a.restart();
    // New prompts each time: a cached prompt publishes nothing, and the first
    // events of the new process may go out before the subscription is back.
    let mut n = 0;
    let reset = wait_until(Duration::from_secs(10), || {
        n += 1;
        dp.complete(&format!("{n} {}", "y".repeat(300))).status == 200
            && ctl.metric(
                "kvroute_control_kv_sequence_resets_total",
                &[("replica", &a.url())],
            ) >= 1.0
    });
    assert!(reset, "sequence reset after restart not seen");
    assert!(dp.replica(&a.url()).unwrap().clears_total > clears);
}

#[test]
fn control_kv_events_map_format_clear_the_index() {
    kv_events_clear_the_replica("map");
}

#[test]
fn control_kv_events_legacy_format_clear_the_index() {
    kv_events_clear_the_replica("legacy");
}

#[test]
fn control_promotes_a_warm_standby_when_an_active_replica_dies() {
    let a = Sim::start("a", &[]);
    let w = Sim::start("w", &[]);
    let dp = Dp::start();
    let ctl = Control::start("warm", |l| {
        format!(
            "{}{}{}",
            base_config(&dp, l, "ctl-warm"),
            replica_toml(&a.url(), ""),
            replica_toml(&w.url(), "pool = \"warm\"")
        )
    });
    dp.await_healthy(&[&a, &w], Duration::from_secs(5), "replicas not healthy");
    let standby = dp.replica(&w.url()).unwrap();
    assert_eq!(standby.pool, kvroute::replica::Pool::Warm);
    for i in 0..10 {
        assert_eq!(replica_header(&dp.complete(&format!("warm {i}"))), "a");
    }
    drop(a);
    let t = Instant::now();
    assert!(
        wait_until(Duration::from_secs(5), || dp.replica(&w.url()).is_some_and(
            |r| r.pool == kvroute::replica::Pool::Active && r.healthy
        )),
        "standby not promoted"
    );
    eprintln!("standby promoted {:?} after the kill", t.elapsed());
    for i in 0..10 {
        let r = dp.complete(&format!("promoted {i}"));
        assert_eq!(r.status, 200);
        assert_eq!(replica_header(&r), "w");
    }
    assert!(ctl.metric("kvroute_control_promotions_total", &[]) >= 1.0);
}

#[test]
fn control_drain_command_takes_a_replica_out() {
    // Real time on `a` so a stream is still open when the drain starts.
    let a = Sim::start("a", &["--time-scale", "1", "--decode-tps", "20"]);
    let b = Sim::start("b", &[]);
    let dp = Dp::start();
    let ctl = Control::start("drain", |l| {
        format!(
            "{}{}{}",
            base_config(&dp, l, "ctl-drain"),
            replica_toml(&a.url(), ""),
            replica_toml(&b.url(), "")
        )
    });
    dp.await_healthy(&[&a, &b], Duration::from_secs(5), "replicas not healthy");
    // A stream on `a` (20 tokens at 20 tokens/s): round robin alternates, so
    // one of the first two lands there.
    let body = format!(r#"{{"model":"{MODEL}","prompt":"long","max_tokens":20,"stream":true}}"#);
    let mut stream = None;
    for _ in 0..4 {
        let mut c = kvroute_tests::harness::Client::connect(dp.listen).unwrap();
        c.send(
            format!(
                "POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .unwrap();
        let (status, headers) = c.read_head().unwrap();
        assert_eq!(status, 200);
        if headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("x-replica") && v == "a")
        {
            stream = Some(c);
            break;
        }
    }
    let mut stream = stream.expect("no stream landed on a");
    let out = std::process::Command::new(kvroute_tests::harness::workspace_bin("kvroute-control"))
        .args(["drain", &a.url(), "--control", &ctl.listen.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(wait_until(Duration::from_secs(2), || !dp.healthy(&a.url())));
    for i in 0..10 {
        assert_eq!(replica_header(&dp.complete(&format!("drained {i}"))), "b");
    }
    // The stream that was open on `a` runs to its end.
    let mut text = Vec::new();
    while let Some(chunk) = stream.read_chunk().unwrap() {
        text.extend_from_slice(&chunk);
    }
    let text = String::from_utf8_lossy(&text);
    assert!(
        text.contains("[DONE]"),
        "in-flight stream cut by the drain: {text}"
    );
    let bad = std::process::Command::new(kvroute_tests::harness::workspace_bin("kvroute-control"))
        .args([
            "drain",
            "http://127.0.0.1:1",
            "--control",
            &ctl.listen.to_string(),
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
}

#[test]
fn control_reloads_on_sighup_and_rejects_a_bad_config() {
    let a = Sim::start("a", &[]);
    let b = Sim::start("b", &[]);
    let dp = Dp::start();
    let ctl = Control::start("reload", |l| {
        format!(
            "{}{}",
            base_config(&dp, l, "ctl-reload"),
            replica_toml(&a.url(), "")
        )
    });
    dp.await_healthy(&[&a], Duration::from_secs(5), "replicas not healthy");
    let good = std::fs::read_to_string(&ctl.config).unwrap();

    std::fs::write(&ctl.config, format!("{good}[health]\ntypo = 1\n")).unwrap();
    ctl.proc.signal("HUP");
    assert!(wait_until(Duration::from_secs(3), || ctl
        .metric("kvroute_control_reload_errors_total", &[])
        >= 1.0));
    assert!(
        dp.healthy(&a.url()),
        "a bad reload must keep the running config"
    );

    std::fs::write(&ctl.config, format!("{good}{}", replica_toml(&b.url(), ""))).unwrap();
    ctl.proc.signal("HUP");
    dp.await_healthy(
        &[&b],
        Duration::from_secs(3),
        "reload did not add the replica",
    );
    assert!(dp.healthy(&a.url()));
}

#[test]
fn control_a_second_daemon_shows_in_the_dataplane_state() {
    let a = Sim::start("a", &[]);
    let dp = Dp::start();
    let _c1 = Control::start("two-1", |l| {
        format!(
            "{}{}",
            base_config(&dp, l, "ctl-one"),
            replica_toml(&a.url(), "")
        )
    });
    dp.await_healthy(&[&a], Duration::from_secs(5), "replicas not healthy");
    let c2 = Control::start("two-2", |l| {
        format!(
            "{}{}",
            base_config(&dp, l, "ctl-two"),
            replica_toml(&a.url(), "")
        )
    });
    assert!(
        wait_until(Duration::from_secs(5), || dp
            .state()
            .is_some_and(|s| s.last_push.is_some_and(|p| p.sources.len() == 2))),
        "second pusher not visible: {:?}",
        dp.state().map(|s| s.last_push)
    );
    // Neither re-pushes in a loop over the other: pushes stay few.
    let pushes = |s: &State| s.last_push.as_ref().map_or(0, |p| p.pushes_total);
    let p0 = pushes(&dp.state().unwrap());
    std::thread::sleep(Duration::from_secs(1));
    let p1 = pushes(&dp.state().unwrap());
    assert!(p1 - p0 <= 1, "daemons fight: {} pushes in 1 s", p1 - p0);
    assert!(c2.metric("kvroute_control_foreign_pushes_total", &[]) >= 0.0);
}

#[test]
fn control_takes_out_a_replica_the_dataplane_sees_failing_though_health_answers() {
    let a = Sim::start("a", &[]);
    let b = Sim::start("b", &[]);
    let dp = Dp::start();
    let _ctl = Control::start("passive", |l| {
        format!(
            "{}{}{}",
            base_config(&dp, l, "ctl-passive"),
            replica_toml(&a.url(), ""),
            replica_toml(&b.url(), "")
        )
    });
    dp.await_healthy(&[&a, &b], Duration::from_secs(5), "replicas not healthy");
    // `a` answers /health but resets every inference request.
    let r = post(
        a.addr(),
        "/sim/fault",
        r#"{"error_rate":1.0,"mode":"reset"}"#,
    )
    .unwrap();
    assert_eq!(r.status, 200);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = load_thread(dp.listen, stop.clone());
    let out = wait_until(Duration::from_secs(5), || !dp.healthy(&a.url()));
    let failures_at_out = dp.replica(&a.url()).map(|r| r.failures_total);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = load.join().unwrap();
    assert!(out, "passive signal ignored: {:?}", dp.replica(&a.url()));
    assert!(failures_at_out.unwrap_or(0) >= 2);
    // The data plane retried the resets on `b`: clients saw no failure.
    assert!(ok > 0 && failed.is_empty(), "{ok} ok, failed: {failed:?}");
    // Once the replica stops failing it comes back after `rise` quiet reads.
    post(a.addr(), "/sim/fault", r#"{"error_rate":0.0}"#).unwrap();
    dp.await_healthy(
        &[&a],
        Duration::from_secs(5),
        "passive failure never expired",
    );
}

/// A DNS server on loopback UDP answering every query with one SRV record
/// (`target`, `port`), as a headless Service or Consul would. Returns its address.
fn srv_server(target: &'static str, port: u16) -> SocketAddr {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, peer)) = sock.recv_from(&mut buf) {
            let q = &buf[..n];
            if n < 12 {
                continue;
            }
            // Question: the name's labels, then type and class.
            let mut i = 12;
            while i < n && q[i] != 0 {
                i += 1 + q[i] as usize;
            }
            let qend = i + 1 + 4;
            if qend > n {
                continue;
            }
            let mut r = Vec::with_capacity(128);
            r.extend_from_slice(&q[..2]); // id
            r.extend_from_slice(&[0x81, 0x80]); // response, recursion available, no error
            r.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 0]); // 1 question, 1 answer
            r.extend_from_slice(&q[12..qend]);
            r.extend_from_slice(&[0xc0, 0x0c, 0, 33, 0, 1, 0, 0, 0, 0]); // name ptr, SRV, IN, TTL 0
            let mut rdata = vec![0, 0, 0, 0];
            rdata.extend_from_slice(&port.to_be_bytes());
            for label in target.split('.') {
                rdata.push(label.len() as u8);
                rdata.extend_from_slice(label.as_bytes());
            }
            rdata.push(0);
            r.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
            r.extend_from_slice(&rdata);
            let _ = sock.send_to(&r, peer);
        }
    });
    addr
}

#[test]
fn control_discovers_replicas_from_srv_records() {
    let a = Sim::start("a", &[]);
    let ns = srv_server("localhost", a.port);
    let dp = Dp::start();
    let _ctl = Control::start("srv", |l| {
        format!(
            "{}[[dns]]\nname = \"_http._tcp.sim.service.consul\"\nrecord = \"srv\"\nnameserver = \"{ns}\"\ninterval_ms = 200\nmodels = [\"{MODEL}\"]\n",
            base_config(&dp, l, "ctl-srv")
        )
    });
    dp.await_healthy(&[&a], Duration::from_secs(5), "SRV target not discovered");
    assert_eq!(dp.complete("via srv").status, 200);
}

fn unix_get(path: &std::path::Path, what: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(path).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("GET {what} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

#[test]
fn control_pushes_to_several_dataplanes_over_tcp_and_unix_sockets() {
    let a = Sim::start("a", &[]);
    let tcp = Dp::start();
    let dir = test_dir("unix-dp");
    let sock = dir.join("admin.sock");
    let port = free_port();
    let _unix_dp = Proc::spawn(
        "kvroute",
        &[
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--admin".into(),
            sock.display().to_string(),
            "--io".into(),
            "epoll".into(),
            "--workers".into(),
            "1".into(),
        ],
    );
    assert!(
        wait_until(Duration::from_secs(10), || unix_get(&sock, "/healthz")
            .is_some_and(|b| b.starts_with("ok"))),
        "kvroute on a Unix admin socket did not start"
    );
    let sock_s = sock.display().to_string();
    let _ctl = Control::start("multi", |l| {
        let cfg = base_config(&tcp, l, "ctl-multi").replace(
            &format!("dataplanes = [\"{}\"]", tcp.admin),
            &format!("dataplanes = [\"{}\", \"{sock_s}\"]", tcp.admin),
        );
        format!("{cfg}{}", replica_toml(&a.url(), ""))
    });
    let unix_state = || -> Option<State> { serde_json::from_str(&unix_get(&sock, "/state")?).ok() };
    assert!(
        wait_until(Duration::from_secs(5), || tcp.healthy(&a.url())
            && unix_state().is_some_and(|s| s
                .replicas
                .iter()
                .any(|r| r.url == a.url() && r.healthy))),
        "not pushed to both: tcp {:?} unix {:?}",
        tcp.state().map(|s| s.replicas),
        unix_state().map(|s| s.replicas)
    );
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let body = format!(r#"{{"model":"{MODEL}","prompt":"unix","max_tokens":1}}"#);
    assert_eq!(post(listen, "/v1/completions", &body).unwrap().status, 200);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn control_promotes_on_sustained_queues_and_demotes_with_hysteresis() {
    // One sequence at a time and slow decoding: requests queue on `a`.
    let a = Sim::start(
        "a",
        &["--max-seqs", "1", "--time-scale", "1", "--decode-tps", "50"],
    );
    let w = Sim::start("w", &[]);
    let dp = Dp::start();
    let ctl = Control::start("overload", |l| {
        format!(
            "{}[warm]\npromote_waiting = 2.0\npromote_window_ms = 300\ndemote_waiting = 0.5\ndemote_window_ms = 1500\n{}{}",
            base_config(&dp, l, "ctl-overload"),
            replica_toml(&a.url(), ""),
            replica_toml(&w.url(), "pool = \"warm\"")
        )
    });
    dp.await_healthy(&[&a, &w], Duration::from_secs(5), "replicas not healthy");
    let active = |dp: &Dp| {
        dp.replica(&w.url())
            .is_some_and(|r| r.pool == kvroute::replica::Pool::Active)
    };
    // Nothing queued yet: still a standby.
    assert!(!active(&dp));
    // Six requests of 50 tokens at 50 tokens/s, one at a time: ~5 s of queue.
    let sent = send_at_once(&a, 6, "q", 50);
    let t = Instant::now();
    assert!(
        wait_until(Duration::from_secs(4), || active(&dp)),
        "standby not promoted under a sustained queue"
    );
    let promoted_after = t.elapsed();
    eprintln!("promoted {promoted_after:?} into the overload");
    assert!(
        promoted_after >= Duration::from_millis(300),
        "promoted before the window"
    );
    sent.all_ok();
    // Queue gone: demoted only after the (longer) calm window.
    let t = Instant::now();
    assert!(
        wait_until(Duration::from_secs(6), || !active(&dp)),
        "standby never demoted"
    );
    eprintln!("demoted {:?} after the queue drained", t.elapsed());
    assert!(ctl.metric("kvroute_control_demotions_total", &[]) >= 1.0);
}

fn sim_stats(s: &Sim) -> serde_json::Value {
    get(s.addr(), "/sim/stats").unwrap().json()
}

#[test]
fn control_prewarms_a_standby_with_hot_prefixes_before_promoting_it() {
    let a = Sim::start("a", &[]);
    let w = Sim::start("w", &[]);
    let dp = Dp::start();
    // Longer than the 1 KiB routing anchor, so every request with one of them
    // shares that prompt's anchor whatever question follows.
    let system: Vec<String> = (0..2)
        .map(|i| {
            format!(
                "You are assistant number {i}. {}",
                "Answer politely and briefly. ".repeat(40)
            )
        })
        .collect();
    let ctl = Control::start("prewarm", |l| {
        format!(
            "{}{}{}",
            base_config(&dp, l, "ctl-prewarm"),
            replica_toml(&a.url(), ""),
            replica_toml(&w.url(), "pool = \"warm\"")
        )
    });
    dp.await_healthy(&[&a, &w], Duration::from_secs(5), "replicas not healthy");
    assert_eq!(sim_stats(&w)["requests"], 0, "a standby gets no traffic");
    // Real traffic teaches the data plane its hot prefixes (it samples one request
    // in 8 per worker, the first included; this data plane has one worker).
    for (i, p) in system.iter().enumerate() {
        for q in 0..8 {
            let body = serde_json::json!({"model": MODEL, "prompt": format!("{p} Question {i}.{q}?"), "max_tokens": 2}).to_string();
            assert_eq!(
                post(dp.listen, "/v1/completions", &body).unwrap().status,
                200
            );
        }
    }
    let hot = admin_send(&dp, "GET", "/hot-prefixes?limit=8", "").json();
    assert_eq!(hot["prefixes"].as_array().unwrap().len(), 2, "{hot}");

    drop(a);
    assert!(
        wait_until(Duration::from_secs(5), || dp.replica(&w.url()).is_some_and(
            |r| r.pool == kvroute::replica::Pool::Active && r.healthy
        )),
        "standby not promoted"
    );
    // Before any user request: exactly the two hot prefixes, one token each.
    let st = sim_stats(&w);
    assert_eq!(st["requests"], 2, "{st}");
    assert_eq!(st["completion_tokens"], 2, "{st}");
    assert!(
        ctl.metric(
            "kvroute_control_prewarm_requests_total",
            &[("replica", &w.url())]
        ) >= 2.0
    );

    // The next request with a hot prefix finds it cached on the new replica.
    let body = serde_json::json!({"model": MODEL, "prompt": format!("{} What is 2+2?", system[0]), "max_tokens": 2}).to_string();
    let r = post(dp.listen, "/v1/completions", &body).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(replica_header(&r), "w");
    let cached = r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        cached > 0,
        "hot prefix not cached on the promoted standby: {}",
        r.text()
    );
}

#[test]
fn control_subscribes_to_every_data_parallel_rank() {
    // The replica declares two ranks on base port P; this engine's rank 1 is on P + 1.
    let base = loop {
        let p = free_port();
        if p < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            break p;
        }
    };
    let ep = format!("tcp://127.0.0.1:{}", base + 1);
    let a = Sim::start("a", &["--kv-events", &ep]);
    let dp = Dp::start();
    let ctl = Control::start("ranks", |l| {
        format!(
            "{}{}",
            base_config(&dp, l, "ctl-ranks"),
            replica_toml(
                &a.url(),
                &format!("kv_events = \"tcp://127.0.0.1:{base}\"\ndp_ranks = 2")
            )
        )
    });
    dp.await_healthy(&[&a], Duration::from_secs(5), "replicas not healthy");
    let mut n = 0;
    assert!(
        wait_until(Duration::from_secs(10), || {
            n += 1;
            dp.complete(&format!("{n} {}", "r".repeat(300))).status == 200
                && ctl.metric(
                    "kvroute_control_kv_blocks_stored_total",
                    &[("replica", &a.url())],
                ) > 0.0
        }),
        "rank 1's events not received"
    );
}

fn admin_send(dp: &Dp, method: &str, path: &str, body: &str) -> Response {
    request(
        dp.admin,
        &format!(
            "{method} {path} HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .unwrap()
}

/// The admin additions the daemon relies on, driven directly.
#[test]
fn control_admin_api_load_clear_hot_prefixes_and_push_record() {
    let dp = Dp::start();
    let st = dp.state().unwrap();
    assert!(
        st.last_push.is_none(),
        "a fresh data plane has no push record"
    );
    let url = "http://127.0.0.1:9";
    let r = admin_send(
        &dp,
        "PUT",
        "/replicas",
        &format!(
            r#"{{"replicas":[{{"url":"{url}","kv_blocks":100,"kv_block_tokens":16}}],"source":"tester"}}"#
        ),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let st = dp.state().unwrap();
    let push = st.last_push.unwrap();
    assert_eq!(
        (push.source.as_str(), push.generation, push.pushes_total),
        ("tester", st.generation, 1)
    );
    assert_eq!(st.replicas[0].kv_blocks, Some(100));

    let r = admin_send(
        &dp,
        "PUT",
        "/load",
        &format!(
            r#"{{"loads":[{{"url":"{url}","running":3,"waiting":4,"kv_usage":1.5}},{{"url":"http://127.0.0.1:1","running":1,"waiting":0,"kv_usage":0.0}}]}}"#
        ),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let a: kvroute::admin::LoadApplied = serde_json::from_slice(&r.body).unwrap();
    assert_eq!((a.applied, a.unknown, a.generation), (1, 1, st.generation));
    let rep = dp.replica(url).unwrap();
    assert_eq!(
        (rep.external_load.running, rep.external_load.waiting),
        (3, 4)
    );
    assert_eq!(rep.external_load.kv_usage, 1.0, "usage is clamped to 0..=1");
    assert_eq!(
        admin_send(&dp, "PUT", "/load", r#"{"loads":[{"url":"x"}]}"#).status,
        400
    );

    let r = admin_send(
        &dp,
        "POST",
        "/replicas/clear",
        &format!(r#"{{"url":"{url}","reason":"test"}}"#),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let c: kvroute::admin::ClearApplied = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(c.clears_total, 1);
    assert_eq!(dp.replica(url).unwrap().clears_total, 1);
    assert_eq!(
        admin_send(
            &dp,
            "POST",
            "/replicas/clear",
            r#"{"url":"http://127.0.0.1:2"}"#
        )
        .status,
        404
    );
    assert_eq!(admin_send(&dp, "GET", "/replicas/clear", "").status, 405);

    let r = admin_send(&dp, "GET", "/hot-prefixes?limit=5", "");
    assert_eq!(r.status, 200);
    let h: kvroute::admin::HotPrefixes = serde_json::from_slice(&r.body).unwrap();
    assert!(h.prefixes.len() <= 5);

    // Another pusher: both names are kept.
    let r = admin_send(
        &dp,
        "PUT",
        "/replicas",
        &format!(r#"{{"replicas":[{{"url":"{url}"}}],"source":"other"}}"#),
    );
    assert_eq!(r.status, 200);
    let push = dp.state().unwrap().last_push.unwrap();
    assert_eq!(
        push.sources,
        vec!["tester".to_string(), "other".to_string()]
    );
    assert_eq!(push.pushes_total, 2);
}

#[test]
fn control_restarted_with_a_replica_file_does_not_push_an_empty_set_first() {
    let a = Sim::start("a", &[]);
    let dp = Dp::start();
    let dir = test_dir("file-restart");
    let file = dir.join("replicas.toml");
    std::fs::write(&file, replica_toml(&a.url(), "")).unwrap();
    let file_s = file.display().to_string();
    let mut ctl = Control::start("file-restart", |l| {
        format!(
            "replicas_file = \"{file_s}\"\n{}",
            base_config(&dp, l, "ctl-file-restart")
        )
    });
    dp.await_healthy(&[&a], Duration::from_secs(5), "replicas not healthy");
    // Watch the data plane while the daemon restarts: the replica must never
    // leave the set or rotation.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (stop, admin, url) = (stop.clone(), dp.admin, a.url());
        std::thread::spawn(move || {
            let mut bad = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(r) = get(admin, "/state") {
                    if let Ok(s) = serde_json::from_slice::<State>(&r.body) {
                        if !s.replicas.iter().any(|r| r.url == url && r.healthy) {
                            bad.push(s.generation);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            bad
        })
    };
    let gen = dp.state().unwrap().generation;
    ctl.restart();
    assert!(wait_until(Duration::from_secs(5), || dp
        .state()
        .is_some_and(|s| s.generation > gen)));
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let bad = watcher.join().unwrap();
    assert!(
        bad.is_empty(),
        "replica out of the set at generations {bad:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
