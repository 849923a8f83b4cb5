//! Model configurations as data, in cn_clip's own JSON shape.
//!
//! cn_clip builds `CLIP(**model_info)` from two JSON files, `model_configs/<Vision>.json` and
//! `model_configs/<Text>.json`, merged into one flat object. [`ClipConfig`] (de)serialises that
//! same flat object, so a config can be copied between cn_clip and cnclip, and small custom
//! configs (tests, experiments) need no code. The presets below are those files' values.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};

/// Vision tower depth: a ViT's layer count, or ModifiedResNet's four stage depths.
///
/// cn_clip's RN50.json stores the stages as the *string* `"[3, 4, 6, 3]"` (and `eval`s it);
/// both that and a plain JSON array are accepted, and an array is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VisionLayers {
    Transformer(i64),
    ResNet([i64; 4]),
}

impl Serialize for VisionLayers {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            VisionLayers::Transformer(n) => s.serialize_i64(*n),
            VisionLayers::ResNet(stages) => stages.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for VisionLayers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error as _;
        let value = serde_json::Value::deserialize(d)?;
        let stages = |v: &serde_json::Value| -> Option<[i64; 4]> {
            let items: Vec<i64> = v.as_array()?.iter().map(|x| x.as_i64()).collect::<Option<_>>()?;
            items.try_into().ok()
        };
        match &value {
            serde_json::Value::Number(n) => n.as_i64().map(VisionLayers::Transformer),
            serde_json::Value::Array(_) => stages(&value).map(VisionLayers::ResNet),
            serde_json::Value::String(s) => {
                serde_json::from_str::<serde_json::Value>(s).ok().as_ref().and_then(stages).map(VisionLayers::ResNet)
            }
            _ => None,
        }
        .ok_or_else(|| D::Error::custom(format!("vision_layers must be an integer or four stage depths, got {value}")))
    }
}

fn default_head_width() -> i64 {
    64
}

/// The vision half of cn_clip's `model_info` (`model_configs/<Vision>.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VisionConfig {
    pub embed_dim: i64,
    pub image_resolution: i64,
    pub vision_layers: VisionLayers,
    pub vision_width: i64,
    /// `null` for ModifiedResNet.
    pub vision_patch_size: Option<i64>,
    /// Width of one attention head (80 for ViT-H-14).
    #[serde(default = "default_head_width")]
    pub vision_head_width: i64,
}

/// The text half of cn_clip's `model_info` (`model_configs/<Text>.json`): a BERT.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextConfig {
    pub vocab_size: i64,
    pub text_attention_probs_dropout_prob: f64,
    pub text_hidden_act: String,
    pub text_hidden_dropout_prob: f64,
    pub text_hidden_size: i64,
    pub text_initializer_range: f64,
    pub text_intermediate_size: i64,
    pub text_max_position_embeddings: i64,
    pub text_num_attention_heads: i64,
    pub text_num_hidden_layers: i64,
    pub text_type_vocab_size: i64,
}

/// A whole CLIP: cn_clip's merged `model_info`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipConfig {
    #[serde(flatten)]
    pub vision: VisionConfig,
    #[serde(flatten)]
    pub text: TextConfig,
}

/// The five released models: name → (`Vision@Text` structure), as cn_clip's `_MODEL_INFO`.
pub const RELEASED_MODELS: [(&str, &str); 5] = [
    ("ViT-B-16", "ViT-B-16@RoBERTa-wwm-ext-base-chinese"),
    ("ViT-L-14", "ViT-L-14@RoBERTa-wwm-ext-base-chinese"),
    ("ViT-L-14-336", "ViT-L-14-336@RoBERTa-wwm-ext-base-chinese"),
    ("ViT-H-14", "ViT-H-14@RoBERTa-wwm-ext-large-chinese"),
    ("RN50", "RN50@RBT3-chinese"),
];

pub const VISION_MODELS: [&str; 6] = ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14", "RN50"];
pub const TEXT_MODELS: [&str; 3] = ["RoBERTa-wwm-ext-base-chinese", "RoBERTa-wwm-ext-large-chinese", "RBT3-chinese"];

