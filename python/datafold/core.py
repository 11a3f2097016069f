"""Selects the backup core: the Rust extension (`datafold._core`) or the pure-Python twin.

`DATAFOLD_CORE=rust|pure` chooses globally. Unset, datafold uses Rust and falls back to the pure
core with a warning when the extension is missing; set to `rust` explicitly, a missing extension
is an error.
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType

from .errors import ArgumentTypeError, InvalidArgumentError

__all__ = ["CORE", "core", "load_core", "ACCEPTED_CORES"]

ACCEPTED_CORES = ("rust", "pure")


def load_core(name: str | None = None) -> ModuleType:
    """The core module for `name` ("rust" or "pure"); None reads DATAFOLD_CORE."""
    if name is not None and not isinstance(name, str):
        raise ArgumentTypeError(f"core must be 'rust', 'pure' or None, not {type(name).__name__}")
    explicit = name is not None or bool(os.environ.get("DATAFOLD_CORE", "").strip())
    choice = (name if name is not None else os.environ.get("DATAFOLD_CORE", "rust")).strip().lower() or "rust"
    if choice not in ACCEPTED_CORES:
        raise InvalidArgumentError(
            f"DATAFOLD_CORE={choice!r} is not a datafold core; accepted values: {', '.join(ACCEPTED_CORES)}"
        )
    if choice == "pure":
        from . import _pure

        return _pure
    try:
        from . import _core
    except ImportError as e:
        if explicit:
            raise ImportError(
                "DATAFOLD_CORE=rust but the Rust extension datafold._core is not built; "
                "reinstall with `pip install .` or set DATAFOLD_CORE=pure"
            ) from e
        warnings.warn(
            "datafold's Rust extension is missing; using the much slower pure-Python core "
            "(reinstall with `pip install .` to build it)",
            RuntimeWarning,
            stacklevel=2,
        )
        from . import _pure

        return _pure
    return _core


core: ModuleType = load_core()
CORE: str = core.CORE_NAME
