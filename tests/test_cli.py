"""End-to-end tests of the command line: the installed console script `datafold-backup` run in a
subprocess on real files, over LMDB and SQLite, every command and every documented exit code.

Exit codes (README "Command line"): 0 ok, 1 usage, 2 damaged backup, 3 key problem, 4 I/O or store,
5 a restore with --continue-on-errors that left records out.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from datafold import DbOperations, MasterKeyPair
from helpers import db_location, fill, sample_data, snapshot

PASSPHRASE = "correct horse battery staple"
EXIT_OK, EXIT_USAGE, EXIT_BACKUP, EXIT_KEY, EXIT_IO, EXIT_PARTIAL = 0, 1, 2, 3, 4, 5


def _cli() -> list[str]:
    """The installed console script; `python -m datafold` only if it is not installed."""
    beside = Path(sys.executable).with_name("datafold-backup")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("datafold-backup")
    return [found] if found else [sys.executable, "-m", "datafold"]


CLI = _cli()


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out.splitlines() if line.strip()]

    def summary(self) -> dict[str, Any]:
        (summary,) = [e for e in self.json_lines() if e["type"] == "summary"]
        return summary


def run(*args: str | os.PathLike[str], cwd: Path | None = None, **env: str) -> Result:
    environ = {k: v for k, v in os.environ.items() if k != "DATAFOLD_PASSPHRASE"}
    environ.update(env)
    proc = subprocess.run(
        [*CLI, *map(str, args)],
        cwd=cwd,
        env=environ,
        stdin=subprocess.DEVNULL,  # not a terminal: nothing is prompted for
        capture_output=True,
        text=True,
        timeout=120,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def expect(result: Result, code: int, *in_stderr: str) -> Result:
    assert result.code == code, f"exit {result.code}, expected {code}\nstdout:\n{result.out}\nstderr:\n{result.err}"
    for text in in_stderr:
        assert text in result.err, f"{text!r} not in stderr:\n{result.err}"
    if code == EXIT_PARTIAL:
        assert "Traceback" not in result.err, result.err
        assert result.err.startswith("datafold-backup: warning: not restored:"), result.err
    elif code != EXIT_OK:
        assert "Traceback" not in result.err, result.err
        assert result.err.startswith("usage:") or result.err.startswith("datafold-backup: error:"), result.err
    return result


@dataclass
class Setup:
    tmp: Path
    backend: str
    db: Path  # a database holding sample_data()
    key: Path  # a master key file
    pass_file: Path  # PASSPHRASE plus a newline
    backup: Path  # backup of db made with key
    pass_backup: Path  # backup of db made with the passphrase
    data: dict[str, dict[bytes, bytes]]

    def new_db(self, name: str) -> Path:
        return db_location(self.tmp, self.backend, name)

    def read_db(self, path: Path) -> dict[str, list[tuple[bytes, bytes]]]:
        with DbOperations.open(path, self.backend) as db:
            return snapshot(db)


@pytest.fixture(scope="module", params=["lmdb", "sqlite"])
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    backend = str(request.param)
    tmp = tmp_path_factory.mktemp(f"cli-{backend}")
    data = sample_data()
    db = db_location(tmp, backend, "source")
    with DbOperations.open(db, backend) as handle:
        fill(handle, data)
    key, pass_file = tmp / "master.pem", tmp / "pass.txt"
    pass_file.write_text(PASSPHRASE + "\n")
    expect(run("keygen", "--out", key), EXIT_OK)
    backup, pass_backup = tmp / "master.dfb", tmp / "pass.dfb"
    expect(run("create", db, backup, "--key", key), EXIT_OK)
    expect(run("create", db, pass_backup, "--passphrase-file", pass_file), EXIT_OK)
    yield Setup(tmp, backend, db, key, pass_file, backup, pass_backup, data)


def expected(data: dict[str, dict[bytes, bytes]]) -> dict[str, list[tuple[bytes, bytes]]]:
    return {tree: sorted(items.items()) for tree, items in sorted(data.items())}


# --------------------------------------------------------------------------- help and usage


@pytest.mark.parametrize("command", ["", "keygen", "create", "restore", "verify", "inspect", "list", "demo"])
def test_help_of_every_command_has_an_example(command: str) -> None:
    r = expect(run(*([command] if command else []), "--help"), EXIT_OK)
    assert "usage: datafold-backup" in r.out
    assert "example" in r.out and "datafold-backup " in r.out.split("example", 1)[1]
    assert "exit codes" in r.out


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["frobnicate"],
        ["create"],
        ["restore", "only-one-argument"],
        ["create", "db", "b.dfb", "--compression", "abc"],
        ["demo", "--records", "0"],
        ["demo", "--records", "many"],
        ["create", "db", "b.dfb", "--db-backend", "berkeley"],
        ["verify", "b.dfb", "--no-such-option"],
        ["keygen"],
    ],
    ids=lambda a: " ".join(a) or "nothing",
)
def test_argument_errors_exit_1_with_usage(args: list[str], tmp_path: Path) -> None:
    r = expect(run(*args, cwd=tmp_path), EXIT_USAGE, "datafold-backup")
    assert "usage:" in r.err
    assert "error:" in r.err


def test_version() -> None:
    assert "datafold" in expect(run("--version"), EXIT_OK).out


# --------------------------------------------------------------------------- keygen


def test_keygen_writes_a_0600_pkcs8_key_and_refuses_to_overwrite(tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    r = expect(run("keygen", "--out", key, "--json"), EXIT_OK)
    summary = r.summary()
    assert summary["command"] == "keygen" and summary["protected"] is False
    pem = key.read_bytes()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    keys = MasterKeyPair.from_pem(pem)
    assert keys.public_key_bytes().hex() == summary["public_key"]

    expect(run("keygen", "--out", key), EXIT_USAGE, "already exists", "--force")
    assert key.read_bytes() == pem  # untouched
    expect(run("keygen", "--out", key, "--force", "-q"), EXIT_OK)
    assert key.read_bytes() != pem
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_keygen_force_replaces_a_symlink_itself_not_its_target(tmp_path: Path) -> None:
    """A link planted where a key is written (say in a shared /tmp) cannot redirect the key."""
    target = tmp_path / "victim"
    target.write_text("not a key")
    link = tmp_path / "k.pem"
    link.symlink_to(target)
    expect(run("keygen", "--out", link), EXIT_USAGE, "already exists")
    expect(run("keygen", "--out", link, "--force", "-q"), EXIT_OK)
    assert not link.is_symlink() and link.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert target.read_text() == "not a key"


def test_keygen_unwritable_destination_exits_4(tmp_path: Path) -> None:
    expect(run("keygen", "--out", tmp_path / "missing-dir" / "k.pem"), EXIT_IO, "cannot write key file")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    expect(run("keygen", "--out", blocker / "k.pem", "--force"), EXIT_IO, "k.pem")


KEYGEN_KILLED = """
import os, sys, time
from datafold import atomic, cli
marker, point, unnamed = sys.argv[1], sys.argv[2], sys.argv[3] == "unnamed"
if not unnamed:  # as where O_TMPFILE is not supported
    atomic.AtomicFile._open_unnamed = lambda self: None

