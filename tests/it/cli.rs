//! End-to-end tests of the `cnclip` binary's data commands: tokenize, similarity, synth, import,
//! run, the hand-over of model pipelines to `cnclip-torch`.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use cnclip_tests::{corpus, reference_token_ids};

fn cnclip(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(cnclip_tests::cnclip_bin())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cnclip starts");
    let mut pipe = child.stdin.take().unwrap();
    let input = stdin.to_vec();
    let writer = std::thread::spawn(move || pipe.write_all(&input));
    let output = child.wait_with_output().unwrap();
    // A failing cnclip may stop reading before the end: a broken pipe here is fine.
    let _ = writer.join().unwrap();
    output
}

/// The CLI reads lines, so texts without line breaks go through it; the ids must equal cn_clip's.
#[test]
fn tokenize_matches_cn_clip() {
    let texts: Vec<String> = corpus::texts(400, 3).into_iter().map(|t| t.replace(['\n', '\r'], " ")).collect();
    let expected = reference_token_ids(&texts, 24);
    let output = cnclip(&["tokenize", "--context-length", "24"], (texts.join("\n") + "\n").as_bytes());
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let got: Vec<Vec<i64>> =
        String::from_utf8(output.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(got.len(), expected.len(), "one output line per input line");
    for ((text, got), want) in texts.iter().zip(&got).zip(&expected) {
        assert_eq!(got, want, "text {text:?}");
    }
}

#[test]
fn tokenize_accepts_crlf_and_a_last_line_without_newline() {
    let output = cnclip(&["tokenize", "--context-length", "6"], "皮卡丘\r\n皮卡丘".as_bytes());
    assert!(output.status.success());
    assert_eq!(String::from_utf8(output.stdout).unwrap(), "[101, 4649, 1305, 687, 102, 0]\n".repeat(2));
}

#[test]
fn tokenize_names_the_line_that_is_not_utf8() {
    let output = cnclip(&["tokenize"], b"ok\n\xff\xfe bad\n");
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("stdin line 2 is not valid UTF-8"), "{stderr}");
}

#[test]
fn tokenize_rejects_a_context_too_small_for_cls_and_sep() {
    let output = cnclip(&["tokenize", "--context-length", "1"], b"cat\n");
    assert!(!output.status.success());
    assert!(String::from_utf8(output.stderr).unwrap().contains("context length 1 is too small"));
}

/// `cnclip similarity --json` against cn_clip's README quick start (load, image_transform,
/// tokenize, get_similarity, softmax) on the same checkpoint and image files.
#[test]
fn similarity_matches_cn_clip_quick_start() {
    let config = r#"{"embed_dim": 32, "image_resolution": 64, "vision_layers": 2, "vision_width": 64,
      "vision_patch_size": 16, "vocab_size": 21128, "text_attention_probs_dropout_prob": 0.1,
      "text_hidden_act": "gelu", "text_hidden_dropout_prob": 0.1, "text_hidden_size": 64,
      "text_initializer_range": 0.02, "text_intermediate_size": 128, "text_max_position_embeddings": 64,
      "text_num_attention_heads": 2, "text_num_hidden_layers": 2, "text_type_vocab_size": 2}"#;
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).display().to_string();
    let (checkpoint, config_file) = (path("model.pt"), path("config.json"));
    std::fs::write(&config_file, config).unwrap();
    cnclip_tests::reference(
        &["build-model", "--config", config, "--seed", "4", "--perturb", "0.05", "--out", &checkpoint],
        "",
    );
    let script = r#"
import sys, numpy as np
from PIL import Image
rng = np.random.default_rng(0)
Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(sys.argv[1], quality=90)
Image.fromarray(rng.integers(0, 255, (50, 40, 4), dtype=np.uint8), "RGBA").save(sys.argv[2])
"#;
    let (jpg, png) = (path("a.jpg"), path("b.png"));
    cnclip_tests::python(script, &[&jpg, &png], "");
    let texts = ["杰尼龟", "妙蛙种子", "小火龙", "皮卡丘"];

    let mut args = vec![
        "similarity",
        "--resume",
        &checkpoint,
        "--model-config",
        &config_file,
        "--json",
        "--image",
        &jpg,
        &png,
        "--text",
    ];
    args.extend(texts);
    let output = cnclip(&args, b"");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let ours: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();

    let quick_start = r#"
