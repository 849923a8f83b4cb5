//! Pipelines end to end through `cnclip run` / `import` / `export` (issue #4): bad input across
//! TSV, JSONL and LMDB; configuration validation; `--shard i/n`; round trips through Parquet
//! that cn_clip's own tools accept; pixels, folder order and JSON lines against the reference.

use std::path::Path;
use std::process::{Command, Output};

use cnclip_tests::python;

fn cnclip(args: &[&str]) -> Output {
    Command::new(cnclip_tests::cnclip_bin()).args(args).output().unwrap()
}

fn ok(output: Output) -> String {
    assert!(output.status.success(), "cnclip failed:\n{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// Column `column` of Parquet files, as JSON.
fn parquet_column(path: &Path, column: &str) -> serde_json::Value {
    json(&python(
        "import json, sys, pyarrow.parquet as pq\nvalues = pq.read_table(sys.argv[1]).column(sys.argv[2]).to_pylist()\nprint(json.dumps([v.hex() if isinstance(v, bytes) else v for v in values]))",
        &[path.to_str().unwrap(), column],
        "",
    ))
}

/// A corpus with good and bad records of every kind the issue lists, in TSV, JSONL and LMDB.
const MAKE_BAD_INPUT: &str = r#"
import base64, io, json, os, pickle, sys, lmdb, numpy as np
from PIL import Image
out = sys.argv[1]
rng = np.random.default_rng(1)
def image(i, fmt):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()
good = {i: image(i, "JPEG" if i % 2 else "PNG") for i in range(1, 7)}
jpeg = image(9, "JPEG")
b64 = lambda b: base64.urlsafe_b64encode(b).decode()
lines = [f"{i}\t{b64(v)}" for i, v in good.items()]
lines[1] = lines[1].rstrip("=") + "\r"                                   # unpadded, CRLF
lines[2] = f"3\t{base64.standard_b64encode(good[3]).decode()}"         # standard alphabet
lines += [
    f"100\t{b64(jpeg[: len(jpeg) // 2])}",     # truncated JPEG
    f"101\t{b64(bytes(rng.integers(0, 255, 300, dtype=np.uint8)))}",  # random bytes
    "102\t@@not*base64",                       # bad base64
    "103\t",                                   # empty value
    f"1\t{b64(good[2])}",                      # duplicate id
    f"abc\t{b64(good[2])}",                    # string id
]
with open(f"{out}/bad_imgs.tsv", "w", newline="") as f:
    f.write("\n".join(lines) + "\n")
texts = [json.dumps({"text_id": t, "text": f"第{t}个", "image_ids": [t]}, ensure_ascii=False).encode() for t in range(1, 6)]
texts += [
    b'{"text_id": 50, "text": "\xff\xfe bad", "image_ids": [1]}',   # not UTF-8
    b'{"text_id": 51, "text": "x", "image_ids": [1]',                 # malformed JSON
    b'{"text_id": 52, "image_ids": [1]}',                             # missing field
    b'{"text_id": "53", "text": "x", "image_ids": [1]}',              # string id
    b'{"text_id": 1, "text": "again", "image_ids": [1]}',             # duplicate id
    b'{"text_id": 54, "text": "x", "image_ids": ["x"]}',              # string image id
]
with open(f"{out}/bad_texts.jsonl", "wb") as f:
    f.write(b"\n".join(texts) + b"\n")
os.makedirs(f"{out}/lmdb/bad")
env = lmdb.open(f"{out}/lmdb/bad/imgs", map_size=1 << 26)
with env.begin(write=True) as txn:
    for i in range(1, 5):
        txn.put(str(i).encode(), b64(good[i]).encode())
    txn.put(b"abc", b64(good[1]).encode())
    txn.put(b"200", b"")
    txn.put(b"201", b64(bytes(range(200))).encode())
    txn.put(b"202", b64(jpeg[:200]).encode())
    txn.put(b"203", b"%%%")
    txn.put(b"num_images", b"9")
env.close()
env = lmdb.open(f"{out}/lmdb/bad/pairs", map_size=1 << 26)
with env.begin(write=True) as txn:
    for k in range(4):
        txn.put(str(k).encode(), pickle.dumps((k + 1, k, f"文本{k}")))
    txn.put(b"4", pickle.dumps([1, 2, "list"]))
    txn.put(b"5", b"\x80\x04garbage")
    txn.put(b"6", pickle.dumps(("1", 2, "x")))
    txn.put(b"num_samples", b"7")
env.close()
"#;

const BAD_INPUT_PIPELINE: &str = r#"
[job]
quarantine = "out/quarantine.jsonl"
batch_rows = 3

[nodes.tsv]
kind = "tsv"
paths = ["bad_imgs.tsv"]

[nodes.tsv_decoded]
kind = "decode_base64"
input = "tsv"

[nodes.tsv_pixels]
kind = "preprocess"
input = "tsv_decoded"
resolution = 32

[nodes.tsv_out]
kind = "write_parquet"
input = "tsv_pixels"
path = "out/tsv_pixels.parquet"

[nodes.texts]
kind = "jsonl"
paths = ["bad_texts.jsonl"]

[nodes.texts_out]
kind = "write_parquet"
input = "texts"
path = "out/texts.parquet"

[nodes.lmdb_imgs]
kind = "lmdb"
path = "lmdb/bad"
database = "imgs"

[nodes.lmdb_decoded]
kind = "decode_base64"
input = "lmdb_imgs"

[nodes.lmdb_pixels]
kind = "preprocess"
input = "lmdb_decoded"
resolution = 32

[nodes.lmdb_out]
kind = "write_parquet"
input = "lmdb_pixels"
path = "out/lmdb_pixels.parquet"

[nodes.pairs]
kind = "lmdb"
path = "lmdb/bad"
database = "pairs"

[nodes.pairs_out]
kind = "write_parquet"
input = "pairs"
path = "out/pairs.parquet"
"#;

/// The quarantine of a pipeline with several sources and transforms is the same file on every
/// run: node by node in the pipeline's order (a pipeline file's nodes by name), each node's
/// records in its file or input order, however the nodes' threads interleave; the Parquet form
/// in the same order.
#[test]
fn the_quarantine_lists_records_node_by_node_the_same_on_every_run() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    python(MAKE_BAD_INPUT, &[root.to_str().unwrap()], "");
    let pipeline = root.join("bad.toml");
    std::fs::write(&pipeline, BAD_INPUT_PIPELINE).unwrap();
    let run = || {
        ok(cnclip(&["run", pipeline.to_str().unwrap()]));
        std::fs::read_to_string(root.join("out/quarantine.jsonl")).unwrap()
    };
    let first = run();
    let locations: Vec<String> = first
        .lines()
        .map(|l| {
            let row = json(l);
            let source = row["source"].as_str().unwrap().rsplit('/').next().unwrap().to_string();
            format!("{source} {}", row["location"].as_str().unwrap())
        })
        .collect();
    // A pipeline file's nodes in name order: lmdb_imgs, lmdb_pixels, pairs, texts, tsv,
    // tsv_pixels (the images that do not decode are preprocess's). The LMDB sources read in key
    // order ("200" < "203" < "abc").
    let expected = [
        "imgs key \"200\"",
        "imgs key \"203\"",
        "imgs key \"abc\"",
        "imgs image 201",
        "imgs image 202",
        "pairs key \"4\"",
        "pairs key \"5\"",
        "pairs key \"6\"",
        "bad_texts.jsonl line 6",
        "bad_texts.jsonl line 7",
        "bad_texts.jsonl line 8",
        "bad_texts.jsonl line 9",
        "bad_texts.jsonl text 1",
        "bad_texts.jsonl line 11",
        "bad_imgs.tsv line 9",
        "bad_imgs.tsv line 10",
        "bad_imgs.tsv image 1",
        "bad_imgs.tsv line 12",
        "bad_imgs.tsv image 100",
        "bad_imgs.tsv image 101",
    ];
    assert_eq!(locations, expected, "{first}");
    for _ in 0..2 {
        assert_eq!(run(), first, "another run wrote another quarantine");
    }
    let table = root.join("q.parquet");
    ok(cnclip(&["run", pipeline.to_str().unwrap(), "--quarantine", table.to_str().unwrap()]));
    let from_jsonl: Vec<serde_json::Value> = first.lines().map(|l| json(l)["reason"].clone()).collect();
    assert_eq!(parquet_column(&table, "reason"), serde_json::Value::Array(from_jsonl));
}

#[test]
fn bad_input_is_quarantined_with_reasons_or_fails_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    python(MAKE_BAD_INPUT, &[root.to_str().unwrap()], "");
    let pipeline = root.join("bad.toml");
    std::fs::write(&pipeline, BAD_INPUT_PIPELINE).unwrap();

    // skip (the default): the job completes with every good record and quarantines the rest.
    let log = ok(cnclip(&["run", pipeline.to_str().unwrap()]));
    let out = root.join("out");
    assert_eq!(parquet_column(&out.join("tsv_pixels.parquet"), "image_id"), json("[1, 2, 3, 4, 5, 6]"), "{log}");
    assert_eq!(parquet_column(&out.join("texts.parquet"), "text_id"), json("[1, 2, 3, 4, 5]"));
    assert_eq!(parquet_column(&out.join("lmdb_pixels.parquet"), "image_id"), json("[1, 2, 3, 4]"));
    assert_eq!(parquet_column(&out.join("pairs.parquet"), "text_id"), json("[0, 1, 2, 3]"));
    assert_eq!(parquet_column(&out.join("pairs.parquet"), "text"), json(r#"["文本0", "文本1", "文本2", "文本3"]"#));

    let quarantine = std::fs::read_to_string(out.join("quarantine.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = quarantine.lines().map(json).collect();
    // (file the source names, location, reason fragment) for every bad record.
    let expected = [
        ("bad_imgs.tsv", "image 100", "cannot decode image"),
        ("bad_imgs.tsv", "image 101", "cannot decode image"),
        ("bad_imgs.tsv", "line 9", "not base64"),
        ("bad_imgs.tsv", "line 10", "empty image value"),
        ("bad_imgs.tsv", "image 1", "duplicate image id"),
        ("bad_imgs.tsv", "line 12", "image id is not an integer"),
        ("bad_texts.jsonl", "line 6", "not valid UTF-8"),
        ("bad_texts.jsonl", "line 7", "malformed JSON"),
        ("bad_texts.jsonl", "line 8", "missing field `text`"),
        ("bad_texts.jsonl", "line 9", "text_id is not an integer"),
        ("bad_texts.jsonl", "text 1", "duplicate text id"),
        ("bad_texts.jsonl", "line 11", "is not an integer"),
        ("imgs", "key \"abc\"", "image key is not an integer"),
        ("imgs", "key \"200\"", "empty image value"),
        ("bad/imgs", "image 201", "cannot decode image"),
        ("bad/imgs", "image 202", "cannot decode image"),
        ("imgs", "key \"203\"", "not base64"),
        ("pairs", "key \"4\"", "not a tuple"),
        ("pairs", "key \"5\"", ""),
        ("pairs", "key \"6\"", "not an (int image_id"),
    ];
    for (source, location, reason) in expected {
        assert!(
            rows.iter().any(|r| r["source"].as_str().unwrap().contains(source)
                && r["location"] == location
                && r["reason"].as_str().unwrap().contains(reason)
                && !r["reason"].as_str().unwrap().is_empty()),
            "no quarantine row for {source} {location} ({reason}):\n{quarantine}"
        );
    }
    assert_eq!(rows.len(), expected.len(), "{quarantine}");
    assert!(log.contains(&format!("{} records quarantined", expected.len())), "{log}");

    // The same quarantine as a Parquet table (the `quarantine` contract) for notebooks.
    let table = root.join("q.parquet");
    ok(cnclip(&["run", pipeline.to_str().unwrap(), "--quarantine", table.to_str().unwrap()]));
    let reasons = parquet_column(&table, "reason");
    let from_jsonl: Vec<&serde_json::Value> = rows.iter().map(|r| &r["reason"]).collect();
    let mut a: Vec<String> = reasons.as_array().unwrap().iter().map(|v| v.to_string()).collect();
    let mut b: Vec<String> = from_jsonl.iter().map(|v| v.to_string()).collect();
    a.sort();
    b.sort();
    assert_eq!(a, b, "the Parquet quarantine differs from the JSONL one");

    // fail: the job stops with an error naming the node and the record, and writes nothing.
    std::fs::remove_dir_all(&out).unwrap();
    let output = cnclip(&["run", pipeline.to_str().unwrap(), "--on-error", "fail"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("node `") && stderr.contains("(--on-error fail)"), "{stderr}");
    assert!(expected.iter().any(|(_, location, _)| stderr.contains(location)), "{stderr}");
    let left: Vec<_> = std::fs::read_dir(&out).map(|d| d.map(|e| e.unwrap().file_name()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "a failed job left {left:?}");
}

#[test]
fn pipeline_file_problems_are_all_reported_at_once() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("texts.jsonl"), "{\"text_id\": 1, \"text\": \"x\", \"image_ids\": []}\n").unwrap();
    let pipeline = dir.path().join("p.toml");
    std::fs::write(
        &pipeline,
        r#"
[job]
shard = "3/2"
on_eror = "skip"

[nodes.imgs]
kind = "tsv"
paths = ["nothing_*.tsv", "missing.tsv"]

[nodes.texts]
kind = "jsonl"
paths = ["texts.jsonl"]

[nodes.pre]
kind = "preprocess"
input = "texts"
resolution = 224

[nodes.b]
kind = "decode_base64"
input = "c"

[nodes.c]
kind = "decode_base64"
input = "b"

[nodes.x]
kind = "resize"

[nodes.tok]
kind = "tokenize"
input = "imgs"

[nodes.tok_out]
kind = "write_parquet"
input = "tok"
path = "t.parquet"

[nodes.out]
kind = "write_tsv"
input = "pre"
path = "o.tsv"
colour = "red"

[nodes.out2]
kind = "write_parquet"
input = "nope"
path = "o.tsv"
"#,
    )
    .unwrap();
    let output = cnclip(&["run", "--check", pipeline.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    for problem in [
        "[job]: unknown key `on_eror`",
        "[job]: shard `3/2` is not `i/n`",
        "node `imgs`: pattern",
        "nothing_*.tsv` matches no file",
        "missing.tsv does not exist",
        "node `pre` (reading `texts`): needs a `image` column (Binary); the input has columns text_id, text, image_ids",
        "the graph has a cycle through b, c",
        "node `x`: unknown kind `resize`",
        "node `out`: unknown field `colour`",
        "node `out2`: reads from unknown node `nope`",
        // `imgs` cannot be built (no file), but its schema is known: its reader is checked.
        "node `tok` (reading `imgs`): needs a `text` column (Utf8); the input has columns image_id, image_base64",
    ] {
        assert!(stderr.contains(problem), "missing {problem:?} in:\n{stderr}");
    }
    assert!(stderr.contains("10 problems"), "{stderr}");
}

/// A small cn_clip-layout corpus (images as URL-safe base64, as cn_clip's tools write them).
const MAKE_CORPUS: &str = r#"
import base64, io, json, sys, numpy as np
from PIL import Image
out, n = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
modes = ["RGB", "L", "RGBA", "P", "CMYK"]
with open(f"{out}/train_imgs.tsv", "w") as f:
    for i in range(n):
        h, w = int(rng.integers(20, 300)), int(rng.integers(20, 300))
        image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(modes[i % 5])
        buf = io.BytesIO()
        image.save(buf, format="JPEG" if image.mode in ("RGB", "L", "CMYK") else "PNG")
        f.write(f"{1000 + i}\t{base64.urlsafe_b64encode(buf.getvalue()).decode()}\n")
with open(f"{out}/train_texts.jsonl", "w") as f:
    for t in range(n // 2):
        ids = [1000 + int(x) for x in rng.choice(n, size=int(rng.integers(1, 4)), replace=False)]
        f.write(json.dumps({"text_id": t, "text": f"第{t}张图：“Cute” cat", "image_ids": ids}, ensure_ascii=False) + "\n")
"#;

fn corpus(root: &Path, n: usize) -> std::path::PathBuf {
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    python(MAKE_CORPUS, &[data.to_str().unwrap(), &n.to_string()], "");
    data
}

#[test]
fn shards_read_every_record_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path(), 25);
    let pipeline = dir.path().join("p.toml");
    std::fs::write(
        &pipeline,
        r#"
[nodes.imgs]
kind = "tsv"
paths = ["data/*_imgs.tsv"]
[nodes.imgs_out]
kind = "write_tsv"
input = "imgs"
path = "out/imgs.tsv"
[nodes.texts]
kind = "jsonl"
paths = ["data/train_texts.jsonl"]
[nodes.texts_out]
kind = "write_jsonl"
input = "texts"
path = "out/texts.jsonl"
"#,
    )
    .unwrap();
    let mut imgs: Vec<String> = Vec::new();
    let mut texts: Vec<String> = Vec::new();
    for i in 0..3 {
        ok(cnclip(&["run", pipeline.to_str().unwrap(), "--shard", &format!("{i}/3")]));
        let shard_imgs = std::fs::read_to_string(dir.path().join("out/imgs.tsv")).unwrap();
        assert_eq!(shard_imgs.lines().count(), if i == 0 { 9 } else { 8 }, "shard {i}/3 of 25 images");
        imgs.extend(shard_imgs.lines().map(String::from));
        texts.extend(std::fs::read_to_string(dir.path().join("out/texts.jsonl")).unwrap().lines().map(String::from));
    }
    let mut original: Vec<String> =
        std::fs::read_to_string(data.join("train_imgs.tsv")).unwrap().lines().map(String::from).collect();
    let mut original_texts: Vec<String> =
        std::fs::read_to_string(data.join("train_texts.jsonl")).unwrap().lines().map(String::from).collect();
    for list in [&mut imgs, &mut texts, &mut original, &mut original_texts] {
        list.sort();
    }
    assert_eq!(imgs, original, "the shards' union is not the corpus (or a record was read twice)");
    assert_eq!(texts, original_texts);
    let bad = cnclip(&["run", pipeline.to_str().unwrap(), "--shard", "3/3"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("shard `3/3` is not `i/n`"));
}

/// Compares two cn_clip LMDB split directories with py-lmdb: keys and byte-equal values.
const SAME_LMDB: &str = r#"
import json, lmdb, sys
def read(path):
    env = lmdb.open(path, readonly=True, lock=False)
    with env.begin() as txn:
        return {bytes(k): bytes(v) for k, v in txn.cursor()}
print(json.dumps({db: [len(read(f"{sys.argv[1]}/{db}")), read(f"{sys.argv[1]}/{db}") == read(f"{sys.argv[2]}/{db}")] for db in ("imgs", "pairs")}))
"#;

#[test]
fn import_export_round_trip_gives_cn_clip_identical_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let data = corpus(root, 30);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (pq, tsv, lmdb, theirs) = (root.join("pq"), root.join("tsv"), root.join("lmdb"), root.join("theirs"));
    ok(cnclip(&["import", "--data-dir", &s(&data), "--splits", "train", "--out", &s(&pq)]));
    assert_eq!(parquet_column(&pq.join("train_images.parquet"), "image_id").as_array().unwrap().len(), 30);
    ok(cnclip(&["export", "--parquet-dir", &s(&pq), "--splits", "train", "--out", &s(&tsv)]));
    ok(cnclip(&["export", "--parquet-dir", &s(&pq), "--splits", "train", "--out", &s(&lmdb), "--format", "lmdb"]));
    // TSV → Parquet → TSV/JSONL is byte-identical (cn_clip's URL-safe padded base64, its JSON).
    for file in ["train_imgs.tsv", "train_texts.jsonl"] {
        assert!(
            std::fs::read(data.join(file)).unwrap() == std::fs::read(tsv.join(file)).unwrap(),
            "{file} changed on the round trip"
        );
    }
    // Parquet → LMDB equals what cn_clip's build_lmdb_dataset.py makes from the original files.
    let output = Command::new(cnclip_tests::venv_python())
        .args([
            "-m",
            "cn_clip.preprocess.build_lmdb_dataset",
            "--data_dir",
            &s(&data),
            "--splits",
            "train",
            "--lmdb_dir",
            &s(&theirs),
        ])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let same = json(&python(SAME_LMDB, &[&s(&theirs.join("train")), &s(&lmdb.join("train"))], ""));
    assert_eq!(same["imgs"], json("[31, true]"), "{same}");
    assert_eq!(same["pairs"][1], true, "{same}");
    // And back: cn_clip's LMDB → Parquet holds its pairs.
    ok(cnclip(&["import", "--lmdb-dir", &s(&theirs), "--splits", "train", "--out", &s(&root.join("pq2"))]));
    let pairs = same["pairs"][0].as_u64().unwrap() - 1;
    assert_eq!(
        parquet_column(&root.join("pq2/train_pairs.parquet"), "text_id").as_array().unwrap().len() as u64,
        pairs
    );
    assert_eq!(
        parquet_column(&root.join("pq2/train_images.parquet"), "image"),
        parquet_column(&pq.join("train_images.parquet"), "image")
    );
}

#[test]
fn preprocess_pipeline_pixels_equal_cn_clip_transform() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path(), 20);
    let pipeline = dir.path().join("p.toml");
    std::fs::write(
        &pipeline,
        r#"
[job]
batch_rows = 7
[nodes.imgs]
kind = "tsv"
paths = ["data/train_imgs.tsv"]
[nodes.decoded]
kind = "decode_base64"
input = "imgs"
[nodes.pixels]
kind = "preprocess"
input = "decoded"
resolution = 224
[nodes.out]
kind = "write_parquet"
input = "pixels"
path = "out/pixels.parquet"
"#,
    )
    .unwrap();
    ok(cnclip(&["run", pipeline.to_str().unwrap(), "--threads", "2"]));
    let script = r#"
import base64, io, json, sys, numpy as np, pyarrow.parquet as pq
from PIL import Image
from cn_clip.clip.utils import image_transform
resize, to_rgb = image_transform(224).transforms[:2]
table = pq.read_table(sys.argv[2])
assert table.schema.metadata[b"cnclip.resolution"] == b"224"
ours = dict(zip(table.column("image_id").to_pylist(), table.column("pixels").to_pylist()))
worst, n = 0, 0
for line in open(sys.argv[1]):
    i, b = line.rstrip("\n").split("\t")
    ref = np.array(to_rgb(resize(Image.open(io.BytesIO(base64.urlsafe_b64decode(b))))), dtype=np.int16)
    got = np.frombuffer(ours[int(i)], dtype=np.uint8).reshape(224, 224, 3).astype(np.int16)
    worst, n = max(worst, int(np.abs(ref - got).max())), n + 1
print(json.dumps([n, worst, list(ours) == sorted(ours)]))
"#;
    let report = json(&python(
        script,
        &[data.join("train_imgs.tsv").to_str().unwrap(), dir.path().join("out/pixels.parquet").to_str().unwrap()],
        "",
    ));
    assert_eq!(report, json("[20, 0, true]"), "[images, max |diff| out of 255, in input order]");
}

#[test]
fn image_folder_follows_torchvision_image_folder() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("zeroshot/test");
    let script = r#"
import os, sys, numpy as np
from PIL import Image
root = sys.argv[1]
rng = np.random.default_rng(3)
files = ["000/b.jpg", "000/a.PNG", "000/sub/c.jpg", "000/sub-x/d.png", "001/e.webp", "010/f.bmp", "010/notes.txt", "002/g.jpeg"]
modes = ["RGB", "RGBA", "L", "LA", "RGBA", "P", None, "CMYK"]
for f, mode in zip(files, modes):
    os.makedirs(os.path.dirname(f"{root}/{f}"), exist_ok=True)
    if mode is None:
        open(f"{root}/{f}", "w").write("not an image")
        continue
    image = Image.fromarray(rng.integers(0, 255, (int(rng.integers(30, 90)), 47, 4), dtype=np.uint8), "RGBA").convert(mode)
    image.save(f"{root}/{f}")
"#;
    python(script, &[root.to_str().unwrap()], "");
    let pipeline = dir.path().join("p.toml");
    std::fs::write(
        &pipeline,
        r#"
[nodes.set]
kind = "image_folder"
path = "zeroshot/test"
[nodes.pixels]
kind = "preprocess"
input = "set"
resolution = 64
order = "convert_then_resize"
[nodes.out]
kind = "write_parquet"
input = "pixels"
path = "out/set.parquet"
"#,
    )
    .unwrap();
    ok(cnclip(&["run", pipeline.to_str().unwrap()]));
    let check = r#"
import json, sys, numpy as np, pyarrow.parquet as pq
from torchvision.datasets import ImageFolder
from cn_clip.clip.utils import image_transform
resize = image_transform(64).transforms[0]
folder = ImageFolder(sys.argv[1])
t = pq.read_table(sys.argv[2]).to_pydict()
samples = [(p[len(sys.argv[1]) + 1:], label) for p, label in folder.samples]
ours = list(zip(t["path"], t["label"]))
worst = 0
for k, (path, _) in enumerate(folder.samples):
    ref = np.array(resize(folder.loader(path)), dtype=np.int16)
    got = np.frombuffer(t["pixels"][k], dtype=np.uint8).reshape(64, 64, 3).astype(np.int16)
    worst = max(worst, int(np.abs(ref - got).max()))
print(json.dumps({"same_order": samples == ours, "ids": t["image_id"] == list(range(len(samples))), "n": len(samples), "worst": worst}))
"#;
    let report =
        json(&python(check, &[root.to_str().unwrap(), dir.path().join("out/set.parquet").to_str().unwrap()], ""));
    assert_eq!(report, json(r#"{"same_order": true, "ids": true, "n": 7, "worst": 0}"#));
}

#[test]
fn feature_json_lines_match_python_json_dumps() {
    let dir = tempfile::tempdir().unwrap();
    let make = r#"
import json, sys, numpy as np, pyarrow as pa, pyarrow.parquet as pq
rng = np.random.default_rng(5)
feats = (rng.standard_normal((50, 8)) * np.logspace(-9, 9, 8)).astype(np.float32)
feats[0, :3] = [0.0, -0.0, 1.0]
ids = pa.array(np.arange(50, dtype=np.int64) * 7919)
col = pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1), pa.float32()), 8)
schema = pa.schema([pa.field("id", pa.int64(), False), pa.field("feature", pa.list_(pa.field("item", pa.float32(), False), 8), False)])
pq.write_table(pa.Table.from_arrays([ids, col], schema=schema), sys.argv[1])
with open(sys.argv[2], "w") as f:
    for i, row in zip(ids.to_pylist(), feats):
        f.write(json.dumps({"image_id": i, "feature": row.tolist()}) + "\n")
"#;
    let (table, expected) = (dir.path().join("f.parquet"), dir.path().join("expected.jsonl"));
    python(make, &[table.to_str().unwrap(), expected.to_str().unwrap()], "");
    let pipeline = dir.path().join("p.toml");
    std::fs::write(
        &pipeline,
        r#"
[nodes.f]
kind = "parquet"
paths = ["f.parquet"]
[nodes.out]
kind = "write_jsonl"
input = "f"
path = "out/image_feat.jsonl"
rename = { id = "image_id" }
"#,
    )
    .unwrap();
    ok(cnclip(&["run", pipeline.to_str().unwrap()]));
    let ours = std::fs::read_to_string(dir.path().join("out/image_feat.jsonl")).unwrap();
    let theirs = std::fs::read_to_string(&expected).unwrap();
    for (a, b) in ours.lines().zip(theirs.lines()) {
        assert_eq!(a, b);
    }
    assert_eq!(ours.lines().count(), 50);
}

#[test]
fn tokenize_transform_matches_cn_clip_tokenize() {
    let dir = tempfile::tempdir().unwrap();
    let texts: Vec<String> = [
        "一只可爱的小猫",
        "A photo of a DOG, “quoted” — 中英混合 123",
        "",
        "超长的文本超长的文本超长的文本超长的文本超长的文本超长的文本超长的文本超长的文本超长的文本超长的文本",
        "emoji 😀 and accents café naïve",
        "tab\tand\u{200b}zero width",
    ]
    .map(String::from)
    .to_vec();
    let mut jsonl = String::new();
    for (i, text) in texts.iter().enumerate() {
        jsonl += &serde_json::json!({"text_id": i, "text": text, "image_ids": []}).to_string();
        jsonl.push('\n');
    }
    std::fs::write(dir.path().join("texts.jsonl"), jsonl).unwrap();
    std::fs::write(
        dir.path().join("p.toml"),
        r#"
[nodes.texts]
kind = "jsonl"
paths = ["texts.jsonl"]
[nodes.tokens]
kind = "tokenize"
input = "texts"
context_length = 24
[nodes.out]
kind = "write_parquet"
input = "tokens"
path = "tokens.parquet"
"#,
    )
    .unwrap();
    ok(cnclip(&["run", dir.path().join("p.toml").to_str().unwrap()]));
    let ours = parquet_column(&dir.path().join("tokens.parquet"), "token_ids");
    let theirs = cnclip_tests::reference_token_ids(&texts, 24);
    assert_eq!(ours, serde_json::to_value(theirs).unwrap());
}

#[test]
fn structural_faults_fail_with_clear_messages() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // A Parquet file with the wrong columns for its contract, a file that is not Parquet, and a
    // directory that is not an LMDB.
    python(
        "import sys, pyarrow as pa, pyarrow.parquet as pq\npq.write_table(pa.table({'id': [1], 'words': ['x']}), sys.argv[1])",
        &[root.join("wrong.parquet").to_str().unwrap()],
        "",
    );
    std::fs::write(root.join("broken.parquet"), b"PAR1 this is not a parquet file").unwrap();
    std::fs::create_dir_all(root.join("empty/imgs")).unwrap();
    std::fs::write(
        root.join("p.toml"),
        r#"
[nodes.wrong]
kind = "parquet"
paths = ["wrong.parquet"]
table = "texts"
[nodes.wrong_out]
kind = "write_jsonl"
input = "wrong"
path = "a.jsonl"
[nodes.broken]
kind = "parquet"
paths = ["broken.parquet"]
[nodes.broken_out]
kind = "write_parquet"
input = "broken"
path = "b.parquet"
[nodes.lmdb]
kind = "lmdb"
path = "empty"
database = "imgs"
[nodes.lmdb_out]
kind = "write_tsv"
input = "lmdb"
path = "c.tsv"
"#,
    )
    .unwrap();
    let output = cnclip(&["run", root.join("p.toml").to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    for problem in [
        "table `texts` does not match its contract: missing column `text_id` (Int64); missing column `text` (Utf8)",
        "broken.parquet:",
        "empty/imgs is not an LMDB (no data.mdb)",
    ] {
        assert!(stderr.contains(problem), "missing {problem:?} in:\n{stderr}");
    }
}

/// The pipelines in `examples/pipelines/` run as documented on the demo corpus
/// (`cnclip synth --out demo` + `cnclip build-lmdb`), laid out as in the repository.
#[test]
fn example_pipelines_run_on_the_demo_corpus() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let examples = cnclip_tests::workspace_root().join("examples/pipelines");
    std::fs::create_dir_all(root.join("examples/pipelines")).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(&examples)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".toml"))
        .collect();
    names.sort();
    assert!(names.len() >= 4, "{names:?}");
    for name in &names {
        std::fs::copy(examples.join(name), root.join("examples/pipelines").join(name)).unwrap();
    }
    let demo = root.join("demo");
    let demo_s = demo.to_str().unwrap();
    ok(cnclip(&[
        "synth",
        "--out",
        demo_s,
        "--train",
        "40",
        "--valid",
        "10",
        "--test",
        "10",
        "--zeroshot-per-class",
        "2",
    ]));
    ok(cnclip(&["build-lmdb", "--data-dir", demo_s, "--splits", "train"]));
    for name in &names {
        let log = ok(cnclip(&["run", root.join("examples/pipelines").join(name).to_str().unwrap()]));
        assert!(log.contains("0 records quarantined"), "{name}: {log}");
    }
    let tables = demo.join("tables");
    let rows = |file: &str, column: &str| parquet_column(&tables.join(file), column).as_array().unwrap().len();
    assert_eq!(rows("pixels_224.parquet", "image_id"), 60);
    assert_eq!(rows("zeroshot_pixels_224.parquet", "label"), 36); // 18 classes × 2
    assert_eq!(rows("train_images.parquet", "image_id"), 40);
    assert_eq!(rows("train_pairs.parquet", "text_id"), 40);
    assert_eq!(std::fs::read_to_string(tables.join("train_pairs.jsonl")).unwrap().lines().count(), 40);
    assert_eq!(rows("texts_tokens.parquet", "token_ids"), 50);
}

