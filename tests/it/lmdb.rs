//! `cnclip build-lmdb` against cn_clip's `build_lmdb_dataset.py` (issue #4): same keys, equal
//! (and byte-equal) values, and cn_clip's own `LMDBDataset` / `EvalImgDataset` yield the same
//! samples from our databases as from theirs. Plus quarantine of bad lines and `--shards`.

use std::path::Path;
use std::process::Command;

use cnclip_tests::python;

/// Writes a small cn_clip-layout corpus: `{split}_imgs.tsv` (URL-safe base64 of JPEG/PNG
/// images, as cn_clip's tools write) and `{split}_texts.jsonl`.
const MAKE_CORPUS: &str = r#"
import base64, io, json, sys, numpy as np
from PIL import Image
out, n = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
for split in ("train", "valid"):
    with open(f"{out}/{split}_imgs.tsv", "w") as f:
        for i in range(n):
            image = Image.fromarray(rng.integers(0, 255, (int(rng.integers(20, 60)), int(rng.integers(20, 60)), 3), dtype=np.uint8))
            buf = io.BytesIO()
            image.save(buf, format="JPEG" if i % 2 else "PNG")
            f.write(f"{1000 + i}\t{base64.urlsafe_b64encode(buf.getvalue()).decode()}\n")
    with open(f"{out}/{split}_texts.jsonl", "w") as f:
        for t in range(n // 2):
            ids = [1000 + int(x) for x in rng.choice(n, size=int(rng.integers(1, 4)), replace=False)]
            f.write(json.dumps({"text_id": t, "text": f"第{t}张图：一只猫 “Cute” cat #{t}", "image_ids": ids}, ensure_ascii=False) + "\n")
"#;

fn build_lmdb(args: &[&str]) -> std::process::Output {
    Command::new(cnclip_tests::cnclip_bin()).arg("build-lmdb").args(args).output().unwrap()
}

/// cn_clip's own `build_lmdb_dataset.py` on `splits` of `data`, into `out`.
fn cn_clip_build_lmdb(data: &str, splits: &str, out: &Path) {
    let output = Command::new(cnclip_tests::venv_python())
        .args(["-m", "cn_clip.preprocess.build_lmdb_dataset", "--data_dir", data, "--splits", splits])
        .args(["--lmdb_dir", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}

pub(crate) fn corpus(dir: &Path, n: usize) -> String {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    python(MAKE_CORPUS, &[data.to_str().unwrap(), &n.to_string()], "");
    data.display().to_string()
}

/// Compares two LMDB directories with py-lmdb: keys, raw values, unpickled pair values.
const COMPARE: &str = r#"
import json, lmdb, pickle, sys
def read(path):
    env = lmdb.open(path, readonly=True, lock=False)
    with env.begin() as txn:
        return {bytes(k): bytes(v) for k, v in txn.cursor()}
report = {}
for db in ("imgs", "pairs"):
    a, b = read(f"{sys.argv[1]}/{db}"), read(f"{sys.argv[2]}/{db}")
    unpickle = (lambda k, v: v if k.startswith(b"num_") else pickle.loads(v)) if db == "pairs" else (lambda k, v: v)
    report[db] = {"keys": len(a), "same_keys": a.keys() == b.keys(),
                  "same_bytes": a == b,
                  "same_values": all(unpickle(k, a[k]) == unpickle(k, b[k]) for k in a if k in b)}
print(json.dumps(report))
"#;

#[test]
fn build_lmdb_matches_cn_clip_and_its_datasets_read_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path(), 40);
    let (theirs, ours) = (dir.path().join("theirs"), dir.path().join("ours"));
    cn_clip_build_lmdb(&data, "train,valid", &theirs);
    let output = build_lmdb(&["--data-dir", &data, "--splits", "train,valid", "--lmdb-dir", ours.to_str().unwrap()]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));

    for split in ["train", "valid"] {
        let report: serde_json::Value = serde_json::from_str(&python(
            COMPARE,
            &[theirs.join(split).to_str().unwrap(), ours.join(split).to_str().unwrap()],
            "",
        ))
        .unwrap();
        for db in ["imgs", "pairs"] {
            assert_eq!(report[db]["same_keys"], true, "{split}/{db}: {report}");
            assert_eq!(report[db]["same_values"], true, "{split}/{db}: {report}");
            assert_eq!(report[db]["same_bytes"], true, "{split}/{db}: {report}");
        }
        assert_eq!(report["imgs"]["keys"], 41); // 40 images + num_images
    }

    // cn_clip's training and eval datasets, on both databases, sample by sample.
    let script = r#"
import sys, torch
from cn_clip.training.data import LMDBDataset
from cn_clip.eval.data import EvalImgDataset
a, b = LMDBDataset(sys.argv[1], split="train"), LMDBDataset(sys.argv[2], split="train")
assert len(a) == len(b), (len(a), len(b))
for i in range(len(a)):
    (ia, ta, ea), (ib, tb, eb) = a[i], b[i]
    assert torch.equal(ia, ib) and torch.equal(ta, tb) and ea == eb, i
c, d = EvalImgDataset(sys.argv[1] + "/imgs"), EvalImgDataset(sys.argv[2] + "/imgs")
assert len(c) == len(d)
for i in range(len(c)):
    (xa, pa), (xb, pb) = c[i], d[i]
    assert xa == xb and torch.equal(pa, pb), i
print(len(a), len(c))
"#;
    let counts = python(script, &[theirs.join("train").to_str().unwrap(), ours.join("train").to_str().unwrap()], "");
    assert!(counts.trim().ends_with(" 40"), "{counts}");
}

