"""The database store layer: named trees of byte keys and byte values, in key order.

A database is a set of named *trees*; each tree maps byte keys to byte values and is iterated in
bytewise (memcmp) key order. `DbOperations` is the one entry point the rest of datafold uses; it
picks a backend from `BACKENDS` ("lmdb" or "sqlite") and forwards to a `Store` subclass.

Every backend failure surfaces as `datafold.errors.StoreError` (the original exception chained);
bad arguments raise `InvalidArgumentError` / `ArgumentTypeError`.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Generator, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from types import TracebackType
from typing import Any, ClassVar

from ..core import core
from ..errors import ArgumentTypeError, InvalidArgumentError, StoreError

__all__ = [
    "BACKENDS",
    "DbOperations",
    "Store",
    "WriteTransaction",
    "is_metadata_tree",
    "MAX_TREE_NAME_BYTES",
    "Items",
    "ReadSnapshot",
]

Buffer = bytes | bytearray | memoryview
# What items() returns: a generator, so that close() ends its read transaction early.
Items = Generator[tuple[bytes, bytes], None, None]

# The backup format allows tree names of 1..=4096 UTF-8 bytes (docs/FORMAT.md, TREE_BEGIN).
MAX_TREE_NAME_BYTES = 4096


def is_metadata_tree(name: str) -> bool:
    """True for trees that hold datafold's own bookkeeping rather than user data."""
    if not isinstance(name, str):
        raise ArgumentTypeError(f"name must be a str, not {type(name).__name__}")
    return name == "metadata" or name.startswith("_")


# --- argument checks shared by the backends ---------------------------------------------------


def check_tree(tree: object, argument: str = "tree") -> str:
    """Validate a tree name: a non-empty str without NUL, at most MAX_TREE_NAME_BYTES in UTF-8."""
    if not isinstance(tree, str):
        raise ArgumentTypeError(f"{argument} must be a str (the tree name), not {type(tree).__name__}")
    if not tree:
        raise InvalidArgumentError(f"{argument} must be a non-empty tree name")
    if "\x00" in tree:
        # LMDB takes database names as C strings, so a NUL would silently truncate the name.
        raise InvalidArgumentError(f"{argument} must not contain NUL characters: {tree!r}")
    try:
        encoded = tree.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidArgumentError(f"{argument} is not valid Unicode (lone surrogate?): {tree!r}") from e
    if len(encoded) > MAX_TREE_NAME_BYTES:
        raise InvalidArgumentError(
            f"{argument} is {len(encoded)} bytes in UTF-8; tree names are at most {MAX_TREE_NAME_BYTES} bytes"
        )
    return tree


def as_bytes(value: object, argument: str) -> bytes:
    """Accept bytes, bytearray or memoryview; return an immutable bytes copy (bytes pass through)."""
    if type(value) is bytes:
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise ArgumentTypeError(f"{argument} must be bytes, bytearray or memoryview, not {type(value).__name__}")


# A snapshot iterator reads a batch of records per lock round trip: at most this many records,
# and no more once their keys and values reach SNAPSHOT_BATCH_BYTES (so large values stay few).
SNAPSHOT_BATCH = 4096
SNAPSHOT_BATCH_BYTES = 1 << 20


def take_batch(pairs: Iterator[tuple[bytes, bytes]]) -> tuple[list[tuple[bytes, bytes]], bool]:
    """The next batch of pairs, and whether the iterator may hold more (the selected core's
    take_batch: the Rust core's costs no bytecode per record)."""
    batch: tuple[list[tuple[bytes, bytes]], bool] = core.take_batch(pairs, SNAPSHOT_BATCH, SNAPSHOT_BATCH_BYTES)
    return batch


def check_item(pair: object) -> tuple[bytes, bytes]:
    """One (key, value) pair of a put_many() iterable, as bytes."""
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ArgumentTypeError(f"items must yield (key, value) pairs, got {type(pair).__name__}")
    return as_bytes(pair[0], "key"), as_bytes(pair[1], "value")


def check_bool(value: object, argument: str) -> bool:
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{argument} must be a bool, not {type(value).__name__}")
    return value


def check_nbytes(nbytes: object, argument: str = "nbytes") -> int:
    if not isinstance(nbytes, int) or isinstance(nbytes, bool):
        raise ArgumentTypeError(f"{argument} must be an int, not {type(nbytes).__name__}")
    if nbytes < 0:
        raise InvalidArgumentError(f"{argument} must be >= 0, got {nbytes}")
    return nbytes


