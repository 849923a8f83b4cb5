//! `cnclip train`: cn_clip's `training/main.py` with its flags and defaults — contrastive
//! fine-tuning on a cn_clip LMDB split, on one or several replicas (`--devices cpu,cpu` stands
//! for two ranks), with cn_clip's losses, optimizer, schedule, logs and checkpoints.
//!
//! Each epoch is a pipeline: `lmdb_train` (the split in cn_clip's sampler order, from the
//! first micro-batch not yet trained on) → `decode_base64` → `preprocess` → `tokenize`, on the
//! worker pool, streamed to this job, which cuts the rows into per-replica micro-batches and
//! steps the [`Trainer`] — decoding runs ahead of the step through the pipeline's bounded
//! edges. Validation (`--val-data`) is the same pipeline over the validation split, as cn_clip's
//! `evaluate()`.
//!
//! Checkpoints (`{logs}/{name}/checkpoints/epoch{N}.pt`, `epoch_{N}_{step}.pt`,
//! `epoch_latest.pt`) are cn_clip's files and carry the exact data position; a rerun of the
//! same command resumes from `epoch_latest.pt` (as cn_clip does) and, from one of ours, goes on
//! with exactly the samples not yet seen. Dropout and FLIP masks are drawn from a generator
//! seeded per step (`--seed`, step), so an interrupted and resumed run equals an uninterrupted
//! one.

mod checkpoint;
mod data;
mod log;
mod ranks;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use arrow::array::{Array, AsArray};
use arrow::datatypes::Int64Type;
use arrow::record_batch::RecordBatch;
use cnclip_models::checkpoint::{Checkpoint, Format};
use cnclip_models::training::{
    AdamWConfig, Autocast, Batch, GradScaler, ScalerConfig, StepOptions, StepReport, Trainer, cosine_lr, rank_loss,
};
use cnclip_models::{Clip, ClipConfig};
use cnclip_operators::options::{Devices, Precision};
use cnclip_operators::quarantine::OnError;
use cnclip_operators::sinks::jsonl::python_float;
use cnclip_operators::sources::lmdb::counts;
use cnclip_operators::sources::lmdb_train::LmdbTrainConfig;
use cnclip_operators::sources::lmdb_train::TrainOrder;
use cnclip_operators::sources::train_parquet::Columns;
use cnclip_operators::sources::train_shards::TrainShardsConfig;
use cnclip_operators::spec::PipelineStream;
use cnclip_operators::spec::{JobSettings, NodeDef, Planner};
use cnclip_operators::transforms::augment::RandomAugmentConfig;
use cnclip_operators::transforms::base64::DecodeBase64Config;
use cnclip_operators::transforms::preprocess::Order;
use cnclip_operators::transforms::preprocess::PreprocessConfig;
use cnclip_operators::transforms::tokenize::TokenizeConfig;
use cnclip_schemas::columns::{PIXELS, SAMPLE, TOKEN_IDS};

use crate::model_args::ModelArgs;
use tch::{Device, Tensor};

use self::checkpoint::{Position, Saved};
use self::data::TrainData;
use self::log::{Log, Metric, Metrics};
use cnclip_operators::storage;

