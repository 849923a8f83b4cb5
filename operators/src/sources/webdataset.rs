//! `webdataset`: WebDataset tar shards (as `webdataset`'s `TarWriter` and img2dataset write
//! them) as an `images` or a `texts` table, each row keeping its sample's string `key`.
//!
//! A sample is a run of consecutive members sharing a key: the member's path up to the first
//! `.` of its file name; the rest, lower-cased, is the member's extension (`jpg`, `txt`,
//! `json`, …), as `webdataset`'s `base_plus_ext` splits them. Members without a `.` and
//! `__…__` meta members are skipped, as there. cn_clip's tables need int64 ids, so a sample's
//! id is the number its key writes when the key is decimal digits (img2dataset's `000010023`,
//! cn_clip's ids as `write_webdataset` names samples: the same ids as the corpus's Parquet or
//! LMDB form), else `shard << 32 | sample`: the shard's position in the source's expanded path
//! list and the sample's position in its shard (every sample counts, quarantined or not). An
//! image row and a text row of one sample thus share their id, and the `key` column carries the
//! name a user joins back to their metadata with. `--shard i/n` splits by tar file.
//!
//! The tar stream is read here rather than through the `tar` crate's reader, which stops at the
//! first bad header: a header whose checksum fails is quarantined and the reader resumes at the
//! next block that is a valid header, so one damaged member costs one sample, not the rest of
//! the shard. (The `tar` crate still parses each header's fields.) A file cut short quarantines
//! the sample it cuts; the samples before it are kept.

use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, BinaryBuilder, Int64Builder, ListBuilder, StringBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use schemars::JsonSchema;
use serde::Deserialize;

use super::{BATCH_BYTES, Emit, ReadContext, Source};
use crate::error::{Error, Result, io};
use crate::quarantine::Rejected;
use crate::spec::{BuildContext, NodeConfig, Operator, Role};
use crate::storage;
use cnclip_schemas::columns::KEY;

/// Tar's block size.
const BLOCK: usize = 512;

/// Which table the samples become.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum WebDatasetTable {
    /// `image_id`, `image` (the image member's bytes), `key`.
    #[default]
    Images,
    /// `text_id`, `text` (the text member), `image_ids` (`[id]`), `key`.
    Texts,
    /// Where each sample's image and text members lie, their bytes not read: `shard`,
    /// `sample` (its place in the shard), `key`, `image_offset`, `image_len`, `text_offset`,
    /// `text_len` (see [`locations_schema`]). A sample without both is quarantined. Training
    /// reads shards through this index (`train_shards`).
    Locations,
}

/// The `locations` table's columns.
pub mod location_columns {
    pub const SHARD: &str = "shard";
    pub const SAMPLE: &str = "sample";
    pub const IMAGE_OFFSET: &str = "image_offset";
    pub const IMAGE_LEN: &str = "image_len";
    pub const TEXT_OFFSET: &str = "text_offset";
    pub const TEXT_LEN: &str = "text_len";
}

/// The `locations` table: a sample's shard (its place in the expanded list) and place in it, its
/// key, and the byte ranges of its image and text members in the shard.
pub fn locations_schema() -> SchemaRef {
    use location_columns::*;
    let int = |name: &str| Field::new(name, DataType::Int64, false);
    Arc::new(Schema::new(vec![
        int(SHARD),
        int(SAMPLE),
        Field::new(KEY, DataType::Utf8, false),
        int(IMAGE_OFFSET),
        int(IMAGE_LEN),
        int(TEXT_OFFSET),
        int(TEXT_LEN),
    ]))
}

/// WebDataset tar shards as a source.
pub struct WebDatasetSource {
    /// The shards, in order: a shard's position here is the high half of its samples' ids.
    pub paths: Vec<PathBuf>,
    pub table: WebDatasetTable,
    /// Image extensions, lower-case, in order of preference.
    pub image_extensions: Vec<String>,
    pub text_extension: String,
    /// A member bigger than this is not read; its sample is quarantined.
    pub max_record_bytes: usize,
}

impl WebDatasetSource {
    pub(crate) fn schema_of(table: WebDatasetTable) -> SchemaRef {
        let base = match table {
            WebDatasetTable::Images => cnclip_schemas::images(),
            WebDatasetTable::Texts => cnclip_schemas::texts(),
            WebDatasetTable::Locations => return locations_schema(),
        };
        let mut fields: Vec<Field> = base.fields().iter().map(|f| f.as_ref().clone()).collect();
        fields.push(Field::new(KEY, DataType::Utf8, false));
        Arc::new(Schema::new(fields))
    }

