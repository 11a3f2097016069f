#!/usr/bin/env python3
"""Side-by-side comparison of datafold with other ways to back up the same LMDB database.

    python benches/compare.py                          # full datasets, median of 3, ~20 min, writes docs/
    python benches/compare.py --scale 0.02 --repeat 1 --no-write     # a smoke run (~30 s)
    python benches/compare.py --only memory --memory-mib 512         # the memory benchmark alone

Data: benches/datasets.py's "small" (2M text records of ~17 + 100 bytes in 4 trees) and "large"
(256 x 1 MiB random values), scaled by --scale, written once into an LMDB database that every
contender backs up. For each dataset one table, the median of --repeat runs per cell:

- datafold's EncryptedBackupManager with the Rust core and with the pure-Python core (defaults:
  create_backup fsyncs and re-reads the file; restore_backup verifies first, writes one fsynced
  LMDB transaction into a fresh database, then checks the tree digests), and the Rust core with the
  verify passes off;
- `mdb_copy -c DB | age -r KEY -o out` + fsync of out; restore `age -d -o data.mdb` + fsync; verify
  `age -d > /dev/null`;
- `restic backup` / `restore` / `check --read-data`, `borg create` / `extract` / `check
  --verify-data` (fresh repository per run, init untimed, outputs fsynced);
- limits: `dd if=data.mdb of=out bs=1M conv=fdatasync` (the disk), AES-256-GCM of the same bytes
  with `cryptography` over 1 MiB chunks on one thread, divided by LIMIT_THREADS, and LMDB's own
  bulk load of the same records (putmulti append=True, one synced transaction).

Then the bars of issue 5 as PASS / MISS lines, a memory benchmark (peak anonymous RSS growth of
create_backup and restore_backup, each in its own process, at --memory-mib and 4x that), and a bar
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
ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "BENCHMARKS.md"
CHART_NAME = "benchmarks.png"  # beside the docs file

# Row names (the bars look rows up by these).
RUST = "datafold, Rust core"
RUST_FAST = "datafold, Rust core, verify passes off"
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
    from datafold import DbOperations, EncryptedBackupManager, MasterKeyPair
    from datafold.options import BackupOptions, RestoreOptions

    if verify_passes:
        row = Row(name, "defaults")
        backup_options, restore_options = BackupOptions(), RestoreOptions()
    else:
        row = Row(name, "verify_during_creation, verify_before_restore, verify_after_restore off")
        backup_options = BackupOptions(verify_during_creation=False)
        restore_options = RestoreOptions(verify_before_restore=False, verify_after_restore=False)
    master = MasterKeyPair.from_private_bytes(MASTER_SEED)

    def body() -> None:
        with DbOperations.open(bench.source) as source:
            manager = EncryptedBackupManager(source, master, core=core)
            for i in range(bench.repeat):
                started = time.perf_counter()
                backup = bench.tmp / "datafold.dfb"
                row.add("backup", timed(manager.create_backup, backup, backup_options))
                if verify_passes:
                    metadata = row.add("verify", timed(manager.verify_backup, backup))
                    assert metadata.total_items == bench.records
                target_path = fresh(bench.tmp / "datafold-restore")
                with DbOperations.open(target_path) as target:
                    restorer = EncryptedBackupManager(target, master, core=core)
                    stats = row.add("restore", timed(restorer.restore_backup, backup, restore_options))
                assert stats.items_restored == bench.records
                shutil.rmtree(target_path)
                backup.unlink()
                took = time.perf_counter() - started
                if i == 0 and bench.repeat > 1 and took > bench.pure_budget:
                    row.note += f"; timed once: one run took {took:.0f} s (> --pure-budget {bench.pure_budget:.0f} s)"
                    break

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
    dataset = datasets.DATASETS[name](scale)
    log(f"{name}: generating {dataset.records:,} records")
    items = dataset.materialize()
    records = sum(map(len, items.values()))
    nbytes = sum(len(k) + len(v) for tree in items.values() for k, v in tree)
    source = tmp / f"{name}-lmdb"
    log(f"{name}: filling the source LMDB database ({nbytes / 1e6:,.1f} MB)")
    dataset.fill_lmdb(source, items)
    bench = Bench(items, source, tmp, repeat, pure_budget, records)
    result = Result(name, records, nbytes, bench.data_file.stat().st_size)
    result.rows.append(datafold_row(bench, "rust", RUST, True))
    result.rows.append(datafold_row(bench, "rust", RUST_FAST, False))
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
        bars.append(Bar(label, "PASS" if share >= 0.3 else "MISS", f"{share:.0%} of it (bar >= 30%)"))
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
    lines += ["", "Bars (issue 5):", ""] + [f"- **{b.verdict}** {_cell(b.label)}: {b.detail}" for b in result.bars]
    return "\n".join(lines) + "\n"


TABLE_NOTES = """\
- MB/s = keys + values / wall time (1 MB = 1e6 B) for every row, whatever the tool reads or
  writes. vs rust = this row's time / the Rust core's time: 3.00 means datafold's Rust core is 3x
  faster, 0.50 that this row is twice as fast.
