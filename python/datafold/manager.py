"""EncryptedBackupManager: full backups, restores, verification and listing over a DbOperations."""

from __future__ import annotations

import dataclasses
import operator
import os
import stat
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from datetime import datetime, timezone
from typing import IO, Any

from . import core as _core_select
from .atomic import TEMP_SUFFIX, AtomicFile
from .chain import ParentLookup, about_member, chain_trees, read_member, resolve_chain
from .chain import tree_names as chain_tree_names
from .errors import (
    FILE_ERRORS,
    ArgumentTypeError,
    BackupError,
    BackupFileNotFoundError,
    BackupIOError,
    DatabaseError,
    EncryptionKeyError,
    IntegrityError,
    InvalidArgumentError,
    StoreError,
)
from .keys import MasterKeyPair, derive_backup_key
from .metadata import BackupMetadata, BackupResult, BackupStats, RestoreStats, SourceInfo
from .options import BackupMode, BackupOptions, RestoreOptions, check_path, check_threads
from .passphrase import KDF_ARGON2ID, KDF_MASTER_KEY, WRONG_PASSPHRASE, Passphrase
from .progress import Beside, Meter, MeteredFile, ProgressCallback
from .stores import DbOperations, ReadSnapshot, WriteTransaction, is_metadata_tree

__all__ = ["EncryptedBackupManager"]

READ_BATCH = 4096
Trailer = tuple[int, int, list[tuple[str, int, int, bytes]], bytes]


def open_backup_file(path: str) -> IO[bytes]:
    """Opens a backup file for reading, with datafold's errors for the usual failures. Only a
    regular file is a backup file: a FIFO is opened without waiting for a writer (which would
    block forever) and refused, like a device or a socket."""
    nonblocking = getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, os.O_RDONLY | nonblocking | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as e:
        raise BackupFileNotFoundError(f"backup file {path} does not exist") from e
    except IsADirectoryError as e:
        raise BackupIOError(f"{path} is a directory, not a backup file") from e
    except OSError as e:
        raise BackupIOError(f"cannot open backup {path}: {e.strerror or e}") from e
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise BackupIOError(f"{path} is a directory, not a backup file")
        if not stat.S_ISREG(mode):
            raise BackupIOError(f"{path} is not a regular file (a pipe, device or socket), not a backup file")
        if nonblocking:
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


@contextmanager
def _open_backup(path: str) -> Iterator[IO[bytes]]:
    """open_backup_file, closed afterwards; OSErrors while reading become BackupIOError."""
    f = open_backup_file(path)
    with f:
        try:
            yield f
        except BackupError:
            raise
        except OSError as e:
            raise BackupIOError(f"reading backup {path} failed: {e.strerror or e}") from e


class _Background:
    """call() in a thread (a pass over a file beside the writer); result() waits for it and
    returns what it returned, or raises what it raised."""

    def __init__(self, call: Callable[[], Any], name: str) -> None:
        self._result: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(call,), name=name, daemon=True)
        self._thread.start()

    def _run(self, call: Callable[[], Any]) -> None:
        try:
            self._result = call()
        except BaseException as e:  # handed to the waiting thread by result()
            self._error = e

    def join(self) -> None:
        self._thread.join()

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result


def _backup_files(directory: str, newest_first: bool = False) -> list[os.DirEntry[str]]:
    """The regular files in `directory` that may be backups (not a writer's temporary file), by
    name, or newest first by modification time."""
    try:
        with os.scandir(directory) as scan:
            entries = [e for e in scan if not e.name.endswith(TEMP_SUFFIX) and _is_file(e)]
    except FileNotFoundError as e:
        raise BackupFileNotFoundError(f"directory {directory} does not exist") from e
    except OSError as e:
        raise BackupIOError(f"cannot list {directory}: {e.strerror or e}") from e
    if newest_first:
        return sorted(entries, key=lambda e: (-_mtime(e), e.name))
    return sorted(entries, key=lambda e: e.name)


def _is_file(entry: os.DirEntry[str]) -> bool:
    """A regular file, through symlinks; a symlink loop or one through a file is none (skipped)."""
    try:
        return entry.is_file()
    except OSError:
        return False


def _mtime(entry: os.DirEntry[str]) -> int:
    try:
        return entry.stat().st_mtime_ns
    except OSError:
        return 0  # gone since the listing: read last (and skipped)