    /// The row this table takes from `sample`, or why it cannot (the quarantine's reason).
    fn row_of<'s>(&self, sample: &'s Sample) -> std::result::Result<Row<'s>, String> {
        if let Some(problem) = &sample.problem {
            return Err(problem.clone());
        }
        let no_image = || format!("no image member (.{})", self.image_extensions.join("/."));
        let no_text = || format!("no text member (.{})", self.text_extension);
        let missing = |what: String| {
            let why = sample.damage.as_ref().map(|damage| format!(": {damage} may have held it")).unwrap_or_default();
            format!("the sample has {what}{why}")
        };
        if self.table == WebDatasetTable::Locations {
            return match (self.image_of(sample), self.text_of(sample)) {
                (Some(image), Some(text)) => Ok(Row::Location { image, text }),
                (None, _) => Err(missing(no_image())),
                (_, None) => Err(missing(no_text())),
            };
        }
        let Some(member) = self.wanted(sample) else {
            let what = match self.table {
                WebDatasetTable::Images | WebDatasetTable::Locations => no_image(),
                WebDatasetTable::Texts => no_text(),
            };
            return Err(missing(what));
        };
        match self.table {
            WebDatasetTable::Images | WebDatasetTable::Locations => Ok(Row::Image(&member.data)),
            WebDatasetTable::Texts => std::str::from_utf8(&member.data)
                .map(Row::Text)
                .map_err(|e| format!("its .{} member is not UTF-8 ({e})", member.extension)),
        }
    }

    /// The member this table takes from a sample, among those it has.
    fn wanted<'s>(&self, sample: &'s Sample) -> Option<&'s Member> {
        match self.table {
            WebDatasetTable::Images | WebDatasetTable::Locations => self.image_of(sample),
            WebDatasetTable::Texts => self.text_of(sample),
        }
    }

    fn image_of<'s>(&self, sample: &'s Sample) -> Option<&'s Member> {
        self.image_extensions.iter().find_map(|ext| sample.members.iter().find(|m| &m.extension == ext))
    }

    fn text_of<'s>(&self, sample: &'s Sample) -> Option<&'s Member> {
        sample.members.iter().find(|m| m.extension == self.text_extension)
    }

    /// Whether this table reads a member's bytes (`locations` reads none).
    fn wants(&self, extension: &str) -> bool {
        match self.table {
            WebDatasetTable::Images => self.image_extensions.iter().any(|e| e == extension),
            WebDatasetTable::Texts => extension == self.text_extension,
            WebDatasetTable::Locations => false,
        }
    }
}

impl Source for WebDatasetSource {
    fn origin(&self) -> String {
        super::describe_paths(&self.paths)
    }

    fn estimated_records(&self) -> Option<u64> {
        None
    }

    fn schema(&self) -> SchemaRef {
        WebDatasetSource::schema_of(self.table)
    }

    fn read(self: Box<Self>, ctx: &ReadContext, emit: Emit<'_>) -> Result<()> {
        let mut batcher = Batcher::new(self.table, self.schema(), ctx.batch_rows);
        for (number, path) in self.paths.iter().enumerate() {
            if !ctx.shard.owns(number as u64) {
                continue;
            }
            let source = path.display().to_string();
            let mut samples = 0u64;
            read_shard(path, self.max_record_bytes, &|ext| self.wants(ext), |event| {
                if let Some(signal) = crate::signals::interrupted() {
                    return Err(Error::Interrupted { signal });
                }
                let reject = |id: Option<&str>, location: String, reason: String| Rejected {
                    source: source.clone(),
                    location,
                    id: id.map(str::to_string),
                    reason,
                };
                match event {
                    Event::Damage { offset, reason } => {
                        ctx.quarantine.reject(reject(None, format!("byte {offset}"), reason))
                    }
                    Event::Sample(sample) => {
                        let place = samples as i64;
                        let id = key_id(&sample.key).unwrap_or(((number as i64) << 32) | place);
                        samples += 1;
                        match self.row_of(&sample) {
                            Ok(Row::Image(image)) => batcher.push_image(id, image, &sample.key, emit),
                            Ok(Row::Text(text)) => batcher.push_text(id, text, &sample.key, emit),
                            Ok(Row::Location { image, text }) => {
                                let place = [number as i64, place];
                                let ranges = [image.offset, image.size, text.offset, text.size].map(|v| v as i64);
                                batcher.push_location(place, &sample.key, ranges, emit)
                            }
                            Err(reason) => {
                                let location = format!("sample {}", sample.key);
                                ctx.quarantine.reject(reject(Some(&sample.key), location, reason))
                            }
                        }
                    }
                }
            })?;
        }
        batcher.flush(emit)
    }
}

