"""The passphrase key source (datafold.Passphrase, Argon2id) and the manager's progress callback,
at API level on both cores (docs/FORMAT.md §1.1)."""

# ruff: noqa: F811 - pytest fixtures imported from helpers

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from datafold import (
    Argon2Params,
    ArgumentTypeError,
    DbOperations,
    EncryptedBackupManager,
    EncryptionKeyError,
    FormatError,
    InvalidArgumentError,
    MasterKeyPair,
    Passphrase,
    ProgressEvent,
    RestoreOptions,
)
from datafold.keys import derive_key_id
from datafold.passphrase import KDF_ARGON2ID, decode_kdf_params, encode_kdf_params
from helpers import SEED, core_name, fill, sample_data, snapshot  # noqa: F401 - fixtures

# Cheap parameters for most tests; the defaults are tested once.
FAST = Argon2Params(memory_kib=1024, iterations=1, lanes=1)
SECRET = "pässwörd"


def _db(tmp_path: Path, name: str = "db") -> DbOperations:
    return DbOperations.open(tmp_path / name)


def _preamble(core: object, path: Path) -> object:
    return core.parse_preamble(path.read_bytes()[:4096])  # type: ignore[attr-defined]


@pytest.mark.parametrize("reader_core", ["pure", "rust"])
def test_roundtrip_and_file_layout(tmp_path: Path, core_name: str, reader_core: str) -> None:
    from datafold.core import load_core

    data = sample_data()
    with _db(tmp_path, "src") as src, _db(tmp_path, "dst") as dst:
        fill(src, data)
        path = tmp_path / "p.dfb"
        result = EncryptedBackupManager(src, Passphrase(SECRET, FAST), core=core_name).create_backup(path)
        assert result.metadata.encryption.kdf == "argon2id"
        preamble = _preamble(load_core(reader_core), path)
        assert preamble.kdf_id == KDF_ARGON2ID  # type: ignore[attr-defined]
        raw = bytes(preamble.kdf_params)  # type: ignore[attr-defined]
        version, memory, iterations, lanes, salt_len = struct.unpack_from("<BIIIB", raw)
        assert (version, memory, iterations, lanes, salt_len) == (1, 1024, 1, 1, 16)
        salt = raw[14:]
        assert len(raw) == 14 + 16
        # backup key = Argon2id(passphrase, salt, params, 32); the key id follows from it (FORMAT §4).
        key = Argon2id(salt=salt, length=32, iterations=1, lanes=1, memory_cost=1024).derive(SECRET.encode())
        assert derive_key_id(key) == bytes(preamble.key_id)  # type: ignore[attr-defined]
        assert SECRET.encode() not in path.read_bytes()

        reader = EncryptedBackupManager(dst, Passphrase(SECRET.encode()), core=reader_core)
        assert reader.verify_backup(path).total_items == sum(map(len, data.values()))
        reader.restore_backup(path, RestoreOptions(backup_before_restore=True))
        assert snapshot(dst) == snapshot(src)


def test_every_backup_gets_its_own_salt(tmp_path: Path, core_name: str) -> None:
    with _db(tmp_path) as db:
        db.put("t", b"k", b"v")
        mgr = EncryptedBackupManager(db, Passphrase(SECRET, FAST), core=core_name)
        a, b = tmp_path / "a.dfb", tmp_path / "b.dfb"
        mgr.create_backup(a)
        mgr.create_backup(b)
        assert a.read_bytes()[44:74] != b.read_bytes()[44:74]
        assert mgr.read_metadata(a).encryption.key_id != mgr.read_metadata(b).encryption.key_id


def test_default_parameters_are_rfc9106_second_recommendation(tmp_path: Path, core_name: str) -> None:
    assert Passphrase(SECRET).params == Argon2Params(65536, 3, 4)
    with _db(tmp_path) as db:
        db.put("t", b"k", b"v")
        path = tmp_path / "d.dfb"
        EncryptedBackupManager(db, Passphrase(SECRET), core=core_name).create_backup(path)
        params, salt = decode_kdf_params(path.read_bytes()[44:74])
        assert params == Argon2Params(65536, 3, 4) and len(salt) == 16


