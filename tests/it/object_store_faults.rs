//! Object storage under faults: a real S3 server (`s3s-fs`, [`cnclip_tests::s3::S3Server`])
//! behind a fault-injecting proxy ([`cnclip_tests::faulty::FaultyProxy`]) that answers `503
//! Slow Down`, goes silent, or stalls a download part-way. A store that fails now and then
//! still gives the whole output, and the job report counts the failed attempts; a store that
//! keeps failing fails the job after its retries, naming the object, in bounded time.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::object_store::{failed, ok, put_tree};
use cnclip_tests::faulty::{Fault, FaultyProxy};
use cnclip_tests::python;
use cnclip_tests::s3::S3Server;

/// How long a job may run before the watchdog kills it and fails the test.
const WATCHDOG: Duration = Duration::from_secs(60);

/// Runs `cnclip ARGS…` in `dir` against `server` through `proxy`, killing it (and failing the
/// test) if it runs past [`WATCHDOG`]. Returns its output and how long it ran.
fn cnclip(server: &S3Server, proxy: &FaultyProxy, dir: &Path, args: &[&str]) -> (Output, Duration) {
    let mut command = Command::new(cnclip_tests::cnclip_bin());
    command.current_dir(dir).args(args);
    server.configure(&mut command).env("AWS_ENDPOINT_URL", proxy.endpoint());
    let started = Instant::now();
    let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    // Drain both pipes on threads of their own, so the job never blocks on a full one.
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > WATCHDOG {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = String::from_utf8_lossy(&stderr.join().unwrap()).into_owned();
            panic!("cnclip {args:?} still ran after {WATCHDOG:?}; its stderr:\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = started.elapsed();
    (Output { status, stdout: stdout.join().unwrap(), stderr: stderr.join().unwrap() }, took)
}

/// A pipeline with, per table, a `webdataset` source over `shards` and a `write_parquet` sink
/// to `OUT/TABLE.parquet`.
fn webdataset_pipeline(shards: &str, tables: &[&str], out: &str) -> String {
    tables
        .iter()
        .map(|table| {
            format!(
                "[nodes.{table}]\nkind = \"webdataset\"\npaths = [\"{shards}\"]\ntable = \"{table}\"\n\n\
                 [nodes.{table}_out]\nkind = \"write_parquet\"\ninput = \"{table}\"\npath = \"{out}/{table}.parquet\"\n\n"
            )
        })
        .collect()
}

/// The number `N` of the report's `object storage: R requests, N failed attempts retried` line.
fn failed_attempts(log: &str) -> u64 {
    let line = log.lines().find(|l| l.contains("object storage:")).unwrap_or_else(|| panic!("no storage line: {log}"));
    let (_, rest) = line.split_once("requests, ").unwrap_or_else(|| panic!("{line}"));
    rest.split_whitespace().next().unwrap().parse().unwrap_or_else(|_| panic!("{line}"))
}

#[test]
fn a_store_answering_503_to_one_request_in_ten_still_gives_the_whole_output() {
    let server = S3Server::start();
    let proxy = FaultyProxy::start(&server.endpoint);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    python(crate::webdataset::MAKE_SHARDS, &[root.to_str().unwrap(), "7", "5", "6"], "");
    put_tree(&server, "corpus", &root.join("shards"), "laion/shards");
    let out_bucket = server.bucket("features");
    let tables = ["images", "texts"];
    std::fs::write(root.join("local.toml"), webdataset_pipeline("shards/*.tar", &tables, "local")).unwrap();
    ok(cnclip(&server, &proxy, root, &["run", "local.toml"]).0);
    assert_eq!(proxy.requests(), 0, "the local run went to the store");

    // One request in ten (a single fault in this job's 17 or so requests), then one in three
    // (HEADs, GETs, LISTs and PUTs among the faulted).
    for (every, out) in [(10, "one_in_ten"), (3, "one_in_three")] {
        let remote = webdataset_pipeline("s3://corpus/laion/shards/*.tar", &tables, &format!("s3://features/{out}"));
        std::fs::write(root.join("remote.toml"), remote).unwrap();
        let faults_before = proxy.faults();
        proxy.set(Fault::ServiceUnavailableEvery(every));
        let (output, took) = cnclip(&server, &proxy, root, &["run", "remote.toml"]);
        let log = ok(output);
        let faults = proxy.faults() - faults_before;
        eprintln!("every {every}: {took:?}, {} requests in all, {faults} faulted\n{log}", proxy.requests());
        for table in tables {
            assert!(log.contains(&format!("18 rows → s3://features/{out}/{table}.parquet")), "{log}");
            let written = std::fs::read(out_bucket.join(format!("{out}/{table}.parquet"))).unwrap();
            assert_eq!(written, std::fs::read(root.join(format!("local/{table}.parquet"))).unwrap(), "{out} {table}");
        }
        assert!(faults >= 1, "every {every}: {} requests, none faulted", proxy.requests());
        assert_eq!(failed_attempts(&log), faults, "every {every}: {log}");
    }
    // Nothing but the outputs stays in the bucket (no part, no temporary object).
    let mut left = walk(&out_bucket);
    left.sort();
    let mut expected: Vec<String> =
        ["one_in_ten", "one_in_three"].iter().flat_map(|o| tables.map(|t| format!("{o}/{t}.parquet"))).collect();
    expected.sort();
    assert_eq!(left, expected);
}

/// Every file under `dir`, relative to it.
fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            out.extend(walk(&path).into_iter().map(|p| format!("{name}/{p}")));
        } else {
            out.push(name);
        }
    }
    out
}