def prefix_successor(prefix: bytes) -> bytes | None:
    """The smallest byte string greater than every string starting with `prefix`.

    None when there is none (empty prefix or all 0xff bytes): the range is then unbounded above.
    Trailing 0xff bytes cannot be incremented, so they are dropped before incrementing.
    """
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


# --- the interface every backend implements ---------------------------------------------------


class WriteTransaction(ABC):
    """An open read-write transaction; obtained from `write_transaction()`, valid only inside it.

    Reads through it see its own uncommitted writes. Its methods raise StoreError once the
    transaction has been committed or rolled back.
    """

    @abstractmethod
    def create_tree(self, tree: str) -> None: ...

    @abstractmethod
    def get(self, tree: str, key: Buffer) -> bytes | None: ...

    @abstractmethod
    def put(self, tree: str, key: Buffer, value: Buffer, overwrite: bool = True) -> bool:
        """Write one record (creating the tree). False if the key existed and overwrite=False."""

    @abstractmethod
    def put_many(self, tree: str, items: Iterable[tuple[Buffer, Buffer]], overwrite: bool = True) -> tuple[int, int]:
        """Write records; returns (written, skipped), skipped counting keys kept by overwrite=False."""

    @abstractmethod
    def delete(self, tree: str, key: Buffer) -> bool: ...

    @abstractmethod
    def items(self, tree: str, prefix: Buffer = b"") -> Items:
        """Stream the tree in key order; do not write to the same tree while iterating it."""

    @abstractmethod
    def tree_names(self) -> list[str]: ...


class ReadSnapshot(ABC):
    """A consistent read-only view of every tree; obtained from `snapshot()`, valid only inside it.

    All reads see the database as it was when the snapshot started, whatever is written meanwhile
    (by this process or another one). Its methods, and next() on its items() iterators, raise
    StoreError once the snapshot's with block has exited (or the database was closed). It may be
    used from several threads; each call is serialized.
    """

    @abstractmethod
    def tree_names(self) -> list[str]:
        """Names of the trees that existed when the snapshot started, sorted."""

    def items(self, tree: str, prefix: Buffer = b"") -> Items:
        """Stream (key, value) pairs in key order, only keys starting with prefix (nothing for a missing tree).

        Several iterators, over the same or different trees, may be interleaved.
        """
        tree = check_tree(tree)
        prefix = as_bytes(prefix, "prefix")
        self._check_live()
        return self._iter_items(tree, prefix)

    def _iter_items(self, tree: str, prefix: bytes) -> Items:
        for batch in self.batches(tree, prefix):
            for pair in batch:
                if self._ended:  # the records are copies, but the promise is no reads after the block
                    raise StoreError("the snapshot is over (its with block has exited)")
                yield pair

    @abstractmethod
    def batches(self, tree: str, prefix: Buffer = b"") -> Iterator[Sequence[tuple[bytes, bytes]]]:
        """items() in batches (sequences of at most SNAPSHOT_BATCH records, bounded in bytes), for
        consumers that hand whole batches on: no per-record cost here. The snapshot's end is
        checked per batch. A batch is a list, or the Rust core's RecordBatch (LMDB direct reads:
        up to 65536 records, bounded by SNAPSHOT_BATCH_BYTES alone in practice), which the core's
        BackupWriter.add_items, digest_batches and ChainMerge.diff read without a Python object
        per record."""

    @property
    @abstractmethod
    def _ended(self) -> bool:
        """True once the snapshot is over."""

    @abstractmethod
    def _check_live(self) -> None:
        """StoreError if the snapshot is over (or its database closed)."""

    @abstractmethod
    def get(self, tree: str, key: Buffer) -> bytes | None: ...

    @abstractmethod
    def count(self, tree: str) -> int: ...


