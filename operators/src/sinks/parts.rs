//! `write_parts`: a feature table written resumably, in parts, and — under a job's `--shard i/n`
//! — as its shard's part of a directory of parts. One implementation for `extract-features` and
//! any pipeline (`cnclip run p.toml --shard i/n`).
//!
//! Why parts: a DAG sink commits only when the whole pipeline has succeeded, and a killed
//! extraction of a large corpus must not lose everything. So rows go to
//! `{work}/part-NNNNN.parquet` files of `part_rows` rows, each synced and recorded in
//! `{work}/manifest.json` (with a fingerprint of what the rows depend on) before the next
//! begins. A rerun with the same fingerprint keeps the recorded parts: either an upstream
//! `exclude_ids` already skipped their ids (what `extract-features` does, before any decoding:
//! see [`resume`]), or the sink skips as many input rows as the parts hold (a pipeline's output
//! comes in input order, so those are the same rows). When the input is done the parts are
//! joined, in order, into the output, and the output is moved into place when the job commits.
//!
//! Where (the [`Target`]): one file (`.parquet`, a feature table; `.jsonl`, cn_clip's lines,
//! `id` renamed to the tower's id column), work in `{output}.cnclip-parts/`; or a directory of
//! shards, where shard `i/n` writes `part-{i:05}-of-{n:05}.parquet` and, after it, its entry
//! `part-{i:05}-of-{n:05}.json` ([`Entry`]), work in the hidden `.part-….cnclip-parts/`.
//! `cnclip manifest check DIR` (`jobs/data/src/manifest.rs`) verifies such a directory; the
//! layout and the entry format are defined here, where they are written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use arrow::array::{Array, Int64Array};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::RecordBatch;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::jsonl::WriteJsonlConfig;
use super::parquet::{ParquetSink, WriteParquetConfig};
use super::{Sink, Staged, Written};
use crate::error::{Error, Result, io};
use crate::sources::Shard;
use crate::sources::parquet::ParquetConfig;
use crate::spec::registry::{BuildContext, NodeConfig, Operator, Role, SinkContext, SinkSpec};
use crate::spec::{JobSettings, NodeDef, Planner, Registry};
use crate::storage;
use cnclip_schemas::{columns, metadata};

/// Which tower's features a table holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Tower {
    Image,
    Text,
}

impl Tower {
    /// The id column of its sources.
    pub fn id_column(self) -> &'static str {
        match self {
            Tower::Image => columns::IMAGE_ID,
            Tower::Text => columns::TEXT_ID,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Tower::Image => "image",
            Tower::Text => "text",
        }
    }
}

/// What the entries' `format` field says.
pub const ENTRY_FORMAT: &str = "cnclip.shard-entry.v1";

/// A finished shard, as `part-{i:05}-of-{n:05}.json` records it next to its part.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub format: String,
    /// `i/n`.
    pub shard: String,
    pub index: u64,
    pub count: u64,
    /// The part's file name, in the same directory.
    pub part: String,
    pub rows: u64,
    /// Ids in file order (the source's order within the shard) and their range.
    pub first_id: Option<i64>,
    pub last_id: Option<i64>,
    pub min_id: Option<i64>,
    pub max_id: Option<i64>,
    /// The part file's size and sha256 (hex).
    pub bytes: u64,
    pub sha256: String,
    pub tower: Tower,
    /// `Vision@Text` (or `custom`), as the table's metadata says, and the towers it names.
    pub model: String,
    pub vision_model: Option<String>,
    pub text_model: Option<String>,
    pub precision: String,
    pub dim: Option<usize>,
    /// The checkpoint as given, and the sha256 of its file.
    pub checkpoint: String,
    pub checkpoint_sha256: String,
    /// The input as given (`--image-data` or `--text-data`).
    pub source: Vec<String>,
    /// Records of the shard's input quarantined (see `part-….quarantine.jsonl`).
    pub quarantined: u64,
    /// RFC 3339, UTC.
    pub created: String,
    pub cnclip_version: String,
    /// The scheduler's ids, where it set them (`SLURM_ARRAY_JOB_ID`, `JOB_COMPLETION_INDEX`, …).
    #[serde(default)]
    pub job: BTreeMap<String, String>,
    /// sha256 of what the part was made from: the extraction's settings, the checkpoint's and
    /// the input files' sizes and modification times. A rerun that would make the same keeps
    /// the part (absent in entries of older versions: those shards are extracted again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub made_from: Option<String>,
}