def test_wrong_passphrase_and_wrong_kind_of_key(tmp_path: Path, core_name: str) -> None:
    with _db(tmp_path) as db:
        db.put("t", b"k", b"v")
        pass_path, master_path = tmp_path / "p.dfb", tmp_path / "m.dfb"
        EncryptedBackupManager(db, Passphrase(SECRET, FAST), core=core_name).create_backup(pass_path)
        EncryptedBackupManager(db, MasterKeyPair.from_private_bytes(SEED), core=core_name).create_backup(master_path)
        with pytest.raises(EncryptionKeyError, match="wrong passphrase"):
            EncryptedBackupManager(db, Passphrase("other", FAST), core=core_name).verify_backup(pass_path)
        master = EncryptedBackupManager(db, MasterKeyPair.from_private_bytes(SEED), core=core_name)
        with pytest.raises(EncryptionKeyError, match="protected by a passphrase"):
            master.read_metadata(pass_path)
        with pytest.raises(EncryptionKeyError, match="made with a master key"):
            EncryptedBackupManager(db, Passphrase(SECRET), core=core_name).restore_backup(master_path)
        assert snapshot(db) == {"t": [(b"k", b"v")]}
        with pytest.raises(ArgumentTypeError, match="master_keypair"):
            EncryptedBackupManager(db, SECRET, core=core_name)  # type: ignore[arg-type]


def test_malformed_parameters_are_a_format_error(tmp_path: Path, core_name: str) -> None:
    with _db(tmp_path) as db:
        db.put("t", b"k", b"v")
        path = tmp_path / "p.dfb"
        EncryptedBackupManager(db, Passphrase(SECRET, FAST), core=core_name).create_backup(path)
        data = bytearray(path.read_bytes())
        data[45:49] = (1 << 31).to_bytes(4, "little")  # 2 TiB of memory: refused, not attempted
        path.write_bytes(bytes(data))
        with pytest.raises(FormatError, match="memory_kib"):
            EncryptedBackupManager(db, Passphrase(SECRET, FAST), core=core_name).verify_backup(path)
    with pytest.raises(FormatError):
        decode_kdf_params(b"\x01\x00")
    with pytest.raises(FormatError, match="length"):
        decode_kdf_params(encode_kdf_params(FAST, os.urandom(16)) + b"x")


def test_passphrase_object_never_shows_or_pickles_the_secret() -> None:
    p = Passphrase(SECRET)
    assert SECRET not in repr(p) and SECRET not in str(p)
    with pytest.raises(TypeError):
        pickle.dumps(p)
    with pytest.raises(InvalidArgumentError):
        Passphrase("")
    with pytest.raises(ArgumentTypeError):
        Passphrase(12345)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        Argon2Params(memory_kib=4, iterations=1, lanes=1)


def test_master_key_pem_roundtrip() -> None:
    keys = MasterKeyPair.from_private_bytes(SEED)
    assert MasterKeyPair.from_pem(keys.private_pem()) == keys
    protected = keys.private_pem(b"pw")
    assert MasterKeyPair.from_pem(protected, b"pw") == keys
    with pytest.raises(EncryptionKeyError):
        MasterKeyPair.from_pem(protected)
    with pytest.raises(EncryptionKeyError):
        MasterKeyPair.from_pem(protected, b"wrong")
    with pytest.raises(InvalidArgumentError):
        MasterKeyPair.from_pem(b"not a key")
    # A str passphrase is its UTF-8; an empty or too long one would leave the file unprotected
    # or fail inside cryptography.
    assert MasterKeyPair.from_pem(keys.private_pem("pässword"), "pässword".encode()) == keys
    assert MasterKeyPair.from_pem(protected, "pw") == keys
    for bad in (b"", "", "x" * 1024):
        with pytest.raises(InvalidArgumentError, match="1 to 1023 bytes"):
            keys.private_pem(bad)
    with pytest.raises(ArgumentTypeError):
        keys.private_pem(5)  # type: ignore[arg-type]


def test_progress_events(tmp_path: Path, core_name: str) -> None:
    data = sample_data()
    total = sum(map(len, data.values()))
    with _db(tmp_path, "src") as src, _db(tmp_path, "dst") as dst:
        fill(src, data)
        mgr = EncryptedBackupManager(src, MasterKeyPair.from_private_bytes(SEED), core=core_name)
        events: list[ProgressEvent] = []
        path = tmp_path / "b.dfb"
        mgr.create_backup(path, progress=events.append)
        done = [e for e in events if e.done]
        assert [e.phase for e in done] == ["backup", "verify"]
        assert done[0].items == done[0].total_items == total
        assert done[1].bytes == done[1].total_bytes == path.stat().st_size and done[1].items == total

        events.clear()
        mgr.verify_backup(path, progress=events.append)
        assert [(e.phase, e.items, e.bytes) for e in events if e.done] == [("verify", total, path.stat().st_size)]

        events.clear()
        restorer = EncryptedBackupManager(dst, MasterKeyPair.from_private_bytes(SEED), core=core_name)
        restorer.restore_backup(path, progress=events.append)
        done = [e for e in events if e.done]
        assert [e.phase for e in done] == ["verify", "restore", "check"]
        assert done[1].items == done[1].total_items == total
        assert all(e.items <= (e.total_items or e.items) for e in events)
        with pytest.raises(ArgumentTypeError):
            mgr.verify_backup(path, progress="not callable")  # type: ignore[arg-type]
