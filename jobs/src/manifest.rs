//! `cnclip manifest check DIR`: (in progress).

use anyhow::{Result, bail};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Verify a sharded output directory.
    Check,
}

pub fn run(_command: Command) -> Result<()> {
    bail!("manifest check is not built yet")
}