import json, sys, torch
from PIL import Image
from cn_clip.clip import tokenize
from cn_clip.clip.model import CLIP
from cn_clip.clip.utils import image_transform
info = json.loads(sys.argv[1])
model = CLIP(**info)
sd = torch.load(sys.argv[2], map_location="cpu", weights_only=True)["state_dict"]
model.load_state_dict({k[len("module."):]: v for k, v in sd.items()})
model = model.float().eval()
preprocess = image_transform(info["image_resolution"])
image = torch.stack([preprocess(Image.open(p)) for p in sys.argv[3:5]])
text = tokenize(sys.argv[5:])
with torch.no_grad():
    image_features = model.encode_image(image)
    text_features = model.encode_text(text)
    image_features /= image_features.norm(dim=-1, keepdim=True)
    text_features /= text_features.norm(dim=-1, keepdim=True)
    logits_per_image, logits_per_text = model.get_similarity(image, text)
    probs = logits_per_image.softmax(dim=-1)
print(json.dumps({"image_features": image_features.tolist(), "text_features": text_features.tolist(),
                  "logits_per_image": logits_per_image.tolist(), "probs": probs.tolist()}))
"#;
    let mut py_args = vec![config, &checkpoint, &jpg, &png];
    py_args.extend(texts);
    let theirs: serde_json::Value = serde_json::from_str(&cnclip_tests::python(quick_start, &py_args, "")).unwrap();
    for key in ["image_features", "text_features", "logits_per_image", "probs"] {
        let flat = |v: &serde_json::Value| -> Vec<f64> {
            v.as_array()
                .unwrap()
                .iter()
                .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()))
                .collect()
        };
        let (a, b) = (flat(&ours[key]), flat(&theirs[key]));
        assert_eq!(a.len(), b.len(), "{key}");
        let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
        // Features 1e-4 (as the model parity tests); logits carry exp(logit_scale) ≈ 14.3.
        let tolerance = if key == "logits_per_image" { 1.5e-3 } else { 1e-4 };
        assert!(worst < tolerance, "{key} differs by {worst}");
    }
}

/// `cnclip synth` is deterministic, and cn_clip's own `build_lmdb_dataset.py` and zero-shot
/// layout accept what it writes.
#[test]
fn synth_is_deterministic_and_cn_clip_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, seed: &str| {
        let out = dir.path().join(name);
        let output = cnclip(
            &[
                "synth",
                "--out",
                out.to_str().unwrap(),
                "--train",
                "40",
                "--valid",
                "8",
                "--test",
                "8",
                "--zeroshot-per-class",
                "2",
                "--seed",
                seed,
            ],
            b"",
        );
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        out
    };
    let (a, b, c) = (run("a", "3"), run("b", "3"), run("c", "4"));
    let read = |dir: &std::path::Path, f: &str| std::fs::read(dir.join(f)).unwrap();
    assert_eq!(read(&a, "train_imgs.tsv"), read(&b, "train_imgs.tsv"));
    assert_eq!(read(&a, "train_texts.jsonl"), read(&b, "train_texts.jsonl"));
    assert_ne!(read(&a, "train_imgs.tsv"), read(&c, "train_imgs.tsv"));

    let script = r#"
import base64, io, json, os, subprocess, sys
from PIL import Image
data = sys.argv[1]
subprocess.run([sys.executable, "-m", "cn_clip.preprocess.build_lmdb_dataset", "--data_dir", data, "--splits", "train,valid,test"],
               check=True, capture_output=True)
texts = [json.loads(l) for l in open(f"{data}/train_texts.jsonl", encoding="utf-8")]
first = open(f"{data}/train_imgs.tsv").readline().split("\t")
image = Image.open(io.BytesIO(base64.urlsafe_b64decode(first[1])))
labels = open(f"{data}/zeroshot/label_cn.txt", encoding="utf-8").read().split()
classes = sorted(os.listdir(f"{data}/zeroshot/test"))
print(json.dumps({"texts": len(texts), "keys": list(texts[0]), "size": image.size, "labels": len(labels),
                  "classes": classes == [f"{i:03}" for i in range(len(labels))],
                  "lmdb": sorted(os.listdir(f"{data}/lmdb"))}))
"#;
    let report: serde_json::Value =
        serde_json::from_str(&cnclip_tests::python(script, &[a.to_str().unwrap()], "")).unwrap();
    assert_eq!(
        report,
        serde_json::json!({"texts": 40, "keys": ["text_id", "text", "image_ids"], "size": [96, 96], "labels": 18,
                           "classes": true, "lmdb": ["test", "train", "valid"]})
    );
}