#[derive(clap::Args, Debug, Clone, PartialEq, serde::Serialize)]
pub struct Args {
    /// The training data: a cn_clip LMDB split directory (with `imgs/` and `pairs/`); WebDataset
    /// shards (`.tar` files, globs, `{000..099}` patterns), a `{split}_imgs.tsv` (with
    /// `{split}_texts.jsonl`) or a `{split}_images.parquet` (with `_texts`/`_pairs`), local or URLs,
    /// read in place through an index made under `{logs}/{name}/data`.
    #[arg(long)]
    pub train_data: PathBuf,
    /// The validation split, in any layout --train-data takes (default: none, no validation).
    #[arg(long)]
    pub val_data: Option<PathBuf>,
    /// Data read in place only (shards, Parquet by columns, TSV): 0 reads it in cn_clip's sampler
    /// order (random reads, its semantics); N streams each epoch's shards (a TSV's pairs in blocks
    /// of 4096) in a shuffled order through a shuffle buffer of N samples, for corpora too big for
    /// random reads (the last partial global batch dropped).
    #[arg(long, default_value_t = 0)]
    pub shuffle_buffer: usize,
    /// Parquet training data in another project's layout, read in place: the image column
    /// (bytes, base64 text or `{bytes, path}` structs: img2dataset's `jpg`, HF's `image`).
    #[arg(long, requires = "text_column")]
    pub image_column: Option<String>,
    /// With --image-column: the text column (img2dataset's `caption`).
    #[arg(long, requires = "image_column")]
    pub text_column: Option<String>,
    /// With --image-column: the id column, integer ids or string keys (img2dataset's `key`).
    #[arg(long, requires = "image_column")]
    pub id_column: Option<String>,
    /// Decode/preprocess threads of the training pipeline (0: one per core).
    #[arg(long, default_value_t = 4)]
    pub num_workers: usize,
    /// Threads of the validation pipeline.
    #[arg(long, default_value_t = 1)]
    pub valid_num_workers: usize,
    /// Where logs and checkpoints go (`{logs}/{name}/`).
    #[arg(long, default_value = "./logs/")]
    pub logs: String,
    /// The run's name: its logs and checkpoints go under `{logs}/{name}/` (cn_clip's --name).
    #[arg(long, default_value = "train_clip")]
    pub name: String,
    /// Log every this many steps.
    #[arg(long, default_value_t = 10)]
    pub log_interval: u64,
    /// Also log the training batch's image→text and text→image accuracy.
    #[arg(long)]
    pub report_training_batch_acc: bool,
    /// Batch size per replica.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Validation batch size per replica.
    #[arg(long, default_value_t = 64)]
    pub valid_batch_size: usize,
    /// Steps to train for (over --max-epochs).
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Epochs to train for, unless --max-steps is given (cn_clip's --max-epochs).
    #[arg(long, default_value_t = 32)]
    pub max_epochs: u64,
    /// Validate every this many steps (default: only between epochs).
    #[arg(long)]
    pub valid_step_interval: Option<u64>,
    /// Validate every this many epochs (0: never).
    #[arg(long, default_value_t = 1)]
    pub valid_epoch_interval: u64,
    /// Sequence length, [CLS] and [SEP] included (cn_clip's --context-length).
    #[arg(long, default_value_t = 52)]
    pub context_length: usize,
    /// Learning rate (default by --vision-model, as cn_clip's get_default_params).
    #[arg(long)]
    pub lr: Option<f64>,
    /// AdamW's beta1 (default by --vision-model, as cn_clip's get_default_params).
    #[arg(long)]
    pub beta1: Option<f64>,
    /// AdamW's beta2 (default by --vision-model, as cn_clip's get_default_params).
    #[arg(long)]
    pub beta2: Option<f64>,
    /// AdamW's epsilon (default by --vision-model, as cn_clip's get_default_params).
    #[arg(long)]
    pub eps: Option<f64>,
    /// AdamW weight decay, for every parameter but bn, ln, bias and logit_scale (cn_clip's --wd).
    #[arg(long, default_value_t = 0.2)]
    pub wd: f64,
    /// Warmup steps.
    #[arg(long, default_value_t = 500)]
    pub warmup: u64,
    /// BatchNorm (RN50) normalises with the statistics of the batch over all ranks, as torch's
    /// SyncBatchNorm (ranks of several processes; one replica is synchronised already).
    #[arg(long)]
    pub use_bn_sync: bool,
    /// cn_clip's training augmentation (timm's RandomResizedCrop 0.9–1, flip, AutoAugment
    /// 'original'), drawn per sample and epoch from --seed.
    #[arg(long)]
    pub use_augment: bool,
    /// Accepted as cn_clip 1.6.0 accepts it: it has no effect there (warmup + cosine always run).
    #[arg(long)]
    pub skip_scheduler: bool,
    /// Save `epoch{N}.pt` every this many epochs.
    #[arg(long, default_value_t = 1)]
    pub save_epoch_frequency: i64,
    /// Save `epoch_{N}_{step}.pt` every this many steps (-1: never).
    #[arg(long, default_value_t = -1)]
    pub save_step_frequency: i64,
    /// A checkpoint to resume from (default: `{logs}/{name}/checkpoints/epoch_latest.pt` if there).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Resume the weights but not the optimizer state.
    #[arg(long)]
    pub reset_optimizer: bool,
    /// Resume the weights but start at epoch 0, step 0.
    #[arg(long)]
    pub reset_data_offset: bool,
    /// amp: the forward pass and loss under autocast, fp16 with a dynamic loss scale on a GPU
    /// (cn_clip's), bf16 on the CPU; bf16: bf16 autocast on any device; fp32. (fp16 weights,
    /// cn_clip's `fp16`, are not trained.)
    #[arg(long, value_enum, default_value_t = Precision::Amp)]
    pub precision: Precision,
    /// The architecture: `--vision-model` and `--text-model` (cn_clip's defaults ViT-B-16 and
    /// RoBERTa-wwm-ext-base-chinese), or `--model-config`.
    #[command(flatten)]
    #[serde(flatten)]
    pub model: ModelArgs,
    /// FLIP: the share of image patches dropped in training (ViT).
    #[arg(long, default_value_t = 0.0)]
    pub mask_ratio: f64,
    /// Initial vision tower and logit_scale from this torch state dict (`visual.*`,
    /// `logit_scale`), as cn_clip's `restore_model`.
    #[arg(long)]
    pub clip_weight_path: Option<PathBuf>,
    /// Initial text tower from this torch state dict (`bert.*` but the pooler), e.g. a Hugging
    /// Face `pytorch_model.bin`, as cn_clip's `restore_model`.
    #[arg(long)]
    pub bert_weight_path: Option<PathBuf>,
    /// Do not train the vision tower (RN50's BatchNorm statistics stay frozen too).
    #[arg(long)]
    pub freeze_vision: bool,
    /// Recompute the ViT residual blocks' and BERT layers' activations in the backward pass instead
    /// of keeping them (less memory, a second forward pass per block; RN50 as in cn_clip: unchanged).
    #[arg(long)]
    pub grad_checkpointing: bool,
    /// Accepted: attention runs through libtorch's fused kernels wherever the device has them.
    #[arg(long)]
    pub use_flash_attention: bool,
    /// Micro-batches per step, their features accumulated as cn_clip does.
    #[arg(long, default_value_t = 1)]
    pub accum_freq: usize,
    /// Gather features across replicas with their gradients.
    #[arg(long)]
    pub gather_with_grad: bool,
    /// Each replica's loss over its own batch only.
    #[arg(long)]
    pub skip_aggregate: bool,
    /// Also record each step's samples in the metrics table.
    #[arg(long)]
    pub debug: bool,
    /// Random seed: initial weights, sample order, augmentation, dropout and FLIP masks (cn_clip's --seed).
    #[arg(long, default_value_t = 123)]
    pub seed: u64,
    /// Distil from a teacher's image features (--teacher-model-name).
    #[arg(long)]
    pub distillation: bool,
    /// The teacher: any checkpoint cnclip loads that records its architecture (.safetensors,
    /// a Hugging Face directory), or a cn_clip .pt of the student's architecture.
    #[arg(long)]
    pub teacher_model_name: Option<PathBuf>,
    /// Weight of the distillation loss added to the contrastive one (with --distillation; cn_clip's --kd_loss_weight).
    #[arg(long = "kd_loss_weight", default_value_t = 0.5)]
    pub kd_loss_weight: f64,
    /// Devices, one replica each: cpu, cuda, cuda:0,cuda:1, cpu,cpu. A rank of a run of several
    /// processes takes entry LOCAL_RANK (mod their number).
    #[arg(long, default_value_t = Devices::cpu())]
    pub devices: Devices,
    /// Start this many ranks on this machine, each a process running this command (torchrun's
    /// --nproc_per_node; NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT as torchrun reads them).
    /// A process started with RANK and WORLD_SIZE (torchrun) or under srun (SLURM_PROCID) is
    /// one rank already.
    #[arg(long, default_value_t = 1)]
    pub nproc_per_node: usize,
    /// Seconds the ranks of a run of several processes wait for each other, to meet and at each
    /// exchange, before failing (torch's default: 30 minutes).
    #[arg(long, default_value_t = 1800)]
    pub dist_timeout: u64,
    /// Go on when the loss becomes NaN or inf, as cn_clip does (by default the run stops
    /// there: the parameters are no longer numbers, and every later checkpoint would be NaN).
    #[arg(long)]
    pub allow_non_finite_loss: bool,
}

impl Args {
    /// The options a command line with only the required flags gives (each flag's default).
    pub fn new(train_data: PathBuf) -> Self {
        Args {
            train_data,
            val_data: None,
            shuffle_buffer: 0,
            image_column: None,
            text_column: None,
            id_column: None,
            num_workers: 4,
            valid_num_workers: 1,
            logs: "./logs/".into(),
            name: "train_clip".into(),
            log_interval: 10,
            report_training_batch_acc: false,
            batch_size: 64,
            valid_batch_size: 64,
            max_steps: None,
            max_epochs: 32,
            valid_step_interval: None,
            valid_epoch_interval: 1,
            context_length: 52,
            lr: None,
            beta1: None,
            beta2: None,
            eps: None,
            wd: 0.2,
            warmup: 500,
            use_bn_sync: false,
            use_augment: false,
            skip_scheduler: false,
            save_epoch_frequency: 1,
            save_step_frequency: -1,
            resume: None,
            reset_optimizer: false,
            reset_data_offset: false,
            precision: Precision::Amp,
            model: ModelArgs::default(),
            mask_ratio: 0.0,
            clip_weight_path: None,
            bert_weight_path: None,
            freeze_vision: false,
            grad_checkpointing: false,
            use_flash_attention: false,
            accum_freq: 1,
            gather_with_grad: false,
            skip_aggregate: false,
            debug: false,
            seed: 123,
            distillation: false,
            teacher_model_name: None,
            kd_loss_weight: 0.5,
            devices: Devices::cpu(),
            nproc_per_node: 1,
            dist_timeout: 1800,
            allow_non_finite_loss: false,
        }
    }
}

/// cn_clip's `get_default_params(vision_model)`: (lr, beta1, beta2, eps).
fn default_params(vision_model: &str) -> Option<(f64, f64, f64, f64)> {
    match vision_model {
        "RN50" | "RN101" | "RN50x4" => Some((5.0e-4, 0.9, 0.999, 1.0e-8)),
        "ViT-B-32" | "ViT-B-16" | "ViT-H-14" => Some((5.0e-4, 0.9, 0.98, 1.0e-6)),
        "ViT-L-14" | "ViT-L-14-336" => Some((4.0e-4, 0.9, 0.98, 1.0e-6)),
        _ => None,
    }
}

/// The settings after cn_clip's defaults and the data's size are applied.
struct Plan {
    train: TrainData,
    val: Option<TrainData>,
    config: ClipConfig,
    /// This process's replicas: all of them, or this rank's one.
    devices: Vec<Device>,
    /// Replicas in all (processes × their replicas), and this process's rank when it is one of
    /// several.
    world: usize,
    rank: Option<usize>,
    adamw: AdamWConfig,
    options: StepOptions,
    /// A dynamic loss scale (`--precision amp` on a GPU), kept in the checkpoints.
    loss_scaling: bool,
    samples: usize,
    num_batches: usize,
    steps_per_epoch: u64,
    max_steps: u64,
    max_epochs: u64,
    dir: PathBuf,
    checkpoints: PathBuf,
}

fn plan(args: &Args, train: TrainData, val: Option<TrainData>, rank: Option<&ranks::Rank>) -> Result<Plan> {
    if args.precision == Precision::Fp16 {
        bail!(
            "--precision fp16 (cn_clip's fp16 weights, trained in fp16) is not supported by cnclip train: amp trains in \
             fp16 under autocast, with fp32 weights and a loss scale"
        );
    }
    if args.accum_freq == 0 || args.batch_size == 0 || args.valid_batch_size == 0 || args.log_interval == 0 {
        bail!("--accum-freq, --batch-size, --valid-batch-size and --log-interval must be at least 1");
    }
    if args.distillation && args.teacher_model_name.is_none() {
        bail!("--distillation needs --teacher-model-name (a checkpoint)");
    }
    let devices: Vec<Device> = args
        .devices
        .iter()
        .map(|d| cnclip_models::device::device(&d.to_string()))
        .collect::<std::result::Result<_, _>>()?;
    let (devices, world) = match rank {
        // A bare `cuda` on a rank: the GPU of its local rank among those it sees (one, when the
        // scheduler gives each task its own).
        Some(rank) if args.devices.to_string() == "cuda" => {
            let count = tch::Cuda::device_count().max(1) as usize;
            (vec![Device::Cuda(rank.local_rank % count)], rank.world)
        }
        Some(rank) => (vec![devices[rank.local_rank % devices.len()]], rank.world),
        None => (devices.clone(), devices.len()),
    };
    if args.use_bn_sync && rank.is_none() && world > 1 {
        bail!(
            "--use-bn-sync over replicas in one process is not supported: run them as ranks (--nproc-per-node {world}, \
             one --devices entry each)"
        );
    }
    let (config, vision_name) = match &args.model.model_config {
        Some(path) => {
            let json = cnclip_operators::sources::read_text(path, cnclip_operators::sources::MAX_TEXT_BYTES)
                .context("--model-config")?;
            (ClipConfig::from_json(&json).with_context(|| format!("--model-config {}", path.display()))?, None)
        }
        None => {
            let vision = args.model.vision_model.as_deref().unwrap_or("ViT-B-16");
            let text = args.model.text_model.as_deref().unwrap_or("RoBERTa-wwm-ext-base-chinese");
            (ClipConfig::from_name(&format!("{vision}@{text}"))?, Some(vision.to_string()))
        }
    };
    let defaults = vision_name.as_deref().and_then(default_params);
    let pick = |value: Option<f64>, default: Option<f64>, flag: &str| {
        value.or(default).with_context(|| format!("{flag} has no default for this model: give it"))
    };
    let adamw = AdamWConfig {
        lr: pick(args.lr, defaults.map(|d| d.0), "--lr")?,
        beta1: pick(args.beta1, defaults.map(|d| d.1), "--beta1")?,
        beta2: pick(args.beta2, defaults.map(|d| d.2), "--beta2")?,
        eps: pick(args.eps, defaults.map(|d| d.3), "--eps")?,
        weight_decay: args.wd,
    };
    let samples = train.samples().with_context(|| format!("--train-data {}", train.describe()))?;
    if samples == 0 {
        bail!("--train-data {}: no samples", train.describe());
    }
    if args.shuffle_buffer > 0 && matches!(train, TrainData::Lmdb(_)) {
        bail!(
            "--shuffle-buffer streams WebDataset shards, a TSV or Parquet files read by their columns: --train-data {} \
             is read with cn_clip's sampler",
            train.describe()
        );
    }
    let order = TrainOrder {
        seed: args.seed,
        epoch: 0,
        world,
        batch_size: args.batch_size,
        start: 0,
        end: None,
        shuffle_buffer: args.shuffle_buffer,
        rank: None,
    };
    let num_batches = order.num_batches(samples);
    if num_batches == 0 {
        bail!(
            "--train-data {}: its {samples} samples make no whole global batch of {} (a stream drops a partial one)",
            train.describe(),
            args.batch_size * world
        );
    }
    let steps_per_epoch = (num_batches / args.accum_freq) as u64;
    if steps_per_epoch == 0 {
        bail!("--accum-freq {} is more than the {num_batches} batches of an epoch", args.accum_freq);
    }
    // main.py: --max-steps decides the epochs, else the epochs decide the steps.
    let (max_steps, max_epochs) = match args.max_steps {
        Some(steps) => {
            let micro = steps.checked_mul(args.accum_freq as u64).context("--max-steps × --accum-freq overflows")?;
            (steps, micro.div_ceil(num_batches as u64))
        }
        None => (steps_per_epoch * args.max_epochs, args.max_epochs),
    };
    let dir = Path::new(&args.logs).join(&args.name);
    let checkpoints = dir.join("checkpoints");
    // cn_clip's amp is fp16 autocast and a GradScaler on its GPUs; the CPU autocasts to bf16,
    // whose range is fp32's (no loss scale needed).
    let gpu = devices.iter().any(|d| d.is_cuda());
    let (autocast, loss_scaling) = match args.precision {
        Precision::Amp if gpu => (Autocast::Half, true),
        Precision::Amp | Precision::Bf16 => (Autocast::BFloat16, false),
        Precision::Fp32 | Precision::Fp16 => (Autocast::Off, false),
    };
    Ok(Plan {
        train,
        val,
        config,
        devices,
        world,
        rank: rank.map(|r| r.rank),
        adamw,
        options: StepOptions {
            accum_freq: args.accum_freq,
            mask_ratio: args.mask_ratio,
            aggregate: !args.skip_aggregate,
            gather_with_grad: args.gather_with_grad,
            kd_loss_weight: args.distillation.then_some(args.kd_loss_weight),
            freeze_vision: args.freeze_vision,
            autocast,
            grad_checkpointing: args.grad_checkpointing,
            sync_batch_norm: args.use_bn_sync && world > 1,
        },
        loss_scaling,
        samples,
        num_batches,
        steps_per_epoch,
        max_steps,
        max_epochs,
        dir,
        checkpoints,
    })
}

/// cn_clip's params file: every setting, sorted, Python's spelling of values.
fn params(args: &Args, plan: &Plan) -> BTreeMap<String, String> {
    fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
        v.as_ref().map_or("None".into(), |v| v.to_string())
    }
    fn path(v: &Option<PathBuf>) -> String {
        v.as_ref().map_or("None".into(), |v| v.display().to_string())
    }
    let flag = |b: bool| if b { "True" } else { "False" }.to_string();
    let mut p = BTreeMap::new();
    let mut set = |k: &str, v: String| {
        p.insert(k.to_string(), v);
    };
    set("train_data", args.train_data.display().to_string());
    set("val_data", path(&args.val_data));
    set("num_workers", args.num_workers.to_string());
    set("valid_num_workers", args.valid_num_workers.to_string());
    set("logs", args.logs.clone());
    set("name", args.name.clone());
    set("log_interval", args.log_interval.to_string());
    set("report_training_batch_acc", flag(args.report_training_batch_acc));
    set("batch_size", args.batch_size.to_string());
    set("valid_batch_size", args.valid_batch_size.to_string());
    set("max_steps", plan.max_steps.to_string());
    set("max_epochs", plan.max_epochs.to_string());
    set("valid_step_interval", opt(&args.valid_step_interval));
    set("valid_epoch_interval", args.valid_epoch_interval.to_string());
    set("context_length", args.context_length.to_string());
    set("lr", python_float(plan.adamw.lr));
    set("beta1", python_float(plan.adamw.beta1));
    set("beta2", python_float(plan.adamw.beta2));
    set("eps", python_float(plan.adamw.eps));
    set("wd", python_float(args.wd));
    set("warmup", args.warmup.to_string());
    set("use_bn_sync", flag(args.use_bn_sync));
    set("use_augment", flag(args.use_augment));
    set("skip_scheduler", flag(args.skip_scheduler));
    set("save_epoch_frequency", args.save_epoch_frequency.to_string());
    set("save_step_frequency", args.save_step_frequency.to_string());
    set("resume", path(&args.resume));
    set("reset_optimizer", flag(args.reset_optimizer));
    set("reset_data_offset", flag(args.reset_data_offset));
    set("precision", args.precision.to_string());
    // cn_clip's defaults, unless a model config file names the architecture.
    let named = |given: &Option<String>, default: &str| match (given, &args.model.model_config) {
        (Some(name), _) => name.clone(),
        (None, None) => default.to_string(),
        (None, Some(_)) => "None".to_string(),
    };
    set("vision_model", named(&args.model.vision_model, "ViT-B-16"));
    set("text_model", named(&args.model.text_model, "RoBERTa-wwm-ext-base-chinese"));
    set("clip_weight_path", path(&args.clip_weight_path));
    set("bert_weight_path", path(&args.bert_weight_path));
    set("grad_checkpointing", flag(args.grad_checkpointing));
    set("model_config", path(&args.model.model_config));
    set("mask_ratio", python_float(args.mask_ratio));
    set("freeze_vision", flag(args.freeze_vision));
    set("use_flash_attention", flag(args.use_flash_attention));
    set("accum_freq", args.accum_freq.to_string());
    set("gather_with_grad", flag(args.gather_with_grad));
    set("skip_aggregate", flag(args.skip_aggregate));
    set("aggregate", flag(!args.skip_aggregate));
    set("debug", flag(args.debug));
    set("seed", args.seed.to_string());
    set("distillation", flag(args.distillation));
    set("teacher_model_name", path(&args.teacher_model_name));
    set("kd_loss_weight", python_float(args.kd_loss_weight));
    set("devices", args.devices.to_string());
    set("shuffle_buffer", args.shuffle_buffer.to_string());
    set("image_column", opt(&args.image_column));
    set("text_column", opt(&args.text_column));
    set("id_column", opt(&args.id_column));
    set("world_size", plan.world.to_string());
    set("log_path", plan.dir.display().to_string());
    set("checkpoint_path", plan.checkpoints.display().to_string());
    p
}

