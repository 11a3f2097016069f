//! `BackupReader` and `Preamble`: reads segments from a Python file object and hands them to
//! `BackupDecoder`, opening them with the GIL released.

use std::os::raw::{c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use pyo3::exceptions::{PyBufferError, PyTypeError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

use super::errors::{BackupError, BackupIOError, FormatError, InvalidArgumentError};
use super::lmdb::{AssertSend, PyLmdbWriter, WrittenTuple};
use super::writer::trailer_tuple;
use super::{batch_limit, batch_limits, secret_arg, untracked_pair, IntArg, PyResultExt};
use crate::chain::Record;
use crate::format::{Preamble, Trailer};
use crate::lmdb_write::{write_records, Written};
use crate::reader::{
    check_key, parse_tail_trailer, trailer_record_length, truncated, BackupDecoder, Item, Layout,
    SegmentReader, Step,
};
use crate::stream::StreamParams;

#[pyclass(module = "datafold._core", name = "Preamble", frozen)]
pub struct PyPreamble(pub Preamble);

#[pymethods]
impl PyPreamble {
    #[getter]
    fn format_version(&self) -> u32 {
        self.0.format_version
    }
    #[getter]
    fn preamble_length(&self) -> usize {
        self.0.raw.len()
    }
    #[getter]
    fn flags(&self) -> u32 {
        self.0.flags
    }
    #[getter]
    fn segment_size(&self) -> u32 {
        self.0.segment_size
    }
    #[getter]
    fn key_id<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.0.key_id)
    }
    #[getter]
    fn kdf_id(&self) -> u16 {
        self.0.kdf_id
    }
    #[getter]
    fn kdf_params<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.0.kdf_params)
    }
    #[getter]
    fn raw<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.0.raw)
    }
    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other
            .downcast::<PyPreamble>()
            .map(|o| o.get().0 == self.0)
            .unwrap_or(false)
    }
    fn __repr__(&self) -> String {
        format!(
            "Preamble(format_version={}, segment_size={}, key_id={}, kdf_id={})",
            self.0.format_version,
            self.0.segment_size,
            self.0
                .key_id
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>(),
            self.0.kdf_id
        )
    }
}

/// What a non-blocking source says when it has no data yet (`read()` / `readinto()` return None);
/// the pure core says the same.
fn no_data_yet() -> PyErr {
    BackupIOError::new_err(
        "the source returned None (a non-blocking file with no data yet): read backups from a blocking file",
    )
}

/// Reads exactly `n` bytes, fewer only at the end of the input.
fn read_up_to(source: &Bound<'_, PyAny>, n: usize) -> PyResult<Vec<u8>> {
    let py = source.py();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let chunk = source
            .call_method1("read", (n - out.len(),))
            .io_context(py, "reading the backup")?;
        if chunk.is_none() {
            return Err(no_data_yet());
        }
        let done = super::with_bytes(&chunk, |b| {
            out.extend_from_slice(b);
            b.is_empty()
        })?;
        if done {
            break;
        }
    }
    Ok(out)
}

/// A window over the reader's buffer, handed to `source.readinto()` as a writable memoryview.
/// Once closed it exports nothing more, and `exports` tells whether a view of it (a slice the
/// source kept, say) is still alive after the call.
#[pyclass(module = "datafold._core", name = "_ReadBuffer", frozen)]
struct ReadWindow {
    ptr: usize,
    len: usize,
    open: AtomicBool,
    exports: AtomicUsize,
}

