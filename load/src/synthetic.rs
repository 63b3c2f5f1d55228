//! Shared-prefix synthetic workload in the spirit of SGLang's `generated-shared-prefix`
//! benchmark: `groups` system prompts, each shared by `users` users who hold `turns`-turn
//! conversations. Turn `t` of a user resends the whole history (system prompt, earlier
//! questions and answers) plus a new question, so a KV-aware router that keeps a user on one
//! replica hits the history, and any replica that served the group hits the system prompt.
//!
//! Two knobs make it the robustness workloads of the routing bench: `tenant_skew` gives tenants
//! of very different sizes (users per tenant falling as a power of its rank), and
//! `unshared_fraction` mixes in single-request prompts that share nothing with anything, the
//! short one-off queries that sit between long shared prompts in production traffic.
//!
//! The assistant turns in the history are synthesized (not the server's actual answers) so the
//! workload is byte-for-byte reproducible from `seed` regardless of what the target returns.

use std::time::Duration;

use serde::Serialize;
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::plan::{Plan, PlannedRequest, Role, Segment, Session};
use super::text::SplitMix64;

#[derive(Clone, Debug, Serialize)]
pub struct SharedPrefixConfig {
    pub groups: u32,
    pub users: u32,
    pub turns: u32,
    pub system_bytes: usize,
    pub question_bytes: usize,
    pub answer_bytes: usize,
    /// New conversations per second (Poisson arrivals); 0 starts them all at once.
    pub rate: f64,
    pub max_tokens: u32,
    pub seed: u64,
    /// Tenant `g` (0-based) gets users in proportion to `1 / (g + 1)^tenant_skew`, at least one,
    /// `groups × users` in all; 0 gives every tenant `users`.
    pub tenant_skew: f64,
    /// Fraction of all requests that are one-off prompts of `unshared_bytes`, sharing no byte
    /// with any other request, arriving as their own Poisson stream; 0 for none.
    pub unshared_fraction: f64,
    pub unshared_bytes: usize,
}

impl Default for SharedPrefixConfig {
    fn default() -> Self {
        Self {
            groups: 4,
            users: 8,
            turns: 3,
            system_bytes: 2048,
            question_bytes: 128,
            answer_bytes: 128,
            rate: 8.0,
            max_tokens: 8,
            seed: 0,
            tenant_skew: 0.0,
            unshared_fraction: 0.0,
            unshared_bytes: 512,
        }
    }
}

#[derive(Clone, Copy)]
enum Kind {
    System = 1,
    Question = 2,
    Answer = 3,
    Unshared = 4,
}

/// Segment ids are hashes of (seed, kind, group, user, turn): distinct seeds give disjoint
/// text, and no two different segments share an id (up to 64-bit collisions).
fn segment_id(seed: u64, kind: Kind, g: u32, u: u32, t: u32) -> u64 {
    let mut key = [0u8; 13];
    key[0] = kind as u8;
    key[1..5].copy_from_slice(&g.to_le_bytes());
    key[5..9].copy_from_slice(&u.to_le_bytes());
    key[9..13].copy_from_slice(&t.to_le_bytes());
    xxh3_64_with_seed(&key, seed)
}

fn seg(id: u64, bytes: usize, role: Role) -> Segment {
    Segment {
        id,
        bytes,
        full_bytes: bytes,
        weight: bytes as u64,
        role,
    }
}

/// The request for turn `t` (0-based) of user `u` in group `g`.
pub fn request(cfg: &SharedPrefixConfig, g: u32, u: u32, t: u32) -> PlannedRequest {
    let s = cfg.seed;
    let mut segments = vec![seg(
        segment_id(s, Kind::System, g, 0, 0),
        cfg.system_bytes,
        Role::System,
    )];
    for k in 0..t {
        segments.push(seg(
            segment_id(s, Kind::Question, g, u, k),
            cfg.question_bytes,
            Role::User,
        ));
        segments.push(seg(
            segment_id(s, Kind::Answer, g, u, k),
            cfg.answer_bytes,
            Role::Assistant,
        ));
    }
    segments.push(seg(
        segment_id(s, Kind::Question, g, u, t),
        cfg.question_bytes,
        Role::User,
    ));
    // Zero-length segments (e.g. `--system-bytes 0`) would only add empty chat messages.
    segments.retain(|g| g.bytes > 0);
    PlannedRequest {
        segments,
        max_tokens: cfg.max_tokens.max(1),
    }
}