/// The scheduler variables an entry records.
pub const JOB_VARIABLES: [&str; 6] =
    ["SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX", "JOB_NAME", "HOSTNAME"];

/// `part-{i:05}-of-{n:05}`: the stem of a shard's part, entry and quarantine.
pub fn part_stem(shard: Shard) -> String {
    format!("part-{:05}-of-{:05}", shard.index, shard.count)
}

/// Where a shard's work in progress lives: hidden in `dir`, which readers do not descend into.
pub fn work_dir(dir: &Path, shard: Shard) -> PathBuf {
    dir.join(format!(".{}.cnclip-parts", part_stem(shard)))
}

/// A shard's quarantine file.
pub fn quarantine_path(dir: &Path, shard: Shard) -> PathBuf {
    dir.join(format!("{}.quarantine.jsonl", part_stem(shard)))
}

/// What a file of a sharded directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Part,
    Entry,
    Quarantine,
    /// A shard's work directory (`.part-….cnclip-parts`).
    Work,
}

/// The shard and kind a file name stands for (`part-00001-of-00004.parquet` → 1/4, part).
pub fn parse_name(name: &str) -> Option<(Shard, FileKind)> {
    let (hidden, name) = match name.strip_prefix('.') {
        Some(rest) => (true, rest),
        None => (false, name),
    };
    let rest = name.strip_prefix("part-")?;
    let (index, rest) = rest.split_once("-of-")?;
    let (count, suffix) = rest.split_once('.')?;
    let kind = match (hidden, suffix) {
        (false, "parquet") => FileKind::Part,
        (false, "json") => FileKind::Entry,
        (false, "quarantine.jsonl") => FileKind::Quarantine,
        (true, "cnclip-parts") => FileKind::Work,
        _ => return None,
    };
    let digits = |s: &str| s.len() >= 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(index) || !digits(count) {
        return None;
    }
    let shard = format!("{index}/{count}").parse::<Shard>().ok()?;
    (part_stem(shard) == format!("part-{index}-of-{count}")).then_some((shard, kind))
}

/// The sha256 (hex) and size of a regular file, streamed; SIGINT and SIGTERM stop the read
/// between chunks.
///
/// # Errors
/// IO errors naming the file, or [`Error::Interrupted`].
pub fn sha256_file(path: &Path) -> Result<(String, u64)> {
    use sha2::Digest;
    use std::io::Read;
    let mut file = storage::open_read(path).map_err(io(path))?;
    let mut hasher = sha2::Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        if let Some(signal) = crate::signals::interrupted() {
            return Err(Error::Interrupted { signal });
        }
        let n = file.read(&mut buffer).map_err(io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        bytes += n as u64;
    }
    Ok((format!("{:x}", hasher.finalize()), bytes))
}

/// Where a table goes: one file, or a shard's part of a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    File(PathBuf),
    Shard { dir: PathBuf, shard: Shard },
}

impl Target {
    /// The resumable parts' directory.
    pub fn parts_dir(&self) -> PathBuf {
        match self {
            // An object's work is kept in the spool, on this machine.
            Target::File(output) => {
                let output = storage::staging::local_stand_in(output);
                let name = output.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                output.with_file_name(format!("{name}.cnclip-parts"))
            }
            Target::Shard { dir, shard } => storage::staging::local_stand_in(&work_dir(dir, *shard)),
        }
    }

    /// The quarantine beside the output.
    pub fn quarantine_path(&self) -> PathBuf {
        match self {
            Target::File(output) => output.with_extension("quarantine.jsonl"),
            Target::Shard { dir, shard } => quarantine_path(dir, *shard),
        }
    }

