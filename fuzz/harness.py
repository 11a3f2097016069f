"""The one-input check shared by the atheris target (fuzz_reader.py), the plain random-mutation
runner (fuzz_random.py) and the hypothesis tests in tests/test_adversarial_fuzz.py.

An input is one mode byte followed by a body:

* mode % 3 == 0 -- the body is a whole backup file, read as it is;
* mode % 3 == 1 -- the body is a record-stream *plaintext*, sealed with the fuzz key exactly as a
  writer would (4 KiB segments) so that it gets past authentication and reaches the record parser;
* mode % 3 == 2 -- like 1, with a segment size taken from the next two bytes (4096 + n), so
  records straddle segment boundaries at every offset.

`check(data)` reads the file with BOTH cores (full read and `read_summary()`), and raises
`Finding` if any core raises something other than a `datafold.BackupError`, if the cores
disagree (one accepts what the other refuses, or they return different content), or if a full
read succeeds while the summary read fails or returns another trailer.
"""

from __future__ import annotations

import io
import struct
from typing import Any

from datafold import BackupError
from datafold import _pure as pure
from datafold.keys import derive_backup_key, derive_key_id

try:
    from datafold import _core as rust
except ImportError:  # pragma: no cover - the Rust core is always built in this repo
    rust = None

# The tests' fixed master seed (tests/helpers.py SEED); never a real key.
MASTER_SEED = bytes(range(32))
KEY = derive_backup_key(MASTER_SEED)
SALT = bytes(range(1, 33))
PREFIX = b"\xa0\xa1\xa2\xa3\xa4\xa5\xa6"
CORES = [c for c in (pure, rust) if c is not None]


class Finding(AssertionError):
    """A fuzz input that shows a bug."""


def seal(plaintext: bytes, segment_size: int = 4096) -> bytes:
    preamble = pure.encode_preamble(segment_size, derive_key_id(KEY))
    return preamble + pure.encrypt_stream(KEY, plaintext, preamble, segment_size, SALT, PREFIX)


def build_file(data: bytes) -> bytes:
    if not data:
        return b""
    mode, body = data[0] % 3, data[1:]
    if mode == 0:
        return body
    css = 4096
    if mode == 2 and len(body) >= 2:
        css = 4096 + struct.unpack_from("<H", body)[0] % 8192
        body = body[2:]
    return seal(body, css)


def read_full(core: Any, blob: bytes) -> tuple[bytes, list[tuple[str, list[Any]]], Any]:
    reader = core.BackupReader(io.BytesIO(blob))
    meta = reader.unlock(KEY)
    trees = []
    while (name := reader.next_tree()) is not None:
        items: list[Any] = []
        while batch := reader.read_items(7, 1 << 12):  # small batches: more state transitions
            items.extend(batch)
        trees.append((name, items))
    return bytes(meta), trees, reader.trailer


def read_summary(core: Any, blob: bytes) -> tuple[bytes, Any]:
    reader = core.BackupReader(io.BytesIO(blob))
    meta = reader.unlock(KEY)
    return bytes(meta), reader.read_summary()


def outcome(fn: Any, core: Any, blob: bytes) -> tuple[str, Any]:
    try:
        return "ok", fn(core, blob)
    except BackupError as e:
        return "error", (type(e), str(e))
    except MemoryError as e:  # a crafted file must not make a reader allocate without bound
        raise Finding(f"{core.CORE_NAME}: {fn.__name__} ran out of memory") from e
    except Exception as e:  # noqa: BLE001 - the finding
        raise Finding(f"{core.CORE_NAME}: {fn.__name__} raised {type(e).__name__}: {e}") from e


