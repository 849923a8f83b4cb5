//! `train_shards`: WebDataset shards (local or in an object store) read for training without
//! copying them into an LMDB, through their `locations` index — where each sample's image and
//! text members lie, made once by the `webdataset` source's `locations` table.
//!
//! Sample `i` is the index's row `i` (shards in their expanded order, samples in file order),
//! so a corpus written as shards in the order of an LMDB split's `pairs` keys is the same
//! dataset. Two orders, both functions of `--seed` and the epoch alone, so a resumed run reads
//! exactly what an uninterrupted one reads from its resume point:
//!
//! - `shuffle_buffer = 0` — map-style, cn_clip's semantics: the order of `lmdb_train` (its
//!   `DistributedSampler`, padded to whole global batches), each sample fetched by a ranged read
//!   of its members, several in flight.
//! - `shuffle_buffer = N` — a stream, for corpora too big for random reads: the shards in an
//!   order drawn per epoch, read front to back, each sample through a buffer of `N` from which
//!   a uniformly drawn one leaves as the next comes in (WebDataset's `shuffle`). The order of
//!   sample numbers is computed from the shards' sample counts alone, so resuming at micro-batch
//!   `i` replays it without reading, then reads again only what the buffer held at that point.
//!   The last partial global batch is dropped. Memory: the buffer's samples.
//!
//! Parquet files in another project's layout (img2dataset's `key`, `jpg`, `caption`; Hugging
//! Face's `image` struct) are read the same way by their columns (`columns`;
//! [`super::train_parquet`]): a file is a shard, a row a sample, row counts from the footers, and
//! a null image or text stops the run naming the file and row. Corpora whose texts refer to
//! images by id — cn_clip's TSV image files (through their `locations`), cnclip's images tables
//! — are read with the texts or pairs kept ([`super::train_pairs`]).
//!
//! Rows come out as `lmdb_train`'s do (micro-batch by micro-batch, replica by replica) with
//! the image bytes decoded from nothing: `sample`, `image_id`, `text_id` (both `shard << 32 |
//! sample in shard` for tar shards; a Parquet row's id as the `parquet` source's column mapping
//! gives it), `text`, `image`, `key`. A text member that is not UTF-8 or an object that changed under the index is an error
//! naming the shard and key: a training batch cannot drop a sample.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BinaryBuilder, Int64Builder, RecordBatch, StringArray, StringBuilder};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef};
use bytes::Bytes;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rand_mt::Mt64;
use schemars::JsonSchema;
use serde::Deserialize;

use super::lmdb_train::TrainOrder;
use super::sampler::randperm;
use super::webdataset::{expand_braces, location_columns, locations_schema};
use super::{BATCH_BYTES, Emit, ReadContext, Source};
use crate::error::{Error, Result, io};
use crate::spec::{BuildContext, NodeConfig, Operator, Role};
use crate::storage;
use cnclip_schemas::columns::{IMAGE, IMAGE_ID, KEY, SAMPLE, TEXT, TEXT_ID};

/// Ranged reads in flight in the map-style order.
const FETCHERS: usize = 8;
/// A stream skips a gap up to this many bytes by reading through it; a longer one by a new
/// read from the next sample's offset.
const SKIP_BY_READING: u64 = 4 << 20;

/// The rows `train_shards` emits.
pub fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(SAMPLE, DataType::Int64, false),
        Field::new(IMAGE_ID, DataType::Int64, false),
        Field::new(TEXT_ID, DataType::Int64, false),
        Field::new(TEXT, DataType::Utf8, false),
        Field::new(IMAGE, DataType::Binary, false),
        Field::new(KEY, DataType::Utf8, false),
    ]))
}

/// The `locations` index in memory, sorted by shard and place: row `i` is sample `i`.
pub struct Index {
    shard: Vec<u32>,
    place: Vec<u32>,
    keys: StringArray,
    /// `[image_offset, image_len, text_offset, text_len]` per sample.
    ranges: Vec<[u64; 4]>,
    /// Per shard: its first sample and how many it has.
    spans: Vec<(usize, usize)>,
}

