//! `cnclip cluster` (issue #13, item 1): a Ballista scheduler and two executors, each its own
//! process on 127.0.0.1 (free ports, killed when the test ends, however it ends). On it, the SQL
//! jobs give exactly the local results — the recall of `evaluation --engine sql`, the top-1 of
//! `zeroshot-evaluation --engine sql`, and a top-1-by-dot-product join of a text-feature table
//! with an image-feature table — and both executors take part. Killing an executor mid-query
//! gives a clear error or the right result, within a bound: never a wrong one, never a hang.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cnclip_tests::{python, reference};

/// Image-feature parts (4 × 500 rows) and a text-feature table, both 32-d; a ground truth and
/// predictions for recall (cn_clip's JSON lines).
const MAKE_TABLES: &str = r#"
import sys, os, json, numpy as np, pyarrow as pa, pyarrow.parquet as pq
root, n_img, n_txt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(13)
def unit(n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)
def table(ids, feats):
    return pa.table({"id": pa.array(ids, pa.int64()),
                     "feature": pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1), pa.float32()), feats.shape[1])})
images, texts = unit(n_img, 32), unit(n_txt, 32)
os.makedirs(f"{root}/img")
step = n_img // 4
for p in range(4):
    pq.write_table(table(list(range(p * step, (p + 1) * step)), images[p * step:(p + 1) * step]),
                   f"{root}/img/part-{p:05d}-of-00004.parquet", row_group_size=step // 2)
pq.write_table(table(list(range(n_txt)), texts), f"{root}/txt.parquet")
with open(f"{root}/truth.jsonl", "w") as t, open(f"{root}/predictions.jsonl", "w") as p:
    for q in range(n_txt):
        t.write(json.dumps({"text_id": q, "text": "x", "image_ids": [int(i) for i in rng.choice(n_img, 2, replace=False)]}) + "\n")
        p.write(json.dumps({"text_id": q, "image_ids": [int(i) for i in rng.choice(n_img, 10, replace=False)]}) + "\n")
"#;

/// Every text's best image by dot product (ties: the lower id).
const TOP1: &str = "SELECT text_id, image_id, s FROM (SELECT t.id AS text_id, i.id AS image_id, \
                    dot(t.feature, i.feature) AS s, \
                    row_number() OVER (PARTITION BY t.id ORDER BY dot(t.feature, i.feature) DESC, i.id) AS r \
                    FROM txt t CROSS JOIN img i) WHERE r = 1 ORDER BY text_id";

/// Child processes killed (and reaped) on drop, so no test leaves a cluster running.
struct Cluster {
    scheduler: Child,
    executors: Vec<Option<Child>>,
    work_dirs: Vec<PathBuf>,
    /// Tasks each executor has taken so far.
    tasks: Vec<Arc<AtomicUsize>>,
    url: String,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for child in self.executors.iter_mut().flatten().chain([&mut self.scheduler]) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The first stdout line of `child`, within `limit`.
fn first_line(child: &mut Child, limit: Duration) -> String {
    let stdout = child.stdout.take().expect("piped");
    let (send, receive) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let _ = send.send(lines.next().and_then(Result::ok).unwrap_or_default());
        // Keep draining so the process never blocks on a full pipe.
        for _ in lines {}
    });
    receive.recv_timeout(limit).unwrap_or_default()
}

impl Cluster {
    /// A scheduler on a free port and `executors` executors, each with its own work directory.
    fn start(root: &Path, executors: usize) -> Cluster {
        Cluster::start_reaching(root, executors, None)
    }

