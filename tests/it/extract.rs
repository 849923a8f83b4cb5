//! The encoders as pipeline nodes (issue #11, item 1): `encode_image` and `encode_text` in a
//! `cnclip run` pipeline give the features cn_clip's own `extract_features.py` gives (through
//! the CPU shim) for every image of an LMDB and every text of a JSONL, on a full-size RN50 with
//! RBT3 (random weights, perturbed); two replicas (`devices = "cpu,cpu"`) give the same table
//! as one; pyarrow reads the tables with their contract and metadata.

use std::path::Path;
use std::process::Command;

use cnclip_tests::{python, reference};

/// Tolerance on each feature component (unit vectors): float32 on both sides, different kernels.
const TOLERANCE: f64 = 1e-4;

fn cnclip(dir: &Path, args: &[&str]) -> String {
    let output = Command::new(cnclip_tests::cnclip_bin()).args(args).current_dir(dir).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "cnclip {args:?} failed:\n{stderr}");
    stderr
}

fn pipeline(devices: &str, tag: &str) -> String {
    format!(
        "[job]\nquarantine = \"q_{tag}.jsonl\"\n\
         [nodes.imgs]\nkind = \"lmdb\"\npath = \"lmdb/valid\"\ndatabase = \"imgs\"\n\
         [nodes.decoded]\nkind = \"decode_base64\"\ninput = \"imgs\"\n\
         [nodes.pixels]\nkind = \"preprocess\"\ninput = \"decoded\"\nresolution = 224\n\
         [nodes.image_features]\nkind = \"encode_image\"\ninput = \"pixels\"\ncheckpoint = \"rn50.pt\"\n\
         vision_model = \"RN50\"\ntext_model = \"RBT3-chinese\"\nbatch_size = 3\ndevices = \"{devices}\"\n\
         [nodes.images_out]\nkind = \"write_parquet\"\ninput = \"image_features\"\npath = \"img_{tag}.parquet\"\n\
         [nodes.texts]\nkind = \"jsonl\"\npaths = [\"data/valid_texts.jsonl\"]\n\
         [nodes.tokens]\nkind = \"tokenize\"\ninput = \"texts\"\ncontext_length = 52\npreprocess = true\n\
         [nodes.text_features]\nkind = \"encode_text\"\ninput = \"tokens\"\ncheckpoint = \"rn50.pt\"\n\
         vision_model = \"RN50\"\ntext_model = \"RBT3-chinese\"\nbatch_size = 4\ndevices = \"{devices}\"\n\
         [nodes.texts_out]\nkind = \"write_parquet\"\ninput = \"text_features\"\npath = \"txt_{tag}.parquet\"\n"
    )
}

/// A feature table as pyarrow reads it: schema, metadata and rows.
const READ_TABLE: &str = r#"
import json, sys, pyarrow.parquet as pq
table = pq.read_table(sys.argv[1])
meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items() if k.decode().startswith("cnclip.")}
print(json.dumps({
    "schema": [f"{f.name}: {f.type}" for f in table.schema],
    "meta": meta,
    "ids": table.column("id").to_pylist(),
    "features": table.column("feature").to_pylist(),
}))
"#;

fn read_table(path: &Path) -> serde_json::Value {
    serde_json::from_str(&python(READ_TABLE, &[path.to_str().unwrap()], "")).unwrap()
}

/// cn_clip's feature JSON lines: id → feature.
fn read_jsonl(path: &Path, id: &str) -> std::collections::BTreeMap<i64, Vec<f64>> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let feature = v["feature"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
            (v[id].as_i64().unwrap(), feature)
        })
        .collect()
}

fn compare(ours: &serde_json::Value, theirs: &std::collections::BTreeMap<i64, Vec<f64>>, what: &str) {
    let ids: Vec<i64> = ours["ids"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, theirs.keys().copied().collect::<Vec<_>>(), "{what}: id sets differ");
    let mut worst = 0f64;
    for (id, feature) in ids.iter().zip(ours["features"].as_array().unwrap()) {
        let feature: Vec<f64> = feature.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        let reference = &theirs[id];
        assert_eq!(feature.len(), reference.len(), "{what} {id}: dimension");
        for (a, b) in feature.iter().zip(reference) {
            worst = worst.max((a - b).abs());
        }
    }
    assert!(worst <= TOLERANCE, "{what}: largest difference {worst:e} > {TOLERANCE:e}");
}

