//! Sources: read records from cn_clip's files (and Parquet tables) as Arrow batches.
//!
//! Every source streams: it holds one batch of rows at a time, whatever the corpus size. Each
//! takes a [`Shard`] — record `k` of the source (counting every record, good or bad, across its
//! files in order) belongs to shard `k mod n` — so `n` jobs with `--shard 0/n … n-1/n` together
//! read every record exactly once, and a bad record is quarantined by exactly one of them.

pub mod batches;
pub mod features;
pub mod folder;
pub mod img2dataset;
pub mod jsonl;
pub mod lmdb;
pub mod lmdb_train;
pub mod parquet;
pub mod parts;
pub mod sampler;
pub mod synth;
pub mod train_pairs;
pub mod train_parquet;
pub mod train_shards;
pub mod tsv;
pub mod webdataset;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayBuilder, ArrayRef, BinaryBuilder, Int64Builder};
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;

use crate::error::{Error, Result, io};
use crate::quarantine::NodeQuarantine;
use crate::storage;

/// Which records of a source a job reads: `index` of `count`, written `i/n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u64,
    pub count: u64,
}

impl Shard {
    /// Every record.
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// Whether record number `ordinal` (0-based) is this shard's.
    pub fn owns(&self, ordinal: u64) -> bool {
        ordinal % self.count == self.index
    }
}

impl Default for Shard {
    fn default() -> Self {
        Shard::ALL
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// A shard that is not `i/n` with 0 <= i < n.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("shard `{0}` is not `i/n` with 0 <= i < n (e.g. 0/4)")]
pub struct ShardError(pub String);

impl std::str::FromStr for Shard {
    type Err = ShardError;

    fn from_str(s: &str) -> Result<Self, ShardError> {
        let bad = || ShardError(s.to_string());
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count) = (i.trim().parse::<u64>().map_err(|_| bad())?, n.trim().parse::<u64>().map_err(|_| bad())?);
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

impl serde::Serialize for Shard {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Shard {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?.parse().map_err(serde::de::Error::custom)
    }
}

/// What a running source needs besides its own configuration.
#[derive(Clone)]
pub struct ReadContext {
    pub shard: Shard,
    /// Rows per emitted batch (sources also cut a batch at [`BATCH_BYTES`]).
    pub batch_rows: usize,
    /// Where this source's bad records go.
    pub quarantine: NodeQuarantine,
}

/// A batch is cut once its values pass this many bytes, whatever its row count.
pub const BATCH_BYTES: usize = 32 << 20;

/// Hands a finished batch downstream; `Err(Error::Stopped)` once nobody wants more.
pub type Emit<'a> = &'a mut dyn FnMut(RecordBatch) -> Result<()>;

/// A source of record batches, run on a thread of its own.
pub trait Source: Send + 'static {
    /// The schema of every batch it emits.
    fn schema(&self) -> SchemaRef;

    /// Where its records come from (a file, a directory), for quarantine records written
    /// downstream.
    fn origin(&self) -> String;

    /// About how many records it holds (all shards), if that is cheap to know — for the
    /// progress display's ETA. Line-based files estimate from their size and first lines.
    fn estimated_records(&self) -> Option<u64>;

    /// Reads this shard's records, emitting batches; bad records go to the quarantine.
    ///
    /// # Errors
    /// Structural faults (a missing or unreadable file), a record under `--on-error fail`, or
    /// [`Error::Stopped`] from `emit`.
    fn read(self: Box<Self>, ctx: &ReadContext, emit: Emit<'_>) -> Result<()>;
}

/// The contents of a small text input (a pipeline file, a label or templates file, a model
/// config), read only when it is a regular file of at most `max_bytes`: a FIFO would block the
/// read, `/dev/zero` would fill memory. The error names the path and what it is.
///
/// # Errors
/// The path is not a regular file, is larger than `max_bytes`, or cannot be read as UTF-8.
pub fn read_text(path: &Path, max_bytes: u64) -> std::io::Result<String> {
    let meta =
        storage::metadata(path).map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is {}, not a regular file", path.display(), parts::kind_of(&meta)),
        ));
    }
    if meta.len() > max_bytes {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is {} bytes, more than the {max_bytes} this input may have", path.display(), meta.len()),
        ));
    }
    storage::read_to_string(path).map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// The most a small text input read by [`read_text`] may hold (64 MiB).
