//! The runtime's errors: a node's failure carries the node's name; configuration errors are
//! all reported together.

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("node `{node}`: {source}")]
    Node { node: String, source: BoxError },
    #[error("node `{node}` panicked: {message}")]
    Panicked { node: String, message: String },
    /// One device replica of a node failed (its node's error wraps this one).
    #[error("replica {replica} ({device}): {source}")]
    Replica { replica: usize, device: String, source: BoxError },
    #[error("invalid pipeline: {}", .0.join("; "))]
    Config(Vec<String>),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
