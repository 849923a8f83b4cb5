//! Corpora whose texts refer to images by id, read in place by `train_shards` (not serialized
//! into an LMDB first): cn_clip's own layout — `{split}_imgs.tsv` (`image_id<TAB>base64`
//! lines) and `{split}_texts.jsonl` — and cnclip's Parquet tables (`{split}_images.parquet`
//! with `_pairs` or `_texts`). Made once before training:
//!
//! - for a TSV, the images' `locations` (the `tsv` source's `table = "locations"`): where each
//!   good line's base64 field lies; a sample's image is one ranged read of it, decoded as
//!   cn_clip's `LMDBDataset` decodes the value `build_lmdb_dataset.py` stores. An images table
//!   needs nothing made: its `image_id` column is read when the corpus opens, and an image is
//!   read from its row group (only its row, only the `image` column);
//! - the texts (or pairs) kept: a `jsonl` or `parquet` source, repeated ids quarantined, then
//!   `require_images`, which drops and quarantines references to images that are not there.
//!
//! Sample `i` is the `i`-th pair `build-lmdb` (or `export --format lmdb`) would write: texts in
//! file order, each text's `image_ids` in order — the same `pairs` keys, so the sampler's order
//! is the LMDB split's and a run trains exactly as on it. For the stream order
//! (`--shuffle-buffer`) the pairs are cut into blocks of [`BLOCK`] that stand for shards: the
//! blocks come in an order drawn per epoch, each through the shuffle buffer (a pair's image is
//! a random read either way).
//!
//! Memory: 24 bytes an image and 16 a pair, plus the texts.

use std::path::{Path, PathBuf};

use arrow::array::{Array, AsArray, LargeStringArray, RecordBatch};
use arrow::datatypes::{DataType, Int64Type, SchemaRef};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::train_parquet::Files;
use super::train_shards::{Corpus, Sample, SequentialRead, in_lanes};
use super::tsv::{location_columns, locations_schema};
use crate::decoders::base64;
use crate::error::{Error, Result, io};
use crate::sinks::lmdb::cn_clip_base64;
use crate::storage;
use cnclip_schemas::columns::{IMAGE_ID, IMAGE_IDS, TEXT, TEXT_ID};

/// Pairs a block holds in the stream order.
pub const BLOCK: usize = 4096;
/// Ranged reads in flight.
const FETCHERS: usize = 8;

/// One image line's base64 field.
#[derive(Clone, Copy)]
struct Place {
    file: u32,
    offset: u64,
    len: u32,
}

/// Where the images are read from.
enum Images {
    /// TSV files: each image's base64 field, in the order of `Pairs::ids`.
    Tsv { files: Vec<PathBuf>, places: Vec<Place> },
    /// Images tables: each image's row (its sample number in `files`), in the order of `Pairs::ids`.
    Tables { files: Files, rows: Vec<usize> },
}

/// The images, by id, and the pairs.
pub(crate) struct Pairs {
    images: Images,
    /// Sorted.
    ids: Vec<i64>,
    /// Per pair: its image's place in `ids`, and its text's row.
    pairs: Vec<(u32, u32)>,
    text_ids: Vec<i64>,
    /// 64-bit offsets: a corpus's texts may pass 2 GiB.
    texts: LargeStringArray,
    spans: Vec<(usize, usize)>,
}

/// The type a column of `data_type` is held in: strings and lists with 64-bit offsets.
fn widened(data_type: &DataType) -> DataType {
    match data_type {
        DataType::Utf8 => DataType::LargeUtf8,
        DataType::List(item) => DataType::LargeList(item.clone()),
        other => other.clone(),
    }
}

