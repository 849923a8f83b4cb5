//! Chinese-CLIP (Yang et al., 2022, "Chinese CLIP: Contrastive Vision-Language Pretraining in
//! Chinese"), mirroring `cn_clip/clip/model.py`'s `CLIP` from cn_clip 1.6.0.
//!
//! All parameters live in one [`nn::VarStore`] under the names cn_clip's `state_dict` uses
//! (`visual.…`, `bert.…`, `text_projection`, `logit_scale`), so checkpoints load by name and
//! [`Clip::load_state_dict`] can say exactly which keys are missing, unexpected or mis-shaped.
//! `forward` methods are infallible (tch style); shapes are checked at the boundary.

pub mod config;
mod layers;
pub mod resnet;
pub mod text;
pub mod vision;

use std::collections::BTreeMap;

use tch::{Device, Kind, Tensor, nn};

pub use config::{ClipConfig, TextConfig, VisionConfig, VisionLayers};

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// The image tower: a ViT or a ModifiedResNet.
#[derive(Debug)]
#[allow(clippy::large_enum_variant, reason = "one per model, never moved in a hot path")]
pub enum Visual {
    Transformer(vision::VisualTransformer),
    ResNet(resnet::ModifiedResNet),
}

/// What `train()` mode changes in cn_clip's model; all off (inference) unless a trainer sets it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Mode {
    /// BERT's dropout (the config's `text_hidden_dropout_prob`, `text_attention_probs_dropout_prob`).
    pub dropout: bool,
    /// RN50's BatchNorm on batch statistics, updating the running ones (off for a frozen tower).
    pub batch_norm: bool,
    /// `--grad-checkpointing`: ViT residual blocks and BERT layers recompute their activations
    /// in backward (as cn_clip's `set_grad_checkpointing`, which leaves RN50 as it is).
    pub grad_checkpointing: bool,
}

/// A Chinese-CLIP model on one device.
#[derive(Debug)]
pub struct Clip {
    pub config: ClipConfig,
    vs: nn::VarStore,
    visual: Visual,
    bert: text::Bert,
    text_projection: Tensor,
    logit_scale: Tensor,
    pad_id: i64,
    mode: Mode,
    /// The ranks BatchNorm takes its batch statistics over (`--use-bn-sync`), when training.
    batch_norm_sync: Option<std::sync::Arc<cnclip_torch_ext::c10d::ProcessGroup>>,
}

/// Checkpoint keys cn_clip itself drops or that hold no parameters we use.
fn ignorable(key: &str) -> bool {
    key.starts_with("bert.pooler.") || key.ends_with(".num_batches_tracked")
}

impl Clip {
    /// A randomly initialised model (tch's default initialisers, not cn_clip's); load weights
    /// with [`Clip::load_state_dict`].
    pub fn new(config: ClipConfig, device: Device) -> Result<Self> {
        config.validate()?;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let v = &config.vision;
        let visual = match v.vision_layers {
            VisionLayers::Transformer(layers) => Visual::Transformer(vision::VisualTransformer::new(
                &(&root / "visual"),
                v.image_resolution,
                v.vision_patch_size.expect("validated: ViT has a patch size"),
                v.vision_width,
                layers,
                v.heads(),
                v.embed_dim,
            )),
            VisionLayers::ResNet(layers) => Visual::ResNet(resnet::ModifiedResNet::new(
                &(&root / "visual"),
                layers,
                v.embed_dim,
                v.heads(),
                v.image_resolution,
                v.vision_width,
            )),
        };
        let bert = text::Bert::new(&(&root / "bert"), &config.text);
        let text_projection = root.var(
            "text_projection",
            &[config.text.text_hidden_size, v.embed_dim],
            nn::Init::Randn { mean: 0.0, stdev: (config.text.text_hidden_size as f64).powf(-0.5) },
        );
        let logit_scale = root.var("logit_scale", &[], nn::Init::Const((1.0f64 / 0.07).ln()));
        Ok(Clip {
            config,
            vs,
            visual,
            bert,
            text_projection,
            logit_scale,
            pad_id: Tokenizer::chinese().pad_id(),
            mode: Mode::default(),
            batch_norm_sync: None,
        })
    }

    /// Sets what `train()` mode changes for the `_t` (autograd) forwards.
    pub fn set_mode(&mut self, mode: Mode) {
        self.mode = mode;
    }

