//! `cnclip import` and `cnclip export`: corpora between cn_clip's files and Parquet tables that
//! notebooks and `cnclip` SQL can query. Both are pipelines (`cnclip_operators::spec`):
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
//! Bad records go to `{split}_quarantine.jsonl` (or stop the job with `--on-error fail`).

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use cnclip_operators::quarantine::OnError;
use cnclip_operators::spec::{JobSettings, NodeDef, Pipeline};

#[derive(clap::Args)]
pub struct ImportArgs {
    /// Directory with `{split}_imgs.tsv` and `{split}_texts.jsonl`.
    #[arg(long, conflicts_with = "lmdb_dir", required_unless_present = "lmdb_dir")]
    data_dir: Option<PathBuf>,
    /// Directory with cn_clip LMDB splits (`{split}/imgs`, `{split}/pairs`).
    #[arg(long)]
    lmdb_dir: Option<PathBuf>,
    #[arg(long)]
    splits: String,
    /// Output directory for the Parquet tables.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value_t = OnError::Skip)]
    on_error: OnError,
    /// This job's share `i/n` of every source.
    #[arg(long, default_value = "0/1")]
    shard: String,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// `{split}_imgs.tsv` + `{split}_texts.jsonl`.
    Tsv,
    /// `{split}/imgs` + `{split}/pairs` LMDBs.
    Lmdb,
}

#[derive(clap::Args)]
pub struct ExportArgs {
    /// Directory with `{split}_images.parquet` and `{split}_texts.parquet` (or `_pairs`).
    #[arg(long)]
    parquet_dir: PathBuf,
    #[arg(long)]
    splits: String,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value_t = Format::Tsv)]
    format: Format,
    #[arg(long, value_enum, default_value_t = OnError::Skip)]
    on_error: OnError,
}

/// A node's settings as a TOML table.
fn table(entries: &[(&str, toml::Value)]) -> toml::Table {
    entries.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

fn path(p: &Path) -> toml::Value {
    toml::Value::String(p.to_string_lossy().into_owned())
}

fn paths(p: &Path) -> toml::Value {
    toml::Value::Array(vec![path(p)])
}

fn splits(list: &str) -> Vec<&str> {
    let mut splits: Vec<&str> = list.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    splits.dedup();
    splits
}

fn run_split(what: &str, split: &str, settings: JobSettings, defs: Vec<NodeDef>) -> Result<()> {
    let pipeline = match Pipeline::plan(settings, defs, Path::new("")) {
        Ok(p) => p,
        Err(problems) => bail!("split `{split}`: {}", problems.join("; ")),
    };
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
    for split in splits(&args.splits) {
        let settings = JobSettings {
            on_error: args.on_error,
            quarantine: args.out.join(format!("{split}_quarantine.jsonl")),
            shard: args.shard.clone(),
            ..JobSettings::default()
        };
        let images_out = args.out.join(format!("{split}_images.parquet"));
        let defs = match (&args.data_dir, &args.lmdb_dir) {
            (Some(dir), _) => vec![
                NodeDef::new(
                    "imgs_in",
                    "tsv",
                    None,
                    table(&[("paths", paths(&dir.join(format!("{split}_imgs.tsv"))))]),
                ),
                NodeDef::new("decode", "decode_base64", Some("imgs_in"), table(&[])),
                NodeDef::new("images", "write_parquet", Some("decode"), table(&[("path", path(&images_out))])),
                NodeDef::new(
                    "texts_in",
                    "jsonl",
                    None,
                    table(&[("paths", paths(&dir.join(format!("{split}_texts.jsonl"))))]),
                ),
                NodeDef::new(
                    "texts",
                    "write_parquet",
                    Some("texts_in"),
                    table(&[("path", path(&args.out.join(format!("{split}_texts.parquet"))))]),
                ),
            ],
            (None, Some(dir)) => {
                let split_dir = dir.join(split);
                let lmdb =
                    |db: &str| table(&[("path", path(&split_dir)), ("database", toml::Value::String(db.into()))]);
                vec![
                    NodeDef::new("imgs_in", "lmdb", None, lmdb("imgs")),
                    NodeDef::new("decode", "decode_base64", Some("imgs_in"), table(&[])),
                    NodeDef::new("images", "write_parquet", Some("decode"), table(&[("path", path(&images_out))])),
                    NodeDef::new("pairs_in", "lmdb", None, lmdb("pairs")),
                    NodeDef::new(
                        "pairs",
                        "write_parquet",
                        Some("pairs_in"),
                        table(&[("path", path(&args.out.join(format!("{split}_pairs.parquet"))))]),
                    ),
                ]
            }
            (None, None) => bail!("give --data-dir (TSV + JSONL) or --lmdb-dir"),
        };
        run_split("import", split, settings, defs)?;
    }
    Ok(())
}

pub fn export(args: ExportArgs) -> Result<()> {
    for split in splits(&args.splits) {
        let settings = JobSettings {
            on_error: args.on_error,
            quarantine: args.out.join(format!("{split}_quarantine.jsonl")),
            ..JobSettings::default()
        };
        let parquet = |table: &str| args.parquet_dir.join(format!("{split}_{table}.parquet"));
        let source = |table: &str| table_source(&parquet(table), table);
        let texts_table = if parquet("texts").exists() || !parquet("pairs").exists() { "texts" } else { "pairs" };
        let texts_in = format!("{texts_table}_in");
        let mut defs = vec![
            NodeDef::new("images_in", "parquet", None, source("images")),
            NodeDef::new(&texts_in, "parquet", None, source(texts_table)),
        ];
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
                    "write_tsv",
                    Some("images_in"),
                    table(&[("path", path(&args.out.join(format!("{split}_imgs.tsv"))))]),
                ));
                defs.push(NodeDef::new(
                    "texts",
                    "write_jsonl",
                    Some(&texts_in),
                    table(&[("path", path(&args.out.join(format!("{split}_texts.jsonl"))))]),
                ));
            }
            Format::Lmdb => {
                let lmdb = |db: &str| {
                    table(&[
                        ("path", path(&args.out.join(split).join(db))),
                        ("database", toml::Value::String(db.into())),
                    ])
                };
                defs.push(NodeDef::new("images", "write_lmdb", Some("images_in"), lmdb("imgs")));
                defs.push(NodeDef::new("pairs", "write_lmdb", Some(&texts_in), lmdb("pairs")));
            }
        }
        run_split("export", split, settings, defs)?;
    }
    Ok(())
}

fn table_source(file: &Path, contract: &str) -> toml::Table {
    table(&[("paths", paths(file)), ("table", toml::Value::String(contract.into()))])
}
