"""Backup and restore options. Every field does what its name says; invalid values raise
InvalidArgumentError (a ValueError) or ArgumentTypeError (a TypeError) naming the field."""

from __future__ import annotations

import enum
import os
from collections.abc import Collection
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from .core import core
from .errors import ArgumentTypeError, InvalidArgumentError

if TYPE_CHECKING:
    from .metadata import BackupMetadata

__all__ = ["BackupMode", "BackupOptions", "RestoreOptions", "MAX_COMPRESSION_LEVEL", "check_threads", "check_path"]

MAX_COMPRESSION_LEVEL = 22


class BackupMode(str, enum.Enum):
    FULL = "full"
    INCREMENTAL = "incremental"


def _tree_filter(value: Any, name: str) -> frozenset[str] | None:
    if value is None:
        return None
    # A bare string would be iterated letter by letter: a classic slip, refused.
    if isinstance(value, (str, bytes)) or not isinstance(value, Collection):
        raise ArgumentTypeError(
            f"{name} must be a list, tuple or set of tree names (or None), not {type(value).__name__}; "
            f"for one tree write {name}=[{value!r}]"
        )
    names = frozenset(value)
    for n in names:
        if not isinstance(n, str) or not n:
            raise ArgumentTypeError(f"{name} must hold non-empty tree names (str), found {n!r}")
    return names


def _prefix(value: Any, name: str) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidArgumentError(f"{name} is not valid Unicode text (it holds a lone surrogate)") from None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise ArgumentTypeError(f"{name} must be str, bytes or None, not {type(value).__name__}")


def check_path(value: Any, name: str) -> str:
    """A non-empty str or os.PathLike path (as str) without NUL characters."""
    if isinstance(value, (str, os.PathLike)):
        p = os.fspath(value)
        if isinstance(p, str) and p:
            if "\x00" in p:
                raise InvalidArgumentError(f"{name} must not contain a NUL character: {p!r}")
            return p
    raise ArgumentTypeError(f"{name} must be a non-empty str or os.PathLike, not {value!r}")


def _chain(value: Any) -> tuple[str, ...] | None:
    """The `chain` option of BackupOptions and RestoreOptions: backup paths, oldest first."""
    if value is None:
        return None
    if isinstance(value, (str, bytes, os.PathLike)) or not isinstance(value, Collection):
        raise ArgumentTypeError(
            f"chain must be a list of backup paths, oldest first (or None), not {type(value).__name__}"
        )
    return tuple(check_path(p, "chain") for p in value)


def _parent(value: Any) -> str | None:
    """BackupOptions.parent: a path, or BackupMetadata of a backup file (its path)."""
    from .metadata import BackupMetadata

    if value is None:
        return None
    if isinstance(value, BackupMetadata):
        if value.path is None:
            raise InvalidArgumentError(
                "parent is BackupMetadata without a file path; pass the parent backup's path instead"
            )
        value = value.path
    return check_path(value, "parent")


def check_threads(value: Any, name: str = "threads") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"{name} must be an int (0 = all cores), not {type(value).__name__}")
    if not 0 <= value <= 1024:
        raise InvalidArgumentError(f"{name} must be between 0 (all cores) and 1024, got {value}")
    return value


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be True or False, not {value!r}")
    return value


def _check_bools(obj: object) -> None:
    for f in fields(obj):  # type: ignore[arg-type]
        if f.type in ("bool", bool):
            _bool(getattr(obj, f.name), f.name)


class _PrefixMixin:
    key_prefix_filter: bytes | str | None

    @property
    def key_prefix(self) -> bytes | None:
        """key_prefix_filter as bytes (validation already encoded a str as UTF-8)."""
        p = self.key_prefix_filter
        return p.encode("utf-8") if isinstance(p, str) else p


