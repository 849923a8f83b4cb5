//! `random_augment` parity with cn_clip's `--use-augment` transform, i.e. timm 1.0's
//! `create_transform(..., auto_augment='original', interpolation='bicubic')` on Pillow 13, run
//! by the reference harness (`augment-op`, `augment-replay` in `tests/reference/cnclip_ref.py`).
//!
//! - Every op of the 'original' policy, at every magnitude 0–10 and both signs where timm
//!   negates, through timm's own `AugmentOp` (its level functions, `fillcolor`, `resample`), and
//!   timm's op functions with arguments the policy never reaches (90° turns, factors past 2):
//!   exact, geometric ops included (our bicubic affine sampler is Pillow's, in the same f64
//!   steps).
//! - The crop: torchvision's `resized_crop` at fixed boxes, flipped or not, on every format and
//!   Pillow mode `make_images.py` writes: exact (it reuses `preprocess`'s decoders and resizer,
//!   which promise 2/255 but are exact on these images; a drift there shows up here).
//! - The whole transform replayed with Python's `random` seeded as ours: the same crop, flip and
//!   ops drawn (every op of the policy among them), and the same pixels, exactly.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cnclip_operators::decoders::image::{DEFAULT_MAX_PIXELS, Image};
use cnclip_operators::transforms::augment::{
    CropBox, FILL, OpKind, PyRandom, RandomAugment, RgbImage, apply_op, ops, resized_crop,
};
use cnclip_tests::{make_images, python, reference};
use fast_image_resize::Resizer;
use serde_json::{Value, json};

/// Images the AutoAugment ops find interesting beyond `make_images.py`'s: low contrast (so
/// autocontrast stretches), few levels (equalize's steps), flat, and tiny (filter borders).
fn extra_images(dir: &Path) -> Vec<String> {
    let script = r#"
import sys
import numpy as np
from PIL import Image
out = sys.argv[1]
rng = np.random.default_rng(1)
y, x = np.mgrid[0:61, 0:97]
low = np.stack([60 + (x * 80) // 97, 100 + (y * 50) // 61, 90 + rng.integers(0, 40, (61, 97))], -1)
Image.fromarray(low.astype(np.uint8)).save(f"{out}/low_contrast.png")
y, x = np.mgrid[0:224, 0:224]
sq = np.stack([(x + y) % 256, (x * 3) % 256, 128 + 100 * np.sin(x / 20.0) * np.cos(y / 15.0)], -1)
sq = np.clip(sq + rng.normal(0, 8, sq.shape), 0, 255)
Image.fromarray(sq.astype(np.uint8)).save(f"{out}/square_224.png")
levels = rng.choice([0, 40, 41, 200, 255], size=(33, 47, 3))
Image.fromarray(levels.astype(np.uint8)).save(f"{out}/few_levels.png")
Image.new("RGB", (8, 8), (90, 140, 200)).save(f"{out}/flat_8x8.png")
Image.fromarray(rng.integers(0, 256, (3, 3, 3)).astype(np.uint8)).save(f"{out}/tiny_3x3.png")
Image.fromarray(rng.integers(0, 256, (5, 2, 3)).astype(np.uint8)).save(f"{out}/thin_2x5.png")
"#;
    python(script, &[dir.to_str().unwrap()], "");
    ["low_contrast.png", "square_224.png", "few_levels.png", "flat_8x8.png", "tiny_3x3.png", "thin_2x5.png"]
        .map(String::from)
        .to_vec()
}

/// Runs a harness command over `cases` (one JSON line each); returns its JSON lines and the
/// directory of its `N.rgb` outputs.
fn harness(command: &str, resolution: usize, cases: &[Value], out: &Path) -> Vec<Value> {
    let stdin: String = cases.iter().map(|c| c.to_string() + "\n").collect();
    let printed =
        reference(&[command, "--resolution", &resolution.to_string(), "--out", out.to_str().unwrap()], &stdin);
    let lines: Vec<Value> = printed.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), cases.len(), "one line per case");
    lines
}

fn rgb_file(path: &Path, width: usize, height: usize) -> RgbImage {
    RgbImage::new(width, height, std::fs::read(path).unwrap())
}

/// How far apart two images are: the largest difference and how many values differ.
#[derive(Debug, Default, Clone, Copy)]
struct Diff {
    max: u8,
    differing: usize,
    values: usize,
}

