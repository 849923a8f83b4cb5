//! Sharded extraction for array schedulers (issue #13, point 2): four `extract-features
//! --shard i/4` processes run at once, as a Slurm array or an Indexed Job runs them, write
//! parts whose union is, row for row and bit for bit, the table of one unsharded run;
//! `manifest check` passes on them and names the fault when a part is missing, duplicated,
//! truncated or made with another checkpoint, or an id of the source is in no part; a shard
//! rerun replaces its own part and nothing else; `sql` and `make-topk-predictions` read the
//! directory as one table, and every reader refuses one with a shard missing.
//!
//! The features are compared bit for bit: every run encodes one row per batch
//! (`--img-batch-size 1`), so a row meets the same kernels whichever shard holds it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use arrow::array::{Array, AsArray, Int64Array};
use arrow::datatypes::Float32Type;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

/// A tiny CLIP (32² images, 2 layers a tower): the chain runs in seconds on a CPU.
const TINY: &str = r#"{"embed_dim": 32, "image_resolution": 32, "vision_layers": 2,
  "vision_width": 64, "vision_patch_size": 8, "vocab_size": 21128,
  "text_attention_probs_dropout_prob": 0.1, "text_hidden_act": "gelu", "text_hidden_dropout_prob": 0.1,
  "text_hidden_size": 64, "text_initializer_range": 0.02, "text_intermediate_size": 128,
  "text_max_position_embeddings": 64, "text_num_attention_heads": 2, "text_num_hidden_layers": 2,
  "text_type_vocab_size": 2}"#;

pub(crate) const IMAGES: usize = 40;

fn run(root: &Path, args: &[&str]) -> Output {
    Command::new(cnclip_tests::cnclip_bin()).args(args).current_dir(root).output().unwrap()
}

/// Runs `cnclip ARGS…`, which must succeed; returns stdout and stderr.
pub(crate) fn cnclip(root: &Path, args: &[&str]) -> (String, String) {
    let output = run(root, args);
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "cnclip {args:?} failed:\n{stderr}");
    (stdout.into_owned(), stderr.into_owned())
}

/// Runs `cnclip ARGS…`, which must fail with status 1; returns stderr.
fn cnclip_fails(root: &Path, args: &[&str]) -> String {
    let output = run(root, args);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(1), "cnclip {args:?} should fail:\n{stderr}");
    stderr
}

/// The synthetic corpus (its valid split as TSV, JSONL and an LMDB) and two tiny checkpoints.
pub(crate) fn corpus() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    corpus_in(dir.path());
    dir
}

/// [`corpus`], made in `root`.
fn corpus_in(root: &Path) {
    let n = IMAGES.to_string();
    cnclip(root, &["synth", "--out", "data", "--train", "0", "--valid", &n, "--test", "0"]);
    cnclip(root, &["build-lmdb", "--data-dir", "data", "--splits", "valid", "--lmdb-dir", "lmdb"]);
    std::fs::write(root.join("tiny.json"), TINY).unwrap();
    for (seed, name) in [("1", "tiny.safetensors"), ("2", "other.safetensors")] {
        cnclip(root, &["init-model", "--model-config", "tiny.json", "--seed", seed, "--output", name]);
    }
}

/// `extract-features` on the corpus's valid split: images into `images` (and texts into
/// `texts`), files or directories, with `extra` flags.
fn extract(root: &Path, images: &str, texts: Option<&str>, extra: &[&str]) -> Command {
    let mut command = Command::new(cnclip_tests::cnclip_bin());
    command.current_dir(root).args([
        "extract-features",
        "--extract-image-feats",
        "--image-data",
        "lmdb/valid/imgs",
        "--image-feat-output-path",
        images,
        "--img-batch-size",
        "1",
        "--text-batch-size",
        "1",
        "--precision",
        "fp32",
    ]);
    if let Some(texts) = texts {
        command.args([
            "--extract-text-feats",
            "--text-data",
            "data/valid_texts.jsonl",
            "--text-feat-output-path",
            texts,
        ]);
    }
    command.args(extra);
    command
}