/// One epoch's (or the validation split's) samples as a stream of preprocessed, tokenized rows.
fn data_stream(
    data: &TrainData,
    order: TrainOrder,
    resolution: usize,
    context_length: usize,
    threads: usize,
    quarantine: PathBuf,
    augment: Option<u64>,
) -> Result<PipelineStream> {
    let max_pixels = cnclip_operators::decoders::image::DEFAULT_MAX_PIXELS;
    // cn_clip's eval transform (Resize, convert to RGB), or with --use-augment its train
    // transform (timm's RandomResizedCrop, flip, AutoAugment 'original') drawn per sample.
    let pixels = match augment {
        None => NodeDef::new(
            "pixels",
            Some("decoded"),
            PreprocessConfig { resolution, order: Order::ResizeThenConvert, max_pixels },
        ),
        Some(seed) => NodeDef::new("pixels", Some("decoded"), RandomAugmentConfig { resolution, seed, max_pixels }),
    };
    let mut defs = match data {
        TrainData::Lmdb(split) => vec![
            NodeDef::new("samples", None, LmdbTrainConfig { path: split.to_path_buf(), order }),
            NodeDef::new("decoded", Some("samples"), DecodeBase64Config {}),
        ],
        // The image members are the encoded bytes already.
        TrainData::Shards { shards, index, .. } => vec![NodeDef::new(
            "decoded",
            None,
            TrainShardsConfig {
                shards: vec![shards.clone()],
                index: Some(index.clone()),
                columns: None,
                texts: None,
                order,
            },
        )],
        TrainData::Parquet { files, columns, .. } => vec![NodeDef::new(
            "decoded",
            None,
            TrainShardsConfig {
                shards: vec![files.clone()],
                index: None,
                columns: Some(columns.clone()),
                texts: None,
                order,
            },
        )],
        TrainData::Pairs { images, locations, texts, .. } => vec![NodeDef::new(
            "decoded",
            None,
            TrainShardsConfig {
                shards: vec![images.clone()],
                index: locations.clone(),
                columns: None,
                texts: Some(texts.clone()),
                order,
            },
        )],
    };
    defs.extend([pixels, NodeDef::new("tokens", Some("pixels"), TokenizeConfig { context_length, preprocess: true })]);
    // A training batch cannot drop a sample: a bad one stops the run, naming it.
    let settings = JobSettings { on_error: OnError::Fail, quarantine, threads, ..JobSettings::default() };
    let registry = crate::registry();
    let pipeline = Planner::new(&registry).stream("tokens").plan(settings, defs)?;
    Ok(pipeline.stream()?)
}

