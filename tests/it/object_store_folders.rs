//! Image folders as prefixes (issue #25 item 1) on a real S3-compatible server
//! ([`cnclip_tests::s3::S3Server`]): the `image_folder` source and `cnclip zeroshot-evaluation`
//! read a torchvision `ImageFolder` tree uploaded to a bucket as they read it on disk — the same
//! classes, labels, image order and bytes (hidden folders and files, other extensions, nested
//! folders, names a URL would mangle) — and a prefix with no class folders, or nothing under it,
//! is refused naming its URL.

use std::path::Path;
use std::process::{Command, Output};

use cnclip_tests::hostile::succeeds;
use cnclip_tests::s3::S3Server;

use crate::object_store::{failed, ok};

fn cnclip(server: &S3Server, dir: &Path, args: &[&str]) -> Output {
    let mut command = Command::new(cnclip_tests::cnclip_bin());
    server.configure(command.current_dir(dir).args(args)).output().unwrap()
}

/// Copies the tree `from` (files in nested folders, hidden ones too) into the server's bucket as
/// `prefix/RELATIVE` (as `aws s3 cp --recursive` would: s3s-fs keeps an object as the file at
/// BUCKET/KEY).
fn put_tree_recursively(server: &S3Server, bucket: &str, from: &Path, prefix: &str) {
    let to = server.bucket(bucket).join(prefix);
    std::fs::create_dir_all(&to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if entry.path().is_dir() {
            put_tree_recursively(server, bucket, &entry.path(), &format!("{prefix}/{}", name.to_str().unwrap()));
        } else {
            std::fs::copy(entry.path(), to.join(&name)).unwrap();
        }
    }
}

/// An `image_folder` node over `path` written to `out` (its quarantine to `quarantine`).
fn folder_pipeline(path: &str, out: &str, quarantine: &str) -> String {
    format!(
        "[job]\nquarantine = \"{quarantine}\"\n\n[nodes.set]\nkind = \"image_folder\"\npath = \"{path}\"\n\n\
         [nodes.out]\nkind = \"write_parquet\"\ninput = \"set\"\npath = \"{out}\"\n"
    )
}

/// The quarantine's records without their `source` (the root, which names where it was read).
fn quarantined(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|line| {
            let mut record: serde_json::Value = serde_json::from_str(line).unwrap();
            record.as_object_mut().unwrap().remove("source");
            record
        })
        .collect()
}

