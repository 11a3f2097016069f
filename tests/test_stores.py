"""The store layer (datafold.stores): both backends must behave the same through DbOperations."""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from itertools import count
from pathlib import Path
from typing import Any

import pytest
from datafold.errors import ArgumentTypeError, InvalidArgumentError, StoreError
from datafold.stores import BACKENDS, DbOperations, is_metadata_tree, prefix_successor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

MiB = 1 << 20
BACKEND_NAMES = ("lmdb", "sqlite")


def db_location(tmp_path: Path, backend: str) -> Path:
    return tmp_path / ("db" if backend == "lmdb" else "db.sqlite")


def map_size(db: DbOperations) -> int:
    return db._store.map_size()  # type: ignore[attr-defined]


@pytest.fixture(params=BACKEND_NAMES)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def path(tmp_path: Path, backend: str) -> Path:
    return db_location(tmp_path, backend)


@pytest.fixture
def db(path: Path, backend: str) -> Iterator[DbOperations]:
    with DbOperations.open(path, backend) as opened:
        yield opened


@pytest.fixture
def small_lmdb(tmp_path: Path) -> Iterator[DbOperations]:
    """An LMDB database with a 1 MiB map, so that growing it is exercised."""
    with DbOperations.open(tmp_path / "small", "lmdb", map_size=MiB) as opened:
        assert map_size(opened) == MiB
        yield opened


# --- basics -----------------------------------------------------------------------------------


def test_open_sets_backend_and_path(db: DbOperations, path: Path, backend: str) -> None:
    assert db.backend == backend
    assert db.path == str(path)
    assert isinstance(db.path, str)
    assert not db.closed
    assert db.tree_names() == []


def test_put_get_delete_roundtrip(db: DbOperations) -> None:
    db.put("t", b"k1", b"v1")
    db.put("t", bytearray(b"k2"), memoryview(b"v2"))
    assert db.get("t", b"k1") == b"v1"
    value = db.get("t", memoryview(b"k2"))
    assert value == b"v2" and type(value) is bytes
    db.put("t", b"k1", b"replaced")
    assert db.get("t", b"k1") == b"replaced"
    assert db.delete("t", b"k1") is True
    assert db.delete("t", b"k1") is False
    assert db.get("t", b"k1") is None
    assert db.count("t") == 1


def test_missing_tree_reads_nothing(db: DbOperations) -> None:
    assert db.get("nope", b"k") is None
    assert db.delete("nope", b"k") is False
    assert list(db.items("nope")) == []
    assert db.count("nope") == 0
    assert db.tree_names() == []  # reads must not create the tree


def test_items_key_order_with_binary_keys(db: DbOperations) -> None:
    keys = [b"\x00", b"\x00\x00", b"\x00\xff", b"\x01", b"a", b"a\x00", b"ab", b"b", b"\x7f", b"\x80"]
    keys += [b"\xfe\xff", b"\xff", b"\xff\x00", b"\xff\xff", b"\xff\xff\xff"]
    shuffled = keys[:]
    random.Random(7).shuffle(shuffled)
    for i, key in enumerate(shuffled):
        db.put("bin", key, b"" if key == b"a" else bytes([i]) * 3)
    got = list(db.items("bin"))
    assert [k for k, _ in got] == sorted(keys)
    assert dict(got)[b"a"] == b""
    assert all(type(k) is bytes and type(v) is bytes for k, v in got)

    def keys_with(prefix: bytes | bytearray) -> list[bytes]:
        return [k for k, _ in db.items("bin", prefix)]

    assert keys_with(b"\xff") == [b"\xff", b"\xff\x00", b"\xff\xff", b"\xff\xff\xff"]
    assert keys_with(b"\xff\xff") == [b"\xff\xff", b"\xff\xff\xff"]
    assert keys_with(b"\xfe") == [b"\xfe\xff"]
    assert keys_with(b"a") == [b"a", b"a\x00", b"ab"]
    assert keys_with(bytearray(b"\x00")) == [b"\x00", b"\x00\x00", b"\x00\xff"]
    assert keys_with(b"zz") == []
    assert keys_with(b"") == sorted(keys)


def test_items_is_a_snapshot(db: DbOperations) -> None:
    db.put_many("t", [(b"a", b"1"), (b"b", b"2"), (b"c", b"3")])
    it = db.items("t")
    assert next(it) == (b"a", b"1")
    db.put("t", b"bb", b"new")
    db.delete("t", b"c")
    assert list(it) == [(b"b", b"2"), (b"c", b"3")]
    assert [k for k, _ in db.items("t")] == [b"a", b"b", b"bb"]


def test_items_abandoned_iterator_releases_its_transaction(db: DbOperations) -> None:
    db.put("t", b"a", b"1")
    for _ in range(300):  # more than LMDB's default 126 reader slots if they leaked
        it = db.items("t")
        assert next(it) == (b"a", b"1")
        it.close()
    db.put("t", b"b", b"2")
    assert db.count("t") == 2


def test_tree_names_and_create_tree(db: DbOperations) -> None:
    db.create_tree("empty")
    db.create_tree("empty")  # idempotent
    db.put("zeta", b"k", b"v")
    db.put("_internal", b"k", b"v")
    db.put("Alpha", b"k", b"v")
    db.put("métadonnées", b"k", b"v")
    assert db.tree_names() == sorted(["empty", "zeta", "_internal", "Alpha", "métadonnées"])
    assert db.count("empty") == 0
    assert list(db.items("empty")) == []


def test_put_many(db: DbOperations) -> None:
    assert db.put_many("t", [(b"b", b"2"), (b"a", b"1")]) == 2
    assert db.put_many("t", ((bytes([i]), bytes([i]) * 2) for i in range(10, 20))) == 10
    assert db.put_many("t", [(b"a", b"one")]) == 1  # overwrites
    assert db.put_many("empty-batch", []) == 0
    assert db.count("t") == 12
    assert db.get("t", b"a") == b"one"
    assert db.get("t", bytes([15])) == bytes([15]) * 2
    assert "empty-batch" in db.tree_names()


