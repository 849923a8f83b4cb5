//! cnclip's own checkpoint format: one safetensors file whose metadata carries the model config
//! (`cnclip.config`, cn_clip's `model_info` JSON), so a checkpoint is self-describing — unlike
//! a cn_clip `.pt`, which needs `--vision-model`/`--text-model` beside it.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use tch::{Kind, Tensor};

use crate::clip::ClipConfig;
use crate::error::{Error, Result};
use cnclip_operators::storage;

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
    let mut bytes = safetensors::serialize(views, Some(metadata)).map_err(|e| Error::Shape(e.to_string()))?;
    sort_header(&mut bytes)?;
    crate::write_atomically(path, |file| Ok::<_, Error>(std::io::Write::write_all(file, &bytes)?))
}

/// Rewrites a serialized safetensors file's JSON header with its keys sorted, in place: the
/// crate writes the metadata from a `HashMap`, so the same checkpoint saved twice differed in
/// its bytes (and its sha256, which manifests and bench-suite records compare). The sorted
/// header has the same length; the space padding the crate aligns the data with is kept.
fn sort_header(bytes: &mut [u8]) -> Result<()> {
    let bad = |what: &str| Error::Shape(format!("safetensors header: {what}"));
    let length =
        bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))).ok_or_else(|| bad("too short"))?;
    let end = usize::try_from(length).ok().and_then(|n| n.checked_add(8)).filter(|&e| e <= bytes.len());
    let header = &mut bytes[8..end.ok_or_else(|| bad("length past the end"))?];
    let sorted: BTreeMap<String, BTreeMap<String, serde_json::Value>> =
        serde_json::from_slice(header).map_err(|e| bad(&e.to_string()))?;
    let text = serde_json::to_vec(&sorted).map_err(|e| bad(&e.to_string()))?;
    if text.len() > header.len() {
        return Err(bad("sorting lengthened it"));
    }
    header[..text.len()].copy_from_slice(&text);
    header[text.len()..].fill(b' ');
    Ok(())
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
    let bytes = storage::read(path).map_err(|e| bad(e.to_string()))?;
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
    let mut file = storage::open(path).map_err(|e| bad(e.to_string()))?;
    let mut head = Vec::with_capacity(8);
    file.by_ref().take(8).read_to_end(&mut head).map_err(|e| bad(e.to_string()))?;
    let Ok(len) = <[u8; 8]>::try_from(head.as_slice()) else {
        return Err(bad(not_safetensors(&head, "too short")));
    };
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

    /// The same weights saved twice give the same bytes, read back unchanged (the crate writes
    /// the metadata in a `HashMap`'s order, which differs from map to map).
    #[test]
    fn a_checkpoint_saved_twice_has_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::clip::ClipConfig::from_name("ViT-B-16@RBT3-chinese").unwrap();
        let state: std::collections::BTreeMap<String, tch::Tensor> = [
            ("a.weight".to_string(), tch::Tensor::from_slice(&[1.0f32, -2.5, 3.0]).view([3, 1])),
            ("b.bias".to_string(), tch::Tensor::from_slice(&[7i64, 8])),
        ]
        .into();
        let saved: Vec<Vec<u8>> = (0..8)
            .map(|i| {
                let path = dir.path().join(format!("{i}.safetensors"));
                super::save(&path, &config, &state).unwrap();
                std::fs::read(path).unwrap()
            })
            .collect();
        assert!(saved.iter().all(|bytes| *bytes == saved[0]), "the saves differ");
        let (tensors, metadata) = super::read_safetensors(&dir.path().join("0.safetensors")).unwrap();
        assert_eq!(metadata.get(super::FORMAT_KEY).map(String::as_str), Some(super::FORMAT));
        assert_eq!(tensors.len(), 2);
        assert!(tensors["a.weight"].equal(&state["a.weight"]) && tensors["b.bias"].equal(&state["b.bias"]));
    }
}
