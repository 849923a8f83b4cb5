//! Hostile pickles (issue #10, item 1): a ~300-byte "billion laughs" pickle — memo references
//! that double at every level — in an LMDB `pairs` value and inside a `.pt` checkpoint is
//! refused by the restricted reader's budgets, with an error naming the key or the file, while
//! `cnclip` runs under a 1.5 GiB address-space limit (unbounded, it would need 2^40 values). Real
//! files still fit the default budgets, with room to spare.

use std::path::Path;
use std::process::{Command, Output};

use cnclip_models::checkpoint::TorchArchive;
use cnclip_models::checkpoint::pickle::{Limits, Value};
use cnclip_tests::{python, reference};

use crate::smoke::TINY_VIT_BERT;

/// The address space `cnclip` runs in, in KiB (`ulimit -v`): 1.5 GiB. The reader stays near its
/// 64 MiB byte budget (unbounded, the billion laughs would need ~100 TB); `cnclip-torch`
/// (libtorch, and OpenBLAS through FAISS, which reserves 128 MiB buffers) needs ~1 GB of address
/// space to load and run a small checkpoint (checked below), which leaves the reader room but
/// nothing like what it would take. (Under some limits — 1 GiB, 2 GiB on this machine — OpenBLAS
/// retries its failed buffer allocation forever instead of failing: hence also the time limit.)
const ADDRESS_SPACE_KIB: u64 = 3 << 19;

/// Seconds a limited run may take before it counts as hung.
const TIME_LIMIT_S: u64 = 300;

/// `cnclip ARGS` in `dir`, its address space limited to [`ADDRESS_SPACE_KIB`] (through `sh`'s
/// `ulimit -v`, inherited by the `cnclip-torch` it execs for model commands). libtorch's thread
/// pool and glibc's per-thread malloc arenas (64 MiB of address space each) grow with the core
/// count: both are capped, so that the limit measures the reader on any machine.
fn cnclip_limited(dir: &Path, args: &[&str]) -> Output {
    cnclip_limited_with(dir, args, &[])
}

/// [`cnclip_limited`] with environment variables `env` set.
fn cnclip_limited_with(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -v {ADDRESS_SPACE_KIB} && exec timeout {TIME_LIMIT_S} \"$0\" \"$@\""))
        .arg(cnclip_tests::cnclip_bin())
        .args(args)
        .current_dir(dir)
        .env("OMP_NUM_THREADS", "2")
        .env("MALLOC_ARENA_MAX", "2")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// The job failed with an error of its own (exit code 1), not a crash (a signal: abort on a
/// failed allocation, a segfault) or a kill.
fn failed_cleanly(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(1), "expected a clean failure, got {}:\n{stderr}", output.status);
    assert!(!stderr.contains("memory allocation"), "{stderr}");
    stderr
}

fn succeeded(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "cnclip failed ({}):\n{stderr}", output.status);
    stderr
}

/// `laughs(levels)`: `[]`, then `levels` times `(x, x)` of the level before through the memo.
/// 40 levels are 287 bytes; the reader's default budgets stop it at 64 MiB, the per-record
/// budgets (LMDB pairs) at depth 16 — and 14 levels (2^14 leaves) after 4,096 objects.
const LAUGHS: &str = r#"
def laughs(levels):
    p = b"\x80\x04]\x94"
    for i in range(levels):
        p += bytes([0x68, i, 0x68, i, 0x86, 0x94, 0x30])  # BINGET i, BINGET i, TUPLE2, MEMOIZE, POP
    return p + bytes([0x68, levels]) + b"."
"#;

/// An LMDB split (`lmdb/train/{imgs,pairs}`) whose pairs 0–2 are good and 3 (40 levels) and 4
/// (14 levels) are billion laughs.
const MAKE_LMDB: &str = r#"
import base64, io, os, pickle, sys, lmdb
from PIL import Image
out = sys.argv[1]
os.makedirs(f"{out}/lmdb/train")
buf = io.BytesIO()
Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG")
env = lmdb.open(f"{out}/lmdb/train/imgs", map_size=1 << 24)
with env.begin(write=True) as txn:
    for i in range(1, 4):
        txn.put(str(i).encode(), base64.urlsafe_b64encode(buf.getvalue()))
    txn.put(b"num_images", b"3")
