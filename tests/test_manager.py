"""Acceptance tests of EncryptedBackupManager: roundtrips, metadata, listing, errors, atomic
creation and the master key. Every test runs on both cores and both backends unless noted."""

# The fixtures imported from helpers are pytest fixtures: test arguments "redefine" them.
# ruff: noqa: F811

from __future__ import annotations

import itertools
import json
import os
import pickle
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

import datafold.manager as manager_module
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from datafold import (
    BackupError,
    BackupFileNotFoundError,
    BackupIOError,
    BackupOptions,
    DbOperations,
    EncryptedBackupManager,
    EncryptionKeyError,
    FormatError,
    IntegrityError,
    InvalidArgumentError,
    MasterKeyPair,
    RestoreOptions,
    StoreError,
    VersionMismatchError,
    derive_backup_key,
)
from datafold.atomic import TEMP_SUFFIX, AtomicFile
from datafold.keys import derive_key_id
from datafold.stores.lmdb import _LmdbSnapshot
from datafold.stores.sqlite import _SqliteSnapshot
from helpers import (  # noqa: F401 - fixtures
    OTHER_SEED,
    SEED,
    SMALL_SEGMENTS,
    CountingFile,
    Env,
    MiB,
    backend,
    core_name,
    env,
    fill,
    filled,
    flip_byte,
    sample_data,
    segment_offset,
    snapshot,
)

# What the failing restores below would write if they got that far.
CHANGES = {
    "users": {b"alice": b"guest", b"erin": b"new"},
    "logs": {b"log:00001": b"changed", b"log:99999": b"added"},
    "fresh": {f"k{i:04d}".encode(): b"v" * 50 for i in range(300)},
}


