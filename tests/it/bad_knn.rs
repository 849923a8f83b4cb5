//! Bad inputs to the retrieval jobs, `make-topk-predictions` and `build-index` (issue #23's
//! battery for them): a saved index of another gallery is never reused; nulls and non-finite
//! values in feature tables and lines are refused (a gallery) or quarantined and counted (the
//! queries), never read as numbers; FAISS and libtorch are never handed a size they crash on.
//! Every case ends with exit 1 naming the file, row or id (or a counted quarantine), under a
//! time limit, with no temporary file left.

use std::collections::BTreeMap;
use std::path::Path;

use cnclip_tests::hostile::{refused, run_within, succeeds};
use cnclip_tests::python;

/// Unit features (8 values) as JSON lines and Parquet: a gallery `a` (ids 0…59), a gallery `b`
/// of the same shape with other vectors and ids 1000…1059, and 12 queries; then the damaged
/// tables the battery reads.
const MAKE: &str = r#"
import json, sys, numpy as np, pyarrow as pa, pyarrow.parquet as pq
root = sys.argv[1]
rng = np.random.default_rng(5)
def unit(n):
    x = rng.standard_normal((n, 8)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)
def lines(path, key, ids, feats):
    with open(path, "w") as f:
        for i, v in zip(ids, feats):
            f.write(json.dumps({key: int(i), "feature": [float(x) for x in v]}) + "\n")
def table(path, ids, values, id_mask=None, row_mask=None):
    flat = pa.array(values, pa.float32())
    feature = pa.FixedSizeListArray.from_arrays(flat, 8, mask=row_mask)
    pq.write_table(pa.table({"id": pa.array(ids, pa.int64(), mask=id_mask), "feature": feature}), path)
a, b, q = unit(60), unit(60), unit(12)
lines(f"{root}/a.jsonl", "image_id", range(60), a)
lines(f"{root}/b.jsonl", "image_id", range(1000, 1060), b)
lines(f"{root}/q.jsonl", "text_id", range(12), q)
ids = list(range(60))
flat = a.reshape(-1).tolist()
table(f"{root}/a.parquet", ids, flat)
table(f"{root}/null_id.parquet", ids, flat, id_mask=np.array([i == 7 for i in ids]))
table(f"{root}/null_feature.parquet", ids, flat, row_mask=pa.array([i == 9 for i in ids]))
with_null = list(flat); with_null[11 * 8 + 3] = None
table(f"{root}/null_value.parquet", ids, with_null)
with_nan = list(flat); with_nan[13 * 8] = float("nan")
table(f"{root}/nan.parquet", ids, with_nan)
with_inf = list(flat); with_inf[17 * 8 + 1] = float("inf")
table(f"{root}/inf.parquet", ids, with_inf)
# Queries: two of twelve unusable (a NaN, a null feature).
qflat = q.reshape(-1).tolist(); qflat[4 * 8] = float("nan")
table(f"{root}/q_bad.parquet", list(range(12)), qflat, row_mask=pa.array([i == 6 for i in range(12)]))
# A JSON number past float32's range becomes inf when read.
for name, key, feats in (("huge", "image_id", a), ("huge_q", "text_id", q)):
    with open(f"{root}/{name}.jsonl", "w") as f:
        for i, v in enumerate(feats):
            values = ", ".join("1e39" if (i == 5 and j == 2) else repr(float(x)) for j, x in enumerate(v))
            f.write('{"%s": %d, "feature": [%s]}\n' % (key, i, values))
"#;

fn data() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    python(MAKE, &[dir.path().to_str().unwrap()], "");
    dir
}

/// Prediction lines: query id → neighbour ids.
fn predictions(path: &Path) -> BTreeMap<i64, Vec<i64>> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let ids = v["image_ids"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
            (v["text_id"].as_i64().unwrap(), ids)
        })
        .collect()
}

/// `make-topk-predictions` of `queries` in `gallery`, top 5 unless `extra` says otherwise.
fn knn<'a>(gallery: &'a str, queries: &'a str, output: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["make-topk-predictions", "--image-feats", gallery, "--text-feats", queries];
    args.extend(["--output", output]);
    if !extra.contains(&"--top-k") {
        args.extend(["--top-k", "5"]);
    }
    args.extend(extra);
    args
}

