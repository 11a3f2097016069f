//! `LmdbDataFile`, `LmdbScan` and `RecordBatch`: crate::lmdb_file for the LMDB store's snapshots.
//! A batch copies records out of the map once; the BackupWriter and digest_batches read it in
//! Rust, any other consumer sees a sequence of (key, value) bytes pairs.
//! `LmdbWriter`: crate::lmdb_write, the write transaction `BackupReader.write_items` fills.

use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};

use super::{batch_limit, untracked_pair, with_bytes, DigestResult, IntArg};
use crate::digest::ItemDigester;
use crate::format::PutBatch;
use crate::lmdb_file::{DataFile, Scan, TreeRoot};
use crate::lmdb_write::{EnvOptions, Tree, Writer, Written};

#[pyclass(module = "datafold._core", name = "LmdbDataFile", frozen)]
pub struct PyLmdbDataFile {
    file: Arc<DataFile>,
    pool: Arc<BatchPool>,
}

/// The buffers of dropped batches, for the next batches of the file's scans. A batch is ~1 MiB:
/// fresh memory for each cost page faults and zeroing, since the allocator gives freed memory
/// back after 10 ms (src/py/mod.rs).
#[derive(Default)]
struct BatchPool(Mutex<Vec<PutBatch>>);

/// Enough for the batches a backup has in flight (the walk ahead, the writer's).
const POOLED_BATCHES: usize = 4;
/// Larger buffers (a batch that grew for a large value) are freed, not kept.
const POOLED_CAPACITY: usize = 4 << 20;

impl BatchPool {
    fn take(&self, records: usize, bytes: usize) -> PutBatch {
        let pooled = self.0.lock().unwrap_or_else(|e| e.into_inner()).pop();
        pooled.unwrap_or_else(|| PutBatch::with_capacity(records, bytes))
    }

    fn give(&self, mut batch: PutBatch) {
        if batch.capacity() > POOLED_CAPACITY {
            return;
        }
        batch.clear();
        let mut pool = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < POOLED_BATCHES {
            pool.push(batch);
        }
    }
}

#[pymethods]
impl PyLmdbDataFile {
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let file = py.detach(|| DataFile::open(&path))?;
        Ok(PyLmdbDataFile {
            file: Arc::new(file),
            pool: Arc::default(),
        })
    }

    /// The data format version in the meta page (1: LMDB 0.9, the only one scan() reads).
    #[getter]
    fn version(&self) -> u32 {
        self.file.version()
    }

    #[getter]
    fn page_size(&self) -> usize {
        self.file.page_size()
    }

    /// (st_dev, st_ino) of the mapped file.
    #[getter]
    fn identity(&self) -> (u64, u64) {
        self.file.identity
    }

    /// A scan of the tree whose 48-byte record (its value in the main database, read in the
    /// caller's read transaction) is `db_record`; the caller keeps that transaction open while
    /// it takes batches.
    #[pyo3(signature = (db_record, prefix=None))]
    fn scan(
        &self,
        db_record: &Bound<'_, PyAny>,
        prefix: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyLmdbScan> {
        let tree = with_bytes(db_record, TreeRoot::parse)??;
        let prefix = match prefix {
            Some(p) => with_bytes(p, <[u8]>::to_vec)?,
            None => Vec::new(),
        };
        let scan = Scan::new(&self.file, tree, &prefix)?;
        Ok(PyLmdbScan {
            file: self.file.clone(),
            pool: self.pool.clone(),
            scan: Some(scan),
        })
    }
}

#[pyclass(module = "datafold._core", name = "LmdbScan")]
pub struct PyLmdbScan {
    file: Arc<DataFile>,
    pool: Arc<BatchPool>,
    /// None once over or failed: a failed scan stays failed.
    scan: Option<Scan>,
}

