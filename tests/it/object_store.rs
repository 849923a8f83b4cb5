//! Object storage (issue #25 item 1) against a real S3-compatible server (`s3s-fs`, started per
//! test on a free port: [`cnclip_tests::s3::S3Server`]): inputs read from `s3://` give what the
//! same files give from disk, outputs written to `s3://` are the bytes a local run writes, and
//! appear whole or not at all.

use std::path::Path;
use std::process::{Command, Output};

use cnclip_tests::python;
use cnclip_tests::s3::S3Server;

fn cnclip(server: &S3Server, dir: &Path, args: &[&str]) -> Output {
    let mut command = Command::new(cnclip_tests::cnclip_bin());
    server.configure(command.current_dir(dir).args(args)).output().unwrap()
}

pub(crate) fn ok(output: Output) -> String {
    assert!(output.status.success(), "cnclip failed:\n{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stderr).into_owned()
}

pub(crate) fn failed(output: Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "cnclip succeeded:\n{stderr}");
    stderr
}

/// Copies the files of the local folder `from` into the server's bucket as `prefix/…` (as `aws s3 cp
/// --recursive` would put it: s3s-fs keeps an object as the file at BUCKET/KEY).
pub(crate) fn put_tree(server: &S3Server, bucket: &str, from: &Path, prefix: &str) {
    let to = server.bucket(bucket).join(prefix);
    std::fs::create_dir_all(&to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.path().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

fn webdataset_pipeline(shards: &str, table: &str, out: &str) -> String {
    format!(
        "[nodes.source]\nkind = \"webdataset\"\npaths = [\"{shards}\"]\ntable = \"{table}\"\n\n\
         [nodes.out]\nkind = \"write_parquet\"\ninput = \"source\"\npath = \"{out}\"\n"
    )
}

#[test]
fn webdataset_shards_on_the_server_read_and_write_as_on_disk() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    python(crate::webdataset::MAKE_SHARDS, &[root.to_str().unwrap(), "7", "5", "6"], "");
    put_tree(&server, "corpus", &root.join("shards"), "laion/shards");
    let out_bucket = server.bucket("features");
    for table in ["images", "texts"] {
        let local = webdataset_pipeline("shards/{000000..000002}.tar", table, &format!("local/{table}.parquet"));
        std::fs::write(root.join("local.toml"), local).unwrap();
        ok(cnclip(&server, root, &["run", "local.toml"]));
        // A brace pattern and a glob over the bucket; the output written to the server.
        for (name, shards) in
            [("braces", "s3://corpus/laion/shards/{000000..000002}.tar"), ("glob", "s3://corpus/laion/shards/*.tar")]
        {
            let remote = webdataset_pipeline(shards, table, &format!("s3://features/{name}/{table}.parquet"));
            std::fs::write(root.join("remote.toml"), remote).unwrap();
            let log = ok(cnclip(&server, root, &["run", "remote.toml"]));
            assert!(log.contains(&format!("18 rows → s3://features/{name}/{table}.parquet")), "{log}");
            let written = std::fs::read(out_bucket.join(format!("{name}/{table}.parquet"))).unwrap();
            assert_eq!(written, std::fs::read(root.join(format!("local/{table}.parquet"))).unwrap(), "{name} {table}");
        }
    }
    // Nothing of the job stays in the bucket beside its outputs, and no upload is left open.
    let mut left = objects_and_uploads(&server);
    left.sort();
    let mut expected: Vec<String> = ["braces", "glob"]
        .iter()
        .flat_map(|n| ["images", "texts"].map(|t| format!("features/{n}/{t}.parquet")))
        .chain((0..3).map(|i| format!("corpus/laion/shards/{i:06}.tar")))
        .collect();
    expected.sort();
    assert_eq!(left, expected);
}

#[test]
fn missing_objects_and_empty_patterns_are_named() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    server.bucket("corpus");
    let toml = webdataset_pipeline("s3://corpus/none/{0..1}.tar", "images", "out.parquet")
        + "\n[nodes.globbed]\nkind = \"webdataset\"\npaths = [\"s3://corpus/none/*.tar\"]\n\n\
           [nodes.globbed_out]\nkind = \"write_parquet\"\ninput = \"globbed\"\npath = \"out2.parquet\"\n";
    std::fs::write(dir.path().join("p.toml"), toml).unwrap();
    let stderr = failed(cnclip(&server, dir.path(), &["run", "p.toml"]));
    for expected in [
        "s3://corpus/none/0.tar does not exist",
        "s3://corpus/none/1.tar does not exist",
        "pattern `s3://corpus/none/*.tar` matches no object",
    ] {
        assert!(stderr.contains(expected), "{expected}: {stderr}");
    }
    // A bucket the server does not have.
    std::fs::write(dir.path().join("q.toml"), webdataset_pipeline("s3://nobucket/x.tar", "images", "o.parquet"))
        .unwrap();
    let stderr = failed(cnclip(&server, dir.path(), &["run", "q.toml"]));
    assert!(stderr.contains("s3://nobucket/x.tar"), "{stderr}");
}

