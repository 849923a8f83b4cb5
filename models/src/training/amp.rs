//! Mixed precision for training, as cn_clip's `--precision amp` runs it: the forward pass and
//! the loss under autocast (fp16 on a GPU; bf16 on the CPU, which has no fp16 autocast worth
//! the name), and on a GPU in fp16 torch's `GradScaler`, whose dynamic loss scale keeps small
//! fp16 gradients from vanishing: the loss is multiplied by the scale before backward, the
//! gradients divided by it before the optimizer, a step whose gradients hold an inf or a NaN
//! is skipped and the scale halved, and after `growth_interval` clean steps it doubles. The
//! kernels are torch's own (`_amp_foreach_non_finite_check_and_unscale_`,
//! `_amp_update_scale_`), so the scale follows torch's step for step.

use cnclip_torch_ext::amp::{AutocastDevice, autocast, unscale};
use tch::{Device, Kind, Tensor};

use crate::error::Result;

/// The dtype the forward pass and loss are autocast to (`None`: fp32 throughout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Autocast {
    #[default]
    Off,
    /// fp16 (cn_clip's `amp` on a GPU).
    Half,
    /// bf16 (`amp` on the CPU, and `bf16` anywhere).
    BFloat16,
}

impl Autocast {
    /// Runs `f` under autocast for `device`'s type, or as it is when off.
    ///
    /// # Errors
    /// The autocast state could not be switched (never for these dtypes).
    pub fn run<T>(self, device: Device, f: impl FnOnce() -> T) -> Result<T> {
        let dtype = match self {
            Autocast::Off => return Ok(f()),
            Autocast::Half => Kind::Half,
            Autocast::BFloat16 => Kind::BFloat16,
        };
        let device = match device {
            Device::Cpu => AutocastDevice::Cpu,
            _ => AutocastDevice::Cuda,
        };
        Ok(autocast(device, dtype, f)?)
    }
}

/// torch's `GradScaler` settings (its defaults, which cn_clip uses).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScalerConfig {
    pub init_scale: f64,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    pub growth_interval: i64,
}

impl Default for ScalerConfig {
    fn default() -> Self {
        ScalerConfig { init_scale: 65536.0, growth_factor: 2.0, backoff_factor: 0.5, growth_interval: 2000 }
    }
}

/// A dynamic loss scale, as torch's `GradScaler` keeps it: the scale (fp32) and the count of
/// clean steps since it last changed (int32), on the model's device.
pub struct GradScaler {
    config: ScalerConfig,
    scale: Tensor,
    growth_tracker: Tensor,
}

impl GradScaler {
    pub fn new(config: ScalerConfig, device: Device) -> Self {
        GradScaler {
            config,
            scale: Tensor::from_slice(&[config.init_scale as f32]).to_device(device),
            growth_tracker: Tensor::from_slice(&[0i32]).to_device(device),
        }
    }

    pub fn config(&self) -> ScalerConfig {
        self.config
    }

    /// The scale now (`GradScaler.get_scale()`).
    pub fn scale_value(&self) -> f64 {
        self.scale.double_value(&[0])
    }

    /// Clean steps since the scale last changed (`_growth_tracker` of its `state_dict()`).
    pub fn growth_tracker(&self) -> i64 {
        self.growth_tracker.int64_value(&[0])
    }

    /// Takes a saved state back (`load_state_dict`: the scale and the clean-step count).
    pub fn restore(&mut self, scale: f64, growth_tracker: i64) {
        tch::no_grad(|| {
            let _ = self.scale.fill_(scale);
            let _ = self.growth_tracker.fill_(growth_tracker);
        });
    }

    /// `loss` × the scale (`GradScaler.scale(loss)`), what backward starts from.
    pub fn scale(&self, loss: &Tensor) -> Tensor {
        loss * self.scale.to_device(loss.device()).to_kind(loss.kind())
    }

    /// Divides `grads` by the scale in place (`unscale_`) and says whether any held an inf
    /// or a NaN; the step is then skipped and [`GradScaler::update`] backs off.
    ///
    /// # Errors
    /// Gradients torch's kernel refuses (on several devices).
    pub fn unscale(&self, grads: &[&Tensor]) -> Result<Tensor> {
        // torch: inv_scale = self._scale.double().reciprocal().float().
        let inv_scale = self.scale.to_kind(Kind::Double).reciprocal().to_kind(Kind::Float);
        let found_inf = Tensor::zeros([1], (Kind::Float, self.scale.device()));
        if !grads.is_empty() {
            unscale(grads, &found_inf, &inv_scale)?;
        }
        Ok(found_inf)
    }

    /// `GradScaler.update()` after a step whose unscale found `found_inf` (1: an inf or NaN):
    /// backs off, or counts a clean step and grows the scale every `growth_interval` of them.
    pub fn update(&mut self, found_inf: &Tensor) {
        let found = found_inf.to_device(self.scale.device());
        let ScalerConfig { growth_factor, backoff_factor, growth_interval, .. } = self.config;
        tch::no_grad(|| {
            let _ = self.scale.internal_amp_update_scale_(
                &self.growth_tracker,
                &found,
                growth_factor,
                backoff_factor,
                growth_interval,
            );
        });
    }
}
