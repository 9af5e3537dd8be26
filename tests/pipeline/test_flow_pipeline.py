"""Rectified flow through the whole pipeline, in-process on a tiny config: prepare, classifier,
train, sample with every kind of sampler, evaluate, report and pictures; and check-params."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from _pipeline_helpers import stage_workspace, tiny_raw, write_params
from typer.testing import CliRunner

from diffusion_core.checkpoint import load_checkpoint
from pipeline import classifier, evaluate, paths, pictures, prepare, report, sample, train
from pipeline.cli import app
from pipeline.config import validate_params

#: Euler (= DDIM on rectified flow), Heun, DPM-Solver++ 2M and the DDPM family
METHODS = {
    "euler4": {"sampler": "ddim", "steps": 4},
    "heun3": {"sampler": "ode_heun", "steps": 2},
    "dpmpp4": {"sampler": "dpmpp_2m", "steps": 4, "spacing": "trailing"},
    "ddpm4": {"sampler": "ddpm", "steps": 4},
    "sde4": {"sampler": "sde", "steps": 4},
}


def flow_raw() -> dict[str, Any]:
    """``tiny_raw`` as rectified flow: flow prediction, logit-normal times, no weighting."""
    raw = tiny_raw()
    raw["process"].update(name="rectified_flow", t_min=1e-3, shift=3.0)
    raw["model"]["prediction"] = "flow"
    raw["train"].update(t_sampling="logit_normal", logit_mean=0.0, logit_std=1.0,
                        loss_weighting="none")
    raw["methods"] = METHODS
    raw["evaluate"]["baseline"] = "euler4"
    return raw


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every stage once on the rectified-flow config, in a temporary working directory; the
    folder and the report's summary."""
    root = tmp_path_factory.mktemp("flow")
    params = validate_params(flow_raw())
    with stage_workspace(root):
        prepare.run(params)
        classifier.run(params)
        train.run(params)
        for name in METHODS:
            sample.run(params, name)
        evaluate.run(params, list(METHODS))
        summary = report.run(params)
        pictures.run(params)
        yield root, summary


def test_the_trained_model_is_a_flow_model(flow_run: tuple[Path, dict[str, Any]]) -> None:
    root, _ = flow_run
    m = load_checkpoint(root / paths.MODEL, map_location="cpu")
    assert m["process"]["name"] == "rectified_flow" and m["process"]["shift"] == 3.0
    assert m["prediction"] == "flow"
    assert math.isfinite(json.loads((root / paths.TRAIN_METRICS).read_text())["final_loss"])


@pytest.mark.parametrize("method", list(METHODS))
def test_every_sampler_draws_and_is_scored(flow_run: tuple[Path, dict[str, Any]],
                                           method: str) -> None:
    root, _ = flow_run
    drawn = load_checkpoint(root / paths.samples_dir(method) / "samples.pt")
    images = drawn["images"]
    assert images.shape == (20, 1, 8, 8) and images.dtype == torch.uint8
    assert images.float().std() > 0  # not a constant (a NaN casts to one value)
    record = json.loads((root / paths.eval_record(method)).read_text())
    assert math.isfinite(record["fid"])
    assert record["fid_ci_low"] <= record["fid"] <= record["fid_ci_high"]


def test_report_and_pictures_hold_every_method(flow_run: tuple[Path, dict[str, Any]]) -> None:
    root, summary = flow_run
    assert set(summary["methods"]) == set(METHODS)
    assert all(math.isfinite(row["fid"]) for row in summary["methods"].values())
    assert summary["methods"]["heun3"]["nfe"] == 3  # 2 Heun steps: 2 x 2 - 1 evaluations
    table = (root / paths.SUMMARY_MD).read_text()
    for name, m in METHODS.items():
        assert f"| {name} | {m['sampler']} |" in table
    out = root / pictures.PROCESS_DIR
    assert {f"{m}_chain.gif" for m in METHODS} <= {p.name for p in out.iterdir()}
    assert (out / "forward.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_check_params_accepts_flow_and_refuses_a_zero_shift(tmp_path: Path) -> None:
    ok = write_params(tmp_path / "ok.yaml", flow_raw())
    result = CliRunner().invoke(app, ["check-params", "--params", str(ok)])
    assert result.exit_code == 0, result.output
    raw = flow_raw()
    raw["process"]["shift"] = 0
    bad = write_params(tmp_path / "bad.yaml", raw)
    result = CliRunner().invoke(app, ["check-params", "--params", str(bad)])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "process.shift" in result.stderr
