//! The feature table an index is built from: a Parquet file, a directory of Parquet parts, or
//! cn_clip feature JSON lines. Opening it finds its files, id column and dimension; its rows are
//! read through a pipeline (source → this build), in table order, as every job reads its data,
//! and each batch is checked (int64 ids ≥ 0, `dim` finite float32 values per row) before FAISS
//! sees it.

use std::path::{Path, PathBuf};

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Float32Type, Int64Type};
use arrow::record_batch::RecordBatch;
use cnclip_operators::quarantine::OnError;
use cnclip_operators::sources::features::FeatureJsonlConfig;
use cnclip_operators::sources::parquet::ParquetConfig;
use cnclip_operators::sources::{self, features as feature_files, parts};
use cnclip_operators::spec::{JobSettings, NodeDef, Planner, Registry};
use cnclip_operators::storage;

use super::error::{BuildError, Result};

/// The feature table: its files, id column and dimension.
pub(super) struct Table {
    /// The files, in reading order.
    pub(super) files: Vec<PathBuf>,
    /// The id key of JSON lines (their source names the column `id`); `None` for Parquet.
    pub(super) json_key: Option<String>,
    /// The id column of the streamed batches.
    pub(super) id_column: String,
    pub(super) dim: usize,
    /// Where the pipeline would quarantine bad records: it never does, as a bad record stops
    /// the job (an index missing rows is not what was asked for).
    quarantine: PathBuf,
}

