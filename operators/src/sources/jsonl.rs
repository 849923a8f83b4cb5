//! cn_clip's text annotations: `{split}_texts.jsonl`, one
//! `{"text_id": int, "text": str, "image_ids": [int, …]}` per line.
//!
//! Each line is parsed on its own, so one malformed line (bad JSON, not UTF-8, a missing field,
//! a string where an id should be) becomes a [`Rejected`] record naming its line, and the rest
//! of the file goes on.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayBuilder, ArrayRef, Int64Builder, ListBuilder, StringBuilder};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::RecordBatch;
use serde_json::Value;

use super::{Emit, ReadContext, SeenIds, ShardFilter, Source};
use crate::error::Result;
use crate::quarantine::Rejected;
use crate::spec::{BuildContext, NodeConfig, Operator, Role};
use schemars::JsonSchema;
use serde::Deserialize;

/// One text annotation.
#[derive(Debug, Clone, PartialEq)]
pub struct TextLine {
    pub text_id: i64,
    pub text: String,
    pub image_ids: Vec<i64>,
}

/// A well-formed line, deserialized without building a JSON tree.
#[derive(serde::Deserialize)]
struct Fast<'a> {
    text_id: i64,
    #[serde(borrow)]
    text: std::borrow::Cow<'a, str>,
    image_ids: Vec<i64>,
}

fn parse(line: &[u8]) -> Result<TextLine, (Option<String>, String)> {
    let text = std::str::from_utf8(line).map_err(|e| (None, format!("not valid UTF-8 ({e})")))?;
    // Typed first (the common case); anything it refuses goes the slow way, which says why
    // (or accepts what it takes, e.g. a repeated field: the last one wins, as in Python).
    if let Ok(fast) = serde_json::from_str::<Fast<'_>>(text) {
        return Ok(TextLine { text_id: fast.text_id, text: fast.text.into_owned(), image_ids: fast.image_ids });
    }
    let value: Value = serde_json::from_str(text).map_err(|e| (None, format!("malformed JSON: {e}")))?;
    let id = value.get("text_id").map(|v| v.to_string());
    let fail = |reason: String| (id.clone(), reason);
    let object = value.as_object().ok_or_else(|| fail("not a JSON object".into()))?;
    let field = |name: &str| object.get(name).ok_or_else(|| fail(format!("missing field `{name}`")));
    let text_id = field("text_id")?.as_i64().ok_or_else(|| fail("text_id is not an integer".into()))?;
    let text = field("text")?.as_str().ok_or_else(|| fail("text is not a string".into()))?.to_string();
    let image_ids = field("image_ids")?
        .as_array()
        .ok_or_else(|| fail("image_ids is not a list".into()))?
        .iter()
        .map(|v| {
            v.as_i64()
                .ok_or_else(|| fail(format!("image id {} is not an integer", super::quote(v.to_string().as_bytes()))))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(TextLine { text_id, text, image_ids })
}

/// Reads `path` line by line, calling `on_line` with each annotation or rejected record.
///
/// # Errors
/// IO errors (a missing file fails the job), or whatever `on_line` returns.
/// Lines longer than `max_line` bytes are rejected without being read whole.
pub fn for_each_line(
    path: &Path,
    max_line: usize,
    mut on_line: impl FnMut(Result<TextLine, Rejected>) -> Result<()>,
) -> Result<()> {
    let source = path.display().to_string();
    super::for_each_trimmed_line(path, max_line, |number, line| {
        let reject = |id: Option<String>, reason: String| Rejected {
            source: source.clone(),
            location: format!("line {number}"),
            id: id.map(|id| super::quote(id.as_bytes())),
            reason,
        };
        let record = match line {
            super::Line::Text(line) => parse(line).map_err(|(id, reason)| reject(id, reason)),
            super::Line::TooLong { bytes, prefix } => Err(reject(
                None,
                format!(
                    "line of {bytes} bytes is longer than the limit of {max_line} (max_record_bytes); it begins {:?}",
                    super::quote(prefix)
                ),
            )),
        };
        on_line(record)
    })
}

/// `{split}_texts.jsonl` files as a source of `texts` batches.
pub struct JsonlSource {
    pub paths: Vec<PathBuf>,
    /// Reject a text id seen before in this source (within the shard).
    pub dedupe: bool,
    /// Lines longer than this are rejected without being read whole.
    pub max_record_bytes: usize,
}

impl Source for JsonlSource {
    fn origin(&self) -> String {
        super::describe_paths(&self.paths)
    }

    fn estimated_records(&self) -> Option<u64> {
        super::estimate_lines(&self.paths)
    }

    fn schema(&self) -> SchemaRef {
        cnclip_schemas::texts()
    }

    fn read(self: Box<Self>, ctx: &ReadContext, emit: Emit<'_>) -> Result<()> {
        let mut batcher = TextsBatcher::new(ctx.batch_rows);
        let mut seen = SeenIds::new(self.dedupe);
        let mut shard = ShardFilter::new(ctx.shard);
        for path in &self.paths {
            for_each_line(path, self.max_record_bytes, |record| match record {
                _ if !shard.mine() => Ok(()),
                Err(rejected) => ctx.quarantine.reject(rejected),
                Ok(text) => match seen.duplicate(text.text_id, path, "text") {
                    Some(rejected) => ctx.quarantine.reject(rejected),
                    None => batcher.push(&text, emit),
                },
            })?;
        }
        batcher.flush(emit)
    }
}

/// `texts` as one batch of the `texts` table (a job's in-memory texts, zero-shot's prompts).
///
/// # Errors
/// Arrow errors building the batch.
pub fn texts_batch(texts: &[TextLine]) -> Result<RecordBatch> {
    let mut batcher = TextsBatcher::new(texts.len());
    let mut out = None;
    let mut keep = |batch| {
        out = Some(batch);
        Ok(())
    };
    for text in texts {
        batcher.push(text, &mut keep)?;
    }
    batcher.flush(&mut keep)?;
    Ok(out.unwrap_or_else(|| RecordBatch::new_empty(cnclip_schemas::texts())))
}

/// Accumulates rows of the `texts` table.
pub(crate) struct TextsBatcher {
    batch_rows: usize,
    ids: Int64Builder,
    texts: StringBuilder,
    image_ids: ListBuilder<Int64Builder>,
    bytes: usize,
}

/// A builder of the `texts` table's `image_ids` column (its list item field as the contract
/// declares it).
pub(crate) fn image_ids_builder() -> ListBuilder<Int64Builder> {
    let item = match cnclip_schemas::texts().field(2).data_type() {
        DataType::List(item) => item.clone(),
        other => unreachable!("texts.image_ids is {other}"),
    };
    ListBuilder::new(Int64Builder::new()).with_field(item)
}

impl TextsBatcher {
    pub(crate) fn new(batch_rows: usize) -> Self {
        TextsBatcher {
            batch_rows: batch_rows.max(1),
            ids: Int64Builder::new(),
            texts: StringBuilder::new(),
            image_ids: image_ids_builder(),
            bytes: 0,
        }
    }

    pub(crate) fn push(&mut self, text: &TextLine, emit: Emit<'_>) -> Result<()> {
        self.ids.append_value(text.text_id);
        self.texts.append_value(&text.text);
        self.image_ids.values().append_slice(&text.image_ids);
        self.image_ids.append(true);
        self.bytes += text.text.len() + 8 * text.image_ids.len();
        if self.ids.len() >= self.batch_rows || self.bytes >= super::BATCH_BYTES { self.flush(emit) } else { Ok(()) }
    }

    pub(crate) fn flush(&mut self, emit: Emit<'_>) -> Result<()> {
        if self.ids.len() == 0 {
            return Ok(());
        }
        self.bytes = 0;
        let columns: Vec<ArrayRef> =
            vec![Arc::new(self.ids.finish()), Arc::new(self.texts.finish()), Arc::new(self.image_ids.finish())];
        emit(RecordBatch::try_new(cnclip_schemas::texts(), columns)?)
    }
}

/// cn_clip text files (`{"text_id", "text", "image_ids"}` per line) → texts.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JsonlConfig {
    /// Files and globs.
    pub paths: Vec<String>,
    /// Quarantine a line whose text id repeats an earlier line's.
    #[serde(default = "super::yes")]
    pub dedupe: bool,
    /// Longer lines are quarantined without being read whole.
    #[serde(default = "super::default_max_record_bytes")]
    pub max_record_bytes: usize,
}

