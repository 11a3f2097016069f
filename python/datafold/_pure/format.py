"""Format constants, the plaintext preamble and record framing (docs/FORMAT.md §1, §3).

The pure-Python twin of src/format.rs; both must produce and accept exactly the same bytes.
"""

from __future__ import annotations

import struct
import unicodedata
from typing import TYPE_CHECKING

from ..errors import ArgumentTypeError, FormatError, IntegrityError, InvalidArgumentError, VersionMismatchError

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "PREAMBLE_FIXED_LENGTH",
    "MAX_PREAMBLE_LENGTH",
    "KEY_ID_LENGTH",
    "DEFAULT_SEGMENT_SIZE",
    "MIN_SEGMENT_SIZE",
    "MAX_SEGMENT_SIZE",
    "MAX_TREE_NAME_LENGTH",
    "MAX_FIELD_LENGTH",
    "KDF_NONE",
    "KDF_ARGON2ID",
    "DIGEST_LENGTH",
    "REC_HEADER",
    "REC_TREE_BEGIN",
    "REC_PUT",
    "REC_DELETE",
    "REC_TREE_END",
    "REC_TRAILER",
    "REC_BLOCK",
    "RECORD_NAMES",
    "TREE_END_LENGTH",
    "MIN_TRAILER_PAYLOAD_LENGTH",
    "TreeSummary",
    "Trailer",
    "Preamble",
    "as_bytes",
    "check_segment_size",
    "encode_preamble",
    "declared_preamble_length",
    "parse_preamble",
    "encode_len_record",
    "encode_tree_end",
    "encode_trailer",
    "decode_trailer_payload",
    "PUT_HEADER",
    "DELETE_HEADER",
    "LEN_HEADER",
    "TREE_END",
    "U32",
    "U64",
]

MAGIC = b"DFBACKUP"
FORMAT_VERSION = 1
PREAMBLE_FIXED_LENGTH = 44
MAX_PREAMBLE_LENGTH = 4096
KEY_ID_LENGTH = 16
DEFAULT_SEGMENT_SIZE = 1 << 20
MIN_SEGMENT_SIZE = 4096
MAX_SEGMENT_SIZE = 64 << 20
MAX_TREE_NAME_LENGTH = 4096
MAX_FIELD_LENGTH = 0xFFFFFFFF  # keys, values, HEADER payload: u32 lengths
KDF_NONE = 0
KDF_ARGON2ID = 1
_KNOWN_KDFS = (KDF_NONE, KDF_ARGON2ID)
DIGEST_LENGTH = 32

REC_HEADER = 0x01
REC_TREE_BEGIN = 0x02
REC_PUT = 0x03
REC_DELETE = 0x04
REC_TREE_END = 0x05
REC_TRAILER = 0x06
REC_BLOCK = 0x07  # a run of PUT / DELETE records, raw or zstd (FORMAT.md §3, §7; _pure/compress.py)
RECORD_NAMES = {
    REC_HEADER: "HEADER",
    REC_TREE_BEGIN: "TREE_BEGIN",
    REC_PUT: "PUT",
    REC_DELETE: "DELETE",
    REC_TREE_END: "TREE_END",
    REC_TRAILER: "TRAILER",
    REC_BLOCK: "BLOCK",
}

# Framing structs (little-endian, no padding).
PUT_HEADER = struct.Struct("<BII")  # type, key_len, value_len
DELETE_HEADER = struct.Struct("<BI")  # type, key_len
LEN_HEADER = struct.Struct("<BI")  # HEADER / TREE_BEGIN / TRAILER: type, len
TREE_END = struct.Struct("<BQQ32s")  # type, item_count, byte_count, digest
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
_PREAMBLE = struct.Struct("<8sIIII16sHH")

TREE_END_LENGTH = TREE_END.size  # 49
# total_items, total_bytes, tree_count, stream digest, len
MIN_TRAILER_PAYLOAD_LENGTH = 8 + 8 + 4 + DIGEST_LENGTH + 4

# (tree name, item_count, byte_count, digest32)
TreeSummary = tuple[str, int, int, bytes]
# (total_items, total_bytes, [TreeSummary, ...], stream digest32)
Trailer = tuple[int, int, list[TreeSummary], bytes]


