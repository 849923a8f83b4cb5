//! LMDB's on-disk page format: the constants, leaf and branch nodes packed into page buffers
//! (the bulk loader's 4 KiB pages), the overflow page header, and the meta pages; and the same
//! structures parsed back from a page of any size, every offset checked against the page.
//!
//! Kept apart so the layout rules (taken from LMDB 0.9's `mdb.c`, 64-bit) live in one place:
//! the bulk loader's tree builder only decides *which* nodes go on *which* page, its check and
//! the input reader ([`super::LmdbFile`]) only decide what to walk. Page header: 16 bytes
//! (`pgno u64, pad u16, flags u16, lower u16, upper u16`, or `pages u32` in place of
//! lower/upper on overflow pages). Nodes: 8 header bytes (`lo u16, hi u16, flags u16, ksize
//! u16`) + key + data, aligned to even sizes, placed from the end of the page downwards with
//! 2-byte offsets after the header.

pub(crate) const PAGE: usize = 4096;
pub(crate) const HEADER: usize = 16;
pub(crate) const NODE_HEADER: usize = 8;
/// `me_nodemax`: a leaf node bigger than this puts its value on overflow pages.
pub(crate) const NODE_MAX: usize = (((PAGE - HEADER) / 2) & !1) - 2;
/// `mdb_env_get_maxkeysize` for this build of LMDB.
pub(crate) const MAX_KEY: usize = 511;
pub(crate) const P_BRANCH: u16 = 0x01;
pub(crate) const P_LEAF: u16 = 0x02;
pub(crate) const P_OVERFLOW: u16 = 0x04;
pub(crate) const P_META: u16 = 0x08;
pub(crate) const F_BIGDATA: u16 = 0x01;
const MDB_INTEGERKEY: u16 = 0x08;
const MAGIC: u32 = 0xBEEF_C0DE;
const DATA_VERSION: u32 = 1;
const INVALID: u64 = u64::MAX;

/// What is wrong with one page of an LMDB file: a meta page that LMDB (or the bulk loader's
/// check) would refuse, or a tree page whose nodes do not lie within it. A [`super::VerifyError`]
/// says which page.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PageError {
    #[error("{bytes} bytes, too short for a meta page")]
    TooShort { bytes: usize },
    #[error("its header says page {found}")]
    PageNumber { found: u64 },
    #[error("flags {flags:#06x}, not a meta page")]
    NotMeta { flags: u16 },
    #[error("magic {found:#010x}, not LMDB's {MAGIC:#010x}")]
    Magic { found: u32 },
    #[error("data version {found}, not {DATA_VERSION}")]
    DataVersion { found: u32 },
    #[error("page size {size}, not a power of two of at least 512 bytes")]
    PageSize { size: u32 },
    /// The page size of meta page 1 differs from meta page 0's.
    #[error("page size {size}, meta page 0 says {first}")]
    PageSizes { size: usize, first: usize },
    /// A page size other than the bulk loader writes.
    #[error("page size {size}, not {PAGE}")]
    NotWritten { size: usize },
    #[error("the free list has a root (page {root}); none was written")]
    FreeListRoot { root: u64 },
    #[error("main database flags {flags:#06x}, not a plain one")]
    MainFlags { flags: u16 },
    /// Main database flags an input may not have (what the reader supports).
    #[error(
        "main database flags {flags:#06x}: cn_clip's datasets use a plain one (no sorted duplicates, integer keys)"
    )]
    UnsupportedFlags { flags: u16 },
    #[error("last page {last_page} is past any file")]
    LastPage { last_page: u64 },
    #[error("root {root} at depth {depth}")]
    Root { root: i64, depth: u16 },
    #[error("a root (page {root}) at depth 0")]
    RootAtDepthZero { root: u64 },
    #[error("an empty database of depth {depth}")]
    EmptyWithDepth { depth: u16 },
    #[error("map size {map_size} is smaller than the file ({bytes} bytes)")]
    MapSize { map_size: u64, bytes: u64 },
    #[error("bad node bounds: lower {lower}, upper {upper}")]
    NodeBounds { lower: usize, upper: usize },
    #[error("no nodes")]
    NoNodes,
    #[error("node {node} at offset {at}, outside {upper}..{size}")]
    NodeOutside { node: usize, at: usize, upper: u16, size: usize },
    #[error("node {node}: a key of {key_len} bytes at offset {key_at} runs off the page")]
    KeyOutside { node: usize, key_len: usize, key_at: usize },
    #[error("{len} bytes run off the page")]
    ValueOutside { len: u32 },
    #[error("its overflow page number runs off the page")]
    OverflowNumberOutside,
    #[error("node flags {flags:#06x} (sub-databases and duplicates are not written)")]
    NodeFlags { flags: u16 },
    /// A leaf node's value is bad: `key` (quoted, shortened) names the node.
    #[error("key {key}: {source}")]
    Key { key: String, source: Box<PageError> },
    /// The first page of an overflow value is not what its node says.
    #[error("not the first of {pages} overflow pages (its header: page {found}, flags {flags:#06x}, {count} pages)")]
    Overflow { pages: u64, found: u64, flags: u16, count: u64 },
}
pub(crate) static ZEROS: [u8; PAGE] = [0; PAGE];

