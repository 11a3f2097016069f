//! Reads the records of an LMDB 0.9 named database straight from the environment's data file.
//!
//! A backup of an LMDB store spends most of its time handing records through py-lmdb as Python
//! objects. This module walks the B-tree pages in a read-only memory map of `data.mdb` instead,
//! so records go from the file to the backup writer (or a digest) without any Python object.
//!
//! Why this is safe to do beside py-lmdb's own handle of the same environment:
//! - It opens no second LMDB environment (LMDB forbids two in one process: closing one drops the
//!   other's POSIX locks on `lock.mdb`). It maps `data.mdb` read-only; LMDB takes no lock on it.
//! - The caller holds an LMDB read transaction for as long as it reads, and starts from the tree's
//!   root as that transaction sees it (the tree's record in the main database). LMDB never writes
//!   into a page reachable from a live reader's snapshot (copy-on-write, pages are reused only
//!   after every reader that could see them is gone), so the pages read here do not change.
//! - Every page is checked before use: number in range, its own header names it, its type is the
//!   one expected, and every node, key and value lies inside its page(s). A damaged file gives an
//!   error, never an out-of-bounds read; the number of records is checked against the tree's count.
//!
//! Layout (LMDB 0.9 on a 64-bit little-endian machine, `mdb.c`): page header = pgno u64, pad u16,
//! flags u16, lower u16 / upper u16 (or overflow page count u32); then u16 offsets of the nodes.
//! Node = lo u16, hi u16, flags u16, ksize u16, key, data; in a branch node lo | hi << 16 |
//! flags << 32 is the child page, in a leaf node lo | hi << 16 is the data size, and with
//! F_BIGDATA the data is the u64 number of the first overflow page holding the value.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};
use crate::format::{has_prefix, PutBatch};

const MAGIC: u32 = 0xBEEF_C0DE;
/// The data format version of LMDB 0.9 (LMDB 1.0 files differ and are not read here).
pub const DATA_VERSION: u32 = 1;
const PAGE_HEADER: usize = 16;
const NODE_HEADER: usize = 8;
/// The 48-byte record (MDB_db) a named database has in the main database.
pub const DB_RECORD_LENGTH: usize = 48;
const P_INVALID: u64 = u64::MAX;

const P_BRANCH: u16 = 0x01;
const P_LEAF: u16 = 0x02;
const P_OVERFLOW: u16 = 0x04;
const P_META: u16 = 0x08;
const P_LEAF2: u16 = 0x20;
const P_SUBP: u16 = 0x40;
const PAGE_TYPES: u16 = P_BRANCH | P_LEAF | P_OVERFLOW | P_META | P_LEAF2 | P_SUBP;

const F_BIGDATA: u16 = 0x01;

/// Deeper than any B-tree a 64-bit page number can address.
const MAX_DEPTH: usize = 64;
/// The map is filled in (page table entries made) this many bytes at a time, ahead of the walk.
const MAP_AHEAD_CHUNK: usize = 2 << 20;

fn damaged(what: impl std::fmt::Display) -> Error {
    Error::Store(format!(
        "the LMDB data file looks damaged ({what}); check the database (mdb_stat -a), or open it \
         with direct_reads=False to read it through LMDB itself"
    ))
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(unix)]
fn identity(meta: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (meta.dev(), meta.ino())
}

#[cfg(not(unix))]
fn identity(_meta: &std::fs::Metadata) -> (u64, u64) {
    (0, 0)
}

/// A read-only map of an LMDB data file.
pub struct DataFile {
    map: memmap2::Mmap,
    page_size: usize,
    version: u32,
    /// (st_dev, st_ino) of the mapped file: the caller checks it is the environment's file.
    pub identity: (u64, u64),
    /// One bit per MAP_AHEAD_CHUNK of the map: set once `map_ahead` has filled it in.
    mapped_ahead: Box<[AtomicU64]>,
}

