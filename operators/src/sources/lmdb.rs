//! cn_clip's LMDB datasets (`build_lmdb_dataset.py`'s layout): `imgs` maps image ids to base64
//! text (plus `num_images`), `pairs` maps `0…n-1` to pickled `(image_id, text_id, text)` tuples
//! (plus `num_samples`). Pickles are read with the restricted reader that never executes code,
//! within [`Limits::RECORD`] (scaled by `CNCLIP_PICKLE_LIMIT_SCALE`); an entry that is not such a tuple, or whose pickle goes over a
//! budget, comes back as [`Rejected`] naming its key. Files are read through
//! [`LmdbFile`], which checks every page before use, so a truncated or corrupted database is
//! an error naming it, never a crash.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::decoders::pickle::{self, Limits, Value};
use arrow::array::{ArrayBuilder, ArrayRef, Int64Builder, StringBuilder};
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;

use super::tsv::plausible_base64;
use super::{Emit, IdBytesBatcher, ReadContext, Source};
use crate::error::{Error, Result};
use crate::lmdb_file::LmdbFile;
use crate::quarantine::Rejected;

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

/// Reads `{dir}/pairs`: the unpickled `(image_id, text_id, text)` of each entry.
///
/// # Errors
/// A missing or unreadable LMDB (structural), or whatever `on_pair` returns.
pub fn for_each_pair(dir: &Path, mut on_pair: impl FnMut(Result<Pair, Rejected>) -> Result<()>) -> Result<()> {
    let path = dir.join("pairs");
    let source = path.display().to_string();
    let limits = Limits::RECORD.from_env();
    for_each(&path, b"num_samples", |key, value| {
        let parsed = parse_pair(value, &limits);
        on_pair(parsed.map_err(|reason| Rejected {
            source: source.clone(),
            location: format!("key {:?}", String::from_utf8_lossy(key)),
            id: None,
            reason,
        }))
    })
}

/// One `pairs` value: the pickled `(image_id, text_id, text)`, read within `limits`.
///
/// # Errors
/// Why it is not such a tuple (or its pickle goes over a budget).
pub fn parse_pair(value: &[u8], limits: &Limits) -> std::result::Result<Pair, String> {
    match pickle::load_with(value, limits) {
        Ok(Value::Tuple(items)) => match items.as_slice() {
            [Value::Int(image_id), Value::Int(text_id), Value::Str(text)] => {
                Ok(Pair { image_id: *image_id, text_id: *text_id, text: text.clone() })
            }
            _ => Err("not an (int image_id, int text_id, str text) tuple".to_string()),
        },
        Ok(_) => Err("not a tuple".to_string()),
        Err(e) => Err(e.to_string()),
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

/// Which database of a cn_clip LMDB split to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
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
                    let check =
                        if value.is_empty() { Err("empty image value".to_string()) } else { plausible_base64(value) };
                    match check {
                        Err(reason) => ctx.quarantine.reject(Rejected {
                            source: source.clone(),
                            location: format!("key \"{id}\""),
                            id: Some(id.to_string()),
                            reason,
                        }),
                        Ok(()) => batcher.push(id, value, emit),
                    }
                })?;
                batcher.flush(emit)
            }
            Database::Pairs => {
                let mut batcher = PairsBatcher::new(ctx.batch_rows);
                for_each_pair(&self.dir, |record| {
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