/// What a usable sample gives its table.
enum Row<'s> {
    Image(&'s [u8]),
    Text(&'s str),
    Location { image: &'s Member, text: &'s Member },
}

/// One member of a sample: its extension, where its bytes lie in the shard and, when the table
/// wants it, the bytes.
struct Member {
    extension: String,
    data: Vec<u8>,
    offset: u64,
    size: u64,
}

/// The members of one key, or why the sample cannot be used.
struct Sample {
    key: String,
    members: Vec<Member>,
    problem: Option<String>,
    /// A corrupt header next to this sample: the member it held may have been this sample's.
    damage: Option<String>,
}

impl Sample {
    fn new(key: &str) -> Self {
        Sample { key: key.to_string(), members: Vec::new(), problem: None, damage: None }
    }

    /// This sample, cut by the end of the file, as a quarantined one.
    fn cut(mut self, reason: String) -> Self {
        self.problem = Some(reason);
        self
    }
}

/// What reading a shard finds, in file order.
enum Event {
    Sample(Sample),
    /// Damage outside a sample's members: a header that fails its checksum (the reader resumed
    /// after it), or the file ending inside a header.
    Damage {
        offset: u64,
        reason: String,
    },
}

/// The id a string key stands for: the number a key of decimal digits writes (img2dataset's
/// zero-padded `000010023` is 10023), when it fits an int64. Other keys have none: their
/// samples take `shard << 32 | sample` (WebDataset) or `file << 32 | row` (Parquet).
pub(crate) fn key_id(key: &str) -> Option<i64> {
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    key.parse().ok()
}

/// `name`'s sample key and lower-cased extension, as `webdataset`'s `base_plus_ext`: the key is
/// the path up to the first `.` of the file name. `None` for a name without a `.` and for
/// `__…__` meta members, which webdataset skips.
fn key_and_extension(name: &str) -> Option<(&str, String)> {
    let (dir, file) = match name.rfind('/') {
        Some(at) => (&name[..=at], &name[at + 1..]),
        None => ("", name),
    };
    if file.starts_with("__") && file.ends_with("__") {
        return None;
    }
    let dot = file.find('.')?;
    if dot == 0 {
        return None;
    }
    Some((&name[..dir.len() + dot], file[dot + 1..].to_lowercase()))
}

/// Whether `block` is a tar header whose checksum holds (the sum of its bytes with the
/// checksum field read as spaces, unsigned or, as some old writers did, signed).
fn checksum_holds(block: &[u8; BLOCK]) -> bool {
    let stored = tar::Header::from_byte_slice(block).cksum();
    let Ok(stored) = stored else { return false };
    let field = 148..156;
    let unsigned: u32 =
        block.iter().enumerate().map(|(i, b)| if field.contains(&i) { u32::from(b' ') } else { u32::from(*b) }).sum();
    let signed: i64 = block
        .iter()
        .enumerate()
        .map(|(i, b)| if field.contains(&i) { i64::from(b' ') } else { i64::from(*b as i8) })
        .sum();
    stored == unsigned || i64::from(stored) == signed
}

/// Reads the shard `path` and calls `on_event` with each sample (its wanted members' bytes
/// read, the others skipped) and each stretch of damage, in file order.
///
/// # Errors
/// The file cannot be opened or read (IO errors, naming it), or what `on_event` returns.
fn read_shard(
    path: &Path,
    max_record_bytes: usize,
    wants: &dyn Fn(&str) -> bool,
    mut on_event: impl FnMut(Event) -> Result<()>,
) -> Result<()> {
    let file = storage::open_read(path).map_err(io(path))?;
    let mut reader = Blocks { inner: BufReader::with_capacity(1 << 20, file), offset: 0, path, pending: None };
    let mut open: Option<Sample> = None;
    // A GNU long name or a pax `path` for the next member.
    let mut long_name: Option<String> = None;
    let mut pax_size: Option<u64> = None;
    // A corrupt header just passed: the sample read next is marked with it.
    let mut damage: Option<String> = None;
    // The file ends inside the member whose header is at `at`: the open sample is cut.
    let cut = |open: Option<Sample>, at: u64, on_event: &mut dyn FnMut(Event) -> Result<()>| match open {
        Some(sample) => on_event(Event::Sample(sample.cut(truncated(at)))),
        None => on_event(Event::Damage { offset: at, reason: truncated(at) }),
    };
    loop {
        let at = reader.offset;
        let Some(block) = reader.block()? else {
            // The end of the file at a block boundary, without the end-of-archive block
            // (Python's tarfile accepts it too).
            break;
        };
        let Ok(block) = <&[u8; BLOCK]>::try_from(&block[..]) else {
            return cut(open, at, &mut on_event);
        };
        if block.iter().all(|b| *b == 0) {
            // The end of the archive, as tarfile (and so webdataset) reads it.
            break;
        }
        // A header is usable when its checksum holds and its size can be read (a pax `size`
        // record stands in for the field).
        let size = match checksum_holds(block) {
            true => pax_size.take().or_else(|| tar::Header::from_byte_slice(block).entry_size().ok()),
            false => None,
        };
        let Some(size) = size else {
            if at == 0 {
                // Not a tar at all (Python's tarfile refuses it too): the shard cannot be read.
                let reason = match block {
                    [0x1f, 0x8b, ..] => "a gzip-compressed tar: compressed shards are not read (decompress them)",
                    _ => "not a tar file: its first header fails its checksum",
                };
                return Err(Error::Format { path: path.display().to_string(), reason: reason.into() });
            }
            // A pax or GNU name read before it was for the member lost here.
            (long_name, pax_size) = (None, None);
            let resumed = reader.resync()?;
            let reason = match resumed {
                Some(next) => format!(
                    "corrupt tar header (its checksum fails or its size is unreadable): skipped to the next valid \
                     header, at byte {next}; the member it announced, if any, is lost"
                ),
                None => {
                    "corrupt tar header (its checksum fails or its size is unreadable), and no valid header follows \
                         it"
                    .to_string()
                }
            };
            // The lost member was the open sample's or the next one's: both are marked, and
            // each is judged by the members it still has.
            let note = format!("a corrupt tar header at byte {at}");
            if let Some(sample) = open.as_mut() {
                sample.damage = Some(note.clone());
            }
            damage = Some(note);
            on_event(Event::Damage { offset: at, reason })?;
            if resumed.is_none() {
                break;
            }
            continue;
        };
        let header = tar::Header::from_byte_slice(block);
        let kind = header.entry_type();
        let padded = size.div_ceil(BLOCK as u64).saturating_mul(BLOCK as u64);
        if kind.is_pax_local_extensions() || kind.is_gnu_longname() {
            let limit = max_record_bytes.max(1 << 20);
            if size > limit as u64 {
                // The next member's name is in it: that member's sample is marked.
                let note = format!("a {size}-byte pax or long-name header at byte {at} (over the limit, not read)");
                let reason = format!("{note}: the next member's name is not known");
                on_event(Event::Damage { offset: at, reason })?;
                damage = Some(note);
                if !reader.skip_member(size, padded)? {
                    return cut(open, at, &mut on_event);
                }
                continue;
            }
            let Some(data) = reader.data(size, padded, limit)? else {
                return cut(open, at, &mut on_event);
            };
            if kind.is_gnu_longname() {
                long_name = Some(String::from_utf8_lossy(data.split(|b| *b == 0).next().unwrap_or(&[])).into_owned());
            } else {
                for extension in tar::PaxExtensions::new(&data).flatten() {
                    match (extension.key(), extension.value()) {
                        (Ok("path"), Ok(value)) => long_name = Some(value.to_string()),
                        (Ok("size"), Ok(value)) => pax_size = value.parse().ok(),
                        _ => {}
                    }
                }
            }
            continue;
        }
        let name = long_name.take().unwrap_or_else(|| String::from_utf8_lossy(&header.path_bytes()).into_owned());
        let member = if kind.is_file() { key_and_extension(&name) } else { None };
        let Some((key, extension)) = member else {
            // A directory, a link, a meta or nameless member: skipped, as webdataset does.
            if !reader.skip_member(size, padded)? {
                return cut(open, at, &mut on_event);
            }
            continue;
        };
        if open.as_ref().is_some_and(|s| s.key != key)
            && let Some(done) = open.take()
        {
            on_event(Event::Sample(done))?;
        }
        let sample = open.get_or_insert_with(|| Sample::new(key));
        if let Some(note) = damage.take() {
            sample.damage = Some(note);
        }
        let repeated = sample.members.iter().any(|m| m.extension == extension);
        let want = wants(&extension) && !repeated && sample.problem.is_none();
        if want && size > max_record_bytes as u64 {
            sample.problem = Some(format!("its .{extension} member is {size} bytes, over max_record_bytes"));
        }
        if repeated && sample.problem.is_none() {
            sample.problem = Some(format!("two .{extension} members"));
        }
        let offset = reader.offset;
        let data = if want && sample.problem.is_none() {
            reader.data(size, padded, max_record_bytes)?
        } else {
            reader.skip_member(size, padded)?.then(Vec::new)
        };
        let Some(data) = data else {
            let reason = format!("truncated tar: the file ends inside member {name} (its header at byte {at})");
            let sample = open.take().expect("opened above");
            return on_event(Event::Sample(sample.cut(reason)));
        };
        sample.members.push(Member { extension, data, offset, size });
    }
    match open {
        Some(last) => on_event(Event::Sample(last)),
        None => Ok(()),
    }
}

fn truncated(at: u64) -> String {
    format!("truncated tar: the file ends inside the header or member at byte {at}")
}

/// A tar file read block by block, counting its offset.
struct Blocks<'p, R> {
    inner: R,
    /// The offset of the next block [`Blocks::block`] returns.
    offset: u64,
    path: &'p Path,
    /// A header [`Blocks::resync`] found, returned by the next [`Blocks::block`].
    pending: Option<Vec<u8>>,
}