/// Cuts a stream of rows into batches of exactly the asked number of rows.
struct Feed {
    stream: PipelineStream,
    pending: Vec<RecordBatch>,
    rows: usize,
}

impl Feed {
    fn new(stream: PipelineStream) -> Feed {
        Feed { stream, pending: Vec::new(), rows: 0 }
    }

    fn take(&mut self, n: usize) -> Result<RecordBatch> {
        while self.rows < n {
            let batch = self.stream.next().context("the data ended before the epoch's last batch")??;
            self.rows += batch.num_rows();
            self.pending.push(batch);
        }
        let all = arrow::compute::concat_batches(&self.pending[0].schema(), &self.pending)?;
        let rest = all.slice(n, all.num_rows() - n);
        self.rows = rest.num_rows();
        self.pending = if rest.num_rows() > 0 { vec![rest] } else { Vec::new() };
        Ok(all.slice(0, n))
    }
}

/// A micro-batch's rows as the model's inputs on `device`, and their `pairs` keys.
fn to_batch(rows: &RecordBatch, resolution: usize, device: Device) -> Result<(Batch, Vec<i64>)> {
    let pixels = rows.column_by_name(PIXELS).context("pixels column")?.as_fixed_size_binary();
    let mut rgb = Vec::with_capacity(pixels.len() * pixels.value_length() as usize);
    for row in 0..pixels.len() {
        rgb.extend_from_slice(pixels.value(row));
    }
    let images = cnclip_models::preprocess::pixels_to_tensor(&rgb, resolution).to_device(device);
    let lists = rows.column_by_name(TOKEN_IDS).context("token_ids column")?.as_fixed_size_list();
    let length = lists.value_length() as usize;
    let ids = lists.values().as_primitive::<Int64Type>();
    let ids = &ids.values()[lists.offset() * length..][..lists.len() * length];
    let texts = Tensor::from_slice(ids).view([lists.len() as i64, length as i64]).to_device(device);
    let samples = rows.column_by_name(SAMPLE).context("sample column")?.as_primitive::<Int64Type>().values().to_vec();
    Ok((Batch { images, texts }, samples))
}

/// The student's replicas, at the resumed weights if any.
fn replicas(args: &Args, plan: &Plan, weights: Option<&BTreeMap<String, Tensor>>) -> Result<Vec<Clip>> {
    tch::manual_seed(args.seed as i64);
    let mut first = Clip::new(plan.config.clone(), plan.devices[0])?;
    let pretrained = [
        (
            &args.clip_weight_path,
            "--clip-weight-path",
            (|k: &str| k.starts_with("visual") || k == "logit_scale") as fn(&str) -> bool,
        ),
        (&args.bert_weight_path, "--bert-weight-path", |k: &str| k.starts_with("bert") && !k.contains("bert.pooler")),
    ];
    for (path, flag, wanted) in pretrained {
        if let Some(path) = path {
            let local = storage::fetch::local_copy(path).with_context(|| format!("{flag} {}", path.display()))?;
            cnclip_models::training::initialise(&mut first, &local, wanted)
                .with_context(|| format!("{flag} {}", path.display()))?;
        }
    }
    if let Some(weights) = weights {
        first.load_state_dict(weights).context("the --resume checkpoint does not fit the model")?;
    }
    let state = first.state_dict();
    let mut all = vec![first];
    for &device in &plan.devices[1..] {
        let mut replica = Clip::new(plan.config.clone(), device)?;
        replica.load_state_dict(&state)?;
        all.push(replica);
    }
    Ok(all)
}

