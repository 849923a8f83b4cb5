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

/// Writes a file atomically: into a temporary file beside `path`, then renamed over it, so a
/// reader never sees a half-written checkpoint and a failed write leaves nothing behind.
pub(crate) fn write_atomically(
    path: &std::path::Path,
    write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
    let result = std::fs::File::create(&tmp).and_then(|mut file| {
        write(&mut file)?;
        file.sync_all()
    });
    match result.and_then(|()| std::fs::rename(&tmp, path)) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(Error::Io(std::io::Error::new(e.kind(), format!("writing {}: {e}", path.display()))))
        }
    }
}
