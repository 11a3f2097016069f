"""Per-block zstd compression (docs/FORMAT.md §3, §7): both cores, across cores, crafted BLOCK
records, the pure core without zstandard, and the manager / metadata plumbing."""

from __future__ import annotations

import io
import itertools
import os
import struct
import sys
from types import ModuleType
from typing import Any

import blake3
import pytest
import zstandard
from datafold import BackupOptions, EncryptedBackupManager
from datafold.errors import ArgumentTypeError, FormatError, IntegrityError, InvalidArgumentError
from datafold.keys import derive_digest_key, derive_key_id
from helpers import (  # noqa: F401 - fixtures
    Env,
    backend,
    core_name,
    env,
    fill,
    filled,  # noqa: F811 - a fixture
    snapshot,
    text_items,
)

SALT = bytes(range(1, 33))
PREFIX = bytes(range(7))
HEADER = b'{"test":"compression"}'
MAX_BLOCK_RAW = 16 << 20
Item = tuple[bytes, "bytes | None"]
Trees = list[tuple[str, list[Item]]]


# --- helpers ----------------------------------------------------------------------------------------


def write(core: ModuleType, key: bytes, trees: Trees, level: int, segment_size: int = 65536, **kw: Any) -> Any:
    """(file bytes, trailer) of `trees` written at `level` (None values are DELETEs)."""
    sink = io.BytesIO()
    w = core.BackupWriter(
        sink, key, HEADER, segment_size=segment_size, salt=SALT, nonce_prefix=PREFIX, compression_level=level, **kw
    )
    for name, items in trees:
        w.begin_tree(name)
        for is_delete, run in itertools.groupby(items, key=lambda kv: kv[1] is None):
            if is_delete:
                w.add_deletes(k for k, _ in run)
            else:
                w.add_items(list(run))
        w.end_tree()
    trailer = w.finish()
    return sink.getvalue(), trailer


def read(core: ModuleType, data: bytes, key: bytes, max_items: int = 4096) -> tuple[dict[str, list[Item]], Any]:
    r = core.BackupReader(io.BytesIO(data))
    assert r.unlock(key) == HEADER
    trees: dict[str, list[Item]] = {}
    while (name := r.next_tree()) is not None:
        items: list[Item] = []
        while batch := r.read_items(max_items):
            assert len(batch) <= max_items
            items.extend(batch)
        trees[name] = items
    return trees, r.trailer


def plaintext(core: ModuleType, data: bytes, key: bytes) -> bytes:
    preamble = core.parse_preamble(data)
    return bytes(core.decrypt_stream(key, data[len(preamble.raw) :], preamble.raw, preamble.segment_size))


def block_codecs(plain: bytes) -> list[int]:
    """The codec of every BLOCK record of a plaintext, walking the record framing."""
    pos, codecs = 0, []
    while pos < len(plain):
        rtype = plain[pos]
        if rtype in (1, 2, 6):
            pos += 5 + struct.unpack_from("<I", plain, pos + 1)[0]
        elif rtype == 3:
            klen, vlen = struct.unpack_from("<II", plain, pos + 1)
            pos += 9 + klen + vlen
        elif rtype == 4:
            pos += 5 + struct.unpack_from("<I", plain, pos + 1)[0]
        elif rtype == 5:
            pos += 49
        else:
            assert rtype == 7, rtype
            codec, _, data_len = struct.unpack_from("<BII", plain, pos + 1)
            codecs.append(codec)
            pos += 10 + data_len
    assert pos == len(plain)
    return codecs


def sample_trees() -> Trees:
    big = bytes(range(256)) * 4500  # > 1 MiB: goes out as a plain record, between blocks
    text: list[Item] = list(text_items(30_000))
    text[15_000:15_000] = [(b"user:0000000149999-big", big), (b"user:0000000149999-gone", None)]
    return [
        ("text", text),
        ("empty", []),
        ("odd", [(b"", b""), (b"\x00\xff", None), (b"k" * 5000, b"v" * 70_000), (b"z", os.urandom(300))]),
    ]