#[pymethods]
impl PyLmdbScan {
    /// The next batch (at most max_items records, ending once keys and values reach max_bytes),
    /// or None at the end. Reads without the Python lock.
    fn take(
        &mut self,
        py: Python<'_>,
        max_items: IntArg<'_>,
        max_bytes: IntArg<'_>,
    ) -> PyResult<Option<PyRecordBatch>> {
        let (max_items, max_bytes) = (
            batch_limit(&max_items, "max_items")?,
            batch_limit(&max_bytes, "max_bytes")?,
        );
        let Some(mut scan) = self.scan.take() else {
            return Ok(None);
        };
        let file = &self.file;
        // Records stop once max_bytes is reached: the last one may take up to a page more.
        let mut batch = self.pool.take(max_items, max_bytes.saturating_add(4096));
        let more = py.detach(|| scan.fill(file, &mut batch, max_items, max_bytes))?;
        if more {
            self.scan = Some(scan);
        }
        if batch.is_empty() {
            self.pool.give(batch);
            return Ok(None);
        }
        Ok(Some(PyRecordBatch {
            batch: Arc::new(batch),
            pool: self.pool.clone(),
        }))
    }
}

/// Records in one buffer; a read-only sequence of (key, value) bytes pairs.
#[pyclass(module = "datafold._core", name = "RecordBatch", frozen, sequence)]
pub struct PyRecordBatch {
    batch: Arc<PutBatch>,
    /// Where its buffer goes once no one holds the batch.
    pool: Arc<BatchPool>,
}

impl Drop for PyRecordBatch {
    fn drop(&mut self) {
        if let Some(batch) = Arc::into_inner(std::mem::take(&mut self.batch)) {
            self.pool.give(batch);
        }
    }
}

impl PyRecordBatch {
    pub(crate) fn batch(&self) -> Arc<PutBatch> {
        self.batch.clone()
    }

    fn pair<'py>(&self, py: Python<'py>, i: usize) -> PyResult<Bound<'py, PyTuple>> {
        let (k, v) = self.batch.get(i).ok_or_else(|| {
            pyo3::exceptions::PyIndexError::new_err("RecordBatch index out of range")
        })?;
        untracked_pair(
            PyBytes::new(py, k).into_any(),
            PyBytes::new(py, v).into_any(),
        )
    }
}

#[pymethods]
impl PyRecordBatch {
    fn __len__(&self) -> usize {
        self.batch.len()
    }

    fn __getitem__<'py>(&self, py: Python<'py>, index: isize) -> PyResult<Bound<'py, PyTuple>> {
        let len = self.batch.len() as isize;
        let i = if index < 0 { index + len } else { index };
        if !(0..len).contains(&i) {
            return Err(pyo3::exceptions::PyIndexError::new_err(
                "RecordBatch index out of range",
            ));
        }
        self.pair(py, i as usize)
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRecordBatchIter {
        PyRecordBatchIter {
            batch: slf.batch.clone(),
            next: 0,
        }
    }

    /// Bytes of keys and values.
    #[getter]
    fn nbytes(&self) -> usize {
        self.batch.nbytes()
    }

    fn __repr__(&self) -> String {
        format!(
            "<RecordBatch records={} nbytes={}>",
            self.batch.len(),
            self.batch.nbytes()
        )
    }
}

#[pyclass(module = "datafold._core", name = "_RecordBatchIter")]
pub struct PyRecordBatchIter {
    batch: Arc<PutBatch>,
    next: usize,
}

#[pymethods]
impl PyRecordBatchIter {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&mut self, py: Python<'py>) -> Option<Bound<'py, PyTuple>> {
        let (k, v) = self.batch.get(self.next)?;
        self.next += 1;
        untracked_pair(
            PyBytes::new(py, k).into_any(),
            PyBytes::new(py, v).into_any(),
        )
        .ok()
    }
}

/// An LMDB environment opened by the core's own LMDB with one write transaction. The LMDB store
/// hands its environment over first (python/datafold/stores/lmdb.py). Its transaction and cursors
/// belong to the thread that began them (`ThreadBound`); the object itself may be freed anywhere.
#[pyclass(module = "datafold._core", name = "LmdbWriter")]
pub struct PyLmdbWriter {
    state: ThreadBound<WriterState>,
    /// Records of a writer committed or closed.
    records: u64,
    committed: bool,
    staged: bool,
}

struct WriterState {
    /// None once committed or closed.
    writer: Option<Writer>,
    trees: Vec<Tree>,
}

impl PyLmdbWriter {
    /// The writer and the tree `index` (from open_tree) for one write_items call.
    pub(crate) fn parts(&mut self, index: usize) -> PyResult<(&mut Writer, &mut Tree)> {
        let state = self.state.get_mut()?;
        let writer = state.writer.as_mut().ok_or_else(closed)?;
        let tree = state.trees.get_mut(index).ok_or_else(|| no_tree(index))?;
        Ok((writer, tree))
    }