impl<R: Read> Blocks<'_, R> {
    /// Up to one block: `None` at the end of the file, fewer than [`BLOCK`] bytes when it ends
    /// inside one.
    fn block(&mut self) -> Result<Option<Vec<u8>>> {
        if let Some(block) = self.pending.take() {
            self.offset += BLOCK as u64;
            return Ok(Some(block));
        }
        let mut block = vec![0u8; BLOCK];
        let got = self.fill(&mut block)?;
        block.truncate(got);
        Ok((got > 0).then_some(block))
    }

    /// Reads as much of `buf` as the file holds; how much.
    fn fill(&mut self, buf: &mut [u8]) -> Result<usize> {
        let mut got = 0;
        while got < buf.len() {
            match self.inner.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io(self.path)(e)),
            }
        }
        self.offset += got as u64;
        Ok(got)
    }

    /// A member's `size` bytes (of `padded` in the file); `None` when the file ends first.
    /// `limit` bounds the allocation (the caller checked `size` against it).
    fn data(&mut self, size: u64, padded: u64, limit: usize) -> Result<Option<Vec<u8>>> {
        if size > limit as u64 {
            return Ok(self.skip_member(size, padded)?.then(Vec::new));
        }
        let mut data = vec![0u8; size as usize];
        if self.fill(&mut data)? < data.len() {
            return Ok(None);
        }
        // A file that ends inside the padding after its last member holds that member whole
        // (Python's tarfile reads it too).
        self.skip(padded - size)?;
        Ok(Some(data))
    }

    /// Skips a member of `size` bytes (`padded` in the file); whether the file held its bytes
    /// (the padding after the last member may be cut).
    fn skip_member(&mut self, size: u64, padded: u64) -> Result<bool> {
        if !self.skip(size)? {
            return Ok(false);
        }
        self.skip(padded - size)?;
        Ok(true)
    }

    /// Skips `n` bytes; whether the file held them.
    fn skip(&mut self, n: u64) -> Result<bool> {
        let skipped = std::io::copy(&mut (&mut self.inner).take(n), &mut std::io::sink()).map_err(io(self.path))?;
        self.offset += skipped;
        Ok(skipped == n)
    }

    /// After a bad header: scans the following blocks for the next one that is a valid header
    /// (its checksum holds and it has the `ustar` magic of the formats webdataset writes),
    /// which the next [`Blocks::block`] returns. Its offset, or `None` at the end of the file.
    fn resync(&mut self) -> Result<Option<u64>> {
        loop {
            let mut block = vec![0u8; BLOCK];
            let at = self.offset;
            if self.fill(&mut block)? < BLOCK {
                return Ok(None);
            }
            if is_header(&block) {
                self.pending = Some(block);
                self.offset = at;
                return Ok(Some(at));
            }
        }
    }
}