/// What the server holds: its objects (`BUCKET/KEY`) and its open multipart uploads
/// (`.upload-ID.json`, its record of one; s3s-fs has no ListMultipartUploads). Its own records
/// of objects (`.bucket-….json`) are left out.
fn objects_and_uploads(server: &S3Server) -> Vec<String> {
    walk(server.data()).into_iter().filter(|p| !p.starts_with(".bucket-")).collect()
}

/// Every file under `dir`, relative to it.
fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            out.extend(walk(&path).into_iter().map(|p| format!("{name}/{p}")));
        } else {
            out.push(path.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    out
}

/// `big/000000.tar`: `samples` samples of a 1 MiB random "image" each (the source does not
/// decode them), so the images table written from it takes several upload parts.
fn big_shard(root: &Path, samples: usize) {
    let script = r#"
import io, os, sys, tarfile
root, n = sys.argv[1], int(sys.argv[2])
os.makedirs(f"{root}/big", exist_ok=True)
rng = __import__("random").Random(25)
with tarfile.open(f"{root}/big/000000.tar", "w", format=tarfile.GNU_FORMAT) as tar:
    for i in range(n):
        data = rng.randbytes(1 << 20)
        info = tarfile.TarInfo(f"{i:09d}.jpg"); info.size = len(data); info.mtime = 0
        tar.addfile(info, io.BytesIO(data))
"#;
    python(script, &[root.to_str().unwrap(), &samples.to_string()], "");
}

/// The multipart uploads the server holds open.
fn open_uploads(server: &S3Server) -> Vec<String> {
    objects_and_uploads(server).into_iter().filter(|p| p.starts_with(".upload-")).collect()
}

/// Starts `cnclip run FILE` in `dir` against `server` with `options`, in a process group of its
/// own, as a batch system would.
fn spawn_run(server: &S3Server, dir: &Path, file: &str, options: &[&str]) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(cnclip_tests::cnclip_bin());
    command.current_dir(dir).arg("run").arg(file);
    for option in options {
        command.args(["--storage-option", option]);
    }
    server
        .configure(&mut command)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap()
}

