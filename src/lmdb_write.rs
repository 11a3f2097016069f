//! One LMDB write transaction through the LMDB C library, fed straight from a `BackupDecoder`
//! (or a backup chain's merge): a restore that writes its records here never makes a Python
//! object per record.
//!
//! The LMDB store opens its environment with py-lmdb, which links its own LMDB. Two LMDB builds
//! must never have one environment open in one process at once (the locks are per process), so
//! the store closes its py-lmdb environment before it opens a `Writer` and reopens it after the
//! writer is gone (python/datafold/stores/lmdb.py, `_SharedEnv.hand_over`). The bundled LMDB
//! (mdb.master) writes data format 1, as py-lmdb's LMDB 0.9 does, and a different lock-file
//! format: if any other process has the environment open, `Writer::open` fails with a version
//! mismatch instead of sharing the lock table, and the store keeps writing through py-lmdb.
//!
//! Staged writes. LMDB keeps every page a write transaction dirties in malloc'd memory until the
//! commit, so one transaction holding a whole restore grows the process by about the size of the
//! database. When the environment holds no tree yet and no other process has it open, the writer
//! instead builds a new data file beside it (`data.mdb.datafold-restore`, an environment of its own
//! without a lock file or syncs) in transactions of `STAGED_COMMIT_BYTES` each, each followed by an
//! fdatasync of the file in a thread unless the one before still runs (write-behind: the disk works
//! while the restore goes on), then syncs it and renames it over data.mdb: the database still
//! changes all at once or not at all (a crash leaves the old data.mdb and a stale staging file,
//! removed by the next staged write or open of the store). With `EnvOptions::stage_writemap` the
//! staging environment writes through its map, with the file allocated ahead of LMDB (`Room`).
//! `seal` commits the last records and starts the final sync in a thread, so the caller can read
//! the new file back (`read_back_trees`) during the sync. Meanwhile the writer holds the target's
//! write transaction. No other process can have the old file open: none had the environment open
//! when the writer began (byte 0 of lock.mdb, which each opener read-locks, could be
//! write-locked), a py-lmdb opener fails on the lock-file format, and another writer of this crate
//! waits on the flock every one holds (`exclusive_writer_lock`). After the writer is gone the next
//! opener is LMDB's first again and rebuilds the lock table from the new file.

use std::ffi::{c_int, CStr, CString};
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr;

use lmdb_master_sys as ffi;

use crate::error::{Error, Result};
use crate::format::has_prefix;
use crate::reader::{BackupDecoder, Item, Step};

/// How the environment is opened: the same values py-lmdb had, so the two agree on the map.
#[derive(Clone, Copy, Debug)]
pub struct EnvOptions {
    pub map_size: usize,
    pub max_dbs: u32,
    pub max_readers: u32,
    pub writemap: bool,
    /// Build the data file anew when the environment holds no tree (see the module doc; never
    /// with writemap, whose store preallocates the map in data.mdb).
    pub stage_when_empty: bool,
    /// Open that new file with MDB_WRITEMAP (see `Room`): for records mostly on overflow pages,
    /// whose pages LMDB otherwise mallocs fresh in every transaction and then copies to the file.
    pub stage_writemap: bool,
}

/// Bytes of keys and values a staged write puts per transaction: what it holds in memory.
const STAGED_COMMIT_BYTES: usize = 16 << 20;

/// The staging file's name in the environment directory.
pub const STAGING_FILE: &str = "data.mdb.datafold-restore";

/// Disk space of a staging environment opened with MDB_WRITEMAP. LMDB then writes its pages
/// through a shared mapping of a sparse file (it sets the file to the map size), where a page the
/// disk has no room for is a SIGBUS, not an error. So the writer allocates the file
/// (posix_fallocate) ahead of LMDB: from the end of the last commit's pages, twice what the
/// transaction may have added so far (`estimate` per record, with every page it could copy on
/// write) and `ROOM_SLACK`; an allocation that fails is a StoreError before LMDB touches the page.
/// At the end the file is cut to the pages in use.
struct Room {
    fd: c_int,
    page_size: u64,
    /// Bytes of the file allocated from offset 0, and the most it needs: the map size.
    allocated: u64,
    map_size: u64,
    /// Bytes of pages in use after the last commit.
    committed_end: u64,
    /// The environment's map, and the bytes from its start whose pages were unmapped after a
    /// commit (`release_committed`).
    map_addr: usize,
    released_end: u64,
    /// What the current transaction may have added, by `estimate`.
    txn_bytes: u64,
    /// Allocated beyond the estimate (`ROOM_SLACK`), and at least this much more at a time
    /// (`ROOM_STEP`).
    slack: u64,
    step: u64,
}

const ROOM_SLACK: u64 = 8 << 20;
const ROOM_STEP: u64 = 64 << 20;
/// Pages a put or delete that is not an append may copy on write (a path from root to leaf).
const COPIED_PAGES: u64 = 8;

impl Room {
    fn new(env: *mut ffi::MDB_env) -> Result<Room> {
        let mut fd: ffi::mdb_filehandle_t = -1;
        let mut stat = std::mem::MaybeUninit::<ffi::MDB_stat>::uninit();
        // SAFETY: a live environment; mdb_env_stat fills `stat`.
        unsafe {
            check(ffi::mdb_env_get_fd(env, &mut fd), "read the staging file")?;
            check(
                ffi::mdb_env_stat(env, stat.as_mut_ptr()),
                "read the staging file",
            )?;
        }
        let mut room = Room {
            fd,
            page_size: u64::from(unsafe { stat.assume_init() }.ms_psize),
            allocated: 0,
            map_size: 0,
            committed_end: 0,
            map_addr: 0,
            released_end: 0,
            txn_bytes: 0,
            slack: ROOM_SLACK,
            step: ROOM_STEP,
        };
        room.committed(env)?;
        Ok(room)
    }

    /// Bytes of pages a record may take: its node and page share, or its overflow pages; and
    /// unless `path_copied` already (an append after another in this transaction), the pages on
    /// its path.
    fn estimate(&self, record_bytes: usize, path_copied: bool) -> u64 {
        let copied = if path_copied {
            0
        } else {
            COPIED_PAGES * self.page_size
        };
        record_bytes as u64 + 64 + copied
    }

    /// Allocates the file for a record of `estimate` bytes more in this transaction.
    fn make_room(&mut self, estimate: u64) -> Result<()> {
        self.txn_bytes += estimate;
        let need = self.committed_end + 2 * self.txn_bytes + self.slack;
        if need <= self.allocated {
            return Ok(());
        }
        // Past the map LMDB fails with MDB_MAP_FULL, before it writes a page there.
        let target = (need + self.step)
            .next_multiple_of(self.page_size)
            .min(self.map_size);
        if target <= self.allocated {
            return Ok(());
        }
        // SAFETY: posix_fallocate on the staging environment's open descriptor.
        let rc = unsafe {
            libc::posix_fallocate(
                self.fd,
                self.allocated as libc::off_t,
                (target - self.allocated) as libc::off_t,
            )
        };
        if rc != 0 {
            return Err(Error::Store(format!(
                "cannot allocate {} MiB for the restored database: {}; free some disk space and \
                 restore again",
                target >> 20,
                std::io::Error::from_raw_os_error(rc)
            )));
        }
        self.allocated = target;
        Ok(())
    }

    /// After a commit: the pages in use end where the environment says.
    fn committed(&mut self, env: *mut ffi::MDB_env) -> Result<()> {
        let mut info = std::mem::MaybeUninit::<ffi::MDB_envinfo>::uninit();
        // SAFETY: a live environment; mdb_env_info fills `info`.
        check(
            unsafe { ffi::mdb_env_info(env, info.as_mut_ptr()) },
            "read the staging file",
        )?;
        let info = unsafe { info.assume_init() };
        if info.me_mapsize as u64 != self.map_size {
            self.map_addr = shared_map_of(self.fd, info.me_mapsize).unwrap_or(0);
        }
        self.map_size = info.me_mapsize as u64;
        self.committed_end = (info.me_last_pgno as u64 + 1) * self.page_size;
        self.txn_bytes = 0;
        self.release_committed();
        Ok(())
    }

    /// Unmaps the pages the last transactions added. The kernel keeps them, dirty, in the page
    /// cache; a later access maps them again. Why: a mapped dirty page has to be write-protected
    /// when the write-behind sync writes it out, one TLB flush of every core per page (~15% of
    /// the CPU time of a restore of 1 MiB values, perf); unmapping a range flushes once. LMDB
    /// writes few of them again (the meta pages at each commit, pages freed two commits before):
    /// those are mapped again and cost their flush, as before.
    fn release_committed(&mut self) {
        if self.map_addr == 0 || self.committed_end <= self.released_end {
            return;
        }
        let (start, len) = (self.released_end, self.committed_end - self.released_end);
        // SAFETY: a page-aligned range inside the environment's shared file mapping (it ends at
        // the pages in use, within the map). MADV_DONTNEED on a shared file mapping only drops
        // this process's page table entries: the contents stay in the page cache (a dirty
        // entry marks its page dirty first) and a later access faults them in again. A failure
        // only leaves the pages mapped.
        unsafe {
            libc::madvise(
                (self.map_addr + start as usize) as *mut libc::c_void,
                len as usize,
                libc::MADV_DONTNEED,
            );
        }
        self.released_end = self.committed_end;
    }