def _same_file(a: str, b: str) -> bool:
    """`a` and `b` name one file: one path once links are resolved, or (both existing) one inode."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class _Stoppable:
    """A backup file whose reads fail once `stop` is set: ends a pass no longer needed."""

    def __init__(self, f: Any, stop: threading.Event) -> None:
        self._f = f
        self._stop = stop

    def _check(self) -> None:
        if self._stop.is_set():
            raise BackupIOError("the pass was stopped")

    def read(self, n: int = -1) -> bytes:
        self._check()
        data: bytes = self._f.read(n)
        return data

    def readinto(self, buffer: Any) -> int | None:
        self._check()
        n: int | None = self._f.readinto(buffer)
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


class EncryptedBackupManager:
    """Creates, restores, verifies and lists encrypted backups of one database.

    `master_keypair` is the key source: a MasterKeyPair (every backup is encrypted with the backup
    key derived from it, `datafold.keys.derive_backup_key`) or a `datafold.Passphrase` (each backup
    gets its own key, Argon2id over the passphrase with a fresh salt; reading derives it from the
    parameters in the file's preamble). `core` picks the Rust or pure-Python core for this manager
    ("rust" / "pure"; default: the one `DATAFOLD_CORE` selects).
    """

    def __init__(
        self, db: DbOperations, master_keypair: MasterKeyPair | Passphrase, *, core: str | None = None
    ) -> None:
        if not isinstance(db, DbOperations):
            raise ArgumentTypeError(f"db must be a DbOperations (DbOperations.open(path)), not {type(db).__name__}")
        if not isinstance(master_keypair, (MasterKeyPair, Passphrase)):
            raise ArgumentTypeError(
                f"master_keypair must be a MasterKeyPair or a datafold.Passphrase, not {type(master_keypair).__name__}"
            )
        self._db = db
        self._passphrase = master_keypair if isinstance(master_keypair, Passphrase) else None
        self._backup_key = derive_backup_key(master_keypair) if isinstance(master_keypair, MasterKeyPair) else None
        self._derived: dict[bytes, bytes] = {}  # passphrase: kdf_params -> backup key
        self._core = _core_select.core if core is None else _core_select.load_core(core)
        # Threads that seal/open segments in the operation under way (its options' `threads`).
        # A manager runs one operation at a time.
        self._threads = 0

    def __repr__(self) -> str:
        return f"EncryptedBackupManager(db={self._db!r}, core={self._core.CORE_NAME!r})"

    @property
    def core_name(self) -> str:
        return str(self._core.CORE_NAME)

    # ------------------------------------------------------------------ keys

    def _write_key(self) -> tuple[bytes, int, bytes]:
        """(backup key, kdf_id, kdf_params) for a new backup (docs/FORMAT.md §1)."""
        if self._passphrase is None:
            assert self._backup_key is not None
            return self._backup_key, KDF_MASTER_KEY, b""
        params = self._passphrase.new_kdf_params()
        return self._derived_key(params), KDF_ARGON2ID, params

    def _derived_key(self, kdf_params: bytes) -> bytes:
        assert self._passphrase is not None
        key = self._derived.get(kdf_params)
        if key is None:
            if len(self._derived) >= 64:
                self._derived.clear()
            key = self._derived[kdf_params] = self._passphrase.derive(kdf_params)
        return key

    def _key_for(self, preamble: Any) -> bytes:
        """The backup key of a file with this preamble; EncryptionKeyError if it needs the other kind of key."""
        if preamble.kdf_id == KDF_ARGON2ID:
            if self._passphrase is None:
                raise EncryptionKeyError("this backup is protected by a passphrase (Argon2id), not by a master key")
            return self._derived_key(bytes(preamble.kdf_params))
        if self._backup_key is None:
            raise EncryptionKeyError("this backup was made with a master key, not with a passphrase")
        return self._backup_key

    def _unlock(self, reader: Any) -> Any:
        """reader.unlock() with this manager's key for the reader's file: returns the HEADER payload."""
        key = self._key_for(reader.preamble)
        try:
            return reader.unlock(key)
        except EncryptionKeyError as e:
            if self._passphrase is None:
                raise
            raise EncryptionKeyError(WRONG_PASSPHRASE) from e

    def _file_key(self, path: str) -> bytes:
        with _open_backup(path) as f:
            return self._key_for(self._core.BackupReader(f, threads=self._threads).preamble)

    # ------------------------------------------------------------------ create

    def create_backup(
        self,
        path: str | os.PathLike[str],
        options: BackupOptions | None = None,
        *,
        progress: ProgressCallback | None = None,
    ) -> BackupResult:
        """Writes a backup of the database to `path`; the file appears complete or not at all.

        `progress(ProgressEvent)` hears of the records written (phase "backup") and of the check of
        the file (phase "verify").
        """
        options = _check_options(options, BackupOptions, "options")
        self._threads = options.threads
        meter = Meter(progress)
        path = check_path(path, "path")
        started = time.perf_counter()
        chain = None
        if options.mode is BackupMode.INCREMENTAL:
            assert options.parent is not None  # BackupOptions checks it
            explicit = None if options.chain is None else tuple(map(str, options.chain))
            chain = self._chain(read_member(self.read_metadata, str(options.parent), "parent"), explicit)
        self._check_destination(path, "path", [m.path for m in chain or ()])
        # One read snapshot for the whole backup: every tree as of the same moment.
        try:
            with self._db.snapshot() as snap:
                metadata = self._create_from(snap, path, options, meter, chain)
        except FILE_ERRORS as e:
            if chain is None:
                raise
            raise self._damaged_member(chain, e) from e
        stats = BackupStats(
            items_backed_up=metadata.total_items,
            trees_backed_up=len(metadata.trees),
            bytes_written=metadata.file_size or 0,
            duration_s=time.perf_counter() - started,
        )
        return BackupResult(path=path, metadata=metadata, stats=stats)

    def _create_from(
        self,
        snap: ReadSnapshot,
        path: str,
        options: BackupOptions,
        meter: Meter,
        chain: list[BackupMetadata] | None = None,
    ) -> BackupMetadata:
        """A full backup of the snapshot; with `chain`, an incremental: per tree, the records that
        turn the state the chain describes into the database's (ChainMerge.diff), in one pass."""
        if chain is not None:
            options = _chain_filters(options, chain)
        parent = chain[-1] if chain else None
        trees = self._select_trees(options, snap.tree_names(), strict=parent is None)
        prefix = options.key_prefix or b""
        option_doc = {**_filter_doc(options), "compression_level": options.compression_level}

        def fill(writer: Any) -> None:
            counted = meter.active and options.key_prefix_filter is None
            meter.begin("backup", sum(map(snap.count, trees)) if counted else None)
            with ExitStack() as stack:
                merges: Iterable[tuple[str, Any]] = ((name, None) for name in trees)
                if chain is not None:
                    readers = stack.enter_context(self._chain_readers(chain))
                    merges = chain_trees(self._core, chain, readers, trees)
                for name, merge in merges:
                    writer.begin_tree(name)
                    batches = meter.count_batches(snap.batches(name, prefix))
                    if merge is None:
                        for batch in batches:  # a RecordBatch goes to the Rust writer whole
                            writer.add_items(batch)
                    else:
                        for batch in batches:
                            merge.diff(batch, writer)
                        merge.finish_diff(writer)
                    writer.end_tree()

        return self._write_backup(
            path,
            trees,
            option_doc,
            fill,
            options.segment_size,
            options.verify_during_creation,
            meter,
            parent=parent,
            deleted_trees=sorted(set(parent.trees) - set(trees)) if parent else None,
            compression_level=options.compression_level,
        )

    def _select_trees(self, options: BackupOptions, names: list[str], *, strict: bool = True) -> list[str]:
        """The trees a backup with these options holds; `strict`: a filtered tree that does not
        exist is an error (an incremental records it as deleted instead)."""
        if options.tree_filter is not None:
            missing = sorted(set(options.tree_filter) - set(names))
            if missing and strict:
                raise InvalidArgumentError(
                    f"tree_filter names trees that are not in the database: {', '.join(missing)}"
                )
            names = [n for n in names if n in options.tree_filter]
        if not options.include_metadata:
            names = [n for n in names if not is_metadata_tree(n)]
        return sorted(names)

    def _chain(self, newest: BackupMetadata, explicit: tuple[str, ...] | None = None) -> list[BackupMetadata]:
        """The chain ending with `newest`, oldest first, every link checked (chain.resolve_chain)."""
        return resolve_chain(newest, self.read_metadata, self._parents_in, explicit)

    def _parents_in(self, directory: str) -> ParentLookup:
        """The backups in `directory` readable with this key, for finding a chain's parents."""

        def read(path: str) -> BackupMetadata | BackupError:
            try:
                return self.read_metadata(path)
            except BackupError as e:
                return e  # not a backup of this key: list_backups would skip it too

        return ParentLookup(lambda: [e.path for e in _backup_files(directory, newest_first=True)], read)

    def _verify_chain(
        self,
        chain: list[BackupMetadata],
        given: BackupMetadata | None,
        meter: Callable[[], Meter],
        stop: threading.Event | None = None,
    ) -> None:
        """Verifies each member of `chain` on its own (a meter from `meter()` each). An error about
        a member other than `given` (the backup the call was given) names it (about_member)."""
        for member in chain:
            assert member.path is not None
            try:
                self._verify_file(member.path, meter(), stop)
            except FILE_ERRORS as e:
                if member is given:
                    raise
                raise about_member(e, member.path, "chain member") from e

    def _damaged_member(
        self, chain: list[BackupMetadata], error: BackupError, given: BackupMetadata | None = None
    ) -> BackupError:
        """`error`, met while reading a chain's backups together (the merge cannot tell whose
        segment it was), as the error of the first member that does not verify on its own
        (_verify_chain); `error` itself if that member is `given` or if every member verifies (a
        chain that does not fit together: its message says so)."""
        try:
            self._verify_chain(chain, given, lambda: Meter(None))
        except FILE_ERRORS as named:
            return named if named.file is not None else error
        return error

    @contextmanager
    def _chain_readers(self, chain: list[BackupMetadata], meter: Meter | None = None) -> Iterator[list[Any]]:
        """An unlocked reader for each member of `chain`, open together."""
        with ExitStack() as stack:
            readers = []
            for member in chain:
                assert member.path is not None
                f = stack.enter_context(_open_backup(member.path))
                reader = self._core.BackupReader(meter.reading(f) if meter else f, threads=self._threads)
                self._unlock(reader)
                readers.append(reader)
            yield readers

    def _write_backup(
        self,
        path: str,
        trees: list[str],
        option_doc: dict[str, Any],
        fill: Callable[[Any], None],
        segment_size: int,
        verify: bool,
        meter: Meter | None = None,
        *,
        parent: BackupMetadata | None = None,
        deleted_trees: list[str] | None = None,
        compression_level: int = 0,
    ) -> BackupMetadata:
        meter = meter or Meter(None)
        header = BackupMetadata.header_json(
            mode=(BackupMode.FULL if parent is None else BackupMode.INCREMENTAL).value,
            parent_backup_id=None if parent is None else parent.backup_id,
            parent_digest=None if parent is None else parent.checksum,
            deleted_trees=deleted_trees,
            source=SourceInfo(self._db.backend, self._db.path),
            options=option_doc,
            trees=trees,
            compression_level=compression_level,
        )
        key, kdf_id, kdf_params = self._write_key()
        with AtomicFile(path) as out:
            # The read-back check reads the file as it is written, in a thread beside the writer
            # (both cores busy), its progress reported as the "verify" phase after "backup"; with a
            # given number of threads it runs after the writer, so that no more threads than that
            # seal or open segments at once.
            beside = None
            if verify and self._threads == 0:
                side = meter.beside(first=False)
                side.meter.begin("verify")  # total_bytes once the writer is done
                growing: Any = side.meter.reading(out.growing())  # read like the file it becomes
                beside = _Background(lambda: side.run(lambda: self._scan(growing)[2]), "datafold-read-back")
            try:
                writer = self._core.BackupWriter(
                    meter.writing(out.sink),
                    key,
                    header,
                    segment_size=segment_size,
                    kdf_id=kdf_id,
                    kdf_params=kdf_params,
                    threads=self._threads,
                    compression_level=compression_level,
                )
                fill(writer)
                trailer = writer.finish()
                meter.end()  # the "backup" phase of create_backup ends with the trailer
                if beside is not None:
                    side.meter.total_bytes = writer.bytes_written
                out.writing_over()
                out.start_sync()  # the disk syncs while the file is verified from the page cache
                if verify:
                    if beside is not None:
                        meter.relay()
                        verified = beside.result()
                    else:
                        out.file.seek(0)
                        verified = self._scan(meter.reading(out.file, "verify"))[2]
                    if verified != trailer:
                        raise BackupIOError(
                            f"the backup written to {path} does not read back as written; the disk may be failing"
                        )
            except BackupError:
                raise
            except OSError as e:
                raise BackupIOError(f"writing backup {path} failed: {e.strerror or e}") from e
            finally:
                if beside is not None:
                    out.writing_over()  # a failed writer: the check reads to the end and stops
                    beside.join()
            out.commit()
        preamble = self._core.parse_preamble(writer.preamble)
        return BackupMetadata.from_parts(header, trailer, preamble, path=path, file_size=writer.bytes_written)

    # ------------------------------------------------------------------ read

    def _scan(self, f: IO[bytes], visit: Callable[[str, Any], None] | None = None) -> tuple[Any, bytes, Trailer]:
        """A full authenticated pass; `visit(tree, reader)` may read the tree's items. A file from
        Meter.reading() reports the pass as progress."""
        meter = f.meter if isinstance(f, MeteredFile) else None
        reader = self._core.BackupReader(f, threads=self._threads)
        header = self._unlock(reader)
        while (name := reader.next_tree()) is not None:
            if visit is not None:
                visit(name, reader)
            elif meter is not None:  # count the records (next_tree alone would skip them unseen)
                while count := reader.skip_items(READ_BATCH):
                    meter.add_items(count)
        if meter is not None:
            meter.end()
        return reader.preamble, header, reader.trailer

    def verify_backup(
        self, path: str | os.PathLike[str], *, progress: ProgressCallback | None = None, threads: int = 0
    ) -> BackupMetadata:
        """Decrypts and checks the whole file (every segment, record, count and digest); writes nothing.
        `progress(ProgressEvent)` hears of the pass (phase "verify"); `threads` open segments in
        parallel (0: all cores)."""
        path = check_path(path, "path")
        self._threads = check_threads(threads)
        return self._verify_file(path, Meter(progress))

    def _verify_file(self, path: str, meter: Meter, stop: threading.Event | None = None) -> BackupMetadata:
        """verify_backup's pass; `stop`: once set, the pass ends at its next read (BackupIOError)."""
        with _open_backup(path) as f:
            source: Any = meter.reading(f if stop is None else _Stoppable(f, stop), "verify")
            preamble, header, trailer = self._scan(source)
            size = os.fstat(f.fileno()).st_size
        return BackupMetadata.from_parts(header, trailer, preamble, path=path, file_size=size)

    def read_metadata(self, path: str | os.PathLike[str]) -> BackupMetadata:
        """Metadata from the preamble and the segments holding the header and trailer only."""
        path = check_path(path, "path")
        with _open_backup(path) as f:
            reader = self._core.BackupReader(f, threads=self._threads)
            header = self._unlock(reader)
            trailer = reader.read_summary()
            size = os.fstat(f.fileno()).st_size
            return BackupMetadata.from_parts(header, trailer, reader.preamble, path=path, file_size=size)

    def list_backups(self, directory: str | os.PathLike[str]) -> list[BackupMetadata]:
        """Metadata of every backup in `directory` readable with this key, oldest first. Other files
        (foreign, corrupt, made with another key) are skipped with a warning."""
        directory = check_path(directory, "directory")
        found = []
        for entry in _backup_files(directory):
            try:
                found.append(self.read_metadata(entry.path))
            except BackupError as e:
                warnings.warn(f"skipping {entry.path}: {e}", stacklevel=2)
        found.sort(key=lambda m: (m.created_at, m.backup_id))
        return found

    # ------------------------------------------------------------------ restore

    def restore_backup(
        self,
        path: str | os.PathLike[str],
        options: RestoreOptions | None = None,
        *,
        progress: ProgressCallback | None = None,
    ) -> RestoreStats:
        """Applies a backup to the database in one store transaction: all of it or nothing.

        `progress(ProgressEvent)` hears of each pass: "verify" (verify_before_restore), "safety"
        (backup_before_restore), "restore" (records applied) and "check" (verify_after_restore).
        """
        options = _check_options(options, RestoreOptions, "options")
        self._threads = options.threads
        meter = Meter(progress)
        path = check_path(path, "path")
        started = time.perf_counter()
        stats = RestoreStats()
        prefix = options.key_prefix

        def wanted(name: str) -> bool:
            return options.tree_filter is None or name in options.tree_filter

        # Check the key, read the tree list and check the chain's links before anything happens.
        newest = self.read_metadata(path)
        explicit = tuple(map(str, options.chain)) if options.chain is not None else None
        chain = self._chain(newest, explicit) if newest.is_incremental or options.chain else [newest]
        in_backup = list(newest.trees) if len(chain) == 1 else chain_tree_names(chain)
        if options.tree_filter is not None:
            missing = sorted(set(options.tree_filter) - set(in_backup))
            if missing:
                raise InvalidArgumentError(f"tree_filter names trees that are not in the backup: {', '.join(missing)}")
        targets = [t for t in in_backup if wanted(t)]

        def scan(visit: Callable[[str, Any], None], phase: str | None = None) -> Trailer | None:
            """One authenticated pass over the backup (or every member of its chain), calling
            visit(tree, source) with a source of read_items(); the trailer of a single file."""
            if len(chain) == 1:
                with _open_backup(path) as f:
                    return self._scan(meter.reading(f, phase), visit)[2]
            if phase is not None:
                meter.begin(phase)
            try:
                with self._chain_readers(chain, meter) as readers:
                    for name, merge in chain_trees(self._core, chain, readers, in_backup):
                        visit(name, merge)
            except FILE_ERRORS as e:
                raise self._damaged_member(chain, e, newest) from e
            meter.end()
            return None

        # With the Rust core (errors abort) the LMDB store's native writer takes the records when it
        # can: they never become Python objects (stores/lmdb.py, native_restore).
        native = not options.continue_on_errors and hasattr(self._core, "LmdbWriter")

        stop_verifying = threading.Event()

        def verify_chain(stop: threading.Event | None = None, side: Meter | None = None) -> None:
            self._verify_chain(chain, newest, lambda: Meter(progress) if side is None else side, stop)

        verifying: _Background | None = None
        beside: Beside | None = None  # the verify pass to run beside the write, started in the try below
        if options.backup_before_restore:
            # Also a full authenticated pass, so verify_before_restore needs no second one.
            stats.safety_backup_path = self._safety_backup(
                path, [m.path for m in chain], targets, prefix, options, scan, meter
            )
        elif options.verify_before_restore:
            if native and options.threads == 0 and not self._db.tree_names():
                # Into an empty database the native writer stages the records in a new file that
                # replaces data.mdb only once everything checked out, so the verify pass runs
                # beside the write (if the writer does not stage, it waits for the pass), its
                # progress reported before the restore's. With a given number of threads (no more
                # than that open segments at once) the passes run one after the other.
                beside = meter.beside(first=True)
            else:
                verify_chain()

        self._db.reserve(sum((m.total_bytes + 64 * m.total_items) for m in chain))
        outcome: dict[str, _TreeOutcome] = {}
        meter.begin(
            "restore",
            sum(t.item_count for name, t in newest.trees.items() if wanted(name))
            if prefix is None and len(chain) == 1
            else None,
            lambda: stats.items_restored + stats.items_skipped + len(stats.errors),
        )
        if meter.active:
            meter.total_bytes = sum(m.file_size or 0 for m in chain) or None

        def restorer(write_tree: Callable[[str, Any], _TreeOutcome], in_db: Callable[[str], bool]) -> Any:
            def restore(name: str, source: Any) -> None:
                # A chain's tree deleted since (and not in the database): nothing to delete there.
                gone = name not in newest.trees and not in_db(name)
                if wanted(name) and not gone:  # a reader skips (and checks) the trees not visited
                    try:
                        outcome[name] = write_tree(name, source)
                    except StoreError as e:  # which tree the store refused (a key too long, say)
                        raise StoreError(f"restoring tree {name!r}: {e}") from e
                    stats.trees_restored += 1

            return restore

        # The trees of the database, for a chain's deleted trees (read before the hand-over).
        existing = set(self._db.tree_names()) if native and len(chain) > 1 else set()

        def begin_check() -> None:
            meter.end()
            checked = sum(t[1] for t in trailer[2] if t[0] in outcome) if trailer and prefix is None else None
            meter.begin("check", checked)

        # Trees already checked (a staged write's, before its file replaced data.mdb).
        checked_early: set[str] = set()
        # The whole backup (chain) checked out when scan() returns: then the transaction commits.
        items = sum(m.total_items for m in chain)
        mean_record_bytes = sum(m.total_bytes for m in chain) / items if items else 0.0
        try:
            if beside is not None:
                side = beside
                verifying = _Background(
                    lambda: side.run(lambda: verify_chain(stop_verifying, side.meter)), "datafold-verify"
                )
            with self._db._native_writer(mean_record_bytes) if native else nullcontext(None) as writer:
                if verifying is not None and (writer is None or not writer.staged):
                    meter.relay()
                    verifying.result()  # nothing is written before the pass ends
                    verifying = None
                if writer is not None:
                    trailer = scan(
                        restorer(
                            lambda name, source: _restore_tree_native(writer, source, name, prefix, options, stats),
                            existing.__contains__,
                        )
                    )
                    if verifying is not None:
                        meter.relay()
                        verifying.result()
                        verifying = None
                    if options.verify_after_restore and writer.staged:
                        # Read back before the new file replaces data.mdb, while it syncs: a tree
                        # that does not match leaves the database as it was.
                        writer.seal()
                        begin_check()
                        checked_early = self._check_staged(writer, path, trailer, outcome, prefix, meter)
                    writer.commit()
        finally:
            if verifying is not None:  # the restore failed first: its error is the one raised
                stop_verifying.set()
                verifying.join()
        if writer is None:
            with self._db.write_transaction() as txn:
                trailer = scan(
                    restorer(
                        lambda name, source: self._restore_tree(txn, source, name, prefix, options, stats),
                        lambda name: name in txn.tree_names(),
                    )
                )

        try:
            if options.verify_after_restore:
                if meter.phase != "check":
                    begin_check()
                self._verify_restored(path, trailer, outcome, prefix, scan, meter, checked_early)
                stats.verified = True
            meter.end()
        except BackupError:
            raise  # its message says whether the restore was applied
        except BaseException as e:  # the progress callback's, or an interrupt
            if hasattr(e, "add_note"):  # Python >= 3.11
                e.add_note("datafold: the restore was already committed when this was raised")
            raise
        stats.duration_s = time.perf_counter() - started
        return stats

    def _restore_tree(
        self,
        txn: WriteTransaction,
        reader: Any,
        name: str,
        prefix: bytes | None,
        options: RestoreOptions,
        stats: RestoreStats,
    ) -> _TreeOutcome:
        txn.create_tree(name)
        result = _TreeOutcome(was_empty=next(iter(txn.items(name)), None) is None)
        overwrite = options.overwrite_existing
        # A batch goes to the store in one call when no per-record outcome is needed: every record
        # is written (overwrite) or none can be skipped (the tree was empty), and errors abort.
        batched = not options.continue_on_errors and (overwrite or result.was_empty)
        while batch := reader.read_items(READ_BATCH):
            if prefix is not None:
                batch = [item for item in batch if item[0].startswith(prefix)]
            if batched:
                # Keys in a batch are distinct, so its PUTs and DELETEs can go in two steps.
                if None in map(operator.itemgetter(1), batch):
                    deletes = [key for key, value in batch if value is None]
                    for key in deletes:
                        txn.delete(name, key)
                    stats.items_restored += len(deletes)
                    result.had_deletes = True
                    batch = [item for item in batch if item[1] is not None]
                written, skipped = txn.put_many(name, batch, overwrite)
                stats.items_restored += written
                stats.items_skipped += skipped
                continue
            for key, value in batch:
                try:
                    if value is None:
                        txn.delete(name, key)
                        stats.items_restored += 1
                        result.had_deletes = True
                    elif txn.put(name, key, value, overwrite):
                        stats.items_restored += 1
                    else:
                        stats.items_skipped += 1
                        result.unchecked.add(key)
                except StoreError as e:
                    if not options.continue_on_errors:
                        raise
                    stats.errors.append(f"tree {name!r}, key {key[:64].hex()}: {e}")
                    result.unchecked.add(key)
        return result

    def _check_destination(self, path: str, what: str, reads: Iterable[str | None]) -> None:
        """Refuses to write a backup over a file of the database or over a backup this call reads."""
        for own in self._db.files:
            if _same_file(path, own):
                raise InvalidArgumentError(
                    f"{what} {path} is a file of the database {self._db.path}; choose another path"
                )
        for backup in reads:
            if backup is not None and _same_file(path, backup):
                alias = "" if os.path.abspath(path) == os.path.abspath(backup) else f" ({backup})"
                raise InvalidArgumentError(f"{what} {path} is a backup this call reads{alias}; choose another path")

    def _safety_backup(
        self,
        path: str,
        chain_paths: list[str | None],
        targets: list[str],
        prefix: bytes | None,
        options: RestoreOptions,
        scan: Callable[..., Any],
        meter: Meter,
    ) -> str:
        """Backs up the current state of what restoring `path` would touch: the present values
        (PUT) and, as DELETE records, the backup's keys that the database does not hold yet — so
        restoring the safety backup with overwrite_existing=True gives back the prior state."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        base = os.path.basename(path)
        safety = options.safety_backup_path or os.path.join(
            os.path.dirname(os.path.abspath(path)), f"{base}.pre-restore-{stamp}.dfb"
        )
        self._check_destination(safety, "safety_backup_path", chain_paths)
        scan_prefix = prefix or b""

        def fill(writer: Any) -> None:
            def visit(name: str, reader: Any) -> None:
                if name not in targets:
                    return
                writer.begin_tree(name)
                writer.add_items(self._db.items(name, scan_prefix))
                writer.add_deletes(self._absent_keys(name, reader, scan_prefix))
                writer.end_tree()

            scan(visit, "safety")

        option_doc = {"purpose": f"safety backup taken before restoring {base}", "key_prefix_filter": scan_prefix.hex()}
        self._write_backup(safety, targets, option_doc, fill, self._core.DEFAULT_SEGMENT_SIZE, True, meter)
        return safety

    def _absent_keys(self, name: str, reader: Any, prefix: bytes) -> Iterator[bytes]:
        while batch := reader.read_items(READ_BATCH):
            for key, _ in batch:
                if key.startswith(prefix) and self._db.get(name, key) is None:
                    yield key

    def _check_staged(
        self,
        writer: Any,
        path: str,
        trailer: Trailer | None,
        outcome: dict[str, _TreeOutcome],
        prefix: bytes | None,
        meter: Meter,
    ) -> set[str]:
        """_verify_restored's check by TREE_END digest, of the trees a sealed staged writer holds
        (core.LmdbWriter.tree_digests: several trees at once), before its file is published; the
        names of those trees."""
        backup_key = self._file_key(path)
        expected = _tree_ends(trailer)
        names = [n for n, result in outcome.items() if n in expected and _checked_by_tree_end(result, prefix)]
        indices = [outcome[n].index for n in names]
        digests = writer.tree_digests(indices, backup_key, threads=self._threads) if names else []
        for name, got in zip(names, digests, strict=True):
            _compare_digests(name, tuple(got), expected[name], applied=False)
            meter.add_items(expected[name][0])
        return set(names)

    def _verify_restored(
        self,
        path: str,
        trailer: Trailer | None,
        outcome: dict[str, _TreeOutcome],
        prefix: bytes | None,
        scan: Callable[..., Any],
        meter: Meter,
        checked: set[str],
    ) -> None:
        """Reads back what the restore wrote, but the trees `checked` already. A tree restored
        whole into an empty tree is compared by digest: with its TREE_END's digest (a single file
        without DELETE records), else with the digest of the PUT records of a second pass over the
        backup (for a chain: its merged state). Any other tree is compared item by item against
        that second pass."""
        if not outcome.keys() - checked:
            return
        backup_key = self._file_key(path)
        expected = _tree_ends(trailer)

        def database_digest(snap: ReadSnapshot, name: str) -> tuple[int, int, bytes]:
            return tuple(self._core.digest_batches(backup_key, meter.count_batches(snap.batches(name))))

        with self._db.snapshot() as snap:
            second_pass = []
            for name, result in outcome.items():
                if name in checked:
                    continue
                if name in expected and _checked_by_tree_end(result, prefix):
                    _compare_digests(name, database_digest(snap, name), expected[name])
                else:
                    second_pass.append(name)
            if not second_pass:
                return

            def visit(name: str, reader: Any) -> None:
                if name not in second_pass:
                    return
                batches = iter(lambda: reader.read_items(READ_BATCH), [])
                if _restored_whole(outcome[name], prefix):
                    puts = (item for batch in batches for item in batch if item[1] is not None)
                    want = tuple(self._core.digest_items(backup_key, puts))
                    _compare_digests(name, database_digest(snap, name), want)
                    return
                skip = outcome[name].unchecked
                for batch in batches:
                    for key, value in batch:
                        if (prefix is not None and not key.startswith(prefix)) or key in skip:
                            continue
                        if snap.get(name, key) != value:
                            raise DatabaseError(
                                f"tree {name!r}, key {key[:64].hex()}: the database does not hold what the "
                                "restore wrote; check the storage and restore again"
                            )

            scan(visit)


def _restore_tree_native(
    writer: Any, reader: Any, name: str, prefix: bytes | None, options: RestoreOptions, stats: RestoreStats
) -> _TreeOutcome:
    """_restore_tree through a core.LmdbWriter: the Rust reader writes the records itself."""
    index, was_empty = writer.open_tree(name)
    result = _TreeOutcome(was_empty=was_empty, index=index)
    while True:
        written, skipped, deleted, skipped_keys, ended = reader.write_items(
            writer, index, prefix=prefix, overwrite=options.overwrite_existing
        )
        stats.items_restored += written + deleted
        stats.items_skipped += skipped
        result.unchecked.update(skipped_keys)
        result.had_deletes |= deleted > 0
        if ended:
            return result


class _TreeOutcome:
    __slots__ = ("was_empty", "had_deletes", "unchecked", "index")

    def __init__(self, was_empty: bool, index: int | None = None) -> None:
        self.was_empty = was_empty
        self.had_deletes = False
        # Keys whose database value need not equal the backup's: skipped or failed.
        self.unchecked: set[bytes] = set()
        self.index = index  # the tree's index in a core.LmdbWriter


def _tree_ends(trailer: Trailer | None) -> dict[str, tuple[int, int, bytes]]:
    """tree name -> (items, bytes, digest) of its TREE_END, from a single file's trailer."""
    return {name: (items, nbytes, digest) for name, items, nbytes, digest in (trailer or (0, 0, []))[2]}