def independent_backup_key(seed: bytes) -> bytes:
    """HKDF-SHA256(ikm=seed, salt=empty, info=b"backup_data", L=32), computed without datafold."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"", info=b"backup_data").derive(seed)


# --- roundtrips -------------------------------------------------------------------------------


def test_roundtrip_into_empty_database_is_byte_identical(filled: Env) -> None:
    """Every tree (metadata and empty ones too), binary keys, empty values and a 1 MiB value come back exactly."""
    big = bytes(range(256)) * (MiB // 256)
    filled.db.put("blobs", b"one-mebibyte", big)
    filled.db.put("blobs", b"tiny", b"t")
    before = snapshot(filled.db)
    assert before["blobs"][0] == (b"one-mebibyte", big) and before["empty"] == []

    result = filled.manager.create_backup(filled.backup_path())
    target = filled.open_db("target")
    stats = filled.manager_for(target).restore_backup(result.path)

    assert snapshot(target) == before
    assert snapshot(filled.db) == before  # the backup did not touch its source
    n_items = sum(len(items) for items in before.values())
    assert result.stats.items_backed_up == result.metadata.total_items == n_items
    assert result.stats.trees_backed_up == len(before)
    assert result.stats.bytes_written == os.path.getsize(result.path) == result.metadata.file_size
    assert (stats.items_restored, stats.items_skipped, stats.trees_restored) == (n_items, 0, len(before))
    assert stats.errors == [] and stats.verified is True and stats.safety_backup_path is None


def test_roundtrip_across_backends(filled: Env) -> None:
    """A backup of one backend restores identically into the other."""
    other = "sqlite" if filled.backend == "lmdb" else "lmdb"
    path = filled.backup()
    target = filled.open_db("target", other)
    filled.manager_for(target).restore_backup(path)
    assert snapshot(target) == snapshot(filled.db)


def test_roundtrip_with_many_small_segments(filled: Env) -> None:
    """With 4 KiB segments the data spans many segments and still comes back exactly."""
    path = filled.backup(options=SMALL_SEGMENTS)
    assert os.path.getsize(path) > 8 * 4096
    target = filled.open_db("target")
    filled.manager_for(target).restore_backup(path)
    assert snapshot(target) == snapshot(filled.db)


def test_roundtrip_of_empty_database(env: Env) -> None:
    """A database without trees backs up to a backup without trees."""
    result = env.manager.create_backup(env.backup_path())
    assert result.metadata.trees == {} and result.metadata.total_items == 0
    target = env.open_db("target")
    stats = env.manager_for(target).restore_backup(result.path)
    assert snapshot(target) == {} and stats.items_restored == 0


def test_backup_holds_no_plaintext(env: Env) -> None:
    """Keys, values and tree names are encrypted: none of them appears in the file."""
    fill(env.db, {"very-secret-tree-name": {b"secret-key-0123456789": b"secret-value-" * 20}})
    data = env.backup().read_bytes()
    for needle in (b"very-secret-tree-name", b"secret-key-0123456789", b"secret-value-", b'"trees"'):
        assert needle not in data


def test_backup_is_encrypted_with_the_documented_backup_key(filled: Env, core: ModuleType) -> None:
    """A reader given HKDF-SHA256(seed, salt=empty, info="backup_data") decrypts the backup."""
    result = filled.manager.create_backup(filled.backup_path())
    with open(result.path, "rb") as f:
        reader = core.BackupReader(f)
        header = json.loads(reader.unlock(independent_backup_key(SEED)))
        names = []
        while (name := reader.next_tree()) is not None:
            names.append(name)
            while reader.read_items():
                pass
    assert header["backup_id"] == result.metadata.backup_id
    assert names == sorted(sample_data())


# --- metadata ---------------------------------------------------------------------------------


def test_backup_metadata_fields(filled: Env) -> None:
    """create_backup's metadata describes the backup as documented."""
    started = datetime.now(timezone.utc)
    result = filled.manager.create_backup(filled.backup_path(), SMALL_SEGMENTS)
    meta = result.metadata
    data = sample_data()

    assert str(uuid.UUID(meta.backup_id)) == meta.backup_id
    assert meta.format_version == 1
    assert meta.created_at.tzinfo is not None and meta.created_at.utcoffset() == timedelta(0)
    assert started - timedelta(seconds=1) <= meta.created_at <= datetime.now(timezone.utc)
    assert meta.mode == "full" and meta.parent_backup_id is None
    assert (meta.source.backend, meta.source.path) == (filled.backend, filled.db.path)
    assert meta.encryption.algorithm == "AES-256-GCM"
    assert meta.encryption.context == "backup_data"
    assert meta.encryption.segment_size == 4096
    assert meta.encryption.key_id == derive_key_id(independent_backup_key(SEED)).hex()
    assert {name: info.item_count for name, info in meta.trees.items()} == {t: len(i) for t, i in data.items()}
    assert meta.trees["users"].byte_count == sum(len(k) + len(v) for k, v in data["users"].items())
    assert meta.total_items == sum(len(i) for i in data.values())
    assert meta.total_bytes == sum(info.byte_count for info in meta.trees.values())
    assert len(bytes.fromhex(meta.checksum)) == 32
    assert meta.path == str(filled.backup_path()) and meta.file_size == os.path.getsize(meta.path)


def test_read_metadata_and_verify_backup_agree_with_create(filled: Env) -> None:
    """read_metadata (header + trailer) and verify_backup (full pass) report the same metadata."""
    created = filled.manager.create_backup(filled.backup_path(), SMALL_SEGMENTS).metadata
    # Another manager with the same key reads it: nothing is cached in the manager.
    other = filled.manager_for(filled.open_db("other"))
    assert other.read_metadata(filled.backup_path()) == created
    assert other.verify_backup(filled.backup_path()) == created


def test_tree_digests_cover_the_tree_contents(filled: Env, core: ModuleType) -> None:
    """Each tree's digest is the keyed digest of exactly its items."""
    meta = filled.manager.create_backup(filled.backup_path()).metadata
    key = derive_backup_key(filled.keys)
    for name, info in meta.trees.items():
        count, nbytes, digest = core.digest_items(key, filled.db.items(name))
        assert (info.item_count, info.byte_count, info.digest) == (count, nbytes, digest.hex())
    assert meta.trees["users"].digest != meta.trees["logs"].digest


