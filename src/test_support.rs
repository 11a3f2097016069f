//! Shared helpers of the Rust unit tests.

use serde_json::Value;
use std::path::PathBuf;

/// Loads a vector file from `../shared/vectors` (or `$DATAFOLD_VECTORS_DIR`). A missing file is a
/// test failure, not a skip: CI always has the vectors.
pub fn load_vectors(name: &str) -> Value {
    let dir = std::env::var_os("DATAFOLD_VECTORS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/vectors"));
    let path = dir.join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("test vectors {} not readable: {e}", path.display()));
    serde_json::from_str(&text).expect("vector file is JSON")
}

pub fn unhex(v: &Value, k: &str) -> Vec<u8> {
    hex::decode(v[k].as_str().unwrap()).unwrap()
}

/// A seeded xorshift64 generator: deterministic test data without a dependency.
pub fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut state = seed;
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}

/// An LMDB environment directory opened read-only with a read transaction (up to 16 named
/// databases), for tests that check what was written; aborted and closed when dropped.
pub struct LmdbReadTxn {
    env: *mut lmdb_master_sys::MDB_env,
    pub txn: *mut lmdb_master_sys::MDB_txn,
}

impl LmdbReadTxn {
    pub fn open(dir: &std::path::Path) -> Self {
        use lmdb_master_sys as ffi;
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
        let (mut env, mut txn) = (std::ptr::null_mut(), std::ptr::null_mut());
        // SAFETY: plain LMDB calls on handles this value owns.
        unsafe {
            assert_eq!(ffi::mdb_env_create(&mut env), 0);
            assert_eq!(ffi::mdb_env_set_maxdbs(env, 16), 0);
            assert_eq!(
                ffi::mdb_env_open(env, path.as_ptr(), ffi::MDB_RDONLY, 0o644),
                0
            );
            assert_eq!(
                ffi::mdb_txn_begin(env, std::ptr::null_mut(), ffi::MDB_RDONLY, &mut txn),
                0
            );
        }
        LmdbReadTxn { env, txn }
    }
}

impl Drop for LmdbReadTxn {
    fn drop(&mut self) {
        // SAFETY: the transaction and environment this value opened.
        unsafe {
            lmdb_master_sys::mdb_txn_abort(self.txn);
            lmdb_master_sys::mdb_env_close(self.env);
        }
    }
}
