//! `write_webdataset`: a table as WebDataset tar shards (`000000.tar`, `000001.tar`, … in one
//! directory), one sample per row: its image as `KEY.jpg` (`.png`, `.webp`, `.gif` by the
//! bytes' signature) and its text as `KEY.txt`, the key being the row's `key` column or, without
//! one, its id written with nine digits as img2dataset names samples.
//!
//! Headers are GNU tar's (long names as GNU long-name members) with mode 0444, owner 0 and
//! mtime 0, so the same table always gives the same bytes: a job killed and rerun ends with
//! the same shards. The directory is built beside its target and moved into place when the job
//! succeeds, as every output is.

use std::io::BufWriter;
use std::path::{Path, PathBuf};

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Int64Type, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use cnclip_schemas::columns::{IMAGE, IMAGE_ID, KEY, TEXT, TEXT_ID};
use schemars::JsonSchema;
use serde::Deserialize;

use super::{Sink, Staged, Written};
use crate::error::{Error, Result, io};
use crate::spec::{BuildContext, NodeConfig, Operator, Role, SinkSpec};
use crate::storage;

/// The columns a sample is written from.
struct Columns {
    id: usize,
    image: Option<usize>,
    text: Option<usize>,
    key: Option<usize>,
}

impl Columns {
    /// Which columns of `schema` make the samples; why it cannot be written otherwise.
    fn of(schema: &Schema) -> std::result::Result<Self, String> {
        let typed = |name: &str, data_type: &DataType| {
            schema.index_of(name).ok().filter(|i| schema.field(*i).data_type() == data_type)
        };
        let id = typed(IMAGE_ID, &DataType::Int64).or_else(|| typed(TEXT_ID, &DataType::Int64));
        let (image, text) = (typed(IMAGE, &DataType::Binary), typed(TEXT, &DataType::Utf8));
        let key = typed(KEY, &DataType::Utf8);
        match id {
            Some(id) if image.is_some() || text.is_some() => Ok(Columns { id, image, text, key }),
            _ => Err(format!(
                "needs an int64 `{IMAGE_ID}` or `{TEXT_ID}` and a binary `{IMAGE}` or a string `{TEXT}` column \
                 (and takes a string `{KEY}`); the input has {}",
                crate::transforms::column_list(schema)
            )),
        }
    }
}

/// An image's extension from its first bytes; `jpg` when none matches.
fn image_extension(bytes: &[u8]) -> &'static str {
    match bytes {
        [0x89, b'P', b'N', b'G', ..] => "png",
        [b'R', b'I', b'F', b'F', _, _, _, _, b'W', b'E', b'B', b'P', ..] => "webp",
        [b'G', b'I', b'F', b'8', ..] => "gif",
        _ => "jpg",
    }
}

pub struct WebDatasetSink {
    /// The directory being built, and its target.
    tmp: PathBuf,
    path: PathBuf,
    samples_per_shard: u64,
    shard: Option<tar::Builder<BufWriter<std::fs::File>>>,
    /// The open shard's number and samples.
    number: usize,
    in_shard: u64,
    rows: u64,
    /// The last sample's key: a repeated one would merge two samples.
    last_key: Option<String>,
    /// Finished: the directory is the job's to commit, not this sink's to remove.
    finished: bool,
}

impl WebDatasetSink {
    /// # Errors
    /// IO errors creating the temporary directory.
    pub fn create(path: &Path, samples_per_shard: u64) -> Result<Self> {
        super::create_parent(path)?;
        let tmp = super::tmp_path(path);
        storage::create_dir_all(&tmp).map_err(io(&tmp))?;
        Ok(WebDatasetSink {
            tmp,
            path: path.to_path_buf(),
            samples_per_shard: samples_per_shard.max(1),
            shard: None,
            number: 0,
            in_shard: 0,
            rows: 0,
            last_key: None,
            finished: false,
        })
    }

    fn shard_path(&self, number: usize) -> PathBuf {
        self.tmp.join(format!("{number:06}.tar"))
    }

    /// The open shard, after closing a full one.
    fn shard(&mut self) -> Result<&mut tar::Builder<BufWriter<std::fs::File>>> {
        if self.in_shard == self.samples_per_shard {
            self.close()?;
            self.number += 1;
        }
        if self.shard.is_none() {
            let path = self.shard_path(self.number);
            let file = storage::create(&path).map_err(io(&path))?;
            let mut builder = tar::Builder::new(BufWriter::with_capacity(1 << 20, file));
            builder.mode(tar::HeaderMode::Deterministic);
            self.shard = Some(builder);
            self.in_shard = 0;
        }
        Ok(self.shard.as_mut().expect("opened above"))
    }

    /// Ends the open shard (the end-of-archive blocks), synced.
    fn close(&mut self) -> Result<()> {
        let Some(builder) = self.shard.take() else { return Ok(()) };
        let path = self.shard_path(self.number);
        let out = builder.into_inner().map_err(io(&path))?;
        let file = out.into_inner().map_err(|e| io(&path)(e.into_error()))?;
        file.sync_all().map_err(io(&path))
    }

    fn append(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let path = self.shard_path(self.number);
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o444);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        self.shard()?.append_data(&mut header, name, data).map_err(io(&path))
    }
}

