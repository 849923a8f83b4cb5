//! [`IvfIndex`]: a FAISS inverted-file (IVF) index over inner products, as `build-index` makes
//! it — made from a factory string, trained, copied, filled with ids, merged, read and written
//! atomically — so that jobs use FAISS through this crate only.
//!
//! Three calls the `faiss` crate does not wrap are FAISS's C API here: recognising an IVF
//! index, its list count, and moving one IVF index's inverted lists into another
//! (`IndexIVF::merge_from`), which is how `build-index` joins shards that were added
//! independently to copies of one trained index. The functions are FAISS's own C API (`c_api/IndexIVF_c.h`), compiled into the static
//! `faiss_c` library that `faiss-sys` links; they are declared here rather than taken from
//! `faiss-sys` so that this crate needs no second FAISS dependency. Index pointers are passed as
//! `c_void`: the C API's `FaissIndex*`/`FaissIndexIVF*` are opaque pointers, so the ABI is the
//! same.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::path::Path;

use faiss::index::{IndexImpl, TryClone};
use faiss::{Idx, Index as _, MetricType};

use super::error::{Error, Result};

/// A FAISS IVF index with the inner-product metric.
pub struct IvfIndex(IndexImpl);

impl IvfIndex {
    /// An empty, untrained index from a factory string.
    ///
    /// # Errors
    /// FAISS does not accept `description`, or it is not a plain IVF index.
    pub fn new(dim: usize, description: &str) -> Result<IvfIndex> {
        super::factory::check(description)?;
        let index = faiss::index_factory(dim as u32, description, MetricType::InnerProduct)
            .map_err(|faiss| Error::Factory { description: description.to_string(), dim, faiss })?;
        IvfIndex::from_index(index).map_err(|_| Error::NotIvf { description: description.to_string() })
    }

    fn from_index(index: IndexImpl) -> Result<IvfIndex, IndexImpl> {
        if ivf_ptr(&index).is_some() { Ok(IvfIndex(index)) } else { Err(index) }
    }

    /// Reads an index file.
    ///
    /// # Errors
    /// FAISS cannot read it, or it is not an IVF index.
    pub fn read(path: &Path) -> Result<IvfIndex> {
        let index = crate::retrieval::built::read(path)?;
        IvfIndex::from_index(index).map_err(|_| Error::NotIvfFile { path: path.to_path_buf() })
    }

    /// Writes the index to `path` atomically; returns its size.
    ///
    /// # Errors
    /// As [`crate::retrieval::built::write_atomically`].
    pub fn write_atomically(&self, path: &Path) -> Result<u64> {
        crate::retrieval::built::write_atomically(&self.0, path)
    }

    pub fn nlist(&self) -> usize {
        nlist(&self.0).expect("an IvfIndex is an IVF index")
    }

    pub fn dim(&self) -> usize {
        self.0.d() as usize
    }

    pub fn ntotal(&self) -> u64 {
        self.0.ntotal()
    }

    /// Trains the coarse quantizer (k-means, `nlist` centroids) and the codec on `sample`
    /// (vectors back to back).
    ///
    /// # Errors
    /// FAISS's, e.g. a sample smaller than a k-means it runs (the lists, or PQ's 256 centroids).
    pub fn train(&mut self, sample: &[f32]) -> Result<()> {
        self.0.train(sample).map_err(Error::FaissRefused)
    }

    /// An independent copy (trained centroids and codebooks included).
    ///
    /// # Errors
    /// FAISS's.
    pub fn try_clone(&self) -> Result<IvfIndex> {
        self.0.try_clone().map(IvfIndex).map_err(Error::Faiss)
    }

    /// Adds `vectors` (back to back) with their `ids` (not negative: FAISS's -1 is "no result").
    ///
    /// # Errors
    /// FAISS's, or a negative id.
    pub fn add_with_ids(&mut self, vectors: &[f32], ids: &[i64]) -> Result<()> {
        if let Some(&id) = ids.iter().find(|&&id| id < 0) {
            return Err(Error::NegativeId { id });
        }
        let ids: Vec<Idx> = ids.iter().map(|&id| Idx::new(id as u64)).collect();
        self.0.add_with_ids(vectors, &ids).map_err(Error::FaissRefused)
    }

    /// Moves every entry of `other` into this index (see [`merge_from`]).
    ///
    /// # Errors
    /// As [`merge_from`].
    pub fn merge_from(&mut self, other: &mut IvfIndex) -> Result<()> {
        merge_from(&mut self.0, &mut other.0)
    }

    /// The FAISS index.
    pub fn into_inner(self) -> IndexImpl {
        self.0
    }
}

