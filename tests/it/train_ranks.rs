//! `cnclip train` as several processes (issue #26): `--nproc-per-node 2` starts two ranks that
//! meet through c10d's TCPStore and train through Gloo, and must train as `--devices cpu,cpu`
//! (two replicas in one process, already checked against cn_clip's gloo ranks) does; a rank
//! killed mid-run stops the run, named, and a rerun resumes from rank 0's checkpoint.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cnclip_models::checkpoint::load_cn_clip;
use cnclip_tests::cnclip_bin;

use crate::train_cli::{cnclip, corpus, samples_by_step, the_log, train_args};

/// The tiny model of `train_cli` without dropout: another rank draws its dropout from another
/// stream than the second replica of one process does, so only a model without it can be
/// compared across the two set-ups.
fn tiny_without_dropout(dir: &Path) {
    let json = std::fs::read_to_string(dir.join("tiny.json")).unwrap().replace("_prob\": 0.1", "_prob\": 0.0");
    assert!(!json.contains("0.1,"), "every dropout set to 0");
    std::fs::write(dir.join("tiny0.json"), json).unwrap();
}

fn args<'a>(name: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    train_args(name, extra).into_iter().map(|a| if a == "tiny.json" { "tiny0.json" } else { a }).collect()
}

fn free_port() -> String {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string()
}

fn assert_same_checkpoints(a: &Path, b: &Path) {
    let (a, _) = load_cn_clip(a).unwrap();
    let (b, info) = load_cn_clip(b).unwrap();
    assert!(info.step.is_some());
    assert_eq!(a.len(), b.len());
    for (name, x) in &a {
        let y = &b[name];
        let scale = x.abs().max().double_value(&[]).max(1e-12);
        let diff = (x - y).abs().max().double_value(&[]) / scale;
        assert!(diff < 1e-6, "{name} differs by {diff} (relative)");
    }
}

/// Validation lines without their timestamps.
fn validations(log: &str) -> Vec<String> {
    log.lines().filter_map(|l| l.find("Validation Result").map(|at| l[at..].to_string())).collect()
}

#[test]
fn two_ranks_train_as_two_replicas_in_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    corpus(dir, 64);
    tiny_without_dropout(dir);
    let extra = ["--max-epochs", "2", "--log-interval", "1", "--debug"];
    cnclip(dir, &args("replicas", &[&extra[..], &["--devices", "cpu,cpu"]].concat()));
    let port = free_port();
    let ranked = args("ranks", &[&extra[..], &["--nproc-per-node", "2"]].concat());
    let out = Command::new(cnclip_bin()).current_dir(dir).args(&ranked).env("MASTER_PORT", &port).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}", &stderr[stderr.len().saturating_sub(3000)..]);

    assert_same_checkpoints(
        &dir.join("logs/replicas/checkpoints/epoch2.pt"),
        &dir.join("logs/ranks/checkpoints/epoch2.pt"),
    );
    let (one, two) = (the_log(&dir.join("logs/replicas")), the_log(&dir.join("logs/ranks")));
    assert!(two.contains("Rank 0 of 2 (local rank 0)"), "{two}");
    assert!(two.contains("Global Steps: 2/4 | Train Epoch: 1 [64/64 (100%)]"), "{two}");
    assert!(two.contains("Global Batch Size: 32"), "{two}");
    assert_eq!(validations(&one), validations(&two));
    assert_eq!(validations(&two).len(), 2);
    // Each step: rank 0's samples then rank 1's are the two replicas' samples.
    let whole = samples_by_step(&dir.join("logs/replicas/metrics.parquet"));
    let (r0, r1) = (
        samples_by_step(&dir.join("logs/ranks/metrics.parquet")),
        samples_by_step(&dir.join("logs/ranks/rank1/metrics.parquet")),
    );
    assert_eq!(whole.len(), 4);
    for ((w, a), b) in whole.iter().zip(&r0).zip(&r1) {
        assert_eq!((w.0, a.0), (b.0, b.0));
        assert_eq!(w.1, [a.1.clone(), b.1.clone()].concat(), "step {}", w.0);
    }
    // Rank 1 writes only its own log and metrics; the run's files are rank 0's.
    assert!(the_log(&dir.join("logs/ranks/rank1")).contains("Rank 1 of 2"));
    assert!(!dir.join("logs/ranks/rank1/checkpoints").exists());
}

/// The pid of the launched rank `rank` (a child of `launcher` with RANK set so).
fn rank_pid(launcher: u32, rank: usize) -> Option<u32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let ppid: Option<u32> = stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().nth(1)?.parse().ok());
        if ppid != Some(launcher) {
            continue;
        }
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        if environ.split(|&b| b == 0).any(|v| v == format!("RANK={rank}").as_bytes()) {
            return Some(pid);
        }
    }
    None
}

