"""BackupWriter / BackupReader / digest_items of both cores, and across them (docs/FORMAT.md).

Files written by the two cores must be byte-identical given the same key, salt and nonce prefix,
and each core must read the other's files. Tampering of any kind must raise a BackupError subclass.
"""

from __future__ import annotations

import gc
import io
import itertools
import json
import os
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from types import ModuleType
from typing import Any

import blake3
import pytest
from conftest import load_core
from datafold.errors import (
    ArgumentTypeError,
    BackupError,
    BackupIOError,
    EncryptionKeyError,
    FormatError,
    IntegrityError,
    InvalidArgumentError,
    VersionMismatchError,
)
from datafold.keys import derive_digest_key, derive_key_id
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SALT = bytes(range(1, 33))
PREFIX = b"\xa0\xa1\xa2\xa3\xa4\xa5\xa6"
HEADER = json.dumps({"backup_id": "00000000-0000-4000-8000-000000000000", "trees": []}, sort_keys=True).encode()
OTHER_KEY = bytes(range(200, 232))

Item = tuple[bytes, "bytes | None"]
Trees = list[tuple[str, list[Item]]]

# --- helpers ----------------------------------------------------------------------------------------


def write_backup(
    core: ModuleType,
    key: bytes,
    trees: Trees,
    *,
    segment_size: int = 4096,
    header: bytes = HEADER,
    salt: bytes | None = SALT,
    nonce_prefix: bytes | None = PREFIX,
    sink: Any = None,
    **kwargs: Any,
) -> tuple[bytes, Any, list[Any]]:
    """Writes `trees` (PUT for a bytes value, DELETE for None; runs of each go through one call)."""
    sink = io.BytesIO() if sink is None else sink
    writer = core.BackupWriter(
        sink, key, header, segment_size=segment_size, salt=salt, nonce_prefix=nonce_prefix, **kwargs
    )
    summaries = []
    for name, items in trees:
        writer.begin_tree(name)
        for is_delete, run in itertools.groupby(items, key=lambda kv: kv[1] is None):
            if is_delete:
                assert writer.add_deletes(k for k, _ in run) >= 1
            else:
                assert writer.add_items(iter(list(run))) >= 1
        summaries.append(writer.end_tree())
    trailer = writer.finish()
    data = sink.getvalue() if isinstance(sink, io.BytesIO) else b""
    if data:
        assert writer.bytes_written == len(data)
    return data, trailer, summaries


def read_all(core: ModuleType, source: Any, key: Any, max_items: int = 4096) -> tuple[bytes, dict, Any]:
    """Unlocks, then next_tree / read_items until None: ({tree: [(k, v), ...]}, trailer)."""
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    reader = core.BackupReader(source)
    meta = reader.unlock(key)
    trees: dict[str, list[Item]] = {}
    while (name := reader.next_tree()) is not None:
        assert name not in trees
        items: list[Item] = []
        while batch := reader.read_items(max_items):
            assert len(batch) <= max_items
            items.extend(batch)
        assert reader.read_items(max_items) == []  # stays [] until next_tree()
        trees[name] = items
    assert reader.trailer is not None
    assert reader.next_tree() is None  # DONE stays DONE
    return meta, trees, reader.trailer


def as_tree_dict(trees: Trees) -> dict[str, list[Item]]:
    return {name: [(bytes(k), None if v is None else bytes(v)) for k, v in items] for name, items in trees}


# An independent encoder of the record layer, to craft plaintexts (valid and invalid).


def rec_len(rtype: int, payload: bytes) -> bytes:
    return struct.pack("<BI", rtype, len(payload)) + payload


def rec_put(k: bytes, v: bytes) -> bytes:
    return struct.pack("<BII", 3, len(k), len(v)) + k + v


def rec_delete(k: bytes) -> bytes:
    return struct.pack("<BI", 4, len(k)) + k


def tree_records(key: bytes, items: list[Item]) -> tuple[bytes, int, int, bytes]:
    body = b"".join(rec_delete(k) if v is None else rec_put(k, v) for k, v in items)
    nbytes = sum(len(k) + (0 if v is None else len(v)) for k, v in items)
    return body, len(items), nbytes, blake3.blake3(body, key=derive_digest_key(key)).digest()


def trailer_record(
    total_items: int, total_bytes: int, trees: list[tuple[str, int, int, bytes]], digest: bytes
) -> bytes:
    payload = struct.pack("<QQI", total_items, total_bytes, len(trees))
    for name, n, b, d in trees:
        raw = name.encode()
        payload += struct.pack("<I", len(raw)) + raw + struct.pack("<QQ", n, b) + d
    payload += digest
    payload += struct.pack("<I", len(payload) + 4)
    return rec_len(6, payload)


def build_plaintext(key: bytes, trees: Trees, header: bytes = HEADER) -> tuple[bytes, tuple]:
    out = rec_len(1, header)
    structure = out  # the stream digest covers HEADER, TREE_BEGIN and TREE_END records only
    summaries = []
    for name, items in trees:
        body, n, b, d = tree_records(key, items)
        begin, end = rec_len(2, name.encode()), struct.pack("<BQQ", 5, n, b) + d
        out += begin + body + end
        structure += begin + end
        summaries.append((name, n, b, d))
    digest = blake3.blake3(structure, key=derive_digest_key(key)).digest()
    trailer = (sum(s[1] for s in summaries), sum(s[2] for s in summaries), summaries, digest)
    return out + trailer_record(*trailer), trailer


def seal(core: ModuleType, key: bytes, plaintext: bytes, segment_size: int = 4096) -> bytes:
    """A backup file holding an arbitrary plaintext, encrypted exactly like a writer would."""
    preamble = core.encode_preamble(segment_size, derive_key_id(key))
    return preamble + core.encrypt_stream(key, plaintext, preamble, segment_size, SALT, PREFIX)


SMALL_TREES: Trees = [
    ("users", [(b"alice", b"1"), (b"bob", b""), (b"", b"empty key"), (b"\x00\xff" * 3, bytes(range(256)))]),
    ("empty tree", []),
    ("ünïcödé ツリー", [(b"k", None), (b"k2", b"v2"), (b"k3", None)]),
]


# --- roundtrips ----------------------------------------------------------------------------------------


def test_roundtrip_small(cores: tuple[ModuleType, ModuleType], backup_key: bytes) -> None:
    writer, reader = cores
    data, trailer, summaries = write_backup(writer, backup_key, SMALL_TREES)
    meta, trees, read_trailer = read_all(reader, data, backup_key)
    assert meta == HEADER
    assert trees == as_tree_dict(SMALL_TREES)
    assert list(trees) == [name for name, _ in SMALL_TREES]
    assert read_trailer == trailer
    total_items, total_bytes, tree_summaries, digest = trailer
    assert tree_summaries == summaries
    assert total_items == 7 and total_bytes == sum(s[2] for s in summaries)
    assert len(digest) == 32 and all(isinstance(s, tuple) and len(s[3]) == 32 for s in tree_summaries)
    assert summaries[1][1:3] == (0, 0)


def test_zero_trees(cores: tuple[ModuleType, ModuleType], backup_key: bytes) -> None:
    writer, reader = cores
    data, trailer, _ = write_backup(writer, backup_key, [], header=b"")
    assert read_all(reader, data, backup_key) == (b"", {}, trailer)
    assert trailer[:3] == (0, 0, [])


def test_matches_independent_encoder(cores: tuple[ModuleType, ModuleType], backup_key: bytes) -> None:
    """The writers' bytes equal an independent encoding of FORMAT.md §3 sealed by the other core."""
    writer, other = cores
    data, trailer, _ = write_backup(writer, backup_key, SMALL_TREES)
    plaintext, expected = build_plaintext(backup_key, SMALL_TREES)
    assert trailer == expected
    assert data == seal(other, backup_key, plaintext)