    /// What the parts are joined into, in the work directory until the job commits.
    pub fn joined(&self) -> PathBuf {
        match self {
            Target::File(output) => self.parts_dir().join(output.file_name().unwrap_or_default()),
            Target::Shard { shard, .. } => self.parts_dir().join(format!("{}.parquet", part_stem(*shard))),
        }
    }

    /// Where the table ends up.
    pub fn output(&self) -> PathBuf {
        match self {
            Target::File(output) => output.clone(),
            Target::Shard { dir, shard } => dir.join(format!("{}.parquet", part_stem(*shard))),
        }
    }

    /// Ready to write: the output's directory created, and a sharded directory holding no other
    /// split's parts (a table is one split; mixing `n` would leave ids twice or never).
    ///
    /// # Errors
    /// IO errors, or parts of another split.
    pub fn prepare(&self) -> Result<()> {
        match self {
            Target::Shard { dir, shard } => {
                storage::create_dir_all(dir).map_err(io(dir))?;
                let others: Vec<String> = crate::sources::parts::names_in(dir)
                    .map_err(io(dir))?
                    .into_iter()
                    .filter(|name| {
                        parse_name(name).is_some_and(|(s, kind)| {
                            s.count != shard.count && matches!(kind, FileKind::Part | FileKind::Entry)
                        })
                    })
                    .collect();
                if let Some(other) = others.first() {
                    return Err(Error::MixedSplits {
                        dir: dir.display().to_string(),
                        other: other.clone(),
                        shard: *shard,
                    });
                }
            }
            Target::File(output) => super::create_parent(output)?,
        }
        Ok(())
    }

    /// Shard `shard`'s entry, if it vouches for a part made from `made_from`, with no record
    /// quarantined (a rerun retries those), that is there with the size and sha256 it records
    /// (reading the part costs far less than making it again). `None` for a file target.
    pub fn finished(&self, made_from: &str) -> Option<Entry> {
        let Target::Shard { dir, shard } = self else { return None };
        let stem = part_stem(*shard);
        let entry: Entry = serde_json::from_slice(&storage::read(dir.join(format!("{stem}.json"))).ok()?).ok()?;
        let ours = entry.made_from.as_deref() == Some(made_from)
            && entry.quarantined == 0
            && entry.part == format!("{stem}.parquet")
            && storage::size(dir.join(&entry.part)).ok()? == entry.bytes;
        if !ours {
            return None;
        }
        let (sha256, _) = sha256_file(&dir.join(&entry.part)).ok()?;
        (sha256 == entry.sha256).then_some(entry)
    }
}

/// What a work directory was made with: a rerun with anything else starts over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Manifest {
    fingerprint: String,
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Part {
    file: String,
    rows: u64,
    first_id: Option<i64>,
    last_id: Option<i64>,
}

/// A work directory ready for the next part: the recorded parts a rerun keeps.
#[derive(Debug)]
pub struct Resumed {
    manifest: Manifest,
    dir: PathBuf,
}

impl Resumed {
    /// The kept parts' files, in order (their ids are done).
    pub fn done(&self) -> Vec<PathBuf> {
        self.manifest.parts.iter().map(|p| self.dir.join(&p.file)).collect()
    }

    /// Rows the kept parts hold.
    pub fn rows(&self) -> u64 {
        self.manifest.parts.iter().map(|p| p.rows).sum()
    }
}

