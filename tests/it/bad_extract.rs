//! Bad inputs to `extract-features` (issue #23's battery for it): a checkpoint with non-finite
//! weights is refused naming it before a feature is written; outputs that would overwrite each
//! other or an input are refused before anything is written; missing, damaged and
//! non-regular inputs end with exit 1 naming them, under a time limit, with no temporary file
//! left; SIGTERM mid-extraction exits 143 and leaves no output.

use cnclip_tests::hostile::{check_refused, poison_safetensors, refused, run_within, sigterm_while, succeeds};

use crate::manifest::corpus;

fn extract<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["extract-features", "--resume", "tiny.safetensors", "--precision", "fp32"];
    args.extend(extra);
    args
}

const IMAGES: [&str; 4] = ["--extract-image-feats", "--image-data", "lmdb/valid/imgs", "--image-feat-output-path"];
const TEXTS: [&str; 4] = ["--extract-text-feats", "--text-data", "data/valid_texts.jsonl", "--text-feat-output-path"];

#[test]
fn a_checkpoint_with_nan_weights_is_refused_naming_it_issue_23_item_2() {
    let dir = corpus();
    let root = dir.path();
    std::fs::copy(root.join("tiny.safetensors"), root.join("diverged.safetensors")).unwrap();
    poison_safetensors(&root.join("diverged.safetensors"));
    for (tower, out) in [(&IMAGES, "img.jsonl"), (&TEXTS, "txt.parquet")] {
        let mut args = vec!["extract-features", "--resume", "diverged.safetensors", "--precision", "fp32"];
        args.extend(tower.iter().copied());
        args.push(out);
        refused(root, &args, &["diverged.safetensors", "non-finite"]);
        assert!(!root.join(out).exists(), "{out} was written from NaN weights");
    }
    // The healthy checkpoint extracts.
    let mut args = extract(&IMAGES);
    args.push("img.jsonl");
    succeeds(root, &args);
}

#[test]
fn outputs_that_would_overwrite_each_other_or_an_input_are_refused_issue_23_item_3() {
    let dir = corpus();
    let root = dir.path();
    let captions = std::fs::read(root.join("data/valid_texts.jsonl")).unwrap();
    // One path for both towers: the images would overwrite the texts.
    let mut both = extract(&IMAGES);
    both.push("feats.jsonl");
    both.extend(TEXTS);
    both.push("feats.jsonl");
    refused(root, &both, &["feats.jsonl", "overwrite"]);
    assert!(!root.join("feats.jsonl").exists());
    // An output on the captions, by the same or another spelling of the path.
    for output in ["data/valid_texts.jsonl", "./data/../data/valid_texts.jsonl"] {
        let mut args = extract(&TEXTS);
        args.push(output);
        refused(root, &args, &["--text-data"]);
        let mut args = extract(&IMAGES);
        args.extend([output, "--extract-text-feats", "--text-data", "data/valid_texts.jsonl"]);
        args.extend(["--text-feat-output-path", "txt.jsonl"]);
        refused(root, &args, &["--text-data"]);
    }
    // An output on the checkpoint.
    let mut args = extract(&IMAGES);
    args.push("tiny.safetensors");
    refused(root, &args, &["--resume"]);
    assert_eq!(std::fs::read(root.join("data/valid_texts.jsonl")).unwrap(), captions, "the captions changed");
    assert!(!root.join("txt.jsonl").exists() && !root.join("img.jsonl").exists());
}