impl DataFile {
    /// Maps `path` and reads its first meta page. `version()` and `page_size()` tell whether it
    /// is a file this module reads (the caller falls back to LMDB itself otherwise).
    pub fn open(path: &Path) -> Result<Self> {
        if !cfg!(all(
            unix,
            target_pointer_width = "64",
            target_endian = "little"
        )) {
            // LMDB writes its pages in the machine's own layout; this reader knows one.
            return Err(Error::Store(
                "direct reads of LMDB files need a 64-bit little-endian Unix machine".into(),
            ));
        }
        let io = |e: std::io::Error| {
            Error::Store(format!(
                "cannot read the LMDB data file {}: {e}",
                path.display()
            ))
        };
        let file = File::open(path).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        // SAFETY: the map is read-only and only ever read through bounds-checked slices. LMDB
        // writes into pages of the file while it is mapped, but never into the pages a caller
        // reads (see the module doc); data files never shrink while an environment is open.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        if map.len() < PAGE_HEADER + 44 {
            return Err(damaged("shorter than its meta page"));
        }
        if u32_at(&map, PAGE_HEADER) != MAGIC {
            return Err(damaged("no LMDB magic number in the meta page"));
        }
        let version = u32_at(&map, PAGE_HEADER + 4);
        // mm_psize is md_pad of the free-page database, the first MDB_db after magic, version,
        // address and map size.
        let page_size = u32_at(&map, PAGE_HEADER + 24) as usize;
        let chunks = map.len().div_ceil(MAP_AHEAD_CHUNK);
        Ok(DataFile {
            map,
            page_size,
            version,
            identity: identity(&meta),
            mapped_ahead: (0..chunks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        })
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }

    fn pages(&self) -> u64 {
        (self.map.len() / self.page_size) as u64
    }

    /// The bytes of `count` pages from `pgno`, after checking the page header names `pgno`;
    /// and the page's type (flags masked to the type bits).
    fn pages_at(&self, pgno: u64, count: u64) -> Result<(&[u8], u16)> {
        if self.version != DATA_VERSION || !(4096..=65536).contains(&self.page_size) {
            return Err(Error::Store(
                "not an LMDB 0.9 data file (format version or page size); open the database with \
                 direct_reads=False"
                    .into(),
            ));
        }
        let end = pgno.checked_add(count).filter(|&e| e <= self.pages());
        let Some(end) = end else {
            return Err(damaged(format!(
                "page {pgno} is beyond the end of the file"
            )));
        };
        let bytes = &self.map[pgno as usize * self.page_size..end as usize * self.page_size];
        if u64_at(bytes, 0) != pgno {
            return Err(damaged(format!(
                "page {pgno} has the header of another page"
            )));
        }
        Ok((bytes, u16_at(bytes, 10) & PAGE_TYPES))
    }

    /// A branch or leaf page of a tree, and whether it is a branch.
    fn tree_page(&self, pgno: u64) -> Result<(Page<'_>, bool)> {
        let (bytes, kind) = self.pages_at(pgno, 1)?;
        if kind != P_BRANCH && kind != P_LEAF {
            return Err(damaged(format!("page {pgno} of a tree has type {kind:#x}")));
        }
        Ok((Page::new(pgno, bytes)?, kind == P_BRANCH))
    }

