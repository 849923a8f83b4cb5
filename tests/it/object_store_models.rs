//! Model files and indexes in an object store (issue #25 item 1), against the real S3 server:
//! a checkpoint given as `--resume s3://…` extracts the features the local file gives, from one
//! copy in the spool that a rerun reuses and a new version of the object replaces (`convert`
//! reads and writes checkpoints there too); a
//! `build-index` directory written to `s3://…` holds the files a local build writes, resumes
//! from what the store holds, and `make-topk-predictions --index-path s3://…` searches it as the
//! local directory; `bench-suite` keeps its results there.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cnclip_tests::s3::S3Server;

use crate::object_store::{failed, ok};

/// `cnclip` reaching the server, with its own `TMPDIR` (so its spool can be looked at).
fn cnclip(server: &S3Server, dir: &Path, tmp: &Path, args: &[&str]) -> Output {
    let mut command = Command::new(cnclip_tests::cnclip_bin());
    server.configure(command.current_dir(dir).env("TMPDIR", tmp).args(args)).output().unwrap()
}

/// The files under `dir` (relative paths), sorted.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(at) = stack.pop() {
        for entry in std::fs::read_dir(&at).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path.strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    out.sort();
    out
}

fn extract_images(checkpoint: &str, out: &str) -> Vec<String> {
    [
        "extract-features",
        "--extract-image-feats",
        "--image-data",
        "lmdb/valid/imgs",
        "--image-feat-output-path",
        out,
        "--resume",
        checkpoint,
        "--img-batch-size",
        "1",
        "--precision",
        "fp32",
    ]
    .map(String::from)
    .to_vec()
}

#[test]
fn a_checkpoint_in_the_store_extracts_as_the_local_file_from_one_copy() {
    let server = S3Server::start();
    let corpus = crate::manifest::corpus();
    let root = corpus.path();
    let spool = tempfile::tempdir().unwrap();
    let models = server.bucket("models");
    std::fs::copy(root.join("tiny.safetensors"), models.join("tiny.safetensors")).unwrap();
    let run =
        |args: Vec<String>| cnclip(&server, root, spool.path(), &args.iter().map(String::as_str).collect::<Vec<_>>());

    ok(run(extract_images("tiny.safetensors", "local.parquet")));
    ok(run(extract_images("s3://models/tiny.safetensors", "remote.parquet")));
    let local = crate::manifest::read_table(&[root.join("local.parquet")]);
    let remote = crate::manifest::read_table(&[root.join("remote.parquet")]);
    assert!(!local.rows.is_empty() && remote.rows == local.rows, "the features differ from the local checkpoint's");
    let fetched = spool.path().join("cnclip-spool/fetched");
    let copies = || files_under(&fetched);
    assert_eq!(copies().len(), 1, "one copy: {:?}", copies());
    let copy = fetched.join(&copies()[0]);
    assert_eq!(std::fs::read(&copy).unwrap(), std::fs::read(root.join("tiny.safetensors")).unwrap());
    let modified = std::fs::metadata(&copy).unwrap().modified().unwrap();

    // A rerun reuses the copy.
    ok(run(extract_images("s3://models/tiny.safetensors", "again.parquet")));
    assert_eq!(copies().len(), 1);
    assert_eq!(std::fs::metadata(&copy).unwrap().modified().unwrap(), modified, "downloaded again");

    // A new version of the object replaces it: the other model's features, one copy.
    std::fs::copy(root.join("other.safetensors"), models.join("tiny.safetensors")).unwrap();
    ok(run(extract_images("s3://models/tiny.safetensors", "other_remote.parquet")));
    ok(run(extract_images("other.safetensors", "other_local.parquet")));
    let other = crate::manifest::read_table(&[root.join("other_local.parquet")]);
    assert!(crate::manifest::read_table(&[root.join("other_remote.parquet")]).rows == other.rows);
    assert!(other.rows != local.rows, "two models, two tables");
    assert_eq!(copies().len(), 1, "the old version's copy is gone: {:?}", copies());

    // A checkpoint that is not there is named.
    let log = failed(run(extract_images("s3://models/missing.safetensors", "x.parquet")));
    assert!(log.contains("s3://models/missing.safetensors"), "{log}");

    // `convert` reads from and writes to the store: cn_clip's .pt, as a local conversion writes it.
    let convert = |input: &str, output: &str| {
        let args = ["convert", "--input", input, "--output", output].map(String::from).to_vec();
        ok(run(args))
    };
    convert("other.safetensors", "other.pt");
    convert("s3://models/tiny.safetensors", "s3://models/converted/other.pt");
    assert!(
        std::fs::read(models.join("converted/other.pt")).unwrap() == std::fs::read(root.join("other.pt")).unwrap(),
        "the converted checkpoint in the store differs from the local one"
    );
}

