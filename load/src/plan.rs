//! The workload-independent shape of a run: sessions of requests, each request a list of
//! segments. Trace replay and the synthetic generator both lower to this, so rendering,
//! scheduling and the ideal-hit-ratio computation exist once.

use std::time::Duration;

/// Chat role a segment is rendered under in `--chat` mode (ignored for `/v1/completions`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// A run of prompt text identified by `id`: equal ids render to equal bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub id: u64,
    /// Bytes of this segment in this request (a trace's last block is cut short).
    pub bytes: usize,
    /// Bytes of the complete segment; `bytes < full_bytes` means this is a cut-off prefix.
    pub full_bytes: usize,
    /// Weight in the ideal hit ratio: tokens for the trace, bytes for synthetic workloads.
    pub weight: u64,
    pub role: Role,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PlannedRequest {
    pub segments: Vec<Segment>,
    pub max_tokens: u32,
}

/// Requests that are sent one after another, each as soon as the previous one has finished;
/// the first at `start` after the beginning of the run. A trace request is a session of one,
/// which makes trace replay purely open-loop.
#[derive(Clone, Debug, PartialEq)]
pub struct Session {
    pub start: Duration,
    /// Sent as `x-session-id` in chat mode so session-affinity routers can be compared.
    pub id: String,
    pub requests: Vec<PlannedRequest>,
}

/// Everything a runner needs: sessions sorted by start time and the request rate the schedule
/// asks for (for the achieved-vs-target line of the summary).
#[derive(Clone, Debug)]
pub struct Plan {
    pub sessions: Vec<Session>,
    pub target_rps: f64,
}

impl Plan {
    pub fn request_count(&self) -> usize {
        self.sessions.iter().map(|s| s.requests.len()).sum()
    }

    /// Requests in schedule order (session start, then turn), the order the ideal cache sees.
    pub fn requests_in_order(&self) -> impl Iterator<Item = &PlannedRequest> {
        self.sessions.iter().flat_map(|s| s.requests.iter())
    }
}

/// What a plan would send, without sending it (`kvroute-load --dry-run`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct PlanStats {
    pub sessions: usize,
    pub requests: usize,
    pub prompt_bytes: u64,
    pub ideal_hit_ratio: f64,
    pub target_rps: f64,
    pub schedule_span_s: f64,
}

impl Plan {
    pub fn stats(&self) -> PlanStats {
        PlanStats {
            sessions: self.sessions.len(),
            requests: self.request_count(),
            prompt_bytes: self
                .requests_in_order()
                .flat_map(|r| &r.segments)
                .map(|g| g.bytes as u64)
                .sum(),
            ideal_hit_ratio: super::ideal::ideal_hit_ratio(self.requests_in_order()),
            target_rps: self.target_rps,
            schedule_span_s: self.sessions.last().map_or(0.0, |s| s.start.as_secs_f64()),
        }
    }
}