/// LMDB keys are unique: with deduplication turned off, an image id written twice into an
/// `imgs` database stops the job naming the id, and no database is left behind; with it on (the
/// default) the repeat is quarantined and the database holds the first one.
#[test]
fn a_repeated_id_written_to_lmdb_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::write(root.join("imgs.tsv"), "7\taGVsbG8=\n8\td29ybGQ=\n7\tYWdhaW4=\n").unwrap();
    let pipeline = |dedupe: bool| {
        let path = root.join(format!("p_{dedupe}.toml"));
        std::fs::write(
            &path,
            format!(
                "[nodes.imgs]\nkind = \"tsv\"\npaths = [\"imgs.tsv\"]\ndedupe = {dedupe}\n\
                 [nodes.out]\nkind = \"write_lmdb\"\ninput = \"imgs\"\npath = \"out_{dedupe}/imgs\"\ndatabase = \"imgs\"\n"
            ),
        )
        .unwrap();
        cnclip(&["run", path.to_str().unwrap()])
    };
    let failed = pipeline(false);
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success());
    assert!(stderr.contains("key 7 was put twice"), "{stderr}");
    assert!(!root.join("out_false/imgs").exists());
    assert!(
        std::fs::read_dir(root.join("out_false")).map_or(true, |mut d| d.next().is_none()),
        "leftovers in out_false"
    );

    ok(pipeline(true));
    let stored = python(
        "import lmdb, sys\nenv = lmdb.open(sys.argv[1], readonly=True, lock=False)\nwith env.begin() as txn:\n    print(sorted((bytes(k).decode(), bytes(v).decode()) for k, v in txn.cursor()))",
        &[root.join("out_true/imgs").to_str().unwrap()],
        "",
    );
    assert_eq!(stored.trim(), "[('7', 'aGVsbG8='), ('8', 'd29ybGQ='), ('num_images', '2')]");
}