fn teachers(args: &Args, plan: &Plan) -> Result<Vec<Clip>> {
    let Some(path) = &args.teacher_model_name else { return Ok(Vec::new()) };
    if !args.distillation {
        return Ok(Vec::new());
    }
    // Opened and read once, then copied onto each replica's device.
    let local = storage::fetch::local_copy(path).with_context(|| format!("--teacher-model-name {}", path.display()))?;
    let teacher = Checkpoint::open(&local, |format| (format == Format::CnClip).then(|| plan.config.clone()))
        .with_context(|| format!("--teacher-model-name {}", path.display()))?;
    plan.devices
        .iter()
        .map(|&device| Ok(teacher.model_on(device)?))
        .collect::<Result<Vec<_>>>()
        .with_context(|| format!("loading the teacher {}", path.display()))
}

/// cn_clip's `LMDBDataset` line for the splits, logged whenever its `get_data` builds them.
fn log_datasets(plan: &Plan, log: &mut Log) {
    for (split, data) in [("train", Some(&plan.train)), ("val", plan.val.as_ref())] {
        match data {
            Some(TrainData::Lmdb(dir)) => {
                if let Ok((images, pairs)) = counts(dir) {
                    log.info(&format!("{split} LMDB file contains {images} images and {pairs} pairs."));
                }
            }
            Some(TrainData::Shards { shards, samples, .. }) => {
                log.info(&format!("{split} WebDataset shards {shards} contain {samples} samples."));
            }
            Some(TrainData::Parquet { files, samples, .. }) => {
                log.info(&format!("{split} Parquet files {files} contain {samples} samples."));
            }
            Some(TrainData::Pairs { images, samples, .. }) => {
                log.info(&format!("{split} images {images} and their texts contain {samples} pairs."));
            }
            None => {}
        }
    }
}

/// What a saved micro-batch index means (see [`checkpoint::Saved::layout`]).
fn data_layout(args: &Args, plan: &Plan) -> Vec<i64> {
    let mut layout =
        vec![args.seed as i64, args.batch_size as i64, plan.world as i64, args.accum_freq as i64, plan.samples as i64];
    if args.shuffle_buffer > 0 {
        layout.push(args.shuffle_buffer as i64);
    }
    layout
}

/// Per-step generator seed: dropout and FLIP masks depend only on (--seed, step), so a
/// resumed run draws what an uninterrupted one draws.
fn step_seed(seed: u64, step: u64) -> i64 {
    (seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ step.wrapping_mul(0xbf58_476d_1ce4_e5b9)) as i64
}

pub fn run(args: Box<Args>) -> Result<()> {
    cnclip_operators::signals::catch_interrupts()?;
    if args.nproc_per_node == 0 {
        bail!("--nproc-per-node must be at least 1");
    }
    if args.nproc_per_node > 1 && ranks::Rank::from_env()?.is_none() {
        return ranks::launch(args.nproc_per_node);
    }
    // A run directory in an object store (`--logs s3://…`) is worked on in the spool, from what
    // the store holds of it (a rerun resumes from its checkpoints there), and uploaded after
    // every checkpoint and at the end; its data cache stays in the spool.
    let given = Path::new(&args.logs).join(&args.name);
    let remote = storage::is_remote(&given).then(|| given.clone());
    let (dir, cache) = match &remote {
        Some(url) => (
            storage::fetch::local_dir_for(url).with_context(|| format!("--logs {}", url.display()))?,
            storage::staging::local_stand_in(&url.join("data")),
        ),
        None => (given.clone(), given.join("data")),
    };
    let result = train(args, dir.clone(), cache, remote.clone());
    if let (Err(_), Some(url)) = (&result, &remote) {
        // A run that failed (a diverged loss, a signal) leaves its log and metrics where its
        // checkpoints are, saying why; the failure reported is the run's own.
        let _ = storage::fetch::upload_dir(&dir, url);
    }
    result
}