def test_put_many_is_atomic_on_bad_item(db: DbOperations) -> None:
    db.put("t", b"keep", b"old")

    def pairs() -> Iterator[Any]:
        yield b"keep", b"new"
        yield b"x", b"y"
        yield "not bytes", b"z"

    with pytest.raises(ArgumentTypeError, match="key"):
        db.put_many("t", pairs())
    assert list(db.items("t")) == [(b"keep", b"old")]
    with pytest.raises(ArgumentTypeError, match="pairs"):
        db.put_many("t", [b"ab"])  # type: ignore[list-item]


def test_reopen_persists_data(path: Path, backend: str) -> None:
    with DbOperations.open(path, backend) as db:
        db.put("t", b"k", b"v")
        db.create_tree("empty")
        with db.write_transaction() as txn:
            txn.put("u", b"k2", b"v2")
    with DbOperations.open(str(path), backend) as db:
        assert db.tree_names() == ["empty", "t", "u"]
        assert db.get("t", b"k") == b"v"
        assert db.get("u", b"k2") == b"v2"


def test_large_value_roundtrip(db: DbOperations) -> None:
    value = os.urandom(MiB) * 64  # 64 MiB
    db.put("big", b"k", value)
    assert db.get("big", b"k") == value
    assert list(db.items("big")) == [(b"k", value)]


# --- write transactions -----------------------------------------------------------------------


def test_write_transaction_commits_and_sees_own_writes(db: DbOperations) -> None:
    db.put("t", b"a", b"1")
    with db.write_transaction() as txn:
        txn.create_tree("new")
        assert txn.put("t", b"b", b"2") is True
        assert txn.get("t", b"b") == b"2"
        assert txn.delete("t", b"a") is True
        assert txn.delete("t", b"a") is False
        assert list(txn.items("t")) == [(b"b", b"2")]
        assert txn.tree_names() == ["new", "t"]
        assert txn.put_many("t", [(b"c", b"3"), (b"d", b"4")]) == (2, 0)
        assert list(txn.items("t", b"c")) == [(b"c", b"3")]
        assert db.get("t", b"b") is None  # not visible outside before the commit
    assert list(db.items("t")) == [(b"b", b"2"), (b"c", b"3"), (b"d", b"4")]
    assert db.tree_names() == ["new", "t"]


def test_write_transaction_rolls_back_on_exception(db: DbOperations) -> None:
    db.put_many("t", [(b"a", b"1"), (b"b", b"2")])
    with pytest.raises(KeyError):
        with db.write_transaction() as txn:
            txn.put("t", b"a", b"changed")
            txn.delete("t", b"b")
            txn.put("t", b"c", b"3")
            txn.put("created-then-rolled-back", b"k", b"v")
            txn.create_tree("also-rolled-back")
            raise KeyError("boom")
    assert list(db.items("t")) == [(b"a", b"1"), (b"b", b"2")]
    assert db.tree_names() == ["t"]
    # the database is still writable afterwards
    with db.write_transaction() as txn:
        txn.put("created-then-rolled-back", b"k", b"v")
    assert db.tree_names() == ["created-then-rolled-back", "t"]


def test_overwrite_false_keeps_values_and_counts_skipped(db: DbOperations) -> None:
    db.put_many("t", [(b"a", b"old-a"), (b"b", b"old-b")])
    with db.write_transaction() as txn:
        assert txn.put("t", b"a", b"new-a", overwrite=False) is False
        assert txn.put("t", b"z", b"new-z", overwrite=False) is True
        written, skipped = txn.put_many("t", [(b"b", b"x"), (b"c", b"y"), (b"c", b"dup")], overwrite=False)
        assert (written, skipped) == (1, 2)
        assert txn.put("t", b"b", b"forced") is True
    assert dict(db.items("t")) == {b"a": b"old-a", b"b": b"forced", b"c": b"y", b"z": b"new-z"}


def test_transaction_object_unusable_after_the_block(db: DbOperations) -> None:
    with db.write_transaction() as txn:
        txn.put("t", b"a", b"1")
    with pytest.raises(StoreError, match="over"):
        txn.put("t", b"b", b"2")
    with pytest.raises(StoreError):
        txn.get("t", b"a")
    assert db.count("t") == 1


def test_nested_write_in_same_thread_raises(db: DbOperations) -> None:
    with pytest.raises(StoreError, match="already open"):
        with db.write_transaction() as txn:
            txn.put("t", b"a", b"1")
            db.put("t", b"b", b"2")
    assert db.count("t") == 0
    with pytest.raises(StoreError, match="already open"):
        with db.write_transaction():
            with db.write_transaction():
                pass


def test_reads_during_write_transaction_see_committed_state(db: DbOperations) -> None:
    db.put("t", b"a", b"1")
    with db.write_transaction() as txn:
        txn.put("t", b"a", b"2")
        assert db.get("t", b"a") == b"1"
        assert list(db.items("t")) == [(b"a", b"1")]
    assert db.get("t", b"a") == b"2"


# --- errors -----------------------------------------------------------------------------------


def test_closed_db_raises_store_error(db: DbOperations) -> None:
    db.put("t", b"a", b"1")
    db.close()
    db.close()  # idempotent
    assert db.closed
    calls = [
        lambda: db.get("t", b"a"),
        lambda: db.put("t", b"a", b"2"),
        lambda: db.delete("t", b"a"),
        lambda: db.items("t"),
        lambda: db.count("t"),
        lambda: db.tree_names(),
        lambda: db.create_tree("x"),
        lambda: db.put_many("t", []),
        lambda: db.write_transaction().__enter__(),
        lambda: db.reserve(10),
    ]
    for call in calls:
        with pytest.raises(StoreError, match="closed"):
            call()


