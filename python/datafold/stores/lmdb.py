"""LMDB backend: the database is an LMDB environment directory; each tree is a named database.

The memory map grows on demand. put(), put_many(), delete() and create_tree() run in their own
write transaction: on MDB_MAP_FULL they abort, grow the map (at least doubling it) and replay the
whole operation. write_transaction() is driven record by record by the caller and cannot be
replayed, and LMDB cannot grow the map while a write transaction is open, so a full map there
raises StoreError("database map is full ...") and the transaction rolls back; call
DbOperations.reserve(nbytes) first to make room.

Growing the map needs every transaction of this process on the environment to be finished, including
open items() iterators and snapshots: a grow waits (up to resize_timeout seconds) for other threads
and fails at once with StoreError if the calling thread itself holds one (it would otherwise wait
for itself). So while a snapshot() is open, a put() in the same thread that needs a bigger map
raises StoreError; call reserve() before taking the snapshot. A grow the system refuses (the map
cannot be mapped: ENOMEM) raises StoreError and leaves the map at its old size, the store usable.

snapshot() holds one read transaction for its whole life. LMDB forbids a transaction to open a
database handle (dbi) while another transaction that opened one is still running, so the snapshot
never opens one itself: the handles of every tree it can see are opened beforehand by a short, empty
write transaction (only a write transaction's commit keeps the handles it opened: a read transaction
closes them when it ends). Hence, with lmdb, snapshot() raises StoreError when the calling thread has
a write transaction open, and the first snapshot that sees a tree may wait for a running writer (of
any thread or process) to finish.

LMDB must not open the same environment twice in one process, so stores opened on the same
directory share one lmdb.Environment (reference counted).

Appends: a write transaction's put_many() hands each batch to LMDB's putmulti, with MDB_APPEND when
the batch's keys ascend (byte order, LMDB's default) and the first comes after the tree's last key,
as a restore of a backup's sorted trees into an empty or older-keyed tree does. LMDB then fills each
page to the end instead of splitting it in half. Any other batch is an ordinary putmulti.

Direct reads (option direct_reads, default True, with the Rust core): a snapshot's batches() read
the records from data.mdb's pages in Rust (datafold._core.LmdbDataFile, src/lmdb_file.rs) and hand
them on as RecordBatch objects, which the Rust writer and digests take whole. This is not a second
environment (the file is mapped read-only, LMDB locks only lock.mdb); the snapshot's read
transaction is open the whole time and each tree is walked from its root as that transaction sees it
(the tree's record in the main database), and LMDB never rewrites a page a live reader can see. The
file must be the one the environment opened (same inode) and in LMDB 0.9's format, else batches()
reads through py-lmdb as with direct_reads=False. A thread walks the pages up to two batches ahead
of the consumer (the walk runs in Rust without the GIL, so it overlaps what the consumer does: an
incremental backup's diff against its parent, for one); the snapshot stops and joins its walks
before its read transaction ends, so no walk reads a page LMDB may reuse.

Native restores (option native_restore, default True, with the Rust core): the backup manager writes
a restore through native_writer(), a core.LmdbWriter (src/lmdb_write.rs) that the Rust reader fills
directly (BackupReader.write_items). The core links its own LMDB (mdb.master from lmdb-master-sys,
data format 1, as py-lmdb's LMDB 0.9); two LMDB builds must not have one environment open in one
process (LMDB's locks are per process), so _SharedEnv.hand_over, when no transaction of this process
is open, closes the py-lmdb environment, lets the core open it for the one write transaction, and
opens it with py-lmdb again afterwards. Transactions other threads start meanwhile wait for it; the
handing thread's get StoreError. If a transaction of this process is open when the restore starts
(another thread's snapshot, say), the restore goes through py-lmdb beside it instead. The two
builds' lock-file formats differ (LMDB's MDB_LOCK_FORMAT), so the core's LMDB refuses an environment
another process has open (the restore then goes through py-lmdb too), and a process opening it
during a native restore gets LMDB's version-mismatch error instead of sharing a lock table it does
not understand. The core's writers of two processes wait for each other (a flock of lock.mdb).

Staged restores: one LMDB write transaction keeps every page it dirties in malloc'd memory until the
commit (without writemap), so a native restore into a database that already holds trees grows the
process by about what it writes. Into a database with no tree (new or emptied), when no other
process has it open and writemap is off, the core's writer instead builds the restored database as
a new file, STAGING_FILE in the directory (an LMDB environment of its own, no lock file, no syncs),
committing every 16 MiB so memory stays flat (each commit followed by an fdatasync of the file in
a thread, unless the previous one still runs, so the disk works meanwhile), then fsyncs it (the
restore's read-back check reads the file meanwhile: LmdbWriter.seal / tree_digests), gives it
data.mdb's permissions, owner and extended attributes (ACLs, security labels; copied when
the file is created), renames it over data.mdb and fsyncs the directory: the
database still changes all at once or not at all.
Meanwhile the writer holds the target's write transaction; no other process can open the old file
in between (see src/lmdb_write.rs), and after the writer closes, the next opener rebuilds LMDB's
lock table from the new file. A kill midway leaves the old data.mdb and the staging
file, which the next open of the store (or staged restore) removes. Records of more than half a page
on average (native_writer's mean_record_bytes) are staged through the new file's map
(MDB_WRITEMAP): LMDB would otherwise malloc their overflow pages anew in every transaction and copy
them to the file; the core allocates the file ahead of LMDB's pages (a full disk is a StoreError,
not a SIGBUS) and cuts it to the pages in use at the end. Not staged: a database with a
tree, writemap=True, or a data.mdb that is a symlink, has other hard links, belongs to another
user (unless root), or has an extended attribute the new file cannot take.

writemap (opt-in, off by default): LMDB's MDB_WRITEMAP. Without it LMDB keeps every page a write
transaction dirties in malloc'd memory until the commit, so one big transaction (a restore is one)
grows the process's anonymous memory by about the size of what it writes; with it the pages are
written straight into the shared file mapping (page cache the kernel can write back and evict), and
anonymous memory stays flat. The catch: LMDB then ftruncate()s the data file to the map size, a
sparse file, and writing a page into a hole when the disk is full is a SIGBUS that kills the
process. So with writemap=True the store preallocates the whole map (posix_fallocate of data.mdb up
to the map size) when it opens the environment and after every growth of the map: the data file
occupies the full map size on disk (the map at least doubles when it grows, so up to about twice the
data), and a disk too full for that raises StoreError instead of crashing later: at open the
environment is closed again; after a failed growth the map is set back to its old size (LMDB
truncates the file back) and the store stays usable. A rolled-back transaction may leave the bytes
it wrote in free pages of the file until they are reused. LMDB's own caveats apply: no nested
transactions (datafold does not use them), and every process that opens the same database must use
the same writemap setting; in this process a second open of the same directory with a different
writemap value raises StoreError.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, TypeVar

import lmdb

from ..core import core
from ..errors import ArgumentTypeError, InvalidArgumentError, StoreError
from . import (
    SNAPSHOT_BATCH_BYTES,
    Buffer,
    Items,
    ReadSnapshot,
    Store,
    WriteTransaction,
    as_bytes,
    check_bool,
    check_item,
    check_nbytes,
    check_tree,
    take_batch,
)

__all__ = ["LmdbStore", "DEFAULT_MAP_SIZE", "DEFAULT_MAX_DBS"]

T = TypeVar("T")

MiB = 1 << 20
DEFAULT_MAP_SIZE = 64 * MiB
DEFAULT_MAX_DBS = 4096
DEFAULT_MAX_READERS = 126
DEFAULT_RESIZE_TIMEOUT = 30.0
# The file a native restore into an empty database builds (src/lmdb_write.rs, STAGING_FILE).
STAGING_FILE = "data.mdb.datafold-restore"
# Room asked for per byte of keys+values: pages may be half full after splits and every record
# carries a node header and a slot pointer, so 1 byte of data can take ~2-3 bytes of map (measured:
# 2.8x for random 8-byte keys with 4-byte values, 1.4x for 3000-byte values), and many tiny records
# cost more: about 20 bytes of map each for 4-byte keys, which _RECORD_OVERHEAD covers.
_OVERHEAD_FACTOR = 3
_RECORD_OVERHEAD = 16
_SLACK = 8 * MiB  # branch pages, freelist, copy-on-write of touched pages
_GRANULE = MiB  # map sizes are rounded up to this (a multiple of any OS page size)
# LMDB takes the map size as a size_t (whole granules below 2^64); py-lmdb takes max_dbs and
# max_readers as C ints. Larger values are refused before they reach lmdb (no OverflowError).
_MAX_MAP_SIZE = (1 << 64) - _GRANULE
_MAX_C_INT = (1 << 31) - 1
_MAX_GROW_ATTEMPTS = 40  # doubling each time: far beyond any address space
_MAX_SNAPSHOT_ATTEMPTS = 20  # retries while new trees keep appearing as a snapshot starts

_OPTIONS = ("map_size", "max_dbs", "max_readers", "resize_timeout", "writemap", "direct_reads", "native_restore")
_NO_SPACE = frozenset({errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)})
# LMDB 0.9's data file format: the one the Rust core's direct reads understand.
_DIRECT_READ_VERSION = 1
# Records per batch of a direct scan: a RecordBatch costs no Python object per record, so only
# SNAPSHOT_BATCH_BYTES bounds it; fewer batches mean fewer hand-overs between the walk thread and
# the consumer (half as many on ~120-byte records as at SNAPSHOT_BATCH, ~5% of a backup).
_DIRECT_BATCH = 1 << 16

_MAP_FULL_IN_TXN = (
    "database map is full: LMDB cannot grow the map while a write transaction is open, so this "
    "transaction is rolled back; call reserve(nbytes) with the size of the data before write_transaction()"
)


def _round_up(n: int, granule: int) -> int:
    return -(-n // granule) * granule


def _int_option(options: dict[str, Any], name: str, default: int, minimum: int, maximum: int) -> int:
    value = options.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ArgumentTypeError(f"lmdb option {name} must be an int, not {type(value).__name__}")
    if not minimum <= value <= maximum:
        raise InvalidArgumentError(f"lmdb option {name} must be between {minimum} and {maximum}, got {value}")
    return value


def _preallocate(path: str, map_size: int) -> None:
    """Allocate every byte of <path>/data.mdb up to map_size on disk, for writemap: LMDB has
    ftruncate()d the file to the map size, and a page written into a hole on a full disk would be a
    SIGBUS. Raises StoreError saying what to do when the file system cannot (full, no fallocate)."""
    what = f"preallocate the {map_size}-byte LMDB map for writemap=True"
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is None:
        raise StoreError(f"cannot {what}: this platform has no posix_fallocate; open the database without writemap")
    data = os.path.join(os.fsencode(path), b"data.mdb")
    try:
        fd = os.open(data, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        try:
            # Refuse before allocating anything when the space is clearly missing: a failed
            # fallocate may keep the blocks it got, leaving the disk full.
            st, fs = os.fstat(fd), os.fstatvfs(fd)
            missing = map_size - st.st_blocks * 512
            if missing > fs.f_bavail * fs.f_frsize:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            fallocate(fd, 0, map_size)
        finally:
            os.close(fd)
    except OSError as e:
        if e.errno in _NO_SPACE:
            raise StoreError(
                f"not enough disk space to {what} ({e.strerror}); free space, use a smaller map_size, "
                "or open without writemap"
            ) from e
        raise StoreError(
            f"cannot {what}: {e.strerror or e}; the file system may not support preallocation: open without writemap"
        ) from e


def _open_env(path: str, map_size: int, max_dbs: int, max_readers: int, writemap: bool) -> lmdb.Environment:
    try:
        # sync/metasync stay on (the defaults): a commit is durable when it returns.
        env = lmdb.open(
            os.fsencode(path),  # bytes: a file name need not be valid UTF-8
            map_size=map_size,
            max_dbs=max_dbs,
            max_readers=max_readers,
            subdir=True,
            create=False,  # the directory was made by LmdbStore.open
            # writemap is opt-in (see the module doc): it keeps a big transaction's dirty pages out
            # of anonymous memory, but makes the data file as large as the map, which must then be
            # preallocated (a write into a hole on a full disk is a SIGBUS).
            writemap=writemap,
        )
    except lmdb.VersionMismatchError as e:
        raise StoreError(
            f"cannot open LMDB database {path!r}: {e}; another process has it open with a different LMDB "
            "build (a datafold native restore, while it runs: see native_restore), or it was made by an "
            "incompatible LMDB version; retry once that process is done"
        ) from e
    except (lmdb.Error, OSError) as e:
        raise StoreError(
            f"cannot open LMDB database {path!r}: {e}; check that it is an LMDB environment directory you may write to"
        ) from e
    if writemap:
        try:
            _preallocate(path, env.info()["map_size"])
        except BaseException:
            env.close()
            raise
    return env


def _remove_stale_staging(path: str) -> None:
    """Remove the staging file a native restore killed midway left (see native_restore). Safe once
    the environment is open here: a staged restore needs the environment to itself, so none runs now
    and none starts while it stays open."""
    # Missing is the usual case; any other failure is left to the next staged restore.
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(path, STAGING_FILE))


def _identity(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of a file, or None if it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _translate(e: lmdb.Error, action: str) -> StoreError:
    """A StoreError with a useful message for an lmdb error (the caller chains it)."""
    if isinstance(e, lmdb.DbsFullError):
        # LMDB's own words, without py-lmdb's suffix: the same message as the core's writer
        # (src/lmdb_write.rs, Writer::fail).
        return StoreError(
            f"LMDB {action} failed: too many trees; reopen with a larger max_dbs option "
            "(mdb_dbi_open: MDB_DBS_FULL: Environment maxdbs limit reached)"
        )
    if isinstance(e, lmdb.ReadersFullError):
        return StoreError(
            f"LMDB {action} failed: too many concurrent readers (open items() iterators?); close some "
            f"or reopen with a larger max_readers option ({e})"
        )
    if isinstance(e, lmdb.MapFullError):
        return StoreError(f"LMDB {action} failed: database map is full ({e})")
    return StoreError(f"LMDB {action} failed: {e}")


@contextmanager
def _errors(action: str) -> Iterator[None]:
    try:
        yield
    except lmdb.Error as e:
        raise _translate(e, action) from e


# Records per LMDB putmulti call in WriteTransaction.put_many.
PUT_BATCH = 4096


class _Handle:
    """An lmdb transaction plus what the shared environment needs to account for it."""

    __slots__ = ("txn", "write", "thread", "done", "published")

    def __init__(self, txn: lmdb.Transaction[bytes], write: bool, thread: int, published: Mapping[bytes, Any]) -> None:
        self.txn = txn
        self.write = write
        self.thread = thread
        self.done = False
        # The tree handles published before the transaction began: valid in it (see begin_snapshot).
        self.published = published


class _SharedEnv:
    """One lmdb.Environment and the bookkeeping that makes growing its map safe.

    LMDB's mdb_env_set_mapsize() remaps the file, so no transaction of this process may be open
    meanwhile: every transaction is counted per thread, and a grow waits for the count to drop to 0
    while holding back new transactions.
    """

    def __init__(
        self,
        env: lmdb.Environment,
        key: str,
        resize_timeout: float,
        path: str,
        limits: tuple[int, int],
        writemap: bool,
    ) -> None:
        self.env = env
        self.key = key
        self.path, self.limits = path, limits  # (max_dbs, max_readers): to reopen it (_reopen)
        self.writemap = writemap
        self.refs = 1
        self.resize_timeout = resize_timeout
        self.page_size: int = env.stat()["psize"]
        self.max_key_size: int = env.max_key_size()
        self.data_file = os.path.join(path, "data.mdb")
        self.data_identity = _identity(self.data_file)
        self.cond = threading.Condition()
        self.threads: dict[int, int] = {}  # thread id -> open transactions
        self.active = 0
        self.growth_pending = 0
        self.writer: int | None = None  # thread holding the write transaction
        self.native: int | None = None  # thread the environment is handed over to (hand_over)
        # mdb_dbi_open is not thread-safe in read transactions; serialize all of them.
        self.dbi_lock = threading.Lock()
        # Handles opened by a committed transaction: valid in every transaction started later.
        # Replaced, never changed in place, so a transaction keeps the mapping of its start.
        self.published: Mapping[bytes, Any] = {}

    # --- transactions ---

    def _enter(self, me: int) -> None:
        with self.cond:
            self._check_not_handed_to(me)
            # Let a pending grow go first, unless this thread already holds a transaction (the grow
            # is waiting for it, so blocking here would only delay the grow's timeout). While the
            # environment is handed over (a native restore), wait for it to come back.
            while (self.growth_pending and not self.threads.get(me)) or self.native is not None:
                self.cond.wait()
            self.threads[me] = self.threads.get(me, 0) + 1
            self.active += 1

    def _leave(self, me: int) -> None:
        with self.cond:
            left = self.threads[me] - 1
            if left:
                self.threads[me] = left
            else:
                del self.threads[me]
            self.active -= 1
            self.cond.notify_all()

    def begin(self, write: bool) -> _Handle:
        me = threading.get_ident()
        if write and self.writer == me:
            # LMDB's writer lock is not reentrant: a second write transaction would deadlock.
            raise StoreError(
                "a write transaction is already open in this thread on this database; do the work "
                "through that transaction (LMDB allows one writer at a time)"
            )
        for _ in range(3):
            self._enter(me)
            published = self.published  # before the transaction: only handles committed before it
            try:
                txn = self.env.begin(write=write)
            except lmdb.MapResizedError:
                # Another process grew the map beyond ours: adopt its size and try again.
                self._leave(me)
                self.resize(0, "adopt the map size another process set")
                continue
            except BaseException:
                self._leave(me)
                raise
            if write:
                self.writer = me
            return _Handle(txn, write, me, published)
        raise StoreError("LMDB transaction could not start: the map keeps being resized by another process")

    def end(self, handle: _Handle, commit: bool) -> None:
        """Commit or abort; read transactions are always committed (that keeps their db handles)."""
        if handle.done:
            return
        handle.done = True
        try:
            if handle.write:
                # Clear before the commit releases LMDB's writer lock, so the next writer's mark stays.
                self.writer = None
                if commit:
                    handle.txn.commit()
                else:
                    handle.txn.abort()
            else:
                try:
                    handle.txn.commit()
                except lmdb.Error:
                    pass  # the environment was closed under an iterator: nothing left to release
        finally:
            self._leave(handle.thread)

    def open_db(self, txn: lmdb.Transaction[bytes], name: bytes, create: bool) -> Any:
        """The named database in txn, or None when create=False and it does not exist."""
        if len(name) > self.max_key_size:
            if not create:
                return None  # could never have been created
            raise StoreError(f"tree name is {len(name)} bytes in UTF-8; LMDB allows at most {self.max_key_size} bytes")
        with self.dbi_lock:
            try:
                return self.env.open_db(name, txn=txn, create=create)
            except lmdb.NotFoundError:
                if create:
                    raise
                return None

    def begin_snapshot(self) -> tuple[_Handle, dict[str, Any]]:
        """A read transaction plus a handle for each tree it sees, none opened inside it.

        A handle opened by a transaction is only safe for other transactions once that transaction
        has finished, and only valid in transactions started after that; so the handles are opened
        by a short transaction first (publish) and the snapshot's own transaction starts after it.
        """
        if self.writer == threading.get_ident():
            raise StoreError(
                "cannot start a snapshot while this thread has a write transaction open on the database "
                "(LMDB would need a second writer to register the tree handles); take it before or after"
            )
        for _ in range(_MAX_SNAPSHOT_ATTEMPTS):
            handle = self.begin(write=False)
            try:
                names = _list_trees(handle.txn)
                dbs = {name: handle.published.get(name.encode()) for name in names}
            except BaseException:
                self.end(handle, commit=True)
                raise
            missing = [name.encode() for name, db in dbs.items() if db is None]
            if not missing:
                return handle, dbs
            self.end(handle, commit=True)
            self.publish(missing)
        raise StoreError("LMDB snapshot could not start: new trees kept being created meanwhile")

    def publish(self, names: list[bytes]) -> None:
        """Open the handles of existing trees in an empty write transaction and commit it.

        The commit makes them valid in every transaction started afterwards; a read transaction
        would not do: py-lmdb ends it with mdb_txn_reset, which closes the handles it opened.
        """
        handle = self.begin(write=True)
        opened: dict[bytes, Any] = {}
        try:
            for name in names:
                db = self.open_db(handle.txn, name, create=False)
                if db is not None:
                    opened[name] = db
        except BaseException:
            self.end(handle, commit=False)
            raise
        self.end(handle, commit=True)  # writes nothing: no page is written or synced
        with self.dbi_lock:
            self.published = {**self.published, **opened}

    @contextmanager
    def reading(self, name: bytes) -> Iterator[tuple[lmdb.Transaction[bytes], Any]]:
        """A read transaction and the handle of tree `name` in it (None: no such tree).

        As for a snapshot, the handle is published before the transaction begins and no read
        transaction opens one: LMDB forbids mdb_dbi_open while other transactions of the process
        run, and a native restore (hand_over) reopens the environment with no handle open. The
        thread holding the write transaction, which cannot publish, opens it in place.
        """
        handle = self._begin_reading(name)
        try:
            yield handle.txn, handle.published.get(name)
        finally:
            self.end(handle, commit=True)

    def _begin_reading(self, name: bytes) -> _Handle:
        for _ in range(_MAX_SNAPSHOT_ATTEMPTS):
            handle = self.begin(write=False)
            try:
                if name in handle.published or len(name) > self.max_key_size or not _has_tree(handle.txn, name):
                    return handle
                if self.writer == handle.thread:
                    db = self.open_db(handle.txn, name, create=False)
                    handle.published = {**handle.published, name: db}
                    return handle
            except BaseException:
                self.end(handle, commit=True)
                raise
            self.end(handle, commit=True)
            self.publish([name])
        raise StoreError("LMDB read could not start: the tree kept being dropped and created meanwhile")

    # --- map size ---

    def resize(self, new_size: int, what: str) -> None:
        """set_mapsize(new_size) once no transaction of this process is open (0 adopts the file's size)."""
        me = threading.get_ident()
        with self.cond:
            if self.threads.get(me):
                raise StoreError(
                    f"cannot {what}: this thread has an open transaction, items() iterator or snapshot on "
                    "the database; finish or close it first (or call reserve() before starting)"
                )
            self._check_not_handed_to(me)
            self.growth_pending += 1
            try:
                deadline = time.monotonic() + self.resize_timeout
                while self.active or self.native is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise StoreError(
                            f"cannot {what}: other threads kept transactions, items() iterators or "
                            f"snapshots open for {self.resize_timeout} s"
                        )
                    self.cond.wait(remaining)
                old_size = self.env.info()["map_size"]
                if new_size == 0 or new_size > old_size:
                    try:
                        self.env.set_mapsize(new_size)
                    except lmdb.Error as e:
                        self._reopen(old_size, what, e)
                    if self.writemap:
                        self._preallocate_grown(old_size, new_size, what)
            finally:
                self.growth_pending -= 1
                self.cond.notify_all()

    def _preallocate_grown(self, old_size: int, new_size: int, what: str) -> None:
        """writemap: allocate the grown map on disk, or set the map back to old_size (LMDB truncates
        the file back, freeing what was allocated) and raise StoreError; the store stays usable."""
        try:
            _preallocate(self.path, self.env.info()["map_size"])
        except StoreError as e:
            if new_size == 0:
                # Adopting the size another process committed: the file is that size for it, so
                # shrinking it back would cut pages under that process's map.
                raise StoreError(f"cannot {what}: {e}") from e
            try:
                self.env.set_mapsize(old_size)
            except lmdb.Error as back:
                self._reopen(old_size, what, back)
            raise StoreError(f"cannot {what}: {e}; the map stays at {old_size} bytes") from e

    def _reopen(self, map_size: int, what: str, error: BaseException) -> None:
        """After a failed set_mapsize (mmap refused: ENOMEM...) LMDB has unmapped the file and py-lmdb
        refuses every call: close the environment and open it again at the old size, then raise
        StoreError. Runs under the condition with no transaction of this process open, so nothing
        holds the old environment or a handle (dbi) opened in it."""
        self._close()
        try:
            self._open_again(map_size)
        except StoreError as reopen:
            raise StoreError(
                f"cannot {what}: {error}; reopening the database after that failed too ({reopen}); close and reopen it"
            ) from error
        raise StoreError(f"cannot {what}: {error}; the map stays at {map_size} bytes") from error

    def _close(self) -> None:
        """Close the environment (no transaction of this process open) and forget its handles."""
        try:
            self.env.close()
        except lmdb.Error:
            pass  # closed already: only a reopen matters
        with self.dbi_lock:
            self.published = {}  # handles of the closed environment

    def _open_again(self, map_size: int) -> None:
        self.env = _open_env(self.path, map_size, *self.limits, self.writemap)
        self.data_identity = _identity(self.data_file)

    # --- native restore ---

    def _check_not_handed_to(self, me: int) -> None:
        if self.native == me:
            raise StoreError(
                "this thread has handed the database to a native restore; it is usable again once the restore ends"
            )

    def _take_over(self) -> bool:
        """Hold new transactions of this process back, if none is open now (a restore never waits for
        another thread's reader: it writes through py-lmdb beside it instead)."""
        with self.cond:
            if self.active or self.native is not None or self.growth_pending:
                return False
            self.native = threading.get_ident()
            return True

    @contextmanager
    def hand_over(self, *, stage_writemap: bool = False) -> Iterator[Any | None]:
        """Close the py-lmdb environment and open it with the Rust core's LMDB (core.LmdbWriter: one
        write transaction) for the with block, then open it with py-lmdb again.

        Two LMDB builds must not have the environment open in one process at once (their locks are
        per process), so no transaction of this process may be open meanwhile: transactions other
        threads start wait, as they wait for a grow of the map. Yields None, with nothing closed,
        when a transaction (items() iterator, snapshot) of this process is open at that moment or a
        grow is pending, or when the core's LMDB cannot open the environment (another process has
        it open: the two LMDB versions' lock files differ, and LMDB refuses to share them); the
        caller then writes through py-lmdb.
        """
        if not self._take_over():
            yield None
            return
        try:
            map_size = self.env.info()["map_size"]
            self._close()
            try:
                try:
                    writer = core.LmdbWriter(
                        os.fsencode(self.path),
                        map_size=map_size,
                        max_dbs=self.limits[0],
                        max_readers=self.limits[1],
                        writemap=self.writemap,
                        stage_writemap=stage_writemap,
                    )
                except StoreError:
                    writer = None
                try:
                    yield writer
                finally:
                    if writer is not None:
                        writer.close()  # aborts unless committed; closes the environment
            finally:
                self._open_after_hand_over(map_size, writer)
        finally:
            with self.cond:
                self.native = None
                self.cond.notify_all()

    def _open_after_hand_over(self, map_size: int, writer: Any) -> None:
        """Open the py-lmdb environment again. Another process's native restore (the core's LMDB)
        may have opened the environment meanwhile: py-lmdb's LMDB refuses it until that one is
        done, so that is retried for up to resize_timeout."""
        deadline = time.monotonic() + self.resize_timeout
        while True:
            try:
                self._open_again(map_size)
                return
            except StoreError as e:
                if isinstance(e.__cause__, lmdb.VersionMismatchError) and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                done = "committed" if writer is not None and writer.committed else "rolled back"
                raise StoreError(
                    f"the native restore was {done}, but the database could not be opened again "
                    f"afterwards ({e}); close and reopen it"
                ) from e

    def usage(self) -> tuple[int, int]:
        """(map size, bytes used by the last committed transaction); waits while the environment is
        handed over (hand_over: there is no py-lmdb environment meanwhile)."""
        with self.cond:
            self._check_not_handed_to(threading.get_ident())
            while self.native is not None:
                self.cond.wait()
            info = self.env.info()
        return info["map_size"], (info["last_pgno"] + 1) * self.page_size

    def grow(self, nbytes: int, records: int, double: bool, action: str) -> None:
        """Grow the map so nbytes more of keys+values in `records` records fit; with double=True
        at least double it (repeated retries then need only a few steps)."""
        current, used = self.usage()
        target = used + _OVERHEAD_FACTOR * (nbytes + _RECORD_OVERHEAD * records) + _SLACK
        if double:
            target = max(target, 2 * current)
        what = f"grow the database map to {target} bytes for {action}"
        if target > _MAX_MAP_SIZE:
            raise StoreError(f"cannot {what}: LMDB maps at most {_MAX_MAP_SIZE} bytes")
        if target > current:
            self.resize(_round_up(target, _GRANULE), what)


_registry: dict[str, _SharedEnv] = {}
_registry_lock = threading.Lock()


class LmdbStore(Store):
    """A Store on an LMDB environment directory. Open with LmdbStore.open() or DbOperations.open()."""

    backend = "lmdb"

    def __init__(self, path: str, shared: _SharedEnv, direct_reads: bool = True, native_restore: bool = True) -> None:
        self.path = path
        self._shared = shared
        self._closed = False
        # Snapshots read records from the data file's pages in the Rust core (module doc).
        self._direct_reads = direct_reads and hasattr(core, "LmdbDataFile")
        # Restores write through the Rust core's LMDB (module doc).
        self._native_restore = native_restore and hasattr(core, "LmdbWriter")

    @property
    def files(self) -> list[str]:
        return [os.path.join(self.path, name) for name in ("data.mdb", "lock.mdb", STAGING_FILE)]

    @classmethod
    def open(cls, path: str, **options: Any) -> LmdbStore:
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise InvalidArgumentError(f"unknown lmdb option(s) {', '.join(unknown)}; accepted: {', '.join(_OPTIONS)}")
        map_size = _int_option(options, "map_size", DEFAULT_MAP_SIZE, 4096, _MAX_MAP_SIZE)
        max_dbs = _int_option(options, "max_dbs", DEFAULT_MAX_DBS, 1, _MAX_C_INT)
        max_readers = _int_option(options, "max_readers", DEFAULT_MAX_READERS, 1, _MAX_C_INT)
        direct_reads = check_bool(options.get("direct_reads", True), "lmdb option direct_reads")
        native_restore = check_bool(options.get("native_restore", True), "lmdb option native_restore")
        resize_timeout = options.get("resize_timeout", DEFAULT_RESIZE_TIMEOUT)
        if not isinstance(resize_timeout, (int, float)) or isinstance(resize_timeout, bool):
            raise ArgumentTypeError(f"lmdb option resize_timeout must be a number, not {type(resize_timeout).__name__}")
        # Not NaN or infinite, and short enough for Condition.wait (threading.TIMEOUT_MAX).
        if not 0 <= resize_timeout <= threading.TIMEOUT_MAX:
            raise InvalidArgumentError(
                f"lmdb option resize_timeout must be a number of seconds between 0 and "
                f"{threading.TIMEOUT_MAX:.0f}, got {resize_timeout}"
            )
        writemap = check_bool(options.get("writemap", False), "lmdb option writemap")

        path = os.fspath(path)
        if os.path.exists(path) and not os.path.isdir(path):
            raise StoreError(
                f"cannot open LMDB database {path!r}: it is a file, but the lmdb backend needs a "
                "directory; pass a directory path (it is created if missing)"
            )
        try:
            os.mkdir(path)
        except FileExistsError:
            pass
        except FileNotFoundError as e:
            raise StoreError(
                f"cannot open LMDB database {path!r}: its parent directory does not exist; create it first"
            ) from e
        except OSError as e:
            raise StoreError(f"cannot create the LMDB directory {path!r}: {e.strerror}; check the path") from e

        key = os.path.realpath(path)
        with _registry_lock:
            shared = _registry.get(key)
            if shared is not None:
                if shared.writemap != writemap:
                    raise StoreError(
                        f"cannot open LMDB database {path!r} with writemap={writemap}: it is already open "
                        f"in this process with writemap={shared.writemap}, and stores on one directory share "
                        "one LMDB environment (LMDB must not mix writemap and non-writemap handles); "
                        "open it with the same writemap value, or close the other store first"
                    )
                shared.refs += 1
            else:
                env = _open_env(path, _round_up(map_size, 4096), max_dbs, max_readers, writemap)
                _remove_stale_staging(path)
                shared = _SharedEnv(env, key, float(resize_timeout), path, (max_dbs, max_readers), writemap)
                _registry[key] = shared
        return cls(path, shared, direct_reads, native_restore)

    # --- plumbing ---

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"database {self.path!r} is closed")

    def _check_key(self, key: bytes) -> None:
        """Keys LMDB cannot store raise StoreError before they reach lmdb."""
        if not key:
            raise StoreError("LMDB cannot store an empty key")
        if len(key) > self._shared.max_key_size:
            raise StoreError(f"key is {len(key)} bytes; LMDB keys are at most {self._shared.max_key_size} bytes")

    def _storable(self, key: bytes) -> bool:
        """False for keys LMDB could never have stored (reads of them find nothing)."""
        return 0 < len(key) <= self._shared.max_key_size

    @contextmanager
    def _read_txn(self) -> Iterator[lmdb.Transaction[bytes]]:
        self._check_open()
        handle = self._shared.begin(write=False)
        try:
            yield handle.txn
        finally:
            self._shared.end(handle, commit=True)

    def _reading(self, name: bytes) -> AbstractContextManager[tuple[lmdb.Transaction[bytes], Any]]:
        self._check_open()
        return self._shared.reading(name)

    def _write(
        self, op: Callable[[lmdb.Transaction[bytes]], T], written: Callable[[], tuple[int, int]], action: str
    ) -> T:
        """Run op in its own write transaction; on a full map abort, grow and replay it.

        written() tells how many (bytes of keys+values, records) op had written when the map filled up.
        """
        with _errors(action):
            for _ in range(_MAX_GROW_ATTEMPTS):
                self._check_open()
                handle = self._shared.begin(write=True)
                try:
                    result = op(handle.txn)
                except lmdb.MapFullError:
                    self._shared.end(handle, commit=False)
                    self._shared.grow(*written(), double=True, action=action)
                    continue
                except BaseException:
                    self._shared.end(handle, commit=False)
                    raise
                try:
                    self._shared.end(handle, commit=True)
                except lmdb.MapFullError:  # the commit itself may need pages (freelist)
                    self._shared.grow(*written(), double=True, action=action)
                    continue
                return result
        raise StoreError(f"LMDB {action} failed: database map is full and growing it did not help")

    # --- reads ---

    def tree_names(self) -> list[str]:
        with _errors("tree_names"), self._read_txn() as txn:
            return _list_trees(txn)

    def get(self, tree: str, key: Buffer) -> bytes | None:
        name = check_tree(tree).encode()
        key = as_bytes(key, "key")
        if not self._storable(key):
            return None
        with _errors("get"), self._reading(name) as (txn, db):
            if db is None:
                return None
            value: bytes | None = txn.get(key, db=db)
            return value

    def count(self, tree: str) -> int:
        name = check_tree(tree).encode()
        with _errors("count"), self._reading(name) as (txn, db):
            return 0 if db is None else int(txn.stat(db)["entries"])

    def items(self, tree: str, prefix: Buffer = b"") -> Items:
        name = check_tree(tree).encode()
        prefix = as_bytes(prefix, "prefix")
        self._check_open()
        return self._iter_items(name, prefix)

    def _iter_items(self, name: bytes, prefix: bytes) -> Items:
        # A generator: the read transaction starts at the first next() and ends when it is
        # exhausted, closed or garbage collected.
        try:
            with self._reading(name) as (txn, db):
                if db is not None:
                    yield from _scan(txn, db, prefix, self._shared.max_key_size)
        except lmdb.Error as e:
            raise _translate(e, "items") from e

    # --- writes ---

    def create_tree(self, tree: str) -> None:
        name = check_tree(tree).encode()
        self._write(lambda txn: self._shared.open_db(txn, name, create=True), lambda: (0, 0), "create_tree")

    def put(self, tree: str, key: Buffer, value: Buffer) -> None:
        name = check_tree(tree).encode()
        key = as_bytes(key, "key")
        value = as_bytes(value, "value")
        self._check_key(key)

        def op(txn: lmdb.Transaction[bytes]) -> None:
            txn.put(key, value, db=self._shared.open_db(txn, name, create=True))

        self._write(op, lambda: (len(key) + len(value), 1), "put")

    def delete(self, tree: str, key: Buffer) -> bool:
        name = check_tree(tree).encode()
        key = as_bytes(key, "key")
        if not self._storable(key):
            return False

        def op(txn: lmdb.Transaction[bytes]) -> bool:
            db = self._shared.open_db(txn, name, create=False)
            return False if db is None else bool(txn.delete(key, db=db))

        return self._write(op, lambda: (len(key), 1), "delete")

    def put_many(self, tree: str, items: Iterable[tuple[Buffer, Buffer]]) -> int:
        """One atomic transaction. A list or tuple is replayed as is after growing the map; any other
        iterable is consumed once, so the pairs read so far are kept until the commit to replay them."""
        name = check_tree(tree).encode()
        replay: Sequence[tuple[Buffer, Buffer]] | None = items if isinstance(items, (list, tuple)) else None
        try:
            source = iter(items) if replay is None else None
        except TypeError:
            raise ArgumentTypeError(
                f"items must be an iterable of (key, value) pairs, not {type(items).__name__}"
            ) from None
        kept: list[tuple[bytes, bytes]] = []
        nbytes = nrecords = 0

        def checked(pairs: Iterable[object]) -> Iterator[tuple[bytes, bytes]]:
            for pair in pairs:
                key, value = check_item(pair)
                self._check_key(key)
                yield key, value

        def op(txn: lmdb.Transaction[bytes]) -> int:
            nonlocal nbytes, nrecords
            nbytes = nrecords = 0
            db = self._shared.open_db(txn, name, create=True)
            if replay is not None:
                pairs: Iterable[tuple[bytes, bytes]] = checked(replay)
            else:
                assert source is not None
                pairs = _chain_keeping(kept, checked(source))
            for key, value in pairs:
                txn.put(key, value, db=db)
                nbytes += len(key) + len(value)
                nrecords += 1
            return nrecords

        return self._write(op, lambda: (nbytes, nrecords), "put_many")

    @contextmanager
    def snapshot(self) -> Iterator[ReadSnapshot]:
        """One read transaction for the with block. The map cannot grow meanwhile (see the module doc)."""
        self._check_open()
        with _errors("snapshot"):
            handle, dbs = self._shared.begin_snapshot()
        snap = _LmdbSnapshot(self, handle, dbs)
        try:
            yield snap
        finally:
            snap._finish()

    @contextmanager
    def write_transaction(self) -> Iterator[WriteTransaction]:
        """All-or-nothing; a full map raises StoreError (see reserve())."""
        self._check_open()
        with _errors("write_transaction"):
            handle = self._shared.begin(write=True)
        txn = _LmdbWriteTransaction(self, handle)
        try:
            yield txn
        except BaseException:
            txn._finish(commit=False)
            raise
        txn._finish(commit=True)

    @contextmanager
    def native_writer(self, mean_record_bytes: float = 0.0) -> Iterator[Any | None]:
        """The environment handed to the Rust core's LMDB for one write transaction: a
        core.LmdbWriter (commit it inside the block; leaving it otherwise rolls back), or None when
        that is off (native_restore=False, the pure core) or cannot be had now (_SharedEnv.hand_over).
        Records of more than half a page on average (mostly on overflow pages) are staged through
        the new file's map (see the module doc)."""
        self._check_open()
        if not self._native_restore:
            yield None
            return
        with self._shared.hand_over(stage_writemap=mean_record_bytes > self._shared.page_size / 2) as writer:
            yield writer

    def reserve(self, nbytes: int, *, records: int = 0) -> None:
        """Grow the map now so that nbytes more of keys+values (in `records` records, if known) fit.

        Sized for B-tree overhead: the map becomes at least used + 3 * (nbytes + 16 * records) + 8 MiB.
        Pass records when writing many small records (their per-record overhead dominates). Call it
        before write_transaction(), with no transaction or items() iterator open in this thread.
        """
        check_nbytes(nbytes)
        check_nbytes(records, "records")
        self._check_open()
        with _errors("reserve"):
            self._shared.grow(nbytes, records, double=False, action="reserve")

    def map_size(self) -> int:
        """The current map size in bytes (for diagnostics and tests)."""
        self._check_open()
        with _errors("map_size"):
            return self._shared.usage()[0]

    def close(self) -> None:
        with _registry_lock:
            if self._closed:
                return
            self._closed = True
            shared = self._shared
            shared.refs -= 1
            if shared.refs:
                return
            del _registry[shared.key]
        with _errors("close"):
            shared.env.close()


