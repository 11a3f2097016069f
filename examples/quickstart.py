"""The main job on the embedded default (LMDB): back a database up, check it, restore it.

Run: python examples/quickstart.py [workdir]
"""

import sys
import tempfile
from pathlib import Path

import datafold
from datafold import (
    BackupMode,
    BackupOptions,
    DbOperations,
    EncryptedBackupManager,
    MasterKeyPair,
    RestoreOptions,
)


def main(workdir: Path) -> None:
    db = DbOperations.open(workdir / "state.lmdb")  # embedded default: an LMDB environment
    db.put_many("users", ((f"user:{i:06d}".encode(), b"x" * 200) for i in range(50_000)))
    db.put("metadata", b"schema", b"v1")

    keys = MasterKeyPair.generate()  # Ed25519 master key pair; keep keys.private_bytes() safe
    mgr = EncryptedBackupManager(db, keys)
    result = mgr.create_backup(workdir / "nightly.dfb", BackupOptions(mode=BackupMode.FULL))
    print(
        f"core={datafold.CORE} backed up {result.stats.items_backed_up} items "
        f"in {result.stats.trees_backed_up} trees, {result.stats.bytes_written} bytes"
    )

    meta = mgr.verify_backup(workdir / "nightly.dfb")
    print(f"verified backup {meta.backup_id}: {meta.total_items} items, checksum {meta.checksum[:16]}")

    restored_db = DbOperations.open(workdir / "restored.lmdb")
    stats = EncryptedBackupManager(restored_db, keys).restore_backup(
        workdir / "nightly.dfb", RestoreOptions(overwrite_existing=True)
    )
    print(f"restored {stats.items_restored} items into {restored_db.path} (verified: {stats.verified})")
    assert list(restored_db.items("users")) == list(db.items("users"))
    db.close()
    restored_db.close()


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as d:
            main(Path(d))
