//! The encoders as pipeline operators: `encode_image` (`pixels` → an `image_features` table)
//! and `encode_text` (`token_ids` → a `text_features` table), registered by `cnclip-torch`.
//!
//! Each runs under [`Execution::Devices`]: one thread per entry of `devices` (`cpu`, `cuda`,
//! `cuda:0,cuda:2`, or a device repeated — `cpu,cpu` is two replicas on the CPU), each owning a
//! model replica built on its thread, fed batches of `batch_size` rows from one bounded queue,
//! results put back in input order by the runtime — so the table is the same whatever the
//! number of replicas. The checkpoint's weights are read once (the first replica to start) and
//! copied onto each device. Features are L2-normalised as cn_clip's scripts do
//! (`x / x.norm(dim=-1, keepdim=True)`, in the model's precision), stored as float32 with the
//! feature-table contract (`id` + `feature`) and metadata naming the model, the checkpoint (file
//! name and sha256), the precision and cnclip's version.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arrow::array::{Array, ArrayRef, AsArray, FixedSizeListArray, Float32Array, Int64Array};
use arrow::datatypes::{DataType, Field, Int64Type, SchemaRef};
use arrow::record_batch::RecordBatch;
use cnclip_operators::options;
use cnclip_operators::spec::{BuildContext, NodeConfig, Operator, Role};
use cnclip_operators::transforms::{Execution, InputError, Output, Transform, TransformReplica};
use cnclip_schemas::columns::{IMAGE_ID, PIXELS, TEXT_ID, TOKEN_IDS};
use cnclip_schemas::{FeatureMetadata, FeatureType};
use schemars::JsonSchema;
use serde::Deserialize;
use tch::{Kind, Tensor};

use crate::checkpoint::{self, Checkpoint};
use crate::{Clip, ClipConfig, normalize};
use cnclip_operators::storage;

/// Which tower an encoder runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tower {
    Image,
    Text,
}

impl Tower {
    /// The input's id column and value column.
    fn columns(self) -> (&'static str, &'static str) {
        match self {
            Tower::Image => (IMAGE_ID, PIXELS),
            Tower::Text => (TEXT_ID, TOKEN_IDS),
        }
    }
}

/// `--precision`: what the model computes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Fp32,
    Fp16,
    Bf16,
}

impl Precision {
    /// `fp32`, `fp16`, `bf16`; cn_clip's `amp` (autocast) is computed as fp16 on a GPU and
    /// fp32 on the CPU, as its scripts end up doing.
    ///
    /// # Errors
    /// Any other name.
    pub fn parse(name: &str, gpu: bool) -> crate::Result<Self> {
        let chosen = name.parse::<options::Precision>().map_err(|unknown| crate::Error::Precision(unknown.0))?;
        Ok(Self::resolve(chosen, gpu))
    }

    /// What `chosen` computes in on a GPU or not.
    pub fn resolve(chosen: options::Precision, gpu: bool) -> Self {
        match chosen {
            options::Precision::Fp32 => Precision::Fp32,
            options::Precision::Fp16 => Precision::Fp16,
            options::Precision::Bf16 => Precision::Bf16,
            options::Precision::Amp if gpu => Precision::Fp16,
            options::Precision::Amp => Precision::Fp32,
        }
    }

    pub fn kind(self) -> Kind {
        match self {
            Precision::Fp32 => Kind::Float,
            Precision::Fp16 => Kind::Half,
            Precision::Bf16 => Kind::BFloat16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Bf16 => "bf16",
        }
    }
}

/// What an encoder node is configured with (both kinds take the same keys).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EncoderConfig {
    /// A cn_clip `.pt`, a cnclip `.safetensors` or a Hugging Face `ChineseCLIPModel` directory.
    ///
    /// A `.pt` needs `vision_model` and `text_model`, or `model_config`.
    pub checkpoint: PathBuf,
    /// A cn_clip `.pt`'s vision tower, as `ViT-B-16`.
    pub vision_model: Option<String>,
    /// A cn_clip `.pt`'s text tower, as `RoBERTa-wwm-ext-base-chinese`.
    pub text_model: Option<String>,
    /// A model config file naming the architecture of a cn_clip `.pt` of another size, instead
    /// of `vision_model` and `text_model`.
    ///
    /// cn_clip's merged model_info JSON.
    #[serde(default)]
    pub model_config: Option<PathBuf>,
    /// What the model computes in; `amp` is cn_clip's mixed precision, fp16 on a GPU.
    #[serde(default = "fp32")]
    #[schemars(with = "options::Precision")]
    pub precision: String,
    /// Rows per model call on each replica.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Comma-separated devices, one replica each: `cuda`, `cuda:0,cuda:2`, `cpu,cpu`, ….
    #[serde(default = "cpu")]
    pub devices: String,
    /// The checkpoint, already opened by the job that plans this node (not a TOML key): the
    /// node then takes its architecture and weights from it instead of opening `checkpoint`.
    #[serde(skip)]
    pub loaded: Option<Arc<Checkpoint>>,
}