/// Opens `target`'s work directory for a run whose rows depend on `fingerprint`: keeps the
/// parts a previous run with the same fingerprint recorded, or starts over; removes files no
/// recorded part names (a killed run's partial part). Given a `label` (the program), it says
/// on stderr when it starts over and how many parts it keeps.
///
/// # Errors
/// IO errors naming the directory.
pub fn resume(target: &Target, fingerprint: &str, label: Option<&str>) -> Result<Resumed> {
    let dir = target.parts_dir();
    let manifest_path = dir.join("manifest.json");
    let manifest = match storage::read(&manifest_path).ok().and_then(|b| serde_json::from_slice::<Manifest>(&b).ok()) {
        Some(m) if m.fingerprint == fingerprint && m.parts.iter().all(|p| dir.join(&p.file).is_file()) => m,
        found => {
            if let (Some(label), Some(_)) = (label, &found) {
                eprintln!("{label}: {} was made with other settings: starting over", dir.display());
            }
            let _ = storage::remove_dir_all(&dir);
            Manifest { fingerprint: fingerprint.to_string(), parts: Vec::new() }
        }
    };
    storage::create_dir_all(&dir).map_err(io(&dir))?;
    for entry in storage::read_dir(&dir).map_err(io(&dir))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name != "manifest.json" && !manifest.parts.iter().any(|p| p.file == name) {
            let _ = storage::remove_file(entry.path());
        }
    }
    let resumed = Resumed { manifest, dir };
    if let Some(label) = label.filter(|_| resumed.rows() > 0) {
        eprintln!("{label}: resuming after {} parts ({} rows)", resumed.manifest.parts.len(), resumed.rows());
    }
    Ok(resumed)
}

/// Set in code (not TOML) by a job that drives `write_parts` itself, as `extract-features`
/// does: it has prepared the target ([`Target::prepare`]), holds the output's
/// [`storage::staging::WriterLock`], called [`resume`] with `fingerprint` and skips the kept
/// parts' ids upstream, so the sink neither locks nor skips rows; and what the entries record.
#[derive(Debug, Clone, Default)]
pub struct Prepared {
    /// The fingerprint the job gave [`resume`].
    pub fingerprint: String,
    /// The entry's `made_from` (see [`Target::finished`]).
    pub made_from: Option<String>,
    /// The towers to record when the table's metadata names none.
    pub vision_model: Option<String>,
    pub text_model: Option<String>,
}

/// Rows per row group in a part: parts are read back in order by the join, and a writer
/// buffers one group, so small groups keep memory flat.
const PART_ROW_GROUP_BYTES: usize = 8 << 20;

/// feature table (`id` first) → resumable parts joined into `path` (`.parquet`, `.jsonl`), or
/// under `--shard i/n` the shard's `part-IIIII-of-NNNNN.parquet` and `.json` entry in `path`.
///
/// The `write_parts` kind's keys: a feature table has an int64 `id` column first.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WritePartsConfig {
    /// A `.parquet` or `.jsonl` file, or a directory when sharded.
    pub path: PathBuf,
    /// Rows per part: a crash loses at most one part's work.
    #[serde(default = "default_part_rows")]
    pub part_rows: usize,
    /// Which tower's features: the entries' `tower`, and the id column of `.jsonl` output.
    pub tower: Tower,
    /// Whether `path` is a directory of shard parts.
    ///
    /// Default: when the job is sharded (n > 1).
    #[serde(default)]
    pub sharded: Option<bool>,
    /// The checkpoint, as the entries record it.
    ///
    /// Default: the one the table's metadata names.
    #[serde(default)]
    pub checkpoint: Option<String>,
    /// The input, as the entries record it.
    #[serde(default)]
    pub source: Vec<String>,
    /// Set by a job that resumed and locked the output itself (`extract-features`).
    #[serde(skip)]
    pub prepared: Option<Prepared>,
}

fn default_part_rows() -> usize {
    50_000
}

impl NodeConfig for WritePartsConfig {
    const KIND: &'static str = "write_parts";
    const ROLE: Role = Role::Sink;
    fn build(self, cx: &BuildContext) -> Result<Operator, Vec<String>> {
        if self.part_rows == 0 {
            return Err(vec!["part_rows must be at least 1".into()]);
        }
        Ok(Operator::Sink(Box::new(WritePartsConfig { path: cx.resolve(&self.path), ..self })))
    }
}

impl WritePartsConfig {
    /// Where this sink writes under `shard`.
    pub fn target(&self, shard: Shard) -> Target {
        match self.sharded.unwrap_or(shard.count > 1) {
            true => Target::Shard { dir: self.path.clone(), shard },
            false => Target::File(self.path.clone()),
        }
    }