impl Index {
    /// Reads the `locations` table at `path` for `shards` shards.
    ///
    /// # Errors
    /// It cannot be read, is not a `locations` table, or names a shard past `shards`.
    pub fn load(path: &Path, shards: usize) -> Result<Index> {
        let name = path.display().to_string();
        let bad = |reason: String| Error::Format { path: name.clone(), reason };
        let parquet_err = |e: parquet::errors::ParquetError| bad(format!("not a readable Parquet file: {e}"));
        let reader = ParquetRecordBatchReaderBuilder::try_new(storage::open_chunks(path).map_err(io(path))?)
            .map_err(parquet_err)?
            .build()
            .map_err(parquet_err)?;
        let mut batches = Vec::new();
        for batch in reader {
            batches.push(batch.map_err(|e| bad(e.to_string()))?);
        }
        let expected = locations_schema();
        let all = arrow::compute::concat_batches(&expected, &batches)
            .map_err(|e| bad(format!("not a `locations` table ({e})")))?;
        let int = |column: &str| -> Result<Vec<i64>> {
            let array = all.column_by_name(column).ok_or_else(|| bad(format!("no `{column}` column")))?;
            let values =
                array.as_primitive_opt::<Int64Type>().ok_or_else(|| bad(format!("`{column}` is not int64")))?;
            if values.null_count() > 0 {
                return Err(bad(format!("`{column}` has {} null values", values.null_count())));
            }
            Ok(values.values().to_vec())
        };
        use location_columns::*;
        let (shard, place) = (int(SHARD)?, int(SAMPLE)?);
        let columns = [int(IMAGE_OFFSET)?, int(IMAGE_LEN)?, int(TEXT_OFFSET)?, int(TEXT_LEN)?];
        let keys =
            all.column_by_name(KEY).and_then(|k| k.as_string_opt::<i32>()).ok_or_else(|| bad("no `key`".into()))?;
        let mut rows: Vec<usize> = (0..all.num_rows()).collect();
        rows.sort_by_key(|&i| (shard[i], place[i]));
        let mut index = Index {
            shard: Vec::with_capacity(rows.len()),
            place: Vec::with_capacity(rows.len()),
            keys: StringArray::from_iter_values(rows.iter().map(|&i| keys.value(i))),
            ranges: Vec::with_capacity(rows.len()),
            spans: vec![(0, 0); shards],
        };
        for (sample, &i) in rows.iter().enumerate() {
            let in_range = |v: i64, max: i64| (0..=max).contains(&v);
            if !in_range(shard[i], shards as i64 - 1) || !in_range(place[i], u32::MAX as i64) {
                return Err(bad(format!(
                    "row {i} names sample {} of shard {}, not one of the {shards} shards given: the index is not \
                     these shards'",
                    place[i], shard[i]
                )));
            }
            if columns.iter().any(|c| c[i] < 0) {
                return Err(bad(format!("row {i} has a negative offset or length")));
            }
            // A member no shard holds (its end past what an i64 counts) or past what a record may
            // be would have a sample read allocate it.
            let limit = super::default_max_record_bytes() as i64;
            let [io, il, to, tl] = columns.each_ref().map(|c| c[i]);
            if il > limit || tl > limit || io.checked_add(il).is_none() || to.checked_add(tl).is_none() {
                return Err(bad(format!("row {i} has a member of impossible size or place ({io}+{il}, {to}+{tl})")));
            }
            let s = shard[i] as usize;
            if index.spans[s].1 == 0 {
                index.spans[s].0 = sample;
            }
            index.spans[s].1 += 1;
            index.shard.push(s as u32);
            index.place.push(place[i] as u32);
            index.ranges.push(columns.each_ref().map(|c| c[i] as u64));
        }
        Ok(index)
    }

    /// Samples in the index.
    pub fn len(&self) -> usize {
        self.shard.len()
    }

    pub fn is_empty(&self) -> bool {
        self.shard.is_empty()
    }

    /// The byte range holding sample `i`'s image and text members.
    fn span_of(&self, i: usize) -> std::ops::Range<u64> {
        let [io, il, to, tl] = self.ranges[i];
        io.min(to)..(io + il).max(to + tl)
    }

