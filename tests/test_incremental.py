"""Incremental backups: chains of a full backup and incrementals, change detection by merging the
chain's records (ChainMerge, both cores), restore of a chain in one transaction, and every way a
chain can be broken (missing, tampered, reordered or foreign parents) refused before anything is
written."""

# The fixtures imported from helpers are pytest fixtures: test arguments "redefine" them.
# ruff: noqa: F811

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import sqlite3
from pathlib import Path
from types import ModuleType
from typing import Any

import lmdb
import pytest
from conftest import load_core
from datafold import (
    BackupFileNotFoundError,
    BackupMode,
    BackupOptions,
    DbOperations,
    EncryptedBackupManager,
    IntegrityError,
    InvalidArgumentError,
    RestoreOptions,
)
from datafold.chain import ParentLookup, check_link
from helpers import (  # noqa: F401 - fixtures
    SMALL_SEGMENTS,
    Env,
    backend,
    core_name,
    db_location,
    env,
    fill,
    filled,
    flip_byte,
    sample_data,
    snapshot,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

INCR = BackupMode.INCREMENTAL


def incremental(parent: Path, **kw: object) -> BackupOptions:
    return BackupOptions(mode=INCR, parent=parent, **kw)  # type: ignore[arg-type]


def drop_tree(e: Env, name: str) -> None:
    """Removes a whole tree (the store interface has no drop): closes the database, drops the tree
    with the backend's own API and reopens it, with a new manager."""
    location = db_location(e.tmp, e.backend)
    e.db.close()
    if e.backend == "lmdb":
        raw = lmdb.open(str(location), max_dbs=64, subdir=True)
        with raw.begin(write=True) as txn:
            txn.drop(raw.open_db(name.encode(), txn=txn), delete=True)
        raw.close()
    else:
        conn = sqlite3.connect(location)
        with conn:
            conn.execute("DELETE FROM kv WHERE tree = ?", (name,))
            conn.execute("DELETE FROM trees WHERE name = ?", (name,))
        conn.close()
    e.db = DbOperations.open(location, e.backend)
    e.manager = e.manager_for(e.db)


def restored(e: Env, newest: Path, name: str = "restored", options: RestoreOptions | None = None) -> dict:
    target = e.open_db(name)
    e.manager_for(target).restore_backup(newest, options)
    return snapshot(target)


# --- the basics --------------------------------------------------------------------------------


def test_incremental_holds_only_the_changes(filled: Env) -> None:
    full = filled.backup("full.dfb")
    filled.db.put("users", b"alice", b"root")  # changed
    filled.db.delete("users", b"bob")  # deleted
    filled.db.put("logs", b"log:99999", b"new")  # new
    result = filled.manager.create_backup(filled.backup_path("i1.dfb"), incremental(full))
    meta = result.metadata
    parent = filled.manager.read_metadata(full)
    assert meta.mode == "incremental" and meta.is_incremental
    assert meta.parent_backup_id == parent.backup_id and meta.parent_digest == parent.checksum
    assert meta.total_items == 3
    assert meta.trees["users"].item_count == 2 and meta.trees["logs"].item_count == 1
    assert meta.trees["binary"].item_count == 0
    assert restored(filled, filled.backup_path("i1.dfb")) == snapshot(filled.db)


def test_incremental_of_an_unchanged_database_is_tiny(filled: Env) -> None:
    full = filled.backup("full.dfb")
    result = filled.manager.create_backup(filled.backup_path("i1.dfb"), incremental(full))
    assert result.metadata.total_items == 0
    assert result.stats.bytes_written < 2048 < full.stat().st_size
    assert restored(filled, filled.backup_path("i1.dfb")) == snapshot(filled.db)


def test_parent_may_be_given_as_metadata(filled: Env) -> None:
    full = filled.manager.create_backup(filled.backup_path("full.dfb"))
    filled.db.put("users", b"eve", b"x")
    i1 = filled.manager.create_backup(filled.backup_path("i1.dfb"), incremental(full.metadata))  # type: ignore[arg-type]
    assert i1.metadata.parent_backup_id == full.metadata.backup_id


def test_chain_of_incrementals_with_deletes_and_whole_tree_deletes(filled: Env) -> None:
    full = filled.backup("0.dfb", SMALL_SEGMENTS)
    filled.db.put("logs", b"log:00001", b"v2")
    filled.db.delete("binary", b"\xff")
    i1 = filled.backup("1.dfb", dataclasses.replace(SMALL_SEGMENTS, mode=INCR, parent=str(full)))
    drop_tree(filled, "logs")
    i2 = filled.backup("2.dfb", incremental(i1))
    state_at_i2 = snapshot(filled.db)
    assert filled.manager.read_metadata(i2).deleted_trees == ("logs",)
    filled.db.put("logs", b"log:again", b"back")  # the tree comes back, with one key
    filled.db.put("binary", b"\xff", b"returns")
    i3 = filled.backup("3.dfb", incremental(i2))
    want = snapshot(filled.db)
    assert restored(filled, i3) == want
    # An intermediate member restores the state at its own time: no "logs" tree at all.
    assert "logs" not in state_at_i2
    assert restored(filled, i2, "at-i2") == state_at_i2


def test_restore_applies_the_chains_deletes_and_leaves_other_keys(filled: Env) -> None:
    full = filled.backup("full.dfb")
    filled.db.delete("users", b"bob")
    i1 = filled.backup("i1.dfb", incremental(full))
    target = filled.open_db("target")
    fill(target, {"users": {b"bob": b"old", b"zed": b"other"}})
    filled.manager_for(target).restore_backup(i1, RestoreOptions(overwrite_existing=True))
    users = dict(target.items("users"))
    assert b"bob" not in users  # the chain deleted it
    assert users[b"zed"] == b"other"  # not covered by the chain: left alone
    assert users[b"alice"] == b"admin"


def test_safety_backup_and_filters_on_a_chain_restore(filled: Env) -> None:
    full = filled.backup("full.dfb")
    filled.db.put("users", b"alice", b"v2")
    filled.db.delete("users", b"bob")
    i1 = filled.backup("i1.dfb", incremental(full))
    target = filled.open_db("target")
    fill(target, {"users": {b"alice": b"mine", b"bob": b"mine"}})
    before = snapshot(target)
    manager = filled.manager_for(target)
    stats = manager.restore_backup(
        i1, RestoreOptions(overwrite_existing=True, backup_before_restore=True, tree_filter=["users"])
    )
    assert target.tree_names() == ["users"]
    assert dict(target.items("users"))[b"alice"] == b"v2" and target.get("users", b"bob") is None
    assert stats.safety_backup_path is not None
    manager.restore_backup(stats.safety_backup_path, RestoreOptions(overwrite_existing=True))
    assert snapshot(target) == before


def test_incremental_uses_the_chains_filters(filled: Env) -> None:
    full = filled.backup("full.dfb", BackupOptions(tree_filter=["users", "logs"], key_prefix_filter=b"a"))
    filled.db.put("users", b"anna", b"new")
    filled.db.put("users", b"zoe", b"not covered")
    filled.db.put("binary", b"a", b"not covered")
    meta = filled.manager.create_backup(filled.backup_path("i1.dfb"), incremental(full)).metadata
    assert set(meta.trees) == {"users", "logs"} and meta.total_items == 1
    same = incremental(full, tree_filter=["logs", "users"], key_prefix_filter="a")
    filled.manager.create_backup(filled.backup_path("i2.dfb"), same)
    for other in (
        incremental(full, tree_filter=["users"]),
        incremental(full, key_prefix_filter=b"b"),
        incremental(full, include_metadata=False),
    ):
        with pytest.raises(InvalidArgumentError, match="filters of its chain"):
            filled.manager.create_backup(filled.backup_path("bad.dfb"), other)
    assert not filled.backup_path("bad.dfb").exists()


def test_options_need_a_parent_exactly_for_incrementals(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="parent"):
        BackupOptions(mode=INCR)
    with pytest.raises(InvalidArgumentError, match="only for"):
        BackupOptions(parent=tmp_path / "x.dfb")
    with pytest.raises(TypeError, match="parent"):
        BackupOptions(mode=INCR, parent=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="chain"):
        RestoreOptions(chain="a.dfb")  # type: ignore[arg-type]
    assert RestoreOptions(chain=[tmp_path / "a"]).chain == (str(tmp_path / "a"),)
    with pytest.raises(TypeError, match="chain"):
        BackupOptions(mode=INCR, parent=tmp_path / "p", chain=tmp_path / "a")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="chain is only for"):
        BackupOptions(chain=[tmp_path / "a"])
    assert BackupOptions(mode=INCR, parent=tmp_path / "p", chain=[tmp_path / "a"]).chain == (str(tmp_path / "a"),)


