"""Tink AES-GCM-HKDF streaming AEAD, first-segment offset 0 (docs/FORMAT.md §2).

`SegmentCipher` encrypts and decrypts single segments; `encrypt_stream` / `decrypt_stream` are the
one-shot forms. Interoperable with Tink's `AesGcmHkdfStreaming` (see tests/test_stream.py).
"""

from __future__ import annotations

import os
import struct
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import ArgumentTypeError, IntegrityError, InvalidArgumentError
from ..keys import hkdf_sha256
from .format import as_bytes

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = [
    "TAG_LENGTH",
    "NONCE_PREFIX_LENGTH",
    "MAX_SEGMENTS",
    "SegmentCipher",
    "header_length",
    "parse_hkdf_hash",
    "encrypt_stream",
    "decrypt_stream",
]

TAG_LENGTH = 16
NONCE_PREFIX_LENGTH = 7
MAX_SEGMENTS = 1 << 32
_NONCE_SUFFIX = struct.Struct(">IB")  # segment number (BE), last-segment flag


def header_length(derived_key_size: int) -> int:
    """Tink header: one length byte, a salt as long as the derived key, the 7-byte nonce prefix."""
    return 1 + derived_key_size + NONCE_PREFIX_LENGTH


def parse_hkdf_hash(name: object) -> str:
    if not isinstance(name, str):
        raise ArgumentTypeError(f"hkdf_hash must be a str, not {type(name).__name__}")
    norm = name.lower().replace("-", "")
    if norm not in ("sha256", "sha1"):
        raise InvalidArgumentError(f'hkdf_hash must be "sha256" or "sha1", got {name!r}')
    return norm


def _check_derived_key_size(size: object) -> int:
    if isinstance(size, bool) or not isinstance(size, int):
        raise ArgumentTypeError(f"derived_key_size must be an int, not {type(size).__name__}")
    if size not in (16, 32):
        raise InvalidArgumentError(f"derived_key_size must be 16 (AES-128) or 32 (AES-256), got {size}")
    return size


def _check_stream_segment_size(segment_size: object, hlen: int) -> int:
    if isinstance(segment_size, bool) or not isinstance(segment_size, int):
        raise ArgumentTypeError(f"segment_size must be an int, not {type(segment_size).__name__}")
    if not hlen + TAG_LENGTH < segment_size <= 0xFFFFFFFF:
        raise InvalidArgumentError(
            f"segment_size must leave room for at least one plaintext byte in the first segment "
            f"(more than {hlen + TAG_LENGTH} bytes) and fit in 32 bits, got {segment_size}"
        )
    return segment_size


