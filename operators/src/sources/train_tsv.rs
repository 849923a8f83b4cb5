//! cn_clip's own layout — `{split}_imgs.tsv` (`image_id<TAB>base64` lines) and
//! `{split}_texts.jsonl` — as a corpus `train_shards` reads in place, not serialized into an LMDB
//! first. Two small tables made once before training stand for the files:
//!
//! - the images' `locations` (the `tsv` source's `table = "locations"`): where each good line's
//!   base64 field lies; a sample's image is one ranged read of it, decoded as cn_clip's
//!   `LMDBDataset` decodes the value `build_lmdb_dataset.py` stores;
//! - the texts kept (a `texts` table: the `jsonl` source, repeated text ids quarantined, then
//!   `require_images`, which drops and quarantines references to images the TSV lacks).
//!
//! Sample `i` is the `i`-th pair `build-lmdb` would write: texts in file order, each text's
//! `image_ids` in order — the same `pairs` keys, so the sampler's order is the LMDB split's
//! and a run trains exactly as on it. For the stream order (`--shuffle-buffer`) the pairs are
//! cut into blocks of [`BLOCK`] that stand for shards: the blocks come in an order drawn per
//! epoch, each through the shuffle buffer (a pair's image is a ranged read either way).
//!
//! Memory: 24 bytes an image and 16 a pair, plus the texts.

use std::path::{Path, PathBuf};

use arrow::array::{Array, AsArray, RecordBatch, StringArray};
use arrow::datatypes::{Int64Type, SchemaRef};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::train_shards::{Corpus, Sample, SequentialRead, in_lanes};
use super::tsv::{location_columns, locations_schema};
use crate::decoders::base64;
use crate::error::{Error, Result, io};
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

/// The TSV files, where their images lie, and the pairs.
pub(crate) struct TsvPairs {
    files: Vec<PathBuf>,
    /// Sorted by id.
    ids: Vec<i64>,
    places: Vec<Place>,
    /// Per pair: its image's place in `ids`, and its text's row.
    pairs: Vec<(u32, u32)>,
    text_ids: Vec<i64>,
    texts: StringArray,
    spans: Vec<(usize, usize)>,
}

/// A Parquet table read whole, checked against the columns `expected` names.
fn read_table(path: &Path, expected: &SchemaRef, what: &str) -> Result<RecordBatch> {
    let bad = |reason: String| Error::Format { path: path.display().to_string(), reason };
    let parquet_err = |e: parquet::errors::ParquetError| bad(format!("not a readable Parquet file: {e}"));
    let reader = ParquetRecordBatchReaderBuilder::try_new(storage::open_chunks(path).map_err(io(path))?)
        .map_err(parquet_err)?
        .build()
        .map_err(parquet_err)?;
    let batches = reader.collect::<std::result::Result<Vec<_>, _>>().map_err(|e| bad(e.to_string()))?;
    let table = arrow::compute::concat_batches(expected, &batches).map_err(|e| bad(format!("not a {what} ({e})")))?;
    if let Some(field) =
        expected.fields().iter().zip(table.columns()).find_map(|(f, c)| (c.null_count() > 0).then_some(f))
    {
        return Err(bad(format!("`{}` has null values", field.name())));
    }
    Ok(table)
}

