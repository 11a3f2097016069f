#!/usr/bin/env python3
"""Side-by-side comparison of datafold with other ways to encrypt the same data.

    python benches/compare.py                 # 256 MiB bulk data + 1M small records, 3 runs
    python benches/compare.py --quick         # small sizes, 1 run: a smoke test
    python benches/compare.py --size-mib 64 --records 200000 --runs 5 --output results.md

Prints Markdown tables: the median of --runs runs per cell, MB/s (1 MB = 1e6 bytes of *payload*:
the keys and values, or the raw file) and the speed relative to datafold's Rust core
("vs rust" = datafold-rust time / this time, so > 1 means faster than datafold-rust).

1. In-memory AEAD, bulk data: datafold's one-shot encrypt_stream/decrypt_stream and its
   BackupWriter/BackupReader record path (Rust and pure cores), Python `cryptography` AES-256-GCM
   over 1 MiB chunks (the single-core OpenSSL baseline) and Google Tink's streaming AEAD
   (AES256_GCM_HKDF_1MB, the very format datafold writes; checked to decrypt datafold's output).
2. End-to-end backup and restore: datafold's EncryptedBackupManager on an LMDB database against
   `age` on the same data as one file, `mdb_dump -a | age` / `age -d | mdb_load` of the LMDB
   database, `restic` and `borg` backing up a directory holding the data file. Once with 64 KiB
   values, once with many 116-byte records (there the file tools back up the LMDB directory).
3. Peak memory of create_backup / restore_backup (Rust core), each in its own process.

Tools that are not installed are skipped with a note. Everything happens in a temporary directory
that is removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MIB = 1 << 20
SEGMENT = 1 << 20
KEY_LEN = 16
BIG_VALUE = 64 * 1024
SMALL_VALUE = 100
TREE = "data"
MASTER_SEED = bytes(range(32))  # a fixed benchmark seed, never a real key
PASSWORD = "datafold-bench-password"

# --------------------------------------------------------------------------------------- results


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
class Table:
    title: str
    ops: tuple[str, ...]
    nbytes: int
    reference: str  # the Row.name every "vs rust" is relative to
    notes: list[str] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)

    def render(self) -> str:
        ref = next((r for r in self.rows if r.name == self.reference), None)
        head = "| contender |" + "".join(f" {op} s | {op} MB/s | {op} vs rust |" for op in self.ops) + " notes |"
        lines = [f"### {self.title}", "", head, "|---|" + "---:|---:|---:|" * len(self.ops) + "---|"]
        for row in self.rows:
            cells = []
            for op in self.ops:
                t = row.median(op)
                if t is None:
                    cells += ["–", "–", "–"]
                    continue
                r = ref.median(op) if ref else None
                cells += [f"{t:.3f}", f"{self.nbytes / t / 1e6:,.0f}", f"{r / t:.2f}" if r else "–"]
            note = "; ".join(x for x in (row.note, row.error) if x)
            lines.append(f"| {_cell(row.name)} | " + " | ".join(cells) + f" | {_cell(note)} |")
        lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """Text made safe for a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, Any]:
    """(wall seconds, result) of fn(*args, **kwargs)."""
    gc.collect()
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def repeat(row: Row, op: str, runs: int, fn: Callable[..., Any], *args: Any) -> None:
    for _ in range(runs):
        row.add(op, timed(fn, *args))


def attempt(row: Row, body: Callable[[], None]) -> Row:
    """Runs one contender; a failure becomes a note in its row instead of ending the script."""
    try:
        body()
    except Exception as e:  # noqa: BLE001 - any failure of one contender is reported, not fatal
        row.error = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        print(f"  ! {row.name}: {row.error}", file=sys.stderr)
    return row


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ data


def make_items(count: int, value_size: int, pool: bytes | None = None) -> list[tuple[bytes, bytes]]:
    """16-byte counter keys (already in key order); values sliced from `pool` (random if None)."""
    pool = os.urandom(count * value_size) if pool is None else pool
    return [(i.to_bytes(KEY_LEN, "big"), pool[i * value_size : (i + 1) * value_size]) for i in range(count)]