/// Two 1-pixel-wide PNGs, URL-safe base64: one whose encoding ends in `==`, one in `=`.
pub(crate) const PNG_A: &str =
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAACCAIAAAAW4yFwAAAAEElEQVR4nGM4wSXHxMDAAAAGWgDz0V8rQgAAAABJRU5ErkJggg==";
pub(crate) const PNG_B: &str =
    "iVBORw0KGgoAAAANSUhEUgAAAAMAAAABCAIAAACUgoPjAAAAC0lEQVR4nGNggAEAAAoAAX-AdF4AAAAASUVORK5CYII=";

/// cn_clip's own datasets over every record of the LMDB split `split_dir`: `LMDBDataset` loads
/// each pair (its image decoded, its text tokenized), `EvalImgDataset` each image. Returns how
/// many pairs and images they read; any record they cannot read fails the test.
pub(crate) fn cn_clip_reads_every_record(split_dir: &Path) -> (usize, usize) {
    let script = r#"
import sys
from cn_clip.training.data import LMDBDataset
from cn_clip.eval.data import EvalImgDataset
pairs = LMDBDataset(sys.argv[1], split="val", resolution=32)
for i in range(pairs.number_samples):
    pairs[i]
images = EvalImgDataset(sys.argv[1] + "/imgs", resolution=32)
ids = {images[i][0] for i in range(len(images))}
assert len(ids) == len(images), (len(ids), len(images))
print(pairs.number_samples, len(images))
"#;
    let counts = python(script, &[split_dir.to_str().unwrap()], "");
    let mut counts = counts.split_whitespace().map(|n| n.parse::<usize>().unwrap());
    (counts.next().unwrap(), counts.next().unwrap())
}

#[test]
fn bad_lines_are_quarantined_or_fail_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(
        data.join("test_imgs.tsv"),
        format!(
            "1\t{PNG_A}\r\n2\tnot base64!\nabc\taGk=\n3\t\n4\t{PNG_B}\n4\t{PNG_A}\n5 no tab\n6\t{}\n",
            PNG_A.trim_end_matches('=')
        ),
    )
    .unwrap();
    let mut texts = Vec::new();
    texts.extend_from_slice("{\"text_id\": 10, \"text\": \"好\", \"image_ids\": [1, 4, 6]}\n".as_bytes());
    texts.extend_from_slice(b"{\"text_id\": 11, \"text\": \"missing ids\"}\n{not json\n\xff\xfe\n");
    texts.extend_from_slice(b"{\"text_id\": \"12\", \"text\": \"string id\", \"image_ids\": [1]}\n");
    texts.extend_from_slice(b"{\"text_id\": 13, \"text\": \"unknown image\", \"image_ids\": [1, 99]}\n");
    texts.extend_from_slice(b"{\"text_id\": 10, \"text\": \"duplicate\", \"image_ids\": [1]}\n");
    std::fs::write(data.join("test_texts.jsonl"), texts).unwrap();
    let out = dir.path().join("lmdb");
    let output =
        build_lmdb(&["--data-dir", data.to_str().unwrap(), "--splits", "test", "--lmdb-dir", out.to_str().unwrap()]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("3 images, 4 pairs, 11 quarantined"), "{stderr}");

    let quarantine = std::fs::read_to_string(out.join("test/quarantine.jsonl")).unwrap();
    let reasons: Vec<String> = quarantine
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            format!(
                "{} {}: {}",
                v["source"].as_str().unwrap().rsplit('/').next().unwrap(),
                v["location"].as_str().unwrap(),
                v["reason"].as_str().unwrap()
            )
        })
        .collect();
    let expected = [
        "test_imgs.tsv line 2: byte 3 of the base64 field is ' ', not base64",
        "test_imgs.tsv line 3: image id is not an integer",
        "test_imgs.tsv line 4: empty image value",
        "test_imgs.tsv image 4: duplicate image id (the first one is kept)",
        "test_imgs.tsv line 7: no tab: expected image_id<TAB>base64",
        "test_texts.jsonl line 2: missing field `image_ids`",
    ];
    for (got, want) in reasons.iter().zip(expected) {
        assert_eq!(got, want);
    }
    assert!(reasons[6].starts_with("test_texts.jsonl line 3: malformed JSON"), "{reasons:?}");
    assert!(reasons[7].starts_with("test_texts.jsonl line 4: not valid UTF-8"), "{reasons:?}");
    assert_eq!(reasons[8], "test_texts.jsonl line 5: text_id is not an integer");
    assert!(reasons[9].starts_with("test_texts.jsonl text 13: image 99 is not in"), "{reasons:?}");
    assert_eq!(reasons[10], "test_texts.jsonl text 10: duplicate text id (the first one is kept)");
    assert_eq!(reasons.len(), 11);

    // Every good record is in the database: images 1, 4, 6; pairs (1,10), (4,10), (6,10), (1,13).
    let script = r#"
