//! The PyO3 binding: thin adapters from Python objects to the plain Rust modules.

mod chain;
mod errors;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `purge_delay` option: this build's default, 1000 ms, kept ~20 MiB of freed buffers
/// committed through a backup (its anonymous memory grew 64 MiB against 50-52 MiB at 10 ms,
/// near the bound), while 10 ms still keeps the buffers a backup or restore frees and
/// takes again a moment later. The environment variable, if set, wins.
const PURGE_DELAY_MS: std::ffi::c_long = 10;
/// `mi_option_purge_delay` in mimalloc.h (v3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn configure_allocator() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: a valid option; at import, under the GIL, before this module starts a thread.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    }
}

mod lmdb;
mod reader;
mod writer;

use pyo3::buffer::PyBuffer;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyInt, PyList, PyString, PyTuple};
use zeroize::Zeroizing;

use crate::digest::ItemDigester;
use crate::error::Error;
use crate::format;
use crate::keys::{derive_digest_key, derive_key_id as derive_key_id_rs, HkdfHash, SecretKey};
use crate::stream::{self, StreamParams};

pub use errors::PyResultExt;

/// The name of `obj`'s type, for messages.
pub(crate) fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_default()
}

/// An int argument, taken as the Python object so that no value, however large, raises
/// OverflowError while the arguments are parsed. `get` and `at_least` check it as the pure core
/// does: ArgumentTypeError for anything but an int (a bool too), and for a value out of range
/// the InvalidArgumentError the domain check gives, naming the argument and the value.
pub(crate) enum IntArg<'py> {
    Given(Bound<'py, PyAny>),
    /// The signature's default.
    Default(i64),
}

impl<'py> FromPyObject<'py> for IntArg<'py> {
    fn extract_bound(obj: &Bound<'py, PyAny>) -> PyResult<Self> {
        Ok(IntArg::Given(obj.clone()))
    }
}

impl IntArg<'_> {
    /// The value, saturated to the i128 range (far beyond the bounds of every argument).
    fn wide(&self, name: &str) -> PyResult<i128> {
        let obj = match self {
            IntArg::Default(v) => return Ok(i128::from(*v)),
            IntArg::Given(obj) => obj,
        };
        if obj.is_instance_of::<PyBool>() || !obj.is_instance_of::<PyInt>() {
            return Err(errors::ArgumentTypeError::new_err(format!(
                "{name} must be an int, not {}",
                type_name(obj)
            )));
        }
        match obj.extract::<i128>() {
            Ok(v) => Ok(v),
            Err(_) if obj.lt(0)? => Ok(i128::MIN),
            Err(_) => Ok(i128::MAX),
        }
    }

    /// The exact value in decimal, for messages.
    fn text(&self) -> PyResult<String> {
        match self {
            IntArg::Default(v) => Ok(v.to_string()),
            IntArg::Given(obj) => Ok(obj.str()?.to_string()),
        }
    }

    /// The value as a `T`; an int outside T's range gets `out_of_range(value)`, the error the
    /// domain check gives for the values of T it refuses.
    pub(crate) fn get<T: TryFrom<i128>>(
        &self,
        name: &str,
        out_of_range: impl FnOnce(String) -> Error,
    ) -> PyResult<T> {
        match T::try_from(self.wide(name)?) {
            Ok(v) => Ok(v),
            Err(_) => Err(out_of_range(self.text()?).into()),
        }
    }

    /// A count or a limit of at least `min` (`too_small(value)` otherwise); a value beyond
    /// usize is as good as no limit and saturates.
    pub(crate) fn at_least(
        &self,
        name: &str,
        min: usize,
        too_small: impl FnOnce(String) -> Error,
    ) -> PyResult<usize> {
        let v = self.wide(name)?;
        if v < min as i128 {
            return Err(too_small(self.text()?).into());
        }
        Ok(usize::try_from(v).unwrap_or(usize::MAX))
    }
}

