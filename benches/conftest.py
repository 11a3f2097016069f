"""Fixtures and a throughput summary for the pytest-benchmark suite.

Run (pyproject's addopts disable benchmarks, and testpaths only names tests/):

    python -m pytest benches -p no:cacheprovider --benchmark-enable
    DATAFOLD_BENCH_SCALE=0.01 python -m pytest benches -p no:cacheprovider --benchmark-enable -q   # quick

The data are benches/datasets.py's "small" and "large" datasets at DATAFOLD_BENCH_SCALE
(default 0.25: 500k records, 64 MiB).

Every benchmark goes through `measure()`, which records the payload bytes and record count in
`benchmark.extra_info`; the terminal summary then prints a Markdown table with MB/s (1 MB = 1e6 B)
and records/s computed from the median round.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

import datasets
import pytest
from datafold.core import load_core
from datafold.keys import derive_backup_key

CORES = ("rust", "pure")

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

# Fraction of the full datasets (benches/datasets.py: "small" = 2M text records in 4 trees, "large" =
# 256 x 1 MiB random values). The default keeps the whole suite, both cores, to a few minutes.
SCALE = float(os.environ.get("DATAFOLD_BENCH_SCALE", "0.25"))


@pytest.fixture(scope="session")
def bench_scale() -> float:
    return SCALE


@pytest.fixture(scope="session")
def dataset_items() -> Callable[[str], dict[str, list[datasets.Item]]]:
    """`dataset_items(name)`: the records of dataset "small" or "large" at SCALE, per tree, made once."""
    made: dict[str, dict[str, list[datasets.Item]]] = {}

    def get(name: str) -> dict[str, list[datasets.Item]]:
        if name not in made:
            made[name] = datasets.DATASETS[name](SCALE).materialize()
        return made[name]

    return get


@pytest.fixture(scope="session")
def payload(dataset_items: Callable[[str], dict[str, list[datasets.Item]]]) -> bytes:
    """The values of the "large" dataset at SCALE, joined: random bytes for the one-shot AEAD."""
    return b"".join(value for items in dataset_items("large").values() for _, value in items)


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