    /// Sample `i` from `bytes`, the bytes of [`Index::span_of`].
    fn sample_from(&self, i: usize, bytes: &Bytes, shards: &[PathBuf]) -> Result<Sample> {
        let [io, il, to, tl] = self.ranges[i];
        let start = self.span_of(i).start;
        let slice = |offset: u64, len: u64| bytes.slice((offset - start) as usize..(offset - start + len) as usize);
        let text = String::from_utf8(slice(to, tl).to_vec()).map_err(|e| Error::Record {
            location: self.describe(i, shards),
            reason: format!("its text member is not UTF-8 ({e})"),
        })?;
        let (key, id) = (self.keys.value(i).to_string(), ((self.shard[i] as i64) << 32) | self.place[i] as i64);
        Ok(Sample { image: slice(io, il), text, key, id, text_id: id })
    }

    /// Sample `i`'s members could not be read where the index says they lie.
    fn unreadable(&self, i: usize, shards: &[PathBuf], e: std::io::Error) -> Error {
        Error::Record {
            location: self.describe(i, shards),
            reason: format!("its members cannot be read at the offsets the index gives ({e}): was the shard changed?"),
        }
    }

    fn describe(&self, i: usize, shards: &[PathBuf]) -> String {
        format!("{} sample {}", shards[self.shard[i] as usize].display(), self.keys.value(i))
    }
}

/// One sample: its image's encoded bytes, its text, its key, and the ids its rows take (one
/// id for both where a sample is one record; a TSV pair's image and text ids).
pub(crate) struct Sample {
    pub(crate) image: Bytes,
    pub(crate) text: String,
    pub(crate) key: String,
    pub(crate) id: i64,
    pub(crate) text_id: i64,
}

/// A corpus read in place, as the two orders need it: samples numbered shard by shard (a tar
/// shard or a Parquet file), read at random or front to back within a shard.
pub(crate) trait Corpus: Sync {
    /// Samples in all.
    fn len(&self) -> usize;
    /// Per shard: its first sample and how many it has.
    fn spans(&self) -> &[(usize, usize)];
    /// The samples `chunk`, in its order (random reads, several at once).
    fn fetch(&self, chunk: &[usize]) -> Result<Vec<Sample>>;
    /// A reader of samples that, within a shard, come in increasing order (a stream).
    fn sequential(&self) -> Box<dyn SequentialRead + '_>;
}

/// Reads samples front to back within each shard, skipping those not asked for.
pub(crate) trait SequentialRead {
    fn read(&mut self, sample: usize) -> Result<Sample>;
}

/// WebDataset shards and their `locations` index.
struct Tars {
    index: Index,
    shards: Vec<PathBuf>,
}

impl Corpus for Tars {
    fn len(&self) -> usize {
        self.index.len()
    }

    fn spans(&self) -> &[(usize, usize)] {
        &self.index.spans
    }

    fn fetch(&self, chunk: &[usize]) -> Result<Vec<Sample>> {
        fetch(&self.index, &self.shards, chunk)
    }

    fn sequential(&self) -> Box<dyn SequentialRead + '_> {
        Box::new(TarReader { tars: self, open: None })
    }
}

/// The shard a stream reads: its number, a reader and the offset it is at.
struct TarReader<'a> {
    tars: &'a Tars,
    open: Option<(u32, Box<dyn Read + Send>, u64)>,
}

impl SequentialRead for TarReader<'_> {
    fn read(&mut self, i: usize) -> Result<Sample> {
        let (index, shards) = (&self.tars.index, &self.tars.shards);
        let shard = index.shard[i];
        let path = &shards[shard as usize];
        let span = index.span_of(i);
        let reopen = match &self.open {
            Some((open, _, offset)) => *open != shard || *offset > span.start || span.start - offset > SKIP_BY_READING,
            None => true,
        };
        let failed = |e: std::io::Error| index.unreadable(i, shards, e);
        if reopen {
            // Streamed from the sample on, with the read-ahead of any stream (ranged GETs in
            // flight for an object).
            let reader = storage::open_read_at(path, span.start).map_err(io(path))?;
            self.open = Some((shard, Box::new(reader), span.start));
        }
        let (_, reader, offset) = self.open.as_mut().expect("opened above");
        let gap = span.start - *offset;
        let skipped = std::io::copy(&mut reader.take(gap), &mut std::io::sink()).map_err(failed)?;
        let mut bytes = vec![0u8; (span.end - span.start) as usize];
        let done = skipped == gap && reader.read_exact(&mut bytes).is_ok();
        *offset = span.end;
        if !done {
            self.open = None;
            return Err(failed(std::io::ErrorKind::UnexpectedEof.into()));
        }
        index.sample_from(i, &Bytes::from(bytes), shards)
    }
}

