//! The end-of-job check: `data.mdb` is read back from the file, through a descriptor of its
//! own, and walked as LMDB would, independently of the code that wrote it.
//!
//! The writer's own counters prove nothing about the bytes on disk, so this re-derives
//! everything from the file: the meta pages (LMDB's checks, and the loader's layout: an empty
//! free list), then the B-tree from the root down: every branch and leaf page within the file
//! and of the type its level calls for, every node within its page, every key in strictly
//! increasing order across the whole tree and within the range its branch keys give it, every
//! overflow value's pages within the file. Each page of the file must be accounted for exactly
//! once (the two meta pages, the tree's pages and the overflow pages, nothing shared, nothing
//! left over), and depth, page counts and entries must equal the meta page's, the entries also
//! the number of puts. It reads the leaf and branch pages only (overflow page numbers come
//! from the leaf nodes, not from reading the values), a small fraction of the file.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Error, Result, io};
use crate::lmdb_file::page::{Header, Meta, NodePage, P_BRANCH, P_LEAF, PAGE, Value, overflow_pages};
use crate::lmdb_file::{PageError, VerifyError};
use crate::storage;

/// Checks the LMDB file `path` (a `data.mdb` the bulk loader wrote) holds a well-formed tree
/// of `expected_entries` entries, with every page accounted for.
///
/// # Errors
/// [`Error::LmdbCheck`] naming `path` and what is wrong; IO errors reading it.
pub(crate) fn verify(path: &Path, expected_entries: u64) -> Result<()> {
    let file = storage::open(path).map_err(io(path))?;
    let bytes = file.metadata().map_err(io(path))?.len();
    walk(&file, bytes, expected_entries).map_err(|e| match e {
        Failure::Io(source) => io(path)(source),
        Failure::Bad(problem) => Error::LmdbCheck { path: path.display().to_string(), problem },
    })
}

enum Failure {
    Io(std::io::Error),
    Bad(VerifyError),
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::Io(e)
    }
}

impl From<VerifyError> for Failure {
    fn from(e: VerifyError) -> Self {
        Failure::Bad(e)
    }
}

fn walk(file: &File, bytes: u64, expected_entries: u64) -> Result<(), Failure> {
    if !bytes.is_multiple_of(PAGE as u64) || bytes < 2 * PAGE as u64 {
        return Err(VerifyError::Size { bytes }.into());
    }
    let pages = bytes / PAGE as u64;
    let mut page = vec![0u8; PAGE];
    let mut metas = Vec::with_capacity(2);
    for pgno in 0..2 {
        file.read_exact_at(&mut page, pgno * PAGE as u64)?;
        metas.push(Meta::read(pgno, &page).map_err(|reason| VerifyError::Meta { pgno, reason })?);
    }
    // LMDB uses the meta page with the higher transaction id.
    let (pgno, meta) = if metas[1].txnid > metas[0].txnid { (1, &metas[1]) } else { (0, &metas[0]) };
    let last_page = meta.last_page;
    if last_page + 1 != pages {
        return Err(VerifyError::Length { pages, last_page }.into());
    }
    if meta.map_size < bytes {
        let reason = PageError::MapSize { map_size: meta.map_size, bytes };
        return Err(VerifyError::Meta { pgno, reason }.into());
    }
    let db = meta.main;
    let mut walk = Walk {
        file,
        last_page,
        depth: db.depth,
        seen: vec![0; pages.div_ceil(64) as usize],
        branch_pages: 0,
        leaf_pages: 0,
        overflow_pages: 0,
        entries: 0,
        previous: None,
    };
    walk.seen[0] |= 0b11; // the meta pages
    if db.is_empty() {
        if db.depth != 0 {
            let reason = PageError::EmptyWithDepth { depth: db.depth };
            return Err(VerifyError::Meta { pgno, reason }.into());
        }
    } else {
        if db.depth == 0 {
            let reason = PageError::RootAtDepthZero { root: db.root };
            return Err(VerifyError::Meta { pgno, reason }.into());
        }
        walk.visit(db.root, pgno, 1, None, None)?;
    }
    for (what, found, recorded) in [
        ("branch pages", walk.branch_pages, db.branch_pages),
        ("leaf pages", walk.leaf_pages, db.leaf_pages),
        ("overflow pages", walk.overflow_pages, db.overflow_pages),
        ("entries", walk.entries, db.entries),
    ] {
        if found != recorded {
            return Err(VerifyError::Count { what, found, recorded }.into());
        }
    }
    if walk.entries != expected_entries {
        return Err(VerifyError::Entries { found: walk.entries, expected: expected_entries }.into());
    }
    let unseen = (0..pages).filter(|&p| walk.seen[p as usize / 64] & (1 << (p % 64)) == 0);
    let (count, first) = unseen.fold((0, None), |(n, first), p| (n + 1, first.or(Some(p))));
    match first {
        Some(first) => Err(VerifyError::Unaccounted { count, first }.into()),
        None => Ok(()),
    }
}

