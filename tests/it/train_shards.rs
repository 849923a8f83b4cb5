//! `cnclip train` on data in an object store read in place (issue #25 item 4): WebDataset
//! shards (written by `webdataset`'s own `ShardWriter`), img2dataset Parquet and cn_clip's TSV +
//! JSONL, served by a real S3 server. In cn_clip's sampler order each trains the same parameters
//! as the same pairs as an LMDB split; as a shuffled stream (`--shuffle-buffer`) a run killed
//! mid-epoch and rerun ends with the parameters and samples of an uninterrupted run — its
//! directory (`--logs`) in the store too, resumed from there.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cnclip_models::checkpoint::load_cn_clip;
use cnclip_tests::python;
use cnclip_tests::s3::S3Server;

use crate::object_store::{ok, put_tree};
use crate::train_cli::{corpus, kill_once_there, samples_by_step, the_log, train_args};

/// An LMDB split's pairs, in key order, as WebDataset shards of `per_shard` samples written by
/// `webdataset.ShardWriter`: sample `i` is pair `i` (its image's bytes as `.jpg`, its text as
/// `.txt`), read from the LMDB as cn_clip's `LMDBDataset` reads it.
const LMDB_TO_SHARDS: &str = r#"
import base64, os, pickle, sys, lmdb, webdataset as wds
split, out, per_shard = sys.argv[1], sys.argv[2], int(sys.argv[3])
os.makedirs(out, exist_ok=True)
pairs = lmdb.open(f"{split}/pairs", readonly=True, lock=False).begin()
imgs = lmdb.open(f"{split}/imgs", readonly=True, lock=False).begin()
n = int(pairs.get(b"num_samples").decode())
with wds.ShardWriter(f"{out}/%06d.tar", maxcount=per_shard, verbose=0) as sink:
    for i in range(n):
        image_id, text_id, text = pickle.loads(pairs.get(str(i).encode()))
        image = base64.urlsafe_b64decode(imgs.get(str(image_id).encode()))
        sink.write({"__key__": f"pair{i:06d}", "jpg": image, "txt": text})
"#;

fn cnclip(server: &S3Server, dir: &Path, args: &[&str]) -> Output {
    let mut command = Command::new(cnclip_tests::cnclip_bin());
    server.configure(command.current_dir(dir).args(args)).output().unwrap()
}

/// `train_args` with the data replaced.
fn with_data<'a>(mut args: Vec<&'a str>, train: &'a str, valid: &'a str) -> Vec<&'a str> {
    for (flag, value) in [("--train-data", train), ("--val-data", valid)] {
        let at = args.iter().position(|a| *a == flag).unwrap() + 1;
        args[at] = value;
    }
    args
}

/// A corpus of `train` pairs (and 32 validation pairs) as LMDB splits, and the same pairs as
/// shards in the server's bucket `corpus` (`train/`, `valid/`).
fn corpus_on_server(server: &S3Server, dir: &Path, train: usize) {
    corpus(dir, train);
    for split in ["train", "valid"] {
        let (lmdb, shards) = (dir.join(format!("corpus/lmdb/{split}")), dir.join(format!("shards/{split}")));
        python(LMDB_TO_SHARDS, &[lmdb.to_str().unwrap(), shards.to_str().unwrap(), "20"], "");
        put_tree(server, "corpus", &shards, split);
    }
}

/// Whether an LMDB (a `data.mdb`) is anywhere under `dir`.
pub(crate) fn any_lmdb(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .any(|p| if p.is_dir() { any_lmdb(&p) } else { p.file_name().is_some_and(|n| n == "data.mdb") })
}

pub(crate) fn assert_same_parameters(a: &Path, b: &Path) {
    let (a, _) = load_cn_clip(a).unwrap();
    let (b, _) = load_cn_clip(b).unwrap();
    assert_eq!(a.len(), b.len());
    for (key, value) in &a {
        assert!(value.equal(&b[key]), "{key} differs");
    }
}

fn validation_lines(log: &str) -> Vec<String> {
    log.lines().filter_map(|l| l.find("Validation Result").map(|at| l[at..].to_string())).collect()
}