pub(crate) fn even(n: usize) -> usize {
    (n + 1) & !1
}

/// `OVPAGES`: pages taken by an overflow value of `len` bytes (4 KiB pages).
pub(crate) fn overflow_pages(len: usize) -> u64 {
    overflow_pages_of(len, PAGE)
}

/// `OVPAGES` for pages of `page_size` bytes.
pub(crate) fn overflow_pages_of(len: usize, page_size: usize) -> u64 {
    ((HEADER - 1 + len) / page_size + 1) as u64
}

/// The header of an overflow value's first page (`pages` pages from `pgno`).
pub(crate) fn overflow_header(pgno: u64, pages: u64) -> [u8; HEADER] {
    let mut header = [0u8; HEADER];
    header[..8].copy_from_slice(&pgno.to_le_bytes());
    header[10..12].copy_from_slice(&P_OVERFLOW.to_le_bytes());
    header[12..16].copy_from_slice(&(pages as u32).to_le_bytes());
    header
}

/// Where a key's value lives.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Value<'a> {
    Inline(&'a [u8]),
    Overflow { pgno: u64, len: u32 },
}

/// A page being filled with nodes.
pub(crate) struct PageBuf {
    page: Box<[u8; PAGE]>,
    pub(crate) count: usize,
    upper: usize,
}

impl PageBuf {
    pub(crate) fn new() -> Self {
        PageBuf { page: Box::new([0; PAGE]), count: 0, upper: PAGE }
    }

    pub(crate) fn room(&self) -> usize {
        self.upper - (HEADER + 2 * self.count)
    }

