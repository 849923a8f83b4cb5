//! `cnclip evaluation` (`eval`) and `evaluation-tr`: cn_clip's `eval/evaluation.py` and
//! `evaluation_tr.py` — recall@1/5/10 of top-10 predictions against the ground truth, written
//! as the same JSON (`{"success": true, "score", "scoreJson": {…}}`), and on an invalid
//! submission the same error JSON (`"success": false`) from the same checks in the same order,
//! with the same messages (quirks included: a non-integer query id on the first line is
//! reported as Python's `UnboundLocalError`, on a later line with the previous line's id). Output is
//! formatted as Python's `json.dump` (ASCII, `", "` / `": "`, floats as `repr`).
//!
//! And `cnclip transform-ir-annotation-to-tr`: `transform_ir_annotation_to_tr.py`, texts →
//! images annotations turned into images → texts (`{input stem}.tr.jsonl`).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use cnclip_operators::sinks::jsonl::python_float;
use cnclip_operators::storage;
use serde_json::Value;

/// Texts → images (`evaluation.py`) or images → texts (`evaluation_tr.py`).
#[derive(Clone, Copy)]
struct Direction {
    query: &'static str,
    targets: &'static str,
    /// `Text_id` / `Image_id` in messages.
    query_title: &'static str,
    target: &'static str,
    /// `images` / `texts` in the duplicate message.
    plural: &'static str,
    tr: bool,
}

const TEXT_TO_IMAGE: Direction = Direction {
    query: "text_id",
    targets: "image_ids",
    query_title: "Text_id",
    target: "image_id",
    plural: "images",
    tr: false,
};
const IMAGE_TO_TEXT: Direction = Direction {
    query: "image_id",
    targets: "text_ids",
    query_title: "Image_id",
    target: "text_id",
    plural: "texts",
    tr: true,
};

pub use crate::evaluation_engine::Engine;

/// The recall query (`jobs/sql/recall.sql`).
pub const RECALL_SQL: &str = include_str!("../../sql/recall.sql");

#[derive(clap::Args, Debug, Clone, PartialEq, serde::Serialize)]
pub struct Args {
    /// Where the recall is computed: in Rust as cn_clip does, or by jobs/sql/recall.sql on DataFusion.
    #[arg(long, value_enum, default_value_t = Engine::Direct)]
    pub engine: Engine,
    /// The ground truth (e.g. test_texts.jsonl).
    pub standard_path: PathBuf,
    /// The predictions (make-topk-predictions' output).
    pub submit_path: PathBuf,
    /// Where the score JSON goes.
    pub out_path: PathBuf,
    /// Run the SQL engine on a Ballista cluster (`df://HOST:PORT`, see `cnclip cluster`); its
    /// input tables are written next to OUT_PATH, which every executor must read.
    #[arg(long, value_name = "df://HOST:PORT")]
    pub cluster: Option<String>,
}

#[derive(clap::Args)]
pub struct TransformArgs {
    /// A texts → images annotation file (`{"text_id", "image_ids"}` per line).
    #[arg(long)]
    input: String,
}

/// Marks a float JSON cannot carry (`NaN`, `Infinity`, or a number past f64's range, which
/// Python's `json` reads as `inf`) inside a string value: `\u{10FFFF}` and Python's `str()`
/// of it (`nan`, `inf`, `-inf`). See [`python_literals`].
const NON_FINITE: char = '\u{10FFFF}';

/// Marks an integer past 64 bits (Python's `int` has no bound) inside a string value:
/// `\u{10FFFE}` and its digits. See [`python_literals`].
const BIG_INT: char = '\u{10FFFE}';

/// The digits of an integer [`python_literals`] marked, if `v` is one.
fn big_int(v: &Value) -> Option<&str> {
    match v {
        Value::String(s) => s.strip_prefix(BIG_INT),
        _ => None,
    }
}

/// The Python `str()` of a float [`python_literals`] marked, if `v` is one.
fn non_finite(v: &Value) -> Option<&str> {
    match v {
        Value::String(s) => s.strip_prefix(NON_FINITE),
        _ => None,
    }
}

