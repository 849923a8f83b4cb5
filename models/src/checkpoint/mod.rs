//! Checkpoint IO.
//!
//! cn_clip checkpoints are `torch.save` archives: a zip holding `<name>/data.pkl` (a pickle of
//! `{"epoch", "step", "name", "state_dict", "optimizer"}`) and one `<name>/data/<key>` record per
//! tensor storage. We read them with the restricted [`pickle`] reader — nothing in the file is
//! ever executed — and rebuild each tensor from its storage bytes, offset, size and stride.
//! The same reader opens Hugging Face `pytorch_model.bin` files (a bare state dict).

pub mod hf;
pub mod own;
pub use cnclip_operators::decoders::pickle;
pub mod torch_save;

pub use torch_save::{Py, cn_clip_state_dict, save_cn_clip, save_torch};

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tch::{Kind, Tensor};

use crate::clip::{Clip, ClipConfig};
use crate::error::{Error, Result};
use pickle::{Budget, Limits, PickleError, StorageType, TensorRef, Value};

/// A decoded `torch.save` archive: the pickled value, with tensors materialised on demand.
pub struct TorchArchive {
    path: String,
    zip: zip::ZipArchive<std::fs::File>,
    prefix: String,
    pub value: Value,
}

fn checkpoint_error(path: &str, reason: impl std::fmt::Display) -> Error {
    Error::Checkpoint { path: path.to_string(), reason: reason.to_string() }
}