#[test]
fn a_build_index_directory_in_the_store_is_built_resumed_and_searched_as_a_local_one() {
    use crate::build_index::{BUILD, predictions, setup};
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let spool = tempfile::tempdir().unwrap();
    setup(root);
    let bucket = server.bucket("indexes");
    let run = |extra: &[&str]| cnclip(&server, root, spool.path(), &[&BUILD[..], extra].concat());

    ok(run(&["--index-path", "local"]));
    let log = ok(run(&["--index-path", "s3://indexes/gallery"]));
    assert!(log.contains("3 shard(s) (3 built now, 0 kept)"), "{log}");
    // The same files, byte for byte, and nothing else (no spool bookkeeping) in the store.
    let (local, remote) = (root.join("local"), bucket.join("gallery"));
    assert_eq!(files_under(&remote), files_under(&local));
    for file in files_under(&local) {
        if file.as_os_str() == "manifest.json" {
            continue; // it records times and the path it was built at
        }
        assert!(std::fs::read(local.join(&file)).unwrap() == std::fs::read(remote.join(&file)).unwrap(), "{file:?}");
    }
    // A rerun keeps what the store holds; a shard deleted from the store is built again; an
    // object the job did not make is left alone.
    std::fs::write(remote.join("README.txt"), "the team's notes").unwrap();
    let log = ok(run(&["--index-path", "s3://indexes/gallery"]));
    assert!(log.contains("(0 built now, 3 kept)"), "{log}");
    let shard = files_under(&remote).into_iter().find(|f| f.to_string_lossy().starts_with("shard-")).unwrap();
    std::fs::remove_file(remote.join(&shard)).unwrap();
    let log = ok(run(&["--index-path", "s3://indexes/gallery"]));
    assert!(log.contains("(1 built now, 2 kept)"), "{log}");
    assert!(remote.join(&shard).is_file());
    assert_eq!(std::fs::read_to_string(remote.join("README.txt")).unwrap(), "the team's notes");

    let search = |index: &str, output: &str| {
        let args =
            ["make-topk-predictions", "--text-feats", "queries.parquet", "--index-path", index, "--output", output];
        ok(cnclip(&server, root, spool.path(), &args));
        predictions(&root.join(output))
    };
    let (here, there) = (search("local", "local.parquet"), search("s3://indexes/gallery", "remote.parquet"));
    assert_eq!(here.len(), 100);
    assert!(here == there, "the index in the store searches otherwise than the local one");

    // A single saved index file in a store, or a prefix with nothing, is refused by name.
    std::fs::write(bucket.join("one.index"), b"not an index").unwrap();
    for index in ["s3://indexes/one.index", "s3://indexes/nothing"] {
        let args = [
            "make-topk-predictions",
            "--text-feats",
            "queries.parquet",
            "--index-path",
            index,
            "--output",
            "x.parquet",
        ];
        let log = failed(cnclip(&server, root, spool.path(), &args));
        assert!(log.contains(index), "{log}");
    }
}

#[test]
fn bench_suite_results_in_the_store_equal_a_local_suites_and_a_rerun_skips_them() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let spool = tempfile::tempdir().unwrap();
    server.bucket("bench");
    let run = |args: &[&str]| cnclip(&server, root, spool.path(), args);
    ok(run(&["synth", "--out", "demo", "--train", "2", "--valid", "24", "--test", "2"]));
    std::fs::write(root.join("tiny.json"), crate::smoke::TINY_VIT_BERT).unwrap();
    ok(run(&["init-model", "--model-config", "tiny.json", "--seed", "3", "--output", "tiny.safetensors"]));
    let suite = |out: &str| {
        format!(
            "[suite]\nout = \"{out}\"\n\n[[runs]]\nname = \"tiny-valid\"\ntask = \"retrieval\"\ncheckpoint = \
             \"tiny.safetensors\"\ndataset = \"valid\"\nimages = \"demo/valid_imgs.tsv\"\ntexts = \
             \"demo/valid_texts.jsonl\"\n\n[[runs]]\nname = \"tiny-zeroshot\"\ntask = \"zeroshot\"\ncheckpoint = \
             \"tiny.safetensors\"\ndataset = \"synth-shapes\"\ndatapath = \"demo/zeroshot/test\"\nlabel_file = \
             \"demo/zeroshot/label_cn.txt\"\n"
        )
    };
    std::fs::write(root.join("local.toml"), suite("bench")).unwrap();
    std::fs::write(root.join("remote.toml"), suite("s3://bench/results")).unwrap();
    ok(run(&["bench-suite", "local.toml"]));
    ok(run(&["bench-suite", "remote.toml"]));
    let stored = server.data().join("bench/results");
    for name in ["tiny-valid.json", "tiny-zeroshot.json"] {
        let read = |path: PathBuf| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
        };
        let (local, remote) = (read(root.join("bench").join(name)), read(stored.join(name)));
        assert!(local["metrics"].as_object().is_some_and(|m| !m.is_empty()), "{local}");
        assert_eq!(local["metrics"], remote["metrics"], "{name}");
    }
    assert!(stored.join("results.parquet").is_file());
    assert!(!root.join("s3:").exists(), "nothing written at a local path named like the URL");
    // A rerun skips both runs, reading their results from the store.
    let log = ok(run(&["bench-suite", "remote.toml"]));
    assert_eq!(log.matches("done already, skipped").count(), 2, "{log}");
}