def test_read_metadata_reads_only_the_header_and_trailer_segments(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a 2 MiB backup of 4 KiB segments read_metadata reads a few segments, not the file."""
    env.db.put_many("bulk", [(i.to_bytes(4, "big"), bytes([i % 251]) * 4096) for i in range(512)])
    path = env.backup(options=SMALL_SEGMENTS)
    size = os.path.getsize(path)
    assert size > 2 * MiB

    counter = [0]

    def counting_open(file: str) -> CountingFile:
        return CountingFile(file, counter)

    monkeypatch.setattr(manager_module, "open_backup_file", counting_open)
    meta = env.manager.read_metadata(path)
    assert meta.trees["bulk"].item_count == 512 and meta.file_size == size
    assert 0 < counter[0] <= 6 * 4096

    counter[0] = 0  # the counter does see a full pass
    env.manager.verify_backup(path)
    assert counter[0] >= size


# --- list_backups ------------------------------------------------------------------------------


def test_list_backups_oldest_first(filled: Env) -> None:
    """Backups are listed by creation time, neither by name nor by file time."""
    names = ["c.dfb", "a.dfb", "b.dfb"]  # creation order
    for name in names:
        filled.backup(name)
    for i, name in enumerate(names):  # file times say the opposite
        os.utime(filled.backup_path(name), (1_000_000 - i, 1_000_000 - i))

    listed = filled.manager.list_backups(filled.backups)

    assert [Path(m.path).name for m in listed] == names
    assert listed[0].created_at < listed[1].created_at < listed[2].created_at
    assert len({m.backup_id for m in listed}) == 3


def test_list_backups_skips_other_files_with_a_warning(filled: Env) -> None:
    """Foreign, corrupt, newer-version and other-key files are skipped with one warning each."""
    good = filled.backup("good.dfb", SMALL_SEGMENTS)
    data = good.read_bytes()
    skipped = {
        "notes.txt": b"not a backup at all\n",
        "empty.dfb": b"",
        "truncated.dfb": data[: len(data) // 2],
        "corrupt-trailer.dfb": data[:-5] + bytes([data[-5] ^ 1]) + data[-4:],
        "newer.dfb": data[:8] + (2).to_bytes(4, "little") + data[12:],
    }
    for name, content in skipped.items():
        filled.backup_path(name).write_bytes(content)
    other_keys = MasterKeyPair.from_private_bytes(OTHER_SEED)
    filled.manager_for(filled.db, other_keys).create_backup(filled.backup_path("other-key.dfb"))
    (filled.backups / "subdir").mkdir()  # not a file: ignored silently
    filled.backup_path(f".partial{TEMP_SUFFIX}").write_bytes(b"x")  # a temporary file: ignored silently

    with pytest.warns(UserWarning) as record:
        listed = filled.manager.list_backups(str(filled.backups))

    assert [m.path for m in listed] == [str(good)]
    warned = {Path(str(w.message).split("skipping ", 1)[1].split(":", 1)[0]).name for w in record}
    assert warned == set(skipped) | {"other-key.dfb"}
    assert len(record) == len(warned)


def test_list_backups_skips_symlink_loops_fifos_and_links_through_files(filled: Env) -> None:
    """An entry whose type cannot be read (a symlink loop, a link through a file) or that is not a
    regular file is skipped, not the end of the listing."""
    backup = filled.backup("a.dfb")
    (filled.backups / "loop.dfb").symlink_to("loop.dfb")
    (filled.backups / "through-a-file.dfb").symlink_to(backup / "child")
    os.mkfifo(filled.backups / "pipe.dfb")
    assert [m.path for m in filled.manager.list_backups(filled.backups)] == [str(backup)]


def test_list_backups_of_an_empty_directory(env: Env) -> None:
    assert env.manager.list_backups(env.backups) == []


def test_list_backups_of_a_missing_directory(env: Env) -> None:
    with pytest.raises(BackupFileNotFoundError) as info:
        env.manager.list_backups(env.tmp / "nowhere")
    assert isinstance(info.value, FileNotFoundError)


def test_list_backups_of_a_file(env: Env) -> None:
    path = env.backup()
    with pytest.raises(BackupIOError):
        env.manager.list_backups(path)


# --- errors when reading ---------------------------------------------------------------------

READERS = ["restore_backup", "verify_backup", "read_metadata"]


def read_with(env: Env, operation: str, path: Path, manager: EncryptedBackupManager | None = None) -> object:
    return getattr(manager or env.manager, operation)(path)


@pytest.mark.parametrize("operation", READERS)
def test_missing_backup_file(filled: Env, operation: str) -> None:
    before = snapshot(filled.db)
    with pytest.raises(BackupFileNotFoundError) as info:
        read_with(filled, operation, filled.backup_path("missing.dfb"))
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, BackupError)
    assert snapshot(filled.db) == before


@pytest.mark.parametrize("operation", READERS)
def test_backup_path_is_a_directory(filled: Env, operation: str) -> None:
    before = snapshot(filled.db)
    with pytest.raises(BackupIOError) as info:
        read_with(filled, operation, filled.backups)
    assert isinstance(info.value, OSError)
    assert snapshot(filled.db) == before


@pytest.mark.parametrize("operation", READERS)
def test_backup_path_is_a_fifo_or_a_device(filled: Env, operation: str) -> None:
    """Refused at once: opening a FIFO nobody writes to would block forever."""
    import threading

    fifo = filled.tmp / "pipe.dfb"
    os.mkfifo(fifo)
    before = snapshot(filled.db)
    for path in (fifo, Path("/dev/zero")):
        outcome: list[BaseException | None] = []

        def call(path: Path = path, outcome: list[BaseException | None] = outcome) -> None:
            try:
                read_with(filled, operation, path)
                outcome.append(None)
            except BaseException as e:  # noqa: BLE001 - handed to the test thread
                outcome.append(e)

        caller = threading.Thread(target=call, daemon=True)
        caller.start()
        caller.join(10)
        if caller.is_alive():
            with open(fifo, "wb"):  # a writer lets the blocked open return
                pass
            pytest.fail(f"{operation}({path}) blocked")
        (error,) = outcome
        assert isinstance(error, BackupIOError) and "not a regular file" in str(error), error
    assert snapshot(filled.db) == before


@pytest.mark.parametrize("operation", READERS)
@pytest.mark.parametrize(
    "content",
    [b"", b"hello, world\n" * 10, b"DFBACKU", bytes(range(256)) * 4],
    ids=["empty", "text", "short-magic", "binary"],
)
def test_not_a_backup(filled: Env, operation: str, content: bytes) -> None:
    path = filled.backup_path("foreign.dfb")
    path.write_bytes(content)
    before = snapshot(filled.db)
    with pytest.raises(FormatError):
        read_with(filled, operation, path)
    assert snapshot(filled.db) == before


@pytest.mark.parametrize("operation", READERS)
def test_newer_format_version(filled: Env, operation: str) -> None:
    """Format version 2 in bytes 8..12 raises VersionMismatchError(found=2, expected=1)."""
    path = filled.backup_of(CHANGES)
    data = bytearray(path.read_bytes())
    assert data[8:12] == (1).to_bytes(4, "little")
    data[8:12] = (2).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    before = snapshot(filled.db)
    with pytest.raises(VersionMismatchError) as info:
        read_with(filled, operation, path)
    assert (info.value.found, info.value.expected) == (2, 1)
    assert snapshot(filled.db) == before


@pytest.mark.parametrize("operation", READERS)
def test_wrong_master_key_is_detected_before_decryption(filled: Env, operation: str) -> None:
    """With the ciphertext destroyed, the right key gets IntegrityError but a wrong key still gets
    EncryptionKeyError: the key is checked before anything is decrypted."""
    path = filled.backup_of(CHANGES)
    data = path.read_bytes()
    start = int.from_bytes(data[12:16], "little")
    path.write_bytes(data[:start] + bytes(len(data) - start))
    wrong = filled.manager_for(filled.db, MasterKeyPair.from_private_bytes(OTHER_SEED))
    before = snapshot(filled.db)
    with pytest.raises(EncryptionKeyError):
        read_with(filled, operation, path, wrong)
    with pytest.raises(IntegrityError):
        read_with(filled, operation, path)
    assert snapshot(filled.db) == before


@pytest.mark.parametrize("operation", READERS)
@pytest.mark.parametrize("damage", ["first-segment", "last-segment", "truncated", "appended", "preamble"])
def test_corrupted_backup(filled: Env, operation: str, damage: str) -> None:
    """Damage anywhere read_metadata looks at raises IntegrityError, and the db is untouched."""
    path = filled.backup_of(CHANGES, options=SMALL_SEGMENTS)
    data = path.read_bytes()
    if damage == "first-segment":
        flip_byte(path, segment_offset(path, 4096, 0) + 10)
    elif damage == "last-segment":
        flip_byte(path, -3)
    elif damage == "truncated":
        path.write_bytes(data[:-4096])
    elif damage == "appended":
        path.write_bytes(data + b"\x00")
    else:  # another valid segment size in the preamble, which is the stream's associated data
        path.write_bytes(data[:20] + (8192).to_bytes(4, "little") + data[24:])
    before = snapshot(filled.db)
    with pytest.raises(IntegrityError):
        read_with(filled, operation, path)
    assert snapshot(filled.db) == before


@pytest.mark.parametrize("operation", ["restore_backup", "verify_backup"])
def test_corrupted_middle_segment(filled: Env, operation: str) -> None:
    """A full pass finds damage in any segment."""
    path = filled.backup_of(CHANGES, options=SMALL_SEGMENTS)
    segments = (os.path.getsize(path) - 44) // 4096
    assert segments >= 3
    flip_byte(path, segment_offset(path, 4096, segments // 2) + 100)
    before = snapshot(filled.db)
    with pytest.raises(IntegrityError):
        read_with(filled, operation, path)
    assert snapshot(filled.db) == before


def test_restore_into_a_closed_database(filled: Env) -> None:
    """A store failure surfaces as StoreError and writes nothing."""
    path = filled.backup_of(CHANGES)
    before = snapshot(filled.db)
    filled.db.close()
    with pytest.raises(StoreError, match="closed"):
        filled.manager.restore_backup(path)
    with DbOperations.open(filled.db.path, filled.backend) as reopened:
        assert snapshot(reopened) == before


# --- errors when writing ---------------------------------------------------------------------


def listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


@pytest.mark.parametrize("where", ["missing-directory", "under-a-regular-file", "a-directory"])
def test_unwritable_destination(filled: Env, where: str) -> None:
    """create_backup to a path it cannot write raises BackupIOError (an OSError) and creates nothing."""
    (filled.backups / "plain-file").write_bytes(b"x")
    (filled.backups / "a-dir").mkdir()
    destination = {
        "missing-directory": filled.backups / "no-such-dir" / "b.dfb",
        "under-a-regular-file": filled.backups / "plain-file" / "b.dfb",
        "a-directory": filled.backups / "a-dir",
    }[where]
    before = listing(filled.backups)
    with pytest.raises(BackupIOError) as info:
        filled.manager.create_backup(destination)
    assert isinstance(info.value, OSError)
    assert listing(filled.backups) == before and listing(filled.backups / "a-dir") == []
    assert (filled.backups / "plain-file").read_bytes() == b"x"


def test_a_backup_never_goes_over_a_file_of_its_database(filled: Env) -> None:
    """Every file the store lives in (DbOperations.files), by its own path or through a symlink, is
    refused before anything is written; the database stays as it was."""
    before = snapshot(filled.db)
    link = filled.backups / "link.dfb"
    for own in filled.db.files:
        destinations = [own]
        if os.path.exists(own):
            link.unlink(missing_ok=True)
            link.symlink_to(own)
            destinations.append(str(link))
        for destination in destinations:
            with pytest.raises(InvalidArgumentError, match="is a file of the database"):
                filled.manager.create_backup(destination)
    assert snapshot(filled.db) == before
    filled.manager.create_backup(filled.backups / "fine.dfb")  # and it still backs up


def test_a_backup_is_written_through_a_symlink_and_never_over_a_special_file(filled: Env) -> None:
    target = filled.backups / "dated.dfb"
    target.write_bytes(b"an older file")
    link = filled.backups / "latest.dfb"
    link.symlink_to(target.name)
    filled.manager.create_backup(link)
    assert (
        link.is_symlink()
        and filled.manager.verify_backup(target).total_items == filled.manager.verify_backup(link).total_items
    )
    fifo = filled.backups / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(BackupIOError, match="not a regular file"):
        filled.manager.create_backup(fifo)
    assert fifo.is_fifo()


SNAPSHOT_CLASSES = (_LmdbSnapshot, _SqliteSnapshot)


def patch_snapshot_items(monkeypatch: pytest.MonkeyPatch, wrap: Any) -> None:
    """Replaces the records of every backend's read snapshot, items() and batches() (what
    create_backup reads through), by wrap(original_items, self, tree, prefix)."""
    for cls in SNAPSHOT_CLASSES:
        original_batches = cls.batches

        def original(self: Any, tree: str, prefix: bytes = b"", _batches: Any = original_batches) -> Any:
            return itertools.chain.from_iterable(_batches(self, tree, prefix))

        def items(self: Any, tree: str, prefix: bytes = b"", _original: Any = original) -> Any:
            return wrap(_original, self, tree, prefix)

        def batches(self: Any, tree: str, prefix: bytes = b"", _original: Any = original) -> Any:
            for item in wrap(_original, self, tree, prefix):
                yield [item]

        monkeypatch.setattr(cls, "items", items)
        monkeypatch.setattr(cls, "batches", batches)


def fail_items_after(monkeypatch: pytest.MonkeyPatch, n: int) -> list[int]:
    """Makes the snapshot's items() raise StoreError once n items were read in total."""
    seen = [0]

    def wrap(original: Any, self: Any, tree: str, prefix: bytes):  # type: ignore[no-untyped-def]
        for item in original(self, tree, prefix):
            if seen[0] == n:
                raise StoreError("simulated read failure")
            seen[0] += 1
            yield item

    patch_snapshot_items(monkeypatch, wrap)
    return seen