pub(crate) fn succeeds(mut command: Command) -> String {
    let output = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{command:?} failed:\n{stderr}");
    stderr
}

/// Four shards at once, as an array runs them.
fn extract_sharded(root: &Path, out: &str, texts: bool) {
    let children: Vec<_> = (0..4)
        .map(|i| {
            let shard = format!("{i}/4");
            let (images, texts) = (format!("{out}_img"), texts.then(|| format!("{out}_txt")));
            let mut command =
                extract(root, &images, texts.as_deref(), &["--resume", "tiny.safetensors", "--shard", &shard]);
            command.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().unwrap()
        })
        .collect();
    for (i, child) in children.into_iter().enumerate() {
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "shard {i}/4 failed:\n{}", String::from_utf8_lossy(&output.stderr));
    }
}

/// A feature table: its schema's metadata and, by id, each feature's bits.
pub(crate) struct Table {
    pub metadata: std::collections::HashMap<String, String>,
    pub columns: String,
    pub rows: BTreeMap<i64, Vec<u32>>,
    pub ids_in_order: Vec<i64>,
}

pub(crate) fn read_table(paths: &[PathBuf]) -> Table {
    let mut table =
        Table { metadata: Default::default(), columns: String::new(), rows: BTreeMap::new(), ids_in_order: Vec::new() };
    for path in paths {
        let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(path).unwrap()).unwrap();
        let schema = reader.schema().clone();
        table.metadata = schema.metadata().clone();
        table.columns = format!("{:?}", schema.fields());
        for batch in reader.build().unwrap() {
            let batch = batch.unwrap();
            let ids = batch.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
            let features = batch.column(1).as_fixed_size_list();
            for row in 0..batch.num_rows() {
                let feature = features.value(row);
                let bits = feature.as_primitive::<Float32Type>().values().iter().map(|x| x.to_bits()).collect();
                assert!(table.rows.insert(ids.value(row), bits).is_none(), "id {} twice", ids.value(row));
                table.ids_in_order.push(ids.value(row));
            }
        }
    }
    table
}

pub(crate) fn parts(dir: &Path) -> Vec<PathBuf> {
    (0..4).map(|i| dir.join(format!("part-{i:05}-of-00004.parquet"))).collect()
}

pub(crate) fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

fn entry(dir: &Path, i: usize) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join(format!("part-{i:05}-of-00004.json"))).unwrap()).unwrap()
}

fn sha256(path: &Path) -> String {
    let output = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&output.stdout).split_whitespace().next().unwrap().to_string()
}