#[test]
fn a_saved_index_of_another_gallery_or_index_is_never_reused_issue_23_item_1() {
    let dir = data();
    let root = dir.path();
    let saved = ["--index-path", "saved.faiss"];
    succeeds(root, &knn("a.jsonl", "q.jsonl", "a_out.jsonl", &saved));
    // The same gallery again: loaded (same neighbours).
    succeeds(root, &knn("a.jsonl", "q.jsonl", "again.jsonl", &saved));
    assert_eq!(predictions(&root.join("again.jsonl")), predictions(&root.join("a_out.jsonl")));

    // Gallery b has a's shape (60 × 8): a count and dimension check passes it. Its neighbours
    // must be b's own, as an exact search without a saved index finds them.
    succeeds(root, &knn("b.jsonl", "q.jsonl", "b_exact.jsonl", &[]));
    let ran = succeeds(root, &knn("b.jsonl", "q.jsonl", "b_saved.jsonl", &saved));
    assert_eq!(
        predictions(&root.join("b_saved.jsonl")),
        predictions(&root.join("b_exact.jsonl")),
        "the index saved for gallery a answered for gallery b"
    );
    assert!(ran.stderr.contains("building it again"), "{}", ran.stderr);
    assert!(root.join("saved.faiss.cnclip.json").exists(), "the index's record is written beside it");

    // Gallery b rewritten in place with the same size and modification time (the ids of its
    // first two lines swapped): the file's sha256 tells it apart.
    let path = root.join("b.jsonl");
    let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let swapped = text.replacen("1000,", "XXXX,", 1).replacen("1001,", "1000,", 1).replacen("XXXX,", "1001,", 1);
    assert_eq!((swapped.len(), swapped != text), (text.len(), true));
    std::fs::write(&path, swapped).unwrap();
    std::fs::File::options().write(true).open(&path).unwrap().set_modified(modified).unwrap();
    let ran = succeeds(root, &knn("b.jsonl", "q.jsonl", "b2.jsonl", &saved));
    assert!(ran.stderr.contains("building it again"), "{}", ran.stderr);

    // Another index string on the same path: built again, not the Flat one loaded.
    let ran =
        succeeds(root, &knn("b.jsonl", "q.jsonl", "hnsw.jsonl", &["--index", "HNSW8", "--index-path", "saved.faiss"]));
    assert!(ran.stderr.contains("HNSW8"), "{}", ran.stderr);

    // The index file replaced by another of the same shape (gallery a's), its record kept.
    succeeds(root, &knn("a.jsonl", "q.jsonl", "other.jsonl", &["--index-path", "other.faiss"]));
    succeeds(root, &knn("b.jsonl", "q.jsonl", "b3.jsonl", &saved));
    std::fs::copy(root.join("other.faiss"), root.join("saved.faiss")).unwrap();
    let ran = succeeds(root, &knn("b.jsonl", "q.jsonl", "b4.jsonl", &saved));
    assert!(ran.stderr.contains("not the one its record was written with"), "{}", ran.stderr);
    succeeds(root, &knn("b.jsonl", "q.jsonl", "b_exact2.jsonl", &[]));
    assert_eq!(predictions(&root.join("b4.jsonl")), predictions(&root.join("b_exact2.jsonl")));

    // An index file without its record (another tool's, or an older cnclip's) is refused.
    std::fs::remove_file(root.join("saved.faiss.cnclip.json")).unwrap();
    refused(root, &knn("b.jsonl", "q.jsonl", "x.jsonl", &saved), &["saved.faiss", "record"]);
    assert!(!root.join("x.jsonl").exists());
}

#[test]
fn nulls_and_non_finite_values_in_a_gallery_are_refused_naming_the_row_issue_23_item_2() {
    let dir = data();
    let root = dir.path();
    for backend in ["faiss", "torch"] {
        for (file, what) in [
            ("null_id.parquet", "row 7"),
            ("null_feature.parquet", "row 9"),
            ("null_value.parquet", "row 11"),
            ("nan.parquet", "row 13"),
            ("inf.parquet", "row 17"),
            ("huge.jsonl", "line 6"),
        ] {
            let out = format!("{file}.{backend}.jsonl");
            let stderr = refused(root, &knn(file, "q.jsonl", &out, &["--backend", backend]), &[file, what]);
            assert!(!root.join(&out).exists(), "{file} ({backend}): wrote {out}: {stderr}");
        }
    }
    // And build-index on the same tables.
    for (file, what) in [("null_id.parquet", "null id"), ("nan.parquet", "row 13"), ("null_value.parquet", "null")] {
        refused(
            root,
            &["build-index", "--features", file, "--index", "IVF2,Flat", "--train-sample", "60", "--index-path", "ix"],
            &[what],
        );
    }
}