@dataclass(frozen=True)
class BackupOptions(_PrefixMixin):
    """What `create_backup` backs up and how.

    mode: BackupMode.FULL, or BackupMode.INCREMENTAL: only what changed since `parent`.
    parent: for INCREMENTAL, the parent backup (a path, or the BackupMetadata that create_backup,
        read_metadata or list_backups returned). Its own parents are found beside it, or given
        with `chain`. An incremental backs up what its chain's full backup did: the filters
        (tree_filter, key_prefix_filter, include_metadata) are the chain's; leave them at their
        defaults or repeat the same values (other values are an InvalidArgumentError).
    chain: for INCREMENTAL, the paths of the parent's own parents, oldest (the full backup) first;
        `parent` may end the list too. None: they are looked up by backup id among the backups
        in the parent's directory (as RestoreOptions.chain).
    tree_filter: None for every tree, else a collection of tree names.
    key_prefix_filter: only keys starting with this prefix (str is UTF-8 encoded).
    include_metadata: False leaves out metadata trees ("metadata" and names starting with "_"),
        even where tree_filter names them.
    compression_level: 0 (no compression, the default) or a zstd level 1-22, applied per block of
        records before encryption (docs/FORMAT.md §7); restoring needs no option. The pure core
        needs the zstandard package for it (pip install 'datafold[zstd]').
    verify_during_creation: read the file back and verify it (a full authenticated pass) before
        it is put in place. It reads the file as it is being written, in a thread beside the
        writer (after the writer when `threads` is not 0); a progress callback hears it as the
        "verify" phase after "backup" either way.
    segment_size: the Tink ciphertext segment size (docs/FORMAT.md).
    threads: threads that seal segments, 0 = all cores (the Rust core; the pure core uses one).
        A number other than 0 also keeps the read-back check after the writer, so that no more
        than that many threads seal or open segments at once.
    """

    mode: BackupMode = BackupMode.FULL
    tree_filter: Collection[str] | None = None
    key_prefix_filter: bytes | str | None = None
    include_metadata: bool = True
    compression_level: int = 0
    verify_during_creation: bool = True
    segment_size: int = field(default=core.DEFAULT_SEGMENT_SIZE)
    threads: int = 0
    parent: str | os.PathLike[str] | BackupMetadata | None = None
    chain: Collection[str | os.PathLike[str]] | None = None

    def __post_init__(self) -> None:
        check_threads(self.threads)
        try:
            object.__setattr__(self, "mode", BackupMode(self.mode))
        except ValueError:
            raise InvalidArgumentError(
                f"mode must be one of {[m.value for m in BackupMode]}, got {self.mode!r}"
            ) from None
        object.__setattr__(self, "parent", _parent(self.parent))
        if self.mode is BackupMode.INCREMENTAL and self.parent is None:
            raise InvalidArgumentError(
                "mode=BackupMode.INCREMENTAL needs parent= (the path or metadata of the backup it builds on)"
            )
        if self.mode is BackupMode.FULL and self.parent is not None:
            raise InvalidArgumentError("parent is only for mode=BackupMode.INCREMENTAL; a full backup has no parent")
        object.__setattr__(self, "chain", _chain(self.chain))
        if self.mode is BackupMode.FULL and self.chain is not None:
            raise InvalidArgumentError("chain is only for mode=BackupMode.INCREMENTAL; a full backup has no parents")
        object.__setattr__(self, "tree_filter", _tree_filter(self.tree_filter, "tree_filter"))
        object.__setattr__(self, "key_prefix_filter", _prefix(self.key_prefix_filter, "key_prefix_filter"))
        _check_bools(self)
        level = self.compression_level
        if not isinstance(level, int) or isinstance(level, bool):
            raise ArgumentTypeError(f"compression_level must be an int, not {type(level).__name__}")
        if not 0 <= level <= MAX_COMPRESSION_LEVEL:
            raise InvalidArgumentError(f"compression_level must be between 0 and {MAX_COMPRESSION_LEVEL}, got {level}")
        size = self.segment_size
        if not isinstance(size, int) or isinstance(size, bool):
            raise ArgumentTypeError(f"segment_size must be an int, not {type(size).__name__}")
        if not core.MIN_SEGMENT_SIZE <= size <= core.MAX_SEGMENT_SIZE:
            raise InvalidArgumentError(
                f"segment_size must be between {core.MIN_SEGMENT_SIZE} and {core.MAX_SEGMENT_SIZE}, got {size}"
            )