pub const MAX_TEXT_BYTES: u64 = 64 << 20;

/// Expands file arguments: plain paths (which must exist) and glob patterns (`*`, `?`, `[…]`,
/// which must match at least one file; matches in sorted order). As in a shell, a wildcard does
/// not match a file name's leading dot, so `'feats/*.parquet'` leaves out a killed writer's
/// hidden `.cnclip-tmp-…` file, and `'feats/.*'` finds it. Every problem is reported.
///
/// # Errors
/// One line per path that does not exist or pattern that matches nothing.
pub fn expand_paths(patterns: &[String]) -> Result<Vec<PathBuf>, Vec<String>> {
    let mut paths = Vec::new();
    let mut problems = Vec::new();
    if patterns.is_empty() {
        problems.push("no input files given".to_string());
    }
    for pattern in patterns {
        if storage::is_remote(Path::new(pattern)) {
            match remote_paths(pattern) {
                Ok(found) => paths.extend(found),
                Err(problem) => problems.push(problem),
            }
            continue;
        }
        if !pattern.contains(['*', '?', '[']) {
            let path = PathBuf::from(pattern);
            match storage::metadata(&path) {
                Ok(meta) if meta.is_dir() => problems.push(format!("{pattern} is a directory, not a file")),
                Ok(meta) if meta.is_file() => paths.push(path),
                // A FIFO or a device (`/dev/zero`) would block or never end.
                Ok(meta) => problems.push(format!(
                    "{pattern} is {}, not a regular file: cnclip reads inputs from files",
                    parts::kind_of(&meta)
                )),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    problems.push(format!("{pattern} does not exist"))
                }
                Err(e) => problems.push(format!("{pattern}: {e}")),
            }
            continue;
        }
        // As in a shell, a wildcard matches a hidden file only when the pattern's file name
        // starts with a dot (the glob crate's own option leaves hidden files out altogether).
        let wants_hidden = parts::is_hidden(Path::new(pattern));
        match glob::glob(pattern) {
            Err(e) => problems.push(format!("pattern `{pattern}` is not a valid glob: {e}")),
            Ok(matches) => {
                let mut found: Vec<PathBuf> = matches
                    .filter_map(|m| m.ok())
                    .filter(|p| p.is_file() && (wants_hidden || !parts::is_hidden(p)))
                    .collect();
                found.sort();
                if found.is_empty() {
                    problems.push(format!("pattern `{pattern}` matches no file"));
                }
                paths.extend(found);
            }
        }
    }
    if problems.is_empty() { Ok(paths) } else { Err(problems) }
}

/// The objects a remote URL or pattern names: the object itself (which must exist), or the
/// objects under the pattern's folder whose URLs match it (sorted; hidden names only when the
/// pattern's file name starts with a dot, as for files).
fn remote_paths(pattern: &str) -> Result<Vec<PathBuf>, String> {
    if !pattern.contains(['*', '?', '[']) {
        return match storage::size(pattern) {
            Ok(_) => Ok(vec![PathBuf::from(pattern)]),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(format!("{pattern} does not exist")),
            Err(e) => Err(e.to_string()),
        };
    }
    let glob = glob::Pattern::new(pattern).map_err(|e| format!("pattern `{pattern}` is not a valid glob: {e}"))?;
    let wildcard = pattern.find(['*', '?', '[']).unwrap_or(pattern.len());
    let folder = &pattern[..pattern[..wildcard].rfind('/').unwrap_or(0)];
    let wants_hidden = parts::is_hidden(Path::new(pattern));
    let options = glob::MatchOptions { require_literal_separator: true, ..Default::default() };
    let found: Vec<PathBuf> = storage::list_remote(folder)
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|(url, _)| PathBuf::from(url))
        .filter(|url| glob.matches_path_with(url, options) && (wants_hidden || !parts::is_hidden(url)))
        .collect();
    if found.is_empty() {
        return Err(format!("pattern `{pattern}` matches no object"));
    }
    Ok(found)
}

