//! The PyO3 binding: thin adapters from Python objects to the plain Rust modules.

mod errors;
mod reader;
mod writer;

use pyo3::buffer::PyBuffer;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};
use zeroize::Zeroizing;

use crate::digest::ItemDigester;
use crate::format;
use crate::keys::{derive_digest_key, derive_key_id as derive_key_id_rs, HkdfHash, SecretKey};
use crate::stream::{self, StreamParams};

pub use errors::PyResultExt;

/// Calls `f` with the bytes of a bytes-like object: zero-copy for bytes and contiguous buffers.
pub(crate) fn with_bytes<R>(obj: &Bound<'_, PyAny>, f: impl FnOnce(&[u8]) -> R) -> PyResult<R> {
    if let Ok(b) = obj.downcast::<PyBytes>() {
        return Ok(f(b.as_bytes()));
    }
    let buf = PyBuffer::<u8>::get(obj).map_err(|_| {
        pyo3::exceptions::PyTypeError::new_err(format!(
            "expected a bytes-like object, got {}",
            obj.get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default()
        ))
    })?;
    if buf.is_c_contiguous() {
        // SAFETY: the buffer export pins the memory for as long as `buf` lives, and we hold the GIL.
        let s = unsafe { std::slice::from_raw_parts(buf.buf_ptr() as *const u8, buf.len_bytes()) };
        Ok(f(s))
    } else {
        Ok(f(&buf.to_vec(obj.py())?))
    }
}

/// An owned copy of a small bytes-like argument that is wiped when dropped (keys, salts).
pub(crate) fn secret_arg(obj: &Bound<'_, PyAny>) -> PyResult<Zeroizing<Vec<u8>>> {
    with_bytes(obj, |b| Zeroizing::new(b.to_vec()))
}

pub(crate) fn opt_arg(obj: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Vec<u8>>> {
    obj.filter(|o| !o.is_none())
        .map(|o| with_bytes(o, |b| b.to_vec()))
        .transpose()
}

/// Unpacks one (key, value) pair from an iterator item.
pub(crate) fn pair<'py>(
    item: &Bound<'py, PyAny>,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    if let Ok(t) = item.downcast::<PyTuple>() {
        if t.len() == 2 {
            return Ok((t.get_item(0)?, t.get_item(1)?));
        }
    }
    item.extract::<(Bound<'py, PyAny>, Bound<'py, PyAny>)>()
        .map_err(|_| {
            pyo3::exceptions::PyTypeError::new_err(
                "items must be (key, value) pairs of bytes-like objects",
            )
        })
}

/// The `compression_level` argument: an int (not a bool) in 0..=22, checked like the pure core does.
pub(crate) fn level_arg(obj: &Bound<'_, PyAny>) -> PyResult<i32> {
    if obj.is_instance_of::<pyo3::types::PyBool>() || !obj.is_instance_of::<pyo3::types::PyInt>() {
        let kind = obj
            .get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_default();
        return Err(errors::ArgumentTypeError::new_err(format!(
            "compression_level must be an int, not {kind}"
        )));
    }
    // An int beyond i64 is out of range like any other.
    let level = obj.extract::<i64>().unwrap_or(i64::MAX);
    Ok(crate::compress::check_level(level)?)
}

/// The `threads` argument: 0 means all cores.
pub(crate) fn threads_arg(threads: i64) -> PyResult<usize> {
    match threads {
        0 => Ok(crate::parallel::default_threads()),
        n if n > 0 => Ok(n as usize),
        n => Err(crate::error::Error::invalid(format!(
            "threads must be 0 (all cores) or more, got {n}"
        ))
        .into()),
    }
}

fn stream_params(
    hkdf_hash: &str,
    derived_key_size: usize,
    segment_size: u64,
) -> PyResult<StreamParams> {
    Ok(StreamParams::new(
        HkdfHash::parse(hkdf_hash)?,
        derived_key_size,
        segment_size,
    )?)
}

#[pyfunction]
#[pyo3(signature = (key, plaintext, aad, segment_size, salt=None, nonce_prefix=None, *, hkdf_hash="sha256", derived_key_size=32, threads=0))]
#[allow(clippy::too_many_arguments)]
fn encrypt_stream<'py>(
    py: Python<'py>,
    key: &Bound<'py, PyAny>,
    plaintext: &Bound<'py, PyAny>,
    aad: &Bound<'py, PyAny>,
    segment_size: u64,
    salt: Option<&Bound<'py, PyAny>>,
    nonce_prefix: Option<&Bound<'py, PyAny>>,
    hkdf_hash: &str,
    derived_key_size: usize,
    threads: i64,
) -> PyResult<Bound<'py, PyBytes>> {
    let params = stream_params(hkdf_hash, derived_key_size, segment_size)?;
    let threads = threads_arg(threads)?;
    let key = secret_arg(key)?;
    let (aad, salt, prefix) = (
        with_bytes(aad, <[u8]>::to_vec)?,
        opt_arg(salt)?,
        opt_arg(nonce_prefix)?,
    );
    let cipher = stream::new_cipher(params, &key, &aad, salt.as_deref(), prefix.as_deref())?;
    with_bytes(plaintext, |pt| {
        let len = stream::ciphertext_length_for(&params, pt.len() as u64) as usize;
        // Seal straight into the new bytes object, with the GIL released.
        PyBytes::new_with(py, len, |out| {
            Ok(py.detach(|| stream::encrypt_to(&cipher, pt, out, threads))?)
        })
    })?
}

