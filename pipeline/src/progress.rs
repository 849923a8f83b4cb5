//! Progress of a long job on stderr: a bar on a terminal, and in a batch log (stderr a file or a
//! pipe, as under Slurm or Kubernetes) a line every interval — rows, rows/s, bytes/s, ETA,
//! quarantined rows — as text, or as JSON for log collectors.
//!
//! A batch log otherwise shows nothing until a job ends, which on a billion-row corpus is hours.
//! The lines come from a thread of their own that wakes once per interval, so counting stays
//! two atomic adds per batch. A job that ends before its first interval writes no line (short
//! jobs and tests keep their output); one that wrote any ends with a `done` line. How progress
//! is shown is set once per process ([`configure`]), from the binaries' `--progress` and
//! `--progress-interval` flags.

use std::fmt;
use std::io::{IsTerminal, Write};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How a job shows its progress on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProgressMode {
    /// A bar on a terminal; text lines otherwise.
    #[default]
    Auto,
    /// Text lines, even on a terminal.
    Text,
    /// JSON lines, one object per line.
    Json,
    /// Nothing.
    None,
}

impl ProgressMode {
    /// Every mode's name, as `--progress` takes it.
    pub const NAMES: [&'static str; 4] = ["auto", "text", "json", "none"];
}

impl FromStr for ProgressMode {
    type Err = String;
    fn from_str(name: &str) -> Result<Self, String> {
        match name {
            "auto" => Ok(ProgressMode::Auto),
            "text" => Ok(ProgressMode::Text),
            "json" => Ok(ProgressMode::Json),
            "none" => Ok(ProgressMode::None),
            other => Err(format!("unknown progress mode `{other}` (one of {})", ProgressMode::NAMES.join(", "))),
        }
    }
}

impl fmt::Display for ProgressMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let index = match self {
            ProgressMode::Auto => 0,
            ProgressMode::Text => 1,
            ProgressMode::Json => 2,
            ProgressMode::None => 3,
        };
        f.write_str(ProgressMode::NAMES[index])
    }
}

/// How every [`Progress`] of this process shows itself.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProgressSettings {
    pub mode: ProgressMode,
    /// Time between two lines.
    pub interval: Duration,
}

impl Default for ProgressSettings {
    fn default() -> Self {
        ProgressSettings { mode: ProgressMode::Auto, interval: Duration::from_secs(30) }
    }
}

static SETTINGS: OnceLock<ProgressSettings> = OnceLock::new();

/// Sets how this process's jobs show progress; the first call wins (the binary's `main`, from
/// its flags). Without a call, [`ProgressSettings::default`].
pub fn configure(settings: ProgressSettings) {
    let _ = SETTINGS.set(settings);
}

fn settings() -> ProgressSettings {
    SETTINGS.get().copied().unwrap_or_default()
}

/// The rows (and their bytes) a job has read so far, shown as [`configure`]d.
pub struct Progress {
    shared: Arc<Shared>,
    bar: Option<ProgressBar>,
    reporter: Mutex<Option<JoinHandle<()>>>,
}

struct Shared {
    label: String,
    total: Option<u64>,
    rows: AtomicU64,
    bytes: AtomicU64,
    quarantined: AtomicU64,
    started: Instant,
    json: bool,
    interval: Duration,
    /// Set when the job has ended: the reporter stops.
    stopped: Mutex<bool>,
    wake: Condvar,
    /// Lines written so far.
    lines: AtomicU64,
    out: Mutex<Box<dyn Write + Send>>,
}

impl Progress {
    /// `total` rows if known (then an ETA is shown).
    pub fn new(label: &str, total: Option<u64>) -> Self {
        let settings = settings();
        let terminal = std::io::stderr().is_terminal();
        match settings.mode {
            ProgressMode::None => Progress::hidden(label, total),
            ProgressMode::Auto if terminal => Progress::bar(label, total),
            ProgressMode::Auto | ProgressMode::Text => {
                Progress::lines(label, total, settings.interval, false, Box::new(std::io::stderr()))
            }
            ProgressMode::Json => Progress::lines(label, total, settings.interval, true, Box::new(std::io::stderr())),
        }
    }

