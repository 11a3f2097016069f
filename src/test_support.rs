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
