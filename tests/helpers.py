"""Shared fixtures and helpers of the manager, options and crash tests.

Test modules import the fixtures they use from here (`from helpers import env, ...`): pytest
finds fixtures in a module's namespace. `core` (the core module, "pure"/"rust") is conftest's.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from datafold import BackupOptions, DbOperations, EncryptedBackupManager, MasterKeyPair
from datafold.stores.lmdb import _LmdbWriteTransaction
from datafold.stores.sqlite import _SqliteWriteTransaction

BACKENDS = ("lmdb", "sqlite")
MiB = 1 << 20
SMALL_SEGMENTS = BackupOptions(segment_size=4096)

# Fixed master seeds, so failures reproduce; never real keys.
SEED = bytes(range(32))
OTHER_SEED = bytes(range(100, 132))

# The write-transaction class of each backend, for tests that make its put() misbehave.
WRITE_TXN_CLASS: dict[str, type] = {"lmdb": _LmdbWriteTransaction, "sqlite": _SqliteWriteTransaction}

Snapshot = dict[str, list[tuple[bytes, bytes]]]


def db_location(directory: Path, backend: str, name: str = "db") -> Path:
    """lmdb databases are directories, sqlite databases files."""
    return directory / (name if backend == "lmdb" else f"{name}.sqlite")


def snapshot(db: DbOperations) -> Snapshot:
    """Every tree of the database with all its items, in key order."""
    return {tree: list(db.items(tree)) for tree in db.tree_names()}


def as_snapshot(data: Mapping[str, Mapping[bytes, bytes]]) -> Snapshot:
    """What snapshot() returns for a database filled with `data`."""
    return {tree: sorted(items.items()) for tree, items in sorted(data.items())}


def fill(db: DbOperations, data: Mapping[str, Mapping[bytes, bytes]]) -> None:
    for tree, items in data.items():
        db.create_tree(tree)
        if items:
            db.put_many(tree, list(items.items()))


def sample_data(seed: int = 7) -> dict[str, dict[bytes, bytes]]:
    """A small database exercising the awkward cases: empty values, binary keys (NUL, 0xff),
    metadata trees, an empty tree and enough records to span several 4 KiB segments."""
    rnd = random.Random(seed)
    return {
        "users": {b"alice": b"admin", b"bob": b"", b"carol": rnd.randbytes(300), b"dave": b"\x00" * 17},
        "binary": {
            b"\x00": b"nul key",
            b"\x00\x01\x02": rnd.randbytes(50),
            b"\xff": b"",
            b"\xff" * 40: rnd.randbytes(1000),
            bytes(range(256)): bytes(range(255, -1, -1)),
        },
        "logs": {f"log:{i:05d}".encode(): rnd.randbytes(rnd.randrange(0, 120)) for i in range(400)},
        "metadata": {b"schema": b"3", b"owner": b"ops"},
        "_internal": {b"cursor": b"42"},
        "empty": {},
    }


_WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
    "quebec romeo sierra tango order paid shipped pending berlin paris london tokyo madrid rome oslo"
).split()


def text_items(count: int, seed: int = 7) -> list[tuple[bytes, bytes]]:
    """Records like the "small" dataset: 17-byte keys in key order and 100-byte text values
    (JSON-ish, words from a small vocabulary), deterministic for a seed."""
    rnd = random.Random(seed)
    items = []
    for i in range(count):
        name = f"{rnd.choice(_WORDS).title()} {rnd.choice(_WORDS).title()}"
        city, status, n = rnd.choice(_WORDS), rnd.choice(_WORDS), rnd.randrange(100_000)
        note = " ".join(rnd.choice(_WORDS) for _ in range(4))
        value = f'{{"name":"{name}","city":"{city}","status":"{status}","n":{n},"note":"{note}"}}'
        items.append((f"user:{i:012d}".encode(), value.encode()[:100].ljust(100)))
    return items


@dataclass
class Env:
    """One database under test, its manager, the key and a directory for backups."""

    tmp: Path
    backend: str
    core: str
    keys: MasterKeyPair
    db: DbOperations
    manager: EncryptedBackupManager
    backups: Path
    _opened: list[DbOperations] = field(default_factory=list)

    def backup_path(self, name: str = "backup.dfb") -> Path:
        return self.backups / name

    def open_db(self, name: str, backend: str | None = None) -> DbOperations:
        """Another database (closed at teardown)."""
        db = DbOperations.open(db_location(self.tmp, backend or self.backend, name), backend or self.backend)
        self._opened.append(db)
        return db

    def manager_for(self, db: DbOperations, keys: MasterKeyPair | None = None) -> EncryptedBackupManager:
        return EncryptedBackupManager(db, keys or self.keys, core=self.core)

    def backup(self, name: str = "backup.dfb", options: BackupOptions | None = None) -> Path:
        """A backup of self.db."""
        path = self.backup_path(name)
        self.manager.create_backup(path, options)
        return path

    def backup_of(
        self,
        data: Mapping[str, Mapping[bytes, bytes]],
        name: str = "source.dfb",
        options: BackupOptions | None = None,
        *,
        backend: str | None = None,
        keys: MasterKeyPair | None = None,
    ) -> Path:
        """A backup of a fresh database (not self.db) holding `data`."""
        source = self.open_db(f"source-{name}", backend)
        fill(source, data)
        path = self.backup_path(name)
        self.manager_for(source, keys).create_backup(path, options)
        return path


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def core_name(core: ModuleType) -> str:
    """The name EncryptedBackupManager(core=...) takes for conftest's `core` module."""
    return str(core.CORE_NAME)