/// A str argument as UTF-8: ArgumentTypeError for a non-str and InvalidArgumentError for a str
/// that is not valid Unicode (lone surrogates), both naming `what`, worded as the pure core does.
pub(crate) fn str_arg(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<String> {
    let s = obj.downcast::<PyString>().map_err(|_| {
        errors::ArgumentTypeError::new_err(format!("{what} must be a str, not {}", type_name(obj)))
    })?;
    match s.to_str() {
        Ok(s) => Ok(s.to_owned()),
        Err(_) => Err(errors::InvalidArgumentError::new_err(format!(
            "{what} is not valid Unicode (it holds surrogates)"
        ))),
    }
}

/// Calls `f` with the bytes of a bytes-like object: zero-copy for bytes and contiguous buffers.
pub(crate) fn with_bytes<R>(obj: &Bound<'_, PyAny>, f: impl FnOnce(&[u8]) -> R) -> PyResult<R> {
    if let Ok(b) = obj.downcast::<PyBytes>() {
        return Ok(f(b.as_bytes()));
    }
    let buf = PyBuffer::<u8>::get(obj).map_err(|_| {
        pyo3::exceptions::PyTypeError::new_err(format!(
            "expected a bytes-like object, got {}",
            type_name(obj)
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

/// A batch limit (`max_items`, `max_bytes` of read_items and take_batch): at least 1.
pub(crate) fn batch_limit(value: &IntArg<'_>, name: &str) -> PyResult<usize> {
    value.at_least(name, 1, |v| {
        Error::invalid(format!("{name} must be at least 1, got {v}"))
    })
}

/// The limits of a batch of records (read_items, skip_items): `max_items` and `max_bytes` of
/// keys and values, each at least 1.
pub(crate) fn batch_limits(
    max_items: &IntArg<'_>,
    max_bytes: &IntArg<'_>,
) -> PyResult<(usize, usize)> {
    Ok((
        batch_limit(max_items, "max_items")?,
        batch_limit(max_bytes, "max_bytes")?,
    ))
}

/// The `compression_level` argument: an int (not a bool) in 0..=22, checked as the pure core does.
pub(crate) fn level_arg(level: &IntArg<'_>) -> PyResult<i32> {
    let level: i64 = level.get("compression_level", |v| {
        Error::invalid(format!(
            "compression_level must be between 0 and {}, got {v}",
            crate::format::MAX_COMPRESSION_LEVEL
        ))
    })?;
    Ok(crate::compress::check_level(level)?)
}

/// More threads than this are never used: a larger `threads` means the same.
const MAX_THREADS: usize = 1024;

/// The `threads` argument: 0 means all cores.
pub(crate) fn threads_arg(threads: &IntArg<'_>) -> PyResult<usize> {
    let n = threads.at_least("threads", 0, |v| {
        Error::invalid(format!("threads must be 0 (all cores) or more, got {v}"))
    })?;
    Ok(match n {
        0 => crate::parallel::default_threads(),
        n => n.min(MAX_THREADS),
    })
}

/// The `segment_size` of a backup (BackupWriter, encode_preamble).
pub(crate) fn segment_size_arg(segment_size: &IntArg<'_>) -> PyResult<u32> {
    let n = segment_size.get("segment_size", format::segment_size_error)?;
    Ok(format::check_segment_size(n)?)
}

fn stream_params(
    hkdf_hash: &str,
    derived_key_size: &IntArg<'_>,
    segment_size: &IntArg<'_>,
) -> PyResult<StreamParams> {
    let hash = HkdfHash::parse(hkdf_hash)?;
    let key_size =
        stream::check_key_size(derived_key_size.get("derived_key_size", stream::key_size_error)?)?;
    let segment_size =
        segment_size.get("segment_size", |v| stream::segment_size_error(key_size, v))?;
    Ok(StreamParams::new(hash, key_size, segment_size)?)
}

#[pyfunction]
#[pyo3(signature = (key, plaintext, aad, segment_size, salt=None, nonce_prefix=None, *, hkdf_hash="sha256", derived_key_size=IntArg::Default(32), threads=IntArg::Default(0)))]
#[allow(clippy::too_many_arguments)]
fn encrypt_stream<'py>(
    py: Python<'py>,
    key: &Bound<'py, PyAny>,
    plaintext: &Bound<'py, PyAny>,
    aad: &Bound<'py, PyAny>,
    segment_size: IntArg<'py>,
    salt: Option<&Bound<'py, PyAny>>,
    nonce_prefix: Option<&Bound<'py, PyAny>>,
    hkdf_hash: &str,
    derived_key_size: IntArg<'py>,
    threads: IntArg<'py>,
) -> PyResult<Bound<'py, PyBytes>> {
    let threads = threads_arg(&threads)?;
    let params = stream_params(hkdf_hash, &derived_key_size, &segment_size)?;
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
#[pyo3(signature = (key, ciphertext, aad, segment_size, *, hkdf_hash="sha256", derived_key_size=IntArg::Default(32), threads=IntArg::Default(0)))]
fn decrypt_stream<'py>(
    py: Python<'py>,
    key: &Bound<'py, PyAny>,
    ciphertext: &Bound<'py, PyAny>,
    aad: &Bound<'py, PyAny>,
    segment_size: IntArg<'py>,
    hkdf_hash: &str,
    derived_key_size: IntArg<'py>,
    threads: IntArg<'py>,
) -> PyResult<Bound<'py, PyBytes>> {
    let threads = threads_arg(&threads)?;
    let params = stream_params(hkdf_hash, &derived_key_size, &segment_size)?;
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

/// Adds PUT (value bytes) and DELETE (value None) records from an iterable of pairs, or from
/// a store's RecordBatch without a Python object per record.
fn digest_into(digester: &mut ItemDigester, items: &Bound<'_, PyAny>) -> PyResult<()> {
    if let Ok(batch) = items.downcast::<lmdb::PyRecordBatch>() {
        digester.add_batch(&batch.get().batch())?;
        return Ok(());
    }
    for item in items.try_iter()? {
        let item = item?;
        let (k, v) = pair(&item)?;
        if v.is_none() {
            with_bytes(&k, |k| digester.add(k, None))??;
        } else {
            with_bytes(&k, |k| with_bytes(&v, |v| digester.add(k, Some(v))))???;
        }
    }
    Ok(())
}

pub(crate) type DigestResult<'py> = (u64, u64, Bound<'py, PyBytes>);

/// (items, bytes, digest) of the records of `sources` (each an iterable of pairs or a RecordBatch).
fn digest_sources<'py>(
    py: Python<'py>,
    backup_key: &Bound<'py, PyAny>,
    sources: impl IntoIterator<Item = PyResult<Bound<'py, PyAny>>>,
) -> PyResult<DigestResult<'py>> {
    let mut digester = item_digester(backup_key)?;
    for source in sources {
        digest_into(&mut digester, &source?)?;
    }
    let (tally, digest) = digester.finish();
    Ok((tally.items, tally.bytes, PyBytes::new(py, &digest)))
}

/// An ItemDigester with the digest key of `backup_key`.
pub(crate) fn item_digester(backup_key: &Bound<'_, PyAny>) -> PyResult<ItemDigester> {
    Ok(ItemDigester::new(digest_key_arg(backup_key)?.as_bytes()))
}

/// The digest key of `backup_key`, for ItemDigesters made where Python cannot be reached.
pub(crate) fn digest_key_arg(backup_key: &Bound<'_, PyAny>) -> PyResult<SecretKey> {
    let key = SecretKey::from_slice(&secret_arg(backup_key)?, "backup key")?;
    Ok(derive_digest_key(key.as_bytes()))
}

#[pyfunction]
fn digest_items<'py>(
    py: Python<'py>,
    backup_key: &Bound<'py, PyAny>,
    items: &Bound<'py, PyAny>,
) -> PyResult<DigestResult<'py>> {
    digest_sources(py, backup_key, [Ok(items.clone())])
}

