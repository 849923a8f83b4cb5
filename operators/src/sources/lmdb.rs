//! cn_clip's LMDB datasets (`build_lmdb_dataset.py`'s layout): `imgs` maps image ids to base64
//! text (plus `num_images`), `pairs` maps `0…n-1` to pickled `(image_id, text_id, text)` tuples
//! (plus `num_samples`). Pickles are read with the restricted reader that never executes code,
//! within [`Limits::RECORD`] (scaled by `CNCLIP_PICKLE_LIMIT_SCALE`); an entry that is not such a tuple, or whose pickle goes over a
//! budget, comes back as [`Rejected`] naming its key. Files are read through
//! [`LmdbFile`], which checks every page before use, so a truncated or corrupted database is
//! an error naming it, never a crash.
//!
//! A split may be an object store prefix (`s3://bucket/lmdb/train`, holding the objects
//! `imgs/data.mdb` and `pairs/data.mdb`): [`LmdbFile`] reads it by ranged GETs; building a node
//! checks the objects exist ([`is_environment`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::decoders::base64::Base64Error;
use crate::decoders::pickle::{self, Limits, PickleError, Value};
use arrow::array::{ArrayBuilder, ArrayRef, Int64Builder, StringBuilder};
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;

use super::tsv::plausible_base64;
use super::{Emit, IdBytesBatcher, ReadContext, Source};
use crate::error::{Error, Result};
use crate::lmdb_file::LmdbFile;
use crate::quarantine::Rejected;
use crate::spec::{BuildContext, NodeConfig, Operator, Role};
use crate::storage::{self, Location};
use schemars::JsonSchema;
use serde::Deserialize;

/// One `pairs` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    pub image_id: i64,
    pub text_id: i64,
    pub text: String,
}

/// Calls `on_entry` for every entry of an LMDB except the count key `skip`, in key order,
/// through the checked reader ([`LmdbFile`]), never LMDB's own.
fn for_each(path: &Path, skip: &[u8], mut on_entry: impl FnMut(&[u8], &[u8]) -> Result<()>) -> Result<()> {
    LmdbFile::open(path)?.for_each(|key, value| if key != skip { on_entry(key, value) } else { Ok(()) })
}

/// Reads `{dir}/imgs`: `(image_id, base64)` per entry, bad keys rejected.
///
/// # Errors
/// A missing or unreadable LMDB (structural), or whatever `on_image` returns.
pub fn for_each_image(
    dir: &Path,
    mut on_image: impl FnMut(Result<(i64, &[u8]), Rejected>) -> Result<()>,
) -> Result<()> {
    let path = dir.join("imgs");
    let source = path.display().to_string();
    for_each(&path, b"num_images", |key, value| {
        let id = std::str::from_utf8(key).ok().and_then(|k| k.parse::<i64>().ok());
        on_image(id.map(|id| (id, value)).ok_or_else(|| Rejected {
            source: source.clone(),
            location: format!("key {:?}", String::from_utf8_lossy(key)),
            id: Some(String::from_utf8_lossy(key).into_owned()),
            reason: "image key is not an integer".into(),
        }))
    })
}

