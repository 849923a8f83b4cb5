//! The models crate's error type.

/// Errors from loading vocabularies, configs and checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::Error),
    #[error("model config: {0}")]
    Config(String),
    #[error("{0}")]
    Device(String),
    /// A `--precision` / `precision` name that is not one.
    #[error("unknown precision `{0}`: use fp32, fp16, bf16 or amp")]
    Precision(String),
    /// A file that cannot be read (a checkpoint being hashed).
    #[error("{}: {source}", .path.display())]
    File { path: std::path::PathBuf, source: std::io::Error },
    #[error("checkpoint does not fit the model: {}", describe_state_dict(.missing, .unexpected, .mis_shaped))]
    StateDict { missing: Vec<String>, unexpected: Vec<String>, mis_shaped: Vec<String> },
    #[error("{0}")]
    Shape(String),
    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: String, reason: String },
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
    /// What libtorch's extensions did for training failed: a collective of a data-parallel run
    /// (c10d), autocast or the loss scaler's kernels.
    #[error(transparent)]
    Extension(#[from] cnclip_torch_ext::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn describe_state_dict(missing: &[String], unexpected: &[String], mis_shaped: &[String]) -> String {
    let mut parts = Vec::new();
    let list = |keys: &[String]| {
        let shown: Vec<&str> = keys.iter().take(20).map(String::as_str).collect();
        let more = keys.len().saturating_sub(shown.len());
        if more > 0 { format!("{} and {more} more", shown.join(", ")) } else { shown.join(", ") }
    };
    if !missing.is_empty() {
        parts.push(format!("{} missing key(s): {}", missing.len(), list(missing)));
    }
    if !unexpected.is_empty() {
        parts.push(format!("{} unexpected key(s): {}", unexpected.len(), list(unexpected)));
    }
    if !mis_shaped.is_empty() {
        parts.push(format!("{} mis-shaped key(s): {}", mis_shaped.len(), list(mis_shaped)));
    }
    parts.join("; ")
}
