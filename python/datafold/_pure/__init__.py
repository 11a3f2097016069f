"""The pure-Python core: the same names and behaviour as the Rust core `datafold._core`
(python/datafold/_core.pyi), writing byte-identical files (docs/FORMAT.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import keys as _keys
from .backup import (
    BackupReader,
    BackupWriter,
    _check_key,
    digest_batches,
    digest_items,
    keys_ascending,
    plain_pairs,
    take_batch,
)
from .chain import ChainMerge
from .format import (
    DEFAULT_SEGMENT_SIZE,
    FORMAT_VERSION,
    MAGIC,
    MAX_PREAMBLE_LENGTH,
    MAX_SEGMENT_SIZE,
    MIN_SEGMENT_SIZE,
    Preamble,
    Trailer,
    TreeSummary,
    encode_preamble,
    parse_preamble,
)
from .stream import decrypt_stream, encrypt_stream

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = [
    "CORE_NAME",
    "MAGIC",
    "FORMAT_VERSION",
    "DEFAULT_SEGMENT_SIZE",
    "MIN_SEGMENT_SIZE",
    "MAX_SEGMENT_SIZE",
    "MAX_PREAMBLE_LENGTH",
    "TreeSummary",
    "Trailer",
    "encrypt_stream",
    "decrypt_stream",
    "derive_key_id",
    "digest_batches",
    "digest_items",
    "Preamble",
    "encode_preamble",
    "parse_preamble",
    "BackupWriter",
    "BackupReader",
    "ChainMerge",
    "keys_ascending",
    "plain_pairs",
    "take_batch",
]

CORE_NAME = "pure"


def derive_key_id(backup_key: Buffer) -> bytes:
    """16-byte fingerprint of a backup key (docs/FORMAT.md §4); see datafold.keys.derive_key_id."""
    return _keys.derive_key_id(_check_key(backup_key))