    /// Asks the CPU to load page `pgno` into its caches (a hint: no fault, no error, a no-op
    /// past the end or off x86_64), after `map_ahead` made sure the page is mapped (a prefetch
    /// of a page that is not does nothing).
    fn prefetch_page(&self, pgno: u64) {
        self.map_ahead(pgno, 1);
        let Some(start) = (pgno as usize).checked_mul(self.page_size) else {
            return;
        };
        let Some(page) = self.map.get(start..start.saturating_add(self.page_size)) else {
            return;
        };
        #[cfg(target_arch = "x86_64")]
        for line in page.chunks(64) {
            // SAFETY: a prefetch of mapped memory; it reads nothing and cannot fault.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    line.as_ptr().cast(),
                )
            };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = page;
    }

    /// Fills in the map's page table for the chunks holding pages `pgno..pgno + count`, each
    /// chunk once (a hint: errors, e.g. a kernel before 5.14, are ignored). Why: left to page
    /// faults, the kernel maps 16 pages per fault; a walk of a 280 MB file took ~4,300 faults (and
    /// 1 MiB values 64 each), and the prefetch of a page not yet mapped does nothing.
    fn map_ahead(&self, pgno: u64, count: u64) {
        let page = self.page_size as u64;
        let (Some(start), Some(end)) = (
            pgno.checked_mul(page),
            pgno.checked_add(count).and_then(|e| e.checked_mul(page)),
        ) else {
            return;
        };
        let end = end.min(self.map.len() as u64) as usize;
        let first = start as usize / MAP_AHEAD_CHUNK;
        for chunk in first..end.div_ceil(MAP_AHEAD_CHUNK) {
            let bit = 1u64 << (chunk % 64);
            let Some(word) = self.mapped_ahead.get(chunk / 64) else {
                return;
            };
            if word.fetch_or(bit, Ordering::Relaxed) & bit == 0 {
                let at = chunk * MAP_AHEAD_CHUNK;
                let len = MAP_AHEAD_CHUNK.min(self.map.len() - at);
                #[cfg(target_os = "linux")]
                let _ = self
                    .map
                    .advise_range(memmap2::Advice::PopulateRead, at, len);
                #[cfg(not(target_os = "linux"))]
                let _ = len;
            }
        }
    }

    /// A page `tree_page` accepted before, without checking it again.
    fn checked_page(&self, pgno: u64, count: usize) -> Page<'_> {
        let start = pgno as usize * self.page_size;
        Page {
            pgno,
            bytes: &self.map[start..start + self.page_size],
            count,
        }
    }

    /// The `count` overflow pages from `pgno` (count from the first page's header).
    fn overflow(&self, pgno: u64) -> Result<&[u8]> {
        let (head, kind) = self.pages_at(pgno, 1)?;
        if kind != P_OVERFLOW {
            return Err(damaged(format!(
                "page {pgno} should be an overflow page, has type {kind:#x}"
            )));
        }
        let count = u32_at(head, 12) as u64;
        let pages = self.pages_at(pgno, count.max(1))?.0;
        self.map_ahead(pgno, count);
        Ok(pages)
    }
}

/// The root of a named database, from its 48-byte record in the main database.
#[derive(Clone, Copy, Debug)]
pub struct TreeRoot {
    pub root: u64,
    pub depth: u16,
    pub entries: u64,
}

impl TreeRoot {
    /// Only plain databases (no DUPSORT, INTEGERKEY... flags): the ones datafold's store opens.
    pub fn parse(record: &[u8]) -> Result<Self> {
        if record.len() != DB_RECORD_LENGTH {
            return Err(damaged(format!(
                "a database record of {} bytes, expected {DB_RECORD_LENGTH}",
                record.len()
            )));
        }
        let flags = u16_at(record, 4);
        if flags != 0 {
            return Err(Error::Store(format!(
                "the LMDB database has flags {flags:#x} (DUPSORT, INTEGERKEY...): not a tree \
                 datafold can back up"
            )));
        }
        Ok(TreeRoot {
            depth: u16_at(record, 6),
            entries: u64_at(record, 32),
            root: u64_at(record, 40),
        })
    }
}

/// One node of a branch or leaf page.
struct Node<'a> {
    key: &'a [u8],
    flags: u16,
    /// lo | hi << 16: a leaf's data size, the low 32 bits of a branch's child page.
    lo_hi: u64,
    /// Where the data starts (leaf nodes).
    after_key: usize,
}

impl Node<'_> {
    /// A branch node's child page.
    fn child(&self) -> u64 {
        self.lo_hi | (self.flags as u64) << 32
    }
}

/// A page's nodes, bounds-checked.
struct Page<'a> {
    pgno: u64,
    bytes: &'a [u8],
    count: usize,
}

impl<'a> Page<'a> {
    fn new(pgno: u64, bytes: &'a [u8]) -> Result<Self> {
        let lower = u16_at(bytes, 12) as usize;
        let upper = u16_at(bytes, 14) as usize;
        if lower < PAGE_HEADER || lower > upper || upper > bytes.len() || lower % 2 != 0 {
            return Err(damaged(format!("page {pgno} has bounds {lower}..{upper}")));
        }
        Ok(Page {
            pgno,
            bytes,
            count: (lower - PAGE_HEADER) / 2,
        })
    }

