//! The array-scheduler files (issue #13, point 2) run as their schedulers run them:
//! `deploy/slurm/extract.sbatch` as four array tasks at once (bash with Slurm's array variables,
//! `srun` a pass-through), then as the one-task rerun its header shows; the Indexed Job of
//! `deploy/k8s/extract-job.yaml` as four pods (its container's command and arguments, from the
//! file, with its environment and `JOB_COMPLETION_INDEX`). Only the paths, the devices (`cpu`)
//! and the tiny self-describing checkpoint are ours. Each gives a table `manifest check`
//! passes, equal to one unsharded run's with the same settings (within 1e-5: a shard's batches
//! hold other rows than the unsharded run's, which changes the kernels' rounding).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::manifest::{IMAGES, cnclip, corpus, listing, parts, read_table, succeeds};

/// Waits for `children`, which must all succeed.
fn all_succeed(children: Vec<Child>, what: &str) {
    for (i, child) in children.into_iter().enumerate() {
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "{what} {i} failed:\n{}", String::from_utf8_lossy(&output.stderr));
    }
}

/// `dir`'s parts equal the unsharded table `whole`: the same ids, the same columns and metadata,
/// every feature within 1e-5.
fn equals_whole(root: &Path, dir: &str, whole: &str) {
    let whole = read_table(&[root.join(whole)]);
    let sharded = read_table(&parts(&root.join(dir)));
    assert_eq!(whole.rows.len(), IMAGES);
    assert_eq!(sharded.rows.keys().collect::<Vec<_>>(), whole.rows.keys().collect::<Vec<_>>(), "{dir}: ids");
    assert_eq!(sharded.columns, whole.columns, "{dir}: columns");
    assert_eq!(sharded.metadata, whole.metadata, "{dir}: metadata");
    for (id, bits) in &whole.rows {
        let worst = bits
            .iter()
            .zip(&sharded.rows[id])
            .map(|(a, b)| (f32::from_bits(*a) - f32::from_bits(*b)).abs())
            .fold(0.0f32, f32::max);
        assert!(worst <= 1e-5, "{dir}: id {id}'s feature differs from the unsharded run's by {worst}");
    }
}

/// `manifest check` passes on `dir`, a whole table of the corpus's images.
fn checks(root: &Path, dir: &str) {
    let (summary, _) = cnclip(root, &["manifest", "check", dir, "--image-data", "lmdb/valid/imgs"]);
    assert!(summary.contains(&format!("4 of 4 shards, {IMAGES} rows")), "{dir}: {summary}");
    assert!(summary.contains(&format!("{IMAGES} source ids, {IMAGES} in the parts")), "{dir}: {summary}");
}

/// A directory holding `srun`, which runs its command in place (as one task of one node).
fn srun_shim(root: &Path) -> String {
    use std::os::unix::fs::PermissionsExt;
    let bin = root.join("shim");
    std::fs::create_dir_all(&bin).unwrap();
    let srun = bin.join("srun");
    std::fs::write(&srun, "#!/bin/sh\nexec \"$@\"\n").unwrap();
    std::fs::set_permissions(&srun, std::fs::Permissions::from_mode(0o755)).unwrap();
    format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default())
}

/// Task `id` of a Slurm array `min..=max` running the sbatch file (`shards`: its SHARDS).
fn slurm_task(root: &Path, path: &str, id: usize, (min, max): (usize, usize), shards: Option<&str>) -> Command {
    let mut command = Command::new("bash");
    command.arg(cnclip_tests::workspace_root().join("deploy/slurm/extract.sbatch")).current_dir(root);
    command.env("PATH", path);
    for name in ["SHARDS", "VISION_MODEL", "TEXT_MODEL"] {
        command.env_remove(name);
    }
    for (name, value) in [
        ("SLURM_ARRAY_TASK_ID", id),
        ("SLURM_ARRAY_TASK_MIN", min),
        ("SLURM_ARRAY_TASK_MAX", max),
        ("SLURM_ARRAY_TASK_COUNT", max - min + 1),
        ("SLURM_CPUS_PER_TASK", 1),
    ] {
        command.env(name, value.to_string());
    }
    command.envs([
        ("CNCLIP", cnclip_tests::cnclip_bin().display().to_string().as_str()),
        ("IMAGE_DATA", "lmdb/valid/imgs"),
        ("OUTPUT", "slurm_img"),
        ("TEXT_DATA", "data/valid_texts.jsonl"),
        ("TEXT_OUTPUT", "slurm_txt"),
        ("CHECKPOINT", "tiny.safetensors"),
        ("DEVICES", "cpu"),
    ]);
    if let Some(shards) = shards {
        command.env("SHARDS", shards);
    }
    command.stdout(Stdio::null()).stderr(Stdio::piped());
    command
}

/// The Job's container in the Kubernetes file: its command line (`command` + `args`), its
/// environment and the Job's `completions`.
const READ_JOB: &str = r#"
import json, sys, yaml
for doc in yaml.safe_load_all(open(sys.argv[1])):
    if doc and doc.get("kind") == "Job":
        spec = doc["spec"]
        container, = spec["template"]["spec"]["containers"]
        print(json.dumps({"completions": spec["completions"], "mode": spec["completionMode"],
                          "argv": container["command"] + container["args"],
                          "env": {e["name"]: e["value"] for e in container["env"]}}))
"#;

