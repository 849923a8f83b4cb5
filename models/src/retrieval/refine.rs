//! The refinement stage of a build-index directory: the exact vectors, kept on disk beside the
//! compressed index, that re-rank its candidates.
//!
//! FAISS's `…,RFlat` (`IndexRefineFlat`) asks the compressed index for `k_factor · k`
//! candidates and re-scores them with the full vectors, which it keeps in memory: 4·d bytes a
//! vector, eight times a 64-byte PQ code, which defeats compressing at all at a billion vectors.
//! build-index takes the same factory suffix (`IVF4096,PQ64np,RFlat`) but writes each shard's
//! vectors to a flat file memory-mapped at search time, so memory holds the codes and the pages
//! the candidates touch (the OS page cache), and disk holds the vectors:
//!
//! ```text
//! DIR/shard-NNNNN.vectors   the shard's float32 vectors, little-endian, in shard row order
//! DIR/shard-NNNNN.ids       (id: i64, row: u64) little-endian pairs sorted by id: id → row
//! DIR/ids.map               only when shards' id ranges overlap: (id: i64, shard: u32,
//!                           row: u32) sorted by id, every shard's ids merged
//! ```
//!
//! A candidate's id is found by one binary search: when the shards hold disjoint id ranges (a
//! table in id order), the range names the shard and its pairs give the row; otherwise the
//! global map gives both (without it, every shard whose range spans the id would be searched:
//! all of them, for ids in no order). Its score is recomputed as the inner product of the query and the stored
//! vector; the top `k` by that score (ties by the smaller id) is the answer, so the scores
//! returned are exact inner products, and the result does not depend on whether the shards were
//! merged (the candidates do not: see [`super::built::search`]).
//!
//! An id must name one vector: a shard with an id twice is refused when it is written, and
//! build-index checks the shards against each other (in the merge that writes the map) before
//! the build counts as finished.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::built::{IndexFile, Manifest};
use super::error::{Error, Result};
use cnclip_operators::storage;

/// The only refinement build-index keeps: float32 vectors (FAISS's `RFlat`).
pub const FLAT: &str = "flat";
/// Bytes of one `(id, row)` entry of a `.ids` file, and of one `(id, shard, row)` entry of
/// the global map.
const ENTRY: u64 = 16;
/// The global id map, written when the shards' id ranges overlap ([`RefineStore::check_ids`]).
pub const ID_MAP: &str = "ids.map";

/// The vectors file of shard `number`.
pub fn vectors_file(number: usize) -> String {
    format!("shard-{number:05}.vectors")
}

/// The id file of shard `number`.
pub fn ids_file(number: usize) -> String {
    format!("shard-{number:05}.ids")
}

/// Splits a factory string into its IVF part and the refinement it ends with, if any:
/// `IVF1024,PQ64np,RFlat` → (`IVF1024,PQ64np`, `Some("flat")`); `Refine(Flat)` is the same.
///
/// # Errors
/// A refinement other than flat vectors (`Refine(SQ8)`, …), or a refinement alone.
pub fn split(description: &str) -> Result<(String, Option<&'static str>)> {
    let Some((base, last)) = description.rsplit_once(',') else { return Ok((description.to_string(), None)) };
    let last = last.trim();
    if last == "RFlat" || last == "Refine(Flat)" {
        if base.trim().is_empty() {
            return Err(Error::RefinementAlone { description: description.to_string() });
        }
        return Ok((base.to_string(), Some(FLAT)));
    }
    if last.starts_with("Refine(") || last.starts_with("RFlat") {
        return Err(Error::RefinementKind { description: description.to_string() });
    }
    Ok((description.to_string(), None))
}

/// Writes one shard's refinement files as its rows are added.
pub struct RefineWriter {
    vectors_path: PathBuf,
    ids_path: PathBuf,
    tmp: PathBuf,
    out: std::io::BufWriter<File>,
    dim: usize,
    /// (id, row in the shard), in row order until [`RefineWriter::finish`] sorts them.
    entries: Vec<(i64, u64)>,
    /// Set once the files are in place; until then, dropping the writer removes the temporary.
    finished: bool,
}