unsafe extern "C" {
    /// `dynamic_cast<IndexIVF*>`: null when the index is not an IVF index.
    fn faiss_IndexIVF_cast(index: *mut c_void) -> *mut c_void;
    fn faiss_IndexIVF_nlist(index: *const c_void) -> usize;
    /// Moves `other`'s entries to `index` (adding `add_id` to their ids); `other` is left empty.
    fn faiss_IndexIVF_merge_from(index: *mut c_void, other: *mut c_void, add_id: i64) -> c_int;
    /// The message of the last exception a C API call on this thread caught.
    fn faiss_get_last_error() -> *const c_char;
    /// `faiss::read_index(fname, io_flags)`; the new index in `*out`.
    fn faiss_read_index_fname(fname: *const c_char, io_flags: c_int, out: *mut *mut c_void) -> c_int;
}

/// FAISS's `IO_FLAG_MMAP` (`index_io.h`: `IO_FLAG_SKIP_IVF_DATA | 0x646f0000`): an IVF index's
/// inverted lists are not read but memory-mapped from the file (as `OnDiskInvertedLists`). The
/// `faiss` crate's `IoFlags` holds 16 bits and cannot pass it.
const IO_FLAG_MMAP: c_int = 8 | 0x646f_0000;

/// Reads an index file with its inverted lists memory-mapped, not loaded: the codes stay in the
/// file and the OS pages in the lists a search probes (page cache, shared between processes and
/// given back under memory pressure), so an index larger than memory can be searched. The index
/// is read-only.
///
/// # Errors
/// FAISS cannot read or map the file.
pub fn read_mapped(path: &Path) -> Result<IndexImpl> {
    use faiss::index::FromInnerPtr as _;
    let name = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::NulInPath { path: path.to_path_buf() })?;
    let mut out: *mut c_void = std::ptr::null_mut();
    // SAFETY: `name` is a NUL-terminated path that outlives the call and `out` a valid place for
    // the result; FAISS catches its exceptions and returns a non-zero code instead.
    let code = unsafe { faiss_read_index_fname(name.as_ptr(), IO_FLAG_MMAP, &mut out) };
    if code != 0 || out.is_null() {
        return Err(Error::NotMappable { path: path.to_path_buf(), message: last_error() });
    }
    // SAFETY: FAISS allocated a new `faiss::Index` for us; `IndexImpl` takes ownership and frees
    // it on drop (the C API's `FaissIndex*` is that same pointer).
    Ok(unsafe { IndexImpl::from_inner_ptr(out.cast()) })
}

/// The IVF index inside `index`, if it is one (a plain `IVF…` factory string; not one wrapped
/// in a pre-transform such as `OPQ…,IVF…` or a refinement such as `…,RFlat`).
fn ivf_ptr(index: &IndexImpl) -> Option<*mut c_void> {
    // SAFETY: `inner_ptr` is the live `faiss::Index*` that `index` owns; the cast only reads
    // its dynamic type and returns either null or the same object seen as an `IndexIVF*`.
    let ivf = unsafe { faiss_IndexIVF_cast(index.inner_ptr().cast()) };
    (!ivf.is_null()).then_some(ivf)
}

/// The number of inverted lists (IVF centroids) of `index`, or `None` when it is not an IVF
/// index.
pub fn nlist(index: &IndexImpl) -> Option<usize> {
    // SAFETY: `ivf_ptr` returned a valid `IndexIVF*` owned by `index`, which outlives the call.
    ivf_ptr(index).map(|ivf| unsafe { faiss_IndexIVF_nlist(ivf) })
}

/// Moves every entry of `other` into `index` (ids unchanged); `other` is empty afterwards.
///
/// # Errors
/// Either is not an IVF index, or FAISS finds them incompatible (another dimension, list
/// count, code size or index type — indexes trained apart have other centroids and must not be
/// merged; `build-index` only merges copies of one trained index).
pub fn merge_from(index: &mut IndexImpl, other: &mut IndexImpl) -> Result<()> {
    let (Some(to), Some(from)) = (ivf_ptr(index), ivf_ptr(other)) else {
        return Err(Error::MergeNotIvf);
    };
    // SAFETY: both pointers are live `IndexIVF*`s owned by `index` and `other`, which are
    // borrowed mutably for the call, so no other code touches either meanwhile (and they are
    // distinct objects: two `&mut` cannot alias). FAISS checks compatibility and throws
    // (caught by the C API, returned as a non-zero code) rather than merging mismatched lists.
    let code = unsafe { faiss_IndexIVF_merge_from(to, from, 0) };
    if code == 0 { Ok(()) } else { Err(Error::FaissCall { message: last_error() }) }
}

