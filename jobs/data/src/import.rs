//! `cnclip import` and `cnclip export`: corpora between cn_clip's files and Parquet tables that
//! notebooks and `cnclip` SQL can query. Both are fixed pipelines (`cnclip_operators::spec`),
//! built from the built-in kinds' typed configs:
//!
//! - import from TSV + JSONL (`--data-dir`): `{split}_imgs.tsv` → `{split}_images.parquet`
//!   (`images`: id + decoded image bytes), `{split}_texts.jsonl` → `{split}_texts.parquet`;
//! - import from LMDB (`--lmdb-dir`, cn_clip's `{split}/imgs` + `{split}/pairs`):
//!   → `{split}_images.parquet` and `{split}_pairs.parquet`;
//! - export (`--format tsv`): `{split}_images.parquet` → `{split}_imgs.tsv` (URL-safe base64,
//!   as cn_clip makes them), `{split}_texts.parquet` → `{split}_texts.jsonl`;
//! - export (`--format lmdb`): → `{split}/imgs` and `{split}/pairs` (from the texts table, or
//!   the pairs table when there is no texts table), as `build_lmdb_dataset.py` lays them out.
//!
//! Export quarantines repeated image and text ids (the first is kept) and, for LMDB, pairs
//! whose image is not in the images table, as `build-lmdb` does: cn_clip's datasets read every
//! record it writes. Bad records go to `{split}_quarantine.jsonl` (or stop the job with
//! `--on-error fail`).

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use cnclip_operators::quarantine::OnError;
use cnclip_operators::sinks::jsonl::WriteJsonlConfig;
use cnclip_operators::sinks::lmdb::LmdbWriterKind;
use cnclip_operators::sinks::lmdb::WriteLmdbConfig;
use cnclip_operators::sinks::parquet::WriteParquetConfig;
use cnclip_operators::sinks::tsv::WriteTsvConfig;
use cnclip_operators::sources::Shard;
use cnclip_operators::sources::jsonl::JsonlConfig;
use cnclip_operators::sources::lmdb::Database;
use cnclip_operators::sources::lmdb::LmdbConfig;
use cnclip_operators::sources::parquet::ParquetConfig;
use cnclip_operators::sources::tsv::TsvConfig;
use cnclip_operators::spec::{JobSettings, NodeDef, Pipeline};
use cnclip_operators::transforms::base64::DecodeBase64Config;
use cnclip_operators::transforms::require_images::RequireImagesConfig;

#[derive(clap::Args)]
pub struct ImportArgs {
    /// Directory with `{split}_imgs.tsv` and `{split}_texts.jsonl`.
    #[arg(long, conflicts_with = "lmdb_dir", required_unless_present = "lmdb_dir")]
    data_dir: Option<PathBuf>,
    /// Directory with cn_clip LMDB splits (`{split}/imgs`, `{split}/pairs`), or an object store prefix
    /// holding them (`s3://bucket/lmdb`).
    #[arg(long)]
    lmdb_dir: Option<PathBuf>,
    /// Comma-separated splits to import, e.g. train,valid,test.
    #[arg(long)]
    splits: String,
    /// Output directory for the Parquet tables.
    #[arg(long)]
    out: PathBuf,
    /// What to do with a bad record: skip it into `{split}_quarantine.jsonl`, or fail.
    #[arg(long, value_enum, default_value_t = OnError::Skip)]
    on_error: OnError,
    /// This job's share `i/n` of every source.
    #[arg(long, default_value_t = Shard::ALL)]
    shard: Shard,
    /// Lines longer than this many bytes are quarantined without being read whole.
    #[arg(long, default_value_t = cnclip_operators::sources::MAX_RECORD_BYTES)]
    max_record_bytes: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum, Debug, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// `{split}_imgs.tsv` + `{split}_texts.jsonl`.
    Tsv,
    /// `{split}/imgs` + `{split}/pairs` LMDBs.
    Lmdb,
}