impl Drop for RefineWriter {
    /// A shard left unfinished (an error, an interrupt) leaves no partial vectors file behind.
    fn drop(&mut self) {
        if !self.finished {
            let _ = storage::remove_file(&self.tmp);
        }
    }
}

impl RefineWriter {
    /// Starts shard `number`'s files in `dir` (the vectors go to a temporary file beside their
    /// target until [`RefineWriter::finish`]).
    ///
    /// # Errors
    /// The file system's, naming the file.
    pub fn create(dir: &Path, number: usize, dim: usize) -> Result<RefineWriter> {
        let vectors_path = dir.join(vectors_file(number));
        let tmp = storage::staging::temp_path(&vectors_path);
        let file = match storage::create(&tmp) {
            Ok(file) => file,
            Err(source) => return Err(Error::Write { path: vectors_path, source }),
        };
        Ok(RefineWriter {
            ids_path: dir.join(ids_file(number)),
            vectors_path,
            tmp,
            out: std::io::BufWriter::with_capacity(1 << 20, file),
            dim,
            entries: Vec::new(),
            finished: false,
        })
    }

    /// Appends rows: `ids` and their vectors back to back.
    ///
    /// # Errors
    /// The file system's.
    pub fn push(&mut self, ids: &[i64], vectors: &[f32]) -> Result<()> {
        debug_assert_eq!(ids.len() * self.dim, vectors.len());
        let first = self.entries.len() as u64;
        self.entries.extend(ids.iter().enumerate().map(|(i, &id)| (id, first + i as u64)));
        let mut bytes = Vec::with_capacity(vectors.len() * 4);
        for v in vectors {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        self.out.write_all(&bytes).map_err(|source| Error::Write { path: self.vectors_path.clone(), source })
    }

    /// Sorts the ids, writes both files (atomically: synced, renamed) and returns them.
    ///
    /// # Errors
    /// An id that occurs twice in the shard (naming both rows), or the file system's.
    pub fn finish(mut self, first_row: u64) -> Result<(IndexFile, IndexFile)> {
        let result = (|| {
            self.entries.sort_unstable();
            if let Some(pair) = self.entries.windows(2).find(|p| p[0].0 == p[1].0) {
                return Err(Error::DuplicateId {
                    id: pair[0].0,
                    first: first_row + pair[0].1,
                    second: first_row + pair[1].1,
                });
            }
            let fail = |source: std::io::Error| Error::Write { path: self.vectors_path.clone(), source };
            self.out.flush().map_err(fail)?;
            let file = self.out.get_ref();
            file.sync_all().map_err(fail)?;
            let vectors_bytes = file.metadata().map_err(fail)?.len();
            let mut bytes = Vec::with_capacity(self.entries.len() * ENTRY as usize);
            for &(id, row) in &self.entries {
                bytes.extend_from_slice(&id.to_le_bytes());
                bytes.extend_from_slice(&row.to_le_bytes());
            }
            cnclip_operators::write_atomically(&self.ids_path, |f| f.write_all(&bytes))?;
            storage::rename(&self.tmp, &self.vectors_path).map_err(fail)?;
            self.finished = true;
            Ok((
                IndexFile { file: name(&self.vectors_path), bytes: vectors_bytes },
                IndexFile { file: name(&self.ids_path), bytes: bytes.len() as u64 },
            ))
        })();
        // On an error, dropping `self` removes the temporary vectors file.
        result
    }
}

fn name(path: &Path) -> String {
    path.file_name().unwrap_or_default().to_string_lossy().into_owned()
}

/// One shard's files, mapped.
struct ShardVectors {
    number: usize,
    /// The `.ids` file, for errors.
    ids_path: PathBuf,
    min_id: i64,
    max_id: i64,
    ids: Mmap,
    vectors: Mmap,
    rows: usize,
}

impl ShardVectors {
    fn entry(&self, at: usize) -> (i64, u64) {
        let at = at * ENTRY as usize;
        let id = i64::from_le_bytes(self.ids[at..at + 8].try_into().expect("8 bytes"));
        let row = u64::from_le_bytes(self.ids[at + 8..at + 16].try_into().expect("8 bytes"));
        (id, row)
    }

