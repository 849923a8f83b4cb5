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
    let written: Vec<String> = report.written.iter().map(|(_, w)| format!("{} rows → {}", w.rows, w.path.display())).collect();
    eprintln!(
        "cnclip {what}: {split}: {}; {} quarantined{} ({:.1} s)",
        written.join(", "),
        report.quarantined,
        report.quarantine_file.map(|p| format!(" (see {})", p.display())).unwrap_or_default(),
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
                NodeDef::new("imgs", "tsv", None, table(&[("paths", paths(&dir.join(format!("{split}_imgs.tsv"))))])),
                NodeDef::new("decode", "decode_base64", Some("imgs"), table(&[])),
                NodeDef::new("images", "write_parquet", Some("decode"), table(&[("path", path(&images_out))])),
                NodeDef::new("texts", "jsonl", None, table(&[("paths", paths(&dir.join(format!("{split}_texts.jsonl"))))])),
                NodeDef::new(
                    "texts_out",
                    "write_parquet",
                    Some("texts"),
                    table(&[("path", path(&args.out.join(format!("{split}_texts.parquet"))))]),
                ),
            ],
            (None, Some(dir)) => {
                let split_dir = dir.join(split);
                let lmdb = |db: &str| table(&[("path", path(&split_dir)), ("database", toml::Value::String(db.into()))]);
                vec![
                    NodeDef::new("imgs", "lmdb", None, lmdb("imgs")),
                    NodeDef::new("decode", "decode_base64", Some("imgs"), table(&[])),
                    NodeDef::new("images", "write_parquet", Some("decode"), table(&[("path", path(&images_out))])),
                    NodeDef::new("pairs", "lmdb", None, lmdb("pairs")),
                    NodeDef::new(
                        "pairs_out",
                        "write_parquet",
                        Some("pairs"),
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
        let mut defs = vec![NodeDef::new("images", "parquet", None, source("images")), NodeDef::new(texts_table, "parquet", None, source(texts_table))];
        match args.format {
            Format::Tsv => {
                if texts_table == "pairs" {
                    bail!("split `{split}`: {} does not exist (TSV export writes texts, not pairs)", parquet("texts").display());
                }
                defs.push(NodeDef::new("imgs_out", "write_tsv", Some("images"), table(&[("path", path(&args.out.join(format!("{split}_imgs.tsv"))))])));
                defs.push(NodeDef::new(
                    "texts_out",
                    "write_jsonl",
                    Some("texts"),
                    table(&[("path", path(&args.out.join(format!("{split}_texts.jsonl"))))]),
                ));
            }
            Format::Lmdb => {
                let lmdb = |db: &str| table(&[("path", path(&args.out.join(split).join(db))), ("database", toml::Value::String(db.into()))]);
                defs.push(NodeDef::new("imgs_out", "write_lmdb", Some("images"), lmdb("imgs")));
                defs.push(NodeDef::new("pairs_out", "write_lmdb", Some(texts_table), lmdb("pairs")));
            }
        }
        run_split("export", split, settings, defs)?;
    }
    Ok(())
}

fn table_source(file: &Path, contract: &str) -> toml::Table {
    table(&[("paths", paths(file)), ("table", toml::Value::String(contract.into()))])
}
