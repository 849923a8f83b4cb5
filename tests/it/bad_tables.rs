//! Bad inputs to the table jobs — `sql`, `manifest check` and `run` (issue #23's battery for
//! them): an output on a table it reads is refused before anything is written; a FIFO, a
//! device or a stray file among a table's parts is refused by name, never read forever or
//! short; a cluster without executors is given up on with a message; SIGTERM exits 143 within
//! 5 s while a query runs or a check reads, leaving nothing half-written.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cnclip_tests::hostile::{check_refused, refused, run_within, sigterm_while, succeeds};
use cnclip_tests::python;

/// A 3,000-row table `t.parquet`, and `parts/` holding it as two sharded parts.
const MAKE: &str = r#"
import sys, os, numpy as np, pyarrow as pa, pyarrow.parquet as pq
root = sys.argv[1]
n = 3000
x = np.random.default_rng(3).standard_normal((n, 4)).astype(np.float32)
def table(a, b):
    return pa.table({"id": pa.array(range(a, b), pa.int64()),
                     "feature": pa.FixedSizeListArray.from_arrays(pa.array(x[a:b].reshape(-1), pa.float32()), 4)})
pq.write_table(table(0, n), f"{root}/t.parquet")
os.makedirs(f"{root}/parts")
pq.write_table(table(0, n // 2), f"{root}/parts/part-00000-of-00002.parquet")
pq.write_table(table(n // 2, n), f"{root}/parts/part-00001-of-00002.parquet")
"#;

fn tables() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    python(MAKE, &[dir.path().to_str().unwrap()], "");
    dir
}

fn mkfifo(path: &Path) {
    assert!(Command::new("mkfifo").arg(path).status().unwrap().success());
}

#[test]
fn sql_refuses_an_output_on_a_table_it_reads_issue_23_item_3() {
    let dir = tables();
    let root = dir.path();
    let before = std::fs::read(root.join("t.parquet")).unwrap();
    for format in ["parquet", "csv", "jsonl"] {
        refused(
            root,
            &["sql", "SELECT id FROM t", "--table", "t=t.parquet", "--format", format, "--output", "t.parquet"],
            &["--output", "t.parquet"],
        );
        refused(
            root,
            &["sql", "SELECT id FROM p", "--table", "p=parts", "--format", format, "--output", "parts/out.parquet"],
            &["--output"],
        );
    }
    assert_eq!(std::fs::read(root.join("t.parquet")).unwrap(), before, "the table was overwritten");
    assert!(!root.join("parts/out.parquet").exists());
    // Elsewhere, it writes.
    succeeds(
        root,
        &["sql", "SELECT count(*) AS n FROM p", "--table", "p=parts", "--format", "csv", "--output", "n.csv"],
    );
    assert_eq!(std::fs::read_to_string(root.join("n.csv")).unwrap(), "n\n3000\n");
}

#[test]
fn a_fifo_a_device_or_a_stray_file_among_parts_is_refused_issue_23_item_5() {
    let dir = tables();
    let root = dir.path();
    let limit = Duration::from_secs(60);
    let sql = ["sql", "SELECT count(*) FROM p", "--table", "p=parts"];
    // A FIFO, then a link to /dev/zero, named as a third file and as a shard's part.
    for (name, make) in [("fifo", 0), ("zero", 1)] {
        for file in [format!("{name}.parquet"), "part-00001-of-00002.parquet".to_string()] {
            let path = root.join("parts").join(&file);
            let kept = root.join("kept.parquet");
            if path.exists() {
                std::fs::rename(&path, &kept).unwrap();
            }
            if make == 0 {
                mkfifo(&path);
            } else {
                std::os::unix::fs::symlink("/dev/zero", &path).unwrap();
            }
            let ran = run_within(root, &sql, limit);
            check_refused(&ran, root, &[&file, "not a regular file"], &format!("sql over {file} ({name})"));
            let ran = run_within(root, &["manifest", "check", "parts"], limit);
            check_refused(&ran, root, &[&file], &format!("manifest check over {file} ({name})"));
            std::fs::remove_file(&path).unwrap();
            if kept.exists() {
                std::fs::rename(&kept, &path).unwrap();
            }
        }
    }
    // A stray Parquet file beside a sharded table's parts would be read as its rows.
    std::fs::copy(root.join("t.parquet"), root.join("parts/extra.parquet")).unwrap();
    refused(root, &sql, &["extra.parquet"]);
    refused(
        root,
        &["make-topk-predictions", "--image-feats", "parts", "--text-feats", "t.parquet", "--output", "o.jsonl"],
        &["extra.parquet"],
    );
}

#[test]
fn run_refuses_a_device_as_a_source_issue_23_item_5() {
    let dir = tables();
    let root = dir.path();
    mkfifo(&root.join("fifo.tsv"));
    for source in ["/dev/zero", "fifo.tsv"] {
        let toml = format!(
            "[nodes.imgs]\nkind = \"tsv\"\npaths = [\"{source}\"]\n\
             [nodes.decoded]\nkind = \"decode_base64\"\ninput = \"imgs\"\n\
             [nodes.out]\nkind = \"write_parquet\"\ninput = \"decoded\"\npath = \"out.parquet\"\n"
        );
        std::fs::write(root.join("zero.toml"), toml).unwrap();
        let ran = run_within(root, &["run", "zero.toml"], Duration::from_secs(60));
        check_refused(&ran, root, &[source, "not a regular file"], source);
        assert!(!root.join("out.parquet").exists());
    }
}

#[test]
fn sigterm_stops_a_running_query_and_leaves_no_output() {
    let dir = tables();
    let root = dir.path();
    // 2.7e10 rows to sum (a sum, not a count, which statistics would answer): minutes of work,
    // stopped a second in.
    let started = Instant::now();
    let args = [
        "sql",
        "SELECT sum(a.id + b.id + c.id) AS n FROM t a CROSS JOIN t b CROSS JOIN t c",
        "--table",
        "t=t.parquet",
        "--format",
        "csv",
        "--output",
        "n.csv",
    ];
    sigterm_while(root, &args, || started.elapsed() > Duration::from_secs(1));
    assert!(!root.join("n.csv").exists());
}

#[test]
fn sigterm_stops_manifest_check_while_it_reads_a_part() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir(root.join("big")).unwrap();
    // A sparse 4 GiB "part": reading and hashing it takes far longer than the test waits.
    let part = std::fs::File::create(root.join("big/part-00000-of-00001.parquet")).unwrap();
    part.set_len(4 << 30).unwrap();
    let started = Instant::now();
    sigterm_while(root, &["manifest", "check", "big"], || started.elapsed() > Duration::from_millis(500));
}

#[test]
fn sql_on_a_cluster_without_executors_gives_up_with_a_message_issue_23_item_5() {
    let dir = tables();
    let root = dir.path();
    let mut scheduler = Command::new(cnclip_tests::cnclip_bin())
        .args(["cluster", "scheduler", "--bind", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = scheduler.stdout.take().unwrap();
    let line = {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line).unwrap();
        line
    };
    let address = line.split_whitespace().find(|w| w.starts_with("127.0.0.1:")).map(str::to_string);
    let result = std::panic::catch_unwind(|| {
        let address = address.clone().unwrap_or_else(|| panic!("no address in `{line}`"));
        let url = format!("df://{address}");
        let ran = run_within(
            root,
            &["sql", "SELECT count(*) FROM t", "--table", "t=t.parquet", "--cluster", &url, "--cluster-timeout", "5"],
            Duration::from_secs(60),
        );
        check_refused(&ran, root, &["--cluster-timeout", "executor"], "sql on a cluster without executors");
        assert!(ran.took < Duration::from_secs(40), "took {:?}", ran.took);
    });
    let _ = scheduler.kill();
    let _ = scheduler.wait();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn run_check_reports_a_cycle_through_a_node_that_failed_to_build_issue_23_item_7() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::write(
        root.join("cycle.toml"),
        "[nodes.a]\nkind = \"decode_base64\"\ninput = \"b\"\n\
         [nodes.b]\nkind = \"decode_base64\"\ninput = \"a\"\ncolour = \"red\"\n\
         [nodes.out]\nkind = \"write_parquet\"\ninput = \"a\"\npath = \"out.parquet\"\n",
    )
    .unwrap();
    refused(root, &["run", "--check", "cycle.toml"], &["unknown field `colour`", "the graph has a cycle through a, b"]);
}

#[test]
fn an_executor_whose_scheduler_died_stops_with_a_message_issue_23_item_7() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut scheduler = Command::new(cnclip_tests::cnclip_bin())
        .args(["cluster", "scheduler", "--bind", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(scheduler.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let address = line.split_whitespace().find(|w| w.starts_with("127.0.0.1:")).map(str::to_string);
    let Some(address) = address else {
        let _ = scheduler.kill();
        panic!("no address in `{line}`");
    };
    let executor = cnclip_tests::hostile::start(
        root,
        &[
            "cluster",
            "executor",
            "--scheduler",
            &address,
            "--bind-host",
            "127.0.0.1",
            "--heartbeat-interval-seconds",
            "1",
            "--scheduler-timeout-seconds",
            "4",
            "--work-dir",
            root.to_str().unwrap(),
        ],
    );
    std::thread::sleep(Duration::from_secs(3));
    let _ = scheduler.kill();
    let _ = scheduler.wait();
    let ran = cnclip_tests::hostile::wait_within(executor, Duration::from_secs(60), "the executor");
    assert_eq!(ran.output.status.code(), Some(1), "{}", ran.stderr);
    assert!(ran.stderr.contains("has not answered") && ran.stderr.contains(&address), "{}", ran.stderr);
}

/// Runs `cnclip ARGS…` in `dir` from python, which reports the child's exit code and peak
/// resident memory (MiB, `ru_maxrss`).
const PEAK: &str = r#"
import json, resource, subprocess, sys
ran = subprocess.run(sys.argv[2:], cwd=sys.argv[1], capture_output=True)
print(json.dumps({"code": ran.returncode, "peak_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                  "stderr": ran.stderr.decode(errors="replace")}))
"#;

#[test]
fn sql_streams_a_large_result_to_its_output_in_bounded_memory_issue_23_item_5() {
    let dir = tables();
    let root = dir.path();
    python(
        "import sys, pyarrow as pa, pyarrow.parquet as pq\n\
         pq.write_table(pa.table({'id': pa.array(range(2), pa.int64())}), sys.argv[1] + '/two.parquet')",
        &[root.to_str().unwrap()],
        "",
    );
    // 18M rows of three int64s: 432 MB as Arrow arrays held together, 203 MB of CSV.
    let bin = cnclip_tests::cnclip_bin();
    let query = "SELECT a.id AS x, b.id AS y, c.id AS z FROM t a CROSS JOIN t b CROSS JOIN two c";
    let args = [root.to_str().unwrap(), bin.to_str().unwrap(), "sql", query, "--table", "t=t.parquet"];
    let args: Vec<&str> =
        args.into_iter().chain(["--table", "two=two.parquet", "--format", "csv", "--output", "out.csv"]).collect();
    let ran: serde_json::Value = serde_json::from_str(&python(PEAK, &args, "")).unwrap();
    assert_eq!(ran["code"], 0, "{}", ran["stderr"]);
    let rows =
        std::io::BufRead::lines(std::io::BufReader::new(std::fs::File::open(root.join("out.csv")).unwrap())).count();
    assert_eq!(rows, 18_000_001, "a header and every row");
    // A `SELECT 1` peaks near 100 MiB; the whole result held at once adds ~380 MiB.
    let peak = ran["peak_mib"].as_f64().unwrap();
    assert!(peak < 240.0, "sql peaked at {peak:.0} MiB writing 18M rows: the result was gathered, not streamed");
}

#[test]
fn a_bad_input_battery_for_sql_and_cluster() {
    let dir = tables();
    let root = dir.path();
    std::fs::write(root.join("garbage.parquet"), b"PAR1garbagePAR1").unwrap();
    std::fs::write(root.join("empty.parquet"), b"").unwrap();
    std::fs::create_dir(root.join("nothing")).unwrap();
    std::fs::create_dir(root.join("damaged")).unwrap();
    std::fs::copy(root.join("t.parquet"), root.join("damaged/a.parquet")).unwrap();
    std::fs::write(root.join("damaged/b.parquet"), b"").unwrap();
    for (table, named) in [
        ("t=garbage.parquet", "garbage.parquet"),
        ("t=empty.parquet", "empty.parquet"),
        ("t=nothing", "nothing"),
        ("t=damaged", "b.parquet"),
        ("t=missing.parquet", "missing.parquet"),
        ("t", "NAME=PATH"),
        ("t=/dev/zero", "/dev/zero"),
    ] {
        refused(root, &["sql", "SELECT count(*) FROM t", "--table", table], &[named]);
    }
    refused(root, &["sql", "SELEC", "--table", "t=t.parquet"], &["SELEC"]);
    refused(root, &["sql", "SELECT * FROM nope", "--table", "t=t.parquet"], &["nope"]);
    refused(root, &["sql", "SELECT 1", "--format", "parquet"], &["--output"]);
    refused(root, &["sql", "SELECT 1", "--cluster", "http://x:1"], &["df://"]);
    refused(root, &["cluster", "scheduler", "--bind", "not-an-address"], &["not-an-address"]);
    refused(root, &["cluster", "executor", "--scheduler", "nohost"], &["HOST:PORT"]);
    refused(root, &["cluster", "executor", "--scheduler", "127.0.0.1:notaport"], &["notaport"]);
}
