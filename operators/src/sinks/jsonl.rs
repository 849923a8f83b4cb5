//! JSON Lines as cn_clip writes and reads them: one object per row, keys in column order,
//! formatted like Python's `json.dumps` (`", "` and `": "` separators, floats as Python's
//! `repr` of the double), so `{"image_id": 7, "feature": [0.0123, …]}` lines match
//! `extract_features.py`'s byte for byte and text annotations read back into cn_clip. Text is
//! written as UTF-8 rather than `\uXXXX` escapes (cn_clip reads both).
//!
//! Columns may be renamed on the way out (a feature table's `id` becomes `image_id` or
//! `text_id`, as cn_clip's feature files name it).

use std::collections::BTreeMap;

use arrow::array::{
    Array, BooleanArray, FixedSizeListArray, Float16Array, Float32Array, Float64Array, Int32Array, Int64Array,
    ListArray, StringArray,
};
use arrow::datatypes::{DataType, Schema};
use arrow::record_batch::RecordBatch;

use super::{AtomicFile, Sink, Staged, Written};
use crate::error::{Error, Result};
use crate::spec::{BuildContext, NodeConfig, Operator, Role, SinkSpec};
use arrow::datatypes::SchemaRef;
use schemars::JsonSchema;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Python's `repr(float(x))`: the shortest digits that round-trip, in fixed notation for
/// decimal exponents -4 … 15 and `d.ddde±XX` otherwise; `json.dumps` spells the non-finite
/// values `NaN`, `Infinity`, `-Infinity`.
pub fn python_float(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    // `{:e}` gives the shortest round-trip digits: "-1.2345e-5", "1e0".
    let sci = format!("{x:e}");
    let (mantissa, exponent) = sci.split_once('e').expect("{:e} has an exponent");
    let exponent: i32 = exponent.parse().expect("integer exponent");
    let (sign, mantissa) = mantissa.strip_prefix('-').map_or(("", mantissa), |m| ("-", m));
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exponent) {
        let point = exponent + 1; // digits before the decimal point
        if point <= 0 {
            format!("{sign}0.{}{digits}", "0".repeat((-point) as usize))
        } else if digits.len() <= point as usize {
            format!("{sign}{digits}{}.0", "0".repeat(point as usize - digits.len()))
        } else {
            format!("{sign}{}.{}", &digits[..point as usize], &digits[point as usize..])
        }
    } else {
        let fraction = if digits.len() > 1 { format!(".{}", &digits[1..]) } else { String::new() };
        let exp_sign = if exponent < 0 { '-' } else { '+' };
        format!("{sign}{}{fraction}e{exp_sign}{:02}", &digits[..1], exponent.abs())
    }
}

/// A finite value as [`python_float`] writes it. `NaN` and `Infinity` are Python's extension,
/// not JSON: cnclip's own readers and most others refuse them, so they are never written.
fn finite(x: f64) -> Result<String> {
    if x.is_finite() {
        Ok(python_float(x))
    } else {
        Err(Error::Record {
            location: String::new(),
            reason: format!("{} is not a finite number, which JSON cannot carry", python_float(x)),
        })
    }
}

fn supported(data_type: &DataType) -> bool {
    match data_type {
        DataType::Int64 | DataType::Int32 | DataType::Utf8 | DataType::Boolean => true,
        DataType::Float16 | DataType::Float32 | DataType::Float64 => true,
        DataType::List(item) | DataType::FixedSizeList(item, _) => supported(item.data_type()),
        _ => false,
    }
}

fn write_value(array: &dyn Array, row: usize, out: &mut String) -> Result<()> {
    if array.is_null(row) {
        out.push_str("null");
        return Ok(());
    }
    match array.data_type() {
        DataType::Int64 => {
            out.push_str(&array.as_any().downcast_ref::<Int64Array>().expect("type").value(row).to_string())
        }
        DataType::Int32 => {
            out.push_str(&array.as_any().downcast_ref::<Int32Array>().expect("type").value(row).to_string())
        }
        DataType::Boolean => out.push_str(if array.as_any().downcast_ref::<BooleanArray>().expect("type").value(row) {
            "true"
        } else {
            "false"
        }),
        DataType::Utf8 => {
            let s = array.as_any().downcast_ref::<StringArray>().expect("type").value(row);
            out.push_str(&serde_json::to_string(s)?);
        }
        DataType::Float16 => {
            out.push_str(&finite(array.as_any().downcast_ref::<Float16Array>().expect("type").value(row).to_f64())?)
        }
        DataType::Float32 => {
            out.push_str(&finite(array.as_any().downcast_ref::<Float32Array>().expect("type").value(row) as f64)?)
        }
        DataType::Float64 => {
            out.push_str(&finite(array.as_any().downcast_ref::<Float64Array>().expect("type").value(row))?)
        }
        DataType::List(_) => {
            write_list(array.as_any().downcast_ref::<ListArray>().expect("type").value(row).as_ref(), out)?
        }
        DataType::FixedSizeList(_, _) => {
            write_list(array.as_any().downcast_ref::<FixedSizeListArray>().expect("type").value(row).as_ref(), out)?
        }
        other => return Err(Error::Internal(format!("cannot write {other} as JSON"))),
    }
    Ok(())
}

