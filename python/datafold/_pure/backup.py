"""BackupWriter / BackupReader / digest_items: the record layer over the streaming AEAD.

docs/FORMAT.md is the format; python/datafold/_core.pyi is the interface shared with the Rust core.
Both objects are explicit state machines that poison themselves on the first error.
"""

from __future__ import annotations

import itertools
import operator
import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, NoReturn, cast

import blake3

from ..errors import (
    ArgumentTypeError,
    BackupError,
    BackupIOError,
    EncryptionKeyError,
    FormatError,
    IntegrityError,
    InvalidArgumentError,
)
from ..keys import derive_digest_key, derive_key_id
from .compress import BLOCK_HEADER, BLOCK_TARGET, BlockPacker, check_level, decode_block, parse_block_header
from .format import (
    DEFAULT_SEGMENT_SIZE,
    DELETE_HEADER,
    LEN_HEADER,
    MAX_FIELD_LENGTH,
    MAX_TREE_NAME_LENGTH,
    PUT_HEADER,
    REC_BLOCK,
    REC_DELETE,
    REC_HEADER,
    REC_PUT,
    REC_TRAILER,
    REC_TREE_BEGIN,
    REC_TREE_END,
    RECORD_NAMES,
    TREE_END,
    TREE_END_LENGTH,
    U32,
    Preamble,
    Trailer,
    TreeSummary,
    as_bytes,
    check_segment_size,
    declared_preamble_length,
    decode_trailer_payload,
    encode_preamble,
    encode_trailer,
    parse_preamble,
    quoted,
)
from .stream import MAX_SEGMENTS, NONCE_PREFIX_LENGTH, TAG_LENGTH, SegmentCipher, check_threads, header_length

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = [
    "BackupWriter",
    "BackupReader",
    "digest_items",
    "digest_batches",
    "keys_ascending",
    "plain_pairs",
    "take_batch",
]

KEY_LENGTH = 32
SALT_LENGTH = 32
HEADER_LENGTH = header_length(KEY_LENGTH)  # 40
_CHUNK = 1 << 16  # records are batched up to this size before hashing and buffering
_PUT_TYPE = REC_PUT
_DEL_TYPE = REC_DELETE


def _check_key(backup_key: object) -> bytes:
    key = as_bytes(backup_key, "backup_key")
    if len(key) != KEY_LENGTH:
        raise InvalidArgumentError(f"backup_key must be {KEY_LENGTH} bytes, got {len(key)}")
    return key


def _buffer(obj: object, what: str) -> Any:
    """A byte-oriented view of a bytes-like key or value (no copy when possible)."""
    try:
        view = memoryview(obj)  # type: ignore[arg-type]
    except TypeError:
        raise ArgumentTypeError(f"{what}s must be bytes-like objects, not {type(obj).__name__}") from None
    if view.ndim != 1 or view.itemsize != 1 or not view.c_contiguous:
        return view.tobytes()
    return view


def _pair(item: object) -> tuple[Any, Any]:
    try:
        key, value = cast(Any, item)
    except (TypeError, ValueError):
        raise ArgumentTypeError(f"items must be (key, value) pairs, got {type(item).__name__}") from None
    return key, value


def _too_long(what: str, length: int) -> InvalidArgumentError:
    return InvalidArgumentError(f"{what} is {length} bytes; the format allows at most {MAX_FIELD_LENGTH}")


def _poisoned(what: str) -> BackupError:
    return BackupError(f"this {what} failed earlier and cannot be used any more; start a new one")


# --- writer -----------------------------------------------------------------------------------

_W_OPEN, _W_IN_TREE, _W_FINISHED, _W_POISONED = range(4)
_W_STATE_NAMES = {_W_OPEN: "open", _W_IN_TREE: "inside a tree", _W_FINISHED: "finished"}