env.close()
env = lmdb.open(f"{out}/lmdb/train/pairs", map_size=1 << 24)
with env.begin(write=True) as txn:
    for k in range(3):
        txn.put(str(k).encode(), pickle.dumps((k + 1, k, f"第{k}个")))
    assert len(laughs(40)) < 300
    txn.put(b"3", laughs(40))
    txn.put(b"4", laughs(14))
    txn.put(b"num_samples", b"5")
env.close()
"#;

const PAIRS_PIPELINE: &str = r#"
[job]
quarantine = "out/quarantine.jsonl"

[nodes.pairs]
kind = "lmdb"
path = "lmdb/train"
database = "pairs"

[nodes.pairs_out]
kind = "write_parquet"
input = "pairs"
path = "out/pairs.parquet"
"#;

/// `(location, reason)` of each quarantine row, in file order.
fn quarantined(path: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|line| {
            let row: serde_json::Value = serde_json::from_str(line).unwrap();
            assert!(row["source"].as_str().unwrap().ends_with("train/pairs"), "{row}");
            (row["location"].as_str().unwrap().to_string(), row["reason"].as_str().unwrap().to_string())
        })
        .collect()
}

fn assert_laughs_quarantined(rows: &[(String, String)]) {
    let locations: Vec<&str> = rows.iter().map(|(l, _)| l.as_str()).collect();
    assert_eq!(locations, ["key \"3\"", "key \"4\""], "{rows:?}");
    assert!(rows[0].1.contains("budget of 16 levels of nesting (max_depth)"), "{rows:?}");
    assert!(rows[1].1.contains("budget of 4096 objects created (max_objects)"), "{rows:?}");
}

#[test]
fn billion_laughs_in_lmdb_pairs_is_quarantined_or_fails_naming_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    python(&format!("{LAUGHS}{MAKE_LMDB}"), &[root.to_str().unwrap()], "");

    // import, skip: the good pairs are written, the two hostile ones quarantined by key.
    let log = succeeded(&cnclip_limited(root, &["import", "--lmdb-dir", "lmdb", "--splits", "train", "--out", "pq"]));
    assert!(log.contains("3 images, 3 pairs, 2 quarantined"), "{log}");
    assert_laughs_quarantined(&quarantined(&root.join("pq/train_quarantine.jsonl")));
    let texts = python(
        "import json, sys, pyarrow.parquet as pq\nprint(json.dumps(pq.read_table(sys.argv[1]).column('text').to_pylist(), ensure_ascii=False))",
        &[root.join("pq/train_pairs.parquet").to_str().unwrap()],
        "",
    );
    assert_eq!(texts.trim(), r#"["第0个", "第1个", "第2个"]"#);

    // import, fail: stops at the first one, naming its database and key.
    let args = ["import", "--lmdb-dir", "lmdb", "--splits", "train", "--out", "pq-fail", "--on-error", "fail"];
    let stderr = failed_cleanly(&cnclip_limited(root, &args));
    assert!(stderr.contains("train/pairs key \"3\"") && stderr.contains("max_depth"), "{stderr}");
    assert!(stderr.contains("(--on-error fail)"), "{stderr}");

    // run, with an lmdb pairs source: the same, skip then fail.
    std::fs::write(root.join("pairs.toml"), PAIRS_PIPELINE).unwrap();
    let log = succeeded(&cnclip_limited(root, &["run", "pairs.toml"]));
    assert!(log.contains("2 records quarantined"), "{log}");
    assert_laughs_quarantined(&quarantined(&root.join("out/quarantine.jsonl")));
    std::fs::remove_dir_all(root.join("out")).unwrap();
    let stderr = failed_cleanly(&cnclip_limited(root, &["run", "pairs.toml", "--on-error", "fail"]));
    assert!(stderr.contains("node `pairs`") && stderr.contains("key \"3\""), "{stderr}");
    assert!(stderr.contains("refusing to load") && stderr.contains("max_depth"), "{stderr}");
    assert!(!root.join("out/pairs.parquet").exists());
}

