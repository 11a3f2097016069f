"""EncryptedBackupManager benchmarks on LMDB, end to end: create_backup, verify_backup and
restore_backup of benches/datasets.py's "small" and "large" datasets at DATAFOLD_BENCH_SCALE.

    python -m pytest benches/test_bench_manager.py -p no:cacheprovider --benchmark-enable

Default options throughout, as a user gets them: create_backup re-reads and verifies the file
before renaming it into place (verify_during_creation=True) and fsyncs it; verify_backup makes one
authenticated pass; restore_backup makes a full authenticated pass first (verify_before_restore),
writes everything into a fresh LMDB database in one transaction and then checks each restored
tree's digest (verify_after_restore); with the Rust core both through its own LMDB (the default,
"native") and through py-lmdb (native_restore=False). Both cores get the same databases.
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import datasets
import pytest
from datafold import DbOperations, EncryptedBackupManager, MasterKeyPair

DATASETS = ("small", "large")
MASTER = MasterKeyPair.from_private_bytes(bytes(range(32)))  # fixed bench seed, never a real key
ROUNDS = 3


class Databases:
    """Source databases, made once per dataset and shared by the tests of this module."""

    def __init__(self, root: Path, items: Callable[[str], dict[str, list[datasets.Item]]], scale: float) -> None:
        self.root = root
        self.scale = scale
        self._items = items
        self._made: dict[str, tuple[DbOperations, int, int]] = {}
        self._serial = itertools.count()

    def source(self, name: str) -> tuple[DbOperations, int, int]:
        """(database, records, bytes of keys and values) of dataset `name`."""
        if name not in self._made:
            trees = self._items(name)
            path = self.root / f"src-{name}"
            datasets.DATASETS[name](self.scale).fill_lmdb(path, trees)
            records = sum(map(len, trees.values()))
            nbytes = sum(len(k) + len(v) for items in trees.values() for k, v in items)
            self._made[name] = (DbOperations.open(path), records, nbytes)
        return self._made[name]

    def fresh_path(self, label: str) -> Path:
        return self.root / f"{label}-{next(self._serial)}"

    def close(self) -> None:
        for db, _, _ in self._made.values():
            db.close()


@pytest.fixture(scope="module")
def databases(
    tmp_path_factory: pytest.TempPathFactory,
    dataset_items: Callable[[str], dict[str, list[datasets.Item]]],
    bench_scale: float,
) -> Iterator[Databases]:
    dbs = Databases(tmp_path_factory.mktemp("manager-bench"), dataset_items, bench_scale)
    yield dbs
    dbs.close()
    shutil.rmtree(dbs.root, ignore_errors=True)


@pytest.mark.parametrize("dataset", DATASETS)
def test_create_backup(measure: Any, databases: Databases, core: ModuleType, dataset: str) -> None:
    db, records, nbytes = databases.source(dataset)
    manager = EncryptedBackupManager(db, MASTER, core=core.CORE_NAME)
    path = databases.fresh_path("backup").with_suffix(".dfb")
    result = measure(
        manager.create_backup,
        args=(path,),
        group=f"create_backup {dataset}",
        nbytes=nbytes,
        records=records,
        rounds=ROUNDS,
    )
    assert result.metadata.total_items == records
    path.unlink()


@pytest.mark.parametrize("dataset", DATASETS)
def test_verify_backup(measure: Any, databases: Databases, core: ModuleType, dataset: str) -> None:
    db, records, nbytes = databases.source(dataset)
    manager = EncryptedBackupManager(db, MASTER, core=core.CORE_NAME)
    path = databases.fresh_path("backup").with_suffix(".dfb")
    manager.create_backup(path)
    metadata = measure(
        manager.verify_backup,
        args=(path,),
        group=f"verify_backup {dataset}",
        nbytes=nbytes,
        records=records,
        rounds=ROUNDS,
    )
    assert metadata.total_items == records
    path.unlink()


@pytest.mark.parametrize("native", [True, False], ids=["native", "py-lmdb"])
@pytest.mark.parametrize("dataset", DATASETS)
def test_restore_backup(measure: Any, databases: Databases, core: ModuleType, dataset: str, native: bool) -> None:
    """native: the LMDB store's default native restore (Rust core only); py-lmdb: the target opened
    with native_restore=False, every record handed to py-lmdb (the pure core's only way)."""
    if native and core.CORE_NAME != "rust":
        pytest.skip("native restores need the Rust core; the pure core's restore is the py-lmdb case")
    db, records, nbytes = databases.source(dataset)
    path = databases.fresh_path("backup").with_suffix(".dfb")
    EncryptedBackupManager(db, MASTER, core=core.CORE_NAME).create_backup(path)
    targets: list[tuple[DbOperations, Path]] = []

    def drop_targets() -> None:
        while targets:
            old, old_path = targets.pop()
            old.close()
            shutil.rmtree(old_path)

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        # Each round restores into a new, empty database; the previous one is removed first.
        drop_targets()
        target_path = databases.fresh_path("restore")
        target = DbOperations.open(target_path, native_restore=native)
        targets.append((target, target_path))
        return (EncryptedBackupManager(target, MASTER, core=core.CORE_NAME), path), {}

    stats = measure(
        lambda manager, backup: manager.restore_backup(backup),
        setup=setup,
        group=f"restore_backup {dataset}",
        nbytes=nbytes,
        records=records,
        rounds=ROUNDS,
    )
    assert stats.items_restored == records and stats.verified
    drop_targets()
    path.unlink()