    /// The row of `id` in this shard.
    fn row(&self, id: i64) -> Option<u64> {
        let (mut lo, mut hi) = (0, self.rows);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let (found, row) = self.entry(mid);
            match found.cmp(&id) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some(row),
            }
        }
        None
    }
}

/// Every shard's exact vectors, memory-mapped, looked up by id.
pub struct RefineStore {
    dim: usize,
    /// In the manifest's (shard number) order.
    shards: Vec<ShardVectors>,
    /// `shards` positions by smallest id.
    by_min: Vec<usize>,
    /// The global id map, when the build wrote one, and its entries.
    global: Option<(Mmap, usize)>,
}

impl RefineStore {
    /// Maps the refinement files of every shard of `manifest` in `dir`.
    ///
    /// # Errors
    /// A shard without refinement files, or one whose files are missing or of another size than
    /// its rows need.
    pub fn open(dir: &Path, manifest: &Manifest) -> Result<RefineStore> {
        let dim = manifest.dim;
        let mut shards = Vec::new();
        for shard in &manifest.shards {
            let Some(refine) = &shard.refine else {
                return Err(Error::NoRefinement { dir: dir.to_path_buf(), shard: shard.number });
            };
            let rows = shard.rows;
            let ids = map(dir, &refine.ids, rows * ENTRY)?;
            let vectors = map(dir, &refine.vectors, rows * dim as u64 * 4)?;
            let (Some(min_id), Some(max_id)) = (shard.min_id, shard.max_id) else { continue };
            let ids_path = dir.join(&refine.ids.file);
            shards.push(ShardVectors {
                number: shard.number,
                ids_path,
                min_id,
                max_id,
                ids,
                vectors,
                rows: rows as usize,
            });
        }
        let mut by_min: Vec<usize> = (0..shards.len()).collect();
        by_min.sort_by_key(|&s| shards[s].min_id);
        let global = match manifest.refine.as_ref().and_then(|r| r.id_map.as_ref()) {
            Some(file) => {
                let rows: u64 = manifest.shards.iter().map(|s| s.rows).sum();
                Some((map(dir, file, rows * ENTRY)?, rows as usize))
            }
            None => None,
        };
        Ok(RefineStore { dim, shards, by_min, global })
    }