impl TsvPairs {
    /// The corpus of `files` (the TSV image files, in the order the `locations` table numbers
    /// them), their `locations` table and the `texts` table kept.
    ///
    /// # Errors
    /// A table that cannot be read or is not what it should be, a place past an `int64` or
    /// longer than a record may be, or a text naming an image the locations lack, naming it.
    pub(crate) fn open(files: Vec<PathBuf>, locations: &Path, texts: &Path) -> Result<TsvPairs> {
        let bad = |path: &Path, reason: String| Error::Format { path: path.display().to_string(), reason };
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
                return Err(bad(locations, format!("row {i} has an impossible place (file {f}, {o}+{l})")));
            }
            if ids.last() == Some(&id.value(i)) {
                return Err(bad(locations, format!("image {} is listed twice", id.value(i))));
            }
            ids.push(id.value(i));
            places.push(Place { file: f as u32, offset: o as u64, len: l as u32 });
        }
        let table = read_table(texts, &cnclip_schemas::texts(), "`texts` table")?;
        let text_ids = table.column_by_name(TEXT_ID).expect("checked").as_primitive::<Int64Type>().values().to_vec();
        let image_ids = table.column_by_name(IMAGE_IDS).expect("checked").as_list::<i32>();
        let mut pairs = Vec::new();
        for (row, text_id) in text_ids.iter().enumerate() {
            for image_id in image_ids.value(row).as_primitive::<Int64Type>().values() {
                let at = ids.binary_search(image_id).map_err(|_| {
                    bad(texts, format!("text {text_id} names image {image_id}, which the TSV does not hold"))
                })?;
                pairs.push((at as u32, row as u32));
            }
        }
        let texts = table.column_by_name(TEXT).expect("checked").as_string::<i32>().clone();
        let spans = (0..pairs.len()).step_by(BLOCK).map(|start| (start, BLOCK.min(pairs.len() - start))).collect();
        Ok(TsvPairs { files, ids, places, pairs, text_ids, texts, spans })
    }

    /// Pair `i`: its image read where the index says and decoded from base64.
    fn sample(&self, i: usize) -> Result<Sample> {
        let (image, text) = self.pairs[i];
        let (image_id, place) = (self.ids[image as usize], self.places[image as usize]);
        let path = &self.files[place.file as usize];
        let failed = |reason: String| Error::Record {
            location: format!("{} image {image_id} (pair {i})", path.display()),
            reason,
        };
        let field = storage::read_range(path, place.offset..place.offset + place.len as u64).map_err(|e| {
            failed(format!("its line cannot be read at the offset the index gives ({e}): was the file changed?"))
        })?;
        let image = base64::decode(&field).map_err(|e| failed(format!("its base64 field does not decode ({e})")))?;
        Ok(Sample {
            image: image.into(),
            text: self.texts.value(text as usize).to_string(),
            key: image_id.to_string(),
            id: image_id,
            text_id: self.text_ids[text as usize],
        })
    }
}

impl Corpus for TsvPairs {
    fn len(&self) -> usize {
        self.pairs.len()
    }

    fn spans(&self) -> &[(usize, usize)] {
        &self.spans
    }

    fn fetch(&self, chunk: &[usize]) -> Result<Vec<Sample>> {
        in_lanes(chunk, FETCHERS, |&i| self.sample(i)).into_iter().collect()
    }

    fn sequential(&self) -> Box<dyn SequentialRead + '_> {
        Box::new(Ranged(self))
    }
}

/// A pair's image is a ranged read in a stream too: images are not in pair order in the TSV.
struct Ranged<'a>(&'a TsvPairs);

impl SequentialRead for Ranged<'_> {
    fn read(&mut self, sample: usize) -> Result<Sample> {
        self.0.sample(sample)
    }
}

/// The pairs a `texts` table holds (the sum of its `image_ids` lengths): the samples of a TSV
/// corpus, counted before training as an LMDB's `num_samples` is read.
///
/// # Errors
/// The table cannot be read or is not a `texts` table.
pub fn pairs_in(texts: &Path) -> Result<usize> {
    let table = read_table(texts, &cnclip_schemas::texts(), "`texts` table")?;
    let image_ids = table.column_by_name(IMAGE_IDS).expect("checked by the schema").as_list::<i32>();
    let offsets = image_ids.value_offsets();
    Ok((offsets[offsets.len() - 1] - offsets[0]) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{ArrayRef, Int64Array, Int64Builder, ListBuilder};
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
        std::fs::write(&tsv, "9\taGk=\n4\tYQ\n").unwrap();
        let int = |v: Vec<i64>| Arc::new(Int64Array::from(v)) as ArrayRef;
        let locations = dir.join("locations.parquet");
        let columns = vec![int(vec![0, 0]), int(vec![9, 4]), int(vec![2, 9]), int(vec![4, 2])];
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
        let corpus = TsvPairs::open(vec![tsv], &locations, &texts).unwrap();
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
        let error = TsvPairs::open(vec![tsv.clone()], &locations, &texts).err().expect("refused").to_string();
        assert!(error.contains("texts.parquet") && error.contains("names image 7"), "{error}");
        // The TSV cut short under its index: the pair's read fails naming the file and image.
        let (tsv, locations, texts) = corpus(dir.path(), vec![vec![4]]);
        std::fs::write(&tsv, "9\taGk=\n").unwrap();
        let corpus = TsvPairs::open(vec![tsv], &locations, &texts).unwrap();
        let error = corpus.fetch(&[0]).err().expect("refused").to_string();
        assert!(error.contains("train_imgs.tsv image 4") && error.contains("was the file changed"), "{error}");
    }
}
