"""BackupOptions and RestoreOptions: every option changes what happens (each test fails if its
option is ignored) and invalid values raise ValueError / TypeError naming the field."""

# The fixtures imported from helpers are pytest fixtures: test arguments "redefine" them.
# ruff: noqa: F811

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import datafold.manager as manager_module
import pytest
from datafold import (
    ArgumentTypeError,
    BackupIOError,
    BackupMode,
    BackupOptions,
    DatabaseError,
    DbOperations,
    EncryptedBackupManager,
    IntegrityError,
    RestoreOptions,
    StoreError,
)
from datafold.atomic import AtomicFile
from helpers import (  # noqa: F401 - fixtures
    SMALL_SEGMENTS,
    WRITE_TXN_CLASS,
    Env,
    WriteSpy,
    as_snapshot,
    backend,
    core_name,
    env,
    fill,
    filled,
    flip_byte,
    open_env,
    sample_data,
    segment_offset,
    snapshot,
)

TREES = sorted(sample_data())


def listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def restored(e: Env, path: Path, options: RestoreOptions | None = None) -> dict[str, list[tuple[bytes, bytes]]]:
    """What restoring `path` into a fresh empty database gives."""
    target = e.open_db(f"restored-{path.name}")
    e.manager_for(target).restore_backup(path, options)
    return snapshot(target)


# === BackupOptions ================================================================================

# --- tree_filter ---


@pytest.mark.parametrize("kind", [list, tuple, set, frozenset])
def test_backup_tree_filter_takes_any_collection(filled: Env, kind: type) -> None:
    """Only the named trees are backed up."""
    result = filled.manager.create_backup(filled.backup_path(), BackupOptions(tree_filter=kind(["users", "logs"])))
    assert set(result.metadata.trees) == {"users", "logs"}
    expected = as_snapshot({t: sample_data()[t] for t in ("users", "logs")})
    assert restored(filled, Path(result.path)) == expected


@pytest.mark.parametrize("bad", ["users", b"users", 42, ["users", 7]])
def test_backup_tree_filter_rejects_non_collections(bad: Any) -> None:
    """A bare string (which would be read letter by letter) and other non-names raise TypeError."""
    with pytest.raises(ArgumentTypeError, match="tree_filter") as info:
        BackupOptions(tree_filter=bad)
    assert isinstance(info.value, TypeError)


def test_backup_tree_filter_naming_a_missing_tree(filled: Env) -> None:
    with pytest.raises(ValueError, match="no-such-tree"):
        filled.manager.create_backup(filled.backup_path(), BackupOptions(tree_filter=["users", "no-such-tree"]))
    assert listing(filled.backups) == []


# --- key_prefix_filter ---


@pytest.mark.parametrize("prefix", ["log:0001", b"log:0001"], ids=["str", "bytes"])
def test_backup_key_prefix_filter(filled: Env, prefix: str | bytes) -> None:
    """Only keys with the prefix are backed up (in every tree)."""
    result = filled.manager.create_backup(filled.backup_path(), BackupOptions(key_prefix_filter=prefix))
    expected_logs = {k: v for k, v in sample_data()["logs"].items() if k.startswith(b"log:0001")}
    assert len(expected_logs) == 10
    assert result.metadata.total_items == 10
    assert restored(filled, Path(result.path)) == {**{t: [] for t in TREES}, "logs": sorted(expected_logs.items())}


def test_backup_binary_key_prefix_filter(filled: Env) -> None:
    result = filled.manager.create_backup(filled.backup_path(), BackupOptions(key_prefix_filter=b"\x00"))
    # b"\x00", b"\x00\x01\x02" and bytes(range(256))
    assert {t: i.item_count for t, i in result.metadata.trees.items() if i.item_count} == {"binary": 3}


@pytest.mark.parametrize("bad", [5, ["log"], object()])
def test_backup_key_prefix_filter_type(bad: Any) -> None:
    with pytest.raises(TypeError, match="key_prefix_filter"):
        BackupOptions(key_prefix_filter=bad)


# --- include_metadata ---


