"""datafold-backup: the command line of datafold (also `python -m datafold`).

Exit codes: 0 success; 1 usage error (bad command line or option value, an existing key file);
2 integrity, format or version problem with a backup; 3 key problem; 4 I/O or store problem;
5 a restore with --continue-on-errors that left records out.
Errors are one human message on stderr (no traceback unless --debug); with --json also a JSON
object on stdout. README.md ("Command line") documents the commands and the JSON fields.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any, NoReturn

from . import __version__
from .atomic import AtomicFile
from .core import core as _core
from .errors import (
    FILE_ERRORS,
    ArgumentTypeError,
    BackupError,
    BackupFileNotFoundError,
    BackupIOError,
    CryptoError,
    DatabaseError,
    EncryptionKeyError,
    FormatError,
    IntegrityError,
    InvalidArgumentError,
    StoreError,
    VersionMismatchError,
)
from .keys import MasterKeyPair, derive_backup_key, derive_key_id
from .manager import EncryptedBackupManager, open_backup_file
from .metadata import BackupMetadata
from .options import BackupMode, BackupOptions, RestoreOptions
from .passphrase import KDF_ARGON2ID, WRONG_PASSPHRASE, Passphrase, decode_kdf_params
from .progress import ProgressEvent
from .stores import DbOperations
from .stores.sqlite import LOCKED_HINT

__all__ = ["main", "EXIT_OK", "EXIT_USAGE", "EXIT_BACKUP", "EXIT_KEY", "EXIT_IO", "EXIT_PARTIAL", "PASSPHRASE_ENV"]

PROG = "datafold-backup"
EXIT_OK, EXIT_USAGE, EXIT_BACKUP, EXIT_KEY, EXIT_IO, EXIT_PARTIAL = 0, 1, 2, 3, 4, 5
EXIT_INTERRUPTED = 130
PASSPHRASE_ENV = "DATAFOLD_PASSPHRASE"
SQLITE_MAGIC = b"SQLite format 3\x00"
SQLITE_SUFFIXES = (".sqlite", ".sqlite3", ".db")
MiB = 1 << 20


# --------------------------------------------------------------------------- errors


class CliError(Exception):
    """A failure the CLI reports itself: exit code, message and what to do."""

    code = EXIT_USAGE

    def __init__(self, message: str, hint: str | None = None, *, code: int | None = None, usage: str = "") -> None:
        super().__init__(message)
        self.hint = hint
        self.usage = usage
        if code is not None:
            self.code = code


class UsageError(CliError):
    code = EXIT_USAGE


class KeyProblem(CliError):
    code = EXIT_KEY


def exit_code(exc: BaseException) -> int:
    """The documented exit code of an exception (the one place that maps them)."""
    if isinstance(exc, CliError):
        return exc.code
    if isinstance(exc, (InvalidArgumentError, ArgumentTypeError)):
        return EXIT_USAGE
    if isinstance(exc, (FormatError, VersionMismatchError, IntegrityError, CryptoError)):
        return EXIT_BACKUP
    if isinstance(exc, EncryptionKeyError):
        return EXIT_KEY
    if isinstance(exc, (BackupFileNotFoundError, BackupIOError, StoreError, DatabaseError, OSError)):
        return EXIT_IO
    return EXIT_USAGE  # not raised on purpose: an internal error, reported with a request for --debug


# The stores' words for a key or tree name LMDB cannot hold (stores/lmdb.py, src/lmdb_write.rs).
_LMDB_LIMITS = ("LMDB keys are at most", "LMDB allows at most", "LMDB cannot store an empty key")


def _member_file(exc: BaseException) -> str | None:
    """The chain member an error is about, when that is not the file the command was given."""
    return exc.file if isinstance(exc, BackupError) else None


def _hint(exc: BaseException, ctx: Context) -> str | None:
    f = _member_file(exc) or ctx.file or "the backup"
    cmd = ctx.command or "COMMAND"
    if isinstance(exc, CliError):
        return exc.hint
    if isinstance(exc, (InvalidArgumentError, ArgumentTypeError)):
        return f"see `{PROG} {cmd} --help`"
    if isinstance(exc, VersionMismatchError):
        if exc.found < exc.expected:
            return f"{f} has a format version no datafold release wrote: it is damaged or not a datafold backup"
        return f"{f} was written by a newer datafold: upgrade datafold to read it"
    if isinstance(exc, FormatError):
        return f"{f} is not a datafold backup (or its first bytes are damaged): check the path"
    if isinstance(exc, IntegrityError) and ("incremental of backup" in str(exc) or "not the parent of" in str(exc)):
        # A chain that is incomplete or out of order (chain.py), not a damaged file.
        return "give every parent with --chain PARENT, oldest (the full backup) first, or keep them in one directory"
    if isinstance(exc, IntegrityError):
        rolled_back = " The database was not changed." if cmd == "restore" else ""
        return f"{f} is corrupted, truncated or was tampered with: use another copy of it.{rolled_back}"
    if isinstance(exc, CryptoError):
        return "the cryptographic library failed; rerun with --debug and report it"
    if isinstance(exc, EncryptionKeyError):
        if exc.file is not None:  # a chain member: its key kind may not be the named backup's
            return f"a chain's backups need one key; `{PROG} inspect {f}` shows which key {f} needs"
        if ctx.key_kind == "passphrase":
            return f"{f} needs the passphrase it was made with (--passphrase-file FILE or ${PASSPHRASE_ENV})"
        if ctx.key_kind == "master-key":
            return (
                f"{f} needs the master key file it was made with (--key KEYFILE); `{PROG} inspect {f}` shows its key id"
            )
        return f"check --key / --passphrase-file / ${PASSPHRASE_ENV}; `{PROG} inspect {f}` shows which key it needs"
    if isinstance(exc, BackupFileNotFoundError):
        return "check the path"
    if isinstance(exc, StoreError) and cmd == "restore" and any(m in str(exc) for m in _LMDB_LIMITS):
        # A key or tree name beyond LMDB's limits: the backup holds what this store cannot.
        if "tree name" in str(exc):  # not a record: --continue-on-errors does not skip a tree
            return (
                "LMDB cannot hold that tree name: restore into an SQLite database (--db-backend sqlite), "
                "or name the other trees with --tree to leave it out"
            )
        return (
            "LMDB cannot hold that record: restore into an SQLite database (--db-backend sqlite), "
            "or add --continue-on-errors to restore everything else (exit code 5)"
        )
    if isinstance(exc, StoreError) and LOCKED_HINT in str(exc):
        return "wait until the other process is done with the database, then run the command again"
    if isinstance(exc, (StoreError, DatabaseError)):
        return f"check the database path{' ' + ctx.database if ctx.database else ''} and --db-backend"
    if isinstance(exc, OSError):
        if cmd in ("verify", "inspect", "list"):
            return "check that the path exists and that you may read it"
        return "check that the path exists, that its directory is writable and that the disk has free space"
    return "this is a bug in datafold: rerun with --debug and report the traceback"


# --------------------------------------------------------------------------- output


def _shown(name: str) -> str:
    """`name` fit for one line of a terminal: as is when every character is printable, else
    quoted with escapes (as `ls` quotes names), so a file or tree name holding a newline or an
    escape sequence can neither break a table nor drive the terminal. A byte that is not UTF-8
    (held as a surrogate by os.fsdecode) shows as \\xNN."""
    if name.isprintable():
        return name
    out = []
    for ch in name:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # surrogateescape of an undecodable byte
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch in "\\'":
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(repr(ch)[1:-1])  # \n, \t, \x1b, \u200b, ...
    return "'" + "".join(out) + "'"


def _count(n: int | None) -> str:
    return "?" if n is None else f"{n:,}"


def _n(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _size(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} TiB"


def _rate(nbytes: int, seconds: float) -> str:
    return f"{_size(nbytes / seconds)}/s" if seconds > 0 else "-"


def _clock(seconds: float) -> str:
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _per_s(nbytes: int, seconds: float) -> float | None:
    return round(nbytes / seconds, 1) if seconds > 0 else None


class _PhaseClock:
    """Elapsed time, fraction done and ETA of the phase an event belongs to."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def measure(self, ev: ProgressEvent) -> tuple[float, float | None, float | None]:
        now = time.monotonic()
        if not ev.done and ev.items == 0 and ev.bytes == 0:
            self.start = now
        elapsed = now - self.start
        fraction: float | None = None
        if ev.total_bytes:
            fraction = min(1.0, ev.bytes / ev.total_bytes)
        elif ev.total_items:
            fraction = min(1.0, ev.items / ev.total_items)
        elif ev.done:
            fraction = 1.0
        eta = None
        if fraction is not None and fraction > 0:
            eta = 0.0 if ev.done else elapsed * (1 - fraction) / fraction
        return elapsed, fraction, eta