#[test]
fn unusable_queries_are_quarantined_and_counted_issue_23_item_2() {
    let dir = data();
    let root = dir.path();
    for backend in ["faiss", "torch"] {
        let out = format!("q_bad.{backend}.jsonl");
        let ran = succeeds(root, &knn("a.parquet", "q_bad.parquet", &out, &["--backend", backend]));
        let found = predictions(&root.join(&out));
        assert_eq!(found.len(), 10, "{backend}: ten usable queries of twelve: {found:?}");
        assert!(!found.contains_key(&4) && !found.contains_key(&6), "{backend}: {found:?}");
        assert!(found.values().all(|n| n.len() == 5 && n.iter().all(|id| (0..60).contains(id))), "{found:?}");
        let quarantine = std::fs::read_to_string(root.join(format!("q_bad.{backend}.quarantine.jsonl"))).unwrap();
        assert_eq!(quarantine.lines().count(), 2, "{quarantine}");
        assert!(quarantine.contains("null feature") && quarantine.contains("NaN"), "{quarantine}");
        assert!(ran.stderr.contains("2 quarantined"), "{backend}: the summary counts them: {}", ran.stderr);
    }
    // JSON lines: a query overflowing float32 is quarantined naming its line.
    let ran = succeeds(root, &knn("a.parquet", "huge_q.jsonl", "huge_out.jsonl", &[]));
    assert_eq!(predictions(&root.join("huge_out.jsonl")).len(), 11);
    assert!(ran.stderr.contains("1 quarantined"), "{}", ran.stderr);
}

#[test]
fn sizes_faiss_or_libtorch_crash_on_are_refused_first_issue_23_item_4() {
    let dir = data();
    let root = dir.path();
    for index in ["IVF0,Flat", "IVF0,PQ8np", "HNSW0", "IVF99999999999,Flat"] {
        let named = index.split(',').next().unwrap();
        refused(root, &knn("a.jsonl", "q.jsonl", "out.jsonl", &["--index", index]), &[named]);
        refused(
            root,
            &knn("a.jsonl", "q.jsonl", "out.jsonl", &["--index", index, "--index-path", "ivf0.faiss"]),
            &[named],
        );
        assert!(!root.join("ivf0.faiss").exists());
        refused(
            root,
            &["build-index", "--features", "a.parquet", "--index", index, "--train-sample", "60", "--index-path", "ix"],
            &[named],
        );
    }
    let huge = u64::MAX.to_string();
    refused(
        root,
        &knn("a.jsonl", "q.jsonl", "out.jsonl", &["--backend", "torch", "--eval-batch-size", &huge]),
        &["eval_batch_size"],
    );
    refused(root, &knn("a.jsonl", "q.jsonl", "out.jsonl", &["--eval-batch-size", "0"]), &["eval_batch_size"]);
    assert!(!root.join("out.jsonl").exists());
}

