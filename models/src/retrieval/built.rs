//! Index directories made by `cnclip build-index`: one FAISS IVF index trained once, copies of
//! it filled shard by shard, and (unless the build kept them apart) their inverted lists merged
//! into one index.
//!
//! ```text
//! DIR/manifest.json        what was built from what (below); written atomically after each step
//! DIR/trained.index        the trained, empty IVF index every shard is a copy of
//! DIR/shard-NNNNN.index    rows [N·shard_rows, (N+1)·shard_rows) of the table, FAISS ids = table ids
//! DIR/merged.index         every shard's lists merged (absent with --no-merge)
//! DIR/shard-NNNNN.vectors  with `…,RFlat`: the shard's exact vectors, and
//! DIR/shard-NNNNN.ids      their id → row map, which re-rank candidates ([`super::refine`])
//! DIR/ids.map              with `…,RFlat` and shards of overlapping id ranges: id → shard, row
//! ```
//!
//! The FAISS ids are the table's int64 ids, so a search needs no gallery file: its labels are
//! the answer. A directory is searched through its merged index, or else through each shard in
//! turn, the per-shard top-k merged by score (ties by id). Both give the same neighbours and
//! scores: the shards share the trained centroids and codebooks, a vector's code and list are
//! the same in its shard as in the merged index, so every score is computed the same way, and a
//! vector in the global top-k is in its own shard's top-k.

use std::path::{Path, PathBuf};

use faiss::Index as _;
use faiss::index::IndexImpl;
use serde::{Deserialize, Serialize};

use super::error::{Error, Result};
use super::refine::RefineStore;
use cnclip_operators::Problems;
use cnclip_operators::storage;

/// The manifest's `format`.
pub const FORMAT: &str = "cnclip-index/1";
pub const MANIFEST: &str = "manifest.json";
pub const TRAINED: &str = "trained.index";
pub const MERGED: &str = "merged.index";
/// The only metric `build-index` builds: cn_clip's features are L2-normalised and compared by
/// inner product (= cosine).
pub const METRIC: &str = "inner_product";

/// The file of shard `number`.
pub fn shard_file(number: usize) -> String {
    format!("shard-{number:05}.index")
}

/// `DIR/manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    /// The FAISS factory string.
    pub index: String,
    pub dim: usize,
    pub metric: String,
    /// Inverted lists (IVF centroids).
    pub nlist: usize,
    /// The `nprobe` a search uses unless told otherwise.
    pub nprobe: usize,
    pub training: Training,
    /// Rows per shard: shard N holds rows [N·shard_rows, (N+1)·shard_rows) in table order.
    pub shard_rows: u64,
    /// What the shards depend on beyond the training (the rows per shard).
    pub shards_fingerprint: String,
    /// Finished shards, by number (a resumed build may leave gaps until it ends).
    pub shards: Vec<Shard>,
    /// The table's rows, once every shard is done.
    pub total_rows: Option<u64>,
    /// The merged index, once made.
    pub merged: Option<IndexFile>,
    /// The refinement stage (`…,RFlat`), if the index has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refine: Option<Refine>,
}

/// A refinement stage: candidates re-scored with the exact vectors kept on disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Refine {
    /// What is kept: `flat` (float32 vectors).
    pub kind: String,
    /// Candidates a search asks the compressed index for, per result (`k_factor · k`), unless
    /// it says otherwise.
    pub k_factor: usize,
    /// The global id map (`ids.map`), written when the shards' id ranges overlap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_map: Option<IndexFile>,
}

/// A shard's refinement files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardRefine {
    pub vectors: IndexFile,
    pub ids: IndexFile,
}

/// How the trained index was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Training {
    /// What the trained index depends on: the table's files (size, modification time), the id
    /// column, the factory string, the sample size and seed. A rerun with another keeps nothing.
    pub fingerprint: String,
    /// Vectors asked for (`--train-sample`).
    pub sample: usize,
    /// Vectors drawn (fewer when the table is smaller).
    pub rows: usize,
    pub seed: u64,
    pub seconds: f64,
    pub file: IndexFile,
}

/// One finished shard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Shard {
    pub number: usize,
    pub first_row: u64,
    pub rows: u64,
    pub min_id: Option<i64>,
    pub max_id: Option<i64>,
    pub seconds: f64,
    #[serde(flatten)]
    pub file: IndexFile,
    /// The shard's exact vectors, when the index has a refinement stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refine: Option<ShardRefine>,
}