class ProgressBar:
    """One line on a terminal, redrawn with \\r at most 10 times a second."""

    WIDTH = 16

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.clock = _PhaseClock()
        self.last = 0.0
        self.phase = ""
        self.drawn = False

    def __call__(self, ev: ProgressEvent) -> None:
        elapsed, fraction, eta = self.clock.measure(ev)
        now = time.monotonic()
        if ev.done:
            self.clear()
            return
        if now - self.last < 0.1 and ev.phase == self.phase:
            return
        self.last, self.phase = now, ev.phase
        # Most important first, so that a narrow terminal cuts off the least useful part.
        parts = [f"{ev.phase:<7}"]
        if fraction is not None:
            filled = int(fraction * self.WIDTH)
            parts.append(f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {fraction * 100:3.0f}%")
        if eta is not None and elapsed > 0.2:
            parts.append(f"ETA {_clock(eta)}")
        if elapsed > 0.05:
            parts.append(_rate(ev.bytes, elapsed) if ev.bytes else f"{_count(int(ev.items / elapsed))} items/s")
        parts.append(f"{_count(ev.items)}" + (f"/{_count(ev.total_items)}" if ev.total_items else "") + " items")
        if ev.bytes or ev.total_bytes:
            parts.append(_size(ev.bytes) + (f" of {_size(ev.total_bytes)}" if ev.total_bytes else ""))
        line = "  ".join(parts)
        width = max(20, shutil.get_terminal_size((100, 20)).columns - 1)
        self.stream.write("\r" + line[:width] + "\x1b[K")
        self.stream.flush()
        self.drawn = True

    def clear(self) -> None:
        if self.drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.drawn = False


class JsonProgress:
    """Progress events as JSON lines: every phase's first and last event, at most 10 a second between."""

    def __init__(self, out: Output, command: str) -> None:
        self.out = out
        self.command = command
        self.clock = _PhaseClock()
        self.last = 0.0

    def __call__(self, ev: ProgressEvent) -> None:
        elapsed, fraction, eta = self.clock.measure(ev)
        now = time.monotonic()
        first = not ev.done and ev.items == 0 and ev.bytes == 0
        if not (first or ev.done) and now - self.last < 0.1:
            return
        self.last = now
        self.out.emit(
            "progress",
            self.command,
            phase=ev.phase,
            items=ev.items,
            total_items=ev.total_items,
            bytes=ev.bytes,
            total_bytes=ev.total_bytes,
            percent=None if fraction is None else round(fraction * 100, 1),
            elapsed_s=round(elapsed, 3),
            bytes_per_s=_per_s(ev.bytes, elapsed),
            eta_s=None if eta is None else round(eta, 1),
            done=ev.done,
        )


class Output:
    """Where each kind of output goes: text on stdout, progress on stderr (terminal only), JSON lines."""

    def __init__(self, json_mode: bool, quiet: bool) -> None:
        self.json = json_mode
        self.quiet = quiet
        self.bar: ProgressBar | None = None

    def text(self, line: str = "", *, always: bool = False) -> None:
        """Human output on stdout; --quiet drops it unless it is what the command was asked for."""
        if self.json or (self.quiet and not always):
            return
        self.clear_bar()
        print(line, flush=True)

    def emit(self, kind: str, command: str, **fields: Any) -> None:
        if self.json:
            sys.stdout.write(json.dumps({"type": kind, "command": command, **fields}, default=str) + "\n")
            sys.stdout.flush()

    def progress(self, command: str) -> Callable[[ProgressEvent], None] | None:
        if self.quiet:
            return None
        if self.json:
            return JsonProgress(self, command)
        if sys.stderr.isatty():
            self.bar = ProgressBar(sys.stderr)
            return self.bar
        return None

    def clear_bar(self) -> None:
        if self.bar is not None:
            self.bar.clear()


@dataclass
class Context:
    command: str = ""
    file: str | None = None  # the backup or key file the command is about (named in error messages)
    database: str | None = None
    key_kind: str | None = None  # what the backup needs: "master-key" or "passphrase"


# --------------------------------------------------------------------------- key sources


def _read_passphrase_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise KeyProblem(f"passphrase file {path} does not exist", "check the --passphrase-file path") from None
    except OSError as e:
        raise KeyProblem(f"cannot read passphrase file {path}: {e.strerror or e}", "check its permissions") from None
    # One trailing newline is not part of the passphrase (as restic's --password-file).
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        raise KeyProblem(f"passphrase file {path} is empty", "write the passphrase into it")
    return data


def get_passphrase(args: argparse.Namespace, prompt: str, *, confirm: bool = False) -> bytes | None:
    """The passphrase from --passphrase-file, $DATAFOLD_PASSPHRASE or a prompt on a terminal (None if none)."""
    path = getattr(args, "passphrase_file", None)
    if path:
        return _read_passphrase_file(path)
    if PASSPHRASE_ENV in os.environ:
        value = os.fsencode(os.environ[PASSPHRASE_ENV])
        if not value:
            raise KeyProblem(f"${PASSPHRASE_ENV} is set but empty", "unset it or put the passphrase in it")
        return value
    if sys.stdin.isatty():
        first = getpass.getpass(prompt)
        if not first:
            raise KeyProblem("no passphrase entered")
        if confirm and getpass.getpass("Repeat the passphrase: ") != first:
            raise KeyProblem("the two passphrases differ", "run the command again")
        return first.encode("utf-8")
    return None


def load_key_file(path: str, args: argparse.Namespace) -> MasterKeyPair:
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
    except FileNotFoundError:
        raise KeyProblem(
            f"key file {path} does not exist", f"give the file `{PROG} keygen --out KEYFILE` wrote"
        ) from None
    except OSError as e:
        raise KeyProblem(
            f"cannot read key file {path}: {e.strerror or e}", "check the path and its permissions"
        ) from None
    passphrase = None
    if b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data:
        passphrase = get_passphrase(args, f"Passphrase for key file {path}: ")
        if passphrase is None:
            raise KeyProblem(
                f"key file {path} is protected by a passphrase",
                f"give it with --passphrase-file FILE or ${PASSPHRASE_ENV}",
            )
    try:
        return MasterKeyPair.from_pem(data, passphrase)
    except EncryptionKeyError as e:
        raise KeyProblem(f"{path}: {e}", "check the passphrase of the key file") from None
    except (InvalidArgumentError, ArgumentTypeError) as e:
        raise KeyProblem(
            f"{path} is not a datafold master key file ({e})",
            f"give the PKCS#8 PEM file `{PROG} keygen` wrote",
        ) from None


def key_source(args: argparse.Namespace, *, creating: bool, backup: str | None = None) -> MasterKeyPair | Passphrase:
    """--key KEYFILE, else a passphrase (file, environment or prompt); KeyProblem if there is none."""
    if args.key:
        return load_key_file(args.key, args)
    what = f"backup {backup}" if backup else "the backup"
    prompt = "Passphrase for the new backup: " if creating else f"Passphrase for {what}: "
    secret = get_passphrase(args, prompt, confirm=creating)
    if secret is None:
        raise KeyProblem(
            "no key given",
            f"give --key KEYFILE (from `{PROG} keygen`), or a passphrase with --passphrase-file FILE "
            f"or ${PASSPHRASE_ENV}",
        )
    return Passphrase(secret)


def check_kind(key: MasterKeyPair | Passphrase, preamble: Any, path: str) -> None:
    """KeyProblem if the backup needs the other kind of key than the one given."""
    if preamble.kdf_id == KDF_ARGON2ID and not isinstance(key, Passphrase):
        raise KeyProblem(
            f"{path} is protected by a passphrase, not by a master key file",
            f"give its passphrase with --passphrase-file FILE or ${PASSPHRASE_ENV} (and no --key)",
        )
    if preamble.kdf_id != KDF_ARGON2ID and not isinstance(key, MasterKeyPair):
        raise KeyProblem(
            f"{path} was made with a master key file, not with a passphrase",
            f"give --key KEYFILE: the key file whose backups have key id {bytes(preamble.key_id).hex()}",
        )


def check_key(key: MasterKeyPair | Passphrase, preamble: Any, path: str) -> None:
    """Raises unless `key` opens a backup with this preamble (checked before anything is written)."""
    check_kind(key, preamble, path)
    if isinstance(key, Passphrase):
        if derive_key_id(key.derive(bytes(preamble.kdf_params))) != bytes(preamble.key_id):
            raise EncryptionKeyError(WRONG_PASSPHRASE)
    elif derive_key_id(derive_backup_key(key)) != bytes(preamble.key_id):
        raise EncryptionKeyError(
            "this backup was made with a different key: use the master key (or passphrase) it was created with"
        )


def read_preamble(path: str) -> Any:
    """The plaintext preamble of a backup file (no key needed)."""
    with open_backup_file(path) as f:
        try:
            data = f.read(_core.MAX_PREAMBLE_LENGTH)
        except OSError as e:
            raise BackupIOError(f"cannot read backup {path}: {e.strerror or e}") from None
    return _core.parse_preamble(data)


def key_description(preamble: Any) -> dict[str, Any]:
    if preamble.kdf_id == KDF_ARGON2ID:
        params, salt = decode_kdf_params(bytes(preamble.kdf_params))
        return {
            "key": "passphrase",
            "kdf": {
                "name": "argon2id",
                "memory_kib": params.memory_kib,
                "iterations": params.iterations,
                "lanes": params.lanes,
                "salt_length": len(salt),
            },
        }
    return {"key": "master-key", "kdf": None}


def _key_text(desc: dict[str, Any]) -> str:
    kdf = desc["kdf"]
    if kdf is None:
        return "master key file (--key KEYFILE)"
    return (
        f"passphrase (--passphrase-file or ${PASSPHRASE_ENV}); Argon2id, {kdf['memory_kib'] // 1024} MiB, "
        f"{kdf['iterations']} iterations, {kdf['lanes']} lanes, {kdf['salt_length']}-byte salt"
    )


# --------------------------------------------------------------------------- databases


def backend_for(path: str, choice: str) -> str:
    if choice != "auto":
        return choice
    if os.path.isdir(path):
        return "lmdb"
    if os.path.isfile(path):
        try:
            with open(path, "rb") as f:
                head = f.read(len(SQLITE_MAGIC))
        except OSError as e:
            raise StoreError(f"cannot read database {path}: {e.strerror or e}") from None
        if head in (SQLITE_MAGIC, b""):
            return "sqlite"
        raise CliError(
            f"cannot tell what kind of database {path} is (neither an LMDB directory nor a SQLite file)",
            "give --db-backend lmdb or --db-backend sqlite",
            code=EXIT_IO,
        )
    return "sqlite" if path.lower().endswith(SQLITE_SUFFIXES) else "lmdb"


def _refuse_foreign_directory(path: str, backend: str) -> None:
    """A restore makes an LMDB database of a new or empty directory, or writes into one that is
    an LMDB database; a directory holding other files and no data.mdb (`restore BACKUP .` in a
    home directory, say) is refused rather than given a data.mdb and lock.mdb among them."""
    if backend != "lmdb" or not os.path.isdir(path) or os.path.lexists(os.path.join(path, "data.mdb")):
        return
    try:
        others = os.listdir(path)
    except OSError as e:
        raise CliError(f"cannot read directory {path}: {e.strerror or e}", "check the path", code=EXIT_IO) from None
    if others:
        raise UsageError(
            f"{path} is a directory with other files in it and no LMDB database (no data.mdb)",
            "restore into a new or empty directory, or into an existing LMDB database",
        )


def open_existing_db(path: str, choice: str, *, direct_reads: bool = True) -> DbOperations:
    backend = backend_for(path, choice)
    if not direct_reads and backend != "lmdb":
        raise UsageError(
            f"--no-direct-reads is an LMDB option and {path} is a {backend} database", "leave --no-direct-reads out"
        )
    if not os.path.exists(path):
        raise CliError(
            f"database {path} does not exist", "check the path: create backs up an existing database", code=EXIT_IO
        )
    if backend == "lmdb" and not os.path.isfile(os.path.join(path, "data.mdb")):
        raise CliError(
            f"{path} is not an LMDB database (no data.mdb in it)",
            "check the path, or give --db-backend sqlite for a SQLite file",
            code=EXIT_IO,
        )
    return DbOperations.open(path, backend, **({} if direct_reads else {"direct_reads": False}))


class _ReadOnlyManager:
    """A manager for commands that only read backup files (verify, inspect, list): the manager
    needs a database, so it gets an empty throwaway SQLite file that is never used."""

    def __init__(self, key: MasterKeyPair | Passphrase) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="datafold-cli-")
        self._db = DbOperations.open(os.path.join(self._dir.name, "unused.sqlite"), "sqlite")
        self.manager = EncryptedBackupManager(self._db, key)

    def __enter__(self) -> EncryptedBackupManager:
        return self.manager

    def __exit__(self, *exc: object) -> None:
        self._db.close()
        self._dir.cleanup()


