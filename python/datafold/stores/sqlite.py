"""SQLite backend: the database is one SQLite file (WAL mode) holding every tree.

Layout: kv(tree, key, value) keyed by (tree, key) WITHOUT ROWID, so a tree is a contiguous range
of the primary key in BLOB (memcmp) order, plus trees(name) so that empty trees exist.

Writes go through one connection, serialized by a lock, each in BEGIN IMMEDIATE ... COMMIT
(isolation_level=None: transactions are managed here, not by the sqlite3 module). Reads use a small
pool of separate connections; in WAL mode each SELECT reads one consistent snapshot and never blocks
or is blocked by the writer, so items() can stream while writes go on. synchronous=FULL keeps every
commit durable.

snapshot() runs BEGIN (deferred) on a connection of its own and pins the WAL snapshot with a first
SELECT; every read until its COMMIT sees that point in time. While it is open the WAL cannot be
checkpointed past it, so the -wal file grows with the writes made meanwhile.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import ArgumentTypeError, InvalidArgumentError, StoreError
from . import (
    Buffer,
    Items,
    ReadSnapshot,
    Store,
    WriteTransaction,
    as_bytes,
    check_bool,
    check_item,
    check_tree,
    prefix_successor,
    take_batch,
)

__all__ = ["SqliteStore", "DEFAULT_TIMEOUT"]

DEFAULT_TIMEOUT = 30.0
_OPTIONS = ("timeout",)
_MAX_IDLE_READERS = 4

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS trees (name TEXT PRIMARY KEY NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS kv (tree TEXT NOT NULL, key BLOB NOT NULL, value BLOB NOT NULL, "
    "PRIMARY KEY (tree, key)) WITHOUT ROWID",
)


# Also how the CLI tells a locked database from a wrong path.
LOCKED_HINT = (
    "another connection holds a lock on the database (another process writing to it?) and did not let "
    "go within the store's timeout; retry once it is done, or open the store with a longer timeout "
    "(DbOperations.open(path, 'sqlite', timeout=SECONDS))"
)


def _is_locked(e: BaseException) -> bool:
    """SQLITE_BUSY / SQLITE_LOCKED: the timeout ran out waiting for another connection's lock."""
    code = getattr(e, "sqlite_errorcode", None)  # Python >= 3.11; an extended code holds the primary one
    return (isinstance(code, int) and code & 0xFF in (5, 6)) or "database is locked" in str(e)


@contextmanager
def _errors(action: str) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as e:
        hint = f"; {LOCKED_HINT}" if _is_locked(e) else ""
        raise StoreError(f"SQLite {action} failed: {e}{hint}") from e


def _select_items(cursor: sqlite3.Cursor, tree: str, prefix: bytes) -> None:
    """Start the key-ordered range scan of tree for keys starting with prefix."""
    upper = prefix_successor(prefix)
    if not prefix:
        # No lower bound: a key of another SQLite type (which sorts before every BLOB) is met and
        # refused (_blobs), not left out of a whole-tree scan unseen.
        cursor.execute("SELECT key, value FROM kv WHERE tree = ? ORDER BY key", (tree,))
    elif upper is None:
        cursor.execute("SELECT key, value FROM kv WHERE tree = ? AND key >= ? ORDER BY key", (tree, prefix))
    else:
        cursor.execute(
            "SELECT key, value FROM kv WHERE tree = ? AND key >= ? AND key < ? ORDER BY key", (tree, prefix, upper)
        )


