//! One optimisation step over all replicas: `train.py`'s loop body (forward, `get_loss`,
//! backward, `optimizer.step()`, the `logit_scale` clamp) with DDP's gradient semantics.
//!
//! The replicas are either all in this process ([`Trainer::new`]: they stand for cn_clip's
//! ranks) or one per process of a c10d process group ([`Trainer::distributed`]: this process
//! is one rank, and features, gradients and BatchNorm statistics cross processes through
//! libtorch's collectives, as DDP and `get_loss` move them).

use std::collections::BTreeMap;
use std::sync::Arc;

use cnclip_torch_ext::c10d::{ProcessGroup, ReduceOp};
use tch::Tensor;

use super::amp::{Autocast, GradScaler};
use super::loss::{LossInputs, rank_loss};
use super::optim::{AdamW, AdamWConfig};
use crate::clip::{Clip, Mode, normalize};
use crate::error::Result;

/// cn_clip clamps `logit_scale` to [0, ln 100] after every step (4.6052, its constant).
pub const LOGIT_SCALE_MAX: f64 = 4.6052;

/// The loss options of `get_loss` and the loop around it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOptions {
    /// `--accum-freq`: micro-batches per step, their features cached and recomputed.
    pub accum_freq: usize,
    /// `--mask-ratio`: FLIP patch masking (ViT) in the loss forward.
    pub mask_ratio: f64,
    /// `not --skip-aggregate`: gather features across replicas for the loss.
    pub aggregate: bool,
    /// `--gather-with-grad`.
    pub gather_with_grad: bool,
    /// `--kd_loss_weight` when distilling from a teacher.
    pub kd_loss_weight: Option<f64>,
    /// `--freeze-vision`: the vision tower is not trained (and RN50's BatchNorm stays in eval).
    pub freeze_vision: bool,
    /// The dtype the forward passes and the loss are autocast to (`--precision amp`, `bf16`).
    pub autocast: Autocast,
    /// `--grad-checkpointing`: activations recomputed in backward (see [`Mode`]).
    pub grad_checkpointing: bool,
    /// `--use-bn-sync`: on the ranks of a process group, BatchNorm normalises with the
    /// statistics of the global batch (ignored for replicas in one process).
    pub sync_batch_norm: bool,
}

impl Default for StepOptions {
    fn default() -> Self {
        StepOptions {
            accum_freq: 1,
            mask_ratio: 0.0,
            aggregate: true,
            gather_with_grad: false,
            kd_loss_weight: None,
            freeze_vision: false,
            autocast: Autocast::Off,
            grad_checkpointing: false,
            sync_batch_norm: false,
        }
    }
}

/// One replica's micro-batch: preprocessed pixels `[n, 3, R, R]` and token ids `[n, L]`.
pub struct Batch {
    pub images: Tensor,
    pub texts: Tensor,
}

/// What a step reports (rank 0's view, as cn_clip logs it).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StepReport {
    /// The loss of the last micro-batch on replica 0.
    pub loss: f64,
    /// Image→text and text→image accuracy of that loss's logits (fractions).
    pub i2t: f64,
    pub t2i: f64,
    /// `logit_scale` after the clamp (its log, as cn_clip prints `m.logit_scale.data`).
    pub logit_scale: f64,
    /// With a loss scaler: its scale after the step, and whether the step was skipped (its
    /// gradients held an inf or a NaN).
    pub loss_scale: Option<f64>,
    pub skipped: bool,
}

/// Replicas, an optional teacher per replica, and the optimizer (on replica 0).
pub struct Trainer {
    replicas: Vec<Clip>,
    teachers: Vec<Clip>,
    params: Vec<BTreeMap<String, Tensor>>,
    optimizer: AdamW,
    options: StepOptions,
    /// The process group when this process is one rank of several (its one replica being
    /// this rank's model).
    group: Option<Arc<ProcessGroup>>,
    /// `--precision amp`'s dynamic loss scale (fp16 on a GPU).
    scaler: Option<GradScaler>,
}

