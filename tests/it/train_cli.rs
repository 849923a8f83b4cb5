//! `cnclip train` end to end (issue #12): on a synthetic corpus built into cn_clip LMDB splits,
//! a tiny CLIP is trained by the command as a user runs it; its log lines, params file,
//! checkpoints and metrics table are cn_clip's (checked against cn_clip's own loaders), a run
//! killed with SIGKILL mid-epoch and rerun ends where an uninterrupted run ends, and memory
//! stays flat over epochs.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cnclip_models::ClipConfig;
use cnclip_models::checkpoint::load_cn_clip;
use cnclip_tests::{cnclip_bin, python, workspace_root};
use tch::Tensor;

/// A small ViT with BERT dropout on (so that per-step seeding is exercised).
const TINY: &str = r#"{"embed_dim": 32, "image_resolution": 32, "vision_layers": 2,
  "vision_width": 64, "vision_patch_size": 8, "vocab_size": 21128,
  "text_attention_probs_dropout_prob": 0.1, "text_hidden_act": "gelu", "text_hidden_dropout_prob": 0.1,
  "text_hidden_size": 64, "text_initializer_range": 0.02, "text_intermediate_size": 128,
  "text_max_position_embeddings": 64, "text_num_attention_heads": 2, "text_num_hidden_layers": 2,
  "text_type_vocab_size": 2}"#;

pub(crate) fn cnclip(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(cnclip_bin()).current_dir(dir).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "cnclip {args:?} failed:\n{}", &stderr[stderr.len().saturating_sub(3000)..]);
    stderr.into_owned()
}

/// A corpus of `train` training and 32 validation pairs as cn_clip LMDB splits, and the model config.
pub(crate) fn corpus(dir: &Path, train: usize) {
    let train = train.to_string();
    cnclip(dir, &["synth", "--out", "corpus", "--train", &train, "--valid", "32", "--test", "4"]);
    cnclip(dir, &["build-lmdb", "--data-dir", "corpus", "--splits", "train,valid"]);
    std::fs::write(dir.join("tiny.json"), TINY).unwrap();
}

pub(crate) fn train_args<'a>(name: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "train",
        "--train-data",
        "corpus/lmdb/train",
        "--val-data",
        "corpus/lmdb/valid",
        "--model-config",
        "tiny.json",
        "--batch-size",
        "16",
        "--valid-batch-size",
        "16",
        "--lr",
        "1e-3",
        "--beta1",
        "0.9",
        "--beta2",
        "0.98",
        "--eps",
        "1e-6",
        "--warmup",
        "4",
        "--context-length",
        "24",
        "--num-workers",
        "2",
        "--logs",
        "logs",
        "--name",
        name,
    ];
    args.extend_from_slice(extra);
    args
}

fn read_metrics(path: &Path) -> arrow::record_batch::RecordBatch {
    let file = std::fs::File::open(path).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap().build().unwrap();
    let batches: Vec<_> = reader.map(Result::unwrap).collect();
    arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
}

pub(crate) fn the_log(dir: &Path) -> String {
    let logs: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("out_"))
        .collect();
    logs.iter().map(|p| std::fs::read_to_string(p).unwrap()).collect::<Vec<_>>().join("")
}

