//! AdamW as `torch.optim.AdamW` (single-tensor path, `amsgrad=False`, not maximising) with
//! cn_clip's parameter groups: no weight decay for parameters whose name contains `bn`, `ln`,
//! `bias` or `logit_scale`, `--wd` for the rest; frozen parameters are left out. The learning
//! rate is set for every group before each step (cn_clip's scheduler does).
//!
//! The parameters are held in the order of cn_clip's optimizer (`main.py`'s two groups, each in
//! `named_parameters()` order: [`super::order`]), so that position `i` is the id `i` of
//! `optimizer.state_dict()` and a checkpoint's optimizer state moves between cn_clip and us.

use tch::Tensor;

/// `--lr`, `--beta1`, `--beta2`, `--eps`, `--wd`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// Whether cn_clip's `main.py` decays parameter `name` (`exclude` there: `bn`, `ln`, `bias`,
/// `logit_scale` anywhere in the name).
pub fn decays(name: &str) -> bool {
    !["bn", "ln", "bias", "logit_scale"].iter().any(|part| name.contains(part))
}

struct Slot {
    name: String,
    param: Tensor,
    decay: bool,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: u64,
}

/// One parameter's optimizer state, as `optimizer.state_dict()["state"][i]` holds it.
pub struct SlotState<'a> {
    pub name: &'a str,
    /// In group 1 (`--wd`) rather than group 0 (no decay).
    pub decay: bool,
    /// Steps taken (0: never stepped, no entry in the state dict).
    pub step: u64,
    pub exp_avg: &'a Tensor,
    pub exp_avg_sq: &'a Tensor,
}

/// The optimizer over one model's trainable parameters.
pub struct AdamW {
    config: AdamWConfig,
    slots: Vec<Slot>,
    lr: f64,
}

impl AdamW {
    /// Over `params` (name, variable), keeping only those that require grad.
    pub fn new(config: AdamWConfig, params: impl IntoIterator<Item = (String, Tensor)>) -> Self {
        let mut slots: Vec<Slot> = params
            .into_iter()
            .filter(|(_, p)| p.requires_grad())
            .map(|(name, param)| Slot {
                decay: decays(&name),
                exp_avg: param.zeros_like(),
                exp_avg_sq: param.zeros_like(),
                name,
                param,
                step: 0,
            })
            .collect();
        // Group 0 (no decay) then group 1, each in named_parameters() order.
        slots.sort_by(|a, b| a.decay.cmp(&b.decay).then_with(|| super::order::compare(&a.name, &b.name)));
        AdamW { config, slots, lr: config.lr }
    }

    pub fn config(&self) -> AdamWConfig {
        self.config
    }

    /// Replaces the hyperparameters (torch's `load_state_dict` takes a checkpoint's).
    pub fn set_config(&mut self, config: AdamWConfig) {
        self.config = config;
    }

    /// The learning rate of the last step (`optimizer.param_groups[0]['lr']`).
    pub fn lr(&self) -> f64 {
        self.lr
    }

    /// Every parameter's state in the optimizer's order (position = `state_dict()` id).
    pub fn states(&self) -> Vec<SlotState<'_>> {
        self.slots
            .iter()
            .map(|s| SlotState {
                name: &s.name,
                decay: s.decay,
                step: s.step,
                exp_avg: &s.exp_avg,
                exp_avg_sq: &s.exp_avg_sq,
            })
            .collect()
    }

    /// Restores a saved state: `saved[i]` is `(step, exp_avg, exp_avg_sq)` of parameter id `i`,
    /// `None` for one never stepped.
    ///
    /// # Errors
    /// When the number of parameters or a shape differs (another model or freeze setting).
    pub fn load(&mut self, saved: Vec<Option<(u64, Tensor, Tensor)>>) -> crate::Result<()> {
        if saved.len() != self.slots.len() {
            return Err(crate::Error::Shape(format!(
                "the saved optimizer has {} parameters, this model trains {}",
                saved.len(),
                self.slots.len()
            )));
        }
        for (slot, state) in self.slots.iter_mut().zip(saved) {
            let (step, exp_avg, exp_avg_sq) = match state {
                Some(s) => s,
                None => (0, slot.param.zeros_like(), slot.param.zeros_like()),
            };
            if exp_avg.size() != slot.param.size() || exp_avg_sq.size() != slot.param.size() {
                return Err(crate::Error::Shape(format!(
                    "saved optimizer state of {} has shape {:?}, the parameter {:?}",
                    slot.name,
                    exp_avg.size(),
                    slot.param.size()
                )));
            }
            let device = slot.param.device();
            let kind = slot.param.kind();
            slot.step = step;
            slot.exp_avg = exp_avg.to_device(device).to_kind(kind);
            slot.exp_avg_sq = exp_avg_sq.to_device(device).to_kind(kind);
        }
        Ok(())
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }

    /// One update from the parameters' `.grad`; a parameter without a gradient is skipped
    /// (torch skips `p.grad is None`).
    pub fn step(&mut self) {
        let AdamWConfig { beta1, beta2, eps, weight_decay, .. } = self.config;
        let lr = self.lr;
        tch::no_grad(|| {
            for slot in &mut self.slots {
                let grad = slot.param.grad();
                if !grad.defined() {
                    continue;
                }
                slot.step += 1;
                let wd = if slot.decay { weight_decay } else { 0.0 };
                let _ = slot.param.g_mul_scalar_(1.0 - lr * wd);
                let _ = slot.exp_avg.lerp_(&grad, 1.0 - beta1);
                let _ = slot.exp_avg_sq.g_mul_scalar_(beta2).addcmul_(&(&grad * (1.0 - beta2)), &grad);
                let step = slot.step as i32;
                let bias_correction1 = 1.0 - beta1.powi(step);
                let bias_correction2 = 1.0 - beta2.powi(step);
                let step_size = lr / bias_correction1;
                let denom = slot.exp_avg_sq.sqrt() / bias_correction2.sqrt() + eps;
                let _ = slot.param.addcdiv_(&(&slot.exp_avg * -step_size), &denom);
            }
        });
    }
}
