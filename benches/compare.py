#!/usr/bin/env python3
"""Side-by-side comparison of datafold with other ways to back up the same LMDB database.

    python benches/compare.py                          # full datasets, median of 5, ~10 min, writes docs/
    python benches/compare.py --scale 0.02 --repeat 1 --no-write     # a smoke run (~30 s)
    python benches/compare.py --only memory --memory-mib 512         # the memory benchmark alone
    python benches/compare.py --only incremental --only compression  # issue 6's parts alone

Data: benches/datasets.py's "small" (2M text records of ~17 + 100 bytes in 4 trees) and "large"
(256 x 1 MiB random values), scaled by --scale, written once into an LMDB database that every
contender backs up. For each dataset one table, the median of --repeat runs per cell (every run
in order under it):

- datafold's EncryptedBackupManager with the Rust core and with the pure-Python core (defaults:
  create_backup fsyncs and re-reads the file; restore_backup verifies the file, writes into a
  fresh database and checks the tree digests: the Rust core stages the write in a new data file,
  verifies beside it and checks it while it syncs, before renaming it over data.mdb), the Rust core with the
  verify passes off, and the Rust core's restore into a database opened with native_restore=False
  (records handed to py-lmdb as Python objects instead of written by the core's own LMDB);
- `mdb_copy -c DB | age -r KEY -o out` + fsync of out; restore `age -d -o data.mdb` + fsync; verify
  `age -d > /dev/null`;
- `restic backup` / `restore` / `check --read-data`, `borg create` / `extract` / `check
  --verify-data` (fresh repository per run, init untimed, outputs fsynced);
- limits: `dd if=data.mdb of=out bs=1M conv=fdatasync` (the disk), AES-256-GCM of the same bytes
  with `cryptography` over 1 MiB chunks on one thread, divided by LIMIT_THREADS, and LMDB's own
  bulk load of the same records (putmulti append=True, one synced transaction).

Issue 6's parts, on the same datasets (Rust core, defaults): `incremental` = a full backup of
"small", an incremental of it unchanged and after a seeded change of 1% of its records (updates,
deletes, new keys), the full backup of the changed database, and the restores of the chain and of
that full backup (plus the pure-Python core's incremental once, within --pure-budget);
`compression` = create / restore / verify at zstd levels 0, 1, 3, 9 on "small" and 0, 3 on "large".

Then the bars of issues 5 and 6 as PASS / MISS lines, a memory benchmark (peak anonymous RSS growth of
create_backup and restore_backup, each in its own process, at --memory-mib and 4x that; the restore
also into a database opened with the opt-in LMDB option writemap=True), and a bar
chart (docs/benchmarks.png, if matplotlib is installed: `pip install -e '.[bench]'`).

Unless --no-write, the Markdown replaces the marked regions (<!-- compare:NAME:begin/end -->) of
docs/BENCHMARKS.md for the parts that ran, and the chart is redrawn when both datasets ran.
Tools that are not installed are skipped with a note; nothing is installed. Everything happens in
a temporary directory (--tmpdir; it must be a real disk, not tmpfs, for the fsyncs to mean anything).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

MIB = 1 << 20
CHUNK = 1 << 20
LIMIT_THREADS = 2  # the AES-GCM limit row: one thread's throughput times this
MEMORY_BASE_MIB = 2048  # memory benchmark at scale 1.0: 2 GiB, then 4x
MEMORY_BAR_MIB = 64
MASTER_SEED = bytes(range(32))  # a fixed benchmark seed, never a real key
PASSWORD = "datafold-bench-password"
OPS = ("backup", "restore", "verify")
PARTS = ("small", "large", "incremental", "compression", "memory")  # --only; also the docs regions' order
ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "BENCHMARKS.md"
CHART_NAME = "benchmarks.png"  # beside the docs file

# Row names (the bars look rows up by these).
RUST = "datafold, Rust core"
RUST_FAST = "datafold, Rust core, verify passes off"
RUST_PY_LMDB = "datafold, Rust core, restore through py-lmdb"
PURE = "datafold, pure-Python core"
AGE = "mdb_copy -c | age; age -d"
RESTIC = "restic"
BORG = "borg (repokey-blake2)"
DD = "dd conv=fdatasync of data.mdb"
AES = f"AES-256-GCM limit, {LIMIT_THREADS} threads"
BULK = "LMDB bulk load"

# ------------------------------------------------------------------------------------ results


@dataclass
class Row:
    name: str
    note: str = ""
    times: dict[str, list[float]] = field(default_factory=dict)
    error: str = ""

    def add(self, op: str, measured: tuple[float, Any]) -> Any:
        """Records the time of a `timed()` call and passes its result on."""
        self.times.setdefault(op, []).append(measured[0])
        return measured[1]

    def median(self, op: str) -> float | None:
        runs = self.times.get(op)
        return statistics.median(runs) if runs else None


@dataclass
class Result:
    """One dataset's table."""

    name: str
    records: int
    nbytes: int  # keys + values
    disk_bytes: int  # the LMDB data file
    rows: list[Row] = field(default_factory=list)
    bars: list[Bar] = field(default_factory=list)

    def time(self, row: str, op: str) -> float | None:
        found = next((r for r in self.rows if r.name == row), None)
        return found.median(op) if found else None


@dataclass
class Bar:
    label: str
    verdict: str  # PASS, MISS or SKIP
    detail: str

    def line(self) -> str:
        return f"{self.verdict} {self.label}: {self.detail}"


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, Any]:
    """(wall seconds, result) of fn(*args, **kwargs). Untimed before it: os.sync(), so no writeback
    left by the previous step (a fill, a cleanup) lands in this step's fsyncs, and a collection."""
    os.sync()
    gc.collect()
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def attempt(row: Row, body: Callable[[], None]) -> Row:
    """Runs one contender; a failure becomes a note in its row instead of ending the script."""
    log(row.name)
    try:
        body()
    except Exception as e:  # noqa: BLE001 - any failure of one contender is reported, not fatal
        first = str(e).splitlines()[0][:200] if str(e) else ""
        row.error = f"failed: {type(e).__name__}: {first}"
        print(f"  ! {row.name}: {row.error}", file=sys.stderr)
    return row


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _cell(text: str) -> str:
    """Text made safe for a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


# ----------------------------------------------------------------------------- processes, files


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    kwargs.setdefault("stdout", subprocess.PIPE)
    result = subprocess.run(cmd, stderr=subprocess.PIPE, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited {result.returncode}: {result.stderr.decode(errors='replace').strip()}")
    return result


def pipeline(first: list[str], second: list[str]) -> None:
    """first | second, failing if either fails."""
    a = subprocess.Popen(first, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    b = subprocess.run(second, stdin=a.stdout, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert a.stdout is not None and a.stderr is not None
    a.stdout.close()
    a_err = a.stderr.read()
    if a.wait() != 0 or b.returncode != 0:
        raise RuntimeError(f"{first[0]} | {second[0]} failed: {(a_err + b.stderr).decode(errors='replace').strip()}")


def fsync_path(path: Path) -> None:
    """fsync every file and directory at or below `path`, and `path`'s parent directory: what makes
    a peer's output as durable as a datafold backup (which is fsynced before its rename)."""
    targets = [path] if path.is_file() else [path, *sorted(path.rglob("*"))]
    for p in [*targets, path.parent]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "not installed"


def missing(*tools: str) -> str:
    """A skip note naming the tools that are not on PATH, or "" when all are."""
    absent = [t for t in tools if not shutil.which(t)]
    return f"skipped: {', '.join(absent)} not installed" if absent else ""