    /// [`Cluster::start`], every process configured to reach `store`.
    fn start_reaching(root: &Path, executors: usize, store: Option<&cnclip_tests::s3::S3Server>) -> Cluster {
        let command = || {
            let mut command = Command::new(cnclip_tests::cnclip_bin());
            if let Some(store) = store {
                store.configure(&mut command);
            }
            command
        };
        let mut scheduler = command()
            .args(["cluster", "scheduler", "--bind", "127.0.0.1:0", "--executor-timeout-seconds", "6"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let line = first_line(&mut scheduler, Duration::from_secs(60));
        let address = line
            .split_whitespace()
            .find(|w| w.starts_with("127.0.0.1:"))
            .unwrap_or_else(|| panic!("no address in the scheduler's line `{line}`"))
            .to_string();
        let mut cluster = Cluster {
            scheduler,
            executors: Vec::new(),
            work_dirs: Vec::new(),
            tasks: Vec::new(),
            url: format!("df://{address}"),
        };
        for e in 0..executors {
            let work = root.join(format!("executor-{e}"));
            std::fs::create_dir_all(&work).unwrap();
            let mut child = command()
                .args(["cluster", "executor", "--scheduler", &address, "--bind-host", "127.0.0.1"])
                .args(["--concurrent-tasks", "2", "--heartbeat-interval-seconds", "2", "--work-dir"])
                .arg(&work)
                // Ballista's execution loop logs each task it takes: counted in `tasks`.
                .env("RUST_LOG", "ballista_executor::execution_loop=info")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let line = first_line(&mut child, Duration::from_secs(60));
            assert!(line.contains("cnclip cluster executor"), "executor {e} said `{line}`");
            let tasks = Arc::new(AtomicUsize::new(0));
            let stderr = child.stderr.take().expect("piped");
            std::thread::spawn({
                let tasks = Arc::clone(&tasks);
                move || {
                    // Bytes, not text: a line that is not UTF-8 must not end the count.
                    let mut reader = BufReader::new(stderr);
                    let mut line = Vec::new();
                    while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
                        if line.windows(13).any(|w| w == b"Received task") {
                            tasks.fetch_add(1, Ordering::SeqCst);
                        }
                        line.clear();
                    }
                }
            });
            cluster.executors.push(Some(child));
            cluster.tasks.push(tasks);
            cluster.work_dirs.push(work);
        }
        cluster
    }

    /// Executors that have run a task (their work directory holds a job's directory; the
    /// `datafusion-…` one is the spill directory every executor makes at start).
    fn executors_used(&self) -> usize {
        let ran = |d: &PathBuf| {
            std::fs::read_dir(d)
                .is_ok_and(|r| r.flatten().any(|e| !e.file_name().to_string_lossy().starts_with("datafusion-")))
        };
        self.work_dirs.iter().filter(|d| ran(d)).count()
    }
}

/// `cnclip ARGS` in `root`, killed after `limit` (then `None`).
fn cnclip(root: &Path, args: &[&str], limit: Duration) -> Option<Output> {
    let mut child = Command::new(cnclip_tests::cnclip_bin())
        .args(args)
        .current_dir(root)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(child.wait_with_output().unwrap())
}

fn ok(root: &Path, args: &[&str]) -> String {
    let output = cnclip(root, args, Duration::from_secs(300)).unwrap_or_else(|| panic!("cnclip {args:?} hung"));
    assert!(output.status.success(), "cnclip {args:?}:\n{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `cnclip ARGS` in `root`, reaching `store`, which must succeed; its stdout.
fn ok_reaching(root: &Path, store: &cnclip_tests::s3::S3Server, args: &[&str]) -> String {
    let mut command = Command::new(cnclip_tests::cnclip_bin());
    let output = store.configure(command.args(args).current_dir(root)).output().unwrap();
    assert!(output.status.success(), "cnclip {args:?}:\n{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn sql_over_tables_in_an_object_store_equals_the_local_results_here_and_on_a_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    python(MAKE_TABLES, &[root.to_str().unwrap(), "1000", "100"], "");
    let store = cnclip_tests::s3::S3Server::start();
    let bucket = store.bucket("tables");
    std::fs::create_dir_all(bucket.join("img")).unwrap();
    for entry in std::fs::read_dir(root.join("img")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), bucket.join("img").join(entry.file_name())).unwrap();
    }
    std::fs::copy(root.join("txt.parquet"), bucket.join("txt.parquet")).unwrap();
    let local = ok(root, &["sql", TOP1, "--table", "img=img", "--table", "txt=txt.parquet", "--format", "jsonl"]);
    assert_eq!(local.lines().count(), 100);
    // The executors read the store themselves: the tables are nowhere on their disks.
    let remote = ["--table", "img=s3://tables/img", "--table", "txt=s3://tables/txt.parquet", "--format", "jsonl"];
    assert_eq!(ok_reaching(root, &store, &[&["sql", TOP1][..], &remote[..]].concat()), local, "sql here");
    let cluster = Cluster::start_reaching(root, 2, Some(&store));
    for _ in 0..10 {
        let distributed =
            ok_reaching(root, &store, &[&["sql", TOP1, "--cluster", &cluster.url][..], &remote[..]].concat());
        assert_eq!(distributed, local, "the top-1 join over s3:// tables on the cluster differs from the local one");
        if cluster.executors_used() == 2 {
            break;
        }
    }
    assert_eq!(cluster.executors_used(), 2, "one executor did all the work");
    // A prefix missing a shard's part is refused, naming it, as a local directory is.
    std::fs::remove_file(bucket.join("img/part-00002-of-00004.parquet")).unwrap();
    let mut command = Command::new(cnclip_tests::cnclip_bin());
    let output =
        store.configure(command.args([&["sql", TOP1][..], &remote[..]].concat()).current_dir(root)).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("s3://tables/img") && stderr.contains("2"), "{stderr}");
}

#[test]
fn sql_evaluation_and_zeroshot_on_a_cluster_equal_the_local_results() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    python(MAKE_TABLES, &[root.to_str().unwrap(), "1000", "100"], "");
    let cluster = Cluster::start(root, 2);
    let url = cluster.url.as_str();

    // The join, distributed: both executors take part (a query over 4 parts on 2 × 2 slots;
    // an executor may register a moment after the first query, so up to a few tries).
    let tables = ["--table", "img=img", "--table", "txt=txt.parquet", "--format", "jsonl"];
    let local = ok(root, &[&["sql", TOP1][..], &tables[..]].concat());
    assert_eq!(local.lines().count(), 100);
    for _ in 0..10 {
        let distributed = ok(root, &[&["sql", TOP1, "--cluster", url][..], &tables[..]].concat());
        assert_eq!(distributed, local, "the top-1 join on the cluster differs from the local one");
        if cluster.executors_used() == 2 {
            break;
        }
    }
    assert_eq!(cluster.executors_used(), 2, "one executor did all the work");