#[test]
fn webdataset_shards_on_the_server_train_as_their_lmdb_split() {
    let server = S3Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    corpus_on_server(&server, dir, 64);
    let extra = ["--max-epochs", "2", "--log-interval", "1", "--debug"];
    ok(cnclip(&server, dir, &train_args("lmdb", &extra)));
    // 64 pairs in shards of 20: 4 shards (the last of 4 samples), named by a brace pattern; the
    // validation shards by a glob over the bucket.
    let shards = "s3://corpus/train/{000000..000003}.tar";
    let args = with_data(train_args("shards", &extra), shards, "s3://corpus/valid/*.tar");
    let log = ok(cnclip(&server, dir, &args));
    assert!(log.contains("indexing the WebDataset shards"), "{log}");
    for epoch in ["epoch1.pt", "epoch2.pt"] {
        let at = |run: &str| dir.join(format!("logs/{run}/checkpoints/{epoch}"));
        assert_same_parameters(&at("lmdb"), &at("shards"));
    }
    // The same samples in the same steps, and the same validation.
    let metrics = |run: &str| samples_by_step(&dir.join(format!("logs/{run}/metrics.parquet")));
    assert_eq!(metrics("lmdb"), metrics("shards"));
    let (lmdb, shards_log) = (the_log(&dir.join("logs/lmdb")), the_log(&dir.join("logs/shards")));
    assert_eq!(validation_lines(&lmdb).len(), 2, "{lmdb}");
    assert_eq!(validation_lines(&lmdb), validation_lines(&shards_log));
    assert!(shards_log.contains("train WebDataset shards s3://corpus/train/{000000..000003}.tar contain 64 samples."));
    // Nothing was copied: the run's data folder holds the index, not the images.
    let data = dir.join("logs/shards/data/train-data");
    let held: u64 = std::fs::read_dir(&data).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
    let shard_bytes: u64 =
        std::fs::read_dir(dir.join("shards/train")).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
    assert!(held * 10 < shard_bytes, "the index ({held} bytes) is not a copy of the shards ({shard_bytes} bytes)");

    // A rerun of a finished run reuses the index.
    let log = ok(cnclip(&server, dir, &args));
    assert!(the_log(&dir.join("logs/shards")).contains("--train-data: reusing the index"), "{log}");
}

#[test]
fn a_shuffled_stream_of_shards_killed_and_rerun_ends_as_an_uninterrupted_run() {
    let (train, valid) = ("s3://corpus/train/*.tar", "s3://corpus/valid/*.tar");
    killed_stream_ends_as_an_uninterrupted_run(|server, dir| corpus_on_server(server, dir, 96), train, valid, &[]);
}

/// A `--shuffle-buffer 12` run of 96 training samples on `train` and `valid` (put in the store by
/// `make`; `data_args` say how to read them), with its directory in the store, killed mid-epoch 1
/// and rerun, ends with the parameters and samples of an uninterrupted run.
fn killed_stream_ends_as_an_uninterrupted_run(
    make: fn(&S3Server, &Path),
    train: &str,
    valid: &str,
    data_args: &[&str],
) {
    let server = S3Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make(&server, dir);
    let mut extra = vec![
        "--max-epochs",
        "2",
        "--log-interval",
        "1",
        "--save-step-frequency",
        "2",
        "--debug",
        "--shuffle-buffer",
        "12",
    ];
    extra.extend_from_slice(data_args);
    let whole = with_data(train_args("whole", &extra), train, valid);
    ok(cnclip(&server, dir, &whole));

    // The same run with its directory in the store (`--logs s3://runs`), killed (SIGKILL) once
    // its first step checkpoint is there: mid-epoch 1.
    let mut args = with_data(train_args("killed", &extra), train, valid);
    let logs = args.iter().position(|a| *a == "--logs").unwrap() + 1;
    args[logs] = "s3://runs";
    let run_dir = server.bucket("runs").join("killed");
    let mut command = Command::new(cnclip_tests::cnclip_bin());
    kill_once_there(
        server.configure(command.current_dir(dir).args(&args)),
        &run_dir.join("checkpoints/epoch_latest.pt"),
    );
    assert!(!run_dir.join("checkpoints/epoch2.pt").exists(), "killed before the end");
    // Rerun: it resumes from the checkpoint in the store.
    ok(cnclip(&server, dir, &args));
    assert!(!dir.join("s3:").exists() && !dir.join("logs/killed").exists(), "nothing of the run written locally");
    let log = the_log(&run_dir);
    let resumed_at = regex::Regex::new(r"=> loaded checkpoint '.*epoch_latest.pt' \(epoch 1 @ (\d+) steps\)").unwrap();
    let at: u64 = resumed_at.captures(&log).unwrap_or_else(|| panic!("no resume:\n{log}"))[1].parse().unwrap();
    assert!((1..6).contains(&at), "killed at step {at}, not mid-epoch (6 steps an epoch)");

    assert_same_parameters(&dir.join("logs/whole/checkpoints/epoch2.pt"), &run_dir.join("checkpoints/epoch2.pt"));
    let (a, b) =
        (samples_by_step(&dir.join("logs/whole/metrics.parquet")), samples_by_step(&run_dir.join("metrics.parquet")));
    // The store holds the run's files as a local run writes them, and no spool bookkeeping.
    let names = |d: &Path| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with("out_") && !n.starts_with("params_") && n != "data")
            .collect();
        names.sort();
        names
    };
    assert_eq!(names(&run_dir), names(&dir.join("logs/whole")));
    assert_eq!(names(&run_dir.join("checkpoints")), names(&dir.join("logs/whole/checkpoints")));
    assert_eq!(a.len(), 12);
    assert!(a == b, "the resumed run trained on other samples");
    // Each epoch sees every sample once (96 = 6 whole global batches), in an order that is
    // neither the shards' nor the same in both epochs.
    let epoch = |e: i64| -> Vec<i64> {
        a.iter().filter(|(s, _)| (s - 1) / 6 == e).flat_map(|(_, s)| s.clone()).collect::<Vec<_>>()
    };
    let (first, second) = (epoch(0), epoch(1));
    for order in [&first, &second] {
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..96).collect::<Vec<_>>());
        assert_ne!(order, &sorted, "the stream was shuffled");
    }
    assert_ne!(first, second, "each epoch is shuffled anew");
}

