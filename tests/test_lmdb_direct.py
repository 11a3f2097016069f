"""LMDB direct reads: snapshots read records from data.mdb's pages in the Rust core
(src/lmdb_file.rs) and must give exactly what py-lmdb gives, batch for batch in content."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import lmdb
import pytest
from datafold import EncryptedBackupManager, MasterKeyPair
from datafold.core import load_core
from datafold.errors import ArgumentTypeError, StoreError
from datafold.stores import DbOperations
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

rust = pytest.importorskip("datafold._core")
pytestmark = pytest.mark.skipif(load_core().CORE_NAME != "rust", reason="direct reads need the Rust core")

MiB = 1 << 20


def snapshot_items(db: DbOperations, tree: str, prefix: bytes = b"") -> tuple[list[tuple[bytes, bytes]], list[type]]:
    """The records of a snapshot's batches(), and the batch types seen."""
    with db.snapshot() as snap:
        batches = list(snap.batches(tree, prefix))
        return [pair for batch in batches for pair in batch], [type(b) for b in batches]


def open_pair(tmp_path: Path) -> tuple[DbOperations, DbOperations]:
    """The same directory through two stores (one shared environment): direct reads on and off."""
    path = tmp_path / "db"
    return DbOperations.open(path, map_size=64 * MiB), DbOperations.open(path, direct_reads=False)


def test_direct_reads_are_record_batches_equal_to_py_lmdb(tmp_path: Path) -> None:
    direct, plain = open_pair(tmp_path)
    records = [(b"k%06d" % i, os.urandom(i % 300)) for i in range(20_000)]
    direct.put_many("t", records)
    got, kinds = snapshot_items(direct, "t")
    want, plain_kinds = snapshot_items(plain, "t")
    assert got == want == records
    assert set(kinds) == {rust.RecordBatch}
    assert set(plain_kinds) == {list}
    assert snapshot_items(direct, "t", b"k0123")[0] == [r for r in records if r[0].startswith(b"k0123")]
    assert snapshot_items(direct, "t", b"zz")[0] == []
    assert snapshot_items(direct, "missing")[0] == []
    direct.close()
    plain.close()


def test_batches_held_past_later_ones_keep_their_records(tmp_path: Path) -> None:
    """Batches taken one at a time (each dropped by the loop) give every record once; a batch or
    an iterator of one still held after later batches keeps its records."""
    direct, plain = open_pair(tmp_path)
    records = [(b"k%06d" % i, os.urandom(i % 3000)) for i in range(5_000)]  # ~7.5 MB: many batches
    direct.put_many("t", records)
    with direct.snapshot() as snap:
        got: list[tuple[bytes, bytes]] = []
        held: list[tuple[object, list[tuple[bytes, bytes]]]] = []
        for i, batch in enumerate(snap.batches("t")):
            got.extend(batch)
            if i == 1:
                held.append((batch, list(batch)))
            elif i == 2:
                held.append((iter(batch), list(batch)))
    assert got == records
    assert len(held) == 2
    for kept, seen in held:
        assert list(kept) == seen  # type: ignore[call-overload]
    direct.close()
    plain.close()


keys = st.binary(min_size=1, max_size=40) | st.binary(min_size=500, max_size=511)
values = st.binary(max_size=64) | st.binary(min_size=2000, max_size=20000)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    puts=st.dictionaries(keys, values, max_size=300),
    deletes=st.lists(keys, max_size=50),
    prefix=st.binary(max_size=3),
)
def test_any_tree_reads_the_same(
    tmp_path_factory: pytest.TempPathFactory, puts: dict, deletes: list, prefix: bytes
) -> None:
    direct, plain = open_pair(tmp_path_factory.mktemp("h"))
    try:
        direct.put_many("t", sorted(puts.items()))
        direct.create_tree("empty")
        with direct.write_transaction() as txn:
            for key in deletes:
                txn.delete("t", key)
        for tree in ("t", "empty"):
            assert snapshot_items(direct, tree, prefix)[0] == snapshot_items(plain, tree, prefix)[0]
        # items() on a snapshot is built on batches() too.
        with direct.snapshot() as snap:
            assert list(snap.items("t", prefix)) == sorted(
                (k, v) for k, v in puts.items() if k not in deletes and k.startswith(prefix)
            )
    finally:
        direct.close()
        plain.close()