#[test]
fn encoder_nodes_match_cn_clip_extract_features_with_one_or_two_replicas() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let data = crate::lmdb::corpus(root, 10);
    cnclip(root, &["build-lmdb", "--data-dir", &data, "--splits", "valid", "--lmdb-dir", "lmdb"]);
    let checkpoint = root.join("rn50.pt");
    let config = "RN50@RBT3-chinese";
    reference(
        &["build-model", "--config", config, "--seed", "3", "--perturb", "0.01", "--out", checkpoint.to_str().unwrap()],
        "",
    );

    // cn_clip's script, through the CPU shim.
    let (ref_img, ref_txt) = (root.join("ref_img.jsonl"), root.join("ref_txt.jsonl"));
    let s = |p: &Path| p.to_str().unwrap().to_string();
    reference(
        &[
            "run-module",
            "cn_clip.eval.extract_features",
            "--extract-image-feats",
            "--extract-text-feats",
            "--image-data",
            &s(&root.join("lmdb/valid/imgs")),
            "--text-data",
            &s(&root.join("data/valid_texts.jsonl")),
            "--image-feat-output-path",
            &s(&ref_img),
            "--text-feat-output-path",
            &s(&ref_txt),
            "--img-batch-size",
            "4",
            "--text-batch-size",
            "4",
            "--resume",
            &s(&checkpoint),
            "--precision",
            "fp32",
            "--vision-model",
            "RN50",
            "--text-model",
            "RBT3-chinese",
        ],
        "",
    );
    let (theirs_img, theirs_txt) = (read_jsonl(&ref_img, "image_id"), read_jsonl(&ref_txt, "text_id"));
    assert_eq!((theirs_img.len(), theirs_txt.len()), (10, 5));

    for (devices, tag) in [("cpu", "one"), ("cpu,cpu", "two")] {
        let file = root.join(format!("p_{tag}.toml"));
        std::fs::write(&file, pipeline(devices, tag)).unwrap();
        cnclip(root, &["run", file.to_str().unwrap()]);
    }
    let (img_one, txt_one) = (read_table(&root.join("img_one.parquet")), read_table(&root.join("txt_one.parquet")));
    compare(&img_one, &theirs_img, "image features");
    compare(&txt_one, &theirs_txt, "text features");
    // Two replicas: the same table, row for row and bit for bit.
    assert!(read_table(&root.join("img_two.parquet")) == img_one, "two replicas changed the image table");
    assert!(read_table(&root.join("txt_two.parquet")) == txt_one, "two replicas changed the text table");

    // The contract and the metadata, as pyarrow sees them.
    assert_eq!(
        img_one["schema"],
        serde_json::json!(["id: int64", "feature: fixed_size_list<item: float not null>[1024]"])
    );
    let meta = &img_one["meta"];
    assert_eq!(meta["cnclip.model"], config);
    assert_eq!(meta["cnclip.checkpoint"], "rn50.pt");
    assert_eq!(meta["cnclip.precision"], "fp32");
    assert_eq!(meta["cnclip.normalized"], "true");
    assert_eq!(meta["cnclip.dim"], "1024");
    let sha = python(
        "import hashlib, sys\nprint(hashlib.sha256(open(sys.argv[1], 'rb').read()).hexdigest())",
        &[checkpoint.to_str().unwrap()],
        "",
    );
    assert_eq!(meta["cnclip.checkpoint_sha256"], sha.trim());
    assert_eq!(txt_one["meta"]["cnclip.checkpoint_sha256"], sha.trim());
    // Issue #24 item 9: readers that do not decode the Arrow schema (duckdb) see the same keys,
    // as Parquet key-value metadata.
    let kv = python(
        "import duckdb, json, sys\n\
         rows = duckdb.sql(\"SELECT decode(key), decode(value) FROM parquet_kv_metadata(?)\", params=[sys.argv[1]])\n\
         print(json.dumps(dict(rows.fetchall())))",
        &[root.join("img_one.parquet").to_str().unwrap()],
        "",
    );
    let kv: serde_json::Value = serde_json::from_str(&kv).unwrap();
    let keys = ["model", "checkpoint", "checkpoint_sha256", "precision", "normalized", "dim"];
    for key in keys.map(|k| format!("cnclip.{k}")) {
        assert_eq!(kv[&key], meta[&key], "duckdb's parquet_kv_metadata: {key} in {kv}");
    }

    // `extract-features` with cn_clip's flags: its JSON lines, the same ids in the same order.
    let extract = |out: &str, extra: &[&str]| {
        let mut command = Command::new(cnclip_tests::cnclip_bin());
        command.current_dir(root).args([
            "extract-features",
            "--extract-image-feats",
            "--extract-text-feats",
            "--image-data",
            "lmdb/valid/imgs",
            "--text-data",
            "data/valid_texts.jsonl",
            "--image-feat-output-path",
            &format!("{out}_img.jsonl"),
            "--text-feat-output-path",
            &format!("{out}_txt.jsonl"),
            "--img-batch-size",
            "2",
            "--resume",
            "rn50.pt",
            "--vision-model",
            "RN50",
            "--text-model",
            "RBT3-chinese",
        ]);
        command.args(extra);
        command
    };
    let output = extract("ours", &[]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let lines = |path: &str| std::fs::read_to_string(root.join(path)).unwrap();
    let key_order = |text: &str, id: &str| {
        text.lines().all(|l| l.starts_with(&format!("{{\"{id}\": ")) && l.contains(", \"feature\": ["))
    };
    assert!(key_order(&lines("ours_img.jsonl"), "image_id") && key_order(&lines("ours_txt.jsonl"), "text_id"));
    let order = |text: &str, id: &str| -> Vec<i64> {
        text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()[id].as_i64().unwrap()).collect()
    };
    assert_eq!(
        order(&lines("ours_img.jsonl"), "image_id"),
        order(&std::fs::read_to_string(&ref_img).unwrap(), "image_id")
    );
    assert_eq!(
        order(&lines("ours_txt.jsonl"), "text_id"),
        order(&std::fs::read_to_string(&ref_txt).unwrap(), "text_id")
    );
    let as_table = |map: std::collections::BTreeMap<i64, Vec<f64>>| serde_json::json!({"ids": map.keys().collect::<Vec<_>>(), "features": map.values().collect::<Vec<_>>()});
    compare(&as_table(read_jsonl(&root.join("ours_img.jsonl"), "image_id")), &theirs_img, "extract-features images");
    compare(&as_table(read_jsonl(&root.join("ours_txt.jsonl"), "text_id")), &theirs_txt, "extract-features texts");

    // cn_clip's make_topk_predictions.py takes our files.
    reference(
        &[
            "run-module",
            "cn_clip.eval.make_topk_predictions",
            "--image-feats",
            &s(&root.join("ours_img.jsonl")),
            "--text-feats",
            &s(&root.join("ours_txt.jsonl")),
            "--top-k",
            "3",
            "--eval-batch-size",
            "4",
            "--output",
            &s(&root.join("predictions.jsonl")),
        ],
        "",
    );
    assert_eq!(lines("predictions.jsonl").lines().count(), 5);

    // Killed (SIGKILL) once a part is written, then rerun: the same files, byte for byte.
    let mut child = extract("resumed", &["--part-rows", "2"]).stderr(std::process::Stdio::null()).spawn().unwrap();
    let manifest = root.join("resumed_img.jsonl.cnclip-parts/manifest.json");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !manifest.exists() {
        assert!(std::time::Instant::now() < deadline, "no part was written");
        assert!(child.try_wait().unwrap().is_none(), "the extraction ended before a part was written");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!root.join("resumed_img.jsonl").exists(), "a killed run left an output");
    let output = extract("resumed", &["--part-rows", "2"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("resuming after"), "{stderr}");
    assert!(lines("resumed_img.jsonl") == lines("ours_img.jsonl"), "the resumed image features differ");
    assert!(lines("resumed_txt.jsonl") == lines("ours_txt.jsonl"), "the resumed text features differ");
    assert!(!root.join("resumed_img.jsonl.cnclip-parts").exists(), "the parts were left behind");
}

