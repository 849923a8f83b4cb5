//! `make-topk-predictions` and `-tr` (issue #11, item 3) against cn_clip's scripts (through the
//! CPU shim) on random unit features: the top-k of every query whose top-k+1 scores are not
//! (nearly) tied equals cn_clip's, with the FAISS and the torch backends, from JSON lines and
//! from Parquet tables (a file, or a directory of parts); the Parquet output carries the scores;
//! IVF and HNSW indexes are checked against the exact result (recall@10 printed).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use cnclip_tests::{python, reference};

const MAKE_FEATURES: &str = r#"
import json, sys, numpy as np, pyarrow as pa, pyarrow.parquet as pq, os
root = sys.argv[1]
rng = np.random.default_rng(11)
def unit(n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)
images, texts = unit(400, 64), unit(60, 64)
image_ids, text_ids = list(range(5000, 5400)), list(range(60))
for name, key, ids, feats in (("img", "image_id", image_ids, images), ("txt", "text_id", text_ids, texts)):
    with open(f"{root}/{name}.jsonl", "w") as f:
        for i, v in zip(ids, feats):
            f.write(json.dumps({key: i, "feature": v.tolist()}) + "\n")
    def table(a, b):
        return pa.table({"id": pa.array(ids[a:b], pa.int64()),
                         "feature": pa.FixedSizeListArray.from_arrays(pa.array(feats[a:b].reshape(-1), pa.float32()), 64)})
    pq.write_table(table(0, len(ids)), f"{root}/{name}.parquet")
    os.makedirs(f"{root}/{name}_parts")
    half = len(ids) // 2
    pq.write_table(table(0, half), f"{root}/{name}_parts/part-00000.parquet")
    pq.write_table(table(half, len(ids)), f"{root}/{name}_parts/part-00001.parquet")
# Queries whose top-11 scores are separated by more than 1e-5 (float64): no near tie.
def clear(q, g):
    s = q.astype(np.float64) @ g.astype(np.float64).T
    top = -np.sort(-s, axis=1)[:, :11]
    return (np.min(top[:, :-1] - top[:, 1:], axis=1) > 1e-5).tolist()
print(json.dumps({"t2i": clear(texts, images), "i2t": clear(images, texts)}))
"#;

fn cnclip(root: &Path, args: &[&str]) -> String {
    let output = Command::new(cnclip_tests::cnclip_bin()).args(args).current_dir(root).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "cnclip {args:?}:\n{stderr}");
    stderr
}

/// Prediction lines: query id → neighbour ids.
fn predictions(path: &Path, query: &str, neighbours: &str) -> BTreeMap<i64, Vec<i64>> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let ids = v[neighbours].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
            (v[query].as_i64().unwrap(), ids)
        })
        .collect()
}

/// How many clear queries agree, out of how many clear ones.
fn agreement(ours: &BTreeMap<i64, Vec<i64>>, theirs: &BTreeMap<i64, Vec<i64>>, clear: &[bool]) -> (usize, usize) {
    assert_eq!(ours.keys().collect::<Vec<_>>(), theirs.keys().collect::<Vec<_>>(), "query ids differ");
    let mut agree = (0, 0);
    for ((id, mine), is_clear) in ours.iter().zip(clear) {
        if *is_clear {
            agree.1 += 1;
            agree.0 += usize::from(mine == &theirs[id]);
        }
    }
    agree
}

fn recall(approx: &BTreeMap<i64, Vec<i64>>, exact: &BTreeMap<i64, Vec<i64>>) -> f64 {
    let (mut hit, mut total) = (0, 0);
    for (id, truth) in exact {
        total += truth.len();
        hit += truth.iter().filter(|t| approx[id].contains(t)).count();
    }
    hit as f64 / total as f64
}