#[test]
fn a_rank_killed_mid_run_stops_the_others_naming_it_and_a_rerun_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    corpus(dir, 96);
    tiny_without_dropout(dir);
    let extra = ["--max-epochs", "2", "--log-interval", "1", "--save-step-frequency", "2", "--nproc-per-node", "2"];
    let port = free_port();
    cnclip_with_port(dir, &args("whole", &extra), &port);

    // The same run; rank 1 killed (SIGKILL) once rank 0's first step checkpoint is in place.
    let killed = args("killed", &extra);
    let mut launcher = Command::new(cnclip_bin())
        .current_dir(dir)
        .args(&killed)
        .env("MASTER_PORT", &port)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let marker = dir.join("logs/killed/checkpoints/epoch_latest.pt");
    let deadline = Instant::now() + Duration::from_secs(300);
    while !marker.is_file() {
        assert!(Instant::now() < deadline, "no step checkpoint within 300 s");
        assert!(launcher.try_wait().unwrap().is_none(), "the run ended before a rank could be killed");
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid = rank_pid(launcher.id(), 1).expect("rank 1 runs");
    assert!(Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap().success(), "kill rank 1");
    let killed_at = Instant::now();
    let out = launcher.wait_with_output().unwrap();
    assert!(killed_at.elapsed() < Duration::from_secs(60), "the run took {:?} to stop", killed_at.elapsed());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("rank 1 of 2 (pid {pid}) was killed by signal 9: the other ranks were stopped")),
        "{stderr}"
    );
    assert!(!dir.join("logs/killed/checkpoints/epoch2.pt").exists(), "stopped before the end");
    // Rerun: both ranks resume from rank 0's checkpoint and end as the uninterrupted run.
    cnclip_with_port(dir, &killed, &port);
    let log = the_log(&dir.join("logs/killed"));
    assert!(log.contains("=> loaded checkpoint"), "{log}");
    assert_same_checkpoints(
        &dir.join("logs/whole/checkpoints/epoch2.pt"),
        &dir.join("logs/killed/checkpoints/epoch2.pt"),
    );
}

fn cnclip_with_port(dir: &Path, args: &[&str], port: &str) {
    let out = Command::new(cnclip_bin()).current_dir(dir).args(args).env("MASTER_PORT", port).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "cnclip {args:?} failed:\n{}", &stderr[stderr.len().saturating_sub(3000)..]);
}