    fn node(&self, i: usize) -> Result<Node<'a>> {
        let at = u16_at(self.bytes, PAGE_HEADER + 2 * i) as usize;
        let bad = || damaged(format!("node {i} of page {} is out of bounds", self.pgno));
        let header = self.bytes.get(at..at + NODE_HEADER).ok_or_else(bad)?;
        let ksize = u16_at(header, 6) as usize;
        let key = self
            .bytes
            .get(at + NODE_HEADER..at + NODE_HEADER + ksize)
            .ok_or_else(bad)?;
        Ok(Node {
            key,
            flags: u16_at(header, 4),
            lo_hi: u16_at(header, 0) as u64 | (u16_at(header, 2) as u64) << 16,
            after_key: at + NODE_HEADER + ksize,
        })
    }
}

/// A walk over a tree's records in key order, from the first key >= a prefix while keys start
/// with it. It borrows nothing: each call takes the DataFile, so the binding can keep both.
///
/// Work is bounded even in a damaged file: the stack never gets deeper than the tree says it is,
/// a leaf below the root is never empty, and the walk stops once it has seen more records than
/// the tree counts; so a page cycle or a shared subtree ends in an error, not a long loop.
pub struct Scan {
    /// (page, index of the next node to visit) from the root down.
    stack: Vec<(u64, usize)>,
    /// The leaf page being read and its record count, validated on entry.
    leaf: Option<(u64, usize)>,
    depth: usize,
    prefix: Vec<u8>,
    entries: u64,
    seen: u64,
    done: bool,
}

impl Scan {
    pub fn new(file: &DataFile, tree: TreeRoot, prefix: &[u8]) -> Result<Self> {
        let mut scan = Scan {
            stack: Vec::new(),
            leaf: None,
            depth: (tree.depth as usize).min(MAX_DEPTH),
            prefix: prefix.to_vec(),
            entries: tree.entries,
            seen: 0,
            done: tree.root == P_INVALID,
        };
        if scan.done {
            if tree.entries != 0 {
                return Err(damaged("an empty tree that counts records"));
            }
            return Ok(scan);
        }
        scan.seek(file, tree.root)?;
        Ok(scan)
    }

    fn push(&mut self, pgno: u64, index: usize) -> Result<()> {
        if self.stack.len() >= self.depth {
            return Err(damaged(format!(
                "the tree is deeper than the {} levels it records",
                self.depth
            )));
        }
        self.stack.push((pgno, index));
        Ok(())
    }

    /// Descends from the root to the first key >= the prefix (the first key without one).
    fn seek(&mut self, file: &DataFile, root: u64) -> Result<()> {
        let mut pgno = root;
        loop {
            let (page, branch) = file.tree_page(pgno)?;
            if page.count == 0 && (branch || !self.stack.is_empty()) {
                return Err(damaged(format!("page {pgno} is empty")));
            }
            if !branch {
                // A leaf: the first node whose key is >= the prefix.
                let mut i = 0;
                while !self.prefix.is_empty() && i < page.count {
                    if page.node(i)?.key >= self.prefix.as_slice() {
                        break;
                    }
                    i += 1;
                }
                return self.push(pgno, i);
            }
            // A branch: the last child whose separator key is <= the prefix (node 0's is empty).
            let mut child = 0;
            if !self.prefix.is_empty() {
                for i in 1..page.count {
                    if page.node(i)?.key > self.prefix.as_slice() {
                        break;
                    }
                    child = i;
                }
            }
            self.push(pgno, child + 1)?;
            pgno = page.node(child)?.child();
        }
    }

    /// On entering a leaf: the leaf after it (its parent's next child) is loaded into the CPU's
    /// caches while this one is read. Why: the first read of each node was a cache miss, ~10%
    /// of a backup of small records (perf).
    fn prefetch_next_leaf(&self, file: &DataFile) {
        let Some(&(parent, next)) = self
            .stack
            .len()
            .checked_sub(2)
            .and_then(|i| self.stack.get(i))
        else {
            return;
        };
        let Ok((page, true)) = file.tree_page(parent) else {
            return;
        };
        if next < page.count {
            if let Ok(node) = page.node(next) {
                file.prefetch_page(node.child());
            }
        }
    }

