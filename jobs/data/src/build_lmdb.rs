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
//! - an image id written with leading zeros or a sign (`0007`, `+8`) is stored under its number
//!   (`7`, `8`), the key cn_clip's `LMDBDataset` looks up for the pairs' integer ids, as
//!   `export --format lmdb` and the `write_lmdb` node store it (cn_clip stores the text as
//!   written, under which its own reader then finds no image).

use rustc_hash::FxHashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use cnclip_operators::quarantine::{OnError, Quarantine, Rejected};
use cnclip_operators::signals;
use cnclip_operators::sinks::Staged;
use cnclip_operators::sinks::lmdb::{LmdbWriter, LmdbWriterKind, cn_clip_base64, pickle_pair, writer_memory};
use cnclip_operators::sources::{jsonl, tsv};
use cnclip_operators::storage;
use cnclip_pipeline::Progress;

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

struct Shard {
    imgs: LmdbWriter,
    pairs: LmdbWriter,
    num_images: u64,
    num_samples: u64,
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
    let tmp_dir = storage::staging::temp_path(&lmdb_dir.join(split));
    let _ = storage::remove_dir_all(&tmp_dir);
    // Declared before the writers, so a failure drops them (joining their threads) first and
    // then removes the half-built directory.
    let staged = Staged::new(tmp_dir.clone(), final_dir.clone());
    let shard_dir = |i: usize| if args.shards == 1 { tmp_dir.clone() } else { tmp_dir.join(format!("shard_{i:03}")) };
    // Every shard's two writers are open at once: they share a memory budget.
    let memory = writer_memory(args.shards);
    let mut shards = (0..args.shards)
        .map(|i| {
            Ok(Shard {
                imgs: LmdbWriter::create(&shard_dir(i).join("imgs"), args.writer)?.with_memory(memory),
                pairs: LmdbWriter::create(&shard_dir(i).join("pairs"), args.writer)?.with_memory(memory),
                num_images: 0,
                num_samples: 0,
            })
        })
        .collect::<Result<Vec<_>, cnclip_operators::Error>>()?;
    // Rows are the lines read, images then texts (a log gets a line every --progress-interval).
    let progress = Arc::new(Progress::new("cnclip", None));
    let quarantine = Quarantine::new(args.on_error, tmp_dir.join("quarantine.jsonl")).reporting_to(progress.clone());
    let shard_of = |image_id: i64| image_id.rem_euclid(args.shards as i64) as usize;

    // Images first: pairs must point at images that exist.
    let mut image_ids = FxHashSet::default();
    let next_record = || {
        progress.add(1);
        match signals::interrupted() {
            Some(signal) => Err(cnclip_operators::Error::Interrupted { signal }),
            None => Ok(()),
        }
    };
    tsv::for_each_line(&images_path, args.max_record_bytes, |record| {
        next_record()?;
        match record {
            Err(rejected) => quarantine.reject(rejected),
            Ok(line) if !image_ids.insert(line.image_id) => quarantine.reject(Rejected {
                source: images_path.display().to_string(),
                location: format!("image {}", line.id),
                id: Some(line.id.to_string()),
                reason: "duplicate image id (the first one is kept)".into(),
            }),
            Ok(line) => {
                progress.add_bytes(line.base64.len() as u64);
                let shard = &mut shards[shard_of(line.image_id)];
                // Keyed by the number, as the pairs refer to it (`0007` is stored as `7`).
                shard.imgs.put(line.image_id.to_string().as_bytes(), &cn_clip_base64(line.base64))?;
                shard.num_images += 1;
                Ok(())
            }
        }
    })?;

    let mut text_ids = FxHashSet::default();
    jsonl::for_each_line(&texts_path, args.max_record_bytes, |record| {
        next_record()?;
        let text = match record {
            Err(rejected) => return quarantine.reject(rejected),
            Ok(text) => text,
        };
        progress.add_bytes(text.text.len() as u64);
        let location = format!("text {}", text.text_id);
        if !text_ids.insert(text.text_id) {
            return quarantine.reject(Rejected {
                source: texts_path.display().to_string(),
                location,
                id: Some(text.text_id.to_string()),
                reason: "duplicate text id (the first one is kept)".into(),
            });
        }
        for image_id in &text.image_ids {
            if !image_ids.contains(image_id) {
                quarantine.reject(Rejected {
                    source: texts_path.display().to_string(),
                    location: location.clone(),
                    id: Some(text.text_id.to_string()),
                    reason: format!("image {image_id} is not in {}", images_path.display()),
                })?;
                continue;
            }
            let shard = &mut shards[shard_of(*image_id)];
            shard
                .pairs
                .put(shard.num_samples.to_string().as_bytes(), &pickle_pair(*image_id, text.text_id, &text.text))?;
            shard.num_samples += 1;
        }
        Ok(())
    })?;

    let (mut images, mut samples) = (0, 0);
    for mut shard in shards {
        shard.imgs.put(b"num_images", shard.num_images.to_string().as_bytes())?;
        shard.pairs.put(b"num_samples", shard.num_samples.to_string().as_bytes())?;
        shard.imgs.finish()?;
        shard.pairs.finish()?;
        images += shard.num_images;
        samples += shard.num_samples;
    }
    progress.finish();
    let quarantined = quarantine.count();
    quarantine.finish()?;
    staged.commit().with_context(|| format!("moving {} into place", final_dir.display()))?;
    eprintln!(
        "cnclip build-lmdb: {split}: {images} images, {samples} pairs, {quarantined} quarantined{} → {} ({:.1} s)",
        if quarantined > 0 { format!(" (see {}/quarantine.jsonl)", final_dir.display()) } else { String::new() },
        final_dir.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