/// [`run`] in the run's directory `dir` (its spool copy when `remote` names it in a store).
fn train(args: Box<Args>, dir: PathBuf, cache: PathBuf, remote: Option<PathBuf>) -> Result<()> {
    // One rank of several: meet the others first (a rank that never comes fails the run here).
    let joined = match ranks::Rank::from_env()? {
        Some(rank) => Some(rank.join(std::time::Duration::from_secs(args.dist_timeout))?),
        None => None,
    };
    let rank = joined.as_ref().map_or(0, |j| j.rank.rank);
    // Rank 0 keeps the run's directory (checkpoints, metrics, params, log); another rank writes
    // only its own log, params, metrics and quarantine, under rank{N}/, and reads rank 0's
    // checkpoints to resume.
    let own = if rank == 0 { dir.clone() } else { dir.join(format!("rank{rank}")) };
    let checkpoints = dir.join("checkpoints");
    let made = if rank == 0 { &checkpoints } else { &own };
    storage::create_dir_all(made).with_context(|| format!("creating {}", made.display()))?;
    let suffix = chrono::Utc::now().format("%Y-%m-%d-%H-%M-%S").to_string();
    let mut log = Log::open(&own.join(format!("out_{suffix}.log")))?;
    if let Some(joined) = &joined {
        log.info(&format!(
            "Rank {} of {} (local rank {}), met at {}:{}",
            rank, joined.rank.world, joined.rank.local_rank, joined.rank.master_addr, joined.rank.master_port
        ));
    }
    // Data in other layouts than an LMDB split is read in place, through indexes made under the
    // run's directory.
    let columns = match (&args.image_column, &args.text_column) {
        (Some(image), Some(text)) => {
            Some(Columns { image: image.clone(), text: text.clone(), id: args.id_column.clone() })
        }
        _ => None,
    };
    // Rank 0 prepares the data's indexes first. Then on each machine its first rank (local rank
    // 0) prepares them, finding them made on rank 0's machine or making them in its own cache,
    // and only after it do that machine's other ranks (which find them made): no two processes
    // build one index at once. A machine is named by its first rank (ranks are numbered by
    // machine, as torchrun and srun's block distribution number them).
    let key = |leader: usize| joined.as_ref().map(|j| format!("{}/train/prepared/{leader}", j.rank.prefix));
    if let Some(joined) = &joined {
        let leader = rank - joined.rank.local_rank.min(rank);
        let wait_for = |leader: usize, what: &str| -> Result<()> {
            let word =
                joined.store.get(&key(leader).unwrap_or_default()).with_context(|| format!("waiting for {what}"))?;
            if word != b"ok" {
                bail!("rank {leader} could not prepare the training data: {}", String::from_utf8_lossy(&word));
            }
            Ok(())
        };
        if rank > 0 {
            wait_for(0, "rank 0 to prepare the training data")?;
        }
        if leader != rank && leader != 0 {
            wait_for(leader, "this machine's first rank to prepare the training data")?;
        }
    }
    let prepared = (|| -> Result<_> {
        let train = data::prepare(&args.train_data, columns.as_ref(), &cache, "--train-data", &mut log)?;
        let val = match &args.val_data {
            Some(val) => Some(data::prepare(val, columns.as_ref(), &cache, "--val-data", &mut log)?),
            None => None,
        };
        Ok((train, val))
    })();
    if let Some(joined) = joined.as_ref().filter(|j| j.rank.local_rank == 0 || rank == 0) {
        let word = match &prepared {
            Ok(_) => "ok".to_string(),
            Err(e) => format!("{e:#}"),
        };
        joined
            .store
            .set(&key(rank).unwrap_or_default(), word.as_bytes())
            .context("telling the other ranks the data is prepared")?;
    }
    let (train, val) = prepared?;
    let mut plan = plan(&args, train, val, joined.as_ref().map(|j| &j.rank))?;
    log_datasets(&plan, &mut log);
    // The params name the run's directory as given; the work happens in `dir`.
    let params = params(&args, &plan);
    (plan.dir, plan.checkpoints) = (own.clone(), checkpoints.clone());
    log::write_params(&plan.dir.join(format!("params_{suffix}.txt")), &params)?;
    log.info("Params:");
    for (k, v) in &params {
        log.info(&format!("  {k}: {v}"));
    }
    let resolution = plan.config.vision.image_resolution as usize;

    // --resume, or the latest checkpoint of this run (cn_clip resumes it automatically).
    let latest = plan.checkpoints.join("epoch_latest.pt");
    let resume = args.resume.clone().or_else(|| latest.is_file().then(|| latest.clone()));
    let mut position = Position { epoch: 0, batch: 0, steps: 0 };
    let mut optimizer_state = None;
    let mut scaler_state = None;
    let weights = match &resume {
        None => None,
        Some(path) => {
            log.info(&format!("=> begin to load checkpoint '{}'", path.display()));
            // A checkpoint in an object store is read from its copy in the spool.
            let loaded = storage::fetch::local_copy(path)
                .map_err(anyhow::Error::from)
                .and_then(|local| checkpoint::load(&local))
                .with_context(|| {
                    if args.resume.is_none() {
                        format!(
                            "resuming from {} (this run's latest checkpoint, picked up automatically): if a crash left \
                         it damaged, remove it to resume from an earlier epoch{{N}}.pt with --resume, or start over",
                            path.display()
                        )
                    } else {
                        format!("--resume {}", path.display())
                    }
                })?;
            if !args.reset_data_offset {
                let layout = data_layout(&args, &plan);
                position = match loaded.position {
                    Some((exact, saved)) if saved[..] == layout[..] => exact,
                    Some((_, saved)) => {
                        log.info(&format!(
                            "=> the checkpoint's data position was made with other settings ([seed, batch size, \
                             replicas, accum_freq, samples] {saved:?}, now {layout:?}): resuming at its epoch's end \
                             as cn_clip does"
                        ));
                        Position {
                            epoch: loaded.info.epoch.unwrap_or(0).max(0) as u64,
                            batch: 0,
                            steps: loaded.info.step.unwrap_or(0).max(0) as u64,
                        }
                    }
                    // cn_clip's own: the epoch it records is done; its within-epoch step
                    // checkpoints restart that epoch's successor (as cn_clip does).
                    None => Position {
                        epoch: loaded.info.epoch.unwrap_or(0).max(0) as u64,
                        batch: 0,
                        steps: loaded.info.step.unwrap_or(0).max(0) as u64,
                    },
                };
            }
            if !args.reset_optimizer {
                scaler_state = loaded.scaler;
                optimizer_state = Some(loaded.optimizer.with_context(|| {
                    format!("{} has no optimizer state: add --reset-optimizer to start a new one", path.display())
                })?);
            }
            log.info(&format!(
                "=> loaded checkpoint '{}' (epoch {} @ {} steps)",
                path.display(),
                loaded.info.epoch.unwrap_or(0),
                position.steps
            ));
            Some(loaded.state_dict)
        }
    };
    if let Some(joined) = &joined {
        // Every rank must start where rank 0 does, on the same data: each decided on its own
        // (its filesystem, its data index), and a rank that differs would pair its exchanges
        // with other steps' or drift apart.
        let digest = format!(
            "resumed {}, at epoch {} batch {} step {}, optimizer state {}, data {:?}, {} samples, {} steps an epoch, {} \
             steps",
            weights.is_some(),
            position.epoch,
            position.batch,
            position.steps,
            optimizer_state.is_some(),
            data_layout(&args, &plan),
            plan.samples,
            plan.steps_per_epoch,
            plan.max_steps
        );
        let key = format!("{}/train/start", joined.rank.prefix);
        if rank == 0 {
            joined.store.set(&key, digest.as_bytes()).context("telling the other ranks where the run starts")?;
        } else {
            let theirs = joined.store.get(&key).context("waiting for rank 0 to say where the run starts")?;
            let theirs = String::from_utf8_lossy(&theirs);
            if theirs != digest {
                bail!(
                    "rank {rank} would start otherwise than rank 0 (do all ranks see the same --logs directory and \
                     data?): rank 0: {theirs}; rank {rank}: {digest}"
                );
            }
        }
    }
    let models = replicas(&args, &plan, weights.as_ref())?;
    let teachers = teachers(&args, &plan)?;
    let mut trainer = match &joined {
        Some(joined) => {
            let model = models.into_iter().next().context("a replica for this rank")?;
            Trainer::distributed(model, teachers.into_iter().next(), joined.group.clone(), plan.adamw, plan.options)
                .with_context(|| format!("rank {rank}: taking rank 0's weights"))?
        }
        None => Trainer::new(models, teachers, plan.adamw, plan.options),
    };
    if plan.loss_scaling {
        let mut scaler = GradScaler::new(ScalerConfig::default(), plan.devices[0]);
        // The scale the run had reached (torch's GradScaler.load_state_dict), or a new one.
        if let Some(saved) = scaler_state {
            scaler.restore(saved.scale, saved.growth_tracker);
            log.info(&format!("=> the loss scale is restored from the checkpoint ({})", python_float(saved.scale)));
        }
        trainer = trainer.with_scaler(scaler);
    }
    if let Some(state) = optimizer_state {
        let ours = trainer.optimizer().states();
        let decayed = ours.iter().filter(|s| s.decay).count();
        let sizes = vec![ours.len() - decayed, decayed];
        if state.group_sizes != sizes {
            bail!(
                "the checkpoint's optimizer groups hold {:?} parameters, this model trains {sizes:?} (another model or \
                 --freeze-vision setting): add --reset-optimizer",
                state.group_sizes
            );
        }
        // torch's load_state_dict takes the saved betas, eps and weight decay over the flags.
        let flags = trainer.optimizer().config();
        let mut config = flags;
        if let Some((beta1, beta2)) = state.betas {
            (config.beta1, config.beta2) = (beta1, beta2);
        }
        config.eps = state.eps.unwrap_or(config.eps);
        config.weight_decay = state.weight_decay.unwrap_or(config.weight_decay);
        if config != flags {
            log.info(&format!(
                "=> the optimizer keeps the checkpoint's betas ({}, {}), eps {} and weight decay {} (as torch's \
                 load_state_dict), not the flags'",
                python_float(config.beta1),
                python_float(config.beta2),
                python_float(config.eps),
                python_float(config.weight_decay)
            ));
        }
        trainer.optimizer_mut().set_config(config);
        trainer.optimizer_mut().load(state.states)?;
        log.info("=> optimizer state is restored from the checkpoint");
    }
    let metrics_path = plan.dir.join("metrics.parquet");
    let mut metrics = Metrics::open(&metrics_path, position.steps)?;
    let quarantine = plan.dir.join("quarantine.jsonl");
    let upload = remote.filter(|_| rank == 0).map(|url| (dir.clone(), url));
    let mut run = Run { args: &args, plan: &plan, log, metrics: &mut metrics, quarantine, resolution, upload };

    let started = Instant::now();
    let first_step = position.steps;
    let mut steps = position.steps;
    // No stop on `steps` here: as cn_clip, an epoch past --max-steps trains nothing (its steps
    // are numbered from the epoch) but still validates.
    for epoch in position.epoch..plan.max_epochs {
        run.log.info(&format!("Start epoch {}", epoch + 1));
        let start_batch = if epoch == position.epoch { position.batch } else { 0 };
        let trained = run.epoch(&mut trainer, epoch, start_batch, steps, started, first_step)?;
        steps += trained;
        if args.val_data.is_some()
            && rank == 0
            && args.valid_epoch_interval > 0
            && (epoch + 1).is_multiple_of(args.valid_epoch_interval)
        {
            run.validate(&mut trainer, epoch, steps)?;
        }
        // A run resumed from a step checkpoint on its epoch's last step has the epoch's end
        // (validation above, checkpoints here) still to do.
        let resumed_at_end = epoch == position.epoch && position.batch > 0;
        let layout = data_layout(&args, &plan);
        if trained > 0 || resumed_at_end {
            let saved = |epoch_done: u64| Saved {
                name: &args.name,
                epoch: epoch_done as i64,
                step: steps as i64,
                position: Position { epoch: epoch + 1, batch: 0, steps },
                layout: layout.clone(),
            };
            let done = epoch + 1;
            if done == plan.max_epochs
                || (args.save_epoch_frequency > 0 && done.is_multiple_of(args.save_epoch_frequency as u64))
            {
                run.save(&trainer, &plan.checkpoints.join(format!("epoch{done}.pt")), &saved(done))?;
            }
            run.save(&trainer, &latest, &saved(done))?;
        }
        if epoch + 1 < plan.max_epochs {
            log_datasets(&plan, &mut run.log);
        }
        // libtorch allocates through glibc's malloc, whose arenas keep freed pages, and the
        // pipelines through mimalloc, whose abandoned thread heaps (each epoch's workers) keep
        // theirs: hand both back between epochs so that memory stays flat over a long run
        // (cn_clip's #246).
        // SAFETY: neither takes a pointer nor touches a live allocation: both only hand free pages
        // back to the OS, and both may be called from any thread at any time (mimalloc collects
        // this thread's heap and the abandoned ones; glibc locks each arena it trims).
        unsafe {
            libmimalloc_sys::mi_collect(true);
            libc::malloc_trim(0);
        }
        // RSS after the epoch's whole work, its checkpoints included.
        if let Some(row) = run.metrics.rows.iter_mut().rev().find(|r| r.kind == "train") {
            row.rss_bytes = log::rss_bytes();
        }
    }
    run.metrics.write()?;
    if let Some(joined) = &joined {
        // Rank 0 serves the store: it leaves after the others are done with it.
        joined.group.barrier().with_context(|| format!("rank {rank}: the ranks' last meeting"))?;
    }
    let (steps_done, seconds) = (steps - first_step, started.elapsed().as_secs_f64());
    let shown = run.upload.as_ref().map_or_else(|| plan.checkpoints.clone(), |(_, url)| url.join("checkpoints"));
    run.log.info(&format!(
        "Training done: {steps} steps ({steps_done} in this run, {:.2} steps/s); checkpoints in {}",
        steps_done as f64 / seconds.max(1e-9),
        shown.display()
    ));
    run.upload()
}