fn is_header(block: &[u8]) -> bool {
    let Ok(block) = <&[u8; BLOCK]>::try_from(block) else { return false };
    !block.iter().all(|b| *b == 0) && &block[257..262] == b"ustar" && checksum_holds(block)
}

/// Rows of the `images` or `texts` table, with their keys, cut into batches.
pub(crate) struct Batcher {
    table: WebDatasetTable,
    schema: SchemaRef,
    batch_rows: usize,
    ids: Int64Builder,
    images: BinaryBuilder,
    texts: StringBuilder,
    image_ids: ListBuilder<Int64Builder>,
    keys: StringBuilder,
    /// The `locations` table's integer columns after `shard`, `sample` and `key`.
    places: [Int64Builder; 2],
    ranges: [Int64Builder; 4],
    rows: usize,
    bytes: usize,
}

impl Batcher {
    pub(crate) fn new(table: WebDatasetTable, schema: SchemaRef, batch_rows: usize) -> Self {
        Batcher {
            table,
            schema,
            batch_rows: batch_rows.max(1),
            ids: Int64Builder::new(),
            images: BinaryBuilder::new(),
            texts: StringBuilder::new(),
            image_ids: super::jsonl::image_ids_builder(),
            keys: StringBuilder::new(),
            places: Default::default(),
            ranges: Default::default(),
            rows: 0,
            bytes: 0,
        }
    }