    /// Cuts the file to the pages in use (LMDB set it to the map size).
    fn trim(&self) -> Result<()> {
        // SAFETY: ftruncate on the open descriptor; no page beyond the end is mapped in use.
        if unsafe { libc::ftruncate(self.fd, self.committed_end as libc::off_t) } != 0 {
            return Err(Error::Store(format!(
                "cannot cut the staging file to its size: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }
}

/// The address of this process's shared mapping of the whole file open as `fd` (`len` bytes from
/// offset 0), from /proc/self/maps: LMDB does not tell where it mapped the environment
/// (`me_mapaddr` is only set with MDB_FIXEDMAP). A mapping of the file's inode and length on
/// another device also serves (btrfs and overlayfs report other devices to stat than there):
/// whichever shared file mapping it were, unmapping its pages loses nothing.
fn shared_map_of(fd: c_int, len: usize) -> Option<usize> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat fills `st` on success.
    if unsafe { libc::fstat(fd, st.as_mut_ptr()) } != 0 {
        return None;
    }
    let st = unsafe { st.assume_init() };
    let dev = format!(
        "{:02x}:{:02x}",
        libc::major(st.st_dev),
        libc::minor(st.st_dev)
    );
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    // (start, whether the device matches) of each shared mapping of the inode from offset 0
    let found: Vec<(usize, bool)> = maps
        .lines()
        .filter_map(|line| {
            // start-end perms offset dev inode [path]
            let mut fields = line.split_ascii_whitespace();
            let (range, perms, offset) = (fields.next()?, fields.next()?, fields.next()?);
            let (map_dev, inode) = (fields.next()?, fields.next()?.parse::<u64>().ok()?);
            let (start, end) = range.split_once('-')?;
            let start = usize::from_str_radix(start, 16).ok()?;
            let end = usize::from_str_radix(end, 16).ok()?;
            let whole_file = perms.ends_with('s') && offset.bytes().all(|b| b == b'0');
            (whole_file && inode == st.st_ino && end - start == len)
                .then_some((start, map_dev == dev))
        })
        .collect();
    found
        .iter()
        .find(|(_, same_dev)| *same_dev)
        .or_else(|| found.first())
        .map(|&(start, _)| start)
}

fn lmdb_message(rc: c_int) -> String {
    // SAFETY: mdb_strerror returns a static NUL-terminated string for any code.
    unsafe { CStr::from_ptr(ffi::mdb_strerror(rc)) }
        .to_string_lossy()
        .into_owned()
}

/// What a `Writer` call did with one record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Put {
    Written,
    /// overwrite=false and the key was there already: its value stays.
    Skipped,
}

/// A tree opened in the writer's transaction.
#[derive(Debug)]
pub struct Tree {
    dbi: ffi::MDB_dbi,
    /// A cursor of the writer's transaction `txn_serial`, which frees it when it ends: puts
    /// through one cursor skip setting up a new one for every record.
    cursor: *mut ffi::MDB_cursor,
    txn_serial: u64,
    /// The tree had no record when the transaction opened it.
    pub was_empty: bool,
    /// While every key so far came in ascending order into a tree that was empty, puts are
    /// appends (MDB_APPEND: pages fill up instead of splitting in half); after that, plain puts.
    appending: bool,
    last_key: Vec<u8>,
}

/// An environment with its one write transaction; dropping it without `commit` aborts.
pub struct Writer {
    /// Where the records go: the target environment, or the staging one.
    env: *mut ffi::MDB_env,
    txn: *mut ffi::MDB_txn,
    /// Counts the transactions of `env` (a staged write commits along the way).
    txn_serial: u64,
    max_key: usize,
    failed: bool,
    /// Records put or deleted so far (skipped ones not counted).
    pub records: u64,
    staged: Option<Staged>,
    /// Bytes put since the staging transaction began, and the most it may hold.
    pending: usize,
    commit_every: usize,
    /// This writer's own descriptor of lock.mdb with its flock (`exclusive_writer_lock`), kept
    /// until the environment is closed: closing any descriptor of a file drops every fcntl lock
    /// the process holds on it, LMDB's too.
    lock_file: Option<WriterLock>,
}

/// A staged write's target: its environment, held with a write transaction, and the files.
struct Staged {
    env: *mut ffi::MDB_env,
    txn: *mut ffi::MDB_txn,
    data_path: PathBuf,
    staging_path: PathBuf,
    /// data.mdb's permission bits, owner and group, which the new file takes over.
    mode: u32,
    owner: (u32, u32),
    /// The staging file was renamed over data.mdb.
    published: bool,
    /// `seal` committed the last records; the staging file's final sync runs in this thread.
    sync: Option<SyncThread>,
    /// The latest write-behind sync of the staging file, started after a commit.
    write_behind: Option<SyncThread>,
    /// The staging environment writes through its map (`EnvOptions::stage_writemap`).
    room: Option<Room>,
}

impl Writer {
    /// Opens the environment directory `path` (data.mdb and lock.mdb in it) and begins the write
    /// transaction, staged when the environment holds no tree (see the module doc).
    pub fn open(path: &Path, options: EnvOptions) -> Result<Writer> {
        let lock = exclusive_writer_lock(path)?;
        let flags = if options.writemap {
            ffi::MDB_WRITEMAP
        } else {
            0
        };
        let (env, txn) = open_env(path, options, flags, 0o644)?;
        // SAFETY: a live environment.
        let max_key = unsafe { ffi::mdb_env_get_maxkeysize(env) } as usize;
        let mut w = Writer {
            env,
            txn,
            txn_serial: 0,
            max_key,
            failed: false,
            records: 0,
            staged: None,
            pending: 0,
            commit_every: STAGED_COMMIT_BYTES,
            lock_file: Some(lock),
        };
        // Byte 0's write lock is free only if no other process has the environment open (each
        // holds a read lock there). It is given back at once: a process opening the environment
        // meanwhile then fails on the lock-file format (see the module doc) instead of waiting
        // for this writer and trusting its lock table afterwards, which a staged write outdates.
        if options.stage_when_empty && !options.writemap {
            let lock = w.lock_file.take().expect("lock file");
            let staged = if lock_byte_zero(&lock.0, libc::F_WRLCK) {
                let staged = w.stage_target(path, options);
                lock_byte_zero(&lock.0, libc::F_RDLCK);
                staged
            } else {
                Ok(false)
            };
            w.lock_file = Some(lock);
            staged?;
        }
        Ok(w)
    }

    /// Moves the writer onto a staging environment if the target holds no tree and data.mdb is
    /// a plain file this process may replace with one of the same owner and extended attributes;
    /// Ok(false) otherwise.
    fn stage_target(&mut self, path: &Path, options: EnvOptions) -> Result<bool> {
        let data_path = path.join("data.mdb");
        let Ok(meta) = std::fs::symlink_metadata(&data_path) else {
            return Ok(false);
        };
        // SAFETY: geteuid/getegid cannot fail.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let owner = (meta.uid(), meta.gid());
        if !meta.file_type().is_file() || meta.nlink() != 1 || (uid != 0 && owner != (uid, gid)) {
            return Ok(false);
        }
        if !self.target_is_empty()? {
            return Ok(false);
        }
        let staging_path = path.join(STAGING_FILE);
        match std::fs::remove_file(&staging_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Error::Store(format!(
                    "cannot remove the stale staging file {}: {e}",
                    staging_path.display()
                )))
            }
        }
        let mode = meta.permissions().mode() & 0o7777;
        let mut flags = ffi::MDB_NOSUBDIR | ffi::MDB_NOLOCK | ffi::MDB_NOSYNC;
        if options.stage_writemap {
            flags |= ffi::MDB_WRITEMAP;
        }
        let opened = open_env(&staging_path, options, flags, mode).and_then(|(env, txn)| {
            let room = options.stage_writemap.then(|| Room::new(env)).transpose();
            if room.is_err() {
                // SAFETY: the handles just opened, closed on this error.
                unsafe {
                    ffi::mdb_txn_abort(txn);
                    ffi::mdb_env_close(env);
                }
            }
            Ok((env, txn, room?))
        });
        let (env, txn, room) = match opened {
            Ok(handles) => handles,
            Err(e) => {
                let _ = std::fs::remove_file(&staging_path);
                return Err(e);
            }
        };
        // The new file must carry data.mdb's extended attributes (POSIX ACLs, security labels,
        // user attributes). Where one cannot be copied, the records go into data.mdb itself,
        // which keeps them all.
        if copy_xattrs(&data_path, &staging_path).is_err() {
            // SAFETY: the handles just opened, closed on this fallback.
            unsafe {
                ffi::mdb_txn_abort(txn);
                ffi::mdb_env_close(env);
            }
            let _ = std::fs::remove_file(&staging_path);
            return Ok(false);
        }
        self.staged = Some(Staged {
            env: self.env,
            txn: self.txn,
            data_path,
            staging_path,
            mode,
            owner,
            published: false,
            sync: None,
            write_behind: None,
            room,
        });
        self.env = env;
        self.txn = txn;
        Ok(true)
    }

    /// The target's main database holds no record (no tree, nothing else).
    fn target_is_empty(&mut self) -> Result<bool> {
        let mut dbi = 0;
        let mut stat = std::mem::MaybeUninit::<ffi::MDB_stat>::uninit();
        // SAFETY: the live write transaction; a NULL name opens the main database.
        let rc = unsafe { ffi::mdb_dbi_open(self.txn, ptr::null(), 0, &mut dbi) };
        if rc != 0 {
            return Err(self.fail(rc, "open the main database"));
        }
        let rc = unsafe { ffi::mdb_stat(self.txn, dbi, stat.as_mut_ptr()) };
        if rc != 0 {
            return Err(self.fail(rc, "read the main database"));
        }
        // SAFETY: mdb_stat returned 0, so it filled `stat`.
        Ok(unsafe { stat.assume_init() }.ms_entries == 0)
    }

    /// The records go to a staging file that replaces data.mdb at the commit.
    pub fn staged(&self) -> bool {
        self.staged.is_some()
    }

    #[cfg(test)]
    fn set_commit_every(&mut self, nbytes: usize) {
        self.commit_every = nbytes;
    }

    pub fn max_key_size(&self) -> usize {
        self.max_key
    }

    fn live(&self) -> Result<*mut ffi::MDB_txn> {
        if self.failed || self.txn.is_null() {
            return Err(Error::Poisoned("LMDB write transaction"));
        }
        Ok(self.txn)
    }

    /// Marks the transaction failed (LMDB allows only an abort after most errors).
    fn fail(&mut self, rc: c_int, action: &str) -> Error {
        self.failed = true;
        let message = lmdb_message(rc);
        Error::Store(match rc {
            // As the LMDB store words it through py-lmdb (python/datafold/stores/lmdb.py, _translate).
            ffi::MDB_DBS_FULL => format!(
                "LMDB {action} failed: too many trees; reopen with a larger max_dbs option \
                 (mdb_dbi_open: {message})"
            ),
            ffi::MDB_MAP_FULL => format!(
                "LMDB {action} failed: {message}; reopen the database with a larger map_size option"
            ),
            _ => format!("LMDB {action} failed: {message}"),
        })
    }

    /// Opens (creating it if missing) the named tree; the name is UTF-8 without NUL.
    pub fn open_tree(&mut self, name: &[u8]) -> Result<Tree> {
        let txn = self.live()?;
        if name.len() > self.max_key {
            return Err(Error::Store(format!(
                "tree name is {} bytes in UTF-8; LMDB allows at most {} bytes",
                name.len(),
                self.max_key
            )));
        }
        let c_name = CString::new(name)
            .map_err(|_| Error::Store("a tree name must not contain NUL".into()))?;
        let mut dbi = 0;
        let mut stat = std::mem::MaybeUninit::<ffi::MDB_stat>::uninit();
        let mut cursor = ptr::null_mut();
        // SAFETY: a live write transaction of this writer; `stat` is written by mdb_stat.
        let rc = unsafe { ffi::mdb_dbi_open(txn, c_name.as_ptr(), ffi::MDB_CREATE, &mut dbi) };
        if rc != 0 {
            return Err(self.fail(rc, "create_tree"));
        }
        let rc = unsafe { ffi::mdb_stat(txn, dbi, stat.as_mut_ptr()) };
        if rc != 0 {
            return Err(self.fail(rc, "create_tree"));
        }
        let rc = unsafe { ffi::mdb_cursor_open(txn, dbi, &mut cursor) };
        if rc != 0 {
            return Err(self.fail(rc, "create_tree"));
        }
        // SAFETY: mdb_stat returned 0, so it filled `stat`.
        let was_empty = unsafe { stat.assume_init() }.ms_entries == 0;
        self.make_room(name.len(), false)?; // its record in the main database
        Ok(Tree {
            dbi,
            cursor,
            txn_serial: self.txn_serial,
            was_empty,
            appending: was_empty,
            last_key: Vec::new(),
        })
    }

    /// Keys LMDB cannot store fail the transaction, as in the py-lmdb store.
    fn check_key(&mut self, key: &[u8]) -> Result<()> {
        if key.is_empty() {
            self.failed = true;
            return Err(Error::Store("LMDB cannot store an empty key".into()));
        }
        if key.len() > self.max_key {
            self.failed = true;
            return Err(Error::Store(format!(
                "key is {} bytes; LMDB keys are at most {} bytes",
                key.len(),
                self.max_key
            )));
        }
        Ok(())
    }

    pub fn put(
        &mut self,
        tree: &mut Tree,
        key: &[u8],
        value: &[u8],
        overwrite: bool,
    ) -> Result<Put> {
        self.live()?;
        self.check_key(key)?;
        let append = tree.appending && (tree.last_key.is_empty() || key > &tree.last_key[..]);
        let mut flags = if overwrite { 0 } else { ffi::MDB_NOOVERWRITE };
        if append {
            flags |= ffi::MDB_APPEND;
        }
        // The first write to a tree in a transaction copies its path, append or not.
        let path_copied = append && tree.txn_serial == self.txn_serial;
        self.make_room(key.len() + value.len(), path_copied)?;
        let cursor = self.cursor(tree)?;
        let mut k = val(key);
        let mut v = val(value);
        // SAFETY: a cursor of the live write transaction; LMDB copies key and value.
        let rc = unsafe { ffi::mdb_cursor_put(cursor, &mut k, &mut v, flags) };
        if append {
            tree.last_key.clear();
            tree.last_key.extend_from_slice(key);
        } else {
            tree.appending = false;
        }
        match rc {
            0 => {
                self.records += 1;
                self.wrote(key.len() + value.len())?;
                Ok(Put::Written)
            }
            ffi::MDB_KEYEXIST if !overwrite && !append => Ok(Put::Skipped),
            rc => Err(self.fail(rc, "put")),
        }
    }

    /// Deletes the key if present; a key LMDB could never have stored is simply absent.
    pub fn delete(&mut self, tree: &mut Tree, key: &[u8]) -> Result<bool> {
        self.live()?;
        // A delete ends the appends: the next key may land anywhere.
        tree.appending = false;
        if key.is_empty() || key.len() > self.max_key {
            return Ok(false);
        }
        self.make_room(key.len(), false)?;
        let cursor = self.cursor(tree)?;
        let (mut k, mut v) = (val(key), val(b""));
        // SAFETY: a cursor of the live write transaction.
        match unsafe { ffi::mdb_cursor_get(cursor, &mut k, &mut v, ffi::MDB_SET) } {
            0 => {}
            ffi::MDB_NOTFOUND => return Ok(false),
            rc => return Err(self.fail(rc, "delete")),
        }
        match unsafe { ffi::mdb_cursor_del(cursor, 0) } {
            0 => {
                self.records += 1;
                self.wrote(key.len())?;
                Ok(true)
            }
            rc => Err(self.fail(rc, "delete")),
        }
    }

    /// The tree's cursor in the current transaction (a staged write's commits end the old one).
    fn cursor(&mut self, tree: &mut Tree) -> Result<*mut ffi::MDB_cursor> {
        if tree.txn_serial != self.txn_serial {
            let mut cursor = ptr::null_mut();
            // SAFETY: the live write transaction; `tree.dbi` was opened in an earlier one of the
            // same environment, which committed.
            let rc = unsafe { ffi::mdb_cursor_open(self.txn, tree.dbi, &mut cursor) };
            if rc != 0 {
                return Err(self.fail(rc, "open a cursor"));
            }
            tree.cursor = cursor;
            tree.txn_serial = self.txn_serial;
        }
        Ok(tree.cursor)
    }

    /// A staged write through the map: the file allocated for this record (`Room`).
    fn make_room(&mut self, record_bytes: usize, path_copied: bool) -> Result<()> {
        let Some(room) = self.staged.as_mut().and_then(|s| s.room.as_mut()) else {
            return Ok(());
        };
        let made = room.make_room(room.estimate(record_bytes, path_copied));
        self.failed |= made.is_err();
        made
    }

    /// Counts `nbytes` written; a staged write commits once it holds `commit_every` bytes (by
    /// `Room`'s estimate when it writes through the map, which bounds the room it needs).
    fn wrote(&mut self, nbytes: usize) -> Result<()> {
        let Some(staged) = self.staged.as_ref() else {
            return Ok(());
        };
        self.pending = match &staged.room {
            Some(room) => room.txn_bytes as usize,
            None => self.pending + nbytes,
        };
        if self.pending < self.commit_every {
            return Ok(());
        }
        self.commit_txn()?;
        // SAFETY: a new write transaction of the same environment.
        let rc = unsafe { ffi::mdb_txn_begin(self.env, ptr::null_mut(), 0, &mut self.txn) };
        if rc != 0 {
            return Err(self.fail(rc, "begin a write transaction"));
        }
        self.txn_serial += 1;
        self.pending = 0;
        self.committed()?;
        self.write_behind()
    }

    /// After a staging commit: syncs the staging file in a thread, unless the sync started after
    /// an earlier commit still runs (the next one, or `seal`'s final sync, covers these pages).
    /// Syncing as the restore goes on leaves the final sync little to write; a plain hint to start
    /// writeback (sync_file_range with SYNC_FILE_RANGE_WRITE alone) was slower here.
    fn write_behind(&mut self) -> Result<()> {
        let fd = self.staging_fd()?;
        let staged = self.staged.as_mut().expect("staged");
        if staged
            .write_behind
            .as_ref()
            .is_some_and(|t| !t.is_finished())
        {
            return Ok(());
        }
        let before = staged.write_behind.take();
        // Through the map, only the committed pages (unmapped by `Room`): a whole-file sync would
        // also write out the pages the next transaction is filling, each still mapped.
        let upto = staged.room.as_ref().map(|room| room.committed_end);
        staged.write_behind = Some(sync_in_thread(fd, before, upto));
        Ok(())
    }

    /// The staging environment's file descriptor.
    fn staging_fd(&mut self) -> Result<ffi::mdb_filehandle_t> {
        let mut fd: ffi::mdb_filehandle_t = -1;
        // SAFETY: the live staging environment.
        let rc = unsafe { ffi::mdb_env_get_fd(self.env, &mut fd) };
        if rc != 0 {
            return Err(self.fail(rc, "sync the staging file"));
        }
        Ok(fd)
    }

    /// After a staging commit: `Room` learns where the pages in use end.
    fn committed(&mut self) -> Result<()> {
        let env = self.env;
        let Some(room) = self.staged.as_mut().and_then(|s| s.room.as_mut()) else {
            return Ok(());
        };
        let done = room.committed(env);
        self.failed |= done.is_err();
        done
    }

    /// Ends the writing of a staged write: commits its last records to the staging file and
    /// starts syncing that file in a background thread. `read_back_trees` can then read what was
    /// written while the disk works; `commit` waits for the sync and publishes the file.
    pub fn seal(&mut self) -> Result<()> {
        self.live()?;
        if self.staged.is_none() {
            return Err(Error::invalid(
                "only a staged write can be sealed; commit() this one",
            ));
        }
        self.commit_txn()?;
        self.committed()?;
        if let Some(room) = &self.staged.as_ref().expect("staged").room {
            let trimmed = room.trim();
            self.failed |= trimmed.is_err();
            trimmed?;
        }
        let fd = self.staging_fd()?;
        let staged = self.staged.as_mut().expect("staged");
        let before = staged.write_behind.take();
        staged.sync = Some(sync_in_thread(fd, before, None));
        Ok(())
    }

    /// Commits the live transaction; none is left afterwards.
    fn commit_txn(&mut self) -> Result<()> {
        let txn = self.live()?;
        self.txn = ptr::null_mut();
        // SAFETY: the live transaction; mdb_txn_commit frees it whatever it returns.
        let rc = unsafe { ffi::mdb_txn_commit(txn) };
        if rc != 0 {
            return Err(self.fail(rc, "commit"));
        }
        Ok(())
    }

    /// `seal` ran and `commit` has not joined its sync yet.
    fn sealed(&self) -> bool {
        self.staged.as_ref().is_some_and(|s| s.sync.is_some())
    }

    /// Reads back the records of `trees` from the staging file of a sealed staged write, each
    /// tree in key order through a read transaction of the staging environment (what a reader of
    /// the database will see once the file is published), on up to `threads` threads, each tree
    /// whole on one of them: the staging environment has no lock table and nothing writes to it
    /// once sealed, so its readers share nothing. Each tree gets a visitor from
    /// `start`, sees its records through `visit`, and `finish` turns it into the tree's result
    /// on the same thread (so at most `threads` visitors live at once); the results come back in
    /// the order of `trees`. An LMDB failure on any tree is the error (and fails the writer);
    /// otherwise the first visitor error in that order. Why: the check of a
    /// restore of many trees was one thread's work while the other cores waited for the final
    /// sync.
    pub fn read_back_trees<V, R: Send>(
        &mut self,
        trees: &[&Tree],
        threads: usize,
        start: impl Fn() -> V + Sync,
        visit: impl Fn(&mut V, &[u8], &[u8]) -> Result<()> + Sync,
        finish: impl Fn(V) -> R + Sync,
    ) -> Result<Vec<R>> {
        self.check_sealed()?;
        let dbis: Vec<ffi::MDB_dbi> = trees.iter().map(|t| t.dbi).collect();
        let outcomes: Vec<std::sync::Mutex<Option<Walked<R>>>> =
            dbis.iter().map(|_| std::sync::Mutex::new(None)).collect();
        let next = std::sync::atomic::AtomicUsize::new(0);
        let env = SharedEnv(self.env);
        let work = || loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (Some(&dbi), Some(outcome)) = (dbis.get(i), outcomes.get(i)) else {
                break;
            };
            let mut visitor = start();
            let walked = walk_tree(env.get(), dbi, &mut |k, v| visit(&mut visitor, k, v));
            let walked = walked.map(|visited| visited.map(|()| finish(visitor)));
            *outcome.lock().unwrap_or_else(|e| e.into_inner()) = Some(walked);
        };
        std::thread::scope(|scope| {
            for _ in 1..threads.clamp(1, dbis.len().max(1)) {
                let helper = std::thread::Builder::new().name("datafold-read-back".into());
                if helper.spawn_scoped(scope, work).is_err() {
                    break; // fewer threads: the ones running (this one at least) read the rest
                }
            }
            work();
        });
        let outcomes: Vec<Walked<R>> = outcomes
            .into_iter()
            .map(|o| {
                o.into_inner()
                    .unwrap_or_else(|e| e.into_inner())
                    .expect("every tree was read")
            })
            .collect();
        if let Some(&rc) = outcomes.iter().find_map(|o| o.as_ref().err()) {
            return Err(self.fail(rc, "read back the staging file"));
        }
        outcomes
            .into_iter()
            .map(|o| o.expect("no LMDB error"))
            .collect()
    }

