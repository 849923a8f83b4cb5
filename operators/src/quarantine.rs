//! Bad records and what happens to them: the per-job `--on-error` policy and the quarantine
//! (`quarantine.jsonl`, one object per rejected record, or a `.parquet` table — both with the
//! `quarantine` contract's columns: `source`, `location`, `id`, `reason`).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arrow::array::{ArrayRef, StringBuilder};
use arrow::record_batch::RecordBatch;

use crate::error::{Error, Result};
use crate::sinks::AtomicFile;
use crate::sinks::parquet::ParquetSink;

/// What a job does with a bad record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
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

/// Collects rejected records into the quarantine file: `quarantine.jsonl` (one JSON object per
/// record), or a Parquet table with the `quarantine` contract when the path ends in `.parquet`.
/// Rows stream to a temporary file beside it (a corpus with millions of bad rows must not fill
/// memory), which [`Quarantine::finish`] moves into place; dropped unfinished, it leaves nothing.
/// Shared by every node of a job: `reject` takes `&self`.
pub struct Quarantine {
    policy: OnError,
    path: PathBuf,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    out: Option<Output>,
    count: usize,
}

enum Output {
    Jsonl(AtomicFile),
    Parquet { sink: Box<ParquetSink>, rows: Vec<Rejected> },
}

/// Rows per batch of a Parquet quarantine.
const PARQUET_BATCH: usize = 8192;

fn quarantine_batch(rows: &[Rejected]) -> Result<RecordBatch> {
    let (mut source, mut location, mut id, mut reason) =
        (StringBuilder::new(), StringBuilder::new(), StringBuilder::new(), StringBuilder::new());
    for row in rows {
        source.append_value(&row.source);
        location.append_value(&row.location);
        id.append_option(row.id.as_deref());
        reason.append_value(&row.reason);
    }
    let columns: Vec<ArrayRef> =
        vec![Arc::new(source.finish()), Arc::new(location.finish()), Arc::new(id.finish()), Arc::new(reason.finish())];
    Ok(RecordBatch::try_new(cnclip_schemas::quarantine(), columns)?)
}

impl Quarantine {
    pub fn new(policy: OnError, path: PathBuf) -> Self {
        Quarantine { policy, path, state: Mutex::new(State::default()) }
    }

    fn open(&self) -> Result<Output> {
        Ok(if self.path.extension().is_some_and(|e| e == "parquet") {
            let sink = ParquetSink::create(&self.path, "quarantine", cnclip_schemas::quarantine())?;
            Output::Parquet { sink: Box::new(sink), rows: Vec::new() }
        } else {
            Output::Jsonl(AtomicFile::create(&self.path)?)
        })
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
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.out.is_none() {
            state.out = Some(self.open()?);
        }
        match state.out.as_mut().expect("opened above") {
            Output::Jsonl(file) => {
                let row = serde_json::json!({
                    "source": rejected.source, "location": rejected.location, "id": rejected.id, "reason": rejected.reason,
                });
                file.write_all(format!("{row}\n").as_bytes())?;
            }
            Output::Parquet { sink, rows } => {
                rows.push(rejected);
                if rows.len() >= PARQUET_BATCH {
                    sink.write(&quarantine_batch(rows)?)?;
                    rows.clear();
                }
            }
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
    pub fn finish(self) -> Result<Option<PathBuf>> {
        let state = self.state.into_inner().unwrap_or_else(|e| e.into_inner());
        match state.out {
            None => return Ok(None),
            Some(Output::Jsonl(file)) => file.finish()?.commit()?,
            Some(Output::Parquet { mut sink, rows }) => {
                if !rows.is_empty() {
                    sink.write(&quarantine_batch(&rows)?)?;
                }
                sink.finish()?;
            }
        }
        Ok(Some(self.path))
    }
}