/// What the source reads: tar shards through their index, Parquet files by their columns, or
/// images by id — cn_clip's TSV image files through their `locations`, or images tables — with
/// the texts or pairs kept.
pub enum Layout {
    Tars { index: PathBuf },
    Parquet(super::train_parquet::Columns),
    Tsv { locations: PathBuf, texts: PathBuf },
    Tables { texts: PathBuf },
}

pub struct TrainShardsSource {
    pub shards: Vec<PathBuf>,
    pub layout: Layout,
    pub order: TrainOrder,
}

impl Source for TrainShardsSource {
    fn schema(&self) -> SchemaRef {
        schema()
    }

    fn origin(&self) -> String {
        super::describe_paths(&self.shards)
    }

    fn estimated_records(&self) -> Option<u64> {
        None
    }

    fn read(self: Box<Self>, ctx: &ReadContext, emit: Emit<'_>) -> Result<()> {
        let corpus: Box<dyn Corpus> = match self.layout {
            Layout::Tars { index } => {
                Box::new(Tars { index: Index::load(&index, self.shards.len())?, shards: self.shards.clone() })
            }
            Layout::Parquet(columns) => Box::new(super::train_parquet::Files::open(self.shards.clone(), columns)?),
            Layout::Tsv { locations, texts } => {
                Box::new(super::train_pairs::Pairs::tsv(self.shards.clone(), &locations, &texts)?)
            }
            Layout::Tables { texts } => Box::new(super::train_pairs::Pairs::tables(self.shards.clone(), &texts)?),
        };
        let corpus = corpus.as_ref();
        let mut rows = Rows::default();
        let mut push = |i: usize, sample: Sample| {
            rows.push(i, sample);
            if rows.len >= ctx.batch_rows.max(1) || rows.bytes >= BATCH_BYTES { emit(rows.finish()?) } else { Ok(()) }
        };
        if self.order.shuffle_buffer == 0 {
            let order = self.order.samples(corpus.len());
            for chunk in order.chunks(ctx.batch_rows.max(1)) {
                stop_on_signal()?;
                for (i, sample) in chunk.iter().zip(corpus.fetch(chunk)?) {
                    push(*i, sample)?;
                }
            }
        } else {
            let order = StreamOrder::new(corpus, &self.order);
            let batches = self.order.batches(corpus.len());
            let global = self.order.batch_size * self.order.world.max(1);
            let (first, count) = (batches.start * global, batches.len() * global);
            let (mut shuffle, held) = order.resumed_at(first);
            let fresh = shuffle.next;
            let mut reader = Sequential::new(corpus.sequential(), &order, held, fresh);
            let replicas = self.order.replicas();
            for k in 0..count {
                let position = shuffle.next().expect("an epoch's whole batches are within its samples");
                let sample = order.sample_at(position);
                let taken = reader.take(position)?;
                // Row k of the epoch's stream is replica (k / batch_size) mod world's: a rank
                // reads the whole stream (its order depends on every sample before) and keeps
                // its own rows.
                if replicas.contains(&((first + k) / self.order.batch_size % self.order.world.max(1))) {
                    push(sample, taken)?;
                }
            }
        }
        if rows.len > 0 {
            emit(rows.finish()?)?;
        }
        Ok(())
    }
}

pub(crate) fn stop_on_signal() -> Result<()> {
    match crate::signals::interrupted() {
        Some(signal) => Err(Error::Interrupted { signal }),
        None => Ok(()),
    }
}

