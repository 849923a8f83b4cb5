//! Training checkpoints in cn_clip's format: `{"epoch", "step", "name", "state_dict" (with the
//! DDP `module.` prefix), "optimizer": optimizer.state_dict()}`, which cn_clip's `create_model`,
//! eval scripts and `main.py --resume` load, plus a `cnclip` entry with the exact position in
//! the data (epoch, next micro-batch, steps) that cn_clip ignores and our resume uses to
//! continue mid-epoch with exactly the samples not yet seen. Written atomically.
//!
//! The optimizer state is torch's AdamW `state_dict()`: per-parameter `step` (a float32
//! scalar), `exp_avg`, `exp_avg_sq` keyed by the parameter's position in cn_clip's optimizer
//! (its two groups, each in `named_parameters()` order), and the two `param_groups`. A run
//! with a loss scale (`--precision amp` on a GPU) also saves torch's `GradScaler.state_dict()`
//! under `scaler`, as open_clip does.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use cnclip_models::checkpoint::pickle::Value;
use cnclip_models::checkpoint::{CheckpointInfo, Py, TorchArchive, cn_clip_state_dict, read_cn_clip, save_torch};
use cnclip_models::training::{AdamW, GradScaler, Trainer};
use tch::{Kind, Tensor};

/// Where a run is in its data: epoch `epoch` (0-based) from micro-batch `batch` on, after
/// `steps` optimizer steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub epoch: u64,
    pub batch: usize,
    pub steps: u64,
}

/// What cn_clip records (`epoch`, `step`) and where we are.
pub struct Saved<'a> {
    pub name: &'a str,
    pub epoch: i64,
    pub step: i64,
    pub position: Position,
    /// What the position's micro-batch index means: `[seed, batch size, replicas,
    /// accum_freq, samples]`, and `--shuffle-buffer` when a stream; a resume with other values
    /// cannot continue mid-epoch.
    pub layout: Vec<i64>,
}

/// torch's `AdamW.state_dict()` of `optimizer`.
fn optimizer_state(optimizer: &AdamW) -> Py {
    let config = optimizer.config();
    let states = optimizer.states();
    let stepped = states
        .iter()
        .enumerate()
        .filter(|(_, s)| s.step > 0)
        .map(|(i, s)| {
            (
                Py::Int(i as i64),
                Py::dict(vec![
                    ("step", Py::Tensor(Tensor::from(s.step as f32))),
                    ("exp_avg", Py::Tensor(s.exp_avg.shallow_clone())),
                    ("exp_avg_sq", Py::Tensor(s.exp_avg_sq.shallow_clone())),
                ]),
            )
        })
        .collect();
    let group = |decay: bool| {
        let params = states.iter().enumerate().filter(|(_, s)| s.decay == decay).map(|(i, _)| Py::Int(i as i64));
        Py::dict(vec![
            ("weight_decay", Py::Float(if decay { config.weight_decay } else { 0.0 })),
            ("lr", Py::Float(optimizer.lr())),
            ("betas", Py::Tuple(vec![Py::Float(config.beta1), Py::Float(config.beta2)])),
            ("eps", Py::Float(config.eps)),
            ("amsgrad", Py::Bool(false)),
            ("maximize", Py::Bool(false)),
            ("foreach", Py::None),
            ("capturable", Py::Bool(false)),
            ("differentiable", Py::Bool(false)),
            ("fused", Py::None),
            ("decoupled_weight_decay", Py::Bool(true)),
            ("params", Py::List(params.collect())),
        ])
    };
    Py::dict(vec![("state", Py::Dict(stepped)), ("param_groups", Py::List(vec![group(false), group(true)]))])
}

/// torch's `GradScaler.state_dict()` of `scaler`.
fn scaler_state(scaler: &GradScaler) -> Py {
    let config = scaler.config();
    Py::dict(vec![
        ("scale", Py::Float(scaler.scale_value())),
        ("growth_factor", Py::Float(config.growth_factor)),
        ("backoff_factor", Py::Float(config.backoff_factor)),
        ("growth_interval", Py::Int(config.growth_interval)),
        ("_growth_tracker", Py::Int(scaler.growth_tracker())),
    ])
}

/// A saved `GradScaler.state_dict()`: the scale and the clean steps since it last changed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SavedScaler {
    pub scale: f64,
    pub growth_tracker: i64,
}