/// An image of an image folder that does not decode is quarantined by its file (relative to the
/// folder), not by the row number the source gave it.
#[test]
fn image_folder_decode_failures_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("zeroshot");
    python(
        "import os, sys\nfrom PIL import Image\nroot = sys.argv[1]\nfor c in ['000', '001']:\n    os.makedirs(f'{root}/{c}')\n    Image.new('RGB', (9, 7), (200, 10, 10)).save(f'{root}/{c}/good.png')\nopen(f'{root}/001/broken.jpg', 'wb').write(b'\\xff\\xd8\\xff not a jpeg')\n",
        &[root.to_str().unwrap()],
        "",
    );
    let toml = dir.path().join("folder.toml");
    std::fs::write(
        &toml,
        "[job]\nquarantine = \"q.jsonl\"\n[nodes.images]\nkind = \"image_folder\"\npath = \"zeroshot\"\n\
         [nodes.pixels]\nkind = \"preprocess\"\ninput = \"images\"\nresolution = 8\norder = \"convert_then_resize\"\n\
         [nodes.out]\nkind = \"write_parquet\"\ninput = \"pixels\"\npath = \"pixels.parquet\"\n",
    )
    .unwrap();
    ok(cnclip(&["run", toml.to_str().unwrap()]));
    let quarantine = std::fs::read_to_string(dir.path().join("q.jsonl")).unwrap();
    let row = json(quarantine.lines().next().unwrap());
    assert_eq!(quarantine.lines().count(), 1, "{quarantine}");
    assert_eq!(row["location"], "001/broken.jpg", "{row}");
    assert_eq!(parquet_column(&dir.path().join("pixels.parquet"), "label"), serde_json::json!([0, 1]));
}

