"""Native restores: with the Rust core, a restore of one backup into an LMDB store writes its records
through the core's own LMDB (src/lmdb_write.rs) after the store hands its environment over, and must
leave exactly what the py-lmdb path leaves, with the same stats and the same errors."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import lmdb
import pytest
from datafold import EncryptedBackupManager, MasterKeyPair, RestoreOptions
from datafold import manager as manager_module
from datafold.core import load_core
from datafold.errors import ArgumentTypeError, BackupError, DatabaseError, IntegrityError, StoreError
from datafold.stores import DbOperations
from datafold.stores import lmdb as lmdb_store
from helpers import SEED, NativeSpy, flip_byte, sample_data, segment_offset, snapshot, text_items

rust = pytest.importorskip("datafold._core")
pytestmark = pytest.mark.skipif(load_core().CORE_NAME != "rust", reason="native restores need the Rust core")

MiB = 1 << 20
KEYS = MasterKeyPair.from_private_bytes(SEED)


def manager(db: DbOperations) -> EncryptedBackupManager:
    return EncryptedBackupManager(db, KEYS, core="rust")


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A backup of sample_data() plus a tree of 100,000 text records."""
    with DbOperations.open(tmp_path / "src") as db:
        for tree, records in sample_data().items():
            db.put_many(tree, records.items())
        db.put_many("text", text_items(100_000))
        manager(db).create_backup(tmp_path / "src.dfb")
    return tmp_path / "src.dfb"


def restore_both(tmp_path: Path, backup: Path, options: RestoreOptions, prepare: Any = None) -> list[Any]:
    """Restores `backup` into two databases, natively and through py-lmdb; (stats, content) of each."""
    out = []
    for native in (True, False):
        path = tmp_path / f"target-{native}"
        with DbOperations.open(path, native_restore=native) as db:
            if prepare is not None:
                prepare(db)
            stats = manager(db).restore_backup(backup, options)
            out.append((stats.items_restored, stats.items_skipped, stats.trees_restored, snapshot(db)))
    return out


@pytest.mark.parametrize(
    "options",
    [
        RestoreOptions(),
        RestoreOptions(verify_before_restore=False, verify_after_restore=False),
        RestoreOptions(overwrite_existing=True),
        RestoreOptions(key_prefix_filter=b"user:00000001"),
        RestoreOptions(tree_filter=["text"]),
    ],
    ids=["defaults", "no-verify", "overwrite", "prefix", "tree-filter"],
)
@pytest.mark.parametrize("into", ["empty", "non-empty"])
def test_native_restore_equals_the_py_lmdb_path(
    tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch, options: RestoreOptions, into: str
) -> None:
    def prepare(db: DbOperations) -> None:
        if into == "non-empty":
            # Some keys the backup has (kept unless overwrite), some it has not, out of order.
            db.put_many("text", [(b"user:000000000005", b"old"), (b"zzz", b"mine"), (b"a", b"first")])
            db.put_many("other", [(b"k", b"v")])

    spy = NativeSpy(monkeypatch)
    native, plain = restore_both(tmp_path, source, options, prepare)
    assert native == plain
    assert spy.writers == 1 and spy.records == native[0] > 0
    assert spy.staged == (into == "empty")  # a new data file only for a database with no tree
    if into == "non-empty" and options.tree_filter is None and options.key_prefix_filter is None:
        assert native[1] == (0 if options.overwrite_existing else 1)  # user:...05 kept or overwritten


