//! Mooncake trace parsing and lowering of trace entries to planned requests.
//!
//! Token counts are scaled to bytes as `block_bytes / 512` bytes per token so the sharing
//! structure survives while prompts stay small enough for a 2-core benchmark machine.

use std::io::BufRead;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

use super::plan::{Plan, PlannedRequest, Role, Segment, Session};

/// Tokens per `hash_id` block in the Mooncake traces.
pub const TRACE_BLOCK_TOKENS: u64 = 512;

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct TraceEntry {
    /// Arrival time in milliseconds from the start of the trace.
    pub timestamp: u64,
    pub input_length: u64,
    pub output_length: u64,
    pub hash_ids: Vec<u64>,
}

/// Reads lines `skip .. skip + n` (all remaining when `n` is `None`); blank lines are ignored.
pub fn load(path: &Path, skip: usize, n: Option<usize>) -> anyhow::Result<Vec<TraceEntry>> {
    let file = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    parse(std::io::BufReader::new(file), skip, n)
        .with_context(|| format!("parse {}", path.display()))
}

pub fn parse(
    reader: impl BufRead,
    skip: usize,
    n: Option<usize>,
) -> anyhow::Result<Vec<TraceEntry>> {
    let mut out = Vec::new();
    let lines = reader.lines().enumerate().filter(|(_, l)| match l {
        Ok(l) => !l.trim().is_empty(),
        Err(_) => true,
    });
    for (lineno, line) in lines.skip(skip).take(n.unwrap_or(usize::MAX)) {
        let line = line?;
        let entry: TraceEntry =
            serde_json::from_str(&line).with_context(|| format!("line {}", lineno + 1))?;
        anyhow::ensure!(
            !entry.hash_ids.is_empty(),
            "line {}: empty hash_ids",
            lineno + 1
        );
        out.push(entry);
    }
    Ok(out)
}

/// Token count of each block of `e`: 512 for all but the last, which holds the remainder
/// (at least one token, so inconsistent lines still produce a non-empty block).
pub fn block_tokens(e: &TraceEntry) -> Vec<u64> {
    let n = e.hash_ids.len() as u64;
    let last = e
        .input_length
        .saturating_sub(TRACE_BLOCK_TOKENS * (n - 1))
        .clamp(1, TRACE_BLOCK_TOKENS);
    (0..n)
        .map(|i| if i + 1 == n { last } else { TRACE_BLOCK_TOKENS })
        .collect()
}

/// Chat role of block `i` of `n`: block 0 is the system prompt, the rest alternate user /
/// assistant by position, and the last block is always the final user turn. Roles depend only
/// on the position (never on the request length) except for that last block, so a later turn of
/// the same conversation renders the shared blocks identically; when the last block lands on an
/// assistant position it merges into the preceding user message instead of breaking
/// alternation.
pub fn block_role(i: usize, n: usize) -> Role {
    if i == 0 && n > 1 {
        Role::System
    } else if i + 1 == n || i % 2 == 1 {
        Role::User
    } else {
        Role::Assistant
    }
}

/// 512 tokens at 1 byte each instead of ~4: a quarter of the real prompt size keeps the trace's
/// sharing structure while a replay fits on a small machine. It is also a multiple of
/// kvroute-sim's 64-byte cache block (16 tokens × 4 bytes), so trace block boundaries fall on
/// simulator block boundaries and completions-mode hits are not blurred by misalignment.
pub const DEFAULT_BLOCK_BYTES: usize = 512;

/// Trace outputs average ~340 tokens; 5 % keeps decode from dominating a routing benchmark.
pub const DEFAULT_MAX_TOKENS_SCALE: f64 = 0.05;

#[derive(Clone, Copy, Debug)]
pub struct LowerOptions {
    pub block_bytes: usize,
    pub speed: f64,
    pub max_tokens_scale: f64,
}

impl Default for LowerOptions {
    fn default() -> Self {
        Self {
            block_bytes: DEFAULT_BLOCK_BYTES,
            speed: 1.0,
            max_tokens_scale: DEFAULT_MAX_TOKENS_SCALE,
        }
    }
}

pub fn max_tokens(output_length: u64, scale: f64) -> u32 {
    ((output_length as f64 * scale).round() as u64).clamp(1, u32::MAX as u64) as u32
}

pub fn lower_entry(e: &TraceEntry, block_bytes: usize, max_tokens_scale: f64) -> PlannedRequest {
    let tokens = block_tokens(e);
    let n = e.hash_ids.len();
    let segments = e
        .hash_ids
        .iter()
        .zip(&tokens)
        .enumerate()
        .map(|(i, (&id, &tok))| Segment {
            id,
            bytes: scale_tokens(tok, block_bytes),
            full_bytes: block_bytes,
            weight: tok,
            role: block_role(i, n),
        })
        .collect();
    PlannedRequest {
        segments,
        max_tokens: max_tokens(e.output_length, max_tokens_scale),
    }
}