/// Estimates the lines of `paths` from their total size and the mean length of the first
/// (up to 1 MiB of) lines of the first file.
pub(crate) fn estimate_lines(paths: &[PathBuf]) -> Option<u64> {
    use std::io::Read;
    let total: u64 = paths.iter().filter_map(|p| storage::size(p).ok()).sum();
    let mut head = Vec::with_capacity(1 << 20);
    storage::open_read(paths.first()?).ok()?.take(1 << 20).read_to_end(&mut head).ok()?;
    let lines = head.iter().filter(|&&b| b == b'\n').count() as u64;
    if lines == 0 {
        return None;
    }
    let measured = head[..=head.iter().rposition(|&b| b == b'\n')?].len() as u64;
    Some(total * lines / measured.max(1))
}

/// `paths` for messages: all of them when few, else the first and a count.
pub(crate) fn describe_paths(paths: &[PathBuf]) -> String {
    match paths {
        [] => String::new(),
        [one] => one.display().to_string(),
        [first, rest @ ..] if rest.len() > 2 => format!("{} and {} more files", first.display(), rest.len()),
        all => all.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
    }
}

/// Accumulates `(id, bytes)` rows into batches of a two-column schema (`images`,
/// `images_base64`), cutting a batch at `batch_rows` rows or [`BATCH_BYTES`].
pub(crate) struct IdBytesBatcher {
    schema: SchemaRef,
    batch_rows: usize,
    ids: Int64Builder,
    values: BinaryBuilder,
    bytes: usize,
}

impl IdBytesBatcher {
    pub(crate) fn new(schema: SchemaRef, batch_rows: usize) -> Self {
        IdBytesBatcher {
            schema,
            batch_rows: batch_rows.max(1),
            ids: Int64Builder::new(),
            values: BinaryBuilder::new(),
            bytes: 0,
        }
    }

    pub(crate) fn push(&mut self, id: i64, value: &[u8], emit: Emit<'_>) -> Result<()> {
        self.ids.append_value(id);
        self.values.append_value(value);
        self.bytes += value.len();
        if self.ids.len() >= self.batch_rows || self.bytes >= BATCH_BYTES { self.flush(emit) } else { Ok(()) }
    }

    pub(crate) fn flush(&mut self, emit: Emit<'_>) -> Result<()> {
        let rows = self.ids.len();
        if rows == 0 {
            return Ok(());
        }
        let bytes = std::mem::take(&mut self.bytes);
        let columns: Vec<ArrayRef> = vec![Arc::new(self.ids.finish()), Arc::new(self.values.finish())];
        // The next batch is sized like this one from the start: growing a builder by doubling
        // copies its values several times over (measured: build-lmdb spent a fifth of its time
        // in those copies and in faulting in the pages they left behind).
        self.ids = Int64Builder::with_capacity(rows);
        self.values = BinaryBuilder::with_capacity(rows, bytes + bytes / 8);
        emit(RecordBatch::try_new(self.schema.clone(), columns)?)
    }
}

/// The longest line a line source reads by default: far above any real image's base64, low
/// enough that an endless line (a corrupt or hostile file) cannot exhaust memory.
pub const MAX_RECORD_BYTES: usize = 256 << 20;

/// The line sources' default `max_record_bytes` (a serde default).
pub(crate) fn default_max_record_bytes() -> usize {
    MAX_RECORD_BYTES
}

/// `true`, a serde default.
pub(crate) fn yes() -> bool {
    true
}

/// At most this many bytes of offending data are quoted in a message or a quarantine reason.
pub const QUOTE_BYTES: usize = 64;

/// `data` for a message: its first [`QUOTE_BYTES`] bytes (lossy UTF-8), `…` if there is more.
pub fn quote(data: &[u8]) -> String {
    let mut end = data.len().min(QUOTE_BYTES);
    // Do not cut a UTF-8 character in two.
    while end < data.len() && end > 0 && (data[end] & 0b1100_0000) == 0b1000_0000 {
        end -= 1;
    }
    let text = String::from_utf8_lossy(&data[..end]);
    if end < data.len() { format!("{text}…") } else { text.into_owned() }
}