def fill_lmdb(path: Path, items: list[tuple[bytes, bytes]]) -> None:
    from datafold import DbOperations

    with DbOperations.open(path) as db:
        db.reserve(sum(len(k) + len(v) for k, v in items), records=len(items))
        db.put_many(TREE, items)


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ------------------------------------------------------------------------------ 1. in-memory AEAD


class NullSink(io.RawIOBase):
    """Counts and discards what is written (a writable file object, as Tink requires)."""

    def __init__(self) -> None:
        super().__init__()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        n = len(data)
        self.size += n
        return n


def tink_primitive(raw_key: bytes) -> Any:
    """Tink's AES256_GCM_HKDF_1MB streaming AEAD, keyed with `raw_key` as the key value (IKM)."""
    from tink import cleartext_keyset_handle, streaming_aead
    from tink.proto import aes_gcm_hkdf_streaming_pb2, common_pb2, tink_pb2

    streaming_aead.register()
    params = aes_gcm_hkdf_streaming_pb2.AesGcmHkdfStreamingParams(
        ciphertext_segment_size=SEGMENT, derived_key_size=32, hkdf_hash_type=common_pb2.SHA256
    )
    key = aes_gcm_hkdf_streaming_pb2.AesGcmHkdfStreamingKey(version=0, params=params, key_value=raw_key)
    keyset = tink_pb2.Keyset(
        primary_key_id=1,
        key=[
            tink_pb2.Keyset.Key(
                key_data=tink_pb2.KeyData(
                    type_url="type.googleapis.com/google.crypto.tink.AesGcmHkdfStreamingKey",
                    value=key.SerializeToString(),
                    key_material_type=tink_pb2.KeyData.SYMMETRIC,
                ),
                status=tink_pb2.ENABLED,
                key_id=1,
                output_prefix_type=tink_pb2.RAW,
            )
        ],
    )
    return cleartext_keyset_handle.from_keyset(keyset).primitive(streaming_aead.StreamingAead)


