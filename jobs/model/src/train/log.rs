//! What a training run leaves beside its checkpoints: cn_clip's log (`out_{time}.log`, its
//! lines and line format: `%Y-%m-%d,%H:%M:%S | INFO | Rank 0 | …`, also on stderr), its
//! `params_{time}.txt`, and a per-step metrics table (`metrics.parquet`: one row per logged
//! training step and per validation, for plots and SQL), rewritten atomically with each
//! checkpoint so that it always matches the latest one.

use std::fs::File;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use arrow::array::{
    Array, ArrayRef, Float64Array, Float64Builder, Int64Array, Int64Builder, ListBuilder, StringArray, StringBuilder,
    UInt64Array, UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use cnclip_operators::storage;

/// cn_clip's log: every line to the file and to stderr.
pub struct Log {
    file: File,
    /// Whether stderr is a terminal (a progress line is redrawn there).
    terminal: bool,
    progress_shown: bool,
}

impl Log {
    /// Opens `{dir}/out_{suffix}.log` for appending.
    pub fn open(path: &Path) -> Result<Log> {
        let file = storage::open_with(path, std::fs::OpenOptions::new().create(true).append(true))
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Log { file, terminal: std::io::stderr().is_terminal(), progress_shown: false })
    }

    /// One INFO line, as cn_clip's worker logging writes it.
    pub fn info(&mut self, message: &str) {
        let line = format!("{} | INFO | Rank 0 | {message}\n", chrono::Local::now().format("%Y-%m-%d,%H:%M:%S"));
        // A log that cannot be written must not stop training; stderr still shows it.
        let _ = self.file.write_all(line.as_bytes());
        let _ = self.file.flush();
        if self.progress_shown {
            eprint!("\r\x1b[2K");
            self.progress_shown = false;
        }
        eprint!("{line}");
    }

    /// A progress line (steps/s, ETA) redrawn in place on a terminal; nothing otherwise.
    pub fn progress(&mut self, line: &str) {
        if self.terminal {
            eprint!("\r\x1b[2K{line}");
            self.progress_shown = true;
        }
    }
}

/// The `params_{suffix}.txt` cn_clip writes: `name: value`, sorted by name.
pub fn write_params(path: &Path, params: &std::collections::BTreeMap<String, String>) -> Result<()> {
    let text: String = params.iter().map(|(k, v)| format!("{k}: {v}\n")).collect();
    cnclip_operators::write_atomically(path, |f| f.write_all(text.as_bytes()))
        .with_context(|| format!("writing {}", path.display()))
}

/// One row of the metrics table.
#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    /// `train` or `valid`.
    pub kind: &'static str,
    /// Global step after which it was taken (1-based, as cn_clip's "Global Steps").
    pub step: u64,
    /// 1-based epoch, as cn_clip prints it.
    pub epoch: u64,
    pub loss: f64,
    pub i2t_acc: f64,
    pub t2i_acc: f64,
    pub lr: Option<f64>,
    pub logit_scale: f64,
    /// Training samples per second over the steps since the previous row.
    pub samples_per_s: Option<f64>,
    /// Resident memory of the process when the row was taken.
    pub rss_bytes: Option<u64>,
    /// The `pairs` keys the step trained on (with `--debug`).
    pub samples: Option<Vec<i64>>,
}

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("kind", DataType::Utf8, false),
        Field::new("step", DataType::Int64, false),
        Field::new("epoch", DataType::Int64, false),
        Field::new("loss", DataType::Float64, false),
        Field::new("i2t_acc", DataType::Float64, false),
        Field::new("t2i_acc", DataType::Float64, false),
        Field::new("lr", DataType::Float64, true),
        Field::new("logit_scale", DataType::Float64, false),
        Field::new("samples_per_s", DataType::Float64, true),
        Field::new("rss_bytes", DataType::UInt64, true),
        Field::new("samples", DataType::List(Arc::new(Field::new("item", DataType::Int64, true))), true),
    ]))
}

/// The run's metrics, kept in memory (a few dozen bytes a row) and written whole.
pub struct Metrics {
    path: PathBuf,
    pub rows: Vec<Metric>,
}

impl Metrics {
    /// The table at `path`, if a previous run left one, up to step `through` (a resumed run
    /// redoes what came after its checkpoint).
    pub fn open(path: &Path, through: u64) -> Result<Metrics> {
        let mut rows = Vec::new();
        if path.is_file() {
            let file = storage::open(path).with_context(|| format!("opening {}", path.display()))?;
            let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
                .and_then(|b| b.build())
                .with_context(|| format!("reading {}", path.display()))?;
            for batch in reader {
                let batch = batch.with_context(|| format!("reading {}", path.display()))?;
                rows.extend(
                    read_rows(&batch).with_context(|| format!("{}: not a cnclip metrics table", path.display()))?,
                );
            }
        }
        rows.retain(|r| r.step <= through);
        Ok(Metrics { path: path.to_path_buf(), rows })
    }

