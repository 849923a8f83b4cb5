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

impl Sink for WebDatasetSink {
    fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        let columns = Columns::of(&batch.schema()).map_err(Error::Internal)?;
        let ids = batch.column(columns.id).as_primitive::<Int64Type>();
        let images = columns.image.map(|i| batch.column(i).as_binary::<i32>());
        let texts = columns.text.map(|i| batch.column(i).as_string::<i32>());
        let keys = columns.key.map(|i| batch.column(i).as_string::<i32>());
        for row in 0..batch.num_rows() {
            let key = match keys {
                Some(keys) if keys.is_valid(row) => keys.value(row).to_string(),
                _ => format!("{:09}", ids.value(row)),
            };
            // A full shard is closed before the sample's first member, so a sample never
            // spans two shards.
            self.shard()?;
            if let Some(images) = images.filter(|images| images.is_valid(row)) {
                let image = images.value(row);
                self.append(&format!("{key}.{}", image_extension(image)), image)?;
            }
            if let Some(texts) = texts.filter(|texts| texts.is_valid(row)) {
                self.append(&format!("{key}.txt"), texts.value(row).as_bytes())?;
            }
            self.in_shard += 1;
            self.rows += 1;
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<(Written, Staged)> {
        self.close()?;
        let staged = Staged::new(self.tmp.clone(), self.path.clone());
        Ok((Written { rows: self.rows, path: self.path.clone() }, staged))
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
    fn image_extensions_come_from_the_bytes() {
        assert_eq!(image_extension(&[0xff, 0xd8, 0xff, 0xe0]), "jpg");
        assert_eq!(image_extension(b"\x89PNG\r\n\x1a\n"), "png");
        assert_eq!(image_extension(b"RIFF\0\0\0\0WEBPVP8 "), "webp");
        assert_eq!(image_extension(b"GIF89a"), "gif");
        assert_eq!(image_extension(b""), "jpg");
    }
}