struct Walk<'a> {
    file: &'a File,
    last_page: u64,
    depth: u16,
    /// One bit per page of the file: accounted for.
    seen: Vec<u64>,
    branch_pages: u64,
    leaf_pages: u64,
    overflow_pages: u64,
    entries: u64,
    /// The last key seen, in tree order (`None` before the first).
    previous: Option<Vec<u8>>,
}

fn show(key: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(key))
}

impl Walk<'_> {
    /// Accounts for pages `first..first + count` of the tree, reached from page `from`.
    fn mark(&mut self, first: u64, count: u64, from: u64) -> Result<(), VerifyError> {
        if first < 2 || first.checked_add(count).is_none_or(|end| end > self.last_page + 1) {
            return Err(VerifyError::OutOfBounds { pgno: first, pages: count, from, last_page: self.last_page });
        }
        for pgno in first..first + count {
            let (word, bit) = (pgno as usize / 64, 1u64 << (pgno % 64));
            if self.seen[word] & bit != 0 {
                return Err(VerifyError::Twice { pgno, from });
            }
            self.seen[word] |= bit;
        }
        Ok(())
    }

    /// Walks the subtree at `pgno` (reached from page `from`), `level` 1 at the root; its keys
    /// must be `>= low` and `< high`.
    fn visit(
        &mut self,
        pgno: u64,
        from: u64,
        level: u16,
        low: Option<&[u8]>,
        high: Option<&[u8]>,
    ) -> Result<(), Failure> {
        self.mark(pgno, 1, from)?;
        let mut bytes = vec![0u8; PAGE];
        self.file.read_exact_at(&mut bytes, pgno * PAGE as u64)?;
        let leaf = level == self.depth;
        let (expected, flags) = if leaf { ("leaf", P_LEAF) } else { ("branch", P_BRANCH) };
        let found = Header::read(&bytes).flags;
        if found != flags {
            return Err(VerifyError::PageType { pgno, expected, flags: found }.into());
        }
        let bad = |reason: PageError| VerifyError::Page { pgno, reason };
        let page = NodePage::read(pgno, &bytes).map_err(bad)?;
        let order = |detail: String| VerifyError::KeyOrder { pgno, detail };
        if leaf {
            self.leaf_pages += 1;
            for i in 0..page.count {
                let node = page.node(i).map_err(bad)?;
                let key = node.key;
                if let Some(previous) = &self.previous
                    && key <= &previous[..]
                {
                    return Err(order(format!("key {} comes after {}", show(key), show(previous))).into());
                }
                if let Some(low) = low.filter(|low| key < *low) {
                    return Err(order(format!("key {} is below its branch key {}", show(key), show(low))).into());
                }
                if let Some(high) = high.filter(|high| key >= *high) {
                    return Err(
                        order(format!("key {} is not below the next branch key {}", show(key), show(high))).into()
                    );
                }
                if let Value::Overflow { pgno: first, len } =
                    node.value().map_err(|e| bad(PageError::Key { key: show(key), source: e.into() }))?
                {
                    let count = overflow_pages(len as usize);
                    self.mark(first, count, pgno)?;
                    self.overflow_pages += count;
                }
                self.entries += 1;
                let previous = self.previous.get_or_insert_with(Vec::new);
                previous.clear();
                previous.extend_from_slice(key);
            }
        } else {
            self.branch_pages += 1;
            let nodes = (0..page.count).map(|i| page.node(i)).collect::<Result<Vec<_>, _>>().map_err(bad)?;
            for pair in nodes[1..].windows(2) {
                if pair[1].key <= pair[0].key {
                    let detail = format!("branch key {} comes after {}", show(pair[1].key), show(pair[0].key));
                    return Err(order(detail).into());
                }
            }
            for (i, node) in nodes.iter().enumerate() {
                // The first node's key is not used (LMDB leaves it empty).
                let low = if i == 0 { low } else { Some(node.key) };
                let high = nodes.get(i + 1).map_or(high, |next| Some(next.key));
                self.visit(node.child(), pgno, level + 1, low, high)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::sort::RUN_BYTES;
    use super::super::tests::{random_entries, write};
    use super::*;
    use crate::lmdb_file::page::HEADER;
    use std::path::PathBuf;

    const ENTRIES: usize = 3000;

    /// A copy of a written database (three levels, inline and overflow values) to corrupt.
    struct Copy {
        _dir: tempfile::TempDir,
        path: PathBuf,
        bytes: Vec<u8>,
        meta: Meta,
    }

    impl Copy {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            write(&dir.path().join("db"), &random_entries(ENTRIES, 11), RUN_BYTES).unwrap();
            let bytes = std::fs::read(dir.path().join("db/data.mdb")).unwrap();
            let meta = Meta::read(1, &bytes[PAGE..2 * PAGE]).unwrap();
            assert!(meta.main.depth >= 3 && meta.main.leaf_pages > 4, "a tree worth corrupting");
            let path = dir.path().join("copy.mdb");
            Copy { _dir: dir, path, bytes, meta }
        }

        /// The leaf pages (written after the overflow values, before the branch levels).
        fn leaves(&self) -> std::ops::RangeInclusive<u64> {
            let last_leaf = self.meta.last_page - self.meta.main.branch_pages;
            last_leaf + 1 - self.meta.main.leaf_pages..=last_leaf
        }

        fn page(&mut self, pgno: u64) -> &mut [u8] {
            &mut self.bytes[pgno as usize * PAGE..(pgno as usize + 1) * PAGE]
        }

        /// Writes the (corrupted) bytes and checks them: the problem found, with the file named.
        fn check(&self) -> VerifyError {
            std::fs::write(&self.path, &self.bytes).unwrap();
            match verify(&self.path, ENTRIES as u64) {
                Err(error @ Error::LmdbCheck { .. }) => {
                    let message = error.to_string();
                    assert!(message.starts_with(&format!("{}: ", self.path.display())), "{message}");
                    let Error::LmdbCheck { problem, .. } = error else { unreachable!() };
                    problem
                }
                other => panic!("expected a failed check, got {other:?}"),
            }
        }
    }

    #[test]
    fn what_the_writer_writes_checks_out() {
        for n in [0, 1, ENTRIES] {
            let dir = tempfile::tempdir().unwrap();
            write(dir.path(), &random_entries(n, n as u64), RUN_BYTES).unwrap(); // finish checks
            let path = dir.path().join("data.mdb");
            verify(&path, n as u64).unwrap();
            let error = verify(&path, n as u64 + 1).unwrap_err();
            assert!(matches!(&error, Error::LmdbCheck { problem: VerifyError::Entries { .. }, .. }), "{error}");
            assert!(error.to_string().ends_with(&format!("{n} entries in the file, {} were put", n + 1)), "{error}");
        }
    }

    /// (a) Two leaf pages swap contents (each keeping its own page number): the keys are no
    /// longer in order.
    #[test]
    fn swapped_leaf_pages_fail_the_check() {
        let mut copy = Copy::new();
        let (a, b) = (*copy.leaves().start() + 1, *copy.leaves().start() + 3);
        let page_a = copy.page(a).to_vec();
        let page_b = copy.page(b).to_vec();
        copy.page(a)[8..].copy_from_slice(&page_b[8..]);
        copy.page(b)[8..].copy_from_slice(&page_a[8..]);
        let problem = copy.check();
        assert!(matches!(problem, VerifyError::KeyOrder { pgno, .. } if pgno == a || pgno == b), "{problem}");
        assert!(problem.to_string().starts_with("keys out of order on page"), "{problem}");
    }

    /// (b) A file cut short, by a page or mid-page.
    #[test]
    fn a_truncated_file_fails_the_check() {
        let mut copy = Copy::new();
        let pages = copy.meta.last_page + 1;
        copy.bytes.truncate(copy.bytes.len() - PAGE);
        assert_eq!(copy.check(), VerifyError::Length { pages: pages - 1, last_page: pages - 1 });
        copy.bytes.truncate(copy.bytes.len() - 100);
        assert_eq!(copy.check(), VerifyError::Size { bytes: (pages - 1) * PAGE as u64 - 100 });
        copy.bytes.truncate(PAGE);
        assert_eq!(copy.check(), VerifyError::Size { bytes: PAGE as u64 });
    }

    /// (c) A leaf page marked as a branch, the root marked as a leaf, a leaf's header naming
    /// another page.
    #[test]
    fn a_wrong_page_type_fails_the_check() {
        let mut copy = Copy::new();
        let leaf = *copy.leaves().end();
        copy.page(leaf)[10..12].copy_from_slice(&P_BRANCH.to_le_bytes());
        assert_eq!(copy.check(), VerifyError::PageType { pgno: leaf, expected: "leaf", flags: P_BRANCH });
        copy.page(leaf)[10..12].copy_from_slice(&P_LEAF.to_le_bytes());
        let root = copy.meta.main.root;
        copy.page(root)[10..12].copy_from_slice(&P_LEAF.to_le_bytes());
        assert_eq!(copy.check(), VerifyError::PageType { pgno: root, expected: "branch", flags: P_LEAF });
        copy.page(root)[10..12].copy_from_slice(&P_BRANCH.to_le_bytes());
        copy.page(leaf)[..8].copy_from_slice(&(leaf - 1).to_le_bytes());
        assert!(matches!(copy.check(), VerifyError::Page { pgno, .. } if pgno == leaf));
    }

    /// Pages that are counted twice or not at all, and counts that differ from the meta page's.
    #[test]
    fn every_page_is_accounted_for_once() {
        let mut copy = Copy::new();
        // Two overflow values of one leaf made to share pages.
        let overflow_nodes = |pgno: u64, page: &[u8]| -> Vec<usize> {
            let nodes = NodePage::read(pgno, page).unwrap();
            (0..nodes.count)
                .map(|i| nodes.node(i).unwrap())
                .filter(|node| matches!(node.value(), Ok(Value::Overflow { .. })))
                .map(|node| node.key.as_ptr() as usize + node.key.len() - page.as_ptr() as usize)
                .collect()
        };
        let leaf = copy.leaves().find(|&pgno| overflow_nodes(pgno, copy.page(pgno)).len() >= 2).unwrap();
        let page = copy.page(leaf).to_vec();
        let big = overflow_nodes(leaf, &page);
        let (first, second) = (big[0], big[1]);
        let shared = u64::from_le_bytes(page[first..first + 8].try_into().unwrap());
        copy.page(leaf)[second..second + 8].copy_from_slice(&shared.to_le_bytes());
        let problem = copy.check();
        assert!(matches!(problem, VerifyError::Twice { pgno, from } if pgno == shared && from == leaf), "{problem}");
        copy.page(leaf).copy_from_slice(&page);

        // An overflow value past the end of the file.
        let last = copy.meta.last_page;
        copy.page(leaf)[second..second + 8].copy_from_slice(&(last + 1).to_le_bytes());
        let problem = copy.check();
        assert!(
            matches!(problem, VerifyError::OutOfBounds { pgno, from, .. } if pgno == last + 1 && from == leaf),
            "{problem}"
        );
        copy.page(leaf).copy_from_slice(&page);

        // A page nothing points to.
        let last_pg_at = HEADER + 120;
        copy.bytes.extend_from_slice(&[0; PAGE]);
        copy.page(1)[last_pg_at..last_pg_at + 8].copy_from_slice(&(last + 1).to_le_bytes());
        assert_eq!(copy.check(), VerifyError::Unaccounted { count: 1, first: last + 1 });
        copy.bytes.truncate(copy.bytes.len() - PAGE);
        copy.page(1)[last_pg_at..last_pg_at + 8].copy_from_slice(&last.to_le_bytes());

        // The meta page's counts.
        let entries_at = HEADER + 72 + 32;
        copy.page(1)[entries_at..entries_at + 8].copy_from_slice(&(ENTRIES as u64 - 1).to_le_bytes());
        let recorded = ENTRIES as u64 - 1;
        assert_eq!(copy.check(), VerifyError::Count { what: "entries", found: ENTRIES as u64, recorded });
    }
}
