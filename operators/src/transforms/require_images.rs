//! `require_images`: keeps the image references of a `texts` or `pairs` table that point at an
//! image of a given images table, and quarantines the others — what `build-lmdb` does, so that
//! `export --format lmdb` never writes a pair cn_clip's `LMDBDataset` cannot load.
//!
//! A pair (`image_id`) whose image is missing is dropped; a text (`image_ids`) keeps the images
//! that exist, one quarantine record per missing one, and is dropped when none is left. The
//! images' ids are read the first time a batch arrives: from a Parquet table its `image_id`
//! column only; from a cn_clip `.tsv` image shard the ids of the lines its `tsv` source would
//! emit (a line it quarantines — a bad base64 field, a line over `max_record_bytes` — names no
//! image), so `build-lmdb` can require its texts' images without a Parquet copy of its TSV.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use arrow::array::{Array, AsArray, Int64Array, Int64Builder, ListArray, ListBuilder};
use arrow::datatypes::{DataType, Int64Type, SchemaRef};
use arrow::record_batch::RecordBatch;
use cnclip_schemas::columns::{IMAGE_ID, IMAGE_IDS, TEXT_ID};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rustc_hash::FxHashSet;

use super::{Execution, InputError, Output, Transform, rebuild, require};
use crate::error::{Error, Result};
use crate::quarantine::Rejected;
use crate::spec::{BuildContext, NodeConfig, Operator, Role};
use crate::storage;
use schemars::JsonSchema;
use serde::Deserialize;

pub struct RequireImages {
    /// The images: Parquet tables with an `image_id` column, or `.tsv` image shards.
    pub images: Vec<PathBuf>,
    /// TSV lines longer than this are not images (as the `tsv` source quarantines them).
    pub max_record_bytes: usize,
    /// Read once; an error is kept for every batch after.
    ids: OnceLock<Result<FxHashSet<i64>, Arc<Error>>>,
    /// The text ids seen so far, when repeated ones are quarantined ([`RequireImages::deduplicating`]).
    seen: Option<Mutex<FxHashSet<i64>>>,
    /// What messages call the images (default: their paths).
    name: Option<String>,
}

/// Rows per batch when texts are deduplicated (one thread, in order).
const DEDUPE_BATCH_ROWS: usize = 4096;

impl RequireImages {
    pub fn new(images: Vec<PathBuf>) -> Self {
        RequireImages {
            images,
            max_record_bytes: crate::sources::MAX_RECORD_BYTES,
            ids: OnceLock::new(),
            seen: None,
            name: None,
        }
    }

    /// Messages call the images `name` (an index standing for the files users gave).
    pub fn named(self, name: Option<String>) -> Self {
        RequireImages { name, ..self }
    }

    /// TSV lines longer than `bytes` name no image (the `tsv` source's `max_record_bytes`).
    pub fn with_max_record_bytes(self, bytes: usize) -> Self {
        RequireImages { max_record_bytes: bytes, ..self }
    }

    /// Also quarantines a text whose id repeats an earlier text's (the first is kept), before
    /// its images are looked up, as build-lmdb does: one check per text, in file order, so the
    /// node then runs on one thread, in order.
    pub fn deduplicating(self) -> Self {
        RequireImages { seen: Some(Mutex::new(FxHashSet::default())), ..self }
    }

    fn ids(&self) -> Result<&FxHashSet<i64>> {
        let loaded = self.ids.get_or_init(|| {
            let mut ids = FxHashSet::default();
            for path in &self.images {
                if path.extension().is_some_and(|e| e == "tsv") {
                    read_tsv_ids(path, self.max_record_bytes, &mut ids).map_err(Arc::new)?;
                } else {
                    read_ids(path, IMAGE_ID, &mut ids).map_err(Arc::new)?;
                }
            }
            Ok(ids)
        });
        loaded
            .as_ref()
            .map_err(|source| Error::Lookup { what: "require_images: reading image ids", source: source.clone() })
    }