def lmdb_records(path: Path) -> int:
    """Records in all named databases of the LMDB environment at `path` (a restore check)."""
    import lmdb

    env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=64, subdir=True)
    try:
        with env.begin() as txn:
            names = [key for key, _ in txn.cursor()]
            return sum(txn.stat(env.open_db(name, txn=txn, create=False))["entries"] for name in names)
    finally:
        env.close()


def fresh(path: Path) -> Path:
    """`path` as an empty directory."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def lmdb_digest(path: Path) -> str:
    """SHA-256 over every named database's name, keys and values, in order: equal digests mean
    equal contents (a restore check, untimed)."""
    import hashlib

    import lmdb

    h = hashlib.sha256()
    env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=64, subdir=True)
    try:
        with env.begin() as txn:
            for name in sorted(key for key, _ in txn.cursor()):
                h.update(b"T%d:%s" % (len(name), name))
                for key, value in txn.cursor(env.open_db(name, txn=txn, create=False)):
                    h.update(b"%d:%d:%s%s" % (len(key), len(value), key, value))
    finally:
        env.close()
    return h.hexdigest()


def keyed_manager(db: Any, core: str = "rust") -> Any:
    """An EncryptedBackupManager on `db` with the fixed benchmark master key."""
    from datafold import EncryptedBackupManager, MasterKeyPair

    return EncryptedBackupManager(db, MasterKeyPair.from_private_bytes(MASTER_SEED), core=core)


def restore_fresh(
    backup: Path, target: Path, core: str = "rust", options: Any = None, native: bool = True
) -> tuple[float, Any]:
    """(seconds, RestoreStats) of restore_backup(backup) into `target` made an empty LMDB database
    (opened with native_restore=native); opening the target is not timed."""
    from datafold import DbOperations

    with DbOperations.open(fresh(target), native_restore=native) as db:
        return timed(keyed_manager(db, core).restore_backup, backup, options)


@dataclass
class Source:
    """A dataset materialized and written into an LMDB database at `path`."""

    dataset: datasets.Dataset
    items: dict[str, list[datasets.Item]]
    path: Path
    records: int
    nbytes: int  # keys + values


def prepare_source(name: str, scale: float, tmp: Path, label: str) -> Source:
    dataset = datasets.DATASETS[name](scale)
    log(f"{label}: generating {dataset.records:,} records of {name}")
    items = dataset.materialize()
    records = sum(map(len, items.values()))
    nbytes = sum(len(k) + len(v) for tree in items.values() for k, v in tree)
    path = tmp / f"{label}-lmdb"
    log(f"{label}: filling the source LMDB database ({nbytes / 1e6:,.1f} MB)")
    dataset.fill_lmdb(path, items)
    return Source(dataset, items, path, records, nbytes)


# -------------------------------------------------------------------------------- contenders


@dataclass
class Bench:
    """What every contender of one dataset gets."""

    items: dict[str, list[datasets.Item]]
    source: Path  # the LMDB environment directory
    tmp: Path
    repeat: int
    pure_budget: float
    records: int = 0

    @property
    def data_file(self) -> Path:
        return self.source / "data.mdb"


def datafold_row(bench: Bench, core: str, name: str, verify_passes: bool) -> Row:
    from datafold import DbOperations
    from datafold.options import BackupOptions, RestoreOptions

    if verify_passes:
        row = Row(name, "defaults")
        backup_options, restore_options = BackupOptions(), RestoreOptions()
    else:
        row = Row(name, "verify_during_creation, verify_before_restore, verify_after_restore off")
        backup_options = BackupOptions(verify_during_creation=False)
        restore_options = RestoreOptions(verify_before_restore=False, verify_after_restore=False)

    def body() -> None:
        with DbOperations.open(bench.source) as source:
            manager = keyed_manager(source, core)
            for i in range(bench.repeat):
                started = time.perf_counter()
                backup = bench.tmp / "datafold.dfb"
                row.add("backup", timed(manager.create_backup, backup, backup_options))
                if verify_passes:
                    metadata = row.add("verify", timed(manager.verify_backup, backup))
                    assert metadata.total_items == bench.records
                target_path = bench.tmp / "datafold-restore"
                stats = row.add("restore", restore_fresh(backup, target_path, core, restore_options))
                assert stats.items_restored == bench.records
                shutil.rmtree(target_path)
                backup.unlink()
                took = time.perf_counter() - started
                if i == 0 and bench.repeat > 1 and took > bench.pure_budget:
                    row.note += f"; timed once: one run took {took:.0f} s (> --pure-budget {bench.pure_budget:.0f} s)"
                    break

    return attempt(row, body)


def py_lmdb_restore_row(bench: Bench) -> Row:
    """The Rust core's default restore with the store's native_restore=False: every record handed
    to py-lmdb as Python objects (how restores ran before native restores)."""
    from datafold import DbOperations

    row = Row(RUST_PY_LMDB, "defaults, but the LMDB store opened with native_restore=False (records go to py-lmdb)")

    def body() -> None:
        backup = bench.tmp / "datafold-py-lmdb.dfb"
        with DbOperations.open(bench.source) as source:
            keyed_manager(source).create_backup(backup)
        target = bench.tmp / "datafold-py-lmdb-restore"
        for _ in range(bench.repeat):
            stats = row.add("restore", restore_fresh(backup, target, native=False))
            assert stats.items_restored == bench.records
            shutil.rmtree(target)
        backup.unlink()

    return attempt(row, body)


def peer_runs(
    bench: Bench,
    row: Row,
    output: Path,
    backup: Callable[[], object],
    verify: Callable[[], object],
    restore: Callable[[Path], object],
    restored: Callable[[Path], Path] = lambda target: target,
    init: Callable[[], object] = lambda: None,
) -> None:
    """--repeat runs of a peer: init() (untimed), then timed backup() and fsync of `output` (its
    file or repository), verify(), restore(target) into a fresh directory and its fsync; the
    LMDB environment at restored(target) must hold every record. `output` is removed after each run."""
    for _ in range(bench.repeat):
        init()
        row.add("backup", timed(lambda: (backup(), fsync_path(output))))
        row.add("verify", timed(verify))
        target = fresh(bench.tmp / f"{output.name}-restore")
        row.add("restore", timed(lambda: (restore(target), fsync_path(target))))  # noqa: B023 - called at once
        assert lmdb_records(restored(target)) == bench.records
        shutil.rmtree(target)
        shutil.rmtree(output) if output.is_dir() else output.unlink()


def age_row(bench: Bench) -> Row:
    row = Row(AGE, "X25519 recipient, ChaCha20-Poly1305; LMDB's compacting copy, encrypted; outputs fsynced")

    def body() -> None:
        if note := missing("age", "age-keygen", "mdb_copy"):
            row.note = note
            return
        key = bench.tmp / "age.key"
        if not key.exists():
            run(["age-keygen", "-o", str(key)])
        recipient = run(["age-keygen", "-y", str(key)]).stdout.decode().strip()
        out = bench.tmp / "copy.mdb.age"
        peer_runs(
            bench,
            row,
            out,
            backup=lambda: pipeline(["mdb_copy", "-c", str(bench.source)], ["age", "-r", recipient, "-o", str(out)]),
            verify=lambda: run(["age", "-d", "-i", str(key), str(out)], stdout=subprocess.DEVNULL),
            restore=lambda target: run(["age", "-d", "-i", str(key), "-o", str(target / "data.mdb"), str(out)]),
        )

    return attempt(row, body)


def restic_row(bench: Bench) -> Row:
    row = Row(RESTIC, "AES-256-CTR + Poly1305, CDC; repo v2, `--compression off`; verify = `check --read-data`")

    def body() -> None:
        if note := missing("restic"):
            row.note = note
            return
        env = {**os.environ, "RESTIC_PASSWORD": PASSWORD, "RESTIC_CACHE_DIR": str(bench.tmp / "restic-cache")}
        repo = bench.tmp / "restic-repo"
        base = ["restic", "-r", str(repo), "-q"]
        peer_runs(
            bench,
            row,
            repo,
            init=lambda: run([*base, "init", "--repository-version", "2"], env=env),
            backup=lambda: run(
                [*base, "--compression", "off", "backup", bench.source.name], env=env, cwd=bench.source.parent
            ),
            verify=lambda: run([*base, "check", "--read-data"], env=env),
            restore=lambda target: run([*base, "restore", "latest", "--target", str(target)], env=env),
            restored=lambda target: target / bench.source.name,
        )

    return attempt(row, body)


def borg_row(bench: Bench) -> Row:
    row = Row(BORG, "AES-256-CTR + BLAKE2b, CDC; `--compression none`; verify = `check --verify-data`")

    def body() -> None:
        if note := missing("borg"):
            row.note = note
            return
        env = {**os.environ, "BORG_PASSPHRASE": PASSWORD, "BORG_BASE_DIR": str(bench.tmp / "borg-base")}
        repo = bench.tmp / "borg-repo"
        archive = f"{repo}::bench"
        peer_runs(
            bench,
            row,
            repo,
            init=lambda: run(["borg", "init", "-e", "repokey-blake2", str(repo)], env=env),
            backup=lambda: run(
                ["borg", "create", "--compression", "none", archive, bench.source.name],
                env=env,
                cwd=bench.source.parent,
            ),
            verify=lambda: run(["borg", "check", "--verify-data", str(repo)], env=env),
            restore=lambda target: run(["borg", "extract", archive], env=env, cwd=target),
            restored=lambda target: target / bench.source.name,
        )

    return attempt(row, body)


def dd_row(bench: Bench) -> Row:
    row = Row(DD, "a durable plain copy of the LMDB data file: the disk's limit (backup column only)")

    def body() -> None:
        if note := missing("dd"):
            row.note = note
            return
        out = bench.tmp / "dd.out"
        for _ in range(bench.repeat):
            cmd = ["dd", f"if={bench.data_file}", f"of={out}", "bs=1M", "conv=fdatasync", "status=none"]
            row.add("backup", timed(run, cmd))
            out.unlink()

    return attempt(row, body)


def aes_row(bench: Bench) -> Row:
    row = Row(
        AES,
        f"`cryptography` AESGCM over 1 MiB chunks of the records, 1 thread, time / {LIMIT_THREADS}; "
        "encrypt in the backup column, decrypt in restore and verify",
    )

    def body() -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        payload = b"".join(k + v for items in bench.items.values() for k, v in items)
        view = memoryview(payload)
        aes = AESGCM(bytes(range(32)))
        offsets = range(0, len(payload), CHUNK)

        def encrypt() -> None:
            for i, o in enumerate(offsets):
                aes.encrypt(i.to_bytes(12, "big"), view[o : o + CHUNK], None)

        chunks = [aes.encrypt(i.to_bytes(12, "big"), view[o : o + CHUNK], None) for i, o in enumerate(offsets)]

        def decrypt() -> None:
            for i, c in enumerate(chunks):
                aes.decrypt(i.to_bytes(12, "big"), c, None)

        for _ in range(bench.repeat):
            t, _ = timed(encrypt)
            row.add("backup", (t / LIMIT_THREADS, None))
            t, _ = timed(decrypt)
            row.add("restore", (t / LIMIT_THREADS, None))
            row.add("verify", (t / LIMIT_THREADS, None))

    return attempt(row, body)


def bulk_row(bench: Bench) -> Row:
    row = Row(BULK, "py-lmdb `putmulti(append=True)` of the records held in memory, one synced transaction")

    def body() -> None:
        import lmdb

        map_size = 2 * bench.data_file.stat().st_size + 64 * MIB

        def load(path: Path) -> None:
            env = lmdb.open(str(path), map_size=map_size, max_dbs=64, subdir=True)  # sync=True: durable commit
            try:
                with env.begin(write=True) as txn:
                    for name, items in bench.items.items():
                        db = env.open_db(name.encode(), txn=txn)
                        consumed, added = txn.cursor(db).putmulti(items, append=True)
                        assert added == len(items)
            finally:
                env.close()

        for _ in range(bench.repeat):
            target = fresh(bench.tmp / "bulk-load")
            row.add("restore", timed(load, target))
            assert lmdb_records(target) == bench.records
            shutil.rmtree(target)

    return attempt(row, body)


def bench_dataset(name: str, scale: float, tmp: Path, repeat: int, pure_budget: float, with_pure: bool) -> Result:
    src = prepare_source(name, scale, tmp, name)
    source = src.path
    bench = Bench(src.items, source, tmp, repeat, pure_budget, src.records)
    result = Result(name, src.records, src.nbytes, bench.data_file.stat().st_size)
    result.rows.append(datafold_row(bench, "rust", RUST, True))
    result.rows.append(datafold_row(bench, "rust", RUST_FAST, False))
    result.rows.append(py_lmdb_restore_row(bench))
    if with_pure:
        result.rows.append(datafold_row(bench, "pure", PURE, True))
    for make in (age_row, restic_row, borg_row, dd_row, aes_row, bulk_row):
        result.rows.append(make(bench))
    shutil.rmtree(source)
    for leftover in ("restic-cache", "borg-base"):
        shutil.rmtree(tmp / leftover, ignore_errors=True)
    result.bars = dataset_bars(result)
    return result


# ------------------------------------------------------------------------------------------ bars


def ratio_bar(result: Result, op: str, label: str, slower: str, faster: str, least: float) -> Bar:
    """PASS when time(slower) / time(faster) >= least."""
    full = f"{op} {result.name}: {label}"
    a, b = result.time(slower, op), result.time(faster, op)
    if a is None or b is None:
        return Bar(full, "SKIP", f"no time for {slower if a is None else faster}")
    ratio = a / b
    return Bar(full, "PASS" if ratio >= least else "MISS", f"{ratio:.2f}x (bar >= {least:g}x)")


def within_bar(result: Result, op: str, label: str, ours: str, limit: str, most: float) -> Bar:
    """PASS when time(ours) / time(limit) <= most; also gives the figure without the verify passes."""
    full = f"{op} {result.name}: {label}"
    a, b = result.time(ours, op), result.time(limit, op)
    if a is None or b is None:
        return Bar(full, "SKIP", f"no time for {ours if a is None else limit}")
    detail = f"{a / b:.2f}x its time (bar <= {most:g}x)"
    fast = result.time(RUST_FAST, op)
    if ours == RUST and fast is not None:
        detail += f"; with the verify passes off {fast / b:.2f}x"
    py_lmdb = result.time(RUST_PY_LMDB, op)
    if ours == RUST and py_lmdb is not None:
        detail += f"; through py-lmdb (native_restore=False) {py_lmdb / b:.2f}x"
    return Bar(full, "PASS" if a / b <= most else "MISS", detail)


def dataset_bars(result: Result) -> list[Bar]:
    if result.name == "small":
        return [
            ratio_bar(result, "backup", ">= 8x faster than the pure-Python core", PURE, RUST, 8),
            ratio_bar(result, "backup", ">= 1.5x faster than mdb_copy | age (synced)", AGE, RUST, 1.5),
            ratio_bar(result, "backup", ">= 6x faster than restic backup", RESTIC, RUST, 6),
            within_bar(result, "restore", "<= 1.3x LMDB's bulk load of the records", RUST, BULK, 1.3),
            ratio_bar(result, "restore", ">= 2.5x faster than the pure-Python core", PURE, RUST, 2.5),
        ]
    bars = [
        within_bar(result, "backup", "<= 1.3x a durable plain copy of the data file", RUST, DD, 1.3),
        ratio_bar(result, "backup", ">= 1.5x faster than mdb_copy | age (synced)", AGE, RUST, 1.5),
        within_bar(result, "restore", "<= 1.3x LMDB's bulk load of the records", RUST, BULK, 1.3),
        ratio_bar(result, "verify", ">= 3x faster than age -d", AGE, RUST, 3),
    ]
    # >= 30% of the AES-GCM limit's throughput, i.e. time(limit) / time(ours) >= 0.3
    limit, ours = result.time(AES, "verify"), result.time(RUST, "verify")
    label = f"verify {result.name}: >= 30% of the raw AES-256-GCM limit for {LIMIT_THREADS} threads"
    if limit is None or ours is None:
        bars.append(Bar(label, "SKIP", "no time for the limit or for datafold"))
    else:
        share = limit / ours
        bars.append(Bar(label, "PASS" if share >= 0.3 else "MISS", f"{share:.1%} of it (bar >= 30%)"))
    return bars


# -------------------------------------------------------------------------------------- render


def render_dataset(result: Result, repeat: int, scale: float) -> str:
    shape = "text records in 4 trees" if result.name == "small" else "value(s) of 1 MiB random bytes"
    lines = [
        f"### {result.name}: {result.records:,} {shape} (scale {scale:g})",
        "",
        f"{result.nbytes / 1e6:,.1f} MB of keys and values; LMDB data file {result.disk_bytes / 1e6:,.1f} MB. "
        f"Median of {repeat} run(s) per cell, run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "| contender |" + "".join(f" {op} s | MB/s | vs rust |" for op in OPS) + " notes |",
        "|---|" + "---:|---:|---:|" * len(OPS) + "---|",
    ]
    for row in result.rows:
        cells = []
        for op in OPS:
            t, ref = row.median(op), result.time(RUST, op)
            if t is None:
                cells += ["–", "–", "–"]
                continue
            cells += [f"{t:.3f}", f"{result.nbytes / t / 1e6:,.0f}", f"{t / ref:.2f}" if ref else "–"]
        note = "; ".join(x for x in (row.note, row.error) if x)
        lines.append(f"| {_cell(row.name)} | " + " | ".join(cells) + f" | {_cell(note)} |")
    lines += ["", "Every run behind those medians, in the order they ran (seconds):", ""]
    lines += ["| contender |" + "".join(f" {op} s |" for op in OPS), "|---|" + "---|" * len(OPS)]
    for row in result.rows:
        if any(row.times.get(op) for op in OPS):
            runs = (", ".join(f"{t:.3f}" for t in row.times.get(op, [])) or "–" for op in OPS)
            lines.append(f"| {_cell(row.name)} | " + " | ".join(runs) + " |")
    lines += ["", "Bars (issue 5):", ""] + [f"- **{b.verdict}** {_cell(b.label)}: {b.detail}" for b in result.bars]
    return "\n".join(lines) + "\n"


TABLE_NOTES = """\
- MB/s = keys + values / wall time (1 MB = 1e6 B) for every row, whatever the tool reads or
  writes. vs rust = this row's time / the Rust core's time: 3.00 means datafold's Rust core is 3x
  faster, 0.50 that this row is twice as fast.
