"""Progress reports of EncryptedBackupManager's create_backup / restore_backup / verify_backup
(their keyword-only `progress=` callback)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass
from typing import IO, Any, TypeVar

from .errors import ArgumentTypeError

__all__ = ["ProgressEvent", "ProgressCallback", "PHASES"]

T = TypeVar("T")
S = TypeVar("S", bound=Sized)

# backup: records read from the database and written; verify: an authenticated pass over a file;
# safety: the safety backup before a restore; restore: records applied; check: reading back after it.
PHASES = ("backup", "verify", "safety", "restore", "check")


@dataclass(frozen=True)
class ProgressEvent:
    """One progress report. Each phase starts with an event of items = bytes = 0 and ends with one
    of done=True; in between, events come at most every 50 ms. Phases come one after the other, on
    the thread that called the operation (a pass in a thread beside another reports through it).

    items: records processed so far in this phase (0 where a phase does not count them);
    bytes: bytes of the backup file written ("backup") or read (the other phases);
    total_items / total_bytes: what the phase will reach, or None where it is not known in advance.
    """

    phase: str
    items: int
    total_items: int | None
    bytes: int
    total_bytes: int | None
    done: bool = False


ProgressCallback = Callable[[ProgressEvent], None]


class Meter:
    """Feeds a ProgressCallback, throttled. Without a callback every method is a cheap no-op."""

    INTERVAL = 0.05
    _BATCH = 1024

    def __init__(self, callback: ProgressCallback | None) -> None:
        if callback is not None and not callable(callback):
            raise ArgumentTypeError(f"progress must be a callable or None, not {type(callback).__name__}")
        self._callback = callback
        self.phase = ""
        self.items = 0
        self.bytes = 0
        self.total_items: int | None = None
        self.total_bytes: int | None = None
        self._items_fn: Callable[[], int] | None = None
        self._last = 0.0
        # A pass in another thread reporting through this meter (beside()), and with `first` the
        # first event of this meter's phase, held back until that pass has reported.
        self._side: Beside | None = None
        self._held: ProgressEvent | None = None

    @property
    def active(self) -> bool:
        return self._callback is not None

    def begin(
        self,
        phase: str,
        total_items: int | None = None,
        items_fn: Callable[[], int] | None = None,
        source: IO[bytes] | None = None,
    ) -> None:
        """Starts a phase; `source`: the backup file the phase reads (its size is total_bytes)."""
        if self._callback is None:
            return
        self.phase, self.items, self.bytes = phase, 0, 0
        self.total_items, self.total_bytes, self._items_fn = total_items, None, items_fn
        if source is not None:
            try:
                self.total_bytes = os.fstat(source.fileno()).st_size - source.tell()
            except (OSError, AttributeError, ValueError):
                pass
        self._emit(False)

    def end(self) -> None:
        if self._callback is None or not self.phase:
            return
        self._emit(True)
        self.phase = ""

    def tick(self) -> None:
        now = time.monotonic()
        if now - self._last >= self.INTERVAL:
            self._emit(False, now)

    def _emit(self, done: bool, now: float | None = None) -> None:
        assert self._callback is not None
        self._last = time.monotonic() if now is None else now
        if self._items_fn is not None:
            self.items = self._items_fn()
        event = ProgressEvent(self.phase, self.items, self.total_items, self.bytes, self.total_bytes, done)
        side = self._side
        if side is not None and side.first:
            if not done and not side.over.is_set():
                side.flush(self._callback)  # the pass beside reports first; this phase waits
                if self._held is None:
                    self._held = event
                return
            self.relay()  # then this phase's first event, and where it is now
        self._callback(event)

    def beside(self, first: bool) -> Beside:
        """A pass that runs in another thread (Beside.run) and reports through this meter, so the
        callback hears every phase in order and on the calling thread only. `first`: the pass's
        phases come before this meter's current one (verify_before_restore beside the restore),
        whose events are held back until the pass ends; otherwise they come after it, from
        relay()."""
        side = Beside(self._callback is not None, first)
        if self._callback is not None:
            self._side = side
        return side

    def relay(self) -> None:
        """Waits for the pass beside() to end, passing its events on as they come; then this meter
        reports on its own again."""
        side, self._side = self._side, None
        if side is None:
            return
        assert self._callback is not None
        while not side.over.wait(self.INTERVAL):
            side.flush(self._callback)
        side.flush(self._callback)
        held, self._held = self._held, None
        if held is not None:
            self._callback(held)

    def count(self, items: Iterable[T]) -> Iterable[T]:
        """Passes `items` through, counting them."""
        if self._callback is None:
            return items
        return self._count(items)

    def _count(self, items: Iterable[T]) -> Iterator[T]:
        n = 0
        for item in items:
            yield item
            n += 1
            if n == self._BATCH:
                self.items += n
                n = 0
                self.tick()
        self.items += n

    def count_batches(self, batches: Iterable[S]) -> Iterator[S]:
        """Passes batches (sequences) of items through, counting their items."""
        for batch in batches:
            yield batch
            self.add_items(len(batch))

    def add_items(self, n: int) -> None:
        if self._callback is not None:
            self.items += n
            self.tick()

    def reading(self, f: Any, phase: str | None = None) -> Any:
        """`f` with the bytes read from it counted (a MeteredFile); with `phase`, that phase begins
        (total_bytes: the rest of the file). Without a callback, `f` itself."""
        if self._callback is None:
            return f
        if phase is not None:
            self.begin(phase, source=f)
        return MeteredFile(f, self)

    def writing(self, f: IO[bytes]) -> Any:
        """`f` with the bytes written to it counted."""
        if self._callback is None:
            return f
        return _CountingWriter(f, self)


class _CountingWriter:
    def __init__(self, f: IO[bytes], meter: Meter) -> None:
        self._f = f
        self._meter = meter

    def write(self, data: Any) -> int:
        n = self._f.write(data)
        self._meter.bytes += len(memoryview(data).cast("B")) if n is None else n
        return n if n is not None else 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


class Beside:
    """A pass in another thread whose progress goes through the Meter that made it (Meter.beside):
    `meter` counts the pass; its events wait here until that Meter passes them on. Every phase's
    first and last event is kept; of those in between, the newest."""

    def __init__(self, active: bool, first: bool) -> None:
        self.first = first
        self.over = threading.Event()
        self._lock = threading.Lock()
        self._due: list[ProgressEvent] = []
        self._latest: ProgressEvent | None = None
        self.meter = Meter(self._record if active else None)

    def _record(self, event: ProgressEvent) -> None:
        with self._lock:
            if event.done or (event.items == 0 and event.bytes == 0):
                self._due.append(event)
                self._latest = None
            else:
                self._latest = event

    def run(self, call: Callable[[], T]) -> T:
        """call(), the pass, in its thread; the pass is over when it returns or raises."""
        try:
            return call()
        finally:
            self.over.set()

    def flush(self, callback: ProgressCallback) -> None:
        with self._lock:
            events = self._due if self._latest is None else [*self._due, self._latest]
            self._due, self._latest = [], None
        for event in events:
            callback(event)


class MeteredFile:
    """A file being read for a phase of `meter`."""

    def __init__(self, f: IO[bytes], meter: Meter) -> None:
        self._f = f
        self.meter = meter

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.meter.bytes += len(data)
        self.meter.tick()
        return data

    def readinto(self, buffer: Any) -> int | None:
        n: int | None = self._f.readinto(buffer)  # type: ignore[attr-defined]
        self.meter.bytes += n or 0
        self.meter.tick()
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)