@pytest.mark.parametrize("segment_size", [4096, 5000, 65536, 1 << 20])
def test_cores_write_identical_bytes(
    cores: tuple[ModuleType, ModuleType], backup_key: bytes, segment_size: int
) -> None:
    a, b = cores
    trees: Trees = [
        (f"t{t}", [(b"key-%d-%d" % (t, i), bytes([i & 0xFF]) * (i * 37 % 3000)) for i in range(60)]) for t in range(4)
    ]
    trees.append(("deletes", [(b"d%d" % i, None) for i in range(100)]))
    out_a = write_backup(a, backup_key, trees, segment_size=segment_size, kdf_id=1, kdf_params=b"argon2 params")
    out_b = write_backup(b, backup_key, trees, segment_size=segment_size, kdf_id=1, kdf_params=b"argon2 params")
    if out_a[0] != out_b[0]:
        first = next(i for i, (x, y) in enumerate(zip(out_a[0], out_b[0], strict=False)) if x != y)
        pytest.fail(
            f"{a.CORE_NAME} and {b.CORE_NAME} wrote different bytes: lengths {len(out_a[0])}/{len(out_b[0])}, "
            f"first difference at offset {first}"
        )
    assert out_a[1:] == out_b[1:]
    assert read_all(b, out_a[0], backup_key)[1] == as_tree_dict(trees)


def test_buffer_types_and_generators(cores: tuple[ModuleType, ModuleType], backup_key: bytes) -> None:
    writer_core, reader_core = cores
    sink = io.BytesIO()
    writer = writer_core.BackupWriter(sink, bytearray(backup_key), memoryview(HEADER), segment_size=4096)
    writer.begin_tree("mixed")
    assert writer.add_items([(bytearray(b"ba"), memoryview(b"mv")), (memoryview(b"m"), bytearray(b"b"))]) == 2
    assert writer.add_items(iter([])) == 0
    assert writer.add_deletes(iter([bytearray(b"x"), memoryview(b"y")])) == 2
    assert writer.add_items((bytes([i]), bytes([i]) * i) for i in range(10)) == 10
    assert writer.end_tree()[1:3] == (14, 4 + 2 + 2 + 10 + 45)
    writer.finish()
    _, trees, _ = read_all(reader_core, sink.getvalue(), memoryview(backup_key))
    assert trees["mixed"][:4] == [(b"ba", b"mv"), (b"m", b"b"), (b"x", None), (b"y", None)]
    assert all(type(k) is bytes and (v is None or type(v) is bytes) for k, v in trees["mixed"])


def test_add_items_is_lazy(core: ModuleType, backup_key: bytes) -> None:
    """add_items streams a generator: ciphertext reaches the sink long before the generator is
    exhausted (a writer may batch a few MiB of plaintext before sealing, not the whole input)."""
    sink = io.BytesIO()
    writer = core.BackupWriter(sink, backup_key, HEADER, segment_size=4096)
    writer.begin_tree("big")
    seen_while_running = []
    total = 1_000_000

    def items() -> Iterator[tuple[bytes, bytes]]:
        for i in range(total):
            if i == 900_000:
                seen_while_running.append(len(sink.getvalue()))
            yield i.to_bytes(4, "big"), b"v"

    assert writer.add_items(items()) == total
    # 900k records of 14 bytes (12.6 MB) were framed: most of them must have been written out
    assert seen_while_running[0] > 6_000_000
    summary = writer.end_tree()
    writer.finish()
    assert summary[1:3] == (total, 5 * total)
    reader = core.BackupReader(io.BytesIO(sink.getvalue()))
    reader.unlock(backup_key)
    assert reader.next_tree() == "big"
    count = 0
    while batch := reader.read_items(100_000):
        count += len(batch)
    assert count == total


def test_read_items_pairs_are_plain_tuples_the_gc_need_not_track(core: ModuleType, backup_key: bytes) -> None:
    """The Rust core hands out its pairs untracked by the garbage collector (they hold only bytes
    or None, so they cannot be in a cycle; CPython would untrack them at its next collection)."""
    trees = [("t", [(b"k%04d" % i, b"v" * (i % 7)) for i in range(300)] + [(b"zz", None)])]
    data, _, _ = write_backup(core, backup_key, trees)
    reader = core.BackupReader(io.BytesIO(data))
    reader.unlock(backup_key)
    assert reader.next_tree() == "t"
    batch = reader.read_items(1000)
    assert batch == as_tree_dict(trees)["t"]
    assert all(type(pair) is tuple and len(pair) == 2 for pair in batch)
    if core.__name__ == "datafold._core":
        assert not any(map(gc.is_tracked, batch))
    gc.collect()  # and the collector is fine with them
    assert batch[-1] == (b"zz", None) and batch[5] == (b"k0005", b"vvvvv")


def test_delete_records(cores: tuple[ModuleType, ModuleType], backup_key: bytes) -> None:
    writer, reader = cores
    trees: Trees = [("only deletes", [(b"a", None), (b"", None), (b"c" * 5000, None)]), ("mixed", [])]
    trees[1] = ("mixed", [(b"p%d" % i, None if i % 3 else b"v" * i) for i in range(50)])
    data, trailer, summaries = write_backup(writer, backup_key, trees)
    assert summaries[0][1:3] == (3, 5001)
    _, got, _ = read_all(reader, data, backup_key, max_items=7)
    assert got == as_tree_dict(trees)


def test_multi_segment(cores: tuple[ModuleType, ModuleType], backup_key: bytes) -> None:
    writer, reader = cores
    trees: Trees = [("t", [(b"%06d" % i, bytes([i & 0xFF]) * 100) for i in range(500)])]  # ~55 KiB
    data, trailer, _ = write_backup(writer, backup_key, trees, segment_size=4096)
    stream_len = len(data) - 44
    assert stream_len > 12 * 4096
    # 12+ segments, the last one partial; segment i >= 1 at stream offset i * 4096
    assert 16 < stream_len % 4096 or stream_len % 4096 == 0
    assert read_all(reader, data, backup_key, max_items=33)[1:] == (as_tree_dict(trees), trailer)
    # a source that returns short reads
    assert read_all(reader, ShortReads(data), backup_key)[1] == as_tree_dict(trees)


class ShortReads:
    """A source whose read(n) returns 1..13 bytes at a time."""

    def __init__(self, data: bytes) -> None:
        self._f = io.BytesIO(data)
        self._sizes = itertools.cycle([1, 13, 7, 2, 11])

    def read(self, n: int) -> bytes:
        return self._f.read(min(n, next(self._sizes)))


def _plaintext_length(header: bytes, name: bytes, key: bytes, value_len: int) -> int:
    trailer = 5 + 20 + (4 + len(name) + 48) + 32 + 4
    return (5 + len(header)) + (5 + len(name)) + (9 + len(key) + value_len) + 49 + trailer


@pytest.mark.parametrize("extra", [-1, 0, 1])
@pytest.mark.parametrize("segments", [1, 2, 3])
def test_exact_segment_boundaries(
    cores: tuple[ModuleType, ModuleType], backup_key: bytes, segments: int, extra: int
) -> None:
    """A plaintext that fills whole segments ends with a full last segment, never an empty one."""
    writer, reader = cores
    target = (4096 - 56) + (segments - 1) * (4096 - 16) + extra
    value_len = target - _plaintext_length(HEADER, b"t", b"k", 0)
    trees: Trees = [("t", [(b"k", b"x" * value_len)])]
    data, trailer, _ = write_backup(writer, backup_key, trees)
    expected = 44 + 40 + target + 16 * (segments + (1 if extra > 0 else 0))
    assert len(data) == expected
    assert read_all(reader, data, backup_key)[1:] == (as_tree_dict(trees), trailer)
    r = reader.BackupReader(io.BytesIO(data))
    r.unlock(backup_key)
    assert r.read_summary() == trailer


# --- property tests -------------------------------------------------------------------------------------