def test_failed_create_leaves_no_file(filled: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store failure in the middle of a backup leaves neither the backup nor a temporary file."""
    before = listing(filled.backups)
    seen = fail_items_after(monkeypatch, 350)  # in "logs", after several 4 KiB segments went to disk
    with pytest.raises(StoreError, match="simulated"):
        filled.manager.create_backup(filled.backup_path(), SMALL_SEGMENTS)
    assert seen[0] == 350
    assert listing(filled.backups) == before


def test_failed_create_keeps_the_previous_backup(filled: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """An older file at the destination stays as it was when a new backup fails."""
    path = filled.backup(options=SMALL_SEGMENTS)
    old = path.read_bytes()
    fail_items_after(monkeypatch, 350)
    with pytest.raises(StoreError):
        filled.manager.create_backup(path, SMALL_SEGMENTS)
    assert path.read_bytes() == old
    assert listing(filled.backups) == [path.name]


def test_failed_create_without_o_tmpfile_removes_its_temporary_file(
    filled: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where O_TMPFILE is unavailable the named temporary file exists while writing and is removed on failure."""
    monkeypatch.setattr(AtomicFile, "_open_unnamed", lambda self: None)
    during: list[list[str]] = []

    def wrap(original: Any, self: Any, tree: str, prefix: bytes):  # type: ignore[no-untyped-def]
        during.append(listing(filled.backups))
        yield from original(self, tree, prefix)
        if tree == "logs":
            raise StoreError("simulated read failure")

    patch_snapshot_items(monkeypatch, wrap)
    with pytest.raises(StoreError):
        filled.manager.create_backup(filled.backup_path(), SMALL_SEGMENTS)
    assert any(name.endswith(TEMP_SUFFIX) for name in during[-1])
    assert listing(filled.backups) == []


def test_create_replaces_an_existing_file(filled: Env) -> None:
    """A backup written over an older one replaces it (and nothing else is left)."""
    first = filled.manager.create_backup(filled.backup_path()).metadata
    filled.db.put("users", b"zed", b"later")
    second = filled.manager.create_backup(filled.backup_path()).metadata
    assert second.backup_id != first.backup_id
    assert filled.manager.verify_backup(filled.backup_path()) == second
    assert listing(filled.backups) == ["backup.dfb"]


# --- arguments --------------------------------------------------------------------------------


def test_manager_argument_types(env: Env, core_name: str) -> None:
    with pytest.raises(TypeError, match="db"):
        EncryptedBackupManager(env.db.path, env.keys, core=core_name)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="master_keypair"):
        EncryptedBackupManager(env.db, SEED, core=core_name)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fast"):
        EncryptedBackupManager(env.db, env.keys, core="fast")
    assert env.manager.core_name == core_name


