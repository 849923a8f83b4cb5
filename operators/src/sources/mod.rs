//! Sources: read records from cn_clip's files.

pub mod jsonl;
pub mod lmdb;
pub mod synth;
pub mod tsv;

use std::io::{BufRead, BufReader};
use std::path::Path;

use crate::error::{Result, io};

/// Calls `on_line(number, line)` for each non-blank line of `path` (1-based numbers, line end
/// and surrounding ASCII whitespace trimmed), reading in 1 MiB buffers.
///
/// # Errors
/// IO errors naming `path` (a missing file is structural), or whatever `on_line` returns.
pub(crate) fn for_each_trimmed_line(path: &Path, mut on_line: impl FnMut(usize, &[u8]) -> Result<()>) -> Result<()> {
    let file = std::fs::File::open(path).map_err(io(path))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut line = Vec::new();
    let mut number = 0usize;
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).map_err(io(path))? == 0 {
            return Ok(());
        }
        number += 1;
        let start = line.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(line.len());
        let end = line.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(start, |e| e + 1);
        if start < end {
            on_line(number, &line[start..end])?;
        }
    }
}