/// Tables written by pyarrow declare every column nullable: export takes them when they hold no
/// null, and names the column when one does.
#[test]
fn nullable_columns_without_nulls_are_exported() {
    let dir = tempfile::tempdir().unwrap();
    let tables = dir.path().join("tables");
    python(
        "import sys, os, pyarrow as pa, pyarrow.parquet as pq\nout = sys.argv[1]\nos.makedirs(out)\n\
         pq.write_table(pa.table({'image_id': [1, 2], 'image': [b'\\xff\\xd8a', b'\\xff\\xd8b']}), f'{out}/train_images.parquet')\n\
         pq.write_table(pa.table({'text_id': [7, 8], 'text': ['一', '二'], 'image_ids': [[1], [2]]}), f'{out}/train_texts.parquet')\n\
         pq.write_table(pa.table({'image_id': [1, None], 'image': [b'a', b'b']}), f'{out}/valid_images.parquet')\n\
         pq.write_table(pa.table({'text_id': [7], 'text': ['一'], 'image_ids': [[1]]}), f'{out}/valid_texts.parquet')\n",
        &[tables.to_str().unwrap()],
        "",
    );
    let out = dir.path().join("out");
    let (t, o) = (tables.to_str().unwrap(), out.to_str().unwrap());
    ok(cnclip(&["export", "--parquet-dir", t, "--splits", "train", "--out", o]));
    assert_eq!(std::fs::read_to_string(out.join("train_imgs.tsv")).unwrap().lines().count(), 2);
    assert_eq!(std::fs::read_to_string(out.join("train_texts.jsonl")).unwrap().lines().count(), 2);
    let failed = cnclip(&["export", "--parquet-dir", t, "--splits", "valid", "--out", o]);
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success(), "a null id was exported");
    assert!(stderr.contains("valid_images.parquet") && stderr.contains("column `image_id` holds a null"), "{stderr}");
    assert!(!out.join("valid_imgs.tsv").exists());
}

