"""Crash safety: a create_backup or restore_backup process killed with SIGKILL half-way leaves no
backup file (and no temporary file) and an unchanged database.

Each test runs the operation in a child process (sys.executable, DATAFOLD_CORE selecting the core)
that writes a marker file once it is well under way and then slows down, so the parent's kill lands
in the middle of the operation, however fast the machine.
"""

# The fixtures imported from helpers are pytest fixtures: test arguments "redefine" them.
# ruff: noqa: F811

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from datafold import DbOperations, EncryptedBackupManager, MasterKeyPair, RestoreOptions
from helpers import SEED, backend, db_location, snapshot  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow

KiB = 1 << 10
MiB = 1 << 20

CREATE_CHILD = """
import os, sys, time
from datafold import DbOperations, EncryptedBackupManager, MasterKeyPair
from datafold.stores.lmdb import _LmdbSnapshot
from datafold.stores.sqlite import _SqliteSnapshot

db_path, backend, destination, marker, ready_after = sys.argv[1:]
ready_after = int(ready_after)
snapshot_class = {"lmdb": _LmdbSnapshot, "sqlite": _SqliteSnapshot}[backend]
original = snapshot_class.batches
seen = 0


def slow_batches(self, tree, prefix=b""):
    # create_backup reads through a snapshot's batches: read normally until ready_after records
    # are in the backup, then signal and crawl, one record per batch.
    global seen
    for batch in original(self, tree, prefix):
        for item in batch:
            seen += 1
            if seen == ready_after:
                with open(marker, "w") as f:
                    f.write(str(os.getpid()))
            if seen >= ready_after:
                time.sleep(0.05)
            yield [item]


snapshot_class.batches = slow_batches
with DbOperations.open(db_path, backend) as db:
    EncryptedBackupManager(db, MasterKeyPair.from_private_bytes(bytes(range(32)))).create_backup(destination)
open(marker + ".finished", "w").close()
"""

RESTORE_CHILD = """
import os, sys, time
from contextlib import contextmanager
from datafold import DbOperations, EncryptedBackupManager, MasterKeyPair, RestoreOptions
from datafold.stores.lmdb import _LmdbWriteTransaction
from datafold.stores.sqlite import _SqliteWriteTransaction

db_path, backend, backup, marker, ready_after = sys.argv[1:]
ready_after = int(ready_after)
txn_class = {"lmdb": _LmdbWriteTransaction, "sqlite": _SqliteWriteTransaction}[backend]
original = txn_class.put
written = 0


def slow_put(self, tree, key, value, overwrite=True):
    # Writes normally until ready_after records are in the transaction, then signals and crawls.
    global written
    result = original(self, tree, key, value, overwrite)
    written += 1
    if written == ready_after:
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
    if written >= ready_after:
        time.sleep(0.05)
    return result


def slow_put_many(self, tree, items, overwrite=True):
    # The restore hands whole batches to put_many: route them through slow_put one by one.
    written_here = 0
    for key, value in items:
        written_here += bool(self.put(tree, key, value, overwrite))
    return written_here, 0


native_original = DbOperations._native_writer
native = False


@contextmanager
def native_writer(db, mean_record_bytes=0.0):
    global native
    with native_original(db, mean_record_bytes) as writer:
        native = writer is not None
        yield writer


def progress(event):
    # A native LMDB restore (Rust core) writes without put(): once it has read (and so written)
    # half the backup, signal and stop there.
    if native and event.phase == "restore" and event.total_bytes and 2 * event.bytes >= event.total_bytes:
        open(marker + ".native", "w").close()
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(600)


txn_class.put = slow_put
txn_class.put_many = slow_put_many
DbOperations._native_writer = native_writer
with DbOperations.open(db_path, backend) as db:
    manager = EncryptedBackupManager(db, MasterKeyPair.from_private_bytes(bytes(range(32))))
    manager.restore_backup(backup, RestoreOptions(overwrite_existing=True), progress=progress)
open(marker + ".finished", "w").close()
"""


