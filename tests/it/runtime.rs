//! The runtime's extension points (issue #9): a node kind registered from outside `operators`
//! and run from TOML on device replicas, and pipelines consumed as streams from Rust code.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Int64Array, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use cnclip_operators::quarantine::Rejected;
use cnclip_operators::spec::{BuildContext, NodeConfig, Operator, Planner, Registry, Role};
use cnclip_operators::transforms::{Execution, InputError, Output, Transform, TransformReplica};

/// text → + shout, device, batch_len (a test's toy).
///
/// `shout`: a toy device transform. Each replica upper-cases `text` into `shout`, says which
/// device did it and how large its batch was, and rejects texts containing "bad".
#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct ShoutConfig {
    /// One replica per device.
    devices: Vec<String>,
    /// Rows per replica call.
    batch_rows: usize,
}

impl NodeConfig for ShoutConfig {
    const KIND: &'static str = "shout";
    const ROLE: Role = Role::Transform;
    fn build(self, _: &BuildContext) -> Result<Operator, Vec<String>> {
        if self.devices.is_empty() {
            return Err(vec!["devices is empty".into()]);
        }
        Ok(Operator::Transform(Arc::new(Shout { devices: self.devices, batch_rows: self.batch_rows })))
    }
}

struct Shout {
    devices: Vec<String>,
    batch_rows: usize,
}

/// `input` + `shout`, `device`, `batch_len`.
fn shout_schema(input: &Schema) -> SchemaRef {
    let mut fields: Vec<Field> = input.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new("shout", DataType::Utf8, false));
    fields.push(Field::new("device", DataType::Utf8, false));
    fields.push(Field::new("batch_len", DataType::Int64, false));
    Arc::new(Schema::new(fields))
}

impl Transform for Shout {
    fn output_schema(&self, input: &SchemaRef) -> Result<SchemaRef, InputError> {
        match input.field_with_name("text") {
            Ok(field) if field.data_type() == &DataType::Utf8 => Ok(shout_schema(input)),
            _ => Err(InputError::Mismatch("needs a `text` column".into())),
        }
    }

    fn apply(&self, _: &RecordBatch, _: &str) -> cnclip_operators::Result<Output> {
        Err(cnclip_operators::Error::Internal("shout runs on its replicas only".into()))
    }

    fn execution(&self) -> Execution {
        Execution::Devices { devices: self.devices.clone(), batch_rows: self.batch_rows }
    }

    fn open_replica(&self, device: &str) -> cnclip_operators::Result<Option<Box<dyn TransformReplica>>> {
        Ok(Some(Box::new(ShoutReplica { device: device.to_string() })))
    }
}

/// One device's state: its name (a model would live here).
struct ShoutReplica {
    device: String,
}

impl TransformReplica for ShoutReplica {
    fn apply(&mut self, batch: &RecordBatch, source: &str) -> cnclip_operators::Result<Output> {
        let texts = batch.column_by_name("text").unwrap().as_any().downcast_ref::<StringArray>().unwrap();
        let ids = batch.column_by_name("text_id").unwrap().as_any().downcast_ref::<Int64Array>().unwrap();
        let is_bad = |i: &usize| texts.value(*i).contains("bad");
        let keep: Vec<u32> = (0..batch.num_rows()).filter(|i| !is_bad(i)).map(|i| i as u32).collect();
        let rejected = (0..batch.num_rows())
            .filter(is_bad)
            .map(|i| Rejected {
                source: source.to_string(),
                location: format!("text {}", ids.value(i)),
                id: Some(ids.value(i).to_string()),
                reason: "too bad to shout".into(),
            })
            .collect();
        let kept = arrow::compute::take_record_batch(batch, &arrow::array::UInt32Array::from(keep))?;
        let kept_texts = kept.column_by_name("text").unwrap().as_any().downcast_ref::<StringArray>().unwrap();
        let n = kept.num_rows();
        let mut columns: Vec<ArrayRef> = kept.columns().to_vec();
        columns.push(Arc::new(StringArray::from_iter_values(kept_texts.iter().map(|t| t.unwrap().to_uppercase()))));
        columns.push(Arc::new(StringArray::from_iter_values(std::iter::repeat_n(self.device.as_str(), n))));
        columns.push(Arc::new(Int64Array::from(vec![batch.num_rows() as i64; n])));
        let batch = RecordBatch::try_new(shout_schema(&kept.schema()), columns)?;
        Ok(Output { batch, rejected })
    }
}