/// A `.pt` as `torch.save` lays it out (`<name>/data.pkl`, `<name>/byteorder`) whose pickle is
/// `laughs(40)`; and a small real one (cn_clip's own classes, saved as its training does).
#[test]
fn billion_laughs_checkpoint_fails_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let script = format!(
        "{LAUGHS}
import sys, zipfile
from PIL import Image
with zipfile.ZipFile(sys.argv[1] + '/laughs.pt', 'w') as z:
    z.writestr('laughs/data.pkl', laughs(40))
    z.writestr('laughs/byteorder', 'little')
Image.new('RGB', (32, 32), (10, 200, 10)).save(sys.argv[1] + '/green.png')
"
    );
    python(&script, &[root.to_str().unwrap()], "");
    std::fs::write(root.join("tiny.json"), TINY_VIT_BERT).unwrap();
    reference(
        &["build-model", "--config", TINY_VIT_BERT, "--seed", "5", "--out", root.join("tiny.pt").to_str().unwrap()],
        "",
    );

    // The limit leaves libtorch room to load and run a real checkpoint …
    fn similarity(checkpoint: &str) -> [&str; 11] {
        [
            "similarity",
            "--resume",
            checkpoint,
            "--model-config",
            "tiny.json",
            "--image",
            "green.png",
            "--text",
            "绿色",
            "--text",
            "猫",
        ]
    }
    succeeded(&cnclip_limited(root, &similarity("tiny.pt")));

    // … and the billion laughs is refused within it, naming the file and the budget.
    let stderr = failed_cleanly(&cnclip_limited(root, &similarity("laughs.pt")));
    assert!(stderr.contains("checkpoint laughs.pt: refusing to load"), "{stderr}");
    assert!(stderr.contains("budget of 67108864 bytes materialised (max_bytes)"), "{stderr}");
    assert!(stderr.contains("CNCLIP_PICKLE_LIMIT_SCALE=N raises every budget"), "{stderr}");
    // The override raises the budgets (here 2×); the billion laughs still stops.
    let scaled = cnclip_limited_with(root, &similarity("laughs.pt"), &[("CNCLIP_PICKLE_LIMIT_SCALE", "2")]);
    let stderr = failed_cleanly(&scaled);
    assert!(stderr.contains("budget of 134217728 bytes materialised (max_bytes)"), "{stderr}");
    let args = ["convert", "--input", "laughs.pt", "--output", "out.safetensors", "--model-config", "tiny.json"];
    let stderr = failed_cleanly(&cnclip_limited(root, &args));
    assert!(stderr.contains("checkpoint laughs.pt: refusing to load") && stderr.contains("max_bytes"), "{stderr}");
    assert!(!root.join("out.safetensors").exists());
}

/// The structure of the largest real cn_clip checkpoint — ViT-H-14 with RoBERTa-wwm-ext-large,
/// `module.`-prefixed fp16 state dict with its `_metadata`, plus the AdamW state of cn_clip's
/// training (two parameter groups) — saved by `torch.save`, with one-element storages expanded
/// to the real shapes (stride 0) so the file stays ~1 MB. It loads within a tenth of every
/// default budget; `data.pkl` longer than `max_bytes` is refused before it is read whole.
#[test]
fn vit_h_14_training_checkpoint_fits_a_tenth_of_the_default_budgets() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("vit-h-14.pt");
    let script = r#"
import collections, json, sys, torch
sys.path.insert(0, sys.argv[2])
from cnclip_ref import model_info
from cn_clip.clip.model import CLIP
with torch.device("meta"):
    model = CLIP(**model_info("ViT-H-14"))
sd = model.state_dict()
def fake(t, dtype):
    return torch.zeros(1, dtype=dtype).expand(*t.shape) if t.dim() else torch.zeros((), dtype=dtype)
state_dict = collections.OrderedDict(("module." + k, fake(v, torch.float16)) for k, v in sd.items())
state_dict._metadata = collections.OrderedDict(("module." + k if k else "module", v) for k, v in sd._metadata.items())
params = list(model.parameters())
state = {i: {"step": torch.tensor(1000.0), "exp_avg": fake(p, torch.float32), "exp_avg_sq": fake(p, torch.float32)}
         for i, p in enumerate(params)}
group = {"lr": 1e-5, "betas": (0.9, 0.98), "eps": 1e-6, "amsgrad": False, "foreach": None, "maximize": False,
         "capturable": False, "differentiable": False, "fused": None}
groups = [dict(group, weight_decay=0.0, params=list(range(0, len(params), 2))),
          dict(group, weight_decay=0.001, params=list(range(1, len(params), 2)))]
torch.save({"epoch": 10, "step": 100000, "name": "vit-h-14", "state_dict": state_dict,
            "optimizer": {"state": state, "param_groups": groups}}, sys.argv[1])