@contextmanager
def open_env(tmp_path: Path, core_name: str, backend: str) -> Iterator[Env]:
    """An empty database of `backend` with a manager on the `core_name` core."""
    backups = tmp_path / "backups"
    backups.mkdir()
    keys = MasterKeyPair.from_private_bytes(SEED)
    db = DbOperations.open(db_location(tmp_path, backend), backend)
    e = Env(tmp_path, backend, core_name, keys, db, EncryptedBackupManager(db, keys, core=core_name), backups)
    try:
        yield e
    finally:
        for other in e._opened:
            other.close()
        db.close()


@pytest.fixture
def env(tmp_path: Path, core_name: str, backend: str) -> Iterator[Env]:
    """An empty database of `backend` with a manager on the `core_name` core."""
    with open_env(tmp_path, core_name, backend) as e:
        yield e


@pytest.fixture
def filled(env: Env) -> Env:
    """env with sample_data() in its database."""
    fill(env.db, sample_data())
    return env


def flip_byte(path: Path, offset: int) -> None:
    """Corrupts one byte of a file (negative offsets count from the end)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def preamble_length(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[12:16], "little")


def segment_offset(path: Path, segment_size: int, index: int) -> int:
    """File offset of ciphertext segment `index` (docs/FORMAT.md §2: segment 0 follows the
    40-byte stream header, segment i >= 1 starts at stream offset i * segment_size)."""
    stream = preamble_length(path)
    return stream + (40 if index == 0 else index * segment_size)


class NativeSpy:
    """Wraps DbOperations._native_writer (the LMDB store's native restores): counts the writers
    handed out, those staged (an empty database: a new data file), and the records put or
    deleted through them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.writers = 0
        self.staged = 0
        self.records = 0
        original = DbOperations._native_writer
        spy = self

        @contextmanager
        def native_writer(db: DbOperations, mean_record_bytes: float = 0.0) -> Iterator[Any]:
            with original(db, mean_record_bytes) as writer:
                if writer is not None:
                    spy.writers += 1
                    spy.staged += writer.staged
                try:
                    yield writer
                finally:
                    if writer is not None:
                        spy.records += writer.records

        monkeypatch.setattr(DbOperations, "_native_writer", native_writer)


class WriteSpy:
    """Wraps DbOperations.write_transaction and the LMDB store's native writer (a restore's other
    way in): records whether a write transaction was entered and counts the records put through it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.transactions = 0
        self.transaction_puts = 0
        self.native = NativeSpy(monkeypatch)
        original = DbOperations.write_transaction
        spy = self

        @contextmanager
        def write_transaction(db: DbOperations) -> Iterator[Any]:
            spy.transactions += 1
            with original(db) as txn:
                yield _CountingTxn(txn, spy)

        monkeypatch.setattr(DbOperations, "write_transaction", write_transaction)

    @property
    def entered(self) -> int:
        return self.transactions + self.native.writers

    @property
    def puts(self) -> int:
        return self.transaction_puts + self.native.records


class _CountingTxn:
    def __init__(self, txn: Any, spy: WriteSpy) -> None:
        self._txn = txn
        self._spy = spy

    def put(self, *args: Any, **kwargs: Any) -> bool:
        self._spy.transaction_puts += 1
        return bool(self._txn.put(*args, **kwargs))

    def put_many(self, tree: str, items: Any, overwrite: bool = True) -> tuple[int, int]:
        items = list(items)
        self._spy.transaction_puts += len(items)
        return tuple(self._txn.put_many(tree, items, overwrite))  # type: ignore[return-value]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._txn, name)


class CountingFile:
    """A read-only file that counts the bytes read from it (for read_metadata's I/O)."""

    def __init__(self, path: str | os.PathLike[str], counter: list[int]) -> None:
        self._f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by close()/__exit__
        self._counter = counter

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._counter[0] += len(data or b"")
        return data

    def readinto(self, buffer: Any) -> int:
        n = self._f.readinto(buffer)
        self._counter[0] += n or 0
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> CountingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()