def test_list_backups_shows_the_chain(filled: Env) -> None:
    full = filled.backup("a-full.dfb")
    i1 = filled.backup("b-i1.dfb", incremental(full))
    listed = filled.manager.list_backups(filled.backups)
    assert [m.mode for m in listed] == ["full", "incremental"]
    assert listed[1].parent_backup_id == listed[0].backup_id
    assert filled.manager.read_metadata(i1).parent_digest == listed[0].checksum


# --- broken chains: detected, nothing written --------------------------------------------------


def _chain_of_two(e: Env) -> tuple[Path, Path]:
    full = e.backup("full.dfb")
    e.db.put("users", b"alice", b"v2")
    e.db.delete("users", b"bob")
    return full, e.backup("i1.dfb", incremental(full))


def _refused(e: Env, newest: Path, match: str | None, options: RestoreOptions | None = None) -> None:
    target = e.open_db(f"target-{os.urandom(4).hex()}")
    fill(target, {"users": {b"alice": b"keep"}})
    before = snapshot(target)
    with pytest.raises(IntegrityError, match=match):
        e.manager_for(target).restore_backup(newest, options)
    assert snapshot(target) == before


def test_missing_parent_is_named(filled: Env) -> None:
    full, i1 = _chain_of_two(filled)
    parent_id = filled.manager.read_metadata(full).backup_id
    full.unlink()
    _refused(filled, i1, parent_id)
    with pytest.raises(IntegrityError, match=parent_id):
        filled.manager.create_backup(filled.backup_path("i2.dfb"), incremental(i1))