fn write_texts(path: &Path, n: usize) {
    let lines: Vec<String> = (0..n)
        .map(|i| {
            let text = if i % 17 == 5 { format!("bad text {i}") } else { format!("text number {i}") };
            serde_json::json!({"text_id": i, "text": text, "image_ids": [i]}).to_string()
        })
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

fn read_parquet(path: &Path) -> RecordBatch {
    let file = std::fs::File::open(path).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap().build().unwrap();
    let batches: Vec<RecordBatch> = reader.map(Result::unwrap).collect();
    arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
}

fn strings(batch: &RecordBatch, column: &str) -> Vec<String> {
    let array = batch.column_by_name(column).unwrap().as_any().downcast_ref::<StringArray>().unwrap();
    array.iter().map(|s| s.unwrap().to_string()).collect()
}

fn ints(batch: &RecordBatch, column: &str) -> Vec<i64> {
    batch.column_by_name(column).unwrap().as_any().downcast_ref::<Int64Array>().unwrap().values().to_vec()
}

const SHOUT_PIPELINE: &str = r#"
[job]
quarantine = "out/quarantine.jsonl"
batch_rows = 7

[nodes.texts]
kind = "jsonl"
paths = ["texts.jsonl"]

[nodes.loud]
kind = "shout"
input = "texts"
devices = ["cpu:0", "cpu:1"]
batch_rows = 3

[nodes.out]
kind = "write_parquet"
input = "loud"
path = "out/loud.parquet"
"#;

#[test]
fn a_kind_registered_outside_operators_runs_from_toml_on_two_cpu_replicas() {
    let dir = tempfile::tempdir().unwrap();
    write_texts(&dir.path().join("texts.jsonl"), 200);

    // The built-in registry does not know it, and says so with the kinds it does know.
    let Err(problems) = Planner::new(&Registry::builtin()).base(dir.path()).parse(SHOUT_PIPELINE) else {
        panic!("an unknown kind was accepted")
    };
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].starts_with("node `loud`: unknown kind `shout` (sources: tsv, jsonl,"), "{problems:?}");

    let mut registry = Registry::builtin();
    registry.register::<ShoutConfig>();
    assert_eq!(registry.get("shout").map(|k| k.role), Some(Role::Transform));
    // Its config type checks its keys like a built-in kind's.
    let typo = SHOUT_PIPELINE.replace("batch_rows = 3", "batch_row = 3");
    let Err(problems) = Planner::new(&registry).base(dir.path()).parse(&typo) else { panic!("a typo was accepted") };
    assert!(problems.iter().any(|p| p.starts_with("node `loud`: unknown field `batch_row`")), "{problems:?}");

    let report = Planner::new(&registry).base(dir.path()).parse(SHOUT_PIPELINE).unwrap().run().unwrap();
    let out = read_parquet(&dir.path().join("out/loud.parquet"));
    // Every good row once, in input order, shouted; batches of at most 3 rows on both replicas.
    let expected: Vec<i64> = (0..200).filter(|i| i % 17 != 5).collect();
    assert_eq!(ints(&out, "text_id"), expected);
    let shouted: Vec<String> = strings(&out, "text").iter().map(|t| t.to_uppercase()).collect();
    assert_eq!(strings(&out, "shout"), shouted);
    assert!(ints(&out, "batch_len").iter().all(|&n| (1..=3).contains(&n)));
    let mut devices = strings(&out, "device");
    devices.sort();
    devices.dedup();
    assert_eq!(devices, ["cpu:0", "cpu:1"]);
    // Rejected rows reach the quarantine, in input order, with the replica's reason.
    let quarantine = std::fs::read_to_string(dir.path().join("out/quarantine.jsonl")).unwrap();
    let ids: Vec<String> = quarantine
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].as_str().unwrap().to_string())
        .collect();
    let bad: Vec<String> = (0..200).filter(|i| i % 17 == 5).map(|i| i.to_string()).collect();
    assert_eq!(ids, bad);
    assert!(quarantine.contains("too bad to shout"));
    assert_eq!(report.quarantined, bad.len());
}

const STREAM_PIPELINE: &str = r#"
[job]
quarantine = "out/quarantine.jsonl"
batch_rows = 16