fn fp32() -> String {
    "fp32".into()
}

fn cpu() -> String {
    "cpu".into()
}

/// cn_clip's `extract_features.py` default for `--img-batch-size` and `--text-batch-size`.
fn default_batch_size() -> usize {
    64
}

impl EncoderConfig {
    /// Checks every value (the devices exist, the checkpoint has an architecture) and builds
    /// the encoder; nothing is loaded until its replicas start.
    ///
    /// # Errors
    /// Every problem found, one sentence each.
    pub fn encoder(self, tower: Tower, cx: &BuildContext) -> Result<Encoder, Vec<String>> {
        let mut problems = Vec::new();
        // Spelled as `--devices` is (one parser); then each must be there.
        let devices: Vec<String> = match self.devices.parse::<options::Devices>() {
            Ok(devices) => devices.iter().map(|d| d.to_string()).collect(),
            Err(options::BadDevices(bad)) => {
                problems.extend(bad);
                Vec::new()
            }
        };
        for device in &devices {
            if let Err(e) = crate::device::device(device) {
                problems.push(e.to_string());
            }
        }
        let gpu = devices.iter().any(|d| d.starts_with("cuda"));
        let precision = Precision::parse(&self.precision, gpu).unwrap_or_else(|e| {
            problems.push(e.to_string());
            Precision::Fp32
        });
        if precision == Precision::Fp16 && !gpu {
            // libtorch's CPU kernels lack half-precision convolutions.
            problems.push("precision `fp16` needs a CUDA device; on the CPU use fp32 or bf16".into());
        }
        if self.batch_size == 0 {
            problems.push("`batch_size` must be at least 1".into());
        }
        let checkpoint = cx.resolve(&self.checkpoint);
        // A checkpoint in an object store is opened from its copy in the spool (the feature
        // tables still name the object).
        let local = match storage::fetch::local_copy(&checkpoint) {
            Ok(local) => local,
            Err(e) => {
                problems.push(format!("checkpoint {}: {e}", checkpoint.display()));
                checkpoint.clone()
            }
        };
        let named = match (&self.vision_model, &self.text_model, &self.model_config) {
            (Some(v), Some(t), None) => match ClipConfig::from_name(&format!("{v}@{t}")) {
                Ok(config) => Some(config),
                Err(e) => {
                    problems.push(e.to_string());
                    None
                }
            },
            (None, None, None) => None,
            (None, None, Some(path)) => {
                let path = cx.resolve(path);
                let json = cnclip_operators::sources::read_text(&path, cnclip_operators::sources::MAX_TEXT_BYTES)
                    .map_err(|e| problems.push(format!("`model_config`: {e}")))
                    .ok();
                json.and_then(|json| {
                    ClipConfig::from_json(&json).map_err(|e| problems.push(format!("{}: {e}", path.display()))).ok()
                })
            }
            (_, _, Some(_)) => {
                problems.push(
                    "`model_config` names the architecture alone, without `vision_model` and `text_model`".into(),
                );
                None
            }
            _ => {
                problems.push("`vision_model` and `text_model` go together".into());
                None
            }
        };
        let opened = match self.loaded {
            Some(loaded) => match named.as_ref().filter(|named| *named != loaded.config()) {
                None => Some(loaded),
                Some(_) => {
                    problems.push(format!(
                        "{} was opened as {}, not as the architecture this node names",
                        loaded.path().display(),
                        loaded.config().name()
                    ));
                    None
                }
            },
            None if local.exists() => checkpoint::Checkpoint::open_in_pipeline(&local, named.as_ref())
                .map(Arc::new)
                .map_err(|e| problems.push(e.to_string()))
                .ok(),
            None => {
                problems.push(format!("checkpoint {} does not exist", checkpoint.display()));
                None
            }
        };
        let config = opened.as_ref().map(|c| c.config().clone());
        let sha256 = match &config {
            Some(_) => sha256_of(&local).map_err(|e| problems.push(e.to_string())).ok(),
            None => None,
        };
        match (opened, config, sha256) {
            (Some(opened), Some(config), Some(sha256)) if problems.is_empty() => {
                let dim = config.vision.embed_dim as usize;
                let meta = FeatureMetadata {
                    model: config.name(),
                    checkpoint: checkpoint.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
                    checkpoint_sha256: sha256,
                    precision: precision.name().into(),
                    dim,
                    normalized: true,
                    preprocessing: match tower {
                        Tower::Image => format!("pixels-{}", config.vision.image_resolution),
                        Tower::Text => "token_ids".into(),
                    },
                };
                Ok(Encoder {
                    tower,
                    checkpoint,
                    config,
                    precision,
                    batch_size: self.batch_size,
                    devices,
                    meta,
                    opened,
                    keyed: Default::default(),
                })
            }
            _ => Err(problems),
        }
    }
}