class BackupWriter:
    """OPEN -> (begin_tree -> IN_TREE -> end_tree -> OPEN)* -> finish -> FINISHED; any error poisons."""

    __slots__ = (
        "_sink",
        "_cipher",
        "_digest_key",
        "_stream_hasher",
        "_tree_hasher",
        "_buf",
        "_seg_plain",
        "_index",
        "_bytes_written",
        "_preamble",
        "_state",
        "_tree_name",
        "_tree_items",
        "_tree_bytes",
        "_names",
        "_summaries",
        "_packer",
        "_block",
        "_emit",
    )

    def __init__(
        self,
        sink: Any,
        backup_key: Buffer,
        header: Buffer,
        *,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
        kdf_id: int = 0,
        kdf_params: Buffer = b"",
        salt: Buffer | None = None,
        nonce_prefix: Buffer | None = None,
        threads: int = 0,
        compression_level: int = 0,
    ) -> None:
        self._state = _W_POISONED  # until construction completes
        check_threads(threads)
        level = check_level(compression_level)
        self._packer = BlockPacker(level) if level else None
        self._block = bytearray()
        self._emit = self._emit_block if level else self._emit_tree
        key = _check_key(backup_key)
        head = as_bytes(header, "header")
        if len(head) > MAX_FIELD_LENGTH:
            raise _too_long("header", len(head))
        css = check_segment_size(segment_size)
        if salt is None:
            salt_b = os.urandom(SALT_LENGTH)
        else:
            salt_b = as_bytes(salt, "salt")
            if len(salt_b) != SALT_LENGTH:
                raise InvalidArgumentError(f"salt must be {SALT_LENGTH} bytes, got {len(salt_b)}")
        if nonce_prefix is None:
            prefix = os.urandom(NONCE_PREFIX_LENGTH)
        else:
            prefix = as_bytes(nonce_prefix, "nonce_prefix")
            if len(prefix) != NONCE_PREFIX_LENGTH:
                raise InvalidArgumentError(f"nonce_prefix must be {NONCE_PREFIX_LENGTH} bytes, got {len(prefix)}")
        preamble = encode_preamble(css, derive_key_id(key), kdf_id, kdf_params)
        if not callable(getattr(sink, "write", None)):
            raise ArgumentTypeError(f"sink must be a binary file-like object with write(), not {type(sink).__name__}")
        self._sink = sink
        self._preamble = preamble
        self._cipher = SegmentCipher(key, salt_b, prefix, preamble, css)
        self._digest_key = derive_digest_key(key)
        self._stream_hasher = blake3.blake3(key=self._digest_key)
        self._tree_hasher: Any = None
        self._buf = bytearray()
        self._seg_plain = self._cipher.first_plain
        self._index = 0
        self._bytes_written = 0
        self._tree_name = ""
        self._tree_items = 0
        self._tree_bytes = 0
        self._names: set[str] = set()
        self._summaries: list[TreeSummary] = []
        self._write(preamble + bytes([HEADER_LENGTH]) + salt_b + prefix)
        self._feed(LEN_HEADER.pack(REC_HEADER, len(head)) + head)
        self._state = _W_OPEN

    def __repr__(self) -> str:
        state = _W_STATE_NAMES.get(self._state, "poisoned")
        return f"<BackupWriter {state}, {self._bytes_written} bytes written>"

    # -- plumbing --

    def _enter(self, expected: int, method: str) -> None:
        state = self._state
        if state == expected:
            return
        if state == _W_POISONED:
            raise _poisoned("backup writer")
        self._state = _W_POISONED
        raise InvalidArgumentError(
            f"BackupWriter.{method}() called out of order (the writer is {_W_STATE_NAMES[state]})"
        )

    def _write(self, data: bytes) -> None:
        """Writes all of `data`: raw files may take less than given per call."""
        view = memoryview(data)
        try:
            while view:
                n = self._sink.write(view)
                if n is None:
                    break  # a sink that returns nothing has taken everything
                if isinstance(n, bool) or not isinstance(n, int):
                    raise TypeError("sink.write() must return the number of bytes written or None")
                if n <= 0:
                    raise BackupIOError("writing the backup failed: the sink accepted no bytes")
                view = view[n:]
        except BackupIOError:
            raise
        except OSError as exc:
            raise BackupIOError(f"writing the backup failed: {exc}") from exc
        finally:
            view.release()
        self._bytes_written += len(data)

    def _feed(self, data: Any) -> None:
        """Structure records (HEADER, TREE_BEGIN, TREE_END): into the stream digest and the buffer."""
        self._stream_hasher.update(data)
        self._append(data)

    def _append(self, data: Any) -> None:
        self._buf += data
        if len(self._buf) > self._seg_plain:
            self._drain()

    def _drain(self) -> None:
        """Emits every segment that is known not to be the last (more plaintext follows it)."""
        buf = self._buf
        while len(buf) > self._seg_plain:
            size = self._seg_plain
            if self._index >= MAX_SEGMENTS - 1:
                raise InvalidArgumentError("backup too large: a stream holds at most 2^32 segments")
            with memoryview(buf) as view:
                ct = self._cipher.encrypt(self._index, view[:size], False)
            del buf[:size]
            self._write(ct)
            self._index += 1
            self._seg_plain = self._cipher.plain

    def _emit_tree(self, data: Any, tail: Any = None) -> None:
        """Whole records of the open tree (`tail`, if given, is the value that ends the last one).
        A tree's records go into its tree digest only; the stream digest covers them through
        the TREE_END record that carries that digest (docs/FORMAT.md §4)."""
        self._tree_hasher.update(data)
        self._append(data)
        if tail is not None:
            self._tree_hasher.update(tail)
            self._append(tail)

    def _emit_block(self, data: Any, tail: Any = None) -> None:
        """As _emit_tree, with compression: records gather into a block of up to BLOCK_TARGET raw
        bytes; a batch longer than that goes out as plain records."""
        size = len(data) + (0 if tail is None else len(tail))
        if len(self._block) + size > BLOCK_TARGET:
            self._close_block()
        if size > BLOCK_TARGET:
            self._emit_tree(data, tail)
            return
        self._tree_hasher.update(data)
        self._block += data
        if tail is not None:
            self._tree_hasher.update(tail)
            self._block += tail

    def _close_block(self) -> None:
        if self._block:
            assert self._packer is not None
            self._append(self._packer.record(self._block))  # not digested: its records were
            self._block = bytearray()

    # -- public API --

    @property
    def bytes_written(self) -> int:
        return self._bytes_written

    @property
    def preamble(self) -> bytes:
        return self._preamble

    def begin_tree(self, name: str) -> None:
        self._enter(_W_OPEN, "begin_tree")
        try:
            if not isinstance(name, str):
                raise ArgumentTypeError(f"tree name must be a str, not {type(name).__name__}")
            try:
                raw = name.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidArgumentError("tree name is not valid Unicode (it holds surrogates)") from None
            if not 1 <= len(raw) <= MAX_TREE_NAME_LENGTH:
                raise InvalidArgumentError(
                    f"tree name must be 1..={MAX_TREE_NAME_LENGTH} bytes of UTF-8, got {len(raw)} bytes"
                )
            if name in self._names:
                raise InvalidArgumentError(f"tree {name!r} was already written to this backup")
            self._names.add(name)
            self._feed(LEN_HEADER.pack(REC_TREE_BEGIN, len(raw)) + raw)
            self._tree_name = name
            self._tree_items = 0
            self._tree_bytes = 0
            self._tree_hasher = blake3.blake3(key=self._digest_key)
            self._state = _W_IN_TREE
        except BaseException:
            self._state = _W_POISONED
            raise

    def add_items(self, items: Iterable[tuple[Buffer, Buffer]]) -> int:
        self._enter(_W_IN_TREE, "add_items")
        try:
            count, nbytes = _frame_items(items, self._emit, deletes=False)
            self._tree_items += count
            self._tree_bytes += nbytes
            return count
        except BaseException:
            self._state = _W_POISONED
            raise

    def add_deletes(self, keys: Iterable[Buffer]) -> int:
        self._enter(_W_IN_TREE, "add_deletes")
        try:
            count, nbytes = _frame_items(keys, self._emit, deletes=True)
            self._tree_items += count
            self._tree_bytes += nbytes
            return count
        except BaseException:
            self._state = _W_POISONED
            raise

    def end_tree(self) -> TreeSummary:
        self._enter(_W_IN_TREE, "end_tree")
        try:
            self._close_block()
            digest = self._tree_hasher.digest()
            self._tree_hasher = None
            self._feed(TREE_END.pack(REC_TREE_END, self._tree_items, self._tree_bytes, digest))
            summary: TreeSummary = (self._tree_name, self._tree_items, self._tree_bytes, digest)
            self._summaries.append(summary)
            self._state = _W_OPEN
            return summary
        except BaseException:
            self._state = _W_POISONED
            raise

    def finish(self) -> Trailer:
        self._enter(_W_OPEN, "finish")
        try:
            trees = list(self._summaries)
            total_items = sum(t[1] for t in trees)
            total_bytes = sum(t[2] for t in trees)
            digest = self._stream_hasher.digest()
            self._buf += encode_trailer(total_items, total_bytes, trees, digest)
            self._drain()
            # 1 ..= one segment of plaintext is left: the last segment, never empty.
            ct = self._cipher.encrypt(self._index, self._buf, True)
            self._buf = bytearray()
            self._write(ct)
            self._state = _W_FINISHED
            return (total_items, total_bytes, trees, digest)
        except BaseException:
            self._state = _W_POISONED
            raise


