//! `BackupWriter`: feeds Python items to `BackupEncoder`, seals with the GIL released and writes
//! whole segments to the sink.

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::lmdb::PyRecordBatch;
use super::{opt_arg, pair, secret_arg, str_arg, with_bytes, IntArg, PyResultExt};
use crate::format::{
    PutBatch, Trailer, TreeSummary, DEFAULT_SEGMENT_SIZE, DELETE_HEADER_LENGTH, PUT_HEADER_LENGTH,
};
use crate::writer::{BackupEncoder, EncoderOptions};

#[pyclass(module = "datafold._core", name = "BackupWriter")]
pub struct PyBackupWriter {
    enc: BackupEncoder,
    sink: Py<PyAny>,
    /// Seal and write once this much plaintext is pending: a few segments, so memory stays bounded.
    flush_at: usize,
}

pub(crate) fn tree_tuple<'py>(
    py: Python<'py>,
    t: &TreeSummary,
) -> (String, u64, u64, Bound<'py, PyBytes>) {
    (
        t.name.clone(),
        t.item_count,
        t.byte_count,
        PyBytes::new(py, &t.digest),
    )
}

/// Writes all of `view` (`len` bytes): raw files may write less than asked per call.
fn write_all(sink: &Bound<'_, PyAny>, view: &Bound<'_, PyAny>, len: usize) -> PyResult<()> {
    let py = sink.py();
    let mut done = 0usize;
    while done < len {
        let part = if done == 0 {
            view.clone()
        } else {
            view.get_item(pyo3::types::PySlice::new(
                py,
                done as isize,
                len as isize,
                1,
            ))?
        };
        let n = sink
            .call_method1("write", (part,))
            .io_context(py, "writing the backup")?;
        if n.is_none() {
            return Ok(()); // a sink that returns nothing has taken everything
        }
        let n: usize = n.extract().map_err(|_| {
            pyo3::exceptions::PyTypeError::new_err(
                "sink.write() must return the number of bytes written or None",
            )
        })?;
        if n == 0 {
            return Err(super::errors::BackupIOError::new_err(
                "writing the backup failed: the sink accepted no bytes",
            ));
        }
        done += n;
    }
    Ok(())
}

type PyTrailer<'py> = (
    u64,
    u64,
    Vec<(String, u64, u64, Bound<'py, PyBytes>)>,
    Bound<'py, PyBytes>,
);

pub(crate) fn trailer_tuple<'py>(py: Python<'py>, t: &Trailer) -> PyTrailer<'py> {
    (
        t.total_items,
        t.total_bytes,
        t.trees.iter().map(|s| tree_tuple(py, s)).collect(),
        PyBytes::new(py, &t.digest),
    )
}

impl PyBackupWriter {
    /// Hands the sealed output to `sink.write()` without copying it: the sink gets a read-only
    /// memoryview that is valid during the call only (the contract of `io.BufferedIOBase.write`)
    /// and is released afterwards, so a sink that kept it gets an error, never reused memory.
    fn write_out(&mut self, py: Python<'_>) -> PyResult<()> {
        let out = self.enc.output();
        if out.is_empty() {
            return Ok(());
        }
        // SAFETY: `out` stays alive and unmodified until the view is released below (or, if
        // something still holds an export of it, forever: `leak_output`).
        let view = unsafe {
            Bound::from_owned_ptr_or_err(
                py,
                pyo3::ffi::PyMemoryView_FromMemory(
                    out.as_ptr() as *mut std::os::raw::c_char,
                    out.len() as pyo3::ffi::Py_ssize_t,
                    pyo3::ffi::PyBUF_READ,
                ),
            )?
        };
        let written = write_all(self.sink.bind(py), &view, out.len());
        if view.call_method0("release").is_err() {
            self.enc.leak_output();
        }
        written?;
        self.enc.clear_output();
        Ok(())
    }

    /// A PUT whose value is larger than the flush threshold: sealed and written piece by piece,
    /// so memory stays bounded by a few segments whatever the value size.
    fn put_large(&mut self, py: Python<'_>, key: &[u8], value: &[u8]) -> PyResult<()> {
        self.enc.begin_put(key, value.len())?;
        for piece in value.chunks(self.flush_at) {
            self.enc.extend_value(piece)?;
            self.seal_and_write(py)?;
        }
        Ok(())
    }