/// The hex sha256 of a file (or of a Hugging Face directory's weights file), computed once per
/// process for a given file, size and modification time (an image and a text encoder of one
/// checkpoint share it).
fn sha256_of(path: &Path) -> crate::Result<String> {
    use sha2::Digest;
    type Key = (PathBuf, u64, Option<std::time::SystemTime>);
    static CACHE: std::sync::LazyLock<Mutex<BTreeMap<Key, String>>> = std::sync::LazyLock::new(Default::default);
    let file = match checkpoint::hf::locate(path) {
        Some((_, weights)) => weights,
        None => path.to_path_buf(),
    };
    let io = |source| crate::Error::File { path: file.clone(), source };
    let meta = storage::metadata(&file).map_err(io)?;
    let key = (file.clone(), meta.len(), meta.modified().ok());
    if let Some(known) = CACHE.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(known.clone());
    }
    let mut reader = storage::open(&file).map_err(io)?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut reader, &mut hasher).map_err(io)?;
    let hex: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    CACHE.lock().unwrap_or_else(|e| e.into_inner()).insert(key, hex.clone());
    Ok(hex)
}

/// pixels → image_features (id, feature), L2-normalised.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct EncodeImageConfig(pub EncoderConfig);

/// token_ids → text_features (id, feature), L2-normalised.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct EncodeTextConfig(pub EncoderConfig);

impl NodeConfig for EncodeImageConfig {
    const KIND: &'static str = "encode_image";
    const ROLE: Role = Role::Transform;
    fn build(self, cx: &BuildContext) -> Result<Operator, Vec<String>> {
        Ok(Operator::Transform(Arc::new(self.0.encoder(Tower::Image, cx)?)))
    }
}

impl NodeConfig for EncodeTextConfig {
    const KIND: &'static str = "encode_text";
    const ROLE: Role = Role::Transform;
    fn build(self, cx: &BuildContext) -> Result<Operator, Vec<String>> {
        Ok(Operator::Transform(Arc::new(self.0.encoder(Tower::Text, cx)?)))
    }
}

/// Adds the encoder kinds to `registry`.
pub fn register(registry: &mut cnclip_operators::spec::Registry) {
    registry.register::<EncodeImageConfig>().register::<EncodeTextConfig>();
}

/// An encoder node: planned with its checkpoint's architecture, run on device replicas.
pub struct Encoder {
    tower: Tower,
    checkpoint: PathBuf,
    config: ClipConfig,
    precision: Precision,
    batch_size: usize,
    devices: Vec<String>,
    meta: FeatureMetadata,
    /// The checkpoint, as the job opened it (or this node, for a pipeline file): its weights
    /// are read by the first replica to start, and each replica copies them onto its device.
    opened: Arc<Checkpoint>,
    /// Whether the input carries string keys (`key`: WebDataset, img2dataset), which the feature
    /// table then carries too, so users join features back to their metadata. Set at planning.
    keyed: std::sync::atomic::AtomicBool,
}

impl Encoder {
    /// The feature table it writes.
    pub fn schema(&self) -> SchemaRef {
        let table = match self.tower {
            Tower::Image => cnclip_schemas::image_features(&self.meta, FeatureType::Float32),
            Tower::Text => cnclip_schemas::text_features(&self.meta, FeatureType::Float32),
        };
        if !self.keyed.load(std::sync::atomic::Ordering::Relaxed) {
            return table;
        }
        let mut fields: Vec<Field> = table.fields().iter().map(|f| f.as_ref().clone()).collect();
        fields.push(Field::new(cnclip_schemas::columns::KEY, DataType::Utf8, false));
        Arc::new(arrow::datatypes::Schema::new_with_metadata(fields, table.metadata().clone()))
    }