    // Recall@1/5/10: the cluster's JSON is the local SQL engine's and the direct engine's.
    let recall = |engine: &str, out: &str, on_cluster: bool| -> String {
        let mut args = vec!["evaluation", "--engine", engine, "truth.jsonl", "predictions.jsonl", out];
        if on_cluster {
            args.extend(["--cluster", url]);
        }
        ok(root, &args);
        std::fs::read_to_string(root.join(out)).unwrap()
    };
    let direct = recall("direct", "direct.json", false);
    assert!(direct.contains("\"success\": true"), "{direct}");
    assert_eq!(recall("sql", "local.json", false), direct);
    assert_eq!(recall("sql", "cluster.json", true), direct, "recall on the cluster");
    let leftovers: Vec<_> = std::fs::read_dir(root)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".cnclip-sql-"))
        .collect();
    assert!(leftovers.is_empty(), "scratch tables left behind");

    // Zero-shot top-1 (cnclip-torch): the cluster's is the local SQL engine's.
    python(crate::zeroshot::MAKE_FOLDER, &[root.to_str().unwrap()], "");
    let checkpoint = root.join("rn50.pt").display().to_string();
    reference(&["build-model", "--config", "RN50@RBT3-chinese", "--seed", "3", "--out", &checkpoint], "");
    let zeroshot = |save_dir: &str, on_cluster: bool| -> String {
        let mut args = vec!["zeroshot-evaluation", "--engine", "sql", "--save-dir", save_dir];
        args.extend(["--datapath", "images", "--label-file", "labels.txt", "--dataset", "food-101"]);
        args.extend(["--resume", "rn50.pt", "--precision", "fp32", "--vision-model", "RN50"]);
        args.extend(["--text-model", "RBT3-chinese", "--img-batch-size", "4"]);
        if on_cluster {
            args.extend(["--cluster", url]);
        }
        let stdout = ok(root, &args);
        stdout.lines().find(|l| l.starts_with("zeroshot-top1:")).unwrap_or_default().to_string()
    };
    let local = zeroshot("zs_local", false);
    assert!(local.starts_with("zeroshot-top1: "), "{local}");
    assert_eq!(zeroshot("zs_cluster", true), local, "zero-shot top-1 on the cluster");
}

#[test]
fn killing_an_executor_mid_query_gives_an_error_or_the_right_result() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    python(MAKE_TABLES, &[root.to_str().unwrap(), "2000", "200"], "");
    let tables = ["--table", "img=img", "--table", "txt=txt.parquet", "--format", "jsonl"];
    let expected = ok(root, &[&["sql", TOP1][..], &tables[..]].concat());
    let mut cluster = Cluster::start(root, 2);
    let url = cluster.url.clone();
    // The client's output goes to files: a pipe it filled would block it, and look like a hang.
    let (stdout, stderr) = (root.join("client.out"), root.join("client.err"));
    let mut client = KillOnDrop(
        Command::new(cnclip_tests::cnclip_bin())
            .args(["sql", TOP1, "--cluster", &url])
            .args(tables)
            .current_dir(root)
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap(),
    );
    // Kill an executor as soon as it takes a task of the query (however loaded the machine,
    // and so however slow the query, it then dies mid-query): the first to take one.
    let client_err = || std::fs::read_to_string(&stderr).unwrap_or_default();
    let start = Instant::now();
    let victim = loop {
        if let Some(busy) = cluster.tasks.iter().position(|t| t.load(Ordering::SeqCst) > 0) {
            break busy;
        }
        assert!(
            client.0.try_wait().unwrap().is_none(),
            "the query ended before an executor took a task: {}",
            client_err()
        );
        assert!(start.elapsed() < Duration::from_secs(300), "no executor took a task in 300 s: {}", client_err());
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut victim = cluster.executors[victim].take().unwrap();
    victim.kill().unwrap();
    victim.wait().unwrap();
    let killed = Instant::now();
    // The bound: the scheduler notices the loss within its executor timeout (6 s here) and
    // reruns the lost tasks or fails the job; a query that never answers is a hang.
    let status = loop {
        if let Some(status) = client.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(420),
            "the client hung after an executor died: {}",
            client_err()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = client_err();
    if status.success() {
        let stdout = std::fs::read_to_string(&stdout).unwrap();
        assert_eq!(stdout, expected, "a wrong result after an executor died");
    } else {
        assert!(stderr.contains("Error") || stderr.contains("error"), "no clear error: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    eprintln!(
        "executor killed {:.1} s into the query; client {} {:.1} s later",
        (killed - start).as_secs_f64(),
        if status.success() { "retried, right result," } else { "failed with an error" },
        killed.elapsed().as_secs_f64()
    );
}

/// A child killed and reaped when the test ends, however it ends.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
