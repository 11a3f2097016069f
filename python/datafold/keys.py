"""Key handling: the Ed25519 master key pair and every derivation from it (docs/FORMAT.md §4).

This is the one place where datafold derives keys in Python; the Rust core mirrors
`derive_key_id` and `derive_digest_key` in src/keys.rs and the cross-core tests keep them equal.
"""

from __future__ import annotations

from typing import NoReturn

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import ArgumentTypeError, EncryptionKeyError, InvalidArgumentError

__all__ = [
    "MasterKeyPair",
    "derive_backup_key",
    "derive_key_id",
    "derive_digest_key",
    "hkdf_sha256",
    "BACKUP_KEY_CONTEXT",
    "KEY_ID_LABEL",
    "DIGEST_KEY_LABEL",
]

BACKUP_KEY_CONTEXT = b"backup_data"
KEY_ID_LABEL = b"datafold key id v1"
DIGEST_KEY_LABEL = b"datafold digest v1"
KEY_ID_LENGTH = 16


def hkdf_sha256(ikm: bytes, info: bytes, length: int = 32, salt: bytes | None = None) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


# PKCS#8 PEM encryption (cryptography's BestAvailableEncryption) takes at most 1023 bytes.
MAX_PEM_PASSPHRASE = 1023


def _pem_passphrase(passphrase: object) -> bytes | None:
    """A key file passphrase as bytes (str as UTF-8), or None."""
    if passphrase is None:
        return None
    if isinstance(passphrase, str):
        try:
            return passphrase.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidArgumentError("passphrase is not valid Unicode text (it holds a lone surrogate)") from None
    if isinstance(passphrase, (bytes, bytearray, memoryview)):
        return bytes(passphrase)
    raise ArgumentTypeError(f"passphrase must be bytes, str or None, not {type(passphrase).__name__}")


class MasterKeyPair:
    """An Ed25519 master key pair. Its private seed is the root of every backup key."""

    __slots__ = ("_private",)

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        if not isinstance(private_key, Ed25519PrivateKey):
            raise ArgumentTypeError("MasterKeyPair needs an Ed25519PrivateKey; use generate() or from_private_bytes()")
        self._private = private_key

    @classmethod
    def generate(cls) -> MasterKeyPair:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, data: bytes) -> MasterKeyPair:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ArgumentTypeError("master private key must be bytes (the 32-byte Ed25519 seed)")
        if len(data) != 32:
            raise InvalidArgumentError(
                f"master private key must be exactly 32 bytes (the Ed25519 seed), got {len(data)}"
            )
        return cls(Ed25519PrivateKey.from_private_bytes(bytes(data)))

    def private_bytes(self) -> bytes:
        return self._private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    def private_pem(self, passphrase: bytes | str | None = None) -> bytes:
        """The key as PKCS#8 PEM; with a passphrase (str: UTF-8; 1 to 1023 bytes), encrypted
        (BestAvailableEncryption)."""
        secret = _pem_passphrase(passphrase)
        if secret is not None and not 1 <= len(secret) <= MAX_PEM_PASSPHRASE:
            raise InvalidArgumentError(
                f"a key file passphrase must be 1 to {MAX_PEM_PASSPHRASE} bytes, not {len(secret)} "
                "(None leaves the file unprotected)"
            )
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(secret) if secret is not None else serialization.NoEncryption()
        )
        return self._private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)

    @classmethod
    def from_pem(cls, data: bytes, passphrase: bytes | str | None = None) -> MasterKeyPair:
        """Loads a PKCS#8 PEM Ed25519 key (private_pem()). An encrypted one needs its passphrase:
        EncryptionKeyError if it is missing or wrong; InvalidArgumentError if data is no Ed25519 key."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ArgumentTypeError(f"PEM data must be bytes, not {type(data).__name__}")
        data = bytes(data)
        secret = _pem_passphrase(passphrase)
        encrypted = b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data
        if encrypted and not secret:
            raise EncryptionKeyError("the master key file is protected by a passphrase, and none was given")
        try:
            key = serialization.load_pem_private_key(data, secret if encrypted else None)
        except (ValueError, TypeError) as e:
            if encrypted:
                raise EncryptionKeyError("wrong passphrase for the protected master key file") from None
            raise InvalidArgumentError(f"not a PEM private key ({str(e).split('. ')[0]})") from None
        except Exception as e:  # cryptography's UnsupportedAlgorithm and friends
            raise InvalidArgumentError(f"not a usable PEM private key ({type(e).__name__})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise InvalidArgumentError(f"the key is a {type(key).__name__}, not an Ed25519 master key")
        return cls(key)

    def public_key_bytes(self) -> bytes:
        return self._private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def sign(self, message: bytes) -> bytes:
        return self._private.sign(message)

    def __repr__(self) -> str:  # never show the private key
        return f"MasterKeyPair(public_key={self.public_key_bytes().hex()})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MasterKeyPair):
            return NotImplemented
        return self.public_key_bytes() == other.public_key_bytes()

    def __hash__(self) -> int:
        return hash(self.public_key_bytes())

    def __reduce__(self) -> NoReturn:
        raise TypeError("MasterKeyPair cannot be pickled; store private_bytes() deliberately instead")


def derive_backup_key(master: MasterKeyPair | bytes) -> bytes:
    """The 32-byte backup key: HKDF-SHA256(ikm=master seed, salt=empty, info="backup_data").

    It is the key value (IKM) of the Tink AES-GCM-HKDF streaming key that encrypts every backup
    made with this master key; see docs/FORMAT.md for how to decrypt a backup with Tink.
    """
    keys = master if isinstance(master, MasterKeyPair) else MasterKeyPair.from_private_bytes(master)
    seed = keys.private_bytes()
    return hkdf_sha256(seed, BACKUP_KEY_CONTEXT)


def derive_key_id(backup_key: bytes) -> bytes:
    """16-byte fingerprint written in the preamble; it identifies the key without revealing it."""
    return hkdf_sha256(bytes(backup_key), KEY_ID_LABEL, KEY_ID_LENGTH)


def derive_digest_key(backup_key: bytes) -> bytes:
    """32-byte key of the keyed BLAKE3 tree and stream digests."""
    return hkdf_sha256(bytes(backup_key), DIGEST_KEY_LABEL)
