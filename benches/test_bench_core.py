"""Core benchmarks, Rust and pure-Python side by side: the one-shot streaming AEAD and the
BackupWriter / BackupReader record path, 64 MiB each.

    python -m pytest benches/test_bench_core.py -p no:cacheprovider --benchmark-enable

The writers write to a counting null sink, so the numbers are the core's cost alone; the readers
read a backup held in memory (io.BytesIO). Both cores get the same data (the pure core is fast
enough for the 500k small records too).
"""

from __future__ import annotations

import io
from types import ModuleType
from typing import Any

import pytest

SEGMENT = 1 << 20
AAD = b"datafold bench"
HEADER = b'{"bench": true}'


def _size(items: list[tuple[bytes, bytes]]) -> int:
    return sum(len(k) + len(v) for k, v in items)


# --- one-shot Tink AES-GCM-HKDF streaming AEAD ---------------------------------------------------


def test_encrypt_stream(measure: Any, core: ModuleType, backup_key: bytes, payload: bytes) -> None:
    ct = measure(
        core.encrypt_stream,
        args=(backup_key, payload, AAD, SEGMENT),
        group="encrypt_stream 64 MiB",
        nbytes=len(payload),
    )
    assert len(ct) > len(payload)


def test_decrypt_stream(measure: Any, core: ModuleType, backup_key: bytes, payload: bytes) -> None:
    ct = core.encrypt_stream(backup_key, payload, AAD, SEGMENT)
    out = measure(
        core.decrypt_stream, args=(backup_key, ct, AAD, SEGMENT), group="decrypt_stream 64 MiB", nbytes=len(payload)
    )
    assert out == payload


# --- BackupWriter / BackupReader ------------------------------------------------------------------


def _write(core: ModuleType, sink: Any, key: bytes, items: list[tuple[bytes, bytes]], level: int = 0) -> Any:
    writer = core.BackupWriter(sink, key, HEADER, compression_level=level)
    writer.begin_tree("data")
    writer.add_items(items)
    writer.end_tree()
    return writer.finish()


def _read(core: ModuleType, data: bytes, key: bytes) -> int:
    reader = core.BackupReader(io.BytesIO(data))
    reader.unlock(key)
    count = 0
    while reader.next_tree() is not None:
        while batch := reader.read_items(4096):
            count += len(batch)
    return count


WORKLOADS = {
    "64KiB-values": "big_items",  # 1000 x (16 + 65536) bytes
    "small-records": "small_items",  # 500k x (16 + 100) bytes
}


@pytest.mark.parametrize("workload", WORKLOADS)
def test_backup_writer(
    measure: Any, request: pytest.FixtureRequest, core: ModuleType, backup_key: bytes, null_sink: type, workload: str
) -> None:
    items = request.getfixturevalue(WORKLOADS[workload])
    trailer = measure(
        lambda: _write(core, null_sink(), backup_key, items),
        group=f"BackupWriter {workload}",
        nbytes=_size(items),
        records=len(items),
    )
    assert trailer[0] == len(items)


@pytest.mark.parametrize("workload", WORKLOADS)
def test_backup_reader(
    measure: Any, request: pytest.FixtureRequest, core: ModuleType, backup_key: bytes, workload: str
) -> None:
    items = request.getfixturevalue(WORKLOADS[workload])
    sink = io.BytesIO()
    _write(core, sink, backup_key, items)
    data = sink.getvalue()
    count = measure(
        _read, args=(core, data, backup_key), group=f"BackupReader {workload}", nbytes=_size(items), records=len(items)
    )
    assert count == len(items)


# --- compression (200k text-like records; the file size goes into extra_info) ------------------


@pytest.mark.parametrize("level", [0, 1, 3, 9])
def test_compressed_writer(
    measure: Any, benchmark: Any, core: ModuleType, backup_key: bytes, null_sink: type, text_items: Any, level: int
) -> None:
    sink = null_sink()
    _write(core, sink, backup_key, text_items, level)
    benchmark.extra_info["file_bytes"] = sink.size
    measure(
        lambda: _write(core, null_sink(), backup_key, text_items, level),
        group=f"BackupWriter text-records level {level}",
        nbytes=_size(text_items),
        records=len(text_items),
        rounds=3,
    )


@pytest.mark.parametrize("level", [0, 1, 3, 9])
def test_compressed_reader(measure: Any, core: ModuleType, backup_key: bytes, text_items: Any, level: int) -> None:
    sink = io.BytesIO()
    _write(core, sink, backup_key, text_items, level)
    count = measure(
        _read,
        args=(core, sink.getvalue(), backup_key),
        group=f"BackupReader text-records level {level}",
        nbytes=_size(text_items),
        records=len(text_items),
        rounds=3,
    )
    assert count == len(text_items)
