//! Filling the shards: the table streamed in order, shard N taking rows [N·R, (N+1)·R) (R =
//! `shard_rows`) into a copy of the trained index with the table's ids as FAISS ids, written
//! atomically (with its refinement files under `,RFlat`) and recorded in the manifest before
//! the next shard begins, so a killed build resumes at the first unrecorded shard.

use std::path::Path;
use std::time::Instant;

use super::super::built::{self, IndexFile, Manifest, Shard, ShardRefine};
use super::super::ivf::IvfIndex;
use super::super::refine::RefineWriter;
use super::error::{BuildError, Result};
use super::table::Table;
use super::{BuildOptions, Log, write_manifest};

/// Rows given to one FAISS `add` (FAISS parallelises within a call).
const ADD_ROWS: usize = 65_536;

/// The shard being filled.
struct OpenShard {
    number: usize,
    first_row: u64,
    index: IvfIndex,
    /// The exact vectors, with `,RFlat`.
    refine: Option<RefineWriter>,
    rows: u64,
    min_id: Option<i64>,
    max_id: Option<i64>,
    pending_ids: Vec<i64>,
    pending: Vec<f32>,
    start: Instant,
    add_seconds: f64,
}

impl OpenShard {
    fn push(&mut self, ids: &[i64], vectors: &[f32]) -> Result<()> {
        for &id in ids {
            self.min_id = Some(self.min_id.map_or(id, |m| m.min(id)));
            self.max_id = Some(self.max_id.map_or(id, |m| m.max(id)));
        }
        if let Some(refine) = &mut self.refine {
            refine.push(ids, vectors)?;
        }
        self.pending_ids.extend_from_slice(ids);
        self.pending.extend_from_slice(vectors);
        self.rows += ids.len() as u64;
        if self.pending_ids.len() >= ADD_ROWS { self.flush() } else { Ok(()) }
    }

    fn flush(&mut self) -> Result<()> {
        if self.pending_ids.is_empty() {
            return Ok(());
        }
        let start = Instant::now();
        self.index
            .add_with_ids(&self.pending, &self.pending_ids)
            .map_err(|source| BuildError::Add { shard: self.number, source })?;
        self.add_seconds += start.elapsed().as_secs_f64();
        self.pending_ids.clear();
        self.pending.clear();
        Ok(())
    }

    /// Writes the shard atomically and records it; returns the seconds spent in FAISS `add`.
    fn finish(mut self, dir: &Path, manifest: &mut Manifest, log: Log<'_>) -> Result<f64> {
        self.flush()?;
        // The refinement files first: the shard counts once its index is written and recorded.
        let refine = match self.refine.take() {
            Some(writer) => {
                let (vectors, ids) = writer.finish(self.first_row)?;
                Some(ShardRefine { vectors, ids })
            }
            None => None,
        };
        let file = built::shard_file(self.number);
        let bytes = self.index.write_atomically(&dir.join(&file))?;
        let seconds = self.start.elapsed().as_secs_f64();
        log(&format!(
            "shard {}: rows {}..{} (ids {}..={}) → {file} ({bytes} bytes, {seconds:.1} s)",
            self.number,
            self.first_row,
            self.first_row + self.rows,
            self.min_id.unwrap_or(0),
            self.max_id.unwrap_or(0),
        ));
        let shard = Shard {
            number: self.number,
            first_row: self.first_row,
            rows: self.rows,
            min_id: self.min_id,
            max_id: self.max_id,
            seconds,
            file: IndexFile { file, bytes },
            refine,
        };
        let at = manifest.shards.partition_point(|s| s.number < shard.number);
        manifest.shards.insert(at, shard);
        write_manifest(manifest, dir)?;
        Ok(self.add_seconds)
    }
}

/// Streams the table and builds every shard the manifest lacks; returns how many were built
/// and the seconds spent in FAISS `add`.
pub(super) fn add_shards(
    options: &BuildOptions,
    table: &Table,
    trained: &IvfIndex,
    dir: &Path,
    manifest: &mut Manifest,
    log: Log<'_>,
) -> Result<(usize, f64)> {
    let shard_rows = options.shard_rows;
    let kept: std::collections::BTreeSet<usize> = manifest.shards.iter().map(|s| s.number).collect();
    let mut stream = table.stream()?;
    let (mut row, mut built_now, mut add_seconds) = (0u64, 0, 0.0);
    let mut open: Option<OpenShard> = None;
    for batch in stream.by_ref() {
        let batch = batch?;
        let (ids, vectors) = table.rows(&batch, row)?;
        let mut at = 0;
        while at < ids.len() {
            let number = (row / shard_rows) as usize;
            let end = (number as u64 + 1) * shard_rows;
            let take = (ids.len() - at).min((end - row) as usize);
            if !kept.contains(&number) {
                let shard = match &mut open {
                    Some(shard) => shard,
                    None => open.insert(OpenShard {
                        number,
                        first_row: row,
                        index: trained.try_clone().map_err(BuildError::Copy)?,
                        refine: match &manifest.refine {
                            Some(_) => Some(RefineWriter::create(dir, number, table.dim)?),
                            None => None,
                        },
                        rows: 0,
                        min_id: None,
                        max_id: None,
                        pending_ids: Vec::new(),
                        pending: Vec::new(),
                        start: Instant::now(),
                        add_seconds: 0.0,
                    }),
                };
                shard.push(&ids[at..at + take], &vectors[at * table.dim..(at + take) * table.dim])?;
            }
            row += take as u64;
            at += take;
            if row == end
                && let Some(shard) = open.take()
            {
                add_seconds += shard.finish(dir, manifest, log)?;
                built_now += 1;
            }
        }
    }
    if let Some(shard) = open.take() {
        add_seconds += shard.finish(dir, manifest, log)?;
        built_now += 1;
    }
    if row == 0 {
        return Err(BuildError::NoRows { features: options.features.clone() });
    }
    // Shards past the table's end cannot be (the table is the one the manifest was made from),
    // but a manifest edited by hand could hold them.
    manifest.shards.retain(|s| s.first_row < row);
    manifest.total_rows = Some(row);
    write_manifest(manifest, dir)?;
    if !manifest.complete() {
        return Err(BuildError::Uncovered { dir: dir.to_path_buf(), rows: row });
    }
    Ok((built_now, add_seconds))
}
