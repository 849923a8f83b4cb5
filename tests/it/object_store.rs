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

fn ok(output: Output) -> String {
    assert!(output.status.success(), "cnclip failed:\n{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn failed(output: Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "cnclip succeeded:\n{stderr}");
    stderr
}

/// Copies the local folder `from` into the server's bucket as `prefix/…` (as `aws s3 cp
/// --recursive` would put it: s3s-fs keeps an object as the file at BUCKET/KEY).
fn put_tree(server: &S3Server, bucket: &str, from: &Path, prefix: &str) {
    let to = server.bucket(bucket).join(prefix);
    std::fs::create_dir_all(&to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
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