def _journal_mode_wal(conn: sqlite3.Connection, timeout: float) -> str:
    """PRAGMA journal_mode=WAL, retried for up to `timeout` seconds: leaving a rollback journal
    needs an exclusive lock, and SQLite reports another connection's lock at once there instead
    of waiting (its busy timeout does not cover it)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return str(conn.execute("PRAGMA journal_mode=WAL").fetchone()[0])
        except sqlite3.OperationalError as e:
            if not _is_locked(e) or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


def _has_schema(conn: sqlite3.Connection) -> bool:
    names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    return {"trees", "kv"} <= names


def _list_trees(conn: sqlite3.Connection) -> list[str]:
    return sorted(row[0] for row in conn.execute("SELECT name FROM trees"))


def _get(conn: sqlite3.Connection, tree: str, key: bytes) -> bytes | None:
    row = conn.execute("SELECT value FROM kv WHERE tree = ? AND key = ?", (tree, key)).fetchone()
    return None if row is None else _blobs(tree, key, row[0])[1]


_SQL_TYPES = {type(None): "NULL", str: "TEXT", int: "INTEGER", float: "REAL", bytes: "BLOB"}


def _blobs(tree: str, key: object, value: object) -> tuple[bytes, bytes]:
    """A row of kv as (key, value); StoreError for a row another program wrote with other types
    (taking it as bytes would back up something else, or fail with a TypeError)."""
    if type(key) is bytes and type(value) is bytes:
        return key, value
    raise StoreError(
        f"tree {tree!r} holds a row datafold did not write: key of SQLite type {_SQL_TYPES.get(type(key), '?')}, "
        f"value of type {_SQL_TYPES.get(type(value), '?')} (datafold stores BLOBs only); fix or remove that row"
    )


class SqliteStore(Store):
    """A Store on one SQLite file. Open with SqliteStore.open() or DbOperations.open()."""

    backend = "sqlite"

    def __init__(self, path: str, conn: sqlite3.Connection, timeout: float) -> None:
        self.path = path
        self._conn = conn  # the write connection
        self._timeout = timeout
        self._closed = False
        self._write_lock = threading.Lock()
        self._writer: int | None = None  # thread inside a write transaction
        self._pool_lock = threading.Lock()
        self._idle: list[sqlite3.Connection] = []
        self._readers: set[sqlite3.Connection] = set()  # every read connection, to close them all
        self._known_trees: set[str] = set()  # trees known to exist (trees are never dropped)

    @property
    def files(self) -> list[str]:
        return [self.path + suffix for suffix in ("", "-wal", "-shm", "-journal")]

    @classmethod
    def open(cls, path: str, **options: Any) -> SqliteStore:
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise InvalidArgumentError(
                f"unknown sqlite option(s) {', '.join(unknown)}; accepted: {', '.join(_OPTIONS)}"
            )
        timeout = options.get("timeout", DEFAULT_TIMEOUT)
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool):
            raise ArgumentTypeError(f"sqlite option timeout must be a number, not {type(timeout).__name__}")
        if timeout < 0:
            raise InvalidArgumentError(f"sqlite option timeout must be >= 0, got {timeout}")

        path = os.fspath(path)
        if path == ":memory:":
            raise InvalidArgumentError("the sqlite backend needs a file path; ':memory:' is not supported")
        if os.path.isdir(path):
            raise StoreError(
                f"cannot open SQLite database {path!r}: it is a directory, but the sqlite backend needs a "
                "file path (the file is created if missing)"
            )
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise StoreError(
                f"cannot open SQLite database {path!r}: its parent directory does not exist; create it first"
            )

        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(path, timeout=float(timeout), isolation_level=None, check_same_thread=False)
            mode = _journal_mode_wal(conn, float(timeout))
            if str(mode).lower() != "wal":
                raise StoreError(
                    f"cannot open SQLite database {path!r}: WAL journal mode could not be enabled (got {mode!r}); "
                    "put the file on a local filesystem"
                )
            conn.execute("PRAGMA synchronous=FULL")
            # The tables are created under the write lock only where they are missing: opening a
            # database to back it up must not wait for another connection's write transaction.
            if not _has_schema(conn):
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for statement in _SCHEMA:
                        conn.execute(statement)
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
        except (sqlite3.Error, OSError) as e:
            if conn is not None:
                conn.close()
            hint = LOCKED_HINT if _is_locked(e) else "check that it is an SQLite file you may write to"
            raise StoreError(f"cannot open SQLite database {path!r}: {e}; {hint}") from e
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        return cls(path, conn, float(timeout))

    # --- plumbing ---

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"database {self.path!r} is closed")

    def _new_reader(self) -> sqlite3.Connection:
        """A new read-only connection, registered so that close() closes it."""
        conn = sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA query_only=ON")  # never write through a reader by mistake
        except BaseException:
            conn.close()
            raise
        with self._pool_lock:
            self._readers.add(conn)
        return conn

    def _drop_reader(self, conn: sqlite3.Connection) -> None:
        with self._pool_lock:
            self._readers.discard(conn)
        try:
            conn.close()
        except sqlite3.Error:
            pass

    @contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        """A read connection from the pool, returned afterwards."""
        self._check_open()
        with self._pool_lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._new_reader()
        try:
            yield conn
        finally:
            with self._pool_lock:
                if not self._closed and len(self._idle) < _MAX_IDLE_READERS:
                    self._idle.append(conn)
                    conn = None
                else:
                    self._readers.discard(conn)
            if conn is not None:
                conn.close()

    @contextmanager
    def _write_txn(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT on the write connection; ROLLBACK on any exception."""
        self._check_open()
        me = threading.get_ident()
        if self._writer == me:
            # The single write connection is inside that transaction already: nesting would corrupt it.
            raise StoreError(
                "a write transaction is already open in this thread on this database; do the work "
                "through that transaction"
            )
        with self._write_lock:
            self._check_open()
            self._writer = me
            try:
                conn = self._conn
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    _rollback(conn)
                    raise
                try:
                    conn.execute("COMMIT")
                except BaseException:
                    _rollback(conn)
                    raise
            finally:
                self._writer = None

    def _ensure_tree(self, conn: sqlite3.Connection, tree: str, created: set[str]) -> None:
        """Insert tree into trees unless known; created collects the names added by this transaction."""
        if tree in self._known_trees or tree in created:
            return
        conn.execute("INSERT OR IGNORE INTO trees (name) VALUES (?)", (tree,))
        created.add(tree)

    # --- reads ---

    def tree_names(self) -> list[str]:
        with _errors("tree_names"), self._reader() as conn:
            return _list_trees(conn)

    def get(self, tree: str, key: Buffer) -> bytes | None:
        tree = check_tree(tree)
        key = as_bytes(key, "key")
        with _errors("get"), self._reader() as conn:
            return _get(conn, tree, key)

    def count(self, tree: str) -> int:
        tree = check_tree(tree)
        with _errors("count"), self._reader() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM kv WHERE tree = ?", (tree,)).fetchone()[0])

    def items(self, tree: str, prefix: Buffer = b"") -> Items:
        tree = check_tree(tree)
        prefix = as_bytes(prefix, "prefix")
        self._check_open()
        return self._iter_items(tree, prefix)

    def _iter_items(self, tree: str, prefix: bytes) -> Items:
        # One SELECT is one read transaction: a snapshot, streamed row by row.
        with _errors("items"), self._reader() as conn:
            cursor = conn.cursor()
            try:
                _select_items(cursor, tree, prefix)
                for key, value in cursor:
                    yield _blobs(tree, key, value)
            finally:
                _close_quietly(cursor)

    # --- writes ---

    def _commit_trees(self, created: set[str]) -> None:
        self._known_trees.update(created)

    def create_tree(self, tree: str) -> None:
        tree = check_tree(tree)
        created: set[str] = set()
        with _errors("create_tree"), self._write_txn() as conn:
            self._ensure_tree(conn, tree, created)
        self._commit_trees(created)

    def put(self, tree: str, key: Buffer, value: Buffer) -> None:
        tree = check_tree(tree)
        key = as_bytes(key, "key")
        value = as_bytes(value, "value")
        created: set[str] = set()
        with _errors("put"), self._write_txn() as conn:
            self._ensure_tree(conn, tree, created)
            conn.execute("INSERT OR REPLACE INTO kv (tree, key, value) VALUES (?, ?, ?)", (tree, key, value))
        self._commit_trees(created)

    def delete(self, tree: str, key: Buffer) -> bool:
        tree = check_tree(tree)
        key = as_bytes(key, "key")
        with _errors("delete"), self._write_txn() as conn:
            return conn.execute("DELETE FROM kv WHERE tree = ? AND key = ?", (tree, key)).rowcount > 0

    def put_many(self, tree: str, items: Iterable[tuple[Buffer, Buffer]]) -> int:
        tree = check_tree(tree)
        created: set[str] = set()
        with _errors("put_many"), self._write_txn() as conn:
            self._ensure_tree(conn, tree, created)
            written = _put_pairs(conn, tree, items, overwrite=True)[0]
        self._commit_trees(created)
        return written

    @contextmanager
    def snapshot(self) -> Iterator[ReadSnapshot]:
        """BEGIN on a dedicated read connection, pinned by a first SELECT; COMMIT (ROLLBACK) at exit."""
        self._check_open()
        with _errors("begin snapshot"):
            conn = self._new_reader()
            try:
                conn.execute("BEGIN")  # deferred: the read transaction starts at the first SELECT
                # In WAL mode the first read fixes the snapshot that every later read of the transaction sees.
                conn.execute("SELECT count(*) FROM trees").fetchone()
            except BaseException:
                self._drop_reader(conn)
                raise
        snap = _SqliteSnapshot(self, conn)
        try:
            yield snap
        except BaseException:
            snap._finish(commit=False)
            raise
        snap._finish(commit=True)

    @contextmanager
    def write_transaction(self) -> Iterator[WriteTransaction]:
        with _errors("begin write transaction"):
            cm = self._write_txn()
            conn = cm.__enter__()
        txn = _SqliteWriteTransaction(self, conn)
        try:
            yield txn
        except BaseException as e:
            txn._end()
            with _errors("rollback"):
                cm.__exit__(type(e), e, e.__traceback__)
            raise
        txn._end()
        with _errors("commit"):
            cm.__exit__(None, None, None)
        self._commit_trees(txn._created)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Wait for another thread's write to finish; the writer thread itself closes directly.
        if self._writer != threading.get_ident():
            with self._write_lock:
                pass
        with self._pool_lock:
            readers = list(self._readers)
            self._readers.clear()
            self._idle.clear()
        with _errors("close"):
            for conn in readers:
                conn.close()
            self._conn.close()


