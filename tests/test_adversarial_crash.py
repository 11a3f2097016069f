"""Crashes and faults: SIGKILL at several points of create_backup and restore_backup, a full disk
(RLIMIT_FSIZE), read-only / unreadable destinations and sources, directories where files belong.

tests/test_crash.py kills a large create in the middle of the stream and a restore in the middle of
the transaction (Rust core); this module kills small operations at every other step -- right after
the output is opened, during the read-back check, at fsync, between link and rename, after the
rename, during the verify pass and the safety backup before a restore, after the commit -- on both
cores and both backends. The child process signals that it reached the step and then blocks, so
the kill always lands exactly there.
"""

# The fixtures imported from helpers are pytest fixtures: test arguments "redefine" them.
# ruff: noqa: F811

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from datafold import (
    BackupError,
    BackupIOError,
    BackupOptions,
    DbOperations,
    EncryptedBackupManager,
    MasterKeyPair,
    RestoreOptions,
    StoreError,
)
from datafold.atomic import TEMP_SUFFIX
from helpers import SEED, as_snapshot, backend, db_location, fill, snapshot  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow

DATA = {
    "users": {b"alice": b"admin", b"bob": b""},
    "logs": {f"log:{i:05d}".encode(): bytes([i % 251]) * 90 for i in range(300)},
}
PRIOR = {"users": {b"alice": b"old", b"zoe": b"kept"}, "other": {b"x": b"y"}}

CHILD = r'''
import json, os, sys, time
from datafold import BackupOptions, DbOperations, EncryptedBackupManager, MasterKeyPair, RestoreOptions
from datafold.atomic import AtomicFile
from datafold.stores.lmdb import _LmdbWriteTransaction
from datafold.stores.sqlite import _SqliteWriteTransaction

op, point, backend, db_path, target, marker = sys.argv[1:7]


def hang():
    with open(marker, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)


def at_call(owner, name, n=1, after=False):
    """Hang at the n-th call of owner.name, before or after the real call."""
    original = getattr(owner, name)
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n and not after:
            hang()
        result = original(*args, **kwargs)
        if calls[0] == n and after:
            hang()
        return result

    setattr(owner, name, wrapper)


def at_item(n):
    """Hang when create_backup has read n records (it reads through a store snapshot, or through
    DbOperations.items in older versions)."""
    import datafold.stores.lmdb as lmdb_store
    import datafold.stores.sqlite as sqlite_store

    seen = [0]
    owners = [DbOperations] + [
        getattr(m, name) for m, name in ((lmdb_store, "_LmdbSnapshot"), (sqlite_store, "_SqliteSnapshot"))
        if hasattr(m, name)
    ]
    for owner in owners:
        # create_backup reads a snapshot's batches (older versions: items)
        name = "batches" if hasattr(owner, "batches") else "items"
        original = getattr(owner, name)

        def records(self, tree, prefix=b"", _original=original, _batched=name == "batches"):
            for item in _original(self, tree, prefix):
                for record in item if _batched else [item]:
                    seen[0] += 1
                    if seen[0] == n:
                        hang()
                    yield [record] if _batched else record

        setattr(owner, name, records)


def at_put(n):
    """Hang once records are written into the open transaction: after the n-th put() or the
    first put_many() (the manager may write a batch in one call)."""
    cls = {"lmdb": _LmdbWriteTransaction, "sqlite": _SqliteWriteTransaction}[backend]
    at_call(cls, "put", n, after=True)
    at_call(cls, "put_many", 1, after=True)


if point == "opened":
    at_call(AtomicFile, "__init__", after=True)
elif point == "mid-stream":
    at_item(250)  # several 4 KiB segments are on disk
elif point == "named-temp-mid-stream":
    AtomicFile._open_unnamed = lambda self: None
    at_item(250)
elif point in ("read-back", "verify"):
    at_call(EncryptedBackupManager, "_scan")
elif point == "fsync":
    at_call(os, "fsync")
elif point in ("linked-new", "safety-linked"):
    at_call(os, "link", after=True)
elif point == "linked":
    at_call(os, "replace")
elif point == "renamed":
    at_call(os, "replace", after=True)
elif point == "mid-txn":
    at_put(150)
elif point == "committed":
    at_call(EncryptedBackupManager, "_verify_restored")
else:
    raise SystemExit(f"unknown point {point}")

keys = MasterKeyPair.from_private_bytes(bytes(range(32)))
with DbOperations.open(db_path, backend) as db:
    manager = EncryptedBackupManager(db, keys)
    if op == "create":
        manager.create_backup(target, BackupOptions(segment_size=4096))
    else:
        manager.restore_backup(
            target, RestoreOptions(overwrite_existing=True, backup_before_restore=point.startswith("safety"))
        )
open(marker + ".finished", "w").close()
'''


