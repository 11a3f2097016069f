"""Hypothesis-driven mutation tests of the readers, with a fixed budget (CI's share of the fuzzing
in fuzz/; see fuzz/README.md for the unbounded runs).

Random byte edits of real small backups (the seed corpus fuzz/corpus/reader, made by
fuzz/make_corpus.py) go through fuzz/harness.py's `check`: both cores read each file fully and by
read_summary(); the only acceptable outcomes are a BackupError subclass, or a correct roundtrip --
the edited file reads back as exactly the original content (an edited ciphertext), or as content
that the writer encodes to exactly the same bytes (an edited plaintext, sealed with the key). Both
cores must agree on every input.
"""

from __future__ import annotations

import io
import itertools
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
from datafold import FormatError
from datafold import _pure as pure
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FUZZ_DIR = Path(__file__).resolve().parents[1] / "fuzz"
sys.path.insert(0, str(FUZZ_DIR))
import harness  # noqa: E402

CORPUS = {p.name: p.read_bytes() for p in sorted((FUZZ_DIR / "corpus" / "reader").iterdir()) if p.is_file()}
FILE_SEEDS = sorted(n for n in CORPUS if n.startswith("file-"))
PLAIN_SEEDS = sorted(n for n in CORPUS if n.startswith("plain-") and CORPUS[n][0] == 1)  # 4 KiB segments

BUDGET = settings(
    max_examples=1000,
    deadline=None,
    derandomize=True,  # the same inputs on every CI run
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

INTERESTING = [0, 1, 0x7F, 0xFF, 0xFFFF, 0xFFFFFFFF, 4096, 40, 44, 49]
edits = st.lists(st.tuples(st.integers(0, 1 << 32), st.integers(0, 5), st.integers(0, 255)), min_size=1, max_size=4)


def apply(data: bytes, changes: list[tuple[int, int, int]], *, keep_mode: bool = True) -> bytes:
    """Edits the body (data[1:]); the mode byte stays, so a file stays a file."""
    head, buf = data[:1], bytearray(data[1:])
    for where, op, value in changes:
        pos = where % (len(buf) + 1)
        if op == 0 and pos < len(buf):
            buf[pos] ^= 1 << (value % 8)
        elif op == 1 and pos < len(buf):
            buf[pos] = value
        elif op == 2:
            buf[pos:pos] = bytes([value])
        elif op == 3:
            del buf[pos : pos + 1 + value % 16]
        elif op == 4:
            del buf[pos:]
        elif op == 5 and pos + 4 <= len(buf):
            buf[pos : pos + 4] = struct.pack("<I", INTERESTING[value % len(INTERESTING)])
    return bytes(head if keep_mode else b"") + bytes(buf)


def rust_full(results: dict[str, tuple[str, Any]]) -> tuple[str, Any]:
    return results["rust/full"] if "rust/full" in results else results["pure/full"]


def test_the_seed_corpus_reads_back_with_both_cores() -> None:
    assert len(FILE_SEEDS) >= 8 and len(PLAIN_SEEDS) >= 6, sorted(CORPUS)
    for name, data in CORPUS.items():
        results = harness.check(data)
        assert all(outcome == "ok" for outcome, _ in results.values()), (name, harness.error_classes(results))


@BUDGET
@given(seed=st.sampled_from(FILE_SEEDS), changes=edits)
def test_random_byte_edits_of_backup_files(seed: str, changes: list[tuple[int, int, int]]) -> None:
    original = CORPUS[seed]
    mutated = apply(original, changes)
    results = harness.check(mutated)  # raises harness.Finding on any bug
    outcome, value = rust_full(results)
    if outcome == "ok":  # only a no-op edit may be accepted, and it reads back the original
        assert mutated == original
        assert value == rust_full(harness.check(original))[1]


@BUDGET
@given(seed=st.sampled_from(PLAIN_SEEDS), changes=edits)
def test_random_byte_edits_of_plaintexts(seed: str, changes: list[tuple[int, int, int]]) -> None:
    """Edits behind the encryption (a writer bug, or someone holding the key): the record parser
    refuses anything but a stream the writer itself would produce for the content it returns."""
    mutated = apply(CORPUS[seed], changes)
    results = harness.check(mutated)
    outcome, value = rust_full(results)
    if outcome == "ok":
        meta, trees, trailer = value
        again = rewrite(meta, trees)
        if "zstd" in seed:
            # BLOCK records: rewritten uncompressed, the same content and the same digests (they
            # are over the decoded records), not the same bytes.
            assert rust_full(harness.check(b"\x00" + again)) == ("ok", value)
        else:
            assert again == harness.build_file(mutated)


def rewrite(meta: bytes, trees: list[tuple[str, list[tuple[bytes, bytes | None]]]]) -> bytes:
    sink = io.BytesIO()
    writer = pure.BackupWriter(
        sink, harness.KEY, meta, segment_size=4096, salt=harness.SALT, nonce_prefix=harness.PREFIX
    )
    for name, items in trees:
        writer.begin_tree(name)
        for is_delete, run in itertools.groupby(items, key=lambda kv: kv[1] is None):
            if is_delete:
                writer.add_deletes([k for k, _ in run])
            else:
                writer.add_items(list(run))
        writer.end_tree()
    writer.finish()
    return sink.getvalue()


@BUDGET
@given(
    seed=st.sampled_from(FILE_SEEDS),
    cut=st.integers(0, 1 << 32),
    extra=st.binary(max_size=64),
)
def test_truncated_or_extended_backup_files(seed: str, cut: int, extra: bytes) -> None:
    original = CORPUS[seed]
    body = original[1:]
    mutated = original[:1] + body[: cut % (len(body) + 1)] + extra
    results = harness.check(mutated)
    if rust_full(results)[0] == "ok":
        assert mutated == original


@pytest.mark.parametrize("core_name", ["pure", "rust"])
def test_unknown_first_record_type_is_a_format_error(core_name: str) -> None:
    """Found by fuzz/ (differential check): the Rust core used to raise IntegrityError here,
    against docs/FORMAT.md §3 ("Other type bytes are a FormatError") and the pure core."""
    core = {"pure": pure, "rust": harness.rust}[core_name]
    blob = harness.seal(b"\x42" + bytes(100))
    reader = core.BackupReader(io.BytesIO(blob))
    with pytest.raises(FormatError):
        reader.unlock(harness.KEY)
