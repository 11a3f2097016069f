//! `ChainMerge`: one tree across the readers of a backup chain (crate::chain), merged for a
//! restore or diffed against a database's items straight into a `BackupWriter`.

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

use super::errors::{BackupError, InvalidArgumentError};
use super::lmdb::{PyLmdbWriter, PyRecordBatch, WrittenTuple};
use super::reader::PyBackupReader;
use super::writer::PyBackupWriter;
use super::{batch_limit, batch_limits, pair, untracked_pair, with_bytes, IntArg};
use crate::chain::{ChainMerge, Record, RecordSource};
use crate::error::Error;
use crate::lmdb_write::{write_record, Written};

struct ReaderSource<'py> {
    reader: PyRefMut<'py, PyBackupReader>,
}

impl RecordSource<PyErr> for ReaderSource<'_> {
    fn next_record(&mut self, into: &mut Record) -> PyResult<bool> {
        let py = self.reader.py();
        self.reader.next_record(py, into)
    }
}

#[pyclass(module = "datafold._core", name = "ChainMerge", unsendable)]
pub struct PyChainMerge {
    readers: Vec<Py<PyBackupReader>>,
    merge: ChainMerge,
    poisoned: bool,
}

impl PyChainMerge {
    /// Runs `f` with every member's reader borrowed; poisons the merge on any error.
    fn with_sources<'py, T>(
        &mut self,
        py: Python<'py>,
        f: impl FnOnce(&mut ChainMerge, &mut [ReaderSource<'py>]) -> PyResult<T>,
    ) -> PyResult<T> {
        if self.poisoned {
            return Err(BackupError::new_err(
                "this chain merge failed earlier and cannot be used any more; start a new one",
            ));
        }
        let r = (|| {
            let mut sources = self
                .readers
                .iter()
                .map(|r| {
                    Ok(ReaderSource {
                        reader: r.bind(py).try_borrow_mut().map_err(|_| {
                            InvalidArgumentError::new_err(
                                "a reader of the chain is in use elsewhere (or given twice)",
                            )
                        })?,
                    })
                })
                .collect::<PyResult<Vec<_>>>()?;
            f(&mut self.merge, &mut sources)
        })();
        self.poisoned |= r.is_err();
        r
    }
}

fn emit_into<'a>(
    py: Python<'a>,
    writer: &'a mut PyBackupWriter,
    written: &'a mut u64,
) -> impl FnMut(&[u8], Option<&[u8]>) -> PyResult<()> + 'a {
    move |k, v| {
        *written += 1;
        writer.add_record(py, k, v)
    }
}

#[pymethods]
impl PyChainMerge {
    #[new]
    #[pyo3(signature = (readers, *, stale=IntArg::Default(0)))]
    fn new(readers: Vec<Py<PyBackupReader>>, stale: IntArg<'_>) -> PyResult<Self> {
        let members = readers.len();
        let out_of_range = move |v: String| {
            Error::invalid(format!(
                "stale must be between 0 and the number of readers ({members}), got {v}"
            ))
        };
        let stale: usize = stale.get("stale", out_of_range)?;
        if stale > members {
            return Err(out_of_range(stale.to_string()).into());
        }
        Ok(PyChainMerge {
            merge: ChainMerge::new(readers.len(), stale),
            readers,
            poisoned: false,
        })
    }

    #[pyo3(signature = (max_items=IntArg::Default(4096), max_bytes=IntArg::Default(16 << 20)))]
    fn read_items<'py>(
        &mut self,
        py: Python<'py>,
        max_items: IntArg<'py>,
        max_bytes: IntArg<'py>,
    ) -> PyResult<Bound<'py, PyList>> {
        let (max_items, max_bytes) = batch_limits(&max_items, &max_bytes)?;
        self.with_sources(py, |merge, sources| {
            let list = PyList::empty(py);
            let mut bytes = 0usize;
            while list.len() < max_items && bytes < max_bytes {
                let Some((key, value)) = merge.next(sources)? else {
                    break;
                };
                bytes += key.len() + value.map_or(0, <[u8]>::len);
                let value = match value {
                    Some(v) => PyBytes::new(py, v).into_any(),
                    None => py.None().into_bound(py),
                };
                list.append(untracked_pair(PyBytes::new(py, key).into_any(), value)?)?;
            }
            Ok(list)
        })
    }

    /// read_items without the records: merges up to `max_items` keys (fewer once their keys and
    /// values reach `max_bytes`) and returns how many (0 at the end, once every member's
    /// TREE_END was read and checked).
    #[pyo3(signature = (max_items=IntArg::Default(4096), max_bytes=IntArg::Default(16 << 20)))]
    fn skip_items(
        &mut self,
        py: Python<'_>,
        max_items: IntArg<'_>,
        max_bytes: IntArg<'_>,
    ) -> PyResult<usize> {
        let (max_items, max_bytes) = batch_limits(&max_items, &max_bytes)?;
        self.with_sources(py, |merge, sources| {
            let (mut count, mut bytes) = (0, 0usize);
            while count < max_items && bytes < max_bytes {
                let Some((key, value)) = merge.next(sources)? else {
                    break;
                };
                bytes += key.len() + value.map_or(0, <[u8]>::len);
                count += 1;
            }
            Ok(count)
        })
    }

    /// BackupReader.write_items for the merged state: up to `max_items` records (PUT where the
    /// newest member holds one, DELETE where it deletes the key) into `writer`'s tree `tree`.
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
        let mut target = writer.try_borrow_mut()?;
        let done = self.with_sources(py, |merge, sources| {
            let (w, t) = target.parts(tree)?;
            let mut done = Written::default();
            while done.records() < max_items {
                let Some((key, value)) = merge.next(sources)? else {
                    done.tree_done = true;
                    break;
                };
                write_record(w, t, key, value, &prefix, overwrite, &mut done)?;
            }
            Ok(done)
        })?;
        Ok(done.into_tuple(py))
    }

    fn diff(
        &mut self,
        py: Python<'_>,
        items: &Bound<'_, PyAny>,
        mut writer: PyRefMut<'_, PyBackupWriter>,
    ) -> PyResult<u64> {
        let mut written = 0u64;
        self.with_sources(py, |merge, sources| {
            let mut emit = emit_into(py, &mut writer, &mut written);
            if let Ok(batch) = items.downcast::<PyRecordBatch>() {
                for (k, v) in batch.get().batch().records() {
                    merge.diff_item(sources, k, v, &mut emit)?;
                }
                return Ok(());
            }
            for item in items.try_iter()? {
                let (k, v) = pair(&item?)?;
                with_bytes(&k, |k| {
                    with_bytes(&v, |v| merge.diff_item(sources, k, v, &mut emit))
                })???;
            }
            Ok(())
        })?;
        Ok(written)
    }

    fn finish_diff(
        &mut self,
        py: Python<'_>,
        mut writer: PyRefMut<'_, PyBackupWriter>,
    ) -> PyResult<u64> {
        let mut written = 0u64;
        self.with_sources(py, |merge, sources| {
            merge.finish_diff(sources, &mut emit_into(py, &mut writer, &mut written))
        })?;
        Ok(written)
    }

    fn __repr__(&self) -> String {
        format!("<ChainMerge members={}>", self.readers.len())
    }
}
