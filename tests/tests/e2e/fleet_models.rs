//! `GET /v1/models` and `GET /v1/models/{id}` answered by kvroute from the whole
//! fleet: real `kvroute-sim` replicas serving different models, a replica that
//! answers garbage, a dead one and an unhealthy one behind a real kvroute, checked
//! with an HTTP client library (hyper) and the raw harness client. Every test runs
//! under both I/O runtimes.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use kvroute_tests::harness::{free_port, request, Client, Kvroute, Sim, Upstream};
use serde_json::{json, Value};

both_io!(
    lists_the_union_of_the_healthy_fleet,
    answers_503_without_a_replica_that_answers
);

/// kvroute on `io` (checked through `/state`, so a fallback cannot pass for it).
fn start(io: &str, first_replica: &str) -> Kvroute {
    let k = Kvroute::start(&["--io", io, "--workers", "1", "--replica", first_replica]);
    let expected = if io == "uring" { "io_uring" } else { "epoll" };
    assert_eq!(k.admin_get("/state").json()["io"], expected);
    k
}

/// Replaces kvroute's replica set, as the control daemon does.
fn put_replicas(k: &Kvroute, replicas: Value) {
    let r = k.admin_put("/replicas", &json!({ "replicas": replicas }).to_string());
    assert_eq!(r.status, 200, "{}", r.text());
}

/// A pooled hyper client on its own runtime: what an SDK or a chat UI is.
struct Http {
    rt: tokio::runtime::Runtime,
    client: hyper_util::client::legacy::Client<HttpConnector, Empty<Bytes>>,
    base: String,
}

impl Http {
    fn new(k: &Kvroute) -> Http {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .build(HttpConnector::new());
        Http {
            rt,
            client,
            base: format!("http://{}", k.addr),
        }
    }

    /// `GET path` with an optional `Authorization`; status, content type and JSON body.
    fn get(&self, path: &str, auth: Option<&str>) -> (u16, String, Value) {
        let mut req = hyper::Request::get(format!("{}{path}", self.base));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let req = req.body(Empty::new()).expect("request");
        self.rt.block_on(async {
            let resp = tokio::time::timeout(Duration::from_secs(20), self.client.request(req))
                .await
                .expect("response in time")
                .expect("response");
            let status = resp.status().as_u16();
            let ctype = resp
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            let v = serde_json::from_slice(&body)
                .unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {body:?}"));
            (status, ctype, v)
        })
    }

    /// The ids of `GET /v1/models`, after checking the list's OpenAI shape.
    fn model_ids(&self) -> Vec<String> {
        let (status, ctype, v) = self.get("/v1/models", None);
        assert_eq!(status, 200, "{v}");
        assert!(ctype.starts_with("application/json"), "{ctype}");
        assert_eq!(v["object"], "list", "{v}");
        let data = v["data"].as_array().expect("data array");
        for m in data {
            assert_eq!(m["object"], "model", "{m}");
            assert!(m["created"].is_u64(), "{m}");
            assert!(m["owned_by"].is_string(), "{m}");
        }
        data.iter()
            .map(|m| m["id"].as_str().expect("string id").to_string())
            .collect()
    }
}