/// digest_items over the records of several batches (a snapshot's batches() of one tree).
#[pyfunction]
fn digest_batches<'py>(
    py: Python<'py>,
    backup_key: &Bound<'py, PyAny>,
    batches: &Bound<'py, PyAny>,
) -> PyResult<DigestResult<'py>> {
    digest_sources(py, backup_key, batches.try_iter()?)
}

/// The next batch of a store's (key, value) iterator: at most `max_items` pairs, ending once
/// their keys and values reach `max_bytes`; and whether the iterator may hold more. In Rust so a
/// snapshot costs no Python bytecode per record.
#[pyfunction]
fn take_batch<'py>(
    py: Python<'py>,
    pairs: &Bound<'py, PyAny>,
    max_items: IntArg<'py>,
    max_bytes: IntArg<'py>,
) -> PyResult<(Bound<'py, PyList>, bool)> {
    let (max_items, max_bytes) = (
        batch_limit(&max_items, "max_items")?,
        batch_limit(&max_bytes, "max_bytes")?,
    );
    let batch = PyList::empty(py);
    let mut bytes = 0usize;
    for pair in pairs.try_iter()? {
        let pair = pair?;
        let (k, v) = self::pair(&pair)?;
        bytes += k.len()? + v.len()?;
        batch.append(pair)?;
        if batch.len() >= max_items || bytes >= max_bytes {
            return Ok((batch, true));
        }
    }
    Ok((batch, false))
}

