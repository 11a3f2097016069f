"""The Rust BackupReader reads segments with source.readinto() into a buffer it reuses (read()
for sources without it): same results, same errors, and a source misusing the buffer gets an
error, never access to memory the reader reuses."""

from __future__ import annotations

import io
from typing import Any

import pytest
from conftest import load_core
from datafold.errors import BackupError, BackupIOError, IntegrityError
from datafold.progress import Meter, ProgressEvent

core = pytest.importorskip("datafold._core")
KEY = bytes(range(32))


def _backup(items: int = 300, threads: int = 1) -> bytes:
    out = io.BytesIO()
    w = core.BackupWriter(out, KEY, b"{}", segment_size=4096, threads=threads)
    w.begin_tree("t")
    w.add_items([(b"%05d" % i, bytes([i % 251]) * 97) for i in range(items)])
    w.end_tree()
    w.finish()
    return out.getvalue()


def _read(source: Any, threads: int = 2) -> list[tuple[bytes, bytes | None]]:
    r = core.BackupReader(source, threads=threads)
    r.unlock(KEY)
    got: list[tuple[bytes, bytes | None]] = []
    while r.next_tree() is not None:
        while batch := r.read_items():
            got.extend(batch)
    return got


class ReadIntoOnly:
    """readinto() in pieces of at most `step` bytes; read() only for the preamble and header."""

    def __init__(self, data: bytes, step: int = 1 << 30) -> None:
        self._f = io.BytesIO(data)
        self.step = step
        self.readinto_calls = 0

    def read(self, n: int) -> bytes:
        return self._f.read(n)

    def readinto(self, b: Any) -> Any:
        self.readinto_calls += 1
        data = self._f.read(min(len(b), self.step))
        b[: len(data)] = data
        return len(data)


EXPECTED = [(b"%05d" % i, bytes([i % 251]) * 97) for i in range(300)]


@pytest.mark.parametrize("step", [1, 7, 4096, 1 << 30])
@pytest.mark.parametrize("threads", [1, 3])
def test_readinto_sources_read_like_read_sources(step: int, threads: int) -> None:
    data = _backup()
    assert len(data) > 5 * 4096
    src = ReadIntoOnly(data, step)
    assert _read(src, threads) == EXPECTED
    assert src.readinto_calls > 0
    assert _read(io.BytesIO(data), threads) == EXPECTED
    assert _read(io.BufferedReader(io.BytesIO(data)), threads) == EXPECTED  # type: ignore[arg-type]


@pytest.mark.parametrize("cut", [1, 15, 16, 4000, 4096, 4097])
def test_truncated_and_appended_stay_integrity_errors(cut: int) -> None:
    data = _backup()
    for bad in (data[:-cut], data + b"\0" * cut):
        for src in (ReadIntoOnly(bad, 5), io.BytesIO(bad)):
            with pytest.raises(IntegrityError):
                _read(src)


class Misbehaving(ReadIntoOnly):
    def __init__(self, data: bytes, mode: str) -> None:
        super().__init__(data)
        self.mode = mode
        self.kept: list[Any] = []

    def readinto(self, b: Any) -> Any:
        if self.mode == "oserror":
            raise OSError(5, "Input/output error")
        if self.mode == "none":
            return None
        if self.mode == "str":
            return "many"
        if self.mode == "negative":
            return -1
        if self.mode == "too_many":
            super().readinto(b)
            return len(b) + 1
        if self.mode in ("keep_slice", "keep_export"):
            self.kept.append(b[1:] if self.mode == "keep_slice" else memoryview(b))
            return super().readinto(b)
        raise AssertionError(self.mode)


@pytest.mark.parametrize(
    ("mode", "error"),
    [
        ("oserror", BackupIOError),
        ("none", BackupIOError),
        ("str", TypeError),
        ("negative", TypeError),
        ("too_many", BackupError),
        ("keep_slice", BackupError),
        ("keep_export", BackupError),
    ],
)
def test_misbehaving_readinto(mode: str, error: type[Exception]) -> None:
    src = Misbehaving(_backup(), mode)
    r = core.BackupReader(src)
    with pytest.raises(error):
        r.unlock(KEY)
    with pytest.raises(BackupError):
        r.next_tree()  # the reader is poisoned
    for view in src.kept:
        view[0] = 1  # the reader gave that memory up for good: harmless
        with pytest.raises(BufferError):
            memoryview(view.obj)  # no new view of the reader's buffer