#[test]
fn the_slurm_array_and_the_indexed_job_run_as_their_schedulers_run_them() {
    let dir = corpus();
    let root = dir.path();
    // One unsharded run with the files' settings (batches of 256, cn_clip's default precision).
    let mut whole = Command::new(cnclip_tests::cnclip_bin());
    whole.current_dir(root).args(["extract-features", "--extract-image-feats", "--image-data", "lmdb/valid/imgs"]);
    whole.args(["--image-feat-output-path", "whole_img.parquet", "--extract-text-feats", "--text-data"]);
    whole.args(["data/valid_texts.jsonl", "--text-feat-output-path", "whole_txt.parquet"]);
    whole.args(["--resume", "tiny.safetensors", "--img-batch-size", "256", "--text-batch-size", "256"]);
    succeeds(whole);

    // Slurm: an array of four tasks, all at once.
    let path = srun_shim(root);
    let tasks = (0..4).map(|i| slurm_task(root, &path, i, (0, 3), None).spawn().unwrap()).collect();
    all_succeed(tasks, "array task");
    checks(root, "slurm_img");
    equals_whole(root, "slurm_img", "whole_img.parquet");
    equals_whole(root, "slurm_txt", "whole_txt.parquet");
    let (summary, _) = cnclip(root, &["manifest", "check", "slurm_txt", "--text-data", "data/valid_texts.jsonl"]);
    assert!(summary.contains("4 of 4 shards"), "{summary}");

    // A failed task rerun as the header says (`SHARDS=4 sbatch --array=2`): it writes its own
    // part again and leaves the others' files as they were.
    let others: BTreeMap<String, Vec<u8>> = listing(&root.join("slurm_img"))
        .into_iter()
        .filter(|name| !name.starts_with("part-00002"))
        .map(|name| (name.clone(), std::fs::read(root.join("slurm_img").join(&name)).unwrap()))
        .collect();
    for suffix in ["parquet", "json"] {
        std::fs::remove_file(root.join(format!("slurm_img/part-00002-of-00004.{suffix}"))).unwrap();
    }
    let output = slurm_task(root, &path, 2, (2, 2), None).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "a one-task array without SHARDS: {stderr}");
    assert!(stderr.contains("set SHARDS=N"), "{stderr}");
    all_succeed(vec![slurm_task(root, &path, 2, (2, 2), Some("4")).spawn().unwrap()], "the rerun task");
    checks(root, "slurm_img");
    for (name, bytes) in &others {
        assert!(std::fs::read(root.join("slurm_img").join(name)).unwrap() == *bytes, "the rerun changed {name}");
    }
    equals_whole(root, "slurm_img", "whole_img.parquet");

    // Kubernetes: the Indexed Job's four pods, each its container's command with its env.
    let job = cnclip_tests::python(
        READ_JOB,
        &[&cnclip_tests::workspace_root().join("deploy/k8s/extract-job.yaml").display().to_string()],
        "",
    );
    let job: serde_json::Value = serde_json::from_str(job.trim()).unwrap();
    assert_eq!(job["mode"], "Indexed");
    assert_eq!(job["env"]["SHARDS"], job["completions"].to_string(), "SHARDS must equal completions");
    let argv: Vec<String> = job["argv"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect();
    let env: BTreeMap<String, String> = job["env"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, value)| (name.clone(), value.as_str().unwrap().to_string()))
        .collect();
    let bin_dir = cnclip_tests::cnclip_bin().parent().unwrap().display().to_string();
    let pods = (0..4)
        .map(|i| {
            let mut pod = Command::new(&argv[0]);
            pod.args(&argv[1..]).current_dir(root).envs(&env).envs([
                ("PATH", format!("{bin_dir}:{}", std::env::var("PATH").unwrap_or_default())),
                ("JOB_COMPLETION_INDEX", i.to_string()),
                ("SHARDS", "4".to_string()),
                ("IMAGE_DATA", "lmdb/valid/imgs".to_string()),
                ("OUTPUT", "k8s_img".to_string()),
                ("CHECKPOINT", "tiny.safetensors".to_string()),
                // A self-describing checkpoint: no tower names (the file's comment says so).
                ("VISION_MODEL", String::new()),
                ("TEXT_MODEL", String::new()),
                ("DEVICES", "cpu".to_string()),
            ]);
            pod.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()
        })
        .collect();
    all_succeed(pods, "pod");
    checks(root, "k8s_img");
    equals_whole(root, "k8s_img", "whole_img.parquet");

    // And with the file's own settings, as a GPU cluster runs it: the command line `cnclip` gets
    // (a stand-in that prints it), pod 3 of 8.
    let stand_in = root.join("stand-in");
    std::fs::create_dir_all(&stand_in).unwrap();
    let printer = stand_in.join("cnclip");
    std::fs::write(&printer, "#!/bin/sh\nprintf '%s\\n' \"$@\"\n").unwrap();
    std::fs::set_permissions(&printer, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let pod = Command::new(&argv[0])
        .args(&argv[1..])
        .env_clear()
        .envs(&env)
        .env("PATH", format!("{}:/usr/bin:/bin", stand_in.display()))
        .env("JOB_COMPLETION_INDEX", "3")
        .output()
        .unwrap();
    assert!(pod.status.success(), "{}", String::from_utf8_lossy(&pod.stderr));
    let got: Vec<String> = String::from_utf8_lossy(&pod.stdout).lines().map(str::to_string).collect();
    let want = [
        "extract-features",
        "--extract-image-feats",
        "--image-data",
        &env["IMAGE_DATA"],
        "--image-feat-output-path",
        &env["OUTPUT"],
        "--resume",
        &env["CHECKPOINT"],
        "--vision-model",
        "ViT-B-16",
        "--text-model",
        "RoBERTa-wwm-ext-base-chinese",
        "--img-batch-size",
        "256",
        "--devices",
        "cuda",
        "--num-workers",
        "8",
        "--shard",
        &format!("3/{}", env["SHARDS"]),
    ];
    assert_eq!(got, want, "the pod's command line with the file's settings");
}