def _chain_keeping(
    kept: list[tuple[bytes, bytes]], fresh: Iterator[tuple[bytes, bytes]]
) -> Iterator[tuple[bytes, bytes]]:
    """The pairs kept from earlier attempts, then new ones from fresh, keeping those too."""
    yield from kept
    for pair in fresh:
        kept.append(pair)
        yield pair


def _has_tree(txn: lmdb.Transaction[bytes], name: bytes) -> bool:
    """The main database names the tree (LMDB 1.0 stores names NUL-terminated, see _list_trees)."""
    return txn.get(name) is not None or txn.get(name + b"\x00") is not None


def _list_trees(txn: lmdb.Transaction[bytes]) -> list[str]:
    """Named databases are the keys of the main database (datafold stores nothing else there)."""
    names = []
    for raw in txn.cursor().iternext(keys=True, values=False):
        if raw.endswith(b"\x00"):
            raw = raw[:-1]  # LMDB 1.0 stores database names NUL-terminated
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue  # not a name datafold could have made
        if name:
            names.append(name)
    return sorted(names)


def _scan(txn: lmdb.Transaction[bytes], db: Any, prefix: bytes, max_key_size: int) -> Iterator[tuple[bytes, bytes]]:
    """Stream the records of db whose key starts with prefix, in key order, as bytes copies
    (py-lmdb's own iterator: no bytecode per record without a prefix)."""
    if len(prefix) > max_key_size:
        return iter(())  # no stored key is that long
    cursor = txn.cursor(db=db)
    if not (cursor.set_range(prefix) if prefix else cursor.first()):
        return iter(())
    pairs: Iterator[tuple[bytes, bytes]] = cursor.iternext()
    return itertools.takewhile(lambda pair: pair[0].startswith(prefix), pairs) if prefix else pairs


