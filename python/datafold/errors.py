"""The one error hierarchy of datafold; the Rust core imports these classes and raises them too."""

from __future__ import annotations

__all__ = [
    "BackupError",
    "FormatError",
    "VersionMismatchError",
    "IntegrityError",
    "EncryptionKeyError",
    "BackupFileNotFoundError",
    "DatabaseError",
    "BackupIOError",
    "CryptoError",
    "StoreError",
    "InvalidArgumentError",
    "ArgumentTypeError",
    "FILE_ERRORS",
]


class BackupError(Exception):
    """Base class of every error datafold raises on purpose.

    `file`: the backup file the error is about when that is not the file the call was given (a
    parent or another member of an incremental chain; its path also leads the message), else None.
    """

    file: str | None = None


class FormatError(BackupError):
    """The file is not a datafold backup, or a plaintext field is malformed."""


class VersionMismatchError(BackupError):
    """The file uses a format version this release does not read."""

    def __init__(self, found: int, expected: int, message: str | None = None) -> None:
        self.found = found
        self.expected = expected
        advice = (
            "upgrade datafold to read it"
            if found > expected
            else "no datafold release wrote it: the file is damaged or not a datafold backup"
        )
        super().__init__(
            message
            or f"backup format version {found} is not supported (this release reads version {expected}); {advice}"
        )

    def __reduce__(self) -> tuple[type, tuple[int, int, str]]:  # pickling with the extra arguments
        return (type(self), (self.found, self.expected, str(self)))


class IntegrityError(BackupError):
    """Authentication failed: the file was corrupted, truncated or tampered with."""


class EncryptionKeyError(BackupError):
    """The key in hand is not the key the backup was written with."""


class BackupFileNotFoundError(BackupError, FileNotFoundError):
    """The backup file does not exist."""


class DatabaseError(BackupError):
    """The database does not hold what the backup says it should."""


class BackupIOError(BackupError, OSError):
    """Reading or writing a backup file failed at the operating-system level."""


class CryptoError(BackupError):
    """A cryptographic primitive failed for a reason other than a bad ciphertext."""


class StoreError(BackupError):
    """The database backend failed."""


class InvalidArgumentError(BackupError, ValueError):
    """An argument or option has a value datafold does not accept."""


class ArgumentTypeError(BackupError, TypeError):
    """An argument or option has the wrong type."""


# The errors about a backup file's content or key (as opposed to its path, the store or an
# argument): which file they are about is worth naming (chain.about_member, the CLI's prefix).
FILE_ERRORS = (FormatError, VersionMismatchError, IntegrityError, EncryptionKeyError)
