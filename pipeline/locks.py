"""One training per checkpoint folder: a lock file holding the holder's PID and host.

Rank 0 creates ``<folder>.lock`` (next to the folder, so it never lands in the DVC-cached
output) with ``O_EXCL`` before training and removes it when training ends, however it ends. A
second training that finds the lock refuses to start with one line naming the holder. A lock
left by a process that no longer runs (``kill -9``) on this host is stale: it is replaced, with
a note. A lock from another host cannot be checked and is never broken silently.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from pipeline.errors import StageError


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def lock_path(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    return folder.with_name(folder.name + ".lock")


class FolderLock:
    """``FolderLock.acquire(folder)`` or a :class:`StageError`; ``release()`` when done."""

    def __init__(self, path: Path, record: dict[str, Any]) -> None:
        self.path = path
        self.record = record

    @classmethod
    def acquire(cls, folder: str | os.PathLike) -> FolderLock:
        path = lock_path(folder)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        for _ in range(3):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _read(path)
                if holder is None:  # being written right now, or torn: look again
                    time.sleep(0.2)
                    holder = _read(path)
                if holder is not None and not _is_stale(holder):
                    raise StageError(_refusal(folder, path, holder)) from None
                print(f"note: removing the stale lock {path} ({_describe(holder)})", flush=True)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            return cls(path, record)
        raise StageError(f"cannot take the lock {path}: another process keeps re-creating it")

    def release(self) -> None:
        """Remove the lock if it is still ours."""
        holder = _read(self.path)
        if holder is not None and holder.get("pid") == self.record["pid"]:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def _read(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return {}  # gone meanwhile: stale by definition
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _is_stale(holder: dict[str, Any]) -> bool:
    pid, host = holder.get("pid"), holder.get("host")
    if not isinstance(pid, int):
        return True
    return host == socket.gethostname() and not _alive(pid)


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "unreadable"
    return f"PID {holder.get('pid')} on {holder.get('host')}"


def _refusal(folder: str | os.PathLike, path: Path, holder: dict[str, Any]) -> str:
    where = "this host" if holder.get("host") == socket.gethostname() else holder.get("host")
    return (
        f"{folder} is in use by another training (PID {holder.get('pid')} on {where}); wait "
        f"for it or stop it, or delete {path} if you are sure it is gone"
    )