impl VisionConfig {
    /// cn_clip's `model_configs/<name>.json` for a vision tower (`/` may stand for `-`).
    pub fn preset(name: &str) -> Result<Self> {
        let vit = |embed_dim, image_resolution, layers, width, patch, head_width| VisionConfig {
            embed_dim,
            image_resolution,
            vision_layers: VisionLayers::Transformer(layers),
            vision_width: width,
            vision_patch_size: Some(patch),
            vision_head_width: head_width,
        };
        Ok(match name.replace('/', "-").as_str() {
            "ViT-B-32" => vit(512, 224, 12, 768, 32, 64),
            "ViT-B-16" => vit(512, 224, 12, 768, 16, 64),
            "ViT-L-14" => vit(768, 224, 24, 1024, 14, 64),
            "ViT-L-14-336" => vit(768, 336, 24, 1024, 14, 64),
            "ViT-H-14" => vit(1024, 224, 32, 1280, 14, 80),
            "RN50" => VisionConfig {
                embed_dim: 1024,
                image_resolution: 224,
                vision_layers: VisionLayers::ResNet([3, 4, 6, 3]),
                vision_width: 64,
                vision_patch_size: None,
                vision_head_width: 64,
            },
            _ => return Err(unknown("vision", name, &VISION_MODELS)),
        })
    }

    /// Attention heads, as cn_clip derives them from the widths.
    pub fn heads(&self) -> i64 {
        match self.vision_layers {
            VisionLayers::Transformer(_) => self.vision_width / self.vision_head_width,
            VisionLayers::ResNet(_) => self.vision_width * 32 / self.vision_head_width,
        }
    }
}

impl TextConfig {
    /// cn_clip's `model_configs/<name>.json` for a text tower.
    pub fn preset(name: &str) -> Result<Self> {
        let bert = |hidden, intermediate, heads, layers| TextConfig {
            vocab_size: 21128,
            text_attention_probs_dropout_prob: 0.1,
            text_hidden_act: "gelu".into(),
            text_hidden_dropout_prob: 0.1,
            text_hidden_size: hidden,
            text_initializer_range: 0.02,
            text_intermediate_size: intermediate,
            text_max_position_embeddings: 512,
            text_num_attention_heads: heads,
            text_num_hidden_layers: layers,
            text_type_vocab_size: 2,
        };
        Ok(match name.replace('/', "-").as_str() {
            "RoBERTa-wwm-ext-base-chinese" => bert(768, 3072, 12, 12),
            "RoBERTa-wwm-ext-large-chinese" => bert(1024, 4096, 16, 24),
            "RBT3-chinese" => bert(768, 3072, 12, 3),
            _ => return Err(unknown("text", name, &TEXT_MODELS)),
        })
    }
}

impl ClipConfig {
    /// A model by released name (`ViT-B-16`, `RN50`, …) or by structure (`Vision@Text`, any
    /// vision tower with any text tower, as cn_clip allows).
    pub fn from_name(name: &str) -> Result<Self> {
        let structure = RELEASED_MODELS.iter().find(|(released, _)| *released == name).map_or(name, |(_, s)| s);
        let Some((vision, text)) = structure.split_once('@') else {
            return Err(Error::Config(format!(
                "unknown model `{name}`: use a released name ({}) or `Vision@Text`",
                RELEASED_MODELS.map(|(n, _)| n).join(", ")
            )));
        };
        Ok(ClipConfig { vision: VisionConfig::preset(vision)?, text: TextConfig::preset(text)? })
    }

    /// `Vision@Text` when both towers are presets (`ViT-B-16@RoBERTa-wwm-ext-base-chinese`),
    /// else `custom`.
    pub fn name(&self) -> String {
        let vision = VISION_MODELS.iter().find(|v| VisionConfig::preset(v).is_ok_and(|c| c == self.vision));
        let text = TEXT_MODELS.iter().find(|t| TextConfig::preset(t).is_ok_and(|c| c == self.text));
        match (vision, text) {
            (Some(v), Some(t)) => format!("{v}@{t}"),
            _ => "custom".into(),
        }
    }

