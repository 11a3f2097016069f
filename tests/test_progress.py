"""Progress reports: every phase in order, each starting at zero and ending with done=True, all on
the calling thread, also when a pass runs beside another (Meter.beside)."""

from __future__ import annotations

import sys
import threading
from typing import Any

import pytest
from datafold import BackupOptions, ProgressEvent, RestoreOptions
from datafold import manager as manager_module
from datafold.progress import Meter
from helpers import Env, backend, core_name, env, fill, sample_data, text_items  # noqa: F401 - fixtures


def phases(events: list[ProgressEvent]) -> list[str]:
    """The phases in order, checking that each is one run of events from 0 to its done event."""
    runs: list[list[ProgressEvent]] = []
    for event in events:
        if runs and runs[-1][-1].phase == event.phase and not runs[-1][-1].done:
            runs[-1].append(event)
        else:
            runs.append([event])
    for run in runs:
        assert (run[0].items, run[0].bytes, run[0].done) == (0, 0, False), run[0]
        assert run[-1].done and not any(e.done for e in run[:-1]), run
        assert all(e.items <= (e.total_items or e.items) and e.bytes <= (e.total_bytes or e.bytes) for e in run)
    return [run[0].phase for run in runs]


class Recorder:
    def __init__(self) -> None:
        self.events: list[ProgressEvent] = []
        self.threads: set[int] = set()

    def __call__(self, event: ProgressEvent) -> None:
        self.events.append(event)
        self.threads.add(threading.get_ident())

    def take(self) -> list[ProgressEvent]:
        events, self.events = self.events, []
        return events


def test_a_pass_beside_that_reports_first_holds_the_phase_back() -> None:
    recorder = Recorder()
    meter = Meter(recorder)
    side = meter.beside(first=True)
    side.meter.begin("verify", 7)
    release = threading.Event()

    def verify() -> None:
        release.wait()
        side.meter.add_items(7)
        side.meter.end()

    thread = threading.Thread(target=side.run, args=(verify,))
    thread.start()
    meter.begin("restore", 10)
    meter.add_items(4)
    assert [(e.phase, e.done) for e in recorder.events] == [("verify", False)]  # restore waits
    release.set()
    thread.join()
    meter.add_items(6)
    meter.end()
    events = recorder.take()
    assert phases(events) == ["verify", "restore"]
    assert [(e.phase, e.items, e.done) for e in events if e.done] == [("verify", 7, True), ("restore", 10, True)]
    assert recorder.threads == {threading.get_ident()}


def test_a_phase_that_begins_after_the_pass_beside_ended_reports_whole() -> None:
    recorder = Recorder()
    meter = Meter(recorder)
    side = meter.beside(first=True)
    side.run(lambda: (side.meter.begin("verify"), side.meter.end()))
    meter.begin("restore", 2)
    meter.add_items(2)
    meter.end()
    assert phases(recorder.take()) == ["verify", "restore"]


def test_a_pass_beside_that_reports_after_waits_for_relay() -> None:
    recorder = Recorder()
    meter = Meter(recorder)
    meter.begin("backup", 3)
    side = meter.beside(first=False)
    side.meter.begin("verify")
    meter.add_items(3)
    meter.end()
    assert phases(recorder.events) == ["backup"]
    thread = threading.Thread(target=side.run, args=(side.meter.end,))
    thread.start()
    meter.relay()
    thread.join()
    assert phases(recorder.take()) == ["backup", "verify"]
    # With no callback nothing is counted or held, and relay() has nothing to wait for.
    quiet = Meter(None)
    side = quiet.beside(first=True)
    assert not side.meter.active
    quiet.begin("restore")
    quiet.relay()


@pytest.mark.parametrize("threads", [0, 1])
def test_progress_comes_in_phase_order_from_the_calling_thread(
    env: Env,  # noqa: F811 - the fixture
    monkeypatch: pytest.MonkeyPatch,
    threads: int,
) -> None:
    """With the default threads=0 the read-back check runs beside the writer and, with the Rust
    core into an empty database, the verify pass beside the restore (staged into LMDB); the
    callback hears the same phases either way."""
    passes: list[str] = []

    class Spy(manager_module._Background):
        def __init__(self, call: Any, name: str) -> None:
            passes.append(name)
            super().__init__(call, name)

    monkeypatch.setattr(manager_module, "_Background", Spy)
    source = env.open_db("source")
    fill(source, sample_data())
    source.put_many("text", text_items(30_000))
    total = sum(source.count(t) for t in source.tree_names())
    path = env.backup_path()
    recorder = Recorder()

    env.manager_for(source).create_backup(path, BackupOptions(threads=threads), progress=recorder)
    events = recorder.take()
    assert phases(events) == ["backup", "verify"]
    assert events[-1].items == total and events[-1].bytes == events[-1].total_bytes == path.stat().st_size
    assert passes == (["datafold-read-back"] if threads == 0 else [])

    passes.clear()
    stats = env.manager.restore_backup(path, RestoreOptions(threads=threads), progress=recorder)
    events = recorder.take()
    assert phases(events) == ["verify", "restore", "check"]
    assert [e.items for e in events if e.done] == [total, total, total] == [stats.items_restored] * 3
    # (Beside a write that is not staged the pass starts too, and the write waits for it.)
    assert passes == (["datafold-verify"] if threads == 0 and env.core == "rust" else [])
    assert recorder.threads == {threading.get_ident()}


def test_a_callback_that_raises_after_the_commit_says_so(
    env: Env,  # noqa: F811 - the fixture
) -> None:
    source = env.open_db("source")
    fill(source, sample_data())
    path = env.backup_path()
    env.manager_for(source).create_backup(path)

    def stop_at_check(event: ProgressEvent) -> None:
        if event.phase == "check":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as info:
        env.manager.restore_backup(path, progress=stop_at_check)
    # A staged restore (Rust core, empty LMDB) checks before its new file replaces data.mdb.
    staged = env.core == "rust" and env.backend == "lmdb"
    assert env.db.count("users") == (0 if staged else source.count("users"))
    notes = ["datafold: the restore was already committed when this was raised"]
    assert getattr(info.value, "__notes__", []) == ([] if staged or sys.version_info < (3, 11) else notes)
