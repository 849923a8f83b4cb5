//! Progress in batch logs (issue #25): with stderr a file, a long job writes a line every
//! `--progress-interval` seconds (rows, rows/s, MB/s, quarantined rows, ETA when the total is
//! known) and a `done` line; `--progress json` lines parse; the flags work before or after the
//! subcommand and as environment variables; a job shorter than the interval writes none.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};

/// `train_imgs.tsv` (`images` lines of ~8 KB of base64, then two bad ones) and
/// `train_texts.jsonl` (one text per image, then one naming a missing image) in `dir`: enough
/// for a debug build-lmdb to take well over 0.1 s.
fn corpus(dir: &Path, images: usize) {
    let payload = "BwcH".repeat(2000); // 6000 bytes of 7s
    let mut tsv: String = (0..images).map(|i| format!("{i}\t{payload}\n")).collect();
    tsv.push_str("bad\tnot base64!\n0\taGk=\n"); // an id that is not a number; a repeated id
    std::fs::write(dir.join("train_imgs.tsv"), tsv).unwrap();
    let mut texts: String =
        (0..images).map(|i| format!("{{\"text_id\": {i}, \"text\": \"第{i}个\", \"image_ids\": [{i}]}}\n")).collect();
    texts.push_str(&format!("{{\"text_id\": {images}, \"text\": \"x\", \"image_ids\": [999999]}}\n"));
    std::fs::write(dir.join("train_texts.jsonl"), texts).unwrap();
}

/// Runs `cnclip ARGS` with `env`, its stderr into a file as a batch scheduler does; returns it.
fn batch_log(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let log = dir.join("job.log");
    let status = Command::new(cnclip_tests::cnclip_bin())
        .args(args)
        .env_remove("CNCLIP_PROGRESS")
        .env_remove("CNCLIP_PROGRESS_INTERVAL")
        .envs(env.iter().copied())
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(File::create(&log).unwrap())
        .status()
        .unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "cnclip {args:?} failed:\n{text}");
    text
}

fn json_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter(|line| line.starts_with('{'))
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

const IMAGES: usize = 6000;
/// The lines build-lmdb reads: images, two bad image lines, texts and the text without image.
const LINES: u64 = 2 * IMAGES as u64 + 3;

#[test]
fn a_batch_log_gets_a_progress_line_every_interval_and_a_done_line() {
    let dir = tempfile::tempdir().unwrap();
    corpus(dir.path(), IMAGES);
    let args = ["--progress-interval", "0.05", "build-lmdb", "--data-dir", ".", "--splits", "train"];
    let log = batch_log(dir.path(), &args, &[]);
    let running: Vec<&str> = log.lines().filter(|l| l.starts_with("cnclip: ") && l.ends_with(" elapsed")).collect();
    assert!(!running.is_empty(), "no progress line in the log:\n{log}");
    for line in &running {
        assert!(line.contains(" rows, ") && line.contains(" rows/s, ") && line.contains(" MB/s, "), "{line}");
        assert!(line.contains(" quarantined, "), "{line}");
    }
    let done = log.lines().find(|l| l.starts_with("cnclip: done, ")).unwrap_or_else(|| panic!("no done line:\n{log}"));
    let expected = format!("cnclip: done, {} rows in ", thousands(LINES));
    assert!(done.starts_with(&expected), "{done}");
    assert!(done.ends_with(", 3 quarantined"), "{done}");
    // The job's own summary line is still there, after the progress.
    assert!(
        log.lines().last().unwrap().starts_with("cnclip build-lmdb: train: 6000 images, 6000 pairs, 3 quarantined")
    );
}

#[test]
fn json_progress_lines_parse_from_flags_after_the_subcommand_and_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    corpus(dir.path(), IMAGES);
    let args =
        ["build-lmdb", "--data-dir", ".", "--splits", "train", "--progress", "json", "--progress-interval", "0.05"];
    let lines = json_lines(&batch_log(dir.path(), &args, &[]));
    assert!(lines.len() >= 2, "{lines:?}");
    let (done, running) = lines.split_last().unwrap();
    let mut rows = 0;
    for line in running {
        assert_eq!(line["state"], "running", "{line}");
        assert!(line["rows"].as_u64().unwrap() >= rows, "rows only grow: {line}");
        rows = line["rows"].as_u64().unwrap();
        assert!(line["bytes_per_s"].as_f64().is_some() && line["elapsed_s"].as_f64().is_some(), "{line}");
    }
    assert!(running.iter().any(|l| l["rows"].as_u64() > Some(0) && l["bytes_per_s"].as_f64() > Some(0.0)));
    assert_eq!(done["state"], "done");
    assert_eq!(done["rows"], LINES);
    assert_eq!(done["quarantined"], 3);

    // A pipeline job (import runs the DAG), configured by the environment only: its sources
    // know their totals, so the lines carry one and an ETA while running.
    let env = [("CNCLIP_PROGRESS", "json"), ("CNCLIP_PROGRESS_INTERVAL", "0.05")];
    let lines = json_lines(&batch_log(
        dir.path(),
        &["import", "--data-dir", ".", "--splits", "train", "--out", "tables"],
        &env,
    ));
    assert!(lines.len() >= 2, "{lines:?}");
    let (done, running) = lines.split_last().unwrap();
    assert!(running.iter().all(|l| l["state"] == "running" && l["total"].as_u64().is_some()), "{running:?}");
    assert!(running.iter().any(|l| l["eta_s"].as_f64().is_some()), "{running:?}");
    assert_eq!(done["state"], "done");
    assert!(done["bytes"].as_u64().unwrap() > 6000 * IMAGES as u64, "{done}");
}

#[test]
fn a_job_shorter_than_the_interval_or_with_progress_none_writes_no_progress_line() {
    let dir = tempfile::tempdir().unwrap();
    corpus(dir.path(), 50);
    let quiet = |args: &[&str]| {
        let log = batch_log(dir.path(), args, &[]);
        assert!(!log.lines().any(|l| l.starts_with("cnclip: ") || l.starts_with('{')), "{log}");
    };
    quiet(&["build-lmdb", "--data-dir", ".", "--splits", "train"]);
    quiet(&[
        "--progress",
        "none",
        "--progress-interval",
        "0.001",
        "build-lmdb",
        "--data-dir",
        ".",
        "--splits",
        "train",
    ]);
    let refused = Command::new(cnclip_tests::cnclip_bin())
        .args(["--progress-interval", "0", "build-lmdb", "--data-dir", ".", "--splits", "train"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not a number of seconds above 0"));
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}