# --------------------------------------------------------------------------- commands


def _meta_fields(meta: BackupMetadata) -> dict[str, Any]:
    return {
        "backup_id": meta.backup_id,
        "created_at": meta.created_at.isoformat(),
        "mode": meta.mode,
        "parent_backup_id": meta.parent_backup_id,
        "parent_digest": meta.parent_digest,
        "deleted_trees": list(meta.deleted_trees),
        "trees": len(meta.trees),
        "items": meta.total_items,
        "data_bytes": meta.total_bytes,
        "file_size": meta.file_size,
        "key": "passphrase" if meta.encryption.kdf == "argon2id" else "master-key",
        "key_id": meta.encryption.key_id,
        "checksum": meta.checksum,
    }


def cmd_keygen(args: argparse.Namespace, out: Output, ctx: Context) -> int:
    path = args.out
    ctx.file = path
    if os.path.lexists(path) and not args.force:
        raise UsageError(
            f"key file {path} already exists; refusing to overwrite it (a lost key loses every backup made with it)",
            "use --force to replace it, or choose another path",
        )
    passphrase = None
    if args.protect:
        passphrase = get_passphrase(args, f"Passphrase to protect {path}: ", confirm=True)
        if passphrase is None:
            raise KeyProblem(
                "--protect needs a passphrase", f"give it with --passphrase-file FILE or ${PASSPHRASE_ENV}"
            )
    keys = MasterKeyPair.generate()
    _write_private_file(path, keys.private_pem(passphrase), replace=args.force)
    key_id = derive_key_id(derive_backup_key(keys)).hex()
    out.emit(
        "summary",
        "keygen",
        path=path,
        public_key=keys.public_key_bytes().hex(),
        key_id=key_id,
        protected=passphrase is not None,
    )
    out.text(
        f"wrote an Ed25519 master key to {path} (PKCS#8 PEM, mode 0600"
        f"{', protected by a passphrase' if passphrase else ''})"
    )
    out.text(f"key id of its backups: {key_id}")
    out.text("Keep a copy of this file somewhere safe: without it no backup made with it can be read.")
    return EXIT_OK


