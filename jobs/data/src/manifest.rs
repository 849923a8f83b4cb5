//! Sharded outputs and `cnclip manifest check DIR` (a folder, or a prefix in an object store):
//! is a directory of shard parts complete and consistent?
//!
//! A job given `--shard i/n` (an array task: Slurm's `SLURM_ARRAY_TASK_ID`, a Kubernetes
//! Indexed Job's `JOB_COMPLETION_INDEX`) with a directory as its output writes its share as
//! `DIR/part-{i:05}-of-{n:05}.parquet` — the feature table an unsharded `.parquet` output
//! would hold, restricted to the shard's rows — and then, atomically, the part's entry
//! `DIR/part-{i:05}-of-{n:05}.json` ([`Entry`]: rows, id range, sha256 and size of the part,
//! model, checkpoint and its sha256, source). One file per shard, so concurrent shards never
//! write the same file and a rerun replaces its own part and entry only; the entry is written
//! after the part, so an entry vouches for a whole part (its checksum says which). Work in
//! progress lives in the hidden `DIR/.part-{i:05}-of-{n:05}.cnclip-parts/`, which readers of
//! `DIR` (DataFusion's listing tables, `knn`'s `DIR/*.parquet`) do not descend into, and the
//! finished part is renamed from there: `DIR` never holds half a part. Bad records go to
//! `DIR/part-{i:05}-of-{n:05}.quarantine.jsonl`.
//!
//! `check` lists every problem at once, each naming its file or shard: a shard missing, a part
//! without its entry or an entry without its part, an entry that describes another shard, parts
//! of different splits (`n`), a part whose size, checksum or row count differs from its entry
//! (truncated, altered, replaced), parts made by different models, checkpoints or precisions,
//! an id in two parts, unfinished shards, stray Parquet files a reader would take for parts;
//! and, given the source, source ids in no part (unless their shard quarantined them) and part
//! ids not in the source. The source is read as extraction reads it: the same source node
//! ([`source`]) in a pipeline. Parts are checked as files (bytes, footer, id column), which is
//! what a reader of the directory will meet.
//!
//! The layout and the entry format are defined beside the sink that writes them,
//! `write_parts` (`operators/src/sinks/parts.rs`), and re-exported here. The source rule is
//! also what `extract-features` (in `cnclip-torch`) reads: both binaries build this module.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use arrow::array::{Array, Int64Array};
use cnclip_operators::sources::Shard;
use cnclip_operators::sources::folder::ImageFolderConfig;
use cnclip_operators::sources::jsonl::JsonlConfig;
use cnclip_operators::sources::lmdb::LmdbConfig;
use cnclip_operators::sources::lmdb::{self, Database};
use cnclip_operators::sources::parquet::ParquetConfig;
use cnclip_operators::sources::tsv::TsvConfig;
use cnclip_operators::sources::webdataset::{self, WebDatasetConfig, WebDatasetTable};
use cnclip_operators::spec::{JobSettings, NodeDef, Planner, Registry};
use cnclip_operators::storage;
use cnclip_operators::transforms::preprocess::Order;
use cnclip_schemas::metadata;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Verify a sharded output directory: every shard once, parts intact, one model, no id twice.
    ///
    /// The directory is what `extract-features --shard i/n` writes (`part-IIIII-of-NNNNN.parquet`
    /// and their `.json` entries). Given the source (`--image-data` or `--text-data`, as given to
    /// extraction), every id of it must be in a part. Lists every problem and exits 1, or prints
    /// a summary (shards, rows, model, checkpoint).
    Check(CheckArgs),
}

#[derive(clap::Args)]
pub struct CheckArgs {
    /// The directory of parts.
    dir: PathBuf,
    /// The images the parts were extracted from (as given to extract-features): every id must
    /// be in a part.
    #[arg(long, num_args = 1.., conflicts_with = "text_data")]
    image_data: Vec<String>,
    /// The texts the parts were extracted from, likewise.
    #[arg(long)]
    text_data: Option<String>,
}

