//! cn_clip's feature files (what `extract_features.py` writes): one
//! `{"image_id": int, "feature": [float, …]}` (or `"text_id"`) per line, as a feature table
//! (`id` + `feature`, float32). The dimension is taken from the first line when the source is
//! opened; a line with another dimension, bad JSON or a missing field is quarantined naming its
//! line, like every other line source.
//!
//! Features are numbers a search ranks by, so a value that is not one is never let through: a
//! non-finite value in a line (`1e39` overflows float32 to `inf`), and in a Parquet feature
//! table a null id, a null feature or a null inside a vector, are refused by every feature
//! reader ([`check_finite`], [`bad_rows`]) — quarantined naming the row where a job streams,
//! an error naming the file and row where a gallery is read whole. Read as numbers, a null id
//! takes whatever id its slot holds, a null scores 0 and `NaN`/`inf` rank first or break the
//! order.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, AsArray, FixedSizeListArray, Float32Array, Int64Array};
use arrow::datatypes::{DataType, Field, Float32Type, Int64Type, SchemaRef};
use arrow::record_batch::RecordBatch;

use super::{Emit, Line, ReadContext, SeenIds, ShardFilter, Source};
use crate::error::{Error, Result};
use crate::quarantine::Rejected;
use crate::spec::{BuildContext, NodeConfig, Operator, Role};
use schemars::JsonSchema;
use serde::Deserialize;

/// Why a feature line or row cannot be used (a record's quarantine reason), or why a batch is
/// not a feature table at all.
#[derive(Debug, thiserror::Error)]
pub enum FeatureError {
    #[error("malformed JSON: {0}")]
    Json(#[source] serde_json::Error),
    #[error("`{id_key}` is missing or not an integer")]
    Id { id_key: String },
    #[error("`feature` is missing or not a list")]
    NoFeature,
    #[error("a feature value is not a number")]
    NotANumber,
    /// Value `at` is `NaN`, `inf`, or a number past float32's range (which parsing made `inf`).
    #[error("feature value {at} is {value} (not a finite float32: features must be finite numbers)")]
    NotFinite { at: usize, value: f32 },
    #[error("line of {bytes} bytes is longer than the limit (max_record_bytes)")]
    TooLong { bytes: u64 },
    #[error("not a feature table (id int64, feature float32 vectors)")]
    NotATable,
}

/// Feature JSON lines as a source of feature-table batches.
pub struct FeatureJsonlSource {
    pub paths: Vec<PathBuf>,
    /// The id key: `image_id` or `text_id`.
    pub id_key: String,
    pub dim: usize,
    pub max_record_bytes: usize,
}

/// One line.
struct Row {
    id: i64,
    feature: Vec<f32>,
}

/// The common case, read without building a JSON tree.
#[derive(serde::Deserialize)]
struct ImageRow {
    image_id: i64,
    feature: Vec<f32>,
}

#[derive(serde::Deserialize)]
struct TextRow {
    text_id: i64,
    feature: Vec<f32>,
}

/// A well-formed line the fast way (`None`: let [`parse`] say what is wrong).
fn fast(line: &[u8], id_key: &str) -> Option<Row> {
    match id_key {
        "image_id" => serde_json::from_slice::<ImageRow>(line).ok().map(|r| Row { id: r.image_id, feature: r.feature }),
        "text_id" => serde_json::from_slice::<TextRow>(line).ok().map(|r| Row { id: r.text_id, feature: r.feature }),
        _ => None,
    }
}

fn parse(line: &[u8], id_key: &str) -> std::result::Result<Row, FeatureError> {
    let value: serde_json::Value = serde_json::from_slice(line).map_err(FeatureError::Json)?;
    let id =
        value.get(id_key).and_then(|v| v.as_i64()).ok_or_else(|| FeatureError::Id { id_key: id_key.to_string() })?;
    let feature = value
        .get("feature")
        .and_then(|v| v.as_array())
        .ok_or(FeatureError::NoFeature)?
        .iter()
        .map(|x| x.as_f64().map(|x| x as f32).ok_or(FeatureError::NotANumber))
        .collect::<std::result::Result<Vec<f32>, _>>()?;
    Ok(Row { id, feature })
}

impl FeatureJsonlSource {
    /// Opens the files, taking the dimension from the first line of the first one.
    ///
    /// # Errors
    /// A file that cannot be read, or whose first line is not a feature line, named.
    pub fn open(paths: Vec<PathBuf>, id_key: &str, max_record_bytes: usize) -> Result<Self> {
        let first = paths.first().ok_or_else(|| Error::Internal("no feature file".into()))?;
        let mut dim = None;
        let found = super::for_each_trimmed_line(first, max_record_bytes, |number, line| {
            let Line::Text(line) = line else {
                return Err(Error::Record {
                    location: format!("{} line {number}", first.display()),
                    reason: "too long".into(),
                });
            };
            let row = parse(line, id_key).map_err(|reason| Error::Record {
                location: format!("{} line {number}", first.display()),
                reason: reason.to_string(),
            })?;
            dim = Some(row.feature.len());
            Err(Error::Stopped)
        });
        match (found, dim) {
            (Err(Error::Stopped), Some(dim)) if dim > 0 => {
                Ok(FeatureJsonlSource { paths, id_key: id_key.to_string(), dim, max_record_bytes })
            }
            (Err(Error::Stopped), _) => {
                Err(Error::Format { path: first.display().to_string(), reason: "an empty feature".into() })
            }
            (Err(e), _) => Err(e),
            (Ok(()), _) => Err(Error::Format { path: first.display().to_string(), reason: "no feature line".into() }),
        }
    }

