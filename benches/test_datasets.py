"""The dataset generator is deterministic and has the shape issue 5 asks for (not a benchmark)."""

from __future__ import annotations

import json

import datasets
import pytest

# sha256 of each dataset at scale 0.001 (Dataset.digest). A change here changes every benchmark's
# input: update it only on purpose, and say so next to the results in docs/BENCHMARKS.md.
PINNED = {
    "small": "3ed5e82a0627c6c8ba93bb6c87e6d8771b8aae97491b0669b52bf096caf32c5d",
    "large": "1f4eb36eacb058df6dab9f092037a4f3d6fd72c6decbfe63d28dfb2d83447f56",
}


@pytest.mark.parametrize("name", PINNED)
def test_same_bytes_every_run(name: str) -> None:
    dataset = datasets.DATASETS[name](0.001)
    assert dataset.digest() == dataset.digest() == PINNED[name]


def test_full_scale_shape() -> None:
    small, large = datasets.small(), datasets.large()
    assert small.records == 2_000_000 and len(small.trees) == 4
    assert large.records == 256 and large.approx_bytes == 256 * (17 + (1 << 20))
    assert datasets.small(0.5).records == 1_000_000 and datasets.large(0.25).records == 64


def test_small_records_are_text_in_key_order() -> None:
    dataset = datasets.small(0.005)
    sizes = []
    for tree in dataset.trees:
        keys = []
        for key, value in dataset.items(tree):
            assert len(key) == 17
            json.loads(value)  # JSON-ish text, not random bytes
            keys.append(key)
            sizes.append(len(value))
        assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert 90 <= sum(sizes) / len(sizes) <= 110


def test_large_values_are_random_mebibytes() -> None:
    dataset = datasets.large_of_size(3 << 20)
    values = [v for _, v in dataset.items(dataset.trees[0])]
    assert [len(v) for v in values] == [1 << 20] * 3 and len(set(values)) == 3
