//! What a finished pipeline did: per-node figures, the outputs written, the quarantine.

use std::path::PathBuf;

use cnclip_pipeline::NodeSummary;

use crate::sinks::Written;

/// What a finished pipeline did.
#[derive(Debug)]
pub struct Report {
    pub nodes: Vec<(String, NodeSummary)>,
    /// Each sink's output, in the order they finished.
    pub written: Vec<(String, Written)>,
    pub quarantined: usize,
    pub quarantine_file: Option<PathBuf>,
    /// Object storage requests of this process so far, and the attempts among them that failed
    /// transiently (and were retried, or failed the job).
    pub storage_requests: u64,
    pub storage_retries: u64,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (name, s) in &self.nodes {
            writeln!(
                f,
                "  {name:<16} {:>10} rows in {:>10} rows out  {:>9.0} rows/s  busy {:>7.2} s  queue ≤ {} rows",
                s.rows_in,
                s.rows_out,
                s.rows_per_second,
                s.busy.as_secs_f64(),
                s.max_queued_rows
            )?;
        }
        for (name, w) in &self.written {
            writeln!(f, "  {name}: {} rows → {}", w.rows, w.path.display())?;
        }
        if self.storage_requests > 0 {
            writeln!(
                f,
                "  object storage: {} requests, {} failed attempts retried",
                self.storage_requests, self.storage_retries
            )?;
        }
        match &self.quarantine_file {
            Some(path) => write!(f, "  {} records quarantined → {}", self.quarantined, path.display()),
            None => write!(f, "  0 records quarantined"),
        }
    }
}