#[derive(clap::Args, Debug, Clone, PartialEq, serde::Serialize)]
pub struct ExportArgs {
    /// Directory with `{split}_images.parquet` and `{split}_texts.parquet` (or `_pairs`).
    #[arg(long)]
    pub parquet_dir: PathBuf,
    /// Comma-separated splits to export, e.g. train,valid,test.
    #[arg(long)]
    pub splits: String,
    /// Output directory for the cn_clip files (`{split}_imgs.tsv`, … or `{split}/imgs`, …).
    #[arg(long)]
    pub out: PathBuf,
    /// The layout to write: cn_clip's TSV + JSONL files, or its LMDB splits.
    #[arg(long, value_enum, default_value_t = Format::Tsv)]
    pub format: Format,
    /// How `--format lmdb` writes: the bulk loader, or LMDB's own transactions.
    #[arg(long, value_enum, default_value_t = LmdbWriterKind::Bulk)]
    pub writer: LmdbWriterKind,
    /// What to do with a bad record: skip it into `{split}_quarantine.jsonl`, or fail.
    #[arg(long, value_enum, default_value_t = OnError::Skip)]
    pub on_error: OnError,
}

fn paths(p: &Path) -> Vec<String> {
    vec![p.to_string_lossy().into_owned()]
}

/// The names in `--splits`, in order, each once.
///
/// # Errors
/// When it names none.
pub fn splits(list: &str) -> Result<Vec<&str>> {
    let mut splits: Vec<&str> = Vec::new();
    for split in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if !splits.contains(&split) {
            splits.push(split);
        }
    }
    if splits.is_empty() {
        bail!("--splits names no split (e.g. --splits train,valid)");
    }
    Ok(splits)
}

/// Validates every split's pipeline before running any, so a bad split (a missing file, a
/// wrong table) stops the job before anything is written; then runs them in order.
fn run_splits(what: &str, splits: Vec<(&str, JobSettings, Vec<NodeDef>)>) -> Result<()> {
    let mut planned = Vec::new();
    let mut problems = Vec::new();
    for (split, settings, defs) in splits {
        match Pipeline::plan(settings, defs, Path::new("")) {
            Ok(pipeline) => planned.push((split, pipeline)),
            Err(found) => problems.extend(found.into_iter().map(|p| format!("split `{split}`: {p}"))),
        }
    }
    if !problems.is_empty() {
        return Err(cnclip_operators::Problems(problems).into());
    }
    cnclip_operators::signals::catch_interrupts()?;
    for (split, pipeline) in planned {
        run_split(what, split, pipeline)?;
    }
    Ok(())
}

