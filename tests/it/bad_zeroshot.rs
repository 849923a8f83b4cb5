//! `zeroshot-evaluation` on hostile inputs: issue #23's battery for the zero-shot command. An
//! empty label file or templates file, a class folder holding a symbolic link loop, more class
//! folders than labels, a hidden folder left by Jupyter, an image that cannot be read and a
//! SIGTERM while it works (or while its pipeline is planned) each end as a hostile input must end it — exit 1 naming the file and
//! what is wrong, or a run that scores what it can and says what it left out (the hidden folder
//! not taken for a class), an unreadable image quarantined beside the results and named, or exit 143 leaving no
//! temporary file and no result — never a panic, a hang or silently shifted labels.

use std::path::Path;
use std::time::{Duration, Instant};

use cnclip_tests::hostile::{check_refused, leftovers, refused, run_within, sigterm_while, succeeds};

use crate::smoke::TINY_VIT_BERT;

const DATAPATH: &str = "demo/zeroshot/test";
const LABELS: &str = "demo/zeroshot/label_cn.txt";

/// The synthetic zero-shot set (18 classes, `per_class` images each), a tiny self-describing
/// checkpoint and two prompt templates (few prompts: the text tower's work stays small).
fn fixture(per_class: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let per_class = per_class.to_string();
    let synth = ["synth", "--out", "demo", "--train", "0", "--valid", "0", "--test", "0"];
    succeeds(root, &[&synth[..], &["--zeroshot-per-class", &per_class]].concat());
    std::fs::write(root.join("tiny.json"), TINY_VIT_BERT).unwrap();
    succeeds(root, &["init-model", "--model-config", "tiny.json", "--seed", "1", "--output", "tiny.safetensors"]);
    std::fs::write(root.join("templates.txt"), "{}\n一张{}的照片\n").unwrap();
    dir
}

/// `zeroshot-evaluation` on the fixture, with `with`'s flags replacing (or added to) the usual ones.
fn zeroshot<'a>(with: &[(&'a str, &'a str)]) -> Vec<&'a str> {
    let mut flags = vec![
        ("--datapath", DATAPATH),
        ("--label-file", LABELS),
        ("--resume", "tiny.safetensors"),
        ("--templates", "templates.txt"),
        ("--save-dir", "out"),
        ("--dataset", "synth"),
        ("--img-batch-size", "8"),
        ("--num-workers", "1"),
    ];
    for &(flag, value) in with {
        match flags.iter_mut().find(|(f, _)| *f == flag) {
            Some(slot) => slot.1 = value,
            None => flags.push((flag, value)),
        }
    }
    std::iter::once("zeroshot-evaluation").chain(flags.into_iter().flat_map(|(f, v)| [f, v])).collect()
}

fn top1_line(stdout: &str) -> String {
    stdout
        .lines()
        .find(|l| l.starts_with("zeroshot-top1: "))
        .unwrap_or_else(|| panic!("no top-1 line in:\n{stdout}"))
        .to_string()
}

/// The label file's lines.
fn labels(root: &Path) -> Vec<String> {
    std::fs::read_to_string(root.join(LABELS)).unwrap().lines().map(str::to_string).collect()
}

#[test]
fn an_empty_label_file_is_refused_naming_it() {
    let dir = fixture(1);
    let root = dir.path();
    std::fs::write(root.join("empty_labels.txt"), "").unwrap();
    refused(root, &zeroshot(&[("--label-file", "empty_labels.txt")]), &["empty_labels.txt", "no class names"]);
    assert!(!root.join("out/synth.json").exists(), "a result was written");
}

#[test]
fn a_symbolic_link_loop_in_a_class_folder_is_refused_naming_the_link_not_walked_forever() {
    let dir = fixture(1);
    let root = dir.path();
    let data = root.join(DATAPATH);
    // A link to the folder above (the datapath: its class folders again, and this link in
    // them), and a link to its own folder.
    for (link, target) in [("000/loop", ".."), ("001/self", ".")] {
        std::os::unix::fs::symlink(target, data.join(link)).unwrap();
        let args = zeroshot(&[]);
        let ran = run_within(root, &args, Duration::from_secs(60));
        check_refused(&ran, root, &[link, "symbolic link loop"], &format!("a link {link} → {target}"));
        std::fs::remove_file(data.join(link)).unwrap();
    }
}

#[test]
fn a_hidden_folder_is_not_a_class_and_leaves_the_labels_as_they_were() {
    let dir = fixture(2);
    let root = dir.path();
    let plain = succeeds(root, &zeroshot(&[]));
    // Jupyter's checkpoint folder, with an image in it, sorted before every class folder.
    let hidden = root.join(DATAPATH).join(".ipynb_checkpoints");
    std::fs::create_dir(&hidden).unwrap();
    std::fs::copy(root.join(DATAPATH).join("000/0.jpg"), hidden.join("0.jpg")).unwrap();
    let with_hidden = succeeds(root, &zeroshot(&[]));
    assert_eq!(top1_line(&with_hidden.stdout), top1_line(&plain.stdout), "stderr:\n{}", with_hidden.stderr);
    assert!(
        with_hidden.stderr.contains(".ipynb_checkpoints"),
        "no note names the hidden folder:\n{}",
        with_hidden.stderr
    );
}

