"""A file that appears at its path complete or not at all.

Linux: the data goes to an unnamed O_TMPFILE inode in the destination directory, so a crash or
SIGKILL at any point before `commit()` leaves nothing behind; `commit()` fsyncs, links it at its
path when no file is there (the link is atomic and replaces nothing), else under a temporary name
that it renames over the old file (or, with `replace=False`, fails: a key file is never replaced
unasked), then fsyncs the directory. Where O_TMPFILE is not supported it falls back to a named
hidden temporary file that is removed on any failure (a crash leaves it: `*.dfb-tmp`). A path that
is a symlink is written through (its target is replaced, the link stays) unless
follow_symlinks=False; a device, pipe or socket there is refused, since a rename would replace it
with a file.

Write-behind: data written through `sink` is fdatasync()ed by a background thread every
WRITE_BEHIND_BYTES, and `start_sync()` syncs the rest while the caller goes on (verifying the file
from the page cache), so the disk works while the CPU does. `growing()` gives a reader of the file
as it is written (the read-back check runs beside the writer). `commit()` waits for that thread, fails
if any of its syncs failed (a failed fsync is reported once: a later one may succeed without the
data being on disk), and fsyncs once more.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
import threading
import uuid
from types import TracebackType
from typing import IO, Any

from .errors import BackupIOError

__all__ = ["AtomicFile", "GrowingFile", "TEMP_SUFFIX"]

TEMP_SUFFIX = ".dfb-tmp"
WRITE_BEHIND_BYTES = 32 << 20


class _Syncer:
    """fdatasync()s a file descriptor in a background thread on request (the GIL is released
    while it waits for the disk). The first error stops it and is kept for commit()."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._cond = threading.Condition()
        self._unsynced = 0
        self._requested = False
        self._stopping = False
        self.error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name="datafold-write-behind", daemon=True)
        self._thread.start()

    def wrote(self, n: int) -> None:
        with self._cond:
            self._unsynced += n
            if self._unsynced >= WRITE_BEHIND_BYTES:
                self._request()

    def _request(self) -> None:
        self._unsynced = 0
        self._requested = True
        self._cond.notify()

    def sync_all(self) -> None:
        """Sync everything written so far (in the background)."""
        with self._cond:
            self._request()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._requested or self._stopping):
                    self._cond.wait()
                if not self._requested:
                    return
                self._requested = False
            try:
                os.fdatasync(self._fd)
            except OSError as e:
                self.error = e
                return

    def stop(self) -> OSError | None:
        """Waits for a sync under way (and one requested) to finish; the first error, if any."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()
        return self.error


class _Sink:
    """The file for the backup writer: writes go on to the file (flushed, so a GrowingFile reader
    sees them at once) and count towards write-behind."""

    def __init__(self, f: IO[bytes], owner: AtomicFile) -> None:
        self._f = f
        self._owner = owner

    def write(self, data: Any) -> int:
        n = self._f.write(data)
        self._f.flush()
        self._owner._wrote(n)
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


class GrowingFile:
    """The AtomicFile as far as it is written, for a reader in another thread (the read-back check
    running beside the writer). read() and readinto() wait until the bytes they ask for are
    written, or the writing is over (then they return what there is), so the reader sees an
    ordinary file. Reads go to the descriptor at their own offset (pread), not through `file`."""

    def __init__(self, owner: AtomicFile) -> None:
        self._owner = owner
        self._offset = 0

    def _available(self, want: int) -> int:
        owner = self._owner
        with owner._cond:
            while not owner._writing_over and owner._written < self._offset + want:
                owner._cond.wait()
            return max(0, min(want, owner._written - self._offset))

    def readinto(self, buffer: Any) -> int:
        # The views are released on the way out even if something keeps this frame alive (a
        # traceback an unraisable-exception hook stored, say): the core's reader refuses a source
        # that still holds a view of its buffer after readinto() returns.
        with memoryview(buffer) as whole, whole.cast("B") as view:
            n = self._available(len(view))
            if n == 0:
                return 0
            with view[:n] as part:
                got = os.preadv(self._owner.file.fileno(), [part], self._offset)
        self._offset += got
        return got

    def tell(self) -> int:
        return self._offset

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = 1 << 62
        n = self._available(size)
        data = os.pread(self._owner.file.fileno(), n, self._offset) if n else b""
        self._offset += len(data)
        return data


class AtomicFile:
    """`what` names the file in error messages ("backup", "key file"). A path that is a symlink
    is written through (its target is replaced, the link stays), or with follow_symlinks=False
    replaced itself (key files: a link planted where a key is written cannot redirect it)."""

    def __init__(self, path: str, what: str = "backup", *, follow_symlinks: bool = True) -> None:
        self.path = os.path.realpath(path) if follow_symlinks else os.path.abspath(path)
        self._what = what
        directory = os.path.dirname(self.path)
        try:
            mode = (os.stat if follow_symlinks else os.lstat)(self.path).st_mode
        except OSError:
            mode = None  # no file there yet (or none that can be seen): the rename will tell
        if (mode is not None and stat.S_ISDIR(mode)) or path.endswith((os.sep, "/")):
            raise BackupIOError(f"cannot write {what} to {path}: it is a directory; give a file path")
        if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
            raise BackupIOError(
                f"cannot write {what} to {path}: it is not a regular file (a device, pipe or socket); give a file path"
            )
        if not os.path.isdir(directory):
            raise BackupIOError(f"cannot write {what} to {path}: directory {directory} does not exist; create it first")
        self._dir = directory
        self._temp_name: str | None = None
        try:
            fd = self._open_unnamed()
            if fd is None:
                # The temporary name does not repeat the final one, so a final name near NAME_MAX
                # still fits.
                fd, self._temp_name = tempfile.mkstemp(dir=directory, prefix=".", suffix=TEMP_SUFFIX)
        except OSError as e:
            raise BackupIOError(f"cannot write {what} to {path}: {e.strerror or e}") from e
        self.file: IO[bytes] = os.fdopen(fd, "w+b")
        self._syncer = _Syncer(fd)
        self._cond = threading.Condition()  # for GrowingFile readers
        self._written = 0
        self._writing_over = False
        self._done = False

    @property
    def sink(self) -> Any:
        """`file` for writing the backup through: what is written counts towards write-behind."""
        return _Sink(self.file, self)

    def _wrote(self, n: int) -> None:
        self._syncer.wrote(n)
        with self._cond:
            self._written += n
            self._cond.notify_all()

    def growing(self) -> GrowingFile:
        """A reader of what is written through `sink`, as it is written (see GrowingFile)."""
        return GrowingFile(self)

    def writing_over(self) -> None:
        """No more writes: GrowingFile readers get the rest and then the end of the file."""
        with self._cond:
            self._writing_over = True
            self._cond.notify_all()

    def start_sync(self) -> None:
        """Flush and start syncing what was written, in the background (commit() waits for it)."""
        self.file.flush()
        self._syncer.sync_all()

    def _open_unnamed(self) -> int | None:
        flag = getattr(os, "O_TMPFILE", None)
        if flag is None or not os.path.isdir("/proc/self/fd"):
            return None
        try:
            return os.open(self._dir, flag | os.O_RDWR, 0o600)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                return None
            raise

    def _link_unnamed(self, name: str) -> bool:
        """Gives the unnamed inode the name `name`: linkat(AT_SYMLINK_FOLLOW) through /proc (Python
        only calls linkat, not link, when a dir_fd is given). The link is atomic and never replaces
        a file: False if one is there. Straight at the final path, the file appears whole or not
        at all, with no temporary name in between that a crash could leave behind."""
        proc_fd = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.link(str(self.file.fileno()), name, src_dir_fd=proc_fd, follow_symlinks=True)
        except FileExistsError:
            return False
        finally:
            os.close(proc_fd)
        return True

    def commit(self, *, replace: bool = True) -> None:
        """Makes the file durable and puts it at its path, replacing an older file there; with
        replace=False a file there is a FileExistsError instead (the new one is dropped): the
        check and the link are one atomic step. A failure after the file was linked where none
        was (the directory's fsync) removes it again: an error means nothing was written."""
        taken = linked_new = False
        try:
            self.file.flush()
            error = self._syncer.stop()
            if error is not None:
                raise error
            os.fsync(self.file.fileno())
            if not replace:
                linked_new = self._link_new()
                taken = not linked_new
                if taken:
                    raise FileExistsError(errno.EEXIST, "a file is there", self.path)
            elif self._temp_name is None and self._link_unnamed(self.path):
                linked_new = True
            else:
                if self._temp_name is None:
                    # A file is at the path: name the inode beside it, then rename over it.
                    self._temp_name = os.path.join(self._dir, f".{uuid.uuid4().hex}{TEMP_SUFFIX}")
                    if not self._link_unnamed(self._temp_name):
                        raise FileExistsError(errno.EEXIST, "temporary name taken", self._temp_name)
                os.replace(self._temp_name, self.path)
                self._temp_name = None
            self.file.close()
            dir_fd = os.open(self._dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
            self._done = True
        except OSError as e:
            self.discard()
            if taken:
                raise
            if linked_new:
                try:
                    os.unlink(self.path)
                except OSError:
                    pass
            raise BackupIOError(f"cannot write {self._what} to {self.path}: {e.strerror or e}") from e

    def _link_new(self) -> bool:
        """Links the file at its path unless a file is there (False). The named fallback links
        the temporary file there and removes its name; on a filesystem without hard links (FAT)
        it renames it there after checking that the path is free (not atomic with the check)."""
        if self._temp_name is None:
            return self._link_unnamed(self.path)
        try:
            os.link(self._temp_name, self.path)
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
            if os.path.lexists(self.path):
                return False
            os.rename(self._temp_name, self.path)
            self._temp_name = None
            return True
        os.unlink(self._temp_name)
        self._temp_name = None
        return True

    def discard(self) -> None:
        """Drops the file. Never raises: it runs while another error is on its way out (closing
        flushes the buffer, which fails again on a full disk)."""
        self.writing_over()
        self._syncer.stop()  # before the descriptor closes under it
        if not self.file.closed:
            try:
                self.file.close()
            except OSError:
                pass
        if self._temp_name is not None:
            try:
                os.unlink(self._temp_name)
            except OSError:
                pass
            self._temp_name = None
        self._done = True

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._done:
            self.discard()