    /// A model on `device` with the checkpoint's weights (read on the first call).
    fn model_on(&self, device: tch::Device) -> crate::Result<Clip> {
        let mut model = self.opened.model_on(device)?;
        model.set_kind(self.precision.kind());
        Ok(model)
    }
}

impl Transform for Encoder {
    fn output_schema(&self, input: &SchemaRef) -> Result<SchemaRef, InputError> {
        let (id, values) = self.tower.columns();
        let id_index = input.index_of(id).map_err(|_| {
            InputError::Mismatch(format!("needs an `{id}` column (Int64); the input has {}", columns(input)))
        })?;
        if input.field(id_index).data_type() != &DataType::Int64 {
            return Err(InputError::ColumnType {
                name: id.to_string(),
                expected: DataType::Int64,
                found: input.field(id_index).data_type().clone(),
            });
        }
        let index = input.index_of(values).map_err(|_| {
            InputError::Mismatch(format!("needs a `{values}` column; the input has {}", columns(input)))
        })?;
        let found = input.field(index).data_type();
        match (self.tower, found) {
            (Tower::Image, DataType::FixedSizeBinary(bytes)) => {
                let r = self.config.vision.image_resolution;
                if *bytes as i64 != 3 * r * r {
                    return Err(InputError::Mismatch(format!(
                        "`pixels` are {bytes} bytes per image, the model takes {r}×{r} RGB ({} bytes): preprocess with resolution = {r}",
                        3 * r * r
                    )));
                }
            }
            (Tower::Text, DataType::FixedSizeList(item, length)) if item.data_type() == &DataType::Int64 => {
                let max = self.config.text.text_max_position_embeddings;
                if *length as i64 > max {
                    return Err(InputError::Mismatch(format!(
                        "`token_ids` hold {length} ids; the model takes at most {max}"
                    )));
                }
            }
            (Tower::Image, other) => {
                return Err(InputError::Mismatch(format!(
                    "needs `pixels` as FixedSizeBinary (a preprocess node's output), got {other}"
                )));
            }
            (Tower::Text, other) => {
                return Err(InputError::Mismatch(format!(
                    "needs `token_ids` as FixedSizeList<Int64> (a tokenize node's output), got {other}"
                )));
            }
        }
        let keyed = input
            .field_with_name(cnclip_schemas::columns::KEY)
            .is_ok_and(|f| f.data_type() == &DataType::Utf8 && !f.is_nullable());
        self.keyed.store(keyed, std::sync::atomic::Ordering::Relaxed);
        Ok(self.schema())
    }

    fn execution(&self) -> Execution {
        Execution::Devices { devices: self.devices.clone(), batch_rows: self.batch_size }
    }

    fn open_replica(&self, device: &str) -> cnclip_operators::Result<Option<Box<dyn TransformReplica>>> {
        let fail = |e: crate::Error| cnclip_operators::Error::Model(Box::new(e));
        let on = crate::device::device(device).map_err(fail)?;
        // Replicas on the CPU share libtorch's one intra-op pool, at its size: the same kernels
        // with the same thread count, so features do not depend on the number of replicas.
        let model = self.model_on(on).map_err(fail)?;
        Ok(Some(Box::new(EncoderReplica {
            model,
            tower: self.tower,
            kind: self.precision.kind(),
            schema: self.schema(),
            resolution: self.config.vision.image_resolution as usize,
            checkpoint: self.checkpoint.clone(),
        })))
    }
}

fn columns(schema: &SchemaRef) -> String {
    schema.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", ")
}

/// One device's model.
struct EncoderReplica {
    model: Clip,
    tower: Tower,
    kind: Kind,
    schema: SchemaRef,
    resolution: usize,
    /// For the error naming a checkpoint that gives non-finite features.
    checkpoint: PathBuf,
}

