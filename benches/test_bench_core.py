"""Core benchmarks, Rust and pure-Python side by side: the one-shot streaming AEAD and the
BackupWriter / BackupReader record path, on benches/datasets.py's datasets at DATAFOLD_BENCH_SCALE.

    python -m pytest benches/test_bench_core.py -p no:cacheprovider --benchmark-enable

The writers write to a counting null sink, so the numbers are the core's cost alone; the readers
read a backup held in memory (io.BytesIO). encrypt_stream / decrypt_stream get the "large"
dataset's values joined (random bytes); the record path gets every tree of "small" and "large".
"""

from __future__ import annotations

import io
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
from datasets import Item

SEGMENT = 1 << 20
AAD = b"datafold bench"
HEADER = b'{"bench": true}'
DATASETS = ("small", "large")
Trees = dict[str, list[Item]]


def _size(trees: Trees) -> tuple[int, int]:
    """(bytes of keys and values, records)."""
    return sum(len(k) + len(v) for items in trees.values() for k, v in items), sum(map(len, trees.values()))


# --- one-shot Tink AES-GCM-HKDF streaming AEAD ---------------------------------------------------


def test_encrypt_stream(measure: Any, core: ModuleType, backup_key: bytes, payload: bytes) -> None:
    ct = measure(
        core.encrypt_stream,
        args=(backup_key, payload, AAD, SEGMENT),
        group="encrypt_stream (large values)",
        nbytes=len(payload),
    )
    assert len(ct) > len(payload)


def test_decrypt_stream(measure: Any, core: ModuleType, backup_key: bytes, payload: bytes) -> None:
    ct = core.encrypt_stream(backup_key, payload, AAD, SEGMENT)
    out = measure(
        core.decrypt_stream,
        args=(backup_key, ct, AAD, SEGMENT),
        group="decrypt_stream (large values)",
        nbytes=len(payload),
    )
    assert out == payload


# --- BackupWriter / BackupReader ------------------------------------------------------------------


def _write(core: ModuleType, sink: Any, key: bytes, trees: Trees) -> Any:
    writer = core.BackupWriter(sink, key, HEADER)
    for name, items in trees.items():
        writer.begin_tree(name)
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


@pytest.mark.parametrize("dataset", DATASETS)
def test_backup_writer(
    measure: Any,
    dataset_items: Callable[[str], Trees],
    core: ModuleType,
    backup_key: bytes,
    null_sink: type,
    dataset: str,
) -> None:
    trees = dataset_items(dataset)
    nbytes, records = _size(trees)
    trailer = measure(
        lambda: _write(core, null_sink(), backup_key, trees),
        group=f"BackupWriter {dataset}",
        nbytes=nbytes,
        records=records,
    )
    assert trailer[0] == records


@pytest.mark.parametrize("dataset", DATASETS)
def test_backup_reader(
    measure: Any, dataset_items: Callable[[str], Trees], core: ModuleType, backup_key: bytes, dataset: str
) -> None:
    trees = dataset_items(dataset)
    nbytes, records = _size(trees)
    sink = io.BytesIO()
    _write(core, sink, backup_key, trees)
    data = sink.getvalue()
    count = measure(
        _read, args=(core, data, backup_key), group=f"BackupReader {dataset}", nbytes=nbytes, records=records
    )
    assert count == records