    fn check_sealed(&self) -> Result<()> {
        if self.failed || !self.sealed() {
            return Err(Error::invalid(
                "a staged write is read back after seal() and before commit()",
            ));
        }
        Ok(())
    }

    /// Commits (durably: the environment has sync on; a staged write syncs its file and renames
    /// it over data.mdb, after `seal` if that was not called); the writer is spent afterwards.
    pub fn commit(&mut self) -> Result<()> {
        if self.staged.is_none() {
            return self.commit_txn();
        }
        if !self.sealed() {
            self.seal()?;
        }
        if self.failed {
            return Err(Error::Poisoned("LMDB write transaction"));
        }
        let synced = self.join_sync();
        if let Err(e) = synced {
            self.failed = true;
            return Err(Error::Store(format!(
                "cannot sync the staging file {}: {e}",
                self.staged.as_ref().expect("staged").staging_path.display()
            )));
        }
        // SAFETY: the staging environment, with no transaction left and its sync joined.
        unsafe { ffi::mdb_env_close(self.env) };
        self.env = ptr::null_mut();
        let published = publish(self.staged.as_mut().expect("staged"));
        self.failed = published.is_err();
        published
    }

    /// Waits for the syncs of the staging file (`seal`'s, or a write-behind one before `seal`);
    /// Ok if there was none. They use the staging environment's descriptor: joined before it
    /// closes.
    fn join_sync(&mut self) -> std::io::Result<()> {
        let Some(staged) = self.staged.as_mut() else {
            return Ok(());
        };
        let threads = [staged.sync.take(), staged.write_behind.take()];
        let mut result = Ok(());
        for thread in threads.into_iter().flatten() {
            let joined = join_sync_thread(thread);
            if result.is_ok() {
                result = joined;
            }
        }
        result
    }
}