/// Reads `{dir}/pairs` in sample order: the unpickled `(image_id, text_id, text)` of keys
/// `"0"`, `"1"`, … `"n-1"`, as cn_clip's `LMDBDataset` reads sample `i` from key `str(i)` (`n`
/// is `num_samples`, or the number of entries without it). LMDB keeps keys in byte order (`0, 1,
/// 10, 11, …, 2`); rows in that order would renumber the samples when written back, so a pass
/// over the file is made per key length (keys of one length are in numeric order, and shorter
/// ones are smaller): as many passes as `n - 1` has digits, no buffering.
///
/// `on_pair` is called once per sample `0…n-1` in order: with its pair, or with why it cannot
/// be read (a bad pickle, or a key missing from the file). `on_stray` gets each entry cn_clip
/// never reads (a key that is not one of `0…n-1` written as cn_clip writes it), once.
///
/// # Errors
/// A missing or unreadable LMDB (structural), or whatever the callbacks return.
pub fn for_each_pair(
    dir: &Path,
    mut on_stray: impl FnMut(Rejected) -> Result<()>,
    mut on_pair: impl FnMut(Result<Pair, Rejected>) -> Result<()>,
) -> Result<()> {
    const COUNT_KEY: &[u8] = b"num_samples";
    let path = dir.join("pairs");
    let file = LmdbFile::open(&path)?;
    let source = path.display().to_string();
    let limits = Limits::RECORD.from_env();
    let recorded = file.get(COUNT_KEY)?;
    let samples = match recorded.as_deref().map(std::str::from_utf8) {
        Some(Ok(count)) => count.parse::<u64>().ok(),
        Some(Err(_)) => None,
        None => Some(file.entries()),
    }
    .ok_or_else(|| Error::Record {
        location: format!("{source} key \"num_samples\""),
        reason: "the sample count is not a number".into(),
    })?;
    let rejected = |key: &[u8], reason: String| Rejected {
        source: source.clone(),
        location: format!("key {:?}", String::from_utf8_lossy(key)),
        id: None,
        reason,
    };
    let digits = |n: u64| n.checked_ilog10().map_or(1, |d| d as usize + 1);
    let widths = if samples == 0 { 0 } else { digits(samples - 1) };
    let mut next = 0u64;
    let mut missing = |upto: u64, on_pair: &mut dyn FnMut(Result<Pair, Rejected>) -> Result<()>| -> Result<()> {
        while next < upto {
            let key = next.to_string();
            on_pair(Err(rejected(key.as_bytes(), format!("sample {next} is missing (num_samples is {samples})"))))?;
            next += 1;
        }
        next += 1;
        Ok(())
    };
    for width in 1..=widths.max(1) {
        file.for_each(|key, value| {
            if key == COUNT_KEY {
                return Ok(());
            }
            let sample = std::str::from_utf8(key)
                .ok()
                .filter(|k| k.bytes().all(|b| b.is_ascii_digit()) && (k.len() == 1 || !k.starts_with('0')))
                .and_then(|k| k.parse::<u64>().ok())
                .filter(|&i| i < samples);
            match sample {
                None if width == 1 => on_stray(rejected(
                    key,
                    format!(
                        "not a sample key: cn_clip reads the keys 0…{} (num_samples {samples})",
                        samples.saturating_sub(1)
                    ),
                )),
                Some(i) if key.len() == width => {
                    missing(i, &mut on_pair)?;
                    on_pair(parse_pair(value, &limits).map_err(|reason| rejected(key, reason.to_string())))
                }
                _ => Ok(()),
            }
        })?;
    }
    missing(samples, &mut on_pair)
}

/// Why a `pairs` value is not a pair (a record's quarantine reason).
#[derive(Debug, thiserror::Error)]
pub enum PairError {
    #[error("not an (int image_id, int text_id, str text) tuple")]
    NotAPair,
    #[error("not a tuple")]
    NotATuple,
    /// Not a pickle we read, or one over a budget.
    #[error(transparent)]
    Pickle(#[from] PickleError),
}

/// One `pairs` value: the pickled `(image_id, text_id, text)`, read within `limits`.
///
/// # Errors
/// Why it is not such a tuple (or its pickle goes over a budget).
pub fn parse_pair(value: &[u8], limits: &Limits) -> std::result::Result<Pair, PairError> {
    match pickle::load_with(value, limits)? {
        Value::Tuple(items) => match items.as_slice() {
            [Value::Int(image_id), Value::Int(text_id), Value::Str(text)] => {
                Ok(Pair { image_id: *image_id, text_id: *text_id, text: text.clone() })
            }
            _ => Err(PairError::NotAPair),
        },
        _ => Err(PairError::NotATuple),
    }
}

/// The `num_images` / `num_samples` counts cn_clip's datasets read.
///
/// # Errors
/// When the LMDB or its count key is missing or not a number.
pub fn counts(dir: &Path) -> Result<(u64, u64)> {
    let read = |db: &str, key: &[u8]| -> Result<u64> {
        let path = dir.join(db);
        let location = || format!("{} {}", path.display(), String::from_utf8_lossy(key));
        let Some(value) = LmdbFile::open(&path)?.get(key)? else {
            return Err(Error::Record { location: location(), reason: "the count key is missing".into() });
        };
        std::str::from_utf8(&value)
            .ok()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| Error::Record { location: location(), reason: "count is not a number".into() })
    };
    Ok((read("imgs", b"num_images")?, read("pairs", b"num_samples")?))
}