impl Shard {
    /// Whether the shard's files are all there with their recorded sizes.
    pub fn intact(&self, dir: &Path) -> bool {
        self.file.intact(dir) && self.refine.as_ref().is_none_or(|r| r.vectors.intact(dir) && r.ids.intact(dir))
    }
}

/// A file of the directory and its size when written (a later size is a damaged file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexFile {
    pub file: String,
    pub bytes: u64,
}

impl IndexFile {
    /// Whether the file is there with its recorded size.
    pub fn intact(&self, dir: &Path) -> bool {
        storage::metadata(dir.join(&self.file)).is_ok_and(|m| m.is_file() && m.len() == self.bytes)
    }

    /// Checks the file is there with its recorded size.
    ///
    /// # Errors
    /// Missing, or of another size (truncated or replaced since it was written).
    pub fn check(&self, dir: &Path) -> Result<()> {
        let path = dir.join(&self.file);
        match storage::metadata(&path) {
            Err(source) => Err(Error::Missing { path, source }),
            Ok(m) if m.len() != self.bytes => Err(Error::Damaged { path, bytes: m.len(), written: self.bytes }),
            Ok(_) => Ok(()),
        }
    }
}

impl Manifest {
    /// Reads `dir/manifest.json`.
    ///
    /// # Errors
    /// Missing, unreadable, or not a build-index manifest.
    pub fn read(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST);
        let bytes = match storage::read(&path) {
            Ok(bytes) => bytes,
            Err(source) => return Err(Error::NoManifest { path, dir: dir.to_path_buf(), source }),
        };
        let manifest: Manifest = match serde_json::from_slice(&bytes) {
            Ok(manifest) => manifest,
            Err(source) => return Err(Error::ManifestJson { path, source }),
        };
        if manifest.format != FORMAT {
            return Err(Error::ManifestFormat { path, format: manifest.format });
        }
        Ok(manifest)
    }

    /// Writes `dir/manifest.json` atomically.
    ///
    /// # Errors
    /// The IO error.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        cnclip_operators::write_atomically(&dir.join(MANIFEST), |f| std::io::Write::write_all(f, &json))
    }

    /// Whether every row of the table is in a finished shard.
    pub fn complete(&self) -> bool {
        let Some(total) = self.total_rows else { return false };
        let mut next = 0;
        for (number, shard) in self.shards.iter().enumerate() {
            if shard.number != number || shard.first_row != next {
                return false;
            }
            next += shard.rows;
        }
        next == total
    }
}

/// A finished index directory, checked and ready to load.
#[derive(Debug, Clone)]
pub struct BuiltIndex {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl BuiltIndex {
    /// Reads and checks `dir`: a complete build whose index files are all there, with the sizes
    /// build-index recorded.
    ///
    /// # Errors
    /// Every problem found.
    pub fn open(dir: &Path) -> Result<BuiltIndex, Problems> {
        let manifest = Manifest::read(dir).map_err(|e| Problems(vec![e.to_string()]))?;
        if !manifest.complete() {
            return Err(Problems(vec![format!(
                "{}: the build did not finish (rerun the same `cnclip build-index` to complete it)",
                dir.display()
            )]));
        }
        let problem = |file: &IndexFile| file.check(dir).err().map(|e| e.to_string());
        let mut problems: Vec<String> = match &manifest.merged {
            Some(merged) => problem(merged).into_iter().collect(),
            None => manifest.shards.iter().filter_map(|s| problem(&s.file)).collect(),
        };
        if let Some(refine) = &manifest.refine {
            problems.extend(refine.id_map.iter().filter_map(problem));
            for shard in &manifest.shards {
                match &shard.refine {
                    Some(refine) => problems.extend([&refine.vectors, &refine.ids].into_iter().filter_map(problem)),
                    None => {
                        problems.push(Error::NoRefinement { dir: dir.to_path_buf(), shard: shard.number }.to_string())
                    }
                }
            }
        }
        if problems.is_empty() { Ok(BuiltIndex { dir: dir.to_path_buf(), manifest }) } else { Err(Problems(problems)) }
    }

    /// The files a search reads: the merged index, or every shard.
    pub fn files(&self) -> Vec<PathBuf> {
        match &self.manifest.merged {
            Some(merged) => vec![self.dir.join(&merged.file)],
            None => self.manifest.shards.iter().map(|s| self.dir.join(&s.file.file)).collect(),
        }
    }