#[test]
fn a_bad_input_battery_for_make_topk_predictions() {
    let dir = data();
    let root = dir.path();
    std::fs::write(root.join("empty.jsonl"), "").unwrap();
    std::fs::write(root.join("garbage.parquet"), b"PAR1 not a parquet file").unwrap();
    std::fs::create_dir(root.join("folder.jsonl")).unwrap();
    let no_fifo = !std::process::Command::new("mkfifo").arg(root.join("fifo.jsonl")).status().unwrap().success();
    assert!(!no_fifo, "mkfifo");
    let cases: Vec<(&str, &str, Vec<&str>)> = vec![
        ("empty.jsonl", "q.jsonl", vec!["empty.jsonl"]),
        ("garbage.parquet", "q.jsonl", vec!["garbage.parquet"]),
        ("folder.jsonl", "q.jsonl", vec!["folder.jsonl"]),
        ("fifo.jsonl", "q.jsonl", vec!["fifo.jsonl", "not a regular file"]),
        ("/dev/zero", "q.jsonl", vec!["/dev/zero"]),
        ("a.jsonl", "/dev/zero", vec!["/dev/zero"]),
        ("a.jsonl", "fifo.jsonl", vec!["fifo.jsonl"]),
        ("missing.jsonl", "q.jsonl", vec!["missing.jsonl"]),
    ];
    for (gallery, queries, names) in cases {
        let ran = run_within(root, &knn(gallery, queries, "out.jsonl", &[]), std::time::Duration::from_secs(60));
        cnclip_tests::hostile::check_refused(&ran, root, &names, &format!("gallery {gallery}, queries {queries}"));
        assert!(!root.join("out.jsonl").exists(), "{gallery}/{queries}: wrote an output");
    }
    // The same id twice in a gallery would come back twice in one list.
    let text = std::fs::read_to_string(root.join("a.jsonl")).unwrap();
    let first = text.lines().next().unwrap().replacen("\"image_id\": 0,", "\"image_id\": 42,", 1);
    std::fs::write(root.join("dup.jsonl"), format!("{first}\n{}", text.lines().skip(1).collect::<Vec<_>>().join("\n")))
        .unwrap();
    for backend in ["faiss", "torch"] {
        refused(
            root,
            &knn("dup.jsonl", "q.jsonl", "out.jsonl", &["--backend", backend]),
            &["gallery id 42 appears twice"],
        );
    }
    // Sizes past what a search can give.
    let huge = u64::MAX.to_string();
    refused(root, &knn("a.jsonl", "q.jsonl", "out.jsonl", &["--top-k", &huge]), &["top_k"]);
    refused(root, &knn("a.jsonl", "q.jsonl", "out.jsonl", &["--top-k", "0"]), &["top_k"]);
    assert!(!root.join("out.jsonl").exists());
    // An approximate index whose probed lists hold fewer than k: said, not silent.
    // (8 lists of 60 vectors, one probed: about 8 candidates for a top 20.)
    let ivf = ["--index", "IVF8,Flat", "--nprobe", "1", "--top-k", "20"];
    let ran = succeeds(root, &knn("a.jsonl", "q.jsonl", "ivf.jsonl", &ivf));
    let short = predictions(&root.join("ivf.jsonl")).values().filter(|n| n.len() < 20).count();
    assert!(short > 0, "no query got fewer than 20");
    assert!(ran.stderr.contains(&format!("{short} of 12 queries got fewer than 20")), "{}", ran.stderr);
    // --top-k past the gallery: cn_clip's topk raises; here every query gets the whole gallery,
    // and the summary says so.
    let ran = succeeds(root, &knn("a.jsonl", "q.jsonl", "all.jsonl", &["--top-k", "100"]));
    assert!(predictions(&root.join("all.jsonl")).values().all(|n| n.len() == 60));
    assert!(ran.stderr.contains("60"), "{}", ran.stderr);
}

#[test]
fn a_bad_input_battery_for_build_index() {
    let dir = data();
    let root = dir.path();
    std::fs::write(root.join("garbage.parquet"), b"PAR1garbagePAR1").unwrap();
    std::fs::write(root.join("empty.parquet"), b"").unwrap();
    std::fs::create_dir(root.join("nothing")).unwrap();
    assert!(std::process::Command::new("mkfifo").arg(root.join("fifo.parquet")).status().unwrap().success());
    for (table, named) in [
        ("garbage.parquet", "garbage.parquet"),
        ("empty.parquet", "empty.parquet"),
        ("nothing", "nothing"),
        ("fifo.parquet", "a FIFO, not a regular file"),
        ("/dev/zero", "a character device, not a regular file"),
        ("missing.parquet", "missing.parquet"),
        ("huge.jsonl", "line 6"),
    ] {
        refused(
            root,
            &["build-index", "--features", table, "--index", "IVF2,Flat", "--train-sample", "60", "--index-path", "ix"],
            &[named],
        );
    }
    // Training needs at least as many vectors as lists: FAISS says so in its own words.
    let stderr = refused(
        root,
        &[
            "build-index",
            "--features",
            "a.parquet",
            "--index",
            "IVF256,Flat",
            "--train-sample",
            "60",
            "--index-path",
            "ix",
        ],
        &["IVF256"],
    );
    assert!(!stderr.contains("Clustering.cpp"), "FAISS's C++ location leaked: {stderr}");
}