impl EncoderReplica {
    /// The normalised features of the batch's rows, `[N, D]` float32 on the CPU.
    fn features(&self, batch: &RecordBatch) -> crate::Result<Tensor> {
        let device = self.model.device();
        let (_, values) = self.tower.columns();
        let column = batch.column_by_name(values).expect("checked at planning");
        let features = match self.tower {
            Tower::Image => {
                let pixels = column.as_fixed_size_binary();
                let mut rgb = Vec::with_capacity(pixels.len() * pixels.value_length() as usize);
                for row in 0..pixels.len() {
                    rgb.extend_from_slice(pixels.value(row));
                }
                let input = crate::preprocess::pixels_to_tensor(&rgb, self.resolution).to_device(device);
                self.model.encode_image(&input.to_kind(self.kind))?
            }
            Tower::Text => {
                let lists = column.as_fixed_size_list();
                let length = lists.value_length() as i64;
                let ids = lists.values().as_primitive::<Int64Type>();
                let ids = &ids.values()[lists.offset() * length as usize..][..lists.len() * length as usize];
                let input = Tensor::from_slice(ids).view([lists.len() as i64, length]).to_device(device);
                self.model.encode_text(&input)?
            }
        };
        Ok(normalize(&features).to_device(tch::Device::Cpu).to_kind(Kind::Float).contiguous())
    }
}

impl TransformReplica for EncoderReplica {
    fn apply(&mut self, batch: &RecordBatch, _: &str) -> cnclip_operators::Result<Output> {
        let internal = |e: String| cnclip_operators::Error::Internal(e);
        let features = self.features(batch).map_err(|e| internal(e.to_string()))?;
        let (id, _) = self.tower.columns();
        let ids = batch.column_by_name(id).expect("checked at planning").as_primitive::<Int64Type>();
        let flat: Vec<f32> =
            Vec::try_from(features.flatten(0, -1)).map_err(|e: tch::TchError| internal(e.to_string()))?;
        let dim = match self.schema.field(1).data_type() {
            DataType::FixedSizeList(_, dim) => *dim,
            other => return Err(internal(format!("feature column is {other}"))),
        };
        // Features must be finite numbers: a search would rank NaN first or drop it. A whole
        // batch of them is the model's doing (NaN or inf weights, a diverged training run) and
        // stops the job naming the checkpoint, before anything is written; a few rows of a
        // batch (a half-precision overflow on one input) are those rows' own fault, and are
        // quarantined under the job's --on-error.
        let d = dim.max(1) as usize;
        let bad: Vec<usize> =
            (0..ids.len()).filter(|&row| flat[row * d..(row + 1) * d].iter().any(|v| !v.is_finite())).collect();
        if !bad.is_empty() && bad.len() == ids.len() {
            let shown: Vec<String> = bad.iter().take(10).map(|&row| ids.value(row).to_string()).collect();
            return Err(cnclip_operators::Error::Format {
                path: self.checkpoint.display().to_string(),
                reason: format!(
                    "the model gives non-finite features (NaN or inf) for every row of a batch ({id} {}{}): its \
                     weights are not finite numbers (a diverged training run?); no features were written",
                    shown.join(", "),
                    if bad.len() > shown.len() { ", …" } else { "" }
                ),
            });
        }
        let rejected: Vec<cnclip_operators::quarantine::Rejected> = bad
            .iter()
            .map(|&row| cnclip_operators::quarantine::Rejected {
                source: self.checkpoint.display().to_string(),
                location: format!("{id} {}", ids.value(row)),
                id: Some(ids.value(row).to_string()),
                reason: "the model gives a non-finite feature (NaN or inf) for it".into(),
            })
            .collect();
        let keep: Vec<usize> = (0..ids.len()).filter(|row| !bad.contains(row)).collect();
        let flat: Vec<f32> = if bad.is_empty() {
            flat
        } else {
            keep.iter().flat_map(|&row| flat[row * d..(row + 1) * d].iter().copied()).collect()
        };
        let item = Arc::new(Field::new("item", DataType::Float32, false));
        let feature = FixedSizeListArray::try_new(item, dim, Arc::new(Float32Array::from(flat)), None)?;
        let ids: ArrayRef = Arc::new(Int64Array::from(keep.iter().map(|&row| ids.value(row)).collect::<Vec<i64>>()));
        let mut columns = vec![ids, Arc::new(feature) as ArrayRef];
        if self.schema.field_with_name(cnclip_schemas::columns::KEY).is_ok() {
            let keys = batch.column_by_name(cnclip_schemas::columns::KEY).expect("checked at planning");
            let indices = arrow::array::UInt32Array::from(keep.iter().map(|&row| row as u32).collect::<Vec<_>>());
            columns.push(arrow::compute::take(keys, &indices, None)?);
        }
        let batch = RecordBatch::try_new(self.schema.clone(), columns)?;
        Ok(Output { batch, rejected })
    }
}
