"""Writes the seed corpus of the reader fuzz targets: real small backups, made by the manager from
LMDB and SQLite databases with the fuzz key (harness.MASTER_SEED), in the input format of
harness.py (a mode byte, then a whole file or a record-stream plaintext).

    python fuzz/make_corpus.py [OUT_DIR]        (default: fuzz/corpus/reader)

The files are deterministic where the format allows (fixed salt and nonce prefix through the core
writer); one backup per backend also goes through EncryptedBackupManager as a user would make it.
Both the Rust target (fuzz_targets/reader.rs, src/bin/stable.rs) and the Python targets read this
directory.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import struct
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402
from datafold import BackupOptions, DbOperations, EncryptedBackupManager, MasterKeyPair  # noqa: E402
from datafold import _pure as pure  # noqa: E402
from datafold.metadata import BackupMetadata, SourceInfo  # noqa: E402


def datasets() -> dict[str, dict[str, list[tuple[bytes, bytes | None]]]]:
    rnd = random.Random(1)
    return {
        "empty": {},
        "one-tree": {"t": [(b"k", b"v")]},
        "empty-tree": {"t": []},
        "deletes": {"t": [(b"a", b"1"), (b"gone", None), (b"", b"empty key"), (b"z", b"")]},
        "three-trees": {
            "users": [(b"alice", b"admin"), (b"bob", b""), (b"\x00\xff", bytes(range(64)))],
            "metadata": [(b"schema", b"3")],
            "ünïcödé": [(b"k%03d" % i, rnd.randbytes(rnd.randrange(0, 40))) for i in range(30)],
        },
        # about three 4 KiB segments: records straddle segment boundaries
        "multi-segment": {"log": [(b"log:%05d" % i, rnd.randbytes(90)) for i in range(110)]},
        "big-value": {"blob": [(b"v", rnd.randbytes(9000))]},
    }


def header_for(trees: list[str]) -> bytes:
    from datetime import datetime, timezone

    return BackupMetadata.header_json(
        mode="full",
        parent_backup_id=None,
        source=SourceInfo("lmdb", "/corpus"),
        options={"tree_filter": None, "key_prefix_filter": None, "include_metadata": True, "compression_level": 0},
        trees=trees,
        created_at=datetime(2026, 1, 1, tzinfo=timezone.utc),
        backup_id="00000000-0000-4000-8000-000000000000",
    )


def write(
    trees: dict[str, list[tuple[bytes, bytes | None]]], segment_size: int = 4096, compression_level: int = 0
) -> bytes:
    sink = io.BytesIO()
    writer = pure.BackupWriter(
        sink,
        harness.KEY,
        header_for(list(trees)),
        segment_size=segment_size,
        salt=harness.SALT,
        nonce_prefix=harness.PREFIX,
        compression_level=compression_level,
    )
    for name, items in trees.items():
        writer.begin_tree(name)
        for key, value in items:
            if value is None:
                writer.add_deletes([key])
            else:
                writer.add_items([(key, value)])
        writer.end_tree()
    writer.finish()
    return sink.getvalue()


def plaintext_of(blob: bytes) -> tuple[bytes, int]:
    preamble = pure.parse_preamble(blob)
    stream = blob[preamble.preamble_length :]
    return pure.decrypt_stream(harness.KEY, stream, preamble.raw, preamble.segment_size), preamble.segment_size


def manager_backups(tmp: Path) -> dict[str, bytes]:
    out = {}
    keys = MasterKeyPair.from_private_bytes(harness.MASTER_SEED)
    for backend in ("lmdb", "sqlite"):
        with DbOperations.open(tmp / f"db-{backend}{'' if backend == 'lmdb' else '.sqlite'}", backend) as db:
            db.put_many("users", [(b"alice", b"admin"), (b"bob", b"\x00" * 50)])
            db.put_many("events", [(b"e%04d" % i, b"x" * (i % 70)) for i in range(120)])
            db.put("_internal", b"cursor", b"42")
            path = tmp / f"{backend}.dfb"
            EncryptedBackupManager(db, keys, core="pure").create_backup(path, BackupOptions(segment_size=4096))
            out[f"manager-{backend}"] = path.read_bytes()
    return out


def main() -> None:
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "corpus" / "reader"
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes] = {}
    for label, trees in datasets().items():
        files[label] = write(trees)
    files["multi-segment-css5000"] = write(datasets()["multi-segment"], 5000)
    # BLOCK records (zstd, and blocks stored raw); the exact bytes depend on the zstandard version.
    files["zstd-multi-segment"] = write(datasets()["multi-segment"], compression_level=3)
    files["zstd-deletes"] = write(datasets()["deletes"], compression_level=1)
    files["zstd-big-value"] = write(datasets()["big-value"], compression_level=3)
    text = {"notes": [(b"n%04d" % i, b"status=ok user=%d the quick brown fox" % (i % 7)) for i in range(300)]}
    files["zstd-text"] = write(text, compression_level=3)
    with tempfile.TemporaryDirectory() as tmp:
        files.update(manager_backups(Path(tmp)))
    entries: dict[str, bytes] = {}
    for label, blob in files.items():
        entries[f"file-{label}"] = b"\x00" + blob
        plaintext, css = plaintext_of(blob)
        if css == 4096:
            entries[f"plain-{label}"] = b"\x01" + plaintext
        else:
            entries[f"plain-{label}"] = b"\x02" + struct.pack("<H", css - 4096) + plaintext
    for name, data in sorted(entries.items()):
        harness.check(data)  # every seed must read back cleanly with both cores
        (out_dir / name).write_bytes(data)
    digest = hashlib.sha256(b"".join(entries[n] for n in sorted(entries))).hexdigest()[:16]
    print(f"wrote {len(entries)} seeds to {out_dir} ({sum(map(len, entries.values()))} bytes, sha256 {digest})")
    for name in sorted(os.listdir(out_dir)):
        if name not in entries:
            print(f"  (left alone: {name})")


if __name__ == "__main__":
    main()