def test_parents_are_looked_up_newest_first_reading_only_what_it_takes(
    filled: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding a chain's parents reads the directory's files newest first and stops at each
    parent: an older chain, files that are not backups and the backup itself are not read (each
    read of a passphrase backup runs Argon2id)."""
    old = [filled.backup("old-0.dfb")]
    old.append(filled.backup("old-1.dfb", incremental(old[0])))
    (filled.backups / "notes.txt").write_text("not a backup")
    filled.db.put("users", b"eve", b"x")
    new = [filled.backup("new-0.dfb")]
    for i in (1, 2, 3):
        filled.db.put("users", b"eve", b"%d" % i)
        new.append(filled.backup(f"new-{i}.dfb", incremental(new[-1])))
    # Modification times in the order of writing, a second apart; the text file is the newest.
    for age, path in enumerate(reversed([*old, *new, filled.backups / "notes.txt"])):
        os.utime(path, (1_700_000_000 - age, 1_700_000_000 - age))
    os.utime(filled.backups / "notes.txt", (1_800_000_000, 1_800_000_000))
    os.mkfifo(filled.backups / "pipe.dfb")  # neither blocks the lookup nor ends it
    (filled.backups / "loop.dfb").symlink_to("loop.dfb")

    read: list[str] = []
    real = EncryptedBackupManager.read_metadata

    def counting(self: EncryptedBackupManager, path: str) -> object:
        read.append(os.path.basename(path))
        return real(self, path)

    monkeypatch.setattr(EncryptedBackupManager, "read_metadata", counting)
    assert restored(filled, new[3]) == snapshot(filled.db)
    looked_up = read[1 : read.index("new-0.dfb") + 1]  # after the backup itself, up to the full backup
    assert looked_up == ["notes.txt", "new-2.dfb", "new-1.dfb", "new-0.dfb"]
    assert not any(name.startswith("old-") for name in read)


def test_parent_lookup_passes_over_a_copy_whose_digest_differs() -> None:
    """Two files with the parent's id: the one with the digest the child names is the parent,
    even if the other (altered or replaced) is newer; with no such copy, the first with the id is
    returned, for check_link to say what is wrong with it."""
    from types import SimpleNamespace

    files = {
        name: SimpleNamespace(backup_id=bid, checksum=digest, path=name)
        for name, bid, digest in (("copy", "p", "altered"), ("other", "q", "x"), ("original", "p", "good"))
    }
    read: list[str] = []

    def reader(path: str) -> Any:
        read.append(path)
        return files[path]

    lookup = ParentLookup(lambda: ["copy", "other", "original"], reader)
    assert lookup.get("p", "good").path == "original"
    assert lookup.get("p", "unknown").path == "copy"
    assert lookup.get("p").path == "copy" and lookup.get("z") is None
    assert read == ["copy", "other", "original"]  # each file read once


def test_a_chain_member_that_cannot_be_read_is_the_one_named(filled: Env, tmp_path: Path) -> None:
    """An error about a parent or chain member names that file (message and `file`), not the
    backup the call was given."""
    from datafold import EncryptionKeyError, MasterKeyPair

    full, i1 = _chain_of_two(filled)
    other = filled.backup_of({"t": {b"k": b"v"}}, "other-key.dfb", keys=MasterKeyPair.from_private_bytes(b"\x07" * 32))
    with pytest.raises(EncryptionKeyError) as info:
        restored(filled, i1, options=RestoreOptions(chain=[other, i1]))
    assert info.value.file == str(other) and str(info.value).startswith(f"chain member {other}: ")
    with pytest.raises(EncryptionKeyError) as info:
        filled.backup("i2.dfb", incremental(other))
    assert info.value.file == str(other) and str(info.value).startswith(f"parent {other}: ")
    assert not filled.backup_path("i2.dfb").exists()
    # A member damaged between its header and trailer segments: the verify pass names it.
    full = filled.backup("small-segments.dfb", SMALL_SEGMENTS)
    i1 = filled.backup("small-segments-i1.dfb", incremental(full))
    data = bytearray(full.read_bytes())
    data[len(data) // 2] ^= 1
    full.write_bytes(bytes(data))
    for options in (None, RestoreOptions(chain=[full])):
        with pytest.raises(IntegrityError) as info:
            restored(filled, i1, f"r-{options is None}", options)
        assert info.value.file == str(full) and str(info.value).startswith(f"chain member {full}: ")
    with pytest.raises(IntegrityError) as info:
        filled.manager.verify_backup(full)
    assert info.value.file is None  # the file the call was given: not repeated
    # A missing member, and a genuine backup that is not the parent, are named too.
    with pytest.raises(BackupFileNotFoundError) as missing:
        restored(filled, i1, "r-missing", RestoreOptions(chain=[filled.backups / "gone.dfb", i1]))
    assert missing.value.file == str(filled.backups / "gone.dfb")
    unrelated = filled.backup("unrelated.dfb")
    with pytest.raises(IntegrityError, match="not the parent") as info:
        restored(filled, i1, "r-unrelated", RestoreOptions(chain=[unrelated]))
    assert info.value.file == str(unrelated)
    # A parent that cannot be read where it is looked up: the message says which files were skipped.
    data = bytearray(full.read_bytes())
    data[-5] ^= 1  # in the trailer segment: read_metadata fails
    full.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="could not be read with this key: small-segments.dfb"):
        restored(filled, i1, "r-skipped")


def test_parents_are_found_beside_a_symlinks_target_too(filled: Env) -> None:
    """The newest backup given through a symlink in another directory: its parents are looked up
    beside the link, then beside its target."""
    full, i1 = _chain_of_two(filled)
    links = filled.tmp / "links"
    links.mkdir()
    (links / "latest.dfb").symlink_to(i1)
    assert restored(filled, links / "latest.dfb") == snapshot(filled.db)
    (links / "full.dfb").symlink_to(full)  # beside the link, the same file: found there first
    assert restored(filled, links / "latest.dfb", "again") == snapshot(filled.db)


def test_parent_found_elsewhere_with_chain_option(filled: Env) -> None:
    full, i1 = _chain_of_two(filled)
    elsewhere = filled.tmp / "elsewhere"
    elsewhere.mkdir()
    moved = elsewhere / "full.dfb"
    shutil.move(full, moved)
    assert restored(filled, i1, options=RestoreOptions(chain=[moved])) == snapshot(filled.db)


def test_an_incremental_of_a_parent_whose_parents_are_elsewhere_takes_a_chain(filled: Env) -> None:
    """BackupOptions(chain=...) names the parent's own parents when they are not beside it; a
    chain that does not lead to the parent is refused before anything is written."""
    full, i1 = _chain_of_two(filled)
    elsewhere = filled.tmp / "elsewhere"
    elsewhere.mkdir()
    moved = elsewhere / "full.dfb"
    shutil.move(full, moved)
    filled.db.put("users", b"carol", b"v3")
    with pytest.raises(IntegrityError, match="BackupOptions"):
        filled.backup("i2.dfb", incremental(i1))
    assert not filled.backup_path("i2.dfb").exists()
    for chain in ([moved], [moved, i1]):
        i2 = filled.backup("i2.dfb", incremental(i1, chain=chain))
        assert filled.manager.read_metadata(i2).parent_backup_id == filled.manager.read_metadata(i1).backup_id
        assert restored(filled, i2, f"r{len(chain)}", RestoreOptions(chain=[moved, i1])) == snapshot(filled.db)
    other = filled.backup("other.dfb")
    with pytest.raises(IntegrityError, match="not the parent"):
        filled.backup("i3.dfb", incremental(i1, chain=[other]))
    with pytest.raises(InvalidArgumentError, match="not in the chain"):
        filled.backup("i3.dfb", incremental(moved, chain=[moved, i1]))  # i1 comes after moved
    assert not filled.backup_path("i3.dfb").exists()


def test_the_chain_option_may_end_with_the_backup_itself(filled: Env) -> None:
    full, i1 = _chain_of_two(filled)
    for twice in ([full, full], [full, i1, i1], [full, filled.backups / ".." / "backups" / "full.dfb"]):
        with pytest.raises(InvalidArgumentError, match="more than once"):
            restored(filled, i1, options=RestoreOptions(chain=twice))
    assert restored(filled, i1, options=RestoreOptions(chain=[full, i1])) == snapshot(filled.db)
    assert restored(filled, full, "full", RestoreOptions(chain=[full])) == restored(filled, full, "plain")


def test_no_backup_goes_over_a_backup_of_the_chain(filled: Env) -> None:
    """Neither a new incremental nor a restore's safety backup may replace a backup the call reads."""
    full, i1 = _chain_of_two(filled)
    files = {p: p.read_bytes() for p in (full, i1)}
    for parent in (full, i1):
        with pytest.raises(InvalidArgumentError, match="a backup this call reads"):
            filled.backup(parent.name, incremental(i1))
    target = filled.open_db("target")
    for member in (full, i1):
        options = RestoreOptions(backup_before_restore=True, safety_backup_path=str(member))
        with pytest.raises(InvalidArgumentError, match="a backup this call reads"):
            filled.manager_for(target).restore_backup(i1, options)
    assert {p: p.read_bytes() for p in files} == files and snapshot(target) == {}


@pytest.mark.parametrize("where", [200, -100])
def test_tampered_parent(filled: Env, where: int) -> None:
    full, i1 = _chain_of_two(filled)
    flip_byte(full, where)
    # The directory index skips the unreadable file: the parent is then missing; named explicitly
    # it fails authentication. Either way nothing is written.
    _refused(filled, i1, None)
    _refused(filled, i1, None, RestoreOptions(chain=[full]))


def test_reordered_chain(filled: Env) -> None:
    full, i1 = _chain_of_two(filled)
    filled.db.put("users", b"carol", b"v3")
    i2 = filled.backup("i2.dfb", incremental(i1))
    _refused(filled, i2, "out of order", RestoreOptions(chain=[i1, full]))
    _refused(filled, i2, "does not list", RestoreOptions(chain=[i1]))
    with pytest.raises(InvalidArgumentError, match="more than once"):
        filled.manager.restore_backup(i2, RestoreOptions(chain=[full, full, i1]))


def test_parent_from_another_database(filled: Env) -> None:
    full, i1 = _chain_of_two(filled)
    other = filled.backup_of(sample_data(seed=9), "other-full.dfb")
    _refused(filled, i1, "another database", RestoreOptions(chain=[other]))
    # Put in the parent's place, the foreign backup is not taken for it either.
    shutil.move(other, full)
    _refused(filled, i1, None)


def test_replaced_parent_digest_is_checked(filled: Env) -> None:
    full, i1 = _chain_of_two(filled)
    child = filled.manager.read_metadata(i1)
    parent = filled.manager.read_metadata(full)
    check_link(child, parent)
    with pytest.raises(IntegrityError, match="altered or replaced"):
        check_link(child, dataclasses.replace(parent, checksum="00" * 32))


# --- ChainMerge, both cores ------------------------------------------------------------------


def _backup(core: ModuleType, key: bytes, trees: dict[str, list[tuple[bytes, bytes | None]]]) -> bytes:
    sink = io.BytesIO()
    w = core.BackupWriter(sink, key, b"{}", segment_size=4096)
    for name, records in trees.items():
        w.begin_tree(name)
        for k, v in records:
            if v is None:
                w.add_deletes([k])
            else:
                w.add_items([(k, v)])
        w.end_tree()
    w.finish()
    return sink.getvalue()


def _readers(core: ModuleType, key: bytes, files: list[bytes]) -> list:
    readers = []
    for data in files:
        r = core.BackupReader(io.BytesIO(data))
        r.unlock(key)
        assert r.next_tree() == "t"
        readers.append(r)
    return readers


@pytest.mark.parametrize("reader_core", ["pure", "rust"])
def test_chain_merge_across_cores(core: ModuleType, reader_core: str, backup_key: bytes) -> None:
    """Members written by one core, merged and diffed by the other."""
    full = _backup(core, backup_key, {"t": [(b"a", b"1"), (b"b", b"1"), (b"c", b"1")]})
    incr = _backup(core, backup_key, {"t": [(b"a", None), (b"b", b"2"), (b"d", b"2")]})
    rc = load_core(reader_core)
    merge = rc.ChainMerge(_readers(rc, backup_key, [full, incr]))
    assert merge.read_items(2) == [(b"a", None), (b"b", b"2")]
    assert merge.read_items() == [(b"c", b"1"), (b"d", b"2")]
    assert merge.read_items() == []

    merge = rc.ChainMerge(_readers(rc, backup_key, [full, incr]), stale=1)
    assert merge.read_items() == [(b"a", None), (b"b", b"2"), (b"c", None), (b"d", b"2")]

    merge = rc.ChainMerge(_readers(rc, backup_key, [full, incr]))
    assert merge.skip_items(3) == 3  # a (deleted), b, c: what read_items would hand out
    assert merge.read_items() == [(b"d", b"2")]
    assert merge.skip_items() == 0
    merge = rc.ChainMerge(_readers(rc, backup_key, [full, incr]))
    assert merge.skip_items(10, max_bytes=3) == 2  # a (1 byte), b (2): the batch ends at 3 bytes
    assert merge.skip_items(10, 1) == 1
    assert merge.read_items() == [(b"d", b"2")]

    sink = io.BytesIO()
    w = rc.BackupWriter(sink, backup_key, b"{}", segment_size=4096)
    w.begin_tree("t")
    merge = rc.ChainMerge(_readers(rc, backup_key, [full, incr]))
    assert merge.diff([(b"b", b"2"), (b"c", b"3")], w) == 1
    assert merge.diff(iter([(b"e", b"5")]), w) == 2  # DELETE d, PUT e
    assert merge.finish_diff(w) == 0
    w.end_tree()
    w.finish()
    r = rc.BackupReader(io.BytesIO(sink.getvalue()))
    r.unlock(backup_key)
    assert r.next_tree() == "t"
    assert r.read_items() == [(b"c", b"3"), (b"d", None), (b"e", b"5")]


def test_chain_merge_refuses_bad_input(core: ModuleType, backup_key: bytes) -> None:
    unsorted = _backup(core, backup_key, {"t": [(b"b", b"1"), (b"a", b"1")]})
    merge = core.ChainMerge(_readers(core, backup_key, [unsorted]))
    with pytest.raises(IntegrityError, match="ascending"):
        merge.read_items()
    full = _backup(core, backup_key, {"t": [(b"a", b"1")]})
    sink = io.BytesIO()
    w = core.BackupWriter(sink, backup_key, b"{}")
    w.begin_tree("t")
    merge = core.ChainMerge(_readers(core, backup_key, [full]))
    with pytest.raises(InvalidArgumentError, match="ascending"):
        merge.diff([(b"b", b"1"), (b"a", b"1")], w)
    with pytest.raises(InvalidArgumentError, match="stale"):
        core.ChainMerge(_readers(core, backup_key, [full]), stale=2)
    reader = _readers(core, backup_key, [full])[0]
    with pytest.raises(ValueError, match="twice"):
        core.ChainMerge([reader, reader]).read_items()
    with pytest.raises(TypeError):
        core.ChainMerge([object()])


# --- the property: full + N incrementals restore to the final database ------------------------

TREES = ("a", "b", "c")
KEYS = st.binary(min_size=1, max_size=6)
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.sampled_from(TREES), KEYS, st.binary(max_size=20)),
        st.tuples(st.just("delete"), st.sampled_from(TREES), KEYS, st.just(b"")),
        st.tuples(st.just("drop"), st.sampled_from(TREES), st.just(b""), st.just(b"")),
    ),
    max_size=25,
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(OPS, min_size=1, max_size=4), seed_keys=st.lists(KEYS, max_size=30))
def test_full_plus_incrementals_restore_to_the_final_database(
    env: Env, steps: list[list[tuple[str, str, bytes, bytes]]], seed_keys: list[bytes]
) -> None:
    run = env.tmp / f"run-{os.urandom(4).hex()}"
    run.mkdir()
    fill(env.db, {t: {k: k[::-1] for k in seed_keys} for t in TREES})
    newest = run / "0.dfb"
    env.manager.create_backup(newest)
    for i, ops in enumerate(steps, 1):
        for op, tree, key, value in ops:
            if op == "put":
                env.db.put(tree, key, value)
            elif op == "delete":
                env.db.delete(tree, key)
            elif tree in env.db.tree_names():
                drop_tree(env, tree)
        path = run / f"{i}.dfb"
        env.manager.create_backup(path, incremental(newest))
        newest = path
    target = env.open_db(f"target-{run.name}")
    env.manager_for(target).restore_backup(newest)
    assert snapshot(target) == snapshot(env.db)
    # Reset for the next example.
    for tree in env.db.tree_names():
        drop_tree(env, tree)


