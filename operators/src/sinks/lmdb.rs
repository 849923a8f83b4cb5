//! cn_clip's LMDB databases (default database, plain byte keys and values), readable by
//! cn_clip's `LMDBDataset` / `EvalImgDataset`, py-lmdb and lmdb-rkv.
//!
//! [`LmdbWriter`] writes them with one of two writers ([`LmdbWriterKind`]): by default the
//! bulk loader in [`super::lmdb_bulk`] rather than LMDB transactions (a value is copied once
//! into its page image and written by background threads, the file is synced once at the end
//! and checked by walking it back), or LMDB's own write transactions ([`super::lmdb_txn`],
//! `--writer txn`). Either way the keys and values are the same, and the map size recorded is
//! about twice the file, not `build_lmdb_dataset.py`'s fixed 1 TiB (cn_clip #281: sparse files
//! that some filesystems refuse).

use std::path::{Path, PathBuf};

use super::Sink;
use super::lmdb_bulk::BulkWriter;
use super::lmdb_txn::TxnWriter;
use crate::error::{Error, Result};
use crate::sources::lmdb::Database;
use crate::spec::{BuildContext, NodeConfig, Operator, Role, SinkSpec};
use crate::storage;
use arrow::datatypes::SchemaRef;
use schemars::JsonSchema;
use serde::Deserialize;

/// Which writer builds an LMDB database (`--writer`, `writer = "…"`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize, serde::Serialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum LmdbWriterKind {
    /// The bulk loader: writes LMDB's file format directly, each value copied once; the file is
    /// walked back and checked.
    #[default]
    Bulk,
    /// LMDB's own write transactions, as cn_clip's script writes (every page laid out by LMDB).
    Txn,
}

/// Writes one LMDB environment (`data.mdb` + `lock.mdb`) into a directory, with the writer
/// chosen at [`create`](Self::create). Keys must be unique: a repeated one fails the job naming it.
pub struct LmdbWriter(Writer);

enum Writer {
    Bulk(Box<BulkWriter>),
    Txn(TxnWriter),
}

impl LmdbWriter {
    /// Creates the LMDB directory `path` (replacing a database there), written by `kind`.
    ///
    /// # Errors
    /// IO or LMDB errors naming `path`.
    pub fn create(path: &Path, kind: LmdbWriterKind) -> Result<Self> {
        Ok(LmdbWriter(match kind {
            LmdbWriterKind::Bulk => Writer::Bulk(Box::new(BulkWriter::create(path)?)),
            LmdbWriterKind::Txn => Writer::Txn(TxnWriter::create(path)?),
        }))
    }

    /// Caps what the writer holds in memory at about `bytes` (default 64–80 MiB), for jobs that
    /// keep many writers open at once (`build-lmdb --shards N`). At least 2 MiB.
    pub fn with_memory(self, bytes: usize) -> Self {
        LmdbWriter(match self.0 {
            Writer::Bulk(w) => Writer::Bulk(Box::new(w.with_memory(bytes))),
            Writer::Txn(w) => Writer::Txn(w.with_memory(bytes)),
        })
    }

    /// Stores `value` under `key`.
    ///
    /// # Errors
    /// A key over 511 bytes or empty, a value of 4 GiB or more, a repeated key (here or at
    /// [`finish`](Self::finish)), IO or LMDB errors.
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        match &mut self.0 {
            Writer::Bulk(w) => w.put(key, value),
            Writer::Txn(w) => w.put(key, value),
        }
    }

    /// Completes the database and syncs it to disk.
    ///
    /// # Errors
    /// A repeated key (named), a bulk-loaded file that fails its check
    /// ([`Error::LmdbCheck`]), IO or LMDB errors.
    pub fn finish(self) -> Result<()> {
        match self.0 {
            Writer::Bulk(w) => w.finish(),
            Writer::Txn(w) => w.finish(),
        }
    }
}