- datafold rows: EncryptedBackupManager on the LMDB database, default options unless said:
  create_backup writes, fsyncs and re-reads (verifies) the file before its rename; verify_backup is
  one authenticated pass; restore_backup verifies the file, writes into a fresh LMDB database and
  checks each tree's digest (the Rust core: a new data file committed every 16 MiB, the verify pass
  in a thread beside the write, the digests read back while the file syncs, then renamed over
  data.mdb; all or nothing like one transaction).
- Peers restore into a fresh directory; restic and borg get a fresh repository per run (init not
  timed). Every output (age file, repository, restored files) is fsynced inside the timed region.
  Wall time of the whole command, process start and key derivation included.
- Limits: the dd row is the disk's throughput for the LMDB file; the AES-GCM row is one thread of
  OpenSSL (through `cryptography`) over the same bytes, divided by the thread count; the LMDB
  bulk load writes the records already in memory, sorted, in one synced transaction.
"""


# ------------------------------------------------------------------- issue 6: incremental backups

CHANGE_SHARE = 0.01  # records touched between the full backup and the incremental
CHANGE_MIX = (0.6, 0.2)  # shares of the touched records that are updates and deletes; the rest are new keys
INCREMENTAL_SIZE_BAR = 0.03
INCREMENTAL_SPEED_BAR = 2.0
FULL_OVERHEAD_BAR = 0.05
PUT_FRAMING = 9  # a PUT record's type byte and two u32 lengths (docs/FORMAT.md §3)


@dataclass
class Step(Row):
    """A Row that also knows the size of the file it wrote (the last run's)."""

    size: int | None = None


@dataclass
class Changes:
    """What changes between the full backup and the incremental, per tree."""

    puts: dict[str, list[datasets.Item]] = field(default_factory=dict)
    deletes: dict[str, list[bytes]] = field(default_factory=dict)
    updated: int = 0
    deleted: int = 0
    added: int = 0

    @property
    def touched(self) -> int:
        return self.updated + self.deleted + self.added


def _edited(value: bytes, rng: Any) -> bytes:
    """A record's value after an application edit: one more field in its JSON object."""
    return value[:-1] + b',"rev":%d}' % rng.randrange(2, 1000)


def change_set(items: dict[str, list[datasets.Item]], share: float = CHANGE_SHARE) -> Changes:
    """Seeded changes touching `share` of each tree's records (so of all of them): CHANGE_MIX
    updates of existing keys and deletes, the rest new keys next to existing ones."""
    import random

    changes = Changes()
    for tree, records in items.items():
        rng = random.Random(f"{datasets.SEED}/incremental/{tree}/{len(records)}")
        touched = max(3, round(len(records) * share))
        n_update = min(len(records), round(touched * CHANGE_MIX[0]))
        n_delete = min(len(records) - n_update, round(touched * CHANGE_MIX[1]))
        picked = rng.sample(range(len(records)), n_update + n_delete)
        puts = [(records[i][0], _edited(records[i][1], rng)) for i in picked[:n_update]]
        deletes = sorted(records[i][0] for i in picked[n_update:])
        existing = {key for key, _ in records}
        for _ in range(touched - n_update - n_delete):
            prefix, _, digits = records[rng.randrange(len(records))][0].partition(b":")
            ident = int(digits)
            while (key := b"%s:%0*d" % (prefix, datasets.KEY_DIGITS, ident)) in existing:
                ident += 1
            existing.add(key)
            puts.append((key, _edited(records[rng.randrange(len(records))][1], rng)))
            changes.added += 1
        changes.puts[tree] = sorted(puts)
        changes.deletes[tree] = deletes
        changes.updated += n_update
        changes.deleted += len(deletes)
    return changes


def apply_changes(db: Any, changes: Changes, nbytes: int) -> None:
    """Writes `changes` in one transaction (LMDB copies every page it touches: room reserved first)."""
    db.reserve(nbytes // 2)
    with db.write_transaction() as txn:
        for tree, puts in changes.puts.items():
            txn.put_many(tree, puts)
            for key in changes.deletes[tree]:
                assert txn.delete(tree, key)


def incremental_child(db_path: str, parent: str, out: str) -> None:
    """In a fresh process: the pure-Python core's incremental of `db_path` on `parent`; prints
    {"seconds", "size"} as a JSON line."""
    from datafold import BackupMode, BackupOptions, DbOperations

    with DbOperations.open(db_path) as db:
        options = BackupOptions(mode=BackupMode.INCREMENTAL, parent=parent)
        took, result = timed(keyed_manager(db, "pure").create_backup, out, options)
    print(json.dumps({"seconds": took, "size": result.metadata.file_size}), flush=True)


def pure_incremental(step: Step, db: Path, parent: Path, out: Path, budget: float) -> None:
    """Runs incremental_child in a subprocess, killed after `budget` seconds."""
    cmd = [sys.executable, os.path.abspath(__file__), "--incremental-child", str(db), str(parent), str(out)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=budget)
    except subprocess.TimeoutExpired:
        step.note = f"did not finish within --pure-budget ({budget:.0f} s)"
        return
    if proc.returncode != 0:
        raise RuntimeError(f"the pure-core child failed: {proc.stderr.strip()[-300:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    step.add("time", (report["seconds"], None))
    step.size = report["size"]


@dataclass
class IncrementalRun:
    source: Source
    changes: Changes
    steps: dict[str, Step]
    framing: int = 0  # the full backup's PUT records as framed: keys + values + 9 B each
    checks: list[str] = field(default_factory=list)


# Step keys (the bars look them up) and their table names.
INC_FULL, INC_NONE, INC_CHANGED, INC_FULL_CHANGED = "full", "none", "changed", "full-changed"
INC_RESTORE_CHAIN, INC_RESTORE_FULL, INC_PURE = "restore-chain", "restore-full", "pure"


def bench_incremental(scale: float, tmp: Path, repeat: int, pure_budget: float, with_pure: bool) -> IncrementalRun:
    from datafold import BackupMode, BackupOptions, DbOperations

    src = prepare_source("small", scale, tmp, "incremental")
    changes = change_set(src.items)
    expected = src.records - changes.deleted + changes.added
    work = fresh(tmp / "incremental")
    chain, other = fresh(work / "chain"), fresh(work / "other")  # chain/ holds only full + incremental
    full, incr = chain / "full.dfb", chain / "incremental.dfb"
    unchanged, full_changed = other / "unchanged.dfb", other / "full-changed.dfb"
    after = f"after touching {changes.touched / src.records:.2%} of the records"
    steps = {
        INC_FULL: Step("full backup (the parent)", "defaults"),
        INC_NONE: Step("incremental, nothing changed", "parent = that full backup"),
        INC_CHANGED: Step(f"incremental {after}", "parent = the same full backup"),
        INC_FULL_CHANGED: Step("full backup of the changed database", "defaults"),
        INC_RESTORE_CHAIN: Step("restore the chain (full + incremental)", "parents found in its directory"),
        INC_RESTORE_FULL: Step("restore the changed database's full backup", ""),
    }
    run = IncrementalRun(src, changes, steps)
    incremental = BackupOptions(mode=BackupMode.INCREMENTAL, parent=full)

    def create(key: str, out: Path, options: Any = None) -> None:
        step = steps[key]
        for _ in range(repeat):
            result = step.add("time", timed(manager.create_backup, out, options))
        step.size = result.metadata.file_size
        if key == INC_FULL:
            run.framing = result.metadata.total_bytes + PUT_FRAMING * result.metadata.total_items

    with DbOperations.open(src.path) as db:
        manager = keyed_manager(db)
        attempt(steps[INC_FULL], lambda: create(INC_FULL, full))
        attempt(steps[INC_NONE], lambda: create(INC_NONE, unchanged, incremental))
        log(f"incremental: changing {changes.touched:,} records")
        apply_changes(db, changes, src.nbytes)
        attempt(steps[INC_CHANGED], lambda: create(INC_CHANGED, incr, incremental))
        attempt(steps[INC_FULL_CHANGED], lambda: create(INC_FULL_CHANGED, full_changed))

    digests: dict[str, str] = {}

    def restore(key: str, backup: Path) -> None:
        target = work / f"restore-{key}"
        for _ in range(repeat):
            steps[key].add("time", restore_fresh(backup, target))
            assert lmdb_records(target) == expected, f"{lmdb_records(target):,} records, {expected:,} expected"
        digests[key] = lmdb_digest(target)
        shutil.rmtree(target)

    attempt(steps[INC_RESTORE_CHAIN], lambda: restore(INC_RESTORE_CHAIN, incr))
    attempt(steps[INC_RESTORE_FULL], lambda: restore(INC_RESTORE_FULL, full_changed))
    if len(digests) == 2:
        same = digests[INC_RESTORE_CHAIN] == digests[INC_RESTORE_FULL]
        run.checks.append(
            f"Both restores hold {expected:,} records and "
            + ("the same keys and values." if same else "**different contents** (a bug: investigate).")
        )
    if with_pure:
        steps[INC_PURE] = Step("pure-Python core: the same incremental, once", "own process; create_backup only")
        pure_out = other / "pure.dfb"
        attempt(steps[INC_PURE], lambda: pure_incremental(steps[INC_PURE], src.path, full, pure_out, pure_budget))
    shutil.rmtree(src.path)
    shutil.rmtree(work)
    return run


def incremental_bars(run: IncrementalRun) -> list[Bar]:
    steps = run.steps
    full, changed = steps[INC_FULL], steps[INC_CHANGED]
    what = f"incremental after a {CHANGE_SHARE:.0%} change of small"
    label = f"{what}: < {INCREMENTAL_SIZE_BAR:.0%} of the full backup's size"
    if full.size and changed.size:
        share = changed.size / full.size
        size_bar = Bar(label, "PASS" if share < INCREMENTAL_SIZE_BAR else "MISS", f"{share:.2%}")
    else:
        size_bar = Bar(label, "SKIP", "no size for the full backup or the incremental")
    label = f"{what}: >= {INCREMENTAL_SPEED_BAR:g}x faster to create than the full backup"
    a, b = full.median("time"), changed.median("time")
    if a and b:
        speed_bar = Bar(label, "PASS" if a / b >= INCREMENTAL_SPEED_BAR else "MISS", f"{a / b:.2f}x")
    else:
        speed_bar = Bar(label, "SKIP", "no time for the full backup or the incremental")
    label = f"a full backup is not made > {FULL_OVERHEAD_BAR:.0%} larger by what incrementals need"
    if full.size and run.framing:
        extra = full.size / run.framing - 1
        detail = (
            f"nothing per record for incrementals; the file is its records' own framing "
            f"+ {full.size - run.framing:,} B of header, tree, trailer and AEAD framing ({extra:+.3%})"
        )
        overhead_bar = Bar(label, "PASS" if extra <= FULL_OVERHEAD_BAR else "MISS", detail)
    else:
        overhead_bar = Bar(label, "SKIP", "no full backup")
    return [size_bar, speed_bar, overhead_bar]


def render_incremental(run: IncrementalRun, bars: list[Bar], repeat: int, scale: float) -> str:
    src, changes, steps = run.source, run.changes, run.steps
    full = steps[INC_FULL]
    lines = [
        f"### Incremental backups: small, {src.records:,} text records in 4 trees (scale {scale:g})",
        "",
        f"{src.nbytes / 1e6:,.1f} MB of keys and values. Between the full backup and the incremental, "
        f"{changes.touched:,} records ({changes.touched / src.records:.2%}) change: {changes.updated:,} updated "
        f"(one JSON field added), {changes.deleted:,} deleted, {changes.added:,} new keys; seeded, the same "
        "share of every tree. Rust core, default options (create_backup fsyncs and re-reads its file; "
        "restore_backup verifies the file, writes into a fresh LMDB database all at once (fsynced) and "
        f"checks the digests). Median of {repeat} run(s) per cell, run of "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "| step | seconds | time vs full backup | file MB | size vs full backup | every run, in order (s) | notes |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    ref_time, ref_size = full.median("time"), full.size
    for key, step in steps.items():
        t = step.median("time")
        creates = not key.startswith("restore")
        cells = [
            f"{t:.3f}" if t is not None else "–",
            f"{t / ref_time:.3f}" if t is not None and ref_time else "–",
            f"{step.size / 1e6:,.3f}" if creates and step.size else "–",
            f"{step.size / ref_size:.2%}" if creates and step.size and ref_size else "–",
            ", ".join(f"{x:.3f}" for x in step.times.get("time", [])) or "–",
        ]
        note = "; ".join(x for x in (step.note, step.error) if x)
        lines.append(f"| {_cell(step.name)} | " + " | ".join(cells) + f" | {_cell(note)} |")
    lines += [
        "",
        "- time vs full backup < 1 means faster than the full backup of the unchanged database "
        "(the first row). An incremental reads its whole parent back (decrypting it) and every record "
        "of the database, and writes only the differences (docs/FORMAT.md §5.1).",
    ]
    if full.size and run.framing:
        lines.append(
            f"- The full backup's {full.size:,} B are its records as framed by the format (keys + values + "
            f"{PUT_FRAMING} B per PUT: {run.framing:,} B) and {full.size - run.framing:,} B of header, "
            "tree begin/end and trailer records, preamble, stream header and a 16-byte tag per 1 MiB "
            "segment: a full backup carries nothing for incrementals."
        )
    lines += [f"- {check}" for check in run.checks]
    lines += ["", "Bars (issue 6):", ""] + [f"- **{b.verdict}** {_cell(b.label)}: {b.detail}" for b in bars]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------- issue 6: compression

COMPRESSION_LEVELS = {"small": (0, 1, 3, 9), "large": (0, 3)}
COMPRESSION_BAR = 2.0  # level 3 makes the small dataset's backup at least this many times smaller
COMPRESSION_OPS = ("backup", "restore", "verify")


@dataclass
class CompressionRun:
    sources: dict[str, tuple[int, int]] = field(default_factory=dict)  # dataset -> (records, nbytes)
    steps: dict[tuple[str, int], Step] = field(default_factory=dict)  # (dataset, level) -> step
    pure: Step | None = None


def bench_compression(scale: float, tmp: Path, repeat: int, with_pure: bool) -> CompressionRun:
    from datafold import BackupOptions, DbOperations

    run = CompressionRun()
    for name, levels in COMPRESSION_LEVELS.items():
        src = prepare_source(name, scale, tmp, f"compression-{name}")
        run.sources[name] = (src.records, src.nbytes)
        with DbOperations.open(src.path) as db:
            manager = keyed_manager(db)
            for level in levels:
                step = run.steps[name, level] = Step(f"{name}, level {level}")
                backup = tmp / f"compression-{name}-{level}.dfb"

                def body(step: Step = step, backup: Path = backup, level: int = level, manager: Any = manager) -> None:
                    target = tmp / "compression-restore"
                    for _ in range(repeat):
                        step.add("backup", timed(manager.create_backup, backup, BackupOptions(compression_level=level)))
                        step.add("verify", timed(manager.verify_backup, backup))
                        step.add("restore", restore_fresh(backup, target))
                        assert lmdb_records(target) == src.records  # noqa: B023 - called at once
                    step.size = backup.stat().st_size
                    shutil.rmtree(target)

                attempt(step, body)
        shutil.rmtree(src.path)
    level3 = tmp / "compression-small-3.dfb"
    if with_pure and level3.exists():
        run.pure = Step("small, level 3: the pure-Python core verifies the Rust core's file", "once")

        def pure_read() -> None:
            from datafold import DbOperations

            with DbOperations.open(fresh(tmp / "compression-pure")) as db:
                metadata = run.pure.add("verify", timed(keyed_manager(db, "pure").verify_backup, level3))  # type: ignore[union-attr]
            assert metadata.total_items == run.sources["small"][0]

        attempt(run.pure, pure_read)
    for leftover in tmp.glob("compression-*"):
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    return run


def compression_bars(run: CompressionRun) -> list[Bar]:
    label = f"compression small: level 3 makes the backup >= {COMPRESSION_BAR:g}x smaller than uncompressed"
    raw, packed = run.steps.get(("small", 0)), run.steps.get(("small", 3))
    if raw is None or packed is None or not raw.size or not packed.size:
        return [Bar(label, "SKIP", "no size for level 0 or level 3")]
    ratio = raw.size / packed.size
    return [Bar(label, "PASS" if ratio >= COMPRESSION_BAR else "MISS", f"{ratio:.2f}x smaller")]


def render_compression(run: CompressionRun, bars: list[Bar], repeat: int, scale: float) -> str:
    lines = [
        f"### Compression: zstd per ~1 MiB block of records, Rust core (scale {scale:g})",
        "",
        "small = "
        + (f"{run.sources['small'][0]:,} text records, " if "small" in run.sources else "")
        + "large = "
        + (f"{run.sources['large'][0]:,} values of 1 MiB random bytes; " if "large" in run.sources else "")
        + "`BackupOptions(compression_level=N)`, other options at their defaults (create_backup re-reads "
        "its file, restore_backup verifies the file and checks the digests; restore into a fresh LMDB "
        f"database). Median of {repeat} run(s) per cell, run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "| dataset, level | file MB | vs level 0 |"
        + "".join(f" {op} s | {op} MB/s |" for op in COMPRESSION_OPS)
        + " notes |",
        "|---|---:|---:|" + "---:|---:|" * len(COMPRESSION_OPS) + "---|",
    ]
    rows = [(name, step) for (name, _), step in run.steps.items()]
    if run.pure is not None:
        rows.append(("small", run.pure))
    for name, step in rows:
        nbytes = run.sources[name][1]
        raw = run.steps.get((name, 0))
        cells = [
            f"{step.size / 1e6:,.3f}" if step.size else "–",
            f"{step.size / raw.size:.3f}" if step.size and raw and raw.size else "–",
        ]
        for op in COMPRESSION_OPS:
            t = step.median(op)
            cells += [f"{t:.3f}", f"{nbytes / t / 1e6:,.0f}"] if t else ["–", "–"]
        note = "; ".join(x for x in (step.note, step.error) if x)
        lines.append(f"| {_cell(step.name)} | " + " | ".join(cells) + f" | {_cell(note)} |")
    lines += [
        "",
        "- vs level 0 = file size / the uncompressed file's. MB/s = keys + values / wall time. A block that "
        "zstd does not shrink is stored raw, so random data cost the compression attempt only.",
        "",
        "Bars (issue 6):",
        "",
    ] + [f"- **{b.verdict}** {_cell(b.label)}: {b.detail}" for b in bars]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- peak RSS


def _kb_fields(path: str) -> dict[str, int]:
    """The "Name: N kB" fields of a /proc file (status, meminfo), in bytes."""
    fields = {}
    with open(path) as f:
        for line in f:
            name, _, value = line.partition(":")
            parts = value.split()
            if len(parts) == 2 and parts[1] == "kB":
                fields[name] = int(parts[0]) * 1024
    return fields


def _status(pid: int | str) -> dict[str, int]:
    """/proc/<pid>/status: VmRSS, VmHWM, RssAnon, RssFile, ... in bytes."""
    return _kb_fields(f"/proc/{pid}/status")


def memory_child(op: str, db_path: str, backup: str) -> None:
    """In a fresh process: one create_backup or restore_backup (Rust core, defaults; for the op
    "restore-writemap" the target is opened with the opt-in writemap=True). Prints the baseline
    RssAnon (after imports and opening the database) as a JSON line before it starts."""
    from datafold import DbOperations

    with DbOperations.open(db_path, writemap=op == "restore-writemap") as db:
        manager = keyed_manager(db)
        print(json.dumps({"baseline": _status("self")["RssAnon"]}), flush=True)
        started = time.perf_counter()
        if op == "backup":
            manager.create_backup(backup)
        else:
            manager.restore_backup(backup)
        took = time.perf_counter() - started
    print(json.dumps({"seconds": took, "vmhwm": _status("self")["VmHWM"]}), flush=True)


def measure_memory(op: str, db_path: Path, backup: Path) -> dict[str, float]:
    """Runs memory_child in a subprocess; samples its RssAnon every ~2 ms once the baseline is out."""
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", op, str(db_path), str(backup)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    peak = 0
    while proc.poll() is None:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            peak = max(peak, _status(proc.pid).get("RssAnon", 0))
        time.sleep(0.002)
    rest, err = proc.communicate()
    if proc.returncode != 0 or not first:
        raise RuntimeError(f"memory child ({op}) failed: {err.strip()[-300:]}")
    report = {**json.loads(first), **json.loads(rest.strip().splitlines()[-1])}
    report["peak"] = max(peak, report["baseline"])
    report["growth"] = report["peak"] - report["baseline"]
    return report


def memory_guard(growth: dict[tuple[int, str], float], sizes_mib: list[int], size: int, op: str) -> str:
    """A skip note when the growth of `op` at a smaller size, scaled linearly to `size`, would take
    more than 3/4 of MemAvailable (an OOM kill would hit whatever else runs here); else ""."""
    smaller = [s for s in sizes_mib if s < size and (s, op) in growth]
    if not smaller:
        return ""
    expected = growth[smaller[-1], op] * size / smaller[-1]
    available = _kb_fields("/proc/meminfo").get("MemAvailable", 0)
    if expected <= 0.75 * available:
        return ""
    return (
        f"skipped: grew {growth[smaller[-1], op] / MIB:,.0f} MiB at {smaller[-1]:,} MiB, so ~{expected / 2**30:,.1f} "
        f"GiB expected here; MemAvailable is {available / 2**30:,.1f} GiB"
    )


def bench_memory(sizes_mib: list[int], tmp: Path) -> tuple[str, list[Bar]]:
    lines = [
        "### Memory: peak anonymous RSS growth, Rust core, defaults (one process per operation)",
        "",
        f"Run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; databases of 1 MiB random values "
        '(the "large" shape).',
        "",
        "| database | operation | seconds | MB/s | RssAnon before | peak RssAnon | growth | peak VmRSS (VmHWM) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    growth: dict[tuple[int, str], float] = {}
    skipped: dict[int, str] = {}
    skipped_op: dict[tuple[int, str], str] = {}
    for size in sizes_mib:
        # source + backup + restored copy (removed after each restore; the writemap one is
        # preallocated to its whole map: ~3x the data after reserve()), and slack
        need = int(size * MIB * 5.2) + 2 * 1024 * MIB
        free = shutil.disk_usage(tmp).free
        if free < need:
            skipped[size] = f"skipped: needs ~{need / 2**30:.0f} GiB free in {tmp}, {free / 2**30:.0f} GiB free"
            lines.append(f"| {size:,} MiB | – | {skipped[size]} | | | | | |")
            log(f"memory: {size} MiB {skipped[size]}")
            continue
        dataset = datasets.large_of_size(size * MIB, name=f"memory-{size}")
        source, backup, target = tmp / f"mem-src-{size}", tmp / f"mem-{size}.dfb", tmp / f"mem-restore-{size}"
        target_wm = tmp / f"mem-restore-writemap-{size}"
        log(f"memory: filling a {size} MiB database")
        dataset.fill_lmdb(source)
        for op, db in (("backup", source), ("restore", target), ("restore-writemap", target_wm)):
            if note := memory_guard(growth, sizes_mib, size, op):
                skipped_op[size, op] = note
                lines.append(f"| {size:,} MiB | {op} | {note} | | | | | |")
                log(f"memory: {op} of {size} MiB {note}")
                continue
            log(f"memory: {op} of {size} MiB")
            try:
                r = measure_memory(op, db, backup)
            except Exception as e:  # noqa: BLE001 - reported in the table
                lines.append(f"| {size:,} MiB | {op} | failed: {_cell(str(e))} | | | | | |")
                continue
            growth[size, op] = r["growth"]
            mib = [f"{r[k] / MIB:,.0f} MiB" for k in ("baseline", "peak", "growth", "vmhwm")]
            mbs = f"{dataset.approx_bytes / r['seconds'] / 1e6:,.0f}"
            lines.append(f"| {size:,} MiB | {op} | {r['seconds']:.2f} | {mbs} | " + " | ".join(mib) + " |")
            if db != source:
                shutil.rmtree(db, ignore_errors=True)  # room on disk for the next restore
        shutil.rmtree(source, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)
        shutil.rmtree(target_wm, ignore_errors=True)
        backup.unlink(missing_ok=True)
    lines += [
        "",
        "- RssAnon before = after imports and opening the database; the peak is sampled from outside every "
        "~2 ms while the operation runs. Anonymous memory is the heap (Python, Rust, LMDB's dirty pages of a "
        "write transaction); file-backed pages (LMDB's memory map, the page cache) do not count.",
        "- restore-writemap = the same restore into a database opened with the opt-in LMDB option "
        "`writemap=True` (dirty pages go straight into the file mapping; the data file is preallocated to "
        "the whole map size); restore is the default: into the fresh database, the Rust core's LMDB builds "
        "a new data file, committed every 16 MiB and renamed over data.mdb at the end (stores/lmdb.py).",
    ]
    bars = []
    for op in ("backup", "restore", "restore-writemap"):
        for size in sizes_mib:
            what = "restore with the opt-in writemap=True" if op == "restore-writemap" else op
            label = f"memory {what} {size:,} MiB: anonymous RSS grows <= {MEMORY_BAR_MIB} MiB"
            if (size, op) in growth:
                g = growth[size, op] / MIB
                verdict = "PASS" if g <= MEMORY_BAR_MIB else "MISS"
                bars.append(Bar(label, verdict, f"grew {g:,.0f} MiB"))
            else:
                bars.append(Bar(label, "SKIP", skipped_op.get((size, op)) or skipped.get(size, "the run failed")))
    lines += ["", "Bars (issue 5):", ""] + [f"- **{b.verdict}** {_cell(b.label)}: {b.detail}" for b in bars]
    return "\n".join(lines) + "\n", bars


# ------------------------------------------------------------------------------------- chart


def _color(name: str) -> str:
    """Red for datafold, grey for the limits, blue for the other tools."""
    if name.startswith("datafold"):
        return "#d62728"
    return "#7f7f7f" if name in (DD, AES, BULK) else "#1f77b4"


def draw_chart(results: list[Result], path: Path) -> str:
    """A bar chart of MB/s per contender, one panel per dataset and operation; "" or a skip note."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "chart skipped: matplotlib is not installed (pip install -e '.[bench]')"
    fig, axes = plt.subplots(len(results), len(OPS), figsize=(15, 3.2 * len(results) + 0.8), squeeze=False)
    for r, result in enumerate(results):
        for c, op in enumerate(OPS):
            ax = axes[r][c]
            rows = [row for row in result.rows if row.median(op)]
            speeds = [result.nbytes / row.median(op) / 1e6 for row in rows]  # type: ignore[operator]
            colors = [_color(row.name) for row in rows]
            ax.barh([row.name for row in rows], speeds, color=colors)
            ax.invert_yaxis()
            ax.set_title(f"{result.name}: {op}")
            ax.set_xscale("log")
            ax.set_xlabel("MB/s of keys + values (log; higher is better)", fontsize=8)
            ax.tick_params(axis="y", labelsize=8)
            for y, speed in enumerate(speeds):
                ax.text(speed, y, f" {speed:,.0f}", va="center", fontsize=7)
    fig.suptitle("datafold vs peers and limits (red: datafold, grey: limits, blue: other tools)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return ""


# ---------------------------------------------------------------------------------------- docs


def replace_region(text: str, name: str, content: str) -> str:
    """Replaces <!-- compare:NAME:begin --> ... <!-- compare:NAME:end --> in `text`; a missing
    region is added just before <!-- compare:end --> (or at the end of the text)."""
    begin, end = f"<!-- compare:{name}:begin -->", f"<!-- compare:{name}:end -->"
    block = f"{begin}\n{content.rstrip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text, count=1)
    if "<!-- compare:end -->" in text:
        return text.replace("<!-- compare:end -->", f"{block}\n\n<!-- compare:end -->", 1)
    return f"{text.rstrip()}\n\n<!-- compare:begin -->\n{block}\n\n<!-- compare:end -->\n"


def environment() -> str:
    from importlib import metadata

    import cryptography
    import datafold
    import lmdb

    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    built = "not built"
    with contextlib.suppress(ImportError):
        from datafold import _core  # type: ignore[attr-defined]

        built = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(os.path.getmtime(_core.__file__)))
    versions = [
        f"datafold {datafold.__version__} (default core: {datafold.CORE}; Rust extension built {built})",
        f"CPython {platform.python_version()}",
        f"cryptography {cryptography.__version__}",
        f"py-lmdb {metadata.version('lmdb')} (LMDB {'.'.join(map(str, lmdb.version()))})",
        f"age {tool_version(['age', '--version'])}",
        tool_version(["restic", "version"]),
        tool_version(["borg", "--version"]),
        f"mdb_copy: {tool_version(['mdb_copy', '-V'])}",
    ]
    return (
        f"- CPU: {cpu}, {os.cpu_count()} logical cores; memory {mem / 2**30:.1f} GiB; {platform.platform()}\n"
        f"- {'; '.join(versions)}\n"
    )


@contextlib.contextmanager
def workdir(parent: str | None) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="datafold-compare-", dir=parent) as name:
        yield Path(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the full datasets (default 1.0)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per cell; the median is reported (default 5)")
    parser.add_argument("--only", action="append", choices=PARTS, help="run only this part (repeatable; default: all)")
    parser.add_argument("--no-write", action="store_true", help="print only: leave docs/ untouched")
    parser.add_argument(
        "--docs", type=Path, default=DOCS, help=f"the Markdown file to update (default {DOCS.relative_to(ROOT)})"
    )
    parser.add_argument("--no-pure", action="store_true", help="leave out the pure-Python core")
    parser.add_argument(
        "--pure-budget",
        type=float,
        default=120.0,
        help="a datafold row whose first run (backup + verify + restore) takes longer is timed once; the pure "
        "core's incremental is stopped after this long (default 120 s)",
    )
    parser.add_argument(
        "--memory-mib",
        type=int,
        help=f"memory benchmark database size; it also runs at 4x (default {MEMORY_BASE_MIB} MiB x --scale)",
    )
    parser.add_argument("--tmpdir", help="where the databases, backups and repositories go (default: $TMPDIR)")
    parser.add_argument("--memory-child", nargs=3, metavar=("OP", "DB", "BACKUP"), help=argparse.SUPPRESS)
    parser.add_argument("--incremental-child", nargs=3, metavar=("DB", "PARENT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    if args.incremental_child:
        incremental_child(*args.incremental_child)
        return
    parts = args.only or list(PARTS)
    base_mib = args.memory_mib or max(1, round(MEMORY_BASE_MIB * args.scale))

    started = time.perf_counter()
    sections: dict[str, str] = {"env": environment()}
    results: list[Result] = []
    bars: list[Bar] = []
    with workdir(args.tmpdir) as tmp:
        for name in ("small", "large"):
            if name in parts:
                result = bench_dataset(name, args.scale, tmp, args.repeat, args.pure_budget, not args.no_pure)
                results.append(result)
                bars += result.bars
                sections[name] = render_dataset(result, args.repeat, args.scale)
        if "incremental" in parts:
            inc = bench_incremental(args.scale, tmp, args.repeat, args.pure_budget, not args.no_pure)
            inc_bars = incremental_bars(inc)
            bars += inc_bars
            sections["incremental"] = render_incremental(inc, inc_bars, args.repeat, args.scale)
        if "compression" in parts:
            comp = bench_compression(args.scale, tmp, args.repeat, not args.no_pure)
            comp_bars = compression_bars(comp)
            bars += comp_bars
            sections["compression"] = render_compression(comp, comp_bars, args.repeat, args.scale)
        if "memory" in parts:
            sections["memory"], memory_bars = bench_memory([base_mib, 4 * base_mib], tmp)
            bars += memory_bars

    chart_note = ""
    if args.no_write:
        chart_note = "chart not drawn (--no-write)"
    elif {"small", "large"} <= set(parts):
        chart_note = draw_chart(results, args.docs.parent / CHART_NAME)
        if not chart_note:
            sections["chart"] = f"![datafold vs peers, MB/s]({CHART_NAME})\n"
    else:
        chart_note = "chart not redrawn: it needs small and large in one run"
    took = time.perf_counter() - started
    sections["env"] += f"- Last run: `{' '.join(['python benches/compare.py', *sys.argv[1:]])}`, {took:.0f} s.\n"
    sections["env"] += "\nHow to read the tables:\n\n" + TABLE_NOTES

    out = [sections[k] for k in ("env", *PARTS, "chart") if k in sections]
    print("\n".join(out))
    print("Bars:")
    for bar in bars:
        print(f"  {bar.line()}")
    if chart_note:
        print(f"Note: {chart_note}")
    print(f"Total wall time: {took:.0f} s")
    if not args.no_write:
        text = args.docs.read_text()
        for name, content in sections.items():
            text = replace_region(text, name, content)
        args.docs.write_text(text)
        log(f"wrote {args.docs}" + (f" and {args.docs.parent / CHART_NAME}" if "chart" in sections else ""))


if __name__ == "__main__":
    main()