class Store(ABC):
    """One open database of one backend. Use through DbOperations."""

    backend: ClassVar[str]
    path: str

    @classmethod
    @abstractmethod
    def open(cls, path: str, **options: Any) -> Store:
        """Open or create the database at path; unknown options raise InvalidArgumentError."""

    @property
    @abstractmethod
    def closed(self) -> bool: ...

    @property
    @abstractmethod
    def files(self) -> list[str]:
        """The files the database lives in (also those that do not exist yet): a backup written over
        one of them would destroy the database."""

    @abstractmethod
    def tree_names(self) -> list[str]: ...

    @abstractmethod
    def create_tree(self, tree: str) -> None: ...

    @abstractmethod
    def get(self, tree: str, key: Buffer) -> bytes | None: ...

    @abstractmethod
    def put(self, tree: str, key: Buffer, value: Buffer) -> None: ...

    @abstractmethod
    def delete(self, tree: str, key: Buffer) -> bool: ...

    @abstractmethod
    def items(self, tree: str, prefix: Buffer = b"") -> Items: ...

    @abstractmethod
    def count(self, tree: str) -> int: ...

    @abstractmethod
    def put_many(self, tree: str, items: Iterable[tuple[Buffer, Buffer]]) -> int: ...

    @abstractmethod
    def write_transaction(self) -> AbstractContextManager[WriteTransaction]: ...

    @abstractmethod
    def snapshot(self) -> AbstractContextManager[ReadSnapshot]:
        """A ReadSnapshot held open for the with block; released on exit."""

    def native_writer(self, mean_record_bytes: float = 0.0) -> AbstractContextManager[Any | None]:
        """A writer of the Rust core that takes a restore's records without Python objects, for the
        with block, or None (the default: write through write_transaction()). `mean_record_bytes`:
        keys + values per record of what will be written, if known (0: not known)."""
        return nullcontext(None)

    def reserve(self, nbytes: int, *, records: int = 0) -> None:
        """Make room for nbytes more of keys+values; a no-op for backends that grow by themselves."""
        check_nbytes(nbytes)
        check_nbytes(records, "records")

    @abstractmethod
    def close(self) -> None: ...


# --- the facade -------------------------------------------------------------------------------