/// Gives the synced staging file data.mdb's mode and owner and renames it over data.mdb.
fn publish(staged: &mut Staged) -> Result<()> {
    let failed = |what: &str, e: std::io::Error| {
        Error::Store(format!(
            "cannot {what} {}: {e}",
            staged.staging_path.display()
        ))
    };
    let file = File::open(&staged.staging_path).map_err(|e| failed("open", e))?;
    file.set_permissions(std::fs::Permissions::from_mode(staged.mode))
        .map_err(|e| failed("set the permissions of", e))?;
    let meta = file.metadata().map_err(|e| failed("read", e))?;
    if (meta.uid(), meta.gid()) != staged.owner {
        std::os::unix::fs::fchown(&file, Some(staged.owner.0), Some(staged.owner.1))
            .map_err(|e| failed("set the owner of", e))?;
    }
    std::fs::rename(&staged.staging_path, &staged.data_path)
        .map_err(|e| failed("rename over data.mdb", e))?;
    staged.published = true;
    let dir = staged.data_path.parent().unwrap_or(Path::new("."));
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| {
        Error::Store(format!(
            "the restored data file is in place, but its directory {} could not be synced: {e}",
            dir.display()
        ))
    })
}

/// Copies every extended attribute of the file `from` onto the file `to` (neither a symlink).
fn copy_xattrs(from: &Path, to: &Path) -> std::io::Result<()> {
    #[cfg(test)]
    if tests::FAIL_XATTR_COPY.with(|f| f.get()) {
        return Err(std::io::Error::from_raw_os_error(libc::EPERM));
    }
    let from = CString::new(from.as_os_str().as_bytes())?;
    let to = CString::new(to.as_os_str().as_bytes())?;
    for name in list_xattrs(&from)? {
        set_xattr(&to, &name, &get_xattr(&from, &name)?)?;
    }
    Ok(())
}

/// The names of a file's extended attributes; none on a file system without them.
fn list_xattrs(path: &CStr) -> std::io::Result<Vec<CString>> {
    // SAFETY: a NUL-terminated path; `buf` holds `len` writable bytes, or is NULL with `len` 0.
    let names =
        match xattr_read(|buf, len| unsafe { libc::llistxattr(path.as_ptr(), buf.cast(), len) }) {
            Ok(names) => names,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTSUP | libc::ENOSYS)) => {
                return Ok(Vec::new())
            }
            Err(e) => return Err(e),
        };
    names
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| Ok(CString::new(n)?))
        .collect()
}

fn get_xattr(path: &CStr, name: &CStr) -> std::io::Result<Vec<u8>> {
    // SAFETY: as in list_xattrs, and a NUL-terminated name.
    xattr_read(|buf, len| unsafe { libc::lgetxattr(path.as_ptr(), name.as_ptr(), buf.cast(), len) })
}

fn set_xattr(path: &CStr, name: &CStr, value: &[u8]) -> std::io::Result<()> {
    // SAFETY: NUL-terminated path and name, `value` readable for its length.
    let rc = unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Runs a list/get-xattr call twice, first for the size: its bytes. Retries while the
/// attribute grows between the two calls (ERANGE).
fn xattr_read(mut call: impl FnMut(*mut u8, usize) -> libc::ssize_t) -> std::io::Result<Vec<u8>> {
    loop {
        let len = call(ptr::null_mut(), 0);
        if len < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut buf = vec![0u8; len as usize];
        let got = call(buf.as_mut_ptr(), buf.len());
        if got >= 0 {
            buf.truncate(got as usize);
            return Ok(buf);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) {
            return Err(e);
        }
    }
}

/// Creates and opens an environment (`flags`; the file mode for new files) and begins a write
/// transaction in it.
fn open_env(
    path: &Path,
    options: EnvOptions,
    flags: std::ffi::c_uint,
    mode: u32,
) -> Result<(*mut ffi::MDB_env, *mut ffi::MDB_txn)> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::Store("the database path contains a NUL byte".into()))?;
    let mut env = ptr::null_mut();
    let mut txn = ptr::null_mut();
    // SAFETY: plain LMDB calls on a handle this function owns; it is closed on every error.
    unsafe {
        check(ffi::mdb_env_create(&mut env), "create an LMDB environment")?;
        let opened = (|| {
            check(
                ffi::mdb_env_set_mapsize(env, options.map_size),
                "set the map size",
            )?;
            check(ffi::mdb_env_set_maxdbs(env, options.max_dbs), "set max_dbs")?;
            check(
                ffi::mdb_env_set_maxreaders(env, options.max_readers),
                "set max_readers",
            )?;
            check(
                ffi::mdb_env_open(env, c_path.as_ptr(), flags, mode as ffi::mdb_mode_t),
                "open the environment",
            )?;
            check(
                ffi::mdb_txn_begin(env, ptr::null_mut(), 0, &mut txn),
                "begin a write transaction",
            )
        })();
        if let Err(e) = opened {
            ffi::mdb_env_close(env);
            return Err(e);
        }
    }
    Ok((env, txn))
}