impl Table {
    /// Opens `features` (`--features`), with the id column `id_column` (`--id-column`); the
    /// pipeline's (unused) quarantine is under `index_path`.
    pub(super) fn open(features: &str, id_column: Option<&str>, index_path: &Path) -> Result<Table> {
        let path = Path::new(features);
        let jsonl = feature_files::is_jsonl(path);
        let files = if path.is_dir() {
            parts::check_complete(path).map_err(BuildError::Parts)?;
            let parts = parts::parquet_files(path)
                .map_err(|source| BuildError::FeaturesDir { path: path.to_path_buf(), source })?;
            if parts.is_empty() {
                return Err(BuildError::NoParts { path: path.to_path_buf() });
            }
            parts
        } else if path.is_file() {
            vec![path.to_path_buf()]
        } else {
            return Err(match storage::metadata(path) {
                Ok(meta) => BuildError::NotAFile { path: path.to_path_buf(), kind: parts::kind_of(&meta) },
                Err(_) => BuildError::NoSuchFile { path: path.to_path_buf() },
            });
        };
        let (json_key, id_column, dim) = if jsonl {
            let key = id_column.unwrap_or("image_id").to_string();
            let source = feature_files::FeatureJsonlSource::open(files.clone(), &key, sources::MAX_RECORD_BYTES)
                .map_err(|source| BuildError::Open { path: path.to_path_buf(), source })?;
            // The source names its id column `id` whatever the key.
            (Some(key), "id".to_string(), source.dim)
        } else {
            let first = &files[0];
            let schema = sources::parquet::file_schema(first)
                .map_err(|source| BuildError::Open { path: first.clone(), source })?;
            let id_column = match id_column {
                Some(column) => column.to_string(),
                None => ["id", "image_id", "text_id"]
                    .into_iter()
                    .find(|c| schema.field_with_name(c).is_ok())
                    .unwrap_or("id")
                    .to_string(),
            };
            match schema.field_with_name(&id_column).map(|f| f.data_type()) {
                Ok(DataType::Int64) => {}
                Ok(other) => {
                    return Err(BuildError::IdType { path: first.clone(), column: id_column, found: other.clone() });
                }
                Err(_) => {
                    return Err(BuildError::NoIdColumn {
                        path: first.clone(),
                        column: id_column,
                        columns: schema.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", "),
                    });
                }
            }
            let dim = match schema.field_with_name(cnclip_schemas::columns::FEATURE).map(|f| f.data_type()) {
                Ok(DataType::FixedSizeList(item, d)) if item.data_type() == &DataType::Float32 => *d as usize,
                // Variable-length lists: the dimension is the first row's (every row is checked).
                Ok(DataType::List(item) | DataType::LargeList(item)) if item.data_type() == &DataType::Float32 => 0,
                _ => return Err(BuildError::NoFeatureColumn { path: first.clone() }),
            };
            (None, id_column, dim)
        };
        let quarantine = index_path.join("quarantine.jsonl");
        let mut table = Table { files, json_key, id_column, dim, quarantine };
        if table.dim == 0 {
            table.dim = table.first_dim(features)?;
        }
        Ok(table)
    }

    /// The dimension of a table of variable-length lists: its first row's.
    fn first_dim(&self, features: &str) -> Result<usize> {
        let mut stream = self.stream()?;
        for batch in stream.by_ref() {
            let batch = batch?;
            if batch.num_rows() > 0 {
                let path = self.files[0].clone();
                let column = batch.column_by_name(cnclip_schemas::columns::FEATURE);
                let first = match column.map(|c| (c.data_type(), c)) {
                    Some((DataType::LargeList(_), column)) => column.as_list::<i64>().value(0).len(),
                    Some((DataType::List(_), column)) => column.as_list::<i32>().value(0).len(),
                    _ => return Err(BuildError::NoFeatureColumn { path }),
                };
                if first == 0 {
                    return Err(BuildError::EmptyFirstVector { path });
                }
                return Ok(first);
            }
        }
        Err(BuildError::NoRows { features: features.to_string() })
    }

    /// The files' sizes and modification times: another table (or a rewritten one) is another
    /// fingerprint.
    pub(super) fn fingerprint(&self) -> Result<serde_json::Value> {
        let mut files = Vec::new();
        for file in &self.files {
            let meta = storage::metadata(file).map_err(|source| BuildError::Stat { path: file.clone(), source })?;
            let modified = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
            files.push(serde_json::json!({
                "path": storage::canonicalize(file).unwrap_or_else(|_| file.clone()),
                "bytes": meta.len(),
                "modified": modified.map(|d| d.as_nanos().to_string()),
            }));
        }
        Ok(serde_json::Value::Array(files))
    }

    /// The table's rows through a pipeline (source → this build), in table order. The stream
    /// ends with `Interrupted` on a caught signal.
    pub(super) fn stream(&self) -> Result<cnclip_operators::spec::PipelineStream> {
        let paths: Vec<String> = self.files.iter().map(|p| p.display().to_string()).collect();
        let source = if let Some(id_key) = self.json_key.clone() {
            NodeDef::new(
                "features",
                None,
                FeatureJsonlConfig { paths, id_key, max_record_bytes: sources::MAX_RECORD_BYTES },
            )
        } else {
            NodeDef::new("features", None, ParquetConfig::new(paths, None, false))
        };
        let settings = JobSettings {
            on_error: OnError::Fail,
            quarantine: self.quarantine.clone(),
            batch_rows: 8192,
            ..JobSettings::default()
        };
        let registry = Registry::builtin();
        let pipeline = Planner::new(&registry).stream("features").plan(settings, vec![source])?;
        Ok(pipeline.stream()?)
    }

    /// One batch's ids and vectors (back to back), checked: int64 ids ≥ 0, `dim` finite floats
    /// per row. `first_row` is the batch's first row in the table.
    pub(super) fn rows(&self, batch: &RecordBatch, first_row: u64) -> Result<(Vec<i64>, Vec<f32>)> {
        let at = || {
            format!("{} (rows from {first_row})", self.files.first().map_or(String::new(), |f| f.display().to_string()))
        };
        let ids = batch
            .column_by_name(&self.id_column)
            .and_then(|c| c.as_primitive_opt::<Int64Type>())
            .ok_or_else(|| BuildError::RowsIdColumn { at: at(), column: self.id_column.clone() })?;
        if ids.null_count() > 0 {
            return Err(BuildError::NullId { at: at() });
        }
        if let Some(row) = ids.values().iter().position(|&id| id < 0) {
            return Err(BuildError::NegativeId { row: first_row + row as u64, id: ids.value(row) });
        }
        let column = batch
            .column_by_name(cnclip_schemas::columns::FEATURE)
            .ok_or_else(|| BuildError::RowsFeatureColumn { at: at() })?;
        if column.null_count() > 0 {
            return Err(BuildError::NullFeature { at: at() });
        }
        let dim = self.dim;
        let bad_length = |row: usize, len: usize| BuildError::Length { row: first_row + row as u64, len, dim };
        let vectors: Vec<f32> = match column.data_type() {
            DataType::FixedSizeList(_, d) if *d as usize == dim => {
                let lists = column.as_fixed_size_list();
                let values = lists
                    .values()
                    .as_primitive_opt::<Float32Type>()
                    .ok_or_else(|| BuildError::NotFloat32 { at: at() })?;
                let range = lists.offset() * dim..(lists.offset() + lists.len()) * dim;
                if values.slice(range.start, range.len()).null_count() > 0 {
                    return Err(BuildError::NullValue { at: at() });
                }
                values.values()[range].to_vec()
            }
            DataType::FixedSizeList(_, d) => return Err(bad_length(0, *d as usize)),
            DataType::List(_) | DataType::LargeList(_) => {
                let (offsets, values): (Vec<usize>, _) = match column.data_type() {
                    DataType::List(_) => {
                        let lists = column.as_list::<i32>();
                        (lists.value_offsets().iter().map(|&o| o as usize).collect(), lists.values().clone())
                    }
                    _ => {
                        let lists = column.as_list::<i64>();
                        (lists.value_offsets().iter().map(|&o| o as usize).collect(), lists.values().clone())
                    }
                };
                let values =
                    values.as_primitive_opt::<Float32Type>().ok_or_else(|| BuildError::NotFloat32 { at: at() })?;
                if values.null_count() > 0 {
                    return Err(BuildError::NullValue { at: at() });
                }
                for (row, pair) in offsets.windows(2).enumerate() {
                    if pair[1] - pair[0] != dim {
                        return Err(bad_length(row, pair[1] - pair[0]));
                    }
                }
                values.values()[offsets[0]..offsets[offsets.len() - 1]].to_vec()
            }
            other => return Err(BuildError::FeatureType { at: at(), found: other.clone() }),
        };
        for (row, feature) in vectors.chunks(dim.max(1)).enumerate() {
            if let Err(reason) = feature_files::check_finite(feature) {
                return Err(BuildError::NotFinite {
                    at: at(),
                    row: first_row + row as u64,
                    id: ids.value(row),
                    reason,
                });
            }
        }
        Ok((ids.values().to_vec(), vectors))
    }
}
