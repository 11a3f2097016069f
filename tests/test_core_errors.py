"""The two cores refuse damaged input with the same error class and the same words, so that a
user sees one message whichever core runs (fuzz/harness.py checks the same for random edits of
the record stream; this covers damage to the ciphertext, a wrong key and the Tink stream API)."""

from __future__ import annotations

import random
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from datafold import BackupOptions, DbOperations, EncryptedBackupManager, MasterKeyPair
from datafold import _pure as pure
from datafold._pure.format import REC_HEADER, REC_TREE_BEGIN, encode_len_record, encode_tree_end, quoted
from datafold.errors import BackupError
from helpers import OTHER_SEED, SEED, fill, sample_data, text_items

rust = pytest.importorskip("datafold._core")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fuzz"))
import harness  # noqa: E402

SEGMENT = 4096


def outcome(call: Any) -> tuple[str, str]:
    try:
        call()
    except BackupError as e:
        return type(e).__name__, str(e)
    return "ok", ""


def damaged(good: bytes, rnd: random.Random) -> list[tuple[str, bytes]]:
    """Truncations, bit flips and whole-segment edits of a backup file with SEGMENT-byte segments."""
    n = len(good)
    seg1 = int.from_bytes(good[12:16], "little") + SEGMENT  # segment 1's offset (docs/FORMAT.md §2)
    out = [(f"cut at {k}", good[:k]) for k in sorted({0, 8, 16, 40, 90, 120, seg1, n - SEGMENT, n - 17, n - 16, n - 1})]
    cuts = sorted({rnd.randrange(n) for _ in range(8)})
    out += [(f"cut at {k}", good[:k]) for k in cuts]
    flips = sorted({*range(0, 130, 9), *(rnd.randrange(n) for _ in range(12)), n - 1, n - 20})
    out += [(f"flip {k}", good[:k] + bytes([good[k] ^ 1]) + good[k + 1 :]) for k in flips]
    segments = [good[i : i + SEGMENT] for i in range(seg1, n, SEGMENT)]
    head = good[:seg1]
    out += [
        ("segments 1 and 2 swapped", head + segments[1] + segments[0] + b"".join(segments[2:])),
        ("segment 1 dropped", head + b"".join(segments[1:])),
        ("segment 1 twice", head + segments[0] + b"".join(segments)),
        ("last segment dropped", head + b"".join(segments[:-1])),
        ("bytes appended", good + bytes(20)),
    ]
    return out


@pytest.mark.parametrize("compression_level", [0, 3])
def test_both_cores_refuse_damaged_backups_in_the_same_words(tmp_path: Path, compression_level: int) -> None:
    keys = MasterKeyPair.from_private_bytes(SEED)
    with DbOperations.open(tmp_path / "source") as db:
        fill(db, sample_data())
        db.put_many("text", text_items(3000))
        EncryptedBackupManager(db, keys, core="rust").create_backup(
            tmp_path / "good.dfb", BackupOptions(segment_size=SEGMENT, compression_level=compression_level)
        )
    good = (tmp_path / "good.dfb").read_bytes()
    cases = [(name, data, keys) for name, data in damaged(good, random.Random(compression_level))]
    cases.append(("another key", good, MasterKeyPair.from_private_bytes(OTHER_SEED)))
    path = tmp_path / "damaged.dfb"
    for name, data, key in cases:
        path.write_bytes(data)
        for op in ("verify", "read_metadata", "restore"):
            results = {}
            for core in ("rust", "pure"):
                target = tmp_path / f"target-{core}"
                shutil.rmtree(target, ignore_errors=True)
                with DbOperations.open(target) as db:
                    manager = EncryptedBackupManager(db, key, core=core)
                    call = {
                        "verify": lambda m=manager: m.verify_backup(path),
                        "read_metadata": lambda m=manager: m.read_metadata(path),
                        "restore": lambda m=manager: m.restore_backup(path),
                    }[op]
                    results[core] = outcome(call)
            assert results["rust"] == results["pure"], (name, op)
            if op != "read_metadata":  # which reads only the segments of the header and trailer
                assert results["rust"][0] != "ok", (name, op)


def test_both_cores_refuse_damaged_tink_streams_in_the_same_words() -> None:
    rnd = random.Random(3)
    key, aad = bytes(range(32)), b"aad"
    for segment_size, length in ((64, 0), (64, 10), (64, 300), (256, 1000), (4096, 20000)):
        good = rust.encrypt_stream(key, rnd.randbytes(length), aad, segment_size)
        cuts = {0, 1, 39, 40, 41, 55, 56, 57, *(rnd.randrange(len(good)) for _ in range(20))}
        flips = {0, 1, 39, 40, *(rnd.randrange(len(good)) for _ in range(20))}
        cases = [good[:k] for k in sorted(cuts) if k < len(good)]
        cases += [good[:k] + bytes([good[k] ^ 1]) + good[k + 1 :] for k in sorted(flips)]
        cases += [good + b"x", good + bytes(segment_size)]
        for ct in cases:
            results = [
                outcome(lambda c=c, ct=ct, size=segment_size: c.decrypt_stream(key, ct, aad, size))
                for c in (rust, pure)
            ]
            assert results[0] == results[1] and results[0][0] != "ok", (segment_size, length, len(ct))


@pytest.mark.parametrize(
    "name",
    ["plain", 'quo"te', "back\\slash", "tab\there", "new\nline", "nul\0", "esc\x1b", "nbsp\xa0", "ünïcödé",
     "emoji \U0001f600", "zero\u200bwidth", "e\u0301", "\u0301first", "del\x7f", "bom\ufeff", "'single'"],
)  # fmt: skip
def test_both_cores_quote_tree_names_alike(name: str) -> None:
    """Messages name a tree as Rust's {:?} writes it (datafold._pure.format.quoted)."""
    plaintext = (
        encode_len_record(REC_HEADER, b"{}")
        + encode_len_record(REC_TREE_BEGIN, name.encode())
        + encode_tree_end(1, 0, bytes(32))  # one record claimed, none there
    )
    results = harness.check(b"\x01" + plaintext)  # raises harness.Finding if the words differ
    kind, (error, message) = results["rust/full"]
    assert kind == "error" and message == f"tree {quoted(name)}: the backup says 1 items / 0 bytes but holds 0 / 0"
