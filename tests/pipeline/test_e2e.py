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
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")
    shutil.copytree(REPO / ".dvc" / "plots", root / ".dvc" / "plots")  # the offline page
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


def runs_of(root: Path, kind: str | None = None) -> list:
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("diffusion")
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return [r for r in runs if kind is None or r.data.tags.get("run.kind") == kind]


def tracked_files(root: Path) -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=root, capture_output=True, text=True, check=True,
    ).stdout
    return [root / line for line in out.splitlines() if line]


def test_dvc_repro_twice_and_the_mlflow_runs(tmp_path: Path) -> None:
    env = make_repo(tmp_path, tiny_raw())
    first = dvc(tmp_path, env, "repro")
    stages = ("prepare", "classifier", "train", "sample@ddim5", "evaluate", "report", "track")
    for stage in stages:
        assert f"Running stage '{stage}'" in first
    for name in ("classifier", "train", "sample/ddim5", "eval/ddim5", "summary"):
        assert (tmp_path / "metrics" / f"{name}.json").is_file(), name
    reports = ("summary.md", "fid_vs_nfe.csv", "fid_vs_nfe.png", "guidance_tradeoff.csv")
    for name in (*reports, "guidance_tradeoff.png", "grids/ddim5.png"):
        assert (tmp_path / "reports" / name).is_file(), name
    for stage in ("prepare", "classifier", "train", "sample@ddim5", "evaluate", "report"):
        assert (tmp_path / "provenance" / f"{stage}.json").is_file(), stage

    second = dvc(tmp_path, env, "repro")  # only the track stage runs: it is always_changed
    assert second.count("Running stage") == 1 and "Running stage 'track'" in second
    assert "already logged" in second
    status = dvc(tmp_path, env, "status")
    assert "changed deps" not in status and "changed outs" not in status
    assert "always changed" in status
    shown = json.loads(dvc(tmp_path, env, "metrics", "show", "--json"))
    assert "provenance" not in json.dumps(shown)  # metrics files hold numbers, not provenance
    assert '"fid_ci_high"' in json.dumps(shown) and '"recall"' in json.dumps(shown)

    # one training run (the model, registered) and one pipeline run with its method run; the
    # unchanged second `dvc repro` logged nothing new
    (train,) = runs_of(tmp_path, "train")
    (pipeline,) = runs_of(tmp_path, "pipeline")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert train.info.status == pipeline.info.status == "FINISHED"
    assert train.data.tags["model.registered_name"] == "diffusion-digits"
    assert pipeline.data.tags["train.run_id"] == train.info.run_id
    assert pipeline.data.tags["model.version"] == "1"
    assert pipeline.info.run_name == "repro"  # no commit yet in this repository
    assert pipeline.data.params["train.steps"] == "6"
    assert pipeline.data.params["methods.ddim5.sampler"] == "ddim"
    assert {"fid/ddim5", "fid_diff/ddim5", "train/final_loss", "train/loss"} <= set(
        pipeline.data.metrics)
    (method,) = runs_of(tmp_path, "method")
    assert method.info.run_name == "ddim5"
    assert method.data.tags["mlflow.parentRunId"] == pipeline.info.run_id
    assert {"nfe", "fid", "fid_ci_low", "fid_floor", "fid_diff", "class_accuracy",
            "images_per_s"} <= set(method.data.metrics)
    assert method.data.params["sampler"] == "ddim" and method.data.params["steps"] == "5"
    history = client.get_metric_history(pipeline.info.run_id, "train/loss")
    assert [m.step for m in history] == [2, 4, 6]
    artifacts = {a.path for a in client.list_artifacts(pipeline.info.run_id)}
    assert {"grids", "reports", "metrics", "provenance", "params.yaml", "dvc.lock"} <= artifacts
    assert {"checkpoint", "train"} <= {a.path for a in client.list_artifacts(train.info.run_id)}
    assert (tmp_path / "mlartifacts").is_dir()

    # `dvc repro -f` of the last stage finds the same state: nothing new is logged
    dvc(tmp_path, env, "repro", "-f", "track")
    assert len(runs_of(tmp_path, "pipeline")) == 1 and len(runs_of(tmp_path, "train")) == 1

    # nothing in a file Git would keep names this machine's path, a time or a commit
    for path in tracked_files(tmp_path):
        if path.suffix in (".json", ".yaml", ".lock", ".csv", ".md"):
            text = path.read_text()
            assert str(tmp_path) not in text, path
            assert "created" not in text and "git_commit" not in text, path

    # Sampling with two torchrun processes re-runs the sample stage; its samples are the same,
    # so evaluate does not re-run.
    raw = tiny_raw()
    raw["sample"]["nproc"] = 2
    write_params(tmp_path / "params.yaml", raw)
    third = dvc(tmp_path, env, "repro")
    assert "Running stage 'sample@ddim5'" in third
    assert "Running stage 'evaluate'" not in third and "Running stage 'train'" not in third

    # Changing one method re-runs only that method's stages, the report and the tracking.
    raw = tiny_raw()
    raw["methods"]["ddim5"]["eta"] = 0.5
    write_params(tmp_path / "params.yaml", raw)
    status = dvc(tmp_path, env, "status")
    assert "sample@ddim5" in status and "evaluate" in status and "report" in status
    assert "track" in status
    assert "train:" not in status and "classifier:" not in status


def test_train_stage_with_two_processes(tmp_path: Path) -> None:
    raw = tiny_raw()
    raw["train"]["nproc"] = 2
    env = make_repo(tmp_path, raw)
    out = dvc(tmp_path, env, "repro", "train")
    assert "--nproc-per-node=2" in out
    record = json.loads((tmp_path / "metrics/train.json").read_text())
    assert record["steps"] == 6
    timing = json.loads((tmp_path / "runs/timing/train.json").read_text())
    assert timing["world_size"] == 2
    assert len(runs_of(tmp_path)) == 1  # rank 0 alone tracks