def test_snapshot_isolation_while_another_thread_rewrites(tmp_path: Path) -> None:
    """Pages the snapshot sees are never reused while it is open, whatever writers do."""
    db = DbOperations.open(tmp_path / "db", map_size=256 * MiB)
    before = [(b"k%06d" % i, b"old" * (i % 50)) for i in range(30_000)]
    db.put_many("t", before)
    with db.snapshot() as snap:
        batches = snap.batches("t")
        first = next(batches)

        def rewrite() -> None:
            for round_ in range(3):
                db.put_many("t", [(k, b"new%d" % round_ * 40) for k, _ in before[::3]])
                with db.write_transaction() as txn:
                    for k, _ in before[1::7]:
                        txn.delete("t", k)

        writer = threading.Thread(target=rewrite)
        writer.start()
        writer.join()
        got = list(first) + [pair for batch in batches for pair in batch]
    assert got == before
    assert db.get("t", before[0][0]) == b"new2" * 40
    db.close()


def test_record_batches_digest_as_their_pairs_do(tmp_path: Path) -> None:
    """A RecordBatch is hashed from its buffer (the records framed as a backup frames them): the
    digest is the pure core's of the same pairs, across batches and with pairs mixed in."""
    from datafold._pure import backup as pure

    db = DbOperations.open(tmp_path / "db")
    records = [(b"k%05d" % i, os.urandom(i % 700)) for i in range(6_000)]  # several batches
    db.put_many("t", records)
    key = bytes(range(32))
    with db.snapshot() as snap:
        batches = list(snap.batches("t"))
    assert len(batches) > 1 and all(isinstance(b, rust.RecordBatch) for b in batches)
    want = pure.digest_items(key, records)
    assert rust.digest_batches(key, batches) == want
    assert rust.digest_batches(key, [batches[0], list(batches[1]), *batches[2:]]) == want
    assert rust.digest_items(key, (pair for b in batches for pair in b)) == want
    db.close()


def test_record_batch_is_a_sequence(tmp_path: Path) -> None:
    db = DbOperations.open(tmp_path / "db")
    db.put_many("t", [(b"a", b"1"), (b"b", b""), (b"c", b"333")])
    with db.snapshot() as snap:
        (batch,) = list(snap.batches("t"))
    assert isinstance(batch, rust.RecordBatch)
    assert len(batch) == 3 and batch.nbytes == 3 + 4
    assert batch[0] == (b"a", b"1") and batch[-1] == (b"c", b"333") and batch[1] == (b"b", b"")
    with pytest.raises(IndexError):
        batch[3]
    with pytest.raises(IndexError):
        batch[-4]
    assert list(batch) == [(b"a", b"1"), (b"b", b""), (b"c", b"333")]
    assert "records=3" in repr(batch)
    db.close()


def test_digest_batches_agree_across_cores_and_batch_kinds(tmp_path: Path, backup_key: bytes) -> None:
    direct, plain = open_pair(tmp_path)
    direct.put_many("t", [(b"k%05d" % i, b"v" * (i % 700)) for i in range(5000)])
    digests = set()
    for db in (direct, plain):
        for name in ("rust", "pure"):
            with db.snapshot() as snap:
                digests.add(tuple(load_core(name).digest_batches(backup_key, snap.batches("t"))))
    with direct.snapshot() as snap:
        digests.add(tuple(rust.digest_items(backup_key, snap.items("t"))))
    assert len(digests) == 1
    direct.close()
    plain.close()


