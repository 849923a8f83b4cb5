//! `cnclip cluster`: (in progress).

use anyhow::{Result, bail};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Run a Ballista scheduler.
    Scheduler,
    /// Run a Ballista executor.
    Executor,
}

pub fn run(_command: Command) -> Result<()> {
    bail!("cluster is not built yet")
}
