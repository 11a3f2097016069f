//! Maps the core's `Error` onto the exception classes defined once in `datafold.errors`.

use pyo3::prelude::*;

use crate::error::Error;

pyo3::import_exception!(datafold.errors, BackupError);
pyo3::import_exception!(datafold.errors, FormatError);
pyo3::import_exception!(datafold.errors, VersionMismatchError);
pyo3::import_exception!(datafold.errors, IntegrityError);
pyo3::import_exception!(datafold.errors, EncryptionKeyError);
pyo3::import_exception!(datafold.errors, BackupIOError);
pyo3::import_exception!(datafold.errors, CryptoError);
pyo3::import_exception!(datafold.errors, InvalidArgumentError);
pyo3::import_exception!(datafold.errors, ArgumentTypeError);
pyo3::import_exception!(datafold.errors, StoreError);

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        let msg = e.to_string();
        match e {
            Error::Format(_) => FormatError::new_err(msg),
            Error::VersionMismatch { found, expected } => {
                VersionMismatchError::new_err((found, expected))
            }
            Error::Integrity(_) => IntegrityError::new_err(msg),
            Error::EncryptionKey(_) => EncryptionKeyError::new_err(msg),
            Error::InvalidArgument(_) => InvalidArgumentError::new_err(msg),
            Error::Poisoned(_) => BackupError::new_err(msg),
            Error::Crypto(_) => CryptoError::new_err(msg),
            Error::Store(_) => StoreError::new_err(msg),
        }
    }
}

/// ArgumentTypeError unless `obj` has a callable `method` (a sink's write(), a source's read()).
pub fn require_method(obj: &Bound<'_, PyAny>, method: &str, what: &str) -> PyResult<()> {
    let ok = obj
        .getattr(method)
        .map(|m| m.is_callable())
        .unwrap_or(false);
    if ok {
        Ok(())
    } else {
        Err(ArgumentTypeError::new_err(format!(
            "{what} must be a binary file-like object with {method}(), not {}",
            super::type_name(obj)
        )))
    }
}

pub trait PyResultExt<T> {
    /// Turns an OSError raised by a Python file object into BackupIOError (chained).
    fn io_context(self, py: Python<'_>, action: &str) -> PyResult<T>;
}

impl<T> PyResultExt<T> for PyResult<T> {
    fn io_context(self, py: Python<'_>, action: &str) -> PyResult<T> {
        self.map_err(|e| {
            if e.is_instance_of::<pyo3::exceptions::PyOSError>(py)
                && !e.is_instance_of::<BackupIOError>(py)
            {
                let new = BackupIOError::new_err(format!("{action} failed: {}", e.value(py)));
                new.set_cause(py, Some(e));
                new
            } else {
                e
            }
        })
    }
}