def _frame_items(items: Iterable[Any], emit: Any, *, deletes: bool) -> tuple[int, int]:
    """Frames PUT (or DELETE) records from a lazily consumed iterable, handing them to `emit` in
    batches of about _CHUNK bytes; large values are handed over without copying them."""
    if isinstance(items, (bytes, bytearray, memoryview, str)):
        raise ArgumentTypeError("items must be an iterable of records, not a single bytes-like object or str")
    chunk = bytearray()
    count = 0
    nbytes = 0
    put_pack = PUT_HEADER.pack
    del_pack = DELETE_HEADER.pack
    for item in items:
        if deletes:
            key = item if type(item) is bytes else _buffer(item, "key")
            klen = len(key)
            if klen > MAX_FIELD_LENGTH:
                raise _too_long("key", klen)
            chunk += del_pack(_DEL_TYPE, klen)
            chunk += key
            nbytes += klen
        else:
            key, value = _pair(item)
            if type(key) is not bytes:
                key = _buffer(key, "key")
            if type(value) is not bytes:
                value = _buffer(value, "value")
            klen = len(key)
            vlen = len(value)
            if klen > MAX_FIELD_LENGTH:
                raise _too_long("key", klen)
            if vlen > MAX_FIELD_LENGTH:
                raise _too_long("value", vlen)
            chunk += put_pack(_PUT_TYPE, klen, vlen)
            chunk += key
            if vlen >= _CHUNK:
                emit(chunk, value)
                chunk.clear()
            else:
                chunk += value
            nbytes += klen + vlen
        count += 1
        if len(chunk) >= _CHUNK:
            emit(chunk)
            chunk.clear()
    if chunk:
        emit(chunk)
    return count, nbytes