/// Why `key` cannot name a sample that webdataset reads back as written, if it cannot: its
/// file name must be non-empty and hold no `.` (webdataset splits a member's name at the first
/// one), and it must be a relative path without `.` or `..` parts.
fn bad_key(key: &str) -> Option<&'static str> {
    let file = key.rsplit('/').next().unwrap_or(key);
    if file.is_empty() {
        Some("its file name is empty")
    } else if file.contains('.') {
        Some("webdataset splits a member's name at the first `.` of its file name, so it would read another key")
    } else if key.starts_with('/') || key.split('/').any(|part| part.is_empty() || part == "." || part == "..") {
        Some("it is not a plain relative path")
    } else {
        None
    }
}

impl Sink for WebDatasetSink {
    fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        let columns = Columns::of(&batch.schema()).map_err(Error::Internal)?;
        let ids = batch.column(columns.id).as_primitive::<Int64Type>();
        let images = columns.image.map(|i| batch.column(i).as_binary::<i32>());
        let texts = columns.text.map(|i| batch.column(i).as_string::<i32>());
        let keys = columns.key.map(|i| batch.column(i).as_string::<i32>());
        for row in 0..batch.num_rows() {
            let id = ids.value(row);
            let key = match keys {
                Some(keys) if keys.is_valid(row) => keys.value(row).to_string(),
                _ => format!("{id:09}"),
            };
            let refuse = |reason: String| Error::Record {
                location: format!("{} row {id} (key {key:?})", self.path.display()),
                reason,
            };
            if let Some(reason) = bad_key(&key) {
                return Err(refuse(format!("the key cannot name a WebDataset sample: {reason}")));
            }
            if self.last_key.as_deref() == Some(key.as_str()) {
                return Err(refuse("the key repeats the row before's: webdataset would read one sample".into()));
            }
            let image = images.filter(|images| images.is_valid(row)).map(|images| images.value(row));
            let text = texts.filter(|texts| texts.is_valid(row)).map(|texts| texts.value(row));
            if image.is_none() && text.is_none() {
                return Err(refuse("the row has neither an image nor a text to write".into()));
            }
            // A full shard is closed before the sample's first member, so a sample never
            // spans two shards.
            self.shard()?;
            if let Some(image) = image {
                self.append(&format!("{key}.{}", image_extension(image)), image)?;
            }
            if let Some(text) = text {
                self.append(&format!("{key}.txt"), text.as_bytes())?;
            }
            self.last_key = Some(key);
            self.in_shard += 1;
            self.rows += 1;
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<(Written, Staged)> {
        self.close()?;
        self.finished = true;
        let staged = Staged::new(self.tmp.clone(), self.path.clone());
        Ok((Written { rows: self.rows, path: self.path.clone() }, staged))
    }
}

impl Drop for WebDatasetSink {
    /// A job that failed leaves no half-written directory.
    fn drop(&mut self) {
        if !self.finished {
            drop(self.shard.take());
            let _ = storage::remove_dir_all(&self.tmp);
        }
    }
}

/// images or texts (with an optional `key`) → WebDataset tar shards in the directory `path`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WriteWebDatasetConfig {
    /// The directory of shards (`000000.tar`, `000001.tar`, …).
    pub path: PathBuf,
    /// Samples per shard.
    #[serde(default = "default_samples_per_shard")]
    pub samples_per_shard: u64,
}

fn default_samples_per_shard() -> u64 {
    10_000
}

impl NodeConfig for WriteWebDatasetConfig {
    const KIND: &'static str = "write_webdataset";
    const ROLE: Role = Role::Sink;
    fn build(self, cx: &BuildContext) -> Result<Operator, Vec<String>> {
        if self.samples_per_shard == 0 {
            return Err(vec!["`samples_per_shard` must be at least 1".into()]);
        }
        Ok(Operator::Sink(Box::new(WriteWebDatasetConfig { path: cx.resolve(&self.path), ..self })))
    }
}

impl SinkSpec for WriteWebDatasetConfig {
    fn path(&self) -> &Path {
        &self.path
    }
    fn accepts(&self, schema: &SchemaRef) -> Result<(), Vec<String>> {
        Columns::of(schema).map(|_| ()).map_err(|e| vec![e])
    }
    fn open(&self, _: &SchemaRef) -> Result<Box<dyn Sink>> {
        Ok(Box::new(WebDatasetSink::create(&self.path, self.samples_per_shard)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_that_webdataset_would_read_otherwise_are_refused() {
        for good in ["000000007", "dir/sub/k_1", "键"] {
            assert_eq!(bad_key(good), None, "{good}");
        }
        for bad in ["img_001.jpg", "", "dir/", "/abs/k", "../k", "a/./b", "a//b"] {
            assert!(bad_key(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn image_extensions_come_from_the_bytes() {
        assert_eq!(image_extension(&[0xff, 0xd8, 0xff, 0xe0]), "jpg");
        assert_eq!(image_extension(b"\x89PNG\r\n\x1a\n"), "png");
        assert_eq!(image_extension(b"RIFF\0\0\0\0WEBPVP8 "), "webp");
        assert_eq!(image_extension(b"GIF89a"), "gif");
        assert_eq!(image_extension(b""), "jpg");
    }
}