def quoted(name: str) -> str:
    """`name` as the Rust core's messages quote it (Rust's `{:?}` of a str), so that both cores say
    the same: in double quotes, with quotes, backslashes, unprintable characters and combining
    marks escaped."""
    escapes = {'"': '\\"', "\\": "\\\\", "\t": "\\t", "\r": "\\r", "\n": "\\n", "\0": "\\0"}

    def shown(c: str) -> str:
        if c in escapes:
            return escapes[c]
        if c.isprintable() and unicodedata.category(c) not in ("Mn", "Me"):
            return c
        return f"\\u{{{ord(c):x}}}"

    return '"' + "".join(map(shown, name)) + '"'


def as_bytes(obj: object, what: str) -> bytes:
    """A bytes copy of any buffer; TypeError (ArgumentTypeError) for anything else.

    `bytes(5)` would silently make five zero bytes, so go through memoryview."""
    if type(obj) is bytes:
        return obj
    try:
        view = memoryview(obj)  # type: ignore[arg-type]
    except TypeError:
        raise ArgumentTypeError(f"{what} must be a bytes-like object, not {type(obj).__name__}") from None
    with view:
        return view.tobytes()


def check_segment_size(segment_size: object) -> int:
    if isinstance(segment_size, bool) or not isinstance(segment_size, int):
        raise ArgumentTypeError(f"segment_size must be an int, not {type(segment_size).__name__}")
    if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
        raise InvalidArgumentError(
            f"segment_size must be between {MIN_SEGMENT_SIZE} and {MAX_SEGMENT_SIZE} bytes, got {segment_size}"
        )
    return segment_size