/// Users of each tenant: `users` each without skew, else `groups × users` shared out by
/// `1 / (rank + 1)^skew` (largest remainders, so the total is exact), at least one each.
pub fn users_per_tenant(cfg: &SharedPrefixConfig) -> Vec<u32> {
    if cfg.tenant_skew <= 0.0 || cfg.groups == 0 {
        return vec![cfg.users; cfg.groups as usize];
    }
    let total = cfg.groups as u64 * cfg.users as u64;
    let w: Vec<f64> = (0..cfg.groups)
        .map(|g| 1.0 / f64::from(g + 1).powf(cfg.tenant_skew))
        .collect();
    let sum: f64 = w.iter().sum();
    let exact: Vec<f64> = w.iter().map(|x| x / sum * total as f64).collect();
    let mut out: Vec<u32> = exact.iter().map(|x| (x.floor() as u32).max(1)).collect();
    let given: u64 = out.iter().map(|&u| u64::from(u)).sum();
    let mut order: Vec<usize> = (0..out.len()).collect();
    order.sort_by(|&a, &b| (exact[b] - exact[b].floor()).total_cmp(&(exact[a] - exact[a].floor())));
    let short = total.saturating_sub(given) as usize;
    for &g in order.iter().take(short) {
        out[g] += 1;
    }
    out
}

/// One request that shares nothing: its single segment's id is unique to `(seed, i)`.
fn unshared_request(cfg: &SharedPrefixConfig, i: u32) -> PlannedRequest {
    PlannedRequest {
        segments: vec![seg(
            segment_id(cfg.seed, Kind::Unshared, i, 0, 0),
            cfg.unshared_bytes.max(1),
            Role::User,
        )],
        max_tokens: cfg.max_tokens.max(1),
    }
}

