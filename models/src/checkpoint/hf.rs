//! Hugging Face `ChineseCLIPModel` checkpoints (`config.json` + `model.safetensors` or
//! `pytorch_model.bin`), mapped onto cn_clip's key names.
//!
//! HF splits ViT attention into `q/k/v_proj` where cn_clip packs `in_proj_weight`, names the
//! layers differently (`pre_layrnorm`, `layer_norm1`, `mlp.fc1`, …) and stores both projections
//! as `Linear` weights (transposed). The BERT text tower has the same names under
//! `text_model.` as under cn_clip's `bert.`. HF Chinese-CLIP has no ResNet variant.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use tch::Tensor;

use super::TorchArchive;
use crate::clip::{ClipConfig, TextConfig, VisionConfig, VisionLayers};
use crate::error::{Error, Result};
use cnclip_operators::storage;

/// The directory and weights file of an HF checkpoint, if `path` is one: a directory with a
/// `config.json` of `model_type` `chinese_clip`, or a weights file inside such a directory.
pub fn locate(path: &Path) -> Option<(PathBuf, PathBuf)> {
    let dir = if path.is_dir() { path.to_path_buf() } else { path.parent()?.to_path_buf() };
    let config: Value = serde_json::from_str(&storage::read_to_string(dir.join("config.json")).ok()?).ok()?;
    if config.get("model_type").and_then(Value::as_str) != Some("chinese_clip") {
        return None;
    }
    let weights = if path.is_dir() {
        ["model.safetensors", "pytorch_model.bin"].iter().map(|f| dir.join(f)).find(|p| p.exists())?
    } else {
        path.to_path_buf()
    };
    Some((dir, weights))
}

fn bad(path: &Path, reason: impl std::fmt::Display) -> Error {
    Error::Checkpoint { path: path.display().to_string(), reason: reason.to_string() }
}

/// cn_clip's config from HF's `config.json` (HF defaults for absent fields).
pub fn config(dir: &Path) -> Result<ClipConfig> {
    let file = dir.join("config.json");
    let json: Value = serde_json::from_str(&storage::read_to_string(&file)?).map_err(|e| bad(&file, e))?;
    let empty = Value::Object(Default::default());
    let (text, vision) = (json.get("text_config").unwrap_or(&empty), json.get("vision_config").unwrap_or(&empty));
    let int = |v: &Value, key: &str, default: i64| v.get(key).and_then(Value::as_i64).unwrap_or(default);
    let float = |v: &Value, key: &str, default: f64| v.get(key).and_then(Value::as_f64).unwrap_or(default);
    let string =
        |v: &Value, key: &str, default: &str| v.get(key).and_then(Value::as_str).unwrap_or(default).to_string();

    let width = int(vision, "hidden_size", 768);
    let heads = int(vision, "num_attention_heads", 12);
    let mut problems = Vec::new();
    if int(vision, "intermediate_size", 3072) != 4 * width {
        problems.push(format!(
            "vision intermediate_size {} is not 4 × hidden_size {width}",
            int(vision, "intermediate_size", 3072)
        ));
    }
    if string(vision, "hidden_act", "quick_gelu") != "quick_gelu" {
        problems.push(format!("vision hidden_act `{}` is not quick_gelu", string(vision, "hidden_act", "quick_gelu")));
    }
    if heads <= 0 || width % heads != 0 {
        problems.push(format!("vision hidden_size {width} is not a multiple of num_attention_heads {heads}"));
    }
    if !problems.is_empty() {
        return Err(bad(&file, format!("not expressible as a cn_clip model: {}", problems.join("; "))));
    }
    let config = ClipConfig {
        vision: VisionConfig {
            embed_dim: int(&json, "projection_dim", 512),
            image_resolution: int(vision, "image_size", 224),
            vision_layers: VisionLayers::Transformer(int(vision, "num_hidden_layers", 12)),
            vision_width: width,
            vision_patch_size: Some(int(vision, "patch_size", 32)),
            vision_head_width: width / heads,
        },
        text: TextConfig {
            vocab_size: int(text, "vocab_size", 30522),
            text_attention_probs_dropout_prob: float(text, "attention_probs_dropout_prob", 0.1),
            text_hidden_act: string(text, "hidden_act", "gelu"),
            text_hidden_dropout_prob: float(text, "hidden_dropout_prob", 0.1),
            text_hidden_size: int(text, "hidden_size", 768),
            text_initializer_range: float(text, "initializer_range", 0.02),
            text_intermediate_size: int(text, "intermediate_size", 3072),
            text_max_position_embeddings: int(text, "max_position_embeddings", 512),
            text_num_attention_heads: int(text, "num_attention_heads", 12),
            text_num_hidden_layers: int(text, "num_hidden_layers", 12),
            text_type_vocab_size: int(text, "type_vocab_size", 2),
        },
    };
    config.validate().map_err(|e| bad(&file, e))?;
    Ok(config)
}