/// Waits (up to 60 s) until the server holds an open multipart upload with a part in it (s3s-fs
/// keeps one as `.upload_id-ID.part-N`): the job knows the upload's id, since it sent a part
/// with it. (An upload the store made but whose answer never reached the job cannot be aborted
/// by it: only a listing of the bucket's uploads, or a lifecycle rule, finds that one.)
fn until_an_upload_is_open(server: &S3Server, job: &mut std::process::Child) {
    let start = std::time::Instant::now();
    let has_a_part = || walk(server.data()).iter().any(|p| p.starts_with(".upload_id-"));
    while open_uploads(server).is_empty() || !has_a_part() {
        assert!(job.try_wait().unwrap().is_none(), "the job ended before it began its upload");
        assert!(start.elapsed().as_secs() < 60, "no upload began in 60 s");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

#[test]
fn a_server_lost_mid_upload_fails_the_job_and_a_rerun_finishes_it_whole() {
    let mut server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    big_shard(root, 60);
    server.bucket("out");
    let toml = webdataset_pipeline("big/000000.tar", "images", "s3://out/images.parquet");
    std::fs::write(root.join("p.toml"), toml).unwrap();
    std::fs::write(root.join("local.toml"), webdataset_pipeline("big/000000.tar", "images", "local.parquet")).unwrap();
    ok(cnclip(&server, root, &["run", "local.toml"]));
    let expected = std::fs::read(root.join("local.parquet")).unwrap();
    assert!(expected.len() > 3 * (16 << 20), "the table takes several parts: {} bytes", expected.len());

    // The server goes away once the upload has begun.
    let options = ["retries=1", "retry_timeout=5s", "connect_timeout=1s", "timeout=5s"];
    let mut job = spawn_run(&server, root, "p.toml", &options);
    until_an_upload_is_open(&server, &mut job);
    server.stop();
    let output = job.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("s3://out/images.parquet"), "the error names the object: {stderr}");
    // Nothing at the target; the upload the job could not abort stays open on the server.
    server.restart();
    assert!(!server.data().join("out/images.parquet").exists());
    assert_eq!(open_uploads(&server).len(), 1, "{:?}", objects_and_uploads(&server));

    // The rerun aborts it (the spool's journal names it) and writes the whole table.
    let log = ok(spawn_run(&server, root, "p.toml", &[]).wait_with_output().unwrap());
    assert!(log.contains("60 rows → s3://out/images.parquet"), "{log}");
    assert_eq!(std::fs::read(server.data().join("out/images.parquet")).unwrap(), expected);
    assert_eq!(open_uploads(&server), Vec::<String>::new(), "{log}");
}

#[test]
fn sigterm_mid_upload_exits_143_quickly_and_aborts_the_upload() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    big_shard(root, 60);
    server.bucket("out");
    std::fs::write(root.join("p.toml"), webdataset_pipeline("big/000000.tar", "images", "s3://out/images.parquet"))
        .unwrap();
    let mut job = spawn_run(&server, root, "p.toml", &[]);
    until_an_upload_is_open(&server, &mut job);
    let signalled = std::time::Instant::now();
    let status = Command::new("kill").args(["-TERM", &job.id().to_string()]).status().unwrap();
    assert!(status.success());
    let output = job.wait_with_output().unwrap();
    let took = signalled.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(143), "{stderr}");
    assert!(took.as_secs_f64() < 5.0, "exited {took:?} after SIGTERM");
    assert!(!server.data().join("out/images.parquet").exists(), "{stderr}");
    assert_eq!(open_uploads(&server), Vec::<String>::new(), "{stderr}");
}

/// A sample's id (its decimal key's number, else `(shard << 32) | sample`) → its key, for the shards at `urls` (read from the
/// server's files with Python's tarfile: the keys as webdataset names them).
fn keys_by_id(server: &S3Server, bucket: &str, keys: &[String]) -> std::collections::BTreeMap<i64, i64> {
    let script = r#"
import json, sys, tarfile
out = {}
for shard, path in enumerate(sys.argv[1:]):
    seen = []
    for m in tarfile.open(path):
        key = m.name.split("/")[-1].split(".")[0]
        if not seen or seen[-1] != key:
            seen.append(key)
    for i, key in enumerate(seen):
        out[int(key) if key.isdigit() else (shard << 32) | i] = int(key)
print(json.dumps(out))
"#;
    let paths: Vec<String> =
        keys.iter().map(|k| server.data().join(bucket).join(k).to_string_lossy().into_owned()).collect();
    let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
    let map: std::collections::BTreeMap<String, i64> = serde_json::from_str(&python(script, &paths, "")).unwrap();
    map.into_iter().map(|(id, key)| (id.parse().unwrap(), key)).collect()
}

