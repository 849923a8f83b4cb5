//! A progress display for long jobs — rows, rows/s and ETA — drawn on stderr only when it is a
//! terminal, so logs and CI output stay clean.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// `total` rows if known (then an ETA is shown).
    pub fn new(label: &str, total: Option<u64>) -> Self {
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
        if !std::io::stderr().is_terminal() {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        Progress { bar }
    }

    pub fn add(&self, rows: u64) {
        self.bar.inc(rows);
    }

    pub fn position(&self) -> u64 {
        self.bar.position()
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