/// Reads the weights and renames them to cn_clip's keys.
///
/// # Errors
/// When the weights cannot be read or a ViT layer lacks one of q/k/v.
pub fn state_dict(weights: &Path) -> Result<BTreeMap<String, Tensor>> {
    let hf = match weights.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => super::own::read_safetensors(weights)?.0,
        _ => {
            let mut archive = TorchArchive::open(weights)?;
            let top = std::mem::replace(&mut archive.value, super::pickle::Value::None);
            archive.state_dict(&top)?
        }
    };
    let mut out = BTreeMap::new();
    let mut qkv: BTreeMap<(String, String), [Option<Tensor>; 3]> = BTreeMap::new();
    for (key, tensor) in hf {
        if let Some(rest) = key.strip_prefix("text_model.") {
            if !rest.starts_with("pooler.") {
                out.insert(format!("bert.{rest}"), tensor);
            }
            continue;
        }
        let mapped = match key.as_str() {
            "logit_scale" => Some("logit_scale".to_string()),
            "text_projection.weight" => {
                out.insert("text_projection".into(), tensor.tr().contiguous());
                None
            }
            "visual_projection.weight" => {
                out.insert("visual.proj".into(), tensor.tr().contiguous());
                None
            }
            "vision_model.embeddings.class_embedding" => Some("visual.class_embedding".into()),
            "vision_model.embeddings.patch_embedding.weight" => Some("visual.conv1.weight".into()),
            "vision_model.embeddings.position_embedding.weight" => Some("visual.positional_embedding".into()),
            "vision_model.embeddings.position_ids" => None,
            _ => {
                if let Some(rest) = key.strip_prefix("vision_model.pre_layrnorm.") {
                    Some(format!("visual.ln_pre.{rest}"))
                } else if let Some(rest) = key.strip_prefix("vision_model.post_layernorm.") {
                    Some(format!("visual.ln_post.{rest}"))
                } else if let Some(rest) = key.strip_prefix("vision_model.encoder.layers.") {
                    let (layer, name) = rest.split_once('.').unwrap_or((rest, ""));
                    let block = format!("visual.transformer.resblocks.{layer}");
                    let (module, param) = name.rsplit_once('.').unwrap_or((name, ""));
                    match module {
                        "self_attn.q_proj" | "self_attn.k_proj" | "self_attn.v_proj" => {
                            let slot = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
                                .iter()
                                .position(|m| *m == module)
                                .expect("matched above");
                            qkv.entry((block, param.to_string())).or_default()[slot] = Some(tensor);
                            continue;
                        }
                        "self_attn.out_proj" => Some(format!("{block}.attn.out_proj.{param}")),
                        "layer_norm1" => Some(format!("{block}.ln_1.{param}")),
                        "layer_norm2" => Some(format!("{block}.ln_2.{param}")),
                        "mlp.fc1" => Some(format!("{block}.mlp.c_fc.{param}")),
                        "mlp.fc2" => Some(format!("{block}.mlp.c_proj.{param}")),
                        _ => Some(key.clone()), // reported as unexpected by load_state_dict
                    }
                } else {
                    Some(key.clone())
                }
            }
        };
        if let Some(name) = mapped {
            out.insert(name, tensor);
        }
    }
    for ((block, param), parts) in qkv {
        let [Some(q), Some(k), Some(v)] = parts else {
            return Err(bad(weights, format!("{block}: q/k/v projections incomplete")));
        };
        let name = if param == "weight" { "in_proj_weight" } else { "in_proj_bias" };
        out.insert(format!("{block}.attn.{name}"), Tensor::cat(&[q, k, v], 0));
    }
    Ok(out)
}
