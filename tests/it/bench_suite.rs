//! `cnclip bench-suite` (issue #11, item 7): a suite of a retrieval run and a zero-shot run on the
//! synthetic corpus with a small self-describing checkpoint writes one CLIP_benchmark-style JSON
//! per run and a results table; a rerun skips both; a changed run is redone.

use std::path::Path;
use std::process::Command;

use cnclip_tests::{python, reference};

use crate::smoke::TINY_VIT_BERT;

fn cnclip(root: &Path, args: &[&str]) -> String {
    let output = Command::new(cnclip_tests::cnclip_bin()).args(args).current_dir(root).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "cnclip {args:?}:\n{stderr}");
    stderr
}

const SUITE: &str = r#"
[suite]
out = "bench"

[[runs]]
name = "tiny-valid"
task = "retrieval"
checkpoint = "tiny.safetensors"
dataset = "valid"
images = "demo/valid_imgs.tsv"
texts = "demo/valid_texts.jsonl"

[[runs]]
name = "tiny-zeroshot"
task = "zeroshot"
checkpoint = "tiny.safetensors"
dataset = "synth-shapes"
datapath = "demo/zeroshot/test"
label_file = "demo/zeroshot/label_cn.txt"
"#;

#[test]
fn a_suite_writes_results_and_a_rerun_skips_finished_runs() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    cnclip(root, &["synth", "--out", "demo", "--train", "2", "--valid", "24", "--test", "2"]);
    std::fs::write(root.join("tiny.json"), TINY_VIT_BERT).unwrap();
    reference(
        &["build-model", "--config", TINY_VIT_BERT, "--seed", "2", "--out", root.join("tiny.pt").to_str().unwrap()],
        "",
    );
    cnclip(root, &["convert", "--input", "tiny.pt", "--output", "tiny.safetensors", "--model-config", "tiny.json"]);
    std::fs::write(root.join("suite.toml"), SUITE).unwrap();
    cnclip(root, &["bench-suite", "suite.toml"]);

    let read = |name: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(root.join("bench").join(name)).unwrap()).unwrap()
    };
    let retrieval = read("tiny-valid.json");
    assert_eq!(retrieval["task"], "zeroshot_retrieval");
    assert_eq!(retrieval["dataset"], "valid");
    for direction in ["image", "text"] {
        let r: Vec<f64> = [1, 5, 10]
            .iter()
            .map(|k| retrieval["metrics"][format!("{direction}_retrieval_recall@{k}")].as_f64().unwrap())
            .collect();
        assert!(r[0] <= r[1] && r[1] <= r[2] && r[2] <= 1.0 && r[0] >= 0.0, "{direction}: {r:?}");
    }
    let zeroshot = read("tiny-zeroshot.json");
    assert_eq!(zeroshot["task"], "zeroshot_classification");
    for key in ["acc1", "acc5", "mean_per_class_recall"] {
        let v = zeroshot["metrics"][key].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{key}: {v}");
    }
    let table = python(
        "import sys, json, pyarrow.parquet as pq\nt = pq.read_table(sys.argv[1])\n\
         print(json.dumps({'rows': t.num_rows, 'columns': t.column_names, 'runs': sorted(set(t.column('run').to_pylist()))}))",
        &[root.join("bench/results.parquet").to_str().unwrap()],
        "",
    );
    let table: serde_json::Value = serde_json::from_str(&table).unwrap();
    assert_eq!(table["rows"], 9);
    assert_eq!(table["runs"], serde_json::json!(["tiny-valid", "tiny-zeroshot"]));

    // A rerun skips both; a changed run is redone.
    let stderr = cnclip(root, &["bench-suite", "suite.toml"]);
    assert_eq!(stderr.matches("done already, skipped").count(), 2, "{stderr}");
    assert_eq!(read("tiny-valid.json"), retrieval);
    std::fs::write(root.join("suite.toml"), SUITE.replace("synth-shapes", "synth-shapes-2")).unwrap();
    let stderr = cnclip(root, &["bench-suite", "suite.toml"]);
    assert_eq!(stderr.matches("done already, skipped").count(), 1, "{stderr}");
}

/// The file's hex sha256 (coreutils' `sha256sum`).
fn sha256(path: &Path) -> String {
    let output = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(output.status.success(), "sha256sum {}", path.display());
    String::from_utf8(output.stdout).unwrap().split_whitespace().next().unwrap().to_string()
}

#[test]
fn a_checkpoint_replaced_at_the_same_path_with_its_size_and_time_kept_is_evaluated_again() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    cnclip(root, &["synth", "--out", "demo", "--train", "2", "--valid", "24", "--test", "2"]);
    std::fs::write(root.join("tiny.json"), TINY_VIT_BERT).unwrap();
    for (seed, name) in [("1", "tiny.safetensors"), ("2", "other.safetensors")] {
        cnclip(root, &["init-model", "--model-config", "tiny.json", "--seed", seed, "--output", name]);
    }
    let (tiny, other) = (root.join("tiny.safetensors"), root.join("other.safetensors"));
    std::fs::write(root.join("suite.toml"), SUITE).unwrap();
    cnclip(root, &["bench-suite", "suite.toml"]);
    let made_from = |run: &str| -> serde_json::Value {
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(root.join("bench").join(format!("{run}.json"))).unwrap())
                .unwrap();
        json["cnclip_made_from"]["checkpoint"][0]["sha256"].clone()
    };
    let first = [made_from("tiny-valid"), made_from("tiny-zeroshot")];
    let (old, new) = (sha256(&tiny), sha256(&other));
    assert_ne!(old, new);
    let stderr = cnclip(root, &["bench-suite", "suite.toml"]);
    assert_eq!(stderr.matches("done already, skipped").count(), 2, "{stderr}");

    // The other checkpoint's bytes written over it, its modification time put back: a `stat`
    // sees the file it saw (as after `cp -p` or `rsync -t` of a retrained model).
    let before = std::fs::metadata(&tiny).unwrap();
    assert_eq!(before.len(), std::fs::metadata(&other).unwrap().len(), "the two checkpoints differ in size");
    std::fs::write(&tiny, std::fs::read(&other).unwrap()).unwrap();
    std::fs::File::options().write(true).open(&tiny).unwrap().set_modified(before.modified().unwrap()).unwrap();
    let after = std::fs::metadata(&tiny).unwrap();
    assert_eq!((after.len(), after.modified().unwrap()), (before.len(), before.modified().unwrap()));

    let stderr = cnclip(root, &["bench-suite", "suite.toml"]);
    assert_eq!(stderr.matches("running it again").count(), 2, "{stderr}");
    assert_eq!(stderr.matches("done already, skipped").count(), 0, "{stderr}");
    for (run, first) in ["tiny-valid", "tiny-zeroshot"].into_iter().zip(first) {
        assert_eq!(first, old.as_str(), "{run}: the first result's checkpoint");
        assert_eq!(made_from(run), new.as_str(), "{run}: the rerun's checkpoint");
    }

    // Nothing changed since: both skipped.
    let stderr = cnclip(root, &["bench-suite", "suite.toml"]);
    assert_eq!(stderr.matches("done already, skipped").count(), 2, "{stderr}");
}