    fn describe(&self) -> String {
        self.name.clone().unwrap_or_else(|| crate::sources::describe_paths(&self.images))
    }
}

/// Adds the int64 column `column` of the Parquet file `path` (that column only is read) to `ids`.
///
/// # Errors
/// The file cannot be read ([`Error::Io`], [`Error::Parquet`], [`Error::ArrowFile`]) or has no
/// int64 `column` ([`Error::Format`]), naming `path`.
pub(crate) fn read_ids(path: &std::path::Path, column: &str, ids: &mut FxHashSet<i64>) -> Result<()> {
    let name = || path.display().to_string();
    let file = storage::open_chunks(path).map_err(crate::error::io(path))?;
    let parquet = |source| Error::Parquet { path: name(), source };
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(parquet)?;
    let mask = ProjectionMask::columns(builder.parquet_schema(), [column]);
    for batch in builder.with_projection(mask).build().map_err(parquet)? {
        let batch = batch.map_err(|source| Error::ArrowFile { path: name(), source })?;
        let format = |reason| Error::Format { path: name(), reason };
        let values = batch.column_by_name(column).ok_or_else(|| format(format!("no `{column}` column")))?;
        let values =
            values.as_primitive_opt::<Int64Type>().ok_or_else(|| format(format!("`{column}` is not int64")))?;
        ids.extend(values.iter().flatten());
    }
    Ok(())
}

/// Adds the image ids of the good lines of the cn_clip image shard `path` to `ids`: those the
/// `tsv` source emits or, repeated, drops as duplicates of an image it keeps.
///
/// # Errors
/// The file cannot be read ([`Error::Io`]), naming `path`.
fn read_tsv_ids(path: &std::path::Path, max_record_bytes: usize, ids: &mut FxHashSet<i64>) -> Result<()> {
    crate::sources::tsv::for_each_line(path, max_record_bytes, |line| {
        // A caught signal stops the scan (a large shard takes a while), as it stops a source.
        if let Some(signal) = crate::signals::interrupted() {
            return Err(Error::Interrupted { signal });
        }
        if let Ok(line) = line {
            ids.insert(line.image_id);
        }
        Ok(())
    })
}

impl Transform for RequireImages {
    fn output_schema(&self, input: &SchemaRef) -> Result<SchemaRef, InputError> {
        require(input, TEXT_ID, &DataType::Int64)?;
        if input.index_of(IMAGE_ID).is_err() && input.index_of(IMAGE_IDS).is_err() {
            return Err(InputError::Mismatch(format!(
                "needs an `{IMAGE_ID}` or `{IMAGE_IDS}` column; the input has {}",
                super::column_list(input)
            )));
        }
        if self.seen.is_some() && input.index_of(IMAGE_IDS).is_err() {
            return Err(InputError::Mismatch(format!(
                "`dedupe` applies to a texts table (`{IMAGE_IDS}`), where a text id names one text"
            )));
        }
        Ok(input.clone())
    }

    fn execution(&self) -> Execution {
        match self.seen {
            // "The first one" is the first in the input: one replica takes the batches in order.
            Some(_) => Execution::Devices { devices: vec!["cpu".into()], batch_rows: DEDUPE_BATCH_ROWS },
            None => Execution::default(),
        }
    }