def _write_private_file(path: str, data: bytes, *, replace: bool) -> None:
    """Writes a 0600 file that appears whole or not at all, durably (AtomicFile: the file and its
    directory fsynced): next to nothing at `path` unless `replace`."""
    try:
        with AtomicFile(path, "key file", follow_symlinks=False) as out:
            out.file.write(data)
            out.commit(replace=replace)
    except FileExistsError:
        raise UsageError(f"key file {path} already exists", "use --force to replace it") from None
    except BackupIOError as e:
        raise CliError(str(e), "check that the directory exists and is writable", code=EXIT_IO) from None
    except OSError as e:
        raise CliError(
            f"cannot write key file {path}: {e.strerror or e}",
            "check that the directory exists and is writable",
            code=EXIT_IO,
        ) from None


def cmd_create(args: argparse.Namespace, out: Output, ctx: Context) -> int:
    ctx.file, ctx.database = args.backup, args.db
    if args.chain and not args.parent:
        raise UsageError(
            "--chain names the parents of an incremental backup", "give --parent too, or leave --chain out"
        )
    options = BackupOptions(
        mode=BackupMode.INCREMENTAL if args.parent else BackupMode.FULL,
        parent=args.parent,
        chain=args.chain,
        tree_filter=args.tree,
        key_prefix_filter=args.prefix,
        include_metadata=not args.no_metadata,
        compression_level=args.compression,
        verify_during_creation=not args.no_verify,
    )
    key = key_source(args, creating=True)
    with open_existing_db(args.db, args.db_backend, direct_reads=not args.no_direct_reads) as db:
        mgr = EncryptedBackupManager(db, key)
        result = mgr.create_backup(args.backup, options, progress=out.progress("create"))
        backend = db.backend
    meta, stats = result.metadata, result.stats
    out.emit(
        "summary",
        "create",
        path=result.path,
        database=args.db,
        backend=backend,
        **_meta_fields(meta),
        duration_s=round(stats.duration_s, 3),
        bytes_per_s=_per_s(stats.bytes_written, stats.duration_s),
        verified=options.verify_during_creation,
    )
    out.text(
        f"created {result.path}: {_n(len(meta.trees), 'tree')}, {_n(meta.total_items, 'item')}, "
        f"{_size(meta.total_bytes)} of keys and values; file {_size(meta.file_size)} "
        f"in {stats.duration_s:.2f} s ({_rate(stats.bytes_written, stats.duration_s)})"
    )
    how = "read back and verified before it was put in place" if options.verify_during_creation else "not verified"
    kind = "a passphrase (Argon2id)" if isinstance(key, Passphrase) else "the master key"
    out.text(f"encrypted with {kind}, key id {meta.encryption.key_id}; {how}")
    return EXIT_OK