    /// The stored vector of `id`, or `None` if no shard holds it.
    ///
    /// Shards with disjoint id ranges (a table in id order) cost one binary search; with
    /// overlapping ranges (ids in no order) every shard whose range holds `id` is searched.
    ///
    /// # Errors
    /// An `.ids` entry pointing past its shard's rows (a damaged file).
    pub fn vector(&self, id: i64) -> Result<Option<impl Iterator<Item = f32> + '_>> {
        let shard_and_row = match &self.global {
            Some((global, entries)) => match global_row(global, *entries, id) {
                None => None,
                // The shards are in number order (0, 1, …) in a finished build.
                Some((number, row)) => match self.shards.get(number as usize).filter(|s| s.number == number as usize) {
                    Some(shard) => Some((shard, u64::from(row))),
                    None => return Err(Error::MappedShard { id, shard: number }),
                },
            },
            None => {
                // Shards whose range can hold `id`: those starting at or below it, of which those
                // whose range reaches it (with disjoint ranges, just the last).
                let end = self.by_min.partition_point(|&s| self.shards[s].min_id <= id);
                self.by_min[..end]
                    .iter()
                    .rev()
                    .map(|&s| &self.shards[s])
                    .filter(|s| s.max_id >= id)
                    .find_map(|s| Some((s, s.row(id)?)))
            }
        };
        let Some((shard, row)) = shard_and_row else { return Ok(None) };
        if row >= shard.rows as u64 {
            return Err(Error::MappedRow { path: shard.ids_path.clone(), id, row, rows: shard.rows });
        }
        let bytes = self.dim * 4;
        let start = row as usize * bytes;
        Ok(Some(
            shard.vectors[start..start + bytes]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))),
        ))
    }

    /// Re-scores each query's `candidates` with the stored vectors (`queries` back to back) and
    /// keeps the top `k` by that score, ties by the smaller id.
    ///
    /// # Errors
    /// A candidate the store does not hold (the index and its vectors disagree).
    pub fn rerank(&self, queries: &[f32], candidates: Vec<Vec<(i64, f32)>>, k: usize) -> Result<Vec<Vec<(i64, f32)>>> {
        let dim = self.dim;
        candidates
            .into_iter()
            .enumerate()
            .map(|(q, found)| {
                let query = &queries[q * dim..(q + 1) * dim];
                let mut rescored = found
                    .into_iter()
                    .map(|(id, _)| {
                        let vector = self.vector(id)?.ok_or(Error::NotRefined { id })?;
                        Ok((id, dot(query, vector)))
                    })
                    .collect::<Result<Vec<_>>>()?;
                rescored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                rescored.truncate(k);
                Ok(rescored)
            })
            .collect()
    }

    /// Checks that no id is in two shards and, when the shards' id ranges overlap (ids in no
    /// order), writes the global id map `DIR/ids.map` — `(id: i64, shard: u32, row: u32)`
    /// little-endian, sorted by id — so that a lookup is one binary search however many shards
    /// there are. Disjoint ranges need neither: they cannot share an id, and the shard of an id
    /// is found from the ranges.
    ///
    /// # Errors
    /// The file system's, or a shard of more than 2³² rows (the map's row field).
    pub fn check_ids(&self, dir: &Path) -> Result<Ids> {
        let overlapping = self.by_min.windows(2).any(|w| self.shards[w[1]].min_id <= self.shards[w[0]].max_id);
        let path = dir.join(ID_MAP);
        if !overlapping {
            let _ = storage::remove_file(&path);
            return Ok(Ids::Disjoint);
        }
        enum Stop {
            Io(std::io::Error),
            Duplicate(i64, usize, usize),
        }
        impl From<std::io::Error> for Stop {
            fn from(e: std::io::Error) -> Stop {
                Stop::Io(e)
            }
        }
        // A k-way merge of the shards' sorted ids, written as it goes.
        let merged = cnclip_operators::write_atomically(&path, |out| {
            let mut heap = std::collections::BinaryHeap::new();
            for (s, shard) in self.shards.iter().enumerate() {
                if shard.rows > 0 {
                    heap.push(std::cmp::Reverse((shard.entry(0).0, s, 0usize)));
                }
            }
            let mut last: Option<(i64, usize)> = None;
            while let Some(std::cmp::Reverse((id, s, at))) = heap.pop() {
                if let Some((previous, from)) = last
                    && previous == id
                {
                    return Err(Stop::Duplicate(id, self.shards[from].number, self.shards[s].number));
                }
                last = Some((id, s));
                let shard = &self.shards[s];
                let (_, row) = shard.entry(at);
                let (Ok(number), Ok(row)) = (u32::try_from(shard.number), u32::try_from(row)) else {
                    return Err(Stop::Io(std::io::Error::other(format!(
                        "shard {} row {row}: past the id map's 32-bit fields (use smaller --shard-rows)",
                        shard.number
                    ))));
                };
                out.write_all(&id.to_le_bytes())?;
                out.write_all(&number.to_le_bytes())?;
                out.write_all(&row.to_le_bytes())?;
                if at + 1 < shard.rows {
                    let next = shard.entry(at + 1).0;
                    if next <= id {
                        return Err(Stop::Io(std::io::Error::other(format!(
                            "{}: ids out of order at entry {} (damaged; rebuild the index)",
                            shard.ids_path.display(),
                            at + 1
                        ))));
                    }
                    heap.push(std::cmp::Reverse((next, s, at + 1)));
                }
            }
            Ok(())
        });
        match merged {
            Ok(()) => {
                let bytes = match storage::metadata(&path) {
                    Ok(meta) => meta.len(),
                    Err(source) => return Err(Error::File { path, source }),
                };
                Ok(Ids::Mapped(IndexFile { file: ID_MAP.into(), bytes }))
            }
            Err(Stop::Duplicate(id, a, b)) => Ok(Ids::Duplicate { id, first: a, second: b }),
            Err(Stop::Io(source)) => Err(Error::Write { path, source }),
        }
    }
}

