//! The one error type of the Rust core. It knows nothing of Python; `py::errors` maps each
//! variant onto the matching class of `datafold.errors`.

use std::fmt;

#[derive(Debug)]
pub enum Error {
    /// Not a datafold backup, or a malformed plaintext field.
    Format(String),
    /// A format version this release does not read.
    VersionMismatch { found: u32, expected: u32 },
    /// Authentication failed or the authenticated content is inconsistent.
    Integrity(String),
    /// The key in hand is not the backup's key.
    EncryptionKey(String),
    /// A bad argument or a call out of order.
    InvalidArgument(String),
    /// The object is unusable after an earlier error.
    Poisoned(&'static str),
    /// A cryptographic primitive failed for a reason other than a bad ciphertext.
    Crypto(String),
    /// The database (store) cannot be read: a damaged or unsupported LMDB data file.
    Store(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn integrity(msg: impl Into<String>) -> Self {
        Error::Integrity(msg.into())
    }
    pub fn format(msg: impl Into<String>) -> Self {
        Error::Format(msg.into())
    }
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Format(m)
            | Error::Integrity(m)
            | Error::EncryptionKey(m)
            | Error::InvalidArgument(m)
            | Error::Crypto(m)
            | Error::Store(m) => f.write_str(m),
            // The same words as datafold.errors.VersionMismatchError, which Python users see.
            Error::VersionMismatch { found, expected } => write!(
                f,
                "backup format version {found} is not supported (this release reads version \
                 {expected}); {}",
                if found > expected {
                    "upgrade datafold to read it"
                } else {
                    "no datafold release wrote it: the file is damaged or not a datafold backup"
                }
            ),
            Error::Poisoned(what) => write!(
                f,
                "this {what} failed earlier and cannot be used any more; start a new one"
            ),
        }
    }
}

impl std::error::Error for Error {}