    fn writer(&mut self) -> PyResult<&mut Writer> {
        self.state.get_mut()?.writer.as_mut().ok_or_else(closed)
    }
}

fn no_tree(index: usize) -> PyErr {
    crate::error::Error::invalid(format!("no tree {index} in this writer")).into()
}

fn closed() -> PyErr {
    crate::error::Error::Store("this LMDB write transaction is committed or closed".into()).into()
}

/// A value only the thread that made it may use, as LMDB requires of a write transaction and
/// its cursors. Freed on another thread (a traceback that kept it, collected there), it is
/// leaked instead: after `close()`, as the LMDB store always does first, there is nothing left
/// to leak.
pub(crate) struct ThreadBound<T> {
    value: std::mem::ManuallyDrop<T>,
    owner: std::thread::ThreadId,
}

// SAFETY: the value is reached only through `get`/`get_mut`, which fail on any thread but the
// owner, and dropped only on the owner.
unsafe impl<T> Send for ThreadBound<T> {}
unsafe impl<T> Sync for ThreadBound<T> {}

impl<T> ThreadBound<T> {
    pub(crate) fn new(value: T) -> Self {
        ThreadBound {
            value: std::mem::ManuallyDrop::new(value),
            owner: std::thread::current().id(),
        }
    }

    fn check(&self) -> PyResult<()> {
        if std::thread::current().id() == self.owner {
            Ok(())
        } else {
            Err(crate::error::Error::Store(
                "an LMDB write transaction can only be used on the thread that began it".into(),
            )
            .into())
        }
    }

    pub(crate) fn get(&self) -> PyResult<&T> {
        self.check().map(|()| &*self.value)
    }

    pub(crate) fn get_mut(&mut self) -> PyResult<&mut T> {
        self.check()?;
        Ok(&mut self.value)
    }
}

impl<T> Drop for ThreadBound<T> {
    fn drop(&mut self) {
        if std::thread::current().id() == self.owner {
            // SAFETY: dropped once, here; never used again.
            unsafe { std::mem::ManuallyDrop::drop(&mut self.value) }
        }
    }
}

#[pymethods]
impl PyLmdbWriter {
    /// The staging file's name in the environment directory.
    #[classattr]
    const STAGING_FILE: &'static str = crate::lmdb_write::STAGING_FILE;