blobs = st.one_of(st.binary(max_size=48), st.binary(min_size=3000, max_size=9000))
items_st = st.lists(st.tuples(blobs, st.one_of(st.none(), blobs)), max_size=25)
names_st = st.text(min_size=1, max_size=12)
trees_st = st.lists(st.tuples(names_st, items_st), max_size=5, unique_by=lambda t: t[0])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(trees=trees_st, header=st.binary(max_size=300), max_items=st.integers(1, 40))
def test_property_roundtrip(
    cores: tuple[ModuleType, ModuleType], backup_key: bytes, trees: Trees, header: bytes, max_items: int
) -> None:
    writer, reader = cores
    data, trailer, summaries = write_backup(writer, backup_key, trees, header=header)
    other, other_trailer, _ = write_backup(reader, backup_key, trees, header=header)
    assert data == other and trailer == other_trailer
    meta, got, read_trailer = read_all(reader, data, backup_key, max_items=max_items)
    assert (meta, got, read_trailer) == (header, as_tree_dict(trees), trailer)
    for (name, items), summary in zip(trees, summaries, strict=True):
        assert summary[0] == name
        assert reader.digest_items(backup_key, items) == summary[1:]
        assert writer.digest_items(backup_key, iter(items)) == summary[1:]
    r = reader.BackupReader(io.BytesIO(data))
    r.unlock(backup_key)
    assert r.read_summary() == trailer


@pytest.mark.slow
def test_64_mib_value(cores: tuple[ModuleType, ModuleType], backup_key: bytes) -> None:
    writer, reader = cores
    value = bytes(range(256)) * (1 << 18)  # 64 MiB
    assert len(value) == 64 << 20
    trees: Trees = [("big", [(b"small", b"s"), (b"huge", value), (b"after", b"a")])]
    data, trailer, _ = write_backup(writer, backup_key, trees, segment_size=1 << 20)
    assert trailer[:2] == (3, len(value) + 16)
    _, got, read_trailer = read_all(reader, data, backup_key, max_items=2)
    assert read_trailer == trailer
    assert got["big"][1][1] == value and got["big"][2] == (b"after", b"a")
    assert reader.digest_items(backup_key, trees[0][1]) == trailer[2][0][1:]


# --- tampering ----------------------------------------------------------------------------------------


def _read_error(core: ModuleType, data: bytes, key: bytes) -> BaseException | None:
    try:
        read_all(core, data, key)
    except Exception as exc:  # noqa: BLE001 - the test inspects the type
        return exc
    return None


def _expected_for_offset(offset: int) -> tuple[type[BaseException], ...]:
    if offset < 8:
        return (FormatError,)  # magic
    if offset < 12:
        return (VersionMismatchError,)
    if 24 <= offset < 40:
        return (EncryptionKeyError,)  # key id
    if offset < 44:
        return (BackupError,)  # other preamble fields: FormatError, or IntegrityError (AAD changed)
    return (IntegrityError,)


def _small_file(core: ModuleType, key: bytes) -> bytes:
    trees: Trees = [("a", [(b"k1", b"v1"), (b"k2", None)]), ("b", [(b"x" * 20, b"y" * 40)])]
    return write_backup(core, key, trees, header=b'{"id": 1}')[0]


def _two_segment_file(core: ModuleType, key: bytes) -> bytes:
    trees: Trees = [("a", [(b"%03d" % i, b"v" * 30) for i in range(110)]), ("b", [(b"gone", None)])]
    data = write_backup(core, key, trees)[0]
    assert 44 + 4096 < len(data) < 44 + 2 * 4096
    return data


def _check_flips(core: ModuleType, data: bytes, key: bytes, positions: Iterable[tuple[int, int]]) -> int:
    failures = []
    checked = 0
    for offset, bit in positions:
        bad = bytearray(data)
        bad[offset] ^= 1 << bit
        exc = _read_error(core, bytes(bad), key)
        expected = _expected_for_offset(offset)
        if not isinstance(exc, expected):
            failures.append((offset, bit, repr(exc), [e.__name__ for e in expected]))
        checked += 1
    assert not failures, failures[:20]
    return checked


def test_every_bit_flip_small_file(core: ModuleType, backup_key: bytes) -> None:
    data = _small_file(core, backup_key)
    assert len(data) < 600
    start = time.monotonic()
    n = _check_flips(core, data, backup_key, ((i, b) for i in range(len(data)) for b in range(8)))
    assert n == 8 * len(data)
    assert time.monotonic() - start < 20


def test_every_bit_flip_two_segment_file(core: ModuleType, backup_key: bytes) -> None:
    """Every single bit of a ~5 KB file of two segments (about 40k flips)."""
    data = _two_segment_file(core, backup_key)
    start = time.monotonic()
    n = _check_flips(core, data, backup_key, ((i, b) for i in range(len(data)) for b in range(8)))
    assert n == 8 * len(data)
    assert time.monotonic() - start < 20


@pytest.mark.parametrize("which", ["small", "two segments"])
def test_truncation_at_every_byte(core: ModuleType, backup_key: bytes, which: str) -> None:
    data = _small_file(core, backup_key) if which == "small" else _two_segment_file(core, backup_key)
    failures = []
    for n in range(len(data)):
        exc = _read_error(core, data[:n], backup_key)
        expected = FormatError if n < 44 else IntegrityError
        if not isinstance(exc, expected):
            failures.append((n, repr(exc)))
    assert not failures, failures[:20]


@pytest.mark.parametrize("extra", [b"\x00", b"\xff" * 15, b"\x01" * 16, b"\x02" * 40, b"\x03" * 4096])
def test_appended_bytes(core: ModuleType, backup_key: bytes, extra: bytes) -> None:
    for data in (_small_file(core, backup_key), _two_segment_file(core, backup_key)):
        with pytest.raises(IntegrityError):
            read_all(core, data + extra, backup_key)
        reader = core.BackupReader(io.BytesIO(data + extra))
        with pytest.raises(IntegrityError):
            reader.unlock(backup_key)  # fails already when segment 0 is no longer the last
            reader.read_summary()


def _segments(data: bytes, css: int = 4096) -> tuple[bytes, list[bytes]]:
    """(preamble + stream header, [segment ciphertexts]) with segment 0 after the 40-byte header."""
    body = data[44:]
    segs = [body[40:css]] + [body[i : i + css] for i in range(css, len(body), css)]
    return data[:84], segs


def test_swapped_dropped_and_duplicated_segments(core: ModuleType, backup_key: bytes) -> None:
    trees: Trees = [("t", [(b"%05d" % i, b"z" * 200) for i in range(100)])]
    data = write_backup(core, backup_key, trees)[0]
    head, segs = _segments(data)
    assert len(segs) >= 5 and head + b"".join(segs) == data
    variants = {
        "swap 1,2": [segs[0], segs[2], segs[1], *segs[3:]],
        "swap last two": [*segs[:-2], segs[-1], segs[-2]],
        "drop middle": [segs[0], *segs[2:]],
        "drop last": segs[:-1],
        "duplicate middle": [segs[0], segs[1], segs[1], *segs[2:]],
    }
    for label, parts in variants.items():
        with pytest.raises(IntegrityError):
            read_all(core, head + b"".join(parts), backup_key)
        if label.startswith("swap last") or label == "drop last":
            reader = core.BackupReader(io.BytesIO(head + b"".join(parts)))
            reader.unlock(backup_key)
            with pytest.raises(IntegrityError):
                reader.read_summary()


def test_segments_from_another_backup(core: ModuleType, backup_key: bytes) -> None:
    """Same key, different salt: segments are not interchangeable between files."""
    trees: Trees = [("t", [(b"%05d" % i, b"z" * 200) for i in range(60)])]
    a = write_backup(core, backup_key, trees)[0]
    b = write_backup(core, backup_key, trees, salt=bytes(32))[0]
    head_a, segs_a = _segments(a)
    _, segs_b = _segments(b)
    with pytest.raises(IntegrityError):
        read_all(core, head_a + b"".join([segs_a[0], segs_b[1], *segs_a[2:]]), backup_key)


def test_wrong_key(cores: tuple[ModuleType, ModuleType], backup_key: bytes) -> None:
    writer, reader_core = cores
    data = _small_file(writer, backup_key)
    reader = reader_core.BackupReader(io.BytesIO(data))
    with pytest.raises(EncryptionKeyError, match="different key") as info:
        reader.unlock(OTHER_KEY)
    assert OTHER_KEY.hex() not in str(info.value) and backup_key.hex() not in str(info.value)
    with pytest.raises(BackupError):
        reader.unlock(backup_key)  # poisoned
    assert read_all(reader_core, data, backup_key)[0] == b'{"id": 1}'