impl TorchArchive {
    /// Opens a `torch.save` zip archive and decodes its pickle (restricted: see [`pickle`]),
    /// within [`Limits::CHECKPOINT`] (scaled by `CNCLIP_PICKLE_LIMIT_SCALE`: [`Limits::from_env`]).
    ///
    /// # Errors
    /// [`Error::Checkpoint`] naming the file: not a zip (e.g. the legacy pre-1.6 format), no
    /// `data.pkl`, big-endian data, a pickle that would execute code or build more than the
    /// limits allow.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, &Limits::CHECKPOINT.from_env())
    }

    /// [`TorchArchive::open`] within `limits` (`data.pkl` itself may be at most
    /// `limits.max_bytes` long).
    ///
    /// # Errors
    /// As [`TorchArchive::open`].
    pub fn open_with(path: &Path, limits: &Limits) -> Result<Self> {
        readable(path)?;
        let name = path.display().to_string();
        let mut file = cnclip_operators::storage::open(path).map_err(|e| checkpoint_error(&name, e))?;
        let mut head = [0u8; 4];
        let len = std::io::Read::read(&mut file, &mut head).map_err(|e| checkpoint_error(&name, e))?;
        std::io::Seek::rewind(&mut file).map_err(|e| checkpoint_error(&name, e))?;
        let mut zip = zip::ZipArchive::new(file).map_err(|e| {
            // Say what the file is, not only what it is not: an empty or cut-off file (a job
            // killed while saving) is not a legacy checkpoint.
            let what = match &head[..len] {
                [] => "the file is empty (a job stopped while writing it?)".to_string(),
                [b'P', b'K', ..] => format!("a damaged zip archive, truncated or corrupted ({e})"),
                [0x80, 2..=5, ..] => "a pickle: a legacy (torch < 1.6) torch.save file, which cnclip does not read; \
                                      load it in python and save it again with torch.save"
                    .to_string(),
                _ => format!("not a torch.save zip archive ({e})"),
            };
            checkpoint_error(&name, what)
        })?;
        let pkl = (0..zip.len())
            .filter_map(|i| zip.name_for_index(i).and_then(|n| n.ok()).map(|n| n.to_string()))
            .find(|n| n.ends_with("data.pkl") && n.matches('/').count() == 1)
            .ok_or_else(|| checkpoint_error(&name, "no <archive>/data.pkl record"))?;
        let prefix = pkl.trim_end_matches("data.pkl").to_string();
        // torch.save stores every record uncompressed; a re-zipped archive is named as such
        // (and nothing is ever inflated: no zip bomb can go off).
        for i in 0..zip.len() {
            let record = zip.by_index_raw(i).map_err(|e| checkpoint_error(&name, e))?;
            if record.compression() != zip::CompressionMethod::Stored {
                return Err(checkpoint_error(
                    &name,
                    format!(
                        "record {} is compressed ({}); torch.save stores records uncompressed (was the file re-zipped?)",
                        record.name().map(|n| n.into_owned()).unwrap_or_else(|_| format!("#{i}")),
                        record.compression()
                    ),
                ));
            }
        }
        if let Ok(mut order) = zip.by_name(&format!("{prefix}byteorder")) {
            let mut text = String::new();
            order.read_to_string(&mut text).map_err(|e| checkpoint_error(&name, e))?;
            if text.trim() != "little" {
                return Err(checkpoint_error(&name, format!("byte order `{}` is not supported", text.trim())));
            }
        }
        // Read no more of data.pkl than the pickle may materialise (a deflated record's size
        // may not be what it says).
        let too_big =
            || checkpoint_error(&name, PickleError::Budget { budget: Budget::Bytes, limit: limits.max_bytes });
        let record = zip.by_name(&pkl).map_err(|e| checkpoint_error(&name, e))?;
        if record.size() > limits.max_bytes as u64 {
            return Err(too_big());
        }
        let mut data = Vec::with_capacity(record.size() as usize);
        record.take(limits.max_bytes as u64 + 1).read_to_end(&mut data).map_err(|e| checkpoint_error(&name, e))?;
        if data.len() > limits.max_bytes {
            return Err(too_big());
        }
        let value = pickle::load_with(&data, limits).map_err(|e| checkpoint_error(&name, e))?;
        Ok(TorchArchive { path: name, zip, prefix, value })
    }

    /// Materialises one tensor (contiguous, on the CPU).
    ///
    /// # Errors
    /// When its storage record is missing or too short for the view.
    pub fn tensor(&mut self, t: &TensorRef) -> Result<Tensor> {
        let record = format!("{}data/{}", self.prefix, t.storage_key);
        let bad = |reason: String| checkpoint_error(&self.path, format!("storage {record}: {reason}"));
        let elem = t.storage_type.element_size();
        let expected = t.storage_numel.checked_mul(elem).ok_or_else(|| bad(format!("{} elements", t.storage_numel)))?;
        let file = self.zip.by_name(&record).map_err(|e| bad(e.to_string()))?;
        if file.size() < expected as u64 {
            return Err(bad(format!("holds {} bytes, expected {expected}", file.size())));
        }
        // Read what the storage holds, no more, whatever the record says it holds.
        let mut bytes = Vec::with_capacity(expected);
        file.take(expected as u64).read_to_end(&mut bytes).map_err(|e| bad(e.to_string()))?;
        if bytes.len() < expected {
            return Err(bad(format!("holds {} bytes, expected {expected}", bytes.len())));
        }
        // The view must lie within the storage (checked arithmetic: the numbers are the file's).
        let view_end = t.size.iter().zip(&t.stride).try_fold(t.offset as i64, |end, (&size, &stride)| {
            if size < 0 || stride < 0 {
                return None;
            }
            end.checked_add((size - 1).max(0).checked_mul(stride)?)
        });
        let numel = t.size.iter().try_fold(1i64, |n, &size| n.checked_mul(size));
        match (view_end, numel) {
            (Some(_), Some(0)) => {}
            (Some(last), Some(_)) if last < t.storage_numel as i64 => {}
            _ => return Err(bad(format!("tensor view (size {:?}, stride {:?}) past its end", t.size, t.stride))),
        }
        let storage = Tensor::from_data_size(&bytes, &[t.storage_numel as i64], kind_of(t.storage_type));
        storage
            .f_as_strided(t.size.as_slice(), t.stride.as_slice(), t.offset as i64)
            .and_then(|view| view.f_contiguous())
            .map_err(|e| bad(e.to_string()))
    }

    /// Every tensor of a state dict (a dict of name → tensor) as named tensors.
    ///
    /// # Errors
    /// When `state_dict` is not a dict of string keys to tensors, or a tensor cannot be read.
    pub fn state_dict(&mut self, state_dict: &Value) -> Result<BTreeMap<String, Tensor>> {
        let Value::Dict(items) = state_dict else {
            return Err(checkpoint_error(&self.path, "state_dict is not a dict"));
        };
        let mut tensors = BTreeMap::new();
        for (key, value) in items {
            let (Value::Str(key), Value::Tensor(t)) = (key, value) else {
                return Err(checkpoint_error(&self.path, format!("state_dict entry {key:?} is not a named tensor")));
            };
            tensors.insert(key.clone(), self.tensor(t)?);
        }
        Ok(tensors)
    }
}