class DbOperations:
    """A database opened with one of the BACKENDS; the API the backup manager uses.

    All methods raise StoreError once close() has been called. Keys and values may be given as
    bytes, bytearray or memoryview and always come back as bytes.
    """

    __slots__ = ("_store", "backend", "path")

    def __init__(self, store: Store) -> None:
        if not isinstance(store, Store):
            raise ArgumentTypeError(f"store must be a Store, not {type(store).__name__}; use DbOperations.open()")
        self._store = store
        self.backend: str = store.backend
        self.path: str = store.path

    @classmethod
    def open(cls, path: str | os.PathLike[str], backend: str = "lmdb", **backend_options: Any) -> DbOperations:
        """Open or create a database.

        lmdb: path is a directory (created if missing; its parent must exist). Options: map_size
        (initial map size in bytes, default 64 MiB; the map grows as needed), max_dbs (default 4096),
        max_readers (default 126), resize_timeout (seconds to wait for other threads before growing),
        writemap (default False; True writes dirty pages straight into the file mapping, so large
        restores and transactions need no anonymous memory in proportion to what they write, at the
        cost of a data file preallocated to the whole map size; see datafold.stores.lmdb).
        sqlite: path is a file (created if missing; its parent must exist). Options: timeout (seconds
        to wait for a lock held by another connection, default 30).
        """
        if not isinstance(backend, str):
            raise ArgumentTypeError(f"backend must be a str, not {type(backend).__name__}")
        store_class = BACKENDS.get(backend)
        if store_class is None:
            accepted = ", ".join(repr(name) for name in BACKENDS)
            raise InvalidArgumentError(f"unknown backend {backend!r}; accepted backends: {accepted}")
        if isinstance(path, os.PathLike):
            path = os.fspath(path)
        if not isinstance(path, str):
            raise ArgumentTypeError(f"path must be a str or os.PathLike, not {type(path).__name__}")
        if not path:
            raise InvalidArgumentError("path must be a non-empty path")
        if "\x00" in path:
            raise InvalidArgumentError(f"path must not contain a NUL character: {path!r}")
        return cls(store_class.open(path, **backend_options))

    @property
    def closed(self) -> bool:
        return self._store.closed

    @property
    def files(self) -> list[str]:
        """The files the database lives in, existing or not (lmdb: data.mdb and lock.mdb in its
        directory; sqlite: the file and its -wal, -shm and -journal companions)."""
        return self._store.files

    def _live(self) -> Store:
        if self._store.closed:
            raise StoreError(f"database {self.path!r} is closed")
        return self._store

    def tree_names(self) -> list[str]:
        """Names of all trees, sorted."""
        return self._live().tree_names()

    def create_tree(self, tree: str) -> None:
        """Create an empty tree; does nothing if it exists."""
        self._live().create_tree(tree)

    def get(self, tree: str, key: Buffer) -> bytes | None:
        """The value stored under key, or None (also when the tree does not exist)."""
        return self._live().get(tree, key)

    def put(self, tree: str, key: Buffer, value: Buffer) -> None:
        """Store one record in its own transaction, creating the tree if missing."""
        self._live().put(tree, key, value)

    def delete(self, tree: str, key: Buffer) -> bool:
        """Remove one record; True if it existed."""
        return self._live().delete(tree, key)

    def items(self, tree: str, prefix: Buffer = b"") -> Items:
        """Stream (key, value) pairs in key order, only keys starting with prefix.

        The iterator reads one consistent snapshot (a single read transaction, taken at the first
        next()) and holds it until exhausted or closed; close it (or use it in a for loop to the end)
        rather than leaving it half-read. A missing tree yields nothing.
        """
        return self._live().items(tree, prefix)

    def count(self, tree: str) -> int:
        """Number of records in the tree (0 if it does not exist)."""
        return self._live().count(tree)

    def put_many(self, tree: str, items: Iterable[tuple[Buffer, Buffer]]) -> int:
        """Store all pairs in one atomic transaction (overwriting); returns how many were written."""
        return self._live().put_many(tree, items)

    def write_transaction(self) -> AbstractContextManager[WriteTransaction]:
        """All-or-nothing writes: commits on normal exit of the with block, rolls back on any exception.

        With lmdb the map cannot grow while the transaction is open; call reserve() with the size of
        the data first, or the transaction fails with StoreError("database map is full ...").
        Only one write transaction (or put/put_many/delete) runs at a time; starting another one in
        the same thread while this one is open raises StoreError.
        """
        return self._live().write_transaction()

    def _native_writer(self, mean_record_bytes: float = 0.0) -> AbstractContextManager[Any | None]:
        """The backup manager's restore path: Store.native_writer()."""
        return self._live().native_writer(mean_record_bytes)

    def snapshot(self) -> AbstractContextManager[ReadSnapshot]:
        """A consistent read view of all trees at one point in time, for the duration of the with block.

            with db.snapshot() as snap:
                for tree in snap.tree_names():
                    for key, value in snap.items(tree): ...

        Writes made meanwhile (by any thread or process) are not seen by the snapshot; a snapshot
        taken afterwards sees them. Once the block exits, the snapshot and its iterators raise
        StoreError. Keep snapshots short-lived: they pin old data. With lmdb the snapshot is one read
        transaction, so while it is open the map cannot grow: a write in the same thread that needs
        a bigger map fails with StoreError (call reserve() before taking the snapshot), and one in
        another thread waits up to resize_timeout for the snapshot to end. Also with lmdb, snapshot()
        raises StoreError inside a write transaction of the same thread, and may wait for another
        thread's or process's write transaction to finish (it registers tree handles first). With
        sqlite it is a read transaction on its own connection; the WAL cannot be checkpointed past
        it, so it grows while the snapshot is open.
        """
        return self._live().snapshot()

    def reserve(self, nbytes: int, *, records: int = 0) -> None:
        """Grow the database ahead of time so that nbytes more of keys+values fit (lmdb; no-op for sqlite).

        Call it before write_transaction() or snapshot() (lmdb cannot grow the map while a write
        transaction, an items() iterator or a snapshot of this thread is open). records, the number of
        records those bytes make, is optional; give it when the records are small, since each costs
        ~16 bytes beyond its data.
        """
        self._live().reserve(nbytes, records=records)

    def close(self) -> None:
        """Close the database; idempotent."""
        self._store.close()

    def __enter__(self) -> DbOperations:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = " closed" if self.closed else ""
        return f"<DbOperations backend={self.backend!r} path={self.path!r}{state}>"


# The backends import the base classes above, so they are imported last.
from .lmdb import LmdbStore  # noqa: E402
from .sqlite import SqliteStore  # noqa: E402

BACKENDS: dict[str, type[Store]] = {"lmdb": LmdbStore, "sqlite": SqliteStore}