/// Samples `chunk` of the index by ranged reads, [`FETCHERS`] in flight, in `chunk`'s order.
fn fetch(index: &Index, shards: &[PathBuf], chunk: &[usize]) -> Result<Vec<Sample>> {
    in_lanes(chunk, FETCHERS, |&i| {
        let path = &shards[index.shard[i] as usize];
        let bytes = storage::read_range(path, index.span_of(i)).map_err(|e| index.unreadable(i, shards, e))?;
        index.sample_from(i, &bytes, shards)
    })
    .into_iter()
    .collect()
}

/// `work` on every item, on up to `lanes` threads (item `k` on lane `k mod lanes`), the results
/// in the items' order: reads of a store are bound by latency, not by cores.
pub(crate) fn in_lanes<T: Sync, R: Send>(items: &[T], lanes: usize, work: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let lanes = lanes.clamp(1, items.len().max(1));
    let mut out: Vec<Option<R>> = (0..items.len()).map(|_| None).collect();
    std::thread::scope(|scope| {
        let work = &work;
        let handles: Vec<_> = (0..lanes)
            .map(|lane| {
                scope.spawn(move || {
                    items
                        .iter()
                        .enumerate()
                        .skip(lane)
                        .step_by(lanes)
                        .map(|(at, item)| (at, work(item)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for handle in handles {
            for (at, result) in handle.join().expect("a lane does not panic") {
                out[at] = Some(result);
            }
        }
    });
    out.into_iter().map(|r| r.expect("every item done")).collect()
}

/// A stream epoch's order: shards in an order drawn from `seed + epoch`, samples in file
/// order within each; a position in that sequence maps to a sample of the index.
struct StreamOrder<'i> {
    corpus: &'i dyn Corpus,
    /// The shards in this epoch's order.
    shards: Vec<usize>,
    /// Where each of them starts in the sequence.
    starts: Vec<usize>,
    buffer: usize,
    seed: u64,
}

impl<'i> StreamOrder<'i> {
    fn new(corpus: &'i dyn Corpus, order: &TrainOrder) -> Self {
        let seed = order.seed.wrapping_add(order.epoch);
        let shards = randperm(corpus.spans().len(), seed);
        let mut starts = Vec::with_capacity(shards.len());
        let mut at = 0;
        for &s in &shards {
            starts.push(at);
            at += corpus.spans()[s].1;
        }
        StreamOrder { corpus, shards, starts, buffer: order.shuffle_buffer, seed }
    }

    /// The sample at `position` of the sequence shards are read in.
    fn sample_at(&self, position: usize) -> usize {
        let (slot, start) = self.slot_of(position);
        self.corpus.spans()[self.shards[slot]].0 + (position - start)
    }

    /// The place in `self.shards` of the shard holding `position`, and where it starts.
    fn slot_of(&self, position: usize) -> (usize, usize) {
        let slot = self.starts.partition_point(|&s| s <= position) - 1;
        // Shards without samples start where the next one does: the last of those is the one.
        (slot, self.starts[slot])
    }

    /// The shuffle after `emitted` samples have left it (replayed without reading), and the
    /// positions it holds then that came in before: what a resumed stream reads again.
    fn resumed_at(&self, emitted: usize) -> (Shuffle, HashSet<usize>) {
        let mut shuffle = Shuffle::new(self.corpus.len(), self.buffer, self.seed);
        for _ in 0..emitted {
            shuffle.next();
        }
        let held = shuffle.held.iter().copied().collect();
        (shuffle, held)
    }
}

/// The shuffle buffer over positions `0..total` of the read sequence: filled to `capacity`,
/// then each step a uniformly drawn held position leaves and the next one read takes its place.
struct Shuffle {
    rng: Mt64,
    held: Vec<usize>,
    next: usize,
    total: usize,
    capacity: usize,
}

impl Shuffle {
    fn new(total: usize, capacity: usize, seed: u64) -> Self {
        // A stream of its own: not the sampler's draws for the same seed.
        let rng = Mt64::new(seed ^ 0x5eed_5eed_5eed_5eed);
        Shuffle { rng, held: Vec::with_capacity(capacity.min(total)), next: 0, total, capacity: capacity.max(1) }
    }
}

impl Iterator for Shuffle {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        while self.held.len() < self.capacity && self.next < self.total {
            self.held.push(self.next);
            self.next += 1;
        }
        if self.held.is_empty() {
            return None;
        }
        let j = (self.rng.next_u64() % self.held.len() as u64) as usize;
        let out = self.held[j];
        if self.next < self.total {
            self.held[j] = self.next;
            self.next += 1;
        } else {
            self.held.swap_remove(j);
        }
        Some(out)
    }
}

/// Reads a stream's samples front to back, keeping those still to leave the buffer.
struct Sequential<'a> {
    reader: Box<dyn SequentialRead + 'a>,
    order: &'a StreamOrder<'a>,
    /// Positions before `fresh` that must be read again (a resumed buffer's).
    again: HashSet<usize>,
    fresh: usize,
    /// The next position to read.
    position: usize,
    read: HashMap<usize, Sample>,
}

impl<'a> Sequential<'a> {
    /// A reader for a shuffle that has taken in the positions before `fresh`, of which it
    /// still holds `again`.
    fn new(
        reader: Box<dyn SequentialRead + 'a>,
        order: &'a StreamOrder<'a>,
        again: HashSet<usize>,
        fresh: usize,
    ) -> Self {
        let position = again.iter().copied().min().unwrap_or(fresh).min(fresh);
        Sequential { reader, order, again, fresh, position, read: HashMap::new() }
    }

    /// The sample at `position`, reading on to it.
    fn take(&mut self, position: usize) -> Result<Sample> {
        while self.position <= position {
            let at = self.position;
            self.position += 1;
            if at >= self.fresh || self.again.remove(&at) {
                stop_on_signal()?;
                let sample = self.reader.read(self.order.sample_at(at))?;
                self.read.insert(at, sample);
            }
        }
        self.read.remove(&position).ok_or_else(|| {
            Error::Internal(format!("the stream's position {position} left the buffer twice or was never read"))
        })
    }
}

#[derive(Default)]
struct Rows {
    sample: Int64Builder,
    image_id: Int64Builder,
    text_id: Int64Builder,
    text: StringBuilder,
    image: BinaryBuilder,
    key: StringBuilder,
    len: usize,
    bytes: usize,
}

impl Rows {
    fn push(&mut self, i: usize, sample: Sample) {
        self.sample.append_value(i as i64);
        self.image_id.append_value(sample.id);
        self.text_id.append_value(sample.text_id);
        self.text.append_value(&sample.text);
        self.image.append_value(&sample.image);
        self.key.append_value(&sample.key);
        self.len += 1;
        self.bytes += sample.image.len() + sample.text.len();
    }

    fn finish(&mut self) -> Result<RecordBatch> {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.sample.finish()),
            Arc::new(self.image_id.finish()),
            Arc::new(self.text_id.finish()),
            Arc::new(self.text.finish()),
            Arc::new(self.image.finish()),
            Arc::new(self.key.finish()),
        ];
        (self.len, self.bytes) = (0, 0);
        Ok(RecordBatch::try_new(schema(), columns)?)
    }
}

/// WebDataset shards → training rows through their `locations` index, in cn_clip's sampler
/// order (`shuffle_buffer = 0`) or as a stream shuffled per epoch, micro-batch by micro-batch.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainShardsConfig {
    /// The shards, as the `webdataset` source that made the index was given them, or Parquet
    /// files (files, globs, brace patterns; local or URLs).
    pub shards: Vec<String>,
    /// Tar shards: their `locations` table, a Parquet file (the `webdataset` source's `table =
    /// "locations"`).
    #[serde(default)]
    pub index: Option<PathBuf>,
    /// Parquet files (img2dataset, Hugging Face): the image and text columns, and optionally
    /// the id column (the ids and keys of `parquet`'s column mapping).
    #[serde(default)]
    pub columns: Option<super::train_parquet::Columns>,
    /// Images by id (`shards`: cn_clip TSV image files with `index`, their `locations` table
    /// (the `tsv` source's `table = "locations"`); or images tables, `image_id` and `image`,
    /// without it): the `texts` or `pairs` table of the pairs, a Parquet file (the texts as the
    /// `jsonl` or `parquet` source reads them, through `require_images`).
    #[serde(default)]
    pub texts: Option<PathBuf>,
    /// Which samples of which epoch, for how many replicas, and how shuffled.
    pub order: TrainOrder,
}

