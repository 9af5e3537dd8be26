"""Atomic file writes, file digests and provenance records (``provenance/<stage>.json``).

A file is written to a temporary sibling, fsync-ed, given the umask's permissions and moved into
place with ``os.replace`` (:mod:`diffusion_core.atomic`, the one atomic write of the project), so
an interrupted stage never leaves a half-written file where a good one was.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from diffusion_core.atomic import atomic_path as atomic_path  # re-exported
from diffusion_core.atomic import write_bytes as _write_bytes
from pipeline.config import Params
from pipeline.errors import StageError
from pipeline.params_digest import params_hash

PROVENANCE_DIR = Path("provenance")
TIMING_DIR = Path("runs/timing")
PACKAGES = ("diffusion-toolkit", "torch", "torchvision", "numpy", "scipy", "clean-fid")


def write_bytes(path: str | Path, data: bytes) -> None:
    """Atomically write ``data`` to ``path``."""
    _write_bytes(path, data)


def write_text(path: str | Path, text: str) -> None:
    """Atomically write ``text`` to ``path``."""
    write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (keys in insertion order)."""
    write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def repo_root() -> Path:
    """The project root: ``$DVC_ROOT`` (set by DVC, the parent repo in queued runs), else the
    git top level, else the working directory."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    top = _git("rev-parse", "--show-toplevel")
    return Path(top).resolve() if top else Path.cwd().resolve()


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip()


def git_commit() -> str | None:
    """The commit checked out in the working directory (None outside git or before a commit)."""
    return _git("rev-parse", "HEAD")


def git_dirty() -> bool | None:
    """Whether tracked files differ from the commit (None outside git)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def provenance(params: Params, **extra: Any) -> dict[str, Any]:
    """What produced a result, deterministically: parameters hash, seed, stage, command, package
    versions (the one platform-dependent part). No commit, time or host: those change on every
    run and go to MLflow tags (:func:`run_context`) instead, so DVC outputs reproduce byte for
    byte."""
    record = {
        "params_hash": params_hash(params),
        "seed": params.seed,
        "dvc_stage": os.environ.get("DVC_STAGE"),
        "versions": package_versions(),
        "command": " ".join(["diffusion", *sys.argv[1:]]),
    }
    record.update(extra)
    return record


def write_provenance(stage: str, params: Params, **extra: Any) -> Path:
    """Write ``provenance/<stage>.json`` (kept in Git beside the outputs, not a DVC output and
    not a metric), e.g. ``provenance/evaluate@ddpm.json``."""
    path = PROVENANCE_DIR / f"{stage}.json"
    write_json(path, provenance(params, **extra))
    return path


def write_timing(stage: str, **values: Any) -> Path:
    """Write ``runs/timing/<stage>.json``: wall times, throughput and device of this run.

    Timings differ on every run, so they live outside DVC's outputs and Git (git-ignored); the
    track stage logs them to MLflow (``images_per_s/<method>``, ...)."""
    path = TIMING_DIR / f"{stage}.json"
    write_json(path, values)
    return path


def read_timing(stage: str) -> dict[str, Any]:
    """The timings :func:`write_timing` wrote for ``stage`` ({} if that stage did not run here)."""
    try:
        return read_json(TIMING_DIR / f"{stage}.json")
    except (OSError, ValueError):
        return {}


def run_context() -> dict[str, Any]:
    """The non-deterministic facts of this run, for MLflow tags only."""
    return {
        "git.commit": git_commit(),
        "git.dirty": git_dirty(),
        "host": platform.node(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


#: what every reader of a model file (``runs/train/model.pt``, a distilled student) needs
MODEL_KEYS = ("model_config", "ema", "process", "prediction")


def read_model_file(path: str | os.PathLike) -> dict[str, Any]:
    """The contents of the model file ``path`` on the CPU, its :data:`MODEL_KEYS` checked; a
    :class:`StageError` naming the stage to run when it is missing."""
    from diffusion_core.checkpoint import load_checkpoint, require_keys  # torch: not for all

    try:
        m = load_checkpoint(path, map_location="cpu")
    except FileNotFoundError:
        raise StageError(f"{path} is missing: run the train stage first") from None
    require_keys(m, path, MODEL_KEYS)
    return m