    pub(crate) fn push_image(&mut self, id: i64, image: &[u8], key: &str, emit: Emit<'_>) -> Result<()> {
        self.ids.append_value(id);
        self.images.append_value(image);
        self.keys.append_value(key);
        self.pushed(image.len(), emit)
    }

    pub(crate) fn push_text(&mut self, id: i64, text: &str, key: &str, emit: Emit<'_>) -> Result<()> {
        self.ids.append_value(id);
        self.texts.append_value(text);
        self.image_ids.values().append_value(id);
        self.image_ids.append(true);
        self.keys.append_value(key);
        self.pushed(text.len(), emit)
    }

    /// A `locations` row: `[shard, sample]`, the key, `[image_offset, image_len, text_offset,
    /// text_len]`.
    fn push_location(&mut self, place: [i64; 2], key: &str, ranges: [i64; 4], emit: Emit<'_>) -> Result<()> {
        for (builder, value) in self.places.iter_mut().zip(place) {
            builder.append_value(value);
        }
        self.keys.append_value(key);
        for (builder, value) in self.ranges.iter_mut().zip(ranges) {
            builder.append_value(value);
        }
        self.pushed(key.len() + 48, emit)
    }

    fn pushed(&mut self, bytes: usize, emit: Emit<'_>) -> Result<()> {
        self.rows += 1;
        self.bytes += bytes;
        if self.rows >= self.batch_rows || self.bytes >= BATCH_BYTES { self.flush(emit) } else { Ok(()) }
    }

    pub(crate) fn flush(&mut self, emit: Emit<'_>) -> Result<()> {
        if self.rows == 0 {
            return Ok(());
        }
        let (rows, bytes) = (self.rows, self.bytes);
        (self.rows, self.bytes) = (0, 0);
        let ids: ArrayRef = Arc::new(self.ids.finish());
        let keys: ArrayRef = Arc::new(self.keys.finish());
        let columns: Vec<ArrayRef> = match self.table {
            WebDatasetTable::Images => {
                // The next batch's values in one allocation of this one's size, not grown by
                // doubling: a batch of images is megabytes, and each doubling a copy and a freed
                // block the allocator holds for a while.
                let images = std::mem::replace(&mut self.images, BinaryBuilder::with_capacity(rows, bytes));
                vec![ids, Arc::new({ images }.finish()), keys]
            }
            WebDatasetTable::Texts => vec![ids, Arc::new(self.texts.finish()), Arc::new(self.image_ids.finish()), keys],
            WebDatasetTable::Locations => {
                let [shard, sample] = &mut self.places;
                let mut columns: Vec<ArrayRef> = vec![Arc::new(shard.finish()), Arc::new(sample.finish()), keys];
                columns.extend(self.ranges.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
                columns
            }
        };
        emit(RecordBatch::try_new(self.schema.clone(), columns)?)
    }
}

/// Expands the brace patterns WebDataset shard lists are written in, as Python's
/// `braceexpand` does (which `webdataset` uses): `{000..009}` (a range, zero-padded to the
/// longer end when either end is), `{a,b}` (alternatives), nested, left to right. A brace
/// group that is neither (`{x}`) stays as written.
pub fn expand_braces(pattern: &str) -> Vec<String> {
    let Some((open, close)) = first_group(pattern) else { return vec![pattern.to_string()] };
    let (prefix, inner, rest) = (&pattern[..open], &pattern[open + 1..close], &pattern[close + 1..]);
    let alternatives: Vec<String> = if let Some(range) = numeric_range(inner) {
        range
    } else {
        let parts = split_top_level(inner);
        if parts.len() < 2 {
            // Not a group: kept as written, the rest expanded.
            return expand_braces(rest).into_iter().map(|tail| format!("{prefix}{{{inner}}}{tail}")).collect();
        }
        parts.into_iter().flat_map(expand_braces).collect()
    };
    let tails = expand_braces(rest);
    let mut out = Vec::with_capacity(alternatives.len() * tails.len());
    for alternative in &alternatives {
        for tail in &tails {
            out.push(format!("{prefix}{alternative}{tail}"));
        }
    }
    out
}

/// The first `{` and its matching `}`.
fn first_group(pattern: &str) -> Option<(usize, usize)> {
    let open = pattern.find('{')?;
    let mut depth = 0;
    for (i, c) in pattern[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some((open, open + i));
                }
            }
            _ => {}
        }
    }
    None
}