/// What [`RefineStore::check_ids`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum Ids {
    /// The shards hold disjoint id ranges: no map needed.
    Disjoint,
    /// Overlapping ranges, no id twice: the global map written.
    Mapped(IndexFile),
    /// An id in two shards (by number).
    Duplicate { id: i64, first: usize, second: usize },
}

/// The (shard number, row) of `id` in the global map of `entries` entries.
fn global_row(map: &[u8], entries: usize, id: i64) -> Option<(u32, u32)> {
    let entry = |at: usize| {
        let at = at * ENTRY as usize;
        let found = i64::from_le_bytes(map[at..at + 8].try_into().expect("8 bytes"));
        let shard = u32::from_le_bytes(map[at + 8..at + 12].try_into().expect("4 bytes"));
        let row = u32::from_le_bytes(map[at + 12..at + 16].try_into().expect("4 bytes"));
        (found, shard, row)
    };
    let (mut lo, mut hi) = (0, entries);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let (found, shard, row) = entry(mid);
        match found.cmp(&id) {
            std::cmp::Ordering::Less => lo = mid + 1,
            std::cmp::Ordering::Greater => hi = mid,
            std::cmp::Ordering::Equal => return Some((shard, row)),
        }
    }
    None
}

/// The inner product, accumulated in eight float32 lanes (vectorised by the compiler).
fn dot(query: &[f32], vector: impl Iterator<Item = f32>) -> f32 {
    let mut lanes = [0f32; 8];
    for (i, (q, v)) in query.iter().zip(vector).enumerate() {
        lanes[i % 8] += q * v;
    }
    lanes.iter().sum()
}