/// A base64 image value as cn_clip's readers take it: `base64.urlsafe_b64decode` accepts both
/// alphabets but refuses a value whose `=` padding is missing or short ("Incorrect padding"),
/// which TSVs in the wild carry (cnclip's own decoder accepts them). So the padding is made
/// whole; a value that already is comes back as it was, unchanged.
pub fn cn_clip_base64(value: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    let body = value.strip_suffix(b"==").or_else(|| value.strip_suffix(b"=")).unwrap_or(value);
    let padded = body.len().div_ceil(4) * 4;
    if padded == value.len() {
        return std::borrow::Cow::Borrowed(value);
    }
    let mut fixed = Vec::with_capacity(padded);
    fixed.extend_from_slice(body);
    fixed.resize(padded, b'=');
    std::borrow::Cow::Owned(fixed)
}

/// `pickle.dumps((image_id, text_id, text))` as Python 3.8+ writes it (protocol 4, framed),
/// byte for byte, for the values of cn_clip's `pairs` database.
pub fn pickle_pair(image_id: i64, text_id: i64, text: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(text.len() + 32);
    pickle_int(&mut body, image_id);
    pickle_int(&mut body, text_id);
    if text.len() < 256 {
        body.push(0x8c); // SHORT_BINUNICODE
        body.push(text.len() as u8);
    } else {
        body.push(b'X'); // BINUNICODE
        body.extend_from_slice(&(text.len() as u32).to_le_bytes());
    }
    body.extend_from_slice(text.as_bytes());
    body.push(0x94); // MEMOIZE
    body.push(0x87); // TUPLE3
    body.push(0x94); // MEMOIZE
    body.push(b'.'); // STOP
    let mut out = Vec::with_capacity(body.len() + 11);
    out.extend_from_slice(&[0x80, 4]); // PROTO 4
    out.push(0x95); // FRAME
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

fn pickle_int(out: &mut Vec<u8>, v: i64) {
    if (0..256).contains(&v) {
        out.extend_from_slice(&[b'K', v as u8]);
    } else if (0..65536).contains(&v) {
        out.push(b'M');
        out.extend_from_slice(&(v as u16).to_le_bytes());
    } else if let Ok(small) = i32::try_from(v) {
        out.push(b'J');
        out.extend_from_slice(&small.to_le_bytes());
    } else {
        // LONG1: minimal little-endian two's complement.
        let bytes = v.to_le_bytes();
        let mut n = 8;
        while n > 1
            && ((bytes[n - 1] == 0 && bytes[n - 2] & 0x80 == 0) || (bytes[n - 1] == 0xff && bytes[n - 2] & 0x80 != 0))
        {
            n -= 1;
        }
        out.extend_from_slice(&[0x8a, n as u8]);
        out.extend_from_slice(&bytes[..n]);
    }
}

/// One database of a cn_clip LMDB split as a pipeline sink: `imgs` from `images` (encoded to
/// URL-safe base64, as cn_clip's TSVs hold them) or `images_base64` (stored as they are, but
/// with whole `=` padding: [`cn_clip_base64`]), or
/// `pairs` from a `pairs` table or a `texts` table (one pair per image id, in order). The count
/// key (`num_images` / `num_samples`) is written at the end; the database is built in a
/// temporary directory and renamed into place.
///
/// Split into `shards` (build-lmdb's `--shards`, cn_clip #46), a row goes to shard
/// `image_id mod shards`, each shard a self-contained database (a pair lives with its image,
/// numbered from 0 within its shard) at `shard_NNN/NAME` beside `path`'s `NAME`
/// (`lmdb/train/imgs` → `lmdb/train/shard_000/imgs`, …); the shards are built in one temporary
/// directory and moved into place together.
pub struct LmdbSink {
    /// One writer per shard (taken when finished).
    writers: Vec<LmdbWriter>,
    counts: Vec<u64>,
    database: Database,
    path: PathBuf,
    tmp: PathBuf,
    finished: bool,
    scratch: String,
}

/// What one LMDB writer may hold (its default), and all the writers of a split together.
const WRITER_MEMORY: usize = 80 << 20;
const SPLIT_MEMORY: usize = 256 << 20;

/// The memory budget of each writer of a split written `shards` ways, its `imgs` and `pairs`
/// databases open at once (`build-lmdb --shards`, or two `write_lmdb` sinks).
pub fn writer_memory(shards: usize) -> usize {
    (SPLIT_MEMORY / (2 * shards.max(1))).min(WRITER_MEMORY)
}

/// Where shard `shard` of the database `name` goes under the split's directory `dir`.
fn shard_path(dir: &Path, shard: usize, name: &std::ffi::OsStr) -> PathBuf {
    dir.join(format!("shard_{shard:03}")).join(name)
}

impl LmdbSink {
    /// Checks that batches of `schema` can go into `database`.
    ///
    /// # Errors
    /// Which columns are missing.
    pub fn accepts(schema: &arrow::datatypes::Schema, database: Database) -> Result<(), crate::transforms::InputError> {
        use crate::transforms::{InputError, require};
        use arrow::datatypes::DataType;
        use cnclip_schemas::columns::*;
        match database {
            Database::Imgs => {
                require(schema, IMAGE_ID, &DataType::Int64)?;
                require(schema, IMAGE, &DataType::Binary)
                    .or_else(|_| require(schema, IMAGE_BASE64, &DataType::Binary))
                    .map(|_| ())
            }
            Database::Pairs => {
                require(schema, TEXT_ID, &DataType::Int64)?;
                require(schema, TEXT, &DataType::Utf8)?;
                match require(schema, IMAGE_ID, &DataType::Int64) {
                    Ok(_) => Ok(()),
                    Err(_) => cnclip_schemas::check("texts", &cnclip_schemas::texts(), schema).map_err(|_| {
                        InputError::Mismatch(format!(
                            "needs `{IMAGE_ID}` (a pairs table) or `{IMAGE_IDS}` (a texts table)"
                        ))
                    }),
                }
            }
        }
    }

    /// Starts `path` (e.g. `lmdb/train/imgs`), written by `writer`.
    ///
    /// # Errors
    /// IO or LMDB errors creating the temporary database.
    /// Creates the sink of `database` at `path` (one database) or, with `shards` > 1, of
    /// `shards` databases beside it (see [`LmdbSink`]).
    ///
    /// # Errors
    /// IO or LMDB errors naming the path.
    pub fn create(path: &Path, database: Database, writer: LmdbWriterKind, shards: usize) -> Result<Self> {
        super::create_parent(path)?;
        let shards = shards.max(1);
        let tmp = if shards == 1 {
            super::tmp_path(path)
        } else {
            let mut name = std::ffi::OsString::from("shards-");
            name.push(path.file_name().unwrap_or_default());
            super::tmp_path(&path.with_file_name(name))
        };
        let _ = storage::remove_dir_all(&tmp);
        let memory = writer_memory(shards);
        let mut sink = LmdbSink {
            writers: Vec::with_capacity(shards),
            counts: vec![0; shards],
            database,
            path: path.to_path_buf(),
            tmp: tmp.clone(),
            finished: false,
            scratch: String::new(),
        };
        for shard in 0..shards {
            let at =
                if shards == 1 { tmp.clone() } else { shard_path(&tmp, shard, path.file_name().unwrap_or_default()) };
            sink.writers.push(LmdbWriter::create(&at, writer)?.with_memory(memory));
        }
        Ok(sink)
    }

    /// The shard of `image_id`.
    fn shard_of(&self, image_id: i64) -> usize {
        image_id.rem_euclid(self.writers.len() as i64) as usize
    }
}

impl super::Sink for LmdbSink {
    fn write(&mut self, batch: &arrow::record_batch::RecordBatch) -> Result<()> {
        use arrow::array::{Array, BinaryArray, Int64Array, ListArray, StringArray};
        use base64::Engine;
        use cnclip_schemas::columns::*;
        let column = |name: &str| batch.schema().index_of(name).ok().map(|i| batch.column(i).clone());
        let internal = |what: &str| Error::Internal(format!("LMDB sink: {what}"));
        match self.database {
            Database::Imgs => {
                let ids = column(IMAGE_ID).ok_or_else(|| internal("no image_id"))?;
                let ids = ids.as_any().downcast_ref::<Int64Array>().ok_or_else(|| internal("image_id type"))?;
                let (values, encoded) = match column(IMAGE) {
                    Some(values) => (values, false),
                    None => (column(IMAGE_BASE64).ok_or_else(|| internal("no image column"))?, true),
                };
                let values = values.as_any().downcast_ref::<BinaryArray>().ok_or_else(|| internal("image type"))?;
                for row in 0..batch.num_rows() {
                    let id = ids.value(row);
                    let shard = self.shard_of(id);
                    let key = id.to_string();
                    if encoded {
                        self.writers[shard].put(key.as_bytes(), &cn_clip_base64(values.value(row)))?;
                    } else {
                        self.scratch.clear();
                        base64::engine::general_purpose::URL_SAFE.encode_string(values.value(row), &mut self.scratch);
                        self.writers[shard].put(key.as_bytes(), self.scratch.as_bytes())?;
                    }
                    self.counts[shard] += 1;
                }
            }
            Database::Pairs => {
                let text_ids = column(TEXT_ID).ok_or_else(|| internal("no text_id"))?;
                let text_ids =
                    text_ids.as_any().downcast_ref::<Int64Array>().ok_or_else(|| internal("text_id type"))?;
                let texts = column(TEXT).ok_or_else(|| internal("no text"))?;
                let texts = texts.as_any().downcast_ref::<StringArray>().ok_or_else(|| internal("text type"))?;
                let image_id = column(IMAGE_ID);
                let image_ids = column(IMAGE_IDS);
                for row in 0..batch.num_rows() {
                    let ids: Vec<i64> = match (&image_id, &image_ids) {
                        (Some(id), _) => vec![
                            id.as_any()
                                .downcast_ref::<Int64Array>()
                                .ok_or_else(|| internal("image_id type"))?
                                .value(row),
                        ],
                        (None, Some(list)) => {
                            let list = list
                                .as_any()
                                .downcast_ref::<ListArray>()
                                .ok_or_else(|| internal("image_ids type"))?
                                .value(row);
                            list.as_any()
                                .downcast_ref::<Int64Array>()
                                .ok_or_else(|| internal("image_ids items"))?
                                .values()
                                .to_vec()
                        }
                        _ => return Err(internal("no image ids")),
                    };
                    for id in ids {
                        let shard = self.shard_of(id);
                        self.writers[shard].put(
                            self.counts[shard].to_string().as_bytes(),
                            &pickle_pair(id, text_ids.value(row), texts.value(row)),
                        )?;
                        self.counts[shard] += 1;
                    }
                }
            }
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<(super::Written, super::Staged)> {
        let key: &[u8] = match self.database {
            Database::Imgs => b"num_images",
            Database::Pairs => b"num_samples",
        };
        let shards = self.writers.len();
        for (mut writer, count) in std::mem::take(&mut self.writers).into_iter().zip(&self.counts) {
            writer.put(key, count.to_string().as_bytes())?;
            writer.finish()?;
        }
        let rows = self.counts.iter().sum();
        // With shards, the split's directory holds them.
        let shown = match shards {
            1 => self.path.clone(),
            _ => self.path.parent().map(Path::to_path_buf).unwrap_or_default(),
        };
        let written = super::Written { rows, path: shown };
        // From here the staged output removes what is left if it is not committed.
        self.finished = true;
        if shards == 1 {
            return Ok((written, super::Staged::new(self.tmp.clone(), self.path.clone())));
        }
        // Each shard's database into its place, `shard_NNN/NAME` beside `path`, one after the
        // other (a job that needs the set to appear at once stages the directory holding them,
        // as build-lmdb stages its split); a database of a shard past `shards` that an earlier
        // run left is removed, so the directory holds one set.
        let (tmp, path) = (self.tmp.clone(), self.path.clone());
        let publish = move |_: &super::Committed| -> Result<()> {
            let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
            let name = path.file_name().unwrap_or_default();
            let moved = (|| -> Result<()> {
                for shard in 0..shards {
                    let (from, to) = (shard_path(&tmp, shard, name), shard_path(&dir, shard, name));
                    super::create_parent(&to)?;
                    if to.is_dir() {
                        storage::remove_dir_all(&to).map_err(crate::error::io(&to))?;
                    }
                    storage::rename(&from, &to).map_err(crate::error::io(&to))?;
                }
                let mut stale = shards;
                while shard_path(&dir, stale, name).is_dir() {
                    let old = shard_path(&dir, stale, name);
                    storage::remove_dir_all(&old).map_err(crate::error::io(&old))?;
                    stale += 1;
                }
                Ok(())
            })();
            // What is left of the temporary directory goes, whatever happened.
            let _ = storage::remove_dir_all(&tmp);
            moved
        };
        Ok((written, super::Staged::with_publish(self.tmp.clone(), self.path.clone(), publish)))
    }
}

impl Drop for LmdbSink {
    fn drop(&mut self) {
        if !self.finished {
            self.writers.clear();
            let _ = storage::remove_dir_all(&self.tmp);
        }
    }
}

/// images → cn_clip's `imgs` LMDB database, or pairs or texts → its `pairs` database.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WriteLmdbConfig {
    /// The database's directory, as `lmdb/train/imgs`.
    pub path: PathBuf,
    /// Which of cn_clip's databases it is.
    pub database: Database,
    /// Which writer builds it.
    #[serde(default)]
    pub writer: LmdbWriterKind,
    /// Databases to split it into by `image_id mod shards` (`shard_000/NAME` … beside `path`).
    ///
    /// Each shard is self-contained, a pair with its image (`build-lmdb --shards`).
    #[serde(default = "one")]
    pub shards: usize,
}

fn one() -> usize {
    1
}

impl NodeConfig for WriteLmdbConfig {
    const KIND: &'static str = "write_lmdb";
    const ROLE: Role = Role::Sink;
    fn build(self, cx: &BuildContext) -> Result<Operator, Vec<String>> {
        if self.shards == 0 {
            return Err(vec!["`shards` must be at least 1".into()]);
        }
        Ok(Operator::Sink(Box::new(WriteLmdbConfig { path: cx.resolve(&self.path), ..self })))
    }
}

impl SinkSpec for WriteLmdbConfig {
    fn path(&self) -> &Path {
        &self.path
    }
    fn accepts(&self, schema: &SchemaRef) -> Result<(), Vec<String>> {
        LmdbSink::accepts(schema, self.database).map_err(|e| vec![e.to_string()])
    }
    fn open(&self, _: &SchemaRef) -> Result<Box<dyn Sink>> {
        Ok(Box::new(LmdbSink::create(&self.path, self.database, self.writer, self.shards)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn base64_padding_is_made_whole_and_nothing_else_changes() {
        for (value, expected) in [
            ("aGVsbG8=", "aGVsbG8="),
            ("aGVsbG8", "aGVsbG8="),
            ("aGk", "aGk="),
            ("aQ", "aQ=="),
            ("aQ=", "aQ=="),
            ("aGk==", "aGk="),
            ("a-_b", "a-_b"),
            ("", ""),
        ] {
            assert_eq!(std::str::from_utf8(&cn_clip_base64(value.as_bytes())).unwrap(), expected, "{value}");
        }
        assert!(matches!(cn_clip_base64(b"aGVsbG8="), std::borrow::Cow::Borrowed(_)));
    }

    /// Expected bytes are Python 3.11's `pickle.dumps((image_id, text_id, text)).hex()`.
    #[test]
    fn pairs_pickle_exactly_as_python() {
        assert_eq!(hex(&pickle_pair(0, 255, "")), "8004950a000000000000004b004bff8c009487942e");
        assert_eq!(hex(&pickle_pair(-1, -129, "x")), "80049511000000000000004affffffff4a7fffffff8c01789487942e");
        assert_eq!(
            hex(&pickle_pair(1 << 31, -(1 << 40), "é")),
            "80049517000000000000008a0500000080008a060000000000ff8c02c3a99487942e"
        );
        let long = pickle_pair(256, 65536, &"a".repeat(300));
        assert_eq!(hex(&long[..24]), "8004953d010000000000004d00014a00000100582c010000");
        assert_eq!(long.len(), 11 + 0x13d);
    }

    /// The map size recorded covers the file, so LMDB opens a database bigger than its default
    /// 10 MiB map without being told a size, whichever writer wrote it.
    #[test]
    fn a_database_over_the_default_map_size_opens_with_default_settings() {
        use lmdb::Transaction;
        for kind in [LmdbWriterKind::Bulk, LmdbWriterKind::Txn] {
            let dir = tempfile::tempdir().unwrap();
            let mut writer = LmdbWriter::create(dir.path(), kind).unwrap();
            let value = vec![7u8; 1 << 20];
            for i in 0..150u32 {
                writer.put(i.to_string().as_bytes(), &value).unwrap();
            }
            writer.finish().unwrap();
            let env = lmdb::Environment::new().open(dir.path()).unwrap();
            let db = env.open_db(None).unwrap();
            let txn = env.begin_ro_txn().unwrap();
            assert_eq!(txn.get(db, b"149").unwrap().len(), 1 << 20, "{kind:?}");
        }
    }

    /// Both writers store the same entries for the same puts (in any order, with a small memory
    /// budget: spilled runs, many commits), and both stop at a repeated key naming it.
    #[test]
    fn both_writers_store_the_same_entries() {
        use lmdb::{Cursor, Transaction};
        let read_all = |dir: &Path| -> Vec<(Vec<u8>, Vec<u8>)> {
            let env = lmdb::Environment::new().set_flags(lmdb::EnvironmentFlags::READ_ONLY).open(dir).unwrap();
            let db = env.open_db(None).unwrap();
            let txn = env.begin_ro_txn().unwrap();
            let mut cursor = txn.open_ro_cursor(db).unwrap();
            cursor.iter_start().map(|r| r.unwrap()).map(|(k, v)| (k.to_vec(), v.to_vec())).collect()
        };
        let entries: Vec<(Vec<u8>, Vec<u8>)> = (0..4000u32)
            .map(|i| {
                (
                    format!("{}", (i * 7919) % 4000).into_bytes(),
                    pickle_pair(i as i64, -(i as i64), &"图".repeat(i as usize % 900)),
                )
            })
            .collect();
        let mut read = Vec::new();
        for kind in [LmdbWriterKind::Bulk, LmdbWriterKind::Txn] {
            let dir = tempfile::tempdir().unwrap();
            let mut writer = LmdbWriter::create(dir.path(), kind).unwrap().with_memory(2 << 20);
            for (k, v) in &entries {
                writer.put(k, v).unwrap();
            }
            writer.finish().unwrap();
            read.push(read_all(dir.path()));

            let mut writer = LmdbWriter::create(dir.path(), kind).unwrap();
            for key in [b"3", b"1", b"3"] {
                writer.put(key, b"x").unwrap();
            }
            let err = writer.finish().unwrap_err().to_string();
            assert!(err.contains("key 3 was put twice"), "{kind:?}: {err}");
        }
        let mut sorted = entries.clone();
        sorted.sort();
        assert_eq!(read[0], sorted);
        assert_eq!(read[1], sorted);
    }

    #[test]
    fn writer_kinds_are_named_in_lowercase() {
        use clap::ValueEnum;
        #[derive(serde::Deserialize)]
        struct Config {
            writer: LmdbWriterKind,
        }
        for (name, kind) in [("bulk", LmdbWriterKind::Bulk), ("txn", LmdbWriterKind::Txn)] {
            assert_eq!(LmdbWriterKind::from_str(name, false), Ok(kind));
            let config: Config = toml::from_str(&format!("writer = \"{name}\"")).unwrap();
            assert_eq!(config.writer, kind);
        }
        assert!(toml::from_str::<Config>("writer = \"Bulk\"").is_err());
        assert_eq!(LmdbWriterKind::default(), LmdbWriterKind::Bulk);
    }
}
