"""atheris (libFuzzer for Python) target of the Python reader, differential against the Rust core.

    python fuzz/fuzz_reader.py fuzz/corpus/reader -max_total_time=60 -artifact_prefix=fuzz/artifacts/

Each input goes through harness.check (see harness.py: a mode byte, then a whole file or a
plaintext sealed with the fuzz key): both cores read it fully and by read_summary(), and any
exception that is not a BackupError, any disagreement between the cores, or a full read that the
summary read contradicts is a crash (an AssertionError subclass). The pure core (datafold._pure)
and the harness are instrumented for coverage; the Rust core runs uninstrumented, as the oracle.

Without atheris (`pip install atheris`), fuzz_random.py runs the same check on random mutations.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))

with atheris.instrument_imports(include=["datafold", "harness"]):
    import harness


def test_one_input(data: bytes) -> None:
    harness.check(data)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