#[test]
fn train_writes_cn_clip_logs_and_checkpoints_that_cn_clip_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    corpus(dir, 96);
    // 96 samples, batch 16: 6 steps an epoch, 12 in all; a log line every 3 steps.
    cnclip(dir, &train_args("run", &["--max-epochs", "2", "--log-interval", "3", "--report-training-batch-acc"]));
    let run = dir.join("logs/run");
    let log = the_log(&run);
    let line = regex::Regex::new(
        r"(?m)^\d{4}-\d\d-\d\d,\d\d:\d\d:\d\d \| INFO \| Rank 0 \| Global Steps: (\d+)/12 \| Train Epoch: (\d) \[(\d+)/96 \(\d+%\)\] \| Loss: \d+\.\d{6} \| Image2Text Acc: \d+\.\d\d \| Text2Image Acc: \d+\.\d\d \| Data Time: \d+\.\d{3}s \| Batch Time: \d+\.\d{3}s \| LR: \d\.\d{6} \| logit_scale: \d\.\d{3} \| Global Batch Size: 16$",
    )
    .unwrap();
    let steps: Vec<(u64, u64, u64)> = line
        .captures_iter(&log)
        .map(|c| (c[1].parse().unwrap(), c[2].parse().unwrap(), c[3].parse().unwrap()))
        .collect();
    assert_eq!(steps, [(3, 1, 48), (6, 1, 96), (9, 2, 48), (12, 2, 96)], "training log lines:\n{log}");
    let valid = regex::Regex::new(
        r"(?m)\| Validation Result \(epoch (\d) @ (\d+) steps\) \| Valid Loss: \d+\.\d{6} \| Image2Text Acc: \d+\.\d\d \| Text2Image Acc: \d+\.\d\d \| logit_scale: \d\.\d{3} \| Valid Batch Size: 16$",
    )
    .unwrap();
    let valid: Vec<String> = valid.captures_iter(&log).map(|c| format!("{}@{}", &c[1], &c[2])).collect();
    assert_eq!(valid, ["1@6", "2@12"]);
    assert!(log.contains("| train LMDB file contains 96 images and 96 pairs.\n"), "{log}");
    assert!(log.contains("| val LMDB file contains 32 images and 32 pairs.\n"), "{log}");
    let params = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("params_"))
        .expect("a params file");
    let params = std::fs::read_to_string(params).unwrap();
    assert!(params.contains("batch_size: 16\n") && params.contains("max_steps: 12\n"), "{params}");
    for file in ["epoch1.pt", "epoch2.pt", "epoch_latest.pt"] {
        assert!(run.join("checkpoints").join(file).is_file(), "{file}");
    }
    let metrics = read_metrics(&run.join("metrics.parquet"));
    assert_eq!(metrics.num_rows(), 6, "4 logged steps and 2 validations");

    // cn_clip loads the checkpoint: weights strictly, the optimizer state into AdamW with the
    // parameter groups main.py builds (every state of its parameter's shape), and gives the
    // features we give.
    let checkpoint = run.join("checkpoints/epoch2.pt");
    let script = r#"
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from cnclip_ref import model_info
from cn_clip.clip.model import CLIP
from safetensors.torch import save_file
model = CLIP(**model_info(json.loads(sys.argv[2])))
ck = torch.load(sys.argv[3], map_location="cpu", weights_only=True)
model.load_state_dict({k[len("module."):]: v for k, v in ck["state_dict"].items()})
exclude = lambda n: "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
named = list(model.named_parameters())
opt = torch.optim.AdamW([
    {"params": [p for n, p in named if exclude(n) and p.requires_grad], "weight_decay": 0.},
    {"params": [p for n, p in named if not exclude(n) and p.requires_grad], "weight_decay": 0.2}], lr=1.0)
opt.load_state_dict(ck["optimizer"])
wrong = [n for n, p in named if opt.state[p]["exp_avg"].shape != p.shape or opt.state[p]["step"].item() != ck["step"]]
model.eval()
g = torch.Generator().manual_seed(3)
images = torch.randn(4, 3, 32, 32, generator=g)
texts = torch.randint(672, 21128, (4, 24), generator=g)
texts[:, 0] = 101; texts[:, 10] = 102; texts[:, 11:] = 0
with torch.no_grad():
    save_file({"images": images, "texts": texts, "image": model.encode_image(images).contiguous(),
               "text": model.encode_text(texts).contiguous()}, sys.argv[4])
