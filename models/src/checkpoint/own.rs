//! cnclip's own checkpoint format: one safetensors file whose metadata carries the model config
//! (`cnclip.config`, cn_clip's `model_info` JSON), so a checkpoint is self-describing — unlike
//! a cn_clip `.pt`, which needs `--vision-model`/`--text-model` beside it.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use tch::{Kind, Tensor};

use crate::clip::ClipConfig;
use crate::error::{Error, Result};

pub const FORMAT_KEY: &str = "format";
pub const FORMAT: &str = "cnclip";
pub const CONFIG_KEY: &str = "cnclip.config";

fn dtype_of(kind: Kind) -> Result<Dtype> {
    Ok(match kind {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        other => return Err(Error::Shape(format!("cannot store a {other:?} tensor in safetensors"))),
    })
}

pub(crate) fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

/// Saves a state dict and its config, atomically.
///
/// # Errors
/// IO errors or unsupported dtypes.
pub fn save(path: &Path, config: &ClipConfig, state_dict: &BTreeMap<String, Tensor>) -> Result<()> {
    let mut buffers = Vec::with_capacity(state_dict.len());
    for (name, tensor) in state_dict {
        let tensor = tensor.to_device(tch::Device::Cpu).contiguous();
        let numel = tensor.numel();
        let mut data = vec![0u8; numel * tensor.kind().elt_size_in_bytes()];
        tensor.copy_data_u8(&mut data, numel);
        let shape: Vec<usize> = tensor.size().iter().map(|&d| d as usize).collect();
        buffers.push((name.clone(), dtype_of(tensor.kind())?, shape, data));
    }
    let views = buffers
        .iter()
        .map(|(name, dtype, shape, data)| {
            TensorView::new(*dtype, shape.clone(), data)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::Shape(e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = HashMap::from([
        (FORMAT_KEY.to_string(), FORMAT.to_string()),
        (CONFIG_KEY.to_string(), serde_json::to_string(config).expect("configs serialise")),
        ("cnclip.version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
    ]);
    let bytes = safetensors::serialize(views, Some(metadata)).map_err(|e| Error::Shape(e.to_string()))?;
    crate::write_atomically(path, |file| Ok::<_, Error>(std::io::Write::write_all(file, &bytes)?))
}

/// Why `bytes` cannot be read as a checkpoint, saying what they look like instead: an empty
/// file, a pickle (a legacy `torch.save` or a raw pickle, neither the zip archive cn_clip 1.6.0
/// writes), or not a safetensors file.
fn not_safetensors(bytes: &[u8], error: &str) -> String {
    match bytes {
        [] => "the file is empty".into(),
        [0x80, 2..=5, ..] => "a pickle (a legacy torch.save file or a raw pickle), not the zip archive torch.save \
            writes since torch 1.6 nor a safetensors file: load it in python and save it again with torch.save"
            .into(),
        _ => format!("neither a cn_clip checkpoint (a torch.save zip archive) nor a safetensors file: {error}"),
    }
}

/// Reads every tensor of a safetensors file, and its metadata.
///
/// # Errors
/// [`Error::Checkpoint`] naming the file when it is not valid safetensors.
pub fn read_safetensors(path: &Path) -> Result<(BTreeMap<String, Tensor>, HashMap<String, String>)> {
    super::readable(path)?;
    let name = path.display().to_string();
    let bad = |reason: String| Error::Checkpoint { path: name.clone(), reason };
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(not_safetensors(&bytes, &e.to_string())))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let tensors = SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let mut out = BTreeMap::new();
    for (key, view) in tensors.tensors() {
        let kind =
            kind_of(view.dtype()).ok_or_else(|| bad(format!("tensor {key}: unsupported dtype {:?}", view.dtype())))?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        out.insert(key, Tensor::from_data_size(view.data(), &shape, kind));
    }
    Ok((out, metadata))
}

/// A cnclip checkpoint's config, from its header alone (no tensor is read).
///
/// # Errors
/// [`Error::Checkpoint`] when the file is not cnclip's format or its config is invalid.
pub fn config(path: &Path) -> Result<ClipConfig> {
    use std::io::Read;
    let bad = |reason: String| Error::Checkpoint { path: path.display().to_string(), reason };
    let mut file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|_| bad(not_safetensors(&[], "too short")))?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return Err(bad(not_safetensors(&len.to_le_bytes(), "header length past 100 MB")));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let header: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let metadata = &header["__metadata__"];
    if metadata[FORMAT_KEY].as_str() != Some(FORMAT) {
        return Err(bad(format!("safetensors metadata has no `{FORMAT_KEY}: {FORMAT}`: not a cnclip checkpoint")));
    }
    let config = metadata[CONFIG_KEY].as_str().ok_or_else(|| bad(format!("no `{CONFIG_KEY}` metadata")))?;
    ClipConfig::from_json(config).map_err(|e| bad(e.to_string()))
}

/// Loads a cnclip checkpoint: its config and state dict.
///
/// # Errors
/// [`Error::Checkpoint`] when the file is not cnclip's format or its config is invalid.
pub fn load(path: &Path) -> Result<(ClipConfig, BTreeMap<String, Tensor>)> {
    let (tensors, metadata) = read_safetensors(path)?;
    let bad = |reason: String| Error::Checkpoint { path: path.display().to_string(), reason };
    if metadata.get(FORMAT_KEY).map(String::as_str) != Some(FORMAT) {
        return Err(bad(format!("safetensors metadata has no `{FORMAT_KEY}: {FORMAT}`: not a cnclip checkpoint")));
    }
    let config = metadata.get(CONFIG_KEY).ok_or_else(|| bad(format!("no `{CONFIG_KEY}` metadata")))?;
    let config = ClipConfig::from_json(config).map_err(|e| bad(e.to_string()))?;
    Ok((config, tensors))
}

#[cfg(test)]
mod tests {
    /// A file that is neither a cn_clip zip nor safetensors is named for what it is.
    #[test]
    fn unreadable_checkpoints_say_what_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let cases: [(&str, &[u8], &str); 3] = [
            ("empty.pt", b"", "the file is empty"),
            ("legacy.pt", b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.", "a pickle (a legacy torch.save file"),
            ("text.pt", b"hello, world", "neither a cn_clip checkpoint (a torch.save zip archive) nor a safetensors"),
        ];
        for (name, bytes, expected) in cases {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            let message = crate::checkpoint::load_clip(&path, None, tch::Device::Cpu).unwrap_err().to_string();
            assert!(message.contains(name) && message.contains(expected), "{name}: {message}");
        }
    }
}