/// A Parquet table read whole: the columns `expected` names, found by name (in whatever order
/// the file has them) and held [`widened`], none of them null.
fn read_table(path: &Path, expected: &SchemaRef, what: &str) -> Result<RecordBatch> {
    let bad = |reason: String| Error::Format { path: path.display().to_string(), reason };
    let parquet_err = |e: parquet::errors::ParquetError| bad(format!("not a readable Parquet file: {e}"));
    let reader = ParquetRecordBatchReaderBuilder::try_new(storage::open_chunks(path).map_err(io(path))?)
        .map_err(parquet_err)?
        .build()
        .map_err(parquet_err)?;
    let fields: Vec<_> =
        expected.fields().iter().map(|f| f.as_ref().clone().with_data_type(widened(f.data_type()))).collect();
    let held: SchemaRef = std::sync::Arc::new(arrow::datatypes::Schema::new(fields));
    let mut batches = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| bad(e.to_string()))?;
        let mut columns = Vec::with_capacity(held.fields().len());
        for field in held.fields() {
            let column = batch
                .column_by_name(field.name())
                .ok_or_else(|| bad(format!("not a {what}: no `{}` column", field.name())))?;
            if column.null_count() > 0 {
                return Err(bad(format!("`{}` has null values", field.name())));
            }
            let cast = arrow::compute::cast(column, field.data_type()).map_err(|e| {
                bad(format!(
                    "not a {what}: `{}` is {}, not {} ({e})",
                    field.name(),
                    column.data_type(),
                    field.data_type()
                ))
            })?;
            columns.push(cast);
        }
        batches.push(RecordBatch::try_new(held.clone(), columns).map_err(|e| bad(format!("not a {what} ({e})")))?);
    }
    arrow::compute::concat_batches(&held, &batches).map_err(|e| bad(format!("not a {what} ({e})")))
}

/// A place in the images or the texts as the `u32` a pair holds it in, or an error naming
/// `path` for a corpus past four billion of them.
fn narrow(value: usize, what: &str, path: &Path) -> Result<u32> {
    u32::try_from(value).map_err(|_| Error::Format {
        path: path.display().to_string(),
        reason: format!("more than {} {what}: past what a corpus read in place holds", u32::MAX),
    })
}

/// Every `image_id` of the images tables `files`: the id, its sample number in `files`, and the
/// file and row it is in, in file order.
fn image_ids(files: &Files) -> Result<Vec<(i64, usize, usize, usize)>> {
    let mut ids = Vec::new();
    for (file, path) in files.paths().iter().enumerate() {
        let bad = |reason: String| Error::Format { path: path.display().to_string(), reason };
        let builder = ParquetRecordBatchReaderBuilder::try_new(storage::open_chunks(path).map_err(io(path))?)
            .map_err(|e| super::parquet::parquet_err(path, e))?;
        let root = builder.schema().index_of(IMAGE_ID).map_err(|_| bad(format!("no `{IMAGE_ID}` column")))?;
        let mask = parquet::arrow::ProjectionMask::roots(builder.parquet_schema(), [root]);
        let reader = builder.with_projection(mask).build().map_err(|e| super::parquet::parquet_err(path, e))?;
        let mut row = 0;
        for batch in reader {
            let batch = batch.map_err(|e| super::parquet::arrow_err(path, e))?;
            let column = batch.column(0);
            let values = column
                .as_primitive_opt::<Int64Type>()
                .filter(|v| v.null_count() == 0)
                .ok_or_else(|| bad(format!("`{IMAGE_ID}` is not int64 without nulls")))?;
            for &id in values.values() {
                ids.push((id, ids.len(), file, row));
                row += 1;
            }
        }
    }
    Ok(ids)
}

/// The rows of images tables `paths` whose image id an earlier row has, as quarantine records:
/// what `export --format lmdb` quarantines (it keeps the first), and what training in place
/// leaves out too.
///
/// # Errors
/// A table that cannot be read or is not an images table, naming it.
pub fn repeated_images(paths: Vec<PathBuf>) -> Result<Vec<crate::quarantine::Rejected>> {
    let files = Files::images(paths)?;
    let mut seen = rustc_hash::FxHashSet::default();
    let mut repeated = Vec::new();
    for (id, _, file, _) in image_ids(&files)? {
        if !seen.insert(id) {
            repeated.push(crate::quarantine::Rejected {
                source: files.paths()[file].display().to_string(),
                location: format!("image {id}"),
                id: Some(id.to_string()),
                reason: "duplicate image id (the first one is kept)".into(),
            });
        }
    }
    Ok(repeated)
}