/// FAISS's message for the last failed C API call on this thread.
fn last_error() -> String {
    // SAFETY: FAISS returns null or a NUL-terminated string it owns (thread-local), valid until
    // the next C API call on this thread; it is copied at once.
    let message = unsafe { faiss_get_last_error() };
    if message.is_null() {
        return "FAISS failed without a message".into();
    }
    // SAFETY: non-null and NUL-terminated, as above.
    super::factory::words(&unsafe { CStr::from_ptr(message) }.to_string_lossy())
}

#[cfg(test)]
mod tests {
    use faiss::index::TryClone;
    use faiss::{Idx, Index, MetricType, index_factory};

    use super::*;

    fn vectors(n: usize, d: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n * d)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    }

    #[test]
    fn nlist_is_read_from_ivf_indexes_only() {
        let ivf = index_factory(8, "IVF4,Flat", MetricType::InnerProduct).unwrap();
        assert_eq!(nlist(&ivf), Some(4));
        let flat = index_factory(8, "Flat", MetricType::InnerProduct).unwrap();
        assert_eq!(nlist(&flat), None);
        let hnsw = index_factory(8, "HNSW8", MetricType::InnerProduct).unwrap();
        assert_eq!(nlist(&hnsw), None);
    }

    #[test]
    fn merging_two_halves_equals_adding_everything_to_one_copy() {
        let (d, n) = (8, 400);
        let data = vectors(n, d, 3);
        let mut trained = index_factory(d as u32, "IVF4,Flat", MetricType::InnerProduct).unwrap();
        trained.train(&data).unwrap();
        let ids: Vec<Idx> = (0..n as u64).map(|i| Idx::new(1000 + i)).collect();
        let mut whole = trained.try_clone().unwrap();
        whole.add_with_ids(&data, &ids).unwrap();
        let (mut first, mut second) = (trained.try_clone().unwrap(), trained.try_clone().unwrap());
        first.add_with_ids(&data[..n / 2 * d], &ids[..n / 2]).unwrap();
        second.add_with_ids(&data[n / 2 * d..], &ids[n / 2..]).unwrap();
        merge_from(&mut first, &mut second).unwrap();
        assert_eq!((first.ntotal(), second.ntotal()), (n as u64, 0));
        let queries = vectors(20, d, 9);
        let (a, b) = (whole.search(&queries, 10).unwrap(), first.search(&queries, 10).unwrap());
        assert_eq!(a.labels, b.labels);
        assert_eq!(a.distances, b.distances);
    }

    #[test]
    fn a_mapped_index_searches_as_the_loaded_one_with_its_lists_left_in_the_file() {
        let (d, n) = (8, 400);
        let data = vectors(n, d, 4);
        let mut index = index_factory(d as u32, "IVF4,PQ4x4np", MetricType::InnerProduct).unwrap();
        index.train(&data).unwrap();
        index.add(&data).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lists.index");
        faiss::write_index(&index, path.to_str().unwrap()).unwrap();
        let mut loaded = crate::retrieval::built::read(&path).unwrap();
        let mut mapped = read_mapped(&path).unwrap();
        assert_eq!(mapped.ntotal(), n as u64);
        let queries = vectors(20, d, 11);
        let (a, b) = (loaded.search(&queries, 5).unwrap(), mapped.search(&queries, 5).unwrap());
        assert_eq!(a.labels, b.labels);
        assert_eq!(a.distances, b.distances);
        // The lists are a mapping of the file, not a copy.
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        assert!(maps.contains(path.to_str().unwrap()), "{} is not mapped", path.display());
        drop(mapped);
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        assert!(!maps.contains(path.to_str().unwrap()), "unmapped on drop");
        // Not an index.
        std::fs::write(dir.path().join("junk.index"), b"junk").unwrap();
        assert!(read_mapped(&dir.path().join("junk.index")).unwrap_err().to_string().contains("junk.index"));
    }

    #[test]
    fn merging_incompatible_indexes_is_an_error() {
        let data = vectors(400, 8, 5);
        let mut four = index_factory(8, "IVF4,Flat", MetricType::InnerProduct).unwrap();
        four.train(&data).unwrap();
        let mut eight = index_factory(8, "IVF8,Flat", MetricType::InnerProduct).unwrap();
        eight.train(&data).unwrap();
        let error = merge_from(&mut four, &mut eight).unwrap_err().to_string();
        assert!(!error.is_empty(), "{error}");
        let mut flat = index_factory(8, "Flat", MetricType::InnerProduct).unwrap();
        assert_eq!(merge_from(&mut four, &mut flat).unwrap_err().to_string(), "only IVF indexes can be merged");
    }
}