print(json.dumps({"epoch": ck["epoch"], "step": ck["step"], "wrong": wrong, "states": len(opt.state)}))
"#;
    let harness = workspace_root().join("tests/reference").display().to_string();
    let out = dir.join("theirs.safetensors");
    let report: serde_json::Value = serde_json::from_str(
        python(script, &[&harness, TINY, checkpoint.to_str().unwrap(), out.to_str().unwrap()], "").trim(),
    )
    .unwrap();
    assert_eq!(report["epoch"], 2);
    assert_eq!(report["step"], 12);
    assert_eq!(report["wrong"], serde_json::json!([]), "optimizer states that do not fit their parameter");
    let theirs: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(&out).unwrap().into_iter().collect();
    let (model, _) = cnclip_models::checkpoint::load_clip(
        &checkpoint,
        Some(&ClipConfig::from_json(TINY).unwrap()),
        tch::Device::Cpu,
    )
    .unwrap();
    let image = model.encode_image(&theirs["images"]).unwrap();
    let text = model.encode_text(&theirs["texts"]).unwrap();
    for (ours, theirs, what) in [(&image, &theirs["image"], "image"), (&text, &theirs["text"], "text")] {
        let diff = (ours - theirs).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "{what} features differ by {diff}");
    }
}

/// Each step's `pairs` keys from a `--debug` run's metrics table.
/// Starts `command` (a training run) and kills it (SIGKILL) once `marker` exists: a step
/// checkpoint, mid-epoch.
pub(crate) fn kill_once_there(command: &mut Command, marker: &Path) {
    let mut child = command.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while !marker.is_file() {
        assert!(Instant::now() < deadline, "no step checkpoint within 300 s");
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be killed");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    assert!(!child.wait().unwrap().success(), "killed");
}

pub(crate) fn samples_by_step(path: &Path) -> Vec<(i64, Vec<i64>)> {
    use arrow::array::AsArray;
    let metrics = read_metrics(path);
    let kind = metrics.column_by_name("kind").unwrap().as_string::<i32>();
    let step = metrics.column_by_name("step").unwrap().as_primitive::<arrow::datatypes::Int64Type>();
    let samples = metrics.column_by_name("samples").unwrap().as_list::<i32>();
    (0..metrics.num_rows())
        .filter(|&i| kind.value(i) == "train")
        .map(|i| {
            let s = samples.value(i);
            (step.value(i), s.as_primitive::<arrow::datatypes::Int64Type>().values().to_vec())
        })
        .collect()
}

#[test]
fn a_run_killed_mid_epoch_and_rerun_ends_as_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    corpus(dir, 96);
    let extra = ["--max-epochs", "2", "--log-interval", "1", "--save-step-frequency", "2", "--debug"];
    cnclip(dir, &train_args("whole", &extra));

    // The same run, killed (SIGKILL) once its first step checkpoint is in place: mid-epoch 1.
    let args = train_args("killed", &extra);
    kill_once_there(
        Command::new(cnclip_bin()).current_dir(dir).args(&args),
        &dir.join("logs/killed/checkpoints/epoch_latest.pt"),
    );
    assert!(!dir.join("logs/killed/checkpoints/epoch2.pt").exists(), "killed before the end");
    // Rerun the same command: it resumes from epoch_latest.pt.
    cnclip(dir, &args);
    let log = the_log(&dir.join("logs/killed"));
    let resumed_at = regex::Regex::new(r"=> loaded checkpoint '.*epoch_latest.pt' \(epoch 1 @ (\d+) steps\)").unwrap();
    let at: u64 =
        resumed_at.captures(&log).unwrap_or_else(|| panic!("the rerun did not resume:\n{log}"))[1].parse().unwrap();
    assert!(at < 6, "killed at step {at}, not mid-epoch (6 steps an epoch)");

    let (whole, _) = load_cn_clip(&dir.join("logs/whole/checkpoints/epoch2.pt")).unwrap();
    let (resumed, info) = load_cn_clip(&dir.join("logs/killed/checkpoints/epoch2.pt")).unwrap();
    assert_eq!(info.step, Some(12));
    assert_eq!(whole.len(), resumed.len());
    for (name, a) in &whole {
        let b = &resumed[name];
        let scale = a.abs().max().double_value(&[]).max(1e-12);
        let diff = (a - b).abs().max().double_value(&[]) / scale;
        assert!(diff < 1e-6, "{name} differs by {diff} (relative)");
    }
    // The same samples at every step, each step once.
    let (a, b) = (
        samples_by_step(&dir.join("logs/whole/metrics.parquet")),
        samples_by_step(&dir.join("logs/killed/metrics.parquet")),
    );
    assert_eq!(a.len(), 12);
    assert!(a == b, "the resumed run trained on other samples");
    let mut all: Vec<i64> = a.iter().filter(|(s, _)| *s <= 6).flat_map(|(_, s)| s.clone()).collect();
    all.sort_unstable();
    assert_eq!(all, (0..96).collect::<Vec<_>>(), "an epoch sees every sample once");
}

