//! Writes cn_clip-format checkpoints: the `torch.save` zip layout that cn_clip's
//! `create_model`, eval scripts and `torch.load(weights_only=True)` read.
//!
//! The pickle (protocol 2) is written from a small value tree ([`Py`]): a dict of `epoch`,
//! `step`, `name`, `state_dict` (an `OrderedDict` of `_rebuild_tensor_v2` calls, keys with the
//! DDP `module.` prefix as cn_clip's training saves them) and `optimizer` (empty, or torch's
//! `optimizer.state_dict()` for training checkpoints), plus whatever else a caller adds.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use tch::{Kind, Tensor};
use zip::write::SimpleFileOptions;

use super::CheckpointInfo;
use crate::error::{Error, Result};

fn storage_name(kind: Kind) -> Result<&'static str> {
    Ok(match kind {
        Kind::Float => "FloatStorage",
        Kind::Half => "HalfStorage",
        Kind::BFloat16 => "BFloat16Storage",
        Kind::Double => "DoubleStorage",
        Kind::Int64 => "LongStorage",
        Kind::Int => "IntStorage",
        Kind::Int16 => "ShortStorage",
        Kind::Int8 => "CharStorage",
        Kind::Uint8 => "ByteStorage",
        Kind::Bool => "BoolStorage",
        other => return Err(Error::Shape(format!("cannot save a {other:?} tensor in a torch checkpoint"))),
    })
}

#[derive(Default)]
struct Pickler(Vec<u8>);

impl Pickler {
    fn op(&mut self, op: u8) {
        self.0.push(op);
    }
    fn int(&mut self, v: i64) {
        if let Ok(small) = i32::try_from(v) {
            self.op(b'J');
            self.0.extend_from_slice(&small.to_le_bytes());
        } else {
            self.op(0x8a); // LONG1, 8 bytes two's complement
            self.0.push(8);
            self.0.extend_from_slice(&v.to_le_bytes());
        }
    }
    fn str(&mut self, s: &str) {
        self.op(b'X');
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
    }
    fn global(&mut self, module: &str, name: &str) {
        self.op(b'c');
        self.0.extend_from_slice(format!("{module}\n{name}\n").as_bytes());
    }
    fn ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.op(b')');
        self.op(b'R');
    }
    fn int_tuple(&mut self, values: &[i64]) {
        self.op(b'(');
        for &v in values {
            self.int(v);
        }
        self.op(b't');
    }
}

/// A Python value for a `torch.save` pickle: what cn_clip's checkpoints are made of (the
/// optimizer's `state_dict()` included), nothing that `torch.load(weights_only=True)` refuses.
pub enum Py {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Tuple(Vec<Py>),
    List(Vec<Py>),
    Dict(Vec<(Py, Py)>),
    /// `collections.OrderedDict` (a state dict).
    OrderedDict(Vec<(Py, Py)>),
    Tensor(Tensor),
}

impl Py {
    pub fn str(s: &str) -> Py {
        Py::Str(s.to_string())
    }

    /// A dict with string keys.
    pub fn dict(items: Vec<(&str, Py)>) -> Py {
        Py::Dict(items.into_iter().map(|(k, v)| (Py::str(k), v)).collect())
    }
}

impl Pickler {
    /// Appends `value`; tensors' bytes go to `storages` (record `data/{index}`).
    fn value(&mut self, value: &Py, storages: &mut Vec<Vec<u8>>) -> Result<()> {
        match value {
            Py::None => self.op(b'N'),
            Py::Bool(true) => self.op(0x88),
            Py::Bool(false) => self.op(0x89),
            Py::Int(v) => self.int(*v),
            Py::Float(v) => {
                self.op(b'G');
                self.0.extend_from_slice(&v.to_be_bytes());
            }
            Py::Str(v) => self.str(v),
            Py::Tuple(items) => {
                self.op(b'(');
                for item in items {
                    self.value(item, storages)?;
                }
                self.op(b't');
            }
            Py::List(items) => {
                self.op(b']');
                if !items.is_empty() {
                    self.op(b'(');
                    for item in items {
                        self.value(item, storages)?;
                    }
                    self.op(b'e');
                }
            }
            Py::Dict(items) | Py::OrderedDict(items) => {
                if matches!(value, Py::OrderedDict(_)) {
                    self.ordered_dict();
                } else {
                    self.op(b'}');
                }
                if !items.is_empty() {
                    self.op(b'(');
                    for (k, v) in items {
                        self.value(k, storages)?;
                        self.value(v, storages)?;
                    }
                    self.op(b'u');
                }
            }
            Py::Tensor(tensor) => self.tensor(tensor, storages)?,
        }
        Ok(())
    }