/// `extract-features` of both towers with the tiny model, one row a batch (bit-exact).
fn extract_args(images: &str, texts: &str, out: &str) -> Vec<String> {
    let (image_out, text_out) = (format!("{out}_img.parquet"), format!("{out}_txt.parquet"));
    [
        "extract-features",
        "--extract-image-feats",
        "--extract-text-feats",
        "--image-data",
        images,
        "--text-data",
        texts,
        "--image-feat-output-path",
        &image_out,
        "--text-feat-output-path",
        &text_out,
        "--resume",
        "tiny.safetensors",
        "--img-batch-size",
        "1",
        "--text-batch-size",
        "1",
        "--precision",
        "fp32",
    ]
    .map(String::from)
    .to_vec()
}

/// The corpus's valid split as img2dataset and Hugging Face would store it: `images.parquet`
/// (`key` as 9 digits, `jpg` bytes, `image` as `{bytes, path}`, a `url` column nobody reads)
/// and `texts.parquet` (`key`, `caption`), in the folder argv[2].
const I2D: &str = r#"
import base64, json, os, sys, pyarrow as pa, pyarrow.parquet as pq
root, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
ids, jpgs = [], []
for line in open(f"{root}/data/valid_imgs.tsv"):
    i, b64 = line.rstrip("\n").split("\t")
    ids.append(int(i)); jpgs.append(base64.urlsafe_b64decode(b64))
keys = [f"{i:09d}" for i in ids]
image = pa.array([{"bytes": b, "path": f"{k}.jpg"} for k, b in zip(keys, jpgs)])
pq.write_table(pa.table({"key": keys, "url": [f"https://example.com/{k}.jpg" for k in keys], "jpg": jpgs, "image": image}),
               f"{out}/images.parquet", row_group_size=16)
texts = [json.loads(l) for l in open(f"{root}/data/valid_texts.jsonl")]
pq.write_table(pa.table({"caption": [t["text"] for t in texts], "key": [f"{t['text_id']:09d}" for t in texts]}),
               f"{out}/texts.parquet")
"#;

/// The `key` column of a feature table, if it has one.
fn table_keys(path: &Path) -> Option<Vec<String>> {
    use arrow::array::AsArray;
    let file = std::fs::File::open(path).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap().build().unwrap();
    let mut keys = Vec::new();
    for batch in reader {
        let batch = batch.unwrap();
        let column = batch.column_by_name("key")?;
        keys.extend(column.as_string::<i32>().iter().map(|k| k.unwrap().to_string()));
    }
    Some(keys)
}

