//! `cnclip build-index`: (in progress).

use anyhow::{Result, bail};

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> Result<()> {
    bail!("build-index is not built yet")
}