def test_cross_core_chain(tmp_path: Path, backend: str) -> None:
    """A full backup by one core, an incremental by the other, restored by the first."""
    from datafold import MasterKeyPair

    keys = MasterKeyPair.generate()
    db = DbOperations.open(db_location(tmp_path, backend), backend)
    fill(db, sample_data())
    pure = EncryptedBackupManager(db, keys, core="pure")
    rust = EncryptedBackupManager(db, keys, core="rust")
    pure.create_backup(tmp_path / "0.dfb")
    db.put("users", b"alice", b"changed")
    rust.create_backup(tmp_path / "1.dfb", incremental(tmp_path / "0.dfb"))
    db.delete("logs", b"log:00003")
    pure.create_backup(tmp_path / "2.dfb", incremental(tmp_path / "1.dfb"))
    target = DbOperations.open(db_location(tmp_path, backend, "target"), backend)
    rust_target = EncryptedBackupManager(target, keys, core="rust")
    rust_target.restore_backup(tmp_path / "2.dfb")
    assert snapshot(target) == snapshot(db)
    target.close()
    db.close()


def test_compressed_members_in_a_chain(filled: Env) -> None:
    """Compression is per backup: a chain may mix levels, and the merge reads through BLOCKs."""
    full = filled.backup("full.dfb", BackupOptions(compression_level=3))
    filled.db.put("logs", b"log:00010", b"changed")
    filled.db.delete("users", b"carol")
    i1 = filled.backup("i1.dfb", incremental(full, compression_level=1))
    assert filled.manager.read_metadata(i1).compression == "zstd-1"
    filled.db.put("users", b"zed", b"new")
    i2 = filled.backup("i2.dfb", incremental(i1))
    assert restored(filled, i2) == snapshot(filled.db)