/// A copy of the flat directory `from` (its files) at `to`.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        assert!(entry.file_type().unwrap().is_file(), "{} is not a file", entry.path().display());
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[test]
fn four_concurrent_shards_equal_one_unsharded_run_and_read_as_one_table_issue_13() {
    let dir = corpus();
    let root = dir.path();
    succeeds(extract(root, "whole_img.parquet", Some("whole_txt.parquet"), &["--resume", "tiny.safetensors"]));
    extract_sharded(root, "sharded", true);

    for (tower, whole) in [("img", "whole_img.parquet"), ("txt", "whole_txt.parquet")] {
        let sharded = root.join(format!("sharded_{tower}"));
        // Parts and entries, nothing else: no work directory or temporary file left.
        let expected: Vec<String> = (0..4)
            .flat_map(|i| [format!("part-{i:05}-of-00004.json"), format!("part-{i:05}-of-00004.parquet")])
            .collect();
        assert_eq!(listing(&sharded), expected, "{tower}");

        // The union of the parts is the unsharded table, row for row, bit for bit.
        let whole = read_table(&[root.join(whole)]);
        let union = read_table(&parts(&sharded));
        assert!(!whole.rows.is_empty());
        assert_eq!(union.rows.keys().collect::<Vec<_>>(), whole.rows.keys().collect::<Vec<_>>(), "{tower}: ids");
        for (id, bits) in &whole.rows {
            assert!(union.rows[id] == *bits, "{tower}: id {id}'s feature differs from the unsharded run's");
        }
        assert_eq!(union.columns, whole.columns, "{tower}: columns");
        assert_eq!(union.metadata, whole.metadata, "{tower}: metadata (model, checkpoint, …)");

        // Each part holds its shard's records (record k where k mod 4 = i) in input order.
        let mut rows = 0;
        for (i, part) in parts(&sharded).iter().enumerate() {
            let table = read_table(std::slice::from_ref(part));
            let mine: Vec<i64> = whole.ids_in_order.iter().skip(i).step_by(4).copied().collect();
            assert_eq!(table.ids_in_order, mine, "{tower}: part {i}");
            let entry = entry(&sharded, i);
            assert_eq!(entry["shard"], format!("{i}/4"));
            assert_eq!(entry["rows"], mine.len());
            assert_eq!(entry["first_id"], mine[0]);
            assert_eq!(entry["bytes"], std::fs::metadata(part).unwrap().len());
            assert_eq!(entry["sha256"], sha256(part));
            assert_eq!(entry["checkpoint_sha256"], sha256(&root.join("tiny.safetensors")));
            assert_eq!(entry["tower"], if tower == "img" { "image" } else { "text" });
            rows += mine.len();
        }
        assert_eq!(rows, whole.rows.len());
    }

    // manifest check: whole and complete, against the source as extraction read it.
    let (summary, _) = cnclip(root, &["manifest", "check", "sharded_img", "--image-data", "lmdb/valid/imgs"]);
    assert!(summary.contains(&format!("4 of 4 shards, {IMAGES} rows")), "{summary}");
    assert!(summary.contains(&format!("{IMAGES} source ids, {IMAGES} in the parts")), "{summary}");
    let (summary, _) = cnclip(root, &["manifest", "check", "sharded_txt", "--text-data", "data/valid_texts.jsonl"]);
    assert!(summary.contains("4 of 4 shards") && summary.contains("text features"), "{summary}");
    // The same images as TSV: the same ids.
    cnclip(root, &["manifest", "check", "sharded_img", "--image-data", "data/valid_imgs.tsv"]);

    // Readers take the directory as one table: SQL …
    let query = "SELECT id, feature FROM t ORDER BY id";
    let (from_dir, _) = cnclip(root, &["sql", query, "--table", "t=sharded_img", "--format", "jsonl"]);
    let (from_file, _) = cnclip(root, &["sql", query, "--table", "t=whole_img.parquet", "--format", "jsonl"]);
    assert_eq!(from_dir.lines().count(), IMAGES);
    assert!(from_dir == from_file, "sql over the directory differs from sql over the unsharded table");
    // … and kNN, for its queries and its gallery.
    cnclip(
        root,
        &[
            "make-topk-predictions",
            "--image-feats",
            "sharded_img",
            "--text-feats",
            "sharded_txt",
            "--top-k",
            "5",
            "--output",
            "from_dir.jsonl",
        ],
    );
    cnclip(
        root,
        &[
            "make-topk-predictions",
            "--image-feats",
            "whole_img.parquet",
            "--text-feats",
            "whole_txt.parquet",
            "--top-k",
            "5",
            "--output",
            "from_file.jsonl",
        ],
    );
    let sorted = |name: &str| {
        let mut lines: Vec<String> =
            std::fs::read_to_string(root.join(name)).unwrap().lines().map(str::to_string).collect();
        lines.sort();
        lines
    };
    let from_dir = sorted("from_dir.jsonl");
    assert!(!from_dir.is_empty());
    assert_eq!(from_dir, sorted("from_file.jsonl"), "kNN over the directories differs from kNN over the files");

    // The whole array resubmitted: a finished shard made from the same checkpoint, settings and
    // input keeps its part and entry (not rewritten); once its input file changes, it is
    // extracted again (the texts), while the unchanged input's part is still kept (the images).
    let state = |dir: &str, ext: &str| {
        let path = root.join(format!("{dir}/part-00001-of-00004.{ext}"));
        (std::fs::read(&path).unwrap(), std::fs::metadata(&path).unwrap().modified().unwrap())
    };
    let before: Vec<_> = [("sharded_img", "parquet"), ("sharded_img", "json"), ("sharded_txt", "parquet")]
        .iter()
        .map(|(d, e)| state(d, e))
        .collect();
    let resubmit = || {
        succeeds(extract(root, "sharded_img", Some("sharded_txt"), &["--resume", "tiny.safetensors", "--shard", "1/4"]))
    };
    let stderr = resubmit();
    assert_eq!(stderr.matches("shard 1/4 is done").count(), 2, "{stderr}");
    assert!(state("sharded_img", "parquet") == before[0] && state("sharded_img", "json") == before[1]);
    assert!(state("sharded_txt", "parquet") == before[2], "an unchanged shard was rewritten");
    let texts = std::fs::File::options().append(true).open(root.join("data/valid_texts.jsonl")).unwrap();
    texts.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5)).unwrap();
    drop(texts);
    let stderr = resubmit();
    assert_eq!(stderr.matches("shard 1/4 is done").count(), 1, "{stderr}");
    assert!(stderr.contains("text features") && state("sharded_img", "parquet") == before[0], "{stderr}");
    let (bytes, modified) = state("sharded_txt", "parquet");
    assert!(bytes == before[2].0 && modified != before[2].1, "the texts' part was not extracted again");
    cnclip(root, &["manifest", "check", "sharded_txt", "--text-data", "data/valid_texts.jsonl"]);
    // A part altered in place (same size, other bytes) is not vouched for: extracted again, to
    // the original bytes.
    let part = root.join("sharded_img/part-00001-of-00004.parquet");
    let mut altered = before[0].0.clone();
    let middle = altered.len() / 2;
    altered[middle] ^= 0xff;
    std::fs::write(&part, &altered).unwrap();
    let stderr = resubmit();
    assert_eq!(stderr.matches("shard 1/4 is done").count(), 1, "{stderr}");
    assert!(stderr.contains("image features"), "{stderr}");
    assert!(std::fs::read(&part).unwrap() == before[0].0, "the altered part was not extracted again");
}