/// An LMDB split's pairs as img2dataset writes Parquet (`key` as 9 digits, `jpg` bytes,
/// `caption`, a `url` column nobody reads), in files of 40 rows with row groups of 7, in the
/// folder argv[2].
const LMDB_TO_I2D: &str = r#"
import base64, os, pickle, sys, lmdb, pyarrow as pa, pyarrow.parquet as pq
split, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
pairs = lmdb.open(f"{split}/pairs", readonly=True, lock=False).begin()
imgs = lmdb.open(f"{split}/imgs", readonly=True, lock=False).begin()
n = int(pairs.get(b"num_samples").decode())
rows = []
for i in range(n):
    image_id, text_id, text = pickle.loads(pairs.get(str(i).encode()))
    rows.append((f"{i:09d}", base64.urlsafe_b64decode(imgs.get(str(image_id).encode())), text))
for f, start in enumerate(range(0, n, 40)):
    part = rows[start:start + 40]
    table = pa.table({"key": [r[0] for r in part], "url": [f"https://example.com/{r[0]}.jpg" for r in part],
                      "jpg": [r[1] for r in part], "caption": [r[2] for r in part]})
    pq.write_table(table, f"{out}/{f:05d}.parquet", row_group_size=7)
"#;

/// The corpus's splits as img2dataset Parquet in the bucket `corpus` (`i2d/train/`, `i2d/valid/`).
fn parquet_on_server(server: &S3Server, dir: &Path) {
    for split in ["train", "valid"] {
        let (lmdb, out) = (dir.join(format!("corpus/lmdb/{split}")), dir.join(format!("i2d/{split}")));
        python(LMDB_TO_I2D, &[lmdb.to_str().unwrap(), out.to_str().unwrap()], "");
        put_tree(server, "corpus", &out, &format!("i2d/{split}"));
    }
}

const I2D_COLUMNS: [&str; 6] = ["--image-column", "jpg", "--text-column", "caption", "--id-column", "key"];