def cmd_restore(args: argparse.Namespace, out: Output, ctx: Context) -> int:
    ctx.file, ctx.database = args.backup, args.db
    options = RestoreOptions(
        overwrite_existing=args.overwrite,
        tree_filter=args.tree,
        key_prefix_filter=args.prefix,
        verify_before_restore=not args.no_verify,
        backup_before_restore=args.safety_backup,
        continue_on_errors=args.continue_on_errors,
        chain=args.chain,
    )
    preamble = read_preamble(args.backup)
    ctx.key_kind = key_description(preamble)["key"]
    key = key_source(args, creating=False, backup=args.backup)
    check_key(key, preamble, args.backup)  # before the database is opened (and perhaps created)
    backend = backend_for(args.db, args.db_backend)
    store_options: dict[str, bool] = {}
    for flag, given, option in (
        ("--writemap", args.writemap, "writemap"),
        ("--no-native", args.no_native, "native_restore"),
    ):
        if given:
            if backend != "lmdb":
                raise UsageError(f"{flag} is an LMDB option and {args.db} is a {backend} database", f"leave {flag} out")
            store_options[option] = flag == "--writemap"  # writemap=True, native_restore=False
    _refuse_foreign_directory(args.db, backend)
    is_new = not os.path.lexists(args.db)
    try:
        with DbOperations.open(args.db, backend, **store_options) as db:
            stats = EncryptedBackupManager(db, key).restore_backup(
                args.backup, options, progress=out.progress("restore")
            )
    except BaseException:
        if is_new:  # the restore rolled back: leave no empty database behind at a new path
            _remove_new_db(args.db, backend)
        raise
    out.emit(
        "summary",
        "restore",
        path=args.backup,
        database=args.db,
        backend=backend,
        items_restored=stats.items_restored,
        items_skipped=stats.items_skipped,
        trees_restored=stats.trees_restored,
        errors=stats.errors,
        safety_backup=stats.safety_backup_path,
        verified=stats.verified,
        duration_s=round(stats.duration_s, 3),
    )
    out.text(
        f"restored {args.backup} into {args.db} ({backend}): {_count(stats.items_restored)} items written, "
        f"{_count(stats.items_skipped)} kept (already present; --overwrite replaces them), "
        f"{_n(stats.trees_restored, 'tree')}, in {stats.duration_s:.2f} s"
    )
    if stats.verified:
        out.text("read back and checked against the backup")
    if stats.safety_backup_path:
        out.text(f"safety backup of the previous state: {stats.safety_backup_path}")
    for error in stats.errors:
        print(f"{PROG}: warning: not restored: {error}", file=sys.stderr)
    if stats.errors:
        # Scripts must not take a restore with holes for a whole one.
        print(
            f"{PROG}: {_n(len(stats.errors), 'record')} of the backup not restored (see above); "
            "everything else was restored",
            file=sys.stderr,
        )
        return EXIT_PARTIAL
    return EXIT_OK


def _remove_new_db(path: str, backend: str) -> None:
    names = ("data.mdb", "lock.mdb") if backend == "lmdb" else ("", "-wal", "-shm", "-journal")
    try:
        if backend == "lmdb":
            for name in names:
                if os.path.exists(os.path.join(path, name)):
                    os.unlink(os.path.join(path, name))
            os.rmdir(path)  # fails (and is left alone) if anything else is in it
        else:
            for name in names:
                if os.path.exists(path + name):
                    os.unlink(path + name)
    except OSError:
        pass


def cmd_verify(args: argparse.Namespace, out: Output, ctx: Context) -> int:
    ctx.file = args.backup
    preamble = read_preamble(args.backup)
    ctx.key_kind = key_description(preamble)["key"]
    key = key_source(args, creating=False, backup=args.backup)
    check_kind(key, preamble, args.backup)
    started = time.perf_counter()
    with _ReadOnlyManager(key) as mgr:
        meta = mgr.verify_backup(args.backup, progress=out.progress("verify"))
    seconds = time.perf_counter() - started
    out.emit(
        "summary",
        "verify",
        path=args.backup,
        ok=True,
        **_meta_fields(meta),
        duration_s=round(seconds, 3),
        bytes_per_s=_per_s(meta.file_size or 0, seconds),
    )
    out.text(
        f"{args.backup} is intact: {_n(len(meta.trees), 'tree')}, {_n(meta.total_items, 'item')}, "
        f"{_size(meta.total_bytes)} of keys and values; every segment authenticated, every count and digest "
        f"checked ({seconds:.2f} s, {_rate(meta.file_size or 0, seconds)})"
    )
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace, out: Output, ctx: Context) -> int:
    ctx.file = args.backup
    preamble = read_preamble(args.backup)
    desc = key_description(preamble)
    ctx.key_kind = desc["key"]
    file_size = os.path.getsize(args.backup)
    explicit = bool(args.key or args.passphrase_file)
    from_env = PASSPHRASE_ENV in os.environ and desc["key"] == "passphrase"
    meta = None
    if explicit or from_env:
        key = key_source(args, creating=False, backup=args.backup)
        check_kind(key, preamble, args.backup)
        with _ReadOnlyManager(key) as mgr:
            meta = mgr.read_metadata(args.backup)
    doc: dict[str, Any] = {
        "path": args.backup,
        "file_size": file_size,
        "format_version": preamble.format_version,
        "segment_size": preamble.segment_size,
        "key_id": bytes(preamble.key_id).hex(),
        **desc,
        "unlocked": meta is not None,
    }
    if meta is not None:
        doc.update(
            backup_id=meta.backup_id,
            created_at=meta.created_at.isoformat(),
            mode=meta.mode,
            parent_backup_id=meta.parent_backup_id,
            source={"backend": meta.source.backend, "path": meta.source.path},
            options=meta.options,
            compression=meta.compression,
            trees=[
                {"name": name, "items": t.item_count, "bytes": t.byte_count, "digest": t.digest}
                for name, t in meta.trees.items()
            ],
            items=meta.total_items,
            data_bytes=meta.total_bytes,
            checksum=meta.checksum,
        )
    out.emit("summary", "inspect", **doc)
    if out.json:
        return EXIT_OK
    rows = [
        ("file", f"{args.backup} ({_count(file_size)} bytes)"),
        ("format", f"version {preamble.format_version}, segment size {_size(preamble.segment_size)}"),
        ("key needed", _key_text(desc)),
        ("key id", doc["key_id"]),
    ]
    if meta is not None:
        chain = (
            f"{meta.mode} backup, parent {meta.parent_backup_id} (digest {meta.parent_digest})"
            if meta.parent_backup_id
            else f"{meta.mode} backup (first in its chain, no parent)"
        )
        if meta.deleted_trees:
            chain += f"; trees deleted since the parent: {', '.join(map(_shown, meta.deleted_trees))}"
        opts = ", ".join(f"{k}={v}" for k, v in sorted(meta.options.items())) or "-"
        rows += [
            ("backup id", meta.backup_id),
            ("created", meta.created_at.strftime("%Y-%m-%d %H:%M:%S UTC")),
            ("chain", chain),
            ("source", f"{meta.source.backend} {_shown(meta.source.path)}"),
            ("options", opts),
            ("compression", meta.compression or "none"),
            ("stream digest", meta.checksum),
        ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        out.text(f"{name:<{width}}  {value}", always=True)
    if meta is None:
        out.text(f"{'trees':<{width}}  (encrypted: give the key to list them)", always=True)
        return EXIT_OK
    table = [("TREE", "ITEMS", "BYTES", "DIGEST (keyed BLAKE3)")]
    table += [(_shown(n), _count(t.item_count), _size(t.byte_count), t.digest) for n, t in meta.trees.items()]
    table.append(("total", _count(meta.total_items), _size(meta.total_bytes), ""))
    w = [max(len(r[i]) for r in table) for i in range(3)]
    out.text("", always=True)
    for i, (n, items, nbytes, digest) in enumerate(table):
        if i == len(table) - 1:
            out.text("  " + "-" * (w[0] + w[1] + w[2] + 4), always=True)
        out.text(f"  {n:<{w[0]}}  {items:>{w[1]}}  {nbytes:>{w[2]}}  {digest}".rstrip(), always=True)
    return EXIT_OK


def cmd_list(args: argparse.Namespace, out: Output, ctx: Context) -> int:
    ctx.file = args.directory
    key = key_source(args, creating=False)
    with _ReadOnlyManager(key) as mgr, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = mgr.list_backups(args.directory)
    skipped = []
    for warning in caught:
        text = str(warning.message)
        path, _, reason = text.removeprefix("skipping ").partition(": ")
        skipped.append({"path": path, "reason": reason or text})
    out.emit(
        "summary",
        "list",
        directory=args.directory,
        backups=[{"path": m.path, **_meta_fields(m)} for m in found],
        skipped=skipped,
    )
    if not out.json:
        if not found:
            out.text(f"no backup in {args.directory} can be read with this key", always=True)
        else:
            table = [("CREATED (UTC)", "BACKUP ID", "MODE", "PARENT", "TREES", "ITEMS", "SIZE", "FILE")]
            for m in found:
                table.append(
                    (
                        m.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                        m.backup_id[:8],
                        m.mode,
                        (m.parent_backup_id or "-")[:8],
                        str(len(m.trees)),
                        _count(m.total_items),
                        _size(m.file_size),
                        _shown(os.path.basename(m.path or "")),
                    )
                )
            w = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
            for r in table:
                out.text(
                    "  ".join(c.rjust(w[i]) if i in (4, 5, 6) else c.ljust(w[i]) for i, c in enumerate(r)).rstrip(),
                    always=True,
                )
        for s in skipped:
            print(f"{PROG}: skipped {_shown(s['path'])}: {_shown(s['reason'])}", file=sys.stderr)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace, out: Output, ctx: Context) -> int:
    if args.dir:
        if os.path.lexists(args.dir) and not os.path.isdir(args.dir):
            raise UsageError(f"--dir {args.dir} is not a directory", "give a directory (created if missing)")
        try:
            os.makedirs(args.dir, exist_ok=True)
        except OSError as e:
            raise CliError(
                f"cannot create directory {args.dir}: {e.strerror or e}",
                "give a directory you may write to",
                code=EXIT_IO,
            ) from None
        return _demo(args, out, ctx, args.dir)
    with tempfile.TemporaryDirectory(prefix="datafold-demo-") as d:
        return _demo(args, out, ctx, d)