    /// Parses cn_clip's merged `model_info` JSON.
    pub fn from_json(json: &str) -> Result<Self> {
        let config: ClipConfig = serde_json::from_str(json).map_err(|e| Error::Config(format!("model config: {e}")))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what cn_clip would only find out deep inside a constructor.
    pub fn validate(&self) -> Result<()> {
        let v = &self.vision;
        let t = &self.text;
        let mut problems = Vec::new();
        // Sizes first: libtorch takes a negative or absurd size as an allocation it cannot make
        // and aborts, and a zero size builds a model that computes nothing.
        let layers = match v.vision_layers {
            VisionLayers::Transformer(n) => vec![("vision_layers", n)],
            VisionLayers::ResNet(stages) => stages.iter().map(|&n| ("vision_layers (a stage)", n)).collect(),
        };
        let sizes = [
            ("embed_dim", v.embed_dim, 1 << 16),
            ("image_resolution", v.image_resolution, 1 << 13),
            ("vision_width", v.vision_width, 1 << 16),
            ("vision_head_width", v.vision_head_width, 1 << 16),
            ("vision_patch_size", v.vision_patch_size.unwrap_or(1), 1 << 13),
            ("vocab_size", t.vocab_size, 1 << 24),
            ("text_hidden_size", t.text_hidden_size, 1 << 16),
            ("text_intermediate_size", t.text_intermediate_size, 1 << 18),
            ("text_max_position_embeddings", t.text_max_position_embeddings, 1 << 16),
            ("text_num_attention_heads", t.text_num_attention_heads, 1 << 12),
            ("text_num_hidden_layers", t.text_num_hidden_layers, 1 << 10),
            ("text_type_vocab_size", t.text_type_vocab_size, 1 << 10),
        ];
        let mut sizes_ok = true;
        for (name, value, max) in sizes.into_iter().chain(layers.into_iter().map(|(n, v)| (n, v, 1 << 10))) {
            if !(1..=max).contains(&value) {
                problems.push(format!("{name} is {value}: it must be from 1 to {max}"));
                sizes_ok = false;
            }
        }
        for (name, p) in [
            ("text_attention_probs_dropout_prob", t.text_attention_probs_dropout_prob),
            ("text_hidden_dropout_prob", t.text_hidden_dropout_prob),
        ] {
            if !(0.0..=1.0).contains(&p) {
                problems.push(format!("{name} is {p}: a probability, from 0 to 1"));
            }
        }
        if !(t.text_initializer_range.is_finite() && t.text_initializer_range >= 0.0) {
            problems.push(format!("text_initializer_range is {}: a standard deviation, ≥ 0", t.text_initializer_range));
        }
        if sizes_ok && self.parameter_estimate() > MAX_PARAMETERS {
            problems.push(format!(
                "the config makes a model of about {:.3e} parameters ({:.0} GiB in float32), past cnclip's limit of \
                 {MAX_PARAMETERS:.1e} (ViT-H-14 has 1e9): check its sizes",
                self.parameter_estimate(),
                self.parameter_estimate() * 4.0 / f64::from(1u32 << 30)
            ));
        }
        if !problems.is_empty() {
            return Err(Error::Config(problems.join("; ")));
        }
        match v.vision_layers {
            VisionLayers::Transformer(_) => match v.vision_patch_size {
                Some(p) if p > 0 && v.image_resolution % p == 0 => {}
                Some(p) => problems.push(format!(
                    "image_resolution {} is not a multiple of vision_patch_size {p}",
                    v.image_resolution
                )),
                None => problems.push("a ViT needs vision_patch_size".to_string()),
            },
            VisionLayers::ResNet(_) if v.image_resolution % 32 != 0 => problems
                .push(format!("ModifiedResNet needs image_resolution divisible by 32, got {}", v.image_resolution)),
            VisionLayers::ResNet(_) => {}
        }
        // cn_clip: heads = width // head_width (ViT) or width * 32 // head_width (ResNet, whose
        // attention pool runs at 32× the stem width).
        let attention_width = if self.is_resnet() { v.vision_width * 32 } else { v.vision_width };
        if v.vision_head_width <= 0 || attention_width % v.vision_head_width != 0 {
            problems.push(format!(
                "vision attention width {attention_width} is not a multiple of vision_head_width {}",
                v.vision_head_width
            ));
        }
        if t.text_num_attention_heads <= 0 || t.text_hidden_size % t.text_num_attention_heads != 0 {
            problems.push(format!(
                "text_hidden_size {} is not a multiple of text_num_attention_heads {}",
                t.text_hidden_size, t.text_num_attention_heads
            ));
        }
        if !matches!(t.text_hidden_act.as_str(), "gelu" | "relu" | "swish" | "gelu_new") {
            problems.push(format!("text_hidden_act `{}` is not one of gelu, relu, swish, gelu_new", t.text_hidden_act));
        }
        if problems.is_empty() { Ok(()) } else { Err(Error::Config(problems.join("; "))) }
    }

    /// Roughly how many parameters the config makes (the big matrices; within a few percent
    /// for the presets), to refuse a config no machine can build before libtorch tries.
    pub fn parameter_estimate(&self) -> f64 {
        let v = &self.vision;
        let t = &self.text;
        let f = |x: i64| x as f64;
        let (h, inter) = (f(t.text_hidden_size), f(t.text_intermediate_size));
        let text = (f(t.vocab_size) + f(t.text_max_position_embeddings) + f(t.text_type_vocab_size)) * h
            + f(t.text_num_hidden_layers) * (4.0 * h * h + 2.0 * h * inter)
            + h * f(v.embed_dim);
        let w = f(v.vision_width);
        let vision = match v.vision_layers {
            VisionLayers::Transformer(layers) => {
                let patch = f(v.vision_patch_size.unwrap_or(1).max(1));
                let grid = (f(v.image_resolution) / patch).powi(2);
                f(layers) * 12.0 * w * w + (grid + 1.0) * w + 3.0 * patch * patch * w + w * f(v.embed_dim)
            }
            VisionLayers::ResNet(stages) => {
                let blocks: f64 = stages.iter().enumerate().map(|(i, &n)| f(n) * 17.0 * (w * f(1 << i)).powi(2)).sum();
                let pool = w * 32.0;
                blocks + 3.0 * pool * pool + pool * f(v.embed_dim)
            }
        };
        text + vision
    }

    pub fn is_resnet(&self) -> bool {
        matches!(self.vision.vision_layers, VisionLayers::ResNet(_))
    }
}

/// The largest model [`ClipConfig::validate`] lets through, in parameters (8.6e9, 32 GiB of
/// float32 weights; the largest released Chinese-CLIP, ViT-H-14, has 1e9).
pub const MAX_PARAMETERS: f64 = (1u64 << 33) as f64;

fn unknown(tower: &str, name: &str, known: &[&str]) -> Error {
    Error::Config(format!("unknown {tower} model `{name}`: known are {}", known.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cn_clip_rn50_json_with_string_layers() {
        let json = r#"{"embed_dim": 1024, "image_resolution": 224, "vision_layers": "[3, 4, 6, 3]",
            "vision_width": 64, "vision_patch_size": null, "vocab_size": 21128,
            "text_attention_probs_dropout_prob": 0.1, "text_hidden_act": "gelu", "text_hidden_dropout_prob": 0.1,
            "text_hidden_size": 768, "text_initializer_range": 0.02, "text_intermediate_size": 3072,
            "text_max_position_embeddings": 512, "text_num_attention_heads": 12, "text_num_hidden_layers": 3,
            "text_type_vocab_size": 2}"#;
        assert_eq!(ClipConfig::from_json(json).unwrap(), ClipConfig::from_name("RN50").unwrap());
    }

    #[test]
    fn released_names_and_structures_agree() {
        let h = ClipConfig::from_name("ViT-H-14").unwrap();
        assert_eq!(h, ClipConfig::from_name("ViT-H-14@RoBERTa-wwm-ext-large-chinese").unwrap());
        assert_eq!(h.vision.heads(), 16);
        assert_eq!(ClipConfig::from_name("RN50").unwrap().vision.heads(), 32);
        // Any pairing cn_clip allows.
        assert!(ClipConfig::from_name("ViT-B-32@RBT3-chinese").is_ok());
    }

    #[test]
    fn round_trips_through_json() {
        let config = ClipConfig::from_name("ViT-L-14-336").unwrap();
        let json = serde_json::to_string(&config).unwrap();
        assert_eq!(ClipConfig::from_json(&json).unwrap(), config);
    }

    #[test]
    fn unknown_names_list_the_known_ones() {
        let err = ClipConfig::from_name("ViT-X-1@RBT3-chinese").unwrap_err().to_string();
        assert!(err.contains("unknown vision model `ViT-X-1`") && err.contains("ViT-B-16"), "{err}");
    }

    #[test]
    fn zero_negative_and_absurd_sizes_are_refused_and_the_presets_pass() {
        for name in ["ViT-B-16", "ViT-H-14", "RN50", "ViT-L-14-336"] {
            let config = ClipConfig::from_name(name).unwrap();
            config.validate().unwrap();
            let estimate = config.parameter_estimate();
            assert!(estimate > 3e7 && estimate < 1.2e9, "{name}: {estimate}");
        }
        let base = ClipConfig::from_name("RN50").unwrap();
        let mut zero = base.clone();
        zero.vision.embed_dim = 0;
        assert!(zero.validate().unwrap_err().to_string().contains("embed_dim is 0"));
        let mut negative = base.clone();
        negative.text.text_hidden_size = -768;
        assert!(negative.validate().unwrap_err().to_string().contains("text_hidden_size is -768"));
        let mut absurd = base.clone();
        absurd.text.vocab_size = 1 << 24;
        absurd.text.text_hidden_size = 1 << 16;
        let said = absurd.validate().unwrap_err().to_string();
        assert!(said.contains("parameters"), "{said}");
    }

    #[test]
    fn validation_reports_all_problems() {
        let mut config = ClipConfig::from_name("ViT-B-16").unwrap();
        config.vision.image_resolution = 225;
        config.text.text_num_attention_heads = 7;
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.contains("not a multiple of vision_patch_size") && err.contains("text_num_attention_heads 7"),
            "{err}"
        );
    }
}
