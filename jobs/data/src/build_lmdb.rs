//! `cnclip build-lmdb`: a drop-in for cn_clip's `preprocess/build_lmdb_dataset.py`.
//!
//! Same layout and values — `{lmdb_dir}/{split}/imgs` (image id → base64 text, `num_images`)
//! and `{split}/pairs` (`0`, `1`, … → pickled `(image_id, text_id, text)`, `num_samples`) — so
//! cn_clip's `LMDBDataset` and `EvalImgDataset` read the result. Differences, all deliberate:
//! - bad lines (no tab, non-integer or duplicate ids, empty or non-base64 values, malformed
//!   JSON, missing fields) are quarantined to `{split}/quarantine.jsonl` (or stop the job with
//!   `--on-error fail`) instead of crashing halfway or being silently overwritten;
//! - base64 missing its `=` padding is stored padded, as cn_clip's readers need it (cn_clip
//!   stores it as it is, and its `EvalImgDataset` then fails with "Incorrect padding");
//! - the map size recorded is about twice the file instead of a fixed 1 TiB (cn_clip #281), and
//!   the databases are written by a bulk loader (`cnclip_operators::sinks::lmdb_bulk`), not LMDB
//!   transactions: several times faster, same contents, and each file is walked back and checked
//!   before the job succeeds (`--writer txn` writes through LMDB's transactions instead);
//! - each split is built in a temporary directory and renamed into place, so a failed run
//!   leaves the previous database untouched (cn_clip writes into the existing one);
//! - `--shards N` splits a split into `shard_000 … shard_{N-1}` by `image_id mod N`, each
//!   self-contained (a pair lives with its image) and readable by cn_clip on its own (#46);
//! - an image id written with leading zeros or a sign (`007`, `+7`) is stored under its number
//!   (`7`), the key cn_clip's `LMDBDataset` looks up for the pairs' integer ids (cn_clip stores
//!   the text as written, under which its own reader does not find the image).
//!
//! It runs as two pipelines per split (sources → `require_images` → `write_lmdb`; see
//! `build_split`), the same nodes `cnclip run` and `export --format lmdb` use.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use cnclip_operators::quarantine::OnError;
use cnclip_operators::signals;
use cnclip_operators::sinks::Staged;
use cnclip_operators::sinks::lmdb::{LmdbWriterKind, WriteLmdbConfig};
use cnclip_operators::sources::jsonl::JsonlConfig;
use cnclip_operators::sources::lmdb::Database;
use cnclip_operators::sources::tsv::TsvConfig;
use cnclip_operators::spec::{JobSettings, NodeDef, Planner, Registry};
use cnclip_operators::storage;
use cnclip_operators::transforms::require_images::RequireImagesConfig;

#[derive(clap::Args, Debug, Clone, PartialEq, serde::Serialize)]
pub struct Args {
    /// Directory with `{split}_imgs.tsv` and `{split}_texts.jsonl` (cn_clip's --data_dir).
    #[arg(long, alias = "data_dir")]
    pub data_dir: PathBuf,
    /// Comma-separated splits, e.g. train,valid,test.
    #[arg(long)]
    pub splits: String,
    /// Output directory (default: DATA_DIR/lmdb), as cn_clip's --lmdb_dir.
    #[arg(long, alias = "lmdb_dir")]
    pub lmdb_dir: Option<PathBuf>,
    /// Split each split into N LMDBs by image_id mod N.
    #[arg(long, default_value_t = 1)]
    pub shards: usize,
    /// What to do with a bad record: skip it into the quarantine, or fail.
    #[arg(long, value_enum, default_value_t = OnError::Skip)]
    pub on_error: OnError,
    /// How the databases are written: the bulk loader, or LMDB's own write transactions.
    #[arg(long, value_enum, default_value_t = LmdbWriterKind::Bulk)]
    pub writer: LmdbWriterKind,
    /// Lines longer than this many bytes are quarantined without being read whole.
    #[arg(long, default_value_t = cnclip_operators::sources::MAX_RECORD_BYTES)]
    pub max_record_bytes: usize,
}

impl Args {
    /// The options of `build-lmdb --data-dir DATA_DIR --splits SPLITS` (each other flag's default).
    pub fn new(data_dir: PathBuf, splits: String) -> Self {
        Args {
            data_dir,
            splits,
            lmdb_dir: None,
            shards: 1,
            on_error: OnError::Skip,
            writer: LmdbWriterKind::Bulk,
            max_record_bytes: cnclip_operators::sources::MAX_RECORD_BYTES,
        }
    }
}