/// Writes replica 0's weights, the optimizer and the position to `path`, atomically.
pub fn save(path: &Path, trainer: &Trainer, saved: &Saved<'_>) -> Result<()> {
    let state_dict = trainer.replicas()[0].state_dict();
    let Position { epoch, batch, steps } = saved.position;
    let mut entries = vec![
        ("epoch", Py::Int(saved.epoch)),
        ("step", Py::Int(saved.step)),
        ("name", Py::str(saved.name)),
        ("state_dict", cn_clip_state_dict(&state_dict)),
        ("optimizer", optimizer_state(trainer.optimizer())),
        (
            "cnclip",
            Py::dict(vec![
                ("epoch", Py::Int(epoch as i64)),
                ("batch", Py::Int(batch as i64)),
                ("steps", Py::Int(steps as i64)),
                ("layout", Py::List(saved.layout.iter().map(|&v| Py::Int(v)).collect())),
            ]),
        ),
    ];
    if let Some(scaler) = trainer.scaler() {
        entries.push(("scaler", scaler_state(scaler)));
    }
    let value = Py::dict(entries);
    save_torch(path, &value).with_context(|| format!("writing checkpoint {}", path.display()))
}

/// A checkpoint read back for `--resume`.
pub struct Loaded {
    pub state_dict: BTreeMap<String, Tensor>,
    pub info: CheckpointInfo,
    /// The optimizer state; `None` when the file has none (a released or extracted checkpoint).
    pub optimizer: Option<SavedOptimizer>,
    /// Ours only: the exact position in the data, and its [`Saved::layout`].
    pub position: Option<(Position, Vec<i64>)>,
    /// The loss scaler's state (`--precision amp` on a GPU; open_clip's key, which cn_clip
    /// ignores).
    pub scaler: Option<SavedScaler>,
}

/// Reads a cn_clip-format checkpoint (ours or cn_clip's) with the restricted reader.
pub fn load(path: &Path) -> Result<Loaded> {
    let mut archive = TorchArchive::open(path)?;
    let top = std::mem::replace(&mut archive.value, Value::None);
    let (state_dict, info) = read_cn_clip(&mut archive, &top)?;
    let name = path.display();
    let optimizer = match top.get("optimizer") {
        Some(Value::Dict(items)) if !items.is_empty() => Some(
            read_optimizer(&mut archive, top.get("optimizer").expect("matched"))
                .with_context(|| format!("{name}: the optimizer state"))?,
        ),
        _ => None,
    };
    let position = match top.get("cnclip") {
        Some(entry) => {
            let int = |key: &str| match entry.get(key) {
                Some(Value::Int(v)) if *v >= 0 => Ok(*v as u64),
                _ => bail!("{name}: cnclip.{key} is not a count"),
            };
            let layout = match entry.get("layout") {
                Some(Value::List(items)) => items.iter().map(|v| if let Value::Int(v) = v { *v } else { -1 }).collect(),
                _ => Vec::new(),
            };
            Some((Position { epoch: int("epoch")?, batch: int("batch")? as usize, steps: int("steps")? }, layout))
        }
        None => None,
    };
    let scaler = match top.get("scaler") {
        None | Some(Value::None) => None,
        Some(entry) => {
            let scale = float(entry.get("scale")).filter(|s| s.is_finite() && *s > 0.0);
            let tracker = match entry.get("_growth_tracker") {
                Some(Value::Int(v)) if *v >= 0 => Some(*v),
                _ => None,
            };
            match scale.zip(tracker) {
                Some((scale, growth_tracker)) => Some(SavedScaler { scale, growth_tracker }),
                None => bail!("{name}: scaler holds no positive scale and growth count"),
            }
        }
    };
    Ok(Loaded { state_dict, info, optimizer, position, scaler })
}

/// A saved `optimizer.state_dict()`.
pub struct SavedOptimizer {
    /// Parameters per group (cn_clip: no decay, then decay).
    pub group_sizes: Vec<usize>,
    /// The first group's `betas` and `eps`, the last group's `weight_decay` (torch's
    /// `load_state_dict` takes these over whatever the optimizer was built with).
    pub betas: Option<(f64, f64)>,
    pub eps: Option<f64>,
    pub weight_decay: Option<f64>,
    /// Per optimizer id: `(step, exp_avg, exp_avg_sq)`, `None` for one never stepped.
    pub states: Vec<Option<(u64, Tensor, Tensor)>>,
}

fn float(value: Option<&Value>) -> Option<f64> {
    match value {
        Some(Value::Float(v)) => Some(*v),
        Some(Value::Int(v)) => Some(*v as f64),
        _ => None,
    }
}