#[test]
fn an_image_folder_uploaded_to_a_bucket_reads_as_on_disk() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let set = root.join("set/test");
    // Every rule of the local reading: sorted classes (`010` after `002`), nested folders sorted
    // as whole paths (`sub` < `sub-x` < `sub/deeper`), file names sorted, extensions any case,
    // hidden files and hidden folders inside a class kept, a hidden class folder, a stray file
    // at the root and a non-image left out, an empty image quarantined; names with characters a
    // URL would read otherwise (`#`, `%`, a space, CJK).
    let files = [
        "000/b.jpg",
        "000/a.PNG",
        "000/sub/c.jpg",
        "000/sub-x/d.png",
        "000/sub/deeper/e.jpeg",
        "000/.hidden.jpg",
        "000/.cache/f.jpg",
        "000/notes.txt",
        "001/g.webp",
        "001/图片 1.jpg",
        "001/empty.jpg",
        "002/i.TIF",
        "010/a#1.jpg",
        "010/100%.bmp",
        "010/h.ppm",
        ".ipynb_checkpoints/j.jpg",
        "stray.jpg",
    ];
    for (k, file) in files.iter().enumerate() {
        let path = set.join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        // Distinct contents of distinct sizes (the images are not decoded here).
        let data: Vec<u8> = if file.ends_with("empty.jpg") { Vec::new() } else { vec![k as u8 + 1; 10 + 7 * k] };
        std::fs::write(path, data).unwrap();
    }
    put_tree_recursively(&server, "datasets", &root.join("set"), "cifar/set");

    std::fs::write(root.join("local.toml"), folder_pipeline("set/test", "local/set.parquet", "local/q.jsonl")).unwrap();
    let log = ok(cnclip(&server, root, &["run", "local.toml"]));
    assert!(log.contains("13 rows →"), "{log}");
    // The prefix written with and without its trailing slash.
    for (name, url) in [("plain", "s3://datasets/cifar/set/test"), ("slash", "s3://datasets/cifar/set/test/")] {
        let toml = folder_pipeline(url, &format!("{name}/set.parquet"), &format!("{name}/q.jsonl"));
        std::fs::write(root.join("remote.toml"), toml).unwrap();
        let log = ok(cnclip(&server, root, &["run", "remote.toml"]));
        assert!(log.contains(&format!("13 rows → {name}/set.parquet")), "{name}: {log}");
        assert_eq!(
            std::fs::read(root.join(format!("{name}/set.parquet"))).unwrap(),
            std::fs::read(root.join("local/set.parquet")).unwrap(),
            "{name}: the table read from the bucket differs from the one read from disk"
        );
        assert_eq!(quarantined(&root.join(format!("{name}/q.jsonl"))), quarantined(&root.join("local/q.jsonl")));
    }
    // What the local reading gives (which the remote one equals): ImageFolder's order.
    let table = read_parquet(&root.join("local/set.parquet"));
    let paths: Vec<String> = column_strings(&table, "path");
    assert_eq!(
        paths,
        [
            "000/.hidden.jpg",
            "000/a.PNG",
            "000/b.jpg",
            "000/.cache/f.jpg",
            "000/sub/c.jpg",
            "000/sub-x/d.png",
            "000/sub/deeper/e.jpeg",
            "001/g.webp",
            "001/图片 1.jpg",
            "002/i.TIF",
            "010/100%.bmp",
            "010/a#1.jpg",
            "010/h.ppm",
        ]
    );
    // Ids are places in that order (the quarantined image keeps its place, 7: 001's first);
    // labels the classes' places.
    assert_eq!(column_i64(&table, "image_id"), [0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13]);
    assert_eq!(column_i64(&table, "label"), [0, 0, 0, 0, 0, 0, 0, 1, 1, 2, 3, 3, 3]);
    let records = quarantined(&root.join("local/q.jsonl"));
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["location"], "001/empty.jpg");
    assert_eq!(records[0]["reason"], "empty file");
    assert_eq!(records[0]["id"], "7");
}

fn read_parquet(path: &Path) -> Vec<arrow::record_batch::RecordBatch> {
    let reader =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(path).unwrap())
            .unwrap()
            .build()
            .unwrap();
    reader.map(Result::unwrap).collect()
}

/// The integers of column `name` of `batches`.
fn column_i64(batches: &[arrow::record_batch::RecordBatch], name: &str) -> Vec<i64> {
    use arrow::array::AsArray;
    batches
        .iter()
        .flat_map(|batch| {
            batch.column_by_name(name).unwrap().as_primitive::<arrow::datatypes::Int64Type>().values().to_vec()
        })
        .collect()
}

/// The strings of column `name` of `batches`.
fn column_strings(batches: &[arrow::record_batch::RecordBatch], name: &str) -> Vec<String> {
    use arrow::array::AsArray;
    batches
        .iter()
        .flat_map(|batch| {
            let column = batch.column_by_name(name).unwrap().as_string::<i32>();
            column.iter().map(|v| v.unwrap().to_string()).collect::<Vec<_>>()
        })
        .collect()
}

/// `zeroshot-evaluation` with `datapath`, `labels`, `index` and the checkpoint (for `out =
/// "remote"`, the bucket's copy) local or in the bucket, its templates local; returns its stdout
/// and the JSON it wrote under `out`.
fn zeroshot(server: &S3Server, root: &Path, datapath: &str, labels: &str, index: &str, out: &str) -> (String, Vec<u8>) {
    let checkpoint = if out == "remote" { "s3://sets/tiny.safetensors" } else { "tiny.safetensors" };
    let args = [
        "zeroshot-evaluation",
        "--datapath",
        datapath,
        "--label-file",
        labels,
        "--index",
        index,
        "--resume",
        checkpoint,
        "--templates",
        "templates.txt",
        "--save-dir",
        out,
        "--dataset",
        "synth",
        "--img-batch-size",
        "8",
        "--num-workers",
        "1",
    ];
    let output = cnclip(server, root, &args);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    ok(output);
    (stdout, std::fs::read(root.join(out).join("synth.json")).unwrap())
}