def bench_aead(payload: bytes, runs: int, with_pure: bool) -> Table:
    from datafold.core import load_core
    from datafold.keys import derive_backup_key

    key = derive_backup_key(MASTER_SEED)
    aad = b"datafold compare"
    n = len(payload)
    table = Table(
        f"In-memory AEAD, {n // MIB} MiB of random bytes (datafold: all cores unless marked; the others one thread)",
        ("encrypt", "decrypt"),
        n,
        reference="datafold rust: encrypt_stream / decrypt_stream",
        notes=[
            "one-shot = datafold's `encrypt_stream`/`decrypt_stream` (bytes in, one bytes out), 1 MiB segments.",
            "BackupWriter/Reader = the backup record path: 64 KiB-value PUT records in one tree, framing and a keyed "
            "BLAKE3 digest on top of the AEAD; writes to a null sink, reads from io.BytesIO.",
            "threads=1 = the Rust core held to one thread (the default, threads=0, uses every core: 2 here); the pure "
            "core always uses one.",
            "cryptography = `AESGCM(key).encrypt/decrypt` per 1 MiB chunk (fresh nonce, output chunks kept in a list, "
            "no join): the bare OpenSSL cost, no key derivation, no framing.",
            "Tink = `tink` streaming AEAD AES256_GCM_HKDF_1MB, keyset built from the same raw key; 1 MiB writes into "
            "a null sink, 1 MiB reads from io.BytesIO.",
        ],
    )
    cores = ["rust", "pure"] if with_pure else ["rust"]
    variants = [(name, 0) for name in cores] + [("rust", 1)]
    for name, threads in variants:
        core = load_core(name)
        label = f"datafold {name}" + (", threads=1" if threads else "")
        row = Row(f"{label}: encrypt_stream / decrypt_stream", "one-shot")

        def one_shot(core: Any = core, row: Row = row, threads: int = threads) -> None:
            ct = core.encrypt_stream(key, payload, aad, SEGMENT, threads=threads)
            repeat(row, "encrypt", runs, lambda: core.encrypt_stream(key, payload, aad, SEGMENT, threads=threads))
            repeat(row, "decrypt", runs, lambda: core.decrypt_stream(key, ct, aad, SEGMENT, threads=threads))
            assert core.decrypt_stream(key, ct, aad, SEGMENT) == payload

        log(f"aead: {row.name}")
        table.rows.append(attempt(row, one_shot))

    items = make_items(n // BIG_VALUE, BIG_VALUE, payload)
    for name in cores:
        core = load_core(name)
        row = Row(f"datafold {name}: BackupWriter / BackupReader", f"{len(items)} x 64 KiB records")

        def write(sink: Any, core: Any = core) -> None:
            w = core.BackupWriter(sink, key, b"{}")
            w.begin_tree(TREE)
            w.add_items(items)
            w.end_tree()
            w.finish()

        def read(data: bytes, core: Any = core) -> None:
            r = core.BackupReader(io.BytesIO(data))
            r.unlock(key)
            count = 0
            while r.next_tree() is not None:
                while batch := r.read_items(4096):
                    count += len(batch)
            assert count == len(items)

        def records(row: Row = row, write: Any = write, read: Any = read) -> None:
            buffer = io.BytesIO()
            write(buffer)
            data = buffer.getvalue()
            del buffer
            for _ in range(runs):
                row.add("encrypt", timed(write, NullSink()))
            repeat(row, "decrypt", runs, read, data)

        log(f"aead: {row.name}")
        table.rows.append(attempt(row, records))

    row = Row("cryptography AESGCM, 1 MiB chunks", "OpenSSL baseline")

    def openssl() -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        aes = AESGCM(key)
        view = memoryview(payload)
        offsets = range(0, n, SEGMENT)

        def encrypt() -> list[bytes]:
            return [aes.encrypt(i.to_bytes(12, "big"), view[o : o + SEGMENT], None) for i, o in enumerate(offsets)]

        chunks = encrypt()

        def decrypt() -> list[bytes]:
            return [aes.decrypt(i.to_bytes(12, "big"), c, None) for i, c in enumerate(chunks)]

        assert b"".join(decrypt()) == payload
        repeat(row, "encrypt", runs, encrypt)
        repeat(row, "decrypt", runs, decrypt)

    log(f"aead: {row.name}")
    table.rows.append(attempt(row, openssl))

    row = Row("Tink streaming AEAD (AES256_GCM_HKDF_1MB)")

    def tink() -> None:
        try:
            primitive = tink_primitive(key)
        except ImportError as e:
            row.note = f"skipped: tink not installed ({e.name})"
            return
        view = memoryview(payload)

        def encrypt(sink: Any) -> None:
            with primitive.new_encrypting_stream(sink, aad) as stream:
                for o in range(0, n, SEGMENT):
                    stream.write(view[o : o + SEGMENT])

        def decrypt(ct: bytes) -> None:
            got = 0
            with primitive.new_decrypting_stream(io.BytesIO(ct), aad) as stream:
                while chunk := stream.read(SEGMENT):
                    got += len(chunk)
            assert got == n

        class Keep(io.BytesIO):
            def close(self) -> None:  # Tink closes its destination; keep the bytes readable
                pass

        keep = Keep()
        encrypt(keep)
        ct = keep.getvalue()
        # The format claim: Tink decrypts datafold's stream, datafold decrypts Tink's.
        ours = load_core("rust").encrypt_stream(key, payload[: SEGMENT * 3 + 5], aad, SEGMENT)
        with primitive.new_decrypting_stream(io.BytesIO(ours), aad) as stream:
            assert stream.read() == payload[: SEGMENT * 3 + 5]
        assert load_core("rust").decrypt_stream(key, ct, aad, SEGMENT) == payload
        row.note = "interoperates with datafold both ways (checked)"
        for _ in range(runs):
            row.add("encrypt", timed(encrypt, NullSink()))
        repeat(row, "decrypt", runs, decrypt, ct)

    log(f"aead: {row.name}")
    table.rows.append(attempt(row, tink))
    return table


# ---------------------------------------------------------------------------- 2. end-to-end tools


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(cmd, capture_output=True, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited {result.returncode}: {result.stderr.decode(errors='replace').strip()}")
    return result


def pipeline(first: list[str], second: list[str], env: dict[str, str] | None = None) -> None:
    """first | second, failing if either fails."""
    a = subprocess.Popen(first, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    b = subprocess.run(second, stdin=a.stdout, capture_output=True, env=env)
    assert a.stdout is not None
    a.stdout.close()
    a_err = a.stderr.read() if a.stderr else b""
    if a.wait() != 0 or b.returncode != 0:
        raise RuntimeError(f"{first[0]} | {second[0]} failed: {(a_err + b.stderr).decode(errors='replace').strip()}")


def tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "not installed"


@dataclass
class Workload:
    label: str
    nbytes: int  # payload bytes
    lmdb: Path  # the LMDB database datafold backs up
    data_dir: Path  # the directory the file tools back up
    records: int


def tools_rows(work: Workload, tmp: Path, runs: int) -> list[Row]:
    rows = []
    env = dict(os.environ)
    env.update(
        RESTIC_PASSWORD=PASSWORD,
        RESTIC_CACHE_DIR=str(tmp / "restic-cache"),
        BORG_PASSPHRASE=PASSWORD,
        BORG_BASE_DIR=str(tmp / "borg-base"),
        BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
    )
    files = sorted(p for p in work.data_dir.rglob("*") if p.is_file())

    def scratch(name: str) -> Path:
        path = tmp / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir()
        return path

    age_key = tmp / "age-key.txt"
    have_age = shutil.which("age") is not None and shutil.which("age-keygen") is not None
    recipient = ""
    if have_age:
        if not age_key.exists():
            run(["age-keygen", "-o", str(age_key)])
        recipient = run(["age-keygen", "-y", str(age_key)]).stdout.decode().strip()

    # --- age on the data file(s)
    what = "the data file" if len(files) == 1 else "the LMDB directory's files"
    row = Row(f"age (X25519 recipient) on {what}", "ChaCha20-Poly1305, 64 KiB chunks; no fsync")

    def age_files() -> None:
        if not have_age:
            row.note = "skipped: age not installed (apt-get install age)"
            return

        def encrypt(out: Path) -> None:
            for f in files:
                run(["age", "-r", recipient, "-o", str(out / f"{f.name}.age"), str(f)])

        def decrypt(out: Path, back: Path) -> None:
            for f in files:
                run(["age", "-d", "-i", str(age_key), "-o", str(back / f.name), str(out / f"{f.name}.age")])

        for _ in range(runs):
            out, back = scratch("age-out"), scratch("age-back")
            row.add("backup", timed(encrypt, out))
            row.add("restore", timed(decrypt, out, back))
            assert all((back / f.name).stat().st_size == f.stat().st_size for f in files)

    log(f"{work.label}: {row.name}")
    rows.append(attempt(row, age_files))

    # --- mdb_dump | age  and  age -d | mdb_load
    row = Row("mdb_dump -a | age, age -d | mdb_load", "LMDB's own text dump, encrypted")

    def dump_age() -> None:
        if not have_age or not shutil.which("mdb_dump") or not shutil.which("mdb_load"):
            row.note = "skipped: needs age and lmdb-utils (apt-get install age lmdb-utils)"
            return
        for _ in range(runs):
            out, back = scratch("dump-out"), scratch("dump-back")
            dump = out / "dump.age"
            row.add(
                "backup", timed(pipeline, ["mdb_dump", "-a", str(work.lmdb)], ["age", "-r", recipient, "-o", str(dump)])
            )
            row.add("restore", timed(pipeline, ["age", "-d", "-i", str(age_key), str(dump)], ["mdb_load", str(back)]))
            count = run(["mdb_stat", "-s", TREE, str(back)]).stdout.decode()
            assert f"Entries: {work.records}" in count, count

    log(f"{work.label}: {row.name}")
    rows.append(attempt(row, dump_age))

    # --- restic
    row = Row("restic backup / restore", "AES-256-CTR + Poly1305, SHA-256 CDC; multi-threaded")

    def restic() -> None:
        if not shutil.which("restic"):
            row.note = "skipped: restic not installed (apt-get install restic)"
            return
        for _ in range(runs):
            repo, back = scratch("restic-repo"), scratch("restic-back")
            base = ["restic", "-r", str(repo), "-q", "--compression", "off"]
            run(["restic", "-r", str(repo), "-q", "init", "--repository-version", "2"], env=env)
            row.add("backup", timed(run, [*base, "backup", work.data_dir.name], env=env, cwd=work.data_dir.parent))
            row.add("restore", timed(run, [*base, "restore", "latest", "--target", str(back)], env=env))
            assert tree_bytes(back) == tree_bytes(work.data_dir)
        row.note += "; `--compression off`, repo v2, fresh repo per run (init untimed)"

    log(f"{work.label}: {row.name}")
    rows.append(attempt(row, restic))

    # --- borg
    row = Row("borg create / extract (repokey-blake2)", "AES-256-CTR + BLAKE2b, buzhash CDC")

    def borg() -> None:
        if not shutil.which("borg"):
            row.note = "skipped: borg not installed (apt-get install borgbackup)"
            return
        for _ in range(runs):
            repo, back = scratch("borg-repo"), scratch("borg-back")
            shutil.rmtree(repo)
            run(["borg", "init", "-e", "repokey-blake2", str(repo)], env=env)
            create = ["borg", "create", "--compression", "none", f"{repo}::bench", work.data_dir.name]
            row.add("backup", timed(run, create, env=env, cwd=work.data_dir.parent))
            row.add("restore", timed(run, ["borg", "extract", f"{repo}::bench"], env=env, cwd=back))
            assert tree_bytes(back) == tree_bytes(work.data_dir)
        row.note += "; `--compression none`, fresh repo per run (init untimed)"

    log(f"{work.label}: {row.name}")
    rows.append(attempt(row, borg))
    shutil.rmtree(tmp / "restic-cache", ignore_errors=True)
    shutil.rmtree(tmp / "borg-base", ignore_errors=True)
    return rows


def bench_end_to_end(work: Workload, tmp: Path, runs: int, with_pure: bool, with_tools: bool) -> Table:
    from datafold import DbOperations, EncryptedBackupManager, MasterKeyPair
    from datafold.options import BackupOptions, RestoreOptions

    master = MasterKeyPair.from_private_bytes(MASTER_SEED)
    table = Table(
        f"End-to-end backup and restore, {work.label}",
        ("backup", "restore"),
        work.nbytes,
        reference="datafold rust (defaults)",
        notes=[
            f"MB/s over the payload ({work.nbytes / 1e6:,.1f} MB of keys + values) for every row, whatever the "
            f"tool reads or writes; the LMDB database is {tree_bytes(work.lmdb) / 1e6:,.1f} MB on disk.",
            "datafold defaults: create_backup writes, fsyncs and re-reads (verifies) the file; restore_backup "
            "verifies the file, restores in one LMDB transaction (fsynced commit), then checks tree digests.",
            "'no verify' = verify_during_creation=False, verify_before_restore=False, verify_after_restore=False "
            "(restore still authenticates every segment as it reads).",
            "Restores go to a fresh empty LMDB database / directory per run. Wall time of the whole command, "
            "process start and key derivation included for the tools.",
        ],
    )
    variants = [
        ("rust", "datafold rust (defaults)", BackupOptions(), RestoreOptions()),
        (
            "rust",
            "datafold rust (no verify)",
            BackupOptions(verify_during_creation=False),
            RestoreOptions(verify_before_restore=False, verify_after_restore=False),
        ),
    ]
    if with_pure:
        variants.append(("pure", "datafold pure (defaults)", BackupOptions(), RestoreOptions()))
    for core, name, backup_options, restore_options in variants:
        row = Row(name, "EncryptedBackupManager, LMDB to LMDB")

        def manager(core: str = core, row: Row = row, bo: Any = backup_options, ro: Any = restore_options) -> None:
            with DbOperations.open(work.lmdb) as source:
                for i in range(runs):
                    backup = tmp / f"e2e-{i}.dfb"
                    src = EncryptedBackupManager(source, master, core=core)
                    row.add("backup", timed(src.create_backup, backup, bo))
                    target_path = tmp / f"e2e-restore-{i}"
                    with DbOperations.open(target_path) as target:
                        dst = EncryptedBackupManager(target, master, core=core)
                        stats = row.add("restore", timed(dst.restore_backup, backup, ro))
                        assert stats.items_restored == work.records
                    shutil.rmtree(target_path)
                    backup.unlink()

        log(f"{work.label}: {name}")
        table.rows.append(attempt(row, manager))
    if with_tools:
        table.rows += tools_rows(work, tmp, runs)
    return table


# ---------------------------------------------------------------------------------- 3. peak RSS


def _status(pid: int | str) -> dict[str, int]:
    """The kB fields of /proc/<pid>/status (VmRSS, VmHWM, RssAnon, RssFile, ...), in bytes."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            parts = value.split()
            if len(parts) == 2 and parts[1] == "kB":
                fields[name] = int(parts[0]) * 1024
    return fields


def rss_child(op: str, db_path: str, backup: str) -> None:
    """In a fresh process: run one create_backup or restore_backup and print memory figures as JSON."""
    from datafold import DbOperations, EncryptedBackupManager, MasterKeyPair

    with DbOperations.open(db_path) as db:
        manager = EncryptedBackupManager(db, MasterKeyPair.from_private_bytes(MASTER_SEED), core="rust")
        before = _status("self")
        if op == "create":
            manager.create_backup(backup)
        else:
            manager.restore_backup(backup)
        after = _status("self")
    print(json.dumps({"baseline_rss": before["VmRSS"], "vmhwm": after["VmHWM"]}))


def measure_rss(op: str, db_path: Path, backup: Path) -> dict[str, int]:
    """Runs rss_child in a subprocess and samples its RssAnon / RssFile every ~2 ms from outside."""
    cmd = [sys.executable, os.path.abspath(__file__), "--rss-child", op, str(db_path), str(backup)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak_anon = peak_file = 0
    while proc.poll() is None:
        try:
            status = _status(proc.pid)
        except (FileNotFoundError, ProcessLookupError):
            break
        peak_anon = max(peak_anon, status.get("RssAnon", 0))
        peak_file = max(peak_file, status.get("RssFile", 0))
        time.sleep(0.002)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"rss child ({op}) failed: {err.decode(errors='replace').strip()[-300:]}")
    report = json.loads(out.decode().strip().splitlines()[-1])
    report.update(peak_anon=peak_anon, peak_file=peak_file)
    return report


def bench_rss(sizes_mib: list[int], tmp: Path) -> str:
    lines = [
        "### Peak memory, Rust core, LMDB database of 64 KiB values (one process per operation)",
        "",
        "| database | operation | RSS before | peak RSS (VmHWM) | peak anonymous RSS | peak file-backed RSS |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for size in sizes_mib:
        db = tmp / f"rss-src-{size}"
        backup = tmp / f"rss-{size}.dfb"
        log(f"rss: {size} MiB")
        fill_lmdb(db, make_items(size * MIB // BIG_VALUE, BIG_VALUE))
        for op, path in (("create", db), ("restore", tmp / f"rss-restore-{size}")):
            try:
                r = measure_rss(op, path, backup)
            except Exception as e:  # noqa: BLE001 - reported in the table
                lines.append(f"| {size} MiB | {op}_backup | failed: {e} | | | |")
                continue
            mib = [f"{r[k] / MIB:,.0f} MiB" for k in ("baseline_rss", "vmhwm", "peak_anon", "peak_file")]
            lines.append(f"| {size} MiB | {op}_backup | " + " | ".join(mib) + " |")
        shutil.rmtree(db)
        shutil.rmtree(tmp / f"rss-restore-{size}", ignore_errors=True)
        backup.unlink(missing_ok=True)
    lines += [
        "",
        "- RSS before = after imports and opening the database. Anonymous RSS = heap (Python, Rust, LMDB's "
        "dirty pages of a write transaction); file-backed = pages of LMDB's memory map and shared libraries, "
        "i.e. page cache that the kernel can drop. Anonymous / file-backed peaks are sampled from outside every ~2 ms.",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- main


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
    try:
        tink_version = metadata.version("tink")
    except metadata.PackageNotFoundError:
        tink_version = "not installed"
    built = "not built"
    with contextlib.suppress(ImportError):
        from datafold import _core  # type: ignore[attr-defined]

        built = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(os.path.getmtime(_core.__file__)))
    versions = [
        f"datafold {datafold.__version__} (default core: {datafold.CORE}; Rust extension built {built})",
        f"CPython {platform.python_version()}",
        f"cryptography {cryptography.__version__}",
        f"blake3 {metadata.version('blake3')}",
        f"py-lmdb {metadata.version('lmdb')} (LMDB {'.'.join(map(str, lmdb.version()))})",
        f"tink {tink_version}",
        f"age {tool_version(['age', '--version'])}",
        tool_version(["restic", "version"]),
        tool_version(["borg", "--version"]),
        f"mdb_dump: {tool_version(['mdb_dump', '-V'])}",
    ]
    return (
        f"- CPU: {cpu}, {os.cpu_count()} logical cores; memory {mem / 2**30:.1f} GiB; {platform.platform()}\n"
        f"- {'; '.join(versions)}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=256, help="bulk data size (default 256)")
    parser.add_argument("--records", type=int, default=1_000_000, help="small-record count (default 1M x 116 B)")
    parser.add_argument("--runs", type=int, default=3, help="runs per cell; the median is reported (default 3)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 MiB, 20k records, 1 run")
    parser.add_argument("--no-pure", action="store_true", help="leave out the pure-Python core")
    parser.add_argument("--no-tools", action="store_true", help="leave out age, restic, borg and mdb_dump")
    parser.add_argument("--output", type=Path, help="also write the Markdown to this file")
    parser.add_argument("--rss-child", nargs=3, metavar=("OP", "DB", "BACKUP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(*args.rss_child)
        return
    if args.quick:
        args.size_mib, args.records, args.runs = 8, 20_000, 1
    rss_sizes = sorted({min(64, args.size_mib), args.size_mib}) if not args.quick else [4, 8]

    started = time.perf_counter()
    out = [f"## datafold comparison ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "", environment()]
    out.append(f"Median of {args.runs} run(s) per cell; 1 MB = 1e6 bytes.\n")
    with tempfile.TemporaryDirectory(prefix="datafold-compare-") as name:
        tmp = Path(name)
        log(f"generating {args.size_mib} MiB of random data")
        payload = os.urandom(args.size_mib * MIB)
        out.append(bench_aead(payload, args.runs, not args.no_pure).render())

        bulk_dir = tmp / "bulk-data"
        bulk_dir.mkdir()
        (bulk_dir / "data.bin").write_bytes(payload)
        big_items = make_items(len(payload) // BIG_VALUE, BIG_VALUE, payload)
        del payload
        log("filling the bulk LMDB database")
        fill_lmdb(tmp / "bulk-lmdb", big_items)
        bulk = Workload(
            f"{args.size_mib} MiB as {len(big_items)} x 64 KiB values",
            sum(len(k) + len(v) for k, v in big_items),
            tmp / "bulk-lmdb",
            bulk_dir,
            len(big_items),
        )
        del big_items
        out.append(bench_end_to_end(bulk, tmp, args.runs, not args.no_pure, not args.no_tools).render())
        shutil.rmtree(bulk_dir)
        shutil.rmtree(bulk.lmdb)

        log(f"filling the small-record LMDB database ({args.records} records)")
        small_dir = tmp / "small-lmdb"
        fill_lmdb(small_dir, make_items(args.records, SMALL_VALUE))
        small = Workload(
            f"{args.records:,} records of 16 + 100 bytes",
            args.records * (KEY_LEN + SMALL_VALUE),
            small_dir,
            small_dir,
            args.records,
        )
        out.append(bench_end_to_end(small, tmp, args.runs, not args.no_pure, not args.no_tools).render())
        shutil.rmtree(small_dir)

        out.append(bench_rss(rss_sizes, tmp))
    out.append(f"Total wall time of this comparison: {time.perf_counter() - started:.0f} s.\n")
    text = "\n".join(out)
    print(text)
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