/// Predictions of queries with string keys (WebDataset features here) carry each query's `key`
/// in a Parquet predictions table; cn_clip's JSON lines keep their two keys.
#[test]
fn predictions_of_keyed_queries_carry_their_keys() {
    use arrow::array::AsArray;
    let server = S3Server::start();
    let corpus = crate::manifest::corpus();
    let root = corpus.path();
    let spool = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| ok(cnclip(&server, root, spool.path(), args));
    let toml = "[nodes.b64]\nkind = \"tsv\"\npaths = [\"data/valid_imgs.tsv\"]\n\n\
                [nodes.images]\nkind = \"decode_base64\"\ninput = \"b64\"\n\n\
                [nodes.images_out]\nkind = \"write_webdataset\"\ninput = \"images\"\npath = \"wds/images\"\n\n\
                [nodes.texts]\nkind = \"jsonl\"\npaths = [\"data/valid_texts.jsonl\"]\n\n\
                [nodes.texts_out]\nkind = \"write_webdataset\"\ninput = \"texts\"\npath = \"wds/texts\"\n";
    std::fs::write(root.join("to_shards.toml"), toml).unwrap();
    run(&["run", "to_shards.toml"]);
    run(&[
        "extract-features",
        "--extract-image-feats",
        "--extract-text-feats",
        "--image-data",
        "wds/images/*.tar",
        "--text-data",
        "wds/texts/*.tar",
        "--image-feat-output-path",
        "img.parquet",
        "--text-feat-output-path",
        "txt.parquet",
        "--resume",
        "tiny.safetensors",
        "--precision",
        "fp32",
    ]);
    let knn = |output: &str| {
        run(&[
            "make-topk-predictions",
            "--image-feats",
            "img.parquet",
            "--text-feats",
            "txt.parquet",
            "--top-k",
            "3",
            "--output",
            output,
        ]);
    };
    knn("predictions.parquet");
    knn("predictions.jsonl");
    let read = |name: &str| {
        let file = std::fs::File::open(root.join(name)).unwrap();
        let reader =
            parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap().build().unwrap();
        let batches: Vec<_> = reader.map(Result::unwrap).collect();
        arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
    };
    let (texts, predictions) = (read("txt.parquet"), read("predictions.parquet"));
    let key_of: std::collections::BTreeMap<i64, String> = {
        let ids = texts.column_by_name("id").unwrap().as_primitive::<arrow::datatypes::Int64Type>();
        let keys = texts.column_by_name("key").unwrap().as_string::<i32>();
        (0..texts.num_rows()).map(|i| (ids.value(i), keys.value(i).to_string())).collect()
    };
    let queries = predictions.column_by_name("query_id").unwrap().as_primitive::<arrow::datatypes::Int64Type>();
    let keys = predictions.column_by_name("key").expect("a key column").as_string::<i32>();
    assert_eq!(predictions.num_rows(), key_of.len());
    for row in 0..predictions.num_rows() {
        assert_eq!(keys.value(row), key_of[&queries.value(row)], "row {row}");
    }
    let line = std::fs::read_to_string(root.join("predictions.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    let mut fields: Vec<&String> = first.as_object().unwrap().keys().collect();
    fields.sort();
    assert_eq!(fields, ["image_ids", "text_id"]);
}

/// `manifest check` of a sharded output in the store: the same report as of the local folder,
/// naming the prefix; a part missing there is named.
#[test]
fn manifest_check_reads_a_sharded_output_in_the_store() {
    let server = S3Server::start();
    let corpus = crate::manifest::corpus();
    let root = corpus.path();
    let spool = tempfile::tempdir().unwrap();
    server.bucket("features");
    let run = |args: &[&str]| cnclip(&server, root, spool.path(), args);
    for out in ["sharded", "s3://features/sharded"] {
        for shard in ["0/2", "1/2"] {
            let mut args = extract_images("tiny.safetensors", out);
            args.extend(["--shard", shard].map(String::from));
            ok(run(&args.iter().map(String::as_str).collect::<Vec<_>>()));
        }
    }
    let summary = |output: Output| {
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).unwrap()
    };
    let local = summary(run(&["manifest", "check", "sharded", "--image-data", "lmdb/valid/imgs"]));
    let remote = summary(run(&["manifest", "check", "s3://features/sharded", "--image-data", "lmdb/valid/imgs"]));
    assert!(remote.starts_with("s3://features/sharded: 2 of 2 shards"), "{remote}");
    assert_eq!(remote.replacen("s3://features/sharded", "sharded", 1), local);
    let stored = server.data().join("features/sharded");
    let part = files_under(&stored).into_iter().find(|f| f.to_string_lossy().starts_with("part-00001")).unwrap();
    std::fs::remove_file(stored.join(part)).unwrap();
    let log = failed(run(&["manifest", "check", "s3://features/sharded"]));
    assert!(log.contains("s3://features/sharded") && log.contains("shard 1/2"), "{log}");
}