    /// A pipeline's fingerprint: this node's settings, its shard and its input's columns.
    fn fingerprint(&self, shard: Shard, schema: &SchemaRef) -> String {
        let columns: Vec<String> = schema.fields().iter().map(|f| format!("{}: {}", f.name(), f.data_type())).collect();
        serde_json::json!({
            "kind": Self::KIND,
            "path": self.path,
            "part_rows": self.part_rows,
            "tower": self.tower,
            "shard": shard.to_string(),
            "columns": columns,
        })
        .to_string()
    }
}

impl SinkSpec for WritePartsConfig {
    fn path(&self) -> &Path {
        &self.path
    }

    fn accepts(&self, schema: &SchemaRef) -> Result<(), Vec<String>> {
        match schema.fields().first() {
            Some(f) if f.name() == columns::ID && f.data_type() == &DataType::Int64 => Ok(()),
            _ => Err(vec![format!("writes a feature table: its first column must be `{}` (int64)", columns::ID)]),
        }
    }

    fn open(&self, schema: &SchemaRef) -> Result<Box<dyn Sink>> {
        self.open_in(schema, &SinkContext { shard: Shard::ALL })
    }

    fn open_in(&self, schema: &SchemaRef, cx: &SinkContext) -> Result<Box<dyn Sink>> {
        let target = self.target(cx.shard);
        let (resumed, lock, skip) = match &self.prepared {
            Some(prepared) => (resume(&target, &prepared.fingerprint, None)?, None, 0),
            None => {
                target.prepare()?;
                let lock = storage::staging::WriterLock::acquire(&target.output())?;
                let resumed = resume(&target, &self.fingerprint(cx.shard, schema), Some("cnclip run"))?;
                let skip = resumed.rows();
                (resumed, Some(lock), skip)
            }
        };
        Ok(Box::new(PartsSink {
            config: self.clone(),
            target,
            schema: schema.clone(),
            manifest: resumed.manifest,
            open: None,
            skip,
            _lock: lock,
        }))
    }
}

/// The running sink: the part being written and where finished ones are recorded.
struct PartsSink {
    config: WritePartsConfig,
    target: Target,
    schema: SchemaRef,
    manifest: Manifest,
    open: Option<OpenPart>,
    /// Input rows the kept parts already hold (when nothing upstream skipped them).
    skip: u64,
    _lock: Option<storage::staging::WriterLock>,
}

struct OpenPart {
    file: String,
    sink: ParquetSink,
    rows: usize,
    first_id: Option<i64>,
    last_id: Option<i64>,
}

impl PartsSink {
    /// Appends `batch` to the open part, starting the next part if none is open.
    fn append(&mut self, batch: &RecordBatch) -> Result<()> {
        let dir = self.target.parts_dir();
        if self.open.is_none() {
            let file = format!("part-{:05}.parquet", self.manifest.parts.len());
            let sink = ParquetSink::create_with_row_group_bytes(
                &dir.join(&file),
                "features",
                self.schema.clone(),
                PART_ROW_GROUP_BYTES,
            )?;
            self.open = Some(OpenPart { file, sink, rows: 0, first_id: None, last_id: None });
        }
        let part = self.open.as_mut().expect("opened above");
        part.sink.write(batch)?;
        let ids = batch
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .ok_or_else(|| Error::Internal("write_parts: the id column is not int64".into()))?;
        if !ids.is_empty() {
            part.first_id = part.first_id.or(Some(ids.value(0)));
            part.last_id = Some(ids.value(ids.len() - 1));
        }
        part.rows += batch.num_rows();
        Ok(())
    }