#[test]
fn img2dataset_parquet_on_the_server_trains_in_place_as_its_lmdb_split() {
    let server = S3Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    corpus_on_server(&server, dir, 64);
    parquet_on_server(&server, dir);
    let mut extra = vec!["--max-epochs", "2", "--log-interval", "1", "--debug"];
    ok(cnclip(&server, dir, &train_args("lmdb", &extra)));
    extra.extend_from_slice(&I2D_COLUMNS);
    let args =
        with_data(train_args("i2d", &extra), "s3://corpus/i2d/train/*.parquet", "s3://corpus/i2d/valid/*.parquet");
    let log = ok(cnclip(&server, dir, &args));
    assert!(log.contains("reading the Parquet files"), "{log}");
    for epoch in ["epoch1.pt", "epoch2.pt"] {
        let at = |run: &str| dir.join(format!("logs/{run}/checkpoints/{epoch}"));
        assert_same_parameters(&at("lmdb"), &at("i2d"));
    }
    let metrics = |run: &str| samples_by_step(&dir.join(format!("logs/{run}/metrics.parquet")));
    assert_eq!(metrics("lmdb"), metrics("i2d"));
    let (lmdb, i2d) = (the_log(&dir.join("logs/lmdb")), the_log(&dir.join("logs/i2d")));
    assert_eq!(validation_lines(&lmdb), validation_lines(&i2d));
    assert!(!dir.join("logs/i2d/data").exists(), "nothing was serialized");

    // A null caption stops the run naming the file and row.
    python(
        "import sys, pyarrow as pa, pyarrow.parquet as pq\nt = pq.read_table(sys.argv[1])\n\
         c = t.column('caption').to_pylist(); c[3] = None\n\
         pq.write_table(t.set_column(t.schema.get_field_index('caption'), 'caption', pa.array(c)), sys.argv[1])",
        &[server.bucket("corpus").join("i2d/train/00001.parquet").to_str().unwrap()],
        "",
    );
    let args =
        with_data(train_args("null", &extra), "s3://corpus/i2d/train/*.parquet", "s3://corpus/i2d/valid/*.parquet");
    let log = crate::object_store::failed(cnclip(&server, dir, &args));
    assert!(log.contains("s3://corpus/i2d/train/00001.parquet row 3") && log.contains("null"), "{log}");
}

#[test]
fn a_shuffled_stream_of_parquet_files_killed_and_rerun_ends_as_an_uninterrupted_run() {
    let make = |server: &S3Server, dir: &Path| {
        corpus_on_server(server, dir, 96);
        parquet_on_server(server, dir);
    };
    let (train, valid) = ("s3://corpus/i2d/train/*.parquet", "s3://corpus/i2d/valid/*.parquet");
    killed_stream_ends_as_an_uninterrupted_run(make, train, valid, &I2D_COLUMNS);
}

