"""Tink AES-GCM-HKDF streaming AEAD through both cores: published/Tink-made vectors, tampering,
and interoperability with the real `tink` package (docs/FORMAT.md §2)."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from datafold.errors import IntegrityError
from datafold.keys import derive_backup_key

tink = pytest.importorskip("tink")
from tink import cleartext_keyset_handle, streaming_aead  # noqa: E402
from tink.proto import aes_gcm_hkdf_streaming_pb2, common_pb2, tink_pb2  # noqa: E402

KEY = bytes(range(100, 132))
AAD = b"associated data"


def load_vectors(vectors_dir: Path) -> list[dict[str, Any]]:
    data = json.loads((vectors_dir / "tink_aes_gcm_hkdf_streaming.json").read_text())
    vectors = data["vectors"]
    assert len(vectors) >= 10
    return vectors


def vector_args(v: dict[str, Any]) -> dict[str, Any]:
    return {"hkdf_hash": v["hash"].lower(), "derived_key_size": v["derived_key_size"]}


# --- vectors ------------------------------------------------------------------------------------


def test_vectors_decrypt(core: ModuleType, vectors_dir: Path) -> None:
    vectors = load_vectors(vectors_dir)
    assert any(v["hash"] == "SHA1" and v["derived_key_size"] == 16 for v in vectors)
    for v in vectors:
        pt = core.decrypt_stream(
            bytes.fromhex(v["ikm"]),
            bytes.fromhex(v["ciphertext"]),
            bytes.fromhex(v["aad"]),
            v["segment_size"],
            **vector_args(v),
        )
        assert pt == bytes.fromhex(v["plaintext"]), v


def test_vectors_encrypt_byte_for_byte(core: ModuleType, vectors_dir: Path) -> None:
    for v in load_vectors(vectors_dir):
        ks = v["derived_key_size"]
        ct = bytes.fromhex(v["ciphertext"])
        assert ct[0] == 1 + ks + 7  # Tink: header length byte, salt of key size, 7-byte nonce prefix
        salt, prefix = ct[1 : 1 + ks], ct[1 + ks : 1 + ks + 7]
        out = core.encrypt_stream(
            bytes.fromhex(v["ikm"]),
            bytes.fromhex(v["plaintext"]),
            bytes.fromhex(v["aad"]),
            v["segment_size"],
            salt,
            prefix,
            **vector_args(v),
        )
        assert out == ct, v


def test_vectors_reject_tampering(core: ModuleType, vectors_dir: Path) -> None:
    for v in load_vectors(vectors_dir):
        ct = bytearray.fromhex(v["ciphertext"])
        args = (bytes.fromhex(v["ikm"]), bytes.fromhex(v["aad"]), v["segment_size"])
        for pos in {0, 1, len(ct) // 2, len(ct) - 1}:
            bad = bytearray(ct)
            bad[pos] ^= 0x80
            with pytest.raises(IntegrityError):
                core.decrypt_stream(args[0], bytes(bad), args[1], args[2], **vector_args(v))
        with pytest.raises(IntegrityError):
            core.decrypt_stream(args[0], bytes(ct), args[1] + b"x", args[2], **vector_args(v))


# --- roundtrips and cross-core equality -----------------------------------------------------------

SIZES_4096 = [0, 1, 4039, 4040, 4041, 4040 + 4080, 4040 + 4080 + 1, 50_000]


@pytest.mark.parametrize("size", SIZES_4096)
def test_roundtrip_and_cores_agree(cores: tuple[ModuleType, ModuleType], size: int) -> None:
    writer, reader = cores
    pt = bytes((i * 7 + 3) & 0xFF for i in range(size))
    salt, prefix = b"S" * 32, b"P" * 7
    ct = writer.encrypt_stream(KEY, pt, AAD, 4096, salt, prefix)
    assert reader.encrypt_stream(KEY, pt, AAD, 4096, salt, prefix) == ct
    assert reader.decrypt_stream(KEY, ct, AAD, 4096) == pt
    # segment layout: never an empty last segment unless the plaintext is empty
    first, later = 4096 - 56, 4096 - 16
    n = 1 if size <= first else 1 + -(-(size - first) // later)
    assert len(ct) == 40 + size + 16 * n


def test_buffers_accepted(core: ModuleType) -> None:
    pt = b"buffer types" * 100
    ct = core.encrypt_stream(bytearray(KEY), memoryview(pt), bytearray(AAD), 128, memoryview(b"s" * 32), b"n" * 7)
    assert core.decrypt_stream(memoryview(KEY), bytearray(ct), memoryview(AAD), 128) == pt


def test_random_salt_and_prefix(core: ModuleType) -> None:
    a = core.encrypt_stream(KEY, b"same", AAD, 4096)
    b = core.encrypt_stream(KEY, b"same", AAD, 4096)
    assert a != b and a[0] == b[0] == 40
    assert core.decrypt_stream(KEY, a, AAD, 4096) == core.decrypt_stream(KEY, b, AAD, 4096) == b"same"


def test_bad_parameters(core: ModuleType) -> None:
    with pytest.raises(ValueError):
        core.encrypt_stream(KEY, b"x", AAD, 4096, hkdf_hash="md5")
    with pytest.raises(ValueError):
        core.encrypt_stream(KEY, b"x", AAD, 4096, derived_key_size=24)
    with pytest.raises(ValueError):
        core.encrypt_stream(KEY, b"x", AAD, 40 + 16)  # no room for a plaintext byte in segment 0
    with pytest.raises(ValueError):
        core.encrypt_stream(KEY, b"x", AAD, 4096, b"short salt")
    with pytest.raises(ValueError):
        core.encrypt_stream(KEY, b"x", AAD, 4096, b"s" * 32, b"p" * 8)
    with pytest.raises(ValueError):
        core.decrypt_stream(KEY, b"x" * 100, AAD, 4096, hkdf_hash="sha512")
    assert core.decrypt_stream(KEY, core.encrypt_stream(KEY, b"x", AAD, 57), AAD, 57) == b"x"
    with pytest.raises(TypeError):
        core.encrypt_stream(KEY, "text is not bytes", AAD, 4096)


# --- tampering of one-shot streams ------------------------------------------------------------------


def test_every_bit_flip_truncation_and_append(core: ModuleType) -> None:
    css = 128  # small segments: a 400-byte plaintext makes 4 of them
    pt = bytes(range(256)) + bytes(144)
    ct = core.encrypt_stream(KEY, pt, AAD, css, b"s" * 32, b"n" * 7)
    assert len(ct) > 3 * css
    for i in range(len(ct)):
        for bit in range(8):
            bad = bytearray(ct)
            bad[i] ^= 1 << bit
            with pytest.raises(IntegrityError):
                core.decrypt_stream(KEY, bytes(bad), AAD, css)
    for n in range(len(ct)):
        with pytest.raises(IntegrityError):
            core.decrypt_stream(KEY, ct[:n], AAD, css)
    for extra in (b"\x00", b"\x01" * 16, b"\x02" * css):
        with pytest.raises(IntegrityError):
            core.decrypt_stream(KEY, ct + extra, AAD, css)
    # swapped segments 1 and 2, a dropped middle segment, a wrong key, a wrong segment size
    segs = [ct[i : i + css] for i in range(0, len(ct), css)]
    with pytest.raises(IntegrityError):
        core.decrypt_stream(KEY, b"".join([segs[0], segs[2], segs[1], *segs[3:]]), AAD, css)
    with pytest.raises(IntegrityError):
        core.decrypt_stream(KEY, b"".join([segs[0], *segs[2:]]), AAD, css)
    with pytest.raises(IntegrityError):
        core.decrypt_stream(bytes(32), ct, AAD, css)
    with pytest.raises(IntegrityError):
        core.decrypt_stream(KEY, ct, AAD, css + 1)


def test_decrypt_never_accepts_other_exceptions(core: ModuleType) -> None:
    for junk in (b"", b"\x28", b"\x28" + bytes(55), bytes(56), b"\xff" * 300):
        with pytest.raises(IntegrityError):
            core.decrypt_stream(KEY, junk, AAD, 4096)


# --- interop with Google's Tink ----------------------------------------------------------------------


class _KeepOpen(io.BytesIO):
    """Tink closes the destination when its stream closes; keep the bytes readable."""

    def close(self) -> None:
        pass


def tink_primitive(key: bytes, css: int) -> Any:
    streaming_aead.register()
    params = aes_gcm_hkdf_streaming_pb2.AesGcmHkdfStreamingParams(
        derived_key_size=32, hkdf_hash_type=common_pb2.SHA256, ciphertext_segment_size=css
    )
    proto_key = aes_gcm_hkdf_streaming_pb2.AesGcmHkdfStreamingKey(version=0, key_value=key, params=params)
    keyset = tink_pb2.Keyset(
        primary_key_id=1,
        key=[
            tink_pb2.Keyset.Key(
                key_data=tink_pb2.KeyData(
                    type_url="type.googleapis.com/google.crypto.tink.AesGcmHkdfStreamingKey",
                    value=proto_key.SerializeToString(),
                    key_material_type=tink_pb2.KeyData.SYMMETRIC,
                ),
                status=tink_pb2.ENABLED,
                key_id=1,
                output_prefix_type=tink_pb2.RAW,
            )
        ],
    )
    handle = cleartext_keyset_handle.from_keyset(keyset)
    return handle.primitive(streaming_aead.StreamingAead)


def tink_encrypt(key: bytes, pt: bytes, aad: bytes, css: int) -> bytes:
    dst = _KeepOpen()
    with tink_primitive(key, css).new_encrypting_stream(dst, aad) as stream:
        stream.write(pt)
    return dst.getvalue()


def tink_decrypt(key: bytes, ct: bytes, aad: bytes, css: int) -> bytes:
    with tink_primitive(key, css).new_decrypting_stream(io.BytesIO(ct), aad) as stream:
        return stream.read()


@pytest.mark.parametrize("css", [4096, 65536])
@pytest.mark.parametrize("size", [0, 1, 4039, 4040, 4041, 8120, 8121, 70_000, 200_003])
def test_ours_decrypts_with_tink(core: ModuleType, css: int, size: int) -> None:
    pt = bytes((i * 131) & 0xFF for i in range(size))
    ct = core.encrypt_stream(KEY, pt, AAD, css)
    assert tink_decrypt(KEY, ct, AAD, css) == pt


@pytest.mark.parametrize("css", [4096, 65536])
@pytest.mark.parametrize("size", [0, 1, 4040, 8120, 70_000, 200_003])
def test_tink_decrypts_with_ours(core: ModuleType, css: int, size: int) -> None:
    pt = bytes((i * 17 + 5) & 0xFF for i in range(size))
    ct = tink_encrypt(KEY, pt, AAD, css)
    assert core.decrypt_stream(KEY, ct, AAD, css) == pt
    bad = bytearray(ct)
    bad[-1] ^= 1
    with pytest.raises(IntegrityError):
        core.decrypt_stream(KEY, bytes(bad), AAD, css)


def _parse_records(pt: bytes) -> list[tuple[int, bytes]]:
    """An independent minimal parser of the record layer (docs/FORMAT.md §3)."""
    out = []
    pos = 0
    while pos < len(pt):
        rtype = pt[pos]
        if rtype in (0x01, 0x02, 0x06):
            (n,) = struct.unpack_from("<I", pt, pos + 1)
            body = pt[pos + 5 : pos + 5 + n]
            pos += 5 + n
        elif rtype == 0x03:
            kl, vl = struct.unpack_from("<II", pt, pos + 1)
            body = pt[pos + 9 : pos + 9 + kl + vl]
            pos += 9 + kl + vl
        elif rtype == 0x04:
            (kl,) = struct.unpack_from("<I", pt, pos + 1)
            body = pt[pos + 5 : pos + 5 + kl]
            pos += 5 + kl
        elif rtype == 0x05:
            body = pt[pos + 1 : pos + 49]
            pos += 49
        else:
            raise AssertionError(f"unexpected record type {rtype:#x} at {pos}")
        out.append((rtype, body))
    assert pos == len(pt)
    return out


@pytest.mark.parametrize("css", [4096, 1 << 20])
def test_backup_file_decrypts_with_tink(core: ModuleType, master_seed: bytes, css: int) -> None:
    backup_key = derive_backup_key(master_seed)
    header = json.dumps({"backup_id": "x", "trees": ["t1", "t2"]}, sort_keys=True).encode()
    sink = io.BytesIO()
    writer = core.BackupWriter(sink, backup_key, header, segment_size=css)
    writer.begin_tree("t1")
    writer.add_items((b"key%05d" % i, b"value" * (i % 40)) for i in range(600))
    writer.end_tree()
    writer.begin_tree("t2")
    writer.add_deletes([b"gone"])
    writer.end_tree()
    trailer = writer.finish()
    data = sink.getvalue()
    preamble = writer.preamble
    assert data.startswith(preamble) and len(preamble) == 44
    pt = tink_decrypt(backup_key, data[len(preamble) :], preamble, css)
    assert pt[0] == 0x01
    records = _parse_records(pt)
    assert records[0] == (0x01, header)
    assert [r[0] for r in records] == [0x01, 0x02] + [0x03] * 600 + [0x05, 0x02, 0x04, 0x05, 0x06]
    assert records[1][1] == b"t1" and records[-3] == (0x04, b"gone")
    assert trailer[0] == 601
    # and a Tink-encrypted plaintext with our preamble reads back as a backup
    forged = preamble + tink_encrypt(backup_key, pt, preamble, css)
    reader = core.BackupReader(io.BytesIO(forged))
    assert reader.unlock(backup_key) == header
    names = []
    while (name := reader.next_tree()) is not None:
        names.append(name)
        while reader.read_items():
            pass
    assert names == ["t1", "t2"] and reader.trailer == trailer