/// The corpus with its valid images extracted by four shards at once into `ok_img`, which
/// `manifest check` passes: made once per test process (under cargo's directory for integration
/// tests' files) and shared by the scenarios below, each of which copies what it alters to a
/// directory of its own name, so one failing does not hide the others.
fn sharded() -> &'static Path {
    static FIXTURE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    FIXTURE.get_or_init(|| {
        let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
        // What earlier test processes left (a static is never dropped), unless one still runs.
        for entry in std::fs::read_dir(tmp).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("manifest-sharded-")
                && !Path::new("/proc").join(pid).exists()
            {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let root = tmp.join(format!("manifest-sharded-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        corpus_in(&root);
        extract_sharded(&root, "ok", false);
        cnclip(&root, &["manifest", "check", "ok_img", "--image-data", "lmdb/valid/imgs"]);
        root
    })
}

#[test]
fn manifest_check_names_missing_parts_and_every_reader_refuses_the_table_issue_13() {
    let root = sharded();
    let ok = root.join("ok_img");
    let check = |name: &str, extra: &[&str]| cnclip_fails(root, &[&["manifest", "check", name][..], extra].concat());
    let source: &[&str] = &["--image-data", "lmdb/valid/imgs"];

    // A part missing (its shard never ran), one of them unfinished.
    copy_dir(&ok, &root.join("missing"));
    for i in [1, 2] {
        std::fs::remove_file(root.join(format!("missing/part-{i:05}-of-00004.parquet"))).unwrap();
        std::fs::remove_file(root.join(format!("missing/part-{i:05}-of-00004.json"))).unwrap();
    }
    std::fs::create_dir(root.join("missing/.part-00002-of-00004.cnclip-parts")).unwrap();
    let stderr = check("missing", source);
    assert!(stderr.contains("shard 1/4 is missing: no part-00001-of-00004.parquet\n"), "{stderr}");
    assert!(stderr.contains("shard 2/4 is missing: no part-00002-of-00004.parquet (.part-00002-of-00004.cnclip-parts exists: the shard is still running"), "{stderr}");
    assert!(stderr.contains(&format!("{} ids of the source in no part", IMAGES / 2)), "{stderr}");
    assert!(stderr.contains("3 problems"), "{stderr}");
    // Every reader that takes the directory as one table refuses it rather than read half of it.
    let short = "a sharded table missing 2 of its 4 shards (part-00001-of-00004.parquet, part-00002-of-00004.parquet)";
    let readers: [&[&str]; 4] = [
        &["sql", "SELECT count(*) FROM t", "--table", "t=missing"],
        &["make-topk-predictions", "--image-feats", "missing", "--text-feats", "ok_img", "--output", "p.jsonl"],
        &["make-topk-predictions", "--image-feats", "ok_img", "--text-feats", "missing", "--output", "p.jsonl"],
        &["build-index", "--features", "missing", "--index", "IVF1,Flat", "--index-path", "idx"],
    ];
    for args in readers {
        let stderr = cnclip_fails(root, args);
        assert!(stderr.contains(short) && stderr.contains("manifest check"), "{args:?}: {stderr}");
    }
    assert!(!root.join("p.jsonl").exists() && !root.join("idx").exists());
}

#[test]
fn manifest_check_names_unpaired_parts_and_entries_and_stray_tables_issue_13() {
    let root = sharded();
    let ok = root.join("ok_img");
    let check = |name: &str, extra: &[&str]| cnclip_fails(root, &[&["manifest", "check", name][..], extra].concat());

    // A part without its entry, an entry without its part, a stray table.
    copy_dir(&ok, &root.join("unpaired"));
    std::fs::remove_file(root.join("unpaired/part-00000-of-00004.json")).unwrap();
    std::fs::remove_file(root.join("unpaired/part-00003-of-00004.parquet")).unwrap();
    std::fs::write(root.join("unpaired/notes.txt"), "ignored").unwrap();
    std::fs::copy(ok.join("part-00001-of-00004.parquet"), root.join("unpaired/extra.parquet")).unwrap();
    let stderr = check("unpaired", &[]);
    assert!(stderr.contains("part-00000-of-00004.parquet has no entry part-00000-of-00004.json"), "{stderr}");
    assert!(stderr.contains("part-00003-of-00004.json has no part part-00003-of-00004.parquet"), "{stderr}");
    assert!(stderr.contains("extra.parquet is not a shard part"), "{stderr}");
    assert!(!stderr.contains("notes.txt"), "{stderr}");
}

#[test]
fn manifest_check_names_a_part_copied_under_another_shards_name_issue_13() {
    let root = sharded();
    let ok = root.join("ok_img");
    let check = |name: &str, extra: &[&str]| cnclip_fails(root, &[&["manifest", "check", name][..], extra].concat());
    let source: &[&str] = &["--image-data", "lmdb/valid/imgs"];

    // A part (and its entry) copied under another shard's name.
    copy_dir(&ok, &root.join("duplicated"));
    for ext in ["parquet", "json"] {
        std::fs::copy(
            ok.join(format!("part-00001-of-00004.{ext}")),
            root.join(format!("duplicated/part-00003-of-00004.{ext}")),
        )
        .unwrap();
    }
    let stderr = check("duplicated", source);
    assert!(
        stderr.contains("part-00003-of-00004.json describes shard 1/4 (part-00001-of-00004.parquet), not 3/4"),
        "{stderr}"
    );
    assert!(stderr.contains("shard 1/4 has 2 entries: part-00001-of-00004.json, part-00003-of-00004.json"), "{stderr}");
    let per_shard = IMAGES / 4;
    assert!(
        stderr.contains(&format!(
            "{per_shard} ids are in both part-00001-of-00004.parquet and part-00003-of-00004.parquet"
        )),
        "{stderr}"
    );
    assert!(stderr.contains(&format!("{per_shard} ids of the source in no part")), "{stderr}");
    // Only the part copied, its entry left: the checksum says so.
    copy_dir(&ok, &root.join("swapped"));
    std::fs::copy(ok.join("part-00001-of-00004.parquet"), root.join("swapped/part-00002-of-00004.parquet")).unwrap();
    let stderr = check("swapped", &[]);
    // (The same size or not: either the size or the checksum differs from the entry's.)
    assert!(
        stderr.contains("part-00002-of-00004.parquet's sha256 is")
            || stderr.contains("part-00002-of-00004.parquet is "),
        "{stderr}"
    );
    assert!(stderr.contains("ids are in both part-00001-of-00004.parquet and part-00002-of-00004.parquet"), "{stderr}");
}

#[test]
fn manifest_check_names_a_truncated_part_issue_13() {
    let root = sharded();
    let ok = root.join("ok_img");
    let check = |name: &str, extra: &[&str]| cnclip_fails(root, &[&["manifest", "check", name][..], extra].concat());

    // A truncated part (an interrupted copy).
    copy_dir(&ok, &root.join("truncated"));
    let part = root.join("truncated/part-00000-of-00004.parquet");
    let bytes = std::fs::read(&part).unwrap();
    std::fs::write(&part, &bytes[..bytes.len() - 100]).unwrap();
    let stderr = check("truncated", &[]);
    let (cut, whole) = (bytes.len() - 100, bytes.len());
    assert!(
        stderr.contains(&format!(
            "part-00000-of-00004.parquet is {cut} bytes, its entry says {whole}: truncated or altered; rerun shard 0/4"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("part-00000-of-00004.parquet cannot be read as a feature table"), "{stderr}");
}

#[test]
fn manifest_check_names_source_ids_in_no_part_and_part_ids_not_in_the_source_issue_13() {
    let root = sharded();
    let check = |name: &str, extra: &[&str]| cnclip_fails(root, &[&["manifest", "check", name][..], extra].concat());

    // An id of the source in no part, or a part's id not in the source (TSV sources here).
    let tsv = std::fs::read_to_string(root.join("data/valid_imgs.tsv")).unwrap();
    let first = tsv.lines().next().unwrap();
    let first_id = first.split('\t').next().unwrap();
    std::fs::write(root.join("more.tsv"), format!("{tsv}987654321\t{}\n", first.split('\t').nth(1).unwrap())).unwrap();
    std::fs::write(root.join("fewer.tsv"), tsv.lines().skip(1).map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let stderr = check("ok_img", &["--image-data", "more.tsv"]);
    assert!(stderr.contains("1 id of the source in no part: 987654321"), "{stderr}");
    let stderr = check("ok_img", &["--image-data", "fewer.tsv"]);
    assert!(stderr.contains(&format!("1 id in the parts but not in the source: {first_id}")), "{stderr}");
    let stderr = check("ok_img", &["--text-data", "data/valid_texts.jsonl"]);
    assert!(stderr.contains("the parts hold image features, the source given is texts"), "{stderr}");
}

#[test]
fn a_shard_rerun_replaces_its_own_part_and_nothing_else_issue_13() {
    let root = sharded();
    let ok = root.join("ok_img");
    let check = |name: &str, extra: &[&str]| cnclip_fails(root, &[&["manifest", "check", name][..], extra].concat());
    let source: &[&str] = &["--image-data", "lmdb/valid/imgs"];

    // Shard 3 rerun with another checkpoint: it replaces its own part and entry, nothing else;
    // the check names the part made with the other checkpoint.
    copy_dir(&ok, &root.join("rerun_img"));
    let rerun = root.join("rerun_img");
    let state = |i: usize| {
        ["parquet", "json"].map(|ext| {
            let path = rerun.join(format!("part-{i:05}-of-00004.{ext}"));
            let meta = std::fs::metadata(&path).unwrap();
            (meta.modified().unwrap(), std::fs::read(&path).unwrap())
        })
    };
    let before: Vec<_> = (0..4).map(state).collect();
    std::thread::sleep(std::time::Duration::from_millis(20));
    succeeds(extract(root, "rerun_img", None, &["--resume", "other.safetensors", "--shard", "3/4"]));
    for (i, was) in before.iter().enumerate().take(3) {
        assert!(state(i) == *was, "the rerun of shard 3 touched part {i}");
    }
    assert!(state(3)[0].1 != before[3][0].1, "the rerun did not replace part 3");
    assert_eq!(entry(&rerun, 3)["checkpoint"], "other.safetensors");
    let stderr = check("rerun_img", source);
    assert!(stderr.contains("parts made with different checkpoints"), "{stderr}");
    let other = sha256(&root.join("other.safetensors"));
    assert!(stderr.contains(&format!("sha256 {other} (other.safetensors) in part-00003-of-00004.parquet")), "{stderr}");
    assert!(stderr.contains("1 problem"), "{stderr}");
    // Rerun with the right checkpoint: the same bytes as the first run's part, and whole again.
    succeeds(extract(root, "rerun_img", None, &["--resume", "tiny.safetensors", "--shard", "3/4"]));
    assert!(state(3)[0].1 == before[3][0].1, "a rerun with the same checkpoint made another part");
    for (i, was) in before.iter().enumerate().take(3) {
        assert!(state(i) == *was, "the second rerun of shard 3 touched part {i}");
    }
    cnclip(root, &["manifest", "check", "rerun_img", "--image-data", "lmdb/valid/imgs"]);
    assert_eq!(listing(&rerun).len(), 8, "{:?}", listing(&rerun));

    // What extraction refuses: another split in the same directory, JSON lines as a table.
    let mut mixed = extract(root, "rerun_img", None, &["--resume", "tiny.safetensors", "--shard", "0/2"]);
    let output = mixed.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("holds parts of another split"), "{stderr}");
    let mut jsonl = extract(root, "x.jsonl", None, &["--resume", "tiny.safetensors", "--shard", "0/2"]);
    let output = jsonl.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("not JSON lines"), "{stderr}");
    let mut same = extract(root, "same", Some("same"), &["--resume", "tiny.safetensors", "--shard", "0/2"]);
    let output = same.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("give them two directories"), "{stderr}");
}

#[test]
fn a_second_writer_of_one_output_fails_naming_the_first_which_is_unharmed() {
    let dir = corpus();
    let root = dir.path();
    let signal = |sig: &str, pid: u32| {
        assert!(Command::new("kill").args([sig, &pid.to_string()]).status().unwrap().success(), "kill {sig}");
    };
    // A shard submitted twice, and an unsharded output run twice at once.
    for (output, shard, lock) in [
        ("twice_img", Some("1/4"), "twice_img/.part-00001-of-00004.parquet.cnclip-lock"),
        ("twice.parquet", None, ".twice.parquet.cnclip-lock"),
    ] {
        let shard_args: Vec<&str> = shard.map(|s| vec!["--shard", s]).unwrap_or_default();
        let args = [&["--resume", "tiny.safetensors"][..], &shard_args].concat();
        let first = extract(root, output, None, &args).stderr(std::process::Stdio::piped()).spawn().unwrap();
        // Continued and killed if the test fails while it is stopped.
        let mut first = Stopped(Some(first));
        let pid = first.0.as_ref().unwrap().id();
        // Held still once it holds the claim (its pid is written after the lock is taken), so
        // the second surely meets it.
        let start = std::time::Instant::now();
        while !std::fs::read_to_string(root.join(lock)).is_ok_and(|holder| holder.starts_with("pid ")) {
            assert!(start.elapsed().as_secs() < 60, "{output}: no lock taken in 60 s");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        signal("-STOP", pid);
        let output_2 = extract(root, output, None, &args).output().unwrap();
        signal("-CONT", pid);
        let first = first.0.take().unwrap();
        let stderr = String::from_utf8_lossy(&output_2.stderr);
        assert_eq!(output_2.status.code(), Some(1), "{output}: the second writer: {stderr}");
        assert!(stderr.contains("another job is writing it"), "{stderr}");
        assert!(stderr.contains(&format!("pid {pid}")), "{output}: the holder is not named: {stderr}");
        let first = first.wait_with_output().unwrap();
        assert!(first.status.success(), "{output}: the first writer: {}", String::from_utf8_lossy(&first.stderr));
        assert!(!root.join(lock).exists(), "{output}: the lock file stays");
        let written = match shard {
            Some(_) => root.join("twice_img/part-00001-of-00004.parquet"),
            None => root.join("twice.parquet"),
        };
        let rows = read_table(&[written]).rows.len();
        assert_eq!(rows, if shard.is_some() { IMAGES / 4 } else { IMAGES }, "{output}");
    }
}

/// A child that may be stopped (SIGSTOP): continued and killed on drop, unless taken.
struct Stopped(Option<std::process::Child>);

impl Drop for Stopped {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = Command::new("kill").args(["-CONT", &child.id().to_string()]).status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Issue #24 item 2: `write_parts` is one sink, so a pipeline run by `cnclip run p.toml --shard
/// i/n` writes the same shard layout as `extract-features --shard`: two shards of a TOML
/// pipeline make a directory `manifest check` accepts, with every id once; a rerun of a shard
/// replaces its own part; without `--shard` the same node joins its parts into one file.
#[test]
fn a_toml_pipeline_with_write_parts_run_as_two_shards_passes_manifest_check() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let lines: String = (0..11).map(|id| format!("{{\"image_id\": {id}, \"feature\": [{id}.0, 0.5]}}\n")).collect();
    std::fs::write(root.join("features.jsonl"), lines).unwrap();
    let pipeline = |path: &str| {
        format!(
            "[job]\nquarantine = \"quarantine.jsonl\"\n\n[nodes.features]\nkind = \"feature_jsonl\"\n\
             paths = [\"features.jsonl\"]\nid_key = \"image_id\"\n\n[nodes.out]\nkind = \"write_parts\"\n\
             input = \"features\"\npath = \"{path}\"\ntower = \"image\"\npart_rows = 2\n"
        )
    };
    std::fs::write(root.join("p.toml"), pipeline("parts")).unwrap();
    for shard in ["0/2", "1/2"] {
        cnclip(root, &["run", "p.toml", "--shard", shard]);
    }
    // The parts and their entries; no work directory left (the writers' lock files may stay).
    let finished: Vec<String> =
        listing(&root.join("parts")).into_iter().filter(|name| !name.ends_with(".cnclip-lock")).collect();
    assert_eq!(
        finished,
        [
            "part-00000-of-00002.json",
            "part-00000-of-00002.parquet",
            "part-00001-of-00002.json",
            "part-00001-of-00002.parquet"
        ]
    );
    let (summary, _) = cnclip(root, &["manifest", "check", "parts"]);
    assert!(summary.contains("2 of 2 shards, 11 rows (ids 0–10), image features"), "{summary}");
    let entry: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("parts/part-00001-of-00002.json")).unwrap()).unwrap();
    assert_eq!((entry["rows"].as_u64(), entry["first_id"].as_i64()), (Some(5), Some(1)), "{entry}");

    // A rerun of one shard replaces its own part, and the whole still checks.
    let before = std::fs::read(root.join("parts/part-00000-of-00002.parquet")).unwrap();
    cnclip(root, &["run", "p.toml", "--shard", "0/2"]);
    assert_eq!(std::fs::read(root.join("parts/part-00000-of-00002.parquet")).unwrap(), before);
    cnclip(root, &["manifest", "check", "parts"]);

    // Unsharded, the parts are joined into one file: cn_clip's lines for `.jsonl`.
    std::fs::write(root.join("one.toml"), pipeline("one.jsonl")).unwrap();
    cnclip(root, &["run", "one.toml"]);
    let joined = std::fs::read_to_string(root.join("one.jsonl")).unwrap();
    assert_eq!(joined.lines().count(), 11, "{joined}");
    assert!(joined.starts_with("{\"image_id\": 0, \"feature\": [0.0, 0.5]}\n"), "{joined}");
    assert!(!root.join("one.jsonl.cnclip-parts").exists());
}