def test_operation_argument_types(env: Env) -> None:
    path = env.backup()
    with pytest.raises(TypeError, match="path"):
        env.manager.create_backup(123)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="path"):
        env.manager.restore_backup("")
    with pytest.raises(TypeError, match="options"):
        env.manager.create_backup(env.backup_path("x.dfb"), RestoreOptions())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="options"):
        env.manager.restore_backup(path, BackupOptions())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="directory"):
        env.manager.list_backups(None)  # type: ignore[arg-type]
    assert listing(env.backups) == ["backup.dfb"]


# --- the master key ---------------------------------------------------------------------------


def test_generated_key_pairs_are_ed25519_and_distinct() -> None:
    a, b = MasterKeyPair.generate(), MasterKeyPair.generate()
    assert len(a.private_bytes()) == 32 and len(a.public_key_bytes()) == 32
    assert a.private_bytes() != b.private_bytes() and a != b
    expected = Ed25519PrivateKey.from_private_bytes(a.private_bytes()).public_key()
    assert a.public_key_bytes() == expected.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def test_key_pair_from_private_bytes_roundtrips() -> None:
    keys = MasterKeyPair.from_private_bytes(SEED)
    assert keys.private_bytes() == SEED
    assert MasterKeyPair.from_private_bytes(bytearray(SEED)) == keys
    assert hash(MasterKeyPair.from_private_bytes(SEED)) == hash(keys)
    assert MasterKeyPair.from_private_bytes(OTHER_SEED) != keys