# --- roundtrips ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", [1, 3, 9, 19])
def test_roundtrip_at_levels(core: ModuleType, backup_key: bytes, level: int) -> None:
    trees = sample_trees()
    plain_file, plain_trailer = write(core, backup_key, trees, 0)
    data, trailer = write(core, backup_key, trees, level)
    # counts and digests are over the records, not over what carries them
    assert trailer == plain_trailer
    got, read_trailer = read(core, data, backup_key)
    assert got == dict(trees) and read_trailer == trailer
    assert len(data) * 2 < len(plain_file)
    assert 1 in block_codecs(plaintext(core, data, backup_key))


def test_cross_core_level_3(cores: tuple[ModuleType, ModuleType], backup_key: bytes) -> None:
    writer, reader = cores
    trees = sample_trees()
    data, trailer = write(writer, backup_key, trees, 3, segment_size=4096)
    got, read_trailer = read(reader, data, backup_key, max_items=7)
    assert got == dict(trees) and read_trailer == trailer
    # read_summary (the last segments alone) and skipping trees unread work on blocks too
    r = reader.BackupReader(io.BytesIO(data))
    r.unlock(backup_key)
    assert r.read_summary() == trailer
    r = reader.BackupReader(io.BytesIO(data))
    r.unlock(backup_key)
    assert [r.next_tree(), r.next_tree(), r.next_tree(), r.next_tree()] == ["text", "empty", "odd", None]
    assert r.trailer == trailer


def test_level_0_stays_byte_identical(backup_key: bytes) -> None:
    from datafold import _core, _pure

    trees = sample_trees()
    assert write(_pure, backup_key, trees, 0)[0] == write(_core, backup_key, trees, 0)[0]


def test_rust_output_does_not_depend_on_threads(backup_key: bytes) -> None:
    from datafold import _core

    trees = [("t", list(text_items(40_000)))]
    one = write(_core, backup_key, trees, 3, threads=1)[0]
    assert one == write(_core, backup_key, trees, 3, threads=4)[0]


def test_small_dataset_at_level_3_is_at_least_2x_smaller(core: ModuleType, backup_key: bytes) -> None:
    trees = [("small", list(text_items(20_000)))]
    plain = write(core, backup_key, trees, 0)[0]
    packed = write(core, backup_key, trees, 3)[0]
    assert len(packed) * 2 <= len(plain), (len(packed), len(plain))


def test_incompressible_blocks_are_stored_raw(core: ModuleType, backup_key: bytes) -> None:
    # Random 4000-byte values: only the framing would compress (< 1/32), so blocks are stored raw.
    rnd = os.urandom(600 * 4016)
    trees: Trees = [("noise", [(rnd[i : i + 16], rnd[i + 16 : i + 4016]) for i in range(0, len(rnd), 4016)])]
    plain = write(core, backup_key, trees, 0)[0]
    packed, _ = write(core, backup_key, trees, 3)
    codecs = block_codecs(plaintext(core, packed, backup_key))
    assert len(codecs) >= 2 and set(codecs) == {0}
    assert len(plain) < len(packed) <= len(plain) * 1.001
    assert read(core, packed, backup_key)[0] == dict(trees)


def test_random_small_records_do_not_grow(core: ModuleType, backup_key: bytes) -> None:
    rnd = os.urandom(20_000 * 116)
    trees: Trees = [("noise", [(rnd[i : i + 16], rnd[i + 16 : i + 116]) for i in range(0, len(rnd), 116)])]
    plain = write(core, backup_key, trees, 0)[0]
    packed = write(core, backup_key, trees, 3)[0]
    assert len(packed) <= len(plain) * 1.01
    assert read(core, packed, backup_key)[0] == dict(trees)


@pytest.mark.parametrize(
    ("level", "error"),
    [(-1, InvalidArgumentError), (23, InvalidArgumentError), (2**70, InvalidArgumentError)]
    + [(True, ArgumentTypeError), ("3", ArgumentTypeError), (3.0, ArgumentTypeError)],
)
def test_bad_levels(core: ModuleType, backup_key: bytes, level: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="compression_level"):
        core.BackupWriter(io.BytesIO(), backup_key, b"{}", compression_level=level)


