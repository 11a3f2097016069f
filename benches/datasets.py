"""The benchmark datasets: one deterministic generator for the pytest-benchmark suites and compare.py.

    small   2,000,000 records in 4 trees; keys of 17 bytes ("usr:0000000012345"), values of about
            100 bytes of JSON-ish text made of pseudo-words drawn with Zipf-like weights
    large   256 values of 1 MiB of (pseudo-)random bytes in one tree

`small(scale)` / `large(scale)` scale the record count (at least one record per tree);
`large_of_size(nbytes)` makes a "large"-shaped dataset of a given size (the memory benchmark).
Everything comes from `random.Random` seeded with a string (hashed with SHA-512, so independent of
PYTHONHASHSEED), and the random values from AES-CTR keystream under a fixed key at counter blocks
drawn from it: the same scale gives the same bytes on every run and machine. Records are generated
in key order, tree by tree, as iterators (`Dataset.items(tree)`), so even an 8 GiB dataset is
never held in memory; `Dataset.materialize()` gives lists when a benchmark wants them in memory.

The text is neither tuned to compress well or badly nor to be fast to write: a value is a small
JSON object whose fields are numbers, enumerations and runs of words, like an application record.

    python benches/datasets.py --scale 0.01     # prints sizes, generation time and a digest
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

MIB = 1 << 20
SEED = "datafold-bench-v1"
SMALL_RECORDS = 2_000_000
LARGE_VALUES = 256
LARGE_VALUE_SIZE = MIB
KEY_DIGITS = 13  # keys are b"abc:" + 13 digits = 17 bytes

Item = tuple[bytes, bytes]


@dataclass(frozen=True)
class Tree:
    name: str
    records: int
    make: Callable[[random.Random, int], Iterator[Item]]  # (rng, records) -> items in key order


@dataclass(frozen=True)
class Dataset:
    name: str
    trees: tuple[Tree, ...]
    approx_bytes: int  # keys + values, from the shape (exact: `nbytes()`, which generates everything)

    @property
    def records(self) -> int:
        return sum(t.records for t in self.trees)

    def items(self, tree: Tree) -> Iterator[Item]:
        """The records of `tree` in key order; a fresh generator (same bytes) on every call."""
        return tree.make(random.Random(f"{SEED}/{self.name}/{tree.name}/{tree.records}"), tree.records)

    def all_items(self) -> Iterator[tuple[str, Item]]:
        for tree in self.trees:
            for item in self.items(tree):
                yield tree.name, item

    def materialize(self) -> dict[str, list[Item]]:
        """Every tree's records as a list, in key order."""
        return {tree.name: list(self.items(tree)) for tree in self.trees}

    def nbytes(self) -> int:
        return sum(len(k) + len(v) for _, (k, v) in self.all_items())

    def digest(self) -> str:
        """SHA-256 over tree names, keys and values with their lengths: pins the generator's output."""
        h = hashlib.sha256()
        for tree in self.trees:
            h.update(b"T%d:%s" % (len(tree.name), tree.name.encode()))
            for key, value in self.items(tree):
                h.update(b"%d:%d:" % (len(key), len(value)))
                h.update(key)
                h.update(value)
        return h.hexdigest()

    def fill_lmdb(self, path: Path, items: dict[str, list[Item]] | None = None) -> None:
        """Writes the dataset (or `items`, its materialized form) into a new LMDB database at `path`
        through datafold's store, one transaction per FILL_BATCH_BYTES so memory stays bounded."""
        from datafold import DbOperations

        with DbOperations.open(path) as db:
            db.reserve(self.approx_bytes * 11 // 10, records=self.records)
            for tree in self.trees:
                source = iter(items[tree.name]) if items is not None else self.items(tree)
                while batch := _take_bytes(source, FILL_BATCH_BYTES):
                    db.put_many(tree.name, batch)


FILL_BATCH_BYTES = 64 * MIB


def _take_bytes(items: Iterator[Item], limit: int) -> list[Item]:
    """The next records of `items` up to `limit` bytes of keys and values (at least one)."""
    batch: list[Item] = []
    size = 0
    for item in items:
        batch.append(item)
        size += len(item[0]) + len(item[1])
        if size >= limit:
            break
    return batch


# ------------------------------------------------------------------------------------- text


def _vocabulary(size: int = 4096) -> tuple[list[str], list[float]]:
    """Pseudo-words of 2-9 letters from syllables, with Zipf-like cumulative weights."""
    rng = random.Random(f"{SEED}/vocabulary")
    onsets = ["", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "st", "tr", "ch"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ou"]
    codas = ["", "", "", "n", "r", "s", "t", "l", "nd", "st"]
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < size:
        word = "".join(
            rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(rng.choice((1, 1, 2, 2, 2, 3)))
        )
        if 2 <= len(word) <= 9 and word not in seen:
            seen.add(word)
            words.append(word)
    weights = list(itertools.accumulate(1.0 / (rank + 2.7) for rank in range(size)))
    return words, weights


WORDS, CUM_WEIGHTS = _vocabulary()
_TEXT_WORDS = 1 << 20


@functools.cache
def _text() -> list[str]:
    """A fixed stream of 1M words drawn with the Zipf-like weights; values take slices of it at
    random offsets (drawing every word afresh costs ~5x more and reads no differently)."""
    return random.Random(f"{SEED}/text").choices(WORDS, cum_weights=CUM_WEIGHTS, k=_TEXT_WORDS)


STATUSES = ("active", "pending", "suspended", "closed", "trial")
CURRENCIES = ("EUR", "USD", "GBP", "JPY", "CHF")
LEVELS = ("debug", "info", "info", "info", "warn", "error")
DEVICES = ("android", "ios", "linux", "macos", "windows", "web")


def _words(rng: random.Random, count: int) -> str:
    start = rng.randrange(_TEXT_WORDS - count)
    return " ".join(_text()[start : start + count])


def _keyed(prefix: str, records: int, rng: random.Random) -> Iterator[tuple[int, bytes]]:
    """(id, key) in key order: ids increase by random gaps, keys are prefix + 13 zero-padded digits."""
    ident = rng.randrange(1000, 100_000)
    for _ in range(records):
        ident += rng.randrange(1, 40)
        yield ident, f"{prefix}:{ident:0{KEY_DIGITS}d}".encode()


def _users(rng: random.Random, records: int) -> Iterator[Item]:
    for ident, key in _keyed("usr", records, rng):
        name = _words(rng, 2)
        value = (
            f'{{"id":{ident},"name":"{name}","email":"{name.replace(" ", ".")}@{rng.choice(WORDS)}.org",'
            f'"status":"{rng.choice(STATUSES)}","bio":"{_words(rng, rng.randrange(0, 3))}"}}'
        )
        yield key, value.encode()


def _orders(rng: random.Random, records: int) -> Iterator[Item]:
    for ident, key in _keyed("ord", records, rng):
        value = (
            f'{{"order":{ident},"user":{rng.randrange(100_000, 60_000_000)},'
            f'"total":{rng.randrange(100, 500_000) / 100},"cur":"{rng.choice(CURRENCIES)}",'
            f'"items":{rng.randrange(1, 12)},"note":"{_words(rng, rng.randrange(1, 6))}"}}'
        )
        yield key, value.encode()


def _events(rng: random.Random, records: int) -> Iterator[Item]:
    t = 1_780_000_000_000
    for ident, key in _keyed("evt", records, rng):
        t += rng.randrange(0, 5000)
        value = (
            f'{{"ts":{t},"level":"{rng.choice(LEVELS)}","src":"{rng.choice(WORDS)}",'
            f'"seq":{ident},"msg":"{_words(rng, rng.randrange(2, 8))}"}}'
        )
        yield key, value.encode()


def _sessions(rng: random.Random, records: int) -> Iterator[Item]:
    for _, key in _keyed("ses", records, rng):
        value = (
            f'{{"user":{rng.randrange(100_000, 60_000_000)},"device":"{rng.choice(DEVICES)}",'
            f'"ip":"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}",'
            f'"token":"{rng.getrandbits(64):016x}","ttl":{rng.randrange(60, 86_400)},'
            f'"tags":"{_words(rng, rng.randrange(0, 3))}"}}'
        )
        yield key, value.encode()


# Share of the records per tree (sums to 1) and the generator of each.
SMALL_TREES: tuple[tuple[str, float, Callable[[random.Random, int], Iterator[Item]]], ...] = (
    ("users", 0.2, _users),
    ("orders", 0.3, _orders),
    ("events", 0.35, _events),
    ("sessions", 0.15, _sessions),
)
SMALL_RECORD_BYTES = 17 + 100  # approximate; measured by `python benches/datasets.py`


def small(scale: float = 1.0) -> Dataset:
    """The "small" dataset: SMALL_RECORDS * scale records in 4 trees of text records."""
    total = max(len(SMALL_TREES), round(SMALL_RECORDS * scale))
    trees = tuple(Tree(name, max(1, round(total * share)), make) for name, share, make in SMALL_TREES)
    return Dataset("small", trees, sum(t.records for t in trees) * SMALL_RECORD_BYTES)


# ----------------------------------------------------------------------------------- binary


def _blobs(value_size: int) -> Callable[[random.Random, int], Iterator[Item]]:
    """Values of AES-256-CTR keystream under a fixed key, from a counter block drawn from `rng`:
    deterministic pseudo-random bytes at ~GB/s (random.randbytes makes ~0.3 GB/s here, which
    would dominate the 8 GiB memory benchmark)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key = hashlib.sha256(f"{SEED}/blobs".encode()).digest()
    zeros = bytes(value_size)

    def make(rng: random.Random, records: int) -> Iterator[Item]:
        for _, key_bytes in _keyed("blb", records, rng):
            stream = Cipher(algorithms.AES(key), modes.CTR(rng.randbytes(16))).encryptor()
            yield key_bytes, stream.update(zeros)

    return make


def large_of_size(nbytes: int, value_size: int = LARGE_VALUE_SIZE, name: str = "large") -> Dataset:
    """A "large"-shaped dataset: ceil(nbytes / value_size) random values of value_size bytes, one tree."""
    count = max(1, -(-nbytes // value_size))
    return Dataset(name, (Tree("blobs", count, _blobs(value_size)),), count * (17 + value_size))


def large(scale: float = 1.0) -> Dataset:
    """The "large" dataset: LARGE_VALUES * scale values of 1 MiB random bytes."""
    return large_of_size(max(1, round(LARGE_VALUES * scale)) * LARGE_VALUE_SIZE)


DATASETS: dict[str, Callable[[float], Dataset]] = {"small": small, "large": large}


def main() -> None:
    parser = argparse.ArgumentParser(description="Generate the benchmark datasets and print their sizes.")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the full datasets (default 1.0)")
    parser.add_argument("--show", type=int, default=0, metavar="N", help="print the first N records of each tree")
    args = parser.parse_args()
    for name, make in DATASETS.items():
        dataset = make(args.scale)
        start = time.perf_counter()
        nbytes = keys = 0
        for tree in dataset.trees:
            for i, (key, value) in enumerate(dataset.items(tree)):
                nbytes += len(key) + len(value)
                keys += len(key)
                if i < args.show:
                    print(f"  {tree.name}: {key!r} -> {value[:160]!r}")
        took = time.perf_counter() - start
        print(
            f"{name}: {dataset.records:,} records in {len(dataset.trees)} tree(s), {nbytes:,} bytes "
            f"(keys {keys / dataset.records:.1f} B, values {(nbytes - keys) / dataset.records:,.1f} B on average), "
            f"generated in {took:.2f} s; sha256 {dataset.digest()}"
        )


if __name__ == "__main__":
    main()