impl Trainer {
    /// `replicas` must hold the same weights (one per device entry); `teachers`, when
    /// distilling, one teacher per replica on the same devices.
    ///
    /// # Panics
    /// With no replica, or teachers that do not pair with the replicas.
    pub fn new(mut replicas: Vec<Clip>, teachers: Vec<Clip>, adamw: AdamWConfig, options: StepOptions) -> Self {
        assert!(!replicas.is_empty(), "at least one replica");
        assert!(teachers.is_empty() || teachers.len() == replicas.len(), "one teacher per replica");
        for model in &mut replicas {
            if options.freeze_vision {
                for (name, var) in model.var_store().variables() {
                    if name.starts_with("visual.") {
                        let _ = var.set_requires_grad(false);
                    }
                }
            }
            model.set_mode(Mode {
                dropout: true,
                batch_norm: !options.freeze_vision,
                grad_checkpointing: options.grad_checkpointing,
            });
        }
        let params: Vec<BTreeMap<String, Tensor>> = replicas
            .iter()
            .map(|m| m.var_store().variables().into_iter().filter(|(_, v)| v.requires_grad()).collect())
            .collect();
        let optimizer = AdamW::new(adamw, params[0].iter().map(|(n, v)| (n.clone(), v.shallow_clone())));
        Trainer { replicas, teachers, params, optimizer, options, group: None, scaler: None }
    }

    /// This process as rank `group.rank()` of a data-parallel run, `replica` its model: every
    /// rank takes rank 0's variables first (DDP's broadcast at construction). Each step then
    /// gathers features over the ranks as `get_loss` does, all-reduces the gradients to their
    /// mean, and takes rank 0's BatchNorm statistics (DDP's buffer broadcast); the optimizer
    /// steps on every rank alike.
    ///
    /// # Errors
    /// The broadcast failed (a rank gone, the group's timeout).
    pub fn distributed(
        replica: Clip,
        teacher: Option<Clip>,
        group: Arc<ProcessGroup>,
        adamw: AdamWConfig,
        options: StepOptions,
    ) -> Result<Self> {
        let mut trainer = Trainer::new(vec![replica], teacher.into_iter().collect(), adamw, options);
        if options.sync_batch_norm {
            trainer.replicas[0].set_batch_norm_sync(Some(Arc::clone(&group)));
        }
        // In name order on every rank (collectives pair up by their order).
        let variables: BTreeMap<String, Tensor> = trainer.replicas[0].var_store().variables().into_iter().collect();
        tch::no_grad(|| -> Result<()> {
            for var in variables.values() {
                broadcast_from_0(&group, var)?;
            }
            Ok(())
        })?;
        trainer.group = Some(group);
        Ok(trainer)
    }

    /// Scales the loss by `scaler` and steps only on finite gradients (torch's `GradScaler`).
    pub fn with_scaler(mut self, scaler: GradScaler) -> Self {
        self.scaler = Some(scaler);
        self
    }

    pub fn scaler(&self) -> Option<&GradScaler> {
        self.scaler.as_ref()
    }

    pub fn scaler_mut(&mut self) -> Option<&mut GradScaler> {
        self.scaler.as_mut()
    }

    pub fn replicas(&self) -> &[Clip] {
        &self.replicas
    }

    pub fn optimizer(&self) -> &AdamW {
        &self.optimizer
    }

    pub fn optimizer_mut(&mut self) -> &mut AdamW {
        &mut self.optimizer
    }

    /// Runs `f` on replica 0 in evaluation mode (no dropout, BatchNorm on its running
    /// statistics), then puts it back in training mode (cn_clip's `evaluate()` between
    /// `model.eval()` and `model.train()`).
    pub fn evaluate<R>(&mut self, f: impl FnOnce(&Clip) -> R) -> R {
        let model = &mut self.replicas[0];
        model.set_mode(Mode::default());
        let result = tch::no_grad(|| f(model));
        model.set_mode(Mode {
            dropout: true,
            batch_norm: !self.options.freeze_vision,
            grad_checkpointing: self.options.grad_checkpointing,
        });
        result
    }