    /// Adds a node of `size` bytes (already even) made of `header` + `key` + `data`.
    pub(crate) fn push(&mut self, size: usize, header: [u16; 4], key: &[u8], data: &[u8]) {
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
    pub(crate) fn take(&mut self, pgno: u64, flags: u16) -> Box<[u8; PAGE]> {
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
pub(crate) struct Db {
    pub(crate) depth: u16,
    pub(crate) branch_pages: u64,
    pub(crate) leaf_pages: u64,
    pub(crate) overflow_pages: u64,
    pub(crate) entries: u64,
    pub(crate) root: u64,
}

impl Db {
    pub(crate) fn empty() -> Self {
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
pub(crate) struct Meta {
    pub(crate) txnid: u64,
    pub(crate) last_page: u64,
    pub(crate) map_size: u64,
    pub(crate) main: Db,
}

impl Meta {
    pub(crate) fn page(&self, pgno: u64) -> Vec<u8> {
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

impl Db {
    /// Reads an `MDB_db` (48 bytes): its `md_pad`, `md_flags` and the rest.
    fn read(bytes: &[u8]) -> (u32, u16, Db) {
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let pad = u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes"));
        let flags = u16::from_le_bytes([bytes[4], bytes[5]]);
        let db = Db {
            depth: u16::from_le_bytes([bytes[6], bytes[7]]),
            branch_pages: u64_at(8),
            leaf_pages: u64_at(16),
            overflow_pages: u64_at(24),
            entries: u64_at(32),
            root: u64_at(40),
        };
        (pad, flags, db)
    }

    /// Whether this is an empty database (no root).
    pub(crate) fn is_empty(&self) -> bool {
        self.root == INVALID
    }
}

/// A meta page as LMDB reads it: the fields [`Meta`] holds, plus the page size, the free
/// list and the main database's flags, which a reader must check against what it supports.
pub(crate) struct MetaPage {
    pub(crate) meta: Meta,
    pub(crate) page_size: usize,
    pub(crate) free: Db,
    pub(crate) main_flags: u16,
}

impl MetaPage {
    /// Parses meta page `pgno` (`page` holds at least its first [`HEADER`] + 136 bytes),
    /// checking what LMDB checks when it opens a file: the page's number and flags, the magic
    /// and the data version, and a page size that is a power of two of at least 512 bytes.
    pub(crate) fn read(pgno: u64, page: &[u8]) -> Result<MetaPage, PageError> {
        if page.len() < HEADER + 136 {
            return Err(PageError::TooShort { bytes: page.len() });
        }
        let header = Header::read(page);
        if header.pgno != pgno {
            return Err(PageError::PageNumber { found: header.pgno });
        }
        if header.flags != P_META {
            return Err(PageError::NotMeta { flags: header.flags });
        }
        let u32_at = |at: usize| u32::from_le_bytes(page[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(page[at..at + 8].try_into().expect("8 bytes"));
        if u32_at(HEADER) != MAGIC {
            return Err(PageError::Magic { found: u32_at(HEADER) });
        }
        if u32_at(HEADER + 4) != DATA_VERSION {
            return Err(PageError::DataVersion { found: u32_at(HEADER + 4) });
        }
        let (page_size, _, free) = Db::read(&page[HEADER + 24..HEADER + 72]);
        if page_size < 512 || !page_size.is_power_of_two() {
            return Err(PageError::PageSize { size: page_size });
        }
        let (_, main_flags, main) = Db::read(&page[HEADER + 72..HEADER + 120]);
        let meta =
            Meta { map_size: u64_at(HEADER + 16), main, last_page: u64_at(HEADER + 120), txnid: u64_at(HEADER + 128) };
        Ok(MetaPage { meta, page_size: page_size as usize, free, main_flags })
    }
}

impl Meta {
    /// Reads meta page `pgno` back, checking what LMDB checks ([`MetaPage::read`]) and what
    /// the bulk loader writes (4 KiB pages, an empty free list, a plain main database).
    pub(crate) fn read(pgno: u64, page: &[u8]) -> Result<Meta, PageError> {
        let MetaPage { meta, page_size, free, main_flags } = MetaPage::read(pgno, page)?;
        if page_size != PAGE {
            return Err(PageError::NotWritten { size: page_size });
        }
        if !free.is_empty() {
            return Err(PageError::FreeListRoot { root: free.root });
        }
        if main_flags != 0 {
            return Err(PageError::MainFlags { flags: main_flags });
        }
        Ok(meta)
    }
}

/// A page header read back.
pub(crate) struct Header {
    pub(crate) pgno: u64,
    pub(crate) flags: u16,
    lower: u16,
    upper: u16,
}

impl Header {
    pub(crate) fn read(page: &[u8]) -> Header {
        let u16_at = |at: usize| u16::from_le_bytes([page[at], page[at + 1]]);
        Header {
            pgno: u64::from_le_bytes(page[..8].try_into().expect("a whole page")),
            flags: u16_at(10),
            lower: u16_at(12),
            upper: u16_at(14),
        }
    }

    /// An overflow page's `mp_pages` (stored where other pages keep lower and upper).
    pub(crate) fn overflow_count(&self) -> u64 {
        self.lower as u64 | (self.upper as u64) << 16
    }
}

/// A leaf or branch page read back: its nodes, each checked to lie within the page.
pub(crate) struct NodePage<'a> {
    page: &'a [u8],
    pub(crate) header: Header,
    pub(crate) count: usize,
}

/// One node read back.
pub(crate) struct Node<'a> {
    pub(crate) key: &'a [u8],
    /// `lo | hi << 16`: a leaf's data size; with `flags`, a branch node's child page.
    lo_hi: u32,
    pub(crate) flags: u16,
    /// The page after the key (a leaf's data is at its start).
    rest: &'a [u8],
}

impl<'a> NodePage<'a> {
    /// Reads page `pgno` (`page` is all its bytes, of any page size) as a page of nodes.
    pub(crate) fn read(pgno: u64, page: &'a [u8]) -> Result<Self, PageError> {
        let header = Header::read(page);
        if header.pgno != pgno {
            return Err(PageError::PageNumber { found: header.pgno });
        }
        let (lower, upper) = (header.lower as usize, header.upper as usize);
        if lower < HEADER || !(lower - HEADER).is_multiple_of(2) || lower > upper || upper > page.len() {
            return Err(PageError::NodeBounds { lower, upper });
        }
        let count = (lower - HEADER) / 2;
        if count == 0 {
            return Err(PageError::NoNodes);
        }
        Ok(NodePage { page, header, count })
    }

    /// Node `i` (< `count`).
    pub(crate) fn node(&self, i: usize) -> Result<Node<'a>, PageError> {
        let page = self.page;
        let size = page.len();
        let ptr = HEADER + 2 * i;
        let at = u16::from_le_bytes([page[ptr], page[ptr + 1]]) as usize;
        if at < self.header.upper as usize || at + NODE_HEADER > size {
            return Err(PageError::NodeOutside { node: i, at, upper: self.header.upper, size });
        }
        let u16_at = |at: usize| u16::from_le_bytes([page[at], page[at + 1]]);
        let key_len = u16_at(at + 6) as usize;
        let key_at = at + NODE_HEADER;
        if key_at + key_len > size {
            return Err(PageError::KeyOutside { node: i, key_len, key_at });
        }
        Ok(Node {
            key: &page[key_at..key_at + key_len],
            lo_hi: u16_at(at) as u32 | (u16_at(at + 2) as u32) << 16,
            flags: u16_at(at + 4),
            rest: &page[key_at + key_len..],
        })
    }
}

impl<'a> Node<'a> {
    /// A branch node's child page.
    pub(crate) fn child(&self) -> u64 {
        self.lo_hi as u64 | (self.flags as u64) << 32
    }

    /// A leaf node's value: inline bytes, or where its overflow pages are.
    pub(crate) fn value(&self) -> Result<Value<'a>, PageError> {
        let len = self.lo_hi;
        match self.flags {
            0 => self.rest.get(..len as usize).map(Value::Inline).ok_or(PageError::ValueOutside { len }),
            F_BIGDATA => match self.rest.get(..8) {
                Some(pgno) => Ok(Value::Overflow { pgno: u64::from_le_bytes(pgno.try_into().expect("8 bytes")), len }),
                None => Err(PageError::OverflowNumberOutside),
            },
            flags => Err(PageError::NodeFlags { flags }),
        }
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