/// Two "nodes" of two ranks each (torchrun's NNODES=2, NODE_RANK 0 and 1, on loopback) train as
/// four ranks on one node.
#[test]
fn two_nodes_of_two_ranks_train_as_four_ranks_on_one() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    corpus(dir, 64);
    tiny_without_dropout(dir);
    let extra = ["--max-epochs", "2", "--log-interval", "1"];
    cnclip_with_port(dir, &args("one", &[&extra[..], &["--nproc-per-node", "4"]].concat()), &free_port());
    let port = free_port();
    let node_args = args("two", &[&extra[..], &["--nproc-per-node", "2"]].concat());
    let nodes: Vec<_> = (0..2)
        .map(|node| {
            Command::new(cnclip_bin())
                .current_dir(dir)
                .args(&node_args)
                .env("MASTER_PORT", &port)
                .env("NNODES", "2")
                .env("NODE_RANK", node.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (node, launcher) in nodes.into_iter().enumerate() {
        let out = launcher.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "node {node}:\n{}", &stderr[stderr.len().saturating_sub(3000)..]);
    }
    assert_same_checkpoints(&dir.join("logs/one/checkpoints/epoch2.pt"), &dir.join("logs/two/checkpoints/epoch2.pt"));
    let log = the_log(&dir.join("logs/two"));
    assert!(log.contains("Rank 0 of 4 (local rank 0)"), "{log}");
    assert!(log.contains("Global Batch Size: 64"), "{log}");
    assert!(the_log(&dir.join("logs/two/rank3")).contains("Rank 3 of 4 (local rank 1)"));
}

/// `deploy/slurm/train.sbatch` run as Slurm runs it on one node of two tasks: bash with the
/// job's variables, `srun` starting its command once per task with SLURM_PROCID, SLURM_LOCALID
/// and SLURM_NTASKS set. It trains as `--nproc-per-node 2` does.
#[test]
fn the_slurm_script_trains_as_the_launcher_does() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    corpus(dir, 64);
    tiny_without_dropout(dir);
    let common = ["--model-config", "tiny0.json", "--context-length", "24", "--warmup", "4", "--lr", "1e-3"];
    let betas = ["--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6"];
    let mut launched = vec!["train", "--train-data", "corpus/lmdb/train", "--val-data", "corpus/lmdb/valid"];
    launched.extend(common);
    launched.extend(betas);
    launched.extend(["--logs", "logs", "--name", "launched", "--batch-size", "16", "--max-epochs", "2"]);
    launched.extend(["--devices", "cpu", "--num-workers", "2", "--nproc-per-node", "2"]);
    cnclip_with_port(dir, &launched, &free_port());

    let bin = dir.join("shim");
    std::fs::create_dir_all(&bin).unwrap();
    // srun's options are Slurm's business: skipped here.
    let srun = "#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nn=${SLURM_NTASKS:-1}\npids=()\nfor ((i = 0; i < n; i++)); do\n  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_STEP_NUM_TASKS=$n \"$@\" &\n  pids+=($!)\ndone\nstatus=0\nfor p in \"${pids[@]}\"; do wait \"$p\" || status=$?; done\nexit $status\n";
    std::fs::write(bin.join("srun"), srun).unwrap();
    std::fs::set_permissions(bin.join("srun"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let out = Command::new("bash")
        .arg(cnclip_tests::workspace_root().join("deploy/slurm/train.sbatch"))
        .current_dir(dir)
        .env("PATH", path)
        .env("CNCLIP", cnclip_bin())
        .env("SLURM_NTASKS", "2")
        .env("SLURM_PROCID", "0")
        .env("SLURM_CPUS_PER_TASK", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", free_port())
        .env("TRAIN_DATA", "corpus/lmdb/train")
        .env("VAL_DATA", "corpus/lmdb/valid")
        .env("LOGS", "logs")
        .env("NAME", "slurm")
        .env("BATCH_SIZE", "16")
        .env("MAX_EPOCHS", "2")
        .env("LR", "1e-3")
        .env("DEVICES", "cpu")
        .env("EXTRA", "--model-config tiny0.json --context-length 24 --warmup 4 --beta1 0.9 --beta2 0.98 --eps 1e-6")
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}", &stderr[stderr.len().saturating_sub(3000)..]);
    assert_same_checkpoints(
        &dir.join("logs/launched/checkpoints/epoch2.pt"),
        &dir.join("logs/slurm/checkpoints/epoch2.pt"),
    );
    assert!(the_log(&dir.join("logs/slurm/rank1")).contains("Rank 1 of 2 (local rank 1)"));
}

/// A cn_clip TSV (read in place through indexes the run makes) on two "nodes" of two ranks:
/// rank 0 makes the indexes and every other rank, waiting for it, finds them made; the run
/// trains as the LMDB split on four ranks of one node. (Here the nodes share one cache, so a
/// node's first rank finds rank 0's indexes too; on machines of their own it makes them before
/// its node's other ranks read them, which this machine cannot show.)
#[test]
fn ranks_train_a_tsv_in_place_from_the_indexes_rank_0_made() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    corpus(dir, 64);
    tiny_without_dropout(dir);
    let extra = ["--max-epochs", "1", "--log-interval", "1"];
    cnclip_with_port(dir, &args("lmdb", &[&extra[..], &["--nproc-per-node", "4"]].concat()), &free_port());
    let mut node_args = args("tsv", &[&extra[..], &["--nproc-per-node", "2"]].concat());
    let at = |args: &[&str], flag: &str| args.iter().position(|a| *a == flag).unwrap() + 1;
    let (t, v) = (at(&node_args, "--train-data"), at(&node_args, "--val-data"));
    node_args[t] = "corpus/train_imgs.tsv";
    node_args[v] = "corpus/valid_imgs.tsv";
    let port = free_port();
    let nodes: Vec<_> = (0..2)
        .map(|node| {
            Command::new(cnclip_bin())
                .current_dir(dir)
                .args(&node_args)
                .env("MASTER_PORT", &port)
                .env("NNODES", "2")
                .env("NODE_RANK", node.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (node, launcher) in nodes.into_iter().enumerate() {
        let out = launcher.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "node {node}:\n{}", &stderr[stderr.len().saturating_sub(3000)..]);
    }
    assert_same_checkpoints(&dir.join("logs/lmdb/checkpoints/epoch1.pt"), &dir.join("logs/tsv/checkpoints/epoch1.pt"));
    // Rank 0 made the indexes; every other rank, after it, found them made.
    assert!(!the_log(&dir.join("logs/tsv")).contains("reusing the index"));
    for rank in 1..4 {
        let log = the_log(&dir.join(format!("logs/tsv/rank{rank}")));
        assert!(log.contains("--train-data: reusing the index"), "rank {rank}:\n{log}");
    }
}
