"""One method and one seed give one image whichever path asks: the sample stage, ``diffusion
generate`` and the MLflow model's ``predict`` all load and sample through
:mod:`pipeline.sampling`, so the same settings give the same uint8 tensor, bit for bit (each on
the default device, in one batch of all the images)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from _pipeline_helpers import tiny_model, tiny_raw
from typer.testing import CliRunner

from diffusion_core.checkpoint import load_checkpoint
from pipeline import paths, sample
from pipeline.cli import app
from pipeline.config import validate_params
from pipeline.sampling import Recipe

N, SEED = 6, 11

# each method with its settings three ways: params.yaml, `diffusion generate` options, MLflow
# params; written out by hand so that a setting one path drops is a difference
CASES: dict[str, dict[str, Any]] = {
    # classifier-free guidance, cycled classes, x_0 clipping, the sampler's own settings
    "pc": {
        "method": {"sampler": "pc", "steps": 4, "snr": 0.1, "corrector_steps": 2,
                   "guidance": 1.0, "classes": [1, 2, 3], "clip_x0": True},
        "cli": ["--sampler", "pc", "--steps", "4", "--set", "snr=0.1", "--set",
                "corrector_steps=2", "-w", "1", "--classes", "1,2,3", "--clip-x0"],
        "mlflow": {"sampler": "pc", "steps": 4, "guidance": 1.0, "clip_x0": True,
                   "settings": json.dumps({"snr": 0.1, "corrector_steps": 2})},
        "labels": [1, 2, 3, 1, 2, 3],
    },
    # autoguidance against the guide snapshot, the null label, DDIM with noise, another spacing
    "uncond": {
        "method": {"sampler": "ddim", "steps": 5, "eta": 0.5, "spacing": "quadratic",
                   "autoguidance": 1.5, "unconditional": True},
        "cli": ["--sampler", "ddim", "--steps", "5", "--set", "eta=0.5", "--spacing",
                "quadratic", "--autoguidance", "1.5", "--classes", "none"],
        "mlflow": {"sampler": "ddim", "steps": 5, "spacing": "quadratic", "autoguidance": 1.5,
                   "settings": json.dumps({"eta": 0.5})},
        "labels": [-1] * N,
    },
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model with a guide snapshot, and the sample stage's images of every case."""
    root = tmp_path_factory.mktemp("agree")
    tiny_model(root / paths.MODEL, guide="other")
    raw = tiny_raw()
    raw["seed"] = SEED
    raw["train"]["guide_at"] = 0.5  # the model file has a guide snapshot
    raw["sample"].update(n_images=N, batch_size=N)  # one batch, as the pyfunc draws its rows
    raw["methods"] = {name: case["method"] for name, case in CASES.items()}
    params = validate_params(raw)
    with contextlib.chdir(root):
        for name in CASES:
            assert sample.run(params, name)["status"] == "ok"
    return root


def stage_images(root: Path, name: str) -> torch.Tensor:
    return load_checkpoint(root / paths.samples_dir(name) / "samples.pt")["images"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_generate_gives_the_sample_stages_images(workspace: Path, tmp_path: Path,
                                                 name: str) -> None:
    out = tmp_path / "gen"
    result = CliRunner().invoke(app, [
        "generate", "--quiet", "--model", str(workspace / paths.MODEL), "-n", str(N),
        "--seed", str(SEED), "--batch-size", str(N), "--no-png",
        "--out", str(out), *CASES[name]["cli"]])
    assert result.exit_code == 0, result.output
    with np.load(out / "images.npz") as z:
        generated = torch.from_numpy(z["images"]).permute(0, 3, 1, 2)  # N, H, W, C -> N, C, H, W
    stage = stage_images(workspace, name)
    assert stage.float().std() > 0 and not torch.equal(stage[0], stage[1])  # not a blank image
    assert torch.equal(generated, stage)


@pytest.fixture(scope="module")
def pyfunc(workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The model file logged and loaded back as the MLflow pyfunc the track stage registers."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.mlflow_model import log_pyfunc

    store = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("agree", str(store / "artifacts")))
    log_pyfunc(uri, run.info.run_id, workspace / paths.MODEL, None)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        return mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", sorted(CASES))
def test_the_mlflow_model_gives_the_sample_stages_images(workspace: Path, pyfunc: Any,
                                                          name: str) -> None:
    case = CASES[name]
    rows = pd.DataFrame({"seed": [SEED + i for i in range(N)], "label": case["labels"]})
    predicted = pyfunc.predict(rows, params=case["mlflow"])
    assert torch.equal(torch.from_numpy(predicted), stage_images(workspace, name))


def test_a_recipe_from_a_method_carries_every_setting() -> None:
    m = validate_params({**tiny_raw(), "methods": {"pc": CASES["pc"]["method"]}}).method("pc")
    assert Recipe.of_method(m) == Recipe("pc", steps=4, spacing="linspace", guidance=1.0,
                                         clip_x0=True, settings={"snr": 0.1,
                                                                 "corrector_steps": 2})
    assert Recipe("ode_rk45", steps=50).steps is None  # it adapts its own steps