/// cn_clip's own `{split}_imgs.tsv` + `{split}_texts.jsonl`, with what `build-lmdb` leaves out
/// added to the training split — a repeated image id (another image), a text naming an image
/// the TSV lacks, a repeated text id — and a text of three images (one missing): the files as
/// given, in the server's bucket `corpus` under `cn/`.
fn tsv_on_server(server: &S3Server, dir: &Path, train: usize) {
    corpus(dir, train);
    let (tsv, jsonl) = (dir.join("corpus/train_imgs.tsv"), dir.join("corpus/train_texts.jsonl"));
    let images = std::fs::read_to_string(&tsv).unwrap();
    let lines: Vec<&str> = images.lines().collect();
    let id = |line: &str| line.split('\t').next().unwrap().to_string();
    let (a, b) = (id(lines[0]), id(lines[1]));
    let other_image = lines[2].split('\t').nth(1).unwrap();
    std::fs::write(&tsv, format!("{images}{a}\t{other_image}\n")).unwrap();
    let texts = std::fs::read_to_string(&jsonl).unwrap();
    let first: serde_json::Value = serde_json::from_str(texts.lines().next().unwrap()).unwrap();
    let added = [
        r#"{"text_id": 900001, "text": "无图的文字", "image_ids": [987654321]}"#.to_string(),
        format!(r#"{{"text_id": {}, "text": "重复的编号", "image_ids": [{b}]}}"#, first["text_id"]),
        format!(r#"{{"text_id": 900002, "text": "三张图, 缺一张", "image_ids": [{b}, 987654321, {a}]}}"#),
    ];
    std::fs::write(&jsonl, format!("{texts}{}\n", added.join("\n"))).unwrap();
    ok(cnclip(server, dir, &["build-lmdb", "--data-dir", "corpus", "--splits", "train,valid"]));
    put_tree(server, "corpus", &dir.join("corpus"), "cn");
}

/// The TSV on the server, then the same files imported as cnclip's Parquet tables, read in
/// place: the LMDB split's parameters, samples and validation, what it quarantined, no LMDB.
#[test]
fn a_cn_clip_tsv_and_its_tables_on_the_server_train_in_place_as_its_lmdb_split() {
    let server = S3Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    tsv_on_server(&server, dir, 64);
    let extra = ["--max-epochs", "2", "--log-interval", "1", "--debug"];
    ok(cnclip(&server, dir, &train_args("lmdb", &extra)));
    let args = with_data(train_args("tsv", &extra), "s3://corpus/cn/train_imgs.tsv", "s3://corpus/cn/valid_imgs.tsv");
    let log = ok(cnclip(&server, dir, &args));
    assert!(log.contains("in place"), "{log}");
    for epoch in ["epoch1.pt", "epoch2.pt"] {
        let at = |run: &str| dir.join(format!("logs/{run}/checkpoints/{epoch}"));
        assert_same_parameters(&at("lmdb"), &at("tsv"));
    }
    let metrics = |run: &str| samples_by_step(&dir.join(format!("logs/{run}/metrics.parquet")));
    assert_eq!(metrics("lmdb"), metrics("tsv"));
    let (lmdb, tsv) = (the_log(&dir.join("logs/lmdb")), the_log(&dir.join("logs/tsv")));
    assert_eq!(validation_lines(&lmdb).len(), 2, "{lmdb}");
    assert_eq!(validation_lines(&lmdb), validation_lines(&tsv));
    // 64 pairs, the repeated text id's left out, two of the three-image text's kept.
    assert!(lmdb.contains("train LMDB file contains 64 images and 66 pairs."), "{lmdb}");
    assert!(tsv.contains("train images s3://corpus/cn/train_imgs.tsv and their texts contain 66 pairs."), "{tsv}");
    // What build-lmdb quarantined, and nothing else, is quarantined beside the index.
    let ids = |paths: &[PathBuf]| -> Vec<String> {
        let mut ids: Vec<String> = paths
            .iter()
            .flat_map(|path| std::fs::read_to_string(path).unwrap().lines().map(str::to_string).collect::<Vec<_>>())
            .map(|l| serde_json::from_str::<serde_json::Value>(&l).unwrap()["id"].to_string())
            .collect();
        ids.sort();
        ids
    };
    let data = dir.join("logs/tsv/data/train-data");
    let built = ids(&[dir.join("corpus/lmdb/train/quarantine.jsonl")]);
    assert_eq!(built.len(), 4, "{built:?}");
    assert_eq!(ids(&[data.join("quarantine-images.jsonl"), data.join("quarantine-texts.jsonl")]), built);
    // Nothing was copied: no LMDB, and the index is a small fraction of the TSV.
    let held: u64 = std::fs::read_dir(&data).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
    let tsv_bytes = std::fs::metadata(dir.join("corpus/train_imgs.tsv")).unwrap().len();
    assert!(held * 10 < tsv_bytes, "the index ({held} bytes) is not a copy of the TSV ({tsv_bytes} bytes)");
    assert!(!any_lmdb(&dir.join("logs/tsv")), "no LMDB was made");

    // A rerun of a finished run reuses the index.
    ok(cnclip(&server, dir, &args));
    assert!(the_log(&dir.join("logs/tsv")).contains("--train-data: reusing the index"));

    // The same files imported as cnclip's tables, on the server: read in place too, the same.
    ok(cnclip(&server, dir, &["import", "--data-dir", "corpus", "--splits", "train,valid", "--out", "tables"]));
    put_tree(&server, "corpus", &dir.join("tables"), "tables");
    let (train, valid) = ("s3://corpus/tables/train_images.parquet", "s3://corpus/tables/valid_images.parquet");
    ok(cnclip(&server, dir, &with_data(train_args("tables", &extra), train, valid)));
    let at = |run: &str| dir.join(format!("logs/{run}/checkpoints/epoch2.pt"));
    assert_same_parameters(&at("lmdb"), &at("tables"));
    assert_eq!(metrics("lmdb"), metrics("tables"));
    assert!(!any_lmdb(&dir.join("logs/tables")), "no LMDB was made");
}

#[test]
fn a_shuffled_stream_of_a_cn_clip_tsv_killed_and_rerun_ends_as_an_uninterrupted_run() {
    let (train, valid) = ("s3://corpus/cn/train_imgs.tsv", "s3://corpus/cn/valid_imgs.tsv");
    // 96 pairs: the 94 of 94 texts and two of the three-image text (the repeated text id's left out).
    killed_stream_ends_as_an_uninterrupted_run(|server, dir| tsv_on_server(server, dir, 94), train, valid, &[]);
}