pub fn run(command: Command) -> Result<()> {
    cnclip_operators::signals::catch_interrupts()?;
    match command {
        Command::Check(args) => {
            let source = match (&args.text_data, args.image_data.is_empty()) {
                (Some(texts), _) => Some((Tower::Text, vec![texts.clone()])),
                (None, false) => Some((Tower::Image, args.image_data.clone())),
                (None, true) => None,
            };
            let report = check(&args.dir, source.as_ref().map(|(t, d)| (*t, d.as_slice())))?;
            for note in &report.notes {
                eprintln!("note: {note}");
            }
            if !report.problems.is_empty() {
                for problem in &report.problems {
                    eprintln!("  - {problem}");
                }
                bail!(
                    "{}: {} problem{} (listed above): the sharded output is not complete and consistent",
                    args.dir.display(),
                    report.problems.len(),
                    if report.problems.len() == 1 { "" } else { "s" }
                );
            }
            println!("{}", report.summary);
            Ok(())
        }
    }
}

// The layout and the entry format live with the sink that writes them (`write_parts`).
pub use cnclip_operators::sinks::parts::{
    ENTRY_FORMAT, Entry, FileKind, JOB_VARIABLES, Tower, parse_name, part_stem, quarantine_path, work_dir,
};

/// A part file as a reader meets it.
#[derive(Debug, Clone)]
pub struct PartFacts {
    pub bytes: u64,
    pub sha256: String,
    pub rows: u64,
    /// The `id` column, in file order.
    pub ids: Vec<i64>,
    /// The Arrow schema's metadata (model, checkpoint, …).
    pub metadata: HashMap<String, String>,
    /// The columns and their types, as text (to compare parts).
    pub columns: String,
}

/// The sha256 (hex) and size of a file, streamed.
/// Only a regular file (links followed) is read: a FIFO or a device named like a part would
/// block or never end. SIGINT and SIGTERM stop the read between chunks.
pub fn sha256_file(path: &Path) -> Result<(String, u64)> {
    use sha2::Digest;
    use std::io::Read;
    regular(path)?;
    let mut file = storage::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = sha2::Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        if let Some(signal) = cnclip_operators::signals::interrupted() {
            return Err(cnclip_operators::Error::Interrupted { signal }.into());
        }
        let n = file.read(&mut buffer).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        bytes += n as u64;
    }
    Ok((format!("{:x}", hasher.finalize()), bytes))
}

/// `Ok` when `path` is a regular file (links followed), else an error saying what it is.
fn regular(path: &Path) -> Result<()> {
    let meta = storage::metadata(path).with_context(|| format!("opening {}", path.display()))?;
    if !meta.is_file() {
        bail!("{} is {}, not a regular file", path.display(), cnclip_operators::sources::parts::kind_of(&meta));
    }
    Ok(())
}

/// Size, checksum, rows, ids and metadata of a part. The bytes are hashed before the file is
/// parsed, so a part that no longer parses still reports them: see [`read_part`].
pub fn inspect_part(path: &Path) -> Result<PartFacts> {
    let (sha256, bytes) = sha256_file(path)?;
    read_part(path, sha256, bytes)
}

pub fn read_part(path: &Path, sha256: String, bytes: u64) -> Result<PartFacts> {
    use parquet::arrow::ProjectionMask;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let file = storage::open(path).with_context(|| format!("opening {}", path.display()))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)?;
    let schema = builder.schema().clone();
    let Ok(id_index) = schema.index_of(cnclip_schemas::columns::ID) else { bail!("no `id` column") };
    let columns =
        schema.fields().iter().map(|f| format!("{}: {}", f.name(), f.data_type())).collect::<Vec<_>>().join(", ");
    let mask = ProjectionMask::roots(builder.parquet_schema(), [id_index]);
    let mut ids = Vec::new();
    for batch in builder.with_projection(mask).build()? {
        let batch = batch?;
        let column = batch.column(0).as_any().downcast_ref::<Int64Array>().context("`id` is not int64")?;
        if column.null_count() > 0 {
            bail!("null ids");
        }
        ids.extend_from_slice(column.values());
    }
    Ok(PartFacts { bytes, sha256, rows: ids.len() as u64, ids, metadata: schema.metadata().clone(), columns })
}

/// A tower's source node (named `source`), as extraction reads it, and what it needs before
/// the encoder: base64 decoding, and the preprocessing order.
// Used by extract-features (in `cnclip-torch`, which builds this module too).
pub struct Source {
    pub node: NodeDef,
    pub base64: bool,
    pub order: Order,
}

