//! cn_clip's image shards: `{split}_imgs.tsv`, one `image_id<TAB>base64` per line.
//!
//! Streams the file in large buffered reads and yields each line's id and base64 field as
//! slices (no copy, no decode: `build-lmdb` stores the base64 text as cn_clip does). Lines are
//! checked for what would break a reader later — a missing or extra tab, a non-integer id, an
//! empty value, characters outside both base64 alphabets, an impossible length — and such lines
//! come back as [`Rejected`]. CRLF line ends are tolerated; blank lines carry no record.

use std::path::{Path, PathBuf};

use arrow::datatypes::SchemaRef;

use super::{Emit, IdBytesBatcher, Line, ReadContext, SeenIds, ShardFilter, Source};
use crate::decoders::base64::Base64Error;
use crate::error::Result;
use crate::quarantine::Rejected;
use crate::spec::{BuildContext, NodeConfig, Operator, Role};
use schemars::JsonSchema;
use serde::Deserialize;

/// One image line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLine<'a> {
    /// The id as written (for messages; an LMDB is keyed by `image_id`'s decimal text).
    pub id: &'a str,
    pub image_id: i64,
    /// The base64 field, unchanged.
    pub base64: &'a [u8],
    /// Where the base64 field starts in the file (a ranged read of `base64.len()` bytes from
    /// here reads it again).
    pub offset: u64,
}

/// Whether `b` is in either base64 alphabet (standard `+/`, URL-safe `-_`), without a table
/// lookup, so the loop over a field vectorises (16–32 bytes per instruction).
#[inline(always)]
fn is_base64(b: u8) -> bool {
    let upper = b.wrapping_sub(b'A') < 26;
    let lower = b.wrapping_sub(b'a') < 26;
    let digit = b.wrapping_sub(b'0') < 10;
    upper | lower | digit | (b == b'+') | (b == b'/') | (b == b'-') | (b == b'_')
}

/// Whether `field` can be base64 in the standard or URL-safe alphabet, padded or not.
///
/// # Errors
/// A tab in the field, the first byte in neither alphabet, or a truncated length.
pub fn plausible_base64(field: &[u8]) -> Result<(), Base64Error> {
    let body = field.strip_suffix(b"==").or_else(|| field.strip_suffix(b"=")).unwrap_or(field);
    // The common case in branch-free passes over 64-byte blocks; the position only on failure.
    let blocks = body.chunks_exact(64);
    let tail_ok = blocks.remainder().iter().all(|&c| is_base64(c));
    let blocks_ok = blocks.fold(true, |ok, block| ok & block.iter().fold(true, |all, &c| all & is_base64(c)));
    if !(tail_ok && blocks_ok) {
        if field.contains(&b'\t') {
            return Err(Base64Error::ExtraField);
        }
        let at = body.iter().position(|&c| !is_base64(c)).expect("a byte failed");
        return Err(Base64Error::InvalidByte { at, byte: body[at] });
    }
    if body.len() % 4 == 1 {
        return Err(Base64Error::Truncated { len: body.len() });
    }
    Ok(())
}