#[test]
fn zeroshot_on_a_prefix_scores_as_on_the_local_folder() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let synth = ["synth", "--out", "demo", "--train", "0", "--valid", "0", "--test", "0", "--zeroshot-per-class", "2"];
    succeeds(root, &synth);
    std::fs::write(root.join("tiny.json"), crate::smoke::TINY_VIT_BERT).unwrap();
    succeeds(root, &["init-model", "--model-config", "tiny.json", "--seed", "1", "--output", "tiny.safetensors"]);
    std::fs::write(root.join("templates.txt"), "{}\n一张{}的照片\n").unwrap();
    // A hidden folder Jupyter leaves is no class, there as here.
    let hidden = root.join("demo/zeroshot/test/.ipynb_checkpoints");
    std::fs::create_dir_all(&hidden).unwrap();
    std::fs::copy(root.join("demo/zeroshot/label_cn.txt"), hidden.join("x.jpg")).unwrap();
    let images = walk_files(&root.join("demo/zeroshot/test")).len() - 1;
    // `--index` reverses the saved predictions: a mix-up of the order would show.
    let index: Vec<usize> = (0..images).rev().collect();
    std::fs::write(root.join("index.json"), serde_json::to_string(&index).unwrap()).unwrap();
    put_tree_recursively(&server, "sets", &root.join("demo/zeroshot"), "synth/zeroshot");
    std::fs::copy(root.join("index.json"), server.bucket("sets").join("synth/index.json")).unwrap();
    std::fs::copy(root.join("tiny.safetensors"), server.bucket("sets").join("tiny.safetensors")).unwrap();

    let (local_stdout, local_json) =
        zeroshot(&server, root, "demo/zeroshot/test", "demo/zeroshot/label_cn.txt", "index.json", "local");
    let (remote_stdout, remote_json) = zeroshot(
        &server,
        root,
        "s3://sets/synth/zeroshot/test",
        "s3://sets/synth/zeroshot/label_cn.txt",
        "s3://sets/synth/index.json",
        "remote",
    );
    assert!(local_stdout.contains("zeroshot-top1: "), "{local_stdout}");
    assert_eq!(remote_stdout, local_stdout);
    assert_eq!(remote_json, local_json, "the ELEVATER JSON from the bucket differs from the local one");
    let json: serde_json::Value = serde_json::from_slice(&local_json).unwrap();
    assert_eq!(json["predictions"][0].as_array().unwrap().len(), images);
}

/// The files under `dir`, recursively.
fn walk_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() { files.extend(walk_files(&path)) } else { files.push(path) }
    }
    files
}

#[test]
fn a_prefix_without_class_folders_is_refused_naming_it() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // Objects, but none in a folder; a hidden folder is no class either.
    let bucket = server.bucket("sets");
    std::fs::create_dir_all(bucket.join("flat/.ipynb_checkpoints")).unwrap();
    std::fs::write(bucket.join("flat/a.jpg"), "x").unwrap();
    std::fs::write(bucket.join("flat/.ipynb_checkpoints/b.jpg"), "x").unwrap();
    for (url, why) in [
        ("s3://sets/flat", "s3://sets/flat: no class folders"),
        ("s3://sets/missing", "s3://sets/missing: nothing is stored under this prefix"),
    ] {
        std::fs::write(root.join("p.toml"), folder_pipeline(url, "out.parquet", "q.jsonl")).unwrap();
        let stderr = failed(cnclip(&server, root, &["run", "p.toml"]));
        assert!(stderr.contains(why), "{url}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        std::fs::write(root.join("labels.txt"), "a\nb\n").unwrap();
        let args = ["zeroshot-evaluation", "--datapath", url, "--label-file", "labels.txt", "--resume", "none.pt"];
        let stderr = failed(cnclip(&server, root, &args));
        assert!(stderr.contains(&format!("--datapath {url}")) && stderr.contains(why), "{url}: {stderr}");
        assert!(!root.join("out.parquet").exists());
    }
    // A label file that is not in the bucket is named too.
    let args = [
        "zeroshot-evaluation",
        "--datapath",
        "s3://sets/flat",
        "--label-file",
        "s3://sets/labels.txt",
        "--resume",
        "none.pt",
    ];
    let stderr = failed(cnclip(&server, root, &args));
    assert!(stderr.contains("s3://sets/labels.txt"), "{stderr}");
}
