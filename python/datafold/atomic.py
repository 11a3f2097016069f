"""A file that appears at its path complete or not at all.

Linux: the data goes to an unnamed O_TMPFILE inode in the destination directory, so a crash or
SIGKILL at any point before `commit()` leaves nothing behind; `commit()` fsyncs, links it under a
temporary name and renames it into place, then fsyncs the directory. Where O_TMPFILE is not
supported it falls back to a named hidden temporary file that is removed on any failure.
"""

from __future__ import annotations

import errno
import os
import tempfile
import uuid
from types import TracebackType
from typing import IO

from .errors import BackupIOError

__all__ = ["AtomicFile", "TEMP_SUFFIX"]

TEMP_SUFFIX = ".dfb-tmp"


class AtomicFile:
    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        directory = os.path.dirname(self.path)
        if os.path.isdir(self.path) or path.endswith((os.sep, "/")):
            raise BackupIOError(f"cannot write backup to {path}: it is a directory; give a file path")
        if not os.path.isdir(directory):
            raise BackupIOError(f"cannot write backup to {path}: directory {directory} does not exist; create it first")
        self._dir = directory
        self._temp_name: str | None = None
        try:
            fd = self._open_unnamed()
            if fd is None:
                # The temporary name does not repeat the final one, so a final name near NAME_MAX
                # still fits.
                fd, self._temp_name = tempfile.mkstemp(dir=directory, prefix=".", suffix=TEMP_SUFFIX)
        except OSError as e:
            raise BackupIOError(f"cannot write backup to {path}: {e.strerror or e}") from e
        self.file: IO[bytes] = os.fdopen(fd, "w+b")
        self._done = False

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

    def commit(self) -> None:
        """Makes the file durable and puts it at its path (replacing an older file there)."""
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            if self._temp_name is None:
                self._temp_name = os.path.join(self._dir, f".{uuid.uuid4().hex}{TEMP_SUFFIX}")
                # linkat(AT_SYMLINK_FOLLOW) through /proc gives the unnamed inode a name; Python only
                # calls linkat (not link) when a dir_fd is given.
                proc_fd = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.link(str(self.file.fileno()), self._temp_name, src_dir_fd=proc_fd, follow_symlinks=True)
                finally:
                    os.close(proc_fd)
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
            raise BackupIOError(f"cannot write backup to {self.path}: {e.strerror or e}") from e

    def discard(self) -> None:
        """Drops the file. Never raises: it runs while another error is on its way out (closing
        flushes the buffer, which fails again on a full disk)."""
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
