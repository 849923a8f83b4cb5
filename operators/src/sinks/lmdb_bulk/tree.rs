//! The B-tree, built bottom-up from entries that arrive in key order: full leaf pages first,
//! then one branch level after another until a single root is left.
//!
//! Apart from the writer because it is the one place that decides the tree's shape (which
//! keys share a page, how branch pages group their children); the bytes of each page come
//! from `lmdb_file::page`. Leaf pages are written as they fill, branch levels at the end (they
//! need the first key of every page below), all appended after the overflow values.

use std::fs::File;
use std::io::Write;

use crate::lmdb_file::page::{Db, F_BIGDATA, HEADER, NODE_HEADER, P_BRANCH, P_LEAF, PAGE, PageBuf, Value, even};

/// Packs sorted entries into full leaf pages, then builds the branch levels.
pub(super) struct TreeBuilder {
    next_page: u64,
    leaf: PageBuf,
    /// The first key of the leaf being filled.
    leaf_first: Vec<u8>,
    /// (first key, page) of every finished leaf: the level above's entries.
    leaves: Vec<(Vec<u8>, u64)>,
    out: Vec<u8>,
}

pub(super) struct Built {
    pub(super) db: Db,
    pub(super) next_page: u64,
}

impl TreeBuilder {
    pub(super) fn new(next_page: u64) -> Self {
        TreeBuilder {
            next_page,
            leaf: PageBuf::new(),
            leaf_first: Vec::new(),
            leaves: Vec::new(),
            out: Vec::with_capacity(1 << 20),
        }
    }

    pub(super) fn add(&mut self, file: &mut File, key: &[u8], value: Value<'_>) -> std::io::Result<()> {
        let pgno_bytes;
        let (data, flags, len): (&[u8], u16, u32) = match value {
            Value::Inline(v) => (v, 0, v.len() as u32),
            Value::Overflow { pgno, len } => {
                pgno_bytes = pgno.to_le_bytes();
                (&pgno_bytes, F_BIGDATA, len)
            }
        };
        let size = even(NODE_HEADER + key.len() + data.len());
        if self.leaf.count > 0 && size + 2 > self.leaf.room() {
            self.close_leaf(file)?;
        }
        if self.leaf.count == 0 {
            self.leaf_first.clear();
            self.leaf_first.extend_from_slice(key);
        }
        self.leaf.push(size, [len as u16, (len >> 16) as u16, flags, key.len() as u16], key, data);
        Ok(())
    }

    fn close_leaf(&mut self, file: &mut File) -> std::io::Result<()> {
        let pgno = self.next_page;
        let page = self.leaf.take(pgno, P_LEAF);
        self.write_page(file, &page[..])?;
        self.leaves.push((std::mem::take(&mut self.leaf_first), pgno));
        Ok(())
    }

    fn write_page(&mut self, file: &mut File, page: &[u8]) -> std::io::Result<()> {
        self.out.extend_from_slice(page);
        self.next_page += 1;
        if self.out.len() >= 1 << 20 {
            file.write_all(&self.out)?;
            self.out.clear();
        }
        Ok(())
    }

    pub(super) fn finish(mut self, file: &mut File, overflow_pages: u64, entries: u64) -> std::io::Result<Built> {
        if self.leaf.count > 0 {
            self.close_leaf(file)?;
        }
        let mut db = Db { overflow_pages, entries, ..Db::empty() };
        if self.leaves.is_empty() {
            file.write_all(&self.out)?;
            return Ok(Built { db, next_page: self.next_page });
        }
        db.leaf_pages = self.leaves.len() as u64;
        db.depth = 1;
        let mut level = std::mem::take(&mut self.leaves);
        while level.len() > 1 {
            level = self.branch_level(file, &level)?;
            db.branch_pages += level.len() as u64;
            db.depth += 1;
        }
        db.root = level[0].1;
        file.write_all(&self.out)?;
        Ok(Built { db, next_page: self.next_page })
    }

    /// Writes branch pages over `children` (first key, page); returns this level's entries.
    /// Every page's first node has an empty key, as LMDB writes it; every page gets at least
    /// two children.
    fn branch_level(&mut self, file: &mut File, children: &[(Vec<u8>, u64)]) -> std::io::Result<Vec<(Vec<u8>, u64)>> {
        let size = |key_len: usize| even(NODE_HEADER + key_len) + 2;
        // Group greedily, then let the last page borrow a child if it was left with one.
        let mut groups: Vec<std::ops::Range<usize>> = Vec::new();
        let (mut start, mut used) = (0, 0);
        for (i, (key, _)) in children.iter().enumerate() {
            let need = if i == start { size(0) } else { size(key.len()) };
            if i > start && used + need > PAGE - HEADER {
                groups.push(start..i);
                (start, used) = (i, size(0));
            } else {
                used += need;
            }
        }
        groups.push(start..children.len());
        let n = groups.len();
        if n > 1 && groups[n - 1].len() == 1 {
            groups[n - 2].end -= 1;
            groups[n - 1].start -= 1;
        }
        let mut page = PageBuf::new();
        let mut level = Vec::with_capacity(n);
        for group in groups {
            for (j, (key, child)) in children[group.clone()].iter().enumerate() {
                let key: &[u8] = if j == 0 { &[] } else { key };
                let header = [*child as u16, (*child >> 16) as u16, (*child >> 32) as u16, key.len() as u16];
                page.push(even(NODE_HEADER + key.len()), header, key, &[]);
            }
            let pgno = self.next_page;
            let built = page.take(pgno, P_BRANCH);
            self.write_page(file, &built[..])?;
            level.push((children[group.start].0.clone(), pgno));
        }
        Ok(level)
    }
}