def digest_items(backup_key: Buffer, items: Iterable[tuple[Buffer, Buffer | None]]) -> tuple[int, int, bytes]:
    """(item_count, byte_count, tree digest) of PUT (value bytes) and DELETE (value None) records."""
    key = _check_key(backup_key)
    hasher = blake3.blake3(key=derive_digest_key(key))
    if isinstance(items, (bytes, bytearray, memoryview, str)):
        raise ArgumentTypeError("items must be an iterable of (key, value) pairs")
    chunk = bytearray()
    count = 0
    nbytes = 0
    put_pack = PUT_HEADER.pack
    del_pack = DELETE_HEADER.pack
    for item in items:
        k, v = _pair(item)
        if type(k) is not bytes:
            k = _buffer(k, "key")
        klen = len(k)
        if klen > MAX_FIELD_LENGTH:
            raise _too_long("key", klen)
        if v is None:
            chunk += del_pack(_DEL_TYPE, klen)
            chunk += k
            nbytes += klen
        else:
            if type(v) is not bytes:
                v = _buffer(v, "value")
            vlen = len(v)
            if vlen > MAX_FIELD_LENGTH:
                raise _too_long("value", vlen)
            chunk += put_pack(_PUT_TYPE, klen, vlen)
            chunk += k
            if vlen >= _CHUNK:
                hasher.update(chunk)
                chunk.clear()
                hasher.update(v)
            else:
                chunk += v
            nbytes += klen + vlen
        count += 1
        if len(chunk) >= _CHUNK:
            hasher.update(chunk)
            chunk.clear()
    hasher.update(chunk)
    return count, nbytes, hasher.digest()


def digest_batches(
    backup_key: Buffer, batches: Iterable[Iterable[tuple[Buffer, Buffer | None]]]
) -> tuple[int, int, bytes]:
    """digest_items over the records of several batches (a snapshot's batches() of one tree)."""
    return digest_items(backup_key, itertools.chain.from_iterable(batches))


# --- reader -----------------------------------------------------------------------------------

# _R_TREE_END is READY right after a tree's TREE_END: read_items() keeps returning [] there.
# read_items batches: at most this many records, or records up to this many key+value bytes.
DEFAULT_BATCH_ITEMS = 4096
# What a non-blocking source's read() returning None (no data yet) is reported as; the Rust core
# says the same.
NO_DATA_YET = "the source returned None (a non-blocking file with no data yet): read backups from a blocking file"
DEFAULT_BATCH_BYTES = 16 << 20