#[test]
fn memory_after_epoch_5_is_within_5_percent_of_epoch_1() {
    use arrow::array::{Array, AsArray};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    corpus(dir, 128);
    cnclip(dir, &train_args("rss", &["--max-epochs", "5", "--log-interval", "1", "--valid-epoch-interval", "0"]));
    let metrics = read_metrics(&dir.join("logs/rss/metrics.parquet"));
    let epoch = metrics.column_by_name("epoch").unwrap().as_primitive::<arrow::datatypes::Int64Type>();
    let rss = metrics.column_by_name("rss_bytes").unwrap().as_primitive::<arrow::datatypes::UInt64Type>();
    let at = |e: i64| -> f64 {
        let rows: Vec<usize> = (0..metrics.num_rows()).filter(|&i| epoch.value(i) == e && rss.is_valid(i)).collect();
        assert_eq!(rows.len(), 1, "one RSS reading at the end of epoch {e}");
        rss.value(rows[0]) as f64
    };
    let (first, fifth) = (at(1), at(5));
    eprintln!("RSS after epoch 1: {:.1} MiB, after epoch 5: {:.1} MiB", first / 1048576.0, fifth / 1048576.0);
    assert!(fifth <= first * 1.05, "RSS grew from {first} to {fifth} bytes");
}

/// `cnclip demo` at a small size: every step runs, and the report (HTML and Markdown) shows
/// the training curves (SVG files it references) and the scores next to chance.
#[test]
fn demo_runs_every_step_and_writes_its_report() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let args = ["demo", "--out", out.to_str().unwrap(), "--train", "128", "--test", "20", "--epochs", "1"];
    let stderr = cnclip(tmp.path(), &[&args[..], &["--batch-size", "32"]].concat());
    assert!(stderr.contains("[8/8] zero-shot classification"), "{stderr}");
    let headline = regex::Regex::new(r"text→image R@1 (\d+\.\d)% on 20 test images \(chance 5\.0%").unwrap();
    assert!(headline.is_match(&stderr), "no headline in:\n{}", &stderr[stderr.len().saturating_sub(2000)..]);
    let html = std::fs::read_to_string(out.join("report/report.html")).unwrap();
    for svg in ["loss.svg", "accuracy.svg"] {
        assert!(html.contains(&format!("src=\"{svg}\"")), "the report shows {svg}");
        let text = std::fs::read_to_string(out.join("report").join(svg)).unwrap();
        assert!(text.contains("<polyline") || text.contains("<path"), "{svg} draws a line");
    }
    assert!(html.contains("R@1") && html.contains("top-1") && html.contains("chance"), "result tables");
    assert!(out.join("report/report.md").is_file());
    assert!(out.join("results/test_recall.json").is_file() && out.join("model.safetensors").is_file());
}

