//! Bad inputs to the scoring and model-file jobs — `evaluation`, `bench-suite`, `convert`,
//! `tokenize` and `build-lmdb` (issue #23's battery for them). `evaluation` keeps cn_clip's
//! contract for a *submission* that fails its checks (exit 0, the error in the score JSON); an
//! input it cannot read at all (a FIFO, a device) and an engine that fails (a cluster that is
//! not there) are errors instead, with exit 1 and no score file. Every case runs under a time
//! limit and leaves no temporary file.

use std::process::Command;

use cnclip_tests::hostile::{refused, succeeds};

const TRUTH: &str = "{\"text_id\": 1, \"text\": \"猫\", \"image_ids\": [10]}\n";
const SUBMISSION: &str = "{\"text_id\": 1, \"image_ids\": [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]}\n";

fn mkfifo(path: &std::path::Path) {
    assert!(Command::new("mkfifo").arg(path).status().unwrap().success());
}

#[test]
fn evaluation_refuses_unreadable_inputs_and_a_failed_engine_issue_23_item_7() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::write(root.join("truth.jsonl"), TRUTH).unwrap();
    std::fs::write(root.join("submit.jsonl"), SUBMISSION).unwrap();
    mkfifo(&root.join("fifo.jsonl"));
    for (truth, submit, named) in [
        ("truth.jsonl", "fifo.jsonl", "fifo.jsonl"),
        ("fifo.jsonl", "submit.jsonl", "fifo.jsonl"),
        ("truth.jsonl", "/dev/zero", "/dev/zero"),
    ] {
        refused(root, &["evaluation", truth, submit, "score.json"], &[named, "not a regular file"]);
        assert!(!root.join("score.json").exists());
    }
    // The score file on an input.
    refused(root, &["evaluation", "truth.jsonl", "submit.jsonl", "submit.jsonl"], &["overwrite"]);
    assert_eq!(std::fs::read_to_string(root.join("submit.jsonl")).unwrap(), SUBMISSION);
    // A cluster that is not there: an error, not a score JSON holding the connection error.
    let stderr = refused(
        root,
        &[
            "evaluation",
            "truth.jsonl",
            "submit.jsonl",
            "score.json",
            "--engine",
            "sql",
            "--cluster",
            "df://127.0.0.1:1",
        ],
        &["SQL engine"],
    );
    assert!(!root.join("score.json").exists(), "{stderr}");
    // A valid submission still scores, and an invalid one still gets cn_clip's error JSON.
    succeeds(root, &["evaluation", "truth.jsonl", "submit.jsonl", "score.json"]);
    let score: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("score.json")).unwrap()).unwrap();
    assert_eq!(score["success"], true);
    std::fs::write(root.join("short.jsonl"), "{\"text_id\": 1, \"image_ids\": [10]}\n").unwrap();
    succeeds(root, &["evaluation", "truth.jsonl", "short.jsonl", "short_score.json"]);
    let score: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("short_score.json")).unwrap()).unwrap();
    assert_eq!(score["success"], false);
}

#[test]
fn bench_suite_refuses_a_run_name_that_leaves_its_directory_issue_23_item_7() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir(root.join("suite")).unwrap();
    for name in ["../escaped", "a/b", ".hidden", ""] {
        let suite = format!(
            "[suite]\nout = \"bench\"\n[[runs]]\nname = \"{name}\"\ntask = \"retrieval\"\ncheckpoint = \"x.pt\"\n\
             dataset = \"valid\"\nimages = \"i.tsv\"\ntexts = \"t.jsonl\"\n"
        );
        std::fs::write(root.join("suite/suite.toml"), suite).unwrap();
        refused(root, &["bench-suite", "suite/suite.toml"], &["run name", "plain file name"]);
        assert!(!root.join("suite/escaped.json").exists() && !root.join("suite/escaped").exists());
    }
    // Malformed, empty and non-regular suite files.
    std::fs::write(root.join("bad.toml"), "[suite\nout = ").unwrap();
    refused(root, &["bench-suite", "bad.toml"], &["bad.toml"]);
    std::fs::write(root.join("empty.toml"), "").unwrap();
    refused(root, &["bench-suite", "empty.toml"], &["empty.toml"]);
    mkfifo(&root.join("fifo.toml"));
    refused(root, &["bench-suite", "fifo.toml"], &["fifo.toml", "not a regular file"]);
}

