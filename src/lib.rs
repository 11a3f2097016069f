//! datafold's backup core. The domain logic lives in plain Rust modules that know nothing of
//! Python; `py` (feature `python`) adapts them for `datafold._core`. This file is only the registry.

pub mod aead;
pub mod chain;
pub mod compress;
pub mod digest;
pub mod error;
pub mod format;
pub mod keys;
pub mod lmdb_file;
pub mod lmdb_write;
pub mod parallel;
mod placement;
mod pool;
pub mod reader;
pub mod stream;
pub mod writer;

#[cfg(feature = "python")]
mod py;

#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests;

#[cfg(feature = "python")]
#[pyo3::pymodule]
fn _core(m: &pyo3::Bound<'_, pyo3::types::PyModule>) -> pyo3::PyResult<()> {
    py::register(m)
}