def check_batch_limits(max_items: object, max_bytes: object) -> None:
    """read_items() limits: ints of at least 1."""
    for name, value in (("max_items", max_items), ("max_bytes", max_bytes)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ArgumentTypeError(f"{name} must be an int, not {type(value).__name__}")
        if value < 1:
            raise InvalidArgumentError(f"{name} must be at least 1, got {value}")


def take_batch(pairs: Iterator[Any], max_items: int, max_bytes: int) -> tuple[list[Any], bool]:
    """The next batch of a store's (key, value) iterator: at most max_items pairs, ending once
    their keys and values reach max_bytes; and whether the iterator may hold more."""
    check_batch_limits(max_items, max_bytes)
    batch = []
    size = 0
    for pair in pairs:
        key, value = _pair(pair)
        batch.append(pair)
        size += len(key) + len(value)
        if len(batch) >= max_items or size >= max_bytes:
            return batch, True
    return batch, False


def plain_pairs(items: object, max_key: int) -> bool:
    """True for a non-empty list of 2-tuples of bytes (exact types) whose keys are 1..max_key
    bytes long: a batch a store can hand to its C loop unchecked. C loops (map/set) here."""
    if isinstance(max_key, bool) or not isinstance(max_key, int):
        raise ArgumentTypeError(f"max_key must be an int, not {type(max_key).__name__}")
    if max_key < 0:
        raise InvalidArgumentError(f"max_key must be at least 0, got {max_key}")
    if type(items) is not list or not items:
        return False
    if set(map(type, items)) != {tuple} or set(map(len, items)) != {2}:
        return False
    keys, values = map(operator.itemgetter(0), items), map(operator.itemgetter(1), items)
    if set(map(type, keys)) != {bytes} or set(map(type, values)) != {bytes}:
        return False
    lengths = list(map(len, map(operator.itemgetter(0), items)))
    return 0 < min(lengths) and max(lengths) <= max_key


def keys_ascending(items: object, after: bytes | None = None) -> bool:
    """True when the pairs of `items` (a list) have bytes keys in strictly ascending byte order,
    every one after `after` (None: no bound): a batch LMDB can append at a tree's end. C loops here."""
    if after is not None and type(after) is not bytes:
        raise ArgumentTypeError(f"after must be bytes or None, not {type(after).__name__}")
    if type(items) is not list:
        return False
    if not items:
        return True
    if set(map(type, items)) != {tuple} or set(map(len, items)) != {2}:
        return False
    keys = list(map(operator.itemgetter(0), items))
    if set(map(type, keys)) != {bytes}:
        return False
    if after is not None:
        keys.insert(0, after)
    return all(map(operator.lt, keys, itertools.islice(keys, 1, None)))


_R_LOCKED, _R_READY, _R_IN_TREE, _R_TREE_END, _R_DONE, _R_SUMMARY, _R_POISONED = range(7)
_R_STATE_NAMES = {
    _R_LOCKED: "locked (call unlock() first)",
    _R_READY: "between trees",
    _R_IN_TREE: "inside a tree",
    _R_TREE_END: "between trees",
    _R_DONE: "done",
    _R_SUMMARY: "ended by read_summary(); open a new reader to read items",
}


def _cut_by_block() -> NoReturn:
    raise IntegrityError("backup holds a block that ends inside a record")


def _unexpected(rtype: int, expected: str) -> NoReturn:
    if rtype not in RECORD_NAMES:
        raise FormatError(f"backup holds an unknown record type {rtype:#04x} (written by a newer datafold?)")
    raise IntegrityError(f"backup record order is invalid: found record type {rtype:#04x}, expected {expected}")


class BackupReader:
    """LOCKED -(unlock)-> READY -(next_tree)-> IN_TREE -(read_items until [])-> READY ...
    -(next_tree returns None)-> DONE. Any error poisons it."""

    __slots__ = (
        "_source",
        "_preamble",
        "_state",
        "_cipher",
        "_digest_key",
        "_stream_hasher",
        "_tree_hasher",
        "_hashing",
        "_data",
        "_pos",
        "_mark",
        "_seg_index",
        "_ended",
        "_peek",
        "_tree_name",
        "_tree_items",
        "_tree_bytes",
        "_names",
        "_summaries",
        "_trailer",
        "_block_end",
    )

    def __init__(self, source: Any, *, threads: int = 0) -> None:
        self._state = _R_POISONED  # until the preamble checks out
        check_threads(threads)
        if not callable(getattr(source, "read", None)):
            raise ArgumentTypeError(
                f"source must be a binary file-like object with read(), not {type(source).__name__}"
            )
        self._source = source
        self._trailer: Trailer | None = None
        first = self._read_exact(16)
        length = declared_preamble_length(first)
        rest = self._read_exact(length - 16)
        self._preamble = parse_preamble(first + rest)
        self._cipher: SegmentCipher | None = None
        self._tree_hasher: Any = None
        self._hashing = False
        self._data = b""
        self._pos = 0
        self._mark = 0
        # The decoded records of a BLOCK are spliced into _data in place of the BLOCK record;
        # _data[:_block_end] (from _pos on) is what is left of them.
        self._block_end = 0
        self._seg_index = 0
        self._ended = False
        self._peek = b""
        self._tree_name = ""
        self._tree_items = 0
        self._tree_bytes = 0
        self._names: set[str] = set()
        self._summaries: list[TreeSummary] = []
        self._state = _R_LOCKED

    def __repr__(self) -> str:
        state = _R_STATE_NAMES.get(self._state, "poisoned")
        return f"<BackupReader {state}>"

    # -- plumbing --

    def _enter(self, allowed: tuple[int, ...], method: str) -> None:
        state = self._state
        if state in allowed:
            return
        if state == _R_POISONED:
            raise _poisoned("backup reader")
        self._state = _R_POISONED
        raise InvalidArgumentError(
            f"BackupReader.{method}() called out of order (the reader is {_R_STATE_NAMES[state]})"
        )

    def _read(self, n: int) -> bytes:
        try:
            data = self._source.read(n)
        except OSError as exc:
            raise BackupIOError(f"reading the backup failed: {exc}") from exc
        if data is None:  # what a non-blocking file returns while it has no data: not the end
            raise BackupIOError(NO_DATA_YET)
        return data

    def _read_exact(self, n: int) -> bytes:
        """Up to n bytes; fewer only at the end of the source."""
        if n <= 0:
            return b""
        data = self._read(n)
        if len(data) >= n or not data:
            return bytes(data)
        parts = [data]
        got = len(data)
        while got < n:
            more = self._read(n - got)
            if not more:
                break
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def _next_segment(self) -> bytes | None:
        """Decrypts the next segment; None once the last one was decrypted. A segment is the last
        exactly when no byte follows it (one byte is read ahead)."""
        if self._ended:
            return None
        cipher = self._cipher
        assert cipher is not None
        index = self._seg_index
        size = cipher.segment_size - HEADER_LENGTH if index == 0 else cipher.segment_size
        peek = self._peek
        ct = peek + self._read_exact(size - len(peek)) if peek else self._read_exact(size)
        if len(ct) < size:
            last = True
            self._peek = b""
        else:
            self._peek = self._read_exact(1)
            last = not self._peek
        if len(ct) < TAG_LENGTH:
            raise IntegrityError(f"backup is truncated or corrupted (segment {index} is shorter than its tag)")
        if index >= MAX_SEGMENTS:
            raise IntegrityError("backup is corrupted (more than 2^32 segments)")
        pt = cipher.decrypt(index, ct, last)
        self._seg_index = index + 1
        self._ended = last
        return pt

    def _flush_hash(self) -> None:
        """Hashes the consumed plaintext [mark, pos) into the active digests."""
        if self._mark < self._pos:
            if self._hashing:
                with memoryview(self._data) as view:
                    part = view[self._mark : self._pos]
                    if self._tree_hasher is not None:
                        self._tree_hasher.update(part)
                    else:
                        self._stream_hasher.update(part)
                    part.release()
            self._mark = self._pos

    def _need(self, n: int) -> None:
        """Makes sure n plaintext bytes follow the current position."""
        avail = len(self._data) - self._pos
        if avail >= n:
            return
        self._flush_hash()
        parts: list[Any] = [self._data[self._pos :]] if avail else []
        while avail < n:
            pt = self._next_segment()
            if pt is None:
                raise IntegrityError("backup is truncated: the stream ends before its trailer")
            parts.append(pt)
            avail += len(pt)
        self._data = parts[0] if len(parts) == 1 else b"".join(parts)
        self._pos = 0
        self._mark = 0
        self._block_end = 0  # callers read past a block before they need more

    def _len_record(self) -> int:
        """Length field of the HEADER / TREE_BEGIN / TRAILER record at the current position."""
        self._need(LEN_HEADER.size)
        return int(U32.unpack_from(self._data, self._pos + 1)[0])

    # -- public API --

    @property
    def preamble(self) -> Preamble:
        return self._preamble

    @property
    def trailer(self) -> Trailer | None:
        return self._trailer

    def unlock(self, backup_key: Buffer) -> bytes:
        self._enter((_R_LOCKED,), "unlock")
        try:
            key = _check_key(backup_key)
            if derive_key_id(key) != self._preamble.key_id:
                raise EncryptionKeyError(
                    "this backup was made with a different key: use the master key (or passphrase) it was created with"
                )
            head = self._read_exact(HEADER_LENGTH)
            if len(head) < HEADER_LENGTH:
                raise IntegrityError("backup stream is truncated inside its header")
            if head[0] != HEADER_LENGTH:
                raise IntegrityError("backup stream header is corrupted (wrong header length byte)")
            salt = head[1 : 1 + SALT_LENGTH]
            prefix = head[1 + SALT_LENGTH :]
            self._cipher = SegmentCipher(key, salt, prefix, self._preamble.raw, self._preamble.segment_size)
            self._digest_key = derive_digest_key(key)
            self._stream_hasher = blake3.blake3(key=self._digest_key)
            self._hashing = True
            self._need(1)
            rtype = self._data[self._pos]
            if rtype != REC_HEADER:
                _unexpected(rtype, "the HEADER record")
            length = self._len_record()
            self._need(LEN_HEADER.size + length)
            start = self._pos + LEN_HEADER.size
            payload = self._data[start : start + length]
            self._pos = start + length
            self._state = _R_READY
            return payload
        except BaseException:
            self._state = _R_POISONED
            raise

    def next_tree(self) -> str | None:
        if self._state == _R_DONE:
            return None
        self._enter((_R_READY, _R_IN_TREE, _R_TREE_END), "next_tree")
        try:
            # Moving on from an open tree reads (and checks) the rest of it, as the Rust core does.
            while self._state == _R_IN_TREE:
                self._read_items(1 << 16)
            self._need(1)
            rtype = self._data[self._pos]
            if rtype == REC_TREE_BEGIN:
                return self._tree_begin()
            if rtype == REC_TRAILER:
                self._read_trailer()
                return None
            _unexpected(rtype, "a TREE_BEGIN or TRAILER")
        except BaseException:
            self._state = _R_POISONED
            raise

    def _tree_begin(self) -> str:
        length = self._len_record()
        if not 1 <= length <= MAX_TREE_NAME_LENGTH:
            raise IntegrityError("backup holds a tree with an invalid name length")
        self._need(LEN_HEADER.size + length)
        start = self._pos + LEN_HEADER.size
        try:
            name = self._data[start : start + length].decode("utf-8")
        except UnicodeDecodeError:
            raise IntegrityError("backup holds a tree name that is not UTF-8") from None
        if name in self._names:
            raise IntegrityError(f"backup holds tree {quoted(name)} twice")
        self._names.add(name)
        self._pos = start + length
        self._flush_hash()  # TREE_BEGIN goes into the stream digest only
        self._tree_hasher = blake3.blake3(key=self._digest_key)
        self._tree_name = name
        self._tree_items = 0
        self._tree_bytes = 0
        self._state = _R_IN_TREE
        return name

    def _read_trailer(self) -> None:
        self._flush_hash()
        self._hashing = False  # the stream digest covers everything before the TRAILER
        length = self._len_record()
        self._need(LEN_HEADER.size + length)  # then decode_trailer_payload checks it, as the Rust core
        start = self._pos + LEN_HEADER.size
        payload = self._data[start : start + length]
        self._pos = start + length
        trailer = decode_trailer_payload(payload)
        if trailer[2] != self._summaries:
            raise IntegrityError("backup trailer disagrees with the trees read")
        if trailer[3] != self._stream_hasher.digest():
            raise IntegrityError("backup stream digest does not match its content")
        if self._pos != len(self._data) or not self._ended:
            raise IntegrityError("backup has data after its trailer")
        self._trailer = trailer
        self._state = _R_DONE

    def read_items(
        self, max_items: int = DEFAULT_BATCH_ITEMS, max_bytes: int = DEFAULT_BATCH_BYTES
    ) -> list[tuple[bytes, bytes | None]]:
        return self._batch("read_items", max_items, max_bytes)

    def skip_items(self, max_items: int = DEFAULT_BATCH_ITEMS, max_bytes: int = DEFAULT_BATCH_BYTES) -> int:
        """read_items without handing the records out: how many were read and checked (0 at the end)."""
        return len(self._batch("skip_items", max_items, max_bytes))

    def _batch(self, method: str, max_items: int, max_bytes: int) -> list[tuple[bytes, bytes | None]]:
        self._enter((_R_IN_TREE, _R_TREE_END), method)
        try:
            check_batch_limits(max_items, max_bytes)
            if self._state == _R_TREE_END:
                return []
            return self._read_items(max_items, max_bytes)
        except BaseException:
            self._state = _R_POISONED
            raise

    def _read_items(self, max_items: int, max_bytes: int = DEFAULT_BATCH_BYTES) -> list[tuple[bytes, bytes | None]]:
        out: list[tuple[bytes, bytes | None]] = []
        data = self._data
        pos = self._pos
        count = 0
        nbytes = 0
        unpack_put = PUT_HEADER.unpack_from
        unpack_u32 = U32.unpack_from
        block_end = self._block_end
        while count < max_items and nbytes < max_bytes:
            if pos >= len(data):
                self._pos = pos
                self._need(1)
                data, pos, block_end = self._data, self._pos, 0
            rtype = data[pos]
            # Inside a block (pos < block_end) every record must end by block_end.
            if rtype == REC_PUT:
                if len(data) - pos < 9:
                    if pos < block_end:
                        _cut_by_block()
                    self._pos = pos
                    self._need(9)
                    data, pos, block_end = self._data, self._pos, 0
                _, klen, vlen = unpack_put(data, pos)
                end = pos + 9 + klen + vlen
                if end > block_end > pos:
                    _cut_by_block()
                if end > len(data):
                    self._pos = pos
                    self._need(9 + klen + vlen)
                    data, pos, block_end = self._data, self._pos, 0
                    end = pos + 9 + klen + vlen
                kend = pos + 9 + klen
                out.append((data[pos + 9 : kend], data[kend:end]))
                nbytes += klen + vlen
                pos = end
            elif rtype == REC_DELETE:
                if len(data) - pos < 5:
                    if pos < block_end:
                        _cut_by_block()
                    self._pos = pos
                    self._need(5)
                    data, pos, block_end = self._data, self._pos, 0
                (klen,) = unpack_u32(data, pos + 1)
                end = pos + 5 + klen
                if end > block_end > pos:
                    _cut_by_block()
                if end > len(data):
                    self._pos = pos
                    self._need(5 + klen)
                    data, pos, block_end = self._data, self._pos, 0
                    end = pos + 5 + klen
                out.append((data[pos + 5 : end], None))
                nbytes += klen
                pos = end
            elif pos < block_end:
                raise IntegrityError(
                    f"backup holds a block with a record of type {rtype:#04x}; blocks hold only PUT and DELETE records"
                )
            elif rtype == REC_BLOCK:
                self._pos = pos
                self._splice_block()
                data, pos, block_end = self._data, self._pos, self._block_end
                continue
            elif rtype == REC_TREE_END:
                if out:
                    break  # the next call checks the TREE_END and returns []
                self._pos = pos
                self._tree_end()
                return out
            else:
                self._pos = pos
                _unexpected(rtype, "a PUT, DELETE, BLOCK or TREE_END")
            count += 1
        self._pos = pos
        self._block_end = block_end
        self._tree_items += count
        self._tree_bytes += nbytes
        return out

    def _splice_block(self) -> None:
        """Replaces the BLOCK record at the current position by the records it carries. The BLOCK
        record itself is not digested; its records are, as they are read."""
        self._flush_hash()
        self._need(BLOCK_HEADER.size)
        codec, raw_len, data_len = parse_block_header(self._data, self._pos)
        self._need(BLOCK_HEADER.size + data_len)
        start = self._pos + BLOCK_HEADER.size
        end = start + data_len
        raw = decode_block(codec, raw_len, self._data[start:end])
        self._data = raw + self._data[end:]
        self._pos = 0
        self._mark = 0
        self._block_end = raw_len

    def _tree_end(self) -> None:
        self._flush_hash()  # the tree's records, into the tree digest
        self._need(TREE_END_LENGTH)
        _, item_count, byte_count, digest = TREE_END.unpack_from(self._data, self._pos)
        self._pos += TREE_END_LENGTH
        tree_digest = self._tree_hasher.digest()
        self._tree_hasher = None
        if item_count != self._tree_items or byte_count != self._tree_bytes:
            raise IntegrityError(
                f"tree {quoted(self._tree_name)}: the backup says {item_count} items / {byte_count} bytes "
                f"but holds {self._tree_items} / {self._tree_bytes}"
            )
        if digest != tree_digest:
            raise IntegrityError(f"tree {quoted(self._tree_name)}: digest does not match its records")
        self._summaries.append((self._tree_name, item_count, byte_count, digest))
        self._state = _R_TREE_END

    def read_summary(self) -> Trailer:
        self._enter((_R_READY, _R_IN_TREE, _R_TREE_END, _R_DONE), "read_summary")
        try:
            trailer = self._read_summary()
            # `trailer` stays as it was: it is set by a full read (next_tree() returning None)
            self._state = _R_SUMMARY
            return trailer
        except BaseException:
            self._state = _R_POISONED
            raise

    def _read_summary(self) -> Trailer:
        source = self._source
        seekable = getattr(source, "seekable", None)
        if not (callable(seekable) and hasattr(source, "seek") and seekable()):
            raise InvalidArgumentError("read_summary() needs a seekable source (seekable(), seek() and tell())")
        cipher = self._cipher
        assert cipher is not None
        base = self._preamble.preamble_length
        css = cipher.segment_size
        try:
            end = source.seek(0, os.SEEK_END)
            stream_len = (end if isinstance(end, int) else source.tell()) - base
        except OSError as exc:
            raise BackupIOError(f"reading the backup failed: {exc}") from exc
        if stream_len < HEADER_LENGTH + TAG_LENGTH:
            raise IntegrityError("backup is truncated (the stream is shorter than one segment)")
        n = max(1, -(-stream_len // css))
        last_start = HEADER_LENGTH if n == 1 else (n - 1) * css
        if stream_len - last_start < TAG_LENGTH:
            raise IntegrityError("backup is truncated or has extra bytes (its size does not fit the segment size)")
        if n > MAX_SEGMENTS:
            raise IntegrityError("backup is corrupted (more than 2^32 segments)")

        def segment(j: int) -> bytes:
            start = HEADER_LENGTH if j == 0 else j * css
            end = min((j + 1) * css, stream_len)
            try:
                source.seek(base + start)
            except OSError as exc:
                raise BackupIOError(f"reading the backup failed: {exc}") from exc
            ct = self._read_exact(end - start)
            if len(ct) != end - start:
                raise IntegrityError("backup is truncated (it changed while being read)")
            return cipher.decrypt(j, ct, j == n - 1)

        j = n - 1
        parts = [segment(j)]
        have = len(parts[0])
        while have < 4:
            j -= 1
            if j < 0:
                raise IntegrityError("backup is truncated: the stream ends before its trailer")
            pt = segment(j)
            parts.insert(0, pt)
            have += len(pt)
        tail = b"".join(parts)
        (length,) = U32.unpack_from(tail, len(tail) - 4)
        while len(tail) < length + LEN_HEADER.size:
            j -= 1
            if j < 0:
                raise IntegrityError("backup is truncated: the stream ends before its trailer")
            tail = segment(j) + tail
        record = tail[len(tail) - length - LEN_HEADER.size :]
        rtype, front_length = LEN_HEADER.unpack_from(record)
        if rtype != REC_TRAILER or front_length != length:
            raise IntegrityError("backup does not end with a valid trailer")
        return decode_trailer_payload(record[LEN_HEADER.size :])
