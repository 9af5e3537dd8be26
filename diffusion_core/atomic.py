"""The one atomic file write of the project (library checkpoints and pipeline outputs alike).

:func:`atomic_path` yields a temporary sibling of the target; when the block succeeds the
temporary file is flushed to disk (``fsync``), given the permissions ``open()`` would give a new
file (``0o666`` less the process umask; ``mkstemp`` makes ``0o600`` files, unreadable to the
other users of a shared file system) and renamed over the target with ``os.replace`` (atomic on
POSIX), then the folder is ``fsync``-ed. If anything fails (an exception, a full disk, an
interrupt) the temporary file is removed and an existing file at the target is left untouched.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_path", "atomic_write", "file_mode", "write_bytes"]


def file_mode() -> int:
    """The mode ``open()`` gives a new file: ``0o666`` less the current umask."""
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; write it, and on success it replaces ``path``
    (fsync-ed, with the umask's permissions). On failure ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, file_mode())
        _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(f)`` on a binary file that atomically becomes ``path``; returns ``path``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Atomically write ``data`` to ``path``."""
    return atomic_write(path, lambda f: f.write(data))
