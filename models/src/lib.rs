//! Chinese-CLIP in tch, numerically matching cn_clip 1.6.0 (`cn_clip/clip/model.py`).
//!
//! Vision towers (ViT-B/32 … ViT-H/14, ModifiedResNet-50), text towers (RoBERTa-wwm-ext base and
//! large, RBT3), the WordPiece tokenizer, image preprocessing and checkpoint IO live here; jobs
//! reach them through the library API that mirrors cn_clip's quick start.

pub mod checkpoint;
pub mod clip;
pub mod device;
pub mod error;
pub mod preprocess;
pub mod tokenizer;

pub use clip::{Clip, ClipConfig, normalize};
pub use error::{Error, Result};
pub use tokenizer::{DEFAULT_CONTEXT_LENGTH, Tokenizer, preprocess_text};

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
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
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
