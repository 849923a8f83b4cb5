//! Parquet files in another project's layout — img2dataset's (`key`, `jpg`, `caption`) or Hugging
//! Face's (`image` as `{bytes, path}`, `text`) — as a corpus `train_shards` reads in place: a
//! file is a shard, a row a sample, in file order. The row counts come from the files' footers,
//! so nothing is read before training; a random read decodes only the row group holding the row,
//! and only the rows asked for in it (a row selection), of the two or three columns named. Ids
//! and keys follow the `parquet` source's column mapping (`img2dataset.rs`): an integer id
//! column's value, a decimal key's number, else `file << 32 | row`. A row without an image or
//! a text stops the run naming the file and row, as a missing pair stops `lmdb_train`: a
//! training batch cannot drop a sample.

use std::collections::BTreeMap;
use std::path::PathBuf;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Int64Type};
use bytes::Bytes;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReaderBuilder, RowSelection, RowSelector};
use schemars::JsonSchema;
use serde::Deserialize;

use super::img2dataset::{id_of, images, keys};
use super::train_shards::{Corpus, Sample, SequentialRead, in_lanes, stop_on_signal};
use crate::error::{Error, Result, io};
use crate::storage;
use cnclip_schemas::columns::{IMAGE, IMAGE_ID};

/// The columns a Parquet corpus is read by.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Columns {
    /// The image column: bytes, base64 text or `{bytes, path}` structs (img2dataset's `jpg`, HF's
    /// `image`).
    pub image: String,
    /// The text column (img2dataset's `caption`).
    pub text: String,
    /// The id column, integer ids or string keys (img2dataset's `key`); without one, ids are
    /// `file << 32 | row` and keys the row's place.
    #[serde(default)]
    pub id: Option<String>,
}

/// The files, their row groups and the samples they hold.
pub(crate) struct Files {
    paths: Vec<PathBuf>,
    columns: Columns,
    /// Whether samples have a text (`columns.text`); images tables have none.
    with_text: bool,
    /// Per file: the first row of each row group, then the file's row count.
    groups: Vec<Vec<usize>>,
    /// Per file: its first sample and how many it has.
    spans: Vec<(usize, usize)>,
    total: usize,
}

impl Files {
    /// Reads the footers of `paths` and checks that each has the columns.
    ///
    /// # Errors
    /// A file that cannot be read or lacks a column, naming it.
    pub(crate) fn open(paths: Vec<PathBuf>, columns: Columns) -> Result<Files> {
        Self::open_with(paths, columns, true)
    }

    /// Images tables (`image_id`, `image`): samples of an image each, with an empty text.
    ///
    /// # Errors
    /// As [`Files::open`].
    pub(crate) fn images(paths: Vec<PathBuf>) -> Result<Files> {
        let columns = Columns { image: IMAGE.into(), text: String::new(), id: Some(IMAGE_ID.into()) };
        Self::open_with(paths, columns, false)
    }

    /// The paths, in the order samples are numbered.
    pub(crate) fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    fn open_with(paths: Vec<PathBuf>, columns: Columns, with_text: bool) -> Result<Files> {
        let (mut groups, mut spans, mut total) = (Vec::new(), Vec::new(), 0);
        for path in &paths {
            let builder = builder(path)?;
            let schema = builder.schema().clone();
            let roles = [
                ("image_column", Some(&columns.image)),
                ("text_column", Some(&columns.text).filter(|_| with_text)),
                ("id_column", columns.id.as_ref()),
            ];
            for (role, name) in roles.into_iter().filter_map(|(role, name)| Some((role, name?))) {
                let have =
                    || schema.fields().iter().map(|f| format!("{} {}", f.name(), f.data_type())).collect::<Vec<_>>();
                let reason = match schema.field_with_name(name) {
                    Err(_) => format!("no column `{name}`; its columns are {}", have().join(", ")),
                    Ok(field) if !super::img2dataset::readable(role, field.data_type()) => {
                        format!("column `{name}` ({role}) is {}, which cnclip cannot read as one", field.data_type())
                    }
                    Ok(_) => continue,
                };
                return Err(Error::Format { path: path.display().to_string(), reason });
            }
            let mut firsts = vec![0];
            for group in builder.metadata().row_groups() {
                firsts.push(firsts.last().expect("one at least") + group.num_rows() as usize);
            }
            let rows = *firsts.last().expect("one at least");
            spans.push((total, rows));
            total += rows;
            groups.push(firsts);
        }
        Ok(Files { paths, columns, with_text, groups, spans, total })
    }