    /// One step at learning rate `lr` over `micro[j][r]`: micro-batch `j` (of `accum_freq`)
    /// of replica `r` (of this process's replicas: one, in a process group).
    ///
    /// # Errors
    /// A collective failed (a rank gone, the group's timeout); never in one process.
    ///
    /// # Panics
    /// When `micro` is not `accum_freq` × replicas.
    pub fn step(&mut self, micro: &[Vec<Batch>], lr: f64) -> Result<StepReport> {
        let world = self.replicas.len();
        assert_eq!(micro.len(), self.options.accum_freq, "one micro-batch list per accumulation step");
        assert!(micro.iter().all(|m| m.len() == world), "one micro-batch per replica");
        self.optimizer.set_lr(lr);
        for params in &self.params {
            for var in params.values() {
                let mut grad = var.grad();
                if grad.defined() {
                    let _ = grad.zero_();
                }
            }
        }
        let report =
            if self.options.accum_freq == 1 { self.forward_backward(&micro[0])? } else { self.accumulate(micro)? };
        self.average_gradients()?;
        // GradScaler.step: the gradients unscaled, the step taken only when they are finite
        // (the same on every rank: they are the all-reduced ones); then GradScaler.update.
        let skipped = match &mut self.scaler {
            Some(scaler) => {
                let grads: Vec<Tensor> = self.params[0].values().map(Tensor::grad).filter(Tensor::defined).collect();
                let found_inf = scaler.unscale(&grads.iter().collect::<Vec<_>>())?;
                let skipped = found_inf.double_value(&[0]) != 0.0;
                if !skipped {
                    self.optimizer.step();
                }
                scaler.update(&found_inf);
                skipped
            }
            None => {
                self.optimizer.step();
                false
            }
        };
        tch::no_grad(|| {
            let _ = self.replicas[0].logit_scale_parameter().shallow_clone().clamp_(0.0, LOGIT_SCALE_MAX);
        });
        self.broadcast()?;
        Ok(StepReport {
            logit_scale: self.replicas[0].logit_scale_parameter().double_value(&[]),
            loss_scale: self.scaler.as_ref().map(GradScaler::scale_value),
            skipped,
            ..report
        })
    }

    /// `f` under the step's autocast for `device` (cn_clip's `with autocast():` around the
    /// forward passes and the loss; backward runs outside it).
    fn cast<T>(&self, device: tch::Device, f: impl FnOnce() -> T) -> Result<T> {
        self.options.autocast.run(device, f)
    }

    /// What backward starts from: the loss, times the scaler's scale when there is one.
    fn scaled(&self, loss: &Tensor) -> Tensor {
        match &self.scaler {
            Some(scaler) => scaler.scale(loss),
            None => loss.shallow_clone(),
        }
    }

    /// `accum_freq == 1`: each replica's features with gradient, every rank's loss, backward.
    fn forward_backward(&self, batches: &[Batch]) -> Result<StepReport> {
        let local: Vec<Local> = self
            .replicas
            .iter()
            .zip(batches)
            .enumerate()
            .map(|(r, (model, batch))| {
                self.cast(model.device(), || Local {
                    image: normalize(&model.encode_image_t(&batch.images, self.options.mask_ratio)),
                    text: normalize(&model.encode_text_t(&batch.texts)),
                    scale: model.logit_scale_parameter().exp(),
                    teacher: self.teacher_features(r, &batch.images),
                })
            })
            .collect::<Result<_>>()?;
        self.backward(&local)
    }