/// What export writes for cn_clip, cn_clip reads (issue #10): repeated image and text ids are
/// quarantined (the first kept), a text's reference to a missing image is quarantined (its
/// other images kept) — with either LMDB writer, cn_clip's datasets then read every record;
/// and base64 without its `=` padding, written to LMDB by a pipeline, is stored padded.
#[test]
fn export_writes_only_what_cn_clip_reads() {
    use crate::lmdb::{PNG_A, PNG_B, cn_clip_reads_every_record};
    let dir = tempfile::tempdir().unwrap();
    let tables = dir.path().join("tables");
    python(
        "import base64, sys, os, pyarrow as pa, pyarrow.parquet as pq\nout, a, b = sys.argv[1:]\nos.makedirs(out)\n\
         a, b = base64.urlsafe_b64decode(a), base64.urlsafe_b64decode(b)\n\
         pq.write_table(pa.table({'image_id': [1, 2, 2, 3], 'image': [a, b, a, a]}), f'{out}/train_images.parquet')\n\
         pq.write_table(pa.table({'text_id': [10, 11, 12, 10], 'text': ['一', '二', '三', '重复'],\n\
                                  'image_ids': [[1, 9], [8], [2, 3], [1]]}), f'{out}/train_texts.parquet')\n",
        &[tables.to_str().unwrap(), PNG_A, PNG_B],
        "",
    );
    for writer in ["bulk", "txn"] {
        let out = dir.path().join(writer);
        let (t, o) = (tables.to_str().unwrap(), out.to_str().unwrap());
        let stderr = ok(cnclip(&[
            "export",
            "--parquet-dir",
            t,
            "--splits",
            "train",
            "--out",
            o,
            "--format",
            "lmdb",
            "--writer",
            writer,
        ]));
        assert!(stderr.contains("train: 3 images, 3 pairs, 4 quarantined"), "{stderr}");
        let quarantine = std::fs::read_to_string(out.join("train_quarantine.jsonl")).unwrap();
        let mut reasons: Vec<String> = quarantine
            .lines()
            .map(json)
            .map(|r| format!("{}: {}", r["location"].as_str().unwrap(), r["reason"].as_str().unwrap()))
            .collect();
        reasons.sort();
        assert_eq!(reasons.len(), 4, "{reasons:?}");
        assert_eq!(reasons[0], "image 2: duplicate image id (the first one is kept)");
        assert_eq!(reasons[1], "text 10: duplicate text id (the first one is kept)");
        assert!(reasons[2].starts_with("text 10: image 9 is not in ") && reasons[2].contains("train_images.parquet"));
        assert!(reasons[3].starts_with("text 11: image 8 is not in "), "{reasons:?}");
        // Pairs (1, 10), (2, 12), (3, 12); images 1, 2, 3.
        assert_eq!(cn_clip_reads_every_record(&out.join("train")), (3, 3), "{writer}");
    }

    // TSV base64 without padding, through a pipeline into an LMDB split.
    let root = dir.path().join("unpadded");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(
        root.join("imgs.tsv"),
        format!("1\t{}\n2\t{}\n", PNG_A.trim_end_matches('='), PNG_B.trim_end_matches('=')),
    )
    .unwrap();
    std::fs::write(root.join("texts.jsonl"), "{\"text_id\": 5, \"text\": \"猫\", \"image_ids\": [1, 2]}\n").unwrap();
    let toml = root.join("p.toml");
    std::fs::write(
        &toml,
        "[nodes.imgs]\nkind = \"tsv\"\npaths = [\"imgs.tsv\"]\n\
         [nodes.texts]\nkind = \"jsonl\"\npaths = [\"texts.jsonl\"]\n\
         [nodes.imgs_out]\nkind = \"write_lmdb\"\ninput = \"imgs\"\npath = \"split/imgs\"\ndatabase = \"imgs\"\n\
         [nodes.pairs_out]\nkind = \"write_lmdb\"\ninput = \"texts\"\npath = \"split/pairs\"\ndatabase = \"pairs\"\n",
    )
    .unwrap();
    ok(cnclip(&["run", toml.to_str().unwrap()]));
    assert_eq!(cn_clip_reads_every_record(&root.join("split")), (2, 2));
}