# --- crafted BLOCK records ---------------------------------------------------------------------------------


def rec_len(rtype: int, payload: bytes) -> bytes:
    return struct.pack("<BI", rtype, len(payload)) + payload


def block(codec: int, raw_len: int, data: bytes) -> bytes:
    return struct.pack("<BBII", 7, codec, raw_len, len(data)) + data


VALUE = b"value text, value text, value."
RECORDS = b"".join(struct.pack("<BII", 3, 8, 30) + b"key%05d" % i + VALUE for i in range(300))
RECORDS += struct.pack("<BI", 4, 3) + b"old"
ITEMS, NBYTES = 301, 300 * 38 + 3
ZSTD = zstandard.ZstdCompressor(level=3).compress(RECORDS)


def crafted(key: bytes, body: bytes, records: bytes = RECORDS, items: int = ITEMS, nbytes: int = NBYTES) -> bytes:
    """HEADER, tree "t" holding `body`, whose TREE_END and TRAILER describe `records`."""
    dk = derive_digest_key(key)
    header, begin = rec_len(1, HEADER), rec_len(2, b"t")
    tree_digest = blake3.blake3(records, key=dk).digest()
    end = struct.pack("<BQQ", 5, items, nbytes) + tree_digest
    stream_digest = blake3.blake3(header + begin + end, key=dk).digest()
    payload = struct.pack("<QQII", items, nbytes, 1, 1) + b"t" + struct.pack("<QQ", items, nbytes) + tree_digest
    payload += stream_digest
    payload += struct.pack("<I", len(payload) + 4)
    return header + begin + body + end + rec_len(6, payload)


def seal(core: ModuleType, key: bytes, plain: bytes, segment_size: int = 4096) -> bytes:
    preamble = core.encode_preamble(segment_size, derive_key_id(key))
    return preamble + core.encrypt_stream(key, plain, preamble, segment_size, SALT, PREFIX)


def test_handmade_blocks_read_in_both_cores(cores: tuple[ModuleType, ModuleType], backup_key: bytes) -> None:
    sealer, reader = cores
    first, last = RECORDS[: 2 * 47], RECORDS[-8:]  # two PUTs; the DELETE
    middle = RECORDS[len(first) : -8]
    body = first + block(1, len(middle), zstandard.ZstdCompressor().compress(middle)) + block(0, 8, last)
    # a zstd frame without a content size is fine too
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(RECORDS)
    for b in (body, block(1, len(RECORDS), ZSTD), block(1, len(RECORDS), no_size)):
        trees, _ = read(reader, seal(sealer, backup_key, crafted(backup_key, b)), backup_key)
        assert len(trees["t"]) == ITEMS and trees["t"][-1] == (b"old", None)