    /// `path`: the environment directory as bytes (os.fsencode: any file name);
    /// `stage_when_empty`: build a new data file when the environment holds no tree (see
    /// src/lmdb_write.rs); `stage_writemap`: write that file through its map (for large values).
    #[new]
    #[pyo3(signature = (
        path, *, map_size, max_dbs, max_readers, writemap, stage_when_empty=true, stage_writemap=false
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        path: Vec<u8>,
        map_size: usize,
        max_dbs: u32,
        max_readers: u32,
        writemap: bool,
        stage_when_empty: bool,
        stage_writemap: bool,
    ) -> PyResult<Self> {
        let options = EnvOptions {
            map_size,
            max_dbs,
            max_readers,
            writemap,
            stage_when_empty,
            stage_writemap,
        };
        let path = PathBuf::from(std::ffi::OsString::from_vec(path));
        let writer = py
            .detach(|| Writer::open(&path, options).map(AssertSend))?
            .0;
        Ok(PyLmdbWriter {
            staged: writer.staged(),
            state: ThreadBound::new(WriterState {
                writer: Some(writer),
                trees: Vec::new(),
            }),
            records: 0,
            committed: false,
        })
    }

    /// Opens (creates) a tree: (its index for write_items, whether it had no record).
    fn open_tree(&mut self, name: &str) -> PyResult<(usize, bool)> {
        let tree = self.writer()?.open_tree(name.as_bytes())?;
        let was_empty = tree.was_empty;
        let trees = &mut self.state.get_mut()?.trees;
        trees.push(tree);
        Ok((trees.len() - 1, was_empty))
    }

    /// The transaction was committed.
    #[getter]
    fn committed(&self) -> bool {
        self.committed
    }

    /// The records went to a new data file, renamed over data.mdb at the commit (the
    /// environment held no tree); fixed when the writer opens.
    #[getter]
    fn staged(&self) -> bool {
        self.staged
    }

    /// Records put or deleted in this transaction so far (skipped ones not counted).
    #[getter]
    fn records(&self) -> PyResult<u64> {
        let writer = self.state.get()?.writer.as_ref();
        Ok(writer.map_or(self.records, |w| w.records))
    }

    /// The largest key LMDB stores.
    #[getter]
    fn max_key_size(&mut self) -> PyResult<usize> {
        Ok(self.writer()?.max_key_size())
    }

    /// Ends the writing of a staged write (crate::lmdb_write, `Writer::seal`): its last records
    /// are committed to the staging file, whose sync then runs in the background while
    /// tree_digests() reads the file; commit() waits for the sync and publishes the file.
    fn seal(&mut self, py: Python<'_>) -> PyResult<()> {
        let mut job = AssertSend(self.writer()?);
        py.detach(move || job.run(|w| w.seal()))?;
        Ok(())
    }

    /// [digest_items(backup_key, ...) of the records of tree `i` for i in `indices`] as a sealed
    /// staged write holds them: (items, bytes, digest) each, read back through LMDB before the
    /// file is published, on up to `threads` threads (0: all cores) a tree at a time.
    #[pyo3(signature = (indices, backup_key, *, threads=IntArg::Default(0)))]
    fn tree_digests<'py>(
        &mut self,
        py: Python<'py>,
        indices: Vec<usize>,
        backup_key: &Bound<'py, PyAny>,
        threads: IntArg<'py>,
    ) -> PyResult<Vec<DigestResult<'py>>> {
        let threads = super::threads_arg(&threads)?;
        let digest_key = super::digest_key_arg(backup_key)?;
        let state = self.state.get_mut()?;
        let writer = state.writer.as_mut().ok_or_else(closed)?;
        let trees = indices
            .iter()
            .map(|&i| state.trees.get(i).ok_or_else(|| no_tree(i)))
            .collect::<PyResult<Vec<&Tree>>>()?;
        let mut job = AssertSend((writer, trees));
        let key = digest_key.as_bytes();
        let digests = py.detach(move || {
            job.run(|(w, trees)| {
                w.read_back_trees(
                    trees,
                    threads,
                    || ItemDigester::new(key),
                    |d, k, v| d.add(k, Some(v)),
                    ItemDigester::finish,
                )
            })
        })?;
        Ok(digests
            .into_iter()
            .map(|(tally, digest)| (tally.items, tally.bytes, PyBytes::new(py, &digest)))
            .collect())
    }

    /// Commits durably and closes the environment.
    fn commit(&mut self, py: Python<'_>) -> PyResult<()> {
        let writer = self.state.get_mut()?.writer.take().ok_or_else(closed)?;
        self.records = writer.records;
        let mut job = AssertSend(writer);
        // The environment closes inside too: its last fsync is done, the unmap may take a while.
        py.detach(move || job.run(|w| w.commit()))?;
        self.committed = true;
        Ok(())
    }

    /// Aborts the transaction if it is still open and closes the environment.
    fn close(&mut self) -> PyResult<()> {
        let state = self.state.get_mut()?;
        // The trees' cursors belong to the transaction: they go first.
        state.trees.clear();
        if let Some(w) = state.writer.take() {
            self.records = w.records;
        }
        Ok(())
    }
}

/// Moves a value into a `py.detach` closure that runs on this same thread.
pub(crate) struct AssertSend<T>(pub T);

// SAFETY: `py.detach` runs its closure on the calling thread; only the GIL is released, so an
// LMDB transaction inside never changes threads.
unsafe impl<T> Send for AssertSend<T> {}

impl<T> AssertSend<T> {
    pub(crate) fn run<R>(&mut self, f: impl FnOnce(&mut T) -> R) -> R {
        f(&mut self.0)
    }
}

/// What write_items returns: (written, skipped, deleted, skipped keys, tree ended).
pub(crate) type WrittenTuple<'py> = (u64, u64, u64, Vec<Bound<'py, PyBytes>>, bool);

impl Written {
    pub(crate) fn into_tuple(self, py: Python<'_>) -> WrittenTuple<'_> {
        let keys = self
            .skipped_keys
            .iter()
            .map(|k| PyBytes::new(py, k))
            .collect();
        (
            self.written,
            self.skipped,
            self.deleted,
            keys,
            self.tree_done,
        )
    }
}