    /// `accum_freq > 1`: cache every micro-batch's features without gradient, then for each
    /// micro-batch recompute its features with gradient among the cached others and backward
    /// (gradients add up over the micro-batches), as `train.py` does.
    fn accumulate(&self, micro: &[Vec<Batch>]) -> Result<StepReport> {
        // cached[j][r]: micro-batch j of replica r, without gradient (and without masking, as
        // cn_clip's caching forward).
        let cached: Vec<Vec<Cached>> = micro
            .iter()
            .map(|batches| {
                self.replicas
                    .iter()
                    .zip(batches)
                    .enumerate()
                    .map(|(r, (model, batch))| {
                        // cn_clip: the features under autocast, the teacher's outside it.
                        let (image, text) = self.cast(model.device(), || {
                            tch::no_grad(|| {
                                (
                                    normalize(&model.encode_image_t(&batch.images, 0.0)),
                                    normalize(&model.encode_text_t(&batch.texts)),
                                )
                            })
                        })?;
                        Ok(Cached { image, text, teacher: self.teacher_features(r, &batch.images) })
                    })
                    .collect::<Result<_>>()
            })
            .collect::<Result<_>>()?;
        // A replica's teacher features over all its micro-batches: the same for every j.
        let teachers: Vec<Option<Tensor>> = (0..self.replicas.len())
            .map(|r| {
                let parts: Option<Vec<&Tensor>> = cached.iter().map(|c| c[r].teacher.as_ref()).collect();
                parts.map(|p| Tensor::cat(&p, 0))
            })
            .collect();
        let mut report = None;
        for (j, batches) in micro.iter().enumerate() {
            let local: Vec<Local> = self
                .replicas
                .iter()
                .zip(batches)
                .enumerate()
                .map(|(r, (model, batch))| {
                    // Micro-batch j live (with gradient) among the others' cached features.
                    let splice = |live: Tensor, of: fn(&Cached) -> &Tensor| -> Tensor {
                        let parts: Vec<&Tensor> =
                            cached.iter().enumerate().map(|(i, c)| if i == j { &live } else { of(&c[r]) }).collect();
                        Tensor::cat(&parts, 0)
                    };
                    self.cast(model.device(), || Local {
                        image: splice(normalize(&model.encode_image_t(&batch.images, self.options.mask_ratio)), |c| {
                            &c.image
                        }),
                        text: splice(normalize(&model.encode_text_t(&batch.texts)), |c| &c.text),
                        scale: model.logit_scale_parameter().exp(),
                        teacher: teachers[r].as_ref().map(Tensor::shallow_clone),
                    })
                })
                .collect::<Result<_>>()?;
            report = Some(self.backward(&local)?);
        }
        Ok(report.expect("accum_freq >= 1"))
    }

    /// The teacher's image features for replica `r` (none without a teacher).
    fn teacher_features(&self, r: usize, images: &Tensor) -> Option<Tensor> {
        self.teachers.get(r).map(|t| tch::no_grad(|| t.encode_image_t(images, 0.0)))
    }

    /// Builds each rank's loss as `get_loss` does on that rank and backpropagates their sum:
    /// a replica's parameters then hold what its DDP rank holds before the all-reduce.
    fn backward(&self, local: &[Local]) -> Result<StepReport> {
        if let Some(group) = &self.group {
            return self.backward_rank(group, &local[0]);
        }
        let world = local.len();
        let mut total: Option<Tensor> = None;
        let mut report = StepReport::default();
        for r in 0..world {
            let device = local[r].image.device();
            let weight = self.options.kd_loss_weight;
            let (loss, (i2t, t2i)) = if !self.options.aggregate {
                self.cast(device, || {
                    rank_loss(&LossInputs {
                        image: &local[r].image,
                        text: &local[r].text,
                        logit_scale: &local[r].scale,
                        aggregated: false,
                        teacher: local[r].teacher.as_ref().zip(weight),
                    })
                })?
            } else {
                // With gradient: every rank sees all ranks' live features in rank order; without:
                // its own live features first, the others' detached, in rank order. The teacher's
                // features are always gathered without gradient, own rank first.
                let own_first: Vec<usize> = std::iter::once(r).chain((0..world).filter(|&j| j != r)).collect();
                let grad = self.options.gather_with_grad;
                let order: Vec<usize> = if grad { (0..world).collect() } else { own_first.clone() };
                let gather = |f: fn(&Local) -> &Tensor| -> Tensor {
                    let parts: Vec<Tensor> = order
                        .iter()
                        .map(|&j| {
                            let t = f(&local[j]).to_device(device);
                            if grad || j == r { t } else { t.detach() }
                        })
                        .collect();
                    Tensor::cat(&parts, 0)
                };
                let (image, text) = (gather(|l| &l.image), gather(|l| &l.text));
                let teacher = local[r].teacher.as_ref().map(|_| {
                    let parts: Vec<Tensor> = own_first
                        .iter()
                        .map(|&j| local[j].teacher.as_ref().expect("a teacher per replica").to_device(device))
                        .collect();
                    Tensor::cat(&parts, 0)
                });
                self.cast(device, || {
                    rank_loss(&LossInputs {
                        image: &image,
                        text: &text,
                        logit_scale: &local[r].scale,
                        aggregated: true,
                        teacher: teacher.as_ref().zip(weight),
                    })
                })?
            };
            if r == 0 {
                report.loss = loss.double_value(&[]);
                (report.i2t, report.t2i) = (i2t, t2i);
            }
            let loss = loss.to_device(local[0].image.device());
            total = Some(match total {
                None => loss,
                Some(t) => t + loss,
            });
        }
        self.scaled(&total.expect("at least one replica")).backward();
        Ok(report)
    }