def _hkdf(hash_name: str, ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    if hash_name == "sha256":
        return hkdf_sha256(ikm, info, length, salt)
    return HKDF(algorithm=hashes.SHA1(), length=length, salt=salt, info=info).derive(ikm)


class SegmentCipher:
    """AES-GCM over the segments of one stream; the segment key is HKDF(ikm, salt, info=aad)."""

    __slots__ = ("_aead", "_prefix", "header_length", "segment_size", "first_plain", "plain")

    def __init__(
        self,
        key: bytes,
        salt: bytes,
        nonce_prefix: bytes,
        aad: bytes,
        segment_size: int,
        hkdf_hash: str = "sha256",
        derived_key_size: int = 32,
    ) -> None:
        self._aead = AESGCM(_hkdf(hkdf_hash, key, salt, aad, derived_key_size))
        self._prefix = nonce_prefix
        self.header_length = header_length(derived_key_size)
        self.segment_size = segment_size
        self.first_plain = segment_size - self.header_length - TAG_LENGTH
        self.plain = segment_size - TAG_LENGTH

    def __repr__(self) -> str:  # never show key material
        return f"SegmentCipher(segment_size={self.segment_size})"

    def _nonce(self, index: int, last: bool) -> bytes:
        return self._prefix + _NONCE_SUFFIX.pack(index, 1 if last else 0)

    def encrypt(self, index: int, plaintext: bytes | bytearray | memoryview, last: bool) -> bytes:
        return self._aead.encrypt(self._nonce(index, last), plaintext, None)

    def decrypt(self, index: int, ciphertext: bytes | bytearray | memoryview, last: bool) -> bytes:
        try:
            return self._aead.decrypt(self._nonce(index, last), ciphertext, None)
        except InvalidTag:
            raise IntegrityError(
                f"backup is corrupted, truncated or was tampered with (segment {index} failed authentication)"
            ) from None


def _random_or(value: Buffer | None, size: int, what: str) -> bytes:
    if value is None:
        return os.urandom(size)
    data = as_bytes(value, what)
    if len(data) != size:
        raise InvalidArgumentError(f"{what} must be {size} bytes, got {len(data)}")
    return data


def _stream_params(key: Buffer, hkdf_hash: str, derived_key_size: int) -> tuple[bytes, str, int]:
    k = as_bytes(key, "key")
    h = parse_hkdf_hash(hkdf_hash)
    size = _check_derived_key_size(derived_key_size)
    if len(k) < size:
        raise InvalidArgumentError(f"key must be at least derived_key_size ({size}) bytes, got {len(k)}")
    return k, h, size


def check_threads(threads: Any) -> int:
    """`threads` is accepted for interface parity with the Rust core and validated; the pure core
    always works on the calling thread (cryptography's AES-GCM holds the GIL, so Python threads
    would not run segments in parallel)."""
    if isinstance(threads, bool) or not isinstance(threads, int):
        raise ArgumentTypeError(f"threads must be an int, not {type(threads).__name__}")
    if threads < 0:
        raise InvalidArgumentError(f"threads must be 0 (all cores) or more, got {threads}")
    return threads


def encrypt_stream(
    key: Buffer,
    plaintext: Buffer,
    aad: Buffer,
    segment_size: int,
    salt: Buffer | None = None,
    nonce_prefix: Buffer | None = None,
    *,
    hkdf_hash: str = "sha256",
    derived_key_size: int = 32,
    threads: int = 0,
) -> bytes:
    check_threads(threads)
    k, h, size = _stream_params(key, hkdf_hash, derived_key_size)
    hlen = header_length(size)
    css = _check_stream_segment_size(segment_size, hlen)
    s = _random_or(salt, size, "salt")
    prefix = _random_or(nonce_prefix, NONCE_PREFIX_LENGTH, "nonce_prefix")
    a = as_bytes(aad, "aad")
    try:
        pt = memoryview(plaintext)
    except TypeError:
        raise ArgumentTypeError(f"plaintext must be a bytes-like object, not {type(plaintext).__name__}") from None
    if pt.ndim != 1 or pt.itemsize != 1 or not pt.c_contiguous:
        pt = memoryview(pt.tobytes())
    cipher = SegmentCipher(k, s, prefix, a, css, h, size)
    total = pt.nbytes
    if total <= cipher.first_plain:
        n = 1
    else:
        n = 1 + -(-(total - cipher.first_plain) // cipher.plain)
    if n > MAX_SEGMENTS:
        raise InvalidArgumentError("plaintext too long: a stream holds at most 2^32 segments")
    out = [bytes([hlen]) + s + prefix]
    start = 0
    for i in range(n):
        end = min(total, start + (cipher.first_plain if i == 0 else cipher.plain))
        out.append(cipher.encrypt(i, pt[start:end], i == n - 1))
        start = end
    return b"".join(out)


def decrypt_stream(
    key: Buffer,
    ciphertext: Buffer,
    aad: Buffer,
    segment_size: int,
    *,
    hkdf_hash: str = "sha256",
    derived_key_size: int = 32,
    threads: int = 0,
) -> bytes:
    check_threads(threads)
    k, h, size = _stream_params(key, hkdf_hash, derived_key_size)
    hlen = header_length(size)
    css = _check_stream_segment_size(segment_size, hlen)
    a = as_bytes(aad, "aad")
    try:
        ct = memoryview(ciphertext)
    except TypeError:
        raise ArgumentTypeError(f"ciphertext must be a bytes-like object, not {type(ciphertext).__name__}") from None
    if ct.ndim != 1 or ct.itemsize != 1 or not ct.c_contiguous:
        ct = memoryview(ct.tobytes())
    total = ct.nbytes
    # The checks and their words as the Rust core's (src/stream.rs, plaintext_length_for).
    if total < hlen:
        raise IntegrityError("stream is truncated inside its header")
    if total < hlen + TAG_LENGTH:
        raise IntegrityError("stream is truncated (shorter than its header and one tag)")
    after_first = total - css  # segment 0 ends at css, header included
    if after_first > 0 and (after_first % css or css) < TAG_LENGTH:
        raise IntegrityError("stream is truncated or has extra bytes (its last segment is shorter than a tag)")
    if ct[0] != hlen:
        raise IntegrityError("backup stream header is corrupted (wrong header length byte)")
    s = ct[1 : 1 + size].tobytes()
    prefix = ct[1 + size : hlen].tobytes()
    cipher = SegmentCipher(k, s, prefix, a, css, h, size)
    out = []
    start = hlen
    index = 0
    while True:
        end = min(total, (index + 1) * css)
        if index >= MAX_SEGMENTS:
            raise IntegrityError("ciphertext is corrupted (more than 2^32 segments)")
        last = end == total
        out.append(cipher.decrypt(index, ct[start:end], last))
        if last:
            break
        start = end
        index += 1
    return b"".join(out)
