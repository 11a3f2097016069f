"""datafold: encrypted, authenticated, streaming backups of embedded key-value databases."""

from .core import CORE
from .errors import (
    ArgumentTypeError,
    BackupError,
    BackupFileNotFoundError,
    BackupIOError,
    CryptoError,
    DatabaseError,
    EncryptionKeyError,
    FormatError,
    IntegrityError,
    InvalidArgumentError,
    StoreError,
    VersionMismatchError,
)
from .keys import MasterKeyPair, derive_backup_key
from .manager import EncryptedBackupManager
from .metadata import BackupMetadata, BackupResult, BackupStats, EncryptionInfo, RestoreStats, SourceInfo, TreeInfo
from .options import BackupMode, BackupOptions, RestoreOptions
from .passphrase import Argon2Params, Passphrase
from .progress import ProgressEvent
from .stores import DbOperations

__version__ = "0.1.0"

__all__ = [
    "CORE",
    "DbOperations",
    "EncryptedBackupManager",
    "BackupOptions",
    "RestoreOptions",
    "BackupMode",
    "BackupMetadata",
    "BackupResult",
    "BackupStats",
    "RestoreStats",
    "TreeInfo",
    "EncryptionInfo",
    "SourceInfo",
    "MasterKeyPair",
    "Passphrase",
    "Argon2Params",
    "ProgressEvent",
    "derive_backup_key",
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
    "__version__",
]