import json, lmdb, pickle, sys
def read(path):
    env = lmdb.open(path, readonly=True, lock=False)
    with env.begin() as txn:
        return {bytes(k).decode(): bytes(v) for k, v in txn.cursor()}
imgs, pairs = read(sys.argv[1] + "/imgs"), read(sys.argv[1] + "/pairs")
print(json.dumps({"imgs": sorted(imgs), "pairs": sorted(pickle.loads(v)[:2] for k, v in pairs.items() if k != "num_samples"),
                  "num_images": imgs["num_images"].decode(), "num_samples": pairs["num_samples"].decode()}))
"#;
    let stored: serde_json::Value =
        serde_json::from_str(&python(script, &[out.join("test").to_str().unwrap()], "")).unwrap();
    assert_eq!(stored["imgs"], serde_json::json!(["1", "4", "6", "num_images"]));
    assert_eq!(stored["pairs"], serde_json::json!([[1, 10], [1, 13], [4, 10], [6, 10]]));
    assert_eq!((stored["num_images"].as_str(), stored["num_samples"].as_str()), (Some("3"), Some("4")));
    // Image 6's base64 came without its `==`: stored padded, cn_clip reads every record.
    assert_eq!(cn_clip_reads_every_record(&out.join("test")), (4, 3));

    // --on-error fail stops at the first bad line, names it, and leaves no database behind.
    let failed = dir.path().join("failed");
    let output = build_lmdb(&[
        "--data-dir",
        data.to_str().unwrap(),
        "--splits",
        "test",
        "--lmdb-dir",
        failed.to_str().unwrap(),
        "--on-error",
        "fail",
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("test_imgs.tsv line 2") && stderr.contains("not base64"), "{stderr}");
    assert!(!failed.join("test").exists());
    let left: Vec<_> = std::fs::read_dir(&failed).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "a failed build leaves nothing behind: {left:?}");

    // A missing file is structural: always an error, naming it.
    let output = build_lmdb(&[
        "--data-dir",
        data.to_str().unwrap(),
        "--splits",
        "nosuch",
        "--lmdb-dir",
        failed.to_str().unwrap(),
    ]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("nosuch_imgs.tsv does not exist"));
}

/// An image id written `0007` or `+8` in the TSV is stored under `7` and `8`: the keys cn_clip's
/// `LMDBDataset` looks up for the pairs' integer ids (`build_lmdb_dataset.py` stores the text as
/// written, under which its own reader then finds no image).
#[test]
fn an_image_id_with_leading_zeros_is_stored_under_the_key_cn_clips_reader_looks_up() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("test_imgs.tsv"), format!("0007\t{PNG_A}\n+8\t{PNG_B}\n")).unwrap();
    std::fs::write(
        data.join("test_texts.jsonl"),
        "{\"text_id\": 1, \"text\": \"猫\", \"image_ids\": [7, 8]}\n{\"text_id\": 2, \"text\": \"狗\", \"image_ids\": [8]}\n",
    )
    .unwrap();
    let out = dir.path().join("lmdb");
    let output =
        build_lmdb(&["--data-dir", data.to_str().unwrap(), "--splits", "test", "--lmdb-dir", out.to_str().unwrap()]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let keys: Vec<String> =
        mdb_dump(&out.join("test/imgs")).into_iter().filter(|l| l != "DATA=END").step_by(2).collect();
    assert_eq!(keys, [hex_key("7"), hex_key("8"), hex_key("num_images")]);
    assert_eq!(cn_clip_reads_every_record(&out.join("test")), (3, 2));
}

/// A key as `mdb_dump` writes it (hex bytes after a space).
fn hex_key(key: &str) -> String {
    format!(" {}", key.bytes().map(|b| format!("{b:02x}")).collect::<String>())
}

#[test]
fn shards_are_self_contained_and_together_hold_everything() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path(), 30);
    let (one, three) = (dir.path().join("one"), dir.path().join("three"));
    for (out, shards) in [(&one, "1"), (&three, "3")] {
        let output = build_lmdb(&[
            "--data-dir",
            &data,
            "--splits",
            "train",
            "--lmdb-dir",
            out.to_str().unwrap(),
            "--shards",
            shards,
        ]);
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    }
    let script = r#"