fn read_optimizer(archive: &mut TorchArchive, value: &Value) -> Result<SavedOptimizer> {
    let Some(Value::List(groups)) = value.get("param_groups") else { bail!("no param_groups list") };
    let mut group_sizes = Vec::new();
    for group in groups {
        let Some(Value::List(params)) = group.get("params") else { bail!("a param group without params") };
        group_sizes.push(params.len());
    }
    let count = group_sizes.iter().sum();
    let betas = match groups.first().and_then(|g| g.get("betas")) {
        Some(Value::Tuple(b) | Value::List(b)) if b.len() == 2 => float(b.first()).zip(float(b.get(1))),
        _ => None,
    };
    let eps = float(groups.first().and_then(|g| g.get("eps")));
    let weight_decay = float(groups.last().and_then(|g| g.get("weight_decay")));
    let mut out: Vec<Option<(u64, Tensor, Tensor)>> = (0..count).map(|_| None).collect();
    let Some(Value::Dict(state)) = value.get("state") else { bail!("no state dict") };
    for (key, entry) in state {
        let Value::Int(id) = key else { bail!("state key {key:?} is not a parameter id") };
        let slot = out.get_mut(*id as usize).with_context(|| format!("state for parameter {id} of {count}"))?;
        let step = match entry.get("step") {
            Some(Value::Tensor(t)) => archive.tensor(t)?.to_kind(Kind::Double).double_value(&[]) as u64,
            Some(Value::Int(v)) => *v as f64 as u64,
            Some(Value::Float(v)) => *v as u64,
            _ => bail!("parameter {id}: no step"),
        };
        let mut tensor = |field: &str| -> Result<Tensor> {
            match entry.get(field) {
                Some(Value::Tensor(t)) => Ok(archive.tensor(t)?),
                _ => bail!("parameter {id}: no {field} tensor"),
            }
        };
        if step > i32::MAX as u64 {
            bail!("parameter {id}: step {step} is not a step count");
        }
        *slot = Some((step, tensor("exp_avg")?, tensor("exp_avg_sq")?));
    }
    Ok(SavedOptimizer { group_sizes, betas, eps, weight_decay, states: out })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnclip_models::training::{AdamWConfig, ScalerConfig, StepOptions};
    use cnclip_models::{Clip, ClipConfig};

    const TINY: &str = r#"{"embed_dim": 8, "image_resolution": 16, "vision_layers": 1,
      "vision_width": 64, "vision_patch_size": 8, "vocab_size": 21128,
      "text_attention_probs_dropout_prob": 0.0, "text_hidden_act": "gelu", "text_hidden_dropout_prob": 0.0,
      "text_hidden_size": 16, "text_initializer_range": 0.02, "text_intermediate_size": 32,
      "text_max_position_embeddings": 32, "text_num_attention_heads": 2, "text_num_hidden_layers": 1,
      "text_type_vocab_size": 2}"#;

    #[test]
    fn the_loss_scale_is_saved_as_torchs_grad_scaler_state_and_read_back() {
        let model = Clip::new(ClipConfig::from_json(TINY).unwrap(), tch::Device::Cpu).unwrap();
        let adamw = AdamWConfig { lr: 1e-3, beta1: 0.9, beta2: 0.98, eps: 1e-6, weight_decay: 0.2 };
        let config = ScalerConfig { growth_interval: 7, ..ScalerConfig::default() };
        let mut scaler = GradScaler::new(config, tch::Device::Cpu);
        scaler.restore(1024.0, 3);
        let trainer = Trainer::new(vec![model], Vec::new(), adamw, StepOptions::default()).with_scaler(scaler);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("epoch1.pt");
        let position = Position { epoch: 1, batch: 0, steps: 4 };
        save(&path, &trainer, &Saved { name: "t", epoch: 1, step: 4, position, layout: Vec::new() }).unwrap();
        let loaded = load(&path).unwrap();
        assert_eq!(loaded.scaler, Some(SavedScaler { scale: 1024.0, growth_tracker: 3 }));
        // torch reads it (weights_only) and its GradScaler takes it as its own state.
        let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
        let script = "import sys, torch\n\
            ck = torch.load(sys.argv[1], map_location='cpu', weights_only=True)\n\
            s = torch.amp.GradScaler('cpu')\n\
            s.load_state_dict(ck['scaler'])\n\
            print(s.get_scale(), s._growth_tracker if isinstance(s._growth_tracker, int) else s._init_growth_tracker, \
            s.get_growth_interval(), s.state_dict() == ck['scaler'])";
        let out = std::process::Command::new(&python).args(["-c", script]).arg(&path).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(stdout.trim(), "1024.0 3 7 True", "{stdout}");
    }
}
