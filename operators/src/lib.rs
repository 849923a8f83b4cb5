//! Pipeline operators: sources (TSV shards, JSONL, cn_clip LMDB, image folders, Parquet),
//! decoders (base64, images, pickles), transforms (preprocess, tokenize) and sinks (Parquet,
//! cn_clip JSONL, TSV, LMDB), plus `spec`, which builds pipelines of them from TOML.
//!
//! One file per format under `sources/`, `decoders/`, `transforms/` and `sinks/`. Record-level
//! faults never stop a source: they come back as [`quarantine::Rejected`] and the job's
//! [`quarantine::OnError`] policy decides.
//!
//! This crate links no libtorch (a test checks its dependency tree), so the `cnclip` binary,
//! built on it, starts in milliseconds. Encoders, which run CLIP with tch, belong in
//! `cnclip_models` as [`transforms::Transform`] implementations.

pub mod decoders;
pub mod error;
pub mod fingerprint;
pub mod lmdb_file;
pub mod options;
pub mod quarantine;
pub mod signals;
pub mod sinks;
pub mod sources;
pub mod spec;
pub mod staging;
pub mod transforms;

pub use error::{Error, Problems, Result};

/// Writes a file atomically: through a buffered temporary file beside `path`, synced and then
/// renamed over it, so a reader never sees a half-written file and a failed write leaves
/// nothing behind. Every cnclip output that is a single file goes through here.
///
/// # Errors
/// Whatever `write` returns, or the IO error (naming `path`) of creating, syncing or renaming.
pub fn write_atomically<E: From<std::io::Error>>(
    path: &std::path::Path,
    write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> Result<(), E>,
) -> Result<(), E> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    let tmp = crate::staging::temp_path(&dir.join(path.file_name().unwrap_or_default()));
    let context = |e: std::io::Error| std::io::Error::new(e.kind(), format!("writing {}: {e}", path.display()));
    let result = (|| {
        let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp).map_err(context)?);
        write(&mut out)?;
        out.into_inner().map_err(|e| context(e.into_error()))?.sync_all().map_err(context)?;
        std::fs::rename(&tmp, path).map_err(context)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