    /// Lines to `out` every `interval`, as JSON when `json` (as [`Progress::new`] makes them
    /// for a log; tests give their own `out`).
    pub fn lines(label: &str, total: Option<u64>, interval: Duration, json: bool, out: Box<dyn Write + Send>) -> Self {
        let shared = Arc::new(Shared::new(label, total, interval, json, out));
        let reporter = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("cnclip-progress".into())
                .spawn(move || shared.report_every_interval())
                .ok() // no thread, no lines: progress must never stop a job
        };
        Progress { shared, bar: None, reporter: Mutex::new(reporter) }
    }

    fn bar(label: &str, total: Option<u64>) -> Self {
        let bar = match total {
            Some(n) => ProgressBar::new(n),
            None => ProgressBar::new_spinner(),
        };
        let template = if total.is_some() {
            "{prefix} {bar:30} {human_pos}/{human_len} rows, {per_sec:0}, ETA {eta}"
        } else {
            "{prefix} {spinner} {human_pos} rows, {per_sec:0}"
        };
        bar.set_style(ProgressStyle::with_template(template).expect("valid template"));
        bar.set_prefix(label.to_string());
        let shared = Arc::new(Shared::new(label, total, Duration::MAX, false, Box::new(std::io::sink())));
        Progress { shared, bar: Some(bar), reporter: Mutex::new(None) }
    }

    fn hidden(label: &str, total: Option<u64>) -> Self {
        let progress = Progress::bar(label, total);
        if let Some(bar) = &progress.bar {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        progress
    }

    /// `rows` more rows read.
    pub fn add(&self, rows: u64) {
        self.shared.rows.fetch_add(rows, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.inc(rows);
        }
    }

    /// `bytes` more bytes read.
    pub fn add_bytes(&self, bytes: u64) {
        self.shared.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// One more row quarantined.
    pub fn add_quarantined(&self) {
        self.shared.quarantined.fetch_add(1, Ordering::Relaxed);
    }

    pub fn position(&self) -> u64 {
        self.shared.rows.load(Ordering::Relaxed)
    }

    /// The job has ended: clears the bar, or stops the lines and, if any was written, writes
    /// the `done` line.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        if self.stop() && self.shared.lines.load(Ordering::Relaxed) > 0 {
            self.shared.write_line(true);
        }
    }

    /// Stops the reporter; whether there was one.
    fn stop(&self) -> bool {
        *self.shared.stopped.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.shared.wake.notify_all();
        let reporter = self.reporter.lock().unwrap_or_else(|e| e.into_inner()).take();
        reporter.map(|thread| thread.join()).is_some()
    }
}

impl Drop for Progress {
    /// A job that failed stops the lines without a `done` line.
    fn drop(&mut self) {
        self.stop();
    }
}

impl Shared {
    fn new(label: &str, total: Option<u64>, interval: Duration, json: bool, out: Box<dyn Write + Send>) -> Self {
        Shared {
            label: label.to_string(),
            total,
            rows: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            quarantined: AtomicU64::new(0),
            started: Instant::now(),
            json,
            interval,
            stopped: Mutex::new(false),
            wake: Condvar::new(),
            lines: AtomicU64::new(0),
            out: Mutex::new(out),
        }
    }

    /// The reporter's loop: a line at every interval until the job stops.
    fn report_every_interval(&self) {
        let mut stopped = self.stopped.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = Instant::now() + self.interval;
        loop {
            let now = Instant::now();
            if *stopped {
                return;
            }
            if now < next {
                stopped = self.wake.wait_timeout(stopped, next - now).unwrap_or_else(|e| e.into_inner()).0;
                continue;
            }
            drop(stopped);
            self.write_line(false);
            // The next line an interval after this one: a stalled writer or a suspended
            // process does not make the lines catch up in a burst.
            next = Instant::now() + self.interval;
            stopped = self.stopped.lock().unwrap_or_else(|e| e.into_inner());
        }
    }

    fn write_line(&self, done: bool) {
        let line = self.snapshot(done).line(&self.label, self.json);
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        // A log that cannot be written must not stop the job.
        let _ = writeln!(out, "{line}").and_then(|()| out.flush());
        self.lines.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self, done: bool) -> Snapshot {
        Snapshot {
            done,
            elapsed: self.started.elapsed().as_secs_f64(),
            rows: self.rows.load(Ordering::Relaxed),
            total: self.total,
            bytes: self.bytes.load(Ordering::Relaxed),
            quarantined: self.quarantined.load(Ordering::Relaxed),
        }
    }
}

/// The counts at one moment. Rates are averages since the job started, and the ETA is the
/// rows left at that rate.
#[derive(Debug, Clone, PartialEq)]
struct Snapshot {
    done: bool,
    elapsed: f64,
    rows: u64,
    total: Option<u64>,
    bytes: u64,
    quarantined: u64,
}

impl Snapshot {
    fn rows_per_s(&self) -> f64 {
        if self.elapsed > 0.0 { self.rows as f64 / self.elapsed } else { 0.0 }
    }

    fn bytes_per_s(&self) -> f64 {
        if self.elapsed > 0.0 { self.bytes as f64 / self.elapsed } else { 0.0 }
    }

    /// Seconds left, when the total is known and rows are coming.
    fn eta(&self) -> Option<f64> {
        let total = self.total.filter(|_| !self.done)?;
        let rate = self.rows_per_s();
        (rate > 0.0).then(|| total.saturating_sub(self.rows) as f64 / rate)
    }

