//! One replica's scrape, run every `[scrape] interval_ms`: `/metrics` read under
//! the configured engine's names or, with `engine = "auto"`, the detected one's
//! (`detect.rs`); for llama.cpp also `/props` for its slot shape, and `/slots`
//! for its load when it runs without `--metrics`.
//!
//! The engine decided stays while the page fits it. A failed scrape forgets it
//! and the slot shape (the engine is down, and what comes back may differ), and
//! so does a restart seen in the counters for the shape, so both are read anew.

use std::time::Duration;

use crate::config::{Engine, ReplicaConfig};
use crate::detect;
use crate::http::{self, Target};
use crate::llamacpp::{self, Props};
use crate::scrape::{extract_samples, parse_exposition, Scraped};

/// llama.cpp's `/metrics` answer carries the process's start (a number that is
/// new with every process) as a header rather than a metric.
const START_HEADER: &str = "process-start-time-unix";

/// The outcome of one scrape.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    /// Load (and capacity, where the engine reports it) of a known engine.
    Load(Scraped),
    /// `auto`: the page answered but carries no engine's load metrics. Not an
    /// error: the replica is health-checked only.
    Unknown {
        samples: usize,
    },
    Failed(String),
}

pub struct Scraper {
    configured: Engine,
    /// The replica itself, for `/props` and `/slots`.
    replica: Option<Target>,
    metrics: Option<(Target, String)>,
    url: String,
    timeout: Duration,
    detected: Option<Engine>,
    props: Option<Props>,
    prev: Option<Scraped>,
}

impl Scraper {
    pub fn new(cfg: &ReplicaConfig, timeout: Duration) -> Scraper {
        Scraper {
            configured: cfg.engine,
            replica: http::split_url(&cfg.url).ok().map(|(t, _)| t),
            metrics: cfg.metrics_url().and_then(|u| http::split_url(&u).ok()),
            url: cfg.url.clone(),
            timeout,
            detected: None,
            props: None,
            prev: None,
        }
    }

    /// The engine as last decided (the configured one unless `auto`).
    #[cfg(test)]
    pub fn engine(&self) -> Option<Engine> {
        match self.configured {
            Engine::Auto => self.detected,
            e => Some(e),
        }
    }

    fn forget(&mut self) {
        self.detected = None;
        self.props = None;
        self.prev = None;
    }

    pub async fn once(&mut self) -> Report {
        let failure = match self.metrics.clone() {
            None => "no metrics url".to_string(),
            Some((target, path)) => {
                match http::request(&target, "GET", &path, None, self.timeout).await {
                    Ok(rep) if rep.status == 200 => {
                        let text = String::from_utf8_lossy(&rep.body);
                        let start = rep.header(START_HEADER).and_then(|v| v.trim().parse().ok());
                        return self.read_page(&text, start).await;
                    }
                    Ok(rep) => format!("HTTP {}", rep.status),
                    Err(e) => e.to_string(),
                }
            }
        };
        // llama.cpp serves no metrics without `--metrics`: its slots still tell.
        if matches!(self.configured, Engine::Auto | Engine::Llamacpp) {
            if let Some(s) = self.llamacpp_without_metrics().await {
                return Report::Load(s);
            }
        }
        self.forget();
        Report::Failed(failure)
    }

    async fn read_page(&mut self, text: &str, start: Option<f64>) -> Report {
        let (samples, skipped) = parse_exposition(text);
        let engine = match self.configured {
            Engine::Auto => self
                .detected
                .filter(|e| detect::fits(*e, &samples))
                .or_else(|| detect::detect(&samples)),
            e => Some(e),
        };
        let Some(engine) = engine else {
            self.forget();
            return Report::Unknown {
                samples: samples.len(),
            };
        };
        let mut s = match extract_samples(engine, &samples, skipped, &self.url) {
            Ok(s) => s,
            Err(e) => {
                self.forget();
                return Report::Failed(e.to_string());
            }
        };
        if s.start_time.is_none() {
            s.start_time = start;
        }
        if self.detected != Some(engine) {
            self.props = None;
        }
        self.detected = Some(engine);
        if engine == Engine::Llamacpp {
            let restarted = self.prev.is_some_and(|p| s.restarted_since(&p));
            if restarted {
                self.props = None;
            }
            self.slot_shape(&mut s).await;
            let has_usage = samples
                .iter()
                .any(|x| x.name == "llamacpp:kv_cache_usage_ratio");
            if !has_usage {
                s.kv_usage = busy_share(s.running, s.slots);
            }
        }
        self.prev = Some(s);
        Report::Load(s)
    }

