//! Bad records and what happens to them: the per-job `--on-error` policy and the quarantine
//! file (`quarantine.jsonl`, one object per rejected record with the `quarantine` table's
//! columns: `source`, `location`, `id`, `reason`).

use std::io::Write;
use std::path::PathBuf;

use crate::error::{Error, Result, io};

/// What a job does with a bad record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OnError {
    /// Stop the job with an error naming the record.
    Fail,
    /// Record it in the quarantine and go on.
    #[default]
    Skip,
}

/// One rejected record.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    /// The file or table it came from.
    pub source: String,
    /// Where in it: `line N`, a key, …
    pub location: String,
    /// Its id, when one could be read.
    pub id: Option<String>,
    pub reason: String,
}

/// Collects rejected records into `quarantine.jsonl`, written atomically at [`Quarantine::finish`].
pub struct Quarantine {
    policy: OnError,
    path: PathBuf,
    rows: Vec<u8>,
    count: usize,
}

impl Quarantine {
    pub fn new(policy: OnError, path: PathBuf) -> Self {
        Quarantine { policy, path, rows: Vec::new(), count: 0 }
    }

    /// Applies the policy to a bad record.
    ///
    /// # Errors
    /// [`Error::Record`] under `--on-error fail`.
    pub fn reject(&mut self, rejected: Rejected) -> Result<()> {
        if self.policy == OnError::Fail {
            return Err(Error::Record {
                location: format!("{} {}", rejected.source, rejected.location),
                reason: rejected.reason,
            });
        }
        tracing::warn!(source = %rejected.source, location = %rejected.location, reason = %rejected.reason, "Quarantined a record");
        let row = serde_json::json!({
            "source": rejected.source, "location": rejected.location, "id": rejected.id, "reason": rejected.reason,
        });
        self.rows.extend_from_slice(row.to_string().as_bytes());
        self.rows.push(b'\n');
        self.count += 1;
        Ok(())
    }

    pub fn count(&self) -> usize {
        self.count
    }

    /// Writes the quarantine file if anything was rejected; returns its path.
    ///
    /// # Errors
    /// IO errors writing it.
    pub fn finish(self) -> Result<Option<PathBuf>> {
        if self.count == 0 {
            return Ok(None);
        }
        cnclip_models::write_atomically(&self.path, |f| f.write_all(&self.rows)).map_err(io(&self.path))?;
        Ok(Some(self.path))
    }
}
