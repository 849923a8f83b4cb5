//! Bad records and what happens to them: the per-job `--on-error` policy and the quarantine
//! file (`quarantine.jsonl`, one object per rejected record with the `quarantine` table's
//! columns: `source`, `location`, `id`, `reason`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

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

/// Collects rejected records into `quarantine.jsonl`. Rows stream to a temporary file beside
/// it (a corpus with millions of bad rows must not fill memory), which [`Quarantine::finish`]
/// renames into place. Shared by every node of a job: `reject` takes `&self`.
pub struct Quarantine {
    policy: OnError,
    path: PathBuf,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    file: Option<std::io::BufWriter<std::fs::File>>,
    count: usize,
    /// The first IO error writing the file, reported by `reject` and `finish`.
    failed: bool,
}

impl Quarantine {
    pub fn new(policy: OnError, path: PathBuf) -> Self {
        Quarantine { policy, path, state: Mutex::new(State::default()) }
    }

    pub fn policy(&self) -> OnError {
        self.policy
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn tmp_path(&self) -> PathBuf {
        let mut name = self.path.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".tmp-{}", std::process::id()));
        self.path.with_file_name(name)
    }

    /// Applies the policy to a bad record.
    ///
    /// # Errors
    /// [`Error::Record`] under `--on-error fail`; IO errors writing the quarantine file.
    pub fn reject(&self, rejected: Rejected) -> Result<()> {
        if self.policy == OnError::Fail {
            let id = rejected.id.as_deref().map(|id| format!(" (id {id})")).unwrap_or_default();
            return Err(Error::Record {
                location: format!("{} {}{id}", rejected.source, rejected.location),
                reason: rejected.reason,
            });
        }
        tracing::debug!(source = %rejected.source, location = %rejected.location, reason = %rejected.reason, "Quarantined a record");
        let row = serde_json::json!({
            "source": rejected.source, "location": rejected.location, "id": rejected.id, "reason": rejected.reason,
        });
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let tmp = self.tmp_path();
        if state.file.is_none() {
            if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(io(dir))?;
            }
            state.file = Some(std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io(&tmp))?));
        }
        let file = state.file.as_mut().expect("opened above");
        if let Err(e) = writeln!(file, "{row}") {
            state.failed = true;
            return Err(io(&tmp)(e));
        }
        state.count += 1;
        Ok(())
    }

    /// Records rejected so far.
    pub fn count(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).count
    }

    /// Moves the quarantine file into place if anything was rejected; returns its path.
    ///
    /// # Errors
    /// IO errors writing it.
    pub fn finish(mut self) -> Result<Option<PathBuf>> {
        let tmp = self.tmp_path();
        let state = std::mem::take(self.state.get_mut().unwrap_or_else(|e| e.into_inner()));
        let Some(file) = state.file else { return Ok(None) };
        let result = file
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|f| f.sync_all())
            .map_err(io(&tmp))
            .and_then(|()| std::fs::rename(&tmp, &self.path).map_err(io(&self.path)));
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map(|()| Some(self.path.clone()))
    }
}

impl Drop for Quarantine {
    fn drop(&mut self) {
        // Not finished (the job failed): leave no temporary file behind.
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        if state.file.take().is_some() {
            let _ = std::fs::remove_file(self.tmp_path());
        }
    }
}