def _plain_pairs(items: object, max_key: int) -> bool:
    """True for a list of at most PUT_BATCH 2-tuples of bytes whose keys LMDB can store (the
    core's check: one Rust loop, or C loops in the pure core; no bytecode per record)."""
    return type(items) is list and len(items) <= PUT_BATCH and bool(core.plain_pairs(items, max_key))


def _put_batch(cursor: lmdb.Cursor, pairs: list[tuple[bytes, bytes]], overwrite: bool) -> tuple[int, int]:
    """(added, consumed) of one putmulti of checked pairs. A batch whose keys ascend past the
    tree's last key is appended (MDB_APPEND, as LMDB's own bulk loads do): LMDB then fills each
    page to the end (a restored "small" takes 3% fewer pages than with plain puts, and keys put
    out of order would leave pages about half full)."""
    last = cursor.key() if cursor.last() else None
    append = bool(core.keys_ascending(pairs, last))
    consumed, added = cursor.putmulti(pairs, overwrite=overwrite, append=append)
    if append and added != consumed:
        # Cannot happen with LMDB's default key order, which keys_ascending follows; an lmdb.Error
        # so that the transaction is marked failed (part of the batch may be in it).
        raise lmdb.Error("LMDB refused keys appended in ascending order (does the tree sort its keys another way?)")
    return added, consumed