#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (key, ciphertext, aad, segment_size, *, hkdf_hash="sha256", derived_key_size=32, threads=0))]
fn decrypt_stream<'py>(
    py: Python<'py>,
    key: &Bound<'py, PyAny>,
    ciphertext: &Bound<'py, PyAny>,
    aad: &Bound<'py, PyAny>,
    segment_size: u64,
    hkdf_hash: &str,
    derived_key_size: usize,
    threads: i64,
) -> PyResult<Bound<'py, PyBytes>> {
    let params = stream_params(hkdf_hash, derived_key_size, segment_size)?;
    let threads = threads_arg(threads)?;
    let key = secret_arg(key)?;
    let aad = with_bytes(aad, <[u8]>::to_vec)?;
    with_bytes(ciphertext, |ct| {
        if ct.len() < params.header_length() {
            return Err(
                crate::error::Error::integrity("stream is truncated inside its header").into(),
            );
        }
        let len = stream::plaintext_length_for(&params, ct.len() as u64)? as usize;
        PyBytes::new_with(py, len, |out| {
            Ok(py.detach(|| stream::decrypt_to(params, &key, ct, &aad, out, threads))?)
        })
    })?
}

#[pyfunction]
fn derive_key_id<'py>(
    py: Python<'py>,
    backup_key: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyBytes>> {
    let key = SecretKey::from_slice(&secret_arg(backup_key)?, "backup key")?;
    Ok(PyBytes::new(py, &derive_key_id_rs(key.as_bytes())))
}

#[pyfunction]
fn digest_items<'py>(
    py: Python<'py>,
    backup_key: &Bound<'py, PyAny>,
    items: &Bound<'py, PyAny>,
) -> PyResult<(u64, u64, Bound<'py, PyBytes>)> {
    let key = SecretKey::from_slice(&secret_arg(backup_key)?, "backup key")?;
    let mut digester = ItemDigester::new(derive_digest_key(key.as_bytes()).as_bytes());
    for item in items.try_iter()? {
        let item = item?;
        let (k, v) = pair(&item)?;
        if v.is_none() {
            with_bytes(&k, |k| digester.add(k, None))??;
        } else {
            with_bytes(&k, |k| with_bytes(&v, |v| digester.add(k, Some(v))))???;
        }
    }
    let (tally, digest) = digester.finish();
    Ok((tally.items, tally.bytes, PyBytes::new(py, &digest)))
}

#[pyfunction]
#[pyo3(signature = (segment_size, key_id, kdf_id=0, kdf_params=None))]
fn encode_preamble<'py>(
    py: Python<'py>,
    segment_size: u64,
    key_id: &Bound<'py, PyAny>,
    kdf_id: u16,
    kdf_params: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyBytes>> {
    let segment_size = format::check_segment_size(segment_size)?;
    let key_id = with_bytes(key_id, <[u8]>::to_vec)?;
    let kdf_params = opt_arg(kdf_params)?.unwrap_or_default();
    let p = format::Preamble::encode(segment_size, &key_id, kdf_id, &kdf_params)?;
    Ok(PyBytes::new(py, &p.raw))
}

#[pyfunction]
fn parse_preamble(data: &Bound<'_, PyAny>) -> PyResult<reader::PyPreamble> {
    let p = with_bytes(data, format::Preamble::parse)??;
    Ok(reader::PyPreamble(p))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("CORE_NAME", "rust")?;
    m.add("MAGIC", PyBytes::new(m.py(), format::MAGIC))?;
    m.add("FORMAT_VERSION", format::FORMAT_VERSION)?;
    m.add("DEFAULT_SEGMENT_SIZE", format::DEFAULT_SEGMENT_SIZE)?;
    m.add("MIN_SEGMENT_SIZE", format::MIN_SEGMENT_SIZE)?;
    m.add("MAX_SEGMENT_SIZE", format::MAX_SEGMENT_SIZE)?;
    m.add("MAX_PREAMBLE_LENGTH", format::MAX_PREAMBLE_LENGTH)?;
    m.add_function(wrap_pyfunction!(encrypt_stream, m)?)?;
    m.add_function(wrap_pyfunction!(decrypt_stream, m)?)?;
    m.add_function(wrap_pyfunction!(derive_key_id, m)?)?;
    m.add_function(wrap_pyfunction!(digest_items, m)?)?;
    m.add_function(wrap_pyfunction!(encode_preamble, m)?)?;
    m.add_function(wrap_pyfunction!(parse_preamble, m)?)?;
    m.add_class::<reader::PyPreamble>()?;
    m.add_class::<writer::PyBackupWriter>()?;
    m.add_class::<reader::PyBackupReader>()?;
    Ok(())
}
