"""Plain random-mutation fuzzing of both cores' readers (no coverage feedback; no atheris needed).

    python fuzz/fuzz_random.py [SECONDS] [SEED]      (defaults: 60 s, seed 0)

Mutates the seed corpus (fuzz/corpus/reader, made by make_corpus.py) with harness.mutate and runs
harness.check on each input: only BackupError subclasses, and both cores agreeing. A finding is
written to fuzz/artifacts/random-<sha1> and the run goes on; the exit code is 1 if any was found.
"""

from __future__ import annotations

import hashlib
import random
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402


def main() -> int:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 60.0
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    corpus_dir = HERE / "corpus" / "reader"
    corpus = [p.read_bytes() for p in sorted(corpus_dir.iterdir()) if p.is_file()]
    if not corpus:
        print(f"empty corpus {corpus_dir}: run make_corpus.py first", file=sys.stderr)
        return 2
    artifacts = HERE / "artifacts"
    rnd = random.Random(seed)
    deadline = time.monotonic() + seconds
    runs = 0
    found: dict[str, str] = {}
    outcomes: Counter[str] = Counter()
    while time.monotonic() < deadline:
        data = harness.mutate(rnd, rnd.choice(corpus), corpus)
        runs += 1
        try:
            results = harness.check(data)
        except harness.Finding as e:
            key = str(e).split(":")[0] + ":" + str(e)[:80]
            name = "random-" + hashlib.sha1(data).hexdigest()
            if key not in found:
                artifacts.mkdir(exist_ok=True)
                (artifacts / name).write_bytes(data)
                print(f"FINDING {name}: {e}", flush=True)
            found.setdefault(key, name)
            continue
        outcomes[harness.error_classes(results)["rust/full"]] += 1
    print(f"{runs} inputs in {seconds:.0f} s (seed {seed}); rust full-read outcomes: {dict(outcomes)}")
    print(f"{len(found)} distinct findings" + "".join(f"\n  {v}: {k}" for k, v in found.items()))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