    fn line(&self, label: &str, json: bool) -> String {
        if json {
            return serde_json::json!({
                "progress": label,
                "state": if self.done { "done" } else { "running" },
                "elapsed_s": round(self.elapsed, 3),
                "rows": self.rows,
                "total": self.total,
                "rows_per_s": round(self.rows_per_s(), 1),
                "bytes": self.bytes,
                "bytes_per_s": round(self.bytes_per_s(), 1),
                "quarantined": self.quarantined,
                "eta_s": self.eta().map(|eta| round(eta, 1)),
            })
            .to_string();
        }
        let rows = match self.total {
            Some(total) if total > 0 => {
                format!(
                    "{}/{} rows ({:.1} %)",
                    thousands(self.rows),
                    thousands(total),
                    100.0 * self.rows as f64 / total as f64
                )
            }
            _ => format!("{} rows", thousands(self.rows)),
        };
        let rates = format!(
            "{} rows/s, {:.1} MB/s, {} quarantined",
            thousands(self.rows_per_s().round() as u64),
            self.bytes_per_s() / 1e6,
            thousands(self.quarantined)
        );
        if self.done {
            return format!("{label}: done, {rows} in {}: {rates}", duration(self.elapsed));
        }
        let eta = self.eta().map(|eta| format!(", ETA {}", duration(eta))).unwrap_or_default();
        format!("{label}: {rows}, {rates}{eta}, {} elapsed", duration(self.elapsed))
    }
}

fn round(value: f64, places: i32) -> f64 {
    let scale = 10f64.powi(places);
    (value * scale).round() / scale
}

/// `1234567` as `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// Seconds as `45s`, `3m 05s` or `2h 01m`.
fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {:02}s", s / 60, s % 60),
        _ => format!("{}h {:02}m", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the lines went to, shared with the test.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn lines(&self) -> Vec<String> {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap().lines().map(str::to_string).collect()
        }
    }

    #[test]
    fn a_line_every_interval_then_a_done_line() {
        let out = Captured::default();
        let progress = Progress::lines("cnclip", Some(1000), Duration::from_millis(20), false, Box::new(out.clone()));
        progress.add(250);
        progress.add_bytes(5_000_000);
        progress.add_quarantined();
        std::thread::sleep(Duration::from_millis(110));
        let running = out.lines();
        assert!(running.len() >= 2, "{running:?}");
        let first = &running[0];
        assert!(first.starts_with("cnclip: 250/1,000 rows (25.0 %), "), "{first}");
        assert!(first.contains(" rows/s, ") && first.contains(" MB/s, 1 quarantined, ETA "), "{first}");
        assert!(first.ends_with(" elapsed"), "{first}");
        progress.add(750);
        progress.finish();
        let all = out.lines();
        let done = all.last().unwrap();
        assert!(done.starts_with("cnclip: done, 1,000/1,000 rows (100.0 %) in "), "{done}");
        assert!(!done.contains("ETA"), "{done}");
        // No line after the job has ended.
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(out.lines().len(), all.len());
    }

    #[test]
    fn json_lines_parse_and_carry_every_count() {
        let out = Captured::default();
        let progress = Progress::lines("cnclip", None, Duration::from_millis(10), true, Box::new(out.clone()));
        progress.add(7);
        progress.add_bytes(700);
        std::thread::sleep(Duration::from_millis(45));
        progress.finish();
        let lines = out.lines();
        assert!(lines.len() >= 2, "{lines:?}");
        for (i, line) in lines.iter().enumerate() {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            let done = i == lines.len() - 1;
            assert_eq!(value["state"], if done { "done" } else { "running" }, "{line}");
            assert_eq!(value["progress"], "cnclip");
            assert_eq!(value["rows"], 7);
            assert_eq!(value["bytes"], 700);
            assert_eq!(value["quarantined"], 0);
            assert!(value["total"].is_null() && value["eta_s"].is_null(), "{line}");
            assert!(value["elapsed_s"].as_f64().unwrap() > 0.0 && value["rows_per_s"].as_f64().unwrap() > 0.0);
        }
    }

    #[test]
    fn a_job_shorter_than_the_interval_writes_nothing() {
        let out = Captured::default();
        let progress = Progress::lines("cnclip", Some(10), Duration::from_secs(30), false, Box::new(out.clone()));
        progress.add(10);
        let started = Instant::now();
        progress.finish();
        assert!(started.elapsed() < Duration::from_secs(1), "finish waits for no interval");
        assert!(out.lines().is_empty());
        drop(Progress::lines("cnclip", None, Duration::from_secs(30), true, Box::new(out.clone())));
        assert!(out.lines().is_empty());
    }

    #[test]
    fn counts_and_durations_are_written_for_people() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(duration(45.4), "45s");
        assert_eq!(duration(185.0), "3m 05s");
        assert_eq!(duration(7260.0), "2h 01m");
        let snapshot = Snapshot { done: false, elapsed: 10.0, rows: 100, total: Some(300), bytes: 0, quarantined: 0 };
        assert_eq!(snapshot.eta(), Some(20.0));
        assert_eq!(Snapshot { total: None, ..snapshot.clone() }.eta(), None);
        assert_eq!(Snapshot { rows: 0, ..snapshot }.eta(), None);
    }

    #[test]
    fn modes_parse_from_their_names() {
        for name in ProgressMode::NAMES {
            assert_eq!(name.parse::<ProgressMode>().unwrap().to_string(), name);
        }
        assert!("bar".parse::<ProgressMode>().unwrap_err().contains("auto, text, json, none"));
    }
}