def _demo(args: argparse.Namespace, out: Output, ctx: Context, workdir: str) -> int:
    backend = "lmdb" if args.db_backend == "auto" else args.db_backend
    suffix = ".lmdb" if backend == "lmdb" else ".sqlite"
    source_path = os.path.join(workdir, f"demo{suffix}")
    target_path = os.path.join(workdir, f"restored{suffix}")
    backup_path = os.path.join(workdir, "demo.dfb")
    for p in (source_path, target_path, backup_path):
        if os.path.lexists(p):
            raise UsageError(f"{p} already exists", "give an empty --dir, or none to use a temporary directory")
    ctx.file, ctx.database = backup_path, source_path
    n = args.records
    steps: list[dict[str, Any]] = []
    total_started = time.perf_counter()

    def step(name: str, seconds: float, text: str, **fields: Any) -> None:
        steps.append({"step": name, "seconds": round(seconds, 3), **fields})
        out.text(text)

    out.text(f"datafold demo: {_count(n)} records, {backend} database, {_core.CORE_NAME} core, in {workdir}")
    keys = MasterKeyPair.generate()
    backup_key = derive_backup_key(keys)
    with DbOperations.open(source_path, backend) as db, DbOperations.open(target_path, backend) as restored:
        started = time.perf_counter()
        data_bytes = _fill_demo_db(db, n)
        seconds = time.perf_counter() - started
        trees = db.tree_names()
        n = sum(map(db.count, trees))
        step(
            "build",
            seconds,
            f"1. built a sample database {os.path.basename(source_path)}: {_count(n)} records in {len(trees)} trees "
            f"({', '.join(trees)}), {_size(data_bytes)} of keys and values ({seconds:.2f} s)",
            records=n,
            data_bytes=data_bytes,
        )
        out.text(
            f"2. generated an Ed25519 master key in memory (key id {derive_key_id(backup_key).hex()}); "
            f"real use: `{PROG} keygen --out KEYFILE`"
        )
        mgr = EncryptedBackupManager(db, keys)
        result = mgr.create_backup(backup_path, progress=out.progress("demo"))
        s = result.stats
        step(
            "create",
            s.duration_s,
            f"3. created the encrypted backup {os.path.basename(backup_path)}: {_size(s.bytes_written)} "
            f"in {s.duration_s:.2f} s "
            f"({_rate(s.bytes_written, s.duration_s)}); AES-256-GCM (Tink streaming), read back before "
            "being put in place",
            file_size=s.bytes_written,
            bytes_per_s=_per_s(s.bytes_written, s.duration_s),
        )
        started = time.perf_counter()
        meta = mgr.verify_backup(backup_path, progress=out.progress("demo"))
        seconds = time.perf_counter() - started
        step(
            "verify",
            seconds,
            f"4. verified it: every segment authenticated, {_count(meta.total_items)} records, "
            f"{len(meta.trees)} tree digests and the stream digest checked ({seconds:.2f} s, "
            f"{_rate(meta.file_size or 0, seconds)})",
            items=meta.total_items,
            bytes_per_s=_per_s(meta.file_size or 0, seconds),
        )
        rs = EncryptedBackupManager(restored, keys).restore_backup(backup_path, progress=out.progress("demo"))
        step(
            "restore",
            rs.duration_s,
            f"5. restored it into a fresh database {os.path.basename(target_path)}: "
            f"{_count(rs.items_restored)} records in "
            f"{rs.duration_s:.2f} s ({_rate(data_bytes, rs.duration_s)} of keys and values), "
            "verified before and read back after",
            items=rs.items_restored,
            bytes_per_s=_per_s(data_bytes, rs.duration_s),
        )
        started = time.perf_counter()
        checks = []
        for name in trees:
            want = meta.trees[name].digest
            got_source = _core.digest_items(backup_key, db.items(name))[2].hex()
            got_restored = _core.digest_items(backup_key, restored.items(name))[2].hex()
            checks.append({"tree": name, "digest": want, "match": got_source == got_restored == want})
        seconds = time.perf_counter() - started
        ok = all(c["match"] for c in checks)
        step(
            "digests",
            seconds,
            f"6. digests: {', '.join(c['tree'] + (' ok' if c['match'] else ' MISMATCH') for c in checks)}: "
            + ("the restored database equals the original" if ok else "the restored database DIFFERS"),
            trees=checks,
        )
    total = time.perf_counter() - total_started
    kept = f"; the files are in {workdir}" if args.dir else "; the temporary directory is removed (keep it: --dir DIR)"
    out.text(f"done in {total:.1f} s{kept}")
    out.emit(
        "summary",
        "demo",
        records=n,
        backend=backend,
        core=_core.CORE_NAME,
        directory=workdir if args.dir else None,
        steps=steps,
        digests_match=ok,
        duration_s=round(total, 3),
    )
    if not ok:
        raise CliError("the restored database does not match the original", "report this as a bug", code=EXIT_IO)
    return EXIT_OK