#[test]
fn a_bad_input_battery_for_convert_tokenize_and_build_lmdb() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::write(root.join("tiny.json"), crate::smoke::TINY_VIT_BERT).unwrap();
    succeeds(root, &["init-model", "--model-config", "tiny.json", "--output", "tiny.safetensors"]);
    let whole = std::fs::read(root.join("tiny.safetensors")).unwrap();
    std::fs::write(root.join("cut.safetensors"), &whole[..whole.len() / 3]).unwrap();
    std::fs::write(root.join("empty.pt"), b"").unwrap();
    std::fs::write(root.join("garbage.pt"), b"PK\x03\x04 this is not a whole zip").unwrap();
    mkfifo(&root.join("fifo.pt"));
    for (input, named) in [
        ("cut.safetensors", "cut.safetensors"),
        ("empty.pt", "empty"),
        ("garbage.pt", "damaged zip"),
        ("fifo.pt", "fifo.pt"),
        ("/dev/zero", "/dev/zero"),
        ("missing.pt", "missing.pt"),
    ] {
        refused(
            root,
            &["convert", "--input", input, "--output", "out.safetensors", "--model-config", "tiny.json"],
            &[named],
        );
        assert!(!root.join("out.safetensors").exists(), "{input}: wrote an output");
    }
    // tokenize: a context no model takes is refused before any memory is asked for it.
    let output = Command::new(cnclip_tests::cnclip_bin())
        .args(["tokenize", "--context-length", "100000000"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--context-length 100000000"), "{stderr}");
    // build-lmdb: an input that is a directory is called one.
    std::fs::create_dir_all(root.join("data/train_imgs.tsv")).unwrap();
    std::fs::write(root.join("data/train_texts.jsonl"), "").unwrap();
    refused(root, &["build-lmdb", "--data-dir", "data", "--splits", "train"], &["train_imgs.tsv", "a directory"]);
}

#[test]
fn small_text_inputs_that_are_not_regular_files_are_refused_not_read_for_ever() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    mkfifo(&root.join("fifo"));
    std::fs::write(root.join("tiny.json"), crate::smoke::TINY_VIT_BERT).unwrap();
    let cases: Vec<Vec<&str>> = vec![
        vec!["init-model", "--model-config", "fifo", "--output", "x.safetensors"],
        vec!["init-model", "--model-config", "/dev/zero", "--output", "x.safetensors"],
        vec!["run", "fifo"],
        vec!["run", "--check", "/dev/zero"],
        vec!["make-topk-predictions", "--image-feats", "a.jsonl", "--text-feats", "b.jsonl", "--output", "o.jsonl"],
    ];
    for args in &cases[..4] {
        let named = args.iter().find(|a| **a == "fifo" || **a == "/dev/zero").unwrap();
        refused(root, args, &[named, "not a regular file"]);
    }
    // A saved index path that is a FIFO.
    std::fs::write(root.join("a.jsonl"), "{\"image_id\": 1, \"feature\": [1.0, 0.0]}\n").unwrap();
    std::fs::write(root.join("b.jsonl"), "{\"text_id\": 1, \"feature\": [1.0, 0.0]}\n").unwrap();
    let mut args = cases[4].clone();
    args.extend(["--index-path", "fifo"]);
    refused(root, &args, &["fifo", "not a saved index"]);
}

#[test]
fn oversized_small_inputs_are_refused_before_they_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // Sparse files just past the 64 MiB a small text input may hold.
    for name in ["big.toml", "big.json"] {
        std::fs::File::create(root.join(name)).unwrap().set_len((64 << 20) + 1).unwrap();
    }
    for args in [
        vec!["run", "big.toml"],
        vec!["bench-suite", "big.toml"],
        vec!["init-model", "--model-config", "big.json", "--output", "x.safetensors"],
    ] {
        let named = if args.contains(&"big.json") { "big.json" } else { "big.toml" };
        refused(root, &args, &[named, "more than"]);
    }
}