fn kind_of(storage: StorageType) -> Kind {
    match storage {
        StorageType::Float => Kind::Float,
        StorageType::Half => Kind::Half,
        StorageType::BFloat16 => Kind::BFloat16,
        StorageType::Double => Kind::Double,
        StorageType::Long => Kind::Int64,
        StorageType::Int => Kind::Int,
        StorageType::Short => Kind::Int16,
        StorageType::Char => Kind::Int8,
        StorageType::Byte => Kind::Uint8,
        StorageType::Bool => Kind::Bool,
    }
}

/// What a cn_clip training checkpoint records besides its weights.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CheckpointInfo {
    pub epoch: Option<i64>,
    pub step: Option<i64>,
    pub name: Option<String>,
}

/// Loads a cn_clip checkpoint's state dict, keys without the DDP `module.` prefix and without
/// `bert.pooler.*` (as cn_clip's `create_model` and eval scripts do).
///
/// # Errors
/// [`Error::Checkpoint`] naming the file for anything unreadable, unsafe or without a
/// `state_dict`.
pub fn load_cn_clip(path: &Path) -> Result<(BTreeMap<String, Tensor>, CheckpointInfo)> {
    let mut archive = TorchArchive::open(path)?;
    let top = std::mem::replace(&mut archive.value, Value::None);
    read_cn_clip(&mut archive, &top)
}

/// [`load_cn_clip`] on an open archive whose pickled value is `top` (taken out of it), for
/// callers that read more of the checkpoint (a training run's optimizer state).
///
/// # Errors
/// As [`load_cn_clip`].
pub fn read_cn_clip(archive: &mut TorchArchive, top: &Value) -> Result<(BTreeMap<String, Tensor>, CheckpointInfo)> {
    let state_dict = top
        .get("state_dict")
        .ok_or_else(|| checkpoint_error(&archive.path, "no `state_dict` entry: not a cn_clip checkpoint"))?;
    let tensors = archive.state_dict(state_dict)?;
    let strip = tensors.keys().next().is_some_and(|k| k.starts_with("module"));
    let tensors = tensors
        .into_iter()
        .filter(|(k, _)| !k.contains("bert.pooler"))
        .map(|(k, v)| (if strip { k.strip_prefix("module.").unwrap_or(&k).to_string() } else { k }, v))
        .collect();
    let int = |key| match top.get(key) {
        Some(Value::Int(v)) => Some(*v),
        _ => None,
    };
    let name = match top.get("name") {
        Some(Value::Str(s)) => Some(s.clone()),
        _ => None,
    };
    Ok((tensors, CheckpointInfo { epoch: int("epoch"), step: int("step"), name }))
}

/// The checkpoint formats cnclip reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// cn_clip's `torch.save` archive (`.pt`), with `state_dict` inside.
    CnClip,
    /// cnclip's safetensors with its config in the metadata.
    Cnclip,
    /// Hugging Face `ChineseCLIPModel` (a directory with `config.json`, or its weights file).
    HuggingFace,
}

impl Format {
    /// Guesses a format from the file's first bytes (zip magic → cn_clip) or, for a file that
    /// does not exist yet, from its extension (`.pt`/`.pth`/`.bin` → cn_clip).
    pub fn detect(path: &Path) -> Format {
        if hf::locate(path).is_some() {
            return Format::HuggingFace;
        }
        let mut magic = [0u8; 4];
        // Only a regular file is opened: opening a FIFO blocks until something writes to it.
        let is_zip = cnclip_operators::storage::metadata(path).is_ok_and(|m| m.is_file())
            && cnclip_operators::storage::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok()
            && &magic == b"PK\x03\x04";
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if is_zip || (!path.exists() && matches!(ext, "pt" | "pth" | "bin")) { Format::CnClip } else { Format::Cnclip }
    }
}