@pytest.mark.parametrize("core", ["rust", "pure"])
def test_backup_with_direct_reads_equals_backup_without(tmp_path: Path, core: str) -> None:
    direct, plain = open_pair(tmp_path)
    direct.put_many("a", [(b"k%05d" % i, os.urandom(i % 5000)) for i in range(3000)])
    direct.put_many("b", [(b"x", b"y")])
    keys = MasterKeyPair.generate()
    results = []
    for db, name in ((direct, "d.dfb"), (plain, "p.dfb")):
        result = EncryptedBackupManager(db, keys, core=core).create_backup(str(tmp_path / name))
        results.append(result.metadata.trees)
    assert results[0] == results[1]
    direct.close()
    plain.close()


def test_damaged_page_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "db"
    db = DbOperations.open(path)
    db.put_many("t", [(b"k%06d" % i, b"v" * 50) for i in range(20_000)])
    data = path / "data.mdb"
    raw = bytearray(data.read_bytes())
    page_size = 4096
    # Clobber the header (page number) of every leaf page holding "k010000": reads of them must
    # fail cleanly. Only direct reads touch the file afterwards (py-lmdb would read garbage).
    for start in range(2 * page_size, len(raw), page_size):
        page = raw[start : start + page_size]
        if b"k010000" in page and page[10] & 0x02:
            raw[start : start + 8] = (12345678).to_bytes(8, "little")
    data.write_bytes(raw)
    with db.snapshot() as snap, pytest.raises(StoreError, match="damaged"):
        for _ in snap.batches("t"):
            pass
    db.close()


def walk_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "datafold-lmdb-walk"]


def test_walk_ahead_thread_ends_with_its_batches_or_its_snapshot(tmp_path: Path) -> None:
    """A direct scan is walked by a thread a few batches ahead; it never outlives the generator
    or the snapshot, and a generator resumed after its snapshot ended raises instead of waiting."""
    db = DbOperations.open(tmp_path / "db")
    records = [(b"k%06d" % i, b"v" * 200) for i in range(30_000)]  # ~6 MiB: several 1 MiB batches
    db.put_many("t", records)
    with db.snapshot() as snap:
        whole = [pair for batch in snap.batches("t") for pair in batch]
        assert whole == records
        assert walk_threads() == []  # exhausted: the thread is gone
        abandoned = snap.batches("t")
        assert len(next(abandoned)) > 0
        abandoned.close()
        assert walk_threads() == []
        suspended = snap.batches("t")
        first = next(suspended)
        assert walk_threads() != []
    assert walk_threads() == []  # the snapshot's end stopped it
    with pytest.raises(StoreError, match="snapshot is over"):
        next(suspended)
    assert first[0] == records[0]
    db.close()


def test_replaced_data_file_falls_back_to_py_lmdb(tmp_path: Path) -> None:
    db = DbOperations.open(tmp_path / "db")
    db.put_many("t", [(b"a", b"1")])
    db._store._shared.data_identity = (0, 0)  # type: ignore[attr-defined]  # as if data.mdb was replaced
    items, kinds = snapshot_items(db, "t")
    assert items == [(b"a", b"1")] and kinds == [list]
    db.close()


def test_direct_reads_option_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ArgumentTypeError, match="direct_reads"):
        DbOperations.open(tmp_path / "db", direct_reads="yes")


def test_scan_refuses_flagged_database(tmp_path: Path) -> None:
    """A DUPSORT database is not something the store makes; its record is refused."""
    env = lmdb.open(str(tmp_path / "raw"), max_dbs=4)
    dup = env.open_db(b"dup", dupsort=True)
    with env.begin(write=True) as txn:
        txn.put(b"a", b"1", db=dup)
        txn.put(b"a", b"2", db=dup)
    with env.begin() as txn:
        record = txn.get(b"dup")
    env.close()
    data_file = rust.LmdbDataFile(tmp_path / "raw" / "data.mdb")
    assert data_file.version == 1 and data_file.page_size == 4096
    with pytest.raises(StoreError, match="DUPSORT"):
        data_file.scan(record)
