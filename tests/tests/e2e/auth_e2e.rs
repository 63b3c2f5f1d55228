//! API keys end to end (`[auth]`, `[upstream] api_key`): the real `kvroute` with
//! a config file and a keys file, in front of the scripted upstream (which
//! shows what a replica receives) or `kvroute-sim`, checked from the client's
//! side.

use std::path::PathBuf;
use std::time::Duration;

use kvroute_testkit::metrics_text::Samples;
use kvroute_tests::harness::{free_port, request, wait_until, Client, Kvroute, Response, Upstream};

both_io!(
    keys_are_checked_and_kept_from_the_replica,
    rate_limits_answer_429_until_retry_after,
    forward_client_key_passes_it_on,
    keys_file_reloads_on_sighup_without_failing_streams,
);

const ALICE: &str = "sk-alice-e2e-000001";
const BOB: &str = "sk-bob-e2e-0000002";
const CAROL: &str = "sk-carol-e2e-000003";
const DAVE: &str = "sk-dave-e2e-0000004";
const ERIN: &str = "sk-erin-e2e-0000005";
const UPSTREAM_KEY: &str = "sk-upstream-e2e-999";

fn keys() -> String {
    format!(
        "# e2e keys\n\
         alice {ALICE}\n\
         bob   {BOB} models=m-a\n\
         carol {CAROL} rps=2\n\
         dave  {DAVE} prompt_bytes_per_s=100\n"
    )
}

/// A fresh directory for one test's files.
fn tempdir() -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "kvroute-auth-e2e-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// One kvroute's files: its config, keys file and stderr log.
struct Files {
    dir: PathBuf,
    keys: PathBuf,
    log: PathBuf,
}

