//! Checkpoint formats (issue #3): cn_clip `.pt` ⇄ cnclip safetensors through `cnclip convert`,
//! and our `.pt` read back by cn_clip itself — features must not move.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use cnclip_models::checkpoint::{load_clip, own};
use cnclip_models::{ClipConfig, normalize};
use cnclip_tests::{python, reference};
use tch::{Device, Tensor};

use crate::smoke::TINY_VIT_BERT;

fn cnclip_bin() -> PathBuf {
    // The jobs package's binary, built by `cargo test --workspace` for jobs/tests/cli.rs.
    let exe = std::env::current_exe().unwrap();
    let target = exe.parent().unwrap().parent().unwrap();
    let bin = target.join("cnclip");
    assert!(bin.exists(), "{} not built: run `cargo test --workspace` (or `cargo build -p cnclip-jobs`)", bin.display());
    bin
}

fn cnclip(args: &[&str]) {
    let output = Command::new(cnclip_bin()).args(args).output().unwrap();
    assert!(output.status.success(), "cnclip {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

fn encode_reference(config: &str, checkpoint: &Path, out: &Path) -> BTreeMap<String, Tensor> {
    reference(
        &["encode", "--config", config, "--checkpoint", checkpoint.to_str().unwrap(), "--images", "2", "--out", out.to_str().unwrap()],
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
    reference(&["build-model", "--config", TINY_VIT_BERT, "--seed", "11", "--perturb", "0.02", "--out", original.to_str().unwrap()], "");
    let expected = encode_reference(TINY_VIT_BERT, &original, &dir.path().join("a.safetensors"));

    // cn_clip .pt → cnclip safetensors (needs the architecture), then back to .pt (does not).
    let config = dir.path().join("config.json");
    std::fs::write(&config, TINY_VIT_BERT).unwrap();
    let own = dir.path().join("model.safetensors");
    let back = dir.path().join("back.pt");
    cnclip(&["convert", "--input", original.to_str().unwrap(), "--output", own.to_str().unwrap(), "--model-config", config.to_str().unwrap()]);
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
    reference(&["build-model", "--config", "RN50", "--seed", "5", "--perturb", "0.02", "--fp16", "--out", original.to_str().unwrap()], "");
    let ours = dir.path().join("ours.pt");
    cnclip(&[
        "convert", "--input", original.to_str().unwrap(), "--output", ours.to_str().unwrap(),
        "--vision-model", "RN50", "--text-model", "RBT3-chinese",
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
    let diff: f64 = python(script, &[original.to_str().unwrap(), ours.to_str().unwrap()], "").lines().last().unwrap().parse().unwrap();
    assert_eq!(diff, 0.0);
}

#[test]
fn cn_clip_checkpoint_without_architecture_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let original = dir.path().join("original.pt");
    reference(&["build-model", "--config", TINY_VIT_BERT, "--out", original.to_str().unwrap()], "");
    let err = load_clip(&original, None, Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("does not record its architecture") && err.contains("--vision-model"), "{err}");
    let output = Command::new(cnclip_bin())
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