class Preamble:
    """The parsed plaintext preamble. `raw` is the exact bytes (the stream's associated data)."""

    __slots__ = ("format_version", "preamble_length", "flags", "segment_size", "key_id", "kdf_id", "kdf_params", "raw")

    format_version: int
    preamble_length: int
    flags: int
    segment_size: int
    key_id: bytes
    kdf_id: int
    kdf_params: bytes
    raw: bytes

    def __init__(
        self,
        *,
        format_version: int,
        preamble_length: int,
        flags: int,
        segment_size: int,
        key_id: bytes,
        kdf_id: int,
        kdf_params: bytes,
        raw: bytes,
    ) -> None:
        self.format_version = format_version
        self.preamble_length = preamble_length
        self.flags = flags
        self.segment_size = segment_size
        self.key_id = key_id
        self.kdf_id = kdf_id
        self.kdf_params = kdf_params
        self.raw = raw

    def __repr__(self) -> str:  # key_id is a fingerprint, not key material
        return (
            f"Preamble(format_version={self.format_version}, preamble_length={self.preamble_length}, "
            f"flags={self.flags}, segment_size={self.segment_size}, key_id={self.key_id.hex()}, "
            f"kdf_id={self.kdf_id}, kdf_params_length={len(self.kdf_params)})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Preamble):
            return NotImplemented
        return self.raw == other.raw

    def __hash__(self) -> int:
        return hash(self.raw)


def encode_preamble(segment_size: int, key_id: Buffer, kdf_id: int = 0, kdf_params: Buffer = b"") -> bytes:
    segment_size = check_segment_size(segment_size)
    kid = as_bytes(key_id, "key_id")
    if len(kid) != KEY_ID_LENGTH:
        raise InvalidArgumentError(f"key_id must be {KEY_ID_LENGTH} bytes, got {len(kid)}")
    if isinstance(kdf_id, bool) or not isinstance(kdf_id, int):
        raise ArgumentTypeError(f"kdf_id must be an int, not {type(kdf_id).__name__}")
    if kdf_id not in _KNOWN_KDFS:
        raise InvalidArgumentError(f"unknown kdf_id {kdf_id}")
    params = as_bytes(kdf_params, "kdf_params")
    total = PREAMBLE_FIXED_LENGTH + len(params)
    if total > MAX_PREAMBLE_LENGTH:
        raise InvalidArgumentError(
            f"kdf_params too long ({len(params)} bytes); the preamble is limited to {MAX_PREAMBLE_LENGTH} bytes"
        )
    return _PREAMBLE.pack(MAGIC, FORMAT_VERSION, total, 0, segment_size, kid, kdf_id, len(params)) + params


def declared_preamble_length(data: Buffer) -> int:
    """The preamble length claimed by the first 16 bytes; checks magic and version first (§1 order)."""
    head = memoryview(data)[:16].tobytes()
    if len(head) < 16 or head[:8] != MAGIC:
        raise FormatError("not a datafold backup (the file does not start with DFBACKUP)")
    version, length = struct.unpack_from("<II", head, 8)
    if version != FORMAT_VERSION:
        raise VersionMismatchError(version, FORMAT_VERSION)
    if not PREAMBLE_FIXED_LENGTH <= length <= MAX_PREAMBLE_LENGTH:
        raise FormatError(
            f"corrupt backup preamble: length {length} is outside {PREAMBLE_FIXED_LENGTH}..={MAX_PREAMBLE_LENGTH}"
        )
    return int(length)


def parse_preamble(data: Buffer) -> Preamble:
    """Parses the preamble at the start of `data` (extra bytes are ignored)."""
    try:
        view = memoryview(data)
    except TypeError:
        raise ArgumentTypeError(f"preamble data must be a bytes-like object, not {type(data).__name__}") from None
    length = declared_preamble_length(view)
    if view.nbytes < length:
        raise FormatError("truncated backup: the file ends inside its preamble")
    raw = view[:length].tobytes()
    _magic, version, _length, flags, segment_size, key_id, kdf_id, kdf_len = _PREAMBLE.unpack_from(raw)
    if flags != 0:
        raise FormatError(f"corrupt backup preamble: unknown flags {flags:#x} (written by a newer datafold?)")
    if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
        raise FormatError(
            f"corrupt backup preamble: segment size {segment_size} is outside {MIN_SEGMENT_SIZE}..={MAX_SEGMENT_SIZE}"
        )
    if kdf_id not in _KNOWN_KDFS:
        raise FormatError(f"corrupt backup preamble: unknown KDF id {kdf_id}")
    if PREAMBLE_FIXED_LENGTH + kdf_len != length:
        raise FormatError("corrupt backup preamble: KDF parameter length disagrees with the preamble length")
    return Preamble(
        format_version=version,
        preamble_length=length,
        flags=flags,
        segment_size=segment_size,
        key_id=key_id,
        kdf_id=kdf_id,
        kdf_params=raw[PREAMBLE_FIXED_LENGTH:],
        raw=raw,
    )


# --- record framing ---------------------------------------------------------------------------


def encode_len_record(rtype: int, payload: bytes) -> bytes:
    """HEADER / TREE_BEGIN framing: type, u32 LE length, payload."""
    return LEN_HEADER.pack(rtype, len(payload)) + payload


def encode_tree_end(item_count: int, byte_count: int, digest: bytes) -> bytes:
    return TREE_END.pack(REC_TREE_END, item_count, byte_count, digest)


def encode_trailer(total_items: int, total_bytes: int, trees: list[TreeSummary], digest: bytes) -> bytes:
    """The whole TRAILER record, type byte included."""
    payload = bytearray(struct.pack("<QQI", total_items, total_bytes, len(trees)))
    for name, item_count, byte_count, tree_digest in trees:
        raw_name = name.encode("utf-8")
        payload += U32.pack(len(raw_name))
        payload += raw_name
        payload += struct.pack("<QQ", item_count, byte_count)
        payload += tree_digest
    payload += digest
    length = len(payload) + 4
    payload += U32.pack(length)
    return LEN_HEADER.pack(REC_TRAILER, length) + bytes(payload)


def decode_trailer_payload(payload: bytes) -> Trailer:
    """Parses a TRAILER payload (without type byte and leading length) and checks its sums."""
    bad = "backup trailer is malformed"
    size = len(payload)
    if size < MIN_TRAILER_PAYLOAD_LENGTH:
        raise IntegrityError(bad)
    total_items, total_bytes, count = struct.unpack_from("<QQI", payload, 0)
    pos = 20
    trees: list[TreeSummary] = []
    for _ in range(count):
        if pos + 4 > size:
            raise IntegrityError(bad)
        (name_len,) = U32.unpack_from(payload, pos)
        pos += 4
        end = pos + name_len
        if end + 16 + DIGEST_LENGTH > size:
            raise IntegrityError(bad)
        try:
            name = payload[pos:end].decode("utf-8")
        except UnicodeDecodeError:
            raise IntegrityError(bad) from None
        item_count, byte_count = struct.unpack_from("<QQ", payload, end)
        pos = end + 16
        trees.append((name, item_count, byte_count, payload[pos : pos + DIGEST_LENGTH]))
        pos += DIGEST_LENGTH
    if pos + DIGEST_LENGTH + 4 != size:
        raise IntegrityError(bad)
    digest = payload[pos : pos + DIGEST_LENGTH]
    (length,) = U32.unpack_from(payload, pos + DIGEST_LENGTH)
    if length != size:
        raise IntegrityError(bad)
    if sum(t[1] for t in trees) != total_items or sum(t[2] for t in trees) != total_bytes:
        raise IntegrityError("backup trailer totals do not add up")
    return (total_items, total_bytes, trees, digest)