- datafold rows: EncryptedBackupManager on the LMDB database, default options unless said:
  create_backup writes, fsyncs and re-reads (verifies) the file before its rename; verify_backup is
  one authenticated pass; restore_backup verifies the file, writes into a fresh LMDB database in
  one fsynced transaction, then checks each tree's digest.
- Peers restore into a fresh directory; restic and borg get a fresh repository per run (init not
  timed). Every output (age file, repository, restored files) is fsynced inside the timed region.
  Wall time of the whole command, process start and key derivation included.
- Limits: the dd row is the disk's throughput for the LMDB file; the AES-GCM row is one thread of
  OpenSSL (through `cryptography`) over the same bytes, divided by the thread count; the LMDB
  bulk load writes the records already in memory, sorted, in one synced transaction.
"""


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
    """In a fresh process: one create_backup or restore_backup (Rust core, defaults). Prints the
    baseline RssAnon (after imports and opening the database) as a JSON line before it starts."""
    from datafold import DbOperations, EncryptedBackupManager, MasterKeyPair

    with DbOperations.open(db_path) as db:
        manager = EncryptedBackupManager(db, MasterKeyPair.from_private_bytes(MASTER_SEED), core="rust")
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
        need = int(size * MIB * 3.2) + 2 * 1024 * MIB  # source + backup + restored copy, and slack
        free = shutil.disk_usage(tmp).free
        if free < need:
            skipped[size] = f"skipped: needs ~{need / 2**30:.0f} GiB free in {tmp}, {free / 2**30:.0f} GiB free"
            lines.append(f"| {size:,} MiB | – | {skipped[size]} | | | | | |")
            log(f"memory: {size} MiB {skipped[size]}")
            continue
        dataset = datasets.large_of_size(size * MIB, name=f"memory-{size}")
        source, backup, target = tmp / f"mem-src-{size}", tmp / f"mem-{size}.dfb", tmp / f"mem-restore-{size}"
        log(f"memory: filling a {size} MiB database")
        dataset.fill_lmdb(source)
        for op, db in (("backup", source), ("restore", target)):
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
        shutil.rmtree(source, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)
        backup.unlink(missing_ok=True)
    lines += [
        "",
        "- RssAnon before = after imports and opening the database; the peak is sampled from outside every "
        "~2 ms while the operation runs. Anonymous memory is the heap (Python, Rust, LMDB's dirty pages of a "
        "write transaction); file-backed pages (LMDB's memory map, the page cache) do not count.",
    ]
    bars = []
    for op in ("backup", "restore"):
        for size in sizes_mib:
            label = f"memory {op} {size:,} MiB: anonymous RSS grows <= {MEMORY_BAR_MIB} MiB"
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
    parser.add_argument("--repeat", type=int, default=3, help="runs per cell; the median is reported (default 3)")
    parser.add_argument(
        "--only", action="append", choices=("small", "large", "memory"), help="run only this part (repeatable)"
    )
    parser.add_argument("--no-write", action="store_true", help="print only: leave docs/ untouched")
    parser.add_argument(
        "--docs", type=Path, default=DOCS, help=f"the Markdown file to update (default {DOCS.relative_to(ROOT)})"
    )
    parser.add_argument("--no-pure", action="store_true", help="leave out the pure-Python core")
    parser.add_argument(
        "--pure-budget",
        type=float,
        default=120.0,
        help="a datafold row whose first run (backup + verify + restore) takes longer is timed once (default 120 s)",
    )
    parser.add_argument(
        "--memory-mib",
        type=int,
        help=f"memory benchmark database size; it also runs at 4x (default {MEMORY_BASE_MIB} MiB x --scale)",
    )
    parser.add_argument("--tmpdir", help="where the databases, backups and repositories go (default: $TMPDIR)")
    parser.add_argument("--memory-child", nargs=3, metavar=("OP", "DB", "BACKUP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    parts = args.only or ["small", "large", "memory"]
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

    out = [sections[k] for k in ("env", "small", "large", "memory", "chart") if k in sections]
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
