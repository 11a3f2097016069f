"""Adversarial tests: the tamper matrix (docs/SECURITY.md, "How each property is tested").

Every case runs on both cores and both backends. A backup of a few 4 KiB segments is damaged in
every way an attacker or a failing disk could damage it; each damaged file must make
`verify_backup`, `restore_backup` (with and without `verify_before_restore`) and `read_metadata`
raise a `BackupError` subclass -- never anything else -- and leave the database byte-identical.

Sampling (to stay within CI's budget, see docs/SECURITY.md):
* core level (`BackupReader` of the same core, a full read and a `read_summary()`): EVERY bit of
  the preamble, the stream header, the first and the last segment, and one bit of every byte of
  the middle segments;
* manager level: a deterministic, stratified sample of 200 single-bit flips per core x backend,
  every truncation at a segment boundary plus 25 other offsets (0 bytes included), and every
  structural edit (appended bytes, segments swapped / duplicated / dropped / spliced, streams moved
  under other preambles, another key, version and magic changes).
"""

# The fixtures imported from helpers are pytest fixtures: test arguments "redefine" them.
# ruff: noqa: F811

from __future__ import annotations

import hashlib
import io
import os
import random
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from datafold import (
    Argon2Params,
    BackupError,
    BackupMetadata,
    BackupOptions,
    EncryptedBackupManager,
    EncryptionKeyError,
    FormatError,
    IntegrityError,
    MasterKeyPair,
    Passphrase,
    RestoreOptions,
    VersionMismatchError,
    derive_backup_key,
)
from helpers import (  # noqa: F401 - fixtures
    OTHER_SEED,
    SEED,
    Env,
    backend,
    core_name,
    env,
    fill,
    sample_data,
    snapshot,
)

CSS = 4096
SMALL = BackupOptions(segment_size=CSS)
HEADER_LENGTH = 40  # Tink stream header
TAG = 16

# What the tampered backups hold: ~12 KiB of records, so the file has 3-4 segments of 4 KiB. Trees
# are restored in name order: "accounts" and "config" sit in the first segment, so a restore without
# the verify pass has written them into its transaction before damage further on stops it.
SOURCE = {
    "accounts": {b"alice": b"guest", b"erin": b"new", b"\x00\xff": bytes(range(200))},
    "config": {b"mode": b"strict", b"level": b"9"},
    "logs": {f"log:{i:05d}".encode(): bytes([i % 251]) * 90 for i in range(100)},
    "metadata": {b"schema": b"4"},
}

Expected = tuple[type[BaseException], ...]


# --- the file under attack ----------------------------------------------------------------------


@dataclass
class Victim:
    """A database (sample_data()) that a restore of `good` would change, and backups to attack."""

    env: Env
    good: Path  # backup of SOURCE, 4 KiB segments
    twin: Path  # another backup of SOURCE with the same key and segment size (different salt)
    blob: bytes
    preamble_length: int
    segments: int

    @property
    def core(self) -> ModuleType:
        return self.env.manager._core

    def segment_bounds(self) -> list[tuple[int, int]]:
        """(start, end) file offsets of every ciphertext segment."""
        p, n = self.preamble_length, len(self.blob)
        bounds = [(p + HEADER_LENGTH, min(p + CSS, n))]
        start = p + CSS
        while start < n:
            bounds.append((start, min(start + CSS, n)))
            start += CSS
        return bounds

    def split(self, blob: bytes | None = None) -> tuple[bytes, list[bytes]]:
        """(preamble + stream header, [segments])."""
        blob = self.blob if blob is None else blob
        p = self.preamble_length
        head = blob[: p + HEADER_LENGTH]
        segs = [blob[p + HEADER_LENGTH : p + CSS]] + [blob[i : i + CSS] for i in range(p + CSS, len(blob), CSS)]
        assert head + b"".join(segs) == blob
        return head, segs


LMDB_META_BYTES = 2 * 4096  # LMDB's two meta pages: the commit point (root pages, last txn id)