def test_close_under_open_iterator_raises_store_error(db: DbOperations) -> None:
    db.put_many("t", [(b"a", b"1"), (b"b", b"2")])
    it = db.items("t")
    assert next(it) == (b"a", b"1")
    db.close()
    with pytest.raises(StoreError):
        list(it)


def test_unknown_backend(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="lmdb.*sqlite"):
        DbOperations.open(tmp_path / "x", "rocksdb")
    with pytest.raises(ArgumentTypeError):
        DbOperations.open(tmp_path / "x", None)  # type: ignore[arg-type]
    assert sorted(BACKENDS) == ["lmdb", "sqlite"]


def test_unknown_option(tmp_path: Path, backend: str) -> None:
    with pytest.raises(InvalidArgumentError, match="bogus"):
        DbOperations.open(db_location(tmp_path, backend), backend, bogus=1)


def test_missing_parent_directory(tmp_path: Path, backend: str) -> None:
    with pytest.raises(StoreError, match="parent directory does not exist"):
        DbOperations.open(tmp_path / "missing" / "db", backend)


def test_lmdb_path_is_a_file(tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_bytes(b"not a directory")
    with pytest.raises(StoreError, match="needs a directory"):
        DbOperations.open(file, "lmdb")


def test_sqlite_path_is_a_directory_or_garbage(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="needs a file"):
        DbOperations.open(tmp_path, "sqlite")
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"definitely not an sqlite database" * 100)
    with pytest.raises(StoreError, match="cannot open SQLite database"):
        DbOperations.open(garbage, "sqlite")


def test_sqlite_locked_by_another_connection_says_so(tmp_path: Path) -> None:
    """A lock held past the store's timeout is named as such, with what to do; not "check that
    it is an SQLite file" (it is one)."""
    import sqlite3

    path = tmp_path / "locked.sqlite"
    with DbOperations.open(path, "sqlite") as db:
        db.put("t", b"a", b"1")
    with DbOperations.open(path, "sqlite", timeout=0.05) as db:
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN EXCLUSIVE")
            with pytest.raises(StoreError, match="another connection holds a lock") as info:
                db.put("t", b"b", b"2")
            assert "timeout" in str(info.value) and "SQLite file" not in str(info.value)
            other.execute("ROLLBACK")
        finally:
            other.close()
        db.put("t", b"b", b"2")  # once the lock is gone
        assert db.count("t") == 2
    # Opening one without datafold's tables takes the write lock to create them.
    fresh = tmp_path / "fresh.sqlite"
    other = sqlite3.connect(fresh, isolation_level=None)
    try:
        other.execute("PRAGMA journal_mode=WAL")
        other.execute("CREATE TABLE unrelated (x)")
        other.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StoreError, match="another connection holds a lock") as info:
            DbOperations.open(fresh, "sqlite", timeout=0.05)
        assert "cannot open SQLite database" in str(info.value) and "SQLite file" not in str(info.value)
    finally:
        other.close()


def test_sqlite_opens_and_reads_while_another_connection_writes(tmp_path: Path) -> None:
    """Opening an existing database takes no write lock (WAL readers go on beside a writer), so a
    backup is not held up by another connection's write transaction; it sees the committed state."""
    import sqlite3

    path = tmp_path / "busy.sqlite"
    with DbOperations.open(path, "sqlite") as db:
        db.put("t", b"a", b"1")
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        other.execute("INSERT INTO kv (tree, key, value) VALUES ('t', x'62', x'32')")
        with DbOperations.open(path, "sqlite", timeout=0.05) as db, db.snapshot() as snap:
            assert list(snap.items("t")) == [(b"a", b"1")]
        other.execute("ROLLBACK")
    finally:
        other.close()


def test_sqlite_in_rollback_journal_mode_waits_for_a_writer_when_opened(tmp_path: Path) -> None:
    """Switching a rollback-journal database to WAL needs an exclusive lock, and SQLite refuses it at
    once while another connection writes: the store retries for its timeout."""
    import sqlite3

    path = tmp_path / "journal.sqlite"
    with DbOperations.open(path, "sqlite") as db:
        db.put("t", b"a", b"1")
    raw = sqlite3.connect(path, isolation_level=None, check_same_thread=False)  # the timer commits
    assert raw.execute("PRAGMA journal_mode=DELETE").fetchone()[0] == "delete"
    raw.execute("BEGIN IMMEDIATE")
    raw.execute("INSERT INTO kv (tree, key, value) VALUES ('t', x'62', x'32')")
    releaser = threading.Timer(0.3, lambda: raw.execute("COMMIT"))
    releaser.start()
    try:
        started = time.monotonic()
        with DbOperations.open(path, "sqlite", timeout=10) as db:
            assert time.monotonic() - started >= 0.25
            assert list(db.items("t")) == [(b"a", b"1"), (b"b", b"2")]
    finally:
        releaser.join()
        raw.close()


def test_sqlite_rows_that_are_not_blobs_are_a_store_error(tmp_path: Path) -> None:
    """A row another program wrote into kv with other types is named, not taken for bytes."""
    import sqlite3

    path = tmp_path / "foreign-rows.sqlite"
    with DbOperations.open(path, "sqlite") as db:
        db.put("t", b"a", b"1")
    for key, value, types in (
        (b"s", "text", "TEXT"),
        (b"i", 123, "INTEGER"),
        (b"r", 1.5, "REAL"),
        ("text key", b"v", "BLOB"),  # a TEXT key sorts before every BLOB: not skipped unseen
    ):
        raw = sqlite3.connect(path, isolation_level=None)
        raw.execute("DELETE FROM kv WHERE key != x'61'")
        raw.execute("INSERT INTO kv (tree, key, value) VALUES ('t', ?, ?)", (key, value))
        raw.close()
        with DbOperations.open(path, "sqlite") as db:
            with pytest.raises(StoreError, match=f"tree 't' holds a row datafold did not write.*value of type {types}"):
                list(db.items("t"))
            if isinstance(key, bytes):  # a get() asks for a BLOB key only
                with pytest.raises(StoreError, match="did not write"):
                    db.get("t", key)
            with db.snapshot() as snap, pytest.raises(StoreError, match="did not write"):
                for _ in snap.batches("t", b""):
                    pass