#[test]
fn more_class_folders_than_labels_are_refused_and_fewer_run_with_a_note() {
    let dir = fixture(1);
    let root = dir.path();
    let labels = labels(root);
    assert_eq!(labels.len(), 18);
    // 18 folders, 17 labels: the last folder has no class name.
    std::fs::write(root.join("short.txt"), labels[..17].join("\n") + "\n").unwrap();
    refused(root, &zeroshot(&[("--label-file", "short.txt")]), &["--datapath", "--label-file"]);
    // 18 folders, 19 labels: the extra class competes, with no image of its own.
    std::fs::write(root.join("long.txt"), labels.join("\n") + "\n白色的圆形\n").unwrap();
    let ran = succeeds(root, &zeroshot(&[("--label-file", "long.txt")]));
    assert!(ran.stdout.contains("zeroshot-top1: "), "{}", ran.stdout);
    assert!(ran.stderr.contains("note") && ran.stderr.contains("19 classes"), "no note on stderr:\n{}", ran.stderr);
}

#[test]
fn an_empty_templates_file_is_refused_naming_it() {
    let dir = fixture(1);
    let root = dir.path();
    std::fs::write(root.join("no_templates.txt"), "").unwrap();
    refused(root, &zeroshot(&[("--templates", "no_templates.txt")]), &["no_templates.txt", "no templates"]);
}

#[test]
fn an_unreadable_image_is_quarantined_beside_the_results_and_stops_the_job() {
    let dir = fixture(2);
    let root = dir.path();
    std::fs::write(root.join(DATAPATH).join("003/bad.jpg"), b"this is not a JPEG at all").unwrap();
    // 18 classes × 2 images, and the bad one: the predictions (one row per image of the folder)
    // would be shifted past it, so the job stops, naming the quarantine.
    let stderr = refused(root, &zeroshot(&[]), &["1 of 37 images", "synth.quarantine.jsonl"]);
    let quarantine = root.join("out/synth.quarantine.jsonl");
    let listed = std::fs::read_to_string(&quarantine)
        .unwrap_or_else(|e| panic!("{}: {e}; stderr:\n{stderr}", quarantine.display()));
    assert_eq!(listed.lines().count(), 1, "{listed}");
    assert!(listed.contains("bad.jpg"), "the quarantine does not name bad.jpg: {listed}");
    assert!(!root.join("out/synth.json").exists(), "predictions written without the bad image's row");
    assert_eq!(leftovers(root), Vec::<std::path::PathBuf>::new());
}

#[test]
fn sigterm_while_scoring_stops_it_leaving_no_result_and_no_temporary_file() {
    let dir = fixture(150);
    let root = dir.path();
    let started = Instant::now();
    sigterm_while(root, &zeroshot(&[]), || started.elapsed() > Duration::from_millis(1500));
    assert!(!root.join("out/synth.json").exists(), "a result was written after SIGTERM");
}

#[test]
fn sigterm_while_the_pipeline_is_planned_is_an_interruption_not_a_failure() {
    let dir = fixture(2);
    let root = dir.path();
    // strace sends SIGTERM the first time the job opens the last class folder: the end of the
    // walk before the model runs, right before the image pipeline is planned (its source walks
    // the folder again and once reported the signal as text: exit 1, in CI).
    let mut classes: Vec<String> = std::fs::read_dir(root.join(DATAPATH))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    classes.sort();
    let last = format!("{DATAPATH}/{}", classes.last().unwrap());
    let mut args = vec!["-f", "-qq", "-o", "/dev/null", "-P", &last, "-e", "trace=openat"];
    args.extend(["-e", "inject=openat:signal=TERM:when=1"]);
    let bin = cnclip_tests::cnclip_bin();
    args.push(bin.to_str().unwrap());
    let flags = zeroshot(&[]);
    args.extend(flags.iter().copied());
    let child = std::process::Command::new("strace")
        .args(&args)
        .current_dir(root)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("strace runs (apt: strace)");
    let ran = cnclip_tests::hostile::wait_within(child, Duration::from_secs(60), "cnclip under strace");
    assert_eq!(ran.output.status.code(), Some(143), "{}", ran.stderr);
    assert!(ran.stderr.contains("interrupted by SIGTERM"), "{}", ran.stderr);
    assert!(!root.join("out/synth.json").exists(), "a result was written after SIGTERM");
    assert_eq!(leftovers(root), Vec::<std::path::PathBuf>::new());
}

#[test]
fn links_fanning_out_to_one_folder_are_refused_not_walked_for_ever() {
    let dir = fixture(1);
    let root = dir.path();
    // A class folder whose links fan out without ever leading back (no loop): two links from
    // each level to the next, 2^25 paths to walk — a walk that would not end in a lifetime
    // (the old build walked it until stopped, and SIGTERM did not stop it).
    let chain = root.join("chain");
    for level in 0..25 {
        std::fs::create_dir_all(chain.join(format!("n{level}"))).unwrap();
    }
    std::fs::create_dir_all(chain.join("n25")).unwrap();
    for level in 0..25 {
        for link in ["a", "b"] {
            let here = chain.join(format!("n{level}"));
            std::os::unix::fs::symlink(chain.join(format!("n{}", level + 1)), here.join(link)).unwrap();
        }
    }
    std::os::unix::fs::symlink(chain.join("n0"), root.join(DATAPATH).join("000/tree")).unwrap();
    let ran = run_within(root, &zeroshot(&[]), Duration::from_secs(60));
    check_refused(&ran, root, &["000/tree/", "already reaches another way"], "links fanning out");
    assert!(!root.join("out/synth.json").exists(), "a result was written");
}

#[test]
fn label_and_template_files_that_are_not_regular_files_are_refused() {
    let dir = fixture(1);
    let root = dir.path();
    assert!(std::process::Command::new("mkfifo").arg(root.join("fifo.txt")).status().unwrap().success());
    for (flag, file) in [("--label-file", "fifo.txt"), ("--templates", "fifo.txt"), ("--label-file", "/dev/zero")] {
        let ran = run_within(root, &zeroshot(&[(flag, file)]), Duration::from_secs(60));
        check_refused(&ran, root, &[file, "not a regular file"], &format!("{flag} {file}"));
    }
}