#[test]
fn a_bad_input_battery_for_extract_features() {
    let dir = corpus();
    let root = dir.path();
    std::fs::write(root.join("garbage.safetensors"), b"not a checkpoint at all").unwrap();
    let whole = std::fs::read(root.join("tiny.safetensors")).unwrap();
    std::fs::write(root.join("cut.safetensors"), &whole[..whole.len() / 2]).unwrap();
    std::fs::write(root.join("empty.safetensors"), b"").unwrap();
    assert!(std::process::Command::new("mkfifo").arg(root.join("fifo.jsonl")).status().unwrap().success());
    assert!(std::process::Command::new("mkfifo").arg(root.join("fifo.tsv")).status().unwrap().success());
    let text_cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (vec!["--resume", "garbage.safetensors"], vec!["garbage.safetensors"]),
        (vec!["--resume", "cut.safetensors"], vec!["cut.safetensors"]),
        (vec!["--resume", "empty.safetensors"], vec!["empty.safetensors"]),
        (vec!["--resume", "missing.safetensors"], vec!["missing.safetensors"]),
        (vec!["--text-data", "fifo.jsonl"], vec!["fifo.jsonl", "not a regular file"]),
        (vec!["--text-data", "/dev/zero"], vec!["/dev/zero"]),
        (vec!["--text-data", "missing.jsonl"], vec!["missing.jsonl"]),
        (vec!["--context-length", "100000000"], vec!["context"]),
    ];
    for (extra, names) in text_cases {
        // The case's flag, and the defaults for the others.
        let mut args = vec!["extract-features", "--extract-text-feats", "--text-feat-output-path", "out.jsonl"];
        args.extend(extra.iter().copied());
        for (flag, default) in [("--resume", "tiny.safetensors"), ("--text-data", "data/valid_texts.jsonl")] {
            if !extra.contains(&flag) {
                args.extend([flag, default]);
            }
        }
        let ran = run_within(root, &args, std::time::Duration::from_secs(90));
        check_refused(&ran, root, &names, &format!("{extra:?}"));
        assert!(!root.join("out.jsonl").exists(), "{extra:?}: wrote an output");
    }
    for (data, names) in
        [("fifo.tsv", vec!["fifo.tsv"]), ("/dev/zero", vec!["/dev/zero"]), ("nothing/*.tsv", vec!["nothing"])]
    {
        let args = ["extract-features", "--resume", "tiny.safetensors", "--extract-image-feats", "--image-data"];
        let mut args = args.to_vec();
        args.extend([data, "--image-feat-output-path", "out.parquet"]);
        let ran = run_within(root, &args, std::time::Duration::from_secs(90));
        check_refused(&ran, root, &names, data);
        assert!(!root.join("out.parquet").exists(), "{data}: wrote an output");
    }
}

#[test]
fn repeated_ids_are_quarantined_and_counted() {
    let dir = corpus();
    let root = dir.path();
    let texts = std::fs::read_to_string(root.join("data/valid_texts.jsonl")).unwrap();
    let first = texts.lines().next().unwrap();
    std::fs::write(root.join("dup_texts.jsonl"), format!("{texts}{first}\n")).unwrap();
    let ran = succeeds(
        root,
        &extract(&["--extract-text-feats", "--text-data", "dup_texts.jsonl", "--text-feat-output-path", "dup.jsonl"]),
    );
    assert!(ran.stderr.contains("1 quarantined"), "{}", ran.stderr);
    let quarantine = std::fs::read_to_string(root.join("dup.quarantine.jsonl")).unwrap();
    assert_eq!(quarantine.lines().count(), 1, "{quarantine}");
    let rows = std::fs::read_to_string(root.join("dup.jsonl")).unwrap().lines().count();
    assert_eq!(rows, texts.lines().count(), "each text once");
}

#[test]
fn sigterm_stops_extract_features_and_leaves_no_output() {
    let dir = corpus();
    let root = dir.path();
    let mut args = extract(&TEXTS);
    args.extend(["txt.parquet", "--text-batch-size", "1"]);
    args.extend(IMAGES);
    args.extend(["img.parquet", "--img-batch-size", "1"]);
    // Busy once the texts are done and the images' parts are being written.
    let parts = root.join("img.parquet.cnclip-parts");
    sigterm_while(root, &args, || parts.exists());
    assert!(!root.join("img.parquet").exists(), "an output appeared after SIGTERM");
    // The rerun finishes the job from the parts kept.
    succeeds(root, &args);
    assert!(root.join("img.parquet").exists() && !parts.exists());
}