def _rollback(conn: sqlite3.Connection) -> None:
    """ROLLBACK after an error; a failure here must not hide the original one."""
    try:
        conn.execute("ROLLBACK")
    except sqlite3.Error:
        pass


def _close_quietly(cursor: sqlite3.Cursor) -> None:
    """Close a cursor whose connection may already be closed (db.close() under an iterator)."""
    try:
        cursor.close()
    except sqlite3.Error:
        pass


def _put_pairs(conn: sqlite3.Connection, tree: str, items: Iterable[object], overwrite: bool) -> tuple[int, int]:
    """Insert (key, value) pairs into tree; returns (written, skipped)."""
    try:
        pairs = iter(items)
    except TypeError:
        raise ArgumentTypeError(
            f"items must be an iterable of (key, value) pairs, not {type(items).__name__}"
        ) from None
    sql = (
        "INSERT OR REPLACE INTO kv (tree, key, value) VALUES (?, ?, ?)"
        if overwrite
        else "INSERT OR IGNORE INTO kv (tree, key, value) VALUES (?, ?, ?)"
    )
    written = skipped = 0
    if overwrite:
        # Every pair is written: executemany streams them through one prepared statement.
        def rows() -> Iterator[tuple[str, bytes, bytes]]:
            nonlocal written
            for pair in pairs:
                key, value = check_item(pair)
                written += 1
                yield tree, key, value

        conn.executemany(sql, rows())
        return written, 0
    cursor = conn.cursor()
    try:
        for pair in pairs:
            key, value = check_item(pair)
            cursor.execute(sql, (tree, key, value))
            if cursor.rowcount > 0:
                written += 1
            else:
                skipped += 1
    finally:
        cursor.close()
    return written, skipped