/// Maps `file` of `dir`, checking it has `expected` bytes (a shard's rows times the entry or
/// vector size) and the size build-index recorded.
fn map(dir: &Path, file: &IndexFile, expected: u64) -> Result<Mmap> {
    file.check(dir)?;
    let path = dir.join(&file.file);
    if file.bytes != expected {
        return Err(Error::ShardSize { path, bytes: file.bytes, expected });
    }
    let handle = match storage::open(&path) {
        Ok(handle) => handle,
        Err(source) => return Err(Error::File { path, source }),
    };
    // SAFETY: the map is read-only and build-index never rewrites a finished file in place (it
    // writes a new file and renames it over the old one, which leaves this mapping on the old
    // inode). Another program truncating the file while it is searched would fault the search;
    // that is the standing caveat of every memory-mapped reader (FAISS's mmap IO included).
    let map = match unsafe { Mmap::map(&handle) } {
        Ok(map) => map,
        Err(source) => return Err(Error::Map { path, source }),
    };
    #[cfg(unix)]
    let _ = map.advise(memmap2::Advice::Random);
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retrieval::built::{self, Shard, ShardRefine, Training};

    #[test]
    fn the_refinement_suffix_is_split_off_and_others_are_refused() {
        assert_eq!(split("IVF1024,PQ64np,RFlat").unwrap(), ("IVF1024,PQ64np".to_string(), Some(FLAT)));
        assert_eq!(split("IVF16,PQ8,Refine(Flat)").unwrap(), ("IVF16,PQ8".to_string(), Some(FLAT)));
        assert_eq!(split("IVF1024,SQ8").unwrap(), ("IVF1024,SQ8".to_string(), None));
        assert_eq!(split("Flat").unwrap(), ("Flat".to_string(), None));
        assert!(split("IVF16,PQ8,Refine(SQ8)").unwrap_err().to_string().contains("RFlat"));
        assert!(split(",RFlat").is_err());
    }

    fn manifest(dim: usize, shards: Vec<Shard>) -> Manifest {
        let file = |name: &str| IndexFile { file: name.into(), bytes: 0 };
        Manifest {
            format: built::FORMAT.into(),
            index: "IVF1,Flat,RFlat".into(),
            dim,
            metric: built::METRIC.into(),
            nlist: 1,
            nprobe: 1,
            training: Training {
                fingerprint: String::new(),
                sample: 1,
                rows: 1,
                seed: 0,
                seconds: 0.0,
                file: file(built::TRAINED),
            },
            shard_rows: 100,
            shards_fingerprint: String::new(),
            shards,
            total_rows: None,
            merged: None,
            refine: Some(built::Refine { kind: FLAT.into(), k_factor: 4, id_map: None }),
        }
    }

    fn write_shard(dir: &Path, number: usize, first_row: u64, ids: &[i64], dim: usize) -> Result<Shard> {
        let vectors: Vec<f32> = ids.iter().flat_map(|&id| (0..dim).map(move |j| (id * 10 + j as i64) as f32)).collect();
        let mut writer = RefineWriter::create(dir, number, dim)?;
        writer.push(&ids[..ids.len() / 2], &vectors[..ids.len() / 2 * dim])?;
        writer.push(&ids[ids.len() / 2..], &vectors[ids.len() / 2 * dim..])?;
        let (vectors, ids_file) = writer.finish(first_row)?;
        Ok(Shard {
            number,
            first_row,
            rows: ids.len() as u64,
            min_id: ids.iter().min().copied(),
            max_id: ids.iter().max().copied(),
            seconds: 0.0,
            file: IndexFile { file: built::shard_file(number), bytes: 0 },
            refine: Some(ShardRefine { vectors, ids: ids_file }),
        })
    }

    #[test]
    fn vectors_are_found_by_id_in_any_shard_and_reranked_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let dim = 3;
        // Unsorted ids; shard 1's range overlaps shard 0's.
        let a = write_shard(dir.path(), 0, 0, &[50, 7, 31, 12], dim).unwrap();
        let b = write_shard(dir.path(), 1, 4, &[40, 9, 100], dim).unwrap();
        let mut manifest = manifest(dim, vec![a, b]);
        let by_ranges = RefineStore::open(dir.path(), &manifest).unwrap();
        // The ranges overlap: the global map is written, and looked up the same.
        let Ids::Mapped(map) = by_ranges.check_ids(dir.path()).unwrap() else { panic!("no map written") };
        assert_eq!(map.bytes, 7 * 16);
        manifest.refine.as_mut().unwrap().id_map = Some(map);
        let by_map = RefineStore::open(dir.path(), &manifest).unwrap();
        assert!(by_map.global.is_some());
        for store in [&by_ranges, &by_map] {
            for id in [50, 7, 31, 12, 40, 9, 100] {
                let v: Vec<f32> = store.vector(id).unwrap().unwrap().collect();
                assert_eq!(v, vec![(id * 10) as f32, (id * 10 + 1) as f32, (id * 10 + 2) as f32], "id {id}");
            }
            for absent in [0, 8, 41, 101, -3] {
                assert!(store.vector(absent).unwrap().is_none(), "{absent}");
            }
        }
        let store = by_map;
        // Disjoint ranges need no map (and a stale one is removed).
        let c = write_shard(dir.path(), 2, 7, &[200, 300], dim).unwrap();
        let d = write_shard(dir.path(), 3, 9, &[350, 301], dim).unwrap();
        let disjoint = RefineStore::open(dir.path(), &self::manifest(dim, vec![d, c])).unwrap();
        assert_eq!(disjoint.check_ids(dir.path()).unwrap(), Ids::Disjoint);
        assert!(!dir.path().join(ID_MAP).exists());
        assert_eq!(disjoint.vector(350).unwrap().unwrap().next(), Some(3500.0));
        // The query (1, 0, -1) scores id x at (10x) - (10x + 2) = -2 for every x: all tie, so the
        // smaller ids win; (0, 0, 1) scores 10x + 2.
        let queries = [1.0, 0.0, -1.0, 0.0, 0.0, 1.0];
        let candidates = vec![vec![(100, 9.0), (9, 8.0), (50, 7.0)], vec![(9, 9.0), (100, 1.0), (31, 0.5)]];
        let top = store.rerank(&queries, candidates, 2).unwrap();
        assert_eq!(top, vec![vec![(9, -2.0), (50, -2.0)], vec![(100, 1002.0), (31, 312.0)]]);
        assert!(store.rerank(&queries[..3], vec![vec![(8, 1.0)]], 1).unwrap_err().to_string().contains("id 8"));
    }

    #[test]
    fn an_id_twice_is_refused_in_a_shard_and_found_across_shards() {
        let dir = tempfile::tempdir().unwrap();
        let e = write_shard(dir.path(), 0, 100, &[5, 6, 5], 2).unwrap_err().to_string();
        assert!(e.contains("id 5 is on rows 100 and 102"), "{e}");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert!(left.is_empty(), "a refused shard leaves no file (temporary included): {left:?}");
        let a = write_shard(dir.path(), 0, 0, &[1, 2, 30], 2).unwrap();
        let b = write_shard(dir.path(), 1, 3, &[4, 30, 31], 2).unwrap();
        let c = write_shard(dir.path(), 2, 6, &[32, 33], 2).unwrap();
        let store = RefineStore::open(dir.path(), &manifest(2, vec![a.clone(), b.clone(), c])).unwrap();
        assert_eq!(store.check_ids(dir.path()).unwrap(), Ids::Duplicate { id: 30, first: 0, second: 1 });
        assert!(!dir.path().join(ID_MAP).exists(), "no map is left for a table with an id twice");
        // An entry pointing past its shard's rows (the right size, a damaged row) is named.
        let ids_path = dir.path().join(ids_file(1));
        let mut ids = std::fs::read(&ids_path).unwrap();
        ids[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&ids_path, &ids).unwrap();
        let store = RefineStore::open(dir.path(), &manifest(2, vec![a.clone(), b.clone()])).unwrap();
        let e = store.vector(4).err().unwrap().to_string();
        assert!(e.contains("shard-00001.ids") && e.contains("id 4"), "{e}");
        assert!(store.vector(31).unwrap().is_some());
        // Ids out of order in a damaged `.ids` file (the right size) are named by the merge.
        let other = tempfile::tempdir().unwrap();
        let e = write_shard(other.path(), 0, 0, &[1, 5, 9], 2).unwrap();
        let f = write_shard(other.path(), 1, 3, &[2, 6], 2).unwrap();
        let ids_path = other.path().join(ids_file(0));
        let mut ids = std::fs::read(&ids_path).unwrap();
        let (first, second) = ids.split_at_mut(16);
        first.swap_with_slice(&mut second[..16]);
        std::fs::write(&ids_path, &ids).unwrap();
        let store = RefineStore::open(other.path(), &manifest(2, vec![e, f])).unwrap();
        let e = store.check_ids(other.path()).unwrap_err().to_string();
        assert!(e.contains("shard-00000.ids: ids out of order"), "{e}");
        // A truncated vectors file is named.
        let path = dir.path().join(vectors_file(0));
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 4).unwrap();
        let e = RefineStore::open(dir.path(), &manifest(2, vec![a])).err().unwrap().to_string();
        assert!(e.contains("shard-00000.vectors"), "{e}");
    }
}
