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
import pickle
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from diffusion_core.atomic import atomic_write

__all__ = [
    "CheckpointError",
    "checkpoint_name",
    "list_checkpoints",
    "latest_checkpoint",
    "load_checkpoint",
    "load_latest_checkpoint",
    "prune_checkpoints",
    "require_keys",
    "save_atomic",
    "scan_checkpoints",
]

_CKPT_RE = re.compile(r"^ckpt-(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or holds non-plain objects."""


def checkpoint_name(step: int) -> str:
    """File name of the training checkpoint after ``step`` steps: ``ckpt-00001000.pt``."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"ckpt-{step:08d}.pt"


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (:func:`diffusion_core.atomic.atomic_write`:
    temp file in the same folder, fsync, the umask's permissions, replace).

    If anything fails (serialisation error, full disk, interrupt) the temporary file is removed
    and an existing file at ``path`` is left untouched. Returns ``path`` as a ``Path``.
    """
    return atomic_write(path, lambda f: torch.save(obj, f))


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
    except pickle.UnpicklingError as err:
        text = str(err).lower()
        if "weights only load failed" not in text or "global" not in text:
            raise CheckpointError(_unreadable(path, err)) from None  # not a pickle at all
        # torch's own message advises weights_only=False: never do that with an untrusted file.
        raise CheckpointError(
            f"refused to load {path}: it holds Python objects other than tensors and plain "
            f"types (loading it could run code); do not load it with weights_only=False, "
            f"re-create it from a trusted source (re-run the step that writes it)"
        ) from None
    except Exception as err:  # torch raises RuntimeError, EOFError, KeyError, ...
        raise CheckpointError(_unreadable(path, err)) from None
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, expected a dict: "
            "re-create it (re-run the step that writes it)"
        )
    return obj


def _unreadable(path: Path, err: BaseException) -> str:
    size = path.stat().st_size if path.exists() else 0
    return (
        f"cannot read {path} ({size} bytes): truncated or corrupt "
        f"({type(err).__name__}); delete it and re-create it (re-run the step that writes it)"
    )


def require_keys(obj: dict[str, Any], path: str | os.PathLike, keys: Iterable[str]) -> None:
    """Raise :class:`CheckpointError` naming the ``keys`` missing from checkpoint ``obj``."""
    missing = [k for k in keys if k not in obj]
    if missing:
        raise CheckpointError(
            f"{path} lacks {', '.join(missing)}: not a file this step can use (an older format "
            f"or another program's file); re-create it (re-run the step that writes it)"
        )


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
