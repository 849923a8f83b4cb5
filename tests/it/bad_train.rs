//! `train`, `init-model` and `demo` on hostile settings: issue #23's battery for the training
//! commands. A learning rate that makes the loss non-finite stops the run (unless
//! `--allow-non-finite-loss` asks to go on, as cn_clip does); a model config with a zero, a
//! negative or an absurd size is refused naming the field before libtorch is asked to build it
//! (no panic, no allocation abort); and `demo` checks its sizes before any step runs, naming
//! the flag, instead of ending with a NaN headline or a later step's failure.

use std::path::Path;

use cnclip_tests::hostile::{refused, succeeds};

use crate::smoke::TINY_VIT_BERT;

/// A corpus of 32 training and 8 validation pairs as cn_clip LMDB splits, and the tiny config.
fn corpus() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    succeeds(root, &["synth", "--out", "corpus", "--train", "32", "--valid", "8", "--test", "0"]);
    succeeds(root, &["build-lmdb", "--data-dir", "corpus", "--splits", "train,valid"]);
    std::fs::write(root.join("tiny.json"), TINY_VIT_BERT).unwrap();
    dir
}

/// `train` on the corpus: 4 steps of 8 pairs at learning rate `lr`, the full rate from the
/// first step.
fn train_args<'a>(name: &'a str, config: &'a str, lr: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "train",
        "--train-data",
        "corpus/lmdb/train",
        "--val-data",
        "corpus/lmdb/valid",
        "--model-config",
        config,
        "--batch-size",
        "8",
        "--valid-batch-size",
        "8",
        "--max-steps",
        "4",
        "--lr",
        lr,
        "--beta1",
        "0.9",
        "--beta2",
        "0.98",
        "--eps",
        "1e-6",
        "--warmup",
        "1",
        "--context-length",
        "24",
        "--num-workers",
        "1",
        "--logs",
        "logs",
        "--name",
        name,
    ];
    args.extend_from_slice(extra);
    args
}

/// The tiny config with `changes` applied, written to `root/name`.
fn config_with(root: &Path, name: &str, changes: serde_json::Value) {
    let mut config: serde_json::Value = serde_json::from_str(TINY_VIT_BERT).unwrap();
    for (key, value) in changes.as_object().unwrap() {
        config[key] = value.clone();
    }
    std::fs::write(root.join(name), config.to_string()).unwrap();
}

#[test]
fn a_loss_that_is_no_longer_finite_stops_training_unless_allowed() {
    let dir = corpus();
    let root = dir.path();
    let said =
        refused(root, &train_args("diverged", "tiny.json", "1e8", &[]), &["the loss is", "--allow-non-finite-loss"]);
    assert!(said.contains("step "), "the message does not name the step:\n{said}");
    // As cn_clip does, on to the end.
    succeeds(root, &train_args("allowed", "tiny.json", "1e8", &["--allow-non-finite-loss"]));
    // A sane rate runs as before.
    succeeds(root, &train_args("sane", "tiny.json", "1e-3", &[]));
}

#[test]
fn no_checkpoint_of_non_finite_weights_is_written() {
    let dir = corpus();
    let root = dir.path();
    // Step 1's loss is finite; its update (a rate past float32's range) makes the weights inf,
    // and step 1 is a save point.
    let said = refused(
        root,
        &train_args("nan_save", "tiny.json", "1e39", &["--save-step-frequency", "1"]),
        &["no longer a finite number", "not written"],
    );
    let checkpoints = root.join("logs/nan_save/checkpoints");
    let written: Vec<String> = std::fs::read_dir(&checkpoints)
        .map(|entries| entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    assert!(written.iter().all(|name| !name.contains("_1.pt")), "a NaN checkpoint was written: {written:?}\n{said}");
    assert!(root.join("logs/nan_save/metrics.parquet").exists(), "the curve up to the divergence is kept");
}

#[test]
fn model_configs_with_zero_negative_or_absurd_sizes_are_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    config_with(root, "zero.json", serde_json::json!({"embed_dim": 0}));
    config_with(root, "negative.json", serde_json::json!({"text_hidden_size": -64}));
    // 2^24 tokens × 2^16 wide (2 heads divide it): 2^40 parameters in the embedding alone.
    config_with(
        root,
        "absurd.json",
        serde_json::json!({"vocab_size": 16_777_216, "text_hidden_size": 65_536, "text_num_attention_heads": 2}),
    );
    let init =
        |config: &'static str| ["init-model", "--model-config", config, "--seed", "1", "--output", "out.safetensors"];
    refused(root, &init("zero.json"), &["embed_dim is 0"]);
    refused(root, &init("negative.json"), &["text_hidden_size", "-64"]);
    let said = refused(root, &init("absurd.json"), &["parameters"]);
    assert!(!said.contains("allocate"), "libtorch was asked to build it:\n{said}");
    assert!(!root.join("out.safetensors").exists(), "a checkpoint was written");
    // The tiny config itself is fine.
    std::fs::write(root.join("tiny.json"), TINY_VIT_BERT).unwrap();
    succeeds(root, &init("tiny.json"));
}