/// A submission line as Python's `json.loads` reads it, rewritten for serde_json: `NaN`,
/// `Infinity`, `-Infinity` and numbers past f64's range (`1e400`) become marked strings
/// ([`NON_FINITE`]: floats to every check, as in Python), integers past 64 bits become marked
/// strings ([`BIG_INT`]: ints to every check), and the integer `-0` becomes `0` (Python's
/// `int`, where serde_json reads a float). Strings are copied as they are.
fn python_literals(line: &str) -> String {
    let bytes = line.as_bytes();
    let mut out = String::with_capacity(line.len());
    let mut i = 0;
    let marked = |word: &str| format!("\"{NON_FINITE}{word}\"");
    while i < bytes.len() {
        let rest = &line[i..];
        match bytes[i] {
            b'"' => {
                // A string: up to its closing quote, escapes skipped.
                let mut j = i + 1;
                while j < bytes.len() && bytes[j] != b'"' {
                    j += if bytes[j] == b'\\' { 2 } else { 1 };
                }
                let end = (j + 1).min(bytes.len());
                out.push_str(&line[i..end]);
                i = end;
            }
            _ if rest.starts_with("NaN") => {
                out.push_str(&marked("nan"));
                i += 3;
            }
            _ if rest.starts_with("Infinity") => {
                out.push_str(&marked("inf"));
                i += 8;
            }
            _ if rest.starts_with("-Infinity") => {
                out.push_str(&marked("-inf"));
                i += 9;
            }
            b'-' | b'0'..=b'9' => {
                let len =
                    rest.bytes().take_while(|b| matches!(b, b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')).count();
                let token = &rest[..len.max(1)];
                let integer = token.trim_start_matches('-').bytes().all(|b| b.is_ascii_digit());
                match token.parse::<f64>() {
                    _ if integer && token == "-0" => out.push('0'),
                    _ if integer && token.parse::<i64>().is_err() && token.len() > 1 => {
                        out.push_str(&format!("\"{BIG_INT}{token}\""));
                    }
                    Ok(x) if !integer && x.is_infinite() => out.push_str(&marked(if x > 0.0 { "inf" } else { "-inf" })),
                    _ => out.push_str(token),
                }
                i += token.len();
            }
            _ => {
                let c = rest.chars().next().expect("not at the end");
                out.push(c);
                i += c.len_utf8();
            }
        }
    }
    out
}

/// Python's `isinstance(v, int)` for a JSON value (`bool` is an `int` in Python).
fn py_int(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::Bool(b) => Some(i64::from(*b)),
        _ => None,
    }
}

/// Python's `str()` of a value `json.loads` made.
fn py_str(v: &Value) -> String {
    if let Some(word) = non_finite(v).or_else(|| big_int(v)) {
        return word.to_string();
    }
    match v {
        Value::String(s) => s.clone(),
        other => py_repr(other),
    }
}

/// Python's `repr()` of a value `json.loads` made.
fn py_repr(v: &Value) -> String {
    if let Some(word) = non_finite(v).or_else(|| big_int(v)) {
        return word.to_string();
    }
    match v {
        Value::Null => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Number(n) => match n.as_i64() {
            Some(i) => i.to_string(),
            None => n.as_u64().map_or_else(|| python_float(n.as_f64().unwrap_or(f64::NAN)), |u| u.to_string()),
        },
        Value::String(s) => {
            let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
            let mut out = String::from(quote);
            for c in s.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\t' => out.push_str("\\t"),
                    c if c == quote => {
                        out.push('\\');
                        out.push(c);
                    }
                    c if (c as u32) < 0x20 || c as u32 == 0x7f => out.push_str(&format!("\\x{:02x}", c as u32)),
                    c => out.push(c),
                }
            }
            out.push(quote);
            out
        }
        Value::Array(items) => format!("[{}]", items.iter().map(py_repr).collect::<Vec<_>>().join(", ")),
        Value::Object(map) => format!(
            "{{{}}}",
            map.iter()
                .map(|(k, v)| format!("{}: {}", py_repr(&Value::String(k.clone())), py_repr(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Python's `json.dumps` (default settings) of a value.
fn py_dumps(v: &Value) -> String {
    if let Some(digits) = big_int(v) {
        return digits.to_string();
    }
    match non_finite(v) {
        Some("nan") => return "NaN".into(),
        Some("inf") => return "Infinity".into(),
        Some(_) => return "-Infinity".into(),
        None => {}
    }
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => i.to_string(),
            (None, Some(u)) => u.to_string(),
            _ => python_float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => {
            let mut out = String::from('"');
            for c in s.chars() {
                match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\t' => out.push_str("\\t"),
                    '\u{8}' => out.push_str("\\b"),
                    '\u{c}' => out.push_str("\\f"),
                    c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                        let mut units = [0u16; 2];
                        for unit in c.encode_utf16(&mut units) {
                            out.push_str(&format!("\\u{unit:04x}"));
                        }
                    }
                    c => out.push(c),
                }
            }
            out.push('"');
            out
        }
        Value::Array(items) => format!("[{}]", items.iter().map(py_dumps).collect::<Vec<_>>().join(", ")),
        Value::Object(map) => format!(
            "{{{}}}",
            map.iter()
                .map(|(k, v)| format!("{}: {}", py_dumps(&Value::String(k.clone())), py_dumps(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// A ground truth or a submission that cn_clip's checks refuse, with cn_clip's message word for
/// word (Python's exception text; an errno alone for an unreadable file): the score file
/// carries it as `errorMsg`, so the message is the error's whole content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// Why [`recall`] has no recall to give.
#[derive(Debug, thiserror::Error)]
pub enum RecallError {
    /// cn_clip's checks refuse the submission or the ground truth.
    #[error(transparent)]
    Refused(#[from] Refused),
    /// The evaluation itself failed (its causes on one line), which says nothing about the
    /// submission.
    #[error("{0:#}")]
    Failed(anyhow::Error),
    /// The score JSON did not read back.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

/// The ground truth: query id → the ids it should find.
fn read_reference(path: &PathBuf, d: Direction) -> Result<Vec<(i64, Vec<i64>)>, Refused> {
    let text = storage::read_to_string(path)
        .map_err(|e| Refused(format!("[Errno 2] No such file or directory: '{}' ({e})", path.display())))?;
    let mut order: Vec<i64> = Vec::new();
    let mut reference: HashMap<i64, Vec<i64>> = HashMap::new();
    for line in text.lines() {
        let obj: Value = serde_json::from_str(line.trim()).map_err(|e| Refused(e.to_string()))?;
        let id = obj.get(d.query).and_then(py_int).ok_or_else(|| Refused(d.query.to_string()))?;
        let targets = obj.get(d.targets).and_then(Value::as_array).ok_or_else(|| Refused(d.targets.to_string()))?;
        let targets = targets.iter().filter_map(py_int).collect();
        if reference.insert(id, targets).is_none() {
            order.push(id);
        }
    }
    Ok(order
        .into_iter()
        .map(|id| {
            let t = reference.remove(&id).unwrap_or_default();
            (id, t)
        })
        .collect())
}

/// `read_submission`: every check of cn_clip's, in its order, with its message.
fn read_submission(
    path: &PathBuf,
    reference: &[(i64, Vec<i64>)],
    k: usize,
    d: Direction,
) -> Result<HashMap<i64, Vec<i64>>, Refused> {
    if !path.exists() {
        return Err(Refused("The submission file is not found!".into()));
    }
    // cn_clip reports an unreadable file by the exception's first argument: the errno for an
    // OSError (21 for a directory, written as a number), the codec's name for bytes that are
    // not UTF-8.
    let text = storage::read_to_string(path).map_err(|e| {
        Refused(match (e.raw_os_error(), e.kind()) {
            (Some(errno), _) => errno.to_string(),
            (None, std::io::ErrorKind::InvalidData) => "utf-8".to_string(),
            _ => e.to_string(),
        })
    })?;
    let mut submission: HashMap<i64, Vec<i64>> = HashMap::new();
    let mut last_query: Option<Value> = None;
    // An integer past 64 bits is a valid id to Python, equal to no reference id: each one
    // stands in as an i64 from the bottom of the range that no reference id uses, the same for
    // the same digits (messages show the digits).
    let used: BTreeSet<i64> =
        reference.iter().flat_map(|(q, t)| std::iter::once(*q).chain(t.iter().copied())).collect();
    let mut stand_ins: HashMap<String, i64> = HashMap::new();
    let mut cursor = i64::MIN;
    let mut int_of = |v: &Value| -> Option<i64> {
        let Some(digits) = big_int(v) else { return py_int(v) };
        if let Some(&id) = stand_ins.get(digits) {
            return Some(id);
        }
        while used.contains(&cursor) {
            cursor += 1;
        }
        stand_ins.insert(digits.to_string(), cursor);
        cursor += 1;
        Some(cursor - 1)
    };
    for raw in text.split_inclusive('\n') {
        let line = raw.trim();
        let Ok(obj) = serde_json::from_str::<Value>(&python_literals(line)) else {
            return Err(Refused(format!("Cannot parse this line into json object: {line}")));
        };
        let contains = |key: &str| match &obj {
            v if non_finite(v).is_some() => Err(Refused("argument of type 'float' is not iterable".to_string())),
            v if big_int(v).is_some() => Err(Refused("argument of type 'int' is not iterable".to_string())),
            Value::Object(map) => Ok(map.contains_key(key)),
            Value::Array(items) => Ok(items.iter().any(|v| v.as_str() == Some(key))),
            Value::String(s) => Ok(s.contains(key)),
            Value::Null => Err(Refused("argument of type 'NoneType' is not iterable".to_string())),
            Value::Bool(_) => Err(Refused("argument of type 'bool' is not iterable".to_string())),
            Value::Number(n) if n.is_f64() => Err(Refused("argument of type 'float' is not iterable".to_string())),
            Value::Number(_) => Err(Refused("argument of type 'int' is not iterable".to_string())),
        };
        if !contains(d.query)? {
            return Err(Refused(format!("There exists one line not containing {}: {line}", d.query)));
        }
        let index = |key: &str| -> Result<&Value, Refused> {
            match &obj {
                Value::Object(map) => map.get(key).ok_or_else(|| Refused(key.to_string())),
                Value::Array(_) => Err(Refused("list indices must be integers or slices, not str".into())),
                _ => Err(Refused("string indices must be integers, not 'str'".into())),
            }
        };
        let query_value = index(d.query)?;
        let Some(query) = int_of(query_value) else {
            return Err(Refused(if d.tr {
                format!(
                    "Found an invalid image_id {}, it should be an integer (not string), please check your schema",
                    py_str(query_value)
                )
            } else {
                match &last_query {
                    // cn_clip formats the message with `qid` before assigning it: the previous
                    // line's id, or (first line) Python's UnboundLocalError, as 3.11+ words it.
                    None => "cannot access local variable 'qid' where it is not associated with a value".into(),
                    Some(previous) => format!(
                        "Found an invalid text_id {}, it should be an integer (not string), please check your schema",
                        py_str(previous)
                    ),
                }
            }));
        };
        last_query = Some(query_value.clone());
        let query_text = py_str(query_value);
        if !contains(d.targets)? {
            return Err(Refused(format!("There exists one line not containing the predicted {}: {line}", d.targets)));
        }
        let Value::Array(targets) = index(d.targets)? else {
            return Err(Refused(format!(
                "The {} field of {} {query_text} is not a list, please check your schema",
                d.targets, d.query
            )));
        };
        if targets.len() != k {
            return Err(Refused(format!(
                "{} {query_text} has wrong number of predicted {}! Require {k}, but {} founded.",
                d.query_title,
                d.targets,
                targets.len()
            )));
        }
        let mut ids = Vec::with_capacity(k);
        for (rank, target) in targets.iter().enumerate() {
            match int_of(target) {
                Some(id) => ids.push(id),
                None => {
                    return Err(Refused(format!(
                        "{} {query_text} has an invalid predicted {} {} at rank {}, it should be an integer (not string), please check your schema",
                        d.query_title,
                        d.target,
                        py_str(target),
                        rank + 1
                    )));
                }
            }
        }
        if ids.iter().collect::<BTreeSet<_>>().len() != k {
            return Err(Refused(format!(
                "{} {query_text} has duplicate topk {} in your prediction. Pleace check again!",
                d.query_title, d.plural
            )));
        }
        submission.insert(query, ids);
    }
    let missing: BTreeSet<i64> =
        reference.iter().map(|(id, _)| *id).filter(|id| !submission.contains_key(id)).collect();
    if !missing.is_empty() {
        let list: Vec<String> = missing.iter().map(i64::to_string).collect();
        return Err(Refused(format!(
            "The following {}s have no prediction in your submission, please check again: {}",
            d.query,
            list.join(", ")
        )));
    }
    Ok(submission)
}

/// The score JSON of a submission, or the error JSON (and its message) for a submission that
/// fails cn_clip's checks — or `Err` when the engine itself failed (the SQL engine's cluster
/// unreachable, say): that says nothing about the submission, so no score file is written.
fn evaluate(
    standard: &PathBuf,
    submit: &PathBuf,
    d: Direction,
    engine: Engine,
    cluster: Option<(&str, &Path)>,
) -> Result<(String, Option<String>)> {
    let mut failed = None;
    let result = (|| -> Result<[f64; 3], Refused> {
        let reference = read_reference(standard, d)?;
        let predictions = read_submission(submit, &reference, 10, d)?;
        if engine == Engine::Sql {
            if reference.is_empty() {
                return Err(Refused("float division by zero".into()));
            }
            return recall_sql(&reference, &predictions, cluster).map_err(|e| {
                let message = format!("{e:#}");
                failed = Some(e);
                Refused(message)
            });
        }
        let mut hits = [0usize; 3];
        for (id, truth) in &reference {
            let predicted = &predictions[id];
            for (hit, k) in hits.iter_mut().zip([1, 5, 10]) {
                if truth.iter().any(|t| predicted[..k].contains(t)) {
                    *hit += 1;
                }
            }
        }
        if reference.is_empty() {
            return Err(Refused("float division by zero".into()));
        }
        Ok(hits.map(|h| h as f64 * 1.0 / reference.len() as f64))
    })();
    // Built as text: cn_clip's key order (serde_json's maps sort their keys).
    match result {
        Ok([r1, r5, r10]) => {
            let mean = (r1 + r5 + r10) / 3.0;
            let f = |x: f64| python_float(x * 100.0);
            let json = format!(
                "{{\"success\": true, \"score\": {}, \"scoreJson\": {{\"score\": {}, \"mean_recall\": {}, \"r1\": {}, \"r5\": {}, \"r10\": {}}}}}",
                f(mean),
                f(mean),
                f(mean),
                f(r1),
                f(r5),
                f(r10)
            );
            Ok((json, None))
        }
        Err(_) if failed.is_some() => Err(failed.expect("checked").context("the SQL engine failed")),
        Err(Refused(message)) => {
            // An errno (see `read_submission`) is a number in cn_clip's JSON; messages are text.
            let m = match message.parse::<i64>() {
                Ok(errno) => errno.to_string(),
                Err(_) => py_dumps(&Value::String(message.clone())),
            };
            let json = format!(
                "{{\"errorDetail\": {m}, \"errorMsg\": {m}, \"score\": 0, \"scoreJson\": {{}}, \"success\": false}}"
            );
            Ok((json, Some(message)))
        }
    }
}

/// Recall@1/5/10 by [`RECALL_SQL`] over tables of the checked inputs: in memory, or on a
/// cluster (address, a path whose directory the executors share) as Parquet files there.
fn recall_sql(
    reference: &[(i64, Vec<i64>)],
    predictions: &HashMap<i64, Vec<i64>>,
    cluster: Option<(&str, &Path)>,
) -> Result<[f64; 3]> {
    use arrow::array::{Array, Int64Array, Int64Builder, ListBuilder};
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;
    let table = |ids: Vec<i64>, lists: Vec<&Vec<i64>>, name: &str| -> Result<arrow::record_batch::RecordBatch> {
        let mut builder = ListBuilder::new(Int64Builder::new());
        for list in lists {
            builder.values().append_slice(list);
            builder.append(true);
        }
        let lists = builder.finish();
        let schema = Arc::new(Schema::new(vec![
            Field::new("query_id", DataType::Int64, false),
            Field::new(name, lists.data_type().clone(), false),
        ]));
        Ok(arrow::record_batch::RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(ids)), Arc::new(lists)])?)
    };
    let truth =
        table(reference.iter().map(|(id, _)| *id).collect(), reference.iter().map(|(_, t)| t).collect(), "targets")?;
    let mut predicted: Vec<(&i64, &Vec<i64>)> = predictions.iter().collect();
    predicted.sort();
    let predicted = table(
        predicted.iter().map(|(id, _)| **id).collect(),
        predicted.iter().map(|(_, p)| *p).collect(),
        "predicted",
    )?;
    let scratch = cluster.map(|(_, near)| crate::sql::scratch(near)).transpose()?;
    let scratch_dir = scratch.as_ref().map(|d| d.path());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let batches = runtime.block_on(async {
        let ctx = crate::sql::session(cluster.map(|(url, _)| url)).await?;
        crate::sql::register_batch(&ctx, "truth", truth, scratch_dir).await?;
        crate::sql::register_batch(&ctx, "predictions", predicted, scratch_dir).await?;
        let frame = ctx.sql(RECALL_SQL).await?;
        anyhow::Ok(frame.collect().await?)
    })?;
    use arrow::array::AsArray;
    let batch = batches.first().context("the recall query returned nothing")?;
    let value = |i: usize| batch.column(i).as_primitive::<arrow::datatypes::Float64Type>().value(0);
    Ok([value(0), value(1), value(2)])
}

/// Recall@1/5/10 (percent) of `submit` against `standard`.
///
/// # Errors
/// [`RecallError::Refused`] with the checks' message, or the evaluation's own failure.
pub fn recall(standard: &PathBuf, submit: &PathBuf, image_to_text: bool) -> Result<[f64; 3], RecallError> {
    let d = if image_to_text { IMAGE_TO_TEXT } else { TEXT_TO_IMAGE };
    let (json, error) = evaluate(standard, submit, d, Engine::Direct, None).map_err(RecallError::Failed)?;
    if let Some(message) = error {
        return Err(Refused(message).into());
    }
    let value: Value = serde_json::from_str(&json)?;
    let get = |k: &str| value["scoreJson"][k].as_f64().unwrap_or(f64::NAN);
    Ok([get("r1"), get("r5"), get("r10")])
}

pub fn run(args: Args, image_to_text: bool) -> Result<()> {
    let d = if image_to_text { IMAGE_TO_TEXT } else { TEXT_TO_IMAGE };
    println!("Read standard from {}", args.standard_path.display());
    println!("Read user submit file from {}", args.submit_path.display());
    if args.cluster.is_some() && args.engine != Engine::Sql {
        bail!("--cluster runs the SQL engine: add --engine sql");
    }
    // A FIFO or a device would block or never end: not a submission cn_clip's checks could
    // judge, so an error (exit 1, no score file) rather than a score JSON.
    for path in [&args.standard_path, &args.submit_path] {
        if let Ok(meta) = storage::metadata(path)
            && !meta.is_file()
            && !meta.is_dir()
        {
            bail!("{} is {}, not a regular file", path.display(), cnclip_operators::sources::parts::kind_of(&meta));
        }
    }
    if storage::staging::same_path(&args.out_path, &args.standard_path)
        || storage::staging::same_path(&args.out_path, &args.submit_path)
    {
        bail!("{}: the score file would overwrite an input; give another output path", args.out_path.display());
    }
    let cluster = args.cluster.as_deref().map(|url| (url, args.out_path.as_path()));
    let (text, error) = evaluate(&args.standard_path, &args.submit_path, d, args.engine, cluster)?;
    cnclip_operators::write_atomically(&args.out_path, |f| std::io::Write::write_all(f, text.as_bytes()))
        .with_context(|| format!("writing {}", args.out_path.display()))?;
    match error {
        None => println!("The evaluation finished successfully."),
        Some(message) => println!("The evaluation failed: {message}"),
    }
    Ok(())
}

pub fn transform(args: TransformArgs) -> Result<()> {
    let output = format!("{}.tr.jsonl", args.input.replace(".jsonl", ""));
    transpose(std::path::Path::new(&args.input), std::path::Path::new(&output))?;
    println!("Done!");
    Ok(())
}

/// Writes the image → text form of the text → image annotation file `input` to `output`.
pub fn transpose(input: &std::path::Path, output: &std::path::Path) -> Result<()> {
    let args = TransformArgs { input: input.display().to_string() };
    let text = cnclip_operators::sources::read_text(std::path::Path::new(&args.input), u64::MAX)
        .with_context(|| format!("reading {}", args.input))?;
    let mut order: Vec<Value> = Vec::new();
    let mut records: HashMap<String, (Value, Vec<Value>)> = HashMap::new();
    for (number, line) in text.lines().enumerate() {
        let obj: Value =
            serde_json::from_str(line.trim()).with_context(|| format!("{} line {}", args.input, number + 1))?;
        let text_id =
            obj.get("text_id").cloned().with_context(|| format!("{} line {}: no text_id", args.input, number + 1))?;
        let image_ids = obj
            .get("image_ids")
            .and_then(Value::as_array)
            .with_context(|| format!("{} line {}: no image_ids list", args.input, number + 1))?;
        for image_id in image_ids {
            let key = py_dumps(image_id);
            let entry = records.entry(key).or_insert_with(|| {
                order.push(image_id.clone());
                (image_id.clone(), Vec::new())
            });
            entry.1.push(text_id.clone());
        }
    }
    let mut lines = String::new();
    for image_id in &order {
        let (id, text_ids) = &records[&py_dumps(image_id)];
        lines.push_str(&format!(
            "{{\"image_id\": {}, \"text_ids\": {}}}",
            py_dumps(id),
            py_dumps(&Value::Array(text_ids.clone()))
        ));
        lines.push('\n');
    }
    cnclip_operators::write_atomically(output, |f| std::io::Write::write_all(f, lines.as_bytes()))
        .with_context(|| format!("writing {}", output.display()))?;
    Ok(())
}
