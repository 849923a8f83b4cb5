//! Model parity with cn_clip 1.6.0 (issue #3).
//!
//! Each test builds a randomly initialised model with cn_clip's own classes (every parameter
//! perturbed, since cn_clip zero-initialises some), saves it in cn_clip's checkpoint format,
//! lets cn_clip encode seeded random images and a few texts, then loads the same checkpoint
//! with our restricted reader and encodes the same inputs.
//!
//! Tolerance: 1e-4 max abs on L2-normalised features (fp32, CPU). Both sides run the same
//! libtorch kernels, but we run attention batch-first through `scaled_dot_product_attention`
//! and ResNet's pooling query on one token, so sums are ordered differently: agreement is to
//! float rounding (typically ~1e-6), not bit-exact.

use std::collections::BTreeMap;
use std::path::Path;

use cnclip_models::checkpoint::load_cn_clip;
use cnclip_models::{Clip, ClipConfig, normalize};
use cnclip_tests::{python, reference};
use tch::{Device, Kind, Tensor};

use crate::smoke::TINY_VIT_BERT;

const TEXTS: &str = "\"皮卡丘\"\n\"一只可爱的小猫在草地上玩耍。\"\n\"A photo of a dog, 3只狗\"\n\"\"\n";
const TOLERANCE: f64 = 1e-4;

const TINY_RESNET_BERT: &str = r#"{"embed_dim": 48, "image_resolution": 64, "vision_layers": "[2, 1, 1, 1]",
  "vision_width": 16, "vision_patch_size": null, "vision_head_width": 32, "vocab_size": 21128,
  "text_attention_probs_dropout_prob": 0.1, "text_hidden_act": "gelu", "text_hidden_dropout_prob": 0.1,
  "text_hidden_size": 48, "text_initializer_range": 0.02, "text_intermediate_size": 96,
  "text_max_position_embeddings": 64, "text_num_attention_heads": 4, "text_num_hidden_layers": 2,
  "text_type_vocab_size": 2}"#;

/// ViT-H-style head width (80 there) and an odd patch grid, with a ReLU BERT.
const TINY_VIT_HEAD_WIDTH_RELU: &str = r#"{"embed_dim": 24, "image_resolution": 35, "vision_layers": 3,
  "vision_width": 60, "vision_patch_size": 7, "vision_head_width": 20, "vocab_size": 21128,
  "text_attention_probs_dropout_prob": 0.1, "text_hidden_act": "relu", "text_hidden_dropout_prob": 0.1,
  "text_hidden_size": 40, "text_initializer_range": 0.02, "text_intermediate_size": 80,
  "text_max_position_embeddings": 60, "text_num_attention_heads": 5, "text_num_hidden_layers": 1,
  "text_type_vocab_size": 2}"#;

fn config_of(spec: &str) -> ClipConfig {
    if spec.trim_start().starts_with('{') {
        ClipConfig::from_json(spec).unwrap()
    } else {
        ClipConfig::from_name(spec).unwrap()
    }
}

fn build_reference_checkpoint(spec: &str, fp16: bool, dir: &Path) -> String {
    let checkpoint = dir.join("model.pt").to_str().unwrap().to_string();
    let mut args = vec!["build-model", "--config", spec, "--seed", "7", "--perturb", "0.02", "--out", &checkpoint];
    if fp16 {
        args.push("--fp16");
    }
    reference(&args, "");
    checkpoint
}