    /// One PUT (value Some) or DELETE record of the open tree, sealing and writing when enough
    /// is pending. Large values are sealed piece by piece.
    fn record(&mut self, py: Python<'_>, key: &[u8], value: Option<&[u8]>) -> PyResult<()> {
        let framed = match value {
            Some(v) => PUT_HEADER_LENGTH + key.len() + v.len(),
            None => DELETE_HEADER_LENGTH + key.len(),
        };
        if self.enc.flushes_blocks_before(framed) {
            // A record too large for a block follows the waiting blocks: compress them first,
            // without the Python lock.
            let enc = &mut self.enc;
            py.detach(|| enc.compress_blocks())?;
        }
        match value {
            Some(v) if v.len() > self.flush_at => return self.put_large(py, key, v),
            Some(v) => self.enc.put(key, v)?,
            None => self.enc.delete(key)?,
        }
        if self.enc.pending() >= self.flush_at {
            self.seal_and_write(py)?;
        }
        Ok(())
    }

    /// A store's batch of records (`record` for each), added without the GIL, so other Python
    /// threads (the read-back check, the write-behind) run meanwhile; it is taken again to write
    /// what was sealed and for a value larger than a batch. Without compression the records go
    /// in runs, as framed in the batch, each run up to where record by record would seal, so
    /// no more is pending than that way.
    fn add_batch(&mut self, py: Python<'_>, batch: &PutBatch) -> PyResult<()> {
        enum Stop {
            Sealed,
            Large(usize),
            End,
        }
        let mut next = 0;
        loop {
            let (enc, flush_at, next) = (&mut self.enc, self.flush_at, &mut next);
            let stop = py.detach(|| -> crate::error::Result<Stop> {
                while *next < batch.len() {
                    let i = *next;
                    let (k, v) = batch.get(i).expect("in range");
                    if enc.flushes_blocks_before(PUT_HEADER_LENGTH + k.len() + v.len()) {
                        // A record too large for a block follows the waiting blocks: compress
                        // them here, without the GIL.
                        enc.compress_blocks()?;
                    }
                    if v.len() > flush_at {
                        return Ok(Stop::Large(i));
                    }
                    if enc.compresses() {
                        enc.put(k, v)?;
                        *next = i + 1;
                    } else {
                        // The records that fit before the seal, and at least one (its value is
                        // no larger than flush_at, so no later record of the run is either).
                        let room = flush_at.saturating_sub(enc.pending());
                        let end = batch.fitting(i, room).max(i + 1);
                        enc.put_batch(batch, i, end)?;
                        *next = end;
                    }
                    if enc.pending() >= flush_at {
                        enc.seal_ready()?;
                        return Ok(Stop::Sealed);
                    }
                }
                Ok(Stop::End)
            })?;
            match stop {
                Stop::Sealed => self.write_out(py)?,
                Stop::Large(i) => {
                    let (k, v) = batch.get(i).expect("in range");
                    self.put_large(py, k, v)?;
                    *next = i + 1;
                }
                Stop::End => return Ok(()),
            }
        }
    }

    /// `record` for other parts of the binding (chain diffs); poisons the writer on error.
    pub(crate) fn add_record(
        &mut self,
        py: Python<'_>,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> PyResult<()> {
        self.guarded(py, |s, py| s.record(py, key, value))
    }

    fn seal_and_write(&mut self, py: Python<'_>) -> PyResult<()> {
        let enc = &mut self.enc;
        py.detach(|| enc.seal_ready())?;
        self.write_out(py)
    }

    /// Runs `f`, poisoning the writer on any error (also errors raised by Python code).
    fn guarded<'py, T>(
        &mut self,
        py: Python<'py>,
        f: impl FnOnce(&mut Self, Python<'py>) -> PyResult<T>,
    ) -> PyResult<T> {
        let r = f(self, py);
        if r.is_err() {
            self.enc.poison();
        }
        r
    }
}