/// `cnclip import` writes Parquet tables pyarrow reads back as the TSV/JSONL said, with bad
/// lines quarantined.
#[test]
fn import_writes_parquet_tables_pyarrow_reads() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let output = cnclip(
        &[
            "synth",
            "--out",
            data.to_str().unwrap(),
            "--train",
            "30",
            "--valid",
            "0",
            "--test",
            "0",
            "--zeroshot-per-class",
            "1",
        ],
        b"",
    );
    assert!(output.status.success());
    {
        use std::io::Write;
        let mut tsv = std::fs::OpenOptions::new().append(true).open(data.join("train_imgs.tsv")).unwrap();
        writeln!(tsv, "77\tnot*base64").unwrap();
    }
    let out = dir.path().join("tables");
    let output = cnclip(
        &["import", "--data-dir", data.to_str().unwrap(), "--splits", "train", "--out", out.to_str().unwrap()],
        b"",
    );
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stderr).contains("30 images, 30 texts, 1 quarantined"));
    let script = r#"
import base64, json, sys, pyarrow.parquet as pq
data, out = sys.argv[1], sys.argv[2]
images = pq.read_table(f"{out}/train_images.parquet").to_pydict()
texts = pq.read_table(f"{out}/train_texts.parquet").to_pydict()
tsv = {}
for line in open(f"{data}/train_imgs.tsv"):
    i, b = line.rstrip("\n").split("\t")
    if i != "77":
        tsv[int(i)] = base64.urlsafe_b64decode(b)
jsonl = [json.loads(l) for l in open(f"{data}/train_texts.jsonl", encoding="utf-8")]
ok_images = dict(zip(images["image_id"], images["image"])) == tsv
ok_texts = [(t["text_id"], t["text"], t["image_ids"]) for t in jsonl] == list(zip(texts["text_id"], texts["text"], texts["image_ids"]))
quarantine = [json.loads(l) for l in open(f"{out}/train_quarantine.jsonl")]
print(json.dumps({"images": ok_images, "texts": ok_texts, "quarantine": [q["location"] for q in quarantine]}))
"#;
    let report: serde_json::Value =
        serde_json::from_str(&cnclip_tests::python(script, &[data.to_str().unwrap(), out.to_str().unwrap()], ""))
            .unwrap();
    assert_eq!(report, serde_json::json!({"images": true, "texts": true, "quarantine": ["line 31"]}));
}

/// `cnclip run` hands a pipeline with a kind it does not know (an encoder) to `cnclip-torch`
/// beside it, with the same arguments; pipelines of built-in kinds it runs itself; without a
/// `cnclip-torch` it reports the unknown kind. A stand-in `cnclip-torch` records what it got.
#[test]
fn run_hands_pipelines_with_model_kinds_to_cnclip_torch() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::fs::copy(cnclip_tests::cnclip_bin(), bin.join("cnclip")).unwrap();
    let model_kind = dir.path().join("encode.toml");
    std::fs::write(
        &model_kind,
        "[nodes.texts]\nkind = \"jsonl\"\npaths = [\"t.jsonl\"]\n[nodes.features]\nkind = \"encode_text\"\ninput = \"texts\"\n",
    )
    .unwrap();
    let builtin = dir.path().join("tokens.toml");
    std::fs::write(&builtin, "[nodes.texts]\nkind = \"jsonl\"\npaths = [\"missing.jsonl\"]\n").unwrap();
    let run = |pipeline: &std::path::Path| {
        Command::new(bin.join("cnclip")).args(["run", pipeline.to_str().unwrap(), "--threads", "1"]).output().unwrap()
    };

    // No cnclip-torch: the unknown kind is reported with the kinds cnclip knows.
    let alone = run(&model_kind);
    let stderr = String::from_utf8_lossy(&alone.stderr);
    assert!(!alone.status.success());
    assert!(stderr.contains("node `features`: unknown kind `encode_text` (sources: tsv, jsonl"), "{stderr}");

    let record = dir.path().join("torch-args");
    let torch = bin.join("cnclip-torch");
    std::fs::write(&torch, format!("#!/bin/sh\nprintf '%s\\n' \"$@\" > '{}'\n", record.display())).unwrap();
    std::fs::set_permissions(&torch, std::fs::Permissions::from_mode(0o755)).unwrap();
    let handed = run(&model_kind);
    assert!(handed.status.success(), "{}", String::from_utf8_lossy(&handed.stderr));
    let got = std::fs::read_to_string(&record).unwrap();
    assert_eq!(got.lines().collect::<Vec<_>>(), ["run", model_kind.to_str().unwrap(), "--threads", "1"]);

    // Built-in kinds only: cnclip validates and runs it itself (here: the missing input file).
    std::fs::remove_file(&record).unwrap();
    let own = run(&builtin);
    let stderr = String::from_utf8_lossy(&own.stderr);
    assert!(stderr.contains("missing.jsonl") && stderr.contains("does not exist"), "{stderr}");
    assert!(!record.exists(), "a pipeline of built-in kinds went to cnclip-torch");
}