    /// Training BatchNorm takes the statistics of the batch over `group`'s ranks (torch's
    /// `SyncBatchNorm`), or this replica's batch (`None`).
    pub fn set_batch_norm_sync(&mut self, group: Option<std::sync::Arc<cnclip_torch_ext::c10d::ProcessGroup>>) {
        self.batch_norm_sync = group;
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The learned `logit_scale` parameter itself (its log), for training.
    pub fn logit_scale_parameter(&self) -> &Tensor {
        &self.logit_scale
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    pub fn var_store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }

    /// The side length of the square images the vision tower takes.
    pub fn input_resolution(&self) -> i64 {
        self.config.vision.image_resolution
    }

    /// Copies `state_dict` (cn_clip key names, `module.` prefix already stripped) into the
    /// model, converting dtypes (fp16 checkpoints into an fp32 model, say).
    ///
    /// # Errors
    /// [`Error::StateDict`] listing every missing, unexpected and mis-shaped key at once.
    /// `bert.pooler.*` and BatchNorm `num_batches_tracked` are accepted and ignored, as cn_clip
    /// does; nothing is copied unless everything fits.
    pub fn load_state_dict(&mut self, state_dict: &BTreeMap<String, Tensor>) -> Result<()> {
        let mut variables = self.vs.variables();
        let mut missing = Vec::new();
        let mut mis_shaped = Vec::new();
        for (name, var) in &variables {
            match state_dict.get(name) {
                None => missing.push(name.clone()),
                Some(t) if t.size() != var.size() => {
                    mis_shaped.push(format!("{name}: checkpoint {:?}, model {:?}", t.size(), var.size()))
                }
                Some(_) => {}
            }
        }
        let unexpected: Vec<String> =
            state_dict.keys().filter(|k| !variables.contains_key(*k) && !ignorable(k)).cloned().collect();
        if !(missing.is_empty() && unexpected.is_empty() && mis_shaped.is_empty()) {
            missing.sort();
            mis_shaped.sort();
            return Err(Error::StateDict { missing, unexpected, mis_shaped });
        }
        tch::no_grad(|| {
            for (name, var) in variables.iter_mut() {
                var.copy_(&state_dict[name].to_kind(var.kind()));
            }
        });
        Ok(())
    }

    /// The model's parameters under cn_clip's key names.
    pub fn state_dict(&self) -> BTreeMap<String, Tensor> {
        self.vs.variables().into_iter().collect()
    }

    /// Parameters (trainable variables, not BatchNorm statistics), in all and in the vision
    /// tower: what `sum(p.numel() for p in model.parameters())` and `model.visual.parameters()`
    /// count in cn_clip.
    pub fn parameter_counts(&self) -> (usize, usize) {
        let (mut all, mut visual) = (0, 0);
        for (name, tensor) in self.vs.variables() {
            if tensor.requires_grad() {
                let n = tensor.numel();
                all += n;
                if name.starts_with("visual.") {
                    visual += n;
                }
            }
        }
        (all, visual)
    }

    /// Converts every parameter to `kind` (fp32, fp16, bf16).
    pub fn set_kind(&mut self, kind: Kind) {
        self.vs.set_kind(kind);
    }

    /// `CLIP.encode_image`: features `[N, embed_dim]` (not normalised) of preprocessed pixels.
    ///
    /// # Errors
    /// When `pixels` is not `[N, 3, R, R]` at the model's resolution.
    pub fn encode_image(&self, pixels: &Tensor) -> Result<Tensor> {
        let r = self.input_resolution();
        match pixels.size().as_slice() {
            [_, 3, h, w] if *h == r && *w == r => {}
            other => {
                return Err(Error::Shape(format!("images must be [N, 3, {r}, {r}], got {other:?}")));
            }
        }
        Ok(tch::no_grad(|| self.image_features(pixels, 0.0, false)))
    }

    /// Image features with autograd (training), in the model's [`Mode`]; `mask_ratio` is FLIP
    /// masking (ViT only).
    pub fn encode_image_t(&self, pixels: &Tensor, mask_ratio: f64) -> Tensor {
        self.image_features(pixels, mask_ratio, self.mode.batch_norm)
    }

    fn image_features(&self, pixels: &Tensor, mask_ratio: f64, batch_norm: bool) -> Tensor {
        match &self.visual {
            Visual::Transformer(vit) => vit.forward(pixels, mask_ratio, self.mode.grad_checkpointing),
            Visual::ResNet(resnet) => resnet.forward(
                pixels,
                match (batch_norm, &self.batch_norm_sync) {
                    (false, _) => resnet::Norm::Running,
                    (true, None) => resnet::Norm::Batch,
                    (true, Some(group)) => resnet::Norm::Synced(group),
                },
            ),
        }
    }

    /// `CLIP.encode_text`: features `[N, embed_dim]` (not normalised) of token ids `[N, L]`.
    ///
    /// # Errors
    /// When `ids` is not a 2-D integer tensor no longer than the position embeddings.
    pub fn encode_text(&self, ids: &Tensor) -> Result<Tensor> {
        let max = self.config.text.text_max_position_embeddings;
        match (ids.size().as_slice(), ids.kind()) {
            ([_, l], Kind::Int64 | Kind::Int) if *l <= max => {}
            (shape, kind) => {
                return Err(Error::Shape(format!("token ids must be [N, L ≤ {max}] integers, got {shape:?} {kind:?}")));
            }
        }
        Ok(tch::no_grad(|| self.text_features(&ids.to_kind(Kind::Int64), false)))
    }

    /// Text features with autograd (training), in the model's [`Mode`].
    pub fn encode_text_t(&self, ids: &Tensor) -> Tensor {
        self.text_features(ids, self.mode.dropout)
    }

    fn text_features(&self, ids: &Tensor, dropout: bool) -> Tensor {
        let hidden = self.bert.forward(ids, self.pad_id, dropout, self.mode.grad_checkpointing);
        hidden.select(1, 0).matmul(&self.text_projection)
    }

    /// `exp(logit_scale)`, the temperature's inverse.
    pub fn logit_scale(&self) -> f64 {
        self.logit_scale.exp().double_value(&[])
    }

    /// `CLIP.get_similarity`: (`logits_per_image` `[Ni, Nt]`, `logits_per_text` `[Nt, Ni]`).
    ///
    /// # Errors
    /// As [`Clip::encode_image`] and [`Clip::encode_text`].
    pub fn get_similarity(&self, pixels: &Tensor, ids: &Tensor) -> Result<(Tensor, Tensor)> {
        let image_features = normalize(&self.encode_image(pixels)?);
        let text_features = normalize(&self.encode_text(ids)?);
        let logits_per_image = image_features.matmul(&text_features.tr()) * self.logit_scale();
        let logits_per_text = logits_per_image.tr();
        Ok((logits_per_image, logits_per_text))
    }
}

/// L2-normalises each row, as cn_clip does (`x / x.norm(dim=-1, keepdim=True)`).
pub fn normalize(features: &Tensor) -> Tensor {
    features / features.norm_scalaropt_dim(2, [-1], true)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A CLIP small enough to build in a test.
    pub(crate) fn tiny() -> ClipConfig {
        let mut config = ClipConfig::from_name("ViT-B-32@RBT3-chinese").unwrap();
        config.vision.image_resolution = 64;
        config.vision.vision_layers = VisionLayers::Transformer(1);
        config.vision.vision_width = 64;
        config.vision.embed_dim = 16;
        config.text.text_hidden_size = 32;
        config.text.text_num_attention_heads = 2;
        config.text.text_intermediate_size = 64;
        config.text.text_num_hidden_layers = 1;
        config
    }

    #[test]
    fn flip_masking_keeps_the_feature_shape_and_changes_the_features() {
        tch::manual_seed(0);
        let model = Clip::new(tiny(), Device::Cpu).unwrap();
        let pixels = Tensor::randn([2, 3, 64, 64], (Kind::Float, Device::Cpu));
        let full = model.encode_image_t(&pixels, 0.0);
        let masked = model.encode_image_t(&pixels, 0.5);
        assert_eq!(masked.size(), [2, 16]);
        assert!((&full - &masked).abs().max().double_value(&[]) > 1e-4);
    }

    #[test]
    fn wrong_input_shapes_are_errors() {
        let model = Clip::new(tiny(), Device::Cpu).unwrap();
        let err = model.encode_image(&Tensor::zeros([1, 3, 32, 32], (Kind::Float, Device::Cpu))).unwrap_err();
        assert!(err.to_string().contains("[N, 3, 64, 64]"), "{err}");
        assert!(model.encode_text(&Tensor::zeros([2, 600], (Kind::Int64, Device::Cpu))).is_err());
        assert!(model.encode_text(&Tensor::zeros([2, 10], (Kind::Float, Device::Cpu))).is_err());
    }
}