    /// Loads the indexes a search goes through: in memory (as much as the merged index), or,
    /// with `mapped`, with their inverted lists memory-mapped ([`super::ivf::read_mapped`]).
    ///
    /// # Errors
    /// A file FAISS cannot read, or an index other than the manifest says.
    pub fn load(&self, mapped: bool) -> Result<Vec<IndexImpl>> {
        let mut indexes = Vec::new();
        for path in self.files() {
            let index = if mapped { super::ivf::read_mapped(&path)? } else { read(&path)? };
            if index.d() as usize != self.manifest.dim || !index.is_trained() {
                let (d, trained) = (index.d(), index.is_trained());
                return Err(Error::IndexShape { path, d, trained, dim: self.manifest.dim });
            }
            indexes.push(index);
        }
        Ok(indexes)
    }

    /// Maps the refinement vectors, if the index has a refinement stage.
    ///
    /// # Errors
    /// As [`RefineStore::open`].
    pub fn refine_store(&self) -> Result<Option<RefineStore>> {
        match &self.manifest.refine {
            Some(_) => RefineStore::open(&self.dir, &self.manifest).map(Some),
            None => Ok(None),
        }
    }
}

/// Reads a FAISS index file.
///
/// # Errors
/// FAISS's message, naming the file.
pub fn read(path: &Path) -> Result<IndexImpl> {
    faiss::read_index(path.to_string_lossy()).map_err(|source| Error::Unreadable { path: path.to_path_buf(), source })
}

/// Writes `index` to `path` atomically (a temporary file beside it, synced, then renamed);
/// returns its size.
///
/// # Errors
/// FAISS's or the file system's message, naming the file.
pub fn write_atomically(index: &IndexImpl, path: &Path) -> Result<u64> {
    let tmp = storage::staging::temp_path(path);
    let result = (|| {
        faiss::write_index(index, tmp.to_string_lossy())
            .map_err(|source| Error::WriteIndex { path: path.to_path_buf(), source })?;
        let write = |source| Error::Write { path: path.to_path_buf(), source };
        let bytes = storage::open(&tmp).and_then(|f| f.sync_all().and_then(|()| f.metadata())).map_err(write)?.len();
        storage::rename(&tmp, path).map_err(write)?;
        Ok(bytes)
    })();
    if result.is_err() {
        let _ = storage::remove_file(&tmp);
    }
    result
}

/// The top `k` of each query (`queries` back to back, `dim` values each) over all `indexes`
/// (labels = ids): by score, highest first, ties by the smaller id.
///
/// A FAISS top-k breaks ties at the k-th score by scan order, which differs between a shard
/// and the merged index (and product-quantized codes do tie: equal codes in a list score the
/// same). So each index is asked for more than `k` and, for a query whose last returned score
/// still equals its k-th, asked again for four times as many, until every vector tied with
/// the k-th is in hand; the top `k` by (score, id) is then the same whichever indexes hold the
/// vectors.
///
/// # Errors
/// FAISS's.
pub fn search(indexes: &mut [IndexImpl], queries: &[f32], dim: usize, k: usize) -> Result<Vec<Vec<(i64, f32)>>> {
    let n = queries.len() / dim.max(1);
    let mut hits: Vec<Vec<(i64, f32)>> = vec![Vec::new(); n];
    for index in indexes.iter_mut() {
        let total = index.ntotal() as usize;
        let mut pending: Vec<usize> = (0..n).collect();
        let mut width = (2 * k).max(k + 8).min(total);
        while !pending.is_empty() && width > 0 {
            let batch: Vec<f32> =
                pending.iter().flat_map(|&q| queries[q * dim..(q + 1) * dim].iter().copied()).collect();
            let found = index.search(&batch, width).map_err(Error::Faiss)?;
            let mut again = Vec::new();
            for (at, &q) in pending.iter().enumerate() {
                let mut mine: Vec<(i64, f32)> = (at * width..(at + 1) * width)
                    .filter_map(|j| {
                        let id = found.labels[j].to_native();
                        (id >= 0).then_some((id, found.distances[j]))
                    })
                    .collect();
                sort_hits(&mut mine);
                // Full, and the last score ties the k-th: more tied vectors may be left out.
                if width < total && mine.len() == width && k > 0 && mine[width - 1].1 == mine[k - 1].1 {
                    again.push(q);
                } else {
                    mine.truncate(k);
                    hits[q].extend(mine);
                }
            }
            pending = again;
            width = (width * 4).min(total);
        }
    }
    for mine in &mut hits {
        sort_hits(mine);
        mine.truncate(k);
    }
    Ok(hits)
}

/// [`search`] through a refinement stage: `k_factor · k` candidates from `indexes`, re-scored
/// with the exact vectors of `store`, the top `k` by exact score (ties by the smaller id).
///
/// # Errors
/// FAISS's, or a candidate `store` lacks.
pub fn search_refined(
    indexes: &mut [IndexImpl],
    store: &RefineStore,
    queries: &[f32],
    dim: usize,
    k: usize,
    k_factor: usize,
) -> Result<Vec<Vec<(i64, f32)>>> {
    let candidates = search(indexes, queries, dim, k.saturating_mul(k_factor.max(1)))?;
    store.rerank(queries, candidates, k)
}

/// By score, highest first, ties by the smaller id.
fn sort_hits(hits: &mut [(i64, f32)]) {
    hits.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
}

#[cfg(test)]
mod tests {
    use faiss::Idx;