def _restored_whole(result: _TreeOutcome, prefix: bytes | None) -> bool:
    """The tree was restored whole (no prefix, no record skipped or failed) into an empty tree."""
    return result.was_empty and prefix is None and not result.unchecked


def _checked_by_tree_end(result: _TreeOutcome, prefix: bytes | None) -> bool:
    """The tree now holds exactly its PUT records in the backup: restored whole, from a file
    without DELETE records for it."""
    return _restored_whole(result, prefix) and not result.had_deletes


def _compare_digests(
    name: str, got: tuple[int, int, bytes], want: tuple[int, int, bytes], *, applied: bool = True
) -> None:
    """DatabaseError unless the tree as written (`applied`: in the database, else in the staged
    file that was to replace it) has the backup's digest."""
    if got == want:
        return
    if applied:
        raise DatabaseError(
            f"tree {name!r} does not match the backup after the restore "
            f"({got[0]} items in the database, {want[0]} in the backup): "
            "the restore was committed, and since then another writer changed the tree or the storage "
            "dropped or altered data; check for other writers and the storage, and restore again"
        )
    raise DatabaseError(
        f"tree {name!r} did not read back as the backup holds it ({got[0]} items written, "
        f"{want[0]} in the backup): the restore was not applied and the database is as it was; "
        "check the storage and restore again"
    )