impl NodeConfig for TrainShardsConfig {
    const KIND: &'static str = "train_shards";
    const ROLE: Role = Role::Source;
    fn build(self, cx: &BuildContext) -> Result<Operator, Vec<String>> {
        let patterns: Vec<String> = self.shards.iter().flat_map(|p| expand_braces(p)).collect();
        let shards = cx.files(&patterns)?;
        if self.order.batch_size == 0 || self.order.world == 0 {
            return Err(vec!["order: batch_size and world must be at least 1".into()]);
        }
        if self.order.rank.is_some_and(|r| r >= self.order.world) {
            return Err(vec!["order: rank must be below world".into()]);
        }
        let layout = match (self.index, self.columns, self.texts) {
            (Some(index), None, None) => Layout::Tars { index: cx.resolve(&index) },
            (None, Some(columns), None) => Layout::Parquet(columns),
            (Some(index), None, Some(texts)) => {
                Layout::Tsv { locations: cx.resolve(&index), texts: cx.resolve(&texts) }
            }
            (None, None, Some(texts)) => Layout::Tables { texts: cx.resolve(&texts) },
            _ => {
                return Err(vec![
                    "give `index` (tar shards), `index` and `texts` (TSV image files), `texts` (images tables) or \
                     `columns` (Parquet files)"
                        .into(),
                ]);
            }
        };
        Ok(Operator::Source(Box::new(TrainShardsSource { shards, layout, order: self.order })))
    }