pub fn run(args: Args) -> Result<()> {
    signals::catch_interrupts()?;
    if !args.data_dir.is_dir() {
        bail!("--data-dir {} is not a directory", args.data_dir.display());
    }
    if args.shards == 0 {
        bail!("--shards must be at least 1");
    }
    let lmdb_dir = args.lmdb_dir.clone().unwrap_or_else(|| args.data_dir.join("lmdb"));
    let splits = crate::import::splits(&args.splits)?;
    // Every split's files are checked before any is written.
    let mut missing = Vec::new();
    for split in &splits {
        for file in [format!("{split}_imgs.tsv"), format!("{split}_texts.jsonl")] {
            let path = args.data_dir.join(&file);
            match storage::metadata(&path) {
                Ok(meta) if meta.is_file() => {}
                Ok(meta) => missing.push(format!(
                    "split `{split}`: {} is {}, not a regular file",
                    path.display(),
                    cnclip_operators::sources::parts::kind_of(&meta)
                )),
                Err(_) => missing.push(format!("split `{split}`: {} does not exist", path.display())),
            }
        }
    }
    if !missing.is_empty() {
        return Err(cnclip_operators::Problems(missing).into());
    }
    for split in splits {
        build_split(&args, &lmdb_dir, split)?;
    }
    Ok(())
}

/// One split through two pipelines in turn: the images (`tsv`, repeated ids quarantined) into
/// `imgs`, then the texts (`jsonl`) through `require_images` (repeated text ids and missing
/// images quarantined, one check per text in file order) into `pairs`, both split by
/// `--shards`. The split is built in a temporary directory, quarantine included, and moved into
/// place when both have succeeded. The quarantine lists the images' records, then the texts'
/// unreadable lines, then their repeated ids and missing images, each in file order.
fn build_split(args: &Args, lmdb_dir: &Path, split: &str) -> Result<()> {
    let start = Instant::now();
    let images_path = args.data_dir.join(format!("{split}_imgs.tsv"));
    let texts_path = args.data_dir.join(format!("{split}_texts.jsonl"));
    for path in [&images_path, &texts_path] {
        if !path.is_file() {
            bail!("split `{split}`: {} does not exist or is not a regular file", path.display());
        }
    }
    let final_dir = lmdb_dir.join(split);
    let tmp_dir = storage::staging::temp_path(&final_dir);
    let _ = storage::remove_dir_all(&tmp_dir);
    storage::create_dir_all(&tmp_dir).with_context(|| format!("creating {}", tmp_dir.display()))?;
    // Removes the half-built split if anything fails.
    let staged = Staged::new(tmp_dir.clone(), final_dir.clone());
    let (images, texts) = (images_path.display().to_string(), texts_path.display().to_string());
    let database = |database, name: &str| WriteLmdbConfig {
        path: tmp_dir.join(name),
        database,
        writer: args.writer,
        shards: args.shards,
    };
    let max_record_bytes = args.max_record_bytes;
    // The images, then the texts: the first bad line is the images' under --on-error fail, as
    // the texts need every image id.
    let steps = [
        vec![
            NodeDef::new("images", None, TsvConfig { paths: vec![images.clone()], dedupe: true, max_record_bytes }),
            NodeDef::new("imgs", Some("images"), database(Database::Imgs, "imgs")),
        ],
        vec![
            NodeDef::new("texts", None, JsonlConfig { paths: vec![texts], dedupe: false, max_record_bytes }),
            NodeDef::new(
                "with_images",
                Some("texts"),
                RequireImagesConfig { images: vec![images], max_record_bytes, dedupe: true },
            ),
            NodeDef::new("pairs", Some("with_images"), database(Database::Pairs, "pairs")),
        ],
    ];
    let (mut images, mut samples, mut quarantined) = (0, 0, 0);
    let registry = Registry::builtin();
    for (step, defs) in steps.into_iter().enumerate() {
        let settings = JobSettings {
            on_error: args.on_error,
            quarantine: tmp_dir.join("quarantine.jsonl"),
            quarantine_append: step > 0,
            ..JobSettings::default()
        };
        let report = Planner::new(&registry).plan(settings, defs)?.run()?;
        let rows =
            |sink: &str| report.written.iter().filter(|(name, _)| name == sink).map(|(_, w)| w.rows).sum::<u64>();
        (images, samples, quarantined) =
            (images + rows("imgs"), samples + rows("pairs"), quarantined + report.quarantined);
    }
    staged.commit().with_context(|| format!("moving {} into place", final_dir.display()))?;
    eprintln!(
        "cnclip build-lmdb: {split}: {images} images, {samples} pairs, {quarantined} quarantined{} → {} ({:.1} s)",
        if quarantined > 0 { format!(" (see {}/quarantine.jsonl)", final_dir.display()) } else { String::new() },
        final_dir.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