def test_native_restore_applies_deletes(tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A safety backup holds DELETE records (keys the database lacked); restoring it puts them back."""
    with DbOperations.open(tmp_path / "target") as db:
        db.put_many("text", [(b"user:000000000005", b"old")])
        before = snapshot(db)
        stats = manager(db).restore_backup(source, RestoreOptions(overwrite_existing=True, backup_before_restore=True))
        assert stats.safety_backup_path
        spy = NativeSpy(monkeypatch)
        manager(db).restore_backup(stats.safety_backup_path, RestoreOptions(overwrite_existing=True))
        assert spy.writers == 1
        # Every key back as it was (the trees the restore created stay, empty).
        assert {tree: items for tree, items in snapshot(db).items() if items} == before


@pytest.mark.parametrize("into", ["empty", "non-empty"])
def test_damage_met_mid_restore_leaves_the_database_unchanged(tmp_path: Path, source: Path, into: str) -> None:
    with DbOperations.open(tmp_path / "target") as db:
        if into == "non-empty":
            db.put_many("text", [(b"a", b"first")])
        before = snapshot(db)
        data = tmp_path / "target" / "data.mdb"
        raw, inode = data.read_bytes(), data.stat().st_ino
        flip_byte(source, segment_offset(source, 1 << 20, 1) + 100)
        with pytest.raises(IntegrityError):
            manager(db).restore_backup(source, RestoreOptions(verify_before_restore=False))
        assert snapshot(db) == before
        assert data.read_bytes()[: 2 * 4096] == raw[: 2 * 4096]  # the meta pages: nothing committed
        assert data.stat().st_ino == inode  # an empty database's staging file was dropped
        assert sorted(os.listdir(tmp_path / "target")) == ["data.mdb", "lock.mdb"]


def test_a_restore_into_an_empty_database_replaces_its_data_file(tmp_path: Path, source: Path) -> None:
    """Staged: the records go to a new file, committed every 16 MiB, renamed over data.mdb; the
    file keeps data.mdb's permissions and extended attributes, and a staging file a crash left
    behind is removed."""
    assert rust.LmdbWriter.STAGING_FILE == lmdb_store.STAGING_FILE == "data.mdb.datafold-restore"
    path = tmp_path / "target"
    DbOperations.open(path).close()
    data = path / "data.mdb"
    data.chmod(0o600)
    try:  # an attribute as an ACL or a security label would be
        os.setxattr(data, "user.datafold-test", b"kept")
        attributes = [("user.datafold-test", b"kept")]
    except OSError:  # a file system without user attributes
        attributes = []
    inode = data.stat().st_ino
    (path / "data.mdb.datafold-restore").write_bytes(b"left by a crash")
    with DbOperations.open(path) as db:
        assert not (path / "data.mdb.datafold-restore").exists()  # the open removes it
        (path / "data.mdb.datafold-restore").write_bytes(b"left by a crash")
        stats = manager(db).restore_backup(source)
        assert stats.verified and db.count("text") == 100_000
        assert data.stat().st_ino != inode and data.stat().st_mode & 0o777 == 0o600
        assert [(name, os.getxattr(data, name)) for name in os.listxattr(data)] == attributes
        assert sorted(os.listdir(path)) == ["data.mdb", "lock.mdb"]
        # The database holds trees now: the next restore writes in its own transaction.
        inode = data.stat().st_ino
        again = manager(db).restore_backup(source, RestoreOptions(overwrite_existing=True))
        assert again.items_restored == stats.items_restored and data.stat().st_ino == inode


def test_a_staged_restore_is_checked_before_it_replaces_the_data_file(
    tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verify_after_restore reads a staged restore back from its new file (while that syncs), before
    the file is renamed over data.mdb: a tree that does not read back as the backup holds it leaves
    the database as it was."""
    path = tmp_path / "target"
    staging = path / lmdb_store.STAGING_FILE
    carol = sample_data()["users"][b"carol"]
    check_staged = EncryptedBackupManager._check_staged

    def after_the_disk_altered_a_value(self: EncryptedBackupManager, *args: Any) -> set[str]:
        raw = staging.read_bytes()
        at = raw.index(carol)
        with open(staging, "r+b") as f:
            f.seek(at)
            f.write(bytes([raw[at] ^ 1]))
        return check_staged(self, *args)

    with DbOperations.open(path) as db:
        data = path / "data.mdb"
        inode = data.stat().st_ino
        monkeypatch.setattr(EncryptedBackupManager, "_check_staged", after_the_disk_altered_a_value)
        with pytest.raises(DatabaseError, match="tree 'users' did not read back .* the restore was not applied"):
            manager(db).restore_backup(source)
        assert db.tree_names() == [] and data.stat().st_ino == inode
        assert sorted(os.listdir(path)) == ["data.mdb", "lock.mdb"]
        monkeypatch.undo()
        assert manager(db).restore_backup(source).verified
        assert db.get("users", b"carol") == carol


@pytest.mark.parametrize("outcome", ["passes", "fails"])
@pytest.mark.parametrize("into", ["empty", "non-empty", "empty, threads=1"])
def test_verify_before_restore_ends_before_the_database_changes(
    tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch, into: str, outcome: str
) -> None:
    """Into an empty database the verify pass runs beside the staged write, into any other (or with a
    given number of threads) before the write; either way it ends before the database changes, and
    a pass that fails changes nothing."""
    options = RestoreOptions(threads=1 if "threads=1" in into else 0)
    path = tmp_path / "target"
    data = path / "data.mdb"
    seen: list[tuple[str, int, int]] = []
    spy = NativeSpy(monkeypatch)
    verify_file = EncryptedBackupManager._verify_file

    def slow_verify(self: EncryptedBackupManager, *args: Any) -> Any:
        time.sleep(0.5)  # long after the records are written
        seen.append((threading.current_thread().name, data.stat().st_ino, spy.writers))
        if outcome == "fails":
            raise IntegrityError("the verify pass failed")
        return verify_file(self, *args)

    monkeypatch.setattr(EncryptedBackupManager, "_verify_file", slow_verify)
    with DbOperations.open(path) as db:
        if into == "non-empty":
            db.put_many("other", [(b"k", b"v")])
        before, inode = snapshot(db), data.stat().st_ino
        if outcome == "fails":
            with pytest.raises(IntegrityError, match="the verify pass failed"):
                manager(db).restore_backup(source, options)
            assert snapshot(db) == before and data.stat().st_ino == inode
            assert sorted(os.listdir(path)) == ["data.mdb", "lock.mdb"]
        else:
            assert manager(db).restore_backup(source, options).verified
            assert db.count("text") == 100_000
    if into == "empty":
        assert seen == [("datafold-verify", inode, 1)]  # beside the writer, before data.mdb changed
    else:
        assert seen == [(threading.current_thread().name, inode, 0)]  # before the writer opened


def test_a_failed_staged_restore_stops_the_verify_pass_beside_it(
    tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ended: list[BaseException] = []
    verify_file = EncryptedBackupManager._verify_file

    def late_verify(self: EncryptedBackupManager, *args: Any) -> Any:
        time.sleep(0.3)  # the restore has failed by now
        try:
            return verify_file(self, *args)
        except BaseException as e:
            ended.append(e)
            raise

    def failing_write(*args: Any) -> Any:
        raise StoreError("the disk is full")

    monkeypatch.setattr(EncryptedBackupManager, "_verify_file", late_verify)
    monkeypatch.setattr(manager_module, "_restore_tree_native", failing_write)
    with DbOperations.open(tmp_path / "target") as db:
        with pytest.raises(StoreError, match="the disk is full"):
            manager(db).restore_backup(source)
        assert db.tree_names() == []
    # The pass ended at its first read after the failure, not at the end of the file.
    assert [str(e) for e in ended] == ["the pass was stopped"]


@pytest.mark.parametrize("fails_in", ["reserve", "progress"])
def test_a_restore_that_fails_before_writing_leaves_no_verify_pass_running(
    tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch, fails_in: str
) -> None:
    """The verify pass beside a staged restore starts only where a failure stops and joins it."""

    def fail(*args: Any, **kwargs: Any) -> None:
        raise StoreError("failed on purpose")

    progress = None
    if fails_in == "reserve":
        monkeypatch.setattr(DbOperations, "reserve", fail)
    else:
        progress = lambda event: fail() if event.phase == "verify" else None  # noqa: E731
    with DbOperations.open(tmp_path / "target") as db:
        with pytest.raises(StoreError, match="failed on purpose"):
            manager(db).restore_backup(source, progress=progress)
        assert [t.name for t in threading.enumerate() if t.name == "datafold-verify"] == []
        assert db.tree_names() == []


def test_large_values_are_staged_through_the_map(tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Records of more than half a page on average go to a staging file written through its map
    (LmdbWriter stage_writemap), cut to the pages in use before it replaces data.mdb."""
    rnd = random.Random(SEED)
    with DbOperations.open(tmp_path / "big") as db:
        db.put_many("blobs", [(f"blob:{i:05d}".encode(), rnd.randbytes(9000)) for i in range(500)])
        manager(db).create_backup(tmp_path / "big.dfb")
    through_map = []
    hand_over = lmdb_store._SharedEnv.hand_over

    def spy(self: Any, *, stage_writemap: bool = False) -> Any:
        through_map.append(stage_writemap)
        return hand_over(self, stage_writemap=stage_writemap)

    monkeypatch.setattr(lmdb_store._SharedEnv, "hand_over", spy)
    native, plain = restore_both(tmp_path, tmp_path / "big.dfb", RestoreOptions())
    assert native == plain and native[0] == 500
    size = (tmp_path / "target-True" / "data.mdb").stat().st_size
    assert size % 4096 == 0 and 500 * 9000 < size < 2 * 500 * 9000  # not the map size
    with DbOperations.open(tmp_path / "small-records") as db:
        manager(db).restore_backup(source)
    assert through_map == [True, False]


def test_unstorable_keys_fail_like_the_py_lmdb_path(tmp_path: Path) -> None:
    """A SQLite database may hold a key LMDB cannot store: StoreError, nothing written."""
    with DbOperations.open(tmp_path / "src.sqlite", "sqlite") as db:
        db.put_many("t", [(b"a", b"1"), (b"k" * 600, b"2")])
        manager(db).create_backup(tmp_path / "long.dfb")
    errors = []
    for native in (True, False):
        with DbOperations.open(tmp_path / f"target-{native}", native_restore=native) as db:
            with pytest.raises(StoreError, match="key is 600 bytes; LMDB keys are at most 511 bytes") as e:
                manager(db).restore_backup(tmp_path / "long.dfb")
            errors.append(e)
            assert db.tree_names() == []


def test_writemap_store(tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = NativeSpy(monkeypatch)
    with DbOperations.open(tmp_path / "wm", writemap=True) as db:
        manager(db).restore_backup(source)
        got = snapshot(db)
    with DbOperations.open(tmp_path / "plain", native_restore=False) as db:
        manager(db).restore_backup(source)
        assert snapshot(db) == got
    assert spy.writers == 1


def test_the_store_works_after_a_native_restore(tmp_path: Path, source: Path) -> None:
    """The store reopened its py-lmdb environment: reads, writes, snapshots, and another process."""
    path = tmp_path / "target"
    with DbOperations.open(path) as db, DbOperations.open(path) as second:
        manager(db).restore_backup(source)
        assert db.get("text", b"user:000000000005") is not None
        second.put("text", b"new", b"v")
        with db.snapshot() as snap:
            assert snap.get("text", b"new") == b"v"
        code = f"""
            import lmdb
            env = lmdb.open({os.fspath(path)!r}, max_dbs=8, map_size=1 << 30)
            with env.begin(write=True) as t:
                db = env.open_db(b"text", txn=t)
                assert t.get(b"new", db=db) == b"v"
                t.put(b"other", b"process", db=db)
            """
        subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=True)
        assert db.get("text", b"other") == b"process"
    with DbOperations.open(path) as db:
        assert db.get("text", b"other") == b"process"


def test_another_process_holding_the_environment_means_py_lmdb(
    tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The two LMDB builds' lock files differ: the core's LMDB refuses an environment another process
    has open, and the restore goes through py-lmdb instead."""
    path = tmp_path / "target"
    DbOperations.open(path).close()
    code = f"""
        import lmdb, sys
        env = lmdb.open({os.fspath(path)!r}, max_dbs=8)
        print("open", flush=True)
        sys.stdin.read()
        """
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "open\n"
        spy = NativeSpy(monkeypatch)
        with DbOperations.open(path) as db:
            stats = manager(db).restore_backup(source)
            assert stats.verified and spy.writers == 0
            assert db.count("text") == 100_000
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    assert holder.returncode == 0


def test_reads_in_other_threads_during_native_restores(tmp_path: Path) -> None:
    """Each native restore closes and reopens the environment; reads in other threads meanwhile
    wait, then get tree handles published before their transaction (never one opened in a read
    transaction, nor one from the closed environment)."""
    with DbOperations.open(tmp_path / "src") as src:
        src.put_many("t", [(b"%06d" % i, b"v" * 50) for i in range(5000)])
        manager(src).create_backup(tmp_path / "b.dfb")
    errors: list[str] = []
    stop = time.monotonic() + 3.0
    with DbOperations.open(tmp_path / "db") as db:
        db.put("t", b"x", b"1")

        def restorer() -> None:
            while time.monotonic() < stop:
                try:
                    manager(db).restore_backup(tmp_path / "b.dfb", RestoreOptions(overwrite_existing=True))
                except BackupError as e:
                    errors.append(f"restore: {e}")

        def reader() -> None:
            while time.monotonic() < stop:
                try:
                    db.get("t", b"000001")
                    with db.snapshot() as snap:
                        snap.get("t", b"000001")
                    db.count("t")
                    next(iter(db.items("t")), None)
                except BackupError as e:
                    errors.append(f"reader: {e}")
                time.sleep(0.002)  # lets the restorer take the environment over now and then

        threads = [threading.Thread(target=restorer), threading.Thread(target=reader)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert db.count("t") == 5001


def test_hand_over_waits_for_or_skips_open_transactions(tmp_path: Path) -> None:
    path = tmp_path / "db"
    with DbOperations.open(path) as db:
        db.put("t", b"k", b"v")
        # This thread holds a snapshot: no hand-over.
        with db.snapshot(), db._native_writer() as writer:
            assert writer is None
        # Another thread holds one: no hand-over either, at once (a restore never waits for it).
        started, release = threading.Event(), threading.Event()

        def hold() -> None:
            with db.snapshot():
                started.set()
                release.wait(10)

        t = threading.Thread(target=hold)
        t.start()
        started.wait(10)
        begun = time.monotonic()
        with db._native_writer() as writer:
            assert writer is None
        assert time.monotonic() - begun < 5
        release.set()
        t.join()
        # Handed over: this thread may not use the store meanwhile; another thread waits for it.
        seen: list[bytes | None] = []
        with db._native_writer() as writer:
            assert isinstance(writer, rust.LmdbWriter)
            with pytest.raises(StoreError, match="handed the database to a native restore"):
                db.get("t", b"k")
            # Another process opening it meanwhile is refused, not handed a lock table it misreads.
            code = f"""
                import lmdb
                try:
                    lmdb.open({os.fspath(path)!r}, max_dbs=8)
                except lmdb.VersionMismatchError:
                    print("refused")
                """
            run = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)
            assert run.stdout == "refused\n", run.stderr
            reader = threading.Thread(target=lambda: seen.append(db.get("t", b"k2")))
            sizer = threading.Thread(target=lambda: seen.append(db.reserve(1 << 20) is None))
            reader.start()
            sizer.start()
            time.sleep(0.2)
            assert seen == []  # both waiting
            index, was_empty = writer.open_tree("t")
            assert not was_empty
            writer.commit()
        reader.join(10)
        sizer.join(10)
        assert sorted(seen, key=repr) == [None, True]
        # A writer left without commit rolls back.
        with db._native_writer() as writer:
            assert writer is not None
            writer.open_tree("new")
        assert db.tree_names() == ["t"]


def test_option_native_restore_is_a_bool(tmp_path: Path) -> None:
    with pytest.raises(ArgumentTypeError, match="native_restore"):
        DbOperations.open(tmp_path / "db", native_restore="yes")


def test_a_native_restore_is_read_back_by_py_lmdb(tmp_path: Path, source: Path) -> None:
    """Page by page what the core's LMDB wrote is a database py-lmdb reads (and checks with mdb_stat)."""
    with DbOperations.open(tmp_path / "target") as db:
        manager(db).restore_backup(source, RestoreOptions(verify_after_restore=False))
    env = lmdb.open(os.fspath(tmp_path / "target"), max_dbs=8, readonly=True)
    with env.begin() as txn:
        db = env.open_db(b"text", txn=txn)
        assert txn.stat(db)["entries"] == 100_000
        assert list(txn.cursor(db)) == text_items(100_000)
    env.close()


@pytest.mark.parametrize("overwrite", [False, True])
def test_native_chain_restore_equals_the_py_lmdb_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overwrite: bool
) -> None:
    """A full backup and two incrementals: deleted keys, a deleted tree, a tree that came back."""
    from datafold import BackupMode, BackupOptions

    src = tmp_path / "src"
    with DbOperations.open(src) as db:
        db.put_many("text", text_items(20_000))
        db.put_many("gone", [(b"a", b"1"), (b"b", b"2")])
        manager(db).create_backup(tmp_path / "0.dfb")
        db.delete("text", b"user:000000000007")
        db.put("text", b"user:000000000008", b"changed")
        manager(db).create_backup(
            tmp_path / "1.dfb", BackupOptions(mode=BackupMode.INCREMENTAL, parent=tmp_path / "0.dfb")
        )
    raw = lmdb.open(os.fspath(src), max_dbs=8)
    with raw.begin(write=True) as txn:
        txn.drop(raw.open_db(b"gone", txn=txn), delete=True)
    raw.close()
    with DbOperations.open(src) as db:
        db.put("text", b"new", b"key")
        manager(db).create_backup(
            tmp_path / "2.dfb", BackupOptions(mode=BackupMode.INCREMENTAL, parent=tmp_path / "1.dfb")
        )
        want = snapshot(db)

    def prepare(db: DbOperations) -> None:
        db.put_many("text", [(b"user:000000000007", b"mine"), (b"user:000000000009", b"old"), (b"zzz", b"kept")])
        db.put_many("gone", [(b"a", b"target's")])

    spy = NativeSpy(monkeypatch)
    native, plain = restore_both(tmp_path, tmp_path / "2.dfb", RestoreOptions(overwrite_existing=overwrite), prepare)
    assert native == plain
    assert spy.writers == 1 and spy.records > 0
    content = native[3]
    assert dict(content["text"])[b"new"] == b"key"
    assert b"user:000000000007" not in dict(content["text"])  # the chain deleted it
    assert dict(content["text"])[b"zzz"] == b"kept"
    assert dict(content["text"])[b"user:000000000009"] == (
        dict(want["text"])[b"user:000000000009"] if overwrite else b"old"
    )


def _holder(path: Path, code: str) -> subprocess.Popen[str]:
    """A process running `code` with `path` (bytes) and datafold's _core."""
    script = f"""
        import os, sys, time
        from datafold import _core
        path = os.fsencode({os.fspath(path)!r})
        """
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script) + textwrap.dedent(code)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_a_writer_works_only_on_its_thread_and_may_be_freed_on_any(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LMDB ties a write transaction to the thread that began it: the writer refuses other threads
    with a StoreError, and once closed it may be freed anywhere (as a kept traceback that holds it
    is, on whichever thread collects it) without a word on stderr."""
    path = tmp_path / "db"
    DbOperations.open(path).close()
    unraisable: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    writer = rust.LmdbWriter(os.fsencode(path), map_size=1 << 26, max_dbs=8, max_readers=16, writemap=False)
    index, _ = writer.open_tree("t")
    errors: list[BaseException] = []

    def elsewhere(writer: Any) -> None:
        for use in (lambda: writer.open_tree("u"), lambda: writer.records, writer.commit, writer.close):
            try:
                use()
            except BaseException as e:  # noqa: BLE001 - the test looks at every kind
                errors.append(e)

    thread = threading.Thread(target=elsewhere, args=(writer,))
    thread.start()
    thread.join()
    assert [type(e) for e in errors] == [StoreError] * 4
    assert all("only be used on the thread that began it" in str(e) for e in errors)
    assert writer.records == 0 and writer.max_key_size > 0
    writer.close()
    assert writer.records == 0 and not writer.committed

    box = [writer]
    del writer
    thread = threading.Thread(target=box.clear)  # the last reference goes on another thread
    thread.start()
    thread.join()
    assert unraisable == []
    with DbOperations.open(path) as db:  # nothing left locked or open
        db.put("t", b"k", b"v")
        assert db.get("t", b"k") == b"v"


def test_opening_during_another_process_native_restore_says_so(tmp_path: Path) -> None:
    path = tmp_path / "db"
    with DbOperations.open(path) as db:
        db.put("t", b"k", b"v")  # not empty: the writer writes in place
    holder = _holder(
        path,
        """
        writer = _core.LmdbWriter(path, map_size=1 << 26, max_dbs=8, max_readers=16, writemap=False)
        assert not writer.staged
        print("open", flush=True)
        sys.stdin.read()
        writer.close()
        """,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "open\n"
        with pytest.raises(StoreError, match="another process has it open with a different LMDB build"):
            DbOperations.open(path)
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    assert holder.returncode == 0
    DbOperations.open(path).close()


def test_a_staged_restore_in_another_process_keeps_the_database_to_itself(tmp_path: Path) -> None:
    """An empty database is written through a new data file: meanwhile an open fails on the
    lock-file format as above, and afterwards it sees the new file whole."""
    path = tmp_path / "db"
    DbOperations.open(path).close()
    holder = _holder(
        path,
        """
        writer = _core.LmdbWriter(path, map_size=1 << 26, max_dbs=8, max_readers=16, writemap=False)
        assert writer.staged
        index, was_empty = writer.open_tree("t")
        assert was_empty
        print("open", flush=True)
        sys.stdin.readline()
        writer.commit()
        print("done", flush=True)
        sys.stdin.read()
        """,
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline() == "open\n"
        assert os.path.exists(path / "data.mdb.datafold-restore")
        with pytest.raises(StoreError, match="another process has it open with a different LMDB build"):
            DbOperations.open(path)
        holder.stdin.write("commit\n")
        holder.stdin.flush()
        assert holder.stdout.readline() == "done\n"
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    assert holder.returncode == 0
    assert sorted(os.listdir(path)) == ["data.mdb", "lock.mdb"]
    with DbOperations.open(path) as db:
        assert db.tree_names() == ["t"]


def test_a_path_that_is_not_utf8_and_too_few_max_dbs(
    tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = NativeSpy(monkeypatch)
    odd = os.fsdecode(os.fsencode(tmp_path) + b"/db-\xff")
    with DbOperations.open(odd) as db:
        manager(db).restore_backup(source)
        assert db.count("text") == 100_000
    assert spy.writers == 1
    # More trees than max_dbs allows: StoreError saying which option, in the same words through the
    # core's LMDB and through py-lmdb; nothing written.
    messages = []
    for native in (True, False):
        with DbOperations.open(tmp_path / f"few-{native}", max_dbs=2, native_restore=native) as db:
            with pytest.raises(StoreError, match="max_dbs") as info:
                manager(db).restore_backup(source)
            assert db.tree_names() == []
            messages.append(str(info.value))
    assert messages[0] == messages[1]