def test_version_2_preamble(cores: tuple[ModuleType, ModuleType], backup_key: bytes) -> None:
    writer, reader = cores
    data = bytearray(_small_file(writer, backup_key))
    data[8:12] = struct.pack("<I", 2)
    with pytest.raises(VersionMismatchError) as info:
        reader.BackupReader(io.BytesIO(bytes(data)))
    assert info.value.found == 2 and info.value.expected == 1
    with pytest.raises(VersionMismatchError) as info2:
        reader.parse_preamble(bytes(data))
    assert (info2.value.found, info2.value.expected) == (2, 1)
    # the version is checked before anything else but the magic, even in a short file
    with pytest.raises(VersionMismatchError):
        reader.BackupReader(io.BytesIO(bytes(data[:16])))
    with pytest.raises(FormatError):
        reader.BackupReader(io.BytesIO(b"NOTABACK" + bytes(data[8:])))


def test_not_a_backup(core: ModuleType) -> None:
    for junk in (b"", b"DFBACKUP", b"DFBACKUP\x01\x00\x00", b"PK\x03\x04" + bytes(100), b"DFBACKUQ" + bytes(100)):
        with pytest.raises(FormatError):
            core.BackupReader(io.BytesIO(junk))


# --- crafted plaintexts: grammar, counts, digests, record types ---------------------------------------------


def _crafted_cases(key: bytes) -> dict[str, tuple[bytes, type[BaseException] | type[None]]]:
    dk = derive_digest_key(key)

    def digest(data: bytes) -> bytes:
        return blake3.blake3(data, key=dk).digest()

    header = rec_len(1, HEADER)
    body, n, b, d = tree_records(key, [(b"k", b"v"), (b"d", None)])
    begin, end = rec_len(2, b"t"), struct.pack("<BQQ", 5, n, b) + d
    tree = begin + body + end
    good_prefix = header + tree
    good_digest = digest(header + begin + end)  # the stream digest skips the tree's records
    good_trailer = trailer_record(n, b, [("t", n, b, d)], good_digest)

    def with_tree_end(n2: int, b2: int, d2: bytes) -> bytes:
        end2 = struct.pack("<BQQ", 5, n2, b2) + d2
        pre = header + begin + body + end2
        return pre + trailer_record(n2, b2, [("t", n2, b2, d2)], digest(header + begin + end2))

    def with_trailer(total_items: int, total_bytes: int, trees: list, sd: bytes) -> bytes:
        return good_prefix + trailer_record(total_items, total_bytes, trees, sd)

    def after_header(records: bytes) -> bytes:
        pre = header + records
        return pre + trailer_record(0, 0, [], digest(pre))

    trailer_bad_len = bytearray(good_trailer)
    trailer_bad_len[-4:] = struct.pack("<I", struct.unpack("<I", bytes(trailer_bad_len[-4:]))[0] + 1)
    dup_tree = rec_len(2, b"t") + struct.pack("<BQQ", 5, 0, 0) + digest(b"")
    return {
        "valid": (good_prefix + good_trailer, type(None)),
        "empty plaintext": (b"", IntegrityError),
        "no HEADER": (tree + good_trailer, IntegrityError),
        "only HEADER": (header, IntegrityError),
        "no TRAILER": (good_prefix, IntegrityError),
        "ends inside a tree": (header + rec_len(2, b"t") + body, IntegrityError),
        "byte after TRAILER": (good_prefix + good_trailer + b"\x00", IntegrityError),
        "record after TRAILER": (good_prefix + good_trailer + rec_len(2, b"u"), IntegrityError),
        "unknown record type": (header + b"\x09" + bytes(20) + good_trailer, FormatError),
        "unknown type in tree": (header + rec_len(2, b"t") + b"\xee" + bytes(60), FormatError),
        "BLOCK of an unknown codec": (header + begin + struct.pack("<BBII", 7, 9, 3, 3) + b"abc", FormatError),
        "BLOCK of bad zstd data": (header + begin + struct.pack("<BBII", 7, 1, 3, 3) + b"abc", IntegrityError),
        "BLOCK outside a tree": (after_header(struct.pack("<BBII", 7, 0, 3, 3) + rec_delete(b"")[:3]), IntegrityError),
        "PUT outside a tree": (after_header(rec_put(b"k", b"v")), IntegrityError),
        "TREE_END outside a tree": (after_header(struct.pack("<BQQ", 5, 0, 0) + digest(b"")), IntegrityError),
        "second HEADER": (after_header(rec_len(1, b"{}")), IntegrityError),
        "nested TREE_BEGIN": (header + rec_len(2, b"t") + rec_len(2, b"u") + bytes(100), IntegrityError),
        "TRAILER inside a tree": (header + rec_len(2, b"t") + good_trailer, IntegrityError),
        "empty tree name": (after_header(rec_len(2, b"") + struct.pack("<BQQ", 5, 0, 0) + digest(b"")), IntegrityError),
        "duplicate tree": (after_header(dup_tree + dup_tree), IntegrityError),
        "item count": (with_tree_end(n + 1, b, d), IntegrityError),
        "byte count": (with_tree_end(n, b + 1, d), IntegrityError),
        "tree digest": (with_tree_end(n, b, bytes(32)), IntegrityError),
        "trailer total items": (with_trailer(n + 1, b, [("t", n + 1, b, d)], good_digest), IntegrityError),
        "trailer sums": (with_trailer(n + 1, b, [("t", n, b, d)], good_digest), IntegrityError),
        "trailer tree digest": (with_trailer(n, b, [("t", n, b, bytes(32))], good_digest), IntegrityError),
        "trailer tree name": (with_trailer(n, b, [("u", n, b, d)], good_digest), IntegrityError),
        "trailer missing tree": (with_trailer(0, 0, [], good_digest), IntegrityError),
        "stream digest": (with_trailer(n, b, [("t", n, b, d)], bytes(32)), IntegrityError),
        "trailer lengths disagree": (good_prefix + bytes(trailer_bad_len), IntegrityError),
    }


def test_crafted_plaintexts(cores: tuple[ModuleType, ModuleType], backup_key: bytes) -> None:
    sealer, reader = cores
    failures = []
    for label, (plaintext, expected) in _crafted_cases(backup_key).items():
        for css in (4096, 4200):
            data = seal(sealer, backup_key, plaintext, css)
            exc = _read_error(reader, data, backup_key)
            if not isinstance(exc, expected):
                failures.append((label, css, repr(exc)))
    assert not failures, failures


def test_read_summary_checks_trailer(core: ModuleType, backup_key: bytes) -> None:
    cases = _crafted_cases(backup_key)
    # (a trailer that is internally consistent but disagrees with the trees needs a full read)
    for label in ("trailer sums", "trailer lengths disagree", "empty plaintext", "only HEADER"):
        reader = core.BackupReader(io.BytesIO(seal(core, backup_key, cases[label][0])))
        try:
            reader.unlock(backup_key)
        except IntegrityError:
            continue
        with pytest.raises(IntegrityError):
            reader.read_summary()


# --- read_summary ------------------------------------------------------------------------------------------


class RecordingFile:
    """A seekable source that records (offset, length) of every read."""

    def __init__(self, data: bytes) -> None:
        self._f = io.BytesIO(data)
        self.reads: list[tuple[int, int]] = []

    def read(self, n: int = -1) -> bytes:
        pos = self._f.tell()
        data = self._f.read(n)
        self.reads.append((pos, len(data)))
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def seekable(self) -> bool:
        return True