impl NodeConfig for JsonlConfig {
    const KIND: &'static str = "jsonl";
    const ROLE: Role = Role::Source;
    fn build(self, cx: &BuildContext) -> Result<Operator, Vec<String>> {
        let paths = cx.files(&self.paths)?;
        Ok(Operator::Source(Box::new(JsonlSource {
            paths,
            dedupe: self.dedupe,
            max_record_bytes: self.max_record_bytes,
        })))
    }

    fn known_schema(&self) -> Option<SchemaRef> {
        Some(cnclip_schemas::texts())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_and_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jsonl");
        let mut content = b"{\"text_id\": 1, \"text\": \"\xe7\x8c\xab\", \"image_ids\": [5, 6]}\n".to_vec();
        content.extend_from_slice(b"{\"text_id\": 2, \"text\": \"x\"}\n{bad json\n\xff\xfe\n");
        content.extend_from_slice(b"{\"text_id\": \"3\", \"text\": \"x\", \"image_ids\": []}\n");
        content.extend_from_slice(b"{\"text_id\": 4, \"text\": \"x\", \"image_ids\": [\"7\"]}\n");
        std::fs::write(&path, content).unwrap();
        let mut seen = Vec::new();
        for_each_line(&path, crate::sources::MAX_RECORD_BYTES, |r| {
            seen.push(match r {
                Ok(t) => format!("ok {} {} {:?}", t.text_id, t.text, t.image_ids),
                Err(r) => format!("{} {:?}: {}", r.location, r.id, r.reason.split(':').next().unwrap()),
            });
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen,
            [
                "ok 1 猫 [5, 6]",
                "line 2 Some(\"2\"): missing field `image_ids`",
                "line 3 None: malformed JSON",
                "line 4 None: not valid UTF-8 (invalid utf-8 sequence of 1 bytes from index 0)",
                "line 5 Some(\"\\\"3\\\"\"): text_id is not an integer",
                "line 6 Some(\"4\"): image id \"7\" is not an integer",
            ]
        );
    }
}
