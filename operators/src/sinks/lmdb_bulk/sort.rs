//! The external sort: keys arrive in any order and leave in key order, with memory bounded
//! for any number of them.
//!
//! Each put becomes a compact record (key, then the small value or the overflow page number
//! of a big one) in one pending buffer; past [`RUN_BYTES`] the pending records are sorted and
//! appended to a spill file as a sorted run. At the end the runs are merged k-way (at most
//! [`FAN_IN`] at a time, in several passes if need be, so open files and read buffers stay
//! bounded too). A database that fits in one run never touches the disk here. Apart from the
//! writer because none of it depends on LMDB's format beyond [`Value`].

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::{Result, io};
use crate::lmdb_file::page::{PAGE, Value};
use crate::storage;

/// Pending records (keys, small values, page numbers) held before a sorted run is spilled.
pub(super) const RUN_BYTES: usize = 64 << 20;
/// Most runs merged at once.
const FAN_IN: usize = 64;

/// A sort record: `[key len u16][key][0 + len u32 + value | 1 + len u32 + pgno u64]`.
fn encode(out: &mut Vec<u8>, key: &[u8], value: Value<'_>) {
    out.extend_from_slice(&(key.len() as u16).to_le_bytes());
    out.extend_from_slice(key);
    match value {
        Value::Inline(v) => {
            out.push(0);
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
            out.extend_from_slice(v);
        }
        Value::Overflow { pgno, len } => {
            out.push(1);
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&pgno.to_le_bytes());
        }
    }
}

/// The key of the record starting at `at`.
fn record_key(buf: &[u8], at: usize) -> &[u8] {
    let klen = u16::from_le_bytes([buf[at], buf[at + 1]]) as usize;
    &buf[at + 2..at + 2 + klen]
}

/// The key and value of the record at the start of `record`, and the record's length.
fn decode(record: &[u8]) -> (&[u8], Value<'_>, usize) {
    let klen = u16::from_le_bytes([record[0], record[1]]) as usize;
    let key = &record[2..2 + klen];
    let at = 2 + klen;
    let len = u32::from_le_bytes(record[at + 1..at + 5].try_into().unwrap());
    if record[at] == 0 {
        let end = at + 5 + len as usize;
        (key, Value::Inline(&record[at + 5..end]), end)
    } else {
        let pgno = u64::from_le_bytes(record[at + 5..at + 13].try_into().unwrap());
        (key, Value::Overflow { pgno, len }, at + 13)
    }
}

/// Sorts (key, value) records, in memory or through sorted runs spilled to `path`.
pub(super) struct Sorter {
    /// Pending sort records and where each starts.
    pending: Vec<u8>,
    starts: Vec<usize>,
    /// Sorted runs spilled to `path`: (offset, length).
    runs: Vec<(u64, u64)>,
    spill: Option<BufWriter<File>>,
    path: PathBuf,
    spilled_bytes: u64,
    /// Pending bytes that trigger a spill ([`RUN_BYTES`] by default).
    pub(super) run_bytes: usize,
}

impl Sorter {
    /// A sorter that spills to `path` (created only if a run is spilled).
    pub(super) fn new(path: PathBuf) -> Self {
        Sorter {
            pending: Vec::new(),
            starts: Vec::new(),
            runs: Vec::new(),
            spill: None,
            path,
            spilled_bytes: 0,
            run_bytes: RUN_BYTES,
        }
    }

    /// Adds a record; spills a sorted run when the pending ones reach `run_bytes`.
    ///
    /// # Errors
    /// IO errors writing the spill file.
    pub(super) fn push(&mut self, key: &[u8], value: Value<'_>) -> Result<()> {
        if self.pending.capacity() == 0 {
            // Room for a whole run at once (plus the record that crosses the threshold): growing
            // by doubling would copy it and leave the old buffer behind, up to twice the budget.
            self.pending.reserve_exact(self.run_bytes + 2 * PAGE);
        }
        self.starts.push(self.pending.len());
        encode(&mut self.pending, key, value);
        if self.pending.len() + self.starts.len() * 8 >= self.run_bytes {
            self.spill_run()?;
        }
        Ok(())
    }

    fn sort_pending(&mut self) {
        let pending = &self.pending;
        self.starts.sort_unstable_by(|&a, &b| record_key(pending, a).cmp(record_key(pending, b)));
    }

    /// Sorts the pending records and appends them to the spill file as one run.
    fn spill_run(&mut self) -> Result<()> {
        if self.starts.is_empty() {
            return Ok(());
        }
        self.sort_pending();
        if self.spill.is_none() {
            let file = storage::create(&self.path).map_err(io(&self.path))?;
            self.spill = Some(BufWriter::with_capacity(1 << 20, file));
        }
        let spill = self.spill.as_mut().expect("just created");
        let start = self.spilled_bytes;
        for &at in &self.starts {
            let (_, _, len) = decode(&self.pending[at..]);
            spill.write_all(&self.pending[at..at + len]).map_err(io(&self.path))?;
            self.spilled_bytes += len as u64;
        }
        self.runs.push((start, self.spilled_bytes - start));
        self.pending.clear();
        self.starts.clear();
        Ok(())
    }