/// Whether `dir` holds an LMDB `data.mdb`: a file in a local directory, or an object under an
/// object store prefix. A store that cannot be asked (no credentials, no such bucket) says no.
pub fn is_environment(dir: &Path) -> bool {
    holds_data_mdb(dir).is_ok_and(|held| held)
}

/// Whether `dir` is a cn_clip LMDB split: `imgs/` and `pairs/` each hold a `data.mdb` (files,
/// or objects under an object store prefix).
pub fn is_split(dir: &Path) -> bool {
    is_environment(&dir.join("imgs")) && is_environment(&dir.join("pairs"))
}

/// Whether `dir/data.mdb` exists: a file, or an object (asked by its size).
///
/// # Errors
/// A URL no store serves; the store's error other than `NotFound`.
fn holds_data_mdb(dir: &Path) -> std::io::Result<bool> {
    let path = dir.join("data.mdb");
    match storage::locate(&path)? {
        Location::Local(path) => Ok(path.is_file()),
        Location::Remote(remote) => match remote.size() {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        },
    }
}

/// The split directory `path` of a node (relative to the pipeline file, or an object store
/// prefix, kept as written), checked to hold each of `databases`' `data.mdb`.
///
/// # Errors
/// One line per problem: not a directory, or a database without `data.mdb` (or whose object
/// cannot be asked for, with the store's error).
pub(crate) fn split_dir(cx: &BuildContext, path: &Path, databases: &[&str]) -> Result<PathBuf, Vec<String>> {
    let dir = if storage::is_remote(path) { cx.resolve(path) } else { cx.dir(path, "LMDB split")? };
    let problems: Vec<String> = databases
        .iter()
        .map(|db| dir.join(db))
        .filter_map(|db| match holds_data_mdb(&db) {
            Ok(true) => None,
            Ok(false) => Some(format!("{} is not an LMDB (no data.mdb)", db.display())),
            Err(e) => Some(format!("{} cannot be read: {e}", db.display())),
        })
        .collect();
    if problems.is_empty() { Ok(dir) } else { Err(problems) }
}

/// Which database of a cn_clip LMDB split to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Database {
    /// `{dir}/imgs` → `images_base64`.
    Imgs,
    /// `{dir}/pairs` → `pairs`.
    Pairs,
}

/// A cn_clip LMDB split directory (with `imgs/` and `pairs/`) as a source.
pub struct LmdbSource {
    pub dir: PathBuf,
    pub database: Database,
}

impl Source for LmdbSource {
    fn origin(&self) -> String {
        self.dir
            .join(match self.database {
                Database::Imgs => "imgs",
                Database::Pairs => "pairs",
            })
            .display()
            .to_string()
    }

    fn estimated_records(&self) -> Option<u64> {
        // Every entry but the count key.
        Some(LmdbFile::open(Path::new(&self.origin())).ok()?.entries().saturating_sub(1))
    }

    fn schema(&self) -> SchemaRef {
        match self.database {
            Database::Imgs => cnclip_schemas::images_base64(),
            Database::Pairs => cnclip_schemas::pairs(),
        }
    }