fn write_list(values: &dyn Array, out: &mut String) -> Result<()> {
    out.push('[');
    for i in 0..values.len() {
        if i > 0 {
            out.push_str(", ");
        }
        write_value(values, i, out)?;
    }
    out.push(']');
    Ok(())
}

pub struct JsonlSink {
    file: AtomicFile,
    /// Output key of each column.
    keys: Vec<String>,
    rows: u64,
    line: String,
}

impl JsonlSink {
    /// Checks that every column of `schema` can be written and that every renamed column exists.
    ///
    /// # Errors
    /// Every column that cannot be written, every rename of a missing column.
    pub fn accepts(schema: &Schema, rename: &BTreeMap<String, String>) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        for field in schema.fields() {
            if !supported(field.data_type()) {
                problems.push(format!(
                    "column `{}` is {}, which JSON lines cannot carry",
                    field.name(),
                    field.data_type()
                ));
            }
        }
        for from in rename.keys() {
            if schema.index_of(from).is_err() {
                problems.push(format!(
                    "rename: the input has no column `{from}` ({})",
                    crate::transforms::column_list(schema)
                ));
            }
        }
        if problems.is_empty() { Ok(()) } else { Err(problems) }
    }

    /// # Errors
    /// IO errors creating the temporary file.
    pub fn create(path: &std::path::Path, schema: &Schema, rename: &BTreeMap<String, String>) -> Result<Self> {
        let keys = schema
            .fields()
            .iter()
            .map(|f| {
                let key = rename.get(f.name()).unwrap_or(f.name());
                serde_json::to_string(key).expect("a string serialises")
            })
            .collect();
        Ok(JsonlSink { file: AtomicFile::create(path)?, keys, rows: 0, line: String::new() })
    }
}

impl Sink for JsonlSink {
    fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        let columns: Vec<&dyn Array> = batch.columns().iter().map(|c| c.as_ref()).collect();
        for row in 0..batch.num_rows() {
            self.line.clear();
            self.line.push('{');
            for (i, (key, column)) in self.keys.iter().zip(&columns).enumerate() {
                if i > 0 {
                    self.line.push_str(", ");
                }
                self.line.push_str(key);
                self.line.push_str(": ");
                write_value(*column, row, &mut self.line).map_err(|e| match e {
                    Error::Record { reason, .. } => Error::Format {
                        path: self.file.path.display().to_string(),
                        reason: format!("row {} key {key}: {reason}; nothing written", self.rows + row as u64 + 1),
                    },
                    other => other,
                })?;
            }
            self.line.push_str("}\n");
            self.file.write_all(self.line.as_bytes())?;
        }
        self.rows += batch.num_rows() as u64;
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<(Written, Staged)> {
        let path = self.file.path.clone();
        Ok((Written { rows: self.rows, path }, self.file.finish()?))
    }
}

/// ints, strings, floats and lists → JSON lines at `path`, formatted as Python's `json.dumps`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WriteJsonlConfig {
    /// The output file.
    pub path: PathBuf,
    /// Output names for columns, as `{ id = "image_id" }`.
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
}

impl NodeConfig for WriteJsonlConfig {
    const KIND: &'static str = "write_jsonl";
    const ROLE: Role = Role::Sink;
    fn build(self, cx: &BuildContext) -> Result<Operator, Vec<String>> {
        Ok(Operator::Sink(Box::new(WriteJsonlConfig { path: cx.resolve(&self.path), rename: self.rename })))
    }
}

impl SinkSpec for WriteJsonlConfig {
    fn path(&self) -> &Path {
        &self.path
    }
    fn accepts(&self, schema: &SchemaRef) -> Result<(), Vec<String>> {
        JsonlSink::accepts(schema, &self.rename)
    }
    fn open(&self, schema: &SchemaRef) -> Result<Box<dyn Sink>> {
        Ok(Box::new(JsonlSink::create(&self.path, schema, &self.rename)?))
    }
}

#[cfg(test)]
mod tests {
    use super::python_float;

    #[test]
    fn floats_as_python_repr() {
        for (x, repr) in [
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (0.1f32 as f64, "0.10000000149011612"),
            (1e-4, "0.0001"),
            (1.5e-5, "1.5e-05"),
            (123456789012345.0, "123456789012345.0"),
            (1e16, "1e+16"),
            (-2.5e-7, "-2.5e-07"),
            (1.2345e300, "1.2345e+300"),
            (f64::NAN, "NaN"),
            (f64::NEG_INFINITY, "-Infinity"),
        ] {
            assert_eq!(python_float(x), repr, "{x}");
        }
    }
}