def test_argument_validation(db: DbOperations) -> None:
    with pytest.raises(InvalidArgumentError, match="tree"):
        db.put("", b"k", b"v")
    with pytest.raises(ArgumentTypeError, match="tree"):
        db.get(5, b"k")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="NUL"):
        db.create_tree("a\x00b")
    with pytest.raises(ArgumentTypeError, match="key"):
        db.put("t", "k", b"v")  # type: ignore[arg-type]
    with pytest.raises(ArgumentTypeError, match="value"):
        db.put("t", b"k", None)  # type: ignore[arg-type]
    with pytest.raises(ArgumentTypeError, match="prefix"):
        db.items("t", "p")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="nbytes"):
        db.reserve(-1)
    with db.write_transaction() as txn:
        with pytest.raises(ArgumentTypeError, match="overwrite"):
            txn.put("t", b"k", b"v", overwrite=None)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError, match="tree"):
            txn.create_tree("")
    assert db.tree_names() == []


def test_lmdb_key_limits(tmp_path: Path) -> None:
    import lmdb

    with DbOperations.open(tmp_path / "db", "lmdb") as db:
        long_key = b"k" * 512
        try:
            db.put("t", long_key, b"v")
        except lmdb.Error:  # pragma: no cover - the failure this test guards against
            pytest.fail("an lmdb.Error leaked")
        except StoreError as e:
            assert "511" in str(e)
        else:
            pytest.fail("a 512-byte key was accepted")
        with pytest.raises(StoreError, match="empty key"):
            db.put("t", b"", b"v")
        with pytest.raises(StoreError, match="511"):
            db.put_many("t", [(b"ok", b"v"), (long_key, b"v")])
        with pytest.raises(StoreError, match="511"):
            with db.write_transaction() as txn:
                txn.put("t", long_key, b"v")
        db.put("t", b"k" * 511, b"max")
        assert db.get("t", b"k" * 511) == b"max"
        assert db.get("t", long_key) is None
        assert db.get("t", b"") is None
        assert db.delete("t", long_key) is False
        assert [k for k, _ in db.items("t")] == [b"k" * 511]
        assert list(db.items("t", long_key)) == []
        with db.write_transaction() as txn:
            assert list(txn.items("t", long_key)) == []
            assert txn.get("t", long_key) is None


def test_sqlite_accepts_empty_key(tmp_path: Path) -> None:
    with DbOperations.open(tmp_path / "db.sqlite", "sqlite") as db:
        db.put("t", b"", b"empty key")
        assert db.get("t", b"") == b"empty key"
        assert list(db.items("t")) == [(b"", b"empty key")]


# --- LMDB appends -----------------------------------------------------------------------------


def lmdb_tree_pages(path: Path, tree: str) -> int:
    """Leaf + branch + overflow pages of one tree, read with py-lmdb after the store is closed."""
    import lmdb

    env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=8)
    try:
        with env.begin() as txn:
            info = txn.stat(env.open_db(tree.encode(), txn=txn, create=False))
        return int(info["leaf_pages"] + info["branch_pages"] + info["overflow_pages"])
    finally:
        env.close()


def ascending_records(n: int) -> list[tuple[bytes, bytes]]:
    return [(b"key-%08d" % i, b"value %d " % i * 8) for i in range(n)]


def test_lmdb_put_many_appends_and_fills_pages(tmp_path: Path) -> None:
    """Batches whose keys ascend past the tree's end go in with MDB_APPEND, which fills each page:
    the same records written out of order take far more pages (LMDB splits pages in half)."""
    records = ascending_records(20_000)
    batches = [records[i : i + 4096] for i in range(0, len(records), 4096)]
    for name, order in (("appended", batches), ("reversed", batches[::-1])):
        with DbOperations.open(tmp_path / name, "lmdb") as db:
            with db.write_transaction() as txn:
                assert [txn.put_many("t", batch) for batch in order] == [(len(b), 0) for b in order]
            assert list(db.items("t")) == records
    appended, reversed_ = lmdb_tree_pages(tmp_path / "appended", "t"), lmdb_tree_pages(tmp_path / "reversed", "t")
    payload_pages = sum(len(k) + len(v) + 8 for k, v in records) / 4096
    assert appended <= 1.1 * payload_pages + 4
    assert reversed_ >= 1.5 * appended


@pytest.mark.parametrize("overwrite", [True, False])
def test_lmdb_put_many_mixes_appends_and_inserts(tmp_path: Path, overwrite: bool) -> None:
    """Any order of batches gives the same tree and counts, appended or not."""
    with DbOperations.open(tmp_path / "db", "lmdb") as db:
        with db.write_transaction() as txn:
            assert txn.put_many("t", [(b"b", b"1"), (b"d", b"2")], overwrite) == (2, 0)  # appended
            assert txn.put_many("t", [(b"e", b"3"), (b"f", b"4")], overwrite) == (2, 0)  # appended
            assert txn.put_many("t", [(b"a", b"5"), (b"c", b"6")], overwrite) == (2, 0)  # before the end
            written = (3, 0) if overwrite else (1, 2)
            assert txn.put_many("t", [(b"f", b"7"), (b"g", b"8"), (b"g", b"9")], overwrite) == written
            assert txn.put_many("t", [(b"z", b"10")], overwrite) == (1, 0)
        want = {b"a": b"5", b"b": b"1", b"c": b"6", b"d": b"2", b"e": b"3", b"f": b"7" if overwrite else b"4"}
        want |= {b"g": b"9" if overwrite else b"8", b"z": b"10"}
        assert dict(db.items("t")) == want


