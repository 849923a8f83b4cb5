//! The models crate's error type.

/// Errors from loading vocabularies, configs and checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("vocabulary {source_name}: {reason}")]
    Vocab { source_name: String, reason: String },
    #[error("context length {0} is too small: it must hold [CLS] and [SEP] (at least 2)")]
    ContextLength(usize),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