/// `Ok` for a regular file or a directory (a Hugging Face checkpoint); a FIFO or a device
/// (`/dev/zero`) would block or never end, and is named for what it is.
///
/// # Errors
/// [`Error::Checkpoint`] for anything else; a missing path is left to the reader's message.
pub fn readable(path: &Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = cnclip_operators::storage::metadata(path) else { return Ok(()) };
    let kind = meta.file_type();
    let what = if kind.is_file() || kind.is_dir() {
        return Ok(());
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() || kind.is_block_device() {
        "a device"
    } else {
        "not a regular file"
    };
    Err(checkpoint_error(&path.display().to_string(), format!("{what}, not a regular file: a checkpoint is a file")))
}

/// Loads a model from any supported checkpoint onto `device`.
///
/// `architecture` is required for cn_clip checkpoints, which do not record it (cn_clip's
/// scripts take `--vision-model`/`--text-model`); for cnclip checkpoints it is optional and,
/// when given, must match the file's config.
///
/// # Errors
/// [`Error::Checkpoint`] for unreadable or unsafe files, [`Error::Config`] for a missing or
/// contradicting architecture, [`Error::StateDict`] when the weights do not fit.
pub fn load_clip(
    path: &Path,
    architecture: Option<&ClipConfig>,
    device: tch::Device,
) -> Result<(Clip, CheckpointInfo)> {
    let checkpoint = Checkpoint::open(path, |_| architecture.cloned())?;
    let (state_dict, info) = checkpoint.read_weights()?;
    let mut model = Clip::new(checkpoint.config, device)?;
    model.load_state_dict(&state_dict)?;
    Ok((model, info))
}

/// How a user names an architecture: on the command line, and in a pipeline's node.
const FLAG_NAMES: &str = "--vision-model ViT-B-16 --text-model RoBERTa-wwm-ext-base-chinese";
const PIPELINE_NAMES: &str = "vision_model = \"ViT-B-16\", text_model = \"RoBERTa-wwm-ext-base-chinese\"";

/// A checkpoint as a job holds it: its file, format and architecture, read when it is opened,
/// and its weights, read on first use (a model on a device, the parameter counts) and kept in
/// a model on the CPU. A job opens it once and passes it down (to its encoder nodes, both
/// towers, every replica), so the file is not reopened layer by layer, and a job that ends
/// before it needs the weights (a finished shard) never reads them.
pub struct Checkpoint {
    path: PathBuf,
    format: Format,
    config: ClipConfig,
    /// The weights, checked against the architecture, and what the file records; copied onto
    /// each device under the lock (a tensor is not shared between threads).
    weights: Mutex<Option<(Clip, CheckpointInfo)>>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("config", &self.config.name())
            .finish_non_exhaustive()
    }
}

impl Checkpoint {
    /// Opens the checkpoint at `path` and reads its architecture. `named(format)` is the
    /// architecture the user named for the format found (`None`: none): cn_clip's `.pt` needs
    /// one, as it does not record its own (cn_clip's scripts have defaults, which the caller
    /// applies here); a self-describing checkpoint must agree with it.
    ///
    /// # Errors
    /// As [`load_clip`], but for the weights, which are read later.
    pub fn open(path: &Path, named: impl FnOnce(Format) -> Option<ClipConfig>) -> Result<Checkpoint> {
        Checkpoint::open_naming(path, named, FLAG_NAMES)
    }

    /// [`Checkpoint::open`] for a pipeline's node, whose message names the architecture by the
    /// node's keys.
    ///
    /// # Errors
    /// As [`Checkpoint::open`].
    pub fn open_in_pipeline(path: &Path, named: Option<&ClipConfig>) -> Result<Checkpoint> {
        Checkpoint::open_naming(path, |_| named.cloned(), PIPELINE_NAMES)
    }

    /// [`Checkpoint::open`], with `how` (e.g. the flags) in the message asking for an architecture.
    fn open_naming(path: &Path, named: impl FnOnce(Format) -> Option<ClipConfig>, how: &str) -> Result<Checkpoint> {
        readable(path)?;
        let format = Format::detect(path);
        let named = named(format);
        let config = match format {
            Format::CnClip => named.ok_or_else(|| {
                Error::Config(format!(
                    "{} is a cn_clip checkpoint, which does not record its architecture: name it (e.g. {how})",
                    path.display()
                ))
            })?,
            Format::HuggingFace => {
                let (dir, _) = hf::locate(path).expect("detected as HF");
                let config = hf::config(&dir)?;
                check_named(path, &config, named.as_ref())?;
                config
            }
            Format::Cnclip => {
                let config = own::config(path)?;
                check_named(path, &config, named.as_ref())?;
                config
            }
        };
        Ok(Checkpoint { path: path.to_path_buf(), format, config, weights: Mutex::new(None) })
    }