    /// The file holding sample `i`, and the row in it.
    fn locate(&self, i: usize) -> (usize, usize) {
        let file = self.spans.partition_point(|&(first, _)| first <= i) - 1;
        // Files without rows start where the next one does: the last of those is the one.
        (file, i - self.spans[file].0)
    }

    /// Rows `rows` (increasing) of row group `group` of `file`, as samples in that order.
    fn read_rows(&self, file: usize, group: usize, rows: &[usize]) -> Result<Vec<Sample>> {
        let path = &self.paths[file];
        let builder = builder(path)?;
        let schema = builder.schema().clone();
        let text = Some(&self.columns.text).filter(|_| self.with_text);
        let wanted: Vec<&String> =
            [Some(&self.columns.image), text, self.columns.id.as_ref()].into_iter().flatten().collect();
        let roots: Vec<usize> = wanted.iter().filter_map(|n| schema.index_of(n).ok()).collect();
        let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
        let first = self.groups[file][group];
        let mut selectors = Vec::new();
        let mut at = first;
        for &row in rows {
            if row > at {
                selectors.push(RowSelector::skip(row - at));
            }
            selectors.push(RowSelector::select(1));
            at = row + 1;
        }
        let reader = builder
            .with_row_groups(vec![group])
            .with_projection(mask)
            .with_row_selection(RowSelection::from(selectors))
            .with_batch_size(rows.len().clamp(1, 256))
            .build()
            .map_err(|e| parquet_err(path, e))?;
        let mut out = Vec::with_capacity(rows.len());
        for batch in reader {
            let batch = batch.map_err(|e| super::parquet::arrow_err(path, e))?;
            self.samples_of(file, &batch, &rows[out.len()..], &mut out)?;
        }
        if out.len() != rows.len() {
            return Err(Error::Format {
                path: path.display().to_string(),
                reason: format!("row group {group} gave {} of the {} rows asked for", out.len(), rows.len()),
            });
        }
        Ok(out)
    }

    /// The samples of `batch`, whose rows are `rows` of `file`.
    fn samples_of(&self, file: usize, batch: &RecordBatch, rows: &[usize], out: &mut Vec<Sample>) -> Result<()> {
        let path = &self.paths[file];
        let column = |name: &str| batch.column_by_name(name).expect("projected").clone();
        let image = images(&column(&self.columns.image))?;
        let text = match self.with_text {
            true => arrow::compute::cast(&column(&self.columns.text), &DataType::Utf8)?,
            false => arrow::array::new_null_array(&DataType::Utf8, batch.num_rows()),
        };
        let text = text.as_string::<i32>();
        let ids = self.columns.id.as_ref().map(|name| column(name));
        let integers = match &ids {
            Some(ids) if ids.data_type().is_integer() => Some(arrow::compute::cast(ids, &DataType::Int64)?),
            _ => None,
        };
        let integers = integers.as_ref().map(|i| i.as_primitive::<Int64Type>());
        let key_text = ids.as_ref().map(keys).transpose()?;
        for (k, &row) in rows.iter().enumerate().take(batch.num_rows()) {
            let bad = |reason: String| Error::Record { location: format!("{} row {row}", path.display()), reason };
            let image = image[k].clone().map_err(bad)?;
            if self.with_text && text.is_null(k) {
                return Err(bad(format!("its text column `{}` is null", self.columns.text)));
            }
            let key = match &key_text {
                Some(keys) => keys[k].clone().ok_or_else(|| bad("its id column is null".into()))?,
                None => format!("{file}/{row}"),
            };
            let id = id_of(integers, k, &key, file, row as u64);
            out.push(Sample { image: Bytes::from(image), text: text.value(k).to_string(), key, id, text_id: id });
        }
        Ok(())
    }
}

