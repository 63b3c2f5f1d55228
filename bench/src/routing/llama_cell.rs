//! The robustness matrix's real-engine cell: kvroute's kv-aware policy beside smg's cache_aware
//! (and sglang-router where installed) on real llama.cpp replicas, in the same run. It is the
//! llama bench's own comparison ([`llama_routing::compare`]), so the cell and `cargo xtask bench
//! routing --engine llama-cpp` measure the same way.
//!
//! A real engine cannot be replayed in simulated time, and a machine may have no llama.cpp
//! server and no way to build one: then the cell is reported as skipped, with the reason,
//! rather than left out.

use serde::Serialize;

use super::matrix::{CellFigures, Figures, KVROUTE, SMG};
use super::{Opts, Peers};
use crate::fleet::Bins;
use crate::llama_routing::{self, Comparison, Routers, Summarized};

/// Why `--offline` has no figures for this cell.
pub const OFFLINE: &str =
    "real llama.cpp replicas cannot be replayed in simulated time; run without --offline";

/// The cell's result: what it measured, or why it has no figures.
#[derive(Serialize)]
pub struct LlamaCell {
    pub name: String,
    pub description: String,
    #[serde(flatten)]
    pub outcome: Outcome,
}

#[derive(Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    Ran(Box<Comparison>),
    Skipped { reason: String },
}

/// Runs the cell with the matrix's options `o` (kvroute's kv-aware policy alone, the command
/// line's peers and `--llama-*` workload) and the binaries the rest of the matrix uses.
pub fn run(name: &str, what: &str, o: &Opts, bins: &Bins) -> anyhow::Result<LlamaCell> {
    let cell = |outcome| LlamaCell {
        name: name.to_owned(),
        description: what.to_owned(),
        outcome,
    };
    // Checked before the server is looked for: bad options are the caller's error, not a skip.
    o.engine.validate()?;
    let llama = match crate::llama::ensure() {
        Ok(l) => l,
        Err(e) => {
            let reason = format!("no llama.cpp server: {e:#}");
            eprintln!("\n== {name}: skipped: {reason}");
            return Ok(cell(Outcome::Skipped { reason }));
        }
    };
    let setup = llama_routing::setup(&o.engine, bins.clone(), llama)?;
    let routers = Routers {
        policies: &o.policies,
        smg_policies: &o.smg_policies,
        sglang_policies: &o.sglang_policies,
        python: o.python.as_deref(),
        kvroute_workers: o.kvroute_workers,
    };
    let comparison = llama_routing::compare(&setup, &routers, o.engine.llama_runs)?;
    Ok(cell(Outcome::Ran(Box::new(comparison))))
}

impl From<&Summarized> for Figures {
    fn from(s: &Summarized) -> Figures {
        Figures {
            hit_ratio: s.hit_ratio,
            ttft_p50_ms: s.ttft_p50_ms,
            ttft_p99_ms: s.ttft_p99_ms,
            imbalance: s.request_imbalance,
            errors: s.errors,
        }
    }
}

/// Why the llama.cpp cell has no verdict; its text is what the summary says instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoVerdict {
    #[error("skipped: {0}")]
    Skipped(String),
    #[error("no verdict: {0} did not run")]
    DidNotRun(String),
    /// A router whose every run failed, with the row's note.
    #[error("no verdict: {router} {note}")]
    NoRuns { router: String, note: String },
}

impl LlamaCell {
    /// What the verdict reads: kvroute's and smg's figures (means over the runs), or why
    /// there is none. A real fleet has no model to compute a TTFT floor from.
    pub fn figures(&self) -> Result<CellFigures, NoVerdict> {
        let c = match &self.outcome {
            Outcome::Skipped { reason } => return Err(NoVerdict::Skipped(reason.clone())),
            Outcome::Ran(c) => c,
        };
        let figures = |label: &str| -> Result<Figures, NoVerdict> {
            let s = c
                .summary
                .iter()
                .find(|s| s.router == label)
                .ok_or_else(|| NoVerdict::DidNotRun(label.to_owned()))?;
            match &s.note {
                Some(note) if s.runs == 0 => Err(NoVerdict::NoRuns {
                    router: label.to_owned(),
                    note: note.clone(),
                }),
                _ => Ok(Figures::from(s)),
            }
        };
        Ok(CellFigures {
            cell: self.name.clone(),
            kvroute: figures(KVROUTE)?,
            smg: figures(SMG)?,
            kvroute_x2_hit: None,
            floor_p99_ms: None,
        })
    }

    /// The peer gateways' versions that ran in this cell.
    pub fn peers(&self) -> Peers {
        match &self.outcome {
            Outcome::Ran(c) => Peers {
                smg: c.smg.clone(),
                sglang_router: c.sglang_router.clone(),
            },
            Outcome::Skipped { .. } => Peers::default(),
        }
    }