    fn apply(&self, batch: &RecordBatch, source: &str) -> Result<Output> {
        let known = self.ids()?;
        let schema = batch.schema();
        let text_ids = batch.column(schema.index_of(TEXT_ID).expect("checked")).as_primitive::<Int64Type>();
        let missing = |row: usize, image_id: i64| Rejected {
            source: source.to_string(),
            location: format!("text {}", text_ids.value(row)),
            id: Some(text_ids.value(row).to_string()),
            reason: format!("image {image_id} is not in {}", self.describe()),
        };
        let (mut keep, mut rejected) = (Vec::with_capacity(batch.num_rows()), Vec::new());
        if let Ok(index) = schema.index_of(IMAGE_ID) {
            let image_ids = batch.column(index).as_primitive::<Int64Type>();
            for (row, image_id) in image_ids.values().iter().enumerate() {
                if known.contains(image_id) {
                    keep.push(row as u32);
                } else {
                    rejected.push(missing(row, *image_id));
                }
            }
            let column =
                Arc::new(arrow::compute::take(image_ids, &arrow::array::UInt32Array::from(keep.clone()), None)?);
            let batch = rebuild(batch, schema.clone(), index, &keep, column)?;
            return Ok(Output { batch, rejected });
        }
        let index = schema.index_of(IMAGE_IDS).expect("checked by output_schema");
        let lists = batch.column(index).as_list_opt::<i32>().ok_or_else(|| Error::Internal("image_ids type".into()))?;
        let field = match schema.field(index).data_type() {
            DataType::List(field) => field.clone(),
            other => return Err(Error::Internal(format!("image_ids is {other}"))),
        };
        let mut out = ListBuilder::new(Int64Builder::new()).with_field(field);
        let mut seen = self.seen.as_ref().map(|seen| seen.lock().unwrap_or_else(|e| e.into_inner()));
        for row in 0..lists.len() {
            if let Some(seen) = seen.as_mut()
                && !seen.insert(text_ids.value(row))
            {
                rejected.push(Rejected {
                    source: source.to_string(),
                    location: format!("text {}", text_ids.value(row)),
                    id: Some(text_ids.value(row).to_string()),
                    reason: "duplicate text id (the first one is kept)".into(),
                });
                continue;
            }
            let list = lists.value(row);
            let ids =
                list.as_any().downcast_ref::<Int64Array>().ok_or_else(|| Error::Internal("image_ids items".into()))?;
            let before = rejected.len();
            let mut kept = 0;
            for image_id in ids.values() {
                if known.contains(image_id) {
                    out.values().append_value(*image_id);
                    kept += 1;
                } else {
                    rejected.push(missing(row, *image_id));
                }
            }
            // A text with no image (none given) passes, as it came; one whose images are all
            // missing is dropped.
            if kept > 0 || rejected.len() == before {
                out.append(true);
                keep.push(row as u32);
            } else {
                // Nothing was appended to the values for this row: no list to close.
            }
        }
        let column: ListArray = out.finish();
        let batch = rebuild(batch, schema.clone(), index, &keep, Arc::new(column))?;
        Ok(Output { batch, rejected })
    }
}

/// texts or pairs → the same, without the image ids not found in `images` (those quarantined).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RequireImagesConfig {
    /// Images tables with an `image_id` column (Parquet files, globs), or cn_clip `.tsv` image
    /// shards.
    ///
    /// A shard's ids are those of its good lines.
    pub images: Vec<String>,
    /// TSV lines longer than this name no image, as in the `tsv` source.
    #[serde(default = "crate::sources::default_max_record_bytes")]
    pub max_record_bytes: usize,
    /// Quarantine a text whose text id repeats an earlier one's, keeping the first, before its
    /// images are looked up (texts tables only; as build-lmdb).
    ///
    /// The node then runs on one thread, in input order.
    #[serde(default)]
    pub dedupe: bool,
    /// What quarantine reasons call the images (default: their paths), e.g. the files an index
    /// given as `images` stands for.
    #[serde(default)]
    pub name: Option<String>,
}

impl Default for RequireImagesConfig {
    fn default() -> Self {
        RequireImagesConfig {
            images: Vec::new(),
            max_record_bytes: crate::sources::MAX_RECORD_BYTES,
            dedupe: false,
            name: None,
        }
    }
}

