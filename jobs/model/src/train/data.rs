//! Training and validation data given in other layouts than cn_clip's LMDB split: cn_clip's
//! `{split}_imgs.tsv` + `{split}_texts.jsonl` (what `build_lmdb_dataset.py` reads) or our
//! Parquet tables (`{split}_images.parquet` + `{split}_pairs.parquet` or `_texts.parquet`).
//! They are serialized once into an LMDB split under the run's directory by the same jobs
//! users run (`build-lmdb`, `export --format lmdb`), and reused while the inputs are
//! unchanged: training then reads every layout as cn_clip's `LMDBDataset` reads, with its
//! random access by pair index and the same pairs order. Bad records are quarantined there
//! (`{split}/quarantine.jsonl`), as `build-lmdb` does.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::log::Log;
use cnclip_data_jobs::{build_lmdb, command_line, import};
use cnclip_operators::quarantine::OnError;
use cnclip_operators::sinks::lmdb::LmdbWriterKind;
use cnclip_operators::storage;

/// The LMDB split to train on for `--train-data`/`--val-data` `given`, serializing it under
/// `cache` first when it is not one already.
pub fn lmdb_split(given: &Path, cache: &Path, flag: &str, log: &mut Log) -> Result<PathBuf> {
    if given.join("imgs/data.mdb").is_file() && given.join("pairs/data.mdb").is_file() {
        return Ok(given.to_path_buf());
    }
    let name = given.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let parent = given.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let (split, inputs, layout) = if let Some(split) = name.strip_suffix("_imgs.tsv") {
        let texts = parent.join(format!("{split}_texts.jsonl"));
        (split.to_string(), vec![given.to_path_buf(), texts], Layout::Tsv)
    } else if let Some(split) = name.strip_suffix("_images.parquet") {
        let texts =
            ["pairs", "texts"].iter().map(|t| parent.join(format!("{split}_{t}.parquet"))).find(|p| p.is_file());
        let texts = texts.unwrap_or_else(|| parent.join(format!("{split}_pairs.parquet")));
        (split.to_string(), vec![given.to_path_buf(), texts], Layout::Parquet)
    } else {
        bail!(
            "{flag} {}: not a cn_clip LMDB split (with imgs/ and pairs/), a {{split}}_imgs.tsv (with \
             {{split}}_texts.jsonl beside it) or a {{split}}_images.parquet (with {{split}}_pairs.parquet or \
             {{split}}_texts.parquet)",
            given.display()
        );
    };
    let mut fingerprint = Vec::new();
    for input in &inputs {
        let meta = storage::metadata(input).with_context(|| format!("{flag}: {}", input.display()))?;
        let modified = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
        fingerprint.push(serde_json::json!({
            "path": storage::canonicalize(input).unwrap_or_else(|_| input.clone()),
            "bytes": meta.len(),
            "modified_ns": modified.map(|d| d.as_nanos().to_string()),
        }));
    }
    let fingerprint = serde_json::Value::Array(fingerprint).to_string();
    let out = cache.join(flag.trim_start_matches('-'));
    let lmdb = out.join(&split);
    let marker = out.join("source.json");
    if lmdb.join("pairs/data.mdb").is_file() && storage::read_to_string(&marker).is_ok_and(|m| m == fingerprint) {
        log.info(&format!("{flag}: reusing {} (made from {})", lmdb.display(), given.display()));
        return Ok(lmdb);
    }
    let _ = storage::remove_dir_all(&out);
    storage::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    match layout {
        Layout::Tsv => {
            let options = build_lmdb::Args {
                lmdb_dir: Some(out.clone()),
                ..build_lmdb::Args::new(parent.to_path_buf(), split.clone())
            };
            let line = command_line::render(&options)?.join(" ");
            log.info(&format!("{flag}: serializing {} into an LMDB split: cnclip build-lmdb {line}", given.display()));
            build_lmdb::run(options)?;
        }
        Layout::Parquet => {
            let options = import::ExportArgs {
                parquet_dir: parent.to_path_buf(),
                splits: split.clone(),
                out: out.clone(),
                format: import::Format::Lmdb,
                writer: LmdbWriterKind::Bulk,
                on_error: OnError::Skip,
            };
            let line = command_line::render(&options)?.join(" ");
            log.info(&format!("{flag}: serializing {} into an LMDB split: cnclip export {line}", given.display()));
            import::export(options)?;
        }
    }
    cnclip_operators::write_atomically(&marker, |f| std::io::Write::write_all(f, fingerprint.as_bytes()))?;
    Ok(lmdb)
}

enum Layout {
    Tsv,
    Parquet,
}