/// A run's state between epochs.
struct Run<'a> {
    args: &'a Args,
    plan: &'a Plan,
    log: Log,
    metrics: &'a mut Metrics,
    quarantine: PathBuf,
    resolution: usize,
    /// A run directory in an object store: the spool directory worked in, and its URL.
    upload: Option<(PathBuf, PathBuf)>,
}

impl Run<'_> {
    /// Trains epoch `epoch` from micro-batch `start_batch`; returns the steps taken.
    fn epoch(
        &mut self,
        trainer: &mut Trainer,
        epoch: u64,
        start_batch: usize,
        steps_before: u64,
        started: Instant,
        first_step: u64,
    ) -> Result<u64> {
        let (args, plan) = (self.args, self.plan);
        let world = plan.world;
        let accum = args.accum_freq;
        let first = (start_batch / accum) as u64;
        // Steps of this epoch still to take: up to the epoch's end or --max-steps.
        let last = plan.steps_per_epoch.min(plan.max_steps.saturating_sub(plan.steps_per_epoch * epoch));
        if first >= last {
            return Ok(0);
        }
        let order = TrainOrder {
            seed: args.seed,
            epoch,
            world,
            batch_size: args.batch_size,
            start: first as usize * accum,
            end: Some(last as usize * accum),
            shuffle_buffer: args.shuffle_buffer,
            rank: plan.rank,
        };
        let stream = data_stream(
            &plan.train,
            order,
            self.resolution,
            args.context_length,
            args.num_workers,
            self.quarantine.clone(),
            // Fresh draws every epoch, the same ones in a resumed run.
            args.use_augment.then(|| args.seed.wrapping_mul(1_000_003).wrapping_add(epoch)),
        )?;
        let mut feed = Feed::new(stream);
        let mut trained = 0;
        let mut since_log = (Instant::now(), 0usize);
        for i_accum in first..last {
            let step = plan.steps_per_epoch * epoch + i_accum;
            let begin = Instant::now();
            let mut micro = Vec::with_capacity(accum);
            let mut seen = Vec::new();
            for _ in 0..accum {
                let mut per_replica = Vec::with_capacity(plan.devices.len());
                for &device in &plan.devices {
                    let rows = feed.take(args.batch_size)?;
                    let (batch, samples) = to_batch(&rows, self.resolution, device)?;
                    per_replica.push(batch);
                    seen.extend(samples);
                }
                micro.push(per_replica);
            }
            let data_time = begin.elapsed().as_secs_f64();
            // cn_clip 1.6.0 parses --skip-scheduler but never reads it: the schedule always runs.
            let lr = cosine_lr(plan.adamw.lr, args.warmup, plan.max_steps, step);
            // Another rank draws its dropout and masks from another stream (rank 0's is the
            // single process's).
            tch::manual_seed(step_seed(args.seed.wrapping_add(plan.rank.unwrap_or(0) as u64), step));
            let report = trainer.step(&micro, lr).map_err(anyhow::Error::from).with_context(|| match plan.rank {
                Some(rank) => format!("step {}: rank {rank} of {}", step + 1, plan.world),
                None => format!("step {}", step + 1),
            })?;
            let batch_time = begin.elapsed().as_secs_f64();
            trained += 1;
            since_log.1 += seen.len();
            // A row per logged step (with its rate), and per step with --debug (with its samples).
            let logged = (step + 1).is_multiple_of(args.log_interval);
            let mut rate = None;
            if logged {
                self.log_step(step, epoch, i_accum, lr, &report, data_time, batch_time);
                rate = Some(since_log.1 as f64 / since_log.0.elapsed().as_secs_f64().max(1e-9));
                since_log = (Instant::now(), 0);
            }
            // Under a loss scale a non-finite loss skipped its step (torch's GradScaler): the
            // parameters are untouched and the scale backs off, so the run goes on.
            if report.skipped {
                self.log.info(&format!(
                    "step {}: the loss or its gradients were not finite: the loss scaler skipped the step (scale now {})",
                    step + 1,
                    report.loss_scale.map_or_else(|| "?".into(), python_float)
                ));
            }
            if !report.loss.is_finite() && !report.skipped && !args.allow_non_finite_loss {
                if !logged {
                    self.log_step(step, epoch, i_accum, lr, &report, data_time, batch_time);
                }
                // The curve up to the divergence stays in metrics.parquet.
                self.metrics.write()?;
                bail!(
                    "step {}: the loss is {} (lr {lr:e}): training diverged and the parameters are no longer \
                     finite numbers, so the run stops here; the checkpoints saved before this step are kept \
                     (cn_clip would run on: --allow-non-finite-loss does too)",
                    step + 1,
                    report.loss
                );
            }
            if logged || args.debug {
                self.metrics.rows.push(Metric {
                    kind: "train",
                    step: step + 1,
                    epoch: epoch + 1,
                    loss: report.loss,
                    i2t_acc: report.i2t,
                    t2i_acc: report.t2i,
                    lr: Some(lr),
                    logit_scale: report.logit_scale,
                    samples_per_s: rate,
                    rss_bytes: None,
                    samples: args.debug.then(|| seen.clone()),
                });
            }
            let done = steps_before + trained - first_step;
            let elapsed = started.elapsed().as_secs_f64();
            let rate = done as f64 / elapsed.max(1e-9);
            let left = plan.max_steps.saturating_sub(step + 1) as f64 / rate.max(1e-9);
            self.log.progress(&format!(
                "step {}/{} | {rate:.2} steps/s | ETA {:.0}s | loss {:.4}",
                step + 1,
                plan.max_steps,
                left,
                report.loss
            ));
            if args.val_data.is_some()
                && plan.rank.unwrap_or(0) == 0
                && args.valid_step_interval.is_some_and(|n| n > 0 && (step + 1).is_multiple_of(n))
            {
                self.validate(trainer, epoch, step + 1)?;
            }
            if args.save_step_frequency > 0 && (step + 1).is_multiple_of(args.save_step_frequency as u64) {
                let saved = Saved {
                    name: &args.name,
                    epoch: epoch as i64 + 1,
                    step: step as i64 + 1,
                    position: Position { epoch, batch: (i_accum as usize + 1) * accum, steps: step + 1 },
                    layout: data_layout(args, plan),
                };
                let path = plan.checkpoints.join(format!("epoch_{}_{}.pt", epoch + 1, step + 1));
                self.save(trainer, &path, &saved)?;
                self.save(trainer, &plan.checkpoints.join("epoch_latest.pt"), &saved)?;
            }
        }
        if last < plan.steps_per_epoch {
            self.log.info(&format!(
                "Stopping training due to step {} has reached max_steps {}",
                plan.steps_per_epoch * epoch + last,
                plan.max_steps / args.accum_freq as u64
            ));
        }
        Ok(trained)
    }

    #[allow(clippy::too_many_arguments)]
    fn log_step(
        &mut self,
        step: u64,
        epoch: u64,
        i_accum: u64,
        lr: f64,
        report: &StepReport,
        data_time: f64,
        batch_time: f64,
    ) {
        let (args, plan) = (self.args, self.plan);
        let world = plan.world;
        let batch_size = args.batch_size * args.accum_freq;
        let num_samples = (i_accum as usize + 1) * batch_size * world;
        let samples_per_epoch = plan.num_batches * args.batch_size * world;
        let percent = 100.0 * (i_accum + 1) as f64 / plan.steps_per_epoch as f64;
        let acc = if args.report_training_batch_acc {
            format!("Image2Text Acc: {:.2} | Text2Image Acc: {:.2} | ", report.i2t * 100.0, report.t2i * 100.0)
        } else {
            String::new()
        };
        self.log.info(&format!(
            "Global Steps: {}/{} | Train Epoch: {} [{num_samples}/{samples_per_epoch} ({percent:.0}%)] | Loss: {:.6} | \
             {acc}Data Time: {data_time:.3}s | Batch Time: {batch_time:.3}s | LR: {lr:5.6} | logit_scale: {:.3} | \
             Global Batch Size: {}",
            step + 1,
            plan.max_steps,
            epoch + 1,
            report.loss,
            report.logit_scale,
            batch_size * world
        ));
    }

    /// cn_clip's `evaluate()`: the loss and accuracies over the validation split's local
    /// batches (shuffled with --seed, epoch 0), averaged over samples.
    fn validate(&mut self, trainer: &mut Trainer, epoch: u64, steps: u64) -> Result<()> {
        let (args, plan) = (self.args, self.plan);
        let split = plan.val.as_ref().expect("checked by the caller");
        self.log.info(&format!("Begin to eval on validation set (epoch {} @ {steps} steps)...", epoch + 1));
        let world = plan.world;
        let samples = split.samples().with_context(|| format!("--val-data {}", split.describe()))?;
        // cn_clip's sampler order, whatever --shuffle-buffer (validation sets are small).
        let order = TrainOrder {
            seed: args.seed,
            epoch: 0,
            world,
            batch_size: args.valid_batch_size,
            start: 0,
            end: None,
            shuffle_buffer: 0,
            // Validated on rank 0 alone, over every replica's batches.
            rank: None,
        };
        let batches = order.num_batches(samples) * world;
        let stream = data_stream(
            split,
            order,
            self.resolution,
            args.context_length,
            args.valid_num_workers,
            self.quarantine.clone(),
            None,
        )?;
        let mut feed = Feed::new(stream);
        let (mut loss_sum, mut i2t_sum, mut t2i_sum, mut count) = (0.0, 0.0, 0.0, 0usize);
        let resolution = self.resolution;
        for i in 0..batches {
            let rows = feed.take(args.valid_batch_size)?;
            let (loss, i2t, t2i) = trainer.evaluate(|model| -> Result<(f64, f64, f64)> {
                let (batch, _) = to_batch(&rows, resolution, model.device())?;
                let image = cnclip_models::normalize(&model.encode_image_t(&batch.images, 0.0));
                let text = cnclip_models::normalize(&model.encode_text_t(&batch.texts));
                let scale = model.logit_scale_parameter().exp();
                let (loss, (i2t, t2i)) = rank_loss(&cnclip_models::training::LossInputs {
                    image: &image,
                    text: &text,
                    logit_scale: &scale,
                    aggregated: false,
                    teacher: None,
                });
                Ok((loss.double_value(&[]), i2t, t2i))
            })?;
            let n = rows.num_rows();
            loss_sum += loss * n as f64;
            i2t_sum += i2t * n as f64;
            t2i_sum += t2i * n as f64;
            count += n;
            if (i + 1) % 100 == 0 {
                self.log.info(&format!("Evaluated {}/{} batches...", i + 1, batches / world));
            }
        }
        if count == 0 {
            bail!("--val-data {}: no samples to validate on", split.describe());
        }
        let n = count as f64;
        let logit_scale = trainer.replicas()[0].logit_scale_parameter().double_value(&[]);
        self.log.info(&format!(
            "Validation Result (epoch {} @ {steps} steps) | Valid Loss: {:.6} | Image2Text Acc: {:.2} | \
             Text2Image Acc: {:.2} | logit_scale: {logit_scale:.3} | Valid Batch Size: {}",
            epoch + 1,
            loss_sum / n,
            i2t_sum / n * 100.0,
            t2i_sum / n * 100.0,
            args.valid_batch_size
        ));
        self.metrics.rows.push(Metric {
            kind: "valid",
            step: steps,
            epoch: epoch + 1,
            loss: loss_sum / n,
            i2t_acc: i2t_sum / n,
            t2i_acc: t2i_sum / n,
            lr: None,
            logit_scale,
            samples_per_s: None,
            rss_bytes: log::rss_bytes(),
            samples: None,
        });
        Ok(())
    }

    /// The metrics first, then the checkpoint: a crash in between leaves metrics ahead of the
    /// checkpoint, which the resumed run trims.
    fn save(&mut self, trainer: &Trainer, path: &Path, saved: &Saved<'_>) -> Result<()> {
        // Rank 0 writes the run's checkpoints (every rank holds the same parameters).
        if self.plan.rank.is_some_and(|r| r > 0) {
            return Ok(());
        }
        let t = Instant::now();
        self.metrics.write()?;
        // A finite loss does not make finite weights (an infinite gradient does not show in the
        // loss that made it): a checkpoint of NaN weights is never written.
        if !self.args.allow_non_finite_loss
            && let Some(name) = non_finite_parameter(trainer)
        {
            bail!(
                "step {}: parameter `{name}` is no longer a finite number (training diverged): {} not written; the \
                 checkpoints saved before this step are kept (--allow-non-finite-loss saves it all the same)",
                saved.step,
                path.display()
            );
        }
        checkpoint::save(path, trainer, saved)?;
        self.log.info(&format!(
            "Saved checkpoint {} (epoch {} @ {} steps) (writing took {} seconds)",
            path.display(),
            saved.epoch,
            saved.step,
            t.elapsed().as_secs_f64()
        ));
        self.upload()
    }

    /// A run directory in an object store: what changed in it uploaded (logs, metrics,
    /// checkpoints), so that a run killed later resumes from the store.
    fn upload(&mut self) -> Result<()> {
        let Some((dir, url)) = &self.upload else { return Ok(()) };
        storage::fetch::upload_dir(dir, url)
            .with_context(|| format!("uploading the run's directory to {}", url.display()))
    }
}

/// The name of a parameter of the first replica holding NaN or inf, if any.
fn non_finite_parameter(trainer: &Trainer) -> Option<String> {
    let model = trainer.replicas().first()?;
    tch::no_grad(|| {
        model
            .state_dict()
            .into_iter()
            .find(|(_, tensor)| tensor.is_floating_point() && !bool::try_from(tensor.isfinite().all()).unwrap_or(true))
            .map(|(name, _)| name)
    })
}