    fn schema_of(dim: usize) -> SchemaRef {
        let item = Arc::new(Field::new("item", DataType::Float32, false));
        Arc::new(arrow::datatypes::Schema::new(vec![
            Field::new(cnclip_schemas::columns::ID, DataType::Int64, false),
            Field::new(cnclip_schemas::columns::FEATURE, DataType::FixedSizeList(item, dim as i32), false),
        ]))
    }
}

impl Source for FeatureJsonlSource {
    fn origin(&self) -> String {
        super::describe_paths(&self.paths)
    }

    fn estimated_records(&self) -> Option<u64> {
        super::estimate_lines(&self.paths)
    }

    fn schema(&self) -> SchemaRef {
        Self::schema_of(self.dim)
    }

    fn read(self: Box<Self>, ctx: &ReadContext, emit: Emit<'_>) -> Result<()> {
        let schema = self.schema();
        let (mut ids, mut values) = (Vec::new(), Vec::new());
        let mut seen = SeenIds::new(true);
        let mut shard = ShardFilter::new(ctx.shard);
        let dim = self.dim;
        let flush = |ids: &mut Vec<i64>, values: &mut Vec<f32>, emit: Emit<'_>| -> Result<()> {
            if ids.is_empty() {
                return Ok(());
            }
            let item = Arc::new(Field::new("item", DataType::Float32, false));
            let feature = FixedSizeListArray::try_new(
                item,
                dim as i32,
                Arc::new(Float32Array::from(std::mem::take(values))),
                None,
            )?;
            let id = Int64Array::from(std::mem::take(ids));
            emit(RecordBatch::try_new(schema.clone(), vec![Arc::new(id), Arc::new(feature)])?)
        };
        for path in &self.paths {
            let source = path.display().to_string();
            super::for_each_trimmed_line(path, self.max_record_bytes, |number, line| {
                if !shard.mine() {
                    return Ok(());
                }
                let reject = |reason: String| Rejected {
                    source: source.clone(),
                    location: format!("line {number}"),
                    id: None,
                    reason,
                };
                let row = match line {
                    Line::Text(line) => fast(line, &self.id_key).map_or_else(|| parse(line, &self.id_key), Ok),
                    Line::TooLong { bytes, .. } => Err(FeatureError::TooLong { bytes }),
                };
                match row {
                    Err(reason) => ctx.quarantine.reject(reject(reason.to_string())),
                    Ok(row) if row.feature.len() != dim => ctx.quarantine.reject(Rejected {
                        id: Some(row.id.to_string()),
                        ..reject(format!("a feature of {} values; the first line's has {dim}", row.feature.len()))
                    }),
                    Ok(row) if check_finite(&row.feature).is_err() => ctx.quarantine.reject(Rejected {
                        id: Some(row.id.to_string()),
                        ..reject(check_finite(&row.feature).err().map(|e| e.to_string()).unwrap_or_default())
                    }),
                    Ok(row) => match seen.duplicate(row.id, path, &self.id_key.replace("_id", "")) {
                        Some(rejected) => ctx.quarantine.reject(rejected),
                        None => {
                            ids.push(row.id);
                            values.extend_from_slice(&row.feature);
                            if ids.len() >= ctx.batch_rows.max(1) { flush(&mut ids, &mut values, emit) } else { Ok(()) }
                        }
                    },
                }
            })?;
        }
        flush(&mut ids, &mut values, emit)
    }
}

