"""The pictures stage on a tiny (untrained) model: the forward strip, one GIF and strip per
configured method (frame count and size), the guidance sweep and labelled grids."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from _pipeline_helpers import tiny_raw
from PIL import Image
from test_generate import tiny_model

from diffusion_core.checkpoint import save_atomic
from pipeline import paths, pictures
from pipeline.config import validate_params


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    tiny_model(tmp_path / paths.MODEL)
    images = torch.rand(4, 1, 8, 8) * 2 - 1
    save_atomic({"images": images, "labels": torch.arange(4)}, tmp_path / paths.TRAIN_DATA)
    return tmp_path


def frames_of(path: Path) -> list[tuple[int, int]]:
    with Image.open(path) as gif:
        sizes = []
        for k in range(gif.n_frames):
            gif.seek(k)
            sizes.append(gif.size)
        return sizes


def test_pictures_of_every_configured_method(workspace: Path) -> None:
    raw = tiny_raw()
    raw["methods"] = {
        "ddim5": {"sampler": "ddim", "steps": 5},
        "ddpm": {"sampler": "ddpm", "steps": 100},  # more than FRAMES steps: FRAMES frames
        "ode": {"sampler": "ode_rk45"},              # drawn with Heun (rk45 reports once)
        "cfg2": {"sampler": "ddim", "steps": 5, "guidance": 2.0},
    }
    params = validate_params(raw)
    labels = torch.arange(20) % 10
    save_atomic({"images": torch.randint(0, 256, (20, 1, 8, 8), dtype=torch.uint8),
                 "labels": labels}, workspace / paths.samples_dir("cfg2") / "samples.pt")
    with contextlib.chdir(workspace):
        (pictures.PROCESS_DIR).mkdir(parents=True)
        (pictures.PROCESS_DIR / "removed_chain.gif").write_bytes(b"old")  # a removed method
        pictures.run(params)
    out = workspace / pictures.PROCESS_DIR
    expected = {"forward.png", "guidance.png", "cfg2_labelled.png"}
    expected |= {f"{m}_chain.{ext}" for m in raw["methods"] for ext in ("gif", "png")}
    assert {p.name for p in out.iterdir()} == expected

    sizes = frames_of(out / "ddim5_chain.gif")
    assert len(sizes) == 5 and len(set(sizes)) == 1  # one frame per step, all the same size
    width, height = sizes[0]
    assert width >= pictures.PICTURE_SEEDS * 32 and height >= 2 * 32  # x_t over x0, 4 seeds
    assert len(frames_of(out / "ddpm_chain.gif")) == pictures.FRAMES
    assert len(frames_of(out / "ode_chain.gif")) == pictures.FRAMES

    strip = Image.open(out / "ddim5_chain.png")
    assert strip.width >= 5 * 32 and strip.height >= 2 * pictures.PICTURE_SEEDS * 32
    sweep = Image.open(out / "guidance.png")  # rows: 10 classes, columns: w = 0, 2
    assert sweep.height >= 10 * 32 and sweep.width >= 2 * 32
    assert Image.open(out / "forward.png").width >= len(pictures.FORWARD_TIMES) * 32
