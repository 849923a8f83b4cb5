//! Writes cn_clip-format checkpoints: the `torch.save` zip layout that cn_clip's
//! `create_model`, eval scripts and `torch.load(weights_only=True)` read.
//!
//! The pickle is hand-assembled from a fixed template (protocol 2): a dict of `epoch`, `step`,
//! `name`, `state_dict` (an `OrderedDict` of `_rebuild_tensor_v2` calls, keys with the DDP
//! `module.` prefix as cn_clip's training saves them) and an empty `optimizer`.

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

/// Saves `state_dict` (keys without `module.`) as a cn_clip checkpoint at `path`, atomically
/// (written beside it, then renamed).
///
/// # Errors
/// IO errors, or a tensor dtype torch checkpoints cannot hold.
pub fn save_cn_clip(path: &Path, state_dict: &BTreeMap<String, Tensor>, info: &CheckpointInfo) -> Result<()> {
    // cn_clip loads strictly, and its BatchNorms have a `num_batches_tracked` buffer we do not
    // keep: write it (as 0) beside each BatchNorm's statistics.
    let mut state_dict: BTreeMap<String, Tensor> =
        state_dict.iter().map(|(k, v)| (k.clone(), v.shallow_clone())).collect();
    let batch_norms: Vec<String> =
        state_dict.keys().filter_map(|k| k.strip_suffix(".running_var")).map(str::to_string).collect();
    for prefix in batch_norms {
        state_dict.entry(format!("{prefix}.num_batches_tracked")).or_insert_with(|| Tensor::from(0i64));
    }
    let mut pickle = Pickler::default();
    pickle.op(0x80);
    pickle.op(2);
    pickle.op(b'}');
    pickle.op(b'(');
    pickle.str("epoch");
    pickle.int(info.epoch.unwrap_or(0));
    pickle.str("step");
    pickle.int(info.step.unwrap_or(0));
    pickle.str("name");
    pickle.str(info.name.as_deref().unwrap_or("cnclip"));
    pickle.str("state_dict");
    pickle.ordered_dict();
    pickle.op(b'(');
    let mut storages = Vec::with_capacity(state_dict.len());
    for (i, (key, tensor)) in state_dict.iter().enumerate() {
        let tensor = tensor.to_device(tch::Device::Cpu).contiguous();
        let numel = tensor.numel();
        pickle.str(&format!("module.{key}"));
        pickle.global("torch._utils", "_rebuild_tensor_v2");
        pickle.op(b'(');
        // Persistent id ('storage', torch.XStorage, key, location, numel).
        pickle.op(b'(');
        pickle.str("storage");
        pickle.global("torch", storage_name(tensor.kind())?);
        pickle.str(&i.to_string());
        pickle.str("cpu");
        pickle.int(numel as i64);
        pickle.op(b't');
        pickle.op(b'Q');
        pickle.int(0);
        pickle.int_tuple(&tensor.size());
        pickle.int_tuple(&tensor.stride());
        pickle.op(0x89); // requires_grad = False
        pickle.ordered_dict(); // backward hooks
        pickle.op(b't');
        pickle.op(b'R');
        let bytes = numel * tensor.kind().elt_size_in_bytes();
        let mut data = vec![0u8; bytes];
        tensor.copy_data_u8(&mut data, numel);
        storages.push(data);
    }
    pickle.op(b'u');
    pickle.str("optimizer");
    pickle.op(b'}');
    pickle.op(b'u');
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