def test_include_metadata_false_drops_metadata_trees(filled: Env) -> None:
    """Trees named "metadata" or starting with "_" are left out, also when tree_filter names them."""
    names = ["users", "metadata", "_internal"]
    with_meta = filled.manager.create_backup(filled.backup_path("with.dfb"), BackupOptions(tree_filter=names))
    without = filled.manager.create_backup(
        filled.backup_path("without.dfb"), BackupOptions(tree_filter=names, include_metadata=False)
    )
    everything = filled.manager.create_backup(filled.backup_path("all.dfb"), BackupOptions(include_metadata=False))
    assert set(with_meta.metadata.trees) == set(names)
    assert set(without.metadata.trees) == {"users"}
    assert set(everything.metadata.trees) == {"users", "binary", "logs", "empty"}
    assert set(restored(filled, Path(everything.path))) == {"users", "binary", "logs", "empty"}


# --- compression_level ---


@pytest.mark.parametrize("level", [-1, 23, 100])
def test_compression_level_out_of_range(level: int) -> None:
    with pytest.raises(ValueError, match="compression_level"):
        BackupOptions(compression_level=level)


@pytest.mark.parametrize("level", [1, 3, 22])
def test_compression_levels_are_accepted(level: int) -> None:
    assert BackupOptions(compression_level=level).compression_level == level


@pytest.mark.parametrize("bad", [True, 1.0, "0", None])
def test_compression_level_type(bad: Any) -> None:
    with pytest.raises(TypeError, match="compression_level"):
        BackupOptions(compression_level=bad)


def test_compression_level_zero_is_recorded(filled: Env) -> None:
    meta = filled.manager.create_backup(filled.backup_path(), BackupOptions(compression_level=0)).metadata
    assert meta.options["compression_level"] == 0 and meta.compression is None


def test_compression_level_is_recorded(filled: Env) -> None:
    meta = filled.manager.create_backup(filled.backup_path(), BackupOptions(compression_level=5)).metadata
    assert meta.options["compression_level"] == 5 and meta.compression == "zstd-5"


# --- verify_during_creation ---


def scan_spy(e: Env, monkeypatch: pytest.MonkeyPatch, fail: bool = False) -> list[tuple[bool, int]]:
    """Replaces the manager's _scan: records (destination exists?, position) per call."""
    calls: list[tuple[bool, int]] = []
    original = e.manager._scan

    def spy(f: Any, visit: Any = None) -> Any:
        calls.append((e.backup_path().exists(), f.tell()))
        if fail:
            raise IntegrityError("simulated read-back failure")
        return original(f, visit)

    monkeypatch.setattr(e.manager, "_scan", spy)
    return calls


