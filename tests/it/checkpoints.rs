//! Checkpoint formats (issue #3): cn_clip `.pt` ⇄ cnclip safetensors through `cnclip convert`,
//! and our `.pt` read back by cn_clip itself — features must not move.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use cnclip_models::checkpoint::{load_clip, own};
use cnclip_models::{ClipConfig, normalize};
use cnclip_tests::{python, reference};
use tch::{Device, Tensor};

use crate::smoke::TINY_VIT_BERT;

fn cnclip(args: &[&str]) {
    let output = Command::new(cnclip_tests::cnclip_bin()).args(args).output().unwrap();
    assert!(output.status.success(), "cnclip {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

fn encode_reference(config: &str, checkpoint: &Path, out: &Path) -> BTreeMap<String, Tensor> {
    reference(
        &[
            "encode",
            "--config",
            config,
            "--checkpoint",
            checkpoint.to_str().unwrap(),
            "--images",
            "2",
            "--out",
            out.to_str().unwrap(),
        ],
        "\"皮卡丘\"\n\"两只狗在雪地里\"\n",
    );
    Tensor::read_safetensors(out).unwrap().into_iter().collect()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn pt_to_safetensors_to_pt_keeps_features() {
    let dir = tempfile::tempdir().unwrap();
    let original = dir.path().join("original.pt");
    reference(
        &[
            "build-model",
            "--config",
            TINY_VIT_BERT,
            "--seed",
            "11",
            "--perturb",
            "0.02",
            "--out",
            original.to_str().unwrap(),
        ],
        "",
    );
    let expected = encode_reference(TINY_VIT_BERT, &original, &dir.path().join("a.safetensors"));

    // cn_clip .pt → cnclip safetensors (needs the architecture), then back to .pt (does not).
    let config = dir.path().join("config.json");
    std::fs::write(&config, TINY_VIT_BERT).unwrap();
    let own = dir.path().join("model.safetensors");
    let back = dir.path().join("back.pt");
    cnclip(&[
        "convert",
        "--input",
        original.to_str().unwrap(),
        "--output",
        own.to_str().unwrap(),
        "--model-config",
        config.to_str().unwrap(),
    ]);
    cnclip(&["convert", "--input", own.to_str().unwrap(), "--output", back.to_str().unwrap()]);

    // Ours, from the safetensors: same features as cn_clip on the original.
    let (model, _) = load_clip(&own, None, Device::Cpu).unwrap();
    let ours = normalize(&model.encode_image(&expected["images"]).unwrap());
    assert!(max_abs_diff(&ours, &normalize(&expected["image_features"])) < 1e-4);
    let (config_read, _) = own::load(&own).unwrap();
    assert_eq!(config_read, ClipConfig::from_json(TINY_VIT_BERT).unwrap());

    // cn_clip, from the .pt we wrote: bit-identical weights, so identical features.
    let again = encode_reference(TINY_VIT_BERT, &back, &dir.path().join("b.safetensors"));
    for key in ["image_features", "text_features", "logits_per_image"] {
        assert_eq!(max_abs_diff(&again[key], &expected[key]), 0.0, "{key}");
    }
}

/// cn_clip's own `create_model` (the path of its quick start and scripts, strict
/// `load_state_dict`) loads a full-size RN50 checkpoint written by us — BatchNorm buffers
/// included — and encodes exactly as from the original.
#[test]
fn cn_clip_create_model_loads_our_rn50_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let original = dir.path().join("original.pt");
    reference(
        &[
            "build-model",
            "--config",
            "RN50",
            "--seed",
            "5",
            "--perturb",
            "0.02",
            "--fp16",
            "--out",
            original.to_str().unwrap(),
        ],
        "",
    );
    let ours = dir.path().join("ours.pt");
    cnclip(&[
        "convert",
        "--input",
        original.to_str().unwrap(),
        "--output",
        ours.to_str().unwrap(),
        "--vision-model",
        "RN50",
        "--text-model",
        "RBT3-chinese",
    ]);
    let script = r#"
import sys, torch
from cn_clip.clip.utils import create_model
from cn_clip.clip import tokenize
torch.manual_seed(0)
images = torch.randn(2, 3, 224, 224)
ids = tokenize(["皮卡丘", "一只猫"])
out = []
for path in sys.argv[1:3]:
    model = create_model("RN50@RBT3-chinese", torch.load(path, map_location="cpu", weights_only=True)).float().eval()
    with torch.no_grad():
        out.append((model.encode_image(images), model.encode_text(ids)))
print(max((a - b).abs().max().item() for a, b in zip(out[0], out[1])))
"#;
    let diff: f64 = python(script, &[original.to_str().unwrap(), ours.to_str().unwrap()], "")
        .lines()
        .last()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(diff, 0.0);
}

#[test]
fn cn_clip_checkpoint_without_architecture_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let original = dir.path().join("original.pt");
    reference(&["build-model", "--config", TINY_VIT_BERT, "--out", original.to_str().unwrap()], "");
    let err = load_clip(&original, None, Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("does not record its architecture") && err.contains("--vision-model"), "{err}");
    let output = Command::new(cnclip_tests::cnclip_bin())
        .args(["convert", "--input", original.to_str().unwrap(), "--output", "/nonexistent/x.safetensors"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("does not record its architecture"));
}

#[test]
fn failed_write_leaves_no_partial_file() {
    let dir = tempfile::tempdir().unwrap();
    let model = cnclip_models::Clip::new(ClipConfig::from_json(TINY_VIT_BERT).unwrap(), Device::Cpu).unwrap();
    let target = dir.path().join("missing-dir").join("m.safetensors");
    assert!(own::save(&target, &model.config, &model.state_dict()).is_err());
    let ok = dir.path().join("m.safetensors");
    own::save(&ok, &model.config, &model.state_dict()).unwrap();
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, [std::ffi::OsString::from("m.safetensors")]);
}

/// A Hugging Face `ChineseCLIPModel` (random init, `save_pretrained`) loads and encodes like
/// HF's own `get_image_features` / `get_text_features`, from safetensors and from a .bin.
#[test]
fn hugging_face_chinese_clip_matches_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let script = r#"
import sys, torch
from safetensors.torch import save_file
from transformers import ChineseCLIPConfig, ChineseCLIPModel
torch.manual_seed(0)
cfg = ChineseCLIPConfig(
    text_config=dict(vocab_size=21128, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=96, max_position_embeddings=64),
    vision_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                       image_size=48, patch_size=16, projection_dim=24),
    projection_dim=24)