def hang(*args, **kwargs):
    open(marker, "w").close()
    time.sleep(60)

if point == "written":  # the key written out (not yet synced or named), then killed
    def commit(self, **kwargs):
        self.file.flush()
        hang()
    atomic.AtomicFile.commit = commit
else:
    os.fsync = hang
cli.main(sys.argv[4:])
"""


@pytest.mark.parametrize("point", ["written", "fsync"])
@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("unnamed", [True, False])
def test_keygen_killed_midway_leaves_no_key_file_or_the_old_one(
    tmp_path: Path, point: str, force: bool, unnamed: bool
) -> None:
    """A key file appears whole or not at all (a lost key loses every backup made with it): killed
    once the key is written or while it is synced, keygen leaves nothing at the path (or the old
    key, with --force). With O_TMPFILE nothing else is left either; without it, the hidden
    temporary file (mode 0600) stays, as documented."""
    keys = tmp_path / "keys"
    keys.mkdir()
    key = keys / "k.pem"
    if force:
        expect(run("keygen", "--out", key, "-q"), EXIT_OK)
    before = sorted((p.name, p.read_bytes()) for p in keys.iterdir())
    script, marker = tmp_path / "child.py", tmp_path / "marker"
    script.write_text(KEYGEN_KILLED)
    args = [str(marker), point, "unnamed" if unnamed else "named", "keygen", "--out", str(key)]
    child = subprocess.Popen(
        [sys.executable, str(script), *args, *(["--force"] if force else [])], stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 60
    while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    child.kill()
    err = child.communicate()[1].decode()
    assert marker.exists(), f"the child did not reach the kill point:\n{err[-2000:]}"
    left = [p for p in keys.iterdir() if not (p.name.startswith(".") and p.name.endswith(".dfb-tmp"))]
    assert sorted((p.name, p.read_bytes()) for p in left) == before
    strays = [p for p in keys.iterdir() if p not in left]
    assert len(strays) == (0 if unnamed else 1)
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in strays)


@pytest.mark.parametrize("setup", ["lmdb"], indirect=True)  # backend-independent
def test_protected_key_file(setup: Setup) -> None:
    key = setup.tmp / "protected.pem"
    expect(run("keygen", "--out", key, "--protect"), EXIT_KEY, "--protect needs a passphrase")
    assert not key.exists()
    expect(run("keygen", "--out", key, "--protect", "--passphrase-file", setup.pass_file), EXIT_OK)
    assert key.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert PASSPHRASE.encode() not in key.read_bytes()

    backup = setup.tmp / "protected.dfb"
    expect(run("create", setup.db, backup, "--key", key), EXIT_KEY, "protected by a passphrase")
    wrong = setup.tmp / "wrong.txt"
    wrong.write_text("not it\n")
    expect(run("create", setup.db, backup, "--key", key, "--passphrase-file", wrong), EXIT_KEY, "wrong passphrase")
    expect(run("create", setup.db, backup, "--key", key, DATAFOLD_PASSPHRASE=PASSPHRASE), EXIT_OK)
    inspect = expect(run("inspect", backup, "--json"), EXIT_OK).summary()
    assert inspect["key"] == "master-key"  # the backup itself is keyed by the master key
    expect(run("verify", backup, "--key", key, "--passphrase-file", setup.pass_file), EXIT_OK)


# --------------------------------------------------------------------------- round trips


def test_master_key_roundtrip(setup: Setup) -> None:
    r = expect(run("verify", setup.backup, "--key", setup.key), EXIT_OK)
    assert "is intact" in r.out and f"{sum(map(len, setup.data.values()))} items" in r.out.replace(",", "")
    target = setup.new_db("restored-master")
    r = expect(run("restore", setup.backup, target, "--key", setup.key, "--json"), EXIT_OK)
    summary = r.summary()
    assert summary["verified"] is True and summary["backend"] == setup.backend
    assert summary["items_restored"] == sum(map(len, setup.data.values()))
    assert setup.read_db(target) == expected(setup.data)


@pytest.mark.parametrize("core", ["rust", "pure"])
def test_passphrase_roundtrip(setup: Setup, core: str) -> None:
    backup = setup.tmp / f"pass-{core}.dfb"
    r = expect(run("create", setup.db, backup, "--json", DATAFOLD_PASSPHRASE=PASSPHRASE, DATAFOLD_CORE=core), 0)
    assert r.summary()["key"] == "passphrase"
    assert PASSPHRASE.encode() not in backup.read_bytes()
    # The passphrase file's one trailing newline is not part of the passphrase.
    expect(run("verify", backup, "--passphrase-file", setup.pass_file, DATAFOLD_CORE=core), EXIT_OK)
    target = setup.new_db(f"restored-pass-{core}")
    expect(run("restore", backup, target, DATAFOLD_PASSPHRASE=PASSPHRASE, DATAFOLD_CORE=core), EXIT_OK)
    assert setup.read_db(target) == expected(setup.data)
    two_newlines = setup.tmp / "two-newlines.txt"
    two_newlines.write_text(PASSPHRASE + "\n\n")
    expect(run("verify", backup, "--passphrase-file", two_newlines), EXIT_KEY, "wrong passphrase")


def test_inspect_shows_the_key_kind_without_a_key(setup: Setup) -> None:
    r = expect(run("inspect", setup.pass_backup), EXIT_OK)
    assert "passphrase" in r.out and "Argon2id" in r.out and "encrypted" in r.out
    doc = expect(run("inspect", setup.pass_backup, "--json"), EXIT_OK).summary()
    assert doc["key"] == "passphrase" and doc["unlocked"] is False
    assert doc["kdf"] == {"name": "argon2id", "memory_kib": 65536, "iterations": 3, "lanes": 4, "salt_length": 16}
    doc = expect(run("inspect", setup.backup, "--json"), EXIT_OK).summary()
    assert doc["key"] == "master-key" and doc["kdf"] is None and doc["unlocked"] is False
    r = expect(run("inspect", setup.backup), EXIT_OK)
    assert "master key file" in r.out


def test_inspect_with_the_key_shows_trees_items_sizes_digests_chain(setup: Setup) -> None:
    r = expect(run("inspect", setup.backup, "--key", setup.key), EXIT_OK)
    for tree in setup.data:
        assert tree in r.out
    for word in ("TREE", "ITEMS", "BYTES", "DIGEST", "chain", "no parent", "backup id", "total"):
        assert word in r.out
    doc = expect(run("inspect", setup.pass_backup, "--json", DATAFOLD_PASSPHRASE=PASSPHRASE), EXIT_OK).summary()
    assert doc["unlocked"] is True and doc["parent_backup_id"] is None and doc["mode"] == "full"
    trees = {t["name"]: t for t in doc["trees"]}
    assert set(trees) == set(setup.data)
    assert trees["users"]["items"] == len(setup.data["users"])
    assert all(len(t["digest"]) == 64 for t in trees.values())
    assert doc["items"] == sum(map(len, setup.data.values()))


def test_create_options(setup: Setup) -> None:
    out = setup.tmp / "filtered.dfb"
    expect(run("create", setup.db, out, "--key", setup.key, "--tree", "logs", "--tree", "users", "--prefix", "log:"), 0)
    doc = expect(run("inspect", out, "--key", setup.key, "--json"), EXIT_OK).summary()
    trees = {t["name"]: t["items"] for t in doc["trees"]}
    assert trees == {"logs": 400, "users": 0}
    expect(run("create", setup.db, out, "--key", setup.key, "--no-metadata", "--no-verify", "-q"), EXIT_OK)
    doc = expect(run("inspect", out, "--key", setup.key, "--json"), EXIT_OK).summary()
    assert {t["name"] for t in doc["trees"]} == {"users", "binary", "logs", "empty"}


def test_create_compressed_inspect_and_restore(setup: Setup) -> None:
    out = setup.tmp / "zstd.dfb"
    expect(run("create", setup.db, out, "--key", setup.key, "--compression-level", "3", "-q"), EXIT_OK)
    doc = expect(run("inspect", out, "--key", setup.key, "--json"), EXIT_OK).summary()
    assert doc["compression"] == "zstd-3" and doc["options"]["compression_level"] == 3
    assert "zstd-3" in expect(run("inspect", out, "--key", setup.key), EXIT_OK).out
    target = setup.new_db("from-zstd")
    expect(run("restore", out, target, "--key", setup.key, "--db-backend", setup.backend, "-q"), EXIT_OK)
    assert setup.read_db(target) == setup.read_db(setup.db)


@pytest.mark.parametrize("setup", ["lmdb"], indirect=True)
def test_restore_refuses_a_directory_of_other_files(setup: Setup) -> None:
    """`restore BACKUP .` in a home directory must not put data.mdb and lock.mdb among its files;
    a new or empty directory becomes an LMDB database, and the cwd works once it is one."""
    home = setup.tmp / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    expect(run("restore", setup.backup, ".", "--key", setup.key, cwd=home), EXIT_USAGE, "no data.mdb", "empty")
    assert sorted(p.name for p in home.iterdir()) == ["notes.txt"]
    empty = setup.tmp / "empty-dir"
    empty.mkdir()
    expect(run("restore", setup.backup, ".", "--key", setup.key, "-q", cwd=empty), EXIT_OK)
    assert setup.read_db(empty) == setup.read_db(setup.db)
    (empty / "README").write_text("an LMDB database may hold other files too")
    expect(run("restore", setup.backup, ".", "--key", setup.key, "--overwrite", "-q", cwd=empty), EXIT_OK)


def test_restore_options(setup: Setup) -> None:
    target = setup.new_db("restore-options")
    with DbOperations.open(target, setup.backend) as db:
        db.put("users", b"alice", b"changed")
    expect(run("restore", setup.backup, target, "--key", setup.key, "--tree", "users", "--prefix", "a"), EXIT_OK)
    assert setup.read_db(target) == {"users": [(b"alice", b"changed")]}  # kept without --overwrite
    r = expect(
        run(
            "restore",
            setup.backup,
            target,
            "--key",
            setup.key,
            "--overwrite",
            "--safety-backup",
            "--no-verify",
            "--continue-on-errors",
            "--json",
        ),
        EXIT_OK,
    )
    summary = r.summary()
    assert summary["errors"] == [] and summary["verified"] is True
    assert Path(summary["safety_backup"]).is_file()
    assert setup.read_db(target) == expected(setup.data)
    # The safety backup gives back the state before the restore.
    expect(run("restore", summary["safety_backup"], target, "--key", setup.key, "--overwrite", "-q"), EXIT_OK)
    assert setup.read_db(target) == {"users": [(b"alice", b"changed")], **{t: [] for t in setup.data if t != "users"}}


def test_restore_that_leaves_records_out_exits_5(tmp_path: Path) -> None:
    """--continue-on-errors restores what the store takes and names the rest, but the exit code
    says the restore has holes (scripts must not take it for a whole one); without it, nothing
    is written and the exit code is 4."""
    source = tmp_path / "source.sqlite"
    with DbOperations.open(source, "sqlite") as db:  # SQLite takes keys LMDB cannot hold
        db.put("t", b"k" * 600, b"too long a key for LMDB")
        db.put("t", b"ok", b"1")
        db.put("u", b"fine", b"2")
    key, backup = tmp_path / "master.pem", tmp_path / "mixed.dfb"
    expect(run("keygen", "--out", key), EXIT_OK)
    expect(run("create", source, backup, "--key", key, "-q"), EXIT_OK)

    target = tmp_path / "target-lmdb"
    r = expect(
        run("restore", backup, target, "--key", key, "--db-backend", "lmdb", "-q"),
        EXIT_IO,
        "restoring tree 't': key is 600 bytes; LMDB keys are at most 511 bytes",
        "hint: LMDB cannot hold that record: restore into an SQLite database",
    )
    assert "check the database path" not in r.err
    r = expect(
        run("restore", backup, target, "--key", key, "--db-backend", "lmdb", "--continue-on-errors", "--json"),
        EXIT_PARTIAL,
        "1 record of the backup not restored",
    )
    (error,) = r.summary()["errors"]
    assert "'t'" in error and ("6b" * 64) in error and "511 bytes" in error
    assert error in r.err
    # A tree name LMDB cannot hold stops the restore even with --continue-on-errors (it is no
    # record); the hint says how to leave that tree out instead.
    with DbOperations.open(source, "sqlite") as db:
        db.put("n" * 600, b"k", b"v")
    expect(run("create", source, backup, "--key", key, "-q"), EXIT_OK)
    r = expect(
        run("restore", backup, tmp_path / "t2-lmdb", "--key", key, "--db-backend", "lmdb", "--continue-on-errors"),
        EXIT_IO,
        "tree name is 600 bytes",
        "hint: LMDB cannot hold that tree name",
        "--tree",
    )
    assert "add --continue-on-errors" not in r.err
    with DbOperations.open(target, "lmdb") as db:
        assert snapshot(db) == {"t": [(b"ok", b"1")], "u": [(b"fine", b"2")]}


def test_a_locked_sqlite_database_is_named_as_locked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Another process holding SQLite's write lock: exit 4 with a hint to wait, not to check the
    path. In this process (main()), with the store's 30 s wait cut short."""
    import sqlite3

    import datafold.stores.sqlite
    from datafold.cli import main

    db, key, backup = tmp_path / "db.sqlite", tmp_path / "master.pem", tmp_path / "b.dfb"
    with DbOperations.open(db, "sqlite") as handle:
        handle.put("t", b"k", b"v")
    expect(run("keygen", "--out", key), EXIT_OK)
    expect(run("create", db, backup, "--key", key, "-q"), EXIT_OK)
    other = sqlite3.connect(db, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        monkeypatch.setattr(datafold.stores.sqlite, "DEFAULT_TIMEOUT", 0.1)
        capsys.readouterr()
        code = main(["restore", str(backup), str(db), "--key", str(key), "--overwrite", "-q"])
        err = capsys.readouterr().err
        expect(Result(code, "", err), EXIT_IO, "another connection holds a lock", "hint: wait until the other process")
        assert "check the database path" not in err
    finally:
        other.close()


def test_an_interrupt_after_the_commit_says_the_restore_was_applied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from datafold.cli import main
    from datafold.manager import EncryptedBackupManager

    if not hasattr(BaseException, "add_note"):
        pytest.skip("exception notes are Python >= 3.11")
    db, key, backup = tmp_path / "db.sqlite", tmp_path / "master.pem", tmp_path / "b.dfb"
    with DbOperations.open(db, "sqlite") as handle:
        handle.put("t", b"k", b"v")
    expect(run("keygen", "--out", key), EXIT_OK)
    expect(run("create", db, backup, "--key", key, "-q"), EXIT_OK)

    def interrupted(*args: object, **kwargs: object) -> None:
        e = KeyboardInterrupt()
        e.add_note("datafold: the restore was already committed when this was raised")
        raise e

    monkeypatch.setattr(EncryptedBackupManager, "restore_backup", interrupted)
    capsys.readouterr()
    assert main(["restore", str(backup), str(tmp_path / "t.sqlite"), "--key", str(key), "-q"]) == 130
    assert "interrupted: the restore was already committed" in capsys.readouterr().err


def test_create_no_direct_reads(setup: Setup) -> None:
    out = setup.tmp / f"no-direct-{setup.backend}.dfb"
    args = ("create", setup.db, out, "--key", setup.key, "--no-direct-reads", "-q")
    if setup.backend != "lmdb":
        expect(run(*args), EXIT_USAGE, "LMDB option")
        assert not out.exists()
        return
    expect(run(*args), EXIT_OK)

    # The same records either way: the same digests as the fixture's backup made with direct reads.
    def trees(backup: Path) -> object:
        return expect(run("inspect", backup, "--key", setup.key, "--json"), EXIT_OK).summary()["trees"]

    assert trees(out) == trees(setup.backup)


def test_restore_writemap(setup: Setup) -> None:
    target = setup.new_db("restore-writemap")
    if setup.backend != "lmdb":
        expect(run("restore", setup.backup, target, "--key", setup.key, "--writemap"), EXIT_USAGE, "LMDB option")
        assert not target.exists()
        return
    expect(run("restore", setup.backup, target, "--key", setup.key, "--writemap", "-q"), EXIT_OK)
    assert setup.read_db(target) == expected(setup.data)
    # MDB_WRITEMAP sized the data file to the map, and the store preallocated it (not sparse)
    data = (target / "data.mdb").stat()
    assert data.st_blocks * 512 >= data.st_size


def test_restore_no_native(setup: Setup) -> None:
    target = setup.new_db("restore-no-native")
    if setup.backend != "lmdb":
        expect(run("restore", setup.backup, target, "--key", setup.key, "--no-native"), EXIT_USAGE, "LMDB option")
        assert not target.exists()
        return
    expect(run("restore", setup.backup, target, "--key", setup.key, "--no-native", "-q"), EXIT_OK)
    assert setup.read_db(target) == expected(setup.data)


def test_list(setup: Setup) -> None:
    directory = setup.tmp / f"listing-{setup.backend}"
    directory.mkdir()
    shutil.copy(setup.backup, directory / "a.dfb")
    shutil.copy(setup.pass_backup, directory / "b.dfb")
    (directory / "notes.txt").write_text("not a backup")
    r = expect(run("list", directory, "--key", setup.key), EXIT_OK)
    assert "a.dfb" in r.out and "b.dfb" not in r.out
    assert "skipped" in r.err and "b.dfb" in r.err and "notes.txt" in r.err
    doc = expect(run("list", directory, "--json", DATAFOLD_PASSPHRASE=PASSPHRASE), EXIT_OK).summary()
    assert [Path(b["path"]).name for b in doc["backups"]] == ["b.dfb"]
    assert {Path(s["path"]).name for s in doc["skipped"]} == {"a.dfb", "notes.txt"}
    expect(run("list", setup.tmp / "no-such-dir", "--key", setup.key), EXIT_IO, "does not exist")


def test_list_and_inspect_quote_names_a_terminal_would_act_on(setup: Setup) -> None:
    # A name from the directory or the backup holding a newline or an escape sequence must not
    # break the table or reach the terminal raw; a byte that is not UTF-8 shows as \\xNN.
    directory = setup.tmp / f"odd-names-{setup.backend}"
    directory.mkdir()
    for name in ("new\nline.dfb", "esc\x1b[31mred.dfb", "plain.dfb"):
        shutil.copy(setup.backup, directory / name)
    shutil.copy(setup.backup, os.fsencode(directory) + b"/\xff.dfb")
    (directory / "bad\nnote.txt").write_text("not a backup")
    r = expect(run("list", directory, "--key", setup.key), EXIT_OK)
    assert "\x1b" not in r.out and "\x1b" not in r.err
    lines = r.out.splitlines()
    assert len(lines) == 5  # the header and one line per backup
    files = sorted(line.split("  ")[-1] for line in lines[1:])
    assert files == ["'\\xff.dfb'", "'esc\\x1b[31mred.dfb'", "'new\\nline.dfb'", "plain.dfb"]
    assert "skipped '" in r.err and "bad\\nnote.txt'" in r.err
    # JSON keeps the names themselves (a non-UTF-8 byte as os.fsdecode gives it).
    doc = expect(run("list", directory, "--key", setup.key, "--json"), EXIT_OK).summary()
    assert sorted(Path(b["path"]).name for b in doc["backups"]) == sorted(
        ["new\nline.dfb", "esc\x1b[31mred.dfb", "plain.dfb", "\udcff.dfb"]
    )

    db = setup.new_db("odd-trees")
    with DbOperations.open(db, setup.backend) as handle:
        handle.put("line\nbreak", b"k", b"v")
        handle.put("esc\x1b[2J", b"k", b"v")
    backup = setup.tmp / f"odd-trees-{setup.backend}.dfb"
    expect(run("create", db, backup, "--key", setup.key, "-q"), EXIT_OK)
    r = expect(run("inspect", backup, "--key", setup.key), EXIT_OK)
    assert "\x1b" not in r.out
    assert "'line\\nbreak'" in r.out and "'esc\\x1b[2J'" in r.out
    doc = expect(run("inspect", backup, "--key", setup.key, "--json"), EXIT_OK).summary()
    assert {t["name"] for t in doc["trees"]} == {"line\nbreak", "esc\x1b[2J"}


# --------------------------------------------------------------------------- errors


def test_wrong_key_exits_3(setup: Setup) -> None:
    other = setup.tmp / "other.pem"
    if not other.exists():
        expect(run("keygen", "--out", other), EXIT_OK)
    expect(run("verify", setup.backup, "--key", other), EXIT_KEY, "different key", "--key KEYFILE")
    target = setup.new_db("never-created")
    expect(run("restore", setup.backup, target, "--key", other), EXIT_KEY, "different key")
    assert not target.exists()  # checked before the database is opened
    expect(run("verify", setup.pass_backup, DATAFOLD_PASSPHRASE="wrong"), EXIT_KEY, "wrong passphrase")
    expect(run("inspect", setup.pass_backup, "--passphrase-file", other), EXIT_KEY, "wrong passphrase")


def test_the_other_kind_of_key_exits_3_and_says_which_is_needed(setup: Setup) -> None:
    expect(run("verify", setup.pass_backup, "--key", setup.key), EXIT_KEY, "protected by a passphrase")
    expect(
        run("restore", setup.backup, setup.new_db("x"), DATAFOLD_PASSPHRASE=PASSPHRASE),
        EXIT_KEY,
        "made with a master key",
    )
    expect(run("inspect", setup.backup, "--passphrase-file", setup.pass_file), EXIT_KEY, "master key")


def test_key_source_problems_exit_3(setup: Setup) -> None:
    expect(run("verify", setup.backup), EXIT_KEY, "no key given")
    expect(run("create", setup.db, setup.tmp / "k.dfb"), EXIT_KEY, "no key given")
    expect(run("verify", setup.backup, "--key", setup.tmp / "missing.pem"), EXIT_KEY, "missing.pem", "does not exist")
    expect(run("verify", setup.backup, "--key", setup.pass_file), EXIT_KEY, "not a datafold master key file")
    expect(run("verify", setup.pass_backup, "--passphrase-file", setup.tmp / "nope"), EXIT_KEY, "does not exist")
    empty = setup.tmp / "empty.txt"
    empty.write_text("\n")
    expect(run("verify", setup.pass_backup, "--passphrase-file", empty), EXIT_KEY, "is empty")
    expect(run("verify", setup.pass_backup, DATAFOLD_PASSPHRASE=""), EXIT_KEY, "empty")


def test_missing_backup_file_exits_4(setup: Setup) -> None:
    missing = setup.tmp / "missing.dfb"
    commands: list[list[str | Path]] = [
        ["verify", missing],
        ["inspect", missing],
        ["restore", missing, setup.new_db("m")],
    ]
    for args in commands:
        expect(run(*args, "--key", setup.key), EXIT_IO, "missing.dfb", "does not exist")
    assert not setup.new_db("m").exists()
    expect(run("verify", setup.tmp, "--key", setup.key), EXIT_IO, "is a directory")


def test_damaged_backups_exit_2(setup: Setup) -> None:
    good = setup.backup.read_bytes()
    cases = {
        "not-a-backup.dfb": b"hello, world" * 100,
        "empty.dfb": b"",
        "corrupted.dfb": good[:-3000] + bytes([good[-3000] ^ 1]) + good[-2999:],
        "truncated.dfb": good[: len(good) - 100],
        "newer.dfb": good[:8] + (2).to_bytes(4, "little") + good[12:],
        "version-0.dfb": good[:8] + (0).to_bytes(4, "little") + good[12:],
    }
    messages = {
        "not-a-backup.dfb": "not a datafold backup",
        "empty.dfb": "not a datafold backup",
        "corrupted.dfb": "corrupted",
        "truncated.dfb": "truncated",
        "newer.dfb": "upgrade datafold",
        "version-0.dfb": "no datafold release wrote it",
    }
    for name, data in cases.items():
        path = setup.tmp / name
        path.write_bytes(data)
        expect(run("verify", path, "--key", setup.key), EXIT_BACKUP, name, messages[name])

    # A damaged backup leaves the database exactly as it was, even without the check before writing.
    target = setup.new_db("untouched")
    with DbOperations.open(target, setup.backend) as db:
        db.put("users", b"alice", b"before")
    before = setup.read_db(target)
    corrupted = setup.tmp / "corrupted.dfb"
    for extra in ([], ["--no-verify"]):
        r = run("restore", corrupted, target, "--key", setup.key, "--overwrite", *extra)
        expect(r, EXIT_BACKUP, "corrupted.dfb", "was not changed")
    assert setup.read_db(target) == before
    fresh = setup.new_db("fresh-after-damage")
    expect(run("restore", corrupted, fresh, "--key", setup.key, "--no-verify"), EXIT_BACKUP)
    assert not fresh.exists()  # no empty database left behind


def test_damaged_passphrase_parameters_exit_2(setup: Setup) -> None:
    data = bytearray(setup.pass_backup.read_bytes())
    data[44] = 9  # kdf_params layout version
    path = setup.tmp / "bad-kdf.dfb"
    path.write_bytes(bytes(data))
    expect(run("inspect", path), EXIT_BACKUP, "bad-kdf.dfb", "layout version 9")
    expect(run("verify", path, DATAFOLD_PASSPHRASE=PASSPHRASE), EXIT_BACKUP, "layout version 9")


def test_unwritable_destination_and_missing_database_exit_4(setup: Setup) -> None:
    expect(run("create", setup.db, setup.tmp / "no-dir" / "b.dfb", "--key", setup.key), EXIT_IO, "does not exist")
    expect(run("create", setup.db, setup.tmp, "--key", setup.key), EXIT_IO, "is a directory")
    expect(run("create", setup.new_db("absent"), setup.tmp / "b.dfb", "--key", setup.key), EXIT_IO, "does not exist")
    junk = setup.tmp / "junk.bin"
    junk.write_bytes(b"\x01" * 100)
    expect(run("create", junk, setup.tmp / "b.dfb", "--key", setup.key), EXIT_IO, "junk.bin")
    expect(run("restore", setup.backup, junk, "--key", setup.key), EXIT_IO, "junk.bin")
    expect(
        run("restore", setup.backup, setup.tmp / "no-dir" / "db", "--key", setup.key, "--db-backend", setup.backend),
        EXIT_IO,
    )


def test_bad_option_values_exit_1(setup: Setup) -> None:
    out = setup.tmp / "never.dfb"
    expect(run("create", setup.db, out, "--key", setup.key, "--compression-level", "-1"), EXIT_USAGE, "compression")
    expect(run("create", setup.db, out, "--key", setup.key, "--compression", "99"), EXIT_USAGE, "between 0 and 22")
    expect(run("create", setup.db, out, "--key", setup.key, "--tree", "nope"), EXIT_USAGE, "nope")
    expect(run("create", setup.db, out, "--key", setup.key, "--tree", ""), EXIT_USAGE, "tree")
    expect(run("restore", setup.backup, setup.new_db("y"), "--key", setup.key, "--tree", "nope"), EXIT_USAGE, "nope")
    assert not out.exists()


def test_debug_shows_the_traceback(setup: Setup) -> None:
    missing = setup.tmp / "missing.dfb"
    r = run("verify", missing, "--key", setup.key, "--debug")
    assert r.code == EXIT_IO and "Traceback" in r.err and "BackupFileNotFoundError" in r.err
    assert "Traceback" not in run("verify", missing, "--key", setup.key).err


def test_json_errors(setup: Setup) -> None:
    r = run("verify", setup.tmp / "missing.dfb", "--key", setup.key, "--json")
    assert r.code == EXIT_IO
    (error,) = r.json_lines()
    assert error["type"] == "error" and error["exit_code"] == EXIT_IO
    assert error["error"] == "BackupFileNotFoundError" and error["file"].endswith("missing.dfb")
    assert error["message"] and error["hint"]
    r = run("create", "--json")
    assert r.code == EXIT_USAGE and r.json_lines()[0]["exit_code"] == EXIT_USAGE


# --------------------------------------------------------------------------- progress and demo


def test_json_progress_and_quiet(setup: Setup) -> None:
    out = setup.tmp / "progress.dfb"
    events = expect(run("create", setup.db, out, "--key", setup.key, "--json"), EXIT_OK).json_lines()
    progress = [e for e in events if e["type"] == "progress"]
    assert {e["phase"] for e in progress} == {"backup", "verify"}
    fields = {
        "command",
        "phase",
        "items",
        "total_items",
        "bytes",
        "total_bytes",
        "percent",
        "elapsed_s",
        "bytes_per_s",
        "eta_s",
        "done",
    }
    assert all(fields <= e.keys() for e in progress)
    done = [e for e in progress if e["done"]]
    total = sum(map(len, setup.data.values()))
    assert done[0]["phase"] == "backup" and done[0]["items"] == done[0]["total_items"] == total
    assert events[-1]["type"] == "summary"
    quiet = run("verify", out, "--key", setup.key, "--json", "--quiet")
    assert [e["type"] for e in quiet.json_lines()] == ["summary"]
    r = expect(run("verify", out, "--key", setup.key), EXIT_OK)  # stderr is not a terminal: no bar
    assert r.err == "" and "\r" not in r.out
    assert expect(run("verify", out, "--key", setup.key, "-q"), EXIT_OK).out == ""


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
@pytest.mark.parametrize("setup", ["lmdb"], indirect=True)
def test_progress_bar_on_a_terminal(setup: Setup) -> None:
    master, slave = os.openpty()
    try:
        proc = subprocess.run(
            [*CLI, "restore", str(setup.backup), str(setup.new_db("tty")), "--key", str(setup.key)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=slave,
            timeout=60,
        )
        os.close(slave)
        slave = -1
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(master)
        if slave != -1:
            os.close(slave)
    shown = b"".join(chunks).decode()
    assert proc.returncode == 0
    assert "\r" in shown and "restore" in shown and "items" in shown


def test_demo(tmp_path: Path) -> None:
    r = expect(run("demo", "--records", "3000"), EXIT_OK)
    for step in ("1. built", "3. created", "4. verified", "5. restored", "equals the original", "MiB/s"):
        assert step in r.out
    summary = run("demo", "--records", "2000", "--db-backend", "sqlite", "--json", "--dir", tmp_path).summary()
    assert summary["digests_match"] is True and summary["records"] == 2000 and summary["backend"] == "sqlite"
    assert [s["step"] for s in summary["steps"]] == ["build", "create", "verify", "restore", "digests"]
    assert (tmp_path / "demo.dfb").is_file()  # --dir keeps the files
    expect(run("demo", "--records", "10", "--dir", tmp_path, "--db-backend", "sqlite"), EXIT_USAGE, "already exists")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    expect(run("demo", "--records", "10", "--dir", a_file), EXIT_USAGE, "is not a directory")
    expect(run("demo", "--records", "10", "--dir", a_file / "sub"), EXIT_IO, "cannot create directory")


def test_incremental_chain(setup: Setup) -> None:
    """create --parent writes an incremental; list and inspect show the chain; restore follows it
    (found beside the backup, or given with --chain, for create too); a missing parent exits 2
    and names it."""
    directory = setup.tmp / f"chain-{setup.backend}"
    directory.mkdir()
    db = setup.new_db("chain-source")
    shutil.copytree(setup.db, db) if setup.db.is_dir() else shutil.copy(setup.db, db)
    full, incr = directory / "a-full.dfb", directory / "b-incr.dfb"
    expect(run("create", db, full, "--key", setup.key), EXIT_OK)
    with DbOperations.open(db, setup.backend) as handle:
        handle.put("users", b"alice", b"changed")
        handle.delete("users", b"bob")
    r = expect(run("create", db, incr, "--key", setup.key, "--parent", full, "--json"), EXIT_OK)
    summary = r.summary()
    assert summary["mode"] == "incremental" and summary["items"] == 2
    full_id = expect(run("inspect", full, "--key", setup.key, "--json"), EXIT_OK).summary()["backup_id"]
    assert summary["parent_backup_id"] == full_id
    r = expect(run("inspect", incr, "--key", setup.key), EXIT_OK)
    assert f"parent {full_id}" in r.out
    r = expect(run("list", directory, "--key", setup.key), EXIT_OK)
    assert "PARENT" in r.out and full_id[:8] in r.out.splitlines()[-1]
    target = setup.new_db("chain-restored")
    expect(run("restore", incr, target, "--key", setup.key), EXIT_OK)
    assert setup.read_db(target) == setup.read_db(db)
    elsewhere = setup.tmp / f"chain-moved-{setup.backend}"
    elsewhere.mkdir()
    shutil.move(full, elsewhere / "full.dfb")
    r = expect(run("restore", incr, setup.new_db("chain-missing"), "--key", setup.key), EXIT_BACKUP, full_id)
    target = setup.new_db("chain-explicit")
    expect(run("restore", incr, target, "--key", setup.key, "--chain", elsewhere / "full.dfb"), EXIT_OK)
    assert setup.read_db(target) == setup.read_db(db)
    # A chain member made with another key is the file named, in the message and the hint.
    other_key, other = setup.tmp / f"other-{setup.backend}.pem", setup.tmp / f"other-{setup.backend}.dfb"
    expect(run("keygen", "--out", other_key), EXIT_OK)
    expect(run("create", db, other, "--key", other_key, "-q"), EXIT_OK)
    r = expect(
        run("restore", incr, setup.new_db("chain-other-key"), "--key", setup.key, "--chain", other),
        EXIT_KEY,
        f"error: chain member {other}: ",
        f"inspect {other}` shows which key",
    )
    assert f"{incr}: " not in r.err
    r = run("restore", incr, setup.new_db("chain-other-json"), "--key", setup.key, "--chain", other, "--json")
    (error,) = [e for e in r.json_lines() if e["type"] == "error"]
    assert error["file"] == str(other) and r.code == EXIT_KEY
    # An incremental of that incremental: its parent's parent is named with --chain.
    with DbOperations.open(db, setup.backend) as handle:
        handle.put("users", b"carol", b"new")
    incr2 = directory / "c-incr.dfb"
    expect(run("create", db, incr2, "--key", setup.key, "--parent", incr), EXIT_BACKUP, full_id, "--chain")
    assert not incr2.exists()
    expect(run("create", db, incr2, "--key", setup.key, "--chain", full), EXIT_USAGE, "--parent")
    expect(
        run("create", db, incr2, "--key", setup.key, "--parent", incr, "--chain", elsewhere / "full.dfb", "-q"),
        EXIT_OK,
    )
    target = setup.new_db("chain-of-three")
    chain = ("--chain", elsewhere / "full.dfb", "--chain", incr)
    expect(run("restore", incr2, target, "--key", setup.key, *chain, "-q"), EXIT_OK)
    assert setup.read_db(target) == setup.read_db(db)