impl Pairs {
    /// A TSV corpus: `files` (the TSV image files, in the order the `locations` table numbers
    /// them), their `locations` table and the texts kept.
    ///
    /// # Errors
    /// A table that cannot be read or is not what it should be, a place past an `int64` or
    /// longer than a record may be, or a text naming an image the locations lack, naming it.
    pub(crate) fn tsv(files: Vec<PathBuf>, locations: &Path, texts: &Path) -> Result<Pairs> {
        let bad = |reason: String| Error::Format { path: locations.display().to_string(), reason };
        let table = read_table(locations, &locations_schema(), "TSV `locations` table")?;
        let int = |name: &str| table.column_by_name(name).expect("checked by the schema").as_primitive::<Int64Type>();
        use location_columns::*;
        let (file, id, offset, len) = (int(FILE), int(IMAGE_ID), int(OFFSET), int(LEN));
        let limit = super::default_max_record_bytes() as i64;
        let mut rows: Vec<usize> = (0..table.num_rows()).collect();
        rows.sort_by_key(|&i| id.value(i));
        let (mut ids, mut places) = (Vec::with_capacity(rows.len()), Vec::with_capacity(rows.len()));
        for &i in &rows {
            let (f, o, l) = (file.value(i), offset.value(i), len.value(i));
            if !(0..files.len() as i64).contains(&f) || o < 0 || !(0..=limit).contains(&l) || o.checked_add(l).is_none()
            {
                return Err(bad(format!("row {i} has an impossible place (file {f}, {o}+{l})")));
            }
            if ids.last() == Some(&id.value(i)) {
                return Err(bad(format!("image {} is listed twice", id.value(i))));
            }
            ids.push(id.value(i));
            places.push(Place { file: f as u32, offset: o as u64, len: l as u32 });
        }
        Self::with_texts(Images::Tsv { files, places }, ids, texts)
    }

    /// A corpus of images tables `files` (`image_id`, `image`) and the texts or pairs kept. Of
    /// rows repeating an image id the first is read, as `export --format lmdb` keeps it (the
    /// others are quarantined when the index is made: [`repeated_images`]).
    ///
    /// # Errors
    /// A table that cannot be read or is not an images table, or a text naming an image the
    /// tables lack, naming it.
    pub(crate) fn tables(files: Vec<PathBuf>, texts: &Path) -> Result<Pairs> {
        let files = Files::images(files)?;
        let mut ids: Vec<(i64, usize)> = image_ids(&files)?.into_iter().map(|(id, row, _, _)| (id, row)).collect();
        ids.sort_unstable();
        ids.dedup_by_key(|&mut (id, _)| id);
        let rows = ids.iter().map(|&(_, row)| row).collect();
        Self::with_texts(Images::Tables { files, rows }, ids.into_iter().map(|(id, _)| id).collect(), texts)
    }

    /// The corpus of `images` (by `ids`, sorted) and the `texts` or `pairs` table `texts`.
    fn with_texts(images: Images, ids: Vec<i64>, texts: &Path) -> Result<Pairs> {
        let bad = |reason: String| Error::Format { path: texts.display().to_string(), reason };
        let pairs_table = is_pairs_table(texts)?;
        let expected = if pairs_table { cnclip_schemas::pairs() } else { cnclip_schemas::texts() };
        let table = read_table(texts, &expected, if pairs_table { "`pairs` table" } else { "`texts` table" })?;
        let text_ids = table.column_by_name(TEXT_ID).expect("checked").as_primitive::<Int64Type>().values().to_vec();
        let find = |text_id: i64, image_id: &i64| {
            let at = ids
                .binary_search(image_id)
                .map_err(|_| bad(format!("text {text_id} names image {image_id}, which the images do not hold")))?;
            narrow(at, "images", texts)
        };
        let mut pairs = Vec::new();
        if pairs_table {
            let image_ids = table.column_by_name(IMAGE_ID).expect("checked").as_primitive::<Int64Type>();
            for (row, (text_id, image_id)) in text_ids.iter().zip(image_ids.values()).enumerate() {
                pairs.push((find(*text_id, image_id)?, narrow(row, "texts", texts)?));
            }
        } else {
            let image_ids = table.column_by_name(IMAGE_IDS).expect("checked").as_list::<i64>();
            for (row, text_id) in text_ids.iter().enumerate() {
                for image_id in image_ids.value(row).as_primitive::<Int64Type>().values() {
                    pairs.push((find(*text_id, image_id)?, narrow(row, "texts", texts)?));
                }
            }
        }
        let texts = table.column_by_name(TEXT).expect("checked").as_string::<i64>().clone();
        let spans = (0..pairs.len()).step_by(BLOCK).map(|start| (start, BLOCK.min(pairs.len() - start))).collect();
        Ok(Pairs { images, ids, pairs, text_ids, texts, spans })
    }