def run_child(tmp: Path, core: str, *args: object) -> subprocess.Popen[bytes]:
    script = tmp / "child.py"
    script.write_text(CHILD)
    return subprocess.Popen(
        [sys.executable, str(script), *map(str, args)],
        env={**os.environ, "DATAFOLD_CORE": core},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def kill_at_marker(child: subprocess.Popen[bytes], marker: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    try:
        while not marker.exists():
            if child.poll() is not None:
                _, err = child.communicate()
                pytest.fail(f"the child ended (code {child.returncode}) before the kill point:\n{err.decode()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"the child did not reach the kill point within {timeout} s")
            time.sleep(0.005)
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
        child.communicate()
    assert child.returncode == -signal.SIGKILL
    assert not Path(f"{marker}.finished").exists()


def visible_backups(manager: EncryptedBackupManager, directory: Path) -> list[str]:
    """list_backups' answer; a warning (an unreadable file it would name) fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return [Path(m.path).name for m in manager.list_backups(directory)]


CREATE_POINTS = [
    *("opened", "mid-stream", "named-temp-mid-stream", "read-back", "fsync"),
    *("linked-new", "linked", "renamed"),
]
REPLACING = ("linked", "renamed")  # points met only when a file is at the destination already


@pytest.mark.parametrize(
    "point, core",
    [(p, "rust") for p in CREATE_POINTS] + [("mid-stream", "pure"), ("read-back", "pure")],
)
def test_sigkill_during_create_backup(tmp_path: Path, backend: str, point: str, core: str) -> None:
    """Nothing new at the destination until the commit point (the link of a new file, the rename
    over an older one), after which the file is complete; nothing list_backups would show but
    that; a stray named temporary file at most, which it skips."""
    db_path = db_location(tmp_path, backend)
    with DbOperations.open(db_path, backend) as db:
        fill(db, DATA)
    backups = tmp_path / "backups"
    backups.mkdir()
    destination = backups / "b.dfb"
    older = b""
    if point in REPLACING:
        with DbOperations.open(db_location(tmp_path, backend, "older"), backend) as db:
            fill(db, {"older": {b"k": b"v"}})
            EncryptedBackupManager(db, MasterKeyPair.from_private_bytes(SEED), core=core).create_backup(destination)
        older = destination.read_bytes()
    marker = tmp_path / "at-point"
    kill_at_marker(run_child(tmp_path, core, "create", point, backend, db_path, destination, marker), marker)

    names = os.listdir(backups)
    with DbOperations.open(db_path, backend) as db:
        manager = EncryptedBackupManager(db, MasterKeyPair.from_private_bytes(SEED), core=core)
        if point in ("linked-new", "renamed"):  # past the commit point: the new file is whole
            assert names == ["b.dfb"]  # and no temporary name was ever left for a crash to strand
            assert manager.verify_backup(destination).total_items == sum(map(len, DATA.values()))
            assert visible_backups(manager, backups) == ["b.dfb"]
            return
        strays = [n for n in names if n.endswith(TEMP_SUFFIX)]
        if point in REPLACING:
            assert destination.read_bytes() == older  # the older backup is untouched
            assert sorted(names) == sorted(["b.dfb", *strays]), names
            assert visible_backups(manager, backups) == ["b.dfb"]
        else:
            assert not destination.exists()
            assert names == strays, names
            assert visible_backups(manager, backups) == []
        if point in ("named-temp-mid-stream", "linked"):
            assert len(strays) == 1  # (documented: a crash there leaves one hidden *.dfb-tmp)
        else:
            assert strays == []  # the unnamed O_TMPFILE inode vanished with the process
        # and the next backup to the same path works
        manager.create_backup(destination, BackupOptions(segment_size=4096))
        assert visible_backups(manager, backups) == ["b.dfb"]


RESTORE_POINTS = [
    ("verify", "rust"),
    ("safety-linked", "rust"),
    ("mid-txn", "pure"),
    ("committed", "pure"),
]


@pytest.mark.parametrize("point, core", RESTORE_POINTS)
def test_sigkill_during_restore_backup(tmp_path: Path, backend: str, point: str, core: str) -> None:
    """Killed before the transaction commits: the database equals its pre-restore state (and no
    safety backup is visible). Killed after the commit: it equals the backup applied over it."""
    keys = MasterKeyPair.from_private_bytes(SEED)
    backups = tmp_path / "backups"
    backups.mkdir()
    backup = backups / "source.dfb"
    with DbOperations.open(db_location(tmp_path, backend, "source"), backend) as source:
        fill(source, DATA)
        EncryptedBackupManager(source, keys, core=core).create_backup(backup)
    db_path = db_location(tmp_path, backend)
    with DbOperations.open(db_path, backend) as db:
        fill(db, PRIOR)
        before = snapshot(db)
    marker = tmp_path / "at-point"
    kill_at_marker(run_child(tmp_path, core, "restore", point, backend, db_path, backup, marker), marker)

    with DbOperations.open(db_path, backend) as db:
        manager = EncryptedBackupManager(db, keys, core=core)
        after = as_snapshot({**PRIOR, **{t: {**PRIOR.get(t, {}), **items} for t, items in DATA.items()}})
        assert snapshot(db) == (after if point == "committed" else before)
        others = sorted(n for n in os.listdir(backups) if n != "source.dfb")
        if point == "safety-linked":  # killed once the safety backup is in place: it is whole
            (safety,) = others
            assert safety.startswith("source.dfb.pre-restore-") and safety.endswith(".dfb")
            manager.verify_backup(backups / safety)
            assert visible_backups(manager, backups) == sorted(["source.dfb", safety])
        else:
            assert others == []
            assert visible_backups(manager, backups) == ["source.dfb"]
        stats = manager.restore_backup(backup, RestoreOptions(overwrite_existing=True))  # no lock left behind
        assert stats.verified and snapshot(db) == after


# --- a full disk --------------------------------------------------------------------------------------

FSIZE_CHILD = r"""
import os, resource, signal, sys, json
from datafold import BackupError, BackupOptions, DbOperations, EncryptedBackupManager, MasterKeyPair, RestoreOptions

op, backend, db_path, target, limit = sys.argv[1:6]
db = DbOperations.open(db_path, backend)
manager = EncryptedBackupManager(db, MasterKeyPair.from_private_bytes(bytes(range(32))))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so that write() fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    if op == "create":
        manager.create_backup(target, BackupOptions(segment_size=4096))
    elif op == "safety":
        manager.restore_backup(target, RestoreOptions(overwrite_existing=True, backup_before_restore=True))
    else:
        manager.restore_backup(target, RestoreOptions(overwrite_existing=True))
    result = {"error": None}
except BaseException as e:
    result = {"error": type(e).__name__, "backup_error": isinstance(e, BackupError), "message": str(e)}
print(json.dumps(result))
"""

# (Found by this test: AtomicFile.discard() used to let the failing flush of close() escape as a
# bare OSError that replaced the BackupIOError; fixed in 46eee1f.)


def fsize_child(tmp: Path, core: str, *args: object) -> dict[str, object]:
    script = tmp / "fsize_child.py"
    script.write_text(FSIZE_CHILD)
    out = subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        env={**os.environ, "DATAFOLD_CORE": core},
        capture_output=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    return dict(json.loads(out.stdout.decode().strip().splitlines()[-1]))


def _fsize_params() -> list[object]:
    params = []
    for core in ("rust", "pure"):
        for limit in ("0", "100", "9000", "size-1"):
            params.append(pytest.param(core, limit, id=f"{core}-{limit}"))
    return params


@pytest.mark.parametrize("core, limit", _fsize_params())
def test_disk_full_during_create_backup(tmp_path: Path, backend: str, core: str, limit: str) -> None:
    """The destination's file system fills up after `limit` bytes (the preamble, a few segments,
    all but the last byte): BackupIOError, and no file -- partial or temporary -- is left."""
    db_path = db_location(tmp_path, backend)
    with DbOperations.open(db_path, backend) as db:
        fill(db, DATA)
        full_size = (
            EncryptedBackupManager(db, MasterKeyPair.from_private_bytes(SEED), core=core)
            .create_backup(tmp_path / "reference.dfb", BackupOptions(segment_size=4096))
            .stats.bytes_written
        )
    backups = tmp_path / "backups"
    backups.mkdir()
    n = full_size - 1 if limit == "size-1" else int(limit)
    result = fsize_child(tmp_path, core, "create", backend, db_path, backups / "b.dfb", n)
    assert result["error"] == "BackupIOError", result
    assert os.listdir(backups) == []


@pytest.mark.parametrize("core", ["rust", "pure"])
@pytest.mark.parametrize("op", ["safety", "restore"])
def test_disk_full_during_restore(tmp_path: Path, backend: str, core: str, op: str) -> None:
    """No room for the safety backup (BackupIOError) or, with RLIMIT_FSIZE, for the restored
    records (StoreError): the database is unchanged and no safety file is left. (LMDB with writemap
    writes through a map of a file already at its full map size, which RLIMIT_FSIZE does not
    limit: for it the real full file system is test_restore_onto_a_full_file_system.)"""
    if backend == "lmdb" and op == "restore" and _lmdb_writemap():
        pytest.skip("LMDB writemap: the data file is preallocated, RLIMIT_FSIZE cannot fill it")
    keys = MasterKeyPair.from_private_bytes(SEED)
    backups = tmp_path / "backups"
    backups.mkdir()
    backup = backups / "source.dfb"
    with DbOperations.open(db_location(tmp_path, backend, "source"), backend) as source:
        fill(source, {"bulk": {i.to_bytes(4, "big"): os.urandom(200) for i in range(3000)}})
        EncryptedBackupManager(source, keys, core=core).create_backup(backup)
    db_path = db_location(tmp_path, backend)
    with DbOperations.open(db_path, backend) as db:
        fill(db, PRIOR)
        before = snapshot(db)
    files = [db_path / "data.mdb"] if backend == "lmdb" else [db_path, Path(f"{db_path}-wal")]
    limit = max(f.stat().st_size for f in files if f.exists()) + 4096
    if op == "safety":
        limit = 200  # the safety backup of PRIOR's trees takes more than that
    result = fsize_child(tmp_path, core, op, backend, db_path, backup, limit)
    assert result["error"] == ("BackupIOError" if op == "safety" else "StoreError"), result
    with DbOperations.open(db_path, backend) as db:
        assert snapshot(db) == before
    assert os.listdir(backups) == ["source.dfb"]


def _lmdb_writemap() -> bool:
    """Whether the lmdb store opens a database with writemap by default (writemap is an opt-in option)."""
    with tempfile.TemporaryDirectory() as directory, DbOperations.open(Path(directory, "db"), "lmdb") as db:
        return bool(db._store._shared.env.flags()["writemap"])  # type: ignore[attr-defined]


TINYFS_CHILD = r"""
import json, os, subprocess, sys
from datafold import DbOperations

backend, db_path, backup, core = sys.argv[1:5]
# lmdb-writemap: the opt-in writemap=True, with a map small enough to fit the file system at first.
options = {"writemap": True, "map_size": 1 << 20} if backend == "lmdb-writemap" else {}
backend = backend.split("-")[0]
with DbOperations.open(db_path, backend, **options) as db:
    db.put("pre", b"x", b"y")
    before = {t: list(db.items(t)) for t in db.tree_names()}
restore = (
    "import json, sys\n"
    "from datafold import BackupError, DbOperations, EncryptedBackupManager, MasterKeyPair\n"
    "db = DbOperations.open(sys.argv[2], sys.argv[1], **json.loads(sys.argv[4]))\n"
    "try:\n"
    "    EncryptedBackupManager(db, MasterKeyPair.from_private_bytes(bytes(range(32)))).restore_backup(sys.argv[3])\n"
    "    print('ok')\n"
    "except BackupError as e:\n"
    "    print(type(e).__name__)\n"
)
out = subprocess.run([sys.executable, "-c", restore, backend, db_path, backup, json.dumps(options)],
                     capture_output=True, text=True, env={**os.environ, "DATAFOLD_CORE": core})
with DbOperations.open(db_path, backend, **options) as db:
    after = {t: list(db.items(t)) for t in db.tree_names()}
print(json.dumps({"returncode": out.returncode, "stdout": out.stdout.strip(), "stderr": out.stderr[-2000:],
                  "unchanged": after == before}))
"""

SIGBUS = (
    "BUG (regression of 46eee1f, stores/lmdb.py lmdb.open(writemap=True)): restoring into an LMDB "
    "database on a file system that runs out of space kills the process with SIGBUS (the pages of the "
    "sparse, map-sized data.mdb are written through the memory map, and a page fault that cannot get a "
    "block is a SIGBUS) instead of raising StoreError; without writemap LMDB writes with pwrite() at "
    "commit and reports ENOSPC. SQLite raises StoreError('database or disk is full')"
)


@pytest.mark.parametrize(
    "backend",
    ["lmdb", "sqlite", "lmdb-writemap"],
)
def test_restore_onto_a_full_file_system(tmp_path: Path, backend: str) -> None:
    """A real full disk: the database lives on a 2 MiB tmpfs (a private mount namespace, so
    nothing outlives the test) and the backup holds 4 MB. The restore must fail with StoreError
    and leave the database as it was. lmdb-writemap: the opt-in writemap=True with a 1 MiB map,
    where growing the map cannot be preallocated (a StoreError, not a SIGBUS)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to mount a private tmpfs")
    keys = MasterKeyPair.from_private_bytes(SEED)
    backup = tmp_path / "big.dfb"
    kind = backend.split("-")[0]
    with DbOperations.open(db_location(tmp_path, kind, "source"), kind) as source:
        fill(source, {"bulk": {i.to_bytes(4, "big"): os.urandom(1000) for i in range(4000)}})
        EncryptedBackupManager(source, keys).create_backup(backup)
    script = tmp_path / "tinyfs_child.py"
    script.write_text(TINYFS_CHILD)
    mnt = tmp_path / "tinyfs"
    mnt.mkdir()
    db_path = db_location(mnt, kind)
    shell = (
        f"mount -t tmpfs -o size=2m tmpfs {mnt} || exit 77; {sys.executable} {script} {backend} {db_path} {backup} rust"
    )
    out = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", shell],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if out.returncode == 77 or "unshare failed" in out.stderr or "Operation not permitted" in out.stderr:
        pytest.skip(f"cannot mount a private tmpfs here: {out.stderr.strip()[-300:]}")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["returncode"] == 0, f"the restoring process died: {result}"
    assert result["stdout"] == "StoreError", result
    assert result["unchanged"], result


# --- read-only and unreadable places ------------------------------------------------------------------

NOBODY = 65534


def _as_unprivileged(scenario: str, base: Path) -> dict[str, list[object]]:
    """Runs _SCENARIOS[scenario] in a forked child that dropped root (setuid nobody), so that
    file permissions apply; without root, in this process. Returns {check: [error class, message]}."""
    if os.geteuid() != 0:
        return _run_scenario(scenario, base)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            out = _run_scenario(scenario, base)
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            out = {"__child__": [type(e).__name__, str(e)]}
            code = 1
        os.write(w, json.dumps(out).encode())
        os.close(w)
        os._exit(code)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    result = json.loads(b"".join(chunks).decode() or "{}")
    if "__child__" in result:
        if result["__child__"][0] == "PermissionError":
            pytest.skip(f"running as root and cannot drop privileges to test permissions: {result['__child__']}")
        pytest.fail(f"unprivileged child failed: {result['__child__']}")
    return result


def _outcome(fn: object) -> list[object]:
    try:
        fn()  # type: ignore[operator]
    except Exception as e:  # noqa: BLE001 - reported
        return [type(e).__name__, str(e), isinstance(e, BackupError)]
    return ["ok", "", False]


def _run_scenario(scenario: str, base: Path) -> dict[str, list[object]]:
    keys = MasterKeyPair.from_private_bytes(SEED)
    core, backend = scenario.split("/")
    out: dict[str, list[object]] = {}
    with DbOperations.open(db_location(base / "work", backend), backend) as db:
        fill(db, PRIOR)
        before = snapshot(db)
        m = EncryptedBackupManager(db, keys, core=core)
        out["create into a read-only directory"] = _outcome(lambda: m.create_backup(base / "ro" / "b.dfb"))
        out["restore an unreadable backup"] = _outcome(lambda: m.restore_backup(base / "secret.dfb"))
        out["verify an unreadable backup"] = _outcome(lambda: m.verify_backup(base / "secret.dfb"))
        out["list an unreadable directory"] = _outcome(lambda: m.list_backups(base / "locked"))
        out["safety backup into a read-only directory"] = _outcome(
            lambda: m.restore_backup(
                base / "good.dfb",
                RestoreOptions(
                    overwrite_existing=True, backup_before_restore=True, safety_backup_path=str(base / "ro" / "s.dfb")
                ),
            )
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            listed = [Path(x.path).name for x in m.list_backups(base)]
        out["list skips the unreadable backup"] = [listed, [str(c.message) for c in caught], True]
        out["database unchanged"] = [snapshot(db) == before, "", True]
        out["read-only directory empty"] = [os.listdir(base / "ro"), "", True]
    return out


@pytest.fixture
def permission_base(backend: str) -> Iterator[Path]:
    """A tree under /tmp that an unprivileged user can reach (pytest's tmp_path is root-only)."""
    base = Path(tempfile.mkdtemp(prefix="datafold-perm-"))
    try:
        base.chmod(0o755)
        (base / "work").mkdir(mode=0o777)
        (base / "work").chmod(0o777)
        (base / "ro").mkdir()
        (base / "ro").chmod(0o555)
        (base / "locked").mkdir()
        (base / "locked").chmod(0o000)
        with DbOperations.open(db_location(base, backend, "source"), backend) as source:
            fill(source, DATA)
            manager = EncryptedBackupManager(source, MasterKeyPair.from_private_bytes(SEED))
            manager.create_backup(base / "good.dfb")
            manager.create_backup(base / "secret.dfb")
        shutil.rmtree(db_location(base, backend, "source")) if backend == "lmdb" else None
        for leftover in base.glob("source.sqlite*"):
            leftover.unlink()
        (base / "good.dfb").chmod(0o644)
        (base / "secret.dfb").chmod(0o000)
        yield base
    finally:
        for p in (base / "ro", base / "locked"):
            p.chmod(0o755)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("core", ["rust", "pure"])
def test_read_only_and_unreadable_places(permission_base: Path, backend: str, core: str) -> None:
    """As an unprivileged user (root drops to nobody in a forked child, since root ignores file
    modes): a read-only destination, an unreadable backup and an unreadable directory each give a
    BackupIOError naming the path; list_backups skips an unreadable file with a warning; the
    database is untouched and nothing appears in the read-only directory."""
    out = _as_unprivileged(f"{core}/{backend}", permission_base)
    for check in (
        "create into a read-only directory",
        "restore an unreadable backup",
        "verify an unreadable backup",
        "list an unreadable directory",
        "safety backup into a read-only directory",
    ):
        error, message, _ = out[check]
        assert error == "BackupIOError", (check, error, message)
        assert "Permission denied" in str(message) or "permission" in str(message).lower(), (check, message)
    listed, caught, _ = out["list skips the unreadable backup"]
    assert listed == ["good.dfb"], listed
    assert any("secret.dfb" in str(c) for c in caught), caught  # type: ignore[union-attr]
    assert out["database unchanged"][0] is True
    assert out["read-only directory empty"][0] == []


def test_root_ignores_directory_modes_so_permission_tests_drop_privileges(tmp_path: Path) -> None:
    """Why test_read_only_and_unreadable_places forks and setuid()s under root: a 0o555 directory
    does not stop root from writing. (Skipped for non-root users, where the modes apply directly.)"""
    if os.geteuid() != 0:
        pytest.skip("not root: file modes apply to this user directly")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    (ro / "f").write_bytes(b"root writes anyway")
    assert stat.S_IMODE(ro.stat().st_mode) == 0o555 and (ro / "f").exists()


# --- directories where files belong -------------------------------------------------------------------


@pytest.fixture
def small(tmp_path: Path, backend: str) -> Iterator[tuple[DbOperations, EncryptedBackupManager, Path]]:
    with DbOperations.open(db_location(tmp_path, backend), backend) as db:
        fill(db, PRIOR)
        m = EncryptedBackupManager(db, MasterKeyPair.from_private_bytes(SEED))
        backups = tmp_path / "backups"
        backups.mkdir()
        m.create_backup(backups / "good.dfb")
        yield db, m, backups


def test_directories_where_files_belong(small: tuple[DbOperations, EncryptedBackupManager, Path]) -> None:
    db, m, backups = small
    before = snapshot(db)
    (backups / "dir.dfb").mkdir()
    (backups / "dir.dfb" / "inner.dfb").write_bytes((backups / "good.dfb").read_bytes())
    cases = {
        "create onto a directory": lambda: m.create_backup(backups / "dir.dfb"),
        "restore a directory": lambda: m.restore_backup(backups / "dir.dfb"),
        "verify a directory": lambda: m.verify_backup(backups / "dir.dfb"),
        "read_metadata of a directory": lambda: m.read_metadata(backups / "dir.dfb"),
        "safety backup onto a directory": lambda: m.restore_backup(
            backups / "good.dfb",
            RestoreOptions(backup_before_restore=True, safety_backup_path=str(backups / "dir.dfb")),
        ),
        "list a file as a directory": lambda: m.list_backups(backups / "good.dfb"),
    }
    for label, call in cases.items():
        with pytest.raises(BackupError) as info:
            call()
        assert isinstance(info.value, (BackupIOError, StoreError, OSError)), (label, repr(info.value))
    assert snapshot(db) == before
    assert sorted(os.listdir(backups)) == ["dir.dfb", "good.dfb"]
    assert os.listdir(backups / "dir.dfb") == ["inner.dfb"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a subdirectory is skipped silently, not read
        assert [Path(x.path).name for x in m.list_backups(backups)] == ["good.dfb"]


def test_create_with_a_trailing_slash_is_refused(small: tuple[DbOperations, EncryptedBackupManager, Path]) -> None:
    """(Found by this suite: 'dir/new/' used to write a regular file 'dir/new'; fixed in 46eee1f.)"""
    _, m, backups = small
    with pytest.raises(BackupIOError):
        m.create_backup(str(backups / "new") + "/")
    assert sorted(os.listdir(backups)) == ["good.dfb"]
