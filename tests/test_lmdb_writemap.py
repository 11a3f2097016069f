"""The opt-in LMDB option writemap=True: same behaviour as the default, a data file preallocated to
the map size (never a sparse file a full disk would turn into a SIGBUS), and a clean StoreError
when the preallocation fails, at open or when the map grows."""

# The fixtures imported from helpers are pytest fixtures: test arguments "redefine" them.
# ruff: noqa: F811

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from datafold import DbOperations, EncryptedBackupManager, MasterKeyPair, RestoreOptions
from datafold.errors import ArgumentTypeError, StoreError
from helpers import SEED, core_name, fill, sample_data, snapshot  # noqa: F401 - fixtures

MiB = 1 << 20


def map_size(db: DbOperations) -> int:
    return db._store.map_size()  # type: ignore[attr-defined]


def data_file(db: DbOperations) -> Path:
    return Path(db.path) / "data.mdb"


def assert_preallocated(db: DbOperations) -> None:
    """The data file is exactly the map size and every byte of it is allocated on disk."""
    st = os.stat(data_file(db))
    assert st.st_size == map_size(db)
    assert st.st_blocks * 512 >= st.st_size


def records(n: int, size: int = 64 * 1024) -> list[tuple[bytes, bytes]]:
    return [(i.to_bytes(4, "big"), bytes([i % 251]) * size) for i in range(n)]


def failing_fallocate(code: int) -> Any:
    def fallocate(fd: int, offset: int, length: int) -> None:
        raise OSError(code, os.strerror(code))

    return fallocate


@pytest.fixture
def small_wm(tmp_path: Path) -> Iterator[DbOperations]:
    """A writemap database with a 1 MiB map, so that growing it is exercised."""
    with DbOperations.open(tmp_path / "wm", "lmdb", map_size=MiB, writemap=True) as db:
        assert map_size(db) == MiB
        yield db


def test_writemap_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "wm"
    with DbOperations.open(path, writemap=True) as db:
        assert_preallocated(db)
        db.put("t", b"k", b"v")
        assert db.get("t", b"k") == b"v"
        assert db.put_many("many", [(b"a", b"1"), (b"b", b"2")]) == 2
        with db.write_transaction() as txn:
            txn.put("t", b"k2", b"v2")
            assert txn.get("t", b"k2") == b"v2"
        with pytest.raises(RuntimeError):
            with db.write_transaction() as txn:
                txn.put("t", b"gone", b"x")
                raise RuntimeError("roll back")
        assert db.delete("many", b"b") is True
        with db.snapshot() as snap:
            db.put("t", b"after", b"snapshot")
            assert snap.get("t", b"k2") == b"v2" and snap.get("t", b"after") is None
            assert snap.tree_names() == ["many", "t"]
        assert snapshot(db) == {"many": [(b"a", b"1")], "t": [(b"after", b"snapshot"), (b"k", b"v"), (b"k2", b"v2")]}
    with DbOperations.open(path, writemap=True) as db:  # persisted, and still preallocated
        assert db.get("t", b"k2") == b"v2"
        assert_preallocated(db)
    with DbOperations.open(path) as db:  # the same files open without writemap too
        assert db.get("many", b"a") == b"1"


def test_writemap_map_growth_is_preallocated(small_wm: DbOperations) -> None:
    data = records(320)  # 20 MiB
    assert small_wm.put_many("t", data) == 320
    assert map_size(small_wm) > 20 * MiB
    assert_preallocated(small_wm)
    small_wm.reserve(30 * MiB)
    assert_preallocated(small_wm)
    with small_wm.write_transaction() as txn:
        txn.put_many("u", data)
    assert list(small_wm.items("t")) == data == list(small_wm.items("u"))


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (errno.ENOSPC, "not enough disk space to preallocate the 8388608-byte LMDB map for writemap=True"),
        (errno.EOPNOTSUPP, "cannot preallocate .* may not support preallocation: open without writemap"),
    ],
)
def test_writemap_preallocation_failure_at_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, message: str
) -> None:
    path = tmp_path / "wm"
    with DbOperations.open(path) as db:
        db.put("t", b"k", b"v")
    monkeypatch.setattr(os, "posix_fallocate", failing_fallocate(code))
    with pytest.raises(StoreError, match=message):
        DbOperations.open(path, map_size=8 * MiB, writemap=True)
    monkeypatch.undo()
    # The environment was closed again: the directory opens normally, with or without writemap.
    with DbOperations.open(path) as db:
        assert snapshot(db) == {"t": [(b"k", b"v")]}
    with DbOperations.open(path, writemap=True) as db:
        assert snapshot(db) == {"t": [(b"k", b"v")]}
        assert_preallocated(db)