    /// Calls `each` with every record in key order (equal keys in the order they were pushed
    /// when they were spilled in different runs), then removes the spill file.
    ///
    /// # Errors
    /// IO errors on the spill file, or the first error of `each`.
    pub(super) fn finish(mut self, mut each: impl FnMut(&[u8], Value<'_>) -> Result<()>) -> Result<()> {
        if self.runs.is_empty() {
            self.sort_pending();
            for &at in &self.starts {
                let (key, value, _) = decode(&self.pending[at..]);
                each(key, value)?;
            }
            return Ok(());
        }
        self.spill_run()?;
        let mut spill = self.spill.take().expect("runs were spilled");
        // Merge FAN_IN runs at a time into longer ones (appended to the same file) until few
        // enough are left to merge into the tree: open files and buffers stay bounded.
        while self.runs.len() > FAN_IN {
            spill.flush().map_err(io(&self.path))?;
            let group: Vec<_> = self.runs.drain(..FAN_IN).collect();
            let start = self.spilled_bytes;
            merge_runs(&self.path, &group, |record| {
                self.spilled_bytes += record.len() as u64;
                spill.write_all(record).map_err(io(&self.path))
            })?;
            self.runs.push((start, self.spilled_bytes - start));
        }
        spill.into_inner().map_err(|e| io(&self.path)(e.into_error()))?;
        merge_runs(&self.path, &self.runs, |record| {
            let (key, value, _) = decode(record);
            each(key, value)
        })?;
        let _ = storage::remove_file(&self.path);
        Ok(())
    }
}

impl Drop for Sorter {
    fn drop(&mut self) {
        if self.spill.take().is_some() || !self.runs.is_empty() {
            let _ = storage::remove_file(&self.path);
        }
    }
}

/// Calls `each` with every record of the sorted `runs` of `path`, in key order (equal keys in
/// run order).
fn merge_runs(path: &Path, runs: &[(u64, u64)], mut each: impl FnMut(&[u8]) -> Result<()>) -> Result<()> {
    let mut heads = Vec::with_capacity(runs.len());
    for &(start, len) in runs {
        let mut file = storage::open(path).map_err(io(path))?;
        file.seek(SeekFrom::Start(start)).map_err(io(path))?;
        heads.push(RunReader { reader: BufReader::with_capacity(256 << 10, file.take(len)), record: Vec::new() });
    }
    let mut heap = BinaryHeap::new();
    for (i, head) in heads.iter_mut().enumerate() {
        if head.next().map_err(io(path))? {
            heap.push(Reverse((head.key().to_vec(), i)));
        }
    }
    while let Some(Reverse((_, i))) = heap.pop() {
        each(&heads[i].record)?;
        if heads[i].next().map_err(io(path))? {
            heap.push(Reverse((heads[i].key().to_vec(), i)));
        }
    }
    Ok(())
}

/// One spilled run, read record by record.
struct RunReader {
    reader: BufReader<std::io::Take<File>>,
    record: Vec<u8>,
}

impl RunReader {
    /// Reads the next record; false at the end of the run.
    fn next(&mut self) -> std::io::Result<bool> {
        self.record.clear();
        let mut klen = [0u8; 2];
        match self.reader.read_exact(&mut klen) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
            Err(e) => return Err(e),
        }
        let klen = u16::from_le_bytes(klen) as usize;
        self.record.extend_from_slice(&(klen as u16).to_le_bytes());
        self.record.resize(2 + klen + 5, 0);
        self.reader.read_exact(&mut self.record[2..])?;
        let kind = self.record[2 + klen];
        let len = u32::from_le_bytes(self.record[3 + klen..7 + klen].try_into().unwrap()) as usize;
        let rest = if kind == 0 { len } else { 8 };
        let at = self.record.len();
        self.record.resize(at + rest, 0);
        self.reader.read_exact(&mut self.record[at..])?;
        Ok(true)
    }

    fn key(&self) -> &[u8] {
        record_key(&self.record, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records come back in key order from memory and from spilled runs, through several merge
    /// passes (more than [`FAN_IN`] runs), values intact, and the spill file is removed.
    #[test]
    fn records_come_back_in_key_order() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let keys: Vec<Vec<u8>> = (0..3000).map(|i: u32| format!("{:08}", (i * 7919) % 3000).into_bytes()).collect();
        for run_bytes in [RUN_BYTES, 4096, 300] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("runs");
            let mut sorter = Sorter::new(path.clone());
            sorter.run_bytes = run_bytes;
            let mut expected = Vec::new();
            for key in &keys {
                let value = if rng.random_bool(0.5) {
                    let len = rng.random_range(0..50);
                    sorter.push(key, Value::Inline(&key[..len.min(key.len())])).unwrap();
                    (0, len.min(key.len()) as u64)
                } else {
                    let pgno = rng.random_range(2..1 << 40);
                    sorter.push(key, Value::Overflow { pgno, len: 9 }).unwrap();
                    (1, pgno)
                };
                expected.push((key.clone(), value));
            }
            let runs = sorter.runs.len();
            assert_eq!(runs > FAN_IN, run_bytes == 300, "{runs} runs of {run_bytes} bytes");
            expected.sort();
            let mut got = Vec::new();
            sorter
                .finish(|key, value| {
                    got.push(match value {
                        Value::Inline(v) => {
                            assert_eq!(v, &key[..v.len()]);
                            (key.to_vec(), (0, v.len() as u64))
                        }
                        Value::Overflow { pgno, len } => {
                            assert_eq!(len, 9);
                            (key.to_vec(), (1, pgno))
                        }
                    });
                    Ok(())
                })
                .unwrap();
            assert_eq!(got, expected, "runs of {run_bytes} bytes");
            assert!(!path.exists());
        }
    }
}