def test_metered_file_counts_readinto() -> None:
    data = _backup()
    events: list[ProgressEvent] = []
    meter = Meter(events.append)
    meter.begin("verify")
    f = meter.reading(io.BytesIO(data))
    assert _read(f) == EXPECTED
    assert meter.bytes == len(data)


class FailsLater(Misbehaving):
    """Misbehaves from its `after`-th readinto() on: inside a feed that reads the next batch ahead
    while the workers decrypt (threads > 1)."""

    def __init__(self, data: bytes, mode: str, after: int) -> None:
        super().__init__(data, mode)
        self.after = after
        self.calls = 0

    def readinto(self, b: Any) -> Any:
        self.calls += 1
        if self.calls < self.after:
            data = self._f.read(len(b))
            b[: len(data)] = data
            return len(data)
        return super().readinto(b)


def _big_backup(segment_size: int) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    items = [(b"%05d" % i, bytes([i % 251]) * 100_000) for i in range(80)]  # 8 MB: batches over 1 MiB
    out = io.BytesIO()
    w = core.BackupWriter(out, KEY, b"{}", segment_size=segment_size)
    w.begin_tree("t")
    w.add_items(items)
    w.end_tree()
    w.finish()
    return out.getvalue(), items


@pytest.mark.parametrize("segment_size", [4096, 1 << 20])
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize(
    ("mode", "error"), [("oserror", BackupIOError), ("too_many", BackupError), ("keep_slice", BackupError)]
)
@pytest.mark.parametrize("where", ["batch", "ahead"])
def test_a_failed_read_ahead_poisons_the_reader(
    segment_size: int, threads: int, mode: str, error: type[Exception], where: str
) -> None:
    # The Rust reader reads each segment's ciphertext and tag in two calls, and a byte past each
    # batch: unlock() makes 3; the first feed reads its batch (2 segments per thread), then the
    # next one ahead while the workers decrypt.
    unlock_calls, batch_calls = 3, 2 * (2 * threads) + 1
    after = unlock_calls + 1 if where == "batch" else unlock_calls + batch_calls + 1
    data, _ = _big_backup(segment_size)
    src = FailsLater(data, mode, after)
    r = core.BackupReader(src, threads=threads)
    r.unlock(KEY)  # segment 0 alone: nothing read ahead yet
    with pytest.raises(error):
        while r.next_tree() is not None:
            while r.read_items():
                pass
    assert src.calls == after  # reported by the feed that read ahead, not read again
    with pytest.raises(BackupError):
        r.next_tree()
    for view in src.kept:
        view[0] = 1  # given up for good: harmless


@pytest.mark.parametrize("segment_size", [4096, 1 << 20])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_reading_ahead_reads_the_same_and_not_past_the_header_on_unlock(segment_size: int, threads: int) -> None:
    data, items = _big_backup(segment_size)
    src = ReadIntoOnly(data, step=1000)
    r = core.BackupReader(src, threads=threads)
    r.unlock(KEY)
    # read_metadata() unlocks and then reads the tail: unlock() reads segment 0 and one byte more.
    assert src._f.tell() == r.preamble.preamble_length + 40 + segment_size - 40 + 1
    got = []
    while r.next_tree() is not None:
        while batch := r.read_items(max_items=7):
            got.extend(batch)
    assert got == items
    assert src._f.tell() == len(data)


class NoDataYet:
    """A non-blocking source with only read(): None (no data yet) after `after` bytes."""

    def __init__(self, data: bytes, after: int) -> None:
        self._f = io.BytesIO(data)
        self.after = after

    def read(self, n: int) -> bytes | None:
        if self._f.tell() >= self.after:
            return None
        return self._f.read(min(n, self.after - self._f.tell()))


@pytest.mark.parametrize("after", [0, 10, 5000, 20_000])
def test_a_source_with_no_data_yet_is_an_io_error_in_both_cores(after: int) -> None:
    """None from read() or readinto() is a non-blocking file's "no data yet", not the end of the
    backup: both cores say so with a BackupIOError (the pure core read it as the end, the Rust
    core raised TypeError)."""
    data = _backup()
    messages = set()
    for name in ("rust", "pure"):
        c = load_core(name)
        with pytest.raises(BackupIOError) as info:
            r = c.BackupReader(NoDataYet(data, after))
            r.unlock(KEY)
            while r.next_tree() is not None:
                while r.read_items():
                    pass
        messages.add(str(info.value))
    assert messages == {
        "the source returned None (a non-blocking file with no data yet): read backups from a blocking file"
    }