class _LmdbWriteTransaction(WriteTransaction):
    def __init__(self, store: LmdbStore, handle: _Handle) -> None:
        self._store = store
        self._shared = store._shared
        self._handle = handle
        self._dbs: dict[bytes, Any] = {}  # handles opened in this transaction
        self._failed: BaseException | None = None

    def _txn(self) -> lmdb.Transaction[bytes]:
        if self._handle.done:
            raise StoreError("the write transaction is over (committed or rolled back)")
        if self._failed is not None:
            raise StoreError("the write transaction failed earlier and will be rolled back") from self._failed
        self._store._check_open()
        return self._handle.txn

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except lmdb.MapFullError as e:
            self._failed = e
            raise StoreError(_MAP_FULL_IN_TXN) from e
        except lmdb.Error as e:
            self._failed = e  # LMDB marks the transaction unusable after most errors
            raise _translate(e, action) from e

    def _db(self, txn: lmdb.Transaction[bytes], name: bytes, create: bool) -> Any:
        db = self._dbs.get(name)
        if db is None:
            db = self._shared.open_db(txn, name, create)
            if db is not None:
                self._dbs[name] = db
        return db

    def _finish(self, commit: bool) -> None:
        if self._handle.done:
            return
        if commit and self._failed is not None:
            self._shared.end(self._handle, commit=False)
            raise StoreError("the write transaction was rolled back because an operation in it failed") from (
                self._failed
            )
        try:
            self._shared.end(self._handle, commit=commit)
        except lmdb.MapFullError as e:
            raise StoreError(_MAP_FULL_IN_TXN) from e
        except lmdb.Error as e:
            raise _translate(e, "commit" if commit else "rollback") from e

    def create_tree(self, tree: str) -> None:
        name = check_tree(tree).encode()
        with self._errors("create_tree"):
            txn = self._txn()
            self._db(txn, name, create=True)

    def get(self, tree: str, key: Buffer) -> bytes | None:
        name = check_tree(tree).encode()
        key = as_bytes(key, "key")
        with self._errors("get"):
            txn = self._txn()
            if not self._store._storable(key):
                return None
            db = self._db(txn, name, create=False)
            value: bytes | None = None if db is None else txn.get(key, db=db)
            return value

    def put(self, tree: str, key: Buffer, value: Buffer, overwrite: bool = True) -> bool:
        name = check_tree(tree).encode()
        key = as_bytes(key, "key")
        value = as_bytes(value, "value")
        check_bool(overwrite, "overwrite")
        self._store._check_key(key)
        with self._errors("put"):
            txn = self._txn()
            return bool(txn.put(key, value, db=self._db(txn, name, create=True), overwrite=overwrite))

    def put_many(self, tree: str, items: Iterable[tuple[Buffer, Buffer]], overwrite: bool = True) -> tuple[int, int]:
        name = check_tree(tree).encode()
        check_bool(overwrite, "overwrite")
        written = skipped = 0
        max_key = self._shared.max_key_size
        with self._errors("put_many"):
            txn = self._txn()
            cursor = txn.cursor(db=self._db(txn, name, create=True))
            batch: list[tuple[bytes, bytes]] = []

            def flush(pairs: list[tuple[bytes, bytes]]) -> None:
                # One C loop over the batch (LMDB's cursor put), not a Python call per record.
                nonlocal written, skipped
                added, consumed = _put_batch(cursor, pairs, overwrite)
                written += added
                skipped += consumed - added

            if _plain_pairs(items, max_key):
                # Already a list of (bytes, bytes) with storable keys (what a restore hands over):
                # straight to LMDB's C loop (the caller's list is left as it is).
                flush(items)  # type: ignore[arg-type]
                return written, skipped
            for pair in items:
                key, value = check_item(pair)
                if not 0 < len(key) <= max_key:
                    self._store._check_key(key)  # raises the clear StoreError
                batch.append((key, value))
                if len(batch) >= PUT_BATCH:
                    flush(batch)
                    batch.clear()
            if batch:
                flush(batch)
        return written, skipped

    def delete(self, tree: str, key: Buffer) -> bool:
        name = check_tree(tree).encode()
        key = as_bytes(key, "key")
        with self._errors("delete"):
            txn = self._txn()
            if not self._store._storable(key):
                return False
            db = self._db(txn, name, create=False)
            return False if db is None else bool(txn.delete(key, db=db))

    def items(self, tree: str, prefix: Buffer = b"") -> Items:
        name = check_tree(tree).encode()
        prefix = as_bytes(prefix, "prefix")
        self._txn()
        return self._iter_items(name, prefix)

    def _iter_items(self, name: bytes, prefix: bytes) -> Items:
        with self._errors("items"):
            txn = self._txn()
            db = self._db(txn, name, create=False)
            if db is None:
                return
            for pair in _scan(txn, db, prefix, self._shared.max_key_size):
                yield pair
                self._txn()  # the transaction may have ended while the caller held the item

    def tree_names(self) -> list[str]:
        with self._errors("tree_names"):
            return _list_trees(self._txn())