def test_lmdb_refused_append_fails_the_transaction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If LMDB ever refuses an append (a key order other than keys_ascending's), the transaction
    fails and rolls back instead of dropping records."""
    from datafold.stores import lmdb as lmdb_store

    with DbOperations.open(tmp_path / "db", "lmdb") as db:
        db.put("t", b"m", b"before")
        monkeypatch.setattr(lmdb_store.core, "keys_ascending", lambda pairs, after: True)
        with pytest.raises(StoreError, match="refused keys appended in ascending order"):
            with db.write_transaction() as txn:
                txn.put_many("t", [(b"x", b"1"), (b"a", b"2")])
        monkeypatch.undo()
        assert list(db.items("t")) == [(b"m", b"before")]


# --- LMDB map growth --------------------------------------------------------------------------


def twenty_mib_of_records() -> Iterator[tuple[bytes, bytes]]:
    for i in range(320):
        yield i.to_bytes(4, "big"), bytes([i % 251]) * (64 * 1024)


def test_lmdb_map_grows_for_put_many_iterator(small_lmdb: DbOperations) -> None:
    assert small_lmdb.put_many("t", twenty_mib_of_records()) == 320  # a generator: cannot be re-read
    assert map_size(small_lmdb) > 20 * MiB
    assert small_lmdb.count("t") == 320
    assert small_lmdb.get("t", (319).to_bytes(4, "big")) == bytes([319 % 251]) * (64 * 1024)
    assert sum(len(v) for _, v in small_lmdb.items("t")) == 20 * MiB


def test_lmdb_map_grows_for_put_many_list(small_lmdb: DbOperations) -> None:
    records = list(twenty_mib_of_records())
    assert small_lmdb.put_many("t", records) == 320
    assert list(small_lmdb.items("t")) == records


def test_lmdb_map_grows_for_put(small_lmdb: DbOperations) -> None:
    for i in range(40):
        small_lmdb.put("t", i.to_bytes(4, "big"), bytes([i]) * (512 * 1024))
    assert map_size(small_lmdb) > 20 * MiB
    assert small_lmdb.count("t") == 40
    assert small_lmdb.get("t", (39).to_bytes(4, "big")) == bytes([39]) * (512 * 1024)


def test_lmdb_write_transaction_after_reserve(small_lmdb: DbOperations) -> None:
    records = list(twenty_mib_of_records())
    small_lmdb.reserve(sum(len(k) + len(v) for k, v in records))
    assert map_size(small_lmdb) > 20 * MiB
    with small_lmdb.write_transaction() as txn:
        for key, value in records:
            txn.put("t", key, value)
    assert small_lmdb.count("t") == 320
    assert list(small_lmdb.items("t")) == records


def test_lmdb_write_transaction_full_map_rolls_back(small_lmdb: DbOperations) -> None:
    small_lmdb.put("t", b"before", b"1")
    with pytest.raises(StoreError, match="database map is full.*reserve"):
        with small_lmdb.write_transaction() as txn:
            txn.put("t", b"before", b"changed")
            for key, value in twenty_mib_of_records():
                txn.put("t", key, value)
    assert list(small_lmdb.items("t")) == [(b"before", b"1")]
    # swallowing the error inside the block still rolls back and raises at the end
    with pytest.raises(StoreError, match="rolled back"):
        with small_lmdb.write_transaction() as txn:
            try:
                for key, value in twenty_mib_of_records():
                    txn.put("t", key, value)
            except StoreError:
                pass
    assert small_lmdb.count("t") == 1


def test_lmdb_reserve_is_enough_for_small_records(tmp_path: Path) -> None:
    """Many tiny records carry the most B-tree overhead per byte; reserve() must cover it."""
    with DbOperations.open(tmp_path / "db", "lmdb", map_size=MiB) as db:
        rng = random.Random(3)
        records = [(rng.randbytes(4), b"") for _ in range(200_000)]
        nbytes = sum(len(k) + len(v) for k, v in records)
        db.reserve(nbytes, records=len(records))
        # 3 * (bytes + 16 per record) + 8 MiB of slack
        assert map_size(db) >= 3 * (nbytes + 16 * len(records)) + 8 * MiB
        with db.write_transaction() as txn:
            for key, value in records:
                txn.put("t", key, value)
        assert db.count("t") == len({k for k, _ in records})
        before = map_size(db)
        db.reserve(0)  # the map has room already: no change
        assert map_size(db) == before


def test_sqlite_reserve_is_a_no_op(tmp_path: Path) -> None:
    with DbOperations.open(tmp_path / "db.sqlite", "sqlite") as db:
        db.reserve(10 * MiB, records=5)
        with pytest.raises(ArgumentTypeError, match="nbytes"):
            db.reserve("10")  # type: ignore[arg-type]


def test_lmdb_growth_refused_while_this_thread_iterates(small_lmdb: DbOperations) -> None:
    small_lmdb.put("t", b"a", b"1")
    it = small_lmdb.items("t")
    assert next(it) == (b"a", b"1")
    with pytest.raises(StoreError, match="items\\(\\) iterator"):
        small_lmdb.put_many("u", twenty_mib_of_records())
    assert small_lmdb.count("u") == 0
    it.close()
    assert small_lmdb.put_many("u", twenty_mib_of_records()) == 320


def test_lmdb_growth_waits_for_other_threads(small_lmdb: DbOperations) -> None:
    small_lmdb.put_many("t", [(b"a", b"1"), (b"b", b"2")])
    started = threading.Event()
    seen: list[tuple[bytes, bytes]] = []

    def reader() -> None:
        it = small_lmdb.items("t")
        seen.append(next(it))
        started.set()
        time.sleep(0.3)
        seen.extend(it)

    thread = threading.Thread(target=reader)
    thread.start()
    started.wait(5)
    assert small_lmdb.put_many("u", twenty_mib_of_records()) == 320
    thread.join(5)
    assert seen == [(b"a", b"1"), (b"b", b"2")]
    assert small_lmdb.count("u") == 320


def test_lmdb_same_directory_opened_twice_shares_environment(tmp_path: Path) -> None:
    first = DbOperations.open(tmp_path / "db", "lmdb", map_size=MiB)
    second = DbOperations.open(tmp_path / "db", "lmdb")
    first.put_many("t", twenty_mib_of_records())
    assert second.count("t") == 320
    first.close()
    second.put("t", b"after", b"close")
    assert second.get("t", b"after") == b"close"
    second.close()
    with DbOperations.open(tmp_path / "db", "lmdb") as third:
        assert third.count("t") == 321


def test_lmdb_leaves_no_data_in_the_main_database(tmp_path: Path) -> None:
    import lmdb

    with DbOperations.open(tmp_path / "db", "lmdb") as db:
        db.put("one", b"k", b"v")
        db.create_tree("two")
    env = lmdb.open(str(tmp_path / "db"), max_dbs=8)
    try:
        with env.begin() as txn:
            assert [k for k, _ in txn.cursor()] == [b"one", b"two"]
    finally:
        env.close()


# --- helpers and a model check ----------------------------------------------------------------


def test_is_metadata_tree() -> None:
    assert is_metadata_tree("metadata")
    assert is_metadata_tree("_datafold")
    assert not is_metadata_tree("users")
    assert not is_metadata_tree("metadata2")
    with pytest.raises(ArgumentTypeError):
        is_metadata_tree(b"metadata")  # type: ignore[arg-type]


def test_prefix_successor() -> None:
    assert prefix_successor(b"") is None
    assert prefix_successor(b"\xff") is None
    assert prefix_successor(b"\xff\xff") is None
    assert prefix_successor(b"a") == b"b"
    assert prefix_successor(b"a\xff") == b"b"
    assert prefix_successor(b"a\xfe") == b"a\xff"
    assert prefix_successor(b"\x00\xff\xff") == b"\x01"


_example_ids = count()
keys_strategy = st.binary(min_size=1, max_size=6).map(lambda b: b.replace(b"\x02", b"\xff"))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["put", "delete", "txn"]), keys_strategy, st.binary(max_size=8)), max_size=30
    ),
    prefixes=st.lists(st.binary(max_size=2).map(lambda b: b.replace(b"\x02", b"\xff")), max_size=4),
)
def test_matches_a_dict_model(db: DbOperations, ops: list[tuple[str, bytes, bytes]], prefixes: list[bytes]) -> None:
    tree = f"model-{next(_example_ids)}"  # the db fixture is shared by all examples
    model: dict[bytes, bytes] = {}
    for op, key, value in ops:
        if op == "put":
            db.put(tree, key, value)
            model[key] = value
        elif op == "delete":
            assert db.delete(tree, key) == (key in model)
            model.pop(key, None)
        else:
            with db.write_transaction() as txn:
                assert txn.put(tree, key, value, overwrite=False) == (key not in model)
            model.setdefault(key, value)
    assert list(db.items(tree)) == sorted(model.items())
    for prefix in prefixes:
        assert list(db.items(tree, prefix)) == sorted((k, v) for k, v in model.items() if k.startswith(prefix))
    assert db.count(tree) == len(model)


# --- read snapshots ---------------------------------------------------------------------------

OLD_A = [(b"k1", b"v1"), (b"k2", b"v2"), (b"k4", b"v4")]
OLD_B = [(b"x", b"1"), (b"y", b"2")]


def fill_old_state(db: DbOperations) -> None:
    db.put_many("a", OLD_A)
    db.put_many("b", OLD_B)


def change_state(db: DbOperations) -> None:
    """Writes of every kind: overwrite, insert, delete, new trees (put and create_tree), a transaction."""
    db.put("a", b"k1", b"changed")
    db.put("a", b"k3", b"inserted")
    assert db.delete("a", b"k2") is True
    db.put("c", b"new", b"tree")
    db.create_tree("d")
    with db.write_transaction() as txn:
        txn.delete("b", b"x")
        txn.put("b", b"z", b"3")


def assert_old_state(snap: Any) -> None:
    assert snap.tree_names() == ["a", "b"]
    assert list(snap.items("a")) == OLD_A
    assert list(snap.items("b")) == OLD_B
    assert list(snap.items("a", b"k2")) == [(b"k2", b"v2")]
    assert snap.get("a", b"k1") == b"v1"
    assert snap.get("a", b"k2") == b"v2"
    assert snap.get("a", b"k3") is None
    assert snap.get("b", b"x") == b"1"
    assert snap.get("c", b"new") is None
    assert snap.count("a") == 3
    assert snap.count("b") == 2
    assert snap.count("c") == 0
    assert list(snap.items("c")) == []
    assert list(snap.items("d")) == []


def assert_new_state(snap: Any) -> None:
    assert snap.tree_names() == ["a", "b", "c", "d"]
    assert list(snap.items("a")) == [(b"k1", b"changed"), (b"k3", b"inserted"), (b"k4", b"v4")]
    assert list(snap.items("b")) == [(b"y", b"2"), (b"z", b"3")]
    assert snap.get("a", b"k2") is None
    assert snap.get("c", b"new") == b"tree"
    assert snap.count("a") == 3
    assert snap.count("c") == 1
    assert snap.count("d") == 0


def run_in_thread(target: Any) -> None:
    """Run target in another thread and re-raise what it raised."""
    errors: list[BaseException] = []

    def wrapper() -> None:
        try:
            target()
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    thread = threading.Thread(target=wrapper)
    thread.start()
    thread.join(60)
    assert not thread.is_alive()
    if errors:
        raise errors[0]


def test_snapshot_ignores_writes_from_another_thread(db: DbOperations) -> None:
    fill_old_state(db)
    with db.snapshot() as snap:
        assert snap.get("a", b"k1") == b"v1"  # the snapshot is in use before the writes
        run_in_thread(lambda: change_state(db))
        assert db.get("a", b"k1") == b"changed"  # the writes are committed
        assert_old_state(snap)
    with db.snapshot() as snap:
        assert_new_state(snap)


def test_snapshot_ignores_writes_from_the_same_thread(db: DbOperations) -> None:
    fill_old_state(db)
    with db.snapshot() as snap:
        change_state(db)
        assert db.tree_names() == ["a", "b", "c", "d"]
        assert_old_state(snap)
    with db.snapshot() as snap:
        assert_new_state(snap)


def test_snapshot_ignores_writes_from_another_process(path: Path, backend: str, tmp_path: Path) -> None:
    import subprocess
    import sys

    script = tmp_path / "writer.py"
    script.write_text(
        "import sys\n"
        "from datafold.stores import DbOperations\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_stores import change_state\n"
        "with DbOperations.open(sys.argv[1], sys.argv[2]) as db:\n"
        "    change_state(db)\n"
    )
    with DbOperations.open(path, backend) as db:
        fill_old_state(db)
        with db.snapshot() as snap:
            assert snap.count("a") == 3
            subprocess.run([sys.executable, str(script), str(path), backend], check=True, timeout=120)
            assert db.get("a", b"k1") == b"changed"
            assert_old_state(snap)
        with db.snapshot() as snap:
            assert_new_state(snap)


def test_snapshot_interleaved_iterators(db: DbOperations) -> None:
    db.put_many("a", [(i.to_bytes(2, "big"), b"a%d" % i) for i in range(500)])
    db.put_many("b", [(i.to_bytes(2, "big"), b"b%d" % i) for i in range(0, 1000, 2)])
    with db.snapshot() as snap:
        it_a, it_b, it_a_prefix = snap.items("a"), snap.items("b"), snap.items("a", b"\x01")
        seen_a, seen_b = [], []
        for n, (pa, pb) in enumerate(zip(it_a, it_b, strict=True)):
            seen_a.append(pa)
            seen_b.append(pb)
            if n == 10:  # writes and other reads in the middle of the iterations
                db.put("a", b"\x00\xff\x01", b"late")
                db.delete("b", (20).to_bytes(2, "big"))
                run_in_thread(lambda: db.put_many("b", [(b"\x00\x15", b"late")]))
                assert snap.get("b", (20).to_bytes(2, "big")) == b"b20"
                assert snap.count("a") == 500
                assert next(it_a_prefix) == (b"\x01\x00", b"a256")
        assert seen_a == [(i.to_bytes(2, "big"), b"a%d" % i) for i in range(500)]
        assert seen_b == [(i.to_bytes(2, "big"), b"b%d" % i) for i in range(0, 1000, 2)]
        assert [k for k, _ in it_a_prefix] == [i.to_bytes(2, "big") for i in range(257, 500)]
        assert all(type(k) is bytes and type(v) is bytes for k, v in seen_a + seen_b)
    assert db.count("a") == 501


def test_snapshot_is_unusable_after_the_block(db: DbOperations) -> None:
    db.put_many("t", [(b"a", b"1"), (b"b", b"2")])
    with db.snapshot() as snap:
        started = snap.items("t")
        assert next(started) == (b"a", b"1")
        unstarted = snap.items("t")
    calls = [
        lambda: snap.tree_names(),
        lambda: snap.get("t", b"a"),
        lambda: snap.count("t"),
        lambda: snap.items("t"),
        lambda: next(started),
        lambda: next(unstarted),
    ]
    for call in calls:
        with pytest.raises(StoreError, match="snapshot is over"):
            call()
    # leaving the block by an exception ends the snapshot too, and lets the exception through
    with pytest.raises(KeyError):
        with db.snapshot() as snap:
            it = snap.items("t")
            raise KeyError("boom")
    with pytest.raises(StoreError, match="snapshot is over"):
        list(it)
    db.put("t", b"c", b"3")  # the database is not left locked
    assert db.count("t") == 3


def test_snapshot_and_closed_database(db: DbOperations) -> None:
    db.put("t", b"a", b"1")
    with db.snapshot() as snap:
        it = snap.items("t")
        db.close()
        with pytest.raises(StoreError, match="closed"):
            snap.get("t", b"a")
        with pytest.raises(StoreError, match="closed"):
            next(it)
    with pytest.raises(StoreError, match="closed"):
        db.snapshot()


def test_snapshot_argument_validation(db: DbOperations) -> None:
    db.put("t", b"a", b"1")
    with db.snapshot() as snap:
        with pytest.raises(ArgumentTypeError, match="tree"):
            snap.get(5, b"a")  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError, match="tree"):
            snap.count("")
        with pytest.raises(InvalidArgumentError, match="NUL"):
            snap.items("a\x00b")
        with pytest.raises(ArgumentTypeError, match="key"):
            snap.get("t", "a")  # type: ignore[arg-type]
        with pytest.raises(ArgumentTypeError, match="prefix"):
            snap.items("t", "a")  # type: ignore[arg-type]
        assert snap.get("t", memoryview(b"a")) == b"1"
        assert list(snap.items("t", bytearray(b"a"))) == [(b"a", b"1")]


def test_snapshots_release_their_resources(db: DbOperations) -> None:
    db.put("t", b"a", b"1")
    for i in range(300):  # more than LMDB's default 126 reader slots if they leaked
        with db.snapshot() as snap:
            it = snap.items("t")
            assert next(it) == (b"a", b"1")
            if i % 2:
                db.put("t", b"a", b"1")  # a write while the snapshot is open
    db.put("t", b"b", b"2")
    assert db.count("t") == 2


def test_snapshot_shared_by_threads(db: DbOperations) -> None:
    records = [(i.to_bytes(4, "big"), b"v%d" % i) for i in range(2000)]
    db.put_many("t", records)
    results: list[list[tuple[bytes, bytes]]] = []
    with db.snapshot() as snap:
        db.put_many("t", [(b"\x00", b"late")])

        def read() -> None:
            results.append(list(snap.items("t")))

        threads = [threading.Thread(target=read) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert results == [records] * 4


def test_lmdb_growth_refused_while_this_thread_holds_a_snapshot(small_lmdb: DbOperations) -> None:
    small_lmdb.put("t", b"a", b"1")
    before = map_size(small_lmdb)
    with small_lmdb.snapshot() as snap:
        small_lmdb.put("t", b"b", b"2")  # fits in the map: fine
        with pytest.raises(StoreError, match="snapshot"):
            small_lmdb.put_many("u", twenty_mib_of_records())
        with pytest.raises(StoreError, match="snapshot"):
            small_lmdb.reserve(20 * MiB)
        assert snap.count("t") == 1
        assert map_size(small_lmdb) == before
    assert small_lmdb.count("u") == 0
    assert small_lmdb.put_many("u", twenty_mib_of_records()) == 320


def test_lmdb_growth_in_another_thread_waits_for_the_snapshot(small_lmdb: DbOperations) -> None:
    small_lmdb.put("t", b"a", b"1")
    done = threading.Event()
    results: list[object] = []

    def writer() -> None:
        try:
            results.append(small_lmdb.put_many("u", twenty_mib_of_records()))
        except BaseException as e:  # pragma: no cover - asserted below
            results.append(e)
        done.set()

    with small_lmdb.snapshot() as snap:
        thread = threading.Thread(target=writer)
        thread.start()
        assert not done.wait(0.5)  # the grow waits for the snapshot to end
        assert list(snap.items("t")) == [(b"a", b"1")]
        assert snap.tree_names() == ["t"]
    thread.join(60)
    assert results == [320]
    assert small_lmdb.count("u") == 320


def test_lmdb_snapshot_keeps_tree_handles_intact(tmp_path: Path) -> None:
    """Trees read in a snapshot of a fresh environment, and trees created while it is open, all stay intact."""
    with DbOperations.open(tmp_path / "db", "lmdb") as db:
        db.put("a", b"k", b"a")
        db.put("b", b"k", b"b")
    with DbOperations.open(tmp_path / "db", "lmdb") as db:  # a fresh environment: no handles open yet
        with db.snapshot() as snap:
            assert snap.get("a", b"k") == b"a"
            assert list(snap.items("b")) == [(b"k", b"b")]
            db.put("c", b"k", b"c")
            run_in_thread(lambda: db.put("d", b"k", b"d"))
            with db.write_transaction() as txn:
                txn.put("e", b"k", b"e")
                txn.put("a", b"k2", b"a2")
            assert snap.get("a", b"k") == b"a"
            assert snap.count("a") == 1
        for name in "abcde":
            assert db.get(name, b"k") == name.encode()
        assert db.get("a", b"k2") == b"a2"
    with DbOperations.open(tmp_path / "db", "lmdb") as db:
        assert db.tree_names() == list("abcde")
        assert {name: dict(db.items(name)) for name in "bcde"} == {n: {b"k": n.encode()} for n in "bcde"}
        assert dict(db.items("a")) == {b"k": b"a", b"k2": b"a2"}


def test_lmdb_snapshot_ending_during_a_write_keeps_its_trees(tmp_path: Path) -> None:
    """A snapshot that opened tree handles itself would close them when it ends, under a write
    transaction that created a tree in the same handle slot meanwhile (its commit would then fail)."""
    with DbOperations.open(tmp_path / "db", "lmdb") as db:
        db.put("a", b"k", b"a")
    with DbOperations.open(tmp_path / "db", "lmdb") as db:  # a fresh environment: no handles open yet
        with ExitStack() as stack:
            snap = stack.enter_context(db.snapshot())
            assert snap.get("a", b"k") == b"a"
            with db.write_transaction() as txn:
                txn.put("new", b"k", b"new")
                stack.close()  # the snapshot ends while the write transaction is open
        assert db.get("new", b"k") == b"new"
        assert db.get("a", b"k") == b"a"
    with DbOperations.open(tmp_path / "db", "lmdb") as db:
        assert db.tree_names() == ["a", "new"]
        assert db.get("new", b"k") == b"new"


def test_snapshot_inside_a_write_transaction(db: DbOperations, backend: str) -> None:
    db.put("t", b"a", b"1")
    with db.write_transaction() as txn:
        txn.put("t", b"a", b"uncommitted")
        if backend == "lmdb":
            with pytest.raises(StoreError, match="write transaction"):
                db.snapshot().__enter__()
        else:
            with db.snapshot() as snap:
                assert snap.get("t", b"a") == b"1"
    with db.snapshot() as snap:
        assert snap.get("t", b"a") == b"uncommitted"


def test_transaction_put_many_leaves_the_callers_list_alone(db: DbOperations) -> None:
    items = [(b"a", b"1"), (b"b", b"2")]
    with db.write_transaction() as txn:
        assert txn.put_many("t", items) == (2, 0)
    assert items == [(b"a", b"1"), (b"b", b"2")]
    assert list(db.items("t")) == items