/// `cnclip-torch run` is a full `cnclip run`: the same pipeline gives the same bytes.
#[test]
fn cnclip_torch_runs_pipelines_like_cnclip() {
    let dir = tempfile::tempdir().unwrap();
    let texts: Vec<String> = corpus::texts(50, 7)
        .into_iter()
        .enumerate()
        .map(|(i, t)| serde_json::json!({"text_id": i, "text": t, "image_ids": [i]}).to_string())
        .collect();
    std::fs::write(dir.path().join("texts.jsonl"), texts.join("\n") + "\n").unwrap();
    let mut outputs = Vec::new();
    for (binary, name) in [(cnclip_tests::cnclip_bin(), "a"), (cnclip_tests::cnclip_torch_bin(), "b")] {
        let pipeline = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &pipeline,
            format!(
                "[job]\nquarantine = \"{name}.quarantine.jsonl\"\n[nodes.texts]\nkind = \"jsonl\"\npaths = [\"texts.jsonl\"]\n\
                 [nodes.tokens]\nkind = \"tokenize\"\ninput = \"texts\"\n[nodes.out]\nkind = \"write_jsonl\"\n\
                 input = \"tokens\"\npath = \"{name}.jsonl\"\n"
            ),
        )
        .unwrap();
        let output = Command::new(&binary).args(["run", pipeline.to_str().unwrap()]).output().unwrap();
        assert!(output.status.success(), "{}: {}", binary.display(), String::from_utf8_lossy(&output.stderr));
        outputs.push(std::fs::read(dir.path().join(format!("{name}.jsonl"))).unwrap());
    }
    assert_eq!(String::from_utf8_lossy(&outputs[0]).lines().count(), 50);
    assert_eq!(outputs[0], outputs[1]);
}

/// `cnclip run --kinds` lists every registered kind with its role and keys.
#[test]
fn run_lists_the_registered_kinds() {
    let output = cnclip(&["run", "--kinds"], b"");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let listing = String::from_utf8(output.stdout).unwrap();
    let kinds: Vec<(&str, &str)> = listing
        .lines()
        .map(|l| {
            let mut words = l.split_whitespace();
            (words.next().unwrap(), words.next().unwrap())
        })
        .collect();
    assert_eq!(kinds.len(), 22, "{listing}");
    assert!(kinds.contains(&("tsv", "source")) && kinds.contains(&("preprocess", "transform")), "{listing}");
    for kind in [
        ("feature_jsonl", "source"),
        ("webdataset", "source"),
        ("train_shards", "source"),
        ("discard", "sink"),
        ("write_webdataset", "sink"),
        ("lmdb_train", "source"),
        ("random_augment", "transform"),
        ("require_images", "transform"),
        ("exclude_ids", "transform"),
        ("write_parts", "sink"),
    ] {
        assert!(kinds.contains(&kind), "{kind:?} missing from {listing}");
    }
    assert!(listing.lines().any(|l| l.starts_with("write_lmdb") && l.contains("`writer` = bulk | txn")), "{listing}");
}

/// `--splits` must name a split, and every split is checked before any is written.
#[test]
fn splits_are_all_checked_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let demo = dir.path().join("demo");
    let d = demo.to_str().unwrap();
    let synth = cnclip(&["synth", "--out", d, "--train", "5", "--valid", "2", "--test", "2"], b"");
    assert!(synth.status.success(), "{}", String::from_utf8_lossy(&synth.stderr));
    let out = dir.path().join("out");
    let o = out.to_str().unwrap();
    let lmdb = dir.path().join("lmdb");
    let l = lmdb.to_str().unwrap();
    for args in [
        vec!["import", "--data-dir", d, "--splits", "", "--out", o],
        vec!["import", "--data-dir", d, "--splits", " , ", "--out", o],
        vec!["build-lmdb", "--data-dir", d, "--splits", "", "--lmdb-dir", l],
    ] {
        let output = cnclip(&args, b"");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success() && stderr.contains("--splits names no split"), "{args:?}: {stderr}");
    }
    for args in [
        vec!["import", "--data-dir", d, "--splits", "train,nosuch", "--out", o],
        vec!["build-lmdb", "--data-dir", d, "--splits", "train,nosuch", "--lmdb-dir", l],
    ] {
        let output = cnclip(&args, b"");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} succeeded");
        assert!(stderr.contains("split `nosuch`") && stderr.contains("nosuch_imgs.tsv"), "{args:?}: {stderr}");
    }
    assert!(!out.exists() || std::fs::read_dir(&out).unwrap().next().is_none(), "import wrote train first");
    assert!(!lmdb.exists() || std::fs::read_dir(&lmdb).unwrap().next().is_none(), "build-lmdb wrote train first");
}
