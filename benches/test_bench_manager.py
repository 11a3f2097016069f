"""EncryptedBackupManager benchmarks on LMDB: create_backup, verify_backup and restore_backup.

    python -m pytest benches/test_bench_manager.py -p no:cacheprovider --benchmark-enable

Default options throughout, as a user gets them: create_backup re-reads and verifies the file
before renaming it into place (verify_during_creation=True) and fsyncs it; restore_backup makes a
full authenticated pass first (verify_before_restore), writes everything in one LMDB transaction
and then checks each restored tree's digest (verify_after_restore). The Rust core gets ~64 MiB
databases, the pure core a quarter of that (compare MB/s and records/s, not seconds).
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from datafold import DbOperations, EncryptedBackupManager, MasterKeyPair

# workload -> core -> (record count, value size); keys are 16 bytes.
SIZES = {
    "64KiB-values": {"rust": (1000, 64 * 1024), "pure": (250, 64 * 1024)},
    "small-records": {"rust": (200_000, 100), "pure": (50_000, 100)},
}
TREE = "data"
MASTER = MasterKeyPair.from_private_bytes(bytes(range(32)))  # fixed bench seed, never a real key


class Databases:
    """Source databases, made once per (workload, size) and shared by the tests of this module."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._made: dict[tuple[int, int], DbOperations] = {}
        self._serial = itertools.count()

    def source(self, count: int, value_size: int) -> DbOperations:
        if (count, value_size) not in self._made:
            db = DbOperations.open(self.root / f"src-{count}x{value_size}")
            db.reserve(count * (16 + value_size), records=count)
            pool = os.urandom(count * value_size)
            db.put_many(
                TREE, ((i.to_bytes(16, "big"), pool[i * value_size : (i + 1) * value_size]) for i in range(count))
            )
            self._made[count, value_size] = db
        return self._made[count, value_size]

    def fresh_path(self, label: str) -> Path:
        return self.root / f"{label}-{next(self._serial)}"

    def close(self) -> None:
        for db in self._made.values():
            db.close()


@pytest.fixture(scope="module")
def databases(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Databases]:
    dbs = Databases(tmp_path_factory.mktemp("manager-bench"))
    yield dbs
    dbs.close()
    shutil.rmtree(dbs.root, ignore_errors=True)


def _workload(databases: Databases, core: ModuleType, workload: str) -> tuple[DbOperations, int, int]:
    count, value_size = SIZES[workload][core.CORE_NAME]
    return databases.source(count, value_size), count, count * (16 + value_size)


def _label(core: ModuleType, workload: str) -> str:
    return f"{workload} {core.CORE_NAME}"


@pytest.mark.parametrize("workload", SIZES)
def test_create_backup(measure: Any, databases: Databases, core: ModuleType, workload: str) -> None:
    db, count, nbytes = _workload(databases, core, workload)
    manager = EncryptedBackupManager(db, MASTER, core=core.CORE_NAME)
    path = databases.fresh_path("backup").with_suffix(".dfb")
    result = measure(
        manager.create_backup, args=(path,), group=f"create_backup {workload}", nbytes=nbytes, records=count
    )
    assert result.metadata.total_items == count
    path.unlink()


@pytest.mark.parametrize("workload", SIZES)
def test_verify_backup(measure: Any, databases: Databases, core: ModuleType, workload: str) -> None:
    db, count, nbytes = _workload(databases, core, workload)
    manager = EncryptedBackupManager(db, MASTER, core=core.CORE_NAME)
    path = databases.fresh_path("backup").with_suffix(".dfb")
    manager.create_backup(path)
    metadata = measure(
        manager.verify_backup, args=(path,), group=f"verify_backup {workload}", nbytes=nbytes, records=count
    )
    assert metadata.total_items == count
    path.unlink()


@pytest.mark.parametrize("workload", SIZES)
def test_restore_backup(measure: Any, databases: Databases, core: ModuleType, workload: str) -> None:
    db, count, nbytes = _workload(databases, core, workload)
    path = databases.fresh_path("backup").with_suffix(".dfb")
    EncryptedBackupManager(db, MASTER, core=core.CORE_NAME).create_backup(path)
    targets: list[tuple[DbOperations, Path]] = []

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        # Each round restores into a new, empty database; the previous one is removed first.
        while targets:
            old, old_path = targets.pop()
            old.close()
            shutil.rmtree(old_path)
        target_path = databases.fresh_path("restore")
        target = DbOperations.open(target_path)
        targets.append((target, target_path))
        return (EncryptedBackupManager(target, MASTER, core=core.CORE_NAME), path), {}

    stats = measure(
        lambda manager, backup: manager.restore_backup(backup),
        setup=setup,
        group=f"restore_backup {workload}",
        nbytes=nbytes,
        records=count,
    )
    assert stats.items_restored == count and stats.verified
    for target, target_path in targets:
        target.close()
        shutil.rmtree(target_path)
    path.unlink()
