"""Atomic, tensors-only checkpoints.

A file is written to a temporary name in the same folder, flushed and ``fsync``-ed, then renamed
over the target with ``os.replace`` (atomic on POSIX), so a crash or a full disk never leaves a
half-written file under the real name and never destroys the previous good one. Files load with
``torch.load(..., weights_only=True)``: checkpoints hold tensors and plain Python types only, so
loading one never runs code.

Training checkpoints are named ``ckpt-<step:08d>.pt``; :func:`latest_checkpoint` returns the newest
one that actually loads, falling back to older ones when the newest is truncated or corrupt.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CheckpointError",
    "checkpoint_name",
    "list_checkpoints",
    "latest_checkpoint",
    "load_checkpoint",
    "load_latest_checkpoint",
    "prune_checkpoints",
    "save_atomic",
    "scan_checkpoints",
]

_CKPT_RE = re.compile(r"^ckpt-(\d+)\.pt$")
_UMASK = os.umask(0)
os.umask(_UMASK)


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or holds non-plain objects."""


def checkpoint_name(step: int) -> str:
    """File name of the training checkpoint after ``step`` steps: ``ckpt-00001000.pt``."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"ckpt-{step:08d}.pt"


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


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically: temp file in the same folder, fsync, replace.

    If anything fails (serialisation error, full disk, interrupt) the temporary file is removed
    and an existing file at ``path`` is left untouched. Returns ``path`` as a ``Path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; use the usual permissions
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; a clear :class:`CheckpointError` otherwise.

    Raises ``FileNotFoundError`` when ``path`` does not exist and :class:`CheckpointError` when
    it is truncated, corrupt, not a dict, or holds objects other than tensors and plain types.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path} (truncated, corrupt or not tensors-only): {first}"
        ) from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return obj


def list_checkpoints(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``ckpt-<step>.pt`` in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def scan_checkpoints(
    folder: str | os.PathLike, map_location: Any = "cpu"
) -> Iterator[tuple[Path, dict[str, Any] | None, CheckpointError | None]]:
    """Newest first, ``(path, contents, None)`` for each checkpoint that loads and
    ``(path, None, error)`` for each that does not."""
    for _, path in reversed(list_checkpoints(folder)):
        try:
            yield path, load_checkpoint(path, map_location), None
        except CheckpointError as err:
            yield path, None, err


def load_latest_checkpoint(
    folder: str | os.PathLike, map_location: Any = "cpu"
) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``folder`` that loads, as ``(path, contents)``; unreadable ones
    are skipped. ``None`` when there is none."""
    for path, obj, _ in scan_checkpoints(folder, map_location):
        if obj is not None:
            return path, obj
    return None


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """Path of the newest checkpoint in ``folder`` that loads (unreadable ones are skipped)."""
    found = load_latest_checkpoint(folder)
    return found[0] if found is not None else None


def prune_checkpoints(folder: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest ``ckpt-*.pt`` files; returns the deleted paths."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    ckpts = list_checkpoints(folder)
    doomed = [p for _, p in ckpts[: max(0, len(ckpts) - keep_last)]]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed
