//! Progress of a long run on stderr: requests sent, completed and failed, time elapsed and an
//! estimate of what is left, read from counters the load loop itself updates.
//!
//! On a terminal one line is redrawn in place. That is indicatif's job rather than a
//! hand-written `\r`: it fits the line to the terminal's width (a line that wraps leaves a copy
//! of its first rows on every redraw), throttles redraws and clears the line at the end.
//! Anywhere else (CI, pipes, log files) a plain line every `interval`, never a carriage return.
//! The `json` style writes the bare counters instead, for a parent process that draws the
//! progress itself (xtask runs `kvroute-load` as a child and shows its counters).
//!
//! Reports go to stdout and progress to stderr only, so tools reading a report see the same
//! bytes with or without progress.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

/// How progress is shown: `KVROUTE_PROGRESS` / `kvroute-load --progress`.
pub const STYLE_ENV: &str = "KVROUTE_PROGRESS";
/// Seconds between two plain (or json) lines: `KVROUTE_PROGRESS_INTERVAL_S`.
pub const INTERVAL_ENV: &str = "KVROUTE_PROGRESS_INTERVAL_S";
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
/// Redraw period of the terminal line.
const BAR_TICK: Duration = Duration::from_millis(200);

/// Live counts of a run, updated by the load loop as requests leave and finish.
#[derive(Debug, Default)]
pub struct Counters {
    sent: AtomicU64,
    completed: AtomicU64,
    errors: AtomicU64,
}

impl Counters {
    pub fn new() -> Arc<Counters> {
        Arc::new(Counters::default())
    }

    /// A request left.
    pub fn sent(&self) {
        self.sent.fetch_add(1, Ordering::Relaxed);
    }

    /// A request finished: answered in full (`ok`) or failed.
    pub fn finished(&self, ok: bool) {
        let c = if ok { &self.completed } else { &self.errors };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            sent: self.sent.load(Ordering::Relaxed),
            completed: self.completed.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }

    /// Replaces the counts with ones counted elsewhere (a child process's run).
    pub fn set(&self, s: Snapshot) {
        self.sent.store(s.sent, Ordering::Relaxed);
        self.completed.store(s.completed, Ordering::Relaxed);
        self.errors.store(s.errors, Ordering::Relaxed);
    }
}

/// The counts at one moment. `completed` and `errors` are disjoint: a request that finished
/// is one or the other.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub sent: u64,
    pub completed: u64,
    pub errors: u64,
}

#[derive(Serialize, Deserialize)]
struct Wire {
    progress: Snapshot,
}

impl Snapshot {
    pub fn finished(&self) -> u64 {
        self.completed + self.errors
    }

    /// One line of the `json` style: `{"progress":{"sent":…,"completed":…,"errors":…}}`.
    pub fn to_wire(self) -> String {
        serde_json::to_string(&Wire { progress: self }).expect("plain struct serializes")
    }

    /// The counts of a line written by [`Snapshot::to_wire`]; `None` for any other line.
    pub fn from_wire(line: &str) -> Option<Snapshot> {
        let line = line.trim();
        if !line.starts_with("{\"progress\"") {
            return None;
        }
        serde_json::from_str::<Wire>(line).ok().map(|w| w.progress)
    }
}

/// What is running and how much of it is planned.
#[derive(Clone, Debug)]
pub struct Job {
    /// Which phase is running, e.g. `demo kvroute round-robin`.
    pub label: String,
    /// Requests the run plans to send; `None` for a run bounded by time instead.
    pub planned: Option<u64>,
    /// Time from the start by which the schedule has sent everything: a replay's last
    /// timestamp divided by its speed, a fixed-duration load's duration. `None` when requests
    /// leave as fast as answers come back.
    pub schedule: Option<Duration>,
    /// False when the load runs in a tool that reports its counts only at the end (wrk): the
    /// line then shows the time alone.
    pub counted: bool,
}

impl Job {
    pub fn new(label: impl Into<String>) -> Job {
        Job {
            label: label.into(),
            planned: None,
            schedule: None,
            counted: true,
        }
    }

    pub fn planned(mut self, requests: u64) -> Job {
        self.planned = Some(requests);
        self
    }

    pub fn schedule(mut self, span: Duration) -> Job {
        self.schedule = Some(span);
        self
    }

    pub fn uncounted(mut self) -> Job {
        self.counted = false;
        self
    }
}

/// How long is left: the later of the schedule's end and the time the requests still
/// planned take at the completion rate so far. The schedule alone misses a server that falls
/// behind; the rate alone misses a replay whose arrivals are still due.
pub fn eta(job: &Job, s: Snapshot, elapsed: Duration) -> Option<Duration> {
    let by_schedule = job.schedule.map(|end| end.saturating_sub(elapsed));
    let by_rate = match job.planned {
        Some(planned) if job.counted && s.finished() > 0 => {
            let left = u128::from(planned.saturating_sub(s.finished()));
            let nanos = elapsed.as_nanos() * left / u128::from(s.finished());
            Some(Duration::from_nanos(
                u64::try_from(nanos).unwrap_or(u64::MAX),
            ))
        }
        _ => None,
    };
    match (by_schedule, by_rate) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// `12 s`, `3 min 05 s`, `1 h 02 min`.
pub fn human(d: Duration) -> String {
    let s = d.as_secs_f64().round() as u64;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {:02} s", s / 60, s % 60),
        _ => format!("{} h {:02} min", s / 3600, s % 3600 / 60),
    }
}

/// The counts: `sent 120/500, completed 110, errors 2`.
fn counts(job: &Job, s: Snapshot) -> String {
    let planned = job.planned.map(|p| format!("/{p}")).unwrap_or_default();
    format!(
        "sent {}{planned}, completed {}, errors {}",
        s.sent, s.completed, s.errors
    )
}

/// The line without its label: counts, elapsed time and what is left, e.g.
/// `sent 120/500, completed 110, errors 2, 12 s elapsed, ~40 s left`.
pub fn status(job: &Job, s: Snapshot, elapsed: Duration) -> String {
    let mut out = if job.counted {
        format!("{}, ", counts(job, s))
    } else {
        String::new()
    };
    out.push_str(&format!("{} elapsed", human(elapsed)));
    if let Some(left) = eta(job, s, elapsed) {
        out.push_str(&format!(", ~{} left", human(left)));
    }
    if !job.counted {
        out.push_str(" (counts come at the end)");
    }
    out
}

/// The terminal line's text after the label and the bar, time first so that a narrow
/// terminal cuts the counts rather than what is left: `12 s, ~48 s left; sent 110/500, …`.
fn bar_message(job: &Job, s: Snapshot, elapsed: Duration) -> String {
    let mut out = human(elapsed);
    if let Some(left) = eta(job, s, elapsed) {
        out.push_str(&format!(", ~{} left", human(left)));
    }
    if job.counted {
        out.push_str(&format!("; {}", counts(job, s)));
    }
    out
}

/// One plain progress line: `label: status`.
pub fn line(job: &Job, s: Snapshot, elapsed: Duration) -> String {
    format!("{}: {}", job.label, status(job, s, elapsed))
}

/// The line a finished job leaves behind: `label: done in 62 s: sent 500/500, …`.
pub fn final_line(job: &Job, s: Snapshot, elapsed: Duration) -> String {
    let mut out = format!("{}: done in {}", job.label, human(elapsed));
    if job.counted {
        out.push_str(&format!(": {}", counts(job, s)));
    }
    out
}

/// Where the bar stands: finished of planned requests, else elapsed of the schedule's
/// milliseconds; `None` for a spinner.
fn bar_position(job: &Job, s: Snapshot, elapsed: Duration) -> Option<(u64, u64)> {
    match (job.planned, job.schedule) {
        (Some(p), _) if job.counted => Some((s.finished().min(p), p)),
        (_, Some(span)) => {
            let total = span.as_millis().max(1) as u64;
            Some(((elapsed.as_millis() as u64).min(total), total))
        }
        _ => None,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Style {
    /// A line redrawn in place when stderr is a terminal, plain lines otherwise.
    Auto,
    /// A plain line every interval.
    Plain,
    /// The counters as one JSON object a line, every interval (for a parent process).
    Json,
    /// Nothing.
    Off,
}

#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub style: Style,
    /// Between two plain or json lines.
    pub interval: Duration,
}

impl Options {
    pub const OFF: Options = Options {
        style: Style::Off,
        interval: DEFAULT_INTERVAL,
    };

    /// From `KVROUTE_PROGRESS` (auto, plain, json or off; default auto) and
    /// `KVROUTE_PROGRESS_INTERVAL_S` (default 10).
    pub fn from_env() -> anyhow::Result<Options> {
        let style = match std::env::var(STYLE_ENV) {
            Ok(v) => parse_style(&v)?,
            Err(_) => Style::Auto,
        };
        let interval = match std::env::var(INTERVAL_ENV) {
            Ok(v) => parse_interval(&v)?,
            Err(_) => DEFAULT_INTERVAL,
        };
        Ok(Options { style, interval })
    }
}

fn parse_style(v: &str) -> anyhow::Result<Style> {
    use clap::ValueEnum;
    Style::from_str(v.trim(), true)
        .map_err(|_| anyhow::anyhow!("{STYLE_ENV}={v:?}: expected auto, plain, json or off"))
}

/// Seconds, positive and finite.
pub fn parse_interval(v: &str) -> anyhow::Result<Duration> {
    let secs: f64 = v
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("progress interval {v:?}: expected seconds, e.g. 10"))?;
    anyhow::ensure!(
        secs.is_finite() && secs > 0.0,
        "progress interval {v:?}: must be a positive number of seconds"
    );
    Ok(Duration::from_secs_f64(secs))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Drawn {
    Bar,
    Plain,
    Json,
}

/// Shows a job's progress on stderr from a thread of its own until [`Progress::finish`]
/// (which leaves the final line) or drop (which only clears the terminal line: the caller
/// reports the failure).
pub struct Progress {
    stop: Option<mpsc::Sender<bool>>,
    thread: Option<JoinHandle<()>>,
}

impl Progress {
    pub fn start(job: Job, counters: Arc<Counters>, opts: Options) -> Progress {
        let drawn = match opts.style {
            Style::Off => None,
            Style::Auto if std::io::stderr().is_terminal() => Some(Drawn::Bar),
            Style::Auto | Style::Plain => Some(Drawn::Plain),
            Style::Json => Some(Drawn::Json),
        };
        let Some(drawn) = drawn else {
            return Progress {
                stop: None,
                thread: None,
            };
        };
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("progress".into())
            .spawn(move || report(job, &counters, drawn, opts.interval, rx));
        match thread {
            Ok(t) => Progress {
                stop: Some(tx),
                thread: Some(t),
            },
            Err(e) => {
                eprintln!("warning: no progress display ({e})");
                Progress {
                    stop: None,
                    thread: None,
                }
            }
        }
    }

    /// Stops the display and leaves the final line (the counts as they are now).
    pub fn finish(mut self) {
        self.stop(true);
    }

    fn stop(&mut self, finished: bool) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(finished);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop(false);
    }
}