    fn read(self: Box<Self>, ctx: &ReadContext, emit: Emit<'_>) -> Result<()> {
        let mut shard = super::ShardFilter::new(ctx.shard);
        match self.database {
            Database::Imgs => {
                let mut batcher = IdBytesBatcher::new(self.schema(), ctx.batch_rows);
                let source = self.dir.join("imgs").display().to_string();
                for_each_image(&self.dir, |record| {
                    if !shard.mine() {
                        return Ok(());
                    }
                    let (id, value) = match record {
                        Err(rejected) => return ctx.quarantine.reject(rejected),
                        Ok(entry) => entry,
                    };
                    let check = if value.is_empty() { Err(Base64Error::Empty) } else { plausible_base64(value) };
                    match check {
                        Err(reason) => ctx.quarantine.reject(Rejected {
                            source: source.clone(),
                            location: format!("key \"{id}\""),
                            id: Some(id.to_string()),
                            reason: reason.to_string(),
                        }),
                        Ok(()) => batcher.push(id, value, emit),
                    }
                })?;
                batcher.flush(emit)
            }
            Database::Pairs => {
                let mut batcher = PairsBatcher::new(ctx.batch_rows);
                // A stray entry is no sample: the first shard reports it, none counts it.
                let first = ctx.shard.index == 0;
                let stray = |rejected| if first { ctx.quarantine.reject(rejected) } else { Ok(()) };
                for_each_pair(&self.dir, stray, |record| {
                    if !shard.mine() {
                        return Ok(());
                    }
                    match record {
                        Err(rejected) => ctx.quarantine.reject(rejected),
                        Ok(pair) => batcher.push(&pair, emit),
                    }
                })?;
                batcher.flush(emit)
            }
        }
    }
}

/// Accumulates rows of the `pairs` table.
pub(crate) struct PairsBatcher {
    batch_rows: usize,
    image_ids: Int64Builder,
    text_ids: Int64Builder,
    texts: StringBuilder,
}

impl PairsBatcher {
    pub(crate) fn new(batch_rows: usize) -> Self {
        PairsBatcher {
            batch_rows: batch_rows.max(1),
            image_ids: Int64Builder::new(),
            text_ids: Int64Builder::new(),
            texts: StringBuilder::new(),
        }
    }

    pub(crate) fn push(&mut self, pair: &Pair, emit: Emit<'_>) -> Result<()> {
        self.image_ids.append_value(pair.image_id);
        self.text_ids.append_value(pair.text_id);
        self.texts.append_value(&pair.text);
        if self.image_ids.len() >= self.batch_rows { self.flush(emit) } else { Ok(()) }
    }

    pub(crate) fn flush(&mut self, emit: Emit<'_>) -> Result<()> {
        if self.image_ids.len() == 0 {
            return Ok(());
        }
        let columns: Vec<ArrayRef> =
            vec![Arc::new(self.image_ids.finish()), Arc::new(self.text_ids.finish()), Arc::new(self.texts.finish())];
        emit(RecordBatch::try_new(cnclip_schemas::pairs(), columns)?)
    }
}

/// One database of a cn_clip LMDB split → images_base64 (`imgs`) or pairs (`pairs`).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LmdbConfig {
    /// The split directory, holding `imgs/` and `pairs/` (or an object store prefix holding
    /// `imgs/data.mdb` and `pairs/data.mdb`: `s3://bucket/lmdb/train`).
    pub path: PathBuf,
    /// Which of its databases to read.
    pub database: Database,
}

impl NodeConfig for LmdbConfig {
    const KIND: &'static str = "lmdb";
    const ROLE: Role = Role::Source;
    fn build(self, cx: &BuildContext) -> Result<Operator, Vec<String>> {
        let db = match self.database {
            Database::Imgs => "imgs",
            Database::Pairs => "pairs",
        };
        let path = split_dir(cx, &self.path, &[db])?;
        Ok(Operator::Source(Box::new(LmdbSource { dir: path, database: self.database })))
    }

    fn known_schema(&self) -> Option<SchemaRef> {
        Some(match self.database {
            Database::Imgs => cnclip_schemas::images_base64(),
            Database::Pairs => cnclip_schemas::pairs(),
        })
    }
}