/// `inner` split at its commas outside nested braces.
fn split_top_level(inner: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts
}

/// `a..b` with integer ends: the numbers from a to b (either direction), zero-padded to the
/// longer end's width when either end has a leading zero.
fn numeric_range(inner: &str) -> Option<Vec<String>> {
    let (a, b) = inner.split_once("..")?;
    let (start, end) = (a.parse::<i64>().ok()?, b.parse::<i64>().ok()?);
    let padded = |s: &str| s.trim_start_matches('-').len() > 1 && s.trim_start_matches('-').starts_with('0');
    let width = if padded(a) || padded(b) { a.len().max(b.len()) } else { 0 };
    let numbers: Vec<i64> = if start <= end { (start..=end).collect() } else { (end..=start).rev().collect() };
    Some(numbers.into_iter().map(|n| format!("{n:0width$}")).collect())
}

/// WebDataset tar shards (local files, globs, `{000..009}` brace patterns) → an `images` or
/// `texts` table with a `key` column.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebDatasetConfig {
    /// Tar shards: files, globs, or brace patterns as webdataset writes them.
    ///
    /// A shard's position in the expanded list is the high half of its samples' ids (`shard << 32 | sample`).
    pub paths: Vec<String>,
    /// `images` (`image_id`, `image`, `key`), `texts` (`text_id`, `text`, `image_ids`, `key`) or
    /// `locations` (where each sample's image and text members lie; no bytes read).
    #[serde(default)]
    pub table: WebDatasetTable,
    /// Image member extensions, the first present taken.
    #[serde(default = "default_image_extensions")]
    pub image_extensions: Vec<String>,
    /// The text member's extension.
    #[serde(default = "default_text_extension")]
    pub text_extension: String,
    /// A member bigger than this is not read; its sample is quarantined.
    #[serde(default = "super::default_max_record_bytes")]
    pub max_record_bytes: usize,
}

impl WebDatasetConfig {
    /// The shards `paths` as `table`, with the default extensions and record limit.
    pub fn new(paths: Vec<String>, table: WebDatasetTable) -> Self {
        WebDatasetConfig {
            paths,
            table,
            image_extensions: default_image_extensions(),
            text_extension: default_text_extension(),
            max_record_bytes: super::default_max_record_bytes(),
        }
    }
}

/// Whether `path` names WebDataset shards (`.tar` files, or a pattern of them).
pub fn is_shard_path(path: &str) -> bool {
    path.to_ascii_lowercase().ends_with(".tar")
}

fn default_image_extensions() -> Vec<String> {
    ["jpg", "jpeg", "png", "webp", "gif"].map(String::from).to_vec()
}

fn default_text_extension() -> String {
    "txt".into()
}

impl NodeConfig for WebDatasetConfig {
    const KIND: &'static str = "webdataset";
    const ROLE: Role = Role::Source;
    fn build(self, cx: &BuildContext) -> Result<Operator, Vec<String>> {
        let patterns: Vec<String> = self.paths.iter().flat_map(|p| expand_braces(p)).collect();
        let paths = cx.files(&patterns)?;
        let lower = |e: &String| e.trim_start_matches('.').to_lowercase();
        Ok(Operator::Source(Box::new(WebDatasetSource {
            paths,
            table: self.table,
            image_extensions: self.image_extensions.iter().map(lower).collect(),
            text_extension: lower(&self.text_extension),
            max_record_bytes: self.max_record_bytes,
        })))
    }