    /// `torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())`.
    fn tensor(&mut self, tensor: &Tensor, storages: &mut Vec<Vec<u8>>) -> Result<()> {
        let tensor = tensor.detach().to_device(tch::Device::Cpu).contiguous();
        let numel = tensor.numel();
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.op(b'(');
        // Persistent id ('storage', torch.XStorage, key, location, numel).
        self.op(b'(');
        self.str("storage");
        self.global("torch", storage_name(tensor.kind())?);
        self.str(&storages.len().to_string());
        self.str("cpu");
        self.int(numel as i64);
        self.op(b't');
        self.op(b'Q');
        self.int(0);
        self.int_tuple(&tensor.size());
        self.int_tuple(&tensor.stride());
        self.op(0x89); // requires_grad = False
        self.ordered_dict(); // backward hooks
        self.op(b't');
        self.op(b'R');
        let mut data = vec![0u8; numel * tensor.kind().elt_size_in_bytes()];
        tensor.copy_data_u8(&mut data, numel);
        storages.push(data);
        Ok(())
    }
}

/// Writes `value` as `torch.save` does (zip of `archive/data.pkl` + one record per storage) at
/// `path`, atomically (written beside it, synced, then renamed).
///
/// # Errors
/// IO errors, or a tensor dtype torch checkpoints cannot hold.
pub fn save_torch(path: &Path, value: &Py) -> Result<()> {
    let mut pickle = Pickler::default();
    let mut storages = Vec::new();
    pickle.op(0x80);
    pickle.op(2);
    pickle.value(value, &mut storages)?;
    pickle.op(b'.');
    crate::write_atomically(path, |file| {
        let mut zip = zip::ZipWriter::new(file);
        let stored = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        let aligned = stored.with_alignment(64); // torch maps storages at 64-byte alignment
        let mut record = |name: &str, data: &[u8], options: SimpleFileOptions| -> std::io::Result<()> {
            zip.start_file(format!("archive/{name}"), options).map_err(std::io::Error::other)?;
            zip.write_all(data)
        };
        record("data.pkl", &pickle.0, stored)?;
        record("byteorder", b"little", stored)?;
        for (i, data) in storages.iter().enumerate() {
            record(&format!("data/{i}"), data, aligned)?;
        }
        record("version", b"3\n", stored)?;
        zip.finish().map_err(std::io::Error::other)?;
        Ok::<_, Error>(())
    })
}

/// A state dict as cn_clip's training saves it: keys with DDP's `module.` prefix, and a
/// `num_batches_tracked` (0) beside each BatchNorm's statistics, which cn_clip loads strictly
/// and we do not keep.
pub fn cn_clip_state_dict(state_dict: &BTreeMap<String, Tensor>) -> Py {
    let mut state_dict: BTreeMap<String, Tensor> =
        state_dict.iter().map(|(k, v)| (k.clone(), v.shallow_clone())).collect();
    let batch_norms: Vec<String> =
        state_dict.keys().filter_map(|k| k.strip_suffix(".running_var")).map(str::to_string).collect();
    for prefix in batch_norms {
        state_dict.entry(format!("{prefix}.num_batches_tracked")).or_insert_with(|| Tensor::from(0i64));
    }
    Py::OrderedDict(state_dict.into_iter().map(|(k, v)| (Py::Str(format!("module.{k}")), Py::Tensor(v))).collect())
}

/// Saves `state_dict` (keys without `module.`) as a cn_clip checkpoint at `path`, atomically,
/// with an empty `optimizer`.
///
/// # Errors
/// IO errors, or a tensor dtype torch checkpoints cannot hold.
pub fn save_cn_clip(path: &Path, state_dict: &BTreeMap<String, Tensor>, info: &CheckpointInfo) -> Result<()> {
    save_torch(
        path,
        &Py::dict(vec![
            ("epoch", Py::Int(info.epoch.unwrap_or(0))),
            ("step", Py::Int(info.step.unwrap_or(0))),
            ("name", Py::str(info.name.as_deref().unwrap_or("cnclip"))),
            ("state_dict", cn_clip_state_dict(state_dict)),
            ("optimizer", Py::Dict(Vec::new())),
        ]),
    )
}
