"""Passphrase key source: the backup key derived from a passphrase with Argon2id (docs/FORMAT.md §1.1).

A backup made with a `Passphrase` has `kdf_id = 1` in its preamble and the Argon2id parameters and a
fresh random salt in `kdf_params`; the passphrase itself is stored nowhere. The backup key is
`Argon2id(passphrase, salt, memory, iterations, lanes, 32 bytes)`; its key id and digest key follow
from it exactly as for a master key (docs/FORMAT.md §4), so a wrong passphrase is caught by the key id.

This module is the one place where datafold runs the KDF.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from .errors import ArgumentTypeError, CryptoError, FormatError, InvalidArgumentError

__all__ = [
    "Passphrase",
    "Argon2Params",
    "KDF_MASTER_KEY",
    "KDF_ARGON2ID",
    "KDF_NAMES",
    "WRONG_PASSPHRASE",
    "encode_kdf_params",
    "decode_kdf_params",
    "derive_passphrase_key",
]

KDF_MASTER_KEY = 0
KDF_ARGON2ID = 1
KDF_NAMES = {KDF_MASTER_KEY: "master-key", KDF_ARGON2ID: "argon2id"}

# The EncryptionKeyError of a passphrase whose key is not the backup's (its parameters are part of
# the authenticated preamble, so an altered one also ends here).
WRONG_PASSPHRASE = (
    "wrong passphrase (or the backup's key parameters were altered): the key derived from it is not this backup's key"
)

PARAMS_VERSION = 1  # layout version of kdf_params for kdf_id 1 (Argon2id, Argon2 version 0x13)
SALT_LENGTH = 16
_FIXED = struct.Struct("<BIIIB")  # version, memory KiB, iterations, lanes, salt length

# Accepted ranges, checked when writing (InvalidArgumentError) and when reading a preamble
# (FormatError), so a crafted file cannot make a reader allocate without bound.
MIN_MEMORY_KIB, MAX_MEMORY_KIB = 8, 4 * 1024 * 1024  # up to 4 GiB
MAX_ITERATIONS = 64
MAX_LANES = 64
MIN_SALT, MAX_SALT = 8, 64


@dataclass(frozen=True)
class Argon2Params:
    """Argon2id cost parameters. The default is RFC 9106's second recommended option
    (64 MiB, 3 passes, 4 lanes): about 0.2 s on a current x86-64 core."""

    memory_kib: int = 64 * 1024
    iterations: int = 3
    lanes: int = 4

    def __post_init__(self) -> None:
        for name in ("memory_kib", "iterations", "lanes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ArgumentTypeError(f"Argon2Params.{name} must be an int, not {type(value).__name__}")
        problem = _check_ranges(self.memory_kib, self.iterations, self.lanes)
        if problem:
            raise InvalidArgumentError(f"Argon2Params: {problem}")


def _check_ranges(memory_kib: int, iterations: int, lanes: int) -> str | None:
    if not 1 <= lanes <= MAX_LANES:
        return f"lanes must be between 1 and {MAX_LANES}, got {lanes}"
    if not 1 <= iterations <= MAX_ITERATIONS:
        return f"iterations must be between 1 and {MAX_ITERATIONS}, got {iterations}"
    if not max(MIN_MEMORY_KIB, 8 * lanes) <= memory_kib <= MAX_MEMORY_KIB:
        return f"memory_kib must be between {max(MIN_MEMORY_KIB, 8 * lanes)} and {MAX_MEMORY_KIB}, got {memory_kib}"
    return None


def encode_kdf_params(params: Argon2Params, salt: bytes) -> bytes:
    """The preamble's kdf_params for kdf_id 1: u8 version (1), u32 LE memory KiB, u32 LE iterations,
    u32 LE lanes, u8 salt length, salt."""
    if not MIN_SALT <= len(salt) <= MAX_SALT:
        raise InvalidArgumentError(f"Argon2id salt must be {MIN_SALT}..{MAX_SALT} bytes, got {len(salt)}")
    return _FIXED.pack(PARAMS_VERSION, params.memory_kib, params.iterations, params.lanes, len(salt)) + salt


def decode_kdf_params(data: bytes) -> tuple[Argon2Params, bytes]:
    """(parameters, salt) from a preamble's kdf_params; FormatError if malformed or out of range."""
    data = bytes(data)
    if len(data) < _FIXED.size:
        raise FormatError(f"corrupt backup preamble: Argon2id parameters are {len(data)} bytes, too short")
    version, memory_kib, iterations, lanes, salt_len = _FIXED.unpack_from(data)
    if version != PARAMS_VERSION:
        raise FormatError(
            f"backup preamble has Argon2id parameters of layout version {version}; this release reads "
            f"version {PARAMS_VERSION}: upgrade datafold"
        )
    if len(data) != _FIXED.size + salt_len:
        raise FormatError("corrupt backup preamble: the Argon2id parameters' length does not match their salt length")
    problem = _check_ranges(memory_kib, iterations, lanes)
    if problem is None and not MIN_SALT <= salt_len <= MAX_SALT:
        problem = f"salt length must be between {MIN_SALT} and {MAX_SALT}, got {salt_len}"
    if problem:
        raise FormatError(f"corrupt backup preamble: Argon2id {problem}")
    return Argon2Params(memory_kib, iterations, lanes), data[_FIXED.size :]