/// `--train-data` as cn_clip's TSV + JSONL or as our Parquet tables, read in place through an
/// index made once under the run (a rerun reuses it; no LMDB is made), trains exactly as the
/// LMDB that `build-lmdb` makes — the same final parameters.
#[test]
fn tsv_and_parquet_training_data_train_as_their_lmdb_split() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    corpus(dir, 64);
    cnclip(dir, &["import", "--data-dir", "corpus", "--splits", "train,valid", "--out", "tables"]);
    let extra = ["--max-epochs", "1", "--log-interval", "2"];
    let runs = [
        ("lmdb", "corpus/lmdb/train", "corpus/lmdb/valid"),
        ("tsv", "corpus/train_imgs.tsv", "corpus/valid_imgs.tsv"),
        ("parquet", "tables/train_images.parquet", "tables/valid_images.parquet"),
    ];
    for (name, train, valid) in runs {
        let mut args = train_args(name, &extra);
        let at = |flag: &str| args.iter().position(|a| *a == flag).unwrap() + 1;
        let (t, v) = (at("--train-data"), at("--val-data"));
        args[t] = train;
        args[v] = valid;
        cnclip(dir, &args);
    }
    let (lmdb, _) = load_cn_clip(&dir.join("logs/lmdb/checkpoints/epoch1.pt")).unwrap();
    for name in ["tsv", "parquet"] {
        let (other, _) = load_cn_clip(&dir.join(format!("logs/{name}/checkpoints/epoch1.pt"))).unwrap();
        for (key, a) in &lmdb {
            assert!(a.equal(&other[key]), "{name}: {key} differs from the LMDB run's");
        }
    }
    for name in ["tsv", "parquet"] {
        assert!(!crate::train_shards::any_lmdb(&dir.join("logs").join(name)), "{name}: an LMDB was made");
    }
    // A rerun (here resumed at its end) reuses the index.
    let mut args = train_args("tsv", &["--max-epochs", "1"]);
    let t = args.iter().position(|a| *a == "--train-data").unwrap() + 1;
    args[t] = "corpus/train_imgs.tsv";
    let v = args.iter().position(|a| *a == "--val-data").unwrap() + 1;
    args[v] = "corpus/valid_imgs.tsv";
    cnclip(dir, &args);
    assert!(the_log(&dir.join("logs/tsv")).contains("--train-data: reusing the index"), "the index was reused");
}

/// `--resume` from cn_clip's own checkpoints: its weights, epoch and step as cn_clip's main.py
/// loads them (the recorded epoch is done: training goes on with the next), its optimizer state
/// into ours, and `--reset-optimizer` / `--reset-data-offset` honoured.
#[test]
fn resume_from_cn_clip_checkpoints_as_cn_clip_does() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    corpus(dir, 64);
    // cn_clip's format: one without optimizer state (as released), one with torch's AdamW
    // state after 3 steps (as its training writes), both at epoch 1, step 3.
    let script = r#"
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from cnclip_ref import model_info
from cn_clip.clip.model import CLIP
torch.manual_seed(0)
model = CLIP(**model_info(json.loads(sys.argv[2])))
sd = {"module." + k: v for k, v in model.state_dict().items()}
torch.save({"epoch": 1, "step": 3, "name": "released", "state_dict": sd, "optimizer": {}}, sys.argv[3])
exclude = lambda n: "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
named = list(model.named_parameters())
opt = torch.optim.AdamW([
    {"params": [p for n, p in named if exclude(n)], "weight_decay": 0.},
    {"params": [p for n, p in named if not exclude(n)], "weight_decay": 0.2}], lr=1e-3, betas=(0.9, 0.98), eps=1e-6)