def _check_options(options: Any, cls: type, name: str) -> Any:
    if options is None:
        return cls()
    if not isinstance(options, cls):
        raise ArgumentTypeError(f"{name} must be a {cls.__name__}, not {type(options).__name__}")
    return options


def _filter_doc(options: BackupOptions) -> dict[str, Any]:
    """What a backup holds, as its metadata records it (the `options` of docs/FORMAT.md §5)."""
    prefix = options.key_prefix
    return {
        "tree_filter": sorted(options.tree_filter) if options.tree_filter is not None else None,
        "key_prefix_filter": prefix.hex() if prefix is not None else None,
        "include_metadata": options.include_metadata,
    }


def _chain_filters(options: BackupOptions, chain: list[BackupMetadata]) -> BackupOptions:
    """`options` with the filters of the chain's full backup; InvalidArgumentError if `options`
    asks for other ones (an incremental must cover what its chain covers)."""
    base = chain[0].options
    try:
        prefix_hex = base.get("key_prefix_filter")
        inherited: dict[str, Any] = {
            "tree_filter": base.get("tree_filter"),
            "key_prefix_filter": bytes.fromhex(prefix_hex) if prefix_hex is not None else None,
            "include_metadata": bool(base.get("include_metadata", True)),
        }
    except (TypeError, ValueError, AttributeError) as e:
        raise IntegrityError(f"the filters recorded in backup {chain[0].backup_id} are malformed: {e}") from e
    given = _filter_doc(options)
    wanted = {**inherited, "key_prefix_filter": prefix_hex}
    defaults = _filter_doc(BackupOptions())
    for name, value in given.items():
        if value != defaults[name] and value != wanted[name]:
            raise InvalidArgumentError(
                f"{name}: an incremental backup uses the filters of its chain's full backup "
                f"({chain[0].backup_id}: {name}={wanted[name]!r}); leave {name} at its default or give the same value"
            )
    return dataclasses.replace(options, **inherited)