/// Every row of the feature JSON lines file `path` (ids, and the features back to back), for
/// a gallery held whole in memory: any bad line is an error naming it.
///
/// # Errors
/// IO errors, a bad line or one whose dimension differs from the first's.
pub fn read_all(path: &Path, id_key: &str) -> Result<(Vec<i64>, Vec<f32>, usize)> {
    let (mut ids, mut values, mut dim) = (Vec::new(), Vec::new(), None);
    super::for_each_trimmed_line(path, super::MAX_RECORD_BYTES, |number, line| {
        let location = || format!("{} line {number}", path.display());
        let Line::Text(line) = line else {
            return Err(Error::Record { location: location(), reason: "line too long".into() });
        };
        let row = fast(line, id_key)
            .map_or_else(|| parse(line, id_key), Ok)
            .map_err(|reason| Error::Record { location: location(), reason: reason.to_string() })?;
        let expected = *dim.get_or_insert(row.feature.len());
        if row.feature.len() != expected || expected == 0 {
            let reason = format!("a feature of {} values; the first line's has {expected}", row.feature.len());
            return Err(Error::Record { location: location(), reason });
        }
        check_finite(&row.feature).map_err(|reason| Error::Record {
            location: format!("{} ({id_key} {})", location(), row.id),
            reason: reason.to_string(),
        })?;
        ids.push(row.id);
        values.extend_from_slice(&row.feature);
        Ok(())
    })?;
    Ok((ids, values, dim.unwrap_or(0)))
}

/// `Err` naming the first value of `feature` that is not a finite number (`NaN`, `inf`, or a
/// number past float32's range, which parsing made `inf`).
///
/// # Errors
/// [`FeatureError::NotFinite`]: the first non-finite value, with its position.
pub fn check_finite(feature: &[f32]) -> std::result::Result<(), FeatureError> {
    match feature.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(at) => Err(FeatureError::NotFinite { at, value: feature[at] }),
    }
}

/// A feature-table batch's rows that cannot be used as features: (row, id if it has one,
/// reason) for a null id, a null feature, a null value inside a feature, or a non-finite value.
/// Empty for a clean batch — the common case costs one pass over the values.
///
/// # Errors
/// [`FeatureError::NotATable`]: the batch is not a feature table (`id` int64, `feature`
/// fixed-size list of float32).
pub fn bad_rows(batch: &RecordBatch) -> std::result::Result<Vec<(usize, Option<i64>, String)>, FeatureError> {
    let not_a_table = || FeatureError::NotATable;
    let ids = batch
        .column_by_name(cnclip_schemas::columns::ID)
        .and_then(|c| c.as_primitive_opt::<Int64Type>())
        .ok_or_else(not_a_table)?;
    let lists = batch
        .column_by_name(cnclip_schemas::columns::FEATURE)
        .and_then(|c| c.as_fixed_size_list_opt())
        .ok_or_else(not_a_table)?;
    let values = lists.values().as_primitive_opt::<Float32Type>().ok_or_else(not_a_table)?;
    let d = lists.value_length() as usize;
    let offset = lists.offset() * d;
    let clean = ids.null_count() == 0
        && lists.null_count() == 0
        && values.slice(offset, lists.len() * d).null_count() == 0
        && values.values()[offset..offset + lists.len() * d].iter().all(|v| v.is_finite());
    if clean {
        return Ok(Vec::new());
    }
    let mut bad = Vec::new();
    for row in 0..batch.num_rows() {
        let id = ids.is_valid(row).then(|| ids.value(row));
        let reason = if ids.is_null(row) {
            Some("a null id".to_string())
        } else if lists.is_null(row) {
            Some("a null feature".to_string())
        } else {
            let start = offset + row * d;
            match (start..start + d).find(|&i| values.is_null(i)) {
                Some(i) => Some(format!("feature value {} is null", i - start)),
                None => check_finite(&values.values()[start..start + d]).err().map(|e| e.to_string()),
            }
        };
        if let Some(reason) = reason {
            bad.push((row, id, reason));
        }
    }
    Ok(bad)
}

/// Whether `path` looks like a feature JSON lines file (`.jsonl`).
pub fn is_jsonl(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "jsonl" || e == "json")
}

/// cn_clip feature files (`{"image_id": …, "feature": […]}` per line) → a feature table (id,
/// feature).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FeatureJsonlConfig {
    /// Files and globs.
    pub paths: Vec<String>,
    /// The lines' id key.
    #[schemars(extend("enum" = ["image_id", "text_id"]))]
    pub id_key: String,
    /// Longer lines are quarantined without being read whole.
    #[serde(default = "super::default_max_record_bytes")]
    pub max_record_bytes: usize,
}

impl NodeConfig for FeatureJsonlConfig {
    const KIND: &'static str = "feature_jsonl";
    const ROLE: Role = Role::Source;
    fn build(self, cx: &BuildContext) -> Result<Operator, Vec<String>> {
        let paths = cx.files(&self.paths)?;
        let source =
            FeatureJsonlSource::open(paths, &self.id_key, self.max_record_bytes).map_err(|e| vec![e.to_string()])?;
        Ok(Operator::Source(Box::new(source)))
    }
}