#[pymethods]
impl ReadWindow {
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let w = slf.get();
        if !w.open.load(Ordering::Relaxed) {
            return Err(PyBufferError::new_err(
                "the backup reader's buffer is only lent for the readinto() call",
            ));
        }
        // SAFETY: while open, `ptr[..len]` is the `&mut [u8]` lent to `read_into` for this call;
        // FillInfo takes a reference to `slf` for the view.
        let r = unsafe {
            ffi::PyBuffer_FillInfo(
                view,
                slf.as_ptr(),
                w.ptr as *mut c_void,
                w.len as ffi::Py_ssize_t,
                0,
                flags,
            )
        };
        if r != 0 {
            return Err(PyErr::fetch(slf.py()));
        }
        w.exports.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {
        self.exports.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Reads up to `dst.len()` bytes into `dst` (0 only at the end of the input): with
/// `source.readinto()` straight into it when `readinto`, else with `source.read()` and a copy.
/// The source gets a writable memoryview valid during the call only; if it keeps a view of the
/// memory past the call, `*leaked` is set (the caller must never use that memory again) and the
/// read fails.
fn read_into(
    source: &Bound<'_, PyAny>,
    readinto: bool,
    dst: &mut [u8],
    leaked: &mut bool,
) -> PyResult<usize> {
    let py = source.py();
    if !readinto {
        let chunk = source
            .call_method1("read", (dst.len(),))
            .io_context(py, "reading the backup")?;
        if chunk.is_none() {
            return Err(no_data_yet());
        }
        return super::with_bytes(&chunk, |b| {
            if b.len() > dst.len() {
                return Err(BackupError::new_err(
                    "source.read(n) returned more than n bytes",
                ));
            }
            dst[..b.len()].copy_from_slice(b);
            Ok(b.len())
        })?;
    }
    let window = Bound::new(
        py,
        ReadWindow {
            ptr: dst.as_mut_ptr() as usize,
            len: dst.len(),
            open: AtomicBool::new(true),
            exports: AtomicUsize::new(0),
        },
    )?;
    // SAFETY: a new reference (or NULL with an exception set).
    let view =
        unsafe { Bound::from_owned_ptr_or_err(py, ffi::PyMemoryView_FromObject(window.as_ptr()))? };
    let result = source.call_method1("readinto", (&view,));
    // Fails only while something holds an export of the view itself: caught just below.
    let _ = view.call_method0("release");
    let w = window.get();
    w.open.store(false, Ordering::Relaxed);
    if w.exports.load(Ordering::Relaxed) != 0 {
        *leaked = true;
    }
    let n = result.io_context(py, "reading the backup")?;
    if *leaked {
        return Err(BackupError::new_err(
            "source.readinto() kept a reference to the buffer it was given",
        ));
    }
    if n.is_none() {
        return Err(no_data_yet());
    }
    let n: usize = n.extract().map_err(|_| {
        PyTypeError::new_err(format!(
            "source.readinto() must return the number of bytes read, not {}",
            super::type_name(&n)
        ))
    })?;
    if n > dst.len() {
        return Err(BackupError::new_err(format!(
            "source.readinto() claims {n} bytes read into a buffer of {}",
            dst.len()
        )));
    }
    Ok(n)
}

/// At most this many ciphertext bytes are read per feed.
const BATCH_BYTES: usize = 64 << 20;

/// The full lengths of the segments a feed reads from segment `index` on: segment 0 (the
/// header) alone so that unlock() returns quickly, then two per thread.
fn batch_lengths(params: StreamParams, index: u64, threads: usize) -> Vec<usize> {
    let want = if index == 0 { 1 } else { 2 * threads };
    let mut lens = Vec::with_capacity(want);
    let mut bytes = 0;
    while lens.len() < want && bytes < BATCH_BYTES {
        let len = params.ciphertext_length(index + lens.len() as u64);
        lens.push(len);
        bytes += len;
    }
    lens
}

#[pyclass(module = "datafold._core", name = "BackupReader")]
pub struct PyBackupReader {
    source: Py<PyAny>,
    preamble: Preamble,
    dec: Option<BackupDecoder>,
    /// Reads the segments into one buffer reused from feed to feed.
    segments: SegmentReader,
    /// Whether the source has `readinto()` (else segments are read with `read()` and copied).
    readinto: bool,
    poisoned: bool,
    finished_by_summary: bool,
    threads: usize,
}

impl PyBackupReader {
    fn guarded<'py, T>(
        &mut self,
        py: Python<'py>,
        f: impl FnOnce(&mut Self, Python<'py>) -> PyResult<T>,
    ) -> PyResult<T> {
        if self.poisoned {
            return Err(BackupError::new_err(
                "this backup reader failed earlier and cannot be used any more; start a new one",
            ));
        }
        let r = f(self, py);
        if r.is_err() {
            self.poisoned = true;
            if let Some(d) = self.dec.as_mut() {
                d.poison();
            }
        }
        r
    }

    fn decoder(&mut self) -> PyResult<&mut BackupDecoder> {
        if self.finished_by_summary {
            return Err(InvalidArgumentError::new_err(
                "read_summary() ended this reader; open a new one to read items",
            ));
        }
        self.dec
            .as_mut()
            .ok_or_else(|| InvalidArgumentError::new_err("call unlock(backup_key) first"))
    }

    /// Reads the next segments from the source (a few per thread) and decrypts them into the
    /// decoder, in parallel and with the GIL released. With more than one thread, the calling
    /// thread reads the batch after them meanwhile (before it helps to decrypt), so the next
    /// feed finds it read.
    fn feed(&mut self, py: Python<'_>) -> PyResult<()> {
        let (threads, readinto) = (self.threads, self.readinto);
        let source = &self.source;
        let dec = self.dec.as_mut().expect("unlocked");
        let params = dec.params();
        let index = dec.next_segment_index();
        // Where a segment starts in the source (after the preamble), as in a file read from its
        // start: it decides where the bytes land in memory, not which bytes are read.
        let preamble_length = self.preamble.raw.len() as u64;
        let offset = move |index| preamble_length + params.segment_offset(index);
        let mut leaked = false;
        let read = self.segments.advance(
            &batch_lengths(params, index, threads),
            offset(index),
            |dst| read_into(source.bind(py), readinto, dst, &mut leaked),
        );
        if let Err(e) = read {
            if leaked {
                self.segments.leak_buffers();
            }
            return Err(e);
        }
        let (batch, ahead) = self.segments.split();
        // Segment 0 (the header) is read alone and nothing after it: unlock() and
        // read_metadata() need no more. One thread would read and decrypt one after the other
        // all the same.
        let ahead = ahead.filter(|_| threads > 1 && index > 0);
        let next_index = index + batch.segment_count() as u64;
        let mut read_ahead = None;
        let opened = py.detach(|| {
            dec.push_batch_beside(batch, threads, || {
                if let Some(ahead) = ahead {
                    read_ahead = Some(Python::attach(|py| {
                        let mut leaked = false;
                        let lengths = batch_lengths(params, next_index, threads);
                        let read = ahead.read(&lengths, offset(next_index), |dst| {
                            read_into(source.bind(py), readinto, dst, &mut leaked)
                        });
                        (read, leaked)
                    }));
                }
            })
        });
        let read_ahead = match read_ahead {
            Some((read, leaked)) => {
                if leaked {
                    self.segments.leak_buffers();
                }
                read
            }
            None => Ok(()),
        };
        // An error in the segments read first is the one to report.
        opened?;
        read_ahead
    }

    /// The current tree's next record, copied into `into`'s buffers (for merging a backup
    /// chain); false at the tree's end.
    pub(crate) fn next_record(&mut self, py: Python<'_>, into: &mut Record) -> PyResult<bool> {
        self.guarded(py, |s, py| loop {
            match s.decoder()?.next_item()? {
                Step::NeedMore => s.feed(py)?,
                Step::Done(None) => return Ok(false),
                Step::Done(Some(Item::Put(k, v))) => {
                    into.set(k, Some(v));
                    return Ok(true);
                }
                Step::Done(Some(Item::Delete(k))) => {
                    into.set(k, None);
                    return Ok(true);
                }
            }
        })
    }

    /// Drives a decoder step until it has what it needs.
    fn drive<T: Send>(
        &mut self,
        py: Python<'_>,
        mut step: impl FnMut(&mut BackupDecoder) -> crate::error::Result<Step<T>>,
    ) -> PyResult<T> {
        loop {
            // Without the GIL: a step may parse and digest a whole tree (next_tree skipping one).
            let mut job = AssertSend((self.decoder()?, &mut step));
            match py.detach(move || job.run(|(dec, step)| step(dec)))? {
                Step::Done(v) => return Ok(v),
                Step::NeedMore => self.feed(py)?,
            }
        }
    }
}

#[pymethods]
impl PyBackupReader {
    #[new]
    #[pyo3(signature = (source, *, threads=IntArg::Default(0)))]
    fn new(py: Python<'_>, source: Bound<'_, PyAny>, threads: IntArg<'_>) -> PyResult<Self> {
        let threads = super::threads_arg(&threads)?;
        super::errors::require_method(&source, "read", "source")?;
        let mut head = read_up_to(&source, 16)?;
        let len = Preamble::declared_length(&head)?;
        head.extend(read_up_to(&source, len - 16)?);
        if head.len() < len {
            return Err(FormatError::new_err(
                "truncated backup: the file ends inside its preamble",
            ));
        }
        let preamble = Preamble::parse(&head)?;
        let _ = py;
        let readinto = source.hasattr("readinto").unwrap_or(false);
        Ok(PyBackupReader {
            source: source.unbind(),
            preamble,
            dec: None,
            segments: SegmentReader::default(),
            readinto,
            poisoned: false,
            finished_by_summary: false,
            threads,
        })
    }

    #[getter]
    fn preamble(&self) -> PyPreamble {
        PyPreamble(self.preamble.clone())
    }

    fn unlock<'py>(
        &mut self,
        py: Python<'py>,
        backup_key: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let key = secret_arg(backup_key)?;
        self.guarded(py, |s, py| {
            if s.dec.is_some() {
                return Err(InvalidArgumentError::new_err("unlock() was already called"));
            }
            check_key(&s.preamble, &key)?;
            let header = read_up_to(s.source.bind(py), 40)?;
            s.dec = Some(BackupDecoder::new(&s.preamble, &key, &header)?);
            let header = s.drive(py, |d| d.read_header())?;
            Ok(PyBytes::new(py, &header))
        })
    }

    fn next_tree(&mut self, py: Python<'_>) -> PyResult<Option<String>> {
        self.guarded(py, |s, py| s.drive(py, |d| d.next_tree()))
    }

    /// At most `max_items` records, and no more once `max_bytes` of keys and values are in the
    /// batch (so a batch of large values stays small).
    #[pyo3(signature = (max_items=IntArg::Default(4096), max_bytes=IntArg::Default(16 << 20)))]
    fn read_items<'py>(
        &mut self,
        py: Python<'py>,
        max_items: IntArg<'py>,
        max_bytes: IntArg<'py>,
    ) -> PyResult<Bound<'py, PyList>> {
        self.guarded(py, |s, py| {
            let (max_items, max_bytes) = batch_limits(&max_items, &max_bytes)?;
            let mut bytes = 0usize;
            let mut pairs = Vec::new();
            while pairs.len() < max_items && bytes < max_bytes {
                let dec = s.decoder()?;
                let (key, value) = match dec.next_item()? {
                    Step::NeedMore => {
                        s.feed(py)?;
                        continue;
                    }
                    Step::Done(None) => break,
                    Step::Done(Some(Item::Put(k, v))) => {
                        bytes += k.len() + v.len();
                        (PyBytes::new(py, k), PyBytes::new(py, v).into_any())
                    }
                    Step::Done(Some(Item::Delete(k))) => {
                        bytes += k.len();
                        (PyBytes::new(py, k), py.None().into_bound(py))
                    }
                };
                pairs.push(untracked_pair(key.into_any(), value)?);
            }
            PyList::new(py, pairs)
        })
    }

    /// read_items without the records: reads and checks up to `max_items` records of the current
    /// tree (fewer once their keys and values reach `max_bytes`) and returns how many (0 once its
    /// TREE_END was read and checked). For counting.
    #[pyo3(signature = (max_items=IntArg::Default(4096), max_bytes=IntArg::Default(16 << 20)))]
    fn skip_items(
        &mut self,
        py: Python<'_>,
        max_items: IntArg<'_>,
        max_bytes: IntArg<'_>,
    ) -> PyResult<usize> {
        self.guarded(py, |s, py| {
            // Inside the guard, as in read_items: a refused argument fails the reader in both cores.
            let (max_items, max_bytes) = batch_limits(&max_items, &max_bytes)?;
            let (mut count, mut bytes) = (0, 0usize);
            loop {
                let mut job = AssertSend((s.decoder()?, (&mut count, &mut bytes)));
                let step = py.detach(move || {
                    job.run(|(dec, (count, bytes))| -> crate::error::Result<Step<()>> {
                        while **count < max_items && **bytes < max_bytes {
                            match dec.next_item()? {
                                Step::NeedMore => return Ok(Step::NeedMore),
                                Step::Done(None) => break,
                                Step::Done(Some(Item::Put(k, v))) => {
                                    **count += 1;
                                    **bytes += k.len() + v.len();
                                }
                                Step::Done(Some(Item::Delete(k))) => {
                                    **count += 1;
                                    **bytes += k.len();
                                }
                            }
                        }
                        Ok(Step::Done(()))
                    })
                })?;
                match step {
                    Step::NeedMore => s.feed(py)?,
                    Step::Done(()) => return Ok(count),
                }
            }
        })
    }

    /// Writes up to `max_items` records of the current tree into `writer`'s tree `tree` (an
    /// index from LmdbWriter.open_tree), without a Python object per record. Records whose key
    /// lacks `prefix` are read and checked but not written. Returns (written, skipped, deleted,
    /// skipped keys, tree ended); overwrite=False keeps existing values (those keys are skipped).
    #[pyo3(signature = (writer, tree, *, prefix=None, overwrite, max_items=IntArg::Default(65536)))]
    fn write_items<'py>(
        &mut self,
        py: Python<'py>,
        writer: &Bound<'py, PyLmdbWriter>,
        tree: usize,
        prefix: Option<Vec<u8>>,
        overwrite: bool,
        max_items: IntArg<'py>,
    ) -> PyResult<WrittenTuple<'py>> {
        let max_items = batch_limit(&max_items, "max_items")? as u64;
        let prefix = prefix.unwrap_or_default();
        let prefix = &prefix[..];
        let mut target = writer.try_borrow_mut()?;
        let done = self.guarded(py, |s, py| {
            let (w, t) = target.parts(tree)?;
            let mut done = Written::default();
            loop {
                let mut job = AssertSend((s.decoder()?, &mut *w, &mut *t, &mut done));
                let step = py.detach(move || {
                    job.run(|(dec, w, t, done)| {
                        write_records(dec, w, t, prefix, overwrite, max_items, done)
                    })
                })?;
                match step {
                    Step::NeedMore => s.feed(py)?,
                    Step::Done(()) => break,
                }
            }
            Ok(done)
        })?;
        Ok(done.into_tuple(py))
    }

    #[getter]
    fn trailer<'py>(&self, py: Python<'py>) -> Option<Py<PyAny>> {
        self.dec.as_ref().and_then(|d| d.trailer()).map(|t| {
            trailer_tuple(py, t)
                .into_pyobject(py)
                .expect("tuple")
                .into_any()
                .unbind()
        })
    }

    fn read_summary<'py>(&mut self, py: Python<'py>) -> PyResult<Py<PyAny>> {
        self.guarded(py, |s, py| {
            let dec = s.decoder()?;
            let params = dec.params();
            let source = s.source.bind(py).clone();
            if !source
                .call_method0("seekable")
                .and_then(|b| b.is_truthy())
                .unwrap_or(false)
            {
                return Err(InvalidArgumentError::new_err(
                    "read_summary() needs a seekable source",
                ));
            }
            let end: u64 = source
                .call_method1("seek", (0, 2))
                .io_context(py, "seeking in the backup")?
                .extract()?;
            let start = s.preamble.raw.len() as u64;
            let layout = Layout::new(params, end.checked_sub(start).ok_or_else(truncated)?)?;
            let mut tail: Vec<u8> = Vec::new();
            let mut index = layout.segments;
            let trailer: Trailer = loop {
                if index == 0 {
                    return Err(truncated().into());
                }
                index -= 1;
                let (offset, len) = layout.segment(index);
                source
                    .call_method1("seek", (start + offset,))
                    .io_context(py, "seeking in the backup")?;
                let mut segment = read_up_to(&source, len)?;
                if segment.len() != len {
                    return Err(truncated().into());
                }
                let dec = s.decoder()?;
                let last = index + 1 == layout.segments;
                let n = py.detach(|| dec.open_detached(index, last, &mut segment))?;
                segment.truncate(n);
                segment.extend_from_slice(&tail);
                tail = segment;
                if let Some(need) = trailer_record_length(&tail) {
                    if tail.len() >= need {
                        break parse_tail_trailer(&tail)?;
                    }
                }
            };
            s.finished_by_summary = true;
            Ok(trailer_tuple(py, &trailer)
                .into_pyobject(py)?
                .into_any()
                .unbind())
        })
    }

    fn __repr__(&self) -> String {
        format!(
            "<BackupReader segment_size={} unlocked={}>",
            self.preamble.segment_size,
            self.dec.is_some()
        )
    }
}
