//! Bad records and what happens to them: the per-job `--on-error` policy and the quarantine
//! (`quarantine.jsonl`, one object per rejected record, or a `.parquet` table — both with the
//! `quarantine` contract's columns: `source`, `location`, `id`, `reason`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use cnclip_pipeline::Progress;

use arrow::array::{ArrayRef, StringBuilder};
use arrow::record_batch::RecordBatch;

use crate::error::{Error, Result};
use crate::sinks::AtomicFile;
use crate::sinks::parquet::ParquetSink;
use crate::storage;

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
/// Shared by every node of a job: each rejects through its own [`NodeQuarantine`], and the file
/// lists the records node by node, in the pipeline's order of its nodes (a job's `NodeDef`s as
/// it gives them; a pipeline file's nodes by name), each node's in the order it rejected them (a source's in its file order, a transform's in its input order). So
/// the file is the same on every run, however the nodes' threads interleave. Records are
/// spooled per node to temporary files beside the quarantine (a corpus with millions of bad
/// rows must not fill memory), which [`Quarantine::finish`] joins into place; dropped
/// unfinished, it leaves nothing.
pub struct Quarantine {
    policy: OnError,
    path: PathBuf,
    state: Mutex<State>,
    /// Counts each record quarantined, for the job's progress lines.
    progress: Option<Arc<Progress>>,
}

#[derive(Default)]
struct State {
    /// Each node's records as JSON lines, by node.
    spools: BTreeMap<usize, AtomicFile>,
    count: usize,
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

/// What one node rejects through: its records come out together, after those of the nodes
/// before it in the pipeline.
#[derive(Clone)]
pub struct NodeQuarantine {
    quarantine: Arc<Quarantine>,
    node: usize,
}

impl NodeQuarantine {
    /// Applies the policy to a bad record of this node ([`Quarantine::reject`]).
    ///
    /// # Errors
    /// As [`Quarantine::reject`].
    pub fn reject(&self, rejected: Rejected) -> Result<()> {
        self.quarantine.reject_from(self.node, rejected)
    }
}

impl Quarantine {
    pub fn new(policy: OnError, path: PathBuf) -> Self {
        Quarantine { policy, path, state: Mutex::new(State::default()), progress: None }
    }

    /// This quarantine counting each record it takes in `progress` too.
    pub fn reporting_to(self, progress: Arc<Progress>) -> Self {
        Quarantine { progress: Some(progress), ..self }
    }

    /// The handle node number `node` (in the pipeline's order) rejects through.
    pub fn node(self: &Arc<Self>, node: usize) -> NodeQuarantine {
        NodeQuarantine { quarantine: Arc::clone(self), node }
    }

    /// Applies the policy to a bad record (of a job with a single writer of its quarantine; the
    /// nodes of a pipeline reject through [`Quarantine::node`]).
    ///
    /// # Errors
    /// [`Error::Record`] under `--on-error fail`; IO errors writing the quarantine file.
    pub fn reject(&self, rejected: Rejected) -> Result<()> {
        self.reject_from(0, rejected)
    }

    fn reject_from(&self, node: usize, rejected: Rejected) -> Result<()> {
        if self.policy == OnError::Fail {
            let id = rejected.id.as_deref().map(|id| format!(" (id {id})")).unwrap_or_default();
            return Err(Error::Record {
                location: format!("{} {}{id}", rejected.source, rejected.location),
                reason: rejected.reason,
            });
        }
        tracing::debug!(source = %rejected.source, location = %rejected.location, reason = %rejected.reason, "Quarantined a record");
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let spool = match state.spools.entry(node) {
            std::collections::btree_map::Entry::Occupied(spool) => spool.into_mut(),
            std::collections::btree_map::Entry::Vacant(slot) => {
                slot.insert(AtomicFile::create(&self.spool_path(node))?)
            }
        };
        let row = serde_json::json!({
            "source": rejected.source, "location": rejected.location, "id": rejected.id, "reason": rejected.reason,
        });
        spool.write_all(format!("{row}\n").as_bytes())?;
        state.count += 1;
        if let Some(progress) = &self.progress {
            progress.add_quarantined();
        }
        Ok(())
    }

    /// Where node `node` spools its records (the temporary file beside this path).
    fn spool_path(&self, node: usize) -> PathBuf {
        let mut name = self.path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        name.push(format!(".node{node}"));
        self.path.with_file_name(name)
    }

    /// Records rejected so far.
    pub fn count(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).count
    }

    /// Joins the nodes' records into the quarantine file and moves it into place if anything
    /// was rejected; returns its path.
    ///
    /// # Errors
    /// IO errors writing it.
    pub fn finish(self) -> Result<Option<PathBuf>> {
        let state = self.state.into_inner().unwrap_or_else(|e| e.into_inner());
        if state.spools.is_empty() {
            return Ok(None);
        }
        let mut spools = Vec::new();
        for (_, mut spool) in state.spools {
            // Flushed, and kept at its temporary path (removed when `spool` is dropped).
            spool.flush()?;
            spools.push(spool);
        }
        if self.path.extension().is_some_and(|e| e == "parquet") {
            let mut sink = ParquetSink::create(&self.path, "quarantine", cnclip_schemas::quarantine())?;
            let mut rows = Vec::new();
            for spool in &spools {
                let file = storage::open(&spool.tmp).map_err(crate::error::io(&spool.tmp))?;
                for line in std::io::BufRead::lines(std::io::BufReader::new(file)) {
                    let line = line.map_err(crate::error::io(&spool.tmp))?;
                    rows.push(
                        Rejected::from_json(&line)
                            .map_err(|reason| Error::Format { path: spool.tmp.display().to_string(), reason })?,
                    );
                    if rows.len() >= PARQUET_BATCH {
                        sink.write(&quarantine_batch(&rows)?)?;
                        rows.clear();
                    }
                }
            }
            if !rows.is_empty() {
                sink.write(&quarantine_batch(&rows)?)?;
            }
            sink.finish()?;
        } else if spools.len() == 1 {
            // One node rejected: its spool is the file.
            spools.pop().expect("one").finish_as(&self.path)?.commit()?;
        } else {
            let mut out = AtomicFile::create(&self.path)?;
            for spool in &spools {
                let mut file = storage::open(&spool.tmp).map_err(crate::error::io(&spool.tmp))?;
                out.copy_from(&mut file, &spool.tmp)?;
            }
            out.finish()?.commit()?;
        }
        Ok(Some(self.path))
    }
}

impl Rejected {
    /// A record as its quarantine line holds it.
    fn from_json(line: &str) -> std::result::Result<Rejected, String> {
        let value: serde_json::Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
        let text = |key: &str| value[key].as_str().map(str::to_string);
        Ok(Rejected {
            source: text("source").ok_or("no `source`")?,
            location: text("location").ok_or("no `location`")?,
            id: text("id"),
            reason: text("reason").ok_or("no `reason`")?,
        })
    }
}
