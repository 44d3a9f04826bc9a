"""Replacing a directory of the output directory as a whole (``best/`` of ``--eval-every``).

:func:`replace_dir` fills a fresh temp directory next to the final one (every file written
with :func:`~.files.atomic_write`: fsynced), then swaps it in with one atomic
``renameat2(RENAME_EXCHANGE)`` (Linux), so a reader or a crash sees either the old directory
or the new one, complete, never a mix. Where the exchange is not available, the old
directory is renamed aside first and the new one renamed in (a crash between the two
renames leaves the previous version as ``.<name>.*.old``). A symlink or a file planted at the
final name is removed, never followed.

Stdlib only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import tempfile
from collections.abc import Callable

from ..errors import UserError, one_line

__all__ = ["replace_dir"]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_libc = None


def _exchange(a: str, b: str) -> bool:
    """Atomically swap the paths ``a`` and ``b`` (both exist); False where unsupported."""
    global _libc
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return False
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = _libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_dir(path: str, fill: Callable[[str], None]) -> None:
    """Make ``path`` a directory holding what ``fill(tmp_dir)`` writes into a fresh
    ``tmp_dir``, replacing any previous ``path`` atomically (module docstring)."""
    parent, name = os.path.split(os.path.abspath(path))
    try:
        tmp = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or one_line(e)}") from e
    try:
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        fill(tmp)
        _fsync_dir(tmp)
        if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
            os.unlink(path)  # planted: replaced, not followed
        if os.path.isdir(path):
            if _exchange(tmp, path):
                shutil.rmtree(tmp, ignore_errors=True)  # now the previous version
            else:
                old = tmp[: -len(".tmp")] + ".old"
                os.rename(path, old)
                os.rename(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