def start_child(tmp_path: Path, script: str, core_name: str, *args: object) -> subprocess.Popen[bytes]:
    path = tmp_path / "child.py"
    path.write_text(script)
    env = {**os.environ, "DATAFOLD_CORE": core_name}
    return subprocess.Popen(
        [sys.executable, str(path), *map(str, args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def wait_for_marker(marker: Path, child: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if child.poll() is not None:
            _, err = child.communicate()
            pytest.fail(f"the child ended (code {child.returncode}) before it was under way:\n{err.decode()}")
        if time.monotonic() > deadline:
            child.kill()
            child.wait()
            pytest.fail(f"the child did not get under way within {timeout} s")
        time.sleep(0.01)


def kill(child: subprocess.Popen[bytes]) -> None:
    os.kill(child.pid, signal.SIGKILL)
    child.communicate()
    assert child.returncode == -signal.SIGKILL


def unnamed_files_in(pid: int, directory: Path) -> list[int]:
    """Sizes of the files the process holds open in directory that have no name there
    (O_TMPFILE inodes show as "<dir>/#<inode> (deleted)")."""
    sizes = []
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(fd_dir / fd)
            size = os.stat(fd_dir / fd).st_size
        except OSError:
            continue
        if target.startswith(f"{directory}/") and target.endswith(" (deleted)"):
            sizes.append(size)
    return sizes


@pytest.fixture
def keys() -> MasterKeyPair:
    return MasterKeyPair.from_private_bytes(SEED)


@pytest.fixture
def big_db(tmp_path: Path, backend: str) -> Iterator[Path]:
    """A 64 MiB database: 1024 records of 64 KiB in "bulk" plus a small tree."""
    path = db_location(tmp_path, backend, "big")
    with DbOperations.open(path, backend) as db:
        for start in range(0, 1024, 128):
            db.put_many("bulk", [(i.to_bytes(4, "big"), os.urandom(64 * KiB)) for i in range(start, start + 128)])
        db.put("small", b"k", b"v")
    return path


@pytest.mark.parametrize("core_name", ["rust", "pure"])
def test_killed_create_backup_leaves_nothing(tmp_path: Path, backend: str, big_db: Path, core_name: str) -> None:
    """SIGKILL while the backup is being written: no file at the destination, no temporary file."""
    backups = tmp_path / "backups"
    backups.mkdir()
    destination = backups / "big.dfb"
    marker = tmp_path / "under-way"

    child = start_child(tmp_path, CREATE_CHILD, core_name, big_db, backend, destination, marker, 256)
    try:
        wait_for_marker(marker, child)
        # 256 records of 64 KiB are in: megabytes of ciphertext sit in an unnamed file.
        sizes = unnamed_files_in(child.pid, backups)
        assert len(sizes) == 1 and sizes[0] >= 8 * MiB
        assert os.listdir(backups) == []
    finally:
        kill(child)

    assert not (tmp_path / "under-way.finished").exists()
    assert not destination.exists()
    assert os.listdir(backups) == []


@pytest.mark.parametrize("into", ["non-empty", "empty"])
@pytest.mark.parametrize("core_name", ["rust"])
def test_killed_restore_leaves_the_database_unchanged(
    tmp_path: Path, backend: str, core_name: str, keys: MasterKeyPair, into: str
) -> None:
    """SIGKILL in the middle of the restore transaction: the database reopens exactly as before,
    and a restore afterwards works (no lock left behind). Into an empty LMDB database the Rust
    core stages a new data file and commits it every 16 MiB: killed past the first of those, the
    staging file is left over, and the next open removes it."""
    source_path = db_location(tmp_path, backend, "source")
    target_path = db_location(tmp_path, backend, "target")
    backup = tmp_path / "source.dfb"
    count = 2000 if into == "non-empty" else 10_000  # 40 MiB: half of it is past 16 MiB
    source_data = {
        "bulk": {i.to_bytes(4, "big"): os.urandom(4 * KiB) for i in range(count)},
        "extra": {b"e": b"1"},
    }
    prior = {
        "bulk": {(5).to_bytes(4, "big"): b"old five", b"\xff-only-in-target": b"kept"},
        "other": {b"x": b"y"},
    }
    if into == "empty":
        prior = {}
    with DbOperations.open(source_path, backend) as source:
        for tree, items in source_data.items():
            source.put_many(tree, list(items.items()))
        EncryptedBackupManager(source, keys, core=core_name).create_backup(backup)
    with DbOperations.open(target_path, backend) as target:
        for tree, items in prior.items():
            target.put_many(tree, list(items.items()))
        before = snapshot(target)

    marker = tmp_path / "under-way"
    child = start_child(tmp_path, RESTORE_CHILD, core_name, target_path, backend, backup, marker, 1000)
    try:
        wait_for_marker(marker, child)
    finally:
        kill(child)
    assert not (tmp_path / "under-way.finished").exists()
    # With the Rust core an LMDB restore is a native one (tests/test_lmdb_native.py): killed
    # inside the core's LMDB transaction, its lock file left in that LMDB's format.
    native = backend == "lmdb" and core_name == "rust"
    assert (tmp_path / "under-way.native").exists() == native
    staging = target_path / "data.mdb.datafold-restore"
    assert staging.exists() == (native and into == "empty")

    with DbOperations.open(target_path, backend) as target:
        assert not staging.exists()
        assert snapshot(target) == before
        stats = EncryptedBackupManager(target, keys, core=core_name).restore_backup(
            backup, RestoreOptions(overwrite_existing=True)
        )
        assert stats.items_restored == count + 1
        assert target.get("bulk", (5).to_bytes(4, "big")) == source_data["bulk"][(5).to_bytes(4, "big")]
        if into == "non-empty":
            assert target.get("bulk", b"\xff-only-in-target") == b"kept"
            assert snapshot(target)["other"] == [(b"x", b"y")]
        assert target.count("bulk") == count + (into == "non-empty")