class _LmdbSnapshot(ReadSnapshot):
    """One read transaction; its tree handles were opened (and published) before it started."""

    def __init__(self, store: LmdbStore, handle: _Handle, dbs: dict[str, Any]) -> None:
        self._store = store
        self._shared = store._shared
        self._handle = handle
        self._dbs = dbs  # tree name -> handle, for every tree the transaction sees
        self._names = sorted(dbs)
        self._lock = threading.Lock()  # an LMDB transaction must not be used by two threads at once
        self._data_file: Any = None  # direct reads: core.LmdbDataFile, False when unusable, None before the first
        self._walks: set[_WalkAhead] = set()  # the direct scans' threads running now

    def _txn(self) -> lmdb.Transaction[bytes]:
        """The transaction, or StoreError once the snapshot is over; call with _lock held."""
        if self._handle.done:
            raise StoreError("the snapshot is over (its with block has exited)")
        self._store._check_open()
        return self._handle.txn

    def _finish(self) -> None:
        with self._lock:
            if self._handle.done:
                return
            for walk in self._walks:  # no walk reads the pages once the transaction is over
                walk.stop()
            with _errors("end snapshot"):
                self._shared.end(self._handle, commit=True)

    def tree_names(self) -> list[str]:
        with self._lock:
            self._txn()
            return list(self._names)

    def get(self, tree: str, key: Buffer) -> bytes | None:
        tree = check_tree(tree)
        key = as_bytes(key, "key")
        with self._lock, _errors("get"):
            txn = self._txn()
            db = self._dbs.get(tree)
            if db is None or not self._store._storable(key):
                return None
            value: bytes | None = txn.get(key, db=db)
            return value

    def count(self, tree: str) -> int:
        tree = check_tree(tree)
        with self._lock, _errors("count"):
            txn = self._txn()
            db = self._dbs.get(tree)
            return 0 if db is None else int(txn.stat(db)["entries"])

    @property
    def _ended(self) -> bool:
        return bool(self._handle.done)

    def _check_live(self) -> None:
        with self._lock:
            self._txn()

    def _direct_scan(self, txn: lmdb.Transaction[bytes], tree: str, prefix: bytes) -> Any | None:
        """A scan of the tree's pages in the data file by the Rust core, or None to read through
        py-lmdb (direct reads off, or a data file they do not handle). Call with _lock held."""
        if not self._store._direct_reads:
            return None
        if self._data_file is None:
            self._data_file = _open_data_file(self._shared)
        if self._data_file is False:
            return None
        # The tree's record in the main database, as this transaction sees it: its root page.
        record = txn.get(tree.encode())
        return None if record is None else self._data_file.scan(record, prefix)

    def batches(self, tree: str, prefix: Buffer = b"") -> Iterator[Sequence[tuple[bytes, bytes]]]:
        tree = check_tree(tree)
        prefix = as_bytes(prefix, "prefix")
        with self._lock, _errors("items"):
            txn = self._txn()
            db = self._dbs.get(tree)
            if db is None:
                return
            direct = self._direct_scan(txn, tree, prefix)
            scan = _scan(txn, db, prefix, self._shared.max_key_size) if direct is None else None
        if direct is not None:
            # A thread walks the pages this transaction keeps in place (in Rust, without the GIL) a
            # few batches ahead of the consumer, so the walk overlaps what the consumer does. The
            # snapshot stops its walks before its transaction ends (_finish).
            walk = _WalkAhead(direct)
            with self._lock:
                self._walks.add(walk)
            try:
                for batch in walk.batches():
                    # A batch handed out was read while the snapshot was open: it still is now.
                    self._check_live()
                    yield batch
            except StoreError:
                self._check_live()  # a snapshot that ended meanwhile is the reason to give
                raise
            finally:
                walk.stop()
                with self._lock:
                    self._walks.discard(walk)
            return
        assert scan is not None
        while True:
            with self._lock, _errors("items"):
                self._txn()  # checked at every batch: the snapshot may have ended meanwhile
                # Copies of a batch of records per lock round trip (per record it costs 5x).
                batch, more = take_batch(scan)
            if batch:
                yield batch
            if not more:
                return


