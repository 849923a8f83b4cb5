//! Parquet tables in other projects' layouts — img2dataset's (`key` string ids, a `jpg` bytes
//! column, a `caption` column) and Hugging Face datasets' (an `image` struct `{bytes, path}`,
//! a `text` column) — read as cnclip's `images` or `texts` table by naming their columns: the
//! `parquet` source with `id_column`, `image_column` or `text_column` set (`extract-features
//! --id-column key --image-column jpg --text-column caption`).
//!
//! Every row keeps its id as a string `key` column, so features join back to the user's
//! metadata. cn_clip's tables need int64 ids; the mapping is stable and documented:
//!
//! - an integer id column is the id;
//! - a string key of decimal digits (img2dataset's zero-padded `000010023`) is that number;
//! - any other key takes the row's position: `file << 32 | row`, the file's place in the source's
//!   expanded path list and the row's in its file (as the `webdataset` source numbers samples).
//!
//! The image column may hold bytes, base64 text, or a struct with a `bytes` field; a row without
//! an image (a null, an HF image known only by its `path`) or a text, or with a null key, is
//! quarantined with its reason. Only the two named columns are read.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, StructArray};
use arrow::datatypes::{DataType, SchemaRef};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::webdataset::{Batcher, WebDatasetSource, WebDatasetTable};
use super::{Emit, ReadContext, Source};
use crate::error::{Error, Result, io};
use crate::quarantine::Rejected;
use crate::storage;

/// Parquet files read through a column mapping.
pub struct MappedParquetSource {
    pub paths: Vec<PathBuf>,
    /// `images` or `texts` (the `parquet` node builds no other; `locations` reads as `images`).
    pub table: WebDatasetTable,
    /// The id (key) column.
    pub id_column: String,
    /// The image column (an images table) or the text column (a texts table).
    pub value_column: String,
    /// Quarantine a row whose id repeats an earlier one's.
    pub dedupe: bool,
}

impl MappedParquetSource {
    /// Checks that every file has the two columns, of types this source reads.
    ///
    /// # Errors
    /// One line per file and column that is missing or of another type.
    pub fn check(&self) -> std::result::Result<(), Vec<String>> {
        let mut problems = Vec::new();
        for path in &self.paths {
            let schema = match super::parquet::file_schema(path) {
                Ok(schema) => schema,
                Err(e) => {
                    problems.push(e.to_string());
                    continue;
                }
            };
            let columns =
                || schema.fields().iter().map(|f| format!("{} {}", f.name(), f.data_type())).collect::<Vec<_>>();
            for (role, name) in [("id_column", &self.id_column), ("value", &self.value_column)] {
                let role = if role == "value" {
                    match self.table {
                        WebDatasetTable::Images | WebDatasetTable::Locations => "image_column",
                        WebDatasetTable::Texts => "text_column",
                    }
                } else {
                    role
                };
                match schema.field_with_name(name) {
                    Err(_) => problems.push(format!(
                        "{}: no column `{name}` ({role}); its columns are {}",
                        path.display(),
                        columns().join(", ")
                    )),
                    Ok(field) if !readable(role, field.data_type()) => problems.push(format!(
                        "{}: column `{name}` ({role}) is {}, which cnclip cannot read as {}",
                        path.display(),
                        field.data_type(),
                        match role {
                            "id_column" => "an id (integers or strings)",
                            "image_column" => "images (bytes, base64 strings, or a struct with `bytes`)",
                            _ => "texts (strings)",
                        }
                    )),
                    Ok(_) => {}
                }
            }
        }
        if problems.is_empty() { Ok(()) } else { Err(problems) }
    }
}

/// Whether a column of type `data_type` can serve as `role`.
pub(super) fn readable(role: &str, data_type: &DataType) -> bool {
    use DataType as T;
    match role {
        "id_column" => matches!(data_type, T::Utf8 | T::LargeUtf8 | T::Utf8View | T::Int64 | T::Int32 | T::UInt32),
        "image_column" => match data_type {
            T::Binary | T::LargeBinary | T::BinaryView | T::Utf8 | T::LargeUtf8 | T::Utf8View => true,
            T::Struct(fields) => fields.iter().any(|f| f.name() == "bytes" && readable("bytes", f.data_type())),
            _ => false,
        },
        "bytes" => matches!(data_type, T::Binary | T::LargeBinary | T::BinaryView),
        _ => matches!(data_type, T::Utf8 | T::LargeUtf8 | T::Utf8View),
    }
}

/// The key of each row (`None`: null), as text.
pub(super) fn keys(column: &ArrayRef) -> Result<Vec<Option<String>>> {
    let cast = arrow::compute::cast(column, &DataType::Utf8)?;
    Ok(cast.as_string::<i32>().iter().map(|k| k.map(str::to_string)).collect())
}

/// The id of a row: an integer column's value, a decimal key's number, else `file << 32 | row`.
pub(super) fn id_of(
    integers: Option<&arrow::array::Int64Array>,
    row: usize,
    key: &str,
    file: usize,
    row_in_file: u64,
) -> i64 {
    if let Some(integers) = integers {
        return integers.value(row);
    }
    super::webdataset::key_id(key).unwrap_or(((file as i64) << 32) | row_in_file as i64)
}

