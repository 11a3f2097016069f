"""Fixtures and a throughput summary for the pytest-benchmark suite.

Run (pyproject's addopts disable benchmarks, and testpaths only names tests/):

    python -m pytest benches -p no:cacheprovider --benchmark-enable

Every benchmark goes through `measure()`, which records the payload bytes and record count in
`benchmark.extra_info`; the terminal summary then prints a Markdown table with MB/s (1 MB = 1e6 B)
and records/s computed from the median round.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from datafold.core import load_core
from datafold.keys import derive_backup_key

CORES = ("rust", "pure")
MIB = 1 << 20
KEY_SIZE = 16

# (group, test name, benchmark fixture) for the terminal summary, in run order.
_MEASURED: list[tuple[str, str, Any]] = []


@pytest.fixture(scope="session", params=CORES)
def core(request: pytest.FixtureRequest) -> ModuleType:
    """The core under test. A missing Rust extension is an error (load_core raises), not a skip."""
    return load_core(request.param)


@pytest.fixture(scope="session")
def backup_key() -> bytes:
    return derive_backup_key(bytes(range(32)))  # a fixed test seed, never a real key


# --- data -------------------------------------------------------------------------------------

PAYLOAD_SIZE = 64 * MIB
BIG_COUNT, BIG_VALUE = 1000, 64 * 1024  # (a) 1000 values of 64 KiB (62.5 MiB)
SMALL_COUNT, SMALL_VALUE = 500_000, 100  # (b) 500k records of 16 + 100 bytes (55 MiB)


def make_items(count: int, value_size: int) -> list[tuple[bytes, bytes]]:
    """`count` records with 16-byte big-endian counter keys (so already in key order) and random
    values; the values are slices of one random buffer, which is much faster than urandom per value."""
    pool = os.urandom(count * value_size)
    return [(i.to_bytes(KEY_SIZE, "big"), pool[i * value_size : (i + 1) * value_size]) for i in range(count)]


TEXT_COUNT = 200_000  # (c) 200k text-like records of 17 + 100 bytes (22 MiB), for compression


def make_text_items(count: int, seed: int = 7) -> list[tuple[bytes, bytes]]:
    """Like the "small" dataset: 17-byte keys in order, 100-byte JSON-ish text values; the
    generator of the tests (tests/helpers.py text_items), so both measure the same data."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers import text_items

    return text_items(count, seed)


@pytest.fixture(scope="session")
def text_items() -> list[tuple[bytes, bytes]]:
    return make_text_items(TEXT_COUNT)


@pytest.fixture(scope="session")
def payload() -> bytes:
    return os.urandom(PAYLOAD_SIZE)


@pytest.fixture(scope="session")
def big_items() -> list[tuple[bytes, bytes]]:
    return make_items(BIG_COUNT, BIG_VALUE)


@pytest.fixture(scope="session")
def small_items() -> list[tuple[bytes, bytes]]:
    return make_items(SMALL_COUNT, SMALL_VALUE)


# --- measuring ----------------------------------------------------------------------------------


def _measure(
    benchmark: Any,
    fn: Callable[..., Any],
    *,
    group: str,
    nbytes: int,
    records: int = 0,
    args: tuple[Any, ...] = (),
    setup: Callable[[], tuple[tuple[Any, ...], dict[str, Any]]] | None = None,
    rounds: int = 5,
) -> Any:
    """Runs `fn` `rounds` times (one call per round, no calibration) and records the sizes."""
    benchmark.group = group
    benchmark.extra_info["bytes"] = nbytes
    benchmark.extra_info["records"] = records
    if setup is None:
        result = benchmark.pedantic(fn, args=args, rounds=rounds, iterations=1, warmup_rounds=1)
    else:
        result = benchmark.pedantic(fn, setup=setup, rounds=rounds, iterations=1)
    _MEASURED.append((group, benchmark.name, benchmark))
    return result


@pytest.fixture
def measure(benchmark: Any) -> Callable[..., Any]:
    """`measure(fn, group=..., nbytes=..., records=..., args=... | setup=..., rounds=5)`."""

    def run(fn: Callable[..., Any], **kwargs: Any) -> Any:
        return _measure(benchmark, fn, **kwargs)

    return run


class NullSink:
    """A /dev/null-like sink for BackupWriter: counts what it is given and keeps nothing."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        return len(data)


@pytest.fixture(scope="session")
def null_sink() -> type[NullSink]:
    return NullSink


def pytest_terminal_summary(terminalreporter: Any) -> None:
    rows = []
    for group, name, bench in sorted(_MEASURED, key=lambda m: m[0]):  # stable: cores stay in run order
        stats = getattr(bench, "stats", None)
        if stats is None:  # --benchmark-disable: the function ran once, untimed
            continue
        median = stats.stats.median
        nbytes = bench.extra_info.get("bytes", 0)
        records = bench.extra_info.get("records", 0)
        mbs = f"{nbytes / median / 1e6:,.0f}" if nbytes else ""
        recs = f"{records / median:,.0f}" if records else ""
        rows.append(f"| {group} | {name} | {median:.4f} | {mbs} | {recs} |")
    if not rows:
        return
    terminalreporter.section("throughput (median round)")
    terminalreporter.write_line("| group | test | median s | MB/s | records/s |")
    terminalreporter.write_line("|---|---|---:|---:|---:|")
    for row in rows:
        terminalreporter.write_line(row)