for _ in range(3):
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
sd = {"module." + k: v for k, v in model.state_dict().items()}
torch.save({"epoch": 1, "step": 3, "name": "trained", "state_dict": sd, "optimizer": opt.state_dict()}, sys.argv[4])
"#;
    let harness = workspace_root().join("tests/reference").display().to_string();
    let (released, trained) = (dir.join("released.pt"), dir.join("trained.pt"));
    python(script, &[&harness, TINY, released.to_str().unwrap(), trained.to_str().unwrap()], "");
    let run = |name: &str, resume: &Path, flags: &[&str]| {
        let mut args = train_args(name, &["--max-epochs", "2", "--log-interval", "1", "--resume"]);
        args.push(resume.to_str().unwrap());
        args.extend_from_slice(flags);
        Command::new(cnclip_bin()).current_dir(dir).args(&args).output().unwrap()
    };
    // Released weights without optimizer state: cn_clip's recipe adds --reset-optimizer.
    let refused = run("refused", &released, &[]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && stderr.contains("--reset-optimizer"), "{stderr}");
    // 64 samples, batch 16: 4 steps an epoch. Epoch 1 is recorded done: epoch 2 runs steps 4..8.
    assert!(run("reset-optimizer", &released, &["--reset-optimizer"]).status.success());
    let log = the_log(&dir.join("logs/reset-optimizer"));
    assert!(log.contains("(epoch 1 @ 3 steps)") && log.contains("Start epoch 2") && !log.contains("Start epoch 1"));
    assert!(log.contains("Global Steps: 5/8 | Train Epoch: 2 [16/64"), "{log}");
    // --reset-data-offset: from epoch 1, step 0.
    assert!(run("reset-both", &released, &["--reset-optimizer", "--reset-data-offset"]).status.success());
    let log = the_log(&dir.join("logs/reset-both"));
    assert!(log.contains("Start epoch 1") && log.contains("Global Steps: 1/8 | Train Epoch: 1 [16/64"), "{log}");
    // With torch's optimizer state: restored (its step counts go on from 3), its weight decay
    // (0.2) kept over the flag's, as torch's load_state_dict does; groups of another size (a
    // frozen vision tower trains fewer parameters) are refused.
    let frozen = run("frozen", &trained, &["--freeze-vision"]);
    let stderr = String::from_utf8_lossy(&frozen.stderr);
    assert!(!frozen.status.success() && stderr.contains("optimizer groups hold"), "{stderr}");
    assert!(run("restored", &trained, &["--wd", "0.1"]).status.success());
    let log = the_log(&dir.join("logs/restored"));
    assert!(log.contains("=> optimizer state is restored from the checkpoint"), "{log}");
    assert!(log.contains("weight decay 0.2 (as torch's load_state_dict)"), "{log}");
    let check = r#"
import sys, torch
ck = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
print(sorted({int(s["step"].item()) for s in ck["optimizer"]["state"].values()}))
"#;
    let latest = dir.join("logs/restored/checkpoints/epoch2.pt");
    let steps = python(check, &[latest.to_str().unwrap()], "");
    assert_eq!(steps.trim(), "[7]", "3 restored steps + 4 in epoch 2");
}

/// `--devices cpu,cpu`: two replicas stand for two ranks — the global batch is twice the
/// per-replica batch, an epoch has half the steps, and the replicas' checkpoint is one model.
#[test]
fn two_replicas_train_with_the_global_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    corpus(dir, 64);
    cnclip(dir, &train_args("two", &["--max-epochs", "1", "--log-interval", "1", "--devices", "cpu,cpu"]));
    let log = the_log(&dir.join("logs/two"));
    // 64 samples, 2 × 16 per step: 2 steps.
    assert!(log.contains("Global Steps: 2/2 | Train Epoch: 1 [64/64 (100%)]"), "{log}");
    assert!(log.contains("Global Batch Size: 32"), "{log}");
    assert!(dir.join("logs/two/checkpoints/epoch1.pt").is_file());
}

/// `--clip-weight-path` / `--bert-weight-path`: the vision tower and `logit_scale` from one
/// state dict, the text tower from another, as cn_clip's `restore_model` (here checked with a
/// learning rate and weight decay of 0, so the epoch's checkpoint holds the initial weights).
#[test]
fn clip_and_bert_weight_paths_initialise_their_towers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    corpus(dir, 32);
    let script = r#"
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from cnclip_ref import model_info
from cn_clip.clip.model import CLIP
for seed, out in ((1, sys.argv[3]), (2, sys.argv[4])):
    torch.manual_seed(seed)
    torch.save(CLIP(**model_info(json.loads(sys.argv[2]))).state_dict(), out)