class _WalkAhead:
    """A thread that takes the batches of a direct scan (core.LmdbScan) up to `depth` batches
    ahead of the consumer; only that thread calls scan.take(). It hands over each batch, then None
    at the end or the exception that stopped it, which the consumer raises after the batches taken
    before it. stop() ends the thread and waits for it."""

    def __init__(self, scan: Any, depth: int = 2) -> None:
        self._scan = scan
        self._ready: queue.Queue[Any] = queue.Queue(depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._walk, name="datafold-lmdb-walk", daemon=True)
        self._thread.start()

    def _hand_over(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _walk(self) -> None:
        try:
            while True:
                batch = self._scan.take(_DIRECT_BATCH, SNAPSHOT_BATCH_BYTES)  # None at the end
                if not self._hand_over(batch) or batch is None:
                    return
        except BaseException as e:  # raised in the consumer
            self._hand_over(e)

    def batches(self) -> Iterator[Any]:
        while True:
            try:
                item = self._ready.get(timeout=0.05)
            except queue.Empty:
                if self._stop.is_set():  # stopped by the snapshot's end while the consumer waits
                    raise StoreError("the snapshot is over (its with block has exited)") from None
                continue
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            if item:
                yield item

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _open_data_file(shared: _SharedEnv) -> Any:
    """The environment's data file mapped by the Rust core, or False when direct reads cannot
    serve it: not the file the environment has open (replaced since), or not LMDB 0.9's format."""
    try:
        data_file = core.LmdbDataFile(shared.data_file)
    except StoreError:
        return False  # missing or unreadable here: LMDB itself reads it
    if (
        data_file.identity != shared.data_identity
        or data_file.version != _DIRECT_READ_VERSION
        or data_file.page_size != shared.page_size
    ):
        return False
    return data_file