[nodes.imgs]
kind = "tsv"
paths = ["demo/train_imgs.tsv"]

[nodes.decoded]
kind = "decode_base64"
input = "imgs"

[nodes.pixels]
kind = "preprocess"
input = "decoded"
resolution = 64

[nodes.file]
kind = "write_parquet"
input = "pixels"
path = "out/pixels.parquet"
"#;

/// A demo corpus with one bad image line first, so the quarantine has a file in progress.
fn stream_corpus(root: &Path, train: usize) {
    let demo = root.join("demo");
    let status = std::process::Command::new(cnclip_tests::cnclip_bin())
        .args(["synth", "--out", demo.to_str().unwrap(), "--train", &train.to_string(), "--valid", "1", "--test", "1"])
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let tsv = demo.join("train_imgs.tsv");
    let good = std::fs::read_to_string(&tsv).unwrap();
    std::fs::write(&tsv, format!("999999\tbm90IGFuIGltYWdl\n{good}")).unwrap();
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// Files under `dir`, recursively (the outputs a stopped pipeline must not leave behind).
fn files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() { out.extend(files(&path)) } else { out.push(path.display().to_string()) }
        }
    }
    out
}

/// Run in a child process of its own (`--exact`, one test thread), so the thread count it
/// compares is this test's alone.
#[test]
fn a_stream_stopped_early_joins_every_thread_and_leaves_no_output() {
    if std::env::var_os("CNCLIP_STREAM_CHILD").is_none() {
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["runtime::a_stream_stopped_early_joins_every_thread_and_leaves_no_output", "--exact"])
            .args(["--test-threads", "1", "--nocapture"])
            .env("CNCLIP_STREAM_CHILD", "1")
            .output()
            .unwrap();
        let log = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert!(output.status.success() && log.contains("1 passed"), "{log}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    stream_corpus(dir.path(), 2000);
    let before = threads();
    let pipeline = Planner::new(&Registry::builtin()).base(dir.path()).stream("pixels").parse(STREAM_PIPELINE).unwrap();
    let mut stream = pipeline.stream().unwrap();
    assert_eq!(stream.schema().fields(), cnclip_schemas::pixels(64).fields());
    let mut rows = 0;
    for batch in stream.by_ref().take(3) {
        rows += batch.unwrap().num_rows();
    }
    assert!(rows > 0 && rows < 2000, "{rows} rows");
    assert!(threads() > before + 2, "the graph's threads run");
    drop(stream);
    assert_eq!(threads(), before, "a thread outlived the dropped stream");
    assert_eq!(files(&dir.path().join("out")), Vec::<String>::new(), "a stopped pipeline left output");
}

#[test]
fn a_stream_read_to_its_end_carries_every_row_and_commits_the_sinks() {
    let dir = tempfile::tempdir().unwrap();
    stream_corpus(dir.path(), 300);
    let pipeline = Planner::new(&Registry::builtin()).base(dir.path()).stream("pixels").parse(STREAM_PIPELINE).unwrap();
    let mut stream = pipeline.stream().unwrap();
    let batches: Vec<RecordBatch> = stream.by_ref().map(Result::unwrap).collect();
    let streamed = arrow::compute::concat_batches(&stream.schema(), &batches).unwrap();
    // The file sink on the same node got the same rows; the bad line is quarantined.
    assert_eq!(streamed.num_rows(), 300);
    assert_eq!(read_parquet(&dir.path().join("out/pixels.parquet")).columns(), streamed.columns());
    let report = stream.report().expect("a complete stream has a report");
    assert_eq!(report.quarantined, 1);
    assert!(std::fs::read_to_string(dir.path().join("out/quarantine.jsonl")).unwrap().contains("999999"));
    assert!(stream.next().is_none(), "the stream stays ended");

    // A streamed node must exist, and a sink cannot be streamed.
    let Err(problems) = Planner::new(&Registry::builtin()).base(dir.path()).stream("file").parse(STREAM_PIPELINE)
    else {
        panic!("a sink was streamed")
    };
    assert_eq!(problems.0, ["node `file` is a sink: nothing can read from it"]);
    let Err(problems) = Planner::new(&Registry::builtin()).base(dir.path()).stream("nope").parse(STREAM_PIPELINE)
    else {
        panic!("an unknown node was streamed")
    };
    assert_eq!(problems.0, ["cannot stream node `nope`: there is no such node"]);
}