"#;
    let harness = workspace_root().join("tests/reference").display().to_string();
    let (vision, text) = (dir.join("vision.pt"), dir.join("text.pt"));
    python(script, &[&harness, TINY, vision.to_str().unwrap(), text.to_str().unwrap()], "");
    let mut args = train_args("init", &["--max-epochs", "1", "--wd", "0", "--valid-epoch-interval", "0"]);
    let lr = args.iter().position(|a| *a == "--lr").unwrap() + 1;
    args[lr] = "0";
    args.extend_from_slice(&[
        "--clip-weight-path",
        vision.to_str().unwrap(),
        "--bert-weight-path",
        text.to_str().unwrap(),
    ]);
    cnclip(dir, &args);
    let (trained, _) = load_cn_clip(&dir.join("logs/init/checkpoints/epoch1.pt")).unwrap();
    let read = |p: &Path| -> std::collections::HashMap<String, Tensor> {
        let script = "import sys, torch\nfrom safetensors.torch import save_file\nsave_file({k: v.contiguous() for k, v in torch.load(sys.argv[1]).items()}, sys.argv[2])";
        let out = p.with_extension("safetensors");
        python(script, &[p.to_str().unwrap(), out.to_str().unwrap()], "");
        Tensor::read_safetensors(&out).unwrap().into_iter().collect()
    };
    let (v, t) = (read(&vision), read(&text));
    let (mut from_vision, mut from_text) = (0, 0);
    for (name, ours) in &trained {
        if name.starts_with("visual") || name == "logit_scale" {
            assert!(ours.equal(&v[name]), "{name}: not the --clip-weight-path tensor");
            from_vision += 1;
        } else if name.starts_with("bert") {
            assert!(ours.equal(&t[name]), "{name}: not the --bert-weight-path tensor");
            from_text += 1;
        } else {
            assert!(!ours.equal(&v[name]) && !ours.equal(&t[name]), "{name} comes from neither");
        }
    }
    assert!(from_vision > 10 && from_text > 10);
}

/// `--use-augment`: cn_clip's train transform (the `random_augment` node, op-level parity in
/// `augment.rs`) in the training pipeline, drawn from --seed per sample and epoch — two runs
/// give the same parameters, which differ from a run without augmentation.
#[test]
fn use_augment_trains_deterministically_on_augmented_images() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    corpus(dir, 32);
    for name in ["aug-a", "aug-b"] {
        cnclip(dir, &train_args(name, &["--max-epochs", "2", "--use-augment", "--valid-epoch-interval", "0"]));
    }
    cnclip(dir, &train_args("plain", &["--max-epochs", "2", "--valid-epoch-interval", "0"]));
    let load = |name: &str| load_cn_clip(&dir.join(format!("logs/{name}/checkpoints/epoch2.pt"))).unwrap().0;
    let (a, b, plain) = (load("aug-a"), load("aug-b"), load("plain"));
    let key = "visual.conv1.weight";
    for (name, t) in &a {
        assert!(t.equal(&b[name]), "{name}: two --use-augment runs differ");
    }
    assert!(!a[key].equal(&plain[key]), "augmentation changed nothing");
}

/// A mid-epoch position only holds for the settings that made it: resumed with another batch
/// size, the run says so and resumes at the checkpoint's epoch end, as cn_clip would.
#[test]
fn a_mid_epoch_position_with_other_settings_resumes_at_the_epoch_end() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    corpus(dir, 64);
    cnclip(
        dir,
        &train_args("first", &["--max-steps", "1", "--save-step-frequency", "1", "--valid-epoch-interval", "0"]),
    );
    let step = dir.join("logs/first/checkpoints/epoch_1_1.pt");
    let mut args = train_args("second", &["--max-epochs", "2", "--valid-epoch-interval", "0", "--resume"]);
    args.push(step.to_str().unwrap());
    let bs = args.iter().position(|a| *a == "--batch-size").unwrap() + 1;
    args[bs] = "8";
    cnclip(dir, &args);
    let log = the_log(&dir.join("logs/second"));
    assert!(log.contains("made with other settings") && log.contains("(epoch 1 @ 1 steps)"), "{log}");
    assert!(log.contains("Start epoch 2") && !log.contains("Start epoch 1"), "{log}");
}