def _fill_demo_db(db: DbOperations, n: int) -> int:
    """n records: users (n/2 small JSON records), events (120-byte binary payloads) and 2 in metadata."""
    meta = [(b"schema", b"3"), (b"created_by", b"datafold demo")]
    users = n // 2
    events = max(0, n - users - len(meta))
    total = 0
    roles = (b"admin", b"editor", b"viewer", b"guest")
    batch = 50_000

    def user_rows(lo: int, hi: int) -> list[tuple[bytes, bytes]]:
        return [
            (
                b"user:%08d" % i,
                b'{"id":%d,"name":"user %d","role":"%s","score":%d}' % (i, i, roles[i % 4], (i * 7919) % 10007),
            )
            for i in range(lo, hi)
        ]

    def event_rows(lo: int, hi: int) -> list[tuple[bytes, bytes]]:
        payload = os.urandom(120 * (hi - lo))
        return [(b"event:%012d" % i, payload[(i - lo) * 120 : (i - lo + 1) * 120]) for i in range(lo, hi)]

    for tree, count, rows in (("users", users, user_rows), ("events", events, event_rows)):
        db.create_tree(tree)
        for lo in range(0, count, batch):
            chunk = rows(lo, min(count, lo + batch))
            total += sum(len(k) + len(v) for k, v in chunk)
            db.put_many(tree, chunk)
    db.put_many("metadata", meta)
    return total + sum(len(k) + len(v) for k, v in meta)


# --------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse exits with 2 by default; here 2 means a damaged backup, so a bad command line is 1.
        raise UsageError(message, f"see `{self.prog} --help`", usage=self.format_usage())


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30, width=min(100, shutil.get_terminal_size((100, 20)).columns))


