"""Helpers for the pipeline tests: the repository's params.yaml, a tiny variant of it and a tiny
model saved as the train stage saves one."""

from __future__ import annotations

import contextlib
import copy
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def default_raw() -> dict[str, Any]:
    """The repository's params.yaml as a plain dict."""
    return yaml.safe_load((REPO / "params.yaml").read_text())


def tiny_raw() -> dict[str, Any]:
    """params.yaml shrunk so every stage runs in seconds on a CPU."""
    raw = copy.deepcopy(default_raw())
    raw["process"]["num_steps"] = 100
    raw["model"].update(base_channels=8, num_res_blocks=1, attention_resolutions=[4])
    raw["train"].update(
        steps=6, batch_size=16, warmup_steps=2, nproc=1, checkpoint_every=3, log_every=2
    )
    raw["classifier"].update(epochs=1, batch_size=256, feature_dim=16)
    raw["sample"].update(n_images=20, batch_size=20, nproc=1)
    raw["methods"] = {"ddim5": {"sampler": "ddim", "steps": 5, "eta": 0.0}}
    raw["evaluate"].update(batch_size=256, bpd_images=0, baseline=None)
    return raw


def write_params(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def copy_code(root: Path) -> None:
    """Copy the project's packages into ``root``, so ``python -m pipeline`` run there uses them."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("pipeline", "diffusion_core"):
        shutil.copytree(REPO / package, root / package, ignore=ignore)


def tiny_model(path: Path, num_classes: int = 10, guide: str | None = None) -> Path:
    """A tiny untrained U-Net on an 8x8 digits-like process of 100 steps (``tiny_raw``'s), saved
    as the train stage saves ``runs/train/model.pt``; ``guide``: with an autoguidance guide
    snapshot, ``"same"`` weights or ``"other"`` (perturbed) ones."""
    import torch

    from diffusion_core.checkpoint import save_atomic
    from diffusion_core.processes import make_process
    from diffusion_core.unet import UNet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = UNet(in_channels=1, image_size=8, base_channels=8, channel_mults=[1, 2],
                   num_res_blocks=1, attention_resolutions=[4], num_classes=num_classes)
    process = make_process("ddpm", num_steps=100)
    m = {"model_config": net.config, "ema": net.state_dict(), "process": process.describe(),
         "prediction": "eps"}
    if guide is not None:
        g = torch.Generator().manual_seed(1)
        weak = {k: v + (0.05 * torch.randn(v.shape, generator=g) if guide == "other" else 0)
                for k, v in net.state_dict().items()}
        m["guide"] = {"ema": weak, "step": 1}
    save_atomic(m, path)
    return path


@contextlib.contextmanager
def stage_workspace(root: Path) -> Iterator[Path]:
    """Run stages in-process with ``root`` as the repository: the working directory, DVC's root
    and a private MLflow store (for module-scoped fixtures, which cannot take ``monkeypatch``)."""
    with pytest.MonkeyPatch.context() as mp, contextlib.chdir(root):
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("DVC_ROOT", str(root))
        yield root