impl Diff {
    fn of(ours: &[u8], theirs: &[u8]) -> Diff {
        assert_eq!(ours.len(), theirs.len());
        let mut diff = Diff { values: ours.len(), ..Diff::default() };
        for (a, b) in ours.iter().zip(theirs) {
            let d = a.abs_diff(*b);
            diff.max = diff.max.max(d);
            diff.differing += usize::from(d > 0);
        }
        diff
    }

    fn add(&mut self, other: Diff) {
        self.max = self.max.max(other.max);
        self.differing += other.differing;
        self.values += other.values;
    }
}

fn op_images(dir: &Path) -> Vec<PathBuf> {
    let mut names: Vec<String> =
        ["rgb.png", "odd_7x5.png", "tiny_1x1.png", "palette.png", "gray4.png", "onebit.png"].map(String::from).to_vec();
    names.extend(extra_images(dir));
    names.iter().map(|n| dir.join(n)).collect()
}

/// Every op of the policy at every magnitude and sign, through timm's `AugmentOp`.
#[test]
fn every_policy_op_matches_timm_exactly() {
    let dir = tempfile::tempdir().unwrap();
    make_images(dir.path());
    let images = op_images(dir.path());
    let mut cases = Vec::new();
    for image in &images {
        for kind in OpKind::ALL {
            for magnitude in 0..=10 {
                for negate in if kind.signed() { vec![false, true] } else { vec![false] } {
                    cases.push(
                        json!({"image": image, "op": kind.timm_name(), "magnitude": magnitude, "negate": negate}),
                    );
                }
            }
        }
    }
    let out = dir.path().join("ops");
    let sizes = harness("augment-op", 224, &cases, &out);
    let mut per_op: BTreeMap<&str, Diff> = BTreeMap::new();
    let mut failures = Vec::new();
    for (n, (case, size)) in cases.iter().zip(&sizes).enumerate() {
        let (w, h) = (size["width"].as_u64().unwrap() as usize, size["height"].as_u64().unwrap() as usize);
        let input = rgb_file(&out.join(format!("{n}.in.rgb")), w, h);
        let want = rgb_file(&out.join(format!("{n}.rgb")), w, h);
        let kind = OpKind::from_timm_name(case["op"].as_str().unwrap()).unwrap();
        let ours = apply_op(&input, kind, case["magnitude"].as_f64().unwrap(), case["negate"].as_bool().unwrap());
        let diff = Diff::of(&ours.data, &want.data);
        per_op.entry(kind.timm_name()).or_default().add(diff);
        if diff.max > 0 {
            failures.push(format!("{case}: {diff:?}"));
        }
    }
    let report: Vec<String> = per_op.iter().map(|(op, d)| format!("{op:<18} {d:?}")).collect();
    println!("{} cases on {} images:\n{}", cases.len(), images.len(), report.join("\n"));
    assert_eq!(per_op.len(), OpKind::ALL.len());
    assert!(failures.is_empty(), "{} of {} cases differ:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

/// timm's op functions with arguments past what the policy's magnitudes reach.
#[test]
fn op_functions_match_timm_past_the_policy_range() {
    let dir = tempfile::tempdir().unwrap();
    make_images(dir.path());
    let images = op_images(dir.path());
    type Ours = Box<dyn Fn(&RgbImage) -> RgbImage>;
    let mut calls: Vec<(&str, f64, Ours)> = Vec::new();
    for degrees in [90.0, 180.0, 270.0, -90.0, 45.0, -135.5, 360.0, 0.25, 1e-9] {
        calls.push(("rotate", degrees, Box::new(move |i: &RgbImage| ops::rotate(i, degrees, FILL))));
    }
    for factor in [1.0, -1.0, 0.3, -0.01, 2.5] {
        calls.push(("shear_x", factor, Box::new(move |i: &RgbImage| ops::shear_x(i, factor, FILL))));
    }
    for factor in [0.0, 0.5, 1.0, 1.9, 2.5, -0.5] {
        calls.push(("color", factor, Box::new(move |i: &RgbImage| ops::color(i, factor))));
        calls.push(("contrast", factor, Box::new(move |i: &RgbImage| ops::contrast(i, factor))));
        calls.push(("sharpness", factor, Box::new(move |i: &RgbImage| ops::sharpness(i, factor))));
    }
    for bits in 1..=8u32 {
        let posterize = move |i: &RgbImage| {
            let mut i = i.clone();
            ops::posterize(&mut i, bits);
            i
        };
        calls.push(("posterize", bits as f64, Box::new(posterize)));
    }
    for threshold in [0u32, 1, 128, 255, 256] {
        let solarize = move |i: &RgbImage| {
            let mut i = i.clone();
            ops::solarize(&mut i, threshold);
            i
        };
        calls.push(("solarize", threshold as f64, Box::new(solarize)));
    }
    let mut cases = Vec::new();
    for image in &images {
        for (function, arg, _) in &calls {
            // Integral arguments travel as Python ints (posterize and solarize need them).
            let arg = if ["posterize", "solarize"].contains(function) { json!(*arg as i64) } else { json!(arg) };
            cases.push(json!({"image": image, "function": function, "args": [arg]}));
        }
    }
    let out = dir.path().join("functions");
    let sizes = harness("augment-op", 224, &cases, &out);
    let mut failures = Vec::new();
    for (n, (case, size)) in cases.iter().zip(&sizes).enumerate() {
        let (w, h) = (size["width"].as_u64().unwrap() as usize, size["height"].as_u64().unwrap() as usize);
        let (_, _, ours) = &calls[n % calls.len()];
        let input_size = std::fs::metadata(out.join(format!("{n}.in.rgb"))).unwrap().len() as usize;
        assert_eq!(input_size, w * h * 3, "{case}: a turn of a non-square image keeps its size in Pillow");
        let input = rgb_file(&out.join(format!("{n}.in.rgb")), w, h);
        let want = rgb_file(&out.join(format!("{n}.rgb")), w, h);
        let diff = Diff::of(&ours(&input).data, &want.data);
        if diff.max > 0 {
            failures.push(format!("{case}: {diff:?}"));
        }
    }
    println!("{} function calls on {} images", cases.len(), images.len());
    assert!(failures.is_empty(), "{} of {} calls differ:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

/// The crop boxes tried on a `w × h` image: whole, interior, one pixel, a full-width strip.
fn crop_boxes(w: usize, h: usize) -> Vec<CropBox> {
    let mut boxes = vec![
        CropBox { top: 0, left: 0, height: h, width: w },
        CropBox { top: h / 5, left: w / 7, height: (h - h / 5).max(1) * 9 / 10, width: (w - w / 7).max(1) * 9 / 10 },
        CropBox { top: h - 1, left: w - 1, height: 1, width: 1 },
        CropBox { top: h / 2, left: 0, height: h - h / 2, width: w },
    ];
    boxes.retain(|b| b.width >= 1 && b.height >= 1);
    boxes
}

/// torchvision's `resized_crop` + `hflip` + `convert("RGB")` at fixed boxes, every mode.
#[test]
fn crop_and_flip_match_torchvision_on_every_mode() {
    let dir = tempfile::tempdir().unwrap();
    let written = make_images(dir.path());
    let mut resizer = Resizer::new();
    let resolution = 224;
    let mut cases = Vec::new();
    let mut ours = Vec::new();
    for name in written.keys() {
        let path = dir.path().join(name);
        let image = Image::decode(&std::fs::read(&path).unwrap(), DEFAULT_MAX_PIXELS).unwrap();
        for crop in crop_boxes(image.width, image.height) {
            for flip in [false, true] {
                let box_ = [crop.top, crop.left, crop.height, crop.width];
                cases.push(json!({"image": path, "crop": box_, "flip": flip}));
                ours.push((name.clone(), resized_crop(&image, crop, flip, resolution, &mut resizer).unwrap()));
            }
        }
    }
    let out = dir.path().join("crops");
    harness("augment-op", resolution, &cases, &out);
    let mut per_file: BTreeMap<String, Diff> = BTreeMap::new();
    for (n, (name, ours)) in ours.iter().enumerate() {
        let want = rgb_file(&out.join(format!("{n}.rgb")), resolution, resolution);
        per_file.entry(name.clone()).or_default().add(Diff::of(&ours.data, &want.data));
    }
    let report: Vec<String> = per_file.iter().map(|(f, d)| format!("{f:<26} {d:?}")).collect();
    println!("{} crops:\n{}", cases.len(), report.join("\n"));
    // `preprocess` promises 2/255; on these images its decoders and resizer are exact (as
    // measured), and so is the crop built on them.
    let inexact: Vec<&String> = per_file.iter().filter(|(_, d)| d.max > 0).map(|(f, _)| f).collect();
    assert!(inexact.is_empty(), "crops differ on {inexact:?}:\n{}", report.join("\n"));
}

/// The whole transform, replayed by the harness with Python's `random` seeded as ours.
#[test]
fn whole_augmentation_replays_in_cn_clip_transform() {
    let dir = tempfile::tempdir().unwrap();
    let written = make_images(dir.path());
    let mut names: Vec<String> = written.keys().cloned().collect();
    names.extend(extra_images(dir.path()));
    let resolution = 224;
    let seed = 20240607u64;
    let augment = RandomAugment { resolution, seed, max_pixels: DEFAULT_MAX_PIXELS };
    let mut resizer = Resizer::new();
    let (mut cases, mut ours) = (Vec::new(), Vec::new());
    for (i, name) in names.iter().enumerate() {
        let path = dir.path().join(name);
        let bytes = std::fs::read(&path).unwrap();
        for k in 0..8i64 {
            // Keys of all sizes, negative ones too (their u64 bits seed the generator).
            let key = match k {
                0 => -1 - i as i64,
                1 => i64::MAX - i as i64,
                _ => k * 1_000_003 + i as i64,
            };
            cases.push(json!({"image": path, "seed": seed, "key": key}));
            ours.push((name.clone(), augment.augment(&bytes, key, &mut resizer).unwrap()));
        }
    }
    let out = dir.path().join("replay");
    let drawn = harness("augment-replay", resolution, &cases, &out);
    let mut per_file: BTreeMap<String, Diff> = BTreeMap::new();
    let mut ops_seen = std::collections::BTreeSet::new();
    for (n, ((name, (rgb, trace)), theirs)) in ours.iter().zip(&drawn).enumerate() {
        let c = trace.crop;
        assert_eq!(theirs["crop"], json!([c.top, c.left, c.height, c.width]), "{}: crop drawn", cases[n]);
        assert_eq!(theirs["flip"], json!(trace.flip), "{}: flip drawn", cases[n]);
        ops_seen.extend(trace.applied.iter().map(|(kind, _)| kind.timm_name()));
        let want = rgb_file(&out.join(format!("{n}.rgb")), resolution, resolution);
        per_file.entry(name.clone()).or_default().add(Diff::of(&rgb.data, &want.data));
    }
    let report: Vec<String> = per_file.iter().map(|(f, d)| format!("{f:<26} {d:?}")).collect();
    println!("{} rows, ops drawn {ops_seen:?}:\n{}", cases.len(), report.join("\n"));
    assert_eq!(ops_seen.len(), OpKind::ALL.len(), "the rows should exercise every op: {ops_seen:?}");
    // Decode, crop and ops are exact, so whole rows are, on every format and mode.
    let inexact: Vec<&String> = per_file.iter().filter(|(_, d)| d.max > 0).map(|(f, _)| f).collect();
    assert!(inexact.is_empty(), "rows differ on {inexact:?}:\n{}", report.join("\n"));
}

/// The generator itself, against CPython's, for row keys the transform uses.
#[test]
fn row_generator_is_cpythons_random() {
    let keys = [(0u64, 0i64), (1, 0), (0, 1), (20240607, -5), (u64::MAX, i64::MAX)];
    let script = r#"
import json, random, struct, sys
bits = lambda x: struct.unpack("<Q", struct.pack("<d", x))[0]  # floats travel as their bits
for seed, key in json.loads(sys.stdin.read()):
    r = random.Random((seed << 64) | (key & (2**64 - 1)))
    print(json.dumps([bits(r.random()), r.randint(0, 1000), r.randint(0, 6), r.getrandbits(40), bits(r.uniform(0.9, 1.0))]))
"#;
    let out = python(script, &[], &serde_json::to_string(&keys).unwrap());
    for ((seed, key), line) in keys.iter().zip(out.lines()) {
        let want: Value = serde_json::from_str(line).unwrap();
        let mut r = PyRandom::for_row(*seed, *key);
        let ours = json!([
            r.random().to_bits(),
            r.randint(0, 1000),
            r.randint(0, 6),
            r.getrandbits(40),
            r.uniform(0.9, 1.0).to_bits()
        ]);
        assert_eq!(ours, want, "seed {seed}, key {key}");
    }
}