    /// The file (or Hugging Face directory) it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// The architecture.
    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    /// The state dict as the file holds it, and what it records.
    fn read_weights(&self) -> Result<(BTreeMap<String, Tensor>, CheckpointInfo)> {
        match self.format {
            Format::CnClip => load_cn_clip(&self.path),
            Format::HuggingFace => {
                let (_, weights) = hf::locate(&self.path).expect("detected as HF");
                Ok((hf::state_dict(&weights)?, CheckpointInfo::default()))
            }
            Format::Cnclip => Ok((own::load(&self.path)?.1, CheckpointInfo::default())),
        }
    }

    /// Runs `f` on the CPU model of the weights, reading them first if no one has.
    fn with_weights<T>(&self, f: impl FnOnce(&Clip, &CheckpointInfo) -> Result<T>) -> Result<T> {
        let mut slot = self.weights.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            let (state_dict, info) = self.read_weights()?;
            let mut model = Clip::new(self.config.clone(), tch::Device::Cpu)?;
            model.load_state_dict(&state_dict)?;
            *slot = Some((model, info));
        }
        let (model, info) = slot.as_ref().expect("read above");
        f(model, info)
    }

    /// A model with these weights on `device` (a copy: the checkpoint keeps its own).
    ///
    /// # Errors
    /// The weights cannot be read or do not fit (the first call), or the device cannot hold
    /// the model.
    pub fn model_on(&self, device: tch::Device) -> Result<Clip> {
        self.with_weights(|cpu, _| {
            let mut model = Clip::new(self.config.clone(), device)?;
            model.load_state_dict(&cpu.state_dict())?;
            Ok(model)
        })
    }

    /// All parameters, and the vision tower's ([`Clip::parameter_counts`]).
    ///
    /// # Errors
    /// The weights cannot be read or do not fit (the first call).
    pub fn parameter_counts(&self) -> Result<(usize, usize)> {
        self.with_weights(|cpu, _| Ok(cpu.parameter_counts()))
    }

    /// The epoch, step and name a cn_clip training checkpoint records.
    ///
    /// # Errors
    /// The weights cannot be read or do not fit (the first call).
    pub fn info(&self) -> Result<CheckpointInfo> {
        self.with_weights(|_, info| Ok(info.clone()))
    }
}

/// A self-describing checkpoint must agree with the architecture the user named, if any.
fn check_named(path: &Path, config: &ClipConfig, architecture: Option<&ClipConfig>) -> Result<()> {
    match architecture.filter(|a| *a != config) {
        None => Ok(()),
        Some(wanted) => Err(Error::Config(format!(
            "{} holds a different architecture than the one named: file {}, named {}",
            path.display(),
            serde_json::to_string(config).unwrap_or_default(),
            serde_json::to_string(wanted).unwrap_or_default()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job's checkpoint is read once: opening it reads the architecture, the first use the
    /// weights, which it keeps; later models (another device, the parameter counts) do not go
    /// back to the file.
    #[test]
    fn a_checkpoint_reads_its_weights_once_on_first_use() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::clip::tests::tiny();
        tch::manual_seed(3);
        let saved = Clip::new(config.clone(), tch::Device::Cpu).unwrap();
        let path = dir.path().join("tiny.safetensors");
        own::save(&path, &config, &saved.state_dict()).unwrap();

        let checkpoint = Checkpoint::open(&path, |_| None).unwrap();
        assert_eq!((checkpoint.format(), checkpoint.config()), (Format::Cnclip, &config));
        let first = checkpoint.model_on(tch::Device::Cpu).unwrap();
        std::fs::remove_file(&path).unwrap();
        let second = checkpoint.model_on(tch::Device::Cpu).unwrap();
        assert_eq!(checkpoint.parameter_counts().unwrap(), saved.parameter_counts());
        let expected = saved.state_dict();
        for model in [first, second] {
            let got = model.state_dict();
            assert_eq!(got.len(), expected.len());
            assert!(got.iter().all(|(name, tensor)| tensor.equal(&expected[name])), "weights differ");
        }

        // Opening does not read the weights: a file gone before their first use is named then.
        own::save(&path, &config, &saved.state_dict()).unwrap();
        let opened = Checkpoint::open(&path, |_| None).unwrap();
        std::fs::remove_file(&path).unwrap();
        let message = opened.model_on(tch::Device::Cpu).unwrap_err().to_string();
        assert!(message.contains("tiny.safetensors"), "{message}");
    }
}