def test_read_summary_skips_the_middle(cores: tuple[ModuleType, ModuleType], backup_key: bytes) -> None:
    writer, reader_core = cores
    trees: Trees = [(f"t{t}", [(b"%05d" % i, b"q" * 150) for i in range(40)]) for t in range(8)]
    data, trailer, _ = write_backup(writer, backup_key, trees)
    css = 4096
    n = -(-(len(data) - 44) // css)
    assert n >= 12
    src = RecordingFile(data)
    reader = reader_core.BackupReader(src)
    assert reader.unlock(backup_key) == HEADER
    assert reader.read_summary() == trailer
    assert reader.trailer is None  # set only by a full read
    assert read_all(reader_core, data, backup_key)[2] == trailer
    # segments 0 and 1 (unlock, read-ahead) and the last two may be read, nothing in between
    middle = range(44 + 2 * css, 44 + (n - 2) * css)
    touched = [(pos, size) for pos, size in src.reads if size and pos < middle.stop and pos + size > middle.start]
    assert not touched, touched
    assert sum(size for _, size in src.reads) < 5 * css


def test_read_summary_long_trailer(cores: tuple[ModuleType, ModuleType], backup_key: bytes) -> None:
    """A TRAILER spanning several segments is found from the end (preceding segments decrypted)."""
    writer, reader_core = cores
    trees: Trees = [(f"tree number {i:04d} " + "n" * 60, [(b"k", b"v")]) for i in range(150)]
    data, trailer, _ = write_backup(writer, backup_key, trees)
    assert len(trailer[2]) == 150  # trailer ~ 19 KiB: 5+ segments of 4 KiB
    reader = reader_core.BackupReader(io.BytesIO(data))
    reader.unlock(backup_key)
    assert reader.read_summary() == trailer
    assert read_all(reader_core, data, backup_key)[2] == trailer


def test_read_summary_requirements(core: ModuleType, backup_key: bytes) -> None:
    data = _two_segment_file(core, backup_key)

    class ReadOnly:
        def __init__(self) -> None:
            self._f = io.BytesIO(data)

        def read(self, n: int) -> bytes:
            return self._f.read(n)

    class NotSeekable(RecordingFile):
        def seekable(self) -> bool:
            return False

    reader = core.BackupReader(io.BytesIO(data))
    with pytest.raises(InvalidArgumentError):
        reader.read_summary()  # before unlock
    for source in (ReadOnly(), NotSeekable(data)):
        reader = core.BackupReader(source)
        reader.unlock(backup_key)
        with pytest.raises(InvalidArgumentError):
            reader.read_summary()
    # sizes inconsistent with the segment size
    for cut in (1, 10, 15, 16, 200):
        reader = core.BackupReader(io.BytesIO(data[: 44 + 4096 + 16 - cut] if cut < 16 else data[:-cut]))
        reader.unlock(backup_key)
        with pytest.raises(IntegrityError):
            reader.read_summary()


# --- digest_items ------------------------------------------------------------------------------------------


def test_digest_items_matches_tree_end(cores: tuple[ModuleType, ModuleType], backup_key: bytes) -> None:
    writer, other = cores
    _, trailer, summaries = write_backup(writer, backup_key, SMALL_TREES)
    for (_name, items), summary in zip(SMALL_TREES, summaries, strict=True):
        assert other.digest_items(backup_key, items) == summary[1:]
        assert other.digest_items(backup_key, (kv for kv in items)) == summary[1:]
    empty = other.digest_items(backup_key, [])
    assert empty == (0, 0, blake3.blake3(b"", key=derive_digest_key(backup_key)).digest()) == summaries[1][1:]
    body, n, b, d = tree_records(backup_key, SMALL_TREES[2][1])
    assert other.digest_items(backup_key, SMALL_TREES[2][1]) == (n, b, d)
    assert other.digest_items(OTHER_KEY, SMALL_TREES[0][1]) != summaries[0][1:]


# --- writer state machine and arguments ---------------------------------------------------------------------


def _new_writer(core: ModuleType, key: bytes, sink: Any = None) -> Any:
    return core.BackupWriter(io.BytesIO() if sink is None else sink, key, HEADER, segment_size=4096)


MISUSE = {
    "add_items before begin_tree": lambda w: w.add_items([(b"k", b"v")]),
    "add_deletes before begin_tree": lambda w: w.add_deletes([b"k"]),
    "end_tree before begin_tree": lambda w: w.end_tree(),
    "nested begin_tree": lambda w: (w.begin_tree("a"), w.begin_tree("b")),
    "finish inside a tree": lambda w: (w.begin_tree("a"), w.finish()),
    "finish twice": lambda w: (w.finish(), w.finish()),
    "begin_tree after finish": lambda w: (w.finish(), w.begin_tree("late")),
    "duplicate tree": lambda w: (w.begin_tree("a"), w.end_tree(), w.begin_tree("a")),
    "empty tree name": lambda w: w.begin_tree(""),
    "tree name too long": lambda w: w.begin_tree("x" * 4097),
    "tree name too long in UTF-8": lambda w: w.begin_tree("é" * 2049),
}


@pytest.mark.parametrize("case", list(MISUSE))
def test_writer_misuse(core: ModuleType, backup_key: bytes, case: str) -> None:
    writer = _new_writer(core, backup_key)
    with pytest.raises(InvalidArgumentError):
        MISUSE[case](writer)
    for call in (lambda: writer.begin_tree("fresh"), writer.finish, writer.end_tree):
        with pytest.raises(BackupError):
            call()


def test_writer_longest_tree_name(cores: tuple[ModuleType, ModuleType], backup_key: bytes) -> None:
    writer, reader = cores
    name = "é" * 2048  # 4096 UTF-8 bytes
    data, _, _ = write_backup(writer, backup_key, [(name, [(b"k", b"v")])])
    assert list(read_all(reader, data, backup_key)[1]) == [name]


def test_writer_type_errors_poison(core: ModuleType, backup_key: bytes) -> None:
    for bad in (
        lambda w: w.add_items([("str key", b"v")]),
        lambda w: w.add_items([(b"k", 12)]),
        lambda w: w.add_items([(b"k", None)]),
        lambda w: w.add_deletes(["str"]),
    ):
        writer = _new_writer(core, backup_key)
        writer.begin_tree("t")
        with pytest.raises(TypeError):
            bad(writer)
        with pytest.raises(BackupError):
            writer.end_tree()
    writer = _new_writer(core, backup_key)
    with pytest.raises(TypeError):
        writer.begin_tree(b"bytes name")


def test_writer_generator_error_poisons(core: ModuleType, backup_key: bytes) -> None:
    writer = _new_writer(core, backup_key)
    writer.begin_tree("t")

    def items() -> Iterator[tuple[bytes, bytes]]:
        yield b"a", b"1"
        raise RuntimeError("source database failed")

    with pytest.raises(RuntimeError, match="source database failed"):
        writer.add_items(items())
    with pytest.raises(BackupError):
        writer.end_tree()


def test_writer_arguments(core: ModuleType, backup_key: bytes) -> None:
    sink = io.BytesIO()
    for size in (0, 4095, (64 << 20) + 1, 1 << 31):
        with pytest.raises(InvalidArgumentError, match="segment_size"):
            core.BackupWriter(sink, backup_key, HEADER, segment_size=size)
    for key in (b"", backup_key[:16], backup_key + b"x"):
        with pytest.raises(InvalidArgumentError):
            core.BackupWriter(sink, key, HEADER)
    with pytest.raises(InvalidArgumentError):
        core.BackupWriter(sink, backup_key, HEADER, salt=b"s" * 16)
    with pytest.raises(InvalidArgumentError):
        core.BackupWriter(sink, backup_key, HEADER, nonce_prefix=b"n" * 8)
    with pytest.raises(TypeError):
        core.BackupWriter(sink, "not a key", HEADER)
    assert sink.getvalue() == b""
    for size in (4096, 64 << 20):
        writer = core.BackupWriter(io.BytesIO(), backup_key, HEADER, segment_size=size)
        assert core.parse_preamble(writer.preamble).segment_size == size


def test_writer_output_shape(core: ModuleType, backup_key: bytes) -> None:
    """Preamble and stream header at once; then whole segments (one or several per write);
    the last segment only at finish()."""

    class Sink:
        def __init__(self) -> None:
            self.writes: list[bytes] = []

        def write(self, data: bytes) -> int:
            self.writes.append(bytes(data))
            return len(data)

    sink = Sink()
    writer = core.BackupWriter(sink, backup_key, HEADER, segment_size=4096, salt=SALT, nonce_prefix=PREFIX)
    preamble = writer.preamble
    assert b"".join(sink.writes) == preamble + b"\x28" + SALT + PREFIX
    assert writer.bytes_written == 84
    writer.begin_tree("t")
    # exactly one segment's worth of plaintext in all: nothing may be emitted yet
    writer.add_items([(b"k", b"x" * (4040 - len(HEADER) - 5 - 6 - 10))])
    assert b"".join(sink.writes) == preamble + b"\x28" + SALT + PREFIX
    writer.add_items([(b"k2", b"y" * 10_000)])
    writer.end_tree()
    writer.finish()
    data = b"".join(sink.writes)
    assert writer.bytes_written == len(data)
    # every write ends on a segment boundary (segment i >= 1 ends at 44 + (i + 1) * 4096)
    ends = list(itertools.accumulate(len(w) for w in sink.writes))
    assert all((end - 44) % 4096 == 0 for end in ends[1:-1]), ends
    assert read_all(core, data, backup_key)[1]["t"][1] == (b"k2", b"y" * 10_000)


def test_preamble_api(core: ModuleType, backup_key: bytes) -> None:
    key_id = core.derive_key_id(backup_key)
    assert key_id == derive_key_id(backup_key) and len(key_id) == 16
    raw = core.encode_preamble(4096, key_id)
    assert raw == b"DFBACKUP" + struct.pack("<IIII", 1, 44, 0, 4096) + key_id + struct.pack("<HH", 0, 0)
    p = core.parse_preamble(raw + b"trailing bytes are ignored")
    assert (p.format_version, p.preamble_length, p.flags, p.segment_size) == (1, 44, 0, 4096)
    assert (p.key_id, p.kdf_id, p.kdf_params, p.raw) == (key_id, 0, b"", raw)
    assert backup_key.hex() not in repr(p)
    k = core.parse_preamble(core.encode_preamble(1 << 20, key_id, 1, b"argon2id m=65536"))
    assert (k.kdf_id, k.kdf_params, k.preamble_length) == (1, b"argon2id m=65536", 60)
    assert core.MAGIC == b"DFBACKUP" and core.FORMAT_VERSION == 1 and core.MAX_PREAMBLE_LENGTH == 4096
    assert (core.MIN_SEGMENT_SIZE, core.DEFAULT_SEGMENT_SIZE, core.MAX_SEGMENT_SIZE) == (4096, 1 << 20, 64 << 20)
    with pytest.raises(ValueError):
        core.encode_preamble(100, key_id)
    with pytest.raises(ValueError):
        core.encode_preamble(4096, key_id[:8])
    with pytest.raises(ValueError):
        core.encode_preamble(4096, key_id, 7)
    with pytest.raises(ValueError):
        core.encode_preamble(4096, key_id, 1, bytes(4096 - 43))
    assert len(core.encode_preamble(4096, key_id, 1, bytes(4096 - 44))) == 4096


def _patched(raw: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(raw)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def test_preamble_rejections(core: ModuleType, backup_key: bytes) -> None:
    raw = core.encode_preamble(4096, derive_key_id(backup_key), 1, b"pp")
    bad = {
        "short": raw[:15],
        "short preamble": raw[:45],
        "magic": b"X" + raw[1:],
        "length too small": _patched(raw, 12, "<I", 43),
        "length too large": _patched(raw, 12, "<I", 4097),
        "length disagrees": _patched(raw, 12, "<I", 47),
        "flags": _patched(raw, 16, "<I", 1 << 31),
        "segment too small": _patched(raw, 20, "<I", 4095),
        "segment too large": _patched(raw, 20, "<I", (64 << 20) + 1),
        "kdf id": _patched(raw, 40, "<H", 2),
        "kdf params length": _patched(raw, 42, "<H", 1),
    }
    for label, data in bad.items():
        with pytest.raises(FormatError):
            core.parse_preamble(data)
        with pytest.raises(FormatError):
            core.BackupReader(io.BytesIO(data + bytes(200)) if label != "short preamble" else io.BytesIO(data))
    with pytest.raises(VersionMismatchError):
        core.parse_preamble(_patched(raw, 8, "<I", 0))


# --- reader state machine and I/O errors ----------------------------------------------------------------------


def test_reader_misuse(core: ModuleType, backup_key: bytes) -> None:
    data = _small_file(core, backup_key)
    calls = {
        "next_tree before unlock": lambda r: r.next_tree(),
        "read_items before unlock": lambda r: r.read_items(),
        "read_items between trees": lambda r: (r.unlock(backup_key), r.read_items()),
        "unlock twice": lambda r: (r.unlock(backup_key), r.unlock(backup_key)),
        "read_items(0)": lambda r: (r.unlock(backup_key), r.next_tree(), r.read_items(0)),
        "bad key length": lambda r: r.unlock(backup_key[:31]),
        "read_summary twice": lambda r: (r.unlock(backup_key), r.read_summary(), r.read_summary()),
        "next_tree after read_summary": lambda r: (r.unlock(backup_key), r.read_summary(), r.next_tree()),
    }
    failures = []
    for label, call in calls.items():
        reader = core.BackupReader(io.BytesIO(data))
        try:
            result = call(reader)
        except InvalidArgumentError:
            with pytest.raises(BackupError):
                reader.next_tree()  # poisoned
        else:
            failures.append(f"{label}: returned {result!r} instead of raising InvalidArgumentError")
    assert not failures, failures
    reader = core.BackupReader(io.BytesIO(data))
    assert reader.trailer is None
    assert reader.preamble.raw == data[:44]


def test_next_tree_skips_the_rest_of_a_tree(core: ModuleType, backup_key: bytes) -> None:
    """Moving on from a half-read tree reads and checks the rest of it, then goes on."""
    sink = io.BytesIO()
    writer = core.BackupWriter(sink, backup_key, b"{}", segment_size=4096)
    for name in ("a", "b", "c"):
        writer.begin_tree(name)
        writer.add_items((b"%s%04d" % (name.encode(), i), b"v" * 50) for i in range(200))
        writer.end_tree()
    trailer = writer.finish()
    reader = core.BackupReader(io.BytesIO(sink.getvalue()))
    reader.unlock(backup_key)
    assert reader.next_tree() == "a"
    assert len(reader.read_items(7)) == 7
    assert reader.next_tree() == "b"  # the rest of "a" is read and checked
    assert reader.next_tree() == "c"  # all of "b" too
    assert reader.read_items(1000)[0] == (b"c0000", b"v" * 50)
    assert reader.next_tree() is None
    assert reader.trailer == trailer
    # A corrupted record inside a skipped tree is still found.
    data = bytearray(sink.getvalue())
    data[44 + 40 + 100] ^= 1
    reader = core.BackupReader(io.BytesIO(bytes(data)))
    with pytest.raises(IntegrityError):
        reader.unlock(backup_key)
        while reader.next_tree() is not None:
            pass


def test_reader_poisoned_after_integrity_error(core: ModuleType, backup_key: bytes) -> None:
    data = bytearray(_two_segment_file(core, backup_key))
    data[-1] ^= 1
    reader = core.BackupReader(io.BytesIO(bytes(data)))
    reader.unlock(backup_key)
    with pytest.raises(IntegrityError, match="segment 1"):
        while reader.next_tree() is not None:
            while reader.read_items():
                pass
    with pytest.raises(BackupError):
        reader.next_tree()


class FailingSink:
    """Accepts `limit` bytes in all, then fails every write with ENOSPC."""

    def __init__(self, limit: int) -> None:
        self.total = 0
        self.limit = limit

    def write(self, data: bytes) -> int:
        if self.total + len(data) > self.limit:
            raise OSError(28, "No space left on device")
        self.total += len(data)
        return len(data)


def test_sink_errors(core: ModuleType, backup_key: bytes) -> None:
    with pytest.raises(BackupIOError) as info:
        _new_writer(core, backup_key, FailingSink(0))
    assert isinstance(info.value.__cause__, OSError)
    writer = _new_writer(core, backup_key, FailingSink(84))
    writer.begin_tree("t")
    with pytest.raises(BackupIOError):  # 10 MB: more than any writer may batch before writing
        writer.add_items((b"%d" % i, b"v" * 100) for i in range(100_000))
    with pytest.raises(BackupError):
        writer.end_tree()
    writer = _new_writer(core, backup_key, FailingSink(84))
    with pytest.raises(BackupIOError):
        writer.finish()


def test_source_errors(core: ModuleType, backup_key: bytes) -> None:
    data = _two_segment_file(core, backup_key)

    class FailingSource:
        def __init__(self, fail_at: int) -> None:
            self._f = io.BytesIO(data)
            self.fail_at = fail_at

        def read(self, n: int) -> bytes:
            """Serves bytes up to `fail_at`, then fails with EIO."""
            pos = self._f.tell()
            if pos >= self.fail_at:
                raise OSError(5, "Input/output error")
            return self._f.read(min(n, self.fail_at - pos))

    with pytest.raises(BackupIOError):
        core.BackupReader(FailingSource(10))  # inside the preamble
    reader = core.BackupReader(FailingSource(200))
    with pytest.raises(BackupIOError) as info:
        reader.unlock(backup_key)
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(BackupError):
        reader.next_tree()


# --- interface ------------------------------------------------------------------------------------------------


def _pyi_names() -> set[str]:
    import ast
    from pathlib import Path

    import datafold

    pyi = Path(datafold.__path__[0]) / "_core.pyi"
    names = set()
    for node in ast.parse(pyi.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return {n for n in names if not n.startswith("_")}


def test_interface_names(core: ModuleType) -> None:
    names = _pyi_names()
    assert {"BackupWriter", "BackupReader", "encrypt_stream", "CORE_NAME", "Trailer"} <= names
    aliases = {"TreeSummary", "Trailer"}  # typing aliases: only the pure core can export them
    # The LMDB store's direct reads and native restores: Rust-only accelerators, outside the
    # shared interface (so is BackupReader.write_items).
    rust_only = {"LmdbDataFile", "LmdbScan", "RecordBatch", "LmdbWriter"}
    assert rust_only <= names
    shared = names - rust_only
    missing = sorted(n for n in (names if core.CORE_NAME == "rust" else shared) - aliases if not hasattr(core, n))
    assert not missing, missing
    assert core.CORE_NAME == ("pure" if core.__name__.endswith("_pure") else "rust")
    if core.CORE_NAME == "pure":
        assert set(core.__all__) == shared


def test_skip_items_counts_what_read_items_would_hand_out(core: ModuleType, backup_key: bytes) -> None:
    sink = io.BytesIO()
    writer = core.BackupWriter(sink, backup_key, b"{}", segment_size=4096)
    for name, n in (("a", 10_000), ("b", 0), ("c", 3)):
        writer.begin_tree(name)
        writer.add_items((b"%06d" % i, b"v" * (i % 50)) for i in range(n))
        writer.end_tree()
    writer.finish()
    data = sink.getvalue()
    reader = core.BackupReader(io.BytesIO(data))
    reader.unlock(backup_key)
    assert reader.next_tree() == "a"
    assert reader.skip_items(4000) == 4000
    assert len(reader.read_items(1000)) == 1000
    assert reader.skip_items(100_000) == 5000
    assert reader.skip_items() == 0
    assert reader.next_tree() == "b" and reader.skip_items() == 0
    assert reader.next_tree() == "c" and reader.skip_items() == 3
    assert reader.next_tree() is None and reader.trailer is not None
    # A damaged segment is met while skipping: IntegrityError, and the reader stays failed.
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 1
    reader = core.BackupReader(io.BytesIO(bytes(damaged)))
    reader.unlock(backup_key)
    reader.next_tree()
    with pytest.raises(IntegrityError):
        while reader.skip_items():
            pass
    with pytest.raises(BackupError):
        reader.skip_items()


def test_read_items_batches_are_bounded_by_bytes(core: ModuleType, backup_key: bytes) -> None:
    """A batch ends once its keys and values reach max_bytes, but always holds one record."""
    sink = io.BytesIO()
    writer = core.BackupWriter(sink, backup_key, b"{}", segment_size=4096)
    writer.begin_tree("big")
    writer.add_items((b"%03d" % i, bytes([i]) * 10_000) for i in range(20))
    writer.end_tree()
    writer.finish()
    reader = core.BackupReader(io.BytesIO(sink.getvalue()))
    reader.unlock(backup_key)
    assert reader.next_tree() == "big"
    assert len(reader.read_items(100, max_bytes=25_000)) == 3  # 3 x 10,003 bytes reach the limit
    assert len(reader.read_items(100, max_bytes=1)) == 1
    rest = reader.read_items(100)
    assert [k for k, _ in rest] == [b"%03d" % i for i in range(4, 20)]
    assert reader.read_items() == []
    # skip_items ends its batch where read_items would (a pass in bounded steps).
    reader = core.BackupReader(io.BytesIO(sink.getvalue()))
    reader.unlock(backup_key)
    assert reader.next_tree() == "big"
    assert reader.skip_items(100, max_bytes=25_000) == 3
    assert reader.skip_items(100, 1) == 1
    assert reader.skip_items(100) == 16
    assert reader.skip_items() == 0
    # A refused argument fails the reader, as with read_items, in the same words in both cores.
    for bad in (0, -1, True, 1.5, "1"):
        reader = core.BackupReader(io.BytesIO(sink.getvalue()))
        reader.unlock(backup_key)
        assert reader.next_tree() == "big"
        with pytest.raises((InvalidArgumentError, ArgumentTypeError)):
            reader.skip_items(1, max_bytes=bad)
        with pytest.raises(BackupError, match="^this backup reader failed earlier"):
            reader.skip_items()


def test_skipping_a_tree_lets_other_threads_run(backup_key: bytes) -> None:
    """The Rust reader parses a skipped tree (next_tree while one is open) without the GIL:
    another Python thread keeps running meanwhile (a read-back check beside the writer, or a
    verify in a server's thread, would otherwise stall the rest of the program). Measured as the
    part of the call in which the other thread made no progress for 5 ms or more: with the GIL
    held while parsing, that was nearly all of it, every time. Up to three tries: on a machine
    busy with other work the other thread may not get a core for a while even without the GIL."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs two cores: on one, the two threads take turns whatever the GIL does")
    rust = load_core("rust")
    sink = io.BytesIO()
    # 2,000,000 tiny records in one segment: the call is mostly parsing.
    writer = rust.BackupWriter(sink, backup_key, b"{}", segment_size=32 << 20)
    writer.begin_tree("t")
    writer.add_items((i.to_bytes(4, "big"), b"") for i in range(2_000_000))
    writer.end_tree()
    writer.finish()

    def stalled_share() -> float:
        reader = rust.BackupReader(io.BytesIO(sink.getvalue()), threads=1)
        reader.unlock(backup_key)
        assert reader.next_tree() == "t"
        ticks: list[float] = []
        stop = threading.Event()

        def tick() -> None:
            while not stop.is_set():
                ticks.append(time.perf_counter())

        switch = sys.getswitchinterval()
        sys.setswitchinterval(0.001)
        ticker = threading.Thread(target=tick)
        ticker.start()
        try:
            time.sleep(0.01)
            start = time.perf_counter()
            assert reader.next_tree() is None  # skips all of "t", then reads the trailer
            end = time.perf_counter()
        finally:
            stop.set()
            ticker.join()
            sys.setswitchinterval(switch)
        assert reader.trailer is not None and reader.trailer[0] == 2_000_000
        seen = [start, *(t for t in ticks if start < t < end), end]
        stalled = sum(b - a for a, b in itertools.pairwise(seen) if b - a >= 0.005)
        return stalled / (end - start)

    shares = []
    for _ in range(3):
        shares.append(stalled_share())
        if shares[-1] < 0.5:
            return
    pytest.fail(f"the other thread stood still for {', '.join(f'{s:.0%}' for s in shares)} of the call")


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threads_do_not_change_the_bytes(core: ModuleType, backup_key: bytes, threads: int) -> None:
    """Sealing and opening segments in parallel writes and reads exactly what one thread does."""
    trees: Trees = [("t", [(b"%06d" % i, bytes([i % 251]) * 3000) for i in range(3000)])]
    one = write_backup(core, backup_key, trees, segment_size=65536)
    sink = io.BytesIO()
    writer = core.BackupWriter(
        sink, backup_key, HEADER, segment_size=65536, salt=SALT, nonce_prefix=PREFIX, threads=threads
    )
    writer.begin_tree("t")
    writer.add_items(trees[0][1])
    writer.end_tree()
    writer.finish()
    assert sink.getvalue() == one[0]
    reader = core.BackupReader(io.BytesIO(one[0]), threads=threads)
    reader.unlock(backup_key)
    assert reader.next_tree() == "t"
    got = []
    while batch := reader.read_items():
        got.extend(batch)
    assert got == trees[0][1]
    assert reader.next_tree() is None
    data = bytes(range(256)) * 20_000
    ct = core.encrypt_stream(backup_key, data, b"ad", 4096, SALT, PREFIX, threads=threads)
    assert ct == core.encrypt_stream(backup_key, data, b"ad", 4096, SALT, PREFIX, threads=1)
    assert core.decrypt_stream(backup_key, ct, b"ad", 4096, threads=threads) == data
    with pytest.raises(ValueError):
        core.BackupReader(io.BytesIO(one[0]), threads=-1)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs os.fork and /proc")
def fork_and_wait(child: Callable[[], int]) -> int:
    """Runs `child` in a forked child and returns its exit status (it must end within 60 s)."""
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            status = child()
        finally:
            os._exit(status)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung")
    return os.waitstatus_to_exitcode(done[1])


def test_a_forked_child_seals_and_opens_in_parallel(backup_key: bytes) -> None:
    """The Rust core keeps its helper threads for the life of the process (src/pool.rs). A child
    forked after they started has none of them: it must start its own, not wait for the
    parent's (a multiprocessing worker forked by a program that made a backup, say)."""
    rust = load_core("rust")
    trees: Trees = [("t", [(b"%06d" % i, bytes([i % 251]) * 3000) for i in range(3000)])]
    data, _, _ = write_backup(rust, backup_key, trees, segment_size=1 << 20, threads=2)
    assert read_all(rust, data, backup_key)[1] == dict(trees)

    def child() -> int:  # 0 only if both directions work
        alone = len(os.listdir("/proc/self/task"))
        again, _, _ = write_backup(rust, backup_key, trees, segment_size=1 << 20, threads=2)
        if again != data or read_all(rust, again, backup_key)[1] != dict(trees):
            return 2
        if len(os.listdir("/proc/self/task")) <= alone:
            return 3  # it worked alone, believing the parent's helpers were there
        return 0

    assert fork_and_wait(child) == 0


def test_a_writer_forked_mid_backup(backup_key: bytes) -> None:
    """With more than one thread the Rust writer seals a batch on a thread of its own while the
    next one fills (src/writer.rs). A child forked while a batch was with that thread cannot
    finish the backup: it gets an InvalidArgumentError, never a hang. Forked between batches, it
    starts a sealer of its own and its backup reads back; the parent's is unharmed either way."""
    rust = load_core("rust")
    rows = [(b"%07d" % i, bytes([i % 251]) * 200) for i in range(40_000)]  # ~8.5 MB: batches go

    def start() -> tuple[Any, io.BytesIO]:
        sink = io.BytesIO()
        writer = rust.BackupWriter(sink, backup_key, HEADER, segment_size=1 << 20, threads=2)
        writer.begin_tree("t")
        writer.add_items(rows)  # the last full batch is with the sealer when this returns
        return writer, sink

    def finish(writer: Any, sink: io.BytesIO, expected: dict[str, list[tuple[bytes, bytes]]]) -> bool:
        writer.end_tree()
        writer.finish()
        return read_all(rust, sink.getvalue(), backup_key)[1] == expected

    writer, sink = start()

    def child_mid_batch() -> int:
        try:
            writer.end_tree()
        except InvalidArgumentError as e:
            return 0 if "forked" in str(e) else 2
        return 3

    assert fork_and_wait(child_mid_batch) == 0
    assert finish(writer, sink, {"t": rows})

    writer, sink = start()
    writer.end_tree()  # takes the batch back: nothing is with the sealer now
    writer.begin_tree("u")

    def child_between_batches() -> int:
        writer.add_items(rows)
        return 0 if finish(writer, sink, {"t": rows, "u": rows}) else 2

    assert fork_and_wait(child_between_batches) == 0
    writer.add_items(rows[:10])
    assert finish(writer, sink, {"t": rows, "u": rows[:10]})


class TrickleSink:
    """A raw-file-like sink that takes at most 1000 bytes per write() and says how many."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.calls = 0

    def write(self, b: Any) -> int:
        self.calls += 1
        taken = bytes(memoryview(b)[:1000])
        self.data += taken
        return len(taken)


class KeepingSink:
    """Keeps the objects it is given, which the io contract says it must not rely on."""

    def __init__(self) -> None:
        self.kept: list[Any] = []
        self.copy = bytearray()

    def write(self, b: Any) -> int:
        self.kept.append(b)
        self.copy += b
        return len(b)


def test_partial_writes_are_completed(core: ModuleType, backup_key: bytes) -> None:
    trickle = TrickleSink()
    expected = write_backup(core, backup_key, SMALL_TREES * 1, segment_size=4096)[0]
    write_backup(core, backup_key, SMALL_TREES, segment_size=4096, sink=trickle)
    assert bytes(trickle.data) == expected
    assert trickle.calls > len(expected) // 1000


def test_a_sink_that_keeps_its_argument_never_sees_reused_memory(core: ModuleType, backup_key: bytes) -> None:
    """The Rust core hands the sink a memoryview of its own buffer and releases it after the call:
    a kept reference raises on use instead of showing bytes of later segments."""
    sink = KeepingSink()
    trees: Trees = [("t", [(b"%05d" % i, bytes([i % 256]) * 500) for i in range(400)])]
    expected = write_backup(core, backup_key, trees, segment_size=4096)[0]
    write_backup(core, backup_key, trees, segment_size=4096, sink=sink)
    assert bytes(sink.copy) == expected
    for kept in sink.kept:
        try:
            data = bytes(kept)
        except ValueError:
            continue  # a released view
        assert data in expected


@pytest.mark.parametrize(
    ("items", "max_key", "plain"),
    [
        ([(b"a", b"1"), (b"bb", b"")], 2, True),
        ([(b"a", b"1"), (b"bbb", b"")], 2, False),  # a key too long
        ([(b"", b"1")], 2, False),  # an empty key
        ([], 2, False),
        (((b"a", b"1"),), 2, False),  # a tuple, not a list
        ([[b"a", b"1"]], 2, False),  # a list pair
        ([(b"a", b"1", b"2")], 2, False),
        ([(b"a", bytearray(b"1"))], 2, False),
        ([(b"a", None)], 2, False),
        ([(memoryview(b"a"), b"1")], 2, False),
        ([(b"a", b"1")], 1 << 80, True),
        ([(b"a", b"1")], 0, False),
    ],
)
def test_plain_pairs(core: ModuleType, items: object, max_key: int, plain: bool) -> None:
    assert core.plain_pairs(items, max_key) is plain


@pytest.mark.parametrize(
    ("items", "after", "ascending"),
    [
        ([(b"a", b"1"), (b"ab", b""), (b"b", b"")], None, True),
        ([(b"a", b"1"), (b"ab", b"")], b"", True),
        ([(b"a", b"1"), (b"ab", b"")], b"a", False),  # not after `after`
        ([(b"b", b"1"), (b"a", b"")], None, False),
        ([(b"a", b"1"), (b"a", b"2")], None, False),  # strictly
        ([(b"ab", b"1"), (b"a\xff", b"")], None, True),  # byte order, shorter first: b"ab" < b"a\xff"
        ([(b"a\xff", b"1"), (b"b", b"")], b"a\xfe\xff", True),
        ([], b"z", True),
        (((b"a", b"1"),), None, False),  # a tuple, not a list
        ([[b"a", b"1"]], None, False),
        ([(bytearray(b"a"), b"1")], None, False),
        ([(b"a",)], None, False),
    ],
)
def test_keys_ascending(core: ModuleType, items: object, after: bytes | None, ascending: bool) -> None:
    assert core.keys_ascending(items, after) is ascending


def test_keys_ascending_arguments(core: ModuleType) -> None:
    with pytest.raises(ArgumentTypeError, match="after must be bytes or None"):
        core.keys_ascending([(b"a", b"1")], "a")


def test_plain_pairs_arguments(core: ModuleType) -> None:
    with pytest.raises(InvalidArgumentError, match="max_key must be at least 0"):
        core.plain_pairs([(b"a", b"1")], -1)
    with pytest.raises(ArgumentTypeError, match="max_key must be an int"):
        core.plain_pairs([(b"a", b"1")], "3")