impl NodeConfig for RequireImagesConfig {
    const KIND: &'static str = "require_images";
    const ROLE: Role = Role::Transform;
    fn build(self, cx: &BuildContext) -> Result<Operator, Vec<String>> {
        let transform =
            RequireImages::new(cx.files(&self.images)?).with_max_record_bytes(self.max_record_bytes).named(self.name);
        let transform = if self.dedupe { transform.deduplicating() } else { transform };
        Ok(Operator::Transform(Arc::new(transform)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::{Field, Schema};

    fn images_table(dir: &std::path::Path, ids: &[i64]) -> PathBuf {
        let path = dir.join("images.parquet");
        let schema = Arc::new(Schema::new(vec![Field::new(IMAGE_ID, DataType::Int64, false)]));
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(ids.to_vec()))]).unwrap();
        let mut writer =
            parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), schema, None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        path
    }

    #[test]
    fn texts_keep_their_existing_images_and_pairs_without_one_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let transform = RequireImages::new(vec![images_table(dir.path(), &[1, 2, 3])]);

        let texts = cnclip_schemas::texts();
        let mut lists = ListBuilder::new(Int64Builder::new()).with_field(
            match texts.field_with_name(IMAGE_IDS).unwrap().data_type() {
                DataType::List(field) => field.clone(),
                _ => unreachable!(),
            },
        );
        for ids in [&[1i64, 9][..], &[8, 9], &[2, 3], &[]] {
            lists.values().append_slice(ids);
            lists.append(true);
        }
        let batch = RecordBatch::try_new(
            texts.clone(),
            vec![
                Arc::new(Int64Array::from(vec![10, 11, 12, 13])),
                Arc::new(arrow::array::StringArray::from(vec!["a", "b", "c", "d"])),
                Arc::new(lists.finish()),
            ],
        )
        .unwrap();
        let out = transform.apply(&batch, "texts.parquet").unwrap();
        let kept: Vec<(i64, Vec<i64>)> = (0..out.batch.num_rows())
            .map(|row| {
                let ids = out.batch.column(2).as_list::<i32>().value(row);
                (
                    out.batch.column(0).as_primitive::<Int64Type>().value(row),
                    ids.as_primitive::<Int64Type>().values().to_vec(),
                )
            })
            .collect();
        assert_eq!(kept, vec![(10, vec![1]), (12, vec![2, 3]), (13, vec![])]);
        let reasons: Vec<String> = out.rejected.iter().map(|r| format!("{}: {}", r.location, r.reason)).collect();
        assert_eq!(reasons.len(), 3, "{reasons:?}");
        assert!(reasons[0].starts_with("text 10: image 9 is not in "), "{reasons:?}");
        assert!(reasons[1].starts_with("text 11: image 8 is not in "), "{reasons:?}");

        let pairs = cnclip_schemas::pairs();
        let batch = RecordBatch::try_new(
            pairs.clone(),
            vec![
                Arc::new(Int64Array::from(vec![1, 7, 3])),
                Arc::new(Int64Array::from(vec![20, 21, 22])),
                Arc::new(arrow::array::StringArray::from(vec!["x", "y", "z"])),
            ],
        )
        .unwrap();
        let out = transform.apply(&batch, "pairs.parquet").unwrap();
        assert_eq!(out.batch.column(1).as_primitive::<Int64Type>().values().to_vec(), vec![20, 22]);
        assert_eq!(out.batch.column(0).as_primitive::<Int64Type>().values().to_vec(), vec![1, 3]);
        assert_eq!(out.rejected.len(), 1);
    }

    /// From a `.tsv` shard, only the lines the `tsv` source keeps name images: not a line with
    /// bad base64, an empty value, or one over `max_record_bytes`; a repeated id still does.
    #[test]
    fn tsv_shards_name_the_images_of_their_good_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train_imgs.tsv");
        let long = "QUFB".repeat(64);
        std::fs::write(&path, format!("1\taGk=\r\n2\tnot base64!\n3\t\n4\taGk\n4\taGk=\n5\t{long}\nx\taGk=\n"))
            .unwrap();
        let transform = RequireImages::new(vec![path.clone()]).with_max_record_bytes(64);
        let mut ids: Vec<i64> = transform.ids().unwrap().iter().copied().collect();
        ids.sort();
        assert_eq!(ids, vec![1, 4]);
        let transform = RequireImages::new(vec![path]);
        assert!(transform.ids().unwrap().contains(&5));
        assert!(transform.describe().ends_with("train_imgs.tsv"));
    }
}
