"""End to end: `dvc repro` of the real dvc.yaml on a tiny config in a fresh git repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from _pipeline_helpers import REPO, copy_code, tiny_raw, write_params
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def make_repo(root: Path, raw: dict[str, Any]) -> dict[str, str]:
    """A fresh git + DVC repository holding the project code, dvc.yaml and ``raw`` params;
    returns the environment to run DVC in (venv first on PATH, MLflow store in the repo)."""
    copy_code(root)
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    write_params(root / "params.yaml", raw)
    env = dict(os.environ)
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}",
        DVC_NO_ANALYTICS="1",
        OMP_NUM_THREADS="1",
    )
    for var in ("DVC_ROOT", "DVC_STAGE", "DVC_EXP_NAME", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(var, None)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True, env=env)
    dvc(root, env, "init", "-q")
    return env


def dvc(root: Path, env: dict[str, str], *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def test_dvc_repro_twice_and_the_mlflow_run(tmp_path: Path) -> None:
    env = make_repo(tmp_path, tiny_raw())
    first = dvc(tmp_path, env, "repro")
    for stage in ("prepare", "classifier", "train", "sample@ddim5", "evaluate@ddim5", "report"):
        assert f"Running stage '{stage}'" in first
    for name in ("classifier", "train", "sample/ddim5", "eval/ddim5", "summary"):
        assert (tmp_path / "metrics" / f"{name}.json").is_file(), name
    reports = ("summary.md", "fid_vs_nfe.csv", "fid_vs_nfe.png", "guidance_tradeoff.csv")
    for name in (*reports, "guidance_tradeoff.png", "grids/ddim5.png"):
        assert (tmp_path / "reports" / name).is_file(), name

    second = dvc(tmp_path, env, "repro")
    assert "Running stage" not in second
    assert "Data and pipelines are up to date" in dvc(tmp_path, env, "status")
    shown = json.loads(dvc(tmp_path, env, "metrics", "show", "--json"))
    assert '"fid_ci_high"' in json.dumps(shown) and '"verdict"' in json.dumps(shown)

    link = json.loads((tmp_path / "runs/train/mlflow_run.json").read_text())
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(link["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "6"
    assert run.data.params["methods.ddim5.sampler"] == "ddim"
    logged = {"train/loss", "nfe/ddim5", "fid/ddim5", "fid_floor/ddim5", "class_accuracy/ddim5"}
    assert logged <= set(run.data.metrics)
    assert run.data.tags["dvc.stage"] == "train"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model", "grids", "reports", "train"} <= artifacts
    assert (tmp_path / "mlartifacts").is_dir()
    assert len(client.search_runs([link["experiment_id"]])) == 1

    # Changing one method re-runs only that method's stages and the report.
    raw = tiny_raw()
    raw["methods"]["ddim5"]["eta"] = 0.5
    write_params(tmp_path / "params.yaml", raw)
    status = dvc(tmp_path, env, "status")
    assert "sample@ddim5" in status and "report" in status
    assert "train:" not in status and "classifier:" not in status


def test_train_stage_with_two_processes(tmp_path: Path) -> None:
    raw = tiny_raw()
    raw["train"]["nproc"] = 2
    env = make_repo(tmp_path, raw)
    out = dvc(tmp_path, env, "repro", "train")
    assert "--nproc-per-node=2" in out
    record = json.loads((tmp_path / "metrics/train.json").read_text())
    assert record["world_size"] == 2 and record["steps"] == 6
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    link = json.loads((tmp_path / "runs/train/mlflow_run.json").read_text())
    assert len(client.search_runs([link["experiment_id"]])) == 1  # rank 0 alone tracks