#[test]
fn knn_matches_cn_clip_scripts_with_both_backends_and_both_formats() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let clear: serde_json::Value = serde_json::from_str(&python(MAKE_FEATURES, &[root.to_str().unwrap()], "")).unwrap();
    let clear =
        |key: &str| -> Vec<bool> { clear[key].as_array().unwrap().iter().map(|b| b.as_bool().unwrap()).collect() };
    let s = |name: &str| root.join(name).display().to_string();
    for (module, out) in [
        ("cn_clip.eval.make_topk_predictions", "ref_t2i.jsonl"),
        ("cn_clip.eval.make_topk_predictions_tr", "ref_i2t.jsonl"),
    ] {
        reference(
            &[
                "run-module",
                module,
                "--image-feats",
                &s("img.jsonl"),
                "--text-feats",
                &s("txt.jsonl"),
                "--top-k",
                "10",
                "--output",
                &s(out),
            ],
            "",
        );
    }
    let theirs_t2i = predictions(&root.join("ref_t2i.jsonl"), "text_id", "image_ids");
    let theirs_i2t = predictions(&root.join("ref_i2t.jsonl"), "image_id", "text_ids");
    assert_eq!((theirs_t2i.len(), theirs_i2t.len()), (60, 400));

    for backend in ["faiss", "torch"] {
        for (images, texts) in [("img.jsonl", "txt.jsonl"), ("img.parquet", "txt.parquet"), ("img_parts", "txt_parts")]
        {
            let what = format!("{backend}, {images}");
            let out = format!("t2i_{backend}_{images}.jsonl");
            cnclip(
                root,
                &[
                    "make-topk-predictions",
                    "--image-feats",
                    images,
                    "--text-feats",
                    texts,
                    "--top-k",
                    "10",
                    "--output",
                    &out,
                    "--backend",
                    backend,
                ],
            );
            let (agree, of) =
                agreement(&predictions(&root.join(&out), "text_id", "image_ids"), &theirs_t2i, &clear("t2i"));
            assert!(of >= 50 && agree == of, "{what}: texts → images: {agree} of {of} clear queries agree");
            let out = format!("i2t_{backend}_{images}.jsonl");
            cnclip(
                root,
                &[
                    "make-topk-predictions-tr",
                    "--image-feats",
                    images,
                    "--text-feats",
                    texts,
                    "--top-k",
                    "10",
                    "--output",
                    &out,
                    "--backend",
                    backend,
                ],
            );
            let (agree, of) =
                agreement(&predictions(&root.join(&out), "image_id", "text_ids"), &theirs_i2t, &clear("i2t"));
            assert!(of >= 300 && agree == of, "{what}: images → texts: {agree} of {of} clear queries agree");
        }
    }
    // The line format is cn_clip's, byte for byte, where the neighbours agree.
    let first = |name: &str| std::fs::read_to_string(root.join(name)).unwrap().lines().next().unwrap().to_string();
    let theirs_first = first("ref_t2i.jsonl");
    if predictions(&root.join("t2i_faiss_img.jsonl.jsonl"), "text_id", "image_ids")[&0] == theirs_t2i[&0] {
        assert_eq!(first("t2i_faiss_img.jsonl.jsonl"), theirs_first);
    }

    // Parquet output: the predictions table with scores, best first.
    cnclip(
        root,
        &[
            "knn",
            "--image-feats",
            "img.parquet",
            "--text-feats",
            "txt.parquet",
            "--top-k",
            "5",
            "--output",
            "t2i.parquet",
        ],
    );
    let table = python(
        "import sys, json, pyarrow.parquet as pq\nt = pq.read_table(sys.argv[1])\n\
         print(json.dumps({'schema': [f'{f.name}: {f.type}' for f in t.schema], 'rows': t.num_rows,\n\
         'sorted': all(s == sorted(s, reverse=True) and len(s) == 5 for s in t.column('scores').to_pylist())}))",
        &[&s("t2i.parquet")],
        "",
    );
    let table: serde_json::Value = serde_json::from_str(&table).unwrap();
    assert_eq!(table["rows"], 60);
    assert_eq!(table["sorted"], true);
    assert_eq!(table["schema"][0], "query_id: int64");

    // Approximate indexes against the exact result.
    // (Random unit vectors have no clusters, IVF's worst case: 6 of 8 lists are probed.)
    let exact = predictions(&root.join("t2i_faiss_img.jsonl.jsonl"), "text_id", "image_ids");
    for (index, extra) in [("IVF8,Flat", ["--nprobe", "6"]), ("HNSW16", ["--ef-search", "64"])] {
        let out = format!("t2i_{}.jsonl", index.replace(',', "_"));
        let mut args = vec!["make-topk-predictions", "--image-feats", "img.jsonl", "--text-feats", "txt.jsonl"];
        args.extend(["--top-k", "10", "--output", &out, "--index", index]);
        args.extend(extra);
        cnclip(root, &args);
        let r = recall(&predictions(&root.join(&out), "text_id", "image_ids"), &exact);
        eprintln!("{index}: recall@10 vs exact = {r:.3}");
        assert!(r >= 0.85, "{index}: recall@10 {r:.3}");
    }
    // A saved index is loaded by the next run, with the same result.
    let saved =
        ["knn", "--image-feats", "img.jsonl", "--text-feats", "txt.jsonl", "--index", "IVF8,Flat", "--nprobe", "8"];
    cnclip(root, &[&saved[..], &["--index-path", "ivf.faiss", "--output", "a.jsonl"]].concat());
    assert!(root.join("ivf.faiss").is_file());
    cnclip(root, &[&saved[..], &["--index-path", "ivf.faiss", "--output", "b.jsonl"]].concat());
    assert_eq!(
        std::fs::read_to_string(root.join("a.jsonl")).unwrap(),
        std::fs::read_to_string(root.join("b.jsonl")).unwrap()
    );
}

/// FAISS on a GPU is a build feature: without it, a CUDA device with the faiss backend is
/// refused before anything is read, naming the feature and the torch alternative.
#[test]
fn faiss_on_a_gpu_without_the_feature_is_refused_with_the_way_out() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::write(root.join("img.jsonl"), "{\"image_id\": 1, \"feature\": [1.0, 0.0]}\n").unwrap();
    std::fs::write(root.join("txt.jsonl"), "{\"text_id\": 7, \"feature\": [0.0, 1.0]}\n").unwrap();
    let base =
        ["make-topk-predictions", "--image-feats", "img.jsonl", "--text-feats", "txt.jsonl", "--output", "p.jsonl"];
    let output = Command::new(cnclip_tests::cnclip_bin())
        .args(base)
        .args(["--device", "cuda:0"])
        .current_dir(root)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--features faiss-gpu") && stderr.contains("--backend torch"), "{stderr}");
    assert!(!root.join("p.jsonl").exists());
    // The same job on the CPU runs.
    cnclip(root, &base);
    assert_eq!(predictions(&root.join("p.jsonl"), "text_id", "image_ids")[&7], vec![1]);
}