model = ChineseCLIPModel(cfg).eval()
with torch.no_grad():
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.02)
model.save_pretrained(sys.argv[1])
# pytorch_model.bin as transformers 4 wrote it (transformers 5 only writes safetensors).
model.config.save_pretrained(sys.argv[2])
torch.save(model.state_dict(), sys.argv[2] + "/pytorch_model.bin")
images = torch.randn(3, 3, 48, 48)
ids = torch.tensor([[101, 4649, 1305, 687, 102, 0, 0, 0], [101, 671, 1372, 4344, 4638, 2207, 102, 0]])
with torch.no_grad():
    def features(out):
        return out if torch.is_tensor(out) else out.pooler_output
    image_features = features(model.get_image_features(pixel_values=images))
    text_features = features(model.get_text_features(input_ids=ids, attention_mask=(ids != 0).long()))
save_file({"images": images, "ids": ids, "image_features": image_features.contiguous(),
           "text_features": text_features.contiguous()}, sys.argv[3])
"#;
    let (st_dir, bin_dir) = (dir.path().join("hf"), dir.path().join("hf-bin"));
    let expected_file = dir.path().join("expected.safetensors");
    python(script, &[st_dir.to_str().unwrap(), bin_dir.to_str().unwrap(), expected_file.to_str().unwrap()], "");
    let expected: BTreeMap<String, Tensor> = Tensor::read_safetensors(&expected_file).unwrap().into_iter().collect();
    for source in [st_dir.clone(), st_dir.join("model.safetensors"), bin_dir] {
        let (model, _) = load_clip(&source, None, Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", source.display()));
        let image = max_abs_diff(
            &normalize(&model.encode_image(&expected["images"]).unwrap()),
            &normalize(&expected["image_features"]),
        );
        let text = max_abs_diff(
            &normalize(&model.encode_text(&expected["ids"]).unwrap()),
            &normalize(&expected["text_features"]),
        );
        println!("{}: image {image:.2e}, text {text:.2e}", source.display());
        assert!(image < 1e-4 && text < 1e-4, "{}: image {image}, text {text}", source.display());
    }
    // And it converts to a cn_clip checkpoint like any other source.
    let pt = dir.path().join("from-hf.pt");
    cnclip(&["convert", "--input", st_dir.to_str().unwrap(), "--output", pt.to_str().unwrap()]);
    let (config, _) = cnclip_models::checkpoint::own::load(&{
        let own = dir.path().join("from-hf.safetensors");
        cnclip(&["convert", "--input", st_dir.to_str().unwrap(), "--output", own.to_str().unwrap()]);
        own
    })
    .unwrap();
    assert_eq!((config.vision.vision_width, config.vision.embed_dim, config.text.text_hidden_size), (64, 24, 48));
    assert!(pt.exists());
}