fn report(
    job: Job,
    counters: &Counters,
    drawn: Drawn,
    interval: Duration,
    stop: mpsc::Receiver<bool>,
) {
    let start = Instant::now();
    let bar = (drawn == Drawn::Bar).then(|| new_bar(&job));
    let tick = if bar.is_some() { BAR_TICK } else { interval };
    let finished = loop {
        match stop.recv_timeout(tick) {
            Ok(finished) => break finished,
            Err(RecvTimeoutError::Disconnected) => break false,
            Err(RecvTimeoutError::Timeout) => {}
        }
        let s = counters.snapshot();
        let elapsed = start.elapsed();
        match (&bar, drawn) {
            (Some(bar), _) => {
                if let Some((pos, len)) = bar_position(&job, s, elapsed) {
                    bar.set_length(len);
                    bar.set_position(pos);
                }
                bar.set_message(bar_message(&job, s, elapsed));
            }
            (None, Drawn::Json) => eprintln!("{}", s.to_wire()),
            (None, _) => eprintln!("{}", line(&job, s, elapsed)),
        }
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if finished {
        let s = counters.snapshot();
        match drawn {
            Drawn::Json => eprintln!("{}", s.to_wire()),
            Drawn::Bar | Drawn::Plain => eprintln!("{}", final_line(&job, s, start.elapsed())),
        }
    }
}

fn new_bar(job: &Job) -> ProgressBar {
    let with_bar = bar_position(job, Snapshot::default(), Duration::ZERO).is_some();
    let template = if with_bar {
        "{spinner} {prefix} [{bar:16}] {wide_msg}"
    } else {
        "{spinner} {prefix} {wide_msg}"
    };
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(template)
            .expect("the template is valid")
            .progress_chars("=> "),
    );
    bar.set_prefix(job.label.clone());
    bar.enable_steady_tick(BAR_TICK);
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(sent: u64, completed: u64, errors: u64) -> Snapshot {
        Snapshot {
            sent,
            completed,
            errors,
        }
    }

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn eta_is_the_later_of_the_schedule_and_the_completion_rate() {
        let replay = Job::new("demo").planned(500).schedule(S(60));
        // On schedule: 100 finished in 12 s, 400 left at that rate is 48 s, the schedule 48 s.
        assert_eq!(eta(&replay, snap(110, 98, 2), S(12)), Some(S(48)));
        // Falling behind: 50 finished in 30 s leaves 450 at 5/3 per s, longer than the 30 s of
        // schedule still due.
        assert_eq!(eta(&replay, snap(200, 50, 0), S(30)), Some(S(270)));
        // Nothing finished yet: only the schedule says anything.
        assert_eq!(eta(&replay, snap(10, 0, 0), S(5)), Some(S(55)));
        // Past the schedule, in-flight requests drain at the rate so far.
        assert_eq!(eta(&replay, snap(500, 450, 0), S(90)), Some(S(10)));
        assert_eq!(eta(&replay, snap(500, 499, 1), S(95)), Some(S(0)));

        // Closed loop: the rate alone; before anything finished, no estimate.
        let fill = Job::new("fill").planned(1000);
        assert_eq!(eta(&fill, snap(8, 0, 0), S(1)), None);
        assert_eq!(eta(&fill, snap(258, 250, 0), S(10)), Some(S(30)));
        // Time-bounded load without a planned count, and wrk's uncounted runs: the schedule.
        let timed = Job::new("load").schedule(S(10));
        assert_eq!(eta(&timed, snap(9000, 8990, 0), S(4)), Some(S(6)));
        let wrk = Job::new("wrk").planned(100).schedule(S(5)).uncounted();
        assert_eq!(eta(&wrk, Snapshot::default(), S(2)), Some(S(3)));
        assert_eq!(eta(&Job::new("open"), snap(3, 1, 0), S(1)), None);
    }

    #[test]
    fn lines_show_counts_time_and_what_is_left() {
        let job = Job::new("demo kvroute round-robin")
            .planned(500)
            .schedule(S(60));
        assert_eq!(
            line(&job, snap(110, 98, 2), S(12)),
            "demo kvroute round-robin: sent 110/500, completed 98, errors 2, \
             12 s elapsed, ~48 s left"
        );
        assert_eq!(
            final_line(&job, snap(500, 498, 2), Duration::from_millis(61_600)),
            "demo kvroute round-robin: done in 1 min 02 s: sent 500/500, completed 498, errors 2"
        );
        let timed = Job::new("footprint kvroute: load").schedule(S(10));
        assert_eq!(
            line(&timed, snap(9000, 8990, 0), S(4)),
            "footprint kvroute: load: sent 9000, completed 8990, errors 0, 4 s elapsed, ~6 s left"
        );
        let wrk = Job::new("closed loop nginx").schedule(S(5)).uncounted();
        assert_eq!(
            line(&wrk, Snapshot::default(), S(2)),
            "closed loop nginx: 2 s elapsed, ~3 s left (counts come at the end)"
        );
        assert_eq!(
            final_line(&wrk, Snapshot::default(), S(5)),
            "closed loop nginx: done in 5 s"
        );
        let open = Job::new("x");
        assert_eq!(
            status(&open, snap(3, 1, 0), S(1)),
            "sent 3, completed 1, errors 0, 1 s elapsed"
        );
        assert_eq!(
            bar_message(&job, snap(110, 98, 2), S(12)),
            "12 s, ~48 s left; sent 110/500, completed 98, errors 2"
        );
        assert_eq!(
            bar_message(&wrk, Snapshot::default(), S(2)),
            "2 s, ~3 s left"
        );
        // A plain line never redraws in place.
        assert!(!line(&job, snap(1, 0, 0), S(1)).contains('\r'));
    }

    #[test]
    fn human_durations() {
        assert_eq!(human(Duration::ZERO), "0 s");
        assert_eq!(human(Duration::from_millis(59_400)), "59 s");
        assert_eq!(human(Duration::from_millis(59_600)), "1 min 00 s");
        assert_eq!(human(S(3599)), "59 min 59 s");
        assert_eq!(human(S(3600 + 125)), "1 h 02 min");
    }

    #[test]
    fn bar_tracks_requests_or_else_the_schedule() {
        let replay = Job::new("r").planned(500).schedule(S(60));
        assert_eq!(bar_position(&replay, snap(9, 7, 1), S(3)), Some((8, 500)));
        let timed = Job::new("t").schedule(S(10));
        assert_eq!(
            bar_position(&timed, snap(5, 5, 0), S(4)),
            Some((4000, 10_000))
        );
        assert_eq!(
            bar_position(&timed, snap(5, 5, 0), S(12)),
            Some((10_000, 10_000))
        );
        assert_eq!(bar_position(&Job::new("s"), snap(5, 5, 0), S(4)), None);
    }

    #[test]
    fn wire_lines_round_trip_and_other_lines_are_not_progress() {
        let s = snap(7, 5, 1);
        assert_eq!(
            s.to_wire(),
            r#"{"progress":{"sent":7,"completed":5,"errors":1}}"#
        );
        assert_eq!(Snapshot::from_wire(&s.to_wire()), Some(s));
        assert_eq!(Snapshot::from_wire(&format!("{}\n", s.to_wire())), Some(s));
        assert_eq!(
            Snapshot::from_wire("2026-01-01T00:00:00Z WARN requests left behind schedule"),
            None
        );
        assert_eq!(Snapshot::from_wire(r#"{"progress":"no"}"#), None);
    }

    #[test]
    fn counters_count_what_the_loop_reports() {
        let c = Counters::new();
        c.sent();
        c.sent();
        c.finished(true);
        c.finished(false);
        c.sent();
        assert_eq!(c.snapshot(), snap(3, 1, 1));
        c.set(snap(10, 9, 0));
        assert_eq!(c.snapshot(), snap(10, 9, 0));
    }

    #[test]
    fn settings_parse_with_clear_errors() {
        assert_eq!(parse_style("PLAIN").unwrap(), Style::Plain);
        assert_eq!(parse_style("off").unwrap(), Style::Off);
        let e = parse_style("fancy").unwrap_err().to_string();
        assert!(e.contains("KVROUTE_PROGRESS") && e.contains("auto, plain, json or off"));
        assert_eq!(parse_interval("0.5").unwrap(), Duration::from_millis(500));
        assert!(parse_interval("0").is_err());
        assert!(parse_interval("-1").is_err());
        assert!(parse_interval("soon").is_err());
        assert!(parse_interval("inf").is_err());
    }
}