def _positive_int(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


EXIT_CODES_TEXT = f"""\
exit codes:
  0  success
  1  usage error: bad command line or option value, a key file that already exists
  2  the backup is damaged: corrupted, truncated, tampered with, not a backup, or a newer format
  3  key problem: no key given, wrong key or passphrase, the other kind of key needed,
     an unreadable or invalid key / passphrase file
  4  I/O or store problem: missing file, unwritable destination, database error
  5  restore --continue-on-errors left records out (each one is named on stderr);
     everything else was restored

key sources (every command that reads or writes a backup):
  --key KEYFILE          a master key file from `{PROG} keygen` (protected ones need their passphrase)
  --passphrase-file F    a passphrase (one trailing newline is stripped), or ${PASSPHRASE_ENV};
                         without either, the passphrase is asked for on a terminal
"""

EPILOGS = {
    "keygen": f"""\
examples:
  {PROG} keygen --out ~/.config/datafold/master.pem
  {PROG} keygen --out master.pem --protect --passphrase-file pass.txt
""",
    "create": f"""\
examples:
  {PROG} create state.lmdb nightly.dfb --key master.pem
  DATAFOLD_PASSPHRASE=... {PROG} create app.sqlite app.dfb --tree users --tree orders
  {PROG} create state.lmdb users.dfb --key master.pem --prefix user: --json
""",
    "restore": f"""\
examples:
  {PROG} restore nightly.dfb restored.lmdb --key master.pem
  {PROG} restore nightly.dfb state.lmdb --key master.pem --overwrite --safety-backup
  {PROG} restore app.dfb app.sqlite --passphrase-file pass.txt --tree users
  {PROG} restore big.dfb fresh.lmdb --key master.pem --writemap   # flat memory for a large restore
""",
    "verify": f"""\
examples:
  {PROG} verify nightly.dfb --key master.pem
  {PROG} verify app.dfb --passphrase-file pass.txt --json
""",
    "inspect": f"""\
examples:
  {PROG} inspect nightly.dfb                   # which key it needs, key id, format (no key needed)
  {PROG} inspect nightly.dfb --key master.pem  # also trees, items, sizes, digests, chain
""",
    "list": f"""\
examples:
  {PROG} list /backups --key master.pem
  {PROG} list /backups --passphrase-file pass.txt --json
""",
    "demo": f"""\
examples:
  {PROG} demo
  {PROG} demo --records 1000000 --dir /tmp/datafold-demo
""",
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Encrypted, authenticated, streaming backups of LMDB and SQLite databases.",
        epilog=EXIT_CODES_TEXT + f"\nexample:\n  {PROG} demo\n  {PROG} <command> --help",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} (datafold {__version__})")

    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="one JSON object per line on stdout (progress and summary)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary")
    g.add_argument("--debug", action="store_true", help="show the traceback of an error")

    keyed = argparse.ArgumentParser(add_help=False)
    k = keyed.add_argument_group("key")
    k.add_argument("--key", metavar="KEYFILE", help="master key file (from keygen)")
    k.add_argument(
        "--passphrase-file",
        metavar="FILE",
        help=f"passphrase for the backup (or for a protected key file); else ${PASSPHRASE_ENV} or a prompt",
    )

    dbopt = argparse.ArgumentParser(add_help=False)
    dbopt.add_argument(
        "--db-backend",
        choices=("auto", "lmdb", "sqlite"),
        default="auto",
        help="database kind; auto: a directory is LMDB, a SQLite file is SQLite, a new path ending in "
        ".sqlite/.sqlite3/.db is SQLite, else LMDB (default: auto)",
    )

    def tree_filters(p: argparse.ArgumentParser, verb: str) -> None:
        p.add_argument("--tree", action="append", metavar="T", help=f"{verb} only this tree (repeatable)")
        p.add_argument("--prefix", metavar="P", help=f"{verb} only keys starting with P (UTF-8)")

    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands", required=True)

    def command(name: str, help_text: str, parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=EPILOGS[name] + "\n" + EXIT_CODES_TEXT,
            parents=[*parents, common],  # type: ignore[list-item]
            formatter_class=_Formatter,
        )

    p = command("keygen", "write a new Ed25519 master key file (PKCS#8 PEM, mode 0600)", [])
    p.add_argument("--out", required=True, metavar="KEYFILE", help="where to write the key")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.add_argument("--protect", action="store_true", help="encrypt the key file with a passphrase")
    p.add_argument(
        "--passphrase-file", metavar="FILE", help=f"passphrase for --protect; else ${PASSPHRASE_ENV} or a prompt"
    )
    p.set_defaults(run=cmd_keygen)

    p = command("create", "back up a database into an encrypted backup file", [keyed, dbopt])
    p.add_argument("db", metavar="DB", help="the database (LMDB directory or SQLite file)")
    p.add_argument("backup", metavar="BACKUP", help="the backup file to write (replaced atomically if it exists)")
    tree_filters(p, "back up")
    p.add_argument("--no-metadata", action="store_true", help="leave out metadata trees ('metadata', '_*')")
    p.add_argument(
        "--compression-level",
        "--compression",
        dest="compression",
        type=_int,
        default=0,
        metavar="N",
        help="zstd level 1-22 applied per block before encryption; 0 (default) = off",
    )
    p.add_argument("--no-verify", action="store_true", help="do not read the file back before putting it in place")
    p.add_argument(
        "--no-direct-reads",
        action="store_true",
        help="LMDB: read the records through py-lmdb instead of from data.mdb's pages in Rust (slower; for "
        "comparison, or if direct reads ever refuse a database LMDB itself reads)",
    )
    p.add_argument(
        "--parent",
        metavar="BACKUP",
        help="write an incremental backup: only what changed since this backup (its parents are found beside it)",
    )
    p.add_argument(
        "--chain",
        metavar="BACKUP",
        action="append",
        help="with --parent: a parent of that backup, oldest (the full backup) first; repeat for each "
        "(--parent's backup may come last; default: found by id in its directory)",
    )
    p.set_defaults(run=cmd_create)

    p = command("restore", "restore a backup into a database (one transaction: all or nothing)", [keyed, dbopt])
    p.add_argument("backup", metavar="BACKUP", help="the backup file")
    p.add_argument("db", metavar="DB", help="the database to restore into (created if missing)")
    tree_filters(p, "restore")
    p.add_argument("--overwrite", action="store_true", help="replace values of keys that exist (default: keep them)")
    p.add_argument(
        "--no-verify", action="store_true", help="skip the full check before writing (the check after stays)"
    )
    p.add_argument("--safety-backup", action="store_true", help="first back up what the restore will change")
    p.add_argument(
        "--writemap",
        action="store_true",
        help="LMDB: write pages straight into the file mapping (MDB_WRITEMAP), so memory stays flat however "
        "large the restore; the data file is preallocated to the whole map (about 3x the data), and no "
        "other process may have the database open without writemap meanwhile",
    )
    p.add_argument(
        "--no-native",
        action="store_true",
        help="LMDB: write through py-lmdb instead of the Rust core's own LMDB (native_restore=False)",
    )
    p.add_argument(
        "--continue-on-errors",
        action="store_true",
        help="restore what the store takes and name the records it refuses (exit code 5) instead of aborting",
    )
    p.add_argument(
        "--chain",
        metavar="BACKUP",
        action="append",
        help="for an incremental backup: a parent, oldest (the full backup) first; repeat for each "
        "(the backup itself may come last; default: found by id in the backup's directory)",
    )
    p.set_defaults(run=cmd_restore)

    p = command("verify", "check a backup completely (every segment, count and digest); writes nothing", [keyed])
    p.add_argument("backup", metavar="BACKUP", help="the backup file")
    p.set_defaults(run=cmd_verify)

    p = command("inspect", "show a backup's metadata: key kind, trees, items, sizes, digests, chain", [keyed])
    p.add_argument("backup", metavar="BACKUP", help="the backup file")
    p.set_defaults(run=cmd_inspect)

    p = command("list", "list the backups in a directory that the key can read", [keyed])
    p.add_argument("directory", metavar="DIR", help="directory holding backup files")
    p.set_defaults(run=cmd_list)

    p = command(
        "demo",
        "the main job start to finish: build a sample database, back it up, verify, restore, compare",
        [dbopt],
    )
    p.add_argument("--records", type=_positive_int, default=200_000, metavar="N", help="records (default 200,000)")
    p.add_argument("--dir", metavar="DIR", help="work in DIR and keep the files (default: a temporary directory)")
    p.set_defaults(run=cmd_demo)
    return parser


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    want_json = "--json" in argv
    debug = "--debug" in argv
    ctx = Context(command=next((a for a in argv if not a.startswith("-")), ""))
    out = Output(want_json, "--quiet" in argv or "-q" in argv)
    try:
        args = build_parser().parse_args(argv)
        out = Output(args.json, args.quiet)
        debug = args.debug
        ctx.command = args.command
        return int(args.run(args, out, ctx))
    except SystemExit as e:  # --help, --version
        return int(e.code or 0) if not isinstance(e.code, str) else EXIT_USAGE
    except KeyboardInterrupt as e:
        out.clear_bar()
        # A note says when the interrupt came after a restore had committed (manager.py).
        notes = [n.removeprefix("datafold: ") for n in getattr(e, "__notes__", ())]
        print(f"{PROG}: interrupted{': ' + '; '.join(notes) if notes else ''}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BaseException as exc:  # noqa: BLE001 - every failure becomes a message and an exit code
        out.clear_bar()
        return _report(exc, ctx, out, debug)


def _report(exc: BaseException, ctx: Context, out: Output, debug: bool) -> int:
    code = exit_code(exc)
    expected = isinstance(exc, (BackupError, CliError, OSError))
    message = str(exc) if expected else f"internal error: {type(exc).__name__}: {exc}"
    named = _member_file(exc) is not None  # a chain member: the message names it already
    if ctx.file and isinstance(exc, FILE_ERRORS) and not named and ctx.file not in message:
        message = f"{ctx.file}: {message}"
    hint = _hint(exc, ctx)
    if debug:
        traceback.print_exception(exc)
    if isinstance(exc, CliError) and exc.usage:
        sys.stderr.write(exc.usage)
    print(f"{PROG}: error: {message}", file=sys.stderr)
    if hint:
        print(f"{PROG}: hint: {hint}", file=sys.stderr)
    out.emit(
        "error",
        ctx.command,
        exit_code=code,
        error=type(exc).__name__,
        message=message,
        file=_member_file(exc) or ctx.file,
        hint=hint,
    )
    return code


def run() -> NoReturn:
    """Console-script entry point."""
    sys.exit(main())
