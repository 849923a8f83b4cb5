//! Image preprocessing parity with cn_clip's transform (issue #3): from the same bytes, our
//! `Resize((r, r), BICUBIC)` + `convert("RGB")` must be within 2/255 of Pillow's, per pixel, for
//! every format, mode and awkward size `tests/reference/make_images.py` writes; end-to-end
//! image features must have cosine ≥ 0.9999 with cn_clip's.
//!
//! Tolerance: 2/255 before normalisation, as the issue sets. The JPEG decoders may differ
//! (Pillow's bundled libjpeg-turbo, the turbojpeg crate's build here) and premultiplied-alpha rounding may differ, by
//! a unit or two; everything else is the same arithmetic.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cnclip_models::preprocess::{DEFAULT_MAX_PIXELS, Image, PreprocessError, resize_to_rgb};
use cnclip_tests::{make_images, reference};
use fast_image_resize::Resizer;
use tch::Tensor;

fn reference_pixels(files: &[PathBuf], resolution: usize, out: &Path) -> (Vec<Tensor>, Vec<String>) {
    let mut args = vec![
        "preprocess".to_string(),
        "--resolution".into(),
        resolution.to_string(),
        "--out".into(),
        out.display().to_string(),
    ];
    args.extend(files.iter().map(|f| f.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let modes: serde_json::Value = serde_json::from_str(&reference(&args, "")).unwrap();
    let tensors: BTreeMap<String, Tensor> = Tensor::read_safetensors(out).unwrap().into_iter().collect();
    let pixels = (0..files.len()).map(|i| tensors[&i.to_string()].shallow_clone()).collect();
    let modes = modes["modes"].as_array().unwrap().iter().map(|m| m.as_str().unwrap().to_string()).collect();
    (pixels, modes)
}

fn check_resolution(resolution: usize) {
    let dir = tempfile::tempdir().unwrap();
    let written = make_images(dir.path());
    let files: Vec<PathBuf> = written.keys().map(|name| dir.path().join(name)).collect();
    let (expected, modes) = reference_pixels(&files, resolution, &dir.path().join("reference.safetensors"));
    let mut resizer = Resizer::new();
    let mut report = Vec::new();
    let mut worst = 0i64;
    for ((file, want), mode) in files.iter().zip(&expected).zip(&modes) {
        let bytes = std::fs::read(file).unwrap();
        let image = Image::decode(&bytes, DEFAULT_MAX_PIXELS).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let ours = resize_to_rgb(&image, resolution, &mut resizer).unwrap();
        let ours = Tensor::from_slice(&ours).view([resolution as i64, resolution as i64, 3]);
        let diff = (ours.to_kind(tch::Kind::Int) - want.to_kind(tch::Kind::Int)).abs();
        let max = diff.max().int64_value(&[]);
        let mean = diff.to_kind(tch::Kind::Float).mean(None).double_value(&[]);
        worst = worst.max(max);
        if max > 0 && std::env::var_os("CNCLIP_DEBUG_PIXELS").is_some() {
            let positions = diff.gt(0).nonzero();
            println!(
                "{}: {} differing values, first {:?}",
                file.display(),
                positions.size()[0],
                Vec::<i64>::try_from(positions.narrow(0, 0, positions.size()[0].min(5)).flatten(0, -1)).unwrap()
            );
        }
        report.push(format!(
            "{:<26} Pillow {mode:<5} ours {:<8} max {max:>3}  mean {mean:.4}",
            file.file_name().unwrap().to_string_lossy(),
            format!("{:?}", image.mode)
        ));
    }
    let report = report.join("\n");
    println!("resolution {resolution}:\n{report}");
    assert!(worst <= 2, "pixels differ by up to {worst}/255:\n{report}");
}

#[test]
fn pixels_match_cn_clip_transform_at_224() {
    check_resolution(224);
}

#[test]
fn pixels_match_cn_clip_transform_at_336() {
    check_resolution(336);
}

#[test]
fn truncated_and_garbage_bytes_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let written = make_images(dir.path());
    for name in written.keys() {
        let bytes = std::fs::read(dir.path().join(name)).unwrap();
        for cut in [0, 1, 8, bytes.len() / 3, bytes.len() / 2] {
            let result = std::panic::catch_unwind(|| {
                Image::decode(&bytes[..cut], DEFAULT_MAX_PIXELS)
                    .map(|image| resize_to_rgb(&image, 32, &mut Resizer::new()))
            });
            assert!(result.is_ok(), "{name} cut at {cut} panicked");
        }
    }
    assert!(matches!(Image::decode(b"definitely not an image", DEFAULT_MAX_PIXELS), Err(PreprocessError::Decode(_))));
    // A truncated JPEG or PNG is an error (Pillow: "image file is truncated"), not a grey image.
    for name in ["baseline.jpg", "progressive.jpg", "rgb.png"] {
        let bytes = std::fs::read(dir.path().join(name)).unwrap();
        let result = Image::decode(&bytes[..bytes.len() / 2], DEFAULT_MAX_PIXELS);
        assert!(matches!(result, Err(PreprocessError::Decode(_))), "{name}: {:?}", result.map(|i| i.mode));
    }
    // A decompression bomb is refused from its header, before allocating.
    let big = std::fs::read(dir.path().join("wide_3000x20.jpg")).unwrap();
    assert!(matches!(Image::decode(&big, 10_000), Err(PreprocessError::TooLarge { width: 3000, height: 20, .. })));
}

/// End to end: cn_clip's transform + encode vs ours, on every test image, through one model.
#[test]
fn image_features_match_cn_clip_end_to_end() {
    let config = r#"{"embed_dim": 32, "image_resolution": 224, "vision_layers": 2, "vision_width": 64,
      "vision_patch_size": 32, "vocab_size": 21128, "text_attention_probs_dropout_prob": 0.1,
      "text_hidden_act": "gelu", "text_hidden_dropout_prob": 0.1, "text_hidden_size": 32,
      "text_initializer_range": 0.02, "text_intermediate_size": 64, "text_max_position_embeddings": 52,
      "text_num_attention_heads": 2, "text_num_hidden_layers": 1, "text_type_vocab_size": 2}"#;
    let dir = tempfile::tempdir().unwrap();
    let written = make_images(dir.path());
    let files: Vec<String> = written.keys().map(|n| dir.path().join(n).display().to_string()).collect();
    let checkpoint = dir.path().join("model.pt").display().to_string();
    reference(&["build-model", "--config", config, "--seed", "2", "--perturb", "0.02", "--out", &checkpoint], "");
    let out = dir.path().join("features.safetensors").display().to_string();
    let mut args = vec!["encode", "--config", config, "--checkpoint", &checkpoint, "--out", &out, "--image-files"];
    args.extend(files.iter().map(String::as_str));
    reference(&args, "\"猫\"\n");
    let expected: BTreeMap<String, Tensor> = Tensor::read_safetensors(&out).unwrap().into_iter().collect();

    let (model, _) = cnclip_models::checkpoint::load_clip(
        Path::new(&checkpoint),
        Some(&cnclip_models::ClipConfig::from_json(config).unwrap()),
        tch::Device::Cpu,
    )
    .unwrap();
    let pixels: Vec<Tensor> =
        files.iter().map(|f| cnclip_models::preprocess::preprocess(&std::fs::read(f).unwrap(), 224).unwrap()).collect();
    let pixels = Tensor::stack(&pixels, 0);
    let input_diff = (&pixels - &expected["images"]).abs().max().double_value(&[]);
    let ours = cnclip_models::normalize(&model.encode_image(&pixels).unwrap());
    let theirs = cnclip_models::normalize(&expected["image_features"]);
    let cosines = (&ours * &theirs).sum_dim_intlist(-1, false, None);
    let worst = cosines.min().double_value(&[]);
    println!("normalised pixel max diff {input_diff:.2e}, worst feature cosine {worst:.8}");
    assert!(worst >= 0.9999, "cosines {cosines}");
}