    fn known_schema(&self) -> Option<SchemaRef> {
        Some(WebDatasetSource::schema_of(self.table))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn braces_expand_as_braceexpand_does() {
        assert_eq!(expand_braces("s/{000..002}.tar"), ["s/000.tar", "s/001.tar", "s/002.tar"]);
        assert_eq!(expand_braces("{8..10}"), ["8", "9", "10"]);
        assert_eq!(expand_braces("{08..10}"), ["08", "09", "10"]);
        assert_eq!(expand_braces("{2..0}"), ["2", "1", "0"]);
        assert_eq!(expand_braces("{a,b{1..2}}-{x,y}"), ["a-x", "a-y", "b1-x", "b1-y", "b2-x", "b2-y"]);
        assert_eq!(expand_braces("plain.tar"), ["plain.tar"]);
        assert_eq!(expand_braces("{x}/{0..1}"), ["{x}/0", "{x}/1"]);
        assert_eq!(expand_braces("open{"), ["open{"]);
    }

    /// Samples of shards GNU tar writes, in its own format and in POSIX pax, with member
    /// names past ustar's 100 bytes (a GNU long-name member, a pax `path` record).
    #[test]
    fn reads_the_long_names_gnu_tar_writes_in_both_formats() {
        let dir = tempfile::tempdir().unwrap();
        let deep = "d".repeat(120);
        std::fs::create_dir_all(dir.path().join(&deep)).unwrap();
        for (name, body) in [("k1.jpg", "image one"), ("k1.txt", "text one"), ("k2.jpg", "image two")] {
            std::fs::write(dir.path().join(&deep).join(name), body).unwrap();
        }
        for format in ["gnu", "pax"] {
            let tar = dir.path().join(format!("{format}.tar"));
            let status = std::process::Command::new("tar")
                .args(["--format", format, "--sort=name", "-cf"])
                .arg(&tar)
                .arg("-C")
                .arg(dir.path())
                .arg(&deep)
                .status()
                .unwrap();
            assert!(status.success());
            let mut seen = Vec::new();
            read_shard(&tar, 1 << 20, &|ext| ext != "json", |event| {
                match event {
                    Event::Sample(sample) => seen.push(format!(
                        "{} {}",
                        sample.key.trim_start_matches(&format!("{deep}/")),
                        sample
                            .members
                            .iter()
                            .map(|m| format!("{}={}", m.extension, String::from_utf8_lossy(&m.data)))
                            .collect::<Vec<_>>()
                            .join(",")
                    )),
                    Event::Damage { reason, .. } => seen.push(reason),
                }
                Ok(())
            })
            .unwrap();
            assert_eq!(seen, ["k1 jpg=image one,txt=text one", "k2 jpg=image two"], "{format}");
        }
    }

    /// A shard cut inside the padding after its last member, before the end-of-archive
    /// blocks, still holds that member whole: every sample is read, as Python's tarfile does.
    #[test]
    fn a_shard_cut_after_its_last_members_bytes_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        for (name, body) in [("k1.jpg", "image one"), ("k1.txt", "text one"), ("k2.jpg", "image two")] {
            std::fs::write(dir.path().join(name), body).unwrap();
        }
        let tar = dir.path().join("cut.tar");
        let status = std::process::Command::new("tar")
            .args(["--format", "gnu", "-cf"])
            .arg(&tar)
            .arg("-C")
            .arg(dir.path())
            .args(["k1.jpg", "k1.txt", "k2.jpg"])
            .status()
            .unwrap();
        assert!(status.success());
        // Three members of one header and one data block each: the last one's data starts at
        // 2 × 1024 + 512.
        let bytes = std::fs::read(&tar).unwrap();
        let read = |len: usize| {
            std::fs::write(&tar, &bytes[..len]).unwrap();
            let mut seen = Vec::new();
            read_shard(&tar, 1 << 20, &|_| true, |event| {
                seen.push(match event {
                    Event::Sample(sample) => format!("{} {:?}", sample.key, sample.problem),
                    Event::Damage { reason, .. } => reason,
                });
                Ok(())
            })
            .unwrap();
            seen
        };
        assert_eq!(read(2 * 1024 + 512 + 9), ["k1 None", "k2 None"], "cut after the last member's bytes");
        let cut = read(2 * 1024 + 512 + 5);
        assert_eq!(cut[0], "k1 None");
        assert!(cut[1].starts_with("k2 Some(\"truncated tar"), "{cut:?}");
    }

    #[test]
    fn keys_and_extensions_split_as_webdataset_does() {
        assert_eq!(key_and_extension("000123.jpg"), Some(("000123", "jpg".into())));
        assert_eq!(key_and_extension("dir/a.b/000123.Seg.JSON"), Some(("dir/a.b/000123", "seg.json".into())));
        assert_eq!(key_and_extension("noextension"), None);
        assert_eq!(key_and_extension("__key__"), None);
        assert_eq!(key_and_extension(".hidden"), None);
    }
}
