"""ChainMerge: one tree across the readers of a backup chain (the pure twin of src/chain.rs).

Every member of a chain (a full backup, then incrementals, oldest first) lists a tree's records in
ascending key order, so the state the chain describes is a streaming merge in which the newest
member holding a key wins. Members older than the tree's latest whole-tree delete (`stale`) merge
as deletes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from ..errors import ArgumentTypeError, BackupError, IntegrityError, InvalidArgumentError
from .backup import (
    DEFAULT_BATCH_BYTES,
    DEFAULT_BATCH_ITEMS,
    BackupReader,
    BackupWriter,
    _buffer,
    _pair,
    check_batch_limits,
)

__all__ = ["ChainMerge"]

Record = tuple[bytes, "bytes | None"]
_END = None


def _records(reader: BackupReader) -> Iterator[tuple[bytes, bytes | None]]:
    while batch := reader.read_items(DEFAULT_BATCH_ITEMS):
        yield from batch


class ChainMerge:
    __slots__ = ("_sources", "_heads", "_stale", "_last_db_key", "_poisoned")

    def __init__(self, readers: Iterable[BackupReader], *, stale: int = 0) -> None:
        if isinstance(readers, (str, bytes)) or not isinstance(readers, Iterable):
            raise ArgumentTypeError(f"readers must be a list of BackupReader, not {type(readers).__name__}")
        readers = list(readers)
        for r in readers:
            if not isinstance(r, BackupReader):
                raise ArgumentTypeError(f"readers must hold BackupReader objects, found {type(r).__name__}")
        if len({id(r) for r in readers}) != len(readers):
            raise InvalidArgumentError("a reader of the chain is in use elsewhere (or given twice)")
        if isinstance(stale, bool) or not isinstance(stale, int):
            raise ArgumentTypeError(f"stale must be an int, not {type(stale).__name__}")
        if not 0 <= stale <= len(readers):
            raise InvalidArgumentError(
                f"stale must be between 0 and the number of readers ({len(readers)}), got {stale}"
            )
        self._sources = [_records(r) for r in readers]
        self._heads: list[Any] = []  # filled on first use, as the Rust core does
        self._stale = stale
        self._last_db_key: bytes | None = None
        self._poisoned = False

    def __repr__(self) -> str:
        return f"<ChainMerge members={len(self._sources)}>"

    def _pull(self, i: int, last: bytes | None) -> Record | None:
        record = next(self._sources[i], _END)
        if record is not None and last is not None and record[0] <= last:
            raise IntegrityError(
                "a backup of the chain does not list its keys in ascending order, so it cannot be merged; "
                "make a new full backup"
            )
        return record

    def _guard(self) -> None:
        if self._poisoned:
            raise BackupError("this chain merge failed earlier and cannot be used any more; start a new one")
        if not self._heads and self._sources:
            self._heads = [self._pull(i, None) for i in range(len(self._sources))]

    def _next(self) -> Record | None:
        heads = self._heads
        live = [h[0] for h in heads if h is not None]
        if not live:
            return None
        key = min(live)
        winner = 0
        for i, h in enumerate(heads):
            if h is not None and h[0] == key:
                winner = i
                record = h
                heads[i] = self._pull(i, key)
        if winner < self._stale:
            return (key, None)
        return record

    def _peek_key(self) -> bytes | None:
        live = [h[0] for h in self._heads if h is not None]
        return min(live) if live else None

    def skip_items(self, max_items: int = DEFAULT_BATCH_ITEMS, max_bytes: int = DEFAULT_BATCH_BYTES) -> int:
        """read_items without handing the records out: how many were merged (0 at the end)."""
        return len(self.read_items(max_items, max_bytes))

    def read_items(
        self, max_items: int = DEFAULT_BATCH_ITEMS, max_bytes: int = DEFAULT_BATCH_BYTES
    ) -> list[tuple[bytes, bytes | None]]:
        check_batch_limits(max_items, max_bytes)
        self._guard()
        try:
            out: list[tuple[bytes, bytes | None]] = []
            nbytes = 0
            while len(out) < max_items and nbytes < max_bytes:
                record = self._next()
                if record is None:
                    break
                out.append(record)
                nbytes += len(record[0]) + (len(record[1]) if record[1] is not None else 0)
            return out
        except BaseException:
            self._poisoned = True
            raise

    def diff(self, items: Iterable[tuple[Any, Any]], writer: BackupWriter) -> int:
        """Writes to `writer` the records that turn the chain's state into the database's, up to
        the last of `items` (the database's (key, value) pairs in strictly ascending key order)."""
        if not isinstance(writer, BackupWriter):
            raise ArgumentTypeError(f"writer must be a BackupWriter, not {type(writer).__name__}")
        self._guard()
        out = _Runs(writer)
        try:
            last = self._last_db_key
            for item in items:
                k, v = _pair(item)
                key = k if type(k) is bytes else bytes(_buffer(k, "key"))
                value = v if type(v) is bytes else bytes(_buffer(v, "value"))
                if last is not None and key <= last:
                    raise InvalidArgumentError("database items must come in strictly ascending key order")
                last = self._last_db_key = key
                while True:
                    chain_key = self._peek_key()
                    if chain_key is None or chain_key > key:
                        out.put(key, value)
                        break
                    record = self._next()
                    assert record is not None
                    if chain_key < key:
                        if record[1] is not None:
                            out.delete(chain_key)
                        continue
                    if record[1] != value:
                        out.put(key, value)
                    break
            return out.flush()
        except BaseException:
            self._poisoned = True
            raise

    def finish_diff(self, writer: BackupWriter) -> int:
        """After the database's last item: DELETE records for every key the chain still holds."""
        if not isinstance(writer, BackupWriter):
            raise ArgumentTypeError(f"writer must be a BackupWriter, not {type(writer).__name__}")
        self._guard()
        out = _Runs(writer)
        try:
            while (record := self._next()) is not None:
                if record[1] is not None:
                    out.delete(record[0])
            return out.flush()
        except BaseException:
            self._poisoned = True
            raise


class _Runs:
    """Hands records to a writer in runs of PUTs or DELETEs, keeping their order."""

    __slots__ = ("_writer", "_puts", "_deletes", "_count")

    def __init__(self, writer: BackupWriter) -> None:
        self._writer = writer
        self._puts: list[tuple[bytes, bytes]] = []
        self._deletes: list[bytes] = []
        self._count = 0

    def put(self, key: bytes, value: bytes) -> None:
        if self._deletes:
            self.flush()
        self._puts.append((key, value))
        if len(self._puts) >= DEFAULT_BATCH_ITEMS:
            self.flush()

    def delete(self, key: bytes) -> None:
        if self._puts:
            self.flush()
        self._deletes.append(key)
        if len(self._deletes) >= DEFAULT_BATCH_ITEMS:
            self.flush()

    def flush(self) -> int:
        if self._puts:
            self._count += self._writer.add_items(self._puts)
            self._puts = []
        if self._deletes:
            self._count += self._writer.add_deletes(self._deletes)
            self._deletes = []
        return self._count
