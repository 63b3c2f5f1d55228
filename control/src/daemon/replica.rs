//! What the decisions know of one replica: its settings, health, scraped load,
//! promotion and drain state. Its tasks and the counters they share live with
//! the runner (`tasks.rs`), so nothing here holds a handle or reads a clock.
#![deny(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::time::Instant;

use kvroute_admin_api::{Pool, ReplicaLoad, ReplicaSpec};

use super::ReplicaView;
use crate::config::{Engine, ReplicaConfig};
use crate::health::Health;
use crate::scrape::Scraped;
use crate::warm::Reason;

pub(super) struct Replica {
    pub(super) cfg: ReplicaConfig,
    pub(super) health: Health,
    pub(super) scraped: Option<Scraped>,
    pub(super) promoted: Option<Reason>,
    pub(super) promoting: bool,
    pub(super) draining: Option<Instant>,
    /// Failure count last read from each data plane.
    pub(super) failures_seen: HashMap<usize, u64>,
    /// The data planes' view: failed attempts in consecutive reads.
    pub(super) passive: Health,
    pub(super) in_flight: HashMap<usize, u32>,
    /// Bumped when the replica's tasks are replaced, so stale reports are ignored.
    pub(super) gen: u64,
    pub(super) checks_failed: u64,
    pub(super) scrapes_failed: u64,
    pub(super) prewarm_requests: u64,
    /// Block budget calibrated from KV events, as last pushed.
    pub(super) budget: Option<u64>,
    /// Consecutive failed scrapes.
    pub(super) scrape_streak: u32,
    /// What the last answered scrape found, to log a change once.
    pub(super) seen: Seen,
}

/// What a replica's scrapes found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Seen {
    Nothing,
    Engine(Engine),
    /// A metrics page without any engine's load metrics.
    Unknown,
}

impl Seen {
    fn name(self) -> Option<&'static str> {
        match self {
            Seen::Nothing => None,
            Seen::Engine(e) => Some(e.name()),
            Seen::Unknown => Some("unknown"),
        }
    }
}

impl Replica {
    /// A replica discovered at `now`: nothing known of its health, no tasks yet
    /// (generation 0 until they start).
    pub(super) fn new(cfg: ReplicaConfig, rise: u32, fall: u32, now: Instant) -> Replica {
        // Presumed fine: one failed attempt must not take it out.
        let mut passive = Health::new(rise, fall, now);
        passive.observe(true, now);
        Replica {
            cfg,
            health: Health::new(rise, fall, now),
            scraped: None,
            promoted: None,
            promoting: false,
            draining: None,
            failures_seen: HashMap::new(),
            passive,
            in_flight: HashMap::new(),
            gen: 0,
            checks_failed: 0,
            scrapes_failed: 0,
            prewarm_requests: 0,
            budget: None,
            scrape_streak: 0,
            seen: Seen::Nothing,
        }
    }

    pub(super) fn up(&self) -> bool {
        self.health.is_healthy() && !self.passive.is_down()
    }

    /// The pool the data planes see: a promoted standby serves once pre-warmed.
    fn pushed_pool(&self) -> Pool {
        if self.promoted.is_some() && !self.promoting {
            Pool::Active
        } else {
            self.cfg.pool
        }
    }

    /// The budget the data planes' index gets: the engine's capacity, lowered
    /// to what its eviction events show it really keeps.
    fn kv_blocks(&self) -> Option<u64> {
        if let Some(shape) = self.slot_shape() {
            return Some(shape.blocks());
        }
        let cap = self.scraped.and_then(|s| s.kv_blocks);
        match (cap, self.budget) {
            (Some(c), Some(b)) => Some(c.min(b)),
            (None, Some(b)) => Some(b),
            (c, None) => c,
        }
    }

    fn kv_block_tokens(&self) -> Option<u32> {
        if self.slot_shape().is_some() {
            return Some(1);
        }
        self.scraped.and_then(|s| s.block_tokens)
    }

    /// A slot-based engine's shape, with its host cache as configured or, by
    /// default, its total context (the least llama.cpp's prompt cache keeps).
    fn slot_shape(&self) -> Option<SlotShape> {
        let s = self.scraped?;
        let (slots, slot_tokens) = (s.slots?, s.slot_tokens?);
        let host_tokens = self
            .cfg
            .host_cache_tokens
            .unwrap_or(u64::from(slots) * u64::from(slot_tokens));
        Some(SlotShape {
            slots,
            slot_tokens,
            host_tokens,
        })
    }

    /// The replica as pushed to the data planes.
    pub(super) fn spec(&self) -> ReplicaSpec {
        ReplicaSpec {
            url: self.cfg.url.clone(),
            models: self.cfg.models.clone(),
            weight: self.cfg.weight,
            pool: self.pushed_pool(),
            healthy: self.up() && self.draining.is_none(),
            kv_blocks: self.kv_blocks(),
            kv_block_tokens: self.kv_block_tokens(),
            kv_slots: self.slot_shape().map(|s| s.slots),
            kv_slot_tokens: self.slot_shape().map(|s| s.slot_tokens),
            kv_host_tokens: self.slot_shape().map(|s| s.host_tokens),
            max_in_flight: self.cfg.max_in_flight,
        }
    }

    /// The last scraped load, once a scrape has answered.
    pub(super) fn load(&self) -> Option<ReplicaLoad> {
        let s = self.scraped?;
        Some(ReplicaLoad {
            url: self.cfg.url.clone(),
            running: s.running.max(0.0).round() as u32,
            waiting: s.waiting.max(0.0).round() as u32,
            kv_usage: s.kv_usage as f32,
        })
    }

    /// The replica for `/metrics` and `/status`. `kv` is left for the runner,
    /// which holds the KV-event subscribers' counters.
    pub(super) fn view(&self) -> ReplicaView {
        ReplicaView {
            url: self.cfg.url.clone(),
            engine: self.cfg.engine,
            detected_engine: self.seen.name(),
            kv_slots: self.slot_shape().map(|s| s.slots),
            kv_slot_tokens: self.slot_shape().map(|s| s.slot_tokens),
            kv_host_tokens: self.slot_shape().map(|s| s.host_tokens),
            pool: self.pushed_pool(),
            configured_pool: self.cfg.pool,
            healthy: self.health.known().then(|| self.up()),
            draining: self.draining.is_some(),
            running: self.scraped.map_or(0.0, |s| s.running),
            waiting: self.scraped.map_or(0.0, |s| s.waiting),
            kv_usage: self.scraped.map_or(0.0, |s| s.kv_usage),
            kv_blocks: self.kv_blocks(),
            kv_block_tokens: self.kv_block_tokens(),
            checks_failed: self.checks_failed,
            scrapes_failed: self.scrapes_failed,
            prewarm_requests: self.prewarm_requests,
            kv_effective_blocks: self.budget,
            kv: None,
        }
    }
}

/// What a slot-based replica's budget is pushed as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SlotShape {
    slots: u32,
    slot_tokens: u32,
    host_tokens: u64,
}

impl SlotShape {
    /// Tokens held with every slot full and a full host cache: the block budget
    /// (in blocks of one token) behind the slot model.
    fn blocks(self) -> u64 {
        u64::from(self.slots) * u64::from(self.slot_tokens) + self.host_tokens
    }
}