def test_verify_during_creation_reads_the_file_back_before_it_is_put_in_place(
    filled: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = scan_spy(filled, monkeypatch)
    filled.manager.create_backup(filled.backup_path(), BackupOptions(verify_during_creation=True))
    assert calls == [(False, 0)]  # one full pass from the start, before the file appeared
    assert filled.backup_path().exists()


def test_verify_during_creation_false_skips_the_read_back(filled: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = scan_spy(filled, monkeypatch)
    filled.manager.create_backup(filled.backup_path(), BackupOptions(verify_during_creation=False))
    assert calls == []
    filled.manager.verify_backup(filled.backup_path())  # the file is fine, and the spy is live
    assert calls == [(True, 0)]


def test_verify_during_creation_failure_leaves_no_file(filled: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    scan_spy(filled, monkeypatch, fail=True)
    with pytest.raises(IntegrityError, match="simulated"):
        filled.manager.create_backup(filled.backup_path())
    assert listing(filled.backups) == []


class _CorruptingWrites:
    """Proxies a file, flipping the byte at one offset of what is written through it."""

    def __init__(self, f: Any, offset: int) -> None:
        self._f = f
        self._offset = offset
        self._pos = 0

    def write(self, data: Any) -> int:
        chunk = bytearray(data)
        if self._pos <= self._offset < self._pos + len(chunk):
            chunk[self._offset - self._pos] ^= 0x01
        self._pos += len(chunk)
        return int(self._f.write(bytes(chunk)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


@pytest.mark.parametrize("verify", [True, False])
def test_verify_during_creation_catches_a_bad_write(filled: Env, monkeypatch: pytest.MonkeyPatch, verify: bool) -> None:
    """A byte that reaches the disk wrong (in a middle segment) is caught only when verifying."""

    class CorruptingAtomicFile(AtomicFile):
        def __init__(self, path: str) -> None:
            super().__init__(path)
            self.file = _CorruptingWrites(self.file, 5000)  # type: ignore[assignment]

    monkeypatch.setattr(manager_module, "AtomicFile", CorruptingAtomicFile)
    options = BackupOptions(segment_size=4096, verify_during_creation=verify)
    if verify:
        with pytest.raises(IntegrityError):
            filled.manager.create_backup(filled.backup_path(), options)
        assert listing(filled.backups) == []
    else:
        filled.manager.create_backup(filled.backup_path(), options)
        with pytest.raises(IntegrityError):
            filled.manager.verify_backup(filled.backup_path())


# --- mode ---


@pytest.mark.parametrize("mode", [BackupMode.INCREMENTAL, "incremental"])
def test_incremental_mode_needs_a_parent(filled: Env, mode: Any) -> None:
    with pytest.raises(ValueError, match="needs parent="):
        BackupOptions(mode=mode)
    full = filled.backup("full.dfb")
    options = BackupOptions(mode=mode, parent=full)
    assert options.mode is BackupMode.INCREMENTAL and options.parent == str(full)
    assert filled.manager.create_backup(filled.backup_path("i.dfb"), options).metadata.mode == "incremental"


def test_mode_values() -> None:
    assert BackupOptions(mode="full").mode is BackupMode.FULL
    assert BackupOptions().mode is BackupMode.FULL
    with pytest.raises(ValueError, match="mode"):
        BackupOptions(mode="differential")


# --- segment_size ---


@pytest.mark.parametrize("size", [4096, 65536])
def test_segment_size_is_used(filled: Env, size: int) -> None:
    """The file is cut into segments of the requested size (preamble bytes 20..24)."""
    result = filled.manager.create_backup(filled.backup_path(), BackupOptions(segment_size=size))
    data = Path(result.path).read_bytes()
    assert int.from_bytes(data[20:24], "little") == size
    assert result.metadata.encryption.segment_size == size
    assert filled.manager.read_metadata(result.path).encryption.segment_size == size


def test_default_segment_size_is_one_mebibyte(filled: Env) -> None:
    assert BackupOptions().segment_size == 1 << 20
    assert filled.manager.create_backup(filled.backup_path()).metadata.encryption.segment_size == 1 << 20


@pytest.mark.parametrize("size", [0, 4095, (64 << 20) + 1])
def test_segment_size_range(size: int) -> None:
    with pytest.raises(ValueError, match="segment_size"):
        BackupOptions(segment_size=size)


@pytest.mark.parametrize("size", ["4096", 4096.0, True])
def test_segment_size_type(size: Any) -> None:
    with pytest.raises(TypeError, match="segment_size"):
        BackupOptions(segment_size=size)


@pytest.mark.parametrize("field", ["include_metadata", "verify_during_creation"])
@pytest.mark.parametrize("bad", [1, "yes", None])
def test_backup_bool_fields_take_only_bools(field: str, bad: Any) -> None:
    with pytest.raises(TypeError, match=field):
        BackupOptions(**{field: bad})


# === RestoreOptions ===============================================================================

OLD = {"users": {b"alice": b"old", b"zoe": b"only in the database"}, "untouched": {b"k": b"v"}}


@pytest.fixture
def source(filled: Env) -> Path:
    """A backup of sample_data() (the database of `filled`), 4 KiB segments."""
    return filled.backup("source.dfb", SMALL_SEGMENTS)


@pytest.fixture
def target(filled: Env) -> Any:
    """A second database holding OLD, to restore into."""
    db = filled.open_db("target")
    fill(db, OLD)
    return db


def restore(e: Env, db: Any, path: Path, **options: Any) -> Any:
    return e.manager_for(db).restore_backup(path, RestoreOptions(**options))


# --- overwrite_existing ---


def test_overwrite_existing_false_keeps_existing_values(filled: Env, source: Path, target: Any) -> None:
    stats = restore(filled, target, source, overwrite_existing=False)
    assert target.get("users", b"alice") == b"old"
    assert target.get("users", b"bob") == b""
    expected = {**sample_data(), "untouched": OLD["untouched"]}
    expected["users"] = {**expected["users"], **OLD["users"]}
    assert snapshot(target) == as_snapshot(expected)
    total = sum(len(i) for i in sample_data().values())
    assert (stats.items_restored, stats.items_skipped) == (total - 1, 1)


def test_overwrite_existing_true_overwrites(filled: Env, source: Path, target: Any) -> None:
    stats = restore(filled, target, source, overwrite_existing=True)
    assert target.get("users", b"alice") == b"admin"
    expected = {**sample_data(), "untouched": OLD["untouched"]}
    expected["users"] = {**expected["users"], b"zoe": OLD["users"][b"zoe"]}  # keys not in the backup stay
    assert snapshot(target) == as_snapshot(expected)
    assert (stats.items_restored, stats.items_skipped) == (sum(len(i) for i in sample_data().values()), 0)


# --- tree_filter ---


@pytest.mark.parametrize("kind", [list, tuple, set])
def test_restore_tree_filter(filled: Env, source: Path, kind: type) -> None:
    target = filled.open_db("target")
    stats = filled.manager_for(target).restore_backup(source, RestoreOptions(tree_filter=kind(["users", "_internal"])))
    assert snapshot(target) == as_snapshot({t: sample_data()[t] for t in ("users", "_internal")})
    assert stats.trees_restored == 2 and stats.items_restored == len(sample_data()["users"]) + 1


def test_restore_tree_filter_naming_a_tree_not_in_the_backup(filled: Env, source: Path, target: Any) -> None:
    before = snapshot(target)
    with pytest.raises(ValueError, match="untouched"):
        restore(filled, target, source, tree_filter=["users", "untouched"])
    assert snapshot(target) == before


@pytest.mark.parametrize("bad", ["users", b"users", [1]])
def test_restore_tree_filter_type(bad: Any) -> None:
    with pytest.raises(TypeError, match="tree_filter"):
        RestoreOptions(tree_filter=bad)


# --- key_prefix_filter ---


@pytest.mark.parametrize("prefix", ["log:0002", b"log:0002"], ids=["str", "bytes"])
def test_restore_key_prefix_filter(filled: Env, source: Path, prefix: str | bytes) -> None:
    result = restored(filled, source, RestoreOptions(key_prefix_filter=prefix))
    logs = sorted((k, v) for k, v in sample_data()["logs"].items() if k.startswith(b"log:0002"))
    assert len(logs) == 10
    assert result == {**{t: [] for t in TREES}, "logs": logs}


@pytest.mark.parametrize("bad", [5, ["x"]])
def test_restore_key_prefix_filter_type(bad: Any) -> None:
    with pytest.raises(TypeError, match="key_prefix_filter"):
        RestoreOptions(key_prefix_filter=bad)


# --- verify_before_restore ---


def other_backup(e: Env) -> Path:
    """A backup of many 4 KiB segments whose content differs from the target's. It holds more
    records than the manager reads in one batch (4096), so records reach the database before a
    restore meets damage in its last quarter."""
    data = {"fresh": {f"k{i:05d}".encode(): b"v" * 10 for i in range(8000)}, "users": {b"alice": b"new"}}
    return e.backup_of(data, "other.dfb", SMALL_SEGMENTS)


@pytest.mark.parametrize("verify", [True, False])
def test_corrupted_last_segment_is_found_before_any_write(
    filled: Env, target: Any, monkeypatch: pytest.MonkeyPatch, verify: bool
) -> None:
    """Damage in the trailer's segment: IntegrityError and an untouched database, and with
    verify_before_restore=True no write transaction is even started."""
    path = other_backup(filled)
    flip_byte(path, -20)
    before = snapshot(target)
    spy = WriteSpy(monkeypatch)
    with pytest.raises(IntegrityError):
        restore(filled, target, path, verify_before_restore=verify)
    if verify:
        assert spy.entered == 0
    assert snapshot(target) == before


def corrupt_middle(path: Path) -> None:
    """Damages a segment three quarters into the file (neither the header's nor the trailer's)."""
    segments = (os.path.getsize(path) - 44) // 4096
    assert segments >= 8
    flip_byte(path, segment_offset(path, 4096, segments * 3 // 4) + 100)


def test_verify_before_restore_true_checks_everything_before_writing(
    filled: Env, target: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = other_backup(filled)
    corrupt_middle(path)
    before = snapshot(target)
    spy = WriteSpy(monkeypatch)
    with pytest.raises(IntegrityError):
        restore(filled, target, path, verify_before_restore=True)
    assert spy.entered == 0
    assert snapshot(target) == before


@pytest.mark.parametrize("continue_on_errors", [False, True])
def test_verify_before_restore_false_fails_mid_stream_and_rolls_back(
    filled: Env, target: Any, monkeypatch: pytest.MonkeyPatch, continue_on_errors: bool
) -> None:
    """Without the pre-check the damage is met after records were written; the transaction
    rolls them back (continue_on_errors never covers integrity failures)."""
    path = other_backup(filled)
    corrupt_middle(path)
    before = snapshot(target)
    spy = WriteSpy(monkeypatch)
    with pytest.raises(IntegrityError):
        restore(filled, target, path, verify_before_restore=False, continue_on_errors=continue_on_errors)
    assert spy.entered == 1 and spy.puts > 0
    assert snapshot(target) == before


# --- backup_before_restore ---


def test_backup_before_restore_gives_back_the_prior_state(filled: Env, source: Path) -> None:
    """The safety backup restores the touched trees exactly, removing the keys the restore added."""
    target = filled.open_db("target")
    prior = {
        "users": {b"alice": b"old", b"zoe": b"only in the database"},
        "logs": {b"log:00001": b"old log", b"log:77777": b"kept"},
        "metadata": {},
        "untouched": {b"k": b"v"},
    }
    fill(target, prior)
    before = snapshot(target)
    manager = filled.manager_for(target)

    stats = manager.restore_backup(source, RestoreOptions(overwrite_existing=True, backup_before_restore=True))

    assert target.get("users", b"alice") == b"admin"
    safety = Path(stats.safety_backup_path)
    assert safety.parent == source.parent and safety.name.startswith("source.dfb.pre-restore-")
    meta = manager.verify_backup(safety)
    assert set(meta.trees) == set(TREES)
    # The present values of alice and zoe, and DELETE records for bob, carol and dave.
    assert meta.trees["users"].item_count == 5

    manager.restore_backup(safety, RestoreOptions(overwrite_existing=True))
    # Trees cannot be dropped: trees the restore created stay, empty.
    assert snapshot(target) == {**before, **{t: [] for t in TREES if t not in prior}}


def test_backup_before_restore_with_key_prefix(filled: Env, source: Path) -> None:
    target = filled.open_db("target")
    fill(target, {t: {} for t in TREES})
    fill(target, {"logs": {b"log:00001": b"old", b"log:00020": b"outside the prefix"}})
    before = snapshot(target)
    manager = filled.manager_for(target)
    stats = manager.restore_backup(
        source, RestoreOptions(overwrite_existing=True, key_prefix_filter="log:0000", backup_before_restore=True)
    )
    assert target.get("logs", b"log:00001") == sample_data()["logs"][b"log:00001"]
    manager.restore_backup(stats.safety_backup_path, RestoreOptions(overwrite_existing=True))
    assert snapshot(target) == before


def test_backup_before_restore_at_a_given_path(filled: Env, source: Path, target: Any) -> None:
    wanted = filled.tmp / "elsewhere.dfb"
    stats = restore(filled, target, source, backup_before_restore=True, safety_backup_path=wanted)
    assert stats.safety_backup_path == str(wanted)
    filled.manager.verify_backup(wanted)
    assert listing(filled.backups) == ["source.dfb"]


def test_safety_backup_path_must_not_be_the_restored_backup(filled: Env, source: Path, target: Any) -> None:
    """Writing the safety backup over the file being restored would destroy that backup and restore
    the safety backup instead: it is refused, and the backup and the database stay as they were."""
    original = source.read_bytes()
    before = snapshot(target)
    with pytest.raises(ValueError, match="safety_backup_path"):
        restore(filled, target, source, overwrite_existing=True, backup_before_restore=True, safety_backup_path=source)
    assert source.read_bytes() == original
    assert snapshot(target) == before


def test_no_safety_backup_without_backup_before_restore(filled: Env, source: Path, target: Any) -> None:
    stats = restore(filled, target, source, backup_before_restore=False, safety_backup_path=filled.tmp / "s.dfb")
    assert stats.safety_backup_path is None
    assert listing(filled.backups) == ["source.dfb"] and not (filled.tmp / "s.dfb").exists()


def test_unwritable_safety_backup_stops_the_restore(
    filled: Env, source: Path, target: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = snapshot(target)
    spy = WriteSpy(monkeypatch)
    with pytest.raises(BackupIOError):
        restore(filled, target, source, backup_before_restore=True, safety_backup_path=filled.tmp / "no" / "s.dfb")
    assert spy.entered == 0 and snapshot(target) == before


def test_safety_backup_of_a_corrupted_backup_fails_cleanly(
    filled: Env, target: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The safety backup reads the whole file; damage stops it with no safety file left behind."""
    path = other_backup(filled)
    corrupt_middle(path)
    before = snapshot(target)
    spy = WriteSpy(monkeypatch)
    with pytest.raises(IntegrityError):
        restore(filled, target, path, backup_before_restore=True)
    assert spy.entered == 0 and snapshot(target) == before
    assert listing(filled.backups) == ["other.dfb"]


# --- continue_on_errors ---

LONG_KEYS = {b"L" * 600: b"long one", b"M" * 700: b"long two"}  # LMDB keys are at most 511 bytes
WITH_LONG_KEYS = {"users": {b"alice": b"new", b"zed": b"z", **LONG_KEYS}, "other": {b"k": b"v"}}


@pytest.fixture
def lmdb_env(tmp_path: Path, core_name: str) -> Iterator[Env]:
    """An lmdb database holding OLD, and a backup (made from sqlite) LMDB cannot fully store."""
    with open_env(tmp_path, core_name, "lmdb") as e:
        fill(e.db, OLD)
        e.backup_of(WITH_LONG_KEYS, "long.dfb", backend="sqlite")
        yield e


def test_continue_on_errors_false_aborts_and_rolls_back(lmdb_env: Env) -> None:
    before = snapshot(lmdb_env.db)
    with pytest.raises(StoreError, match="511"):
        lmdb_env.manager.restore_backup(lmdb_env.backup_path("long.dfb"), RestoreOptions(overwrite_existing=True))
    assert snapshot(lmdb_env.db) == before


def test_continue_on_errors_true_collects_the_errors(lmdb_env: Env) -> None:
    stats = lmdb_env.manager.restore_backup(
        lmdb_env.backup_path("long.dfb"), RestoreOptions(overwrite_existing=True, continue_on_errors=True)
    )
    assert len(stats.errors) == 2
    for key, error in zip(sorted(LONG_KEYS), sorted(stats.errors), strict=True):
        assert "users" in error and key[:64].hex() in error
    assert (stats.items_restored, stats.items_skipped) == (3, 0)
    assert stats.verified is True
    assert snapshot(lmdb_env.db) == as_snapshot(
        {
            "users": {b"alice": b"new", b"zed": b"z", b"zoe": OLD["users"][b"zoe"]},
            "other": {b"k": b"v"},
            "untouched": OLD["untouched"],
        }
    )


# --- verify_after_restore ---


def faulty_put(monkeypatch: pytest.MonkeyPatch, backend: str, fault: str) -> None:
    """The backend's write transaction drops or alters the value of users/carol, silently."""
    cls = WRITE_TXN_CLASS[backend]
    original = cls.put

    def put(self: Any, tree: str, key: bytes, value: bytes, overwrite: bool = True) -> bool:
        if tree == "users" and bytes(key) == b"carol":
            if fault == "drop":
                return True
            value = bytes(value) + b"!"
        return bool(original(self, tree, key, value, overwrite))

    original_many = cls.put_many

    def put_many(self: Any, tree: str, items: Any, overwrite: bool = True) -> tuple[int, int]:
        kept = []
        for key, value in items:
            if tree == "users" and bytes(key) == b"carol":
                if fault == "drop":
                    continue
                value = bytes(value) + b"!"
            kept.append((key, value))
        written, skipped = original_many(self, tree, kept, overwrite)
        return written + (len(items) - len(kept) if isinstance(items, list) else 0), skipped

    monkeypatch.setattr(cls, "put", put)
    monkeypatch.setattr(cls, "put_many", put_many)
    # The faults live in the write transaction: keep the LMDB store's native writer out of it.
    monkeypatch.setattr(DbOperations, "_native_writer", lambda db, mean_record_bytes=0.0: nullcontext(None))


@pytest.mark.parametrize("fault", ["drop", "alter"])
@pytest.mark.parametrize("into", ["empty", "non-empty"], ids=["digest-check", "item-check"])
def test_verify_after_restore_finds_what_the_store_lost(
    filled: Env, source: Path, monkeypatch: pytest.MonkeyPatch, fault: str, into: str
) -> None:
    target = filled.open_db("target")
    if into == "non-empty":
        fill(target, OLD)
    faulty_put(monkeypatch, filled.backend, fault)
    with pytest.raises(DatabaseError, match="users"):
        filled.manager_for(target).restore_backup(source, RestoreOptions(verify_after_restore=True))


@pytest.mark.parametrize("fault", ["drop", "alter"])
def test_verify_after_restore_false_does_not_check(
    filled: Env, source: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    target = filled.open_db("target")
    faulty_put(monkeypatch, filled.backend, fault)
    stats = filled.manager_for(target).restore_backup(source, RestoreOptions(verify_after_restore=False))
    assert stats.verified is False
    carol = sample_data()["users"][b"carol"]
    assert target.get("users", b"carol") == (None if fault == "drop" else carol + b"!")


# --- argument types ---

RESTORE_BOOLS = [
    "overwrite_existing",
    "verify_before_restore",
    "backup_before_restore",
    "continue_on_errors",
    "verify_after_restore",
]


@pytest.mark.parametrize("field", RESTORE_BOOLS)
@pytest.mark.parametrize("bad", [0, "true", None])
def test_restore_bool_fields_take_only_bools(field: str, bad: Any) -> None:
    with pytest.raises(TypeError, match=field):
        RestoreOptions(**{field: bad})


def test_safety_backup_path_types(tmp_path: Path) -> None:
    assert RestoreOptions(safety_backup_path=tmp_path / "s.dfb").safety_backup_path == str(tmp_path / "s.dfb")
    with pytest.raises(TypeError, match="safety_backup_path"):
        RestoreOptions(safety_backup_path=42)  # type: ignore[arg-type]


def test_options_are_immutable() -> None:
    with pytest.raises(AttributeError):
        BackupOptions().tree_filter = ["x"]  # type: ignore[misc]
    with pytest.raises(AttributeError):
        RestoreOptions().overwrite_existing = True  # type: ignore[misc]


def test_manager_defaults(filled: Env, source: Path, target: Any) -> None:
    """No options means the documented defaults: keep existing values, verify, no safety backup."""
    stats = EncryptedBackupManager(target, filled.keys, core=filled.core).restore_backup(source)
    assert target.get("users", b"alice") == b"old"
    assert stats.items_skipped == 1 and stats.verified is True and stats.safety_backup_path is None


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_option_gives_the_same_backup_and_restore(filled: Env, threads: int) -> None:
    """threads changes who seals and opens segments, never what is written or restored."""
    path = filled.backups / f"threads-{threads}.dfb"
    result = filled.manager.create_backup(path, BackupOptions(segment_size=4096, threads=threads))
    assert filled.manager.verify_backup(path, threads=threads).checksum == result.metadata.checksum
    target = filled.open_db(f"threads-{threads}")
    stats = filled.manager_for(target).restore_backup(path, RestoreOptions(threads=threads))
    assert stats.items_restored == result.metadata.total_items
    assert snapshot(target) == snapshot(filled.db)


@pytest.mark.parametrize("bad", [-1, 1025, 1.5, "2", True])
def test_threads_option_is_validated(bad: Any) -> None:
    for make in (lambda: BackupOptions(threads=bad), lambda: RestoreOptions(threads=bad)):
        with pytest.raises((ValueError, TypeError), match="threads"):
            make()
