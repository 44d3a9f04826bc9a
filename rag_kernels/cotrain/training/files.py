"""Files in the output directory, written without following symlinks; the run lock.

* :func:`atomic_write` writes ``<dir>/<name>`` through a fresh temp file in the same
  directory (``tempfile.mkstemp``: ``O_CREAT|O_EXCL|O_NOFOLLOW``, a unique name, mode
  ``0644`` minus the umask), flushes and fsyncs it, then ``os.replace``\\ s it over the final
  name. A symlink planted at the final name is replaced (``rename`` replaces the link
  itself), never followed; a crash leaves the previous file intact.
* :func:`append_line` appends to a log opened with ``O_APPEND|O_NOFOLLOW``;
  :func:`read_bytes` reads with ``O_NOFOLLOW``: a symlink there is an error
  (:class:`~rag_kernels.cotrain.errors.UserError`), not something to read through.
* :class:`RunLock`: ``fcntl.flock`` on ``<output-dir>/.lock`` (opened with ``O_NOFOLLOW``)
  for the duration of a run, so two runs never interleave in one directory; a second run
  fails at once naming the lock file and the holder's pid. The kernel drops the lock when
  the holder exits, even on ``kill -9``: a leftover ``.lock`` file is harmless. A run that
  fails before writing anything into a directory it created removes the directory again.

Stdlib only (the CLI takes the lock before anything heavy is imported).
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable

from ..errors import UserError, one_line

__all__ = [
    "LOCK_NAME",
    "RunLock",
    "append_line",
    "atomic_write",
    "ensure_dir",
    "read_bytes",
    "remove_file",
]

LOCK_NAME = ".lock"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_umask: int | None = None


def _file_mode() -> int:
    global _umask
    if _umask is None:  # read once (os.umask can only be read by setting it)
        _umask = os.umask(0o022)
        os.umask(_umask)
    return 0o666 & ~_umask


def _describe(path: str, e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return f"{path}: is a symlink; refusing to follow it (remove it)"
    return f"{path}: {e.strerror or one_line(e)}"


def atomic_write(path: str, write: Callable, *, binary: bool = True) -> None:
    """Call ``write(fh)`` on a new temp file next to ``path``, then replace ``path`` by it."""
    directory, name = os.path.split(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or one_line(e)}") from e
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def append_line(path: str, line: str) -> None:
    """Append ``line`` + newline to ``path`` (created if missing); a symlink is refused."""
    try:
        fd = os.open(
            path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | _CLOEXEC, _file_mode()
        )
    except OSError as e:
        raise UserError(_describe(path, e)) from e
    with os.fdopen(fd, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")


def read_bytes(path: str) -> bytes:
    """The content of ``path``; a symlink, a directory or an unreadable file is a UserError."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
    except OSError as e:
        raise UserError(_describe(path, e)) from e
    try:  # fdopen itself raises on a directory (its error names the fd) and leaves fd open
        fh = os.fdopen(fd, "rb")
    except OSError as e:
        os.close(fd)
        what = "is a directory" if isinstance(e, IsADirectoryError) else e.strerror or one_line(e)
        raise UserError(f"{path}: {what}") from e
    with fh:
        try:
            return fh.read()
        except OSError as e:
            raise UserError(_describe(path, e)) from e


def remove_file(path: str) -> None:
    """Remove ``path`` if it exists (a symlink is removed itself, not its target)."""
    if os.path.lexists(path):
        os.unlink(path)


def ensure_dir(path: str, what: str = "--output-dir") -> None:
    """Create the directory ``path`` (and parents); a clear UserError if it cannot be."""
    try:
        os.makedirs(path, exist_ok=True)
    except FileExistsError as e:
        raise UserError(f"{what} {path}: exists and is not a directory") from e
    except OSError as e:
        raise UserError(f"{what} {path}: cannot create it: {e.strerror or one_line(e)}") from e
    if not os.path.isdir(path):
        raise UserError(f"{what} {path}: not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path}: not writable")


def _first_missing(path: str) -> str | None:
    """The topmost directory of ``path`` (absolute) that does not exist, or None."""
    path, top = os.path.abspath(path), None
    while not os.path.lexists(path):
        top, parent = path, os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return top


class RunLock:
    """An exclusive ``flock`` on ``<directory>/.lock`` held while a run writes there.

    ``acquire()`` never waits: if another process holds the lock it raises a UserError naming
    the lock file and the holder's pid. Usable as a context manager."""

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, LOCK_NAME)
        self._fd: int | None = None
        self._created: str | None = None  # the topmost directory acquire() created

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        import fcntl

        if self._fd is not None:
            return self
        created = _first_missing(self.directory)
        ensure_dir(self.directory)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o644)
        except OSError as e:
            raise UserError(_describe(self.path, e)) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = ""
            try:
                holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            except OSError:
                pass
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = f"pid {holder}" if holder.isdigit() else "another process"
                raise UserError(
                    f"{self.directory} is in use by another run: the lock file {self.path} is "
                    f"held by {who}; wait for it to finish or pick another --output-dir"
                ) from None
            raise UserError(f"{self.path}: cannot lock: {e.strerror or one_line(e)}") from e
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        self._created = created
        return self

    def release(self, discard_unused: bool = False) -> None:
        """Unlock. ``discard_unused`` (a run that failed): when ``acquire`` created the
        directory and it still holds nothing but the lock file, remove both (and the parents
        ``acquire`` created, while empty), so a failed first attempt leaves nothing behind."""
        if self._fd is None:
            return
        import fcntl

        fd, self._fd = self._fd, None
        try:
            if not (discard_unused and self._discard()):
                os.ftruncate(fd, 0)  # no stale pid; the file stays (unlinking it would race)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _discard(self) -> bool:
        """Remove the lock file and the directories acquire() created, while still locked (a
        run that opened the old lock file meanwhile finds it held and stops; one that comes
        later creates them anew). False, removing nothing, when something else is there."""
        top = self._created
        try:
            if top is None or os.listdir(self.directory) != [LOCK_NAME]:
                return False
            os.unlink(self.path)
            d = os.path.abspath(self.directory)
            while True:
                os.rmdir(d)  # fails on a directory that is not empty: it stays
                if d == top:
                    return True
                d = os.path.dirname(d)
        except OSError:
            return not os.path.lexists(self.path)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        try:
            self.release()
        except Exception:
            pass