#[test]
fn extraction_from_webdataset_shards_on_the_server_equals_the_lmdb_split() {
    let server = S3Server::start();
    let corpus = crate::manifest::corpus();
    let root = corpus.path();
    server.bucket("corpus");
    server.bucket("features");
    // The valid split as WebDataset shards in the store, written there by cnclip itself: images
    // (the TSV's, keyed by image_id) in three shards, texts (keyed by text_id) in one.
    let toml = "[nodes.b64]\nkind = \"tsv\"\npaths = [\"data/valid_imgs.tsv\"]\n\n\
                [nodes.images]\nkind = \"decode_base64\"\ninput = \"b64\"\n\n\
                [nodes.images_out]\nkind = \"write_webdataset\"\ninput = \"images\"\npath = \"s3://corpus/valid/images\"\n\
                samples_per_shard = 15\n\n\
                [nodes.texts]\nkind = \"jsonl\"\npaths = [\"data/valid_texts.jsonl\"]\n\n\
                [nodes.texts_out]\nkind = \"write_webdataset\"\ninput = \"texts\"\npath = \"s3://corpus/valid/texts\"\n";
    std::fs::write(root.join("to_shards.toml"), toml).unwrap();
    ok(cnclip(&server, root, &["run", "to_shards.toml"]));
    let image_shards: Vec<String> = (0..3).map(|i| format!("valid/images/{i:06}.tar")).collect();
    for shard in image_shards.iter().chain([&"valid/texts/000000.tar".to_string()]) {
        assert!(server.data().join("corpus").join(shard).is_file(), "{shard} was not uploaded");
    }

    let extract = |images: &str, texts: &str, out: &str| {
        let args = extract_args(images, texts, out);
        ok(cnclip(&server, root, &args.iter().map(String::as_str).collect::<Vec<_>>()))
    };
    extract("lmdb/valid/imgs", "data/valid_texts.jsonl", "local");
    let log =
        extract("s3://corpus/valid/images/{000000..000002}.tar", "s3://corpus/valid/texts/*.tar", "s3://features/wds");
    assert!(log.contains("object storage:"), "{log}");

    // The split as TSV and JSONL in the store, and as Parquet tables cnclip imports into it.
    put_tree(&server, "corpus", &root.join("data"), "tsv");
    ok(cnclip(&server, root, &["import", "--data-dir", "data", "--splits", "valid", "--out", "s3://corpus/parquet"]));
    extract("s3://corpus/tsv/valid_imgs.tsv", "s3://corpus/tsv/valid_texts.jsonl", "s3://features/tsv");
    extract("s3://corpus/parquet/valid_images.parquet", "s3://corpus/parquet/valid_texts.parquet", "s3://features/pq");
    // img2dataset's layout (`key`, `jpg`, `caption`, other columns beside) and Hugging Face's
    // (`image` as `{bytes, path}`), mapped with --id-column and the tower's column.
    python(I2D, &[root.to_str().unwrap(), server.bucket("corpus").join("i2d").to_str().unwrap()], "");
    for (image_column, out) in [("jpg", "i2d"), ("image", "hf")] {
        let mut args = extract_args(
            "s3://corpus/i2d/images.parquet",
            "s3://corpus/i2d/texts.parquet",
            &format!("s3://features/{out}"),
        );
        args.extend(
            ["--id-column", "key", "--image-column", image_column, "--text-column", "caption"].map(String::from),
        );
        ok(cnclip(&server, root, &args.iter().map(String::as_str).collect::<Vec<_>>()));
    }

    let local_images = crate::manifest::read_table(&[root.join("local_img.parquet")]);
    let local_texts = crate::manifest::read_table(&[root.join("local_txt.parquet")]);
    let remote_images = crate::manifest::read_table(&[server.data().join("features/wds_img.parquet")]);
    let remote_texts = crate::manifest::read_table(&[server.data().join("features/wds_txt.parquet")]);
    for format in ["tsv", "pq", "i2d", "hf"] {
        for (tower, local) in [("img", &local_images), ("txt", &local_texts)] {
            let path = server.data().join(format!("features/{format}_{tower}.parquet"));
            let remote = crate::manifest::read_table(std::slice::from_ref(&path));
            assert_eq!(remote.rows.len(), local.rows.len(), "{format} {tower}");
            assert!(remote.rows == local.rows, "{format} {tower}: the features differ from the LMDB split's");
            // Mapped layouts carry their string keys; the others have none.
            let keys = table_keys(&path);
            if ["i2d", "hf"].contains(&format) {
                let expected: Vec<String> = remote.ids_in_order.iter().map(|id| format!("{id:09}")).collect();
                assert_eq!(keys, Some(expected), "{format} {tower}");
            } else {
                assert_eq!(keys, None, "{format} {tower}");
            }
        }
    }
    for (what, local, remote, keys, tower) in [
        ("images", &local_images, &remote_images, keys_by_id(&server, "corpus", &image_shards), "img"),
        (
            "texts",
            &local_texts,
            &remote_texts,
            keys_by_id(&server, "corpus", &["valid/texts/000000.tar".into()]),
            "txt",
        ),
    ] {
        assert_eq!(local.rows.len(), keys.len(), "{what}: every sample has its row");
        assert_eq!(remote.rows.len(), keys.len(), "{what}: every sample has its row");
        for (id, bits) in &remote.rows {
            let key = keys[id];
            assert_eq!(Some(bits), local.rows.get(&key), "{what}: sample {key} (id {id:#x})");
        }
        // Keys of decimal digits (cnclip's write_webdataset names samples by their ids) give
        // those ids back: the same table, ids included.
        assert!(remote.rows == local.rows, "{what}: the ids or features differ from the LMDB split's");
        // Each row carries its sample's key.
        let expected: Vec<String> = remote.ids_in_order.iter().map(|id| format!("{:09}", keys[id])).collect();
        assert_eq!(table_keys(&server.data().join(format!("features/wds_{tower}.parquet"))), Some(expected), "{what}");
    }

    // The same predictions and recall JSON from every form of the corpus, the tables read from
    // the store.
    let recall = |name: &str, images: &str, texts: &str| -> (String, String) {
        let predictions = format!("predictions_{name}.jsonl");
        let args = ["make-topk-predictions", "--image-feats", images, "--text-feats", texts, "--top-k", "10"];
        ok(cnclip(&server, root, &[&args[..], &["--output", &predictions]].concat()));
        let out = format!("recall_{name}.json");
        ok(cnclip(&server, root, &["evaluation", "data/valid_texts.jsonl", &predictions, &out]));
        let read = |file: &str| std::fs::read_to_string(root.join(file)).unwrap();
        (read(&predictions), read(&out))
    };
    let local = recall("local", "local_img.parquet", "local_txt.parquet");
    assert!(local.1.contains("r1"), "{}", local.1);
    for name in ["wds", "tsv", "pq", "i2d", "hf"] {
        let (images, texts) =
            (format!("s3://features/{name}_img.parquet"), format!("s3://features/{name}_txt.parquet"));
        assert!(recall(name, &images, &texts) == local, "{name}: other predictions or recall than the LMDB split's");
    }
}