#[test]
fn train_refuses_an_absurd_model_config_without_a_panic() {
    let dir = corpus();
    let root = dir.path();
    config_with(
        root,
        "absurd.json",
        serde_json::json!({"vocab_size": 16_777_216, "text_hidden_size": 65_536, "text_num_attention_heads": 2}),
    );
    let said = refused(root, &train_args("absurd", "absurd.json", "1e-3", &[]), &["parameters"]);
    assert!(!said.contains("allocate"), "libtorch was asked to build it:\n{said}");
}

#[test]
fn demo_refuses_sizes_it_cannot_score_before_any_step_runs() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let small = ["--train", "16", "--batch-size", "8", "--epochs", "1"];
    let demo = |out: &'static str, flag: &'static str, value: &'static str| -> Vec<&'static str> {
        let mut args = vec!["demo", "--out", out];
        let mut rest = small.to_vec();
        match rest.iter().position(|f| *f == flag) {
            Some(at) => rest[at + 1] = value,
            None => rest.extend([flag, value]),
        }
        args.extend(rest);
        args
    };
    // Fewer test images than the top 10 that retrieval ranks: recall would be NaN.
    refused(root, &demo("five", "--test", "5"), &["--test"]);
    assert!(!root.join("five/logs").exists(), "a step ran before the check");
    refused(root, &demo("none", "--test", "0"), &["--test"]);
    assert!(!root.join("none/logs").exists(), "a step ran before the check");
    refused(root, &demo("epochs", "--epochs", "0"), &["--epochs"]);
    assert!(!root.join("epochs/logs").exists(), "a step ran before the check");
}

#[test]
fn a_bad_input_battery_for_train_data() {
    let dir = corpus();
    let root = dir.path();
    std::fs::create_dir(root.join("emptysplit")).unwrap();
    for name in ["fifo_imgs.tsv", "fifo_texts.jsonl"] {
        assert!(std::process::Command::new("mkfifo").arg(root.join(name)).status().unwrap().success());
    }
    std::fs::write(root.join("z_imgs.tsv"), "").unwrap();
    std::fs::write(root.join("z_texts.jsonl"), "").unwrap();
    let copy = |from: &str, to: &str| {
        std::fs::create_dir_all(root.join(to)).unwrap();
        for entry in std::fs::read_dir(root.join(from)).unwrap().flatten() {
            std::fs::copy(entry.path(), root.join(to).join(entry.file_name())).unwrap();
        }
    };
    std::fs::create_dir(root.join("cut")).unwrap();
    copy("corpus/lmdb/train/imgs", "cut/imgs");
    copy("corpus/lmdb/train/pairs", "cut/pairs");
    std::fs::File::options().write(true).open(root.join("cut/imgs/data.mdb")).unwrap().set_len(10_000).unwrap();
    for (data, named) in [
        ("missing", vec!["missing", "not a cn_clip LMDB split"]),
        ("emptysplit", vec!["emptysplit"]),
        ("fifo_imgs.tsv", vec!["fifo_imgs.tsv", "not a regular file"]),
        ("z_imgs.tsv", vec!["no samples"]),
        ("cut", vec!["cut/imgs/data.mdb", "truncated"]),
        ("/dev/zero", vec!["/dev/zero"]),
    ] {
        let mut args = train_args("bad", "tiny.json", "1e-3", &[]);
        args[2] = data;
        refused(root, &args, &named);
    }
}