impl Files {
    /// `toml` may use `{keys}` and `{dir}` for the paths.
    fn new(keys_text: &str, toml: &str) -> (Files, PathBuf) {
        let dir = tempdir();
        let keys = dir.join("keys");
        std::fs::write(&keys, keys_text).unwrap();
        let cfg = dir.join("kvroute.toml");
        let toml = toml
            .replace("{keys}", keys.to_str().unwrap())
            .replace("{dir}", dir.to_str().unwrap());
        std::fs::write(&cfg, toml).unwrap();
        let log = dir.join("stderr.log");
        (Files { dir, keys, log }, cfg)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// kvroute on `io` with `toml` (see [`Files::new`]) and `replicas` (`URL` or
/// `URL=MODEL`); its stderr at debug level goes to the log file. The replicas
/// are in the config file, which a SIGHUP re-reads.
fn start(io: &str, keys_text: &str, toml: &str, replicas: &[String]) -> (Kvroute, Files) {
    let mut toml = toml.to_string();
    for r in replicas {
        let (url, models) = r.split_once('=').unwrap_or((r, ""));
        let models: Vec<&str> = models.split(',').filter(|m| !m.is_empty()).collect();
        toml.push_str(&format!(
            "\n[[replicas]]\nurl = {url:?}\nmodels = {models:?}\n"
        ));
    }
    let (files, cfg) = Files::new(keys_text, &toml);
    let args = [
        "--io",
        io,
        "--workers",
        "2",
        "--config",
        cfg.to_str().unwrap(),
    ];
    let k = Kvroute::spawn_logged(&args, &[("RUST_LOG", "debug")], &files.log);
    k.wait_ready();
    (k, files)
}

const AUTH_TOML: &str = "[auth]\nkeys_file = \"{keys}\"\n";

/// A request with `headers` (each ending in CRLF) on a new connection.
fn call(k: &Kvroute, method: &str, path: &str, headers: &str, body: &str) -> Response {
    request(
        k.addr,
        &format!(
            "{method} {path} HTTP/1.1\r\nHost: k\r\nContent-Type: application/json\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .expect("request")
}

fn complete(k: &Kvroute, headers: &str, body: &str) -> Response {
    call(k, "POST", "/v1/completions", headers, body)
}

fn bearer(key: &str) -> String {
    format!("Authorization: Bearer {key}\r\n")
}

fn x_api_key(key: &str) -> String {
    format!("x-api-key: {key}\r\n")
}

const BODY: &str = r#"{"model":"m-a","prompt":"hello"}"#;

fn assert_error(r: &Response, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(v["error"]["message"].is_string(), "{v}");
    assert!(v["error"]["param"].is_null(), "{v}");
}

fn keys_are_checked_and_kept_from_the_replica(io: &str) {
    let up = Upstream::start("u");
    let key_file = tempdir().join("upstream.key");
    std::fs::write(&key_file, format!("{UPSTREAM_KEY}\n")).unwrap();
    let toml = format!(
        "{AUTH_TOML}[upstream]\napi_key_file = \"{}\"\n",
        key_file.display()
    );
    let (k, _files) = start(io, &keys(), &toml, &[up.url()]);

    let r = complete(&k, "", BODY);
    assert_error(&r, 401, "invalid_api_key");
    assert_eq!(
        r.json(),
        serde_json::json!({"error": {
            "message": "missing API key: send it as `Authorization: Bearer KEY` or `x-api-key: KEY`",
            "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}})
    );
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    for wrong in [
        bearer("sk-alice-e2e-000002"),
        x_api_key("sk-alice-e2e-00000"),
        format!("Authorization: Basic {ALICE}\r\n"),
    ] {
        let r = complete(&k, &wrong, BODY);
        assert_error(&r, 401, "invalid_api_key");
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    }
    assert!(up.seen().is_empty(), "nothing refused reached the replica");

    for ok in [
        bearer(ALICE),
        x_api_key(ALICE),
        format!("authorization: bearer {ALICE}\r\n"),
        format!("X-API-KEY: {ALICE}\r\n"),
    ] {
        let r = complete(&k, &ok, BODY);
        assert_eq!(r.status, 200, "{ok:?}: {}", r.text());
    }
    let seen = up.seen();
    assert_eq!(seen.len(), 4);
    for s in &seen {
        let auth: Vec<&str> = s
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("authorization"))
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(auth, [format!("Bearer {UPSTREAM_KEY}")], "{:?}", s.headers);
        assert_eq!(s.header("x-api-key"), None, "the client's key stays back");
    }

    // bob may use m-a only, and must name it.
    let r = complete(&k, &bearer(BOB), r#"{"model":"m-b","prompt":"x"}"#);
    assert_error(&r, 403, "model_not_allowed");
    assert!(r.text().contains("m-b"));
    assert_error(
        &complete(&k, &bearer(BOB), r#"{"prompt":"x"}"#),
        403,
        "model_not_allowed",
    );
    assert_eq!(complete(&k, &bearer(BOB), BODY).status, 200);
    assert_eq!(up.seen().len(), 5);

    // The models route needs a key as well.
    let r = call(&k, "GET", "/v1/models", "", "");
    assert_error(&r, 401, "invalid_api_key");

    // A refusal keeps the connection: its body is read and the next request served.
    let mut c = Client::connect(k.addr).unwrap();
    let req = |h: &str| {
        format!(
            "POST /v1/completions HTTP/1.1\r\nHost: k\r\n{h}Content-Length: {}\r\n\r\n{BODY}",
            BODY.len()
        )
    };
    c.send(req("").as_bytes()).unwrap();
    let r = c.read_response(false).unwrap();
    assert_eq!((r.status, r.closed), (401, false));
    c.send(req(&bearer(ALICE)).as_bytes()).unwrap();
    assert_eq!(c.read_response(false).unwrap().status, 200);
    // Expect: 100-continue is refused without the 100, and closed.
    c.send(
        format!(
            "POST /v1/completions HTTP/1.1\r\nHost: k\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            BODY.len()
        )
        .as_bytes(),
    )
    .unwrap();
    let r = c.read_response(false).unwrap();
    assert_eq!((r.status, r.closed), (401, true));
}

/// Sends `body` with `key` until a 429, at most `limit` times; returns it.
fn until_429(k: &Kvroute, key: &str, body: &str, limit: usize) -> Response {
    let mut c = Client::connect(k.addr).unwrap();
    for _ in 0..limit {
        c.send(
            format!(
                "POST /v1/completions HTTP/1.1\r\nHost: k\r\n{}Content-Length: {}\r\n\r\n{body}",
                bearer(key),
                body.len()
            )
            .as_bytes(),
        )
        .unwrap();
        let r = c.read_response(false).unwrap();
        if r.status == 429 {
            return r;
        }
        assert_eq!(r.status, 200, "{}", r.text());
    }
    panic!("no 429 in {limit} requests");
}

fn retry_after(r: &Response) -> u64 {
    let v: u64 = r
        .header("retry-after")
        .expect("retry-after")
        .parse()
        .expect("whole seconds");
    assert!(v >= 1);
    v
}

/// Waits as `r` said and sends again, a few times at most; true on a 200.
fn allowed_after_waiting(k: &Kvroute, mut r: Response, key: &str, body: &str) -> bool {
    for _ in 0..3 {
        std::thread::sleep(Duration::from_secs(retry_after(&r)));
        r = complete(k, &bearer(key), body);
        if r.status == 200 {
            return true;
        }
        assert_error(&r, 429, "rate_limit_exceeded");
    }
    false
}

fn rate_limits_answer_429_until_retry_after(io: &str) {
    let up = Upstream::start("u");
    let (k, _files) = start(io, &keys(), AUTH_TOML, &[up.url()]);

    // carol: 2 requests per second, so the third of a quick run is refused.
    let r = until_429(&k, CAROL, BODY, 20);
    assert_error(&r, 429, "rate_limit_exceeded");
    assert_eq!(r.json()["error"]["type"], "requests");
    assert!(!r.closed, "a 429 keeps the connection");
    let refused_at = up.seen().len();
    assert!(allowed_after_waiting(&k, r, CAROL, BODY));
    assert_eq!(
        up.seen().len(),
        refused_at + 1,
        "refusals never reached the replica"
    );
    // Others are not limited by carol's bucket.
    assert_eq!(complete(&k, &bearer(ALICE), BODY).status, 200);

    // dave: 100 prompt bytes per second.
    let prompt = |n: usize| format!(r#"{{"model":"m-a","prompt":"{}"}}"#, "p".repeat(n));
    let r = until_429(&k, DAVE, &prompt(80), 5);
    assert_error(&r, 429, "rate_limit_exceeded");
    assert_eq!(r.json()["error"]["type"], "tokens");
    // A prompt larger than the whole bucket passes once it is full ...
    assert!(allowed_after_waiting(&k, r, DAVE, &prompt(500)));
    // ... and leaves it in debt for about 4 s more.
    let r = complete(&k, &bearer(DAVE), &prompt(10));
    assert_error(&r, 429, "rate_limit_exceeded");
    assert!(retry_after(&r) >= 4, "{:?}", r.header("retry-after"));
}

fn forward_client_key_passes_it_on(io: &str) {
    let up = Upstream::start("u");
    let toml = format!("{AUTH_TOML}forward_client_key = true\n");
    let (k, _files) = start(io, &keys(), &toml, &[up.url()]);
    assert_eq!(complete(&k, &bearer(ALICE), BODY).status, 200);
    assert_eq!(complete(&k, &x_api_key(ALICE), BODY).status, 200);
    let seen = up.seen();
    assert_eq!(
        seen[0].header("authorization"),
        Some(&*format!("Bearer {ALICE}"))
    );
    assert_eq!(seen[1].header("x-api-key"), Some(ALICE));
    drop(k);

    // Auth off: `[upstream] api_key` still replaces the client's Authorization,
    // and other credential headers pass as before.
    let toml = format!("[upstream]\napi_key = \"{UPSTREAM_KEY}\"\n");
    let (k, _files) = start(io, "", &toml, &[up.url()]);
    let r = complete(
        &k,
        &format!("{}x-api-key: theirs-1\r\n", bearer("client-token")),
        BODY,
    );
    assert_eq!(r.status, 200);
    let s = up.seen().pop().unwrap();
    assert_eq!(
        s.header("authorization"),
        Some(&*format!("Bearer {UPSTREAM_KEY}"))
    );
    assert_eq!(s.header("x-api-key"), Some("theirs-1"));
}

fn keys_file_reloads_on_sighup_without_failing_streams(io: &str) {
    let up = Upstream::start("u");
    let (k, files) = start(io, &keys(), AUTH_TOML, &[up.url()]);

    // A stream by alice is in flight, and a kept-alive connection of hers is open.
    let mut stream = Client::connect(k.addr).unwrap();
    stream
        .send(
            format!(
                "POST /sse?n=3 HTTP/1.1\r\nHost: k\r\n{}Content-Length: 2\r\n\r\n{{}}",
                bearer(ALICE)
            )
            .as_bytes(),
        )
        .unwrap();
    let (status, _) = stream.read_head().unwrap();
    assert_eq!(status, 200);
    assert!(stream.read_chunk().unwrap().is_some());
    let mut idle = Client::connect(k.addr).unwrap();
    let on_idle = |c: &mut Client| {
        c.send(
            format!(
                "POST /v1/completions HTTP/1.1\r\nHost: k\r\n{}Content-Length: {}\r\n\r\n{BODY}",
                bearer(ALICE),
                BODY.len()
            )
            .as_bytes(),
        )
        .unwrap();
        c.read_response(false).unwrap().status
    };
    assert_eq!(on_idle(&mut idle), 200);

    // alice is removed, erin added; the config file itself is unchanged.
    std::fs::write(&files.keys, format!("erin {ERIN}\nbob {BOB} models=m-a\n")).unwrap();
    k.proc.signal("HUP");
    assert!(
        wait_until(Duration::from_secs(10), || complete(
            &k,
            &bearer(ERIN),
            BODY
        )
        .status
            == 200),
        "the new key never worked: {}",
        files.log()
    );
    assert_error(&complete(&k, &bearer(ALICE), BODY), 401, "invalid_api_key");
    assert_eq!(on_idle(&mut idle), 401, "keys are checked per request");
    // The stream admitted before the reload finishes whole.
    up.release();
    let mut rest = 0;
    while stream.read_chunk().unwrap().is_some() {
        rest += 1;
    }
    assert_eq!(rest, 2);

    // A file that does not parse is logged and the loaded keys stay.
    std::fs::write(
        &files.keys,
        format!("erin {ERIN}\nfrank sk-frank-e2e-0006 rps=lots\n"),
    )
    .unwrap();
    k.proc.signal("HUP");
    let want = format!("{}:2:", files.keys.display());
    assert!(
        wait_until(Duration::from_secs(10), || files.log().contains(&want)),
        "no file:line in the log"
    );
    assert_eq!(complete(&k, &bearer(ERIN), BODY).status, 200);
    assert_eq!(complete(&k, &bearer(BOB), BODY).status, 200);
    assert!(
        !files.log().contains("sk-frank"),
        "the bad line's key was logged"
    );
}

/// Sum of the samples of `name` that have every one of `labels` (0 when there are none).
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    Samples::parse(text).sum(name, labels)
}

#[test]
fn keys_label_metrics_and_appear_nowhere() {
    let up = Upstream::start("u");
    let toml = format!("{AUTH_TOML}[upstream]\napi_key = \"{UPSTREAM_KEY}\"\n");
    let (k, files) = start("epoll", &keys(), &toml, &[up.url()]);
    assert_eq!(complete(&k, &bearer(ALICE), BODY).status, 200);
    assert_eq!(complete(&k, &x_api_key(ALICE), BODY).status, 200);
    assert_eq!(
        complete(&k, &bearer("sk-alice-e2e-00000"), BODY).status,
        401
    );
    assert_eq!(complete(&k, "", BODY).status, 401);
    assert_eq!(
        complete(&k, &bearer(BOB), r#"{"model":"m-b","prompt":"x"}"#).status,
        403
    );
    let bad = "sk-frank-e2e-0000006";
    std::fs::write(&files.keys, format!("{}frank {bad} models=\n", keys())).unwrap();
    k.proc.signal("HUP");
    assert!(wait_until(Duration::from_secs(10), || files
        .log()
        .contains("keys file rejected")));

    let metrics = k.admin_get("/metrics").text();
    let requests = "kvroute_requests_total";
    assert_eq!(
        metric(&metrics, requests, &[("key", "alice"), ("status", "200")]),
        2.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, requests, &[("key", "none"), ("status", "401")]),
        2.0
    );
    assert_eq!(
        metric(&metrics, requests, &[("key", "bob"), ("status", "403")]),
        1.0
    );
    let rejections = "kvroute_auth_rejections_total";
    assert_eq!(
        metric(&metrics, rejections, &[("reason", "invalid_key")]),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, rejections, &[("reason", "missing_key")]),
        1.0
    );
    assert_eq!(
        metric(
            &metrics,
            rejections,
            &[("reason", "model_not_allowed"), ("key", "bob")]
        ),
        1.0
    );
    assert_eq!(metric(&metrics, "kvroute_auth_keys", &[]), 4.0);

    let state = k.admin_get("/state").text();
    let log = files.log();
    assert!(log.contains("API keys loaded"), "debug log captured: {log}");
    for secret in [
        ALICE,
        BOB,
        CAROL,
        DAVE,
        UPSTREAM_KEY,
        bad,
        "sk-alice-e2e-00000",
    ] {
        for (what, text) in [("log", &log), ("/metrics", &metrics), ("/state", &state)] {
            assert!(!text.contains(secret), "{secret} appears in {what}");
        }
    }
}

#[test]
fn a_bad_keys_file_refuses_to_start() {
    let (files, cfg) = Files::new(&format!("alice {ALICE}\nbob {BOB} rps=-1\n"), AUTH_TOML);
    let mut k = Kvroute::spawn_logged(&["--config", cfg.to_str().unwrap()], &[], &files.log);
    let code = k.proc.wait_exit(Duration::from_secs(10));
    assert!(code.is_some_and(|c| c != 0), "{code:?}");
    let log = files.log();
    assert!(
        log.contains(&format!("{}:2:", files.keys.display())),
        "{log}"
    );
    assert!(!log.contains(BOB) && !log.contains(ALICE), "{log}");
    let _ = std::fs::remove_dir_all(&files.dir);
}

/// A `kvroute-sim` serving `model`.
fn sim(model: &str) -> kvroute_tests::harness::Sim {
    kvroute_tests::harness::Sim::start(model, &["--model", model])
}

#[test]
fn prediction_cache_is_scoped_by_key() {
    let s = sim("m-a");
    let toml = format!("{AUTH_TOML}[prediction_cache]\nenabled = true\n");
    let (k, _files) = start("epoll", &keys(), &toml, &[s.url()]);
    let body = r#"{"model":"m-a","prompt":"What is a KV cache?","temperature":0,"max_tokens":4}"#;
    let cache = |r: &Response| r.header("x-kvroute-cache").unwrap_or("none").to_string();
    let a1 = complete(&k, &bearer(ALICE), body);
    assert_eq!(
        (a1.status, cache(&a1).as_str()),
        (200, "miss"),
        "{}",
        a1.text()
    );
    // The same key finds its answer whichever header carries it.
    let a2 = complete(&k, &x_api_key(ALICE), body);
    assert_eq!(cache(&a2), "hit");
    assert_eq!(a1.body, a2.body);
    // Another key never does.
    assert_eq!(cache(&complete(&k, &bearer(BOB), body)), "miss");
    assert_eq!(cache(&complete(&k, &bearer(BOB), body)), "hit");
    // A refused request is never answered from the cache.
    assert_eq!(complete(&k, "", body).status, 401);
}

#[test]
fn models_list_shows_only_the_keys_models() {
    let (a, b) = (sim("m-a"), sim("m-b"));
    let (k, _files) = start(
        "epoll",
        &keys(),
        AUTH_TOML,
        &[format!("{}=m-a", a.url()), format!("{}=m-b", b.url())],
    );
    let ids = |key: &str| -> Vec<String> {
        let r = call(&k, "GET", "/v1/models", &bearer(key), "");
        assert_eq!(r.status, 200, "{}", r.text());
        let mut v: Vec<String> = r.json()["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect();
        v.sort();
        v
    };
    assert_eq!(ids(ALICE), ["m-a", "m-b"]);
    assert_eq!(ids(BOB), ["m-a"]);
    assert_eq!(
        call(&k, "GET", "/v1/models/m-a", &bearer(BOB), "").status,
        200
    );
    let r = call(&k, "GET", "/v1/models/m-b", &bearer(BOB), "");
    assert_error(&r, 404, "model_not_found");
    // Requests route by model as before.
    let r = complete(
        &k,
        &bearer(ALICE),
        r#"{"model":"m-b","prompt":"hi","max_tokens":2}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
}