    /// The next record, or None at the end of the tree (or of the prefix).
    pub fn next<'f>(&mut self, file: &'f DataFile) -> Result<Option<(&'f [u8], &'f [u8])>> {
        while !self.done {
            let Some(&(pgno, index)) = self.stack.last() else {
                self.done = true;
                if self.prefix.is_empty() && self.seen != self.entries {
                    return Err(damaged(format!(
                        "the tree counts {} records but holds {}",
                        self.entries, self.seen
                    )));
                }
                break;
            };
            let (page, branch) = match self.leaf {
                // The leaf of the previous record: checked when it was entered.
                Some((leaf, count)) if leaf == pgno => (file.checked_page(pgno, count), false),
                _ => file.tree_page(pgno)?,
            };
            if page.count == 0 && self.stack.len() > 1 {
                // Only an empty tree's root may be empty (LMDB gives that one no page at all).
                return Err(damaged(format!("page {pgno} is empty")));
            }
            if index >= page.count {
                self.stack.pop();
                continue;
            }
            if !branch && self.leaf.map_or(true, |(leaf, _)| leaf != pgno) {
                self.leaf = Some((pgno, page.count));
                self.prefetch_next_leaf(file);
            }
            self.stack.last_mut().expect("not empty").1 += 1;
            let node = page.node(index)?;
            if branch {
                self.push(node.child(), 0)?;
                continue;
            }
            if !has_prefix(node.key, &self.prefix) {
                self.done = true;
                break;
            }
            let value = leaf_value(file, &page, &node, index)?;
            self.seen += 1;
            if self.seen > self.entries {
                return Err(damaged(format!(
                    "the tree counts {} records but holds more",
                    self.entries
                )));
            }
            return Ok(Some((node.key, value)));
        }
        Ok(None)
    }

    /// Appends records to `batch` until it holds `max_items` records or `max_bytes` of keys and
    /// values; false once the scan is over.
    pub fn fill(
        &mut self,
        file: &DataFile,
        batch: &mut PutBatch,
        max_items: usize,
        max_bytes: usize,
    ) -> Result<bool> {
        while batch.len() < max_items && batch.nbytes() < max_bytes {
            match self.next(file)? {
                Some((k, v)) => batch.push(k, v)?,
                None => return Ok(false),
            }
        }
        Ok(!self.done)
    }
}