def test_writemap_refuses_a_map_larger_than_the_free_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked before fallocate runs: a failing fallocate could keep the blocks it got."""
    called = []
    monkeypatch.setattr(os, "posix_fallocate", lambda *args: called.append(args))
    real = os.fstatvfs

    def no_space(fd: int) -> Any:
        st = real(fd)
        return os.statvfs_result((st.f_bsize, st.f_frsize, st.f_blocks, 0, 0, *st[5:]))

    monkeypatch.setattr(os, "fstatvfs", no_space)
    with pytest.raises(StoreError, match="not enough disk space.*free space, use a smaller map_size"):
        DbOperations.open(tmp_path / "wm", map_size=8 * MiB, writemap=True)
    assert called == []


def test_writemap_failed_growth_keeps_the_store_usable(small_wm: DbOperations, monkeypatch: pytest.MonkeyPatch) -> None:
    before = records(4, size=1000)
    small_wm.put_many("t", before)
    other = DbOperations.open(small_wm.path, writemap=True)  # the same shared environment
    try:
        monkeypatch.setattr(os, "posix_fallocate", failing_fallocate(errno.ENOSPC))
        with pytest.raises(StoreError, match="not enough disk space.*the map stays at 1048576 bytes"):
            small_wm.put_many("t", records(320))
        with pytest.raises(StoreError, match="not enough disk space"):
            small_wm.reserve(10 * MiB)
        assert map_size(small_wm) == MiB
        assert os.path.getsize(data_file(small_wm)) == MiB  # LMDB truncated the file back
        assert list(small_wm.items("t")) == before == list(other.items("t"))
        small_wm.put("t", b"small", b"fits")  # usable at the old size
        monkeypatch.undo()
        assert small_wm.put_many("big", records(320)) == 320  # growing works again
        assert_preallocated(small_wm)
        assert other.count("big") == 320 and other.get("t", b"small") == b"fits"
    finally:
        other.close()


def test_writemap_mixed_values_on_one_directory(tmp_path: Path) -> None:
    path = tmp_path / "db"
    with DbOperations.open(path) as plain:
        with pytest.raises(StoreError, match="already open in this process with writemap=False.*same writemap"):
            DbOperations.open(path, writemap=True)
        plain.put("t", b"k", b"v")
    with DbOperations.open(path, writemap=True) as wm:
        with pytest.raises(StoreError, match="with writemap=False: it is already open .* writemap=True"):
            DbOperations.open(path, writemap=False)
        with DbOperations.open(path, writemap=True) as again:
            assert again.get("t", b"k") == b"v"
        assert wm.get("t", b"k") == b"v"


@pytest.mark.parametrize("value", [1, 0, "yes", None])
def test_writemap_must_be_a_bool(tmp_path: Path, value: object) -> None:
    with pytest.raises(ArgumentTypeError, match="writemap must be a bool"):
        DbOperations.open(tmp_path / "db", writemap=value)


def test_restore_into_a_writemap_database(tmp_path: Path, core_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = MasterKeyPair.from_private_bytes(SEED)
    big = bytes(range(256)) * (2 * MiB // 256)  # overflow pages, and more than the 1 MiB map
    with DbOperations.open(tmp_path / "source") as source:
        fill(source, sample_data())
        source.put("blobs", b"two-mebibytes", big)
        expected = snapshot(source)
        backup = tmp_path / "backup.dfb"
        EncryptedBackupManager(source, keys, core=core_name).create_backup(backup)
    with DbOperations.open(tmp_path / "target", map_size=MiB, writemap=True) as target:
        target.put("users", b"alice", b"old")
        manager = EncryptedBackupManager(target, keys, core=core_name)
        # No room on disk for the grown map: nothing is applied, the database is usable.
        monkeypatch.setattr(os, "posix_fallocate", failing_fallocate(errno.ENOSPC))
        with pytest.raises(StoreError, match="not enough disk space"):
            manager.restore_backup(backup, RestoreOptions(overwrite_existing=True))
        assert snapshot(target) == {"users": [(b"alice", b"old")]}
        monkeypatch.undo()
        stats = manager.restore_backup(backup, RestoreOptions(overwrite_existing=True))
        assert stats.verified is True and stats.errors == []
        assert snapshot(target) == expected
        assert_preallocated(target)
    with DbOperations.open(tmp_path / "target", writemap=True) as target:
        assert snapshot(target) == expected