def _cases() -> dict[str, tuple[bytes, type[Exception]]]:
    n = len(RECORDS)
    other_frame = zstandard.ZstdCompressor().compress(RECORDS[:-8])  # declares n - 8 bytes
    inner_begin = RECORDS + rec_len(2, b"u")
    inner_end = RECORDS + struct.pack("<BQQ", 5, 0, 0) + bytes(32)
    return {
        "unknown codec": (block(2, n, RECORDS), FormatError),
        "codec 255": (block(255, n, ZSTD), FormatError),
        "raw_len too large": (block(1, n + 1, ZSTD), IntegrityError),
        "raw_len too small": (block(1, n - 1, ZSTD), IntegrityError),
        "frame declares another size": (block(1, n, other_frame), IntegrityError),
        "truncated zstd data": (block(1, n, ZSTD[:-4]), IntegrityError),
        "bytes after the frame": (block(1, n, ZSTD + b"\x00"), IntegrityError),
        "two frames": (block(1, 2 * n, ZSTD + ZSTD), IntegrityError),
        "garbage zstd": (block(1, n, b"\x28\xb5\x2f\xfd" + bytes(40)), IntegrityError),
        "raw_len above the limit": (struct.pack("<BBII", 7, 1, MAX_BLOCK_RAW + 1, 10) + bytes(10), IntegrityError),
        "data_len above the limit": (struct.pack("<BBII", 7, 1, 100, MAX_BLOCK_RAW + 1), IntegrityError),
        "empty block": (block(0, 0, b"") + RECORDS, IntegrityError),
        "stored lengths disagree": (struct.pack("<BBII", 7, 0, n, n - 1) + RECORDS[:-1], IntegrityError),
        "TREE_BEGIN inside a block": (block(0, len(inner_begin), inner_begin), IntegrityError),
        "TREE_END inside a block": (block(0, len(inner_end), inner_end), IntegrityError),
        "BLOCK inside a block": (block(0, n + 10 + n, RECORDS + block(0, n, RECORDS)), IntegrityError),
        "zstd BLOCK with a TREE_BEGIN": (
            block(1, len(inner_begin), zstandard.ZstdCompressor().compress(inner_begin)),
            IntegrityError,
        ),
        "record cut by the block's end": (block(0, n - 3, RECORDS[:-3]) + RECORDS[-3:], IntegrityError),
        "PUT header cut by the block's end": (block(0, 47 + 4, RECORDS[:51]) + RECORDS[51:], IntegrityError),
        "block ends the stream": (block(1, n, ZSTD)[:-2], IntegrityError),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_crafted_blocks_fail_cleanly(cores: tuple[ModuleType, ModuleType], backup_key: bytes, case: str) -> None:
    sealer, reader = cores
    body, error = _cases()[case]
    plain = crafted(backup_key, body)
    if case == "block ends the stream":
        plain = rec_len(1, HEADER) + rec_len(2, b"t") + body
    with pytest.raises(error):
        read(reader, seal(sealer, backup_key, plain), backup_key)


# --- the pure core without zstandard ---------------------------------------------------------------------------


def test_pure_core_without_zstandard(monkeypatch: pytest.MonkeyPatch, backup_key: bytes) -> None:
    from datafold import _core, _pure

    trees = [("t", list(text_items(3000)))]
    compressed = write(_core, backup_key, trees, 3)[0]
    stored_raw = seal(_core, backup_key, crafted(backup_key, block(0, len(RECORDS), RECORDS)))
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import zstandard now raises ImportError
    with pytest.raises(FormatError, match=r"pip install 'datafold\[zstd\]'"):
        write(_pure, backup_key, trees, 3)
    with pytest.raises(FormatError, match=r"pip install 'datafold\[zstd\]'"):
        read(_pure, compressed, backup_key)
    # level 0 and stored (codec 0) blocks need no zstd
    assert read(_pure, write(_pure, backup_key, trees, 0)[0], backup_key)[0] == dict(trees)
    assert len(read(_pure, stored_raw, backup_key)[0]["t"]) == ITEMS


# --- manager, metadata -------------------------------------------------------------------------------------


def test_manager_roundtrip_with_compression(filled: Env) -> None:  # noqa: F811 - fixture
    fill(filled.db, {"small": dict(text_items(5000))})
    before = snapshot(filled.db)
    plain = filled.manager.create_backup(filled.backup_path("plain.dfb"))
    result = filled.manager.create_backup(filled.backup_path("zstd.dfb"), BackupOptions(compression_level=3))
    meta = result.metadata
    assert meta.compression == "zstd-3" and meta.options["compression_level"] == 3
    assert plain.metadata.compression is None
    assert meta.trees == plain.metadata.trees  # digests do not depend on compression
    assert result.stats.bytes_written * 2 < plain.stats.bytes_written
    assert filled.manager.read_metadata(result.path).compression == "zstd-3"
    target = filled.open_db("target")
    stats = EncryptedBackupManager(target, filled.keys, core=filled.core).restore_backup(result.path)
    assert stats.verified is True and snapshot(target) == before