    use super::*;

    fn flat(vectors: &[f32], ids: &[i64]) -> IndexImpl {
        let mut index = faiss::index_factory(2, "IDMap,Flat", faiss::MetricType::InnerProduct).unwrap();
        let ids: Vec<Idx> = ids.iter().map(|&id| Idx::new(id as u64)).collect();
        index.add_with_ids(vectors, &ids).unwrap();
        index
    }

    #[test]
    fn ties_at_the_kth_score_go_to_the_smaller_ids_whichever_index_holds_them() {
        // 30 copies of one vector (all tied) with scattered ids, and a few better and worse ones.
        let mut vectors = Vec::new();
        let mut ids = Vec::new();
        for i in 0..30 {
            vectors.extend([1.0, 0.0]);
            ids.push(1000 - 7 * i);
        }
        for (id, v) in [(5, [2.0, 0.0]), (6, [3.0, 0.0]), (7, [0.5, 0.0])] {
            vectors.extend(v);
            ids.push(id);
        }
        let query = [1.0f32, 0.0];
        let expected: Vec<(i64, f32)> = [(6, 3.0), (5, 2.0), (797, 1.0), (804, 1.0), (811, 1.0)].into_iter().collect();
        let mut one = [flat(&vectors, &ids)];
        assert_eq!(search(&mut one, &query, 2, 5).unwrap()[0], expected);
        // The same vectors in three indexes, in another order.
        let parts = [(20, 33), (0, 7), (7, 20)];
        let mut three: Vec<IndexImpl> = parts.iter().map(|&(a, b)| flat(&vectors[2 * a..2 * b], &ids[a..b])).collect();
        assert_eq!(search(&mut three, &query, 2, 5).unwrap()[0], expected);
        // Fewer vectors than k: all of them.
        let mut small = [flat(&vectors[..4], &ids[..2])];
        assert_eq!(search(&mut small, &query, 2, 5).unwrap()[0], vec![(993, 1.0), (1000, 1.0)]);
    }

    #[test]
    fn a_manifest_is_complete_only_when_its_shards_cover_the_table() {
        let file = |name: &str| IndexFile { file: name.into(), bytes: 1 };
        let shard = |number: usize, first_row: u64, rows: u64| Shard {
            number,
            first_row,
            rows,
            min_id: None,
            max_id: None,
            seconds: 0.0,
            file: file(&shard_file(number)),
            refine: None,
        };
        let mut manifest = Manifest {
            format: FORMAT.into(),
            index: "IVF4,Flat".into(),
            dim: 8,
            metric: METRIC.into(),
            nlist: 4,
            nprobe: 1,
            training: Training {
                fingerprint: String::new(),
                sample: 10,
                rows: 10,
                seed: 0,
                seconds: 0.0,
                file: file(TRAINED),
            },
            shard_rows: 10,
            shards_fingerprint: String::new(),
            shards: vec![shard(0, 0, 10), shard(1, 10, 5)],
            total_rows: None,
            merged: None,
            refine: None,
        };
        assert!(!manifest.complete());
        manifest.total_rows = Some(15);
        assert!(manifest.complete());
        manifest.shards.remove(0);
        assert!(!manifest.complete());
        let json = serde_json::to_string(&manifest).unwrap();
        assert_eq!(serde_json::from_str::<Manifest>(&json).unwrap(), manifest);
    }
}