    /// Closes the open part (synced, renamed into place) and records it in the manifest.
    fn close_part(&mut self) -> Result<()> {
        let Some(part) = self.open.take() else { return Ok(()) };
        part.sink.finish()?;
        self.manifest.parts.push(Part {
            file: part.file,
            rows: part.rows as u64,
            first_id: part.first_id,
            last_id: part.last_id,
        });
        let json = serde_json::to_vec_pretty(&self.manifest)?;
        let path = self.target.parts_dir().join("manifest.json");
        crate::write_atomically(&path, |f| std::io::Write::write_all(f, &json)).map_err(io(&path))
    }

    /// The parts, in order, into [`Target::joined`].
    fn join(&self) -> Result<()> {
        let dir = self.target.parts_dir();
        let parts: Vec<String> = self.manifest.parts.iter().map(|p| dir.join(&p.file).display().to_string()).collect();
        let joined = self.target.joined();
        let sink = if joined.extension().is_some_and(|e| e == "parquet") {
            NodeDef::new("output", Some("parts"), WriteParquetConfig { path: joined })
        } else {
            let rename = [(columns::ID.to_string(), self.config.tower.id_column().to_string())].into_iter().collect();
            NodeDef::new("output", Some("parts"), WriteJsonlConfig { path: joined, rename })
        };
        let registry = Registry::builtin();
        let join = Planner::new(&registry)
            .plan(
                JobSettings { quarantine: dir.join("join-quarantine.jsonl"), ..JobSettings::default() },
                vec![NodeDef::new("parts", None, ParquetConfig::new(parts, None, false)), sink],
            )
            .map_err(|problems| Error::Internal(format!("joining parts: {problems}")))?;
        join.run()?;
        Ok(())
    }
}

impl Sink for PartsSink {
    fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        let mut batch = batch.clone();
        if self.skip > 0 {
            let skipped = (self.skip as usize).min(batch.num_rows());
            self.skip -= skipped as u64;
            batch = batch.slice(skipped, batch.num_rows() - skipped);
        }
        // Each batch goes straight into the open part: memory stays one row group whatever the
        // part size or corpus.
        let part_rows = self.config.part_rows;
        while batch.num_rows() > 0 {
            let written = self.open.as_ref().map_or(0, |p| p.rows);
            let take = batch.num_rows().min(part_rows - written);
            self.append(&batch.slice(0, take))?;
            batch = batch.slice(take, batch.num_rows() - take);
            if written + take == part_rows {
                self.close_part()?;
            }
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<(Written, Staged)> {
        if self.manifest.parts.is_empty() && self.open.is_none() {
            // No rows at all: still one (empty) part, so the output exists with its schema.
            self.append(&RecordBatch::new_empty(self.schema.clone()))?;
        }
        self.close_part()?;
        self.join()?;
        let rows: u64 = self.manifest.parts.iter().map(|p| p.rows).sum();
        let (joined, output) = (self.target.joined(), self.target.output());
        let written = Written { rows, path: output.clone() };
        let PartsSink { config, target, _lock: lock, .. } = *self;
        let staged = Staged::with_publish(joined, output, move |committed| {
            let _lock = lock;
            publish(&config, &target, committed.quarantined)
        });
        Ok((written, staged))
    }
}

/// Moves the joined output into place and removes the work directory. A shard's part replaces
/// its previous version, then its entry is written; the old entry goes first, so at no moment
/// does an entry vouch for a part it does not describe, and a crash in between leaves a part
/// without an entry, which `manifest check` names (and a rerun repairs).
fn publish(config: &WritePartsConfig, target: &Target, quarantined: u64) -> Result<()> {
    let joined = target.joined();
    match target {
        Target::File(output) => storage::rename(&joined, output).map_err(io(output))?,
        Target::Shard { dir, shard } => {
            let entry = entry(config, *shard, &joined, quarantined)?;
            let entry_path = dir.join(format!("{}.json", part_stem(*shard)));
            match storage::remove_file(&entry_path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&entry_path)(e)),
                _ => {}
            }
            let part_path = dir.join(&entry.part);
            storage::rename(&joined, &part_path).map_err(io(&part_path))?;
            let mut json = serde_json::to_vec_pretty(&entry)?;
            json.push(b'\n');
            crate::write_atomically(&entry_path, |f| std::io::Write::write_all(f, &json)).map_err(io(&entry_path))?;
            if quarantined == 0 {
                // A previous run's bad records, which this run no longer met.
                let _ = storage::remove_file(quarantine_path(dir, *shard));
            }
        }
    }
    let work = target.parts_dir();
    storage::remove_dir_all(&work).map_err(io(&work))
}