    /// The sample of pair `i`, its image's encoded bytes `image`.
    fn sample(&self, i: usize, image: Vec<u8>) -> Sample {
        let (at, text) = self.pairs[i];
        let image_id = self.ids[at as usize];
        Sample {
            image: image.into(),
            text: self.texts.value(text as usize).to_string(),
            key: image_id.to_string(),
            id: image_id,
            text_id: self.text_ids[text as usize],
        }
    }

    /// Pair `i`'s image from a TSV: read where the index says and decoded from base64.
    fn tsv_image(&self, i: usize, files: &[PathBuf], places: &[Place]) -> Result<Vec<u8>> {
        let at = self.pairs[i].0 as usize;
        let (image_id, place) = (self.ids[at], places[at]);
        let path = &files[place.file as usize];
        let failed = |reason: String| Error::Record {
            location: format!("{} image {image_id} (pair {i})", path.display()),
            reason,
        };
        let field = storage::read_range(path, place.offset..place.offset + place.len as u64).map_err(|e| {
            failed(format!("its line cannot be read at the offset the index gives ({e}): was the file changed?"))
        })?;
        // Padded as build-lmdb stores it (`aGk==` is read as `aGk=`), then decoded as cn_clip's
        // `LMDBDataset` decodes the stored value.
        base64::decode(&cn_clip_base64(&field)).map_err(|e| failed(format!("its base64 field does not decode ({e})")))
    }
}

/// Whether the table at `path` is a `pairs` table (an `image_id` per row) rather than a
/// `texts` table (`image_ids` lists).
fn is_pairs_table(path: &Path) -> Result<bool> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(storage::open_chunks(path).map_err(io(path))?)
        .map_err(|e| super::parquet::parquet_err(path, e))?;
    Ok(builder.schema().field_with_name(IMAGE_IDS).is_err())
}

impl Corpus for Pairs {
    fn len(&self) -> usize {
        self.pairs.len()
    }

    fn spans(&self) -> &[(usize, usize)] {
        &self.spans
    }

    fn fetch(&self, chunk: &[usize]) -> Result<Vec<Sample>> {
        match &self.images {
            Images::Tsv { files, places } => {
                in_lanes(chunk, FETCHERS, |&i| Ok(self.sample(i, self.tsv_image(i, files, places)?)))
                    .into_iter()
                    .collect()
            }
            Images::Tables { files, rows } => {
                let wanted: Vec<usize> = chunk.iter().map(|&i| rows[self.pairs[i].0 as usize]).collect();
                let images = files.fetch(&wanted)?;
                Ok(chunk.iter().zip(images).map(|(&i, image)| self.sample(i, image.image.to_vec())).collect())
            }
        }
    }

    fn sequential(&self) -> Box<dyn SequentialRead + '_> {
        Box::new(ReadAhead { pairs: self, ready: std::collections::VecDeque::new() })
    }
}