class _SqliteWriteTransaction(WriteTransaction):
    def __init__(self, store: SqliteStore, conn: sqlite3.Connection) -> None:
        self._store = store
        self._conn = conn
        self._active = True
        self._created: set[str] = set()
        self._cursors: list[sqlite3.Cursor] = []  # open items() cursors, closed before COMMIT/ROLLBACK

    def _check(self) -> sqlite3.Connection:
        if not self._active:
            raise StoreError("the write transaction is over (committed or rolled back)")
        self._store._check_open()
        return self._conn

    def _end(self) -> None:
        self._active = False
        for cursor in self._cursors:
            _close_quietly(cursor)
        self._cursors.clear()

    def create_tree(self, tree: str) -> None:
        tree = check_tree(tree)
        with _errors("create_tree"):
            self._store._ensure_tree(self._check(), tree, self._created)

    def get(self, tree: str, key: Buffer) -> bytes | None:
        tree = check_tree(tree)
        key = as_bytes(key, "key")
        with _errors("get"):
            return _get(self._check(), tree, key)

    def put(self, tree: str, key: Buffer, value: Buffer, overwrite: bool = True) -> bool:
        tree = check_tree(tree)
        key = as_bytes(key, "key")
        value = as_bytes(value, "value")
        check_bool(overwrite, "overwrite")
        with _errors("put"):
            conn = self._check()
            self._store._ensure_tree(conn, tree, self._created)
            return _put_pairs(conn, tree, [(key, value)], overwrite)[0] == 1

    def put_many(self, tree: str, items: Iterable[tuple[Buffer, Buffer]], overwrite: bool = True) -> tuple[int, int]:
        tree = check_tree(tree)
        check_bool(overwrite, "overwrite")
        with _errors("put_many"):
            conn = self._check()
            self._store._ensure_tree(conn, tree, self._created)
            return _put_pairs(conn, tree, items, overwrite)

    def delete(self, tree: str, key: Buffer) -> bool:
        tree = check_tree(tree)
        key = as_bytes(key, "key")
        with _errors("delete"):
            return self._check().execute("DELETE FROM kv WHERE tree = ? AND key = ?", (tree, key)).rowcount > 0

    def items(self, tree: str, prefix: Buffer = b"") -> Items:
        tree = check_tree(tree)
        prefix = as_bytes(prefix, "prefix")
        self._check()
        return self._iter_items(tree, prefix)

    def _iter_items(self, tree: str, prefix: bytes) -> Items:
        with _errors("items"):
            cursor = self._check().cursor()
            self._cursors.append(cursor)
            try:
                _select_items(cursor, tree, prefix)
                for key, value in cursor:
                    yield _blobs(tree, key, value)
                    self._check()  # the transaction may have ended while the caller held the item
            finally:
                _close_quietly(cursor)
                if cursor in self._cursors:
                    self._cursors.remove(cursor)

    def tree_names(self) -> list[str]:
        with _errors("tree_names"):
            return _list_trees(self._check())