fn load_ours(spec: &str, checkpoint: &str) -> Clip {
    let (state_dict, info) = load_cn_clip(Path::new(checkpoint)).unwrap();
    assert_eq!((info.epoch, info.step, info.name.as_deref()), (Some(1), Some(1), Some("cnclip-reference")));
    let mut model = Clip::new(config_of(spec), Device::Cpu).unwrap();
    model.load_state_dict(&state_dict).unwrap();
    model
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

fn assert_parity(spec: &str, fp16: bool) {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = build_reference_checkpoint(spec, fp16, dir.path());
    let outputs = dir.path().join("reference.safetensors");
    reference(
        &["encode", "--config", spec, "--checkpoint", &checkpoint, "--images", "3", "--out", outputs.to_str().unwrap()],
        TEXTS,
    );
    let reference: BTreeMap<String, Tensor> = Tensor::read_safetensors(&outputs).unwrap().into_iter().collect();

    let model = load_ours(spec, &checkpoint);
    let image_features = model.encode_image(&reference["images"]).unwrap();
    let text_features = model.encode_text(&reference["text_ids"]).unwrap();
    let image_diff = max_abs_diff(&normalize(&image_features), &normalize(&reference["image_features"]));
    let text_diff = max_abs_diff(&normalize(&text_features), &normalize(&reference["text_features"]));
    let (logits_per_image, logits_per_text) =
        model.get_similarity(&reference["images"], &reference["text_ids"]).unwrap();
    let logit_diff = max_abs_diff(&logits_per_image, &reference["logits_per_image"]);
    println!("{spec}: image {image_diff:.2e}, text {text_diff:.2e}, logits {logit_diff:.2e}");
    assert!(image_diff < TOLERANCE, "image features differ by {image_diff}");
    assert!(text_diff < TOLERANCE, "text features differ by {text_diff}");
    // Logits are scaled by exp(logit_scale) ≈ 14.3, so their tolerance scales with it.
    assert!(logit_diff < TOLERANCE * model.logit_scale(), "logits differ by {logit_diff}");
    assert_eq!(logits_per_text.size(), [4, 3]);
    assert!((model.logit_scale().ln() - reference["logit_scale"].double_value(&[0])).abs() < 1e-6);
}

#[test]
fn tiny_vit_bert_matches_cn_clip() {
    assert_parity(TINY_VIT_BERT, false);
}

#[test]
fn tiny_vit_bert_from_fp16_checkpoint_matches_cn_clip() {
    assert_parity(TINY_VIT_BERT, true);
}

#[test]
fn tiny_resnet_bert_matches_cn_clip() {
    assert_parity(TINY_RESNET_BERT, false);
}

#[test]
fn tiny_vit_with_head_width_and_relu_bert_matches_cn_clip() {
    assert_parity(TINY_VIT_HEAD_WIDTH_RELU, false);
}

/// Full-size: ViT-B-16 with RoBERTa-wwm-ext-base (the released ViT-B-16 architecture).
#[test]
fn full_size_vit_b_16_matches_cn_clip() {
    assert_parity("ViT-B-16", true);
}

/// Full-size: the released RN50 (ModifiedResNet-50 with RBT3).
#[test]
fn full_size_rn50_matches_cn_clip() {
    assert_parity("RN50", true);
}

#[test]
fn checkpoint_for_another_architecture_names_the_keys() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = build_reference_checkpoint(TINY_VIT_BERT, false, dir.path());
    let (state_dict, _) = load_cn_clip(Path::new(&checkpoint)).unwrap();

    let mut resnet = Clip::new(config_of(TINY_RESNET_BERT), Device::Cpu).unwrap();
    let err = resnet.load_state_dict(&state_dict).unwrap_err().to_string();
    assert!(err.contains("missing key(s): visual.attnpool."), "{err}");
    assert!(err.contains("unexpected key(s): visual.class_embedding"), "{err}");
    assert!(
        err.contains("mis-shaped key(s)")
            && err.contains("bert.embeddings.LayerNorm.bias: checkpoint [64], model [48]"),
        "{err}"
    );

    // A model left untouched by a failed load still has its own initial weights.
    let before = resnet.state_dict()["logit_scale"].double_value(&[]);
    assert!((before - (1.0f64 / 0.07).ln()).abs() < 1e-6);
}

#[test]
fn crafted_pickle_checkpoint_is_refused_without_running_it() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("evil.pt");
    let marker = dir.path().join("pwned");
    let script = r#"
import os, pickle, sys, zipfile
class Evil:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[2],))
with zipfile.ZipFile(sys.argv[1], "w") as z:
    z.writestr("evil/data.pkl", pickle.dumps({"state_dict": Evil()}, protocol=2))
    z.writestr("evil/byteorder", "little")
"#;
    python(script, &[checkpoint.to_str().unwrap(), marker.to_str().unwrap()], "");
    let err = load_cn_clip(&checkpoint).expect_err("the crafted checkpoint is refused").to_string();
    assert!(err.contains("evil.pt") && err.contains("posix.system"), "{err}");
    assert!(!marker.exists(), "the pickle's payload ran");
}

#[test]
fn fp16_model_features_track_fp32() {
    // Our fp16 path (as on GPUs; CPU half matmul works in libtorch) stays close to fp32.
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = build_reference_checkpoint(TINY_VIT_BERT, true, dir.path());
    let mut model = load_ours(TINY_VIT_BERT, &checkpoint);
    let images = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    let fp32 = normalize(&model.encode_image(&images).unwrap());
    model.set_kind(Kind::BFloat16);
    let bf16 = normalize(&model.encode_image(&images).unwrap().to_kind(Kind::Float));
    let diff = max_abs_diff(&fp32, &bf16);
    assert!(diff < 5e-2, "bf16 features differ from fp32 by {diff}");
}
