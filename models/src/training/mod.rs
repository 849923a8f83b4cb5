//! Contrastive fine-tuning as cn_clip 1.6.0's trainer does it (`cn_clip/training/train.py`,
//! `main.py`, `scheduler.py`), on one or several model replicas in one process, or one replica
//! per rank of a c10d process group (see `step`): the loss of `get_loss` (symmetric
//! cross-entropy over image/text logits scaled by the learned `logit_scale`, optional
//! distillation), `--accum-freq` feature accumulation, the gathering of
//! features across replicas with and without gradient, AdamW with cn_clip's two parameter
//! groups, linear warmup then cosine, the `logit_scale` clamp to ln 100, and `--precision
//! amp`'s autocast and loss scaling (see `amp`).
//!
//! Several replicas stand for cn_clip's DDP ranks: each takes its share of the global batch,
//! each rank's loss is built exactly as `get_loss` builds it on that rank, and the gradients
//! are what DDP would leave (features gathered with gradient receive the sum over ranks; the
//! ranks' gradients are then averaged). Replica 0 holds the optimizer; after each step its
//! variables (parameters and BatchNorm statistics, as DDP's buffer broadcast) are copied to
//! the others, so replicas stay identical.

pub mod amp;
pub mod loss;
pub mod optim;
pub mod order;
/// cn_clip's data order (it drives the training source, in `cnclip-operators`).
pub use cnclip_operators::sources::sampler;
pub mod schedule;
pub mod step;

use std::path::Path;

use crate::Clip;
use crate::error::{Error, Result};

pub use amp::{Autocast, GradScaler, ScalerConfig};
pub use loss::{LossInputs, cosine_similarity_loss, rank_loss};
pub use optim::{AdamW, AdamWConfig, SlotState, decays};
pub use schedule::cosine_lr;
pub use step::{Batch, StepOptions, StepReport, Trainer};

/// Copies the tensors of a torch state dict file (a bare dict, or a checkpoint's `state_dict`;
/// DDP's `module.` stripped) whose names `wanted` keeps into `model` — cn_clip's
/// `restore_model`, which loads them non-strictly (`--clip-weight-path`, `--bert-weight-path`).
///
/// # Errors
/// A kept tensor of another shape, no tensor of the model in the file, or an unreadable file.
pub fn initialise(model: &mut Clip, path: &Path, wanted: fn(&str) -> bool) -> Result<()> {
    let mut archive = crate::checkpoint::TorchArchive::open(path)?;
    let top = std::mem::replace(&mut archive.value, crate::checkpoint::pickle::Value::None);
    let dict = top.get("state_dict").unwrap_or(&top);
    let tensors = archive.state_dict(dict)?;
    let variables = model.var_store().variables();
    let mut copied = 0;
    tch::no_grad(|| -> Result<()> {
        for (name, tensor) in &tensors {
            let name = name.strip_prefix("module.").unwrap_or(name);
            if !wanted(name) {
                continue;
            }
            let Some(var) = variables.get(name) else { continue };
            if var.size() != tensor.size() {
                return Err(Error::Shape(format!(
                    "{name} has shape {:?}, the model's {:?}",
                    tensor.size(),
                    var.size()
                )));
            }
            var.shallow_clone().copy_(&tensor.to_kind(var.kind()));
            copied += 1;
        }
        Ok(())
    })?;
    if copied == 0 {
        return Err(Error::Shape("no tensor of the model in this state dict".into()));
    }
    Ok(())
}