    /// Writes the table (atomically).
    pub fn write(&self) -> Result<()> {
        let batch = to_batch(&self.rows)?;
        cnclip_operators::write_atomically(&self.path, |file| -> Result<()> {
            let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None)?;
            writer.write(&batch)?;
            writer.close()?;
            Ok(())
        })
        .with_context(|| format!("writing {}", self.path.display()))
    }
}

fn to_batch(rows: &[Metric]) -> Result<RecordBatch> {
    let mut kind = StringBuilder::new();
    let (mut step, mut epoch) = (Int64Builder::new(), Int64Builder::new());
    let (mut loss, mut i2t, mut t2i, mut lr, mut scale, mut speed) = (
        Float64Builder::new(),
        Float64Builder::new(),
        Float64Builder::new(),
        Float64Builder::new(),
        Float64Builder::new(),
        Float64Builder::new(),
    );
    let mut rss = UInt64Builder::new();
    let mut samples = ListBuilder::new(Int64Builder::new());
    for r in rows {
        kind.append_value(r.kind);
        step.append_value(r.step as i64);
        epoch.append_value(r.epoch as i64);
        loss.append_value(r.loss);
        i2t.append_value(r.i2t_acc);
        t2i.append_value(r.t2i_acc);
        lr.append_option(r.lr);
        scale.append_value(r.logit_scale);
        speed.append_option(r.samples_per_s);
        rss.append_option(r.rss_bytes);
        match &r.samples {
            Some(s) => {
                samples.values().append_slice(s);
                samples.append(true);
            }
            None => samples.append(false),
        }
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(kind.finish()),
        Arc::new(step.finish()),
        Arc::new(epoch.finish()),
        Arc::new(loss.finish()),
        Arc::new(i2t.finish()),
        Arc::new(t2i.finish()),
        Arc::new(lr.finish()),
        Arc::new(scale.finish()),
        Arc::new(speed.finish()),
        Arc::new(rss.finish()),
        Arc::new(samples.finish()),
    ];
    Ok(RecordBatch::try_new(schema(), columns)?)
}

fn read_rows(batch: &RecordBatch) -> Result<Vec<Metric>> {
    fn col<'a, T: 'static>(batch: &'a RecordBatch, name: &str) -> Result<&'a T> {
        batch
            .column_by_name(name)
            .and_then(|c| c.as_any().downcast_ref::<T>())
            .with_context(|| format!("column {name}"))
    }
    let kind = col::<StringArray>(batch, "kind")?;
    let step = col::<Int64Array>(batch, "step")?;
    let epoch = col::<Int64Array>(batch, "epoch")?;
    let loss = col::<Float64Array>(batch, "loss")?;
    let i2t = col::<Float64Array>(batch, "i2t_acc")?;
    let t2i = col::<Float64Array>(batch, "t2i_acc")?;
    let lr = col::<Float64Array>(batch, "lr")?;
    let scale = col::<Float64Array>(batch, "logit_scale")?;
    let speed = col::<Float64Array>(batch, "samples_per_s")?;
    let rss = col::<UInt64Array>(batch, "rss_bytes")?;
    let samples = col::<arrow::array::ListArray>(batch, "samples")?;
    let opt = |a: &Float64Array, i: usize| a.is_valid(i).then(|| a.value(i));
    Ok((0..batch.num_rows())
        .map(|i| Metric {
            kind: if kind.value(i) == "valid" { "valid" } else { "train" },
            step: step.value(i) as u64,
            epoch: epoch.value(i) as u64,
            loss: loss.value(i),
            i2t_acc: i2t.value(i),
            t2i_acc: t2i.value(i),
            lr: opt(lr, i),
            logit_scale: scale.value(i),
            samples_per_s: opt(speed, i),
            rss_bytes: rss.is_valid(i).then(|| rss.value(i)),
            samples: samples.is_valid(i).then(|| {
                let values = samples.value(i);
                values.as_any().downcast_ref::<Int64Array>().map(|a| a.values().to_vec()).unwrap_or_default()
            }),
        })
        .collect())
}

/// The process's resident set size (Linux `/proc/self/status` `VmRSS`).
pub fn rss_bytes() -> Option<u64> {
    let status = storage::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
