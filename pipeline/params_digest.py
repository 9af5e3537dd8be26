"""Digests of the validated parameters: :func:`params_hash` names a params file's values
(provenance, MLflow), :func:`train_config_hash` decides whether a checkpoint may be resumed, and
:func:`flatten` gives the dotted keys MLflow logs."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.config import Params

# Train settings that do not change what is learned (the library makes the global batch
# independent of nproc): changing them keeps checkpoints resumable.
BOOKKEEPING_TRAIN_KEYS = ("nproc", "threads_per_proc", "checkpoint_every", "keep_last", "log_every")
# Distill settings that do not change the students (nproc does: each rank draws its own noise).
BOOKKEEPING_DISTILL_KEYS = ("enabled", "threads_per_proc", "checkpoint_every", "log_every")


def _digest(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def params_hash(params: Params) -> str:
    """A short hash of all validated parameters (formatting and comments do not count)."""
    return _digest(params.model_dump(mode="json"))[:12]


def train_config_hash(params: Params, data_digest: str) -> str:
    """Hash of everything that decides the trained weights: a resume is allowed only on a match.

    Covers ``seed``, ``data``, ``process``, ``model``, ``train`` (less bookkeeping keys such as
    ``log_every``) and the digest of the prepared training data.
    """
    train = params.train.model_dump(mode="json")
    for key in BOOKKEEPING_TRAIN_KEYS:
        train.pop(key)
    return _digest(
        {
            "seed": params.seed,
            "data": params.data.model_dump(mode="json"),
            "process": params.process.model_dump(mode="json"),
            "model": params.model.model_dump(mode="json"),
            "train": train,
            "data_digest": data_digest,
        }
    )[:16]


def distill_config_hash(params: Params, teacher_sha256: str) -> str:
    """Hash of everything that decides the distilled students (``seed``, ``distill`` less
    bookkeeping keys, the label dropout they see and the teacher's file digest): the distill
    stage resumes its checkpoint only on a match."""
    distill = params.distill.model_dump(mode="json")
    for key in BOOKKEEPING_DISTILL_KEYS:
        distill.pop(key)
    p_uncond = params.train.p_uncond if params.model.conditional else 0.0
    return _digest({"seed": params.seed, "distill": distill, "p_uncond": p_uncond,
                    "teacher": teacher_sha256})[:16]


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts with dotted keys: ``{"a": {"b": 1}} -> {"a.b": 1}``."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out