def derive_passphrase_key(secret: bytes, params: Argon2Params, salt: bytes) -> bytes:
    """The 32-byte backup key: Argon2id(secret, salt, params)."""
    try:
        kdf = Argon2id(
            salt=salt, length=32, iterations=params.iterations, lanes=params.lanes, memory_cost=params.memory_kib
        )
        return kdf.derive(secret)
    except MemoryError as e:
        raise CryptoError(f"Argon2id needs {params.memory_kib} KiB of memory, which is not available") from e
    except Exception as e:  # cryptography's backend errors; never include the secret
        raise CryptoError(f"Argon2id key derivation failed: {type(e).__name__}") from e


class Passphrase:
    """A passphrase as the key source of EncryptedBackupManager, instead of a MasterKeyPair.

    `secret`: bytes, or str (encoded as UTF-8); must not be empty. `params`: the Argon2id cost of
    backups written with it (reading always uses the parameters stored in the file). The secret
    never appears in repr(), str() or messages, and the object cannot be pickled.
    """

    __slots__ = ("_secret", "params")

    def __init__(self, secret: bytes | str, params: Argon2Params | None = None) -> None:
        if isinstance(secret, str):
            try:
                secret = secret.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidArgumentError("passphrase is not valid Unicode text (it holds a lone surrogate)") from None
        elif isinstance(secret, (bytearray, memoryview)):
            secret = bytes(secret)
        elif not isinstance(secret, bytes):
            raise ArgumentTypeError(f"passphrase must be str or bytes, not {type(secret).__name__}")
        if not secret:
            raise InvalidArgumentError("passphrase must not be empty")
        if params is None:
            params = Argon2Params()
        elif not isinstance(params, Argon2Params):
            raise ArgumentTypeError(f"params must be an Argon2Params, not {type(params).__name__}")
        self._secret = secret
        self.params = params

    def new_kdf_params(self) -> bytes:
        """kdf_params for a new backup: this passphrase's parameters and a fresh random salt."""
        return encode_kdf_params(self.params, os.urandom(SALT_LENGTH))

    def derive(self, kdf_params: bytes) -> bytes:
        """The backup key for a preamble's kdf_params (kdf_id 1)."""
        params, salt = decode_kdf_params(kdf_params)
        return derive_passphrase_key(self._secret, params, salt)

    def __repr__(self) -> str:
        p = self.params
        return f"Passphrase(<hidden>, memory_kib={p.memory_kib}, iterations={p.iterations}, lanes={p.lanes})"

    __str__ = __repr__

    def __reduce__(self) -> None:  # type: ignore[override]
        raise TypeError("Passphrase cannot be pickled")