fn run_split(what: &str, split: &str, pipeline: Pipeline) -> Result<()> {
    let start = std::time::Instant::now();
    let report = pipeline.run()?;
    // Sinks are named after what they hold: "30 images, 30 texts".
    let mut written = report.written.clone();
    written.sort_by_key(|(name, _)| ["images", "texts", "pairs"].iter().position(|n| n == name));
    let counts: Vec<String> = written.iter().map(|(name, w)| format!("{} {name}", w.rows)).collect();
    let outputs: Vec<String> = written.iter().map(|(_, w)| w.path.display().to_string()).collect();
    eprintln!(
        "cnclip {what}: {split}: {}, {} quarantined{} → {} ({:.1} s)",
        counts.join(", "),
        report.quarantined,
        report.quarantine_file.map(|p| format!(" (see {})", p.display())).unwrap_or_default(),
        outputs.join(", "),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

pub fn import(args: ImportArgs) -> Result<()> {
    let mut plans = Vec::new();
    for split in splits(&args.splits)? {
        let settings = JobSettings {
            on_error: args.on_error,
            quarantine: args.out.join(format!("{split}_quarantine.jsonl")),
            shard: args.shard.to_string(),
            ..JobSettings::default()
        };
        let images_out = args.out.join(format!("{split}_images.parquet"));
        let defs = match (&args.data_dir, &args.lmdb_dir) {
            (Some(dir), _) => vec![
                NodeDef::new(
                    "imgs_in",
                    None,
                    TsvConfig {
                        paths: paths(&dir.join(format!("{split}_imgs.tsv"))),
                        table: Default::default(),
                        dedupe: true,
                        max_record_bytes: args.max_record_bytes,
                    },
                ),
                NodeDef::new("decode", Some("imgs_in"), DecodeBase64Config {}),
                NodeDef::new("images", Some("decode"), WriteParquetConfig { path: images_out }),
                NodeDef::new(
                    "texts_in",
                    None,
                    JsonlConfig {
                        paths: paths(&dir.join(format!("{split}_texts.jsonl"))),
                        dedupe: true,
                        max_record_bytes: args.max_record_bytes,
                    },
                ),
                NodeDef::new(
                    "texts",
                    Some("texts_in"),
                    WriteParquetConfig { path: args.out.join(format!("{split}_texts.parquet")) },
                ),
            ],
            (None, Some(dir)) => {
                let lmdb = |database| LmdbConfig { path: dir.join(split), database };
                vec![
                    NodeDef::new("imgs_in", None, lmdb(Database::Imgs)),
                    NodeDef::new("decode", Some("imgs_in"), DecodeBase64Config {}),
                    NodeDef::new("images", Some("decode"), WriteParquetConfig { path: images_out }),
                    NodeDef::new("pairs_in", None, lmdb(Database::Pairs)),
                    NodeDef::new(
                        "pairs",
                        Some("pairs_in"),
                        WriteParquetConfig { path: args.out.join(format!("{split}_pairs.parquet")) },
                    ),
                ]
            }
            (None, None) => bail!("give --data-dir (TSV + JSONL) or --lmdb-dir"),
        };
        plans.push((split, settings, defs));
    }
    run_splits("import", plans)
}

pub fn export(args: ExportArgs) -> Result<()> {
    let mut plans = Vec::new();
    for split in splits(&args.splits)? {
        let settings = JobSettings {
            on_error: args.on_error,
            quarantine: args.out.join(format!("{split}_quarantine.jsonl")),
            ..JobSettings::default()
        };
        let parquet = |table: &str| args.parquet_dir.join(format!("{split}_{table}.parquet"));
        // Repeated image and text ids are quarantined (the first is kept), as build-lmdb does.
        let source = |table: &str| ParquetConfig::new(paths(&parquet(table)), Some(table.into()), table != "pairs");
        let texts_table = if parquet("texts").exists() || !parquet("pairs").exists() { "texts" } else { "pairs" };
        let texts_in = format!("{texts_table}_in");
        let mut defs =
            vec![NodeDef::new("images_in", None, source("images")), NodeDef::new(&texts_in, None, source(texts_table))];
        match args.format {
            Format::Tsv => {
                if texts_table == "pairs" {
                    bail!(
                        "split `{split}`: {} does not exist (TSV export writes texts, not pairs)",
                        parquet("texts").display()
                    );
                }
                defs.push(NodeDef::new(
                    "images",
                    Some("images_in"),
                    WriteTsvConfig { path: args.out.join(format!("{split}_imgs.tsv")) },
                ));
                defs.push(NodeDef::new(
                    "texts",
                    Some(&texts_in),
                    WriteJsonlConfig {
                        path: args.out.join(format!("{split}_texts.jsonl")),
                        rename: Default::default(),
                    },
                ));
            }
            Format::Lmdb => {
                let lmdb = |database, db: &str| WriteLmdbConfig {
                    path: args.out.join(split).join(db),
                    database,
                    writer: args.writer,
                    shards: 1,
                };
                defs.push(NodeDef::new("images", Some("images_in"), lmdb(Database::Imgs, "imgs")));
                // A pair whose image is missing would fail cn_clip's LMDBDataset: quarantined.
                defs.push(NodeDef::new(
                    "with_images",
                    Some(&texts_in),
                    RequireImagesConfig { images: paths(&parquet("images")), ..Default::default() },
                ));
                defs.push(NodeDef::new("pairs", Some("with_images"), lmdb(Database::Pairs, "pairs")));
            }
        }
        plans.push((split, settings, defs));
    }
    run_splits("export", plans)
}