/// Reads `path` line by line, calling `on_line` with each good line or rejected record.
///
/// # Errors
/// IO errors (a missing file is structural: it fails the job), or whatever `on_line` returns.
/// Lines longer than `max_line` bytes are rejected without being read whole.
pub fn for_each_line(
    path: &Path,
    max_line: usize,
    mut on_line: impl FnMut(Result<ImageLine<'_>, Rejected>) -> Result<()>,
) -> Result<()> {
    let source = path.display().to_string();
    super::for_each_trimmed_line_at(path, max_line, |number, at, line| {
        let reject = |id: Option<&[u8]>, reason: String| Rejected {
            source: source.clone(),
            location: format!("line {number}"),
            id: id.map(super::quote),
            reason,
        };
        let line = match line {
            Line::Text(line) => line,
            Line::TooLong { bytes, prefix } => {
                let reason = format!(
                    "line of {bytes} bytes is longer than the limit of {max_line} (max_record_bytes); it begins {:?}",
                    super::quote(prefix)
                );
                return on_line(Err(reject(None, reason)));
            }
        };
        // The id is short: find its tab, and leave the long value to the base64 check (which
        // also catches a second tab) instead of scanning it twice.
        let Some(tab) = line.iter().position(|&b| b == b'\t') else {
            return on_line(Err(reject(Some(line), "no tab: expected image_id<TAB>base64".into())));
        };
        let (id, value) = (&line[..tab], &line[tab + 1..]);
        let record = match std::str::from_utf8(id).ok().and_then(|s| s.parse::<i64>().ok().map(|n| (s, n))) {
            None => Err(reject(Some(id), "image id is not an integer".into())),
            Some(_) if value.is_empty() => Err(reject(Some(id), "empty image value".into())),
            Some((id_text, image_id)) => match plausible_base64(value) {
                Err(reason) => Err(reject(Some(id), reason.to_string())),
                Ok(()) => Ok(ImageLine { id: id_text, image_id, base64: value, offset: at + tab as u64 + 1 }),
            },
        };
        on_line(record)
    })
}

/// Which table a `tsv` source emits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TsvTable {
    /// `image_id`, `image_base64` (the field as written).
    #[default]
    Images,
    /// Where each good line's base64 field lies, not copied: `file` (its place among the
    /// source's files), `image_id`, `offset`, `len` (see [`locations_schema`]). Training reads
    /// a TSV's images in place through this index (`train_shards`).
    Locations,
}

/// The columns of a TSV `locations` table.
pub mod location_columns {
    pub const FILE: &str = "file";
    pub const OFFSET: &str = "offset";
    pub const LEN: &str = "len";
}

/// The `locations` table of TSV image shards: `file`, `image_id`, and the `offset` and `len`
/// in bytes of the line's base64 field.
pub fn locations_schema() -> SchemaRef {
    use arrow::datatypes::{DataType, Field, Schema};
    use location_columns::*;
    let int = |name: &str| Field::new(name, DataType::Int64, false);
    std::sync::Arc::new(Schema::new(vec![int(FILE), int(cnclip_schemas::columns::IMAGE_ID), int(OFFSET), int(LEN)]))
}

/// `{split}_imgs.tsv` shards as a source of `images_base64` batches (or their `locations`).
pub struct TsvSource {
    pub paths: Vec<PathBuf>,
    pub table: TsvTable,
    /// Reject an image id seen before in this source (within the shard).
    pub dedupe: bool,
    /// Lines longer than this are rejected without being read whole.
    pub max_record_bytes: usize,
}

impl Source for TsvSource {
    fn origin(&self) -> String {
        super::describe_paths(&self.paths)
    }

    fn estimated_records(&self) -> Option<u64> {
        super::estimate_lines(&self.paths)
    }

    fn schema(&self) -> SchemaRef {
        match self.table {
            TsvTable::Images => cnclip_schemas::images_base64(),
            TsvTable::Locations => locations_schema(),
        }
    }

    fn read(self: Box<Self>, ctx: &ReadContext, emit: Emit<'_>) -> Result<()> {
        let mut batcher = IdBytesBatcher::new(self.schema(), ctx.batch_rows);
        let mut locations = Locations::new(ctx.batch_rows);
        let mut seen = SeenIds::new(self.dedupe);
        let mut shard = ShardFilter::new(ctx.shard);
        for (file, path) in self.paths.iter().enumerate() {
            for_each_line(path, self.max_record_bytes, |record| match record {
                _ if !shard.mine() => Ok(()),
                Err(rejected) => ctx.quarantine.reject(rejected),
                Ok(line) => match seen.duplicate(line.image_id, path, "image") {
                    Some(rejected) => ctx.quarantine.reject(rejected),
                    None if self.table == TsvTable::Locations => locations.push(file, &line, emit),
                    None => batcher.push(line.image_id, line.base64, emit),
                },
            })?;
        }
        match self.table {
            TsvTable::Images => batcher.flush(emit),
            TsvTable::Locations => locations.flush(emit),
        }
    }
}