/// `discard` counts what reaches it and writes nothing; what its upstream quarantines is still
/// recorded.
#[test]
fn discard_counts_its_rows_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path(), 25);
    // One line that is not `id<TAB>base64`.
    let mut imgs = std::fs::read_to_string(data.join("train_imgs.tsv")).unwrap();
    imgs.push_str("not a record\n");
    std::fs::write(data.join("train_imgs.tsv"), imgs).unwrap();
    let pipeline = dir.path().join("p.toml");
    std::fs::write(
        &pipeline,
        "[nodes.imgs]\nkind = \"tsv\"\npaths = [\"data/train_imgs.tsv\"]\n\
         [nodes.images]\nkind = \"decode_base64\"\ninput = \"imgs\"\n\
         [nodes.nothing]\nkind = \"discard\"\ninput = \"images\"\n",
    )
    .unwrap();
    let before: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    let log = ok(cnclip(&["run", pipeline.to_str().unwrap()]));
    let rows = std::fs::read_to_string(data.join("train_imgs.tsv")).unwrap().lines().count() - 1;
    assert!(log.contains(&format!("{rows} rows → /dev/null")), "{log}");
    let quarantine = std::fs::read_to_string(dir.path().join("quarantine.jsonl")).unwrap();
    assert_eq!(quarantine.lines().count(), 1, "{quarantine}");
    let after: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(after.len(), before.len() + 1, "only the quarantine was written: {after:?}");
}
