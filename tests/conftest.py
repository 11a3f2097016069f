"""Shared fixtures: the cores under test, cross-core pairs, test vectors and a backup key.

The "rust" core must be importable: a missing `datafold._core` FAILS its tests, unless
DATAFOLD_ALLOW_MISSING_RUST=1 is set (then they are skipped), so CI cannot silently skip it.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

import pytest
from datafold.keys import derive_backup_key

CORE_IDS = ("pure", "rust")
_MODULES = {"pure": "datafold._pure", "rust": "datafold._core"}

# A fixed master seed, so failures reproduce; never a real key.
MASTER_SEED = bytes(range(32))


def load_core(name: str) -> ModuleType:
    """Imports a core by id; fails (or skips, with DATAFOLD_ALLOW_MISSING_RUST=1) if rust is absent."""
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError as exc:
        if name == "rust" and os.environ.get("DATAFOLD_ALLOW_MISSING_RUST") == "1":
            pytest.skip(f"Rust core datafold._core not importable ({exc}); DATAFOLD_ALLOW_MISSING_RUST=1")
        pytest.fail(
            f"core {name!r} ({_MODULES[name]}) cannot be imported: {exc}. Build it with `maturin develop`, "
            "or set DATAFOLD_ALLOW_MISSING_RUST=1 to skip the Rust core deliberately.",
            pytrace=False,
        )


@pytest.fixture(scope="session", params=CORE_IDS)
def core(request: pytest.FixtureRequest) -> ModuleType:
    return load_core(request.param)


@pytest.fixture(
    scope="session",
    params=[(w, r) for w in CORE_IDS for r in CORE_IDS],
    ids=[f"{w}-{r}" for w in CORE_IDS for r in CORE_IDS],
)
def cores(request: pytest.FixtureRequest) -> tuple[ModuleType, ModuleType]:
    """(writer core, reader core): all four combinations."""
    writer, reader = request.param
    return load_core(writer), load_core(reader)


@pytest.fixture(scope="session")
def vectors_dir() -> Path:
    env = os.environ.get("DATAFOLD_VECTORS_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "vectors"
    if not path.is_dir():
        pytest.fail(f"test vectors directory {path} is missing (set DATAFOLD_VECTORS_DIR)", pytrace=False)
    return path


@pytest.fixture(scope="session")
def master_seed() -> bytes:
    return MASTER_SEED


@pytest.fixture(scope="session")
def backup_key(master_seed: bytes) -> bytes:
    return derive_backup_key(master_seed)
