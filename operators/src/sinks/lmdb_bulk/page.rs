//! LMDB's on-disk page format, as far as the bulk loader writes it: the constants, leaf and
//! branch nodes packed into page buffers, the overflow page header, and the meta pages.
//!
//! Kept apart so the layout rules (taken from LMDB 0.9's `mdb.c`, 64-bit) live in one place
//! and the tree builder only decides *which* nodes go on *which* page. Page header: 16 bytes
//! (`pgno u64, pad u16, flags u16, lower u16, upper u16`, or `pages u32` in place of
//! lower/upper on overflow pages). Nodes: 8 header bytes (`lo u16, hi u16, flags u16, ksize
//! u16`) + key + data, aligned to even sizes, placed from the end of the page downwards with
//! 2-byte offsets after the header.

pub(super) const PAGE: usize = 4096;
pub(super) const HEADER: usize = 16;
pub(super) const NODE_HEADER: usize = 8;
/// `me_nodemax`: a leaf node bigger than this puts its value on overflow pages.
pub(super) const NODE_MAX: usize = (((PAGE - HEADER) / 2) & !1) - 2;
/// `mdb_env_get_maxkeysize` for this build of LMDB.
pub(super) const MAX_KEY: usize = 511;
pub(super) const P_BRANCH: u16 = 0x01;
pub(super) const P_LEAF: u16 = 0x02;
pub(super) const P_OVERFLOW: u16 = 0x04;
pub(super) const P_META: u16 = 0x08;
pub(super) const F_BIGDATA: u16 = 0x01;
const MDB_INTEGERKEY: u16 = 0x08;
const MAGIC: u32 = 0xBEEF_C0DE;
const DATA_VERSION: u32 = 1;
const INVALID: u64 = u64::MAX;
pub(super) static ZEROS: [u8; PAGE] = [0; PAGE];

pub(super) fn even(n: usize) -> usize {
    (n + 1) & !1
}

/// `OVPAGES`: pages taken by an overflow value of `len` bytes.
pub(super) fn overflow_pages(len: usize) -> u64 {
    ((HEADER - 1 + len) / PAGE + 1) as u64
}

/// The header of an overflow value's first page (`pages` pages from `pgno`).
pub(super) fn overflow_header(pgno: u64, pages: u64) -> [u8; HEADER] {
    let mut header = [0u8; HEADER];
    header[..8].copy_from_slice(&pgno.to_le_bytes());
    header[10..12].copy_from_slice(&P_OVERFLOW.to_le_bytes());
    header[12..16].copy_from_slice(&(pages as u32).to_le_bytes());
    header
}

/// Where a key's value lives.
#[derive(Clone, Copy, Debug)]
pub(super) enum Value<'a> {
    Inline(&'a [u8]),
    Overflow { pgno: u64, len: u32 },
}

/// A page being filled with nodes.
pub(super) struct PageBuf {
    page: Box<[u8; PAGE]>,
    pub(super) count: usize,
    upper: usize,
}

impl PageBuf {
    pub(super) fn new() -> Self {
        PageBuf { page: Box::new([0; PAGE]), count: 0, upper: PAGE }
    }

    pub(super) fn room(&self) -> usize {
        self.upper - (HEADER + 2 * self.count)
    }

    /// Adds a node of `size` bytes (already even) made of `header` + `key` + `data`.
    pub(super) fn push(&mut self, size: usize, header: [u16; 4], key: &[u8], data: &[u8]) {
        let at = self.upper - size;
        for (i, v) in header.iter().enumerate() {
            self.page[at + 2 * i..at + 2 * i + 2].copy_from_slice(&v.to_le_bytes());
        }
        self.page[at + NODE_HEADER..at + NODE_HEADER + key.len()].copy_from_slice(key);
        let data_at = at + NODE_HEADER + key.len();
        self.page[data_at..data_at + data.len()].copy_from_slice(data);
        let ptr = HEADER + 2 * self.count;
        self.page[ptr..ptr + 2].copy_from_slice(&(at as u16).to_le_bytes());
        self.count += 1;
        self.upper = at;
    }

    /// Finishes the header and hands the page out, leaving this buffer empty.
    pub(super) fn take(&mut self, pgno: u64, flags: u16) -> Box<[u8; PAGE]> {
        let lower = (HEADER + 2 * self.count) as u16;
        self.page[..8].copy_from_slice(&pgno.to_le_bytes());
        self.page[8..10].copy_from_slice(&0u16.to_le_bytes());
        self.page[10..12].copy_from_slice(&flags.to_le_bytes());
        self.page[12..14].copy_from_slice(&lower.to_le_bytes());
        self.page[14..16].copy_from_slice(&(self.upper as u16).to_le_bytes());
        self.count = 0;
        self.upper = PAGE;
        std::mem::replace(&mut self.page, Box::new([0; PAGE]))
    }
}

/// `MDB_db`.
#[derive(Clone, Copy)]
pub(super) struct Db {
    pub(super) depth: u16,
    pub(super) branch_pages: u64,
    pub(super) leaf_pages: u64,
    pub(super) overflow_pages: u64,
    pub(super) entries: u64,
    pub(super) root: u64,
}

impl Db {
    pub(super) fn empty() -> Self {
        Db { depth: 0, branch_pages: 0, leaf_pages: 0, overflow_pages: 0, entries: 0, root: INVALID }
    }

    fn write(&self, out: &mut Vec<u8>, pad: u32, flags: u16) {
        out.extend_from_slice(&pad.to_le_bytes());
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&self.depth.to_le_bytes());
        for v in [self.branch_pages, self.leaf_pages, self.overflow_pages, self.entries, self.root] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

/// `MDB_meta` on its page.
pub(super) struct Meta {
    pub(super) txnid: u64,
    pub(super) last_page: u64,
    pub(super) map_size: u64,
    pub(super) main: Db,
}

impl Meta {
    pub(super) fn page(&self, pgno: u64) -> Vec<u8> {
        let mut page = Vec::with_capacity(PAGE);
        page.extend_from_slice(&pgno.to_le_bytes());
        page.extend_from_slice(&0u16.to_le_bytes());
        page.extend_from_slice(&P_META.to_le_bytes());
        page.extend_from_slice(&[0; 4]);
        page.extend_from_slice(&MAGIC.to_le_bytes());
        page.extend_from_slice(&DATA_VERSION.to_le_bytes());
        page.extend_from_slice(&0u64.to_le_bytes()); // mm_address
        page.extend_from_slice(&self.map_size.to_le_bytes());
        // The free database (empty; its md_pad is the page size, its flags the env's).
        Db::empty().write(&mut page, PAGE as u32, MDB_INTEGERKEY);
        self.main.write(&mut page, 0, 0);
        page.extend_from_slice(&self.last_page.to_le_bytes());
        page.extend_from_slice(&self.txnid.to_le_bytes());
        page.resize(PAGE, 0);
        page
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_are_lmdbs() {
        assert_eq!(NODE_MAX, 2038);
        assert_eq!(overflow_pages(4080), 1);
        assert_eq!(overflow_pages(4081), 2);
    }
}