/// Bytes for `tokens` tokens when a 512-token block is `block_bytes` bytes (at least one byte).
pub fn scale_tokens(tokens: u64, block_bytes: usize) -> usize {
    ((tokens * block_bytes as u64 + TRACE_BLOCK_TOKENS / 2) / TRACE_BLOCK_TOKENS).max(1) as usize
}

/// A conversation is identified by its second block: block 0 is the service-wide system prompt,
/// block 1 is the first block unique to the conversation and stays put in later turns.
pub fn session_id(e: &TraceEntry) -> String {
    format!("conv-{}", e.hash_ids.get(1).unwrap_or(&e.hash_ids[0]))
}

pub fn plan(entries: &[TraceEntry], opts: LowerOptions) -> Plan {
    let t0 = entries.first().map_or(0, |e| e.timestamp);
    let sessions = entries
        .iter()
        .map(|e| Session {
            start: Duration::from_secs_f64(
                (e.timestamp.saturating_sub(t0)) as f64 / 1e3 / opts.speed,
            ),
            id: session_id(e),
            requests: vec![lower_entry(e, opts.block_bytes, opts.max_tokens_scale)],
        })
        .collect::<Vec<_>>();
    let span = sessions.last().map_or(0.0, |s| s.start.as_secs_f64());
    // n arrivals span n − 1 intervals. A schedule that is due all at once has no finite rate;
    // 0 stands for that and the report says so.
    let target_rps = if span > 0.0 {
        (sessions.len().saturating_sub(1)) as f64 / span
    } else {
        0.0
    };
    Plan {
        sessions,
        target_rps,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(ts: u64, input: u64, ids: &[u64]) -> TraceEntry {
        TraceEntry {
            timestamp: ts,
            input_length: input,
            output_length: 100,
            hash_ids: ids.to_vec(),
        }
    }

    #[test]
    fn parses_skip_and_n() {
        let text = "{\"timestamp\": 0, \"input_length\": 600, \"output_length\": 5, \"hash_ids\": [0, 1]}\n\n\
                    {\"timestamp\": 5, \"input_length\": 10, \"output_length\": 5, \"hash_ids\": [0]}\n\
                    {\"timestamp\": 9, \"input_length\": 10, \"output_length\": 5, \"hash_ids\": [3]}\n";
        let all = parse(text.as_bytes(), 0, None).unwrap();
        assert_eq!(all.len(), 3);
        let mid = parse(text.as_bytes(), 1, Some(1)).unwrap();
        assert_eq!(mid, vec![entry(5, 10, &[0]).with_output(5)]);
    }

    impl TraceEntry {
        fn with_output(mut self, o: u64) -> Self {
            self.output_length = o;
            self
        }
    }

    #[test]
    fn last_block_holds_the_remainder() {
        assert_eq!(
            block_tokens(&entry(
                0,
                6955,
                &[46, 47, 48, 2353, 2354, 1, 2, 3, 4, 5, 6, 7, 8, 9]
            )),
            {
                let mut v = vec![512; 13];
                v.push(6955 - 512 * 13);
                v
            }
        );
        assert_eq!(block_tokens(&entry(0, 512, &[1])), vec![512]);
        // Inconsistent line (fewer tokens than blocks): still a non-empty last block.
        assert_eq!(block_tokens(&entry(0, 100, &[1, 2, 3])), vec![512, 512, 1]);
    }

    #[test]
    fn bytes_scale_with_block_bytes() {
        assert_eq!(scale_tokens(512, 512), 512);
        assert_eq!(scale_tokens(256, 512), 256);
        assert_eq!(scale_tokens(256, 2048), 1024);
        assert_eq!(scale_tokens(1, 64), 1);
    }

    #[test]
    fn max_tokens_scaled_min_one() {
        assert_eq!(max_tokens(500, 0.05), 25);
        assert_eq!(max_tokens(5, 0.05), 1);
        assert_eq!(max_tokens(0, 1.0), 1);
    }

    #[test]
    fn roles_alternate_and_end_with_user() {
        let roles = |n| (0..n).map(|i| block_role(i, n)).collect::<Vec<_>>();
        use Role::*;
        assert_eq!(roles(1), vec![User]);
        assert_eq!(roles(2), vec![System, User]);
        assert_eq!(roles(3), vec![System, User, User]);
        assert_eq!(roles(4), vec![System, User, Assistant, User]);
        assert_eq!(roles(5), vec![System, User, Assistant, User, User]);
    }

    #[test]
    fn schedule_divides_by_speed() {
        let es = [
            entry(1000, 10, &[0]),
            entry(1500, 10, &[0]),
            entry(3000, 10, &[0, 1]),
        ];
        let p = plan(
            &es,
            LowerOptions {
                block_bytes: 512,
                speed: 2.0,
                max_tokens_scale: 1.0,
            },
        );
        let starts: Vec<_> = p.sessions.iter().map(|s| s.start.as_millis()).collect();
        assert_eq!(starts, vec![0, 250, 1000]);
        assert!((p.target_rps - 2.0).abs() < 1e-9);
        assert_eq!(p.sessions[2].id, "conv-1");
    }
}