    /// This rank's loss as `get_loss` builds it, backpropagated, with features from every rank
    /// of `group`. Gathered without gradient (cn_clip's `dist.all_gather`): this rank's live
    /// features first, the others' in rank order. With gradient (`torch.distributed.nn
    /// .all_gather`): all ranks' in rank order, and each rank's features receive the sum over
    /// ranks of the loss gradients on their rows, as that op's backward gives them (the
    /// gathered features are leaves here; their gradients are all-reduced and this rank's rows
    /// backpropagated into its model). The teacher's features are gathered without gradient,
    /// own rank first.
    fn backward_rank(&self, group: &ProcessGroup, local: &Local) -> Result<StepReport> {
        let (world, rank) = (group.size(), group.rank());
        let weight = self.options.kd_loss_weight;
        // Gloo exchanges CPU tensors: a GPU rank's features go through host memory.
        let device = local.image.device();
        let gather = |t: &Tensor| -> Result<Vec<Tensor>> {
            let t = t.detach().to_device(tch::Device::Cpu).contiguous();
            let parts: Vec<Tensor> = (0..world).map(|_| t.empty_like()).collect();
            group.all_gather(&parts.iter().collect::<Vec<_>>(), &t)?;
            Ok(parts.into_iter().map(|p| p.to_device(device)).collect())
        };
        let own_first = |parts: &[Tensor], own: &Tensor| -> Tensor {
            let order =
                std::iter::once(own).chain(parts.iter().enumerate().filter(|&(j, _)| j != rank).map(|(_, t)| t));
            Tensor::cat(&order.collect::<Vec<_>>(), 0)
        };
        let (loss, (i2t, t2i)) = if !self.options.aggregate {
            let (loss, accuracy) = self.cast(device, || {
                rank_loss(&LossInputs {
                    image: &local.image,
                    text: &local.text,
                    logit_scale: &local.scale,
                    aggregated: false,
                    teacher: local.teacher.as_ref().zip(weight),
                })
            })?;
            self.scaled(&loss).backward();
            (loss, accuracy)
        } else {
            let (images, texts) = (gather(&local.image)?, gather(&local.text)?);
            let teacher = match &local.teacher {
                Some(t) => Some(own_first(&gather(t)?, t)),
                None => None,
            };
            if self.options.gather_with_grad {
                let image = Tensor::cat(&images, 0).set_requires_grad(true);
                let text = Tensor::cat(&texts, 0).set_requires_grad(true);
                let (loss, accuracy) = self.cast(device, || {
                    rank_loss(&LossInputs {
                        image: &image,
                        text: &text,
                        logit_scale: &local.scale,
                        aggregated: true,
                        teacher: teacher.as_ref().zip(weight),
                    })
                })?;
                // The gathered features' gradients come out scaled, and so carry on scaled.
                self.scaled(&loss).backward();
                let (image_grad, text_grad) = (image.grad(), text.grad());
                let summed = all_reduce_sum(group, &[image_grad, text_grad])?;
                let (image_grad, text_grad) = (&summed[0], &summed[1]);
                let rows = local.image.size()[0];
                let own = |g: &Tensor| g.narrow(0, rank as i64 * rows, rows);
                // d/d(features) of Σ features · g is g: this rank's rows of the summed gradients.
                let carry = (&local.image * own(image_grad)).sum(None) + (&local.text * own(text_grad)).sum(None);
                carry.backward();
                (loss, accuracy)
            } else {
                let (image, text) = (own_first(&images, &local.image), own_first(&texts, &local.text));
                let (loss, accuracy) = self.cast(device, || {
                    rank_loss(&LossInputs {
                        image: &image,
                        text: &text,
                        logit_scale: &local.scale,
                        aggregated: true,
                        teacher: teacher.as_ref().zip(weight),
                    })
                })?;
                self.scaled(&loss).backward();
                (loss, accuracy)
            }
        };
        Ok(StepReport { loss: loss.double_value(&[]), i2t, t2i, ..StepReport::default() })
    }