/// The source of `data` (`--image-data` or `--text-data`, as given): WebDataset tar shards
/// (`.tar` files, globs or brace patterns, local or in an object store) for either tower; images
/// from an LMDB `imgs` directory (or its split directory), an image folder, Parquet images tables
/// or TSV shards; texts from Parquet texts tables or cn_clip's JSONL. Repeated ids are
/// quarantined.
///
/// # Errors
/// Several LMDB directories, or no data.
pub fn source(tower: Tower, data: &[String]) -> Result<Source> {
    source_with(tower, data, &Columns::default())
}

/// The columns of Parquet data in another layout (img2dataset, Hugging Face): its id (or key)
/// column and the tower's image or text column (`--id-column`, `--image-column`,
/// `--text-column`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Columns {
    pub id: Option<String>,
    pub value: Option<String>,
}

/// [`source`], with Parquet data read through `columns` when they are given.
///
/// # Errors
/// As [`source`]; a column mapping for data that is not Parquet, or without the tower's column.
pub fn source_with(tower: Tower, data: &[String], columns: &Columns) -> Result<Source> {
    let Some(first) = data.first() else { bail!("no {} data given", tower.name()) };
    if let Some(id) = &columns.id {
        if !data.iter().all(|p| p.ends_with(".parquet")) {
            bail!("--id-column maps the columns of Parquet data; the {} data is not Parquet", tower.name());
        }
        let Some(value) = &columns.value else {
            bail!("--id-column: give the {} column too (--{}-column)", tower.name(), tower.name());
        };
        let mut config = ParquetConfig::new(data.to_vec(), None, true);
        config.id_column = Some(id.clone());
        match tower {
            Tower::Image => config.image_column = Some(value.clone()),
            Tower::Text => config.text_column = Some(value.clone()),
        }
        return Ok(Source {
            node: NodeDef::new("source", None, config),
            base64: false,
            order: Order::ResizeThenConvert,
        });
    }
    let max_record_bytes = cnclip_operators::sources::MAX_RECORD_BYTES;
    let node = |config| NodeDef::new("source", None, config);
    Ok(match tower {
        _ if data.iter().all(|p| webdataset::is_shard_path(p)) => {
            let table = match tower {
                Tower::Image => WebDatasetTable::Images,
                Tower::Text => WebDatasetTable::Texts,
            };
            Source {
                node: NodeDef::new("source", None, WebDatasetConfig::new(data.to_vec(), table)),
                base64: false,
                order: Order::ResizeThenConvert,
            }
        }
        Tower::Text if data.iter().all(|p| p.ends_with(".parquet")) => Source {
            node: node(ParquetConfig::new(data.to_vec(), Some("texts".into()), true)),
            base64: false,
            order: Order::ResizeThenConvert,
        },
        Tower::Text => Source {
            node: NodeDef::new("source", None, JsonlConfig { paths: data.to_vec(), dedupe: true, max_record_bytes }),
            base64: false,
            order: Order::ResizeThenConvert,
        },
        Tower::Image => {
            let first = Path::new(first);
            // An `imgs` directory or its split, local or an object store prefix.
            let lmdb_split = if lmdb::is_environment(first) {
                first.parent().map(Path::to_path_buf)
            } else if lmdb::is_environment(&first.join("imgs")) {
                Some(first.to_path_buf())
            } else {
                None
            };
            if let Some(split) = lmdb_split {
                if data.len() > 1 {
                    bail!("--image-data: give one LMDB directory");
                }
                Source {
                    node: NodeDef::new("source", None, LmdbConfig { path: split, database: Database::Imgs }),
                    base64: true,
                    order: Order::ResizeThenConvert,
                }
            } else if first.is_dir() {
                // torchvision's ImageFolder loader converts to RGB before the transform resizes.
                Source {
                    node: NodeDef::new("source", None, ImageFolderConfig { path: first.to_path_buf() }),
                    base64: false,
                    order: Order::ConvertThenResize,
                }
            } else if data.iter().all(|p| p.ends_with(".parquet")) {
                Source {
                    node: node(ParquetConfig::new(data.to_vec(), Some("images".into()), true)),
                    base64: false,
                    order: Order::ResizeThenConvert,
                }
            } else {
                Source {
                    node: NodeDef::new(
                        "source",
                        None,
                        TsvConfig { paths: data.to_vec(), table: Default::default(), dedupe: true, max_record_bytes },
                    ),
                    base64: true,
                    order: Order::ResizeThenConvert,
                }
            }
        }
    })
}

