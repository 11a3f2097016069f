"""Per-block compression (docs/FORMAT.md §3, §7): the pure-Python twin of src/compress.rs.

zstd comes from the optional `zstandard` package (`pip install 'datafold[zstd]'`), imported only
when a backup is written with compression_level > 0 or a zstd BLOCK is read.
"""

from __future__ import annotations

import struct
from typing import Any

from ..errors import ArgumentTypeError, FormatError, IntegrityError, InvalidArgumentError
from .format import REC_BLOCK

__all__ = [
    "BLOCK_HEADER",
    "BLOCK_TARGET",
    "CODEC_RAW",
    "CODEC_ZSTD",
    "MAX_BLOCK_RAW_LENGTH",
    "MAX_COMPRESSION_LEVEL",
    "BlockPacker",
    "check_level",
    "parse_block_header",
    "decode_block",
]

CODEC_RAW = 0
CODEC_ZSTD = 1
# type, codec, raw_len, data_len
BLOCK_HEADER = struct.Struct("<BBII")
MAX_BLOCK_RAW_LENGTH = 16 << 20
MAX_COMPRESSION_LEVEL = 22
# The writer closes a block before a batch of records that would take it past this many raw bytes;
# a batch longer than this goes out as plain records (src/compress.rs BLOCK_TARGET).
BLOCK_TARGET = 1 << 20

_INSTALL_HINT = "pip install 'datafold[zstd]'"


def _zstandard(action: str) -> Any:
    try:
        import zstandard
    except ImportError:
        raise FormatError(
            f"{action} needs zstd, which the pure-Python core takes from the zstandard package: "
            f"{_INSTALL_HINT} (or use the Rust core)"
        ) from None
    return zstandard


def check_level(level: object) -> int:
    """compression_level: 0 (off) or a zstd level 1..=22 (None means 0)."""
    if level is None:
        return 0
    if isinstance(level, bool) or not isinstance(level, int):
        raise ArgumentTypeError(f"compression_level must be an int, not {type(level).__name__}")
    if not 0 <= level <= MAX_COMPRESSION_LEVEL:
        raise InvalidArgumentError(f"compression_level must be between 0 and {MAX_COMPRESSION_LEVEL}, got {level}")
    return level


class BlockPacker:
    """Compresses raw blocks at one level into whole BLOCK records."""

    __slots__ = ("_compress",)

    def __init__(self, level: int) -> None:
        self._compress = _zstandard("writing a compressed backup").ZstdCompressor(level=level).compress

    def record(self, raw: bytes | bytearray) -> bytes:
        """The BLOCK record for `raw`: zstd if that saves at least 1/32, else stored raw."""
        raw_len = len(raw)
        packed = self._compress(raw)
        if len(packed) <= raw_len - raw_len // 32:
            return BLOCK_HEADER.pack(REC_BLOCK, CODEC_ZSTD, raw_len, len(packed)) + packed
        return BLOCK_HEADER.pack(REC_BLOCK, CODEC_RAW, raw_len, raw_len) + raw


def parse_block_header(data: Any, pos: int) -> tuple[int, int, int]:
    """(codec, raw_len, data_len) of the BLOCK record at `pos`, checked before anything is allocated."""
    _, codec, raw_len, data_len = BLOCK_HEADER.unpack_from(data, pos)
    if codec not in (CODEC_RAW, CODEC_ZSTD):
        raise FormatError(f"backup holds a block with an unknown codec {codec} (written by a newer datafold?)")
    if not 0 < raw_len <= MAX_BLOCK_RAW_LENGTH or data_len > MAX_BLOCK_RAW_LENGTH:
        raise IntegrityError(
            f"backup holds a block with invalid lengths (raw {raw_len}, stored {data_len}; "
            f"the limit is {MAX_BLOCK_RAW_LENGTH})"
        )
    if codec == CODEC_RAW and data_len != raw_len:
        raise IntegrityError("backup holds a stored block whose lengths disagree")
    return codec, raw_len, data_len


def decode_block(codec: int, raw_len: int, data: bytes) -> bytes:
    """The records a BLOCK carries: exactly raw_len bytes (their framing is checked as they are read)."""
    if codec == CODEC_RAW:
        return data
    zstd = _zstandard("reading this compressed backup")
    bad = "backup holds a compressed block that does not decompress to its stated length"
    try:
        # One frame; its declared size (if any) must be raw_len, so nothing larger is allocated.
        declared = zstd.frame_content_size(data)
        if declared not in (-1, raw_len):
            raise IntegrityError(bad)
        raw = zstd.ZstdDecompressor().decompress(data, max_output_size=raw_len, allow_extra_data=False)
    except zstd.ZstdError:
        raise IntegrityError(bad) from None
    if len(raw) != raw_len:
        raise IntegrityError(bad)
    return bytes(raw)