    /// Fills the slot shape from `/props`, read once per engine process.
    async fn slot_shape(&mut self, s: &mut Scraped) {
        if self.props.is_none() {
            self.props = self.fetch_props().await;
        }
        if let Some(p) = self.props {
            s.slots = Some(p.total_slots);
            s.slot_tokens = Some(p.slot_tokens);
        }
    }

    async fn fetch_props(&self) -> Option<Props> {
        let target = self.replica.as_ref()?;
        match http::request(target, "GET", "/props", None, self.timeout).await {
            Ok(r) if r.status == 200 => match llamacpp::parse_props(&r.body, &self.url) {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::debug!(replica = %self.url, error = %e, "no slot shape");
                    None
                }
            },
            _ => None,
        }
    }

    /// A llama.cpp server without `--metrics`: `/props` identifies it and gives
    /// the shape, `/slots` (on by default) the busy slots. Requests waiting for
    /// a slot are not listed anywhere, so `waiting` stays 0. `/props` is read
    /// every time: with no counters to show a restart, it is what shows that
    /// the server is still there and still has its shape.
    async fn llamacpp_without_metrics(&mut self) -> Option<Scraped> {
        self.props = self.fetch_props().await;
        let props = self.props?;
        let target = self.replica.clone()?;
        let slots = match http::request(&target, "GET", "/slots", None, self.timeout).await {
            Ok(r) if r.status == 200 => llamacpp::parse_slots(&r.body, &self.url).ok(),
            _ => None,
        };
        self.detected = Some(Engine::Llamacpp);
        let running = slots.map_or(0.0, |s| f64::from(s.busy));
        let s = Scraped {
            running,
            kv_usage: busy_share(running, Some(props.total_slots)),
            engine: Some(Engine::Llamacpp),
            slots: Some(props.total_slots),
            slot_tokens: Some(props.slot_tokens),
            ..Scraped::default()
        };
        self.prev = Some(s);
        Some(s)
    }
}