fn leaf_value<'f>(
    file: &'f DataFile,
    page: &Page<'f>,
    node: &Node<'f>,
    i: usize,
) -> Result<&'f [u8]> {
    let size = node.lo_hi as usize;
    if node.flags & !F_BIGDATA != 0 {
        return Err(Error::Store(format!(
            "record {i} of LMDB page {} is a sub-database or duplicate set (flags {:#x}): not a \
             tree datafold can back up",
            page.pgno, node.flags
        )));
    }
    if node.flags & F_BIGDATA == 0 {
        return page
            .bytes
            .get(node.after_key..node.after_key + size)
            .ok_or_else(|| damaged(format!("record {i} of page {} is out of bounds", page.pgno)));
    }
    let at = node.after_key;
    let first = page
        .bytes
        .get(at..at + 8)
        .map(|b| u64_at(b, 0))
        .ok_or_else(|| damaged(format!("record {i} of page {} is out of bounds", page.pgno)))?;
    file.overflow(first)?
        .get(PAGE_HEADER..PAGE_HEADER + size)
        .ok_or_else(|| {
            damaged(format!(
                "the overflow pages at {first} are shorter than their value"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmdb_master_sys as ffi;
    use std::ffi::CString;
    use std::ptr;

    type Records = Vec<(Vec<u8>, Vec<u8>)>;

    /// Writes `trees` (name -> sorted records) into a new environment in `dir` with the real LMDB.
    fn write_env(dir: &Path, trees: &[(&str, Records)]) {
        unsafe {
            let mut env = ptr::null_mut();
            assert_eq!(ffi::mdb_env_create(&mut env), 0);
            assert_eq!(ffi::mdb_env_set_maxdbs(env, 16), 0);
            assert_eq!(ffi::mdb_env_set_mapsize(env, 256 << 20), 0);
            let path = CString::new(dir.to_str().unwrap()).unwrap();
            assert_eq!(ffi::mdb_env_open(env, path.as_ptr(), 0, 0o644), 0);
            let mut txn = ptr::null_mut();
            assert_eq!(ffi::mdb_txn_begin(env, ptr::null_mut(), 0, &mut txn), 0);
            for (name, records) in trees {
                let name = CString::new(*name).unwrap();
                let mut dbi = 0;
                assert_eq!(
                    ffi::mdb_dbi_open(txn, name.as_ptr(), ffi::MDB_CREATE, &mut dbi),
                    0
                );
                for (k, v) in records {
                    let mut key = ffi::MDB_val {
                        mv_size: k.len(),
                        mv_data: k.as_ptr() as *mut _,
                    };
                    let mut val = ffi::MDB_val {
                        mv_size: v.len(),
                        mv_data: v.as_ptr() as *mut _,
                    };
                    assert_eq!(ffi::mdb_put(txn, dbi, &mut key, &mut val, 0), 0);
                }
            }
            assert_eq!(ffi::mdb_txn_commit(txn), 0);
            ffi::mdb_env_close(env);
        }
    }

    /// The tree's 48-byte record in the main database, read with LMDB.
    fn db_record(dir: &Path, name: &str) -> Vec<u8> {
        let read = crate::test_support::LmdbReadTxn::open(dir);
        // SAFETY: a live read transaction; the value is copied out before it ends.
        unsafe {
            let mut main = 0;
            assert_eq!(ffi::mdb_dbi_open(read.txn, ptr::null(), 0, &mut main), 0);
            let mut key = ffi::MDB_val {
                mv_size: name.len(),
                mv_data: name.as_ptr() as *mut _,
            };
            let mut val = ffi::MDB_val {
                mv_size: 0,
                mv_data: ptr::null_mut(),
            };
            assert_eq!(ffi::mdb_get(read.txn, main, &mut key, &mut val), 0);
            std::slice::from_raw_parts(val.mv_data as *const u8, val.mv_size).to_vec()
        }
    }

    fn scan_all(dir: &Path, name: &str, prefix: &[u8]) -> Result<Records> {
        let file = DataFile::open(&dir.join("data.mdb"))?;
        let mut scan = Scan::new(&file, TreeRoot::parse(&db_record(dir, name))?, prefix)?;
        let mut out = Vec::new();
        while let Some((k, v)) = scan.next(&file)? {
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    fn records(n: usize, value_len: impl Fn(usize) -> usize) -> Records {
        (0..n)
            .map(|i| {
                let key = format!("k{:08}", i * 7).into_bytes();
                let value = (0..value_len(i)).map(|j| (i * 31 + j) as u8).collect();
                (key, value)
            })
            .collect()
    }

    fn tempdir(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("datafold-lmdb-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn reads_what_lmdb_wrote_small_deep_and_overflow() {
        let dir = tempdir("rw");
        let small = records(50_000, |i| i % 120);
        let big = records(40, |i| 4096 * (i % 5) + 17 * i);
        write_env(
            &dir,
            &[
                ("small", small.clone()),
                ("big", big.clone()),
                ("empty", vec![]),
            ],
        );
        assert_eq!(scan_all(&dir, "small", b"").unwrap(), small);
        assert_eq!(scan_all(&dir, "big", b"").unwrap(), big);
        assert!(scan_all(&dir, "empty", b"").unwrap().is_empty());
        // Prefixes: inside, at the start, past the end, and none matching.
        for prefix in [&b"k0001"[..], b"k", b"k00349993", b"z", b"a", b"k0002499"] {
            let want: Vec<_> = small
                .iter()
                .filter(|(k, _)| k.starts_with(prefix))
                .cloned()
                .collect();
            assert_eq!(
                scan_all(&dir, "small", prefix).unwrap(),
                want,
                "prefix {prefix:?}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn map_ahead_marks_each_chunk_once_and_ignores_pages_past_the_end() {
        let dir = tempdir("ahead");
        write_env(&dir, &[("big", records(8, |_| 3 << 20))]);
        let file = DataFile::open(&dir.join("data.mdb")).unwrap();
        let marked = |file: &DataFile| -> u32 {
            let words = file.mapped_ahead.iter();
            words.map(|w| w.load(Ordering::Relaxed).count_ones()).sum()
        };
        assert_eq!(marked(&file), 0);
        // Reading the values maps their chunks: 8 values of 3 MiB span at least 12 of 2 MiB.
        let root = TreeRoot::parse(&db_record(&dir, "big")).unwrap();
        let mut scan = Scan::new(&file, root, b"").unwrap();
        while scan.next(&file).unwrap().is_some() {}
        assert!(marked(&file) >= 12, "{}", marked(&file));
        let chunks = file.map.len().div_ceil(MAP_AHEAD_CHUNK) as u32;
        file.map_ahead(0, u64::MAX / 2);
        assert_eq!(marked(&file), chunks);
        file.map_ahead(u64::MAX - 1, 5);
        file.map_ahead(file.pages() + 10, 1);
        assert_eq!(marked(&file), chunks);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn batches_keep_records_whole() {
        let dir = tempdir("batch");
        let small = records(10_000, |i| i % 50);
        write_env(&dir, &[("t", small.clone())]);
        let file = DataFile::open(&dir.join("data.mdb")).unwrap();
        let mut scan =
            Scan::new(&file, TreeRoot::parse(&db_record(&dir, "t")).unwrap(), b"").unwrap();
        let mut got = Vec::new();
        loop {
            let mut batch = PutBatch::default();
            let more = scan.fill(&file, &mut batch, 777, 1 << 20).unwrap();
            assert!(batch.len() <= 777);
            got.extend(batch.records().map(|(k, v)| (k.to_vec(), v.to_vec())));
            if !more {
                break;
            }
        }
        assert_eq!(got, small);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn damage_is_an_error_not_a_crash() {
        let dir = tempdir("damage");
        let small = records(5_000, |i| i % 90);
        write_env(&dir, &[("t", small)]);
        let record = db_record(&dir, "t");
        let data = std::fs::read(dir.join("data.mdb")).unwrap();
        let page_size = 4096;
        // Damage the pages after the meta pages: each scan (whole tree and by prefix) ends in Ok
        // or Err, never a panic or an endless walk. Rounds alternate between bytes anywhere,
        // bytes in page headers and node pointers (the structure), and whole pages of noise.
        let mut next = crate::test_support::xorshift(0x2545_F491_4F6C_DD1D);
        let pages = data.len() / page_size;
        for round in 0..600 {
            let mut bad = data.clone();
            for _ in 0..1 + round % 8 {
                let r = next();
                let page = 2 + (r as usize >> 8) % (pages - 2);
                let at = match round % 3 {
                    0 => page * page_size + (r as usize >> 24) % page_size,
                    1 => page * page_size + (r as usize >> 24) % 48,
                    _ => {
                        for b in &mut bad[page * page_size..(page + 1) * page_size] {
                            *b = next() as u8;
                        }
                        continue;
                    }
                };
                bad[at] ^= (r >> 32) as u8 | 1;
            }
            let path = dir.join("bad.mdb");
            std::fs::write(&path, &bad).unwrap();
            let file = DataFile::open(&path).unwrap();
            for prefix in [&b""[..], b"k0001", b"k00034"] {
                if let Ok(mut scan) = Scan::new(&file, TreeRoot::parse(&record).unwrap(), prefix) {
                    let mut steps = 0;
                    while let Ok(Some(_)) = scan.next(&file) {
                        steps += 1;
                        assert!(steps <= 5_000, "more records than the tree holds");
                    }
                }
            }
        }
        // A record count that does not match is an error.
        let mut lying = record.clone();
        lying[32] ^= 1;
        let file = DataFile::open(&dir.join("data.mdb")).unwrap();
        let mut scan = Scan::new(&file, TreeRoot::parse(&lying).unwrap(), b"").unwrap();
        let err = loop {
            match scan.next(&file) {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("a wrong count went unnoticed"),
                Err(e) => break e,
            }
        };
        assert!(err.to_string().contains("counts"), "{err}");
        // A root beyond the file.
        let mut far = record.clone();
        far[40..48].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(Scan::new(&file, TreeRoot::parse(&far).unwrap(), b"").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn refuses_flagged_databases_and_short_records() {
        let mut record = vec![0u8; DB_RECORD_LENGTH];
        record[4] = 0x04; // MDB_DUPSORT
        assert!(TreeRoot::parse(&record).is_err());
        assert!(TreeRoot::parse(&record[..40]).is_err());
    }
}