def check(data: bytes) -> dict[str, tuple[str, Any]]:
    """Raises Finding on a bug; returns {"<core>/<full|summary>": outcome} otherwise."""
    blob = build_file(data)
    results: dict[str, tuple[str, Any]] = {}
    for core in CORES:
        full = outcome(read_full, core, blob)
        summary = outcome(read_summary, core, blob)
        results[f"{core.CORE_NAME}/full"] = full
        results[f"{core.CORE_NAME}/summary"] = summary
        if full[0] == "ok":
            if summary[0] != "ok":
                raise Finding(f"{core.CORE_NAME}: full read accepted the file but read_summary raised {summary[1]}")
            if summary[1][1] != full[1][2] or summary[1][0] != full[1][0]:
                raise Finding(f"{core.CORE_NAME}: read_summary disagrees with the full read")
    if len(CORES) == 2:
        for what in ("full", "summary"):
            a, b = results[f"pure/{what}"], results[f"rust/{what}"]
            if a[0] != b[0] or (a[0] == "ok" and a[1] != b[1]):
                raise Finding(
                    f"cores disagree on the {what} read: pure {a[0]} {a[1]!r:.200}, rust {b[0]} {b[1]!r:.200}"
                )
            if a[0] == "error" and a[1][0] is not b[1][0] and not _known_class_divergence(a[1], b[1]):
                raise Finding(
                    f"cores raise different errors on the {what} read: pure {a[1][0].__name__} ({a[1][1]}), "
                    f"rust {b[1][0].__name__} ({b[1][1]})"
                )
            if a[0] == "error" and a[1][0] is b[1][0] and a[1][1] != b[1][1]:
                raise Finding(
                    f"cores word the error differently on the {what} read: pure {a[1][1]!r}, rust {b[1][1]!r}"
                )
    return results


# Class divergences already reported (see fuzz/README.md); the fuzzers skip them to find new ones.
# (pure class, Rust class, text of the Rust message). Empty: the one found (an unknown record
# type as the first plaintext byte: pure FormatError, Rust IntegrityError) is fixed.
KNOWN_DIVERGENCES: list[tuple[str, str, str]] = []


def _known_class_divergence(pure_error: tuple[type, str], rust_error: tuple[type, str]) -> bool:
    return any(
        pure_error[0].__name__ == p and rust_error[0].__name__ == r and text in rust_error[1]
        for p, r, text in KNOWN_DIVERGENCES
    )


def error_classes(results: dict[str, tuple[str, Any]]) -> dict[str, str]:
    return {k: (v[1][0].__name__ if v[0] == "error" else "ok") for k, v in results.items()}


# --- a structure-blind mutator, shared by fuzz_random.py (and mirrored by src/bin/stable.rs) ----------

INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0xFFFFFFFF, 0x7FFFFFFF, 4096, 4095, 40, 44, 16, 32, 49]


def mutate(rnd: Any, data: bytes, corpus: list[bytes]) -> bytes:
    """1-4 random edits: bit flip, byte set, u32 set to an interesting value, insert, delete,
    truncate, duplicate a chunk, splice from another corpus entry, change the mode byte."""
    buf = bytearray(data)
    for _ in range(rnd.randint(1, 4)):
        op = rnd.randrange(9)
        n = len(buf)
        if op == 0 and n:
            buf[rnd.randrange(n)] ^= 1 << rnd.randrange(8)
        elif op == 1 and n:
            buf[rnd.randrange(n)] = rnd.randrange(256)
        elif op == 2 and n >= 5:
            i = rnd.randrange(1, n - 3)
            v = rnd.choice(INTERESTING)
            buf[i : i + 4] = struct.pack("<I", v & 0xFFFFFFFF)
        elif op == 3:
            i = rnd.randrange(n + 1)
            buf[i:i] = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 8)))
        elif op == 4 and n > 1:
            i = rnd.randrange(1, n)
            del buf[i : i + rnd.randint(1, 64)]
        elif op == 5 and n > 1:
            del buf[rnd.randrange(1, n) :]
        elif op == 6 and n > 2:
            i = rnd.randrange(1, n)
            j = min(n, i + rnd.randint(1, 256))
            k = rnd.randrange(1, n)
            buf[k:k] = buf[i:j]
        elif op == 7 and corpus:
            other = rnd.choice(corpus)
            if len(other) > 2 and n > 2:
                i = rnd.randrange(1, n)
                j = rnd.randrange(1, len(other))
                buf[i:] = other[j : j + rnd.randint(1, 4096)]
        elif op == 8 and n:
            buf[0] = rnd.randrange(3)
    return bytes(buf)