#[pymethods]
impl PyBackupWriter {
    #[new]
    #[pyo3(signature = (sink, backup_key, header, *, segment_size=IntArg::Default(DEFAULT_SEGMENT_SIZE.into()), kdf_id=IntArg::Default(0), kdf_params=None, salt=None, nonce_prefix=None, threads=IntArg::Default(0), compression_level=IntArg::Default(0)))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        sink: Bound<'_, PyAny>,
        backup_key: &Bound<'_, PyAny>,
        header: &Bound<'_, PyAny>,
        segment_size: IntArg<'_>,
        kdf_id: IntArg<'_>,
        kdf_params: Option<&Bound<'_, PyAny>>,
        salt: Option<&Bound<'_, PyAny>>,
        nonce_prefix: Option<&Bound<'_, PyAny>>,
        threads: IntArg<'_>,
        compression_level: IntArg<'_>,
    ) -> PyResult<Self> {
        let threads = super::threads_arg(&threads)?;
        super::errors::require_method(&sink, "write", "sink")?;
        let segment_size = super::segment_size_arg(&segment_size)?;
        let kdf_id = kdf_id.get("kdf_id", crate::format::unknown_kdf_id)?;
        let key = secret_arg(backup_key)?;
        let (salt, prefix, kdf_params) =
            (opt_arg(salt)?, opt_arg(nonce_prefix)?, opt_arg(kdf_params)?);
        let kdf_params = kdf_params.unwrap_or_default();
        let compression_level = super::level_arg(&compression_level)?;
        let opts = EncoderOptions {
            segment_size,
            kdf_id,
            kdf_params: &kdf_params,
            salt: salt.as_deref(),
            nonce_prefix: prefix.as_deref(),
            threads,
            compression_level,
        };
        let enc = with_bytes(header, |h| BackupEncoder::new(&key, h, &opts))??;
        let mut w = PyBackupWriter {
            enc,
            sink: sink.unbind(),
            // Enough segments per batch to keep every thread busy; with more than one thread
            // the batch before is sealed while the next fills (src/writer.rs), so each is half
            // that: as much memory as one.
            flush_at: (4 * segment_size as usize).max(4 << 20) * threads.clamp(1, 16)
                / if threads > 1 { 2 } else { 1 },
        };
        w.write_out(py)?;
        Ok(w)
    }

    #[getter]
    fn bytes_written(&self) -> u64 {
        self.enc.bytes_written()
    }

    #[getter]
    fn preamble<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.enc.preamble().raw)
    }

    fn begin_tree(&mut self, py: Python<'_>, name: &Bound<'_, PyAny>) -> PyResult<()> {
        self.guarded(py, |s, _| {
            let name = str_arg(name, "tree name")?;
            Ok(s.enc.begin_tree(&name)?)
        })
    }

    fn add_items(&mut self, py: Python<'_>, items: &Bound<'_, PyAny>) -> PyResult<u64> {
        self.guarded(py, |s, py| {
            if let Ok(batch) = items.downcast::<PyRecordBatch>() {
                // A store's batch: records straight from its buffer, no Python object each.
                let batch = batch.get().batch();
                s.add_batch(py, &batch)?;
                return Ok(batch.len() as u64);
            }
            let mut n = 0u64;
            for item in items.try_iter()? {
                let (k, v) = pair(&item?)?;
                with_bytes(&k, |k| with_bytes(&v, |v| s.record(py, k, Some(v))))???;
                n += 1;
            }
            Ok(n)
        })
    }

    fn add_deletes(&mut self, py: Python<'_>, keys: &Bound<'_, PyAny>) -> PyResult<u64> {
        self.guarded(py, |s, py| {
            let mut n = 0u64;
            for key in keys.try_iter()? {
                with_bytes(&key?, |k| s.record(py, k, None))??;
                n += 1;
            }
            Ok(n)
        })
    }

    fn end_tree<'py>(
        &mut self,
        py: Python<'py>,
    ) -> PyResult<(String, u64, u64, Bound<'py, PyBytes>)> {
        // Compresses the tree's last blocks: without the GIL.
        let enc = &mut self.enc;
        let summary = py.detach(|| enc.end_tree())?;
        Ok(tree_tuple(py, &summary))
    }

    fn finish<'py>(&mut self, py: Python<'py>) -> PyResult<PyTrailer<'py>> {
        self.guarded(py, |s, py| {
            let enc = &mut s.enc;
            let trailer = py.detach(|| enc.finish())?;
            s.write_out(py)?;
            Ok(trailer_tuple(py, &trailer))
        })
    }

    fn __repr__(&self) -> String {
        format!(
            "<BackupWriter segment_size={} bytes_written={}>",
            self.enc.preamble().segment_size,
            self.enc.bytes_written()
        )
    }
}