/// Rows of the `locations` table, emitted `rows` at a time.
struct Locations {
    columns: [arrow::array::Int64Builder; 4],
    rows: usize,
}

impl Locations {
    fn new(rows: usize) -> Self {
        Locations { columns: Default::default(), rows: rows.max(1) }
    }

    fn push(&mut self, file: usize, line: &ImageLine<'_>, emit: Emit<'_>) -> Result<()> {
        use arrow::array::ArrayBuilder;
        let values = [file as i64, line.image_id, line.offset as i64, line.base64.len() as i64];
        for (column, value) in self.columns.iter_mut().zip(values) {
            column.append_value(value);
        }
        if self.columns[0].len() >= self.rows { self.flush(emit) } else { Ok(()) }
    }

    fn flush(&mut self, emit: Emit<'_>) -> Result<()> {
        use arrow::array::ArrayBuilder;
        if self.columns[0].is_empty() {
            return Ok(());
        }
        let columns = self.columns.iter_mut().map(|c| std::sync::Arc::new(c.finish()) as arrow::array::ArrayRef);
        emit(arrow::array::RecordBatch::try_new(locations_schema(), columns.collect())?)
    }
}

/// cn_clip image shards (`image_id<TAB>base64` lines) → images_base64, or where each lies.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TsvConfig {
    /// Files and globs.
    pub paths: Vec<String>,
    /// What to emit: the images (`images`, the default) or where each lies (`locations`).
    #[serde(default)]
    pub table: TsvTable,
    /// Quarantine a line whose image id repeats an earlier line's.
    #[serde(default = "super::yes")]
    pub dedupe: bool,
    /// Longer lines are quarantined without being read whole.
    #[serde(default = "super::default_max_record_bytes")]
    pub max_record_bytes: usize,
}

impl NodeConfig for TsvConfig {
    const KIND: &'static str = "tsv";
    const ROLE: Role = Role::Source;
    fn build(self, cx: &BuildContext) -> Result<Operator, Vec<String>> {
        let paths = cx.files(&self.paths)?;
        Ok(Operator::Source(Box::new(TsvSource {
            paths,
            table: self.table,
            dedupe: self.dedupe,
            max_record_bytes: self.max_record_bytes,
        })))
    }

    fn known_schema(&self) -> Option<SchemaRef> {
        Some(match self.table {
            TsvTable::Images => cnclip_schemas::images_base64(),
            TsvTable::Locations => locations_schema(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_check_accepts_both_alphabets_with_or_without_padding() {
        for ok in [&b"aGVsbG8="[..], b"aGVsbG8", b"-_-_", b"+/+/", b"YQ=="] {
            assert!(plausible_base64(ok).is_ok(), "{:?}", String::from_utf8_lossy(ok));
        }
        assert!(plausible_base64(b"aGVs bG8=").is_err());
        assert!(plausible_base64(b"aGVsb").is_err());
    }

    #[test]
    fn lines_are_parsed_or_rejected_with_their_number() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x_imgs.tsv");
        std::fs::write(&path, "1\taGk=\r\n\nabc\taGk=\n2\n3\t\n4\taGk=\textra\n5\t%%%\n6\taGk\n").unwrap();
        let mut seen = Vec::new();
        for_each_line(&path, crate::sources::MAX_RECORD_BYTES, |r| {
            seen.push(match r {
                Ok(line) => format!("ok {} {} @{}", line.id, String::from_utf8_lossy(line.base64), line.offset),
                Err(rejected) => format!("{}: {}", rejected.location, rejected.reason),
            });
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen,
            [
                "ok 1 aGk= @2",
                "line 3: image id is not an integer",
                "line 4: no tab: expected image_id<TAB>base64",
                "line 5: empty image value",
                "line 6: more than two tab-separated fields",
                "line 7: byte 0 of the base64 field is '%', not base64",
                "ok 6 aGk @44",
            ]
        );
    }
}