/// The bytes of each row's image (`Err`: why there are none).
pub(super) fn images(column: &ArrayRef) -> Result<Vec<std::result::Result<Vec<u8>, String>>> {
    use base64::Engine;
    let column: ArrayRef = match column.data_type() {
        DataType::Struct(_) => {
            let structs: &StructArray = column.as_struct();
            let bytes = structs.column_by_name("bytes").expect("checked at planning").clone();
            // A null struct is a null image.
            let nulls = arrow::buffer::NullBuffer::union(structs.nulls(), bytes.nulls());
            arrow::array::make_array(bytes.to_data().into_builder().nulls(nulls).build()?)
        }
        _ => column.clone(),
    };
    let missing = || Err("no image: its image column is null (an image known only by its `path`?)".to_string());
    Ok(match column.data_type() {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
            let text = arrow::compute::cast(&column, &DataType::Utf8)?;
            text.as_string::<i32>()
                .iter()
                .map(|value| match value {
                    None => missing(),
                    Some(text) => base64::engine::general_purpose::STANDARD
                        .decode(text.trim())
                        .map_err(|e| format!("its image column is text but not base64 ({e})")),
                })
                .collect()
        }
        _ => {
            let bytes = arrow::compute::cast(&column, &DataType::LargeBinary)?;
            bytes.as_binary::<i64>().iter().map(|value| value.map(<[u8]>::to_vec).map_or_else(missing, Ok)).collect()
        }
    })
}

impl Source for MappedParquetSource {
    fn origin(&self) -> String {
        super::describe_paths(&self.paths)
    }

    fn estimated_records(&self) -> Option<u64> {
        super::parquet::rows_in(&self.paths)
    }

    fn schema(&self) -> SchemaRef {
        WebDatasetSource::schema_of(self.table)
    }

    fn read(self: Box<Self>, ctx: &ReadContext, emit: Emit<'_>) -> Result<()> {
        let mut batcher = Batcher::new(self.table, self.schema(), ctx.batch_rows);
        let mut seen = super::SeenIds::new(self.dedupe);
        let mut ordinal = 0u64;
        for (file, path) in self.paths.iter().enumerate() {
            let mut row_in_file = 0u64;
            self.read_file(path, ctx, &mut |batch| {
                let (id_column, values) = (batch.column(0), batch.column(1));
                let keys = keys(id_column)?;
                let integers = match id_column.data_type().is_integer() {
                    true => Some(arrow::compute::cast(id_column, &DataType::Int64)?),
                    false => None,
                };
                let integers = integers.as_ref().map(|ids| ids.as_primitive::<arrow::datatypes::Int64Type>());
                let images = match self.table {
                    WebDatasetTable::Images | WebDatasetTable::Locations => Some(images(values)?),
                    WebDatasetTable::Texts => None,
                };
                let texts = match self.table {
                    WebDatasetTable::Texts => Some(arrow::compute::cast(values, &DataType::Utf8)?),
                    WebDatasetTable::Images | WebDatasetTable::Locations => None,
                };
                for (row, key) in keys.iter().enumerate() {
                    let position = row_in_file;
                    row_in_file += 1;
                    ordinal += 1;
                    if !ctx.shard.owns(ordinal - 1) {
                        continue;
                    }
                    if let Some(signal) = crate::signals::interrupted() {
                        return Err(Error::Interrupted { signal });
                    }
                    let reject = |id: Option<String>, reason: String| {
                        ctx.quarantine.reject(Rejected {
                            source: path.display().to_string(),
                            location: format!("row {position}"),
                            id,
                            reason,
                        })
                    };
                    let Some(key) = key else {
                        reject(None, format!("its id column `{}` is null", self.id_column))?;
                        continue;
                    };
                    let id = id_of(integers, row, key, file, position);
                    if let Some(rejected) = seen.duplicate(id, path, self.table_word()) {
                        ctx.quarantine.reject(rejected)?;
                        continue;
                    }
                    match (&images, &texts) {
                        (Some(images), _) => match &images[row] {
                            Ok(image) => batcher.push_image(id, image, key, emit)?,
                            Err(reason) => reject(Some(key.clone()), reason.clone())?,
                        },
                        (_, Some(texts)) => match texts.as_string::<i32>().is_valid(row) {
                            true => batcher.push_text(id, texts.as_string::<i32>().value(row), key, emit)?,
                            false => {
                                reject(Some(key.clone()), format!("its text column `{}` is null", self.value_column))?
                            }
                        },
                        _ => unreachable!("one of the two is read"),
                    }
                }
                Ok(())
            })?;
        }
        batcher.flush(emit)
    }
}