    /// `cell / router` of every failed row, in any run.
    pub fn failed_rows(&self) -> Vec<String> {
        let Outcome::Ran(c) = &self.outcome else {
            return Vec::new();
        };
        c.runs
            .iter()
            .flatten()
            .filter(|r| matches!(r.outcome, llama_routing::Outcome::Failed { .. }))
            .map(|r| format!("{} / {}", self.name, r.router))
            .collect()
    }

    /// The cell's section of the report: the workload and replicas, then the llama bench's
    /// tables, or the reason it was skipped.
    pub fn markdown(&self) -> String {
        match &self.outcome {
            Outcome::Skipped { reason } => format!(
                "## {}\n\n{}: skipped: {reason}\n",
                self.name, self.description
            ),
            Outcome::Ran(c) => format!(
                "## {}\n\n{}: {}. {} One infinite cache would hit {:.1} % of the prompt \
                 bytes.\n\n{}",
                self.name,
                self.description,
                c.workload,
                llama_routing::METHOD,
                c.ideal_hit_ratio * 100.0,
                c.markdown_tables("###")
            ),
        }
    }

    /// The cell for the terminal: its summary table, or the reason it was skipped.
    pub fn terminal(&self) -> String {
        match &self.outcome {
            Outcome::Skipped { reason } => format!("{} cell: skipped: {reason}\n", self.name),
            Outcome::Ran(c) => format!(
                "{} cell\n  {}: {}\n{}",
                self.name,
                self.description,
                c.workload,
                llama_routing::summary_table(&c.summary, false)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::llama::{EngineCounts, EngineMeasured, LlamaSpec};
    use crate::llama_routing::Row;
    use kvroute_load::Summary;

    fn ran(runs: Vec<Vec<Row>>, summary: Vec<Summarized>) -> LlamaCell {
        LlamaCell {
            name: "llama-cpp".into(),
            description: "real replicas".into(),
            outcome: Outcome::Ran(Box::new(Comparison {
                llama_cpp: crate::llama::VERSION,
                smg: Some("1.13.0".into()),
                sglang_router: None,
                workload: "36 chat requests".into(),
                ideal_hit_ratio: 0.75,
                replicas: LlamaSpec {
                    replicas: 2,
                    ctx: 16384,
                    slots: 4,
                },
                summary,
                runs,
            })),
        }
    }

    fn measured(router: &str) -> Row {
        Row {
            router: router.into(),
            outcome: llama_routing::Outcome::Ok(Box::new(EngineMeasured {
                client: Summary::default(),
                replicas: EngineCounts {
                    hit_ratio: 0.5,
                    per_replica_requests: [("r0".into(), 30), ("r1".into(), 10)].into(),
                    request_imbalance: 1.5,
                    ..Default::default()
                },
            })),
        }
    }

    #[test]
    fn the_section_has_the_llama_tables_and_failures_are_named() {
        let failed = Row {
            router: SMG.into(),
            outcome: llama_routing::Outcome::Failed {
                error: "smg died\nlog: x".into(),
            },
        };
        let c = ran(vec![vec![measured(KVROUTE), failed]], Vec::new());
        let md = c.markdown();
        assert!(
            md.starts_with("## llama-cpp\n\nreal replicas: 36 chat requests."),
            "{md}"
        );
        assert!(md.contains("75.0 % of the prompt bytes"), "{md}");
        assert!(md.contains("### Run 1"), "{md}");
        // The run's table: kvroute's request shares and max/mean, smg's failure.
        assert!(md.contains("| 75/25 % | 1.50 |"), "{md}");
        assert!(
            md.contains(&format!("| {SMG} | FAILED: smg died |")),
            "{md}"
        );
        assert_eq!(c.failed_rows(), [format!("llama-cpp / {SMG}")]);
        // The report's notes name the gateways that ran here too.
        assert_eq!(c.peers().smg.as_deref(), Some("1.13.0"));
        // No smg figures: no verdict, and the summary says why.
        assert_eq!(
            c.figures().err().map(|e| e.to_string()).as_deref(),
            Some("no verdict: kvroute kv-aware did not run")
        );
    }

    #[test]
    fn a_skipped_cell_says_why_everywhere() {
        let c = LlamaCell {
            name: "llama-cpp".into(),
            description: "real replicas".into(),
            outcome: Outcome::Skipped {
                reason: "no llama.cpp server: no cmake".into(),
            },
        };
        assert_eq!(
            c.figures().err(),
            Some(NoVerdict::Skipped("no llama.cpp server: no cmake".into()))
        );
        assert!(c
            .markdown()
            .contains("real replicas: skipped: no llama.cpp server: no cmake"));
        assert_eq!(
            c.terminal(),
            "llama-cpp cell: skipped: no llama.cpp server: no cmake\n"
        );
        assert!(c.failed_rows().is_empty());
        assert!(c.peers().smg.is_none());
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["status"], "skipped");
        assert_eq!(json["name"], "llama-cpp");
    }
}