type SyncThread = std::thread::JoinHandle<std::io::Result<()>>;

/// The staging environment's handle for the threads of `read_back_trees`.
struct SharedEnv(*mut ffi::MDB_env);

// SAFETY: only read transactions of a sealed staging environment (MDB_NOLOCK, nothing writing)
// use it across threads; each thread begins, reads through and aborts its own.
unsafe impl Sync for SharedEnv {}

impl SharedEnv {
    fn get(&self) -> *mut ffi::MDB_env {
        self.0
    }
}

/// What `walk_tree` did: Err(rc) for an LMDB failure, Ok(the visitor's outcome) otherwise.
type Walked<T = ()> = std::result::Result<Result<T>, c_int>;

/// A visitor of records (key, value).
type Visit<'a> = dyn FnMut(&[u8], &[u8]) -> Result<()> + 'a;

/// `visit(key, value)` for each record of tree `dbi`, in key order, in a read transaction of
/// `env` begun and ended here.
fn walk_tree(env: *mut ffi::MDB_env, dbi: ffi::MDB_dbi, visit: &mut Visit<'_>) -> Walked {
    let mut txn = ptr::null_mut();
    // SAFETY: a sealed staging environment has no write transaction; MDB_NOLOCK lets any thread
    // hold a read transaction (no reader table). `dbi` was opened in a committed transaction.
    let rc = unsafe { ffi::mdb_txn_begin(env, ptr::null_mut(), ffi::MDB_RDONLY, &mut txn) };
    if rc != 0 {
        return Err(rc);
    }
    let walked = (|| {
        let mut cursor = ptr::null_mut();
        // SAFETY: the live read transaction (a read-only transaction's cursor is closed
        // explicitly, below).
        let rc = unsafe { ffi::mdb_cursor_open(txn, dbi, &mut cursor) };
        if rc != 0 {
            return Err(rc);
        }
        let (mut k, mut v) = (val(b""), val(b""));
        let mut op = ffi::MDB_FIRST;
        let result = loop {
            // SAFETY: a cursor of the live read transaction; the slices are read before the
            // next call moves it.
            match unsafe { ffi::mdb_cursor_get(cursor, &mut k, &mut v, op) } {
                0 => {}
                ffi::MDB_NOTFOUND => break Ok(Ok(())),
                rc => break Err(rc),
            }
            let (key, value) = unsafe {
                (
                    std::slice::from_raw_parts(k.mv_data as *const u8, k.mv_size),
                    std::slice::from_raw_parts(v.mv_data as *const u8, v.mv_size),
                )
            };
            if let Err(e) = visit(key, value) {
                break Ok(Err(e));
            }
            op = ffi::MDB_NEXT;
        };
        unsafe { ffi::mdb_cursor_close(cursor) };
        result
    })();
    // SAFETY: the read transaction begun above.
    unsafe { ffi::mdb_txn_abort(txn) };
    walked
}

/// fdatasync(fd) in a thread that first waits for `before` (an earlier sync of the same file)
/// and returns the first error of either: a failed fsync is reported once, and a later one may
/// succeed without the data being on disk. fdatasync is what mdb_env_sync does for the staging
/// environment. With `upto`, a write-behind sync writes out only the file's first `upto` bytes and
/// waits for them (sync_file_range, which reports a write error as fdatasync does but flushes no
/// disk cache or metadata: the final fdatasync makes the file durable). The descriptor must stay
/// open until the thread is joined.
fn sync_in_thread(
    fd: ffi::mdb_filehandle_t,
    before: Option<SyncThread>,
    upto: Option<u64>,
) -> SyncThread {
    std::thread::spawn(move || {
        if let Some(before) = before {
            join_sync_thread(before)?;
        }
        // SAFETY: fdatasync / sync_file_range on a descriptor kept open until this thread is
        // joined.
        let rc = match upto {
            None => unsafe { libc::fdatasync(fd) },
            Some(upto) => unsafe {
                libc::sync_file_range(
                    fd,
                    0,
                    upto as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WAIT_BEFORE
                        | libc::SYNC_FILE_RANGE_WRITE
                        | libc::SYNC_FILE_RANGE_WAIT_AFTER,
                )
            },
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    })
}

fn join_sync_thread(thread: SyncThread) -> std::io::Result<()> {
    thread
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the sync thread panicked")))
}

/// This crate's writers take an exclusive flock(2) of lock.mdb (apart from LMDB's fcntl locks)
/// before they open the environment and hold it until it is closed: a writer of another process
/// waits there (as LMDB writers wait for each other) and never opens the data file a staged write
/// is about to replace.
fn exclusive_writer_lock(path: &Path) -> Result<WriterLock> {
    let lock_path = path.join("lock.mdb");
    let lock = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(|e| {
            Error::Store(format!(
                "cannot open the LMDB lock file {}: {e}",
                lock_path.display()
            ))
        })?;
    loop {
        // SAFETY: flock on an open descriptor.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return Ok(WriterLock(lock));
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(Error::Store(format!(
                "cannot lock {}: {e}",
                lock_path.display()
            )));
        }
    }
}

/// lock.mdb opened and flock'ed by `exclusive_writer_lock`. Dropping it unlocks explicitly: the
/// flock belongs to the open file, which a process forked meanwhile shares and could keep locked.
struct WriterLock(File);

impl Drop for WriterLock {
    fn drop(&mut self) {
        // SAFETY: flock on an open descriptor.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// fcntl(F_SETLK) of byte 0 of the lock file (`kind`: F_WRLCK or F_RDLCK): true if it was set.
fn lock_byte_zero(file: &File, kind: c_int) -> bool {
    // SAFETY: a zeroed flock is valid; fcntl reads it and the descriptor is open.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = 0;
    lock.l_len = 1;
    loop {
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLK, &lock) } == 0 {
            return true;
        }
        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return false;
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // The sync thread uses the staging environment's descriptor: done before it closes.
        let _ = self.join_sync();
        // SAFETY: handles this writer owns; an uncommitted transaction is aborted first. The
        // target environment closes before `lock_file` (a field, dropped after this).
        unsafe {
            if !self.txn.is_null() {
                ffi::mdb_txn_abort(self.txn);
            }
            if !self.env.is_null() {
                ffi::mdb_env_close(self.env);
            }
            if let Some(staged) = &self.staged {
                ffi::mdb_txn_abort(staged.txn);
                ffi::mdb_env_close(staged.env);
                if !staged.published {
                    let _ = std::fs::remove_file(&staged.staging_path);
                }
            }
        }
    }
}

fn val(bytes: &[u8]) -> ffi::MDB_val {
    ffi::MDB_val {
        mv_size: bytes.len(),
        mv_data: bytes.as_ptr() as *mut _,
    }
}

fn check(rc: c_int, action: &str) -> Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(Error::Store(format!(
            "cannot {action}: {}",
            lmdb_message(rc)
        )))
    }
}

/// Counts of one `write_records` call.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Written {
    pub written: u64,
    pub skipped: u64,
    pub deleted: u64,
    /// Keys whose existing value was kept (overwrite=false).
    pub skipped_keys: Vec<Vec<u8>>,
    /// The tree's TREE_END was read.
    pub tree_done: bool,
}

impl Written {
    pub fn records(&self) -> u64 {
        self.written + self.skipped + self.deleted
    }
}

/// Applies one record (value None: a DELETE) unless its key lacks `prefix`.
pub fn write_record(
    writer: &mut Writer,
    tree: &mut Tree,
    key: &[u8],
    value: Option<&[u8]>,
    prefix: &[u8],
    overwrite: bool,
    into: &mut Written,
) -> Result<()> {
    if !has_prefix(key, prefix) {
        return Ok(());
    }
    match value {
        Some(v) => match writer.put(tree, key, v, overwrite)? {
            Put::Written => into.written += 1,
            Put::Skipped => {
                into.skipped += 1;
                into.skipped_keys.push(key.to_vec());
            }
        },
        None => {
            writer.delete(tree, key)?;
            into.deleted += 1;
        }
    }
    Ok(())
}

