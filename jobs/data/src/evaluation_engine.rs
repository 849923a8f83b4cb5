//! Where a score is computed once its inputs are read: in Rust, or by the SQL jobs under
//! `jobs/sql/` on DataFusion (the same numbers; tested against each other).

/// `--engine`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum, Debug, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Engine {
    /// In Rust, as cn_clip's scripts compute it.
    Direct,
    /// The `.sql` job on DataFusion.
    Sql,
}