/// A line as a line source sees it.
pub(crate) enum Line<'a> {
    /// Trimmed, not blank.
    Text(&'a [u8]),
    /// Longer than the limit: never held whole in memory; `bytes` long, starting with `prefix`
    /// (at most [`QUOTE_BYTES`]).
    TooLong { bytes: u64, prefix: &'a [u8] },
}

/// Calls `on_line(number, line)` for each non-blank line of `path` (1-based numbers, line end
/// and surrounding spaces trimmed — not tabs, which separate TSV fields: `7<TAB>` is an image
/// with an empty value, not a line without one), read ahead on a thread in 4 MiB buffers. A
/// line longer than `max_line` bytes comes as [`Line::TooLong`], skipped without being held.
///
/// # Errors
/// IO errors naming `path` (a missing file is structural), or whatever `on_line` returns.
pub(crate) fn for_each_trimmed_line(
    path: &Path,
    max_line: usize,
    mut on_line: impl FnMut(usize, Line<'_>) -> Result<()>,
) -> Result<()> {
    lines_at_with_buffer(path, 4 << 20, max_line, |number, _, line| on_line(number, line))
}

/// [`for_each_trimmed_line`] with each line's byte offset in the file (of its first byte after
/// trimming; of its first byte for a [`Line::TooLong`]): where a ranged read finds it again.
pub(crate) fn for_each_trimmed_line_at(
    path: &Path,
    max_line: usize,
    on_line: impl FnMut(usize, u64, Line<'_>) -> Result<()>,
) -> Result<()> {
    lines_at_with_buffer(path, 4 << 20, max_line, on_line)
}

/// The byte that ends lines in `head` (a file's first 64 KiB): `\n` (Unix and Windows files),
/// or `\r` for a file written with classic Mac line endings (a `\r` and no `\n` in it).
fn line_end(head: &[u8]) -> u8 {
    let cr_only = memchr::memchr(b'\n', head).is_none() && memchr::memchr(b'\r', head).is_some();
    if cr_only { b'\r' } else { b'\n' }
}

#[cfg(test)]
fn lines_with_buffer(
    path: &Path,
    buffer_size: usize,
    max_line: usize,
    mut on_line: impl FnMut(usize, Line<'_>) -> Result<()>,
) -> Result<()> {
    lines_at_with_buffer(path, buffer_size, max_line, |number, _, line| on_line(number, line))
}

fn lines_at_with_buffer(
    path: &Path,
    buffer_size: usize,
    max_line: usize,
    mut on_line: impl FnMut(usize, u64, Line<'_>) -> Result<()>,
) -> Result<()> {
    use std::io::Read;
    use std::sync::mpsc::sync_channel;
    // A file, or an object read in ranged GETs ahead of the lines ([`storage::open_read`]).
    let mut reader = storage::open_read(path).map_err(io(path))?;
    let mut head = Vec::with_capacity(64 << 10);
    reader.by_ref().take(64 << 10).read_to_end(&mut head).map_err(io(path))?;
    let newline = line_end(&head);
    let mut file = std::io::Cursor::new(head).chain(reader);
    let blank = |b: &u8| matches!(b, b' ' | b'\r' | b'\n');
    let mut number = 0usize;
    // `at`: the file offset of the line's first byte.
    let mut emit = |at: u64, line: Line<'_>| -> Result<()> {
        number += 1;
        match line {
            Line::Text(raw) => {
                // A UTF-8 byte order mark (Windows editors write one) is not part of the data.
                let line = if number == 1 { raw.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(raw) } else { raw };
                let start = line.iter().position(|b| !blank(b)).unwrap_or(line.len());
                let end = line.iter().rposition(|b| !blank(b)).map_or(start, |e| e + 1);
                let at = at + (raw.len() - line.len() + start) as u64;
                if start < end { on_line(number, at, Line::Text(&line[start..end])) } else { Ok(()) }
            }
            long => on_line(number, at, long),
        }
    };
    // A thread of its own reads ahead into one of two buffers (copying out of the page cache)
    // while the lines of the other are handed out as slices of it, with no per-line copy; only a
    // line cut by the end of a read is gathered in `carry`. Returning early (an error from
    // `on_line`) drops the channels, which stops the reader; the scope joins it.
    std::thread::scope(|scope| {
        let (full_tx, full_rx) = sync_channel::<std::io::Result<Vec<u8>>>(1);
        let (empty_tx, empty_rx) = sync_channel::<Vec<u8>>(2);
        for _ in 0..2 {
            empty_tx.send(Vec::new()).expect("room for both buffers");
        }
        std::thread::Builder::new()
            .name("line-reader".into())
            .spawn_scoped(scope, move || {
                for mut buffer in empty_rx {
                    buffer.resize(buffer_size.max(1), 0);
                    let read = loop {
                        match file.read(&mut buffer) {
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            other => break other,
                        }
                    };
                    let done = !matches!(read, Ok(n) if n > 0);
                    let chunk = read.map(|n| {
                        buffer.truncate(n);
                        buffer
                    });
                    if full_tx.send(chunk).is_err() || done {
                        return;
                    }
                }
            })
            .map_err(io(path))?;
        // `carry` gathers a line cut by the end of a read; past `max_line` it keeps only the
        // line's first bytes (for the message) and `skipped` counts the rest to its end.
        let mut carry: Vec<u8> = Vec::new();
        let mut skipped: Option<u64> = None;
        // The file offsets of the chunk's first byte and of the carried line's.
        let (mut base, mut carry_at) = (0u64, 0u64);
        loop {
            let chunk = full_rx
                .recv()
                .map_err(|_| Error::Internal(format!("{}: the reading thread stopped", path.display())))?;
            let chunk = chunk.map_err(io(path))?;
            if chunk.is_empty() {
                return match skipped {
                    Some(bytes) => emit(carry_at, Line::TooLong { bytes, prefix: &carry }),
                    None if carry.is_empty() => Ok(()),
                    None => emit(carry_at, Line::Text(&carry)),
                };
            }
            let mut start = 0;
            while start < chunk.len() {
                let newline = memchr::memchr(newline, &chunk[start..]).map(|at| start + at);
                let end = newline.unwrap_or(chunk.len());
                let piece = &chunk[start..end];
                let piece_at = base + start as u64;
                start = end + 1;
                if skipped.is_none() && carry.is_empty() {
                    carry_at = piece_at;
                }
                if let Some(bytes) = skipped.as_mut() {
                    *bytes += piece.len() as u64;
                } else if carry.len() + piece.len() > max_line {
                    skipped = Some((carry.len() + piece.len()) as u64);
                    carry.extend_from_slice(&piece[..piece.len().min(QUOTE_BYTES.saturating_sub(carry.len()))]);
                    carry.truncate(QUOTE_BYTES);
                } else if newline.is_some() && carry.is_empty() {
                    emit(piece_at, Line::Text(piece))?; // the common case: a slice of the buffer, no copy
                    continue;
                } else {
                    carry.extend_from_slice(piece);
                }
                if newline.is_some() {
                    match skipped.take() {
                        Some(bytes) => emit(carry_at, Line::TooLong { bytes, prefix: &carry })?,
                        None => emit(carry_at, Line::Text(&carry))?,
                    }
                    carry.clear();
                }
            }
            base += chunk.len() as u64;
            let _ = empty_tx.send(chunk);
        }
    })
}

/// Numbers a source's records in reading order and says which belong to this job's shard.
pub(crate) struct ShardFilter {
    shard: Shard,
    next: u64,
}

impl ShardFilter {
    pub(crate) fn new(shard: Shard) -> Self {
        ShardFilter { shard, next: 0 }
    }

    /// Whether the next record is this shard's.
    pub(crate) fn mine(&mut self) -> bool {
        self.next += 1;
        self.shard.owns(self.next - 1)
    }
}

/// Remembers the ids seen so far (8–16 bytes each) to reject duplicates; off, it accepts all.
pub(crate) struct SeenIds {
    set: Option<rustc_hash::FxHashSet<i64>>,
}

impl SeenIds {
    pub(crate) fn new(enabled: bool) -> Self {
        SeenIds { set: enabled.then(Default::default) }
    }

    /// `None` if `id` is new (always, when disabled); else the rejection of this `what` ("image",
    /// "text") read from `source`.
    pub(crate) fn duplicate(&mut self, id: i64, source: &Path, what: &str) -> Option<crate::quarantine::Rejected> {
        if self.set.as_mut().is_none_or(|set| set.insert(id)) {
            return None;
        }
        Some(crate::quarantine::Rejected {
            source: source.display().to_string(),
            location: format!("{what} {id}"),
            id: Some(id.to_string()),
            reason: format!("duplicate {what} id (the first one is kept)"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_cut_by_reads_or_longer_than_the_buffer_come_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lines.txt");
        let long = "x".repeat(50);
        std::fs::write(&path, format!("a b\r\n\n  \n{long}\nc\td \nlast")).unwrap();
        for buffer in [1, 3, 7, 64, 4096] {
            let mut seen = Vec::new();
            lines_with_buffer(&path, buffer, MAX_RECORD_BYTES, |n, line| {
                let Line::Text(line) = line else { panic!("line {n} is not too long") };
                seen.push(format!("{n}:{}", String::from_utf8_lossy(line)));
                Ok(())
            })
            .unwrap();
            assert_eq!(seen, ["1:a b", format!("4:{long}").as_str(), "5:c\td", "6:last"], "buffer of {buffer} bytes");
        }
    }

    /// Lines over the limit come as `TooLong` with their length and first bytes, wherever the
    /// reads cut them (one read, several, the end of the file), and the lines around them whole.
    #[test]
    fn lines_over_the_limit_are_skipped_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lines.txt");
        let long = "y".repeat(300);
        std::fs::write(&path, format!("short\n{long}\n{}\nexact\n{long}z", "x".repeat(100))).unwrap();
        for buffer in [1, 7, 64, 4096] {
            let mut seen = Vec::new();
            lines_with_buffer(&path, buffer, 100, |n, line| {
                seen.push(match line {
                    Line::Text(text) => format!("{n}:{}", String::from_utf8_lossy(text).len()),
                    Line::TooLong { bytes, prefix } => format!("{n}:long {bytes} {}", quote(prefix)),
                });
                Ok(())
            })
            .unwrap();
            let quoted = "y".repeat(QUOTE_BYTES); // only the first bytes were kept
            assert_eq!(
                seen,
                [
                    "1:5".to_string(),
                    format!("2:long 300 {quoted}"),
                    "3:100".into(),
                    "4:5".into(),
                    format!("5:long 301 {quoted}")
                ],
                "buffer of {buffer} bytes"
            );
        }
    }

    /// Each line's offset is where its trimmed bytes lie in the file, whatever the buffer cuts.
    #[test]
    fn line_offsets_point_at_the_lines_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lines.tsv");
        let text = format!("\u{feff} 1\taGk=\r\n\n  \n{}\n22\tYQ== \nlast", "y".repeat(40));
        std::fs::write(&path, &text).unwrap();
        for buffer in [1, 3, 7, 64, 4096] {
            let mut seen = Vec::new();
            lines_at_with_buffer(&path, buffer, 30, |n, at, line| {
                let at = at as usize;
                seen.push(match line {
                    Line::Text(line) => {
                        assert_eq!(&text.as_bytes()[at..at + line.len()], line, "line {n}, buffer {buffer}");
                        format!("{n}@{at}")
                    }
                    Line::TooLong { bytes, .. } => format!("{n}@{at} long {bytes}"),
                });
                Ok(())
            })
            .unwrap();
            assert_eq!(seen, ["1@4", "4@16 long 40", "5@57", "6@66"], "buffer of {buffer} bytes");
        }
    }

    /// A file with CR-only line endings is read line by line, whatever the buffer.
    #[test]
    fn cr_only_line_endings_are_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mac.tsv");
        std::fs::write(&path, "1\taGk=\r2\taGk=\r\r3\taGk=\r").unwrap();
        for buffer in [1, 5, 4096] {
            let mut seen = Vec::new();
            lines_with_buffer(&path, buffer, MAX_RECORD_BYTES, |n, line| {
                let Line::Text(text) = line else { panic!("not too long") };
                seen.push(format!("{n}:{}", String::from_utf8_lossy(text)));
                Ok(())
            })
            .unwrap();
            assert_eq!(seen, ["1:1\taGk=", "2:2\taGk=", "4:3\taGk="], "buffer of {buffer} bytes");
        }
    }

    /// A byte order mark before the first line is not data; a directory is not an input file.
    #[test]
    fn a_bom_is_skipped_and_a_directory_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bom.jsonl");
        std::fs::write(&path, b"\xEF\xBB\xBF{\"a\": 1}\n{\"b\": 2}\n").unwrap();
        let mut seen = Vec::new();
        for_each_trimmed_line(&path, MAX_RECORD_BYTES, |_, line| {
            let Line::Text(text) = line else { panic!("not too long") };
            seen.push(String::from_utf8(text.to_vec()).unwrap());
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, [r#"{"a": 1}"#, r#"{"b": 2}"#]);
        let problems = expand_paths(&[dir.path().display().to_string()]).unwrap_err();
        assert_eq!(problems, [format!("{} is a directory, not a file", dir.path().display())]);
    }

    #[test]
    fn quotes_are_short_and_whole_characters() {
        assert_eq!(quote(b"abc"), "abc");
        assert_eq!(quote("皮".repeat(40).as_bytes()), format!("{}…", "皮".repeat(21)));
        assert_eq!(quote(&[b'a'; 1000]), format!("{}…", "a".repeat(QUOTE_BYTES)));
    }

    /// An error from the consumer stops the read-ahead thread and comes back as it was.
    #[test]
    fn a_failing_consumer_stops_reading() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lines.txt");
        std::fs::write(&path, "line\n".repeat(100_000)).unwrap();
        let mut calls = 0;
        let result = lines_with_buffer(&path, 64, MAX_RECORD_BYTES, |n, _| {
            calls += 1;
            if n == 3 { Err(Error::Record { location: format!("line {n}"), reason: "stop".into() }) } else { Ok(()) }
        });
        assert_eq!(result.unwrap_err().to_string(), "line 3: stop");
        assert_eq!(calls, 3);
        let missing =
            lines_with_buffer(&dir.path().join("nope"), 64, MAX_RECORD_BYTES, |_, _| Ok(())).unwrap_err().to_string();
        assert!(missing.contains("nope"), "{missing}");
    }

    #[test]
    fn shards_parse_and_partition_the_records() {
        assert_eq!("1/4".parse::<Shard>(), Ok(Shard { index: 1, count: 4 }));
        assert_eq!(" 0 / 1 ".parse::<Shard>(), Ok(Shard::ALL));
        for bad in ["4/4", "1/0", "1", "a/b", "-1/2", ""] {
            assert!(bad.parse::<Shard>().is_err(), "{bad:?} parsed");
        }
        let shards: Vec<Shard> = (0..3).map(|i| Shard { index: i, count: 3 }).collect();
        for k in 0..100u64 {
            assert_eq!(shards.iter().filter(|s| s.owns(k)).count(), 1, "record {k}");
        }
        let mut filter = ShardFilter::new(shards[1]);
        let mine: Vec<u64> = (0..7).filter(|_| filter.mine()).collect();
        assert_eq!(mine.len(), 2); // records 1 and 4 of 0..7
    }

    #[test]
    fn paths_expand_globs_in_order_and_report_every_problem() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["b_imgs.tsv", "a_imgs.tsv", "c_texts.jsonl"] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        let d = dir.path().display();
        let found = expand_paths(&[format!("{d}/*_imgs.tsv"), format!("{d}/c_texts.jsonl")]).unwrap();
        let names: Vec<_> = found.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["a_imgs.tsv", "b_imgs.tsv", "c_texts.jsonl"]);
        let problems =
            expand_paths(&[format!("{d}/*.parquet"), format!("{d}/gone.tsv"), format!("{d}/[.tsv")]).unwrap_err();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].contains("matches no file") && problems[1].contains("does not exist"), "{problems:?}");
        assert_eq!(expand_paths(&[]).unwrap_err(), ["no input files given"]);
    }

    #[test]
    fn a_wildcard_does_not_match_a_hidden_file_as_in_a_shell() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["part-1.parquet", ".cnclip-tmp-7-part-0.parquet", "part-0.parquet"] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        let d = dir.path().display();
        let found = expand_paths(&[format!("{d}/*.parquet")]).unwrap();
        let names: Vec<_> = found.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["part-0.parquet", "part-1.parquet"]);
        // Named with its dot, a hidden file is still found.
        assert_eq!(expand_paths(&[format!("{d}/.cnclip-tmp-*")]).unwrap().len(), 1);
    }
}