/// Writes the current tree's records from `dec` into `tree` until `limit` records were handled,
/// the tree ends (`tree_done`) or the decoder needs another segment (`Step::NeedMore`: feed it
/// and call again with the same `into`). Records whose key lacks `prefix` are read and checked
/// but not written.
pub fn write_records(
    dec: &mut BackupDecoder,
    writer: &mut Writer,
    tree: &mut Tree,
    prefix: &[u8],
    overwrite: bool,
    limit: u64,
    into: &mut Written,
) -> Result<Step<()>> {
    while into.records() < limit {
        let (key, value) = match dec.next_item()? {
            Step::NeedMore => return Ok(Step::NeedMore),
            Step::Done(None) => {
                into.tree_done = true;
                break;
            }
            Step::Done(Some(Item::Put(k, v))) => (k, Some(v)),
            Step::Done(Some(Item::Delete(k))) => (k, None),
        };
        write_record(writer, tree, key, value, prefix, overwrite, into)?;
    }
    Ok(Step::Done(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    type Records = Vec<(Vec<u8>, Vec<u8>)>;

    thread_local! {
        /// Makes `copy_xattrs` fail on this thread, as it does where a security label or ACL
        /// cannot be set on a new file.
        pub(super) static FAIL_XATTR_COPY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    fn c_path(path: &Path) -> CString {
        CString::new(path.as_os_str().as_bytes()).unwrap()
    }

    fn add_xattr(path: &Path, name: &str, value: &[u8]) {
        set_xattr(&c_path(path), &CString::new(name).unwrap(), value).unwrap();
    }

    /// The file's extended attributes, sorted by name.
    fn xattrs(path: &Path) -> Vec<(CString, Vec<u8>)> {
        let path = c_path(path);
        let mut out: Vec<_> = list_xattrs(&path)
            .unwrap()
            .into_iter()
            .map(|name| {
                let value = get_xattr(&path, &name).unwrap();
                (name, value)
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn a_staged_write_keeps_the_extended_attributes_of_data_mdb() {
        let (dir, data, before) = empty_environment("xattr");
        add_xattr(&data, "user.datafold.a", b"first");
        add_xattr(&data, "user.datafold.big", &[7u8; 3000]);
        add_xattr(&data, "user.datafold.empty", b"");
        let want = xattrs(&data);
        assert_eq!(want.len(), 3);

        let mut w = Writer::open(&dir, staging(64 << 20)).unwrap();
        assert!(w.staged());
        let mut t = w.open_tree(b"t").unwrap();
        w.put(&mut t, b"k", b"v", true).unwrap();
        w.commit().unwrap();
        drop(w);
        assert_ne!(inode(&data), before);
        assert_eq!(xattrs(&data), want);
        assert_eq!(read_tree(&dir, "t"), vec![(b"k".to_vec(), b"v".to_vec())]);
    }

    #[test]
    fn a_write_whose_staging_file_cannot_take_the_attributes_goes_into_data_mdb() {
        let (dir, data, before) = empty_environment("xattr-fail");
        add_xattr(&data, "user.datafold.a", b"kept");
        FAIL_XATTR_COPY.with(|f| f.set(true));
        let mut w = Writer::open(&dir, staging(64 << 20)).unwrap();
        FAIL_XATTR_COPY.with(|f| f.set(false));
        assert!(!w.staged());
        assert!(!dir.join(STAGING_FILE).exists());
        let mut t = w.open_tree(b"t").unwrap();
        w.put(&mut t, b"k", b"v", true).unwrap();
        w.commit().unwrap();
        drop(w);
        assert_eq!(inode(&data), before);
        assert_eq!(
            xattrs(&data),
            vec![(c"user.datafold.a".to_owned(), b"kept".to_vec())]
        );
        assert_eq!(read_tree(&dir, "t"), vec![(b"k".to_vec(), b"v".to_vec())]);
    }

    fn tempdir(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("datafold-lmdbw-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn options(map_size: usize) -> EnvOptions {
        EnvOptions {
            map_size,
            max_dbs: 8,
            max_readers: 16,
            writemap: false,
            stage_when_empty: false,
            stage_writemap: false,
        }
    }

    /// Every record of the tree `name`, read with a cursor of the same LMDB.
    fn read_tree(dir: &Path, name: &str) -> Records {
        read_tree_opt(dir, Some(name))
    }

    /// Every record of the tree `name` or, with None, of the main database.
    fn read_tree_opt(dir: &Path, name: Option<&str>) -> Records {
        let c_name = name.map(|n| CString::new(n).unwrap());
        let read = crate::test_support::LmdbReadTxn::open(dir);
        let mut out = Vec::new();
        // SAFETY: a live read transaction; keys and values are copied out before it ends.
        unsafe {
            let mut dbi = 0;
            let name_ptr = c_name.as_ref().map_or(ptr::null(), |n| n.as_ptr());
            assert_eq!(ffi::mdb_dbi_open(read.txn, name_ptr, 0, &mut dbi), 0);
            let mut cursor = ptr::null_mut();
            assert_eq!(ffi::mdb_cursor_open(read.txn, dbi, &mut cursor), 0);
            let (mut k, mut v) = (val(b""), val(b""));
            let mut op = ffi::MDB_FIRST;
            while ffi::mdb_cursor_get(cursor, &mut k, &mut v, op) == 0 {
                let key = std::slice::from_raw_parts(k.mv_data as *const u8, k.mv_size);
                let value = std::slice::from_raw_parts(v.mv_data as *const u8, v.mv_size);
                out.push((key.to_vec(), value.to_vec()));
                op = ffi::MDB_NEXT;
            }
            ffi::mdb_cursor_close(cursor);
        }
        out
    }

    fn key(i: u32) -> Vec<u8> {
        format!("key{i:08}").into_bytes()
    }

    /// One record put by a writer that may stage but must not (the environment has a tree, or
    /// another process has it open).
    fn put_unstaged(dir: &Path, tree: &[u8], key: &[u8], value: &[u8]) {
        let mut w = Writer::open(dir, staging(64 << 20)).unwrap();
        assert!(!w.staged());
        let mut t = w.open_tree(tree).unwrap();
        w.put(&mut t, key, value, true).unwrap();
        w.commit().unwrap();
    }

    /// Puts records until a 1 MiB map is full: MDB_MAP_FULL.
    fn fill_a_small_map(w: &mut Writer, t: &mut Tree) {
        let e = (0..100_000u32)
            .map(|i| w.put(t, &key(i), &[0u8; 100], true))
            .find_map(|r| r.err())
            .expect("a 1 MiB map fills up");
        assert!(e.to_string().contains("MDB_MAP_FULL"), "{e}");
    }

    fn staging(map_size: usize) -> EnvOptions {
        EnvOptions {
            stage_when_empty: true,
            ..options(map_size)
        }
    }

    fn inode(path: &Path) -> u64 {
        std::fs::metadata(path).unwrap().ino()
    }

    /// The names in the main database (the trees).
    fn tree_names(dir: &Path) -> Vec<Vec<u8>> {
        read_tree_opt(dir, None)
            .into_iter()
            .map(|(k, _)| k)
            .collect()
    }

    #[test]
    fn a_write_into_an_empty_environment_is_staged_and_renamed_over_data_mdb() {
        let dir = tempdir("staged");
        // A stale staging file from a crash is replaced.
        std::fs::write(dir.join(STAGING_FILE), b"junk").unwrap();
        drop(Writer::open(&dir, options(64 << 20)).unwrap()); // creates the environment
        let data = dir.join("data.mdb");
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o600)).unwrap();
        let before = inode(&data);

        let mut w = Writer::open(&dir, staging(64 << 20)).unwrap();
        assert!(w.staged());
        w.set_commit_every(64 << 10);
        let mut a = w.open_tree(b"a").unwrap();
        let mut b = w.open_tree(b"b").unwrap();
        assert!(a.was_empty && b.was_empty);
        // Both trees across many staging commits: each cursor is renewed after one.
        for i in 0..5000 {
            w.put(&mut a, &key(i), &[1u8; 100], true).unwrap();
            w.put(&mut b, &key(i), &[2u8; 100], true).unwrap();
        }
        assert!(w.txn_serial > 10, "{}", w.txn_serial);
        assert!(w.delete(&mut b, &key(7)).unwrap());
        assert!(dir.join(STAGING_FILE).exists());
        assert_eq!(inode(&data), before); // nothing visible before the commit
        w.commit().unwrap();
        drop(w);

        assert!(!dir.join(STAGING_FILE).exists());
        assert_ne!(inode(&data), before);
        let meta = std::fs::metadata(&data).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(tree_names(&dir), vec![b"a".to_vec(), b"b".to_vec()]);
        let want_a: Records = (0..5000).map(|i| (key(i), vec![1u8; 100])).collect();
        let want_b: Records = (0..5000)
            .filter(|i| *i != 7)
            .map(|i| (key(i), vec![2u8; 100]))
            .collect();
        assert_eq!(read_tree(&dir, "a"), want_a);
        assert_eq!(read_tree(&dir, "b"), want_b);

        // Now it holds trees: the next write goes into its own transaction.
        put_unstaged(&dir, b"a", b"z", b"last");
        assert_eq!(read_tree(&dir, "a").len(), 5001);
    }

    /// A new environment without a tree: its directory, data.mdb and data.mdb's inode.
    fn empty_environment(tag: &str) -> (PathBuf, PathBuf, u64) {
        let dir = tempdir(tag);
        drop(Writer::open(&dir, options(64 << 20)).unwrap());
        let data = dir.join("data.mdb");
        let before = inode(&data);
        (dir, data, before)
    }

    #[test]
    fn trees_read_back_on_several_threads_each_see_their_own_records() {
        let (dir, _, _) = empty_environment("sealed-many");
        let mut w = Writer::open(&dir, staging(64 << 20)).unwrap();
        w.set_commit_every(64 << 10);
        let names: Vec<Vec<u8>> = (0..5).map(|i| format!("t{i}").into_bytes()).collect();
        let mut trees = Vec::new();
        let mut want = Vec::new();
        for (n, name) in names.iter().enumerate() {
            let mut t = w.open_tree(name).unwrap();
            let records: Records = (0..(n as u32 + 1) * 700)
                .map(|i| (key(i), vec![n as u8; 50 + n]))
                .collect();
            for (k, v) in &records {
                w.put(&mut t, k, v, true).unwrap();
            }
            trees.push(t);
            want.push(records);
        }
        let refs: Vec<&Tree> = trees.iter().collect();
        let read = |w: &mut Writer, threads: usize| {
            w.read_back_trees(
                &refs,
                threads,
                Records::new,
                |seen, k, v| {
                    seen.push((k.to_vec(), v.to_vec()));
                    Ok(())
                },
                |seen| seen,
            )
        };
        // Not before seal().
        assert!(read(&mut w, 2).is_err());
        w.seal().unwrap();
        for threads in [1, 2, 3, 8] {
            assert_eq!(read(&mut w, threads).unwrap(), want, "threads={threads}");
        }
        // A visitor's error is the read's, whichever thread met it; the visitors are finished
        // on their threads, at most `threads` of them alive at once.
        let alive = std::sync::atomic::AtomicUsize::new(0);
        let most = std::sync::atomic::AtomicUsize::new(0);
        let counted = w.read_back_trees(
            &refs,
            2,
            || {
                let now = alive.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                most.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
                0u32
            },
            |n, _, _| {
                *n += 1;
                Ok(())
            },
            |n| {
                alive.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                n
            },
        );
        assert_eq!(counted.unwrap(), vec![700, 1400, 2100, 2800, 3500]);
        assert!(most.load(std::sync::atomic::Ordering::SeqCst) <= 2);
        let stop = w.read_back_trees(
            &refs,
            2,
            || 0u32,
            |n, _, _| {
                *n += 1;
                if *n > 1000 {
                    Err(Error::invalid("stop"))
                } else {
                    Ok(())
                }
            },
            |n| n,
        );
        assert_eq!(stop.unwrap_err().to_string(), "stop");
        let none = w.read_back_trees(&[], 2, || (), |_, _, _| Ok(()), |()| ());
        assert!(none.unwrap().is_empty());
        w.commit().unwrap();
        for (name, records) in names.iter().zip(&want) {
            assert_eq!(
                &read_tree(&dir, std::str::from_utf8(name).unwrap()),
                records
            );
        }
    }

    #[test]
    fn an_lmdb_failure_on_any_tree_read_back_beats_a_visitor_error_and_fails_the_writer() {
        let (dir, _, _) = empty_environment("sealed-bad");
        let mut w = Writer::open(&dir, staging(64 << 20)).unwrap();
        let mut t = w.open_tree(b"t").unwrap();
        w.put(&mut t, b"k", b"v", true).unwrap();
        w.seal().unwrap();
        let no_such_tree = Tree {
            dbi: 1000, // never opened: mdb_cursor_open fails with EINVAL
            cursor: ptr::null_mut(),
            txn_serial: 0,
            was_empty: true,
            appending: false,
            last_key: Vec::new(),
        };
        let got = w.read_back_trees(
            &[&t, &no_such_tree],
            2,
            || (),
            |_, _, _| Err(Error::invalid("the visitor's error")),
            |()| (),
        );
        let e = got.unwrap_err().to_string();
        assert!(e.contains("read back the staging file"), "{e}");
        assert!(w.failed);
        assert!(w.commit().is_err()); // a failed writer publishes nothing
    }

    #[test]
    fn a_sealed_staged_write_reads_back_its_records_before_it_is_published() {
        let (dir, data, before) = empty_environment("sealed");
        let records: Records = (0..3000).map(|i| (key(i), vec![i as u8; 90])).collect();
        let write = |dir: &Path| {
            let mut w = Writer::open(dir, staging(64 << 20)).unwrap();
            w.set_commit_every(64 << 10);
            let mut t = w.open_tree(b"t").unwrap();
            for (k, v) in &records {
                w.put(&mut t, k, v, true).unwrap();
            }
            (w, t)
        };
        let read_back = |w: &mut Writer, t: &Tree| {
            let push = |seen: &mut Records, k: &[u8], v: &[u8]| {
                seen.push((k.to_vec(), v.to_vec()));
                Ok(())
            };
            w.read_back_trees(&[t], 1, Records::new, push, |seen| seen)
                .map(|mut trees| trees.pop().expect("one tree"))
        };

        // Not before seal(): the last records are not committed to the staging file yet.
        let (mut w, mut t) = write(&dir);
        assert!(read_back(&mut w, &t).is_err());
        w.seal().unwrap();
        assert_eq!(read_back(&mut w, &t).unwrap(), records);
        // Sealed: nothing more goes in.
        assert!(w.put(&mut t, b"late", b"x", true).is_err());
        // A visitor's error is the read's; dropping the sealed writer publishes nothing.
        let stop = w.read_back_trees(&[&t], 1, || (), |_, _, _| Err(Error::invalid("stop")), drop);
        assert_eq!(stop.unwrap_err().to_string(), "stop");
        drop(w);
        assert!(!dir.join(STAGING_FILE).exists());
        assert_eq!(inode(&data), before);
        assert!(tree_names(&dir).is_empty());

        let (mut w, t) = write(&dir);
        w.seal().unwrap();
        assert_eq!(read_back(&mut w, &t).unwrap(), records);
        assert_eq!(inode(&data), before); // still the old file until the commit
        w.commit().unwrap();
        assert!(read_back(&mut w, &t).is_err()); // published: nothing left to read back
        drop(w);
        assert_ne!(inode(&data), before);
        assert_eq!(read_tree(&dir, "t"), records);

        // An unstaged write has nothing to seal.
        let mut w = Writer::open(&dir, staging(64 << 20)).unwrap();
        assert!(!w.staged());
        assert!(w.seal().is_err());
    }

    #[test]
    fn a_staged_write_through_the_map_allocates_ahead_and_is_cut_to_its_pages() {
        let (dir, data, before) = empty_environment("staged-map");
        let options = EnvOptions {
            stage_writemap: true,
            ..staging(256 << 20)
        };
        let mut w = Writer::open(&dir, options).unwrap();
        assert!(w.staged());
        w.set_commit_every(1 << 20);
        let mut t = w.open_tree(b"t").unwrap();
        let records: Records = (0..300).map(|i| (key(i), vec![i as u8; 10_000])).collect();
        let staging_file = dir.join(STAGING_FILE);
        for (k, v) in &records {
            w.put(&mut t, k, v, true).unwrap();
            let room = w.staged.as_ref().unwrap().room.as_ref().unwrap();
            // Every page LMDB may have touched is allocated on disk.
            assert!(room.allocated >= room.committed_end + 2 * room.txn_bytes);
            let blocks = std::fs::metadata(&staging_file).unwrap().blocks();
            assert!(
                blocks * 512 >= room.allocated,
                "{blocks} {}",
                room.allocated
            );
        }
        assert!(w.txn_serial >= 2, "{}", w.txn_serial);
        // The pages of committed transactions were unmapped (the map was found), and what the
        // last one wrote reads back after that.
        let room = w.staged.as_ref().unwrap().room.as_ref().unwrap();
        assert_ne!(room.map_addr, 0);
        assert_eq!(room.released_end, room.committed_end);
        assert!(room.committed_end > 2 << 20, "{}", room.committed_end);
        // LMDB set the file to the map size (sparse) ...
        assert_eq!(std::fs::metadata(&staging_file).unwrap().len(), 256 << 20);
        w.commit().unwrap();
        drop(w);
        // ... and the published file holds only the pages in use.
        let size = std::fs::metadata(&data).unwrap().len();
        assert!(
            size % 4096 == 0 && (3_000_000..4 << 20).contains(&size),
            "{size}"
        );
        assert_ne!(inode(&data), before);
        assert_eq!(read_tree(&dir, "t"), records);
    }

    #[test]
    fn room_estimates_cover_the_pages_lmdb_uses() {
        // Without slack or steps: the estimate alone must stay ahead of LMDB, across commits, many
        // trees written in turn, small and overflow values, puts out of order and deletes.
        let (dir, _, _) = empty_environment("room-estimate");
        let options = EnvOptions {
            stage_writemap: true,
            max_dbs: 200,
            ..staging(256 << 20)
        };
        let mut w = Writer::open(&dir, options).unwrap();
        w.set_commit_every(256 << 10);
        let room = w.staged.as_mut().unwrap().room.as_mut().unwrap();
        (room.slack, room.step) = (0, 0);
        let mut trees: Vec<Tree> = (0..150)
            .map(|i| w.open_tree(format!("t{i}").as_bytes()).unwrap())
            .collect();
        let check = |w: &Writer| {
            let room = w.staged.as_ref().unwrap().room.as_ref().unwrap();
            assert!(
                room.committed_end <= room.allocated,
                "{} > {}",
                room.committed_end,
                room.allocated
            );
        };
        for round in 0..40u32 {
            for (i, t) in trees.iter_mut().enumerate() {
                let value = vec![round as u8; if i % 3 == 0 { 5000 } else { 40 }];
                w.put(
                    t,
                    &key(round * 7 % 40 + 1000 * (i as u32 % 2)),
                    &value,
                    true,
                )
                .unwrap();
                check(&w);
            }
        }
        for t in trees.iter_mut().step_by(2) {
            w.delete(t, &key(7)).unwrap();
        }
        w.seal().unwrap();
        check(&w);
        assert!(w.txn_serial > 5, "{}", w.txn_serial);
        w.commit().unwrap();
    }

    #[test]
    fn room_that_cannot_be_allocated_is_an_error() {
        let dir = tempdir("room");
        std::fs::write(dir.join("f"), b"").unwrap();
        let read_only = File::open(dir.join("f")).unwrap();
        let mut room = Room {
            fd: read_only.as_raw_fd(),
            page_size: 4096,
            allocated: 0,
            map_size: 1 << 30,
            committed_end: 8192,
            map_addr: 0,
            released_end: 0,
            txn_bytes: 0,
            slack: ROOM_SLACK,
            step: ROOM_STEP,
        };
        let e = room.make_room(100).unwrap_err().to_string();
        assert!(
            e.contains("cannot allocate") && e.contains("free some disk space"),
            "{e}"
        );
        assert_eq!(room.allocated, 0);
    }

    /// A sync that fails passes its error on to the sync after it, which succeeds on its own:
    /// a write-behind failure reaches `commit` even when the final sync does not fail.
    #[test]
    fn a_failed_sync_is_passed_on_to_the_next() {
        let dir = tempdir("sync-chain");
        let file = File::create(dir.join("f")).unwrap();
        let failed = sync_in_thread(-1, None, None);
        let next = sync_in_thread(file.as_raw_fd(), Some(failed), None);
        let e = join_sync_thread(next).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF), "{e}");
        assert!(join_sync_thread(sync_in_thread(file.as_raw_fd(), None, None)).is_ok());
        // A write-behind sync of a range reports errors the same way.
        let failed = sync_in_thread(-1, None, Some(4096));
        let e = join_sync_thread(failed).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF), "{e}");
        assert!(join_sync_thread(sync_in_thread(file.as_raw_fd(), None, Some(4096))).is_ok());
    }

    /// Staged commits start write-behind syncs, and `seal`'s final sync takes over the last.
    #[test]
    fn staged_commits_sync_behind_and_seal_takes_over() {
        let (dir, _, _) = empty_environment("write-behind");
        let records: Records = (0..3000).map(|i| (key(i), vec![i as u8; 90])).collect();
        let mut w = Writer::open(&dir, staging(64 << 20)).unwrap();
        w.set_commit_every(64 << 10);
        let mut t = w.open_tree(b"t").unwrap();
        for (k, v) in &records {
            w.put(&mut t, k, v, true).unwrap();
        }
        assert!(w.txn_serial > 3, "{}", w.txn_serial);
        assert!(w.staged.as_ref().unwrap().write_behind.is_some());
        w.seal().unwrap();
        let staged = w.staged.as_ref().unwrap();
        assert!(staged.write_behind.is_none() && staged.sync.is_some());
        w.commit().unwrap();
        drop(w);
        assert_eq!(read_tree(&dir, "t"), records);
    }

    #[test]
    fn a_staged_write_dropped_or_failed_leaves_the_environment_as_it_was() {
        let (dir, data, before) = empty_environment("staged-abort");
        let mut w = Writer::open(&dir, staging(64 << 20)).unwrap();
        w.set_commit_every(4096);
        let mut t = w.open_tree(b"t").unwrap();
        for i in 0..1000 {
            w.put(&mut t, &key(i), b"value", true).unwrap();
        }
        drop(w);
        assert!(!dir.join(STAGING_FILE).exists());
        assert_eq!(inode(&data), before);
        assert!(tree_names(&dir).is_empty());

        // A full map fails the staged transaction the same way.
        let mut w = Writer::open(&dir, staging(1 << 20)).unwrap();
        assert!(w.staged());
        w.set_commit_every(64 << 10);
        let mut t = w.open_tree(b"t").unwrap();
        fill_a_small_map(&mut w, &mut t);
        assert!(w.commit().is_err());
        drop(w);
        assert!(!dir.join(STAGING_FILE).exists());
        assert_eq!(inode(&data), before);
        assert!(tree_names(&dir).is_empty());
    }

    #[test]
    fn an_environment_another_process_has_open_is_not_staged() {
        let dir = tempdir("staged-shared");
        drop(Writer::open(&dir, options(16 << 20)).unwrap());
        // What LMDB's opener holds: a read lock on byte 0 of lock.mdb, here from another process
        // (fork + exec: a forked copy of this one would share the other tests' descriptors).
        let script = "import fcntl, os, sys\n\
                      fd = os.open(sys.argv[1], os.O_RDWR)\n\
                      fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, 0)\n\
                      print('locked', flush=True)\n\
                      sys.stdin.read()\n";
        let child = std::process::Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(dir.join("lock.mdb"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn();
        let Ok(mut child) = child else {
            eprintln!("skipped: no python3 to hold the lock");
            return;
        };
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line, "locked\n");

        put_unstaged(&dir, b"t", b"k", b"v");

        drop(child.stdin.take());
        assert!(child.wait().unwrap().success());
        assert_eq!(read_tree(&dir, "t"), vec![(b"k".to_vec(), b"v".to_vec())]);
    }

    #[test]
    fn a_second_writer_waits_for_the_first_and_sees_its_file() {
        let dir = tempdir("wait");
        let mut w = Writer::open(&dir, staging(16 << 20)).unwrap();
        assert!(w.staged());
        let mut t = w.open_tree(b"t").unwrap();
        w.put(&mut t, b"k", b"first", true).unwrap();
        let (opened, wait) = std::sync::mpsc::channel();
        let second_dir = dir.clone();
        let second = std::thread::spawn(move || {
            let mut w = Writer::open(&second_dir, staging(16 << 20)).unwrap();
            opened.send(()).unwrap();
            let mut t = w.open_tree(b"t").unwrap();
            let put = w.put(&mut t, b"k", b"second", false).unwrap();
            w.commit().unwrap();
            (w.staged(), put)
        });
        // Held on the flock until the first writer is gone (a correctness check, not a timing).
        let waited = wait.recv_timeout(std::time::Duration::from_millis(300));
        assert!(waited.is_err(), "the second writer opened beside the first");
        w.commit().unwrap();
        drop(w);
        // It opened the renamed file: the tree is there, so it wrote in place and kept the key.
        assert_eq!(second.join().unwrap(), (false, Put::Skipped));
        assert_eq!(
            read_tree(&dir, "t"),
            vec![(b"k".to_vec(), b"first".to_vec())]
        );
    }

    #[test]
    fn a_process_forked_during_a_write_does_not_keep_the_writer_lock() {
        let dir = tempdir("fork");
        let w = Writer::open(&dir, staging(16 << 20)).unwrap();
        let mut release = [0 as c_int; 2];
        // SAFETY: the child only makes async-signal-safe calls (read, _exit).
        let pid = unsafe {
            assert_eq!(libc::pipe(release.as_mut_ptr()), 0);
            let pid = libc::fork();
            if pid == 0 {
                let mut byte = 0u8;
                libc::read(release[0], (&mut byte as *mut u8).cast(), 1);
                libc::_exit(0);
            }
            pid
        };
        assert!(pid > 0);
        drop(w); // the child still has the lock file's open description
        let lock = File::options()
            .read(true)
            .write(true)
            .open(dir.join("lock.mdb"))
            .unwrap();
        // SAFETY: plain calls on descriptors this test owns; waitpid on its child.
        let free = unsafe {
            let free = libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0;
            libc::write(release[1], [1u8].as_ptr().cast(), 1);
            libc::waitpid(pid, &mut 0, 0);
            libc::close(release[0]);
            libc::close(release[1]);
            free
        };
        assert!(free, "the forked child kept the writer lock");
    }

    #[test]
    fn appends_then_puts_skips_and_deletes() {
        let dir = tempdir("mixed");
        let mut w = Writer::open(&dir, options(64 << 20)).unwrap();
        let mut t = w.open_tree(b"t").unwrap();
        assert!(t.was_empty);
        for i in (0..5000).step_by(2) {
            assert_eq!(
                w.put(&mut t, &key(i), &[i as u8; 100], false).unwrap(),
                Put::Written
            );
        }
        // Out of order: the appends end, the record still lands in its place.
        assert_eq!(w.put(&mut t, &key(1), b"one", false).unwrap(), Put::Written);
        assert!(!t.appending);
        assert_eq!(
            w.put(&mut t, &key(2), b"kept?", false).unwrap(),
            Put::Skipped
        );
        assert_eq!(w.put(&mut t, &key(4), b"four", true).unwrap(), Put::Written);
        assert!(w.delete(&mut t, &key(6)).unwrap());
        assert!(!w.delete(&mut t, &key(7)).unwrap());
        assert!(!w.delete(&mut t, &[0u8; 600]).unwrap());
        assert_eq!(w.records, 2500 + 2 + 1);
        w.commit().unwrap();
        assert!(w.commit().is_err()); // spent
        drop(w);

        let got = read_tree(&dir, "t");
        let mut want: Records = (0..5000)
            .step_by(2)
            .filter(|i| *i != 6)
            .map(|i| (key(i), vec![i as u8; 100]))
            .collect();
        want.push((key(1), b"one".to_vec()));
        want.sort();
        for (k, v) in want.iter_mut() {
            if *k == key(4) {
                *v = b"four".to_vec();
            }
        }
        assert_eq!(got, want);

        // A second transaction sees a non-empty tree: no appends, overwrite=false skips.
        let mut w = Writer::open(&dir, options(64 << 20)).unwrap();
        let mut t = w.open_tree(b"t").unwrap();
        assert!(!t.was_empty && !t.appending);
        assert_eq!(w.put(&mut t, &key(0), b"new", false).unwrap(), Put::Skipped);
        assert_eq!(
            w.put(&mut t, &key(9999), b"new", false).unwrap(),
            Put::Written
        );
        w.commit().unwrap();
        drop(w);
        let got = read_tree(&dir, "t");
        assert_eq!(got[0], (key(0), vec![0u8; 100]));
        assert_eq!(got.last().unwrap(), &(key(9999), b"new".to_vec()));
    }

    #[test]
    fn dropped_without_commit_writes_nothing() {
        let dir = tempdir("abort");
        let mut w = Writer::open(&dir, options(16 << 20)).unwrap();
        let mut t = w.open_tree(b"t").unwrap();
        w.put(&mut t, b"k", b"v", true).unwrap();
        w.commit().unwrap();
        drop(w);
        let mut w = Writer::open(&dir, options(16 << 20)).unwrap();
        let mut t = w.open_tree(b"t").unwrap();
        w.put(&mut t, b"k", b"changed", true).unwrap();
        w.put(&mut t, b"k2", b"v2", true).unwrap();
        drop(w);
        assert_eq!(read_tree(&dir, "t"), vec![(b"k".to_vec(), b"v".to_vec())]);
    }

    #[test]
    fn bad_keys_and_a_full_map_fail_the_transaction() {
        let dir = tempdir("bad");
        let mut w = Writer::open(&dir, options(16 << 20)).unwrap();
        let mut t = w.open_tree(b"t").unwrap();
        let e = w.put(&mut t, b"", b"v", true).unwrap_err();
        assert!(e.to_string().contains("empty key"), "{e}");
        assert!(matches!(
            w.put(&mut t, b"k", b"v", true),
            Err(Error::Poisoned(_))
        ));
        drop(w);
        let mut w = Writer::open(&dir, options(16 << 20)).unwrap();
        let mut t = w.open_tree(b"t").unwrap();
        let e = w.put(&mut t, &[1u8; 512], b"v", true).unwrap_err();
        assert!(e.to_string().contains("at most 511 bytes"), "{e}");
        drop(w);

        let dir = tempdir("full");
        let mut w = Writer::open(&dir, options(1 << 20)).unwrap();
        let mut t = w.open_tree(b"t").unwrap();
        fill_a_small_map(&mut w, &mut t);
        assert!(matches!(
            w.put(&mut t, b"k", b"v", true),
            Err(Error::Poisoned(_))
        ));
    }

    #[test]
    fn tree_names_are_checked() {
        let dir = tempdir("names");
        let mut w = Writer::open(&dir, options(16 << 20)).unwrap();
        assert!(w.open_tree(b"a\0b").is_err());
        assert!(w.open_tree(&[b'n'; 512]).is_err());
        let e = (0..9)
            .map(|i| w.open_tree(format!("tree{i}").as_bytes()))
            .find_map(|r| r.err())
            .expect("max_dbs is 8");
        assert!(e.to_string().contains("max_dbs"), "{e}");
    }
}
