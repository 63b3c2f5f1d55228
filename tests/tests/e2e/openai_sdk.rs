//! The OpenAI Python SDK (`openai`, with its default HTTP client) as the client, as
//! applications use kvroute: over TLS verified against a test CA, with an API
//! key, chat and text completions, streamed and not, on both I/O runtimes, and
//! a wrong key answered as the SDK's `AuthenticationError`.
//!
//! The SDK comes from the venv `cargo xtask test` prepares (`KVROUTE_PY_VENV`,
//! by default `target/vllm-py`). Without it the test skips, saying why; with
//! `KVROUTE_REQUIRE_OPENAI_SDK` set (CI) a skip is a failure.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kvroute_tests::harness::{request, wait_until, Kvroute, Sim, TempDir};
use kvroute_tests::pki::Pki;

both_io!(the_openai_sdk_over_tls_with_a_key);

const KEY: &str = "sk-sdk-test-0123456789";

fn venv_python() -> Option<PathBuf> {
    let venv = match std::env::var_os("KVROUTE_PY_VENV") {
        Some(d) => PathBuf::from(d),
        // target/<profile>/deps/<test binary>
        None => std::env::current_exe()
            .expect("current_exe")
            .ancestors()
            .nth(3)
            .expect("the test binary lives under target/<profile>/deps")
            .join("vllm-py"),
    };
    let python = venv.join("bin/python");
    let why = if !python.exists() {
        format!("no Python venv at {}", venv.display())
    } else {
        match Command::new(&python).args(["-c", "import openai"]).output() {
            Ok(o) if o.status.success() => return Some(python),
            Ok(o) => format!(
                "its Python cannot import openai: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => format!("{} does not run: {e}", python.display()),
        }
    };
    let why = format!(
        "the OpenAI SDK client cannot run: {why} (`cargo xtask test` prepares the venv; KVROUTE_PY_VENV names another)"
    );
    if std::env::var_os("KVROUTE_REQUIRE_OPENAI_SDK").is_some() {
        panic!("KVROUTE_REQUIRE_OPENAI_SDK is set but {why}");
    }
    eprintln!("skipped: {why}");
    None
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("openai/sdk_client.py")
}

fn the_openai_sdk_over_tls_with_a_key(io: &str) {
    let Some(python) = venv_python() else {
        return;
    };
    let sim = Sim::start("sdk", &[]);
    let dir = TempDir::new("openai-sdk");
    let pki = Pki::new("sdk");
    pki.write(dir.path());
    let keys = dir.path().join("keys");
    std::fs::write(&keys, format!("app {KEY}\n")).unwrap();
    let config = dir.path().join("kvroute.toml");
    std::fs::write(
        &config,
        format!(
            "[tls]\ncert = {:?}\nkey = {:?}\n[auth]\nkeys_file = {:?}\n[[replicas]]\nurl = {:?}\n",
            dir.path().join("cert.pem").display().to_string(),
            dir.path().join("key.pem").display().to_string(),
            keys.display().to_string(),
            sim.url(),
        ),
    )
    .unwrap();
    let k = Kvroute::spawn_on(
        kvroute_tests::harness::free_port(),
        kvroute_tests::harness::free_port(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--io",
            io,
            "--workers",
            "1",
        ],
        &[],
    );
    assert!(
        wait_until(Duration::from_secs(10), || request(
            k.admin,
            "GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
        .is_ok_and(|r| r.status == 200)),
        "kvroute did not become ready"
    );
    // The model name the simulator answers for: whatever its /v1/models lists.
    let models = k.admin_get("/state").json();
    let model = models["replicas"][0]["models"][0]
        .as_str()
        .unwrap_or("sim-model")
        .to_string();

    let out = Command::new(&python)
        .arg(script())
        .arg(format!("https://localhost:{}/v1", k.addr.port()))
        .arg(dir.path().join("ca.pem"))
        .arg(KEY)
        .arg(&model)
        .output()
        .expect("run the SDK client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the SDK client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{io}: the SDK client saw:\n{stdout}");
    let cases: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let case = |name: &str| -> &serde_json::Value {
        cases
            .iter()
            .find(|c| c["case"] == name)
            .unwrap_or_else(|| panic!("no {name} case in:\n{stdout}"))
    };

    let chat = case("chat");
    assert_eq!(chat["object"], "chat.completion", "{chat}");
    assert!(!chat["content"].as_str().unwrap_or("").is_empty(), "{chat}");
    assert!(chat["prompt_tokens"].as_u64().unwrap_or(0) > 0, "{chat}");

    let stream = case("chat_stream");
    assert!(stream["chunks"].as_u64().unwrap() >= 2, "{stream}");
    assert!(
        !stream["content"].as_str().unwrap_or("").is_empty(),
        "{stream}"
    );
    assert!(stream["finish_reason"].is_string(), "{stream}");
    // include_usage: the final chunk carries usage, through TLS and the proxy.
    assert!(
        stream["prompt_tokens"].as_u64().unwrap_or(0) > 0,
        "{stream}"
    );

    let completion = case("completion");
    assert_eq!(completion["object"], "text_completion", "{completion}");
    assert!(
        !completion["text"].as_str().unwrap_or("").is_empty(),
        "{completion}"
    );
    let cstream = case("completion_stream");
    assert!(cstream["chunks"].as_u64().unwrap() >= 2, "{cstream}");
    assert!(
        !cstream["text"].as_str().unwrap_or("").is_empty(),
        "{cstream}"
    );

    let wrong = case("wrong_key");
    assert_eq!(wrong["status"], 401, "{wrong}");
    assert_eq!(wrong["code"], "invalid_api_key", "{wrong}");

    // Every request went through TLS handshakes kvroute counted, and the four
    // good ones were counted under the key's name.
    let metrics = k.admin_get("/metrics").text();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("kvroute_tls_handshakes_total") && !l.ends_with(" 0")),
        "no TLS handshake counted:\n{metrics}"
    );
    let by_key: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("kvroute_requests_total{") && l.contains("key=\"app\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(by_key >= 4.0, "requests under key app: {by_key}\n{metrics}");
    assert!(!metrics.contains(KEY), "the key leaked into /metrics");
}