class _SqliteSnapshot(ReadSnapshot):
    """A read transaction on a connection of its own (closed at the end)."""

    def __init__(self, store: SqliteStore, conn: sqlite3.Connection) -> None:
        self._store = store
        self._conn = conn
        self._active = True
        # One statement at a time (cursors may still be interleaved); reentrant because a collected
        # items() generator closes its cursor under it.
        self._lock = threading.RLock()
        self._cursors: list[sqlite3.Cursor] = []  # open items() cursors, closed at the end

    def _check(self) -> sqlite3.Connection:
        """The connection, or StoreError once the snapshot is over; call with _lock held."""
        if not self._active:
            raise StoreError("the snapshot is over (its with block has exited)")
        self._store._check_open()
        return self._conn

    def _finish(self, commit: bool) -> None:
        with self._lock:
            if not self._active:
                return
            self._active = False
            for cursor in self._cursors:
                _close_quietly(cursor)
            self._cursors.clear()
            conn = self._conn
            try:
                if self._store.closed:
                    return  # close() closed the connection already
                if commit:
                    with _errors("end snapshot"):
                        conn.execute("COMMIT")
                else:
                    _rollback(conn)
            finally:
                self._store._drop_reader(conn)

    def tree_names(self) -> list[str]:
        with self._lock, _errors("tree_names"):
            return _list_trees(self._check())

    def get(self, tree: str, key: Buffer) -> bytes | None:
        tree = check_tree(tree)
        key = as_bytes(key, "key")
        with self._lock, _errors("get"):
            return _get(self._check(), tree, key)

    def count(self, tree: str) -> int:
        tree = check_tree(tree)
        with self._lock, _errors("count"):
            return int(self._check().execute("SELECT COUNT(*) FROM kv WHERE tree = ?", (tree,)).fetchone()[0])

    @property
    def _ended(self) -> bool:
        return not self._active

    def _check_live(self) -> None:
        with self._lock:
            self._check()

    def batches(self, tree: str, prefix: Buffer = b"") -> Iterator[list[tuple[bytes, bytes]]]:
        tree = check_tree(tree)
        prefix = as_bytes(prefix, "prefix")
        cursor: sqlite3.Cursor | None = None
        try:
            while True:
                with self._lock, _errors("items"):
                    conn = self._check()  # checked at every batch: the snapshot may have ended meanwhile
                    if cursor is None:
                        cursor = conn.cursor()
                        self._cursors.append(cursor)
                        _select_items(cursor, tree, prefix)
                    # A batch of rows per lock round trip (per row it costs several times more).
                    rows, more = take_batch(_blobs(tree, k, v) for k, v in iter(cursor.fetchone, None))
                if rows:
                    yield rows
                if not more:
                    return
        finally:
            if cursor is not None:
                with self._lock:
                    _close_quietly(cursor)
                    if cursor in self._cursors:
                        self._cursors.remove(cursor)