/// `cnclip run p.toml` with `--storage-option` for each of `options`.
fn run_args(options: &[&'static str]) -> Vec<&'static str> {
    let mut args = vec!["run", "p.toml"];
    for option in options {
        args.extend(["--storage-option", option]);
    }
    args
}

/// The options of the failing tests: one second per attempt, two retries.
const IMPATIENT: [&str; 4] = ["timeout=1s", "retries=2", "connect_timeout=1s", "retry_timeout=20s"];

/// A server with the shards `corpus/laion/shards/00000{0,1,2}.tar` (7, 5 and 6 samples), a
/// proxy in front of it forwarding everything, the job's folder with `p.toml` reading
/// `s3://corpus/laion/shards/000000.tar` into a local `out/images.parquet`.
fn one_shard_job() -> (S3Server, FaultyProxy, tempfile::TempDir) {
    let server = S3Server::start();
    let proxy = FaultyProxy::start(&server.endpoint);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    python(crate::webdataset::MAKE_SHARDS, &[root.to_str().unwrap(), "7", "5", "6"], "");
    put_tree(&server, "corpus", &root.join("shards"), "laion/shards");
    std::fs::write(root.join("p.toml"), webdataset_pipeline("s3://corpus/laion/shards/000000.tar", &["images"], "out"))
        .unwrap();
    (server, proxy, dir)
}

fn run_impatient(server: &S3Server, proxy: &FaultyProxy, root: &Path) -> (String, Duration) {
    let (output, took) = cnclip(server, proxy, root, &run_args(&IMPATIENT));
    (failed(output), took)
}

#[test]
fn a_silent_store_fails_the_job_after_its_retries_naming_the_object() {
    let (server, proxy, dir) = one_shard_job();
    proxy.set(Fault::Silent);
    let (stderr, took) = run_impatient(&server, &proxy, dir.path());
    eprintln!("{took:?} requests {} faults {}\n{stderr}", proxy.requests(), proxy.faults());
    assert!(stderr.contains("s3://corpus/laion/shards/000000.tar"), "{stderr}");
    assert!(stderr.contains("after 2 retries"), "{stderr}");
    assert_eq!((proxy.requests(), proxy.faults()), (3, 3), "{stderr}");
    assert!(took < Duration::from_secs(30), "{took:?}");
    assert!(!dir.path().join("out/images.parquet").exists());
}

#[test]
fn a_store_that_stalls_mid_body_fails_the_job_after_its_retries() {
    let (server, proxy, dir) = one_shard_job();
    let shard = std::fs::metadata(dir.path().join("shards/000000.tar")).unwrap().len();
    assert!(shard > 4 * 1000, "{shard} bytes");
    proxy.set(Fault::StallBodyAfter(1000));
    let (stderr, took) = run_impatient(&server, &proxy, dir.path());
    eprintln!("{took:?} requests {} faults {}\n{stderr}", proxy.requests(), proxy.faults());
    assert!(stderr.contains("s3://corpus/laion/shards/000000.tar"), "{stderr}");
    assert!(stderr.contains("operation timed out"), "{stderr}");
    // The download, then its two retries (each resuming where the one before stalled).
    assert_eq!(proxy.faults(), 3, "{stderr}");
    assert!(took < Duration::from_secs(30), "{took:?}");
    assert!(!dir.path().join("out/images.parquet").exists());
}

/// Runs `p.toml` of [`one_shard_job`] with the proxy stalling the first download after 1000
/// bytes, then forwarding everything again (the store's retry resumes the download where it
/// stopped). A local run of the shard first writes `local/images.parquet`. Returns the job's
/// log, and the server, proxy and folder, for the caller to look into.
fn a_stall_then_recovery() -> (String, S3Server, FaultyProxy, tempfile::TempDir) {
    let (server, proxy, dir) = one_shard_job();
    let root = dir.path();
    std::fs::write(root.join("local.toml"), webdataset_pipeline("shards/000000.tar", &["images"], "local")).unwrap();
    ok(cnclip(&server, &proxy, root, &["run", "local.toml"]).0);
    proxy.set(Fault::StallBodyAfter(1000));
    let output = std::thread::scope(|scope| {
        let job = scope.spawn(|| cnclip(&server, &proxy, root, &run_args(&IMPATIENT)).0);
        let started = Instant::now();
        while proxy.faults() == 0 && !job.is_finished() && started.elapsed() < WATCHDOG {
            std::thread::sleep(Duration::from_millis(5));
        }
        proxy.set(Fault::None);
        job.join().unwrap()
    });
    (ok(output), server, proxy, dir)
}

#[test]
fn a_download_stalled_once_resumes_where_it_stopped() {
    let (log, _server, proxy, dir) = a_stall_then_recovery();
    eprintln!("requests {} faults {}\n{log}", proxy.requests(), proxy.faults());
    assert_eq!(proxy.faults(), 1, "{log}");
    assert!(log.contains("7 rows → out/images.parquet"), "{log}");
    let written = std::fs::read(dir.path().join("out/images.parquet")).unwrap();
    assert_eq!(written, std::fs::read(dir.path().join("local/images.parquet")).unwrap());
}

#[test]
fn a_download_stalled_once_counts_as_a_failed_attempt() {
    let (log, _server, proxy, _dir) = a_stall_then_recovery();
    assert_eq!(proxy.faults(), 1, "{log}");
    assert_eq!(failed_attempts(&log), 1, "{log}");
}

#[test]
fn a_silent_store_fails_the_job_within_its_retry_timeout_however_many_retries_are_left() {
    let (server, proxy, dir) = one_shard_job();
    proxy.set(Fault::Silent);
    let args = run_args(&["timeout=1s", "retries=100", "retry_timeout=3s"]);
    let (output, took) = cnclip(&server, &proxy, dir.path(), &args);
    let stderr = failed(output);
    eprintln!("{took:?} requests {} faults {}\n{stderr}", proxy.requests(), proxy.faults());
    assert!(stderr.contains("s3://corpus/laion/shards/000000.tar"), "{stderr}");
    assert!(stderr.contains("max_retries: 100, retry_timeout: 3s"), "{stderr}");
    // No attempt begins after the 3 s; the last one ends a second (its timeout) later.
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!((3..=10).contains(&proxy.requests()), "{} requests", proxy.requests());
}