impl MappedParquetSource {
    fn table_word(&self) -> &'static str {
        match self.table {
            WebDatasetTable::Images | WebDatasetTable::Locations => "image",
            WebDatasetTable::Texts => "text",
        }
    }

    /// Calls `on_batch` with each batch of `path`'s two columns: the id, then the value.
    fn read_file(
        &self,
        path: &Path,
        ctx: &ReadContext,
        on_batch: &mut dyn FnMut(&arrow::record_batch::RecordBatch) -> Result<()>,
    ) -> Result<()> {
        let parquet_err = |e| super::parquet::parquet_err(path, e);
        let builder = ParquetRecordBatchReaderBuilder::try_new(storage::open_chunks(path).map_err(io(path))?)
            .map_err(parquet_err)?;
        let schema = builder.schema().clone();
        let index = |name: &str| {
            schema
                .index_of(name)
                .map_err(|_| Error::Format { path: path.display().to_string(), reason: format!("no column `{name}`") })
        };
        let (id, value) = (index(&self.id_column)?, index(&self.value_column)?);
        let mask = ProjectionMask::roots(builder.parquet_schema(), [id, value]);
        let reader =
            builder.with_projection(mask).with_batch_size(ctx.batch_rows.max(1)).build().map_err(parquet_err)?;
        for batch in reader {
            let batch = batch.map_err(|e| super::parquet::arrow_err(path, e))?;
            // The projection keeps the file's column order: put the id first.
            let batch = if id < value {
                batch
            } else {
                let columns = vec![batch.column(1).clone(), batch.column(0).clone()];
                let fields = vec![batch.schema().field(1).clone(), batch.schema().field(0).clone()];
                arrow::record_batch::RecordBatch::try_new(Arc::new(arrow::datatypes::Schema::new(fields)), columns)?
            };
            on_batch(&batch)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{BinaryArray, Int64Array, StringArray};
    use arrow::datatypes::{Field, Fields};

    #[test]
    fn ids_come_from_integers_decimal_keys_or_positions() {
        let integers = Int64Array::from(vec![7, 8]);
        assert_eq!(id_of(Some(&integers), 1, "ignored", 3, 9), 8);
        assert_eq!(id_of(None, 0, "000010023", 3, 9), 10023);
        // Not decimal, or too large for an int64: the row's position.
        assert_eq!(id_of(None, 0, "cat-01", 3, 9), (3 << 32) | 9);
        assert_eq!(id_of(None, 0, "99999999999999999999", 0, 4), 4);
        assert_eq!(id_of(None, 0, "", 1, 0), 1 << 32);
    }

    #[test]
    fn images_are_bytes_base64_or_structs_and_missing_ones_say_why() {
        let bytes: ArrayRef = Arc::new(BinaryArray::from(vec![Some(b"ab".as_ref()), None]));
        let images_of = |column: &ArrayRef| images(column).unwrap();
        assert_eq!(images_of(&bytes)[0], Ok(b"ab".to_vec()));
        assert!(images_of(&bytes)[1].as_ref().unwrap_err().contains("null"));
        let text: ArrayRef = Arc::new(StringArray::from(vec![Some("YWI="), Some("not base64!")]));
        assert_eq!(images_of(&text)[0], Ok(b"ab".to_vec()));
        assert!(images_of(&text)[1].as_ref().unwrap_err().contains("not base64"), "{:?}", images_of(&text)[1]);
        // Hugging Face's `{bytes, path}`: an image known only by its path has no bytes.
        let fields =
            Fields::from(vec![Field::new("bytes", DataType::Binary, true), Field::new("path", DataType::Utf8, true)]);
        let structs: ArrayRef = Arc::new(StructArray::new(
            fields,
            vec![
                Arc::new(BinaryArray::from(vec![Some(b"ab".as_ref()), None])),
                Arc::new(StringArray::from(vec![Some("a.jpg"), Some("b.jpg")])),
            ],
            None,
        ));
        assert_eq!(images_of(&structs)[0], Ok(b"ab".to_vec()));
        assert!(images_of(&structs)[1].as_ref().unwrap_err().contains("only by its `path`"));
        assert!(readable("image_column", structs.data_type()) && !readable("image_column", &DataType::Int64));
        assert!(readable("id_column", &DataType::Utf8) && !readable("id_column", &DataType::Float64));
    }

    #[test]
    fn missing_and_unreadable_columns_are_named_with_the_files_columns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("laion.parquet");
        let batch = arrow::record_batch::RecordBatch::try_from_iter([
            ("key", Arc::new(StringArray::from(vec!["000000001"])) as ArrayRef),
            ("similarity", Arc::new(arrow::array::Float64Array::from(vec![0.3])) as ArrayRef),
        ])
        .unwrap();
        let mut writer =
            parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), batch.schema(), None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        let source = |value: &str| MappedParquetSource {
            paths: vec![path.clone()],
            table: WebDatasetTable::Images,
            id_column: "key".into(),
            value_column: value.into(),
            dedupe: true,
        };
        let problems = source("jpg").check().unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("no column `jpg` (image_column)")
                && problems[0].contains("key Utf8, similarity Float64"),
            "{problems:?}"
        );
        let problems = source("similarity").check().unwrap_err();
        assert!(problems[0].contains("`similarity` (image_column) is Float64"), "{problems:?}");
    }
}
