"""Backup metadata (the HEADER record's JSON plus the TRAILER's figures) and result types."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .errors import IntegrityError

__all__ = [
    "BackupMetadata",
    "TreeInfo",
    "EncryptionInfo",
    "SourceInfo",
    "BackupStats",
    "BackupResult",
    "RestoreStats",
    "ENCRYPTION_ALGORITHM",
    "ENCRYPTION_CONTEXT",
]

ENCRYPTION_ALGORITHM = "AES-256-GCM"
ENCRYPTION_CONTEXT = "backup_data"
STREAM_NAME = "Tink AES-GCM-HKDF streaming, HKDF-SHA256"


@dataclass(frozen=True)
class TreeInfo:
    item_count: int
    byte_count: int
    digest: str  # hex


@dataclass(frozen=True)
class EncryptionInfo:
    algorithm: str
    context: str
    segment_size: int
    key_id: str  # hex
    stream: str = STREAM_NAME
    kdf: str = "master-key"


@dataclass(frozen=True)
class SourceInfo:
    backend: str
    path: str


@dataclass(frozen=True)
class BackupMetadata:
    backup_id: str
    format_version: int
    created_at: datetime
    mode: str
    parent_backup_id: str | None
    source: SourceInfo
    encryption: EncryptionInfo
    compression: str | None
    trees: dict[str, TreeInfo]
    total_items: int
    total_bytes: int
    checksum: str  # hex stream digest (keyed BLAKE3 over the record stream)
    options: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    file_size: int | None = None
    # An incremental backup: its parent's stream digest (the parent's `checksum`), and the trees
    # that were in the parent but no longer exist (whole-tree deletes).
    parent_digest: str | None = None
    deleted_trees: tuple[str, ...] = ()

    @property
    def is_incremental(self) -> bool:
        return self.parent_backup_id is not None

    @staticmethod
    def header_json(
        *,
        mode: str,
        parent_backup_id: str | None,
        source: SourceInfo,
        options: dict[str, Any],
        trees: list[str],
        created_at: datetime | None = None,
        backup_id: str | None = None,
        parent_digest: str | None = None,
        deleted_trees: list[str] | None = None,
        compression_level: int = 0,
    ) -> bytes:
        """The HEADER record's payload (docs/FORMAT.md §5)."""
        compression = {"algorithm": "zstd", "level": compression_level} if compression_level else None
        doc: dict[str, Any] = {
            "backup_id": backup_id or str(uuid.uuid4()),
            "created_at": (created_at or datetime.now(timezone.utc)).isoformat(),
            "mode": mode,
            "parent_backup_id": parent_backup_id,
            "source": {"backend": source.backend, "path": source.path},
            "options": options,
            "compression": compression,
            "trees": trees,
        }
        if parent_backup_id is not None:
            doc["parent_digest"] = parent_digest
            doc["deleted_trees"] = deleted_trees or []
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_parts(
        cls,
        header: bytes,
        trailer: tuple[int, int, list[tuple[str, int, int, bytes]], bytes],
        preamble: Any,
        *,
        path: str | None = None,
        file_size: int | None = None,
    ) -> BackupMetadata:
        """Builds metadata from the HEADER payload, the trailer tuple and the preamble of a file."""
        try:
            doc = json.loads(header.decode("utf-8"))
            created = datetime.fromisoformat(doc["created_at"])
            if created.tzinfo is None:
                created = created.replace(tzinfo=timezone.utc)
            source = doc.get("source") or {}
            total_items, total_bytes, trees, digest = trailer
            kdf = {0: "master-key", 1: "argon2id"}.get(preamble.kdf_id, str(preamble.kdf_id))
            return cls(
                backup_id=str(doc["backup_id"]),
                format_version=preamble.format_version,
                created_at=created.astimezone(timezone.utc),
                mode=str(doc["mode"]),
                parent_backup_id=doc.get("parent_backup_id"),
                source=SourceInfo(str(source.get("backend", "")), str(source.get("path", ""))),
                encryption=EncryptionInfo(
                    ENCRYPTION_ALGORITHM, ENCRYPTION_CONTEXT, preamble.segment_size, preamble.key_id.hex(), kdf=kdf
                ),
                compression=_compression_name(doc.get("compression")),
                trees={name: TreeInfo(items, nbytes, d.hex()) for name, items, nbytes, d in trees},
                total_items=total_items,
                total_bytes=total_bytes,
                checksum=digest.hex(),
                options=dict(doc.get("options") or {}),
                path=path,
                file_size=file_size,
                parent_digest=doc.get("parent_digest"),
                deleted_trees=tuple(str(t) for t in doc.get("deleted_trees") or ()),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            # The header is authenticated, so a malformed one was written that way.
            raise IntegrityError(f"backup metadata is malformed: {e}") from e


@dataclass(frozen=True)
class BackupStats:
    items_backed_up: int
    trees_backed_up: int
    bytes_written: int
    duration_s: float


@dataclass(frozen=True)
class BackupResult:
    path: str
    metadata: BackupMetadata
    stats: BackupStats


@dataclass
class RestoreStats:
    items_restored: int = 0
    items_skipped: int = 0
    trees_restored: int = 0
    errors: list[str] = field(default_factory=list)
    safety_backup_path: str | None = None
    duration_s: float = 0.0
    verified: bool = False


def _compression_name(doc: Any) -> str | None:
    """The HEADER's "compression" as BackupMetadata shows it: "zstd-3" for
    {"algorithm": "zstd", "level": 3}, None for null (docs/FORMAT.md §5)."""
    if doc is None:
        return None
    if isinstance(doc, dict) and isinstance(doc.get("algorithm"), str):
        level = doc.get("level")
        return doc["algorithm"] if level is None else f"{doc['algorithm']}-{level}"
    if isinstance(doc, str):
        return doc
    raise ValueError(f"unknown compression description {doc!r}")
