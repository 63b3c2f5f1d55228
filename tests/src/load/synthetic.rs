//! Shared-prefix synthetic workload in the spirit of SGLang's `generated-shared-prefix`
//! benchmark: `groups` system prompts, each shared by `users` users who hold `turns`-turn
//! conversations. Turn `t` of a user resends the whole history (system prompt, earlier
//! questions and answers) plus a new question, so a KV-aware router that keeps a user on one
//! replica hits the history, and any replica that served the group hits the system prompt.
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
        }
    }
}

#[derive(Clone, Copy)]
enum Kind {
    System = 1,
    Question = 2,
    Answer = 3,
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

pub fn plan(cfg: &SharedPrefixConfig) -> Plan {
    let mut rng = SplitMix64::new(cfg.seed ^ 0x5eed_5eed_5eed_5eed);
    let mut users: Vec<(u32, u32)> = (0..cfg.groups)
        .flat_map(|g| (0..cfg.users).map(move |u| (g, u)))
        .collect();
    // Fisher-Yates with our own PRNG: arrivals interleave groups, as in production, instead of
    // sending group after group (which would flatter any router).
    for i in (1..users.len()).rev() {
        users.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let mut at = 0.0f64;
    let sessions = users
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
    Plan {
        sessions,
        target_rps: cfg.rate * cfg.turns as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::body::prompt;

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
}