/// Shard `shard`'s entry for its joined part, read back from the file as a reader will meet it.
fn entry(config: &WritePartsConfig, shard: Shard, joined: &Path, quarantined: u64) -> Result<Entry> {
    use parquet::arrow::ProjectionMask;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let (sha256, bytes) = sha256_file(joined)?;
    let parquet_error = |source| Error::Parquet { path: joined.display().to_string(), source };
    let file = storage::open(joined).map_err(io(joined))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(parquet_error)?;
    let metadata = builder.schema().metadata().clone();
    let mask = ProjectionMask::roots(builder.parquet_schema(), [0]);
    let mut ids = Vec::new();
    for batch in builder.with_projection(mask).build().map_err(parquet_error)? {
        let batch = batch.map_err(|source| Error::ArrowFile { path: joined.display().to_string(), source })?;
        let column = batch
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .ok_or_else(|| Error::Internal("write_parts: the id column is not int64".into()))?;
        ids.extend(column.iter().flatten());
    }
    let meta = |key: &str| metadata.get(key).cloned();
    let model = meta(metadata::MODEL).unwrap_or_default();
    let prepared = config.prepared.clone().unwrap_or_default();
    let (vision_model, text_model) = match model.split_once('@') {
        Some((v, t)) => (Some(v.to_string()), Some(t.to_string())),
        None => (prepared.vision_model, prepared.text_model),
    };
    let stem = part_stem(shard);
    Ok(Entry {
        format: ENTRY_FORMAT.into(),
        shard: shard.to_string(),
        index: shard.index,
        count: shard.count,
        part: format!("{stem}.parquet"),
        rows: ids.len() as u64,
        first_id: ids.first().copied(),
        last_id: ids.last().copied(),
        min_id: ids.iter().min().copied(),
        max_id: ids.iter().max().copied(),
        bytes,
        sha256,
        tower: config.tower,
        model,
        vision_model,
        text_model,
        precision: meta(metadata::PRECISION).unwrap_or_default(),
        dim: meta(metadata::DIM).and_then(|d| d.parse().ok()),
        checkpoint: config.checkpoint.clone().or_else(|| meta(metadata::CHECKPOINT)).unwrap_or_default(),
        checkpoint_sha256: meta(metadata::CHECKPOINT_SHA256).unwrap_or_default(),
        source: config.source.clone(),
        quarantined,
        created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        cnclip_version: env!("CARGO_PKG_VERSION").into(),
        job: JOB_VARIABLES
            .iter()
            .filter_map(|var| std::env::var(var).ok().map(|value| (var.to_string(), value)))
            .collect(),
        made_from: prepared.made_from,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_file_names_round_trip() {
        let shard = Shard { index: 3, count: 12 };
        assert_eq!(part_stem(shard), "part-00003-of-00012");
        assert_eq!(parse_name("part-00003-of-00012.parquet"), Some((shard, FileKind::Part)));
        assert_eq!(parse_name(".part-00003-of-00012.cnclip-parts"), Some((shard, FileKind::Work)));
        assert_eq!(parse_name("part-3-of-12.parquet"), None);
        let target = Target::Shard { dir: "out".into(), shard };
        assert_eq!(target.output(), Path::new("out/part-00003-of-00012.parquet"));
        assert_eq!(target.joined(), Path::new("out/.part-00003-of-00012.cnclip-parts/part-00003-of-00012.parquet"));
        let file = Target::File("feats/x.jsonl".into());
        assert_eq!(file.parts_dir(), Path::new("feats/x.jsonl.cnclip-parts"));
        assert_eq!(file.quarantine_path(), Path::new("feats/x.quarantine.jsonl"));
    }
}