/// Encoder nodes are checked with the rest of the file: an input without the column, pixels at
/// the wrong resolution, a missing checkpoint, an unknown device — all reported at once.
#[test]
fn encoder_node_problems_are_reported_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::write(root.join("t.jsonl"), "{\"text_id\": 1, \"text\": \"猫\", \"image_ids\": []}\n").unwrap();
    std::fs::write(root.join("i.tsv"), "1\taGk=\n").unwrap();
    std::fs::write(
        root.join("p.toml"),
        "[nodes.texts]\nkind = \"jsonl\"\npaths = [\"t.jsonl\"]\n\
         [nodes.enc]\nkind = \"encode_image\"\ninput = \"texts\"\ncheckpoint = \"nope.pt\"\ndevices = \"cpu,tpu\"\n\
         [nodes.out]\nkind = \"write_parquet\"\ninput = \"enc\"\npath = \"o.parquet\"\n",
    )
    .unwrap();
    let output = Command::new(cnclip_tests::cnclip_bin()).args(["run", "p.toml"]).current_dir(root).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("unknown device `tpu`"), "{stderr}");
    assert!(stderr.contains("nope.pt does not exist"), "{stderr}");
}

/// A cn_clip `.pt` of another size (what `train --model-config` saves, which records no
/// architecture) is read by `extract-features --model-config` naming it, as by `train` and
/// `convert` (one `ModelArgs` for the towers' flags, issue #24 item 1). Its features are those
/// of the same weights converted to a cnclip checkpoint, which carries its architecture.
/// Without the flag the `.pt` is taken for cn_clip's default ViT-B-16 and refused.
#[test]
fn extract_features_reads_a_cn_clip_pt_of_another_size_with_model_config() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    cnclip(root, &["synth", "--out", "demo", "--train", "2", "--valid", "6", "--test", "2"]);
    std::fs::write(root.join("tiny.json"), crate::smoke::TINY_VIT_BERT).unwrap();
    let pt = root.join("tiny.pt");
    reference(
        &["build-model", "--config", crate::smoke::TINY_VIT_BERT, "--seed", "4", "--out", pt.to_str().unwrap()],
        "",
    );
    cnclip(root, &["convert", "--input", "tiny.pt", "--output", "tiny.safetensors", "--model-config", "tiny.json"]);
    let extract = |tag: &str, checkpoint: &str, extra: &[&str]| {
        let (img, txt) = (format!("img_{tag}.jsonl"), format!("txt_{tag}.jsonl"));
        let mut args = vec![
            "extract-features",
            "--extract-image-feats",
            "--extract-text-feats",
            "--image-data",
            "demo/valid_imgs.tsv",
            "--text-data",
            "demo/valid_texts.jsonl",
            "--image-feat-output-path",
            &img,
            "--text-feat-output-path",
            &txt,
            "--resume",
            checkpoint,
            "--precision",
            "fp32",
        ];
        args.extend_from_slice(extra);
        Command::new(cnclip_tests::cnclip_bin()).args(&args).current_dir(root).output().unwrap()
    };
    let run = extract("pt", "tiny.pt", &["--model-config", "tiny.json"]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let run = extract("st", "tiny.safetensors", &[]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    for (file, id) in [("img", "image_id"), ("txt", "text_id")] {
        let from_pt = read_jsonl(&root.join(format!("{file}_pt.jsonl")), id);
        let from_safetensors = read_jsonl(&root.join(format!("{file}_st.jsonl")), id);
        assert!(from_pt.len() >= 6, "{file}: {} rows", from_pt.len());
        assert_eq!(from_pt, from_safetensors, "{file}: the same weights give other features");
    }
    let refused = extract("default", "tiny.pt", &[]);
    assert!(!refused.status.success(), "a tiny .pt read as ViT-B-16");
    let both = extract("both", "tiny.pt", &["--model-config", "tiny.json", "--vision-model", "ViT-B-16"]);
    let stderr = String::from_utf8_lossy(&both.stderr);
    assert!(
        !both.status.success() && stderr.contains("--model-config") && stderr.contains("--vision-model"),
        "{stderr}"
    );
}