#[test]
fn a_part_in_the_store_has_one_writer_and_a_gone_writers_claim_is_taken_over() {
    let server = S3Server::start();
    let corpus = crate::manifest::corpus();
    let root = corpus.path();
    let bucket = server.bucket("features");
    let extract = |shard: &str| {
        let args = [
            "extract-features",
            "--extract-image-feats",
            "--image-data",
            "lmdb/valid/imgs",
            "--image-feat-output-path",
            "s3://features/sharded",
            "--resume",
            "tiny.safetensors",
            "--shard",
            shard,
        ];
        cnclip(&server, root, &args)
    };
    // Another machine's job holds shard 0's claim: this one fails, naming it, and writes nothing.
    let claim = bucket.join("sharded/.part-00000-of-00002.parquet.cnclip-lock");
    std::fs::create_dir_all(claim.parent().unwrap()).unwrap();
    std::fs::write(&claim, "pid 4242 on another-node").unwrap();
    let stderr = failed(extract("0/2"));
    assert!(
        stderr.contains("another job is writing it (pid 4242 on another-node")
            && stderr.contains("s3://features/sharded/.part-00000-of-00002.parquet.cnclip-lock"),
        "{stderr}"
    );
    assert!(!bucket.join("sharded/part-00000-of-00002.parquet").exists());
    assert_eq!(std::fs::read_to_string(&claim).unwrap(), "pid 4242 on another-node", "the claim is not touched");
    // A claim of this host's whose process is gone (a killed job) is taken over.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let mut gone = Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    std::fs::write(&claim, format!("pid {} on {}", gone.id(), host.trim())).unwrap();
    ok(extract("0/2"));
    ok(extract("1/2"));
    let mut names: Vec<String> = std::fs::read_dir(bucket.join("sharded"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "part-00000-of-00002.json",
            "part-00000-of-00002.parquet",
            "part-00001-of-00002.json",
            "part-00001-of-00002.parquet"
        ],
        "the parts, their entries, and no claim left"
    );
    let table = crate::manifest::read_table(&[
        bucket.join("sharded/part-00000-of-00002.parquet"),
        bucket.join("sharded/part-00001-of-00002.parquet"),
    ]);
    assert_eq!(table.rows.len(), crate::manifest::IMAGES);
}