fn builder(path: &std::path::Path) -> Result<ParquetRecordBatchReaderBuilder<storage::Chunks>> {
    ParquetRecordBatchReaderBuilder::try_new(storage::open_chunks(path).map_err(io(path))?)
        .map_err(|e| parquet_err(path, e))
}

fn parquet_err(path: &std::path::Path, source: parquet::errors::ParquetError) -> Error {
    super::parquet::parquet_err(path, source)
}

impl Corpus for Files {
    fn len(&self) -> usize {
        self.total
    }

    fn spans(&self) -> &[(usize, usize)] {
        &self.spans
    }

    /// The chunk's rows, read row group by row group (each once, its rows selected), several
    /// row groups at once.
    fn fetch(&self, chunk: &[usize]) -> Result<Vec<Sample>> {
        let mut by_group: BTreeMap<(usize, usize), Vec<usize>> = BTreeMap::new();
        for &i in chunk {
            let (file, row) = self.locate(i);
            let group = self.groups[file].partition_point(|&first| first <= row) - 1;
            by_group.entry((file, group)).or_default().push(row);
        }
        let groups: Vec<((usize, usize), Vec<usize>)> = by_group
            .into_iter()
            .map(|(at, mut rows)| {
                rows.sort_unstable();
                rows.dedup();
                (at, rows)
            })
            .collect();
        let read = in_lanes(&groups, 8, |((file, group), rows)| self.read_rows(*file, *group, rows));
        let mut found: BTreeMap<(usize, usize), Sample> = BTreeMap::new();
        for (((file, _), rows), samples) in groups.iter().zip(read) {
            for (row, sample) in rows.iter().zip(samples?) {
                found.insert((*file, *row), sample);
            }
        }
        // A sample drawn twice in one chunk (the padded dataset's wrap-around) is cloned.
        chunk
            .iter()
            .map(|&i| {
                let at = self.locate(i);
                let sample = found.get(&at).expect("read above");
                Ok(Sample {
                    image: sample.image.clone(),
                    text: sample.text.clone(),
                    key: sample.key.clone(),
                    id: sample.id,
                    text_id: sample.text_id,
                })
            })
            .collect()
    }

    fn sequential(&self) -> Box<dyn SequentialRead + '_> {
        Box::new(GroupReader { files: self, current: None })
    }
}

/// A stream's reader: the row group it is in, decoded whole (its columns), kept until the
/// stream leaves it.
struct GroupReader<'a> {
    files: &'a Files,
    current: Option<((usize, usize), BTreeMap<usize, Sample>)>,
}

impl SequentialRead for GroupReader<'_> {
    fn read(&mut self, i: usize) -> Result<Sample> {
        let (file, row) = self.files.locate(i);
        let group = self.files.groups[file].partition_point(|&first| first <= row) - 1;
        if self.current.as_ref().is_none_or(|(at, _)| *at != (file, group)) {
            stop_on_signal()?;
            let range = self.files.groups[file][group]..self.files.groups[file][group + 1];
            let rows: Vec<usize> = range.collect();
            let samples = self.files.read_rows(file, group, &rows)?;
            self.current = Some(((file, group), rows.into_iter().zip(samples).collect()));
        }
        let (_, samples) = self.current.as_mut().expect("read above");
        samples.remove(&row).ok_or_else(|| Error::Internal(format!("row {row} of file {file} read twice")))
    }
}

/// Samples in the Parquet files `patterns` name (files, globs, brace patterns; their footers'
/// row counts), each file checked to have the columns.
///
/// # Errors
/// A pattern that names nothing, a file that cannot be read or lacks a column.
pub fn samples_in(patterns: &[String], columns: &Columns) -> Result<usize> {
    let expanded: Vec<String> = patterns.iter().flat_map(|p| super::webdataset::expand_braces(p)).collect();
    let paths = super::expand_paths(&expanded)
        .map_err(|problems| Error::Format { path: patterns.join(", "), reason: problems.join("; ") })?;
    Ok(Files::open(paths, columns.clone())?.total)
}