/// Every id of a source, read through its pipeline (streamed; repeated ids are quarantined to
/// a scratch file, as extraction quarantines them).
fn source_ids(tower: Tower, data: &[String]) -> Result<Vec<i64>> {
    let scratch = storage::scratch_dir(None, ".cnclip-manifest-")?;
    let registry = Registry::builtin();
    let settings = JobSettings { quarantine: scratch.path().join("source-quarantine.jsonl"), ..JobSettings::default() };
    let pipeline = Planner::new(&registry).stream("source").plan(settings, vec![source(tower, data)?.node])?;
    let mut ids = Vec::new();
    for batch in pipeline.stream()? {
        let batch = batch?;
        let column = batch
            .column_by_name(tower.id_column())
            .and_then(|c| c.as_any().downcast_ref::<Int64Array>())
            .with_context(|| format!("the source has no int64 `{}` column", tower.id_column()))?;
        ids.extend(column.iter().flatten());
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// A shard as a sortable key: (index, count).
type Key = (u64, u64);

fn key(shard: Shard) -> Key {
    (shard.index, shard.count)
}

fn shard((index, count): Key) -> Shard {
    Shard { index, count }
}

/// What [`check`] found.
#[derive(Debug, Default)]
pub struct Report {
    /// Each a sentence naming its file or shard; none when the output is whole.
    pub problems: Vec<String>,
    /// Things worth knowing that are not faults (quarantined records, a temporary file).
    pub notes: Vec<String>,
    /// Shards, rows, model and checkpoint (meaningful when there is no problem).
    pub summary: String,
}

/// At most this many ids are named per problem.
const EXAMPLES: usize = 8;

fn examples(ids: &[i64]) -> String {
    let shown: Vec<String> = ids.iter().take(EXAMPLES).map(i64::to_string).collect();
    let more = if ids.len() > EXAMPLES { format!(", … {} more", ids.len() - EXAMPLES) } else { String::new() };
    format!("{}{more}", shown.join(", "))
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Checks the sharded output `dir`, and, given `source` (the tower and its data as given to
/// extraction), that every source id is in it.
///
/// # Errors
/// Only when `dir` cannot be listed or the source cannot be read; what is wrong with the output
/// comes back in [`Report::problems`].
pub fn check(dir: &Path, source: Option<(Tower, &[String])>) -> Result<Report> {
    // A prefix in an object store is checked in its copy in the spool (each part is read whole
    // for its checksum anyway); messages name the prefix.
    let shown = dir;
    let copy;
    let dir = match storage::is_remote(dir) {
        true => {
            copy = storage::fetch::local_dir_copy(dir).with_context(|| format!("{}", dir.display()))?;
            copy.as_path()
        }
        false => dir,
    };
    if !dir.is_dir() {
        bail!(
            "{} is not a directory (a sharded output is one: extract-features --shard i/n writes parts into it)",
            shown.display()
        );
    }
    let mut report = Report::default();
    let problems = &mut report.problems;
    // What the directory holds, by shard.
    let mut parts: BTreeMap<Key, String> = BTreeMap::new();
    let mut entries: BTreeMap<Key, String> = BTreeMap::new();
    let mut quarantines: Vec<PathBuf> = Vec::new();
    let mut unfinished: BTreeSet<Key> = BTreeSet::new();
    let mut listing: Vec<_> = storage::read_dir(dir)
        .with_context(|| format!("listing {}", shown.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    listing.sort();
    for name in listing {
        match parse_name(&name) {
            Some((shard, FileKind::Part)) => {
                parts.insert(key(shard), name);
            }
            Some((shard, FileKind::Entry)) => {
                entries.insert(key(shard), name);
            }
            Some((_, FileKind::Quarantine)) => quarantines.push(dir.join(name)),
            Some((shard, FileKind::Work)) => {
                unfinished.insert(key(shard));
            }
            None if name.starts_with(".cnclip-tmp-") => {
                report.notes.push(format!("{name}: a file being written (or left by a killed job)"))
            }
            None if name.ends_with(".parquet") && !name.starts_with('.') => problems.push(format!(
                "{name} is not a shard part (part-IIIII-of-NNNNN.parquet), yet readers of the directory read it as one: move it out"
            )),
            None => {}
        }
    }
    if parts.is_empty() && entries.is_empty() {
        let running: Vec<String> = unfinished.iter().map(|k| shard(*k).to_string()).collect();
        problems.push(match running.is_empty() {
            true => format!("{} holds no shard part (part-IIIII-of-NNNNN.parquet)", shown.display()),
            false => format!(
                "{} holds no finished shard part; shards {} are unfinished (still running, or they stopped — rerun them)",
                shown.display(),
                running.join(", ")
            ),
        });
        return Ok(report);
    }

    // One split: every file of the same n, and the n most files agree on is the expected one.
    let mut by_count: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    for (shard, name) in parts.iter().chain(&entries) {
        by_count.entry(shard.1).or_default().insert(name.clone());
    }
    let count = by_count.iter().max_by_key(|(n, files)| (files.len(), **n)).map(|(n, _)| *n).unwrap_or(1);
    if by_count.len() > 1 {
        let splits: Vec<String> = by_count
            .iter()
            .map(|(n, files)| format!("n={n} ({})", files.iter().cloned().collect::<Vec<_>>().join(", ")))
            .collect();
        problems.push(format!(
            "parts of different splits in one directory: {}; a table is one split (remove the parts of the other)",
            splits.join(" and ")
        ));
    }
    for index in 0..count {
        let shard = Shard { index, count };
        let stem = part_stem(shard);
        let work = if unfinished.contains(&key(shard)) {
            format!(
                " ({} exists: the shard is still running, or it stopped — rerun it)",
                work_dir(Path::new(""), shard).display()
            )
        } else {
            String::new()
        };
        match (parts.contains_key(&key(shard)), entries.contains_key(&key(shard))) {
            (false, false) => problems.push(format!("shard {shard} is missing: no {stem}.parquet{work}")),
            (true, false) => problems.push(format!(
                "{stem}.parquet has no entry {stem}.json: shard {shard} did not finish writing{work}; rerun it"
            )),
            (false, true) => problems.push(format!("{stem}.json has no part {stem}.parquet: rerun shard {shard}")),
            (true, true) => {}
        }
    }
    for k in &unfinished {
        if parts.contains_key(k) && entries.contains_key(k) {
            report.notes.push(format!(
                "shard {} is being rerun, or a rerun stopped ({} exists): its finished part is checked as it is",
                shard(*k),
                work_dir(Path::new(""), shard(*k)).display()
            ));
        }
    }

    // Entries: readable, about their own shard, one per shard.
    let mut read_entries: BTreeMap<Key, Entry> = BTreeMap::new();
    let mut claims: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, name) in &entries {
        let shard = shard(*k);
        let entry = regular(&dir.join(name))
            .and_then(|()| storage::read(dir.join(name)).map_err(anyhow::Error::from))
            .and_then(|bytes| Ok(serde_json::from_slice::<Entry>(&bytes)?));
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                problems.push(format!("{name} cannot be read as a shard entry: {e}"));
                continue;
            }
        };
        if entry.format != ENTRY_FORMAT {
            problems.push(format!("{name}: format `{}`, expected `{ENTRY_FORMAT}`", entry.format));
        }
        let stem = part_stem(shard);
        if entry.shard != shard.to_string() || entry.part != format!("{stem}.parquet") {
            problems.push(format!(
                "{name} describes shard {} ({}), not {shard}: copied from another shard? rerun shard {shard}",
                entry.shard, entry.part
            ));
        }
        claims.entry(entry.shard.clone()).or_default().push(name.clone());
        read_entries.insert(*k, entry);
    }
    for (shard, names) in &claims {
        if names.len() > 1 {
            problems.push(format!("shard {shard} has {} entries: {}", names.len(), names.join(", ")));
        }
    }

    // Parts: intact (size, checksum, footer, rows), and what they were made with.
    let mut facts: BTreeMap<Key, PartFacts> = BTreeMap::new();
    for (k, name) in &parts {
        let shard = shard(*k);
        let path = dir.join(name);
        let entry = read_entries.get(k);
        let (sha256, bytes) = match sha256_file(&path) {
            Ok(hash) => hash,
            Err(e)
                if e.downcast_ref::<cnclip_operators::Error>()
                    .is_some_and(|e| matches!(e, cnclip_operators::Error::Interrupted { .. })) =>
            {
                return Err(e);
            }
            Err(e) => {
                problems.push(format!("{name}: {e:#}"));
                continue;
            }
        };
        let rerun = format!("rerun shard {shard}");
        if let Some(entry) = entry {
            if bytes != entry.bytes {
                problems.push(format!(
                    "{name} is {bytes} bytes, its entry says {}: truncated or altered; {rerun}",
                    entry.bytes
                ));
            } else if sha256 != entry.sha256 {
                problems.push(format!(
                    "{name}'s sha256 is {sha256}, its entry says {}: altered or replaced; {rerun}",
                    entry.sha256
                ));
            }
        }
        let part = match read_part(&path, sha256, bytes) {
            Ok(part) => part,
            Err(e) => {
                problems.push(format!("{name} cannot be read as a feature table: {e:#}; {rerun}"));
                continue;
            }
        };
        if let Some(entry) = entry {
            if part.rows != entry.rows {
                problems.push(format!("{name} holds {} rows, its entry says {}; {rerun}", part.rows, entry.rows));
            }
            let made_with = |key: &str| part.metadata.get(key).map(String::as_str).unwrap_or("");
            if made_with(metadata::CHECKPOINT_SHA256) != entry.checkpoint_sha256
                || made_with(metadata::MODEL) != entry.model
            {
                problems.push(format!(
                    "{name} was made with {} (checkpoint sha256 {}), its entry says {} ({}); {rerun}",
                    made_with(metadata::MODEL),
                    made_with(metadata::CHECKPOINT_SHA256),
                    entry.model,
                    entry.checkpoint_sha256
                ));
            }
        }
        facts.insert(*k, part);
    }

    // The same model, checkpoint, precision, tower and columns everywhere.
    let describe = |k: &Key| parts.get(k).or(entries.get(k)).cloned().unwrap_or_else(|| shard(*k).to_string());
    let mut agree = |what: &str, values: Vec<(Key, String)>| {
        let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (k, value) in values {
            groups.entry(value).or_default().push(describe(&k));
        }
        if groups.len() > 1 {
            let mut groups: Vec<(String, Vec<String>)> = groups.into_iter().collect();
            groups.sort_by_key(|(_, files)| std::cmp::Reverse(files.len()));
            let listed: Vec<String> =
                groups.iter().map(|(value, files)| format!("{value} in {}", files.join(", "))).collect();
            problems.push(format!("parts made with different {what}: {}", listed.join("; ")));
        }
    };
    let of_entries = |field: fn(&Entry) -> String| read_entries.iter().map(|(s, e)| (*s, field(e))).collect();
    agree("towers", of_entries(|e| format!("{} features", e.tower.name())));
    agree("models", of_entries(|e| e.model.clone()));
    agree("checkpoints", of_entries(|e| format!("sha256 {} ({})", e.checkpoint_sha256, e.checkpoint)));
    agree("precisions", of_entries(|e| e.precision.clone()));
    agree("columns", facts.iter().map(|(s, f)| (*s, f.columns.clone())).collect());

    // No id twice: sorted (id, shard) pairs, neighbours compared.
    let mut all: Vec<(i64, Key)> =
        facts.iter().flat_map(|(k, part)| part.ids.iter().map(move |id| (*id, *k))).collect();
    all.sort_unstable();
    let mut twice: BTreeMap<(Key, Key), Vec<i64>> = BTreeMap::new();
    for pair in all.windows(2) {
        if pair[0].0 == pair[1].0 {
            twice.entry((pair[0].1, pair[1].1)).or_default().push(pair[0].0);
        }
    }
    for ((a, b), ids) in &twice {
        let place = if a == b {
            format!("twice in {}", describe(a))
        } else {
            format!("in both {} and {}", describe(a), describe(b))
        };
        problems.push(format!("{} {place}: {}", plural(ids.len(), "id is", "ids are"), examples(ids)));
    }
    let mut ids: Vec<i64> = all.iter().map(|(id, _)| *id).collect();
    ids.dedup();

    // Complete: every source id in a part (or quarantined by its shard), no id from elsewhere.
    let mut against = String::new();
    if let Some((tower, data)) = source {
        if let Some(entry) = read_entries.values().find(|e| e.tower != tower) {
            problems.push(format!(
                "the parts hold {} features, the source given is {}s (--{}-data)",
                entry.tower.name(),
                tower.name(),
                tower.name()
            ));
        }
        let expected = source_ids(tower, data).with_context(|| format!("reading the source {}", data.join(" ")))?;
        let quarantined = quarantined_ids(&quarantines);
        let (mut missing, mut explained, mut extra) = (Vec::new(), Vec::new(), Vec::new());
        // Both sorted and without repeats: one merge walk.
        let (mut i, mut j) = (0, 0);
        while i < expected.len() || j < ids.len() {
            let (a, b) = (expected.get(i), ids.get(j));
            if a.is_some() && a == b {
                (i, j) = (i + 1, j + 1);
            } else if let Some(&a) = a.filter(|a| b.is_none_or(|b| a < &b)) {
                if quarantined.contains(&a) {
                    explained.push(a)
                } else {
                    missing.push(a)
                }
                i += 1;
            } else if let Some(&b) = b {
                extra.push(b);
                j += 1;
            }
        }
        if !missing.is_empty() {
            problems.push(format!(
                "{} of the source in no part{}: {}",
                plural(missing.len(), "id", "ids"),
                if facts.len() < parts.len() { " (or in a part that cannot be read)" } else { "" },
                examples(&missing)
            ));
        }
        if !explained.is_empty() {
            report.notes.push(format!(
                "{} of the source quarantined by {} shard (see part-*.quarantine.jsonl): {}",
                plural(explained.len(), "id", "ids"),
                if explained.len() == 1 { "its" } else { "their" },
                examples(&explained)
            ));
        }
        if !extra.is_empty() {
            problems.push(format!(
                "{} in the parts but not in the source: {} (made from other data?)",
                plural(extra.len(), "id", "ids"),
                examples(&extra)
            ));
        }
        against = format!(
            "\n  against {}: {} source ids, {} in the parts{}",
            data.join(" "),
            expected.len(),
            expected.len() - missing.len() - explained.len(),
            if explained.is_empty() { String::new() } else { format!(", {} quarantined", explained.len()) }
        );
    }

    let rows: u64 = facts.values().map(|f| f.rows).sum();
    let range = match (ids.first(), ids.last()) {
        (Some(a), Some(b)) => format!(" (ids {a}–{b})"),
        _ => String::new(),
    };
    let first = read_entries.values().next();
    report.summary = format!(
        "{}: {} of {count} shards, {rows} rows{range}{}{}{against}",
        shown.display(),
        facts.len(),
        first.map(|e| format!(", {} features", e.tower.name())).unwrap_or_default(),
        first
            .map(|e| format!(
                "\n  model {} ({}{}), checkpoint {} sha256 {}",
                e.model,
                e.precision,
                e.dim.map(|d| format!(", dim {d}")).unwrap_or_default(),
                e.checkpoint,
                e.checkpoint_sha256
            ))
            .unwrap_or_default(),
    );
    Ok(report)
}

/// The ids named in the shards' quarantine files (cn_clip ids are integers; others are skipped).
fn quarantined_ids(files: &[PathBuf]) -> BTreeSet<i64> {
    let mut ids = BTreeSet::new();
    for file in files {
        if regular(file).is_err() {
            continue;
        }
        let Ok(text) = storage::read_to_string(file) else { continue };
        for line in text.lines() {
            let id = serde_json::from_str::<serde_json::Value>(line).ok().and_then(|v| match &v["id"] {
                serde_json::Value::String(s) => s.parse::<i64>().ok(),
                serde_json::Value::Number(n) => n.as_i64(),
                _ => None,
            });
            ids.extend(id);
        }
    }
    ids
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{FixedSizeListArray, Float32Array};
    use arrow::record_batch::RecordBatch;
    use cnclip_schemas::{FeatureMetadata, FeatureType};

    use super::*;

    /// Writes shard `shard`'s part (2-d features, one per id) and its entry, as extraction does.
    fn write_shard(dir: &Path, shard: Shard, ids: &[i64], checkpoint_sha256: &str) {
        let meta = FeatureMetadata {
            model: "custom".into(),
            checkpoint: "c.safetensors".into(),
            checkpoint_sha256: checkpoint_sha256.into(),
            precision: "fp32".into(),
            dim: 2,
            normalized: true,
            preprocessing: "test".into(),
        };
        let schema = cnclip_schemas::image_features(&meta, FeatureType::Float32);
        let values = Float32Array::from_iter_values(ids.iter().flat_map(|&id| [id as f32, 1.0]));
        let item = Arc::new(arrow::datatypes::Field::new("item", arrow::datatypes::DataType::Float32, false));
        let features = FixedSizeListArray::new(item, 2, Arc::new(values), None);
        let batch =
            RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(ids.to_vec())), Arc::new(features)])
                .unwrap();
        let stem = part_stem(shard);
        let path = dir.join(format!("{stem}.parquet"));
        let mut sink = cnclip_operators::sinks::parquet::ParquetSink::create(&path, "image_features", schema).unwrap();
        sink.write(&batch).unwrap();
        sink.finish().unwrap();
        let part = inspect_part(&path).unwrap();
        let entry = Entry {
            format: ENTRY_FORMAT.into(),
            shard: shard.to_string(),
            index: shard.index,
            count: shard.count,
            part: format!("{stem}.parquet"),
            rows: part.rows,
            first_id: ids.first().copied(),
            last_id: ids.last().copied(),
            min_id: ids.iter().min().copied(),
            max_id: ids.iter().max().copied(),
            bytes: part.bytes,
            sha256: part.sha256,
            tower: Tower::Image,
            model: "custom".into(),
            vision_model: None,
            text_model: None,
            precision: "fp32".into(),
            dim: Some(2),
            checkpoint: "c.safetensors".into(),
            checkpoint_sha256: checkpoint_sha256.into(),
            source: vec!["imgs.tsv".into()],
            quarantined: 0,
            created: "2025-01-01T00:00:00Z".into(),
            cnclip_version: "0".into(),
            job: BTreeMap::new(),
            made_from: None,
        };
        std::fs::write(dir.join(format!("{stem}.json")), serde_json::to_vec(&entry).unwrap()).unwrap();
    }

    #[test]
    fn a_whole_split_passes_and_a_second_split_a_twice_held_id_or_a_foreign_checkpoint_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write_shard(root, Shard { index: 0, count: 2 }, &[0, 2, 4], "aa");
        write_shard(root, Shard { index: 1, count: 2 }, &[1, 3], "aa");
        let report = check(root, None).unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert!(report.summary.contains("2 of 2 shards, 5 rows (ids 0–4), image features"), "{}", report.summary);

        // A part of a 3-way split, holding an id of the 2-way one, made with another checkpoint.
        write_shard(root, Shard { index: 0, count: 3 }, &[3, 9], "bb");
        let problems = check(root, None).unwrap().problems;
        assert_eq!(
            problems,
            [
                "parts of different splits in one directory: n=2 (part-00000-of-00002.json, \
                 part-00000-of-00002.parquet, part-00001-of-00002.json, part-00001-of-00002.parquet) and n=3 \
                 (part-00000-of-00003.json, part-00000-of-00003.parquet); a table is one split (remove the parts \
                 of the other)",
                "parts made with different checkpoints: sha256 aa (c.safetensors) in part-00000-of-00002.parquet, \
                 part-00001-of-00002.parquet; sha256 bb (c.safetensors) in part-00000-of-00003.parquet",
                "1 id is in both part-00000-of-00003.parquet and part-00001-of-00002.parquet: 3",
            ],
        );
    }

    #[test]
    fn names_round_trip_and_strangers_are_not_parts() {
        let shard = Shard { index: 3, count: 12 };
        assert_eq!(part_stem(shard), "part-00003-of-00012");
        assert_eq!(parse_name("part-00003-of-00012.parquet"), Some((shard, FileKind::Part)));
        assert_eq!(parse_name("part-00003-of-00012.json"), Some((shard, FileKind::Entry)));
        assert_eq!(parse_name("part-00003-of-00012.quarantine.jsonl"), Some((shard, FileKind::Quarantine)));
        assert_eq!(parse_name(".part-00003-of-00012.cnclip-parts"), Some((shard, FileKind::Work)));
        let big = Shard { index: 123_456, count: 200_000 };
        assert_eq!(parse_name(&format!("{}.parquet", part_stem(big))), Some((big, FileKind::Part)));
        for stranger in [
            "part-3-of-12.parquet",
            "part-00012-of-00012.parquet",
            "part-00003-of-00012.parquet.bak",
            ".part-00003-of-00012.parquet",
            "part-00003-of-00012.cnclip-parts",
            "part-000003-of-00012.parquet",
            "features.parquet",
        ] {
            assert_eq!(parse_name(stranger), None, "{stranger}");
        }
    }
}