    /// DDP's all-reduce: replica 0's gradients become the mean over replicas (over the ranks
    /// of the process group, in one coalesced all-reduce).
    fn average_gradients(&mut self) -> Result<()> {
        if let Some(group) = &self.group {
            let grads: Vec<Tensor> = self.params[0].values().map(Tensor::grad).filter(Tensor::defined).collect();
            if !grads.is_empty() {
                let world = group.size() as f64;
                let summed = all_reduce_sum(group, &grads)?;
                tch::no_grad(|| {
                    for (mut grad, sum) in grads.into_iter().zip(summed) {
                        grad.copy_(&(sum / world));
                    }
                });
            }
            return Ok(());
        }
        let world = self.replicas.len();
        if world == 1 {
            return Ok(());
        }
        tch::no_grad(|| {
            for (name, var) in &self.params[0] {
                let mut sum: Option<Tensor> = None;
                for params in &self.params {
                    let grad = params[name].grad();
                    if grad.defined() {
                        let g = grad.to_device(var.device());
                        sum = Some(match sum {
                            None => g,
                            Some(s) => s + g,
                        });
                    }
                }
                // Replica 0 always takes part in the loss, so its gradient is defined wherever
                // any replica's is.
                let mut grad = var.grad();
                if let Some(sum) = sum
                    && grad.defined()
                {
                    grad.copy_(&(sum / world as f64));
                }
            }
        });
        Ok(())
    }

    /// Copies replica 0's variables (parameters and BatchNorm statistics) to the others. In a
    /// process group the parameters are equal on every rank already (the same mean gradient,
    /// the same optimizer): rank 0's BatchNorm running statistics are broadcast, as DDP
    /// broadcasts its buffers before each forward.
    fn broadcast(&mut self) -> Result<()> {
        if let Some(group) = &self.group {
            tch::no_grad(|| -> Result<()> {
                let variables: BTreeMap<String, Tensor> =
                    self.replicas[0].var_store().variables().into_iter().collect();
                for (name, var) in variables {
                    if name.ends_with("running_mean") || name.ends_with("running_var") {
                        broadcast_from_0(group, &var)?;
                    }
                }
                Ok(())
            })?;
            return Ok(());
        }
        let (first, rest) = self.replicas.split_at_mut(1);
        let source = first[0].var_store().variables();
        tch::no_grad(|| {
            for model in rest {
                for (name, mut var) in model.var_store().variables() {
                    var.copy_(&source[&name].to_device(var.device()));
                }
            }
        });
        Ok(())
    }
}

/// The sums over the ranks of `tensors` (of one dtype, any devices), as new tensors on their
/// devices: one all-reduce of them flattened into one CPU buffer (Gloo reduces CPU tensors; its
/// coalesced all-reduce takes no others).
fn all_reduce_sum(group: &ProcessGroup, tensors: &[Tensor]) -> Result<Vec<Tensor>> {
    let flat: Vec<Tensor> = tensors.iter().map(|t| t.detach().to_device(tch::Device::Cpu).reshape([-1])).collect();
    let buffer = Tensor::cat(&flat, 0);
    group.all_reduce(&[&buffer], ReduceOp::Sum)?;
    let mut at = 0;
    Ok(tensors
        .iter()
        .map(|t| {
            let n = t.numel() as i64;
            let part = buffer.narrow(0, at, n).view(t.size().as_slice()).to_device(t.device());
            at += n;
            part
        })
        .collect())
}

/// Copies rank 0's `var` into this rank's, through host memory for a GPU variable.
fn broadcast_from_0(group: &ProcessGroup, var: &Tensor) -> Result<()> {
    if var.device() == tch::Device::Cpu && var.is_contiguous() {
        return Ok(group.broadcast(var, 0)?);
    }
    let host = var.to_device(tch::Device::Cpu).contiguous();
    group.broadcast(&host, 0)?;
    tch::no_grad(|| var.shallow_clone().copy_(&host));
    Ok(())
}

/// One replica's features of a micro-batch, cached without gradient.
struct Cached {
    image: Tensor,
    text: Tensor,
    teacher: Option<Tensor>,
}

/// One replica's loss inputs for a micro-batch.
struct Local {
    image: Tensor,
    text: Tensor,
    scale: Tensor,
    teacher: Option<Tensor>,
}
