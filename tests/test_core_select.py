"""DATAFOLD_CORE selects the core globally; datafold.CORE names the active one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "DATAFOLD_CORE"}
    environ.update(env)
    return subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=60)


# Makes `import datafold._core` fail, as on a machine where the extension was not built.
HIDE_RUST = "import sys; sys.modules['datafold._core'] = None\n"


@pytest.mark.parametrize(("value", "expected"), [("rust", "rust"), ("pure", "pure"), (" Pure ", "pure"), ("", "rust")])
def test_env_selects_the_core(value: str, expected: str) -> None:
    r = run_python("import datafold; print(datafold.CORE, datafold.core.core.__name__)", DATAFOLD_CORE=value)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [expected, f"datafold._{'core' if expected == 'rust' else 'pure'}"]


def test_default_is_rust() -> None:
    r = run_python("import datafold; print(datafold.CORE)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "rust"


def test_unknown_value_names_the_accepted_ones() -> None:
    r = run_python("import datafold", DATAFOLD_CORE="c++")
    assert r.returncode != 0
    assert "InvalidArgumentError" in r.stderr and "rust, pure" in r.stderr and "'c++'" in r.stderr


def test_missing_extension_falls_back_to_pure_with_a_warning() -> None:
    code = "import warnings; warnings.simplefilter('always')\nimport datafold; print(datafold.CORE)"
    r = run_python(HIDE_RUST + code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "pure"
    assert "RuntimeWarning" in r.stderr and "Rust extension is missing" in r.stderr


def test_explicit_rust_without_the_extension_is_an_error() -> None:
    r = run_python(HIDE_RUST + "import datafold", DATAFOLD_CORE="rust")
    assert r.returncode != 0
    assert "ImportError" in r.stderr and "DATAFOLD_CORE=pure" in r.stderr


def test_manager_can_pick_a_core() -> None:
    from datafold.core import load_core

    assert load_core("pure").CORE_NAME == "pure"
    assert load_core("rust").CORE_NAME == "rust"
    with pytest.raises(ValueError, match="accepted values"):
        load_core("java")