import json, lmdb, pickle, sys
from cn_clip.training.data import LMDBDataset
def pairs(path):
    env = lmdb.open(path + "/pairs", readonly=True, lock=False)
    with env.begin() as txn:
        return [pickle.loads(bytes(v)) for k, v in txn.cursor() if bytes(k) != b"num_samples"]
def images(path):
    env = lmdb.open(path + "/imgs", readonly=True, lock=False)
    with env.begin() as txn:
        return {bytes(k) for k, _ in txn.cursor() if bytes(k) != b"num_images"}
whole = sorted(pairs(sys.argv[1]))
sharded, total_images = [], 0
for i in range(3):
    shard = f"{sys.argv[2]}/shard_{i:03}"
    ps, ims = pairs(shard), images(shard)
    assert all(str(p[0]).encode() in ims for p in ps), "a pair's image lives in another shard"
    assert all(int(k) % 3 == i for k in ims)
    dataset = LMDBDataset(shard, split="train")  # cn_clip reads each shard on its own
    for j in range(len(dataset)):
        dataset[j]
    sharded += ps
    total_images += len(ims)
print(json.dumps({"same_pairs": sorted(sharded) == whole, "images": total_images}))
"#;
    let report: serde_json::Value = serde_json::from_str(&python(
        script,
        &[one.join("train").to_str().unwrap(), three.join("train").to_str().unwrap()],
        "",
    ))
    .unwrap();
    assert_eq!(report, serde_json::json!({"same_pairs": true, "images": 30}));
}

/// The other direction: our LMDB source reads what cn_clip's script wrote, and gets back the
/// TSV/JSONL records it was built from.
/// The same split as `build-lmdb --shards 3` through a pipeline file: `write_lmdb` with
/// `shards = 3` and `require_images` with `dedupe = true` give databases LMDB's own `mdb_dump`
/// cannot tell apart from build-lmdb's, shard by shard, on a corpus with a repeated text id.
#[test]
fn write_lmdb_shards_and_require_images_dedupe_give_build_lmdbs_databases() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path(), 30);
    let texts = Path::new(&data).join("train_texts.jsonl");
    let mut lines = std::fs::read_to_string(&texts).unwrap();
    let first = lines.lines().next().unwrap().to_string();
    lines.push_str(&first.replacen("第", "又第", 1));
    lines.push('\n');
    std::fs::write(&texts, lines).unwrap();
    let built = dir.path().join("built");
    let output =
        build_lmdb(&["--data-dir", &data, "--splits", "train", "--lmdb-dir", built.to_str().unwrap(), "--shards", "3"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let piped = dir.path().join("piped");
    let pipeline = dir.path().join("lmdb.toml");
    std::fs::write(
        &pipeline,
        format!(
            "[job]\nquarantine = \"{q}\"\n\
             [nodes.images]\nkind = \"tsv\"\npaths = [\"{data}/train_imgs.tsv\"]\n\
             [nodes.imgs]\nkind = \"write_lmdb\"\ninput = \"images\"\npath = \"{out}/imgs\"\ndatabase = \"imgs\"\nshards = 3\n\
             [nodes.texts]\nkind = \"jsonl\"\npaths = [\"{data}/train_texts.jsonl\"]\ndedupe = false\n\
             [nodes.with_images]\nkind = \"require_images\"\ninput = \"texts\"\nimages = [\"{data}/train_imgs.tsv\"]\ndedupe = true\n\
             [nodes.pairs]\nkind = \"write_lmdb\"\ninput = \"with_images\"\npath = \"{out}/pairs\"\ndatabase = \"pairs\"\nshards = 3\n",
            q = piped.join("quarantine.jsonl").display(),
            out = piped.join("train").display(),
        ),
    )
    .unwrap();
    let output = Command::new(cnclip_tests::cnclip_bin()).args(["run", pipeline.to_str().unwrap()]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    for shard in 0..3 {
        for db in ["imgs", "pairs"] {
            let at = |root: &Path| root.join(format!("train/shard_{shard:03}/{db}"));
            assert_eq!(mdb_dump(&at(&piped)), mdb_dump(&at(&built)), "shard {shard} {db}");
        }
    }
    assert!(!piped.join("train/imgs").exists() && !piped.join("train/pairs").exists());
    // The repeated text is quarantined by both, as the same record.
    let reasons = |path: &Path| {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| {
                let row: serde_json::Value = serde_json::from_str(l).unwrap();
                format!("{} {}", row["location"].as_str().unwrap(), row["reason"].as_str().unwrap())
            })
            .collect::<Vec<_>>()
    };
    let expected = vec!["text 0 duplicate text id (the first one is kept)".to_string()];
    assert_eq!(reasons(&built.join("train/quarantine.jsonl")), expected);
    assert_eq!(reasons(&piped.join("quarantine.jsonl")), expected);
}

/// `write_lmdb` with `shards` run again with fewer shards: the directory holds one set (the
/// extra shard of the earlier run removed) and no temporary directory is left.
#[test]
fn write_lmdb_shards_rerun_with_fewer_leaves_one_set_and_no_temporary_files() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path(), 12);
    let out = dir.path().join("out");
    let run = |shards: usize| {
        let pipeline = dir.path().join(format!("imgs{shards}.toml"));
        std::fs::write(
            &pipeline,
            format!(
                "[job]\nquarantine = \"{q}\"\n[nodes.images]\nkind = \"tsv\"\npaths = [\"{data}/train_imgs.tsv\"]\n\
                 [nodes.imgs]\nkind = \"write_lmdb\"\ninput = \"images\"\npath = \"{out}/imgs\"\ndatabase = \"imgs\"\n\
                 shards = {shards}\n",
                q = dir.path().join("q.jsonl").display(),
                out = out.display(),
            ),
        )
        .unwrap();
        let output =
            Command::new(cnclip_tests::cnclip_bin()).args(["run", pipeline.to_str().unwrap()]).output().unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    };
    run(3);
    assert!((0..3).all(|i| out.join(format!("shard_{i:03}/imgs/data.mdb")).is_file()));
    run(2);
    let mut left: Vec<String> =
        std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    left.sort();
    assert_eq!(left, ["shard_000", "shard_001", "shard_002"], "{left:?}");
    assert!(!out.join("shard_002/imgs").exists(), "the third shard of the earlier run is still there");
    // Every image once, in the shard of its id.
    let keys = |shard: usize| {
        let dump = mdb_dump(&out.join(format!("shard_{shard:03}/imgs")));
        // Key lines (hex, after a space), `num_images` (6e756d…) and `DATA=END` left out.
        dump.iter().step_by(2).filter(|k| k.starts_with(' ') && !k.trim().starts_with("6e756d")).count()
    };
    assert_eq!(keys(0) + keys(1), 12);
}