    fn known_schema(&self) -> Option<SchemaRef> {
        Some(schema())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `locations` file of one row, its image length `image_len` (or null).
    fn index_with(dir: &Path, image_len: Option<i64>) -> PathBuf {
        use arrow::array::{Int64Array, StringArray};
        let int = |v: Option<i64>| Arc::new(Int64Array::from(vec![v])) as ArrayRef;
        let columns = vec![
            int(Some(0)),
            int(Some(0)),
            Arc::new(StringArray::from(vec!["k"])) as ArrayRef,
            int(Some(512)),
            int(image_len),
            int(Some(1536)),
            int(Some(4)),
        ];
        let fields: Vec<Field> =
            locations_schema().fields().iter().map(|f| f.as_ref().clone().with_nullable(true)).collect();
        let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap();
        let path = dir.join(format!("index-{image_len:?}.parquet"));
        let mut writer =
            parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), batch.schema(), None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        path
    }

    #[test]
    fn an_index_with_nulls_or_impossible_members_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let good = Index::load(&index_with(dir.path(), Some(900)), 1).unwrap();
        assert_eq!((good.len(), good.span_of(0)), (1, 512..1540));
        for (len, why) in [(None, "null"), (Some(i64::MAX), "impossible size")] {
            let path = index_with(dir.path(), len);
            let error = Index::load(&path, 1).err().expect("refused").to_string();
            assert!(error.contains(&path.display().to_string()) && error.contains(why), "{error}");
        }
        // An index naming a shard past those given is not theirs.
        let error = Index::load(&index_with(dir.path(), Some(1)), 0).err().expect("refused").to_string();
        assert!(error.contains("not these shards'"), "{error}");
    }

    #[test]
    fn a_shuffle_emits_every_position_once_and_replays_from_any_point() {
        let all: Vec<usize> = Shuffle::new(50, 8, 7).collect();
        let mut sorted = all.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_ne!(all, sorted, "a buffer of 8 moves samples");
        // Held positions are never more than the buffer ahead of where reading is.
        let mut shuffle = Shuffle::new(50, 8, 7);
        for (k, expected) in all.iter().enumerate() {
            assert!(shuffle.held.len() <= 8);
            assert_eq!(shuffle.next(), Some(*expected), "step {k}");
        }
        assert_eq!(Shuffle::new(50, 1, 7).collect::<Vec<_>>(), (0..50).collect::<Vec<_>>());
    }
}
