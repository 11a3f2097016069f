"""AtomicFile's write-behind: background fdatasync while the backup is written and verified."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest
from datafold import EncryptedBackupManager, MasterKeyPair, atomic
from datafold.errors import BackupIOError
from datafold.stores import DbOperations


def test_syncs_run_in_the_background_while_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(atomic, "WRITE_BEHIND_BYTES", 1 << 16)
    synced: list[str] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        synced.append(threading.current_thread().name)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    with atomic.AtomicFile(str(tmp_path / "f")) as out:
        for _ in range(8):
            out.sink.write(b"x" * (1 << 16))
        out.start_sync()
        out.commit()
    assert (tmp_path / "f").read_bytes() == b"x" * (8 << 16)
    assert synced and set(synced) == {"datafold-write-behind"}


@pytest.mark.parametrize("core", ["rust", "pure"])
def test_a_failed_background_sync_fails_the_backup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, core: str) -> None:
    """fsync errors are reported once: one lost in the background must not let a later fsync pass."""
    db = DbOperations.open(tmp_path / "db")
    db.put_many("t", [(b"k%04d" % i, os.urandom(100)) for i in range(1000)])

    def fdatasync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    target = tmp_path / "b.dfb"
    with pytest.raises(BackupIOError, match="Input/output error"):
        EncryptedBackupManager(db, MasterKeyPair.generate(), core=core).create_backup(str(target))
    assert not target.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(atomic.TEMP_SUFFIX)]
    assert not [t for t in threading.enumerate() if t.name == "datafold-write-behind"]
    db.close()


def test_discard_stops_the_syncer(tmp_path: Path) -> None:
    out = atomic.AtomicFile(str(tmp_path / "f"))
    out.sink.write(b"data")
    out.start_sync()
    out.discard()
    assert not (tmp_path / "f").exists()
    assert not [t for t in threading.enumerate() if t.name == "datafold-write-behind"]


@pytest.mark.parametrize("core", ["rust", "pure"])
def test_read_back_beside_a_failing_writer_ends_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, core: str
) -> None:
    """The read-back check runs in a thread while the file is written; a writer that fails leaves
    neither a file nor that thread behind."""
    from datafold import progress
    from datafold.errors import StoreError

    db = DbOperations.open(tmp_path / "db")
    db.put_many("t", [(b"k%05d" % i, os.urandom(200)) for i in range(20_000)])

    def failing(self: object, batches: object) -> object:
        for n, batch in enumerate(batches):  # type: ignore[attr-defined]
            if n == 2:
                raise StoreError("simulated failure while reading the database")
            yield batch

    monkeypatch.setattr(progress.Meter, "count_batches", failing)
    target = tmp_path / "b.dfb"
    with pytest.raises(StoreError, match="simulated"):
        EncryptedBackupManager(db, MasterKeyPair.generate(), core=core).create_backup(str(target))
    assert not target.exists()
    assert not [t for t in threading.enumerate() if t.name in ("datafold-read-back", "datafold-write-behind")]
    db.close()


@pytest.mark.parametrize("threads", [0, 1, 2])
def test_the_read_back_runs_beside_the_writer_with_all_cores_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    """A given number of threads bounds those that seal or open segments at once: the read-back
    check then runs after the writer."""
    from datafold import manager
    from datafold.options import BackupOptions

    started: list[str] = []

    class Spy(manager._Background):
        def __init__(self, call: object, name: str) -> None:
            started.append(name)
            super().__init__(call, name)  # type: ignore[arg-type]

    monkeypatch.setattr(manager, "_Background", Spy)
    db = DbOperations.open(tmp_path / "db")
    db.put_many("t", [(b"k%05d" % i, os.urandom(200)) for i in range(5_000)])
    keys = MasterKeyPair.generate()
    EncryptedBackupManager(db, keys, core="rust").create_backup(str(tmp_path / "b.dfb"), BackupOptions(threads=threads))
    assert started == (["datafold-read-back"] if threads == 0 else [])
    assert EncryptedBackupManager(db, keys).verify_backup(tmp_path / "b.dfb").total_items == 5_000
    db.close()


def test_growing_file_reads_what_is_written_as_it_is_written(tmp_path: Path) -> None:
    out = atomic.AtomicFile(str(tmp_path / "f"))
    reader = out.growing()
    got: list[bytes] = []
    thread = threading.Thread(target=lambda: got.extend(iter(lambda: reader.read(3), b"")))
    thread.start()
    for chunk in (b"ab", b"cdefg", b"h"):
        out.sink.write(chunk)
    out.writing_over()
    thread.join()
    assert b"".join(got) == b"abcdefgh" and reader.tell() == 8
    buffer = bytearray(4)
    again = out.growing()
    assert again.readinto(buffer) == 4 and buffer == b"abcd"
    out.discard()


def test_growing_file_releases_its_views_of_the_buffer_even_if_its_frame_is_kept(tmp_path: Path) -> None:
    """A traceback kept past the call (an unraisable-exception hook's, say) keeps readinto()'s frame
    and its locals: its views of the buffer must be released by then, or the core's reader, which
    checks that no view outlives the call, fails the read-back."""
    import sys

    out = atomic.AtomicFile(str(tmp_path / "f"))
    out.sink.write(b"abcdefgh")
    out.writing_over()
    frames: list[object] = []

    def keep(frame: object, event: str, arg: object) -> None:
        if getattr(frame, "f_code", None) is atomic.GrowingFile.readinto.__code__:
            frames.append(frame)

    buffer = bytearray(4)
    lent = memoryview(buffer)
    sys.settrace(keep)  # type: ignore[arg-type]
    try:
        n = out.growing().readinto(lent)
    finally:
        sys.settrace(None)
    assert frames and n == 4 and buffer == b"abcd"
    lent.release()  # as the core does after the call
    buffer.append(0)  # a bytearray cannot resize while any view of it is alive
    out.discard()


@pytest.mark.parametrize("unnamed", [True, False])
def test_commit_without_replace_links_a_new_file_or_leaves_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unnamed: bool
) -> None:
    """commit(replace=False): the file appears at a free path; at a taken one it is a
    FileExistsError, the file there stays as it was and no temporary file is left (O_TMPFILE or
    the named fallback)."""
    if not unnamed:
        monkeypatch.setattr(atomic.AtomicFile, "_open_unnamed", lambda self: None)
    path = tmp_path / "key.pem"
    with atomic.AtomicFile(str(path), "key file") as out:
        out.file.write(b"first")
        out.commit(replace=False)
    assert path.read_bytes() == b"first"
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    with atomic.AtomicFile(str(path), "key file") as out:
        out.file.write(b"second")
        with pytest.raises(FileExistsError):
            out.commit(replace=False)
    assert path.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["key.pem"]
    with pytest.raises(BackupIOError, match="cannot write key file to"):
        atomic.AtomicFile(str(tmp_path), "key file")


@pytest.mark.parametrize("replace", [False, True])
def test_a_failure_after_linking_a_new_file_removes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, replace: bool
) -> None:
    """The directory's fsync fails after the new file was linked where none was: the error means
    nothing was written, so the file is gone again."""
    calls = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:  # the file's fsync, then the directory's
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = tmp_path / "new.pem"
    with atomic.AtomicFile(str(path), "key file") as out:
        out.file.write(b"data")
        with pytest.raises(BackupIOError, match="cannot write key file to .*Input/output error"):
            out.commit(replace=replace)
    assert list(tmp_path.iterdir()) == []


def test_without_hard_links_a_new_file_is_renamed_to_a_free_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the filesystem has neither O_TMPFILE nor hard links (FAT), commit(replace=False)
    renames the temporary file to the path if that is free, and refuses a taken one."""
    monkeypatch.setattr(atomic.AtomicFile, "_open_unnamed", lambda self: None)

    def no_links(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    path = tmp_path / "key.pem"
    for data in (b"first", b"second"):
        with atomic.AtomicFile(str(path), "key file") as out:
            out.file.write(data)
            if data == b"first":
                out.commit(replace=False)
            else:
                with pytest.raises(FileExistsError):
                    out.commit(replace=False)
    assert path.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["key.pem"]


def test_follow_symlinks_false_replaces_the_link_itself(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere" / "target"
    target.parent.mkdir()
    target.write_bytes(b"keep me")
    link = tmp_path / "key.pem"
    link.symlink_to(target)
    with atomic.AtomicFile(str(link), "key file", follow_symlinks=False) as out:
        out.file.write(b"new key")
        out.commit()
    assert not link.is_symlink() and link.read_bytes() == b"new key"
    assert target.read_bytes() == b"keep me"
    dangling = tmp_path / "dangling.pem"
    dangling.symlink_to(tmp_path / "elsewhere" / "missing")
    with atomic.AtomicFile(str(dangling), "key file", follow_symlinks=False) as out:
        out.file.write(b"new key")
        out.commit()
    assert not dangling.is_symlink() and not (tmp_path / "elsewhere" / "missing").exists()
