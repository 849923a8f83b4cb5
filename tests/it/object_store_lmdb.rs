//! cn_clip LMDB splits in an object store (issue #25 item 1), against a real S3-compatible
//! server ([`cnclip_tests::s3::S3Server`]): a split at `s3://bucket/…/lmdb/train` (objects
//! `imgs/data.mdb`, `pairs/data.mdb`) is read by ranged GETs through the checked reader and gives
//! what the same split gives from disk, to the byte and to the trained parameter; a walk costs
//! about one request per cached block, not one per page; a truncated object is refused as a
//! truncated file is, naming its URL.

use std::path::Path;
use std::process::{Command, Output};

use cnclip_tests::s3::S3Server;

use crate::object_store::{failed, ok, put_tree};
use crate::train_cli::{corpus, samples_by_step, the_log, train_args};
use crate::train_shards::assert_same_parameters;

/// The block the reader fetches an object by (`operators/src/lmdb_file/reader.rs`'s `BLOCK`).
const BLOCK: u64 = 256 << 10;

fn cnclip(server: &S3Server, dir: &Path, args: &[&str]) -> Output {
    let mut command = Command::new(cnclip_tests::cnclip_bin());
    server.configure(command.current_dir(dir).args(args)).output().unwrap()
}

/// The local split `dir/corpus/lmdb/{split}` copied into bucket `corpus` as `lmdb/{split}/…`.
fn put_split(server: &S3Server, dir: &Path, split: &str) {
    for db in ["imgs", "pairs"] {
        put_tree(server, "corpus", &dir.join(format!("corpus/lmdb/{split}/{db}")), &format!("lmdb/{split}/{db}"));
    }
}

fn lmdb_pipeline(split: &str, database: &str, out: &str) -> String {
    format!(
        "[nodes.source]\nkind = \"lmdb\"\npath = \"{split}\"\ndatabase = \"{database}\"\n\n\
         [nodes.out]\nkind = \"write_parquet\"\ninput = \"source\"\npath = \"{out}\"\n"
    )
}

/// The request count of a job report's `object storage: N requests` line.
fn requests(log: &str) -> u64 {
    let line = log.lines().find(|l| l.contains("object storage:")).unwrap_or_else(|| panic!("no request count: {log}"));
    let count = line.split("object storage:").nth(1).unwrap().split_whitespace().next().unwrap();
    count.parse().unwrap()
}

#[test]
fn an_lmdb_split_on_the_server_reads_as_on_disk_by_a_request_per_block() {
    let server = S3Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // Enough images that `imgs` spans several blocks and hundreds of pages.
    corpus(dir, 1000);
    put_split(&server, dir, "train");
    for database in ["imgs", "pairs"] {
        let local = lmdb_pipeline("corpus/lmdb/train", database, &format!("local/{database}.parquet"));
        std::fs::write(dir.join("local.toml"), local).unwrap();
        ok(cnclip(&server, dir, &["run", "local.toml"]));
        let remote = lmdb_pipeline("s3://corpus/lmdb/train", database, &format!("remote/{database}.parquet"));
        std::fs::write(dir.join("remote.toml"), remote).unwrap();
        let log = ok(cnclip(&server, dir, &["run", "remote.toml"]));
        assert!(log.contains(&format!("1000 rows → remote/{database}.parquet")), "{log}");
        let (local, remote) =
            (dir.join(format!("local/{database}.parquet")), dir.join(format!("remote/{database}.parquet")));
        assert!(std::fs::read(&local).unwrap() == std::fs::read(&remote).unwrap(), "{database}: the tables differ");

        // Requests: a HEAD of the object when the node is built, two opens (the record estimate
        // and the read: a HEAD and the meta pages' block each), then the walk by blocks. The
        // `pairs` walk is made once per digit of the last key (1000 keys: 3 passes), from the
        // cache.
        let bytes = std::fs::metadata(dir.join(format!("corpus/lmdb/train/{database}/data.mdb"))).unwrap().len();
        let (pages, blocks) = (bytes / 4096, bytes.div_ceil(BLOCK));
        let made = requests(&log);
        assert!(made <= blocks + 5, "{database}: {made} requests for {blocks} blocks ({pages} pages)");
        if database == "imgs" {
            assert!(blocks >= 4 && made * 20 < pages, "{database}: {made} requests for {pages} pages");
        }
    }
    // `cnclip import --lmdb-dir` over the bucket writes the same tables.
    ok(cnclip(&server, dir, &["import", "--lmdb-dir", "s3://corpus/lmdb", "--splits", "train", "--out", "imported"]));
    let imported = dir.join("imported/train_pairs.parquet");
    assert!(std::fs::read(imported).unwrap() == std::fs::read(dir.join("local/pairs.parquet")).unwrap());

    // A prefix without the split is named, as a local directory without it is.
    let missing = lmdb_pipeline("s3://corpus/lmdb/none", "pairs", "out.parquet");
    std::fs::write(dir.join("missing.toml"), missing).unwrap();
    let stderr = failed(cnclip(&server, dir, &["run", "missing.toml"]));
    assert!(stderr.contains("s3://corpus/lmdb/none/pairs is not an LMDB (no data.mdb)"), "{stderr}");
}