/// A (key, value) tuple the garbage collector does not track: it holds only bytes (or None), so
/// it can never be part of a cycle. CPython would untrack it at its first collection anyway; a
/// restore creates millions, and tracked ones make every young-generation collection walk them.
pub(crate) fn untracked_pair<'py>(
    key: Bound<'py, PyAny>,
    value: Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyTuple>> {
    let pair = PyTuple::new(key.py(), [key, value])?;
    // SAFETY: a tuple we just made and no one else has seen; untracking a GC object is always
    // allowed, and it is only sound to leave it untracked because its items are atomic objects.
    unsafe { pyo3::ffi::PyObject_GC_UnTrack(pair.as_ptr().cast()) };
    Ok(pair)
}

/// True for a non-empty list of 2-tuples of bytes (exact types) with keys of 1..=max_key bytes:
/// a batch a store may hand to its C loop unchecked. One pass, no Python object created.
#[pyfunction]
fn plain_pairs(items: &Bound<'_, PyAny>, max_key: IntArg<'_>) -> PyResult<bool> {
    let max_key = max_key.at_least("max_key", 0, |v| {
        Error::invalid(format!("max_key must be at least 0, got {v}"))
    })?;
    let Ok(list) = items.downcast_exact::<PyList>() else {
        return Ok(false);
    };
    if list.is_empty() {
        return Ok(false);
    }
    for item in list.iter() {
        let Ok(t) = item.downcast_exact::<PyTuple>() else {
            return Ok(false);
        };
        if t.len() != 2 {
            return Ok(false);
        }
        let (Ok(k), Ok(v)) = (t.get_item(0), t.get_item(1)) else {
            return Ok(false);
        };
        let Ok(k) = k.downcast_exact::<PyBytes>() else {
            return Ok(false);
        };
        if v.downcast_exact::<PyBytes>().is_err() || !(1..=max_key).contains(&k.as_bytes().len()) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// True when the pairs of `items` (a list) have bytes keys in strictly ascending byte order,
/// every one after `after` (None: no bound): a batch LMDB can append (MDB_APPEND) at a tree's end.
#[pyfunction]
#[pyo3(signature = (items, after=None))]
fn keys_ascending(items: &Bound<'_, PyAny>, after: Option<&Bound<'_, PyAny>>) -> PyResult<bool> {
    let mut previous = match after {
        None => None,
        Some(a) => Some(a.downcast_exact::<PyBytes>().cloned().map_err(|_| {
            errors::ArgumentTypeError::new_err(format!(
                "after must be bytes or None, not {}",
                type_name(a)
            ))
        })?),
    };
    let Ok(list) = items.downcast_exact::<PyList>() else {
        return Ok(false);
    };
    for item in list.iter() {
        let Some(key) = item
            .downcast_exact::<PyTuple>()
            .ok()
            .filter(|t| t.len() == 2)
            .and_then(|t| t.get_item(0).ok())
            .and_then(|k| k.downcast_exact::<PyBytes>().ok().cloned())
        else {
            return Ok(false);
        };
        if previous
            .as_ref()
            .is_some_and(|p| p.as_bytes() >= key.as_bytes())
        {
            return Ok(false);
        }
        previous = Some(key);
    }
    Ok(true)
}

#[pyfunction]
#[pyo3(signature = (segment_size, key_id, kdf_id=IntArg::Default(0), kdf_params=None))]
fn encode_preamble<'py>(
    py: Python<'py>,
    segment_size: IntArg<'py>,
    key_id: &Bound<'py, PyAny>,
    kdf_id: IntArg<'py>,
    kdf_params: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyBytes>> {
    let segment_size = segment_size_arg(&segment_size)?;
    let key_id = with_bytes(key_id, <[u8]>::to_vec)?;
    let kdf_id = kdf_id.get("kdf_id", format::unknown_kdf_id)?;
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
    configure_allocator();
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
    m.add_function(wrap_pyfunction!(digest_batches, m)?)?;
    m.add_function(wrap_pyfunction!(encode_preamble, m)?)?;
    m.add_function(wrap_pyfunction!(parse_preamble, m)?)?;
    m.add_function(wrap_pyfunction!(take_batch, m)?)?;
    m.add_function(wrap_pyfunction!(plain_pairs, m)?)?;
    m.add_function(wrap_pyfunction!(keys_ascending, m)?)?;
    m.add_class::<reader::PyPreamble>()?;
    m.add_class::<writer::PyBackupWriter>()?;
    m.add_class::<reader::PyBackupReader>()?;
    m.add_class::<chain::PyChainMerge>()?;
    m.add_class::<lmdb::PyLmdbDataFile>()?;
    m.add_class::<lmdb::PyLmdbScan>()?;
    m.add_class::<lmdb::PyRecordBatch>()?;
    m.add_class::<lmdb::PyLmdbWriter>()?;
    Ok(())
}
