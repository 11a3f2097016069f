//! One LMDB write transaction through the LMDB C library, fed straight from a `BackupDecoder`
//! (or a backup chain's merge): a restore that writes its records here never makes a Python
//! object per record.
//!
//! The LMDB store opens its environment with py-lmdb, which links its own LMDB. Two LMDB builds
//! must never have one environment open in one process at once (the locks are per process), so
//! the store closes its py-lmdb environment before it opens a `Writer` and reopens it after the
//! writer is gone (python/datafold/stores/lmdb.py, `_SharedEnv.hand_over`). The bundled LMDB (mdb.master)
//! writes data format 1, as py-lmdb's LMDB 0.9 does, and a different lock-file format: if any
//! other process has the environment open, `Writer::open` fails with a version mismatch instead
//! of sharing the lock table, and the store keeps writing through py-lmdb.

use std::ffi::{c_int, CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::ptr;

use lmdb_master_sys as ffi;

use crate::error::{Error, Result};
use crate::reader::{BackupDecoder, Item, Step};

/// How the environment is opened: the same values py-lmdb had, so the two agree on the map.
#[derive(Clone, Copy, Debug)]
pub struct EnvOptions {
    pub map_size: usize,
    pub max_dbs: u32,
    pub max_readers: u32,
    pub writemap: bool,
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
    /// A cursor of the writer's transaction, which frees it when it ends: puts through one
    /// cursor skip setting up a new one for every record.
    cursor: *mut ffi::MDB_cursor,
    /// The tree had no record when the transaction opened it.
    pub was_empty: bool,
    /// While every key so far came in ascending order into a tree that was empty, puts are
    /// appends (MDB_APPEND: pages fill up instead of splitting in half); after that, plain puts.
    appending: bool,
    last_key: Vec<u8>,
}

/// An environment with its one write transaction; dropping it without `commit` aborts.
pub struct Writer {
    env: *mut ffi::MDB_env,
    txn: *mut ffi::MDB_txn,
    max_key: usize,
    failed: bool,
    /// Records put or deleted so far (skipped ones not counted).
    pub records: u64,
}

impl Writer {
    /// Opens the environment directory `path` (data.mdb and lock.mdb in it) and begins the write
    /// transaction.
    pub fn open(path: &Path, options: EnvOptions) -> Result<Writer> {
        let c_path = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| Error::Store("the database path contains a NUL byte".into()))?;
        let mut env = ptr::null_mut();
        // SAFETY: plain LMDB calls on a handle this function owns; it is closed on every error.
        unsafe {
            check(ffi::mdb_env_create(&mut env), "create an LMDB environment")?;
            let mut w = Writer {
                env,
                txn: ptr::null_mut(),
                max_key: 0,
                failed: false,
                records: 0,
            };
            let flags = if options.writemap {
                ffi::MDB_WRITEMAP
            } else {
                0
            };
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
                ffi::mdb_env_open(env, c_path.as_ptr(), flags, 0o644),
                "open the environment",
            )?;
            w.max_key = ffi::mdb_env_get_maxkeysize(env) as usize;
            check(
                ffi::mdb_txn_begin(env, ptr::null_mut(), 0, &mut w.txn),
                "begin a write transaction",
            )?;
            Ok(w)
        }
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
        let hint = match rc {
            ffi::MDB_MAP_FULL => "; reopen the database with a larger map_size option",
            ffi::MDB_DBS_FULL => "; reopen with a larger max_dbs option",
            _ => "",
        };
        Error::Store(format!("LMDB {action} failed: {}{hint}", lmdb_message(rc)))
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
        Ok(Tree {
            cursor,
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
        let mut k = val(key);
        let mut v = val(value);
        // SAFETY: a cursor of the live write transaction; LMDB copies key and value.
        let rc = unsafe { ffi::mdb_cursor_put(tree.cursor, &mut k, &mut v, flags) };
        if append {
            tree.last_key.clear();
            tree.last_key.extend_from_slice(key);
        } else {
            tree.appending = false;
        }
        match rc {
            0 => {
                self.records += 1;
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
        let (mut k, mut v) = (val(key), val(b""));
        // SAFETY: a cursor of the live write transaction.
        match unsafe { ffi::mdb_cursor_get(tree.cursor, &mut k, &mut v, ffi::MDB_SET) } {
            0 => {}
            ffi::MDB_NOTFOUND => return Ok(false),
            rc => return Err(self.fail(rc, "delete")),
        }
        match unsafe { ffi::mdb_cursor_del(tree.cursor, 0) } {
            0 => {
                self.records += 1;
                Ok(true)
            }
            rc => Err(self.fail(rc, "delete")),
        }
    }

    /// Commits (durably: the environment has sync on); the writer is spent afterwards.
    pub fn commit(&mut self) -> Result<()> {
        let txn = self.live()?;
        self.txn = ptr::null_mut();
        // SAFETY: the transaction is live; mdb_txn_commit frees it whatever it returns.
        let rc = unsafe { ffi::mdb_txn_commit(txn) };
        if rc != 0 {
            return Err(self.fail(rc, "commit"));
        }
        Ok(())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // SAFETY: handles this writer owns; an uncommitted transaction is aborted first.
        unsafe {
            if !self.txn.is_null() {
                ffi::mdb_txn_abort(self.txn);
            }
            ffi::mdb_env_close(self.env);
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
    if !key.starts_with(prefix) {
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
        }
    }

    /// Every record of the tree `name`, read with a cursor of the same LMDB.
    fn read_tree(dir: &Path, name: &str) -> Records {
        let c_path = CString::new(dir.as_os_str().as_bytes()).unwrap();
        let c_name = CString::new(name).unwrap();
        let mut out = Vec::new();
        unsafe {
            let mut env = ptr::null_mut();
            assert_eq!(ffi::mdb_env_create(&mut env), 0);
            assert_eq!(ffi::mdb_env_set_maxdbs(env, 8), 0);
            assert_eq!(
                ffi::mdb_env_open(env, c_path.as_ptr(), ffi::MDB_RDONLY, 0o644),
                0
            );
            let mut txn = ptr::null_mut();
            assert_eq!(
                ffi::mdb_txn_begin(env, ptr::null_mut(), ffi::MDB_RDONLY, &mut txn),
                0
            );
            let mut dbi = 0;
            assert_eq!(ffi::mdb_dbi_open(txn, c_name.as_ptr(), 0, &mut dbi), 0);
            let mut cursor = ptr::null_mut();
            assert_eq!(ffi::mdb_cursor_open(txn, dbi, &mut cursor), 0);
            let (mut k, mut v) = (val(b""), val(b""));
            let mut op = ffi::MDB_FIRST;
            while ffi::mdb_cursor_get(cursor, &mut k, &mut v, op) == 0 {
                let key = std::slice::from_raw_parts(k.mv_data as *const u8, k.mv_size);
                let value = std::slice::from_raw_parts(v.mv_data as *const u8, v.mv_size);
                out.push((key.to_vec(), value.to_vec()));
                op = ffi::MDB_NEXT;
            }
            ffi::mdb_cursor_close(cursor);
            ffi::mdb_txn_abort(txn);
            ffi::mdb_env_close(env);
        }
        out
    }

    fn key(i: u32) -> Vec<u8> {
        format!("key{i:08}").into_bytes()
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
        let e = (0..100_000u32)
            .map(|i| w.put(&mut t, &key(i), &[0u8; 100], true))
            .find_map(|r| r.err())
            .expect("a 1 MiB map fills up");
        assert!(e.to_string().contains("MDB_MAP_FULL"), "{e}");
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