#[test]
fn training_on_an_lmdb_split_on_the_server_ends_as_training_on_disk() {
    let server = S3Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    corpus(dir, 64);
    put_split(&server, dir, "train");
    put_split(&server, dir, "valid");
    let extra = ["--max-epochs", "2", "--log-interval", "1", "--debug"];
    ok(cnclip(&server, dir, &train_args("local", &extra)));
    let mut args = train_args("remote", &extra);
    for (flag, value) in [("--train-data", "s3://corpus/lmdb/train"), ("--val-data", "s3://corpus/lmdb/valid")] {
        let at = args.iter().position(|a| *a == flag).unwrap() + 1;
        args[at] = value;
    }
    ok(cnclip(&server, dir, &args));
    for epoch in ["epoch1.pt", "epoch2.pt"] {
        let at = |run: &str| dir.join(format!("logs/{run}/checkpoints/{epoch}"));
        assert_same_parameters(&at("local"), &at("remote"));
    }
    let metrics = |run: &str| samples_by_step(&dir.join(format!("logs/{run}/metrics.parquet")));
    assert_eq!(metrics("local"), metrics("remote"));
    let log = the_log(&dir.join("logs/remote"));
    assert!(log.contains("train LMDB file contains 64 images and 64 pairs."), "{log}");
    // Read where it is: nothing was serialized into the run's directory.
    assert!(!dir.join("logs/remote/data/train-data").exists());
}

/// The error line of a failed job (its `data.mdb: …` message).
fn corrupt_line<'a>(stderr: &'a str, path: &str) -> &'a str {
    let line = stderr.lines().find(|l| l.contains(path)).unwrap_or_else(|| panic!("{path} is not named: {stderr}"));
    &line[line.find(path).unwrap() + path.len()..]
}

#[test]
fn a_truncated_lmdb_object_is_refused_as_a_truncated_file_naming_its_url() {
    let server = S3Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    corpus(dir, 64);
    let data = std::fs::read(dir.join("corpus/lmdb/train/imgs/data.mdb")).unwrap();
    let bucket = server.bucket("corpus");
    for (name, len) in [("half", data.len() / 2), ("page", 4096), ("lastpage", data.len() - 4096)] {
        // The same truncated file, on disk and as an object.
        let local = dir.join(format!("{name}/imgs"));
        std::fs::create_dir_all(&local).unwrap();
        std::fs::write(local.join("data.mdb"), &data[..len]).unwrap();
        std::fs::create_dir_all(bucket.join(format!("{name}/imgs"))).unwrap();
        std::fs::write(bucket.join(format!("{name}/imgs/data.mdb")), &data[..len]).unwrap();

        std::fs::write(dir.join("local.toml"), lmdb_pipeline(name, "imgs", "local.parquet")).unwrap();
        let local_err = failed(cnclip(&server, dir, &["run", "local.toml"]));
        let url = format!("s3://corpus/{name}");
        std::fs::write(dir.join("remote.toml"), lmdb_pipeline(&url, "imgs", "remote.parquet")).unwrap();
        let remote_err = failed(cnclip(&server, dir, &["run", "remote.toml"]));
        for stderr in [&local_err, &remote_err] {
            assert!(stderr.contains("corrupt or truncated LMDB file, not read"), "{name}: {stderr}");
            assert!(!stderr.contains("panicked"), "{name}: {stderr}");
        }
        let remote_line = corrupt_line(&remote_err, &format!("{url}/imgs/data.mdb"));
        assert_eq!(remote_line, corrupt_line(&local_err, &format!("{name}/imgs/data.mdb")), "{name}");
        assert!(!dir.join("remote.parquet").exists());
    }
}