#[test]
fn lmdb_source_reads_cn_clip_databases() {
    use cnclip_operators::sources::{jsonl, lmdb, tsv};
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path(), 20);
    let theirs = dir.path().join("theirs");
    let output = Command::new(cnclip_tests::venv_python())
        .args([
            "-m",
            "cn_clip.preprocess.build_lmdb_dataset",
            "--data_dir",
            &data,
            "--splits",
            "train",
            "--lmdb_dir",
            theirs.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(output.status.success());
    let split = theirs.join("train");

    let mut images = std::collections::BTreeMap::new();
    lmdb::for_each_image(&split, |r| {
        let (id, b64) = r.unwrap();
        images.insert(id, b64.to_vec());
        Ok(())
    })
    .unwrap();
    let mut expected_images = std::collections::BTreeMap::new();
    tsv::for_each_line(
        Path::new(&data).join("train_imgs.tsv").as_path(),
        cnclip_operators::sources::MAX_RECORD_BYTES,
        |r| {
            let line = r.unwrap();
            expected_images.insert(line.image_id, line.base64.to_vec());
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(images, expected_images);

    let mut pairs = Vec::new();
    lmdb::for_each_pair(
        &split,
        |stray| panic!("{stray:?}"),
        |r| {
            let p = r.unwrap();
            pairs.push((p.image_id, p.text_id, p.text));
            Ok(())
        },
    )
    .unwrap();
    let mut expected_pairs = Vec::new();
    jsonl::for_each_line(
        Path::new(&data).join("train_texts.jsonl").as_path(),
        cnclip_operators::sources::MAX_RECORD_BYTES,
        |r| {
            let t = r.unwrap();
            expected_pairs.extend(t.image_ids.iter().map(|&i| (i, t.text_id, t.text.clone())));
            Ok(())
        },
    )
    .unwrap();
    // In sample order: key `i` holds the `i`-th pair of the texts file, as cn_clip writes them.
    assert_eq!(pairs, expected_pairs);
    assert_eq!(lmdb::counts(&split).unwrap(), (20, expected_pairs.len() as u64));
}

/// The bulk loader's files (no LMDB transaction writes them) against py-lmdb, the library
/// cn_clip reads them with: a tree three levels deep of inline and overflow values is iterated
/// in key order and looked up key by key; then py-lmdb deletes and inserts in it, and LMDB (via
/// lmdb-rkv) reads back exactly the expected contents. Values are derived from their keys
/// (`key` repeated to the length written in the key), so each side checks them on its own.
#[test]
fn bulk_loaded_lmdb_is_read_and_extended_by_py_lmdb() {
    use cnclip_operators::sinks::lmdb::{LmdbWriter, LmdbWriterKind};
    use lmdb::{Cursor, Transaction};
    use rand::{Rng, SeedableRng};

    fn value_of(key: &[u8]) -> Vec<u8> {
        let len: usize = std::str::from_utf8(key).unwrap().split('/').nth(1).unwrap().parse().unwrap();
        key.iter().copied().cycle().take(len).collect()
    }
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(46);
    let mut keys = Vec::new();
    let mut writer = LmdbWriter::create(dir.path(), LmdbWriterKind::Bulk).unwrap();
    for i in 0..5000 {
        let len = if rng.random_bool(0.3) { rng.random_range(2_000..40_000) } else { rng.random_range(0..1_500) };
        let long = if rng.random_bool(0.2) { "x".repeat(rng.random_range(100..400)) } else { String::new() };
        let key = format!("{:05}/{len}/{long}", (i * 7919) % 5000).into_bytes();
        writer.put(&key, &value_of(&key)).unwrap();
        keys.push(key);
    }
    writer.finish().unwrap();

    let script = r#"
import json, lmdb, sys
def value_of(key):
    n = int(key.split(b"/")[1])
    return (key * (n // len(key) + 1))[:n]
path = sys.argv[1]
env = lmdb.open(path, readonly=True, lock=False)
with env.begin() as txn:
    keys = [bytes(k) for k, v in txn.cursor() if bytes(v) == value_of(bytes(k))]
    looked_up = sum(txn.get(k) == value_of(k) for k in keys)
    stat = txn.stat()
env.close()
report = {"good": len(keys), "sorted": keys == sorted(keys), "looked_up": looked_up, "depth": stat["depth"], "entries": stat["entries"]}
env = lmdb.open(path, map_size=1 << 30)
with env.begin(write=True) as txn:
    for k in keys[::3]:
        txn.delete(k)
    for i in range(1000):
        k = b"%05d/%d/new" % (5000 + i, (i * 37) % 9000)
        txn.put(k, value_of(k))
env.close()
print(json.dumps(report))
"#;
    let report: serde_json::Value = serde_json::from_str(&python(script, &[dir.path().to_str().unwrap()], "")).unwrap();
    assert_eq!(report["good"], 5000, "{report}");
    assert_eq!(report["sorted"], true, "{report}");
    assert_eq!(report["looked_up"], 5000, "{report}");
    assert_eq!(report["entries"], 5000, "{report}");
    assert!(report["depth"].as_u64().unwrap() >= 3, "{report}");

    keys.sort();
    let mut expected: Vec<Vec<u8>> =
        keys.iter().enumerate().filter(|(i, _)| i % 3 != 0).map(|(_, k)| k.clone()).collect();
    expected.extend((0..1000).map(|i| format!("{:05}/{}/new", 5000 + i, (i * 37) % 9000).into_bytes()));
    expected.sort();
    let env = lmdb::Environment::new().open(dir.path()).unwrap();
    let db = env.open_db(None).unwrap();
    let txn = env.begin_ro_txn().unwrap();
    let mut cursor = txn.open_ro_cursor(db).unwrap();
    let mut read = Vec::new();
    for (key, value) in cursor.iter_start().map(Result::unwrap) {
        assert_eq!(value, &value_of(key)[..], "value of {}", String::from_utf8_lossy(key));
        read.push(key.to_vec());
    }
    assert_eq!(read, expected);
}

/// Runs one of LMDB's own command-line tools (`mdb_stat`, `mdb_dump`, `mdb_copy`, from
/// lmdb-utils) and returns its stdout.
///
/// # Panics
/// When the tool is missing (the test fails, not skips, saying how to install it) or fails.
fn mdb(tool: &str, args: &[&Path]) -> String {
    let output = match Command::new(tool).args(args).output() {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("{tool} not found: run scripts/setup.sh (it installs lmdb-utils: mdb_stat, mdb_dump, mdb_copy)")
        }
        Err(e) => panic!("cannot run {tool}: {e}"),
    };
    assert!(
        output.status.success(),
        "{tool} {args:?} failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("LMDB's tools print ASCII")
}

/// `mdb_stat -a`'s figures for the main database (`Tree depth`, `Branch pages`, `Leaf pages`,
/// `Overflow pages`, `Entries`).
fn mdb_stat(dir: &Path) -> std::collections::BTreeMap<String, u64> {
    let out = mdb("mdb_stat", &[Path::new("-a"), dir]);
    let main = out.split("Status of ").find(|s| s.starts_with("Main DB")).unwrap_or_else(|| panic!("{out}"));
    let stat: std::collections::BTreeMap<String, u64> = main
        .lines()
        .skip(1)
        .filter_map(|line| line.trim().split_once(": "))
        .map(|(name, value)| (name.to_string(), value.parse().unwrap()))
        .collect();
    assert!(stat.contains_key("Entries"), "{out}");
    stat
}

/// `mdb_dump`'s data lines (hex key and value lines, after the header, which holds the map size
/// and so differs between writers).
fn mdb_dump(dir: &Path) -> Vec<String> {
    let out = mdb("mdb_dump", &[dir]);
    let (_, data) = out.split_once("HEADER=END\n").unwrap_or_else(|| panic!("no header end in mdb_dump's output"));
    assert!(data.ends_with("DATA=END\n"), "mdb_dump's output is cut short");
    data.lines().map(str::to_string).collect()
}

/// `mdb_copy -c` (LMDB's compacting copy: it walks the tree and writes only the pages it
/// reaches) of `dir` into `copy`.
fn mdb_copy_compact(dir: &Path, copy: &Path) {
    std::fs::create_dir_all(copy).unwrap();
    mdb("mdb_copy", &[Path::new("-c"), dir, copy]);
}

/// LMDB's own tools on the same corpus built three ways: `build-lmdb --writer bulk`, `--writer
/// txn` and cn_clip's `build_lmdb_dataset.py`. `mdb_stat -a` reads each and counts the same
/// entries; `mdb_dump` of the three gives the same data lines; `mdb_copy -c` of the bulk-loaded
/// one succeeds, keeps every page (none is unreachable) and dumps the same again.
#[test]
fn lmdb_tools_read_bulk_txn_and_cn_clip_databases_alike() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path(), 40);
    let theirs = dir.path().join("theirs");
    cn_clip_build_lmdb(&data, "train", &theirs);
    let mut built = vec![theirs];
    for writer in ["bulk", "txn"] {
        let out = dir.path().join(writer);
        let output = build_lmdb(&[
            "--data-dir",
            &data,
            "--splits",
            "train",
            "--lmdb-dir",
            out.to_str().unwrap(),
            "--writer",
            writer,
        ]);
        assert!(output.status.success(), "--writer {writer}: {}", String::from_utf8_lossy(&output.stderr));
        built.push(out);
    }

    for db in ["imgs", "pairs"] {
        let [theirs, bulk, txn] = [0, 1, 2].map(|i| built[i].join("train").join(db));
        let entries: Vec<u64> = [&theirs, &bulk, &txn].map(|d| mdb_stat(d)["Entries"]).to_vec();
        assert_eq!(entries, vec![entries[0]; 3], "{db}: entries of cn_clip's, bulk, txn");
        if db == "imgs" {
            assert_eq!(entries[0], 41); // 40 images + num_images
        }
        let dump = mdb_dump(&bulk);
        assert_eq!(dump.len() as u64, 2 * entries[0] + 1, "{db}: a key line and a value line per entry");
        assert!(mdb_dump(&txn) == dump, "{db}: mdb_dump of --writer txn differs from --writer bulk");
        assert!(mdb_dump(&theirs) == dump, "{db}: mdb_dump of cn_clip's differs from --writer bulk");

        let copy = dir.path().join(format!("copy-{db}"));
        mdb_copy_compact(&bulk, &copy);
        assert!(mdb_dump(&copy) == dump, "{db}: mdb_dump of mdb_copy -c differs");
        assert_eq!(mdb_stat(&copy), mdb_stat(&bulk), "{db}: the compacted copy's tree");
        let size = |d: &Path| std::fs::metadata(d.join("data.mdb")).unwrap().len();
        assert_eq!(size(&copy), size(&bulk), "{db}: mdb_copy -c left out pages of the bulk-loaded file");
    }
}

/// The same with a deep tree, straight from the two writers: 5000 keys of up to ~400 bytes,
/// inline and overflow values. LMDB's tools find the same entries, data and overflow pages in
/// both, no more leaf pages in the bulk loader's tree (it fills them), and compacting it keeps
/// every page.
#[test]
fn lmdb_tools_read_a_deep_bulk_loaded_tree_as_written_by_transactions() {
    use cnclip_operators::sinks::lmdb::{LmdbWriter, LmdbWriterKind};
    use rand::{Rng, SeedableRng};

    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(47);
    let entries: Vec<(Vec<u8>, Vec<u8>)> = (0..5000)
        .map(|i| {
            let long = if rng.random_bool(0.2) { "x".repeat(rng.random_range(100..400)) } else { String::new() };
            let len = if rng.random_bool(0.3) { rng.random_range(2_000..40_000) } else { rng.random_range(0..1_500) };
            let mut value = vec![0u8; len];
            rng.fill(&mut value[..]);
            (format!("{:05}/{long}", (i * 7919) % 5000).into_bytes(), value)
        })
        .collect();
    let [bulk, txn] = ["bulk", "txn"].map(|name| dir.path().join(name));
    for (path, kind) in [(&bulk, LmdbWriterKind::Bulk), (&txn, LmdbWriterKind::Txn)] {
        let mut writer = LmdbWriter::create(path, kind).unwrap();
        for (key, value) in &entries {
            writer.put(key, value).unwrap();
        }
        writer.finish().unwrap();
    }

    let (bulk_stat, txn_stat) = (mdb_stat(&bulk), mdb_stat(&txn));
    assert_eq!((bulk_stat["Entries"], txn_stat["Entries"]), (5000, 5000));
    assert!(bulk_stat["Tree depth"] >= 3, "{bulk_stat:?}");
    assert!(bulk_stat["Leaf pages"] <= txn_stat["Leaf pages"], "{bulk_stat:?} vs {txn_stat:?}");
    assert_eq!(bulk_stat["Overflow pages"], txn_stat["Overflow pages"]);
    let dump = mdb_dump(&bulk);
    assert_eq!(dump.len(), 2 * 5000 + 1);
    assert!(mdb_dump(&txn) == dump, "mdb_dump of the two writers differs");

    let copy = dir.path().join("copy");
    mdb_copy_compact(&bulk, &copy);
    assert!(mdb_dump(&copy) == dump, "mdb_dump of mdb_copy -c differs");
    assert_eq!(mdb_stat(&copy), bulk_stat);
    let size = |d: &Path| std::fs::metadata(d.join("data.mdb")).unwrap().len();
    assert_eq!(size(&copy), size(&bulk), "mdb_copy -c left out pages of the bulk-loaded file");
}

/// A missing tool fails the test with the way to install it (it is never skipped).
#[test]
#[should_panic(expected = "not found: run scripts/setup.sh (it installs lmdb-utils")]
fn a_missing_lmdb_tool_fails_saying_how_to_install_it() {
    mdb("mdb_no_such_tool", &[Path::new("-V")]);
}

/// Issue #24 item 9: an LMDB split → `import --lmdb-dir` → Parquet → `export --format lmdb`
/// gives back the same databases (`mdb_dump`): sample `i` stays key `"i"`. With more than ten
/// pairs LMDB's key order (`0, 1, 10, 11, …, 2`) is not the samples' order, which import used
/// to keep, so the export renumbered them (sample 2 became another pair).
#[test]
fn an_lmdb_split_imported_and_exported_again_dumps_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path(), 40);
    let theirs = dir.path().join("theirs");
    cn_clip_build_lmdb(&data, "train", &theirs);
    let (tables, back) = (dir.path().join("tables"), dir.path().join("back"));
    let cnclip = |args: &[&str]| {
        let output = Command::new(cnclip_tests::cnclip_bin()).args(args).output().unwrap();
        assert!(output.status.success(), "cnclip {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    };
    cnclip(&["import", "--lmdb-dir", theirs.to_str().unwrap(), "--splits", "train", "--out", tables.to_str().unwrap()]);
    cnclip(&[
        "export",
        "--parquet-dir",
        tables.to_str().unwrap(),
        "--splits",
        "train",
        "--out",
        back.to_str().unwrap(),
        "--format",
        "lmdb",
    ]);
    for db in ["imgs", "pairs"] {
        let dump = mdb_dump(&theirs.join("train").join(db));
        assert!(dump.len() > 2 * 11, "{db}: too few entries to tell the orders apart");
        assert!(mdb_dump(&back.join("train").join(db)) == dump, "{db}: the round trip changed the database");
    }
}

/// Pairs are read in sample order whatever the key order; a key cn_clip never reads (not one
/// of `0…num_samples-1` as it writes them) is reported once as a stray, and a sample whose key
/// is missing is reported in its place, so nothing is dropped or renumbered silently.
#[test]
fn pairs_come_in_sample_order_with_strays_and_missing_samples_reported() {
    use cnclip_operators::sinks::lmdb::{LmdbWriter, LmdbWriterKind, pickle_pair};
    use cnclip_operators::sources::lmdb;

    let dir = tempfile::tempdir().unwrap();
    let split = dir.path().join("split");
    let mut entries: Vec<(String, Vec<u8>)> = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13]
        .iter()
        .map(|&i| (i.to_string(), pickle_pair(i, 100 + i, "t")))
        .collect();
    entries.extend(["012", "x", "14"].map(|key| (key.to_string(), pickle_pair(-1, -1, "stray"))));
    entries.push(("num_samples".into(), b"14".to_vec()));
    entries.sort();
    let mut writer = LmdbWriter::create(&split.join("pairs"), LmdbWriterKind::Txn).unwrap();
    for (key, value) in &entries {
        writer.put(key.as_bytes(), value).unwrap();
    }
    writer.finish().unwrap();

    let (mut strays, mut samples) = (Vec::new(), Vec::new());
    lmdb::for_each_pair(
        &split,
        |stray| {
            strays.push(stray.location);
            Ok(())
        },
        |sample| {
            samples.push(sample.map(|pair| pair.image_id).map_err(|rejected| rejected.reason));
            Ok(())
        },
    )
    .unwrap();
    strays.sort();
    assert_eq!(strays, ["key \"012\"", "key \"14\"", "key \"x\""]);
    let expected: Vec<Result<i64, String>> =
        (0..14).map(|i| if i == 12 { Err("sample 12 is missing (num_samples is 14)".into()) } else { Ok(i) }).collect();
    assert_eq!(samples, expected);
}