def db_fingerprint(env: Env) -> tuple[Any, dict[str, str]]:
    """The database's content and the bytes that define its committed state: SQLite's file and WAL
    (lock and shared-memory files aside); LMDB's meta pages. (LMDB's whole file: see
    test_aborted_restore_leaves_the_database_files_byte_identical, which runs on the default store:
    with the opt-in writemap=True an aborted transaction leaves bytes in free pages, which no
    reader sees.)"""
    path = Path(env.db.path)
    if env.backend == "lmdb":
        with open(path / "data.mdb", "rb") as f:
            return snapshot(env.db), {"meta pages": hashlib.sha256(f.read(LMDB_META_BYTES)).hexdigest()}
    files = [path, Path(f"{path}-wal")]
    return snapshot(env.db), {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.exists()}


def db_file_bytes(env: Env) -> dict[str, bytes]:
    path = Path(env.db.path)
    files = [path / "data.mdb"] if env.backend == "lmdb" else [path, Path(f"{path}-wal")]
    return {f.name: f.read_bytes() for f in files if f.exists()}


@pytest.fixture
def victim(env: Env) -> Victim:
    fill(env.db, sample_data())
    good = env.backup_of(SOURCE, "good.dfb", SMALL)
    twin = env.backup_of(SOURCE, "twin.dfb", SMALL)
    blob = good.read_bytes()
    p = int.from_bytes(blob[12:16], "little")
    assert p == 44
    segments = -(-(len(blob) - p) // CSS)
    assert 3 <= segments <= 4, segments
    assert len(twin.read_bytes()) == len(blob)  # same layout: segments of one fit the other
    return Victim(env, good, twin, blob, p, segments)


# --- running the manager's readers on a damaged file -------------------------------------------------

OPERATIONS: dict[str, Callable[[EncryptedBackupManager, Path], object]] = {
    "verify_backup": lambda m, p: m.verify_backup(p),
    "restore_backup": lambda m, p: m.restore_backup(p, RestoreOptions(overwrite_existing=True)),
    "restore_backup(verify_before_restore=False)": lambda m, p: m.restore_backup(
        p, RestoreOptions(overwrite_existing=True, verify_before_restore=False)
    ),
    "read_metadata": lambda m, p: m.read_metadata(p),
}


class Matrix:
    """Collects every way a damaged file was not refused as it should be."""

    def __init__(self, v: Victim) -> None:
        self.v = v
        self.before = db_fingerprint(v.env)
        self.good_metadata = v.env.manager.read_metadata(v.good)
        self.failures: list[str] = []
        self.cases = 0
        self.path = v.env.backup_path("tampered.dfb")

    def refused(
        self,
        label: str,
        blob: bytes,
        expected: Expected,
        *,
        manager: EncryptedBackupManager | None = None,
        metadata_may_pass: bool = False,
    ) -> None:
        """Each operation on `blob` raises one of `expected` (all BackupError subclasses) and
        leaves the database as it was. read_metadata reads only the first and last segments: with
        `metadata_may_pass` it may instead return the undamaged file's metadata."""
        assert all(issubclass(e, BackupError) for e in expected)
        self.path.write_bytes(blob)
        manager = manager or self.v.env.manager
        for op, run in OPERATIONS.items():
            self.cases += 1
            try:
                result = run(manager, self.path)
            except Exception as exc:  # noqa: BLE001 - the type is what is checked
                if not isinstance(exc, expected):
                    self.failures.append(f"{label}: {op} raised {type(exc).__name__}: {exc}")
            else:
                if not (op == "read_metadata" and metadata_may_pass and _same_backup(result, self.good_metadata)):
                    self.failures.append(f"{label}: {op} accepted the damaged file")
            if op.startswith("restore") and (now := db_fingerprint(self.v.env)) != self.before:
                self.failures.append(f"{label}: {op} changed the database")
                self.before = now  # report each change once

    def check(self) -> None:
        assert self.cases > 0
        assert not self.failures, f"{len(self.failures)} of {self.cases} cases:\n" + "\n".join(self.failures[:30])


def _same_backup(a: Any, b: BackupMetadata) -> bool:
    return isinstance(a, BackupMetadata) and (a.backup_id, a.checksum, a.trees) == (b.backup_id, b.checksum, b.trees)


def flipped(blob: bytes, offset: int, bit: int) -> bytes:
    out = bytearray(blob)
    out[offset] ^= 1 << bit
    return bytes(out)


def expected_for_offset(offset: int, *, manager: bool) -> Expected:
    """The error a flip at `offset` of a master-key backup gives (docs/FORMAT.md §1 order)."""
    if offset < 8:
        return (FormatError,)  # magic
    if offset < 12:
        return (VersionMismatchError,)
    if offset < 20:
        return (FormatError,)  # preamble length, flags
    if offset < 24:
        return (FormatError, IntegrityError)  # segment size: out of range, or another (AAD) size
    if offset < 40:
        return (EncryptionKeyError,)  # key id
    if offset < 42:
        # kdf_id 1 = passphrase: the manager asks for a passphrase, the core fails to authenticate
        return (FormatError, EncryptionKeyError if manager else IntegrityError)
    if offset < 44:
        return (FormatError,)  # kdf_params_length
    return (IntegrityError,)


# --- core level: every bit of the preamble and of the first and last segments -----------------------


def core_read(core: ModuleType, blob: bytes, key: bytes) -> tuple[Any, Any]:
    """(full read, summary read): each the result or the exception raised."""

    def full() -> Any:
        reader = core.BackupReader(io.BytesIO(blob))
        meta = reader.unlock(key)
        trees = []
        while (name := reader.next_tree()) is not None:
            trees.append((name, reader.read_items(1 << 20)))
            assert reader.read_items() == []
        return meta, trees, reader.trailer

    def summary() -> Any:
        reader = core.BackupReader(io.BytesIO(blob))
        return reader.unlock(key), reader.read_summary()

    out = []
    for fn in (full, summary):
        try:
            out.append(fn())
        except Exception as exc:  # noqa: BLE001 - inspected by the caller
            out.append(exc)
    return out[0], out[1]


def test_every_bit_of_preamble_first_and_last_segment_core_level(victim: Victim) -> None:
    """Every single-bit flip in the preamble, the stream header and the first and last segments
    (one bit of every byte in between): the full read raises the documented error; the summary
    read (first and last segments only) raises a BackupError too, unless the flip lies in a middle
    segment it never reads -- then it returns the true trailer."""
    core, key, blob = victim.core, derive_backup_key(SEED), victim.blob
    good_full, good_summary = core_read(core, blob, key)
    assert not isinstance(good_full, BaseException) and not isinstance(good_summary, BaseException)
    bounds = victim.segment_bounds()
    first_end, last_start = bounds[0][1], bounds[-1][0]
    rnd = random.Random(7)
    positions = [(i, b) for i in range(first_end) for b in range(8)]
    positions += [(i, rnd.randrange(8)) for i in range(first_end, last_start)]
    positions += [(i, b) for i in range(last_start, len(blob)) for b in range(8)]
    failures = []
    for offset, bit in positions:
        bad = flipped(blob, offset, bit)
        full, summary = core_read(core, bad, key)
        expected = expected_for_offset(offset, manager=False)
        if not isinstance(full, expected):
            failures.append((offset, bit, "full", repr(full)[:120]))
        middle = first_end <= offset < last_start
        if isinstance(summary, BaseException):
            if not isinstance(summary, BackupError):
                failures.append((offset, bit, "summary", repr(summary)[:120]))
        elif not (middle and summary == good_summary):
            failures.append((offset, bit, "summary accepted", ""))
    assert len(positions) > 8 * (first_end + len(blob) - last_start)
    assert not failures, f"{len(failures)} of {len(positions)} flips: {failures[:20]}"


# --- manager level ------------------------------------------------------------------------------------


def flip_sample(v: Victim, n: int = 200) -> list[tuple[int, int]]:
    """A deterministic sample of n (offset, bit) flips, stratified over the file's regions."""
    rnd = random.Random(20261127)
    bounds = v.segment_bounds()
    p = v.preamble_length
    regions = [
        (0, p, 30),  # preamble: every field
        (p, p + HEADER_LENGTH, 10),  # Tink stream header (salt, nonce prefix)
        (bounds[0][0], bounds[0][1], 55),  # first segment (HEADER record)
        (bounds[-1][0], len(v.blob), 55),  # last segment (TRAILER record)
        (len(v.blob) - TAG, len(v.blob), 5),  # the last tag
    ]
    middle = n - sum(r[2] for r in regions)
    regions.append((bounds[1][0], bounds[-1][0], middle))
    picks = [(rnd.randrange(lo, hi), rnd.randrange(8)) for lo, hi, k in regions for _ in range(k)]
    assert len(picks) == n
    return picks


def test_bit_flips_through_the_manager(victim: Victim) -> None:
    """200 single-bit flips (stratified sample) x {verify, restore, restore without the verify
    pass, read_metadata}: a BackupError of the documented class, the database untouched."""
    m = Matrix(victim)
    middle = (victim.segment_bounds()[1][0], victim.segment_bounds()[-1][0])
    for offset, bit in flip_sample(victim):
        m.refused(
            f"flip {offset}.{bit}",
            flipped(victim.blob, offset, bit),
            expected_for_offset(offset, manager=True),
            metadata_may_pass=middle[0] <= offset < middle[1],
        )
    m.check()


def truncation_offsets(v: Victim) -> list[int]:
    boundaries = [0, v.preamble_length, v.preamble_length + HEADER_LENGTH] + [e for _, e in v.segment_bounds()[:-1]]
    n = len(v.blob)
    rnd = random.Random(3)
    others = [1, 7, 8, 12, 15, 16, 20, 24, 43, 45, 83, 85, 100, n - 1, n - 15, n - TAG, n - TAG - 1, n - 100]
    others += [b + d for b in boundaries[3:] for d in (-1, 1)]
    others += [rnd.randrange(1, n) for _ in range(6)]
    return sorted(set(boundaries) | {o for o in others if 0 <= o < n})


def test_truncation(victim: Victim) -> None:
    """At every segment boundary (0 bytes included) and at 25+ other offsets."""
    m = Matrix(victim)
    offsets = truncation_offsets(victim)
    assert len(offsets) >= 25
    for n in offsets:
        m.refused(f"truncated to {n}", victim.blob[:n], (FormatError,) if n < 44 else (IntegrityError,))
    m.check()


def test_bytes_appended_after_the_last_segment(victim: Victim) -> None:
    m = Matrix(victim)
    _, segs = victim.split()
    _, twin_segs = victim.split(victim.twin.read_bytes())
    extras = {
        "1 zero byte": b"\x00",
        "15 bytes": b"\xff" * 15,
        "16 bytes (a tag's length)": b"\x01" * 16,
        "17 bytes": os.urandom(17),
        "a segment of random bytes": os.urandom(CSS),
        "a copy of the last segment": segs[-1],
        "the twin's last segment": twin_segs[-1],
        "the whole file again": victim.blob,
    }
    for label, extra in extras.items():
        m.refused(label, victim.blob + extra, (IntegrityError,))
    m.check()


def test_segments_swapped_duplicated_dropped(victim: Victim) -> None:
    m = Matrix(victim)
    head, s = victim.split()
    n = len(s)
    variants = {
        "swap 0,1": [s[1], s[0], *s[2:]],
        "swap 1,2": [s[0], s[2], s[1], *s[3:]],
        "swap last two": [*s[:-2], s[-1], s[-2]],
        "reverse": s[::-1],
        "duplicate first": [s[0], *s],
        "duplicate middle": [*s[:2], s[1], *s[2:]],
        "duplicate last": [*s, s[-1]],
        "drop first": s[1:],
        "drop middle": [s[0], *s[2:]],
        "drop last": s[:-1],
        "only the last": [s[-1]],
        "first, then last": [s[0], s[-1]],
    }
    assert n >= 3
    for label, parts in variants.items():
        # a layout a reader could mistake for a whole file is read to the end; read_metadata only
        # sees the first and last segments, which some of these edits keep
        m.refused(
            label,
            head + b"".join(parts),
            (IntegrityError,),
            metadata_may_pass=label in {"swap 1,2", "duplicate middle", "drop middle"},
        )
    m.check()


def test_segments_spliced_from_another_backup_with_the_same_key(victim: Victim) -> None:
    """The twin has the same key, segment size and content, but its own salt and nonce prefix:
    none of its segments (nor its stream header) authenticates in the good file."""
    m = Matrix(victim)
    head, s = victim.split()
    twin = victim.twin.read_bytes()
    twin_head, t = victim.split(twin)
    assert head[:44] == twin_head[:44] and head != twin_head  # same preamble, another stream header
    for i in range(len(s)):
        parts = [*s[:i], t[i], *s[i + 1 :]]
        m.refused(
            f"segment {i} from the twin",
            head + b"".join(parts),
            (IntegrityError,),
            metadata_may_pass=0 < i < len(s) - 1,
        )
    m.refused("the twin's stream header", twin_head + b"".join(s), (IntegrityError,))
    m.refused("the twin's segments", head + b"".join(t), (IntegrityError,))
    m.check()


def test_stream_moved_under_another_backups_preamble(victim: Victim) -> None:
    """A preamble is the stream's associated data: the good stream under the preamble of a backup
    with another segment size fails to authenticate; under a passphrase backup's preamble the key
    does not even match. (Under an identical preamble -- same key, same segment size, kdf 0 -- the
    result IS the good file: see test_stream_under_an_identical_preamble_is_the_same_backup.)"""
    env = victim.env
    m = Matrix(victim)
    stream = victim.blob[victim.preamble_length :]
    for size in (8192, 1 << 20):
        other = env.backup_of(SOURCE, f"css-{size}.dfb", BackupOptions(segment_size=size)).read_bytes()
        m.refused(f"under a segment_size={size} preamble", other[:44] + stream, (IntegrityError,))
    cheap = Passphrase("correct horse", Argon2Params(memory_kib=64, iterations=1, lanes=1))
    source = env.open_db("pass-source")
    fill(source, SOURCE)
    pass_path = env.backup_path("passphrase.dfb")
    EncryptedBackupManager(source, cheap, core=env.core).create_backup(pass_path, SMALL)
    pass_blob = pass_path.read_bytes()
    pass_preamble = pass_blob[: int.from_bytes(pass_blob[12:16], "little")]
    assert len(pass_preamble) > 44
    m.refused("under a passphrase preamble (master key)", pass_preamble + stream, (EncryptionKeyError,))
    pass_manager = EncryptedBackupManager(env.db, cheap, core=env.core)
    m.refused(
        "under a passphrase preamble (passphrase)", pass_preamble + stream, (IntegrityError,), manager=pass_manager
    )
    # and the passphrase stream under the master-key preamble
    m.refused(
        "passphrase stream, master preamble", victim.blob[:44] + pass_blob[len(pass_preamble) :], (IntegrityError,)
    )
    m.check()


def test_stream_under_an_identical_preamble_is_the_same_backup(victim: Victim) -> None:
    """Not an attack: two master-key backups with the same segment size have byte-identical
    preambles, so "moving" a stream under the other's preamble gives back the very same file."""
    twin = victim.twin.read_bytes()
    assert twin[:44] == victim.blob[:44]
    moved = victim.env.backup_path("moved.dfb")
    moved.write_bytes(twin[:44] + victim.blob[44:])
    assert moved.read_bytes() == victim.blob
    assert _same_backup(victim.env.manager.verify_backup(moved), victim.env.manager.read_metadata(victim.good))


def test_valid_backup_made_with_another_master_key(victim: Victim) -> None:
    m = Matrix(victim)
    other_keys = MasterKeyPair.from_private_bytes(OTHER_SEED)
    foreign = victim.env.backup_of(SOURCE, "foreign.dfb", SMALL, keys=other_keys).read_bytes()
    m.refused("another master key", foreign, (EncryptionKeyError,))
    # and the good file read by a manager holding the other key
    wrong = victim.env.manager_for(victim.env.db, other_keys)
    m.refused("read with another master key", victim.blob, (EncryptionKeyError,), manager=wrong)
    m.check()


@pytest.mark.parametrize("version", [0, 2, 0xFFFFFFFF])
def test_preamble_version_changed(victim: Victim, version: int) -> None:
    m = Matrix(victim)
    bad = victim.blob[:8] + struct.pack("<I", version) + victim.blob[12:]
    m.refused(f"version {version}", bad, (VersionMismatchError,))
    m.check()
    victim.env.backup_path("v.dfb").write_bytes(bad)
    with pytest.raises(VersionMismatchError) as info:
        victim.env.manager.verify_backup(victim.env.backup_path("v.dfb"))
    assert (info.value.found, info.value.expected) == (version, 1)


def test_preamble_magic_changed(victim: Victim) -> None:
    m = Matrix(victim)
    for i in range(8):
        bad = bytearray(victim.blob)
        bad[i] = ord("x")
        m.refused(f"magic byte {i}", bytes(bad), (FormatError,))
    m.refused("lower-case magic", b"dfbackup" + victim.blob[8:], (FormatError,))
    m.refused("magic only", b"DFBACKUP", (FormatError,))
    m.check()


def test_list_backups_skips_every_damaged_file(victim: Victim) -> None:
    """A directory of damaged copies lists only the good backup, with one warning per other file;
    list_backups itself never raises for a file it cannot read."""
    env = victim.env
    directory = env.tmp / "mixed"
    directory.mkdir()
    (directory / "good.dfb").write_bytes(victim.blob)
    variants = {
        "empty": b"",
        "truncated": victim.blob[:-1],
        "appended": victim.blob + b"\x00",
        "flipped-first": flipped(victim.blob, 200, 3),
        "flipped-last": flipped(victim.blob, len(victim.blob) - 20, 0),
        "version": victim.blob[:8] + b"\x02\x00\x00\x00" + victim.blob[12:],
        "magic": b"XX" + victim.blob[2:],
        "key-id": flipped(victim.blob, 30, 1),
    }
    for name, blob in variants.items():
        (directory / f"{name}.dfb").write_bytes(blob)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = env.manager.list_backups(directory)
    assert [m.path for m in found] == [str(directory / "good.dfb")]
    assert len(caught) == len(variants), [str(w.message) for w in caught]


@pytest.mark.parametrize("verify_first", [True, False])
def test_aborted_restore_leaves_the_database_files_byte_identical(
    victim: Victim, verify_first: bool, request: pytest.FixtureRequest
) -> None:
    """Damage in a middle segment: with verify_before_restore=False the restore has written the
    first trees into its transaction when it meets the damage. Every byte of the database files
    must be as before."""
    path = victim.env.backup_path("damaged.dfb")
    path.write_bytes(flipped(victim.blob, victim.segment_bounds()[1][0] + 100, 0))
    before = db_file_bytes(victim.env)
    with pytest.raises(IntegrityError):
        victim.env.manager.restore_backup(
            path, RestoreOptions(overwrite_existing=True, verify_before_restore=verify_first)
        )
    after = db_file_bytes(victim.env)
    assert after.keys() == before.keys()
    changed = [name for name in before if before[name] != after[name]]
    assert not changed, f"{changed} changed after a failed restore"


# --- documented non-goals: what the format does NOT protect against ----------------------------------


def test_rollback_to_an_older_backup_is_not_detected(victim: Victim) -> None:
    """docs/SECURITY.md: a backup carries no counter or expiry; an attacker who can write the
    backup directory can replace the newest backup with an older genuine one, and it verifies and
    restores. (Compare backup_id / created_at with a record kept elsewhere to detect this.)"""
    env = victim.env
    old = env.backup_of({"users": {b"alice": b"v1"}}, "old.dfb")
    new = env.backup_of({"users": {b"alice": b"v2"}}, "new.dfb")
    new.write_bytes(old.read_bytes())  # the attacker's "rollback"
    metadata = env.manager.verify_backup(new)
    assert metadata.backup_id == env.manager.read_metadata(old).backup_id
    target = env.open_db("rolled-back")
    env.manager_for(target).restore_backup(new)
    assert target.get("users", b"alice") == b"v1"


def test_whole_trees_cannot_be_dropped_or_reordered(victim: Victim) -> None:
    """What an attacker might want instead of a rollback -- a backup with one tree left out -- needs
    the key: the trailer lists every tree, and any plaintext edit breaks authentication. Here the
    closest thing without the key: the good file with its last segment replaced by the last
    segment of a backup of fewer trees (same key and segment size)."""
    env = victim.env
    fewer = env.backup_of({k: v for k, v in SOURCE.items() if k != "metadata"}, "fewer.dfb", SMALL).read_bytes()
    m = Matrix(victim)
    head, s = victim.split()
    _, f = victim.split(fewer)
    m.refused("last segment of a backup of fewer trees", head + b"".join([*s[:-1], f[-1]]), (IntegrityError,))
    m.check()


def test_the_matrix_itself_sees_acceptance_and_changes(victim: Victim) -> None:
    """The checker is not vacuous: the undamaged file is "accepted" by every operation and its
    restore "changes the database"."""
    m = Matrix(victim)
    m.refused("the good file", victim.blob, (IntegrityError,))
    assert sum("accepted the damaged file" in f for f in m.failures) == len(OPERATIONS)
    assert sum("changed the database" in f for f in m.failures) >= 1