@dataclass(frozen=True)
class RestoreOptions(_PrefixMixin):
    """How `restore_backup` applies a backup. The whole restore is one store transaction.

    overwrite_existing: False keeps the values of keys that already exist (counted as skipped);
        a key an incremental chain deleted is deleted all the same (a chain restores the state of
        its newest backup).
    tree_filter / key_prefix_filter: restore only these trees / keys (as in BackupOptions).
    verify_before_restore: a full authenticated pass over the file, ended before the database
        changes. Into an empty LMDB database (a staged native restore, stores/lmdb.py) it runs
        in a thread beside the write into the new data file, which replaces data.mdb only after
        both passes; otherwise (or with `threads` not 0) it runs before anything is written. A
        progress callback hears it as the "verify" phase before "restore" either way.
    backup_before_restore: first write a safety backup of the trees the restore will touch;
        its path is in RestoreStats.safety_backup_path (beside the restored file unless
        safety_backup_path is given; not a file of the database nor a backup of the chain being
        restored: InvalidArgumentError). Restoring it with overwrite_existing=True gives back the
        prior values of every key the restore wrote. It stays when the restore then fails.
    continue_on_errors: record-level store errors are collected in RestoreStats.errors instead of
        aborting; integrity failures always abort.
    verify_after_restore: read back what was written and check it against the backup (per-tree
        digests where a whole tree went into an empty tree, item by item otherwise). A staged
        native restore of one file is read back from its new data file while that syncs (several
        trees at once, up to `threads`), before it replaces data.mdb: a mismatch then leaves the
        database as it was.
    threads: threads that open segments, 0 = all cores (the Rust core; the pure core uses one).
        A number other than 0 also keeps the verify pass before the write (see above).
    chain: for an incremental backup, the paths of its parents, oldest (the full backup) first; the
        backup being restored may end the list too.
        None: they are looked up by backup id among the backups in the same directory.
    """

    overwrite_existing: bool = False
    tree_filter: Collection[str] | None = None
    key_prefix_filter: bytes | str | None = None
    verify_before_restore: bool = True
    backup_before_restore: bool = False
    continue_on_errors: bool = False
    verify_after_restore: bool = True
    safety_backup_path: str | None = None
    threads: int = 0
    chain: Collection[str | os.PathLike[str]] | None = None

    def __post_init__(self) -> None:
        check_threads(self.threads)
        object.__setattr__(self, "chain", _chain(self.chain))
        object.__setattr__(self, "tree_filter", _tree_filter(self.tree_filter, "tree_filter"))
        object.__setattr__(self, "key_prefix_filter", _prefix(self.key_prefix_filter, "key_prefix_filter"))
        _check_bools(self)
        p = self.safety_backup_path
        if p is not None and not isinstance(p, str):
            if not isinstance(p, os.PathLike):
                raise ArgumentTypeError(f"safety_backup_path must be a path or None, not {type(p).__name__}")
            object.__setattr__(self, "safety_backup_path", os.fspath(p))
        p = self.safety_backup_path
        if p is not None and not isinstance(p, str):
            raise ArgumentTypeError(f"safety_backup_path must be a str path, not {type(p).__name__}")
        if p == "":
            raise InvalidArgumentError("safety_backup_path must be a file path or None, not an empty string")
        if p is not None and "\x00" in p:
            raise InvalidArgumentError("safety_backup_path must not contain a NUL character")