pub fn plan(cfg: &SharedPrefixConfig) -> Plan {
    let mut rng = SplitMix64::new(cfg.seed ^ 0x5eed_5eed_5eed_5eed);
    let mut users: Vec<(u32, u32)> = users_per_tenant(cfg)
        .into_iter()
        .enumerate()
        .flat_map(|(g, n)| (0..n).map(move |u| (g as u32, u)))
        .collect();
    // Fisher-Yates with our own PRNG: arrivals interleave groups, as in production, instead of
    // sending group after group (which would flatter any router).
    for i in (1..users.len()).rev() {
        users.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let mut at = 0.0f64;
    let mut sessions: Vec<Session> = users
        .into_iter()
        .enumerate()
        .map(|(i, (g, u))| {
            if i > 0 && cfg.rate > 0.0 {
                // Exponential inter-arrival gap; 1 - unit() is in (0, 1] so ln is finite.
                at += -(1.0 - rng.unit()).ln() / cfg.rate;
            }
            Session {
                start: Duration::from_secs_f64(at),
                id: format!("g{g}-u{u}"),
                requests: (0..cfg.turns).map(|t| request(cfg, g, u, t)).collect(),
            }
        })
        .collect();
    // Sessions arrive at `rate` and each issues `turns` requests, so once the run reaches a
    // steady state the request rate is rate × turns.
    let shared_rps = cfg.rate * cfg.turns as f64;
    let mut target_rps = shared_rps;
    let f = cfg.unshared_fraction;
    if f > 0.0 && f < 1.0 {
        let shared: usize = sessions.iter().map(|s| s.requests.len()).sum();
        let n = (shared as f64 * f / (1.0 - f)).round() as u32;
        // Spread over the same span as the conversations' starts, as a Poisson stream of its
        // own (a separate generator, so the conversations' schedule is the same with or
        // without them).
        let mut rng = SplitMix64::new(cfg.seed ^ 0x0e50_ff50_e50f_f5e5);
        let rate = if at > 0.0 { f64::from(n) / at } else { 0.0 };
        let mut t = 0.0f64;
        for i in 0..n {
            if i > 0 && rate > 0.0 {
                t += -(1.0 - rng.unit()).ln() / rate;
            }
            sessions.push(Session {
                start: Duration::from_secs_f64(t),
                id: format!("x{i}"),
                requests: vec![unshared_request(cfg, i)],
            });
        }
        sessions.sort_by_key(|s| s.start);
        target_rps = shared_rps / (1.0 - f);
    }
    Plan {
        sessions,
        target_rps,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::prompt;

    fn cfg() -> SharedPrefixConfig {
        SharedPrefixConfig {
            groups: 2,
            users: 3,
            turns: 3,
            rate: 10.0,
            ..Default::default()
        }
    }

    #[test]
    fn later_turns_extend_earlier_turns() {
        let c = cfg();
        let t0 = prompt(&request(&c, 1, 2, 0));
        let t1 = prompt(&request(&c, 1, 2, 1));
        let t2 = prompt(&request(&c, 1, 2, 2));
        assert_eq!(t0.len(), c.system_bytes + c.question_bytes);
        assert_eq!(t1.len(), t0.len() + c.answer_bytes + c.question_bytes);
        assert!(t1.starts_with(&t0));
        assert!(t2.starts_with(&t1));
    }

    #[test]
    fn users_of_a_group_share_exactly_the_system_prompt() {
        let c = cfg();
        let a = prompt(&request(&c, 0, 0, 0));
        let b = prompt(&request(&c, 0, 1, 0));
        let other = prompt(&request(&c, 1, 0, 0));
        assert_eq!(a[..c.system_bytes], b[..c.system_bytes]);
        assert_ne!(a[c.system_bytes..], b[c.system_bytes..]);
        assert_ne!(a[..c.system_bytes], other[..c.system_bytes]);
    }

    #[test]
    fn plan_is_deterministic_and_complete() {
        let c = cfg();
        let p1 = plan(&c);
        let p2 = plan(&c);
        assert_eq!(p1.sessions, p2.sessions);
        assert_eq!(p1.sessions.len(), 6);
        assert_eq!(p1.request_count(), 18);
        assert!(p1.sessions.windows(2).all(|w| w[0].start <= w[1].start));
        let mut ids: Vec<_> = p1.sessions.iter().map(|s| s.id.clone()).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 6);
        assert!((p1.target_rps - 30.0).abs() < 1e-9);
        let other_seed = plan(&SharedPrefixConfig { seed: 1, ..c });
        assert_ne!(
            p1.sessions[0].requests[0].segments[0].id,
            other_seed.sessions[0].requests[0].segments[0].id
        );
    }

    #[test]
    fn skewed_tenants_keep_the_total_and_fall_with_rank() {
        let c = SharedPrefixConfig {
            groups: 8,
            users: 10,
            tenant_skew: 1.0,
            ..cfg()
        };
        let u = users_per_tenant(&c);
        assert_eq!(u.iter().sum::<u32>(), 80);
        assert!(u.windows(2).all(|w| w[0] >= w[1]), "{u:?}");
        assert!(u[0] >= 4 * u[7], "largest tenant is not much larger: {u:?}");
        assert!(u.iter().all(|&n| n >= 1));
        assert_eq!(users_per_tenant(&cfg()), vec![3, 3]);
        assert_eq!(plan(&c).sessions.len(), 80);
    }

    #[test]
    fn unshared_prompts_are_the_asked_fraction_and_share_nothing() {
        let c = SharedPrefixConfig {
            groups: 4,
            users: 10,
            turns: 3,
            unshared_fraction: 0.4,
            unshared_bytes: 300,
            ..cfg()
        };
        let p = plan(&c);
        let all = p.request_count() as f64;
        let one_offs: Vec<&Session> = p
            .sessions
            .iter()
            .filter(|s| s.id.starts_with('x'))
            .collect();
        assert!(
            ((one_offs.len() as f64 / all) - 0.4).abs() < 0.02,
            "{} of {all}",
            one_offs.len()
        );
        let mut ids: Vec<u64> = one_offs
            .iter()
            .map(|s| s.requests[0].segments[0].id)
            .collect();
        let n = ids.len();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), n, "two one-off prompts share a segment");
        let shared: std::collections::HashSet<u64> = p
            .sessions
            .iter()
            .filter(|s| !s.id.starts_with('x'))
            .flat_map(|s| {
                s.requests
                    .iter()
                    .flat_map(|r| r.segments.iter().map(|g| g.id))
            })
            .collect();
        assert!(ids.iter().all(|id| !shared.contains(id)));
        assert!(one_offs.iter().all(|s| prompt(&s.requests[0]).len() == 300));
        assert!(p.sessions.windows(2).all(|w| w[0].start <= w[1].start));
        // The conversations' own schedule does not move when one-offs are mixed in.
        let without = plan(&SharedPrefixConfig {
            unshared_fraction: 0.0,
            ..c.clone()
        });
        let starts = |p: &Plan| -> Vec<Duration> {
            p.sessions
                .iter()
                .filter(|s| !s.id.starts_with('x'))
                .map(|s| s.start)
                .collect()
        };
        assert_eq!(starts(&p), starts(&without));
        assert!((p.target_rps - without.target_rps / 0.6).abs() < 1e-9);
    }
}