/// A stream's reader: a pair's image is a random read there too (images are not in pair
/// order), so the samples from the one asked for to the end of its block, [`READ_AHEAD`] at
/// most, are fetched at once, several reads in flight. A stream asks for the samples of a
/// block in increasing order (a resumed one skips some: those are read for nothing).
struct ReadAhead<'a> {
    pairs: &'a Pairs,
    ready: std::collections::VecDeque<(usize, Sample)>,
}

/// Samples a stream's reader fetches at once.
const READ_AHEAD: usize = 64;

impl SequentialRead for ReadAhead<'_> {
    fn read(&mut self, sample: usize) -> Result<Sample> {
        while self.ready.front().is_some_and(|(at, _)| *at < sample) {
            self.ready.pop_front();
        }
        if self.ready.front().is_none_or(|(at, _)| *at != sample) {
            let end = ((sample / BLOCK + 1) * BLOCK).min(sample + READ_AHEAD).min(self.pairs.len());
            let chunk: Vec<usize> = (sample..end).collect();
            let samples = self.pairs.fetch(&chunk)?;
            self.ready = chunk.into_iter().zip(samples).collect();
        }
        Ok(self.ready.pop_front().expect("fetched above").1)
    }
}

/// The pairs a `texts` table (the sum of its `image_ids` lengths) or a `pairs` table (its rows)
/// holds: the samples of a corpus of images by id, counted before training as an LMDB's
/// `num_samples` is read.
///
/// # Errors
/// The table cannot be read or is neither.
pub fn pairs_in(texts: &Path) -> Result<usize> {
    if is_pairs_table(texts)? {
        return Ok(read_table(texts, &cnclip_schemas::pairs(), "`pairs` table")?.num_rows());
    }
    let table = read_table(texts, &cnclip_schemas::texts(), "`texts` table")?;
    let image_ids = table.column_by_name(IMAGE_IDS).expect("checked by the schema").as_list::<i64>();
    let offsets = image_ids.value_offsets();
    Ok((offsets[offsets.len() - 1] - offsets[0]) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{ArrayRef, Int64Array, Int64Builder, ListBuilder, StringArray};
    use std::sync::Arc;

    fn write(path: &Path, batch: RecordBatch) {
        let file = std::fs::File::create(path).unwrap();
        let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
    }

    /// A TSV of two images (ids 9 and 4), its locations, and texts naming `image_ids`.
    fn corpus(dir: &Path, image_ids: Vec<Vec<i64>>) -> (PathBuf, PathBuf, PathBuf) {
        let tsv = dir.join("train_imgs.tsv");
        // Image 9's field over-padded (`aGk==`): build-lmdb stores it as `aGk=`, which decodes.
        std::fs::write(&tsv, "9\taGk==\n4\tYQ\n").unwrap();
        let int = |v: Vec<i64>| Arc::new(Int64Array::from(v)) as ArrayRef;
        let locations = dir.join("locations.parquet");
        let columns = vec![int(vec![0, 0]), int(vec![9, 4]), int(vec![2, 10]), int(vec![5, 2])];
        write(&locations, RecordBatch::try_new(locations_schema(), columns).unwrap());
        let arrow::datatypes::DataType::List(item) =
            cnclip_schemas::texts().field_with_name(IMAGE_IDS).unwrap().data_type().clone()
        else {
            panic!("image_ids is a list")
        };
        let mut lists = ListBuilder::new(Int64Builder::new()).with_field(item);
        let n = image_ids.len();
        for ids in image_ids {
            lists.append_value(ids.into_iter().map(Some));
        }
        let texts = dir.join("texts.parquet");
        let columns = vec![
            int((0..n as i64).map(|t| 100 + t).collect()),
            Arc::new(StringArray::from_iter_values((0..n).map(|t| format!("text {t}")))) as ArrayRef,
            Arc::new(lists.finish()) as ArrayRef,
        ];
        write(&texts, RecordBatch::try_new(cnclip_schemas::texts(), columns).unwrap());
        (tsv, locations, texts)
    }

    #[test]
    fn pairs_come_in_build_lmdb_order_with_their_images_read_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let (tsv, locations, texts) = corpus(dir.path(), vec![vec![4, 9], vec![9]]);
        assert_eq!(pairs_in(&texts).unwrap(), 3);
        let corpus = Pairs::tsv(vec![tsv], &locations, &texts).unwrap();
        let samples = corpus.fetch(&[0, 1, 2]).unwrap();
        let seen: Vec<_> = samples.iter().map(|s| (s.id, s.text_id, s.text.as_str(), s.image.to_vec())).collect();
        assert_eq!(
            seen,
            [(4, 100, "text 0", b"a".to_vec()), (9, 100, "text 0", b"hi".to_vec()), (9, 101, "text 1", b"hi".to_vec())]
        );
        assert_eq!(corpus.spans(), &[(0, 3)]);
    }

    #[test]
    fn a_text_naming_a_missing_image_or_a_changed_file_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let (tsv, locations, texts) = corpus(dir.path(), vec![vec![4, 7]]);
        let error = Pairs::tsv(vec![tsv.clone()], &locations, &texts).err().expect("refused").to_string();
        assert!(error.contains("texts.parquet") && error.contains("names image 7"), "{error}");
        // The TSV cut short under its index: the pair's read fails naming the file and image.
        let (tsv, locations, texts) = corpus(dir.path(), vec![vec![4]]);
        std::fs::write(&tsv, "9\taGk=\n").unwrap();
        let corpus = Pairs::tsv(vec![tsv], &locations, &texts).unwrap();
        let error = corpus.fetch(&[0]).err().expect("refused").to_string();
        assert!(error.contains("train_imgs.tsv image 4") && error.contains("was the file changed"), "{error}");
    }

    #[test]
    fn images_tables_are_read_by_id_and_a_repeated_id_reads_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let (_, _, texts) = corpus(dir.path(), vec![vec![4, 9], vec![9]]);
        let int = |v: Vec<i64>| Arc::new(Int64Array::from(v)) as ArrayRef;
        let images = |ids: Vec<i64>| {
            let name: Vec<String> = ids.iter().map(i64::to_string).collect();
            let path = dir.path().join(format!("images-{}.parquet", name.join("-")));
            let bytes = arrow::array::BinaryArray::from(vec![&b"hi"[..], b"a"]);
            write(&path, RecordBatch::try_new(cnclip_schemas::images(), vec![int(ids), Arc::new(bytes)]).unwrap());
            path
        };
        let corpus = Pairs::tables(vec![images(vec![9, 4])], &texts).unwrap();
        let seen: Vec<_> = corpus.fetch(&[2, 0, 1]).unwrap().into_iter().map(|s| (s.id, s.text_id, s.image)).collect();
        assert_eq!(seen, [(9, 101, "hi".into()), (4, 100, "a".into()), (9, 100, "hi".into())]);
        // A pairs table: a pair a row, its columns found by name (here in another order).
        let pairs = dir.path().join("pairs.parquet");
        let text = Arc::new(StringArray::from(vec!["x"])) as ArrayRef;
        let batch = RecordBatch::try_new(cnclip_schemas::pairs(), vec![int(vec![4]), int(vec![7]), text]).unwrap();
        write(&pairs, batch.project(&[2, 1, 0]).unwrap());
        assert_eq!(pairs_in(&pairs).unwrap(), 1);
        let corpus = Pairs::tables(vec![images(vec![9, 4])], &pairs).unwrap();
        let sample = corpus.fetch(&[0]).unwrap().pop().unwrap();
        assert_eq!(
            (sample.id, sample.text_id, sample.text.as_str(), sample.image.to_vec()),
            (4, 7, "x", b"a".to_vec())
        );
        // A repeated image id: the first row is read (as export keeps it), the others listed.
        let repeated = images(vec![4, 4]);
        let corpus = Pairs::tables(vec![repeated.clone()], &pairs).unwrap();
        assert_eq!(corpus.fetch(&[0]).unwrap()[0].image.to_vec(), b"hi".to_vec());
        let listed = repeated_images(vec![repeated]).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(
            (listed[0].id.as_deref(), listed[0].reason.as_str()),
            (Some("4"), "duplicate image id (the first one is kept)")
        );
    }
}