def test_key_pair_repr_hides_the_private_key() -> None:
    keys = MasterKeyPair.from_private_bytes(SEED)
    text = repr(keys) + str(keys)
    assert keys.public_key_bytes().hex() in text
    assert SEED.hex() not in text and SEED.hex().upper() not in text and repr(SEED) not in text
    with pytest.raises(TypeError):
        pickle.dumps(keys)


@pytest.mark.parametrize("bad", [b"", SEED[:31], SEED + b"\x00"])
def test_key_pair_rejects_wrong_length(bad: bytes) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        MasterKeyPair.from_private_bytes(bad)


def test_key_pair_rejects_non_bytes() -> None:
    with pytest.raises(TypeError):
        MasterKeyPair.from_private_bytes(SEED.hex())  # type: ignore[arg-type]


def test_derive_backup_key_is_the_documented_hkdf() -> None:
    """derive_backup_key = HKDF-SHA256(seed, salt empty, info b"backup_data", 32)."""
    for seed in (SEED, OTHER_SEED, MasterKeyPair.generate().private_bytes()):
        expected = independent_backup_key(seed)
        assert len(expected) == 32
        assert derive_backup_key(MasterKeyPair.from_private_bytes(seed)) == expected
        assert derive_backup_key(seed) == expected
    assert derive_backup_key(SEED) != derive_backup_key(OTHER_SEED)