print(json.dumps({"tensors": len(sd), "parameters": len(params)}))
"#;
    let reference_dir = cnclip_tests::workspace_root().join("tests/reference");
    let counts: serde_json::Value =
        serde_json::from_str(&python(script, &[checkpoint.to_str().unwrap(), reference_dir.to_str().unwrap()], ""))
            .unwrap();

    let d = Limits::CHECKPOINT;
    let tenth = Limits {
        max_objects: d.max_objects / 10,
        max_memo: d.max_memo / 10,
        max_container_items: d.max_container_items / 10,
        max_depth: d.max_depth / 10,
        max_bytes: d.max_bytes / 10,
    };
    let archive = TorchArchive::open_with(&checkpoint, &tenth).unwrap();
    let Some(Value::Dict(state_dict)) = archive.value.get("state_dict") else { panic!("no state_dict") };
    assert_eq!(state_dict.len() as u64, counts["tensors"].as_u64().unwrap());
    assert!(state_dict.len() > 700, "{counts}");
    let Some(Value::Dict(state)) = archive.value.get("optimizer").and_then(|o| o.get("state")) else {
        panic!("no optimizer state")
    };
    assert_eq!(state.len() as u64, counts["parameters"].as_u64().unwrap());

    // data.pkl is read only up to max_bytes.
    let small = Limits { max_bytes: 100_000, ..Limits::CHECKPOINT };
    let err = TorchArchive::open_with(&checkpoint, &small).err().expect("a 100 KB budget is too small").to_string();
    assert!(err.contains("vit-h-14.pt") && err.contains("budget of 100000 bytes materialised"), "{err}");
}

/// A checkpoint re-zipped with deflate whose storage record would inflate to 2 GiB (a zip bomb,
/// ~2 MB on disk) is refused before anything is inflated, naming the record (torch.save stores
/// records uncompressed), within the 1.5 GiB address space; a record shorter than its storage is
/// refused, naming it.
#[test]
fn zip_bomb_and_short_storage_records_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::write(root.join("tiny.json"), TINY_VIT_BERT).unwrap();
    reference(
        &["build-model", "--config", TINY_VIT_BERT, "--seed", "5", "--out", root.join("tiny.pt").to_str().unwrap()],
        "",
    );
    let script = r#"
import sys, zipfile
from PIL import Image
root = sys.argv[1]
with zipfile.ZipFile(f"{root}/tiny.pt") as src:
    names = src.namelist()
    largest = max((n for n in names if "/data/" in n), key=lambda n: src.getinfo(n).file_size)
    # Short: the largest storage cut in half.
    with zipfile.ZipFile(f"{root}/short.pt", "w") as dst:
        for name in names:
            data = src.read(name)
            dst.writestr(name, data[: len(data) // 2] if name == largest else data)
    # The bomb: deflated, the largest storage followed by 2 GiB of zeros.
    with zipfile.ZipFile(f"{root}/bomb.pt", "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as dst:
        for name in names:
            if name != largest:
                dst.writestr(name, src.read(name), compress_type=zipfile.ZIP_STORED)
                continue
            with dst.open(name, "w", force_zip64=True) as f:
                f.write(src.read(name))
                zeros = bytes(64 << 20)
                for _ in range((2 << 30) // len(zeros)):
                    f.write(zeros)
Image.new("RGB", (32, 32), (10, 200, 10)).save(f"{root}/green.png")
print(largest)
"#;
    let largest = python(script, &[root.to_str().unwrap()], "");
    let bomb = std::fs::metadata(root.join("bomb.pt")).unwrap().len();
    assert!(bomb < 16 << 20, "the bomb is {bomb} bytes deflated");
    let similarity = |checkpoint: &'static str| {
        ["similarity", "--resume", checkpoint, "--model-config", "tiny.json", "--image", "green.png", "--text", "绿色"]
    };
    succeeded(&cnclip_limited(root, &similarity("tiny.pt")));
    let stderr = failed_cleanly(&cnclip_limited(root, &similarity("bomb.pt")));
    let record = largest.trim();
    assert!(stderr.contains(&format!("checkpoint bomb.pt: record {record} is compressed")), "{stderr}");

    let stderr = failed_cleanly(&cnclip_limited(root, &similarity("short.pt")));
    assert!(stderr.contains("short.pt") && stderr.contains(&format!("storage {record}")), "{stderr}");
    assert!(stderr.contains("expected"), "{stderr}");
}