/// The share of slots processing a request: llama.cpp's stand-in for KV usage.
fn busy_share(running: f64, slots: Option<u32>) -> f64 {
    match slots {
        Some(n) if n > 0 => (running / f64::from(n)).clamp(0.0, 1.0),
        _ => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::{Arc, Mutex};

    /// Path → (status, extra header, body); a path not listed answers 404.
    type Routes = Arc<Mutex<Vec<(&'static str, u16, &'static str, String)>>>;

    fn server(routes: Routes) -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let mut buf = [0u8; 2048];
                let n = s.read(&mut buf).unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                let path = head.split(' ').nth(1).unwrap_or("").to_string();
                let (status, header, body) = routes
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|r| r.0 == path)
                    .map(|r| (r.1, r.2, r.3.clone()))
                    .unwrap_or((404, "", String::new()));
                let _ = s.write_all(
                    format!(
                        "HTTP/1.1 {status} X\r\n{header}content-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                );
            }
        });
        format!("http://{addr}")
    }

    fn scraper(url: &str, engine: Engine) -> Scraper {
        let cfg: ReplicaConfig = serde_json::from_value(serde_json::json!({
            "url": url, "engine": engine.name(),
        }))
        .unwrap();
        Scraper::new(&cfg, Duration::from_secs(2))
    }

    const PROPS: &str = include_str!("../../tests/fixtures/llamacpp/props.json");
    const SLOTS: &str = include_str!("../../tests/fixtures/llamacpp/slots.json");
    const METRICS: &str = include_str!("../../tests/fixtures/metrics/llamacpp.txt");

    #[tokio::test]
    async fn auto_detects_llamacpp_and_reads_its_shape_and_restarts() {
        let routes: Routes = Arc::new(Mutex::new(vec![
            (
                "/metrics",
                200,
                "Process-Start-Time-Unix: 1234\r\n",
                METRICS.into(),
            ),
            ("/props", 200, "", PROPS.into()),
        ]));
        let url = server(routes.clone());
        let mut sc = scraper(&url, Engine::Auto);
        let Report::Load(s) = sc.once().await else {
            panic!("no load")
        };
        assert_eq!(s.engine, Some(Engine::Llamacpp));
        assert_eq!((s.running, s.waiting), (3.0, 2.0));
        assert_eq!((s.slots, s.slot_tokens), (Some(4), Some(1024)));
        assert_eq!(s.kv_usage, 0.75, "3 of 4 slots busy");
        assert_eq!(s.start_time, Some(1234.0));
        // A new process: the shape is read again.
        {
            let mut r = routes.lock().unwrap();
            r[0].2 = "Process-Start-Time-Unix: 99\r\n";
            r[1].3 = PROPS.replace("\"total_slots\": 4", "\"total_slots\": 2");
        }
        let Report::Load(t) = sc.once().await else {
            panic!("no load")
        };
        assert!(t.restarted_since(&s));
        assert_eq!(t.slots, Some(2));
        assert_eq!(t.kv_usage, 1.0);
    }

    #[tokio::test]
    async fn llamacpp_without_metrics_is_read_from_its_slots() {
        let not_supported = r#"{"error":{"code":501,"message":"This server does not support metrics endpoint. Start it with `--metrics`","type":"not_supported_error"}}"#;
        let routes: Routes = Arc::new(Mutex::new(vec![
            ("/metrics", 501, "", not_supported.into()),
            ("/props", 200, "", PROPS.into()),
            ("/slots", 200, "", SLOTS.into()),
        ]));
        let url = server(routes.clone());
        for engine in [Engine::Auto, Engine::Llamacpp] {
            let mut sc = scraper(&url, engine);
            let Report::Load(s) = sc.once().await else {
                panic!("no load")
            };
            assert_eq!(s.engine, Some(Engine::Llamacpp));
            assert_eq!((s.running, s.waiting, s.kv_usage), (2.0, 0.0, 0.5));
            assert_eq!((s.slots, s.slot_tokens), (Some(4), Some(1024)));
        }
        // vLLM configured: a llama.cpp page is no load of its.
        let mut sc = scraper(&url, Engine::Vllm);
        assert!(matches!(sc.once().await, Report::Failed(e) if e.contains("501")));
        // Loading (503 everywhere): a failure.
        let loading =
            r#"{"error":{"message":"Loading model","type":"unavailable_error","code":503}}"#;
        for r in routes.lock().unwrap().iter_mut() {
            (r.1, r.3) = (503, loading.into());
        }
        let mut sc = scraper(&url, Engine::Auto);
        assert!(matches!(sc.once().await, Report::Failed(_)));
    }

    #[tokio::test]
    async fn auto_picks_each_engine_and_an_unknown_page_is_not_an_error() {
        let routes: Routes = Arc::new(Mutex::new(vec![(
            "/metrics",
            200,
            "",
            include_str!("../../tests/fixtures/metrics/vllm_v1.txt").into(),
        )]));
        let url = server(routes.clone());
        let mut sc = scraper(&url, Engine::Auto);
        let Report::Load(s) = sc.once().await else {
            panic!()
        };
        assert_eq!((s.engine, s.kv_blocks), (Some(Engine::Vllm), Some(27895)));
        // The same URL now serves SGLang (an engine restarted as another).
        routes.lock().unwrap()[0].3 =
            include_str!("../../tests/fixtures/metrics/sglang.txt").into();
        let Report::Load(s) = sc.once().await else {
            panic!()
        };
        assert_eq!(s.engine, Some(Engine::Sglang));
        assert_eq!(sc.engine(), Some(Engine::Sglang));
        routes.lock().unwrap()[0].3 = "# TYPE up gauge\nup 1\n".into();
        assert_eq!(sc.once().await, Report::Unknown { samples: 1 });
        assert_eq!(sc.engine(), None);
    }
}