/// An error in OpenAI's shape with this status and code.
fn expect_error(got: (u16, String, Value), status: u16, code: &str, kind: &str) {
    let (s, ctype, v) = got;
    assert_eq!(s, status, "{v}");
    assert!(ctype.starts_with("application/json"), "{ctype}");
    assert_eq!(v["error"]["code"], code, "{v}");
    assert_eq!(v["error"]["type"], kind, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    assert!(v["error"]["param"].is_null(), "{v}");
}

fn lists_the_union_of_the_healthy_fleet(io: &str) {
    let a = Sim::start("a", &["--model", "m1"]);
    let b = Sim::start("b", &["--model", "m2"]);
    // Lists m5 but is pinned to m1: it contributes m1 only.
    let c = Sim::start("c", &["--model", "m5"]);
    // m2 a second time: listed once.
    let d = Sim::start("d", &["--model", "m2"]);
    // Marked unhealthy: not asked, its m3 not listed.
    let u = Sim::start("u", &["--model", "m3"]);
    // Answers 200 JSON that is not a model list.
    let garbage = Upstream::start("garbage");
    let dead = format!("http://127.0.0.1:{}", free_port());
    let k = start(io, &a.url());
    let fleet = |u_healthy: bool| {
        json!([
            {"url": a.url()},
            {"url": b.url(), "models": ["m2", "alias-b"]},
            {"url": c.url(), "models": ["m1"]},
            {"url": d.url()},
            {"url": u.url(), "healthy": u_healthy},
            {"url": garbage.url()},
            {"url": dead},
        ])
    };
    put_replicas(&k, fleet(false));
    let http = Http::new(&k);

    // The union, deduplicated, the same on every call (forwarded to one replica,
    // three calls answered m1, m2, m1): listed models in replica order, then the
    // configured-only alias.
    for _ in 0..3 {
        assert_eq!(http.model_ids(), ["m1", "m2", "alias-b"]);
    }
    let (_, _, list) = http.get("/v1/models", None);
    let m1 = &list["data"][0];
    // Fields as the replica serving it sent them (a sim, like vLLM, adds max_model_len).
    assert_eq!(m1["owned_by"], "kvroute-sim", "{m1}");
    assert!(m1["max_model_len"].is_u64(), "{m1}");
    let alias = &list["data"][2];
    assert_eq!(
        *alias,
        json!({"id": "alias-b", "object": "model", "created": 0, "owned_by": "kvroute"})
    );

    // One model: the same object the list holds.
    let (s, _, m2) = http.get("/v1/models/m2", None);
    assert_eq!(s, 200, "{m2}");
    assert_eq!(m2["id"], "m2");
    assert_eq!(m2["owned_by"], "kvroute-sim");
    let (s, _, v) = http.get("/v1/models/alias-b", None);
    assert_eq!((s, &v["id"]), (200, &json!("alias-b")));
    let (s, _, v) = http.get("/v1/models/m%31", None);
    assert_eq!((s, &v["id"]), (200, &json!("m1")), "percent-decoded id");
    // Unknown, only on an unhealthy replica, only listed by a replica pinned elsewhere.
    for id in ["nope", "m3", "m5"] {
        expect_error(
            http.get(&format!("/v1/models/{id}"), None),
            404,
            "model_not_found",
            "invalid_request_error",
        );
    }

    // HEAD: the GET's head without the body, and the connection lives on.
    let get = request(
        k.addr,
        "GET /v1/models HTTP/1.1\r\nHost: k\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut raw = Client::connect(k.addr).unwrap();
    raw.send(b"HEAD /v1/models HTTP/1.1\r\nHost: k\r\n\r\n")
        .unwrap();
    let head = raw.read_response(true).unwrap();
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(
        head.header("content-length"),
        Some(get.body.len().to_string().as_str())
    );
    assert!(!head.closed);
    raw.send(b"GET /v1/models/m1 HTTP/1.1\r\nHost: k\r\n\r\n")
        .unwrap();
    let again = raw.read_response(false).unwrap();
    assert_eq!((again.status, &again.json()["id"]), (200, &json!("m1")));

    // The client's credentials reach the replicas, and each credential set gets
    // its own list (a second tenant is never answered from the first one's).
    for tenant in ["Bearer tenant-1", "Bearer tenant-2"] {
        let (s, _, v) = http.get("/v1/models", Some(tenant));
        assert_eq!(s, 200, "{v}");
    }
    let seen: Vec<_> = garbage
        .seen()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path == "/v1/models")
        .collect();
    assert!(!seen.is_empty(), "the garbage replica was asked");
    assert!(seen
        .iter()
        .all(|r| r.header("host") == Some(garbage.addr.to_string().as_str())));
    for tenant in ["Bearer tenant-1", "Bearer tenant-2"] {
        assert!(
            seen.iter()
                .any(|r| r.header("authorization") == Some(tenant)),
            "{tenant} not passed on"
        );
    }

    // A new replica set is never answered from the old one's list: u healthy
    // again lists m3 at once.
    put_replicas(&k, fleet(true));
    assert_eq!(http.model_ids(), ["m1", "m2", "m3", "alias-b"]);
    let (s, _, v) = http.get("/v1/models/m3", None);
    assert_eq!((s, &v["id"]), (200, &json!("m3")));

    // Other methods on the route still go to a replica.
    put_replicas(&k, json!([{"url": garbage.url()}]));
    let r = kvroute_tests::harness::post(k.addr, "/v1/models", "{}").unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-upstream"), Some("garbage"));
}

fn answers_503_without_a_replica_that_answers(io: &str) {
    let a = Sim::start("a", &["--model", "m1"]);
    let k = start(io, &a.url());
    let http = Http::new(&k);
    assert_eq!(http.model_ids(), ["m1"]);
    let dead = format!("http://127.0.0.1:{}", free_port());
    let garbage = Upstream::start("garbage");
    // Replicas that exist but do not answer with a list, one that is unhealthy,
    // and no replica at all.
    for set in [
        json!([{"url": dead}, {"url": garbage.url()}, {"url": a.url(), "healthy": false}]),
        json!([]),
    ] {
        put_replicas(&k, set);
        for path in ["/v1/models", "/v1/models/m1"] {
            expect_error(
                http.get(path, None),
                503,
                "no_healthy_replica",
                "server_error",
            );
        }
    }
    put_replicas(&k, json!([{"url": a.url()}]));
    assert_eq!(http.model_ids(), ["m1"]);
}
