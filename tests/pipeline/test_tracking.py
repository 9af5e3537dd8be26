"""MLflow tracking: runs, names and tags, the store lock, the logged MLflow Model and the REST
view of a real loopback ``mlflow server``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from diffusion_core.checkpoint import save_atomic
from diffusion_core.processes import make_process
from diffusion_core.unet import UNet

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "docs" / "tools"))
import browser_check  # noqa: E402  (the loopback server helper shared with the browser check)

from pipeline.tracking import (
    EXPERIMENT_KIND,
    Tracker,
    experiment_refs,
    open_store,
    run_name,
    run_tags,
    store_lock,
    sync_experiment_commits,
    tracking_uri,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "test-exp")
    for var in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE"):
        monkeypatch.delenv(var, raising=False)
    return tracking_uri()


def tiny_model(path: Path, num_classes: int = 3) -> Path:
    """A randomly initialised 8x8 conditional U-Net saved the way the train stage saves it."""
    torch.manual_seed(0)
    net = UNet(in_channels=1, image_size=8, base_channels=8, channel_mults=[1],
               num_res_blocks=1, attention_resolutions=[], num_classes=num_classes)
    with torch.no_grad():  # the output layer starts at zero: give every layer some weight
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    process = make_process("ddpm", num_steps=50)
    save_atomic(
        {"model_config": net.config, "ema": net.state_dict(), "process": process.describe(),
         "prediction": "eps"},
        path,
    )
    return path


def test_default_store_is_sqlite_at_the_repo_root(store: str, tmp_path: Path) -> None:
    assert store == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_env_uri_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/m.db")
    assert tracking_uri(Path("/repo")) == "sqlite:////elsewhere/m.db"


def test_run_names_follow_the_dvc_experiment_or_the_commit(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    assert run_name("0123456789abcdef") == "repro-0123456"
    assert run_name(None) == "repro"
    monkeypatch.setenv("DVC_EXP_NAME", "fluky-rams")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "b" * 40)
    assert run_name("0123456789abcdef") == "fluky-rams"
    tags = run_tags("abc", "c" * 40, kind="pipeline")
    assert tags["dvc.exp_name"] == "fluky-rams" and tags["dvc.baseline_rev"] == "b" * 40
    assert tags["run.kind"] == "pipeline" and tags["git.commit"] == "c" * 40


def test_run_created_reopened_and_logged(store: str, tmp_path: Path) -> None:
    tracker = Tracker.create("train-x", run_tags("abc123", "deadbeef", kind="train"))
    assert tracker is not None
    tracker.log_params({"train.lr": 0.002, "model.channel_mults": [1, 2]})
    tracker.log_metrics({"train/final_loss": 0.5, "skip": "not a number"})
    tracker.log_history("train/loss", [(0, 1.0), (10, 0.5)])
    link = tmp_path / "runs" / "mlflow-abc.json"
    tracker.write_link(link)
    tracker.finish()
    assert "sqlite" not in link.read_text()  # the store is resolved at run time, never stored

    again = Tracker.reopen(link)
    assert again is not None and again.run_id == tracker.run_id
    again.log_params({"train.lr": 0.5, "train.new": 1}, only_new=True)  # lr is write-once
    grid = tmp_path / "grid.png"
    grid.write_bytes(b"png")
    again.log_artifact(grid, "grids")
    assert again.enabled

    client = MlflowClient(store)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "train-x"
    assert run.data.params == {"train.lr": "0.002", "model.channel_mults": "[1, 2]",
                               "train.new": "1"}
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (10, 0.5)]
    assert run.data.tags["params.hash"] == "abc123" and run.data.tags["run.kind"] == "train"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "grids")] == ["grids/grid.png"]
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == EXPERIMENT_KIND["mlflow.experimentKind"]


def test_a_link_from_another_store_starts_a_new_run(store: str, tmp_path: Path) -> None:
    assert Tracker.reopen(tmp_path / "nope.json") is None
    link = tmp_path / "link.json"
    link.write_text(json.dumps({"run_id": "0" * 32, "experiment_id": "1"}))
    assert Tracker.reopen(link) is None
    link.write_text(json.dumps({"run_id": None}))
    assert Tracker.reopen(link) is None


def test_a_failing_call_warns_once_and_disables(capsys: pytest.CaptureFixture[str]) -> None:
    class Broken:
        def log_batch(self, *args: object, **kwargs: object) -> None:
            raise RuntimeError("database is locked")

    tracker = Tracker(Broken(), "r", "1", "file:///nowhere")
    tracker.log_metrics({"a": 1.0})
    tracker.log_metrics({"b": 2.0})
    err = capsys.readouterr().err
    assert err.count("warning: MLflow") == 1
    assert "database is locked" in err
    assert not tracker.enabled


def test_store_lock_serialises_writers(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    order: list[str] = []

    def second() -> None:
        with store_lock(uri):
            order.append("second")

    with store_lock(uri):
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.3)
        order.append("first")
    thread.join(5)
    assert order == ["first", "second"]
    assert (tmp_path / "mlflow.db.lock").is_file()


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


def test_experiment_runs_get_their_commit_from_the_exp_refs(store: str, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty",
         "-m", "x")
    head = _git(repo, "rev-parse", "HEAD")
    _git(repo, "update-ref", f"refs/exps/{head[:2]}/{head[2:]}/bushy-oars", head)
    _git(repo, "update-ref", "refs/exps/celery/stash", head)  # not an experiment
    assert experiment_refs(repo) == {"bushy-oars": head}

    os.environ["DVC_EXP_NAME"] = "bushy-oars"
    try:
        tracker = Tracker.create("bushy-oars", run_tags("h", "baseline", kind="pipeline"))
    finally:
        del os.environ["DVC_EXP_NAME"]
    assert tracker is not None
    client, experiment_id, uri = open_store()
    assert sync_experiment_commits(client, experiment_id, uri, repo) == 1
    tags = client.get_run(tracker.run_id).data.tags
    assert tags["dvc.exp_rev"] == head and tags["git.commit"] == head
    assert sync_experiment_commits(client, experiment_id, uri, repo) == 0  # already tagged


def test_the_model_is_an_mlflow_pyfunc_in_the_registry(
    store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    model = tiny_model(tmp_path / "model.pt")
    tracker = Tracker.create("train-x", run_tags("h", None, kind="train"))
    assert tracker is not None
    version = tracker.log_model(model, "tiny-digits", sha256="f" * 64)
    assert version == "1"
    assert tracker.find_model_run("f" * 64).info.run_id == tracker.run_id
    assert tracker.find_model_run("0" * 64) is None

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)  # not set_tracking_uri: process-wide
    loaded = mlflow.pyfunc.load_model("models:/tiny-digits/1")
    assert loaded.metadata.signature.params is not None
    request = pd.DataFrame({"seed": [0, 1, 2, 3], "label": [0, 2, -1, 1]})
    images = loaded.predict(request, params={"sampler": "ddim", "steps": 3})
    assert images.shape == (4, 1, 8, 8) and images.dtype == np.uint8
    # image i depends only on its own seed and label, not on the rest of the batch
    alone = loaded.predict(request.iloc[[1]], params={"sampler": "ddim", "steps": 3})
    np.testing.assert_array_equal(alone[0], images[1])
    guided = loaded.predict(request, params={"sampler": "ddim", "steps": 3, "guidance": 2.0})
    assert not np.array_equal(guided[0], images[0])
    with pytest.raises(Exception, match="label"):
        loaded.predict(pd.DataFrame({"seed": [0], "label": [7]}), params={"steps": 2})
    runs_uri = mlflow.pyfunc.load_model(f"runs:/{tracker.run_id}/model")
    assert runs_uri.metadata.signature is not None


@pytest.mark.slow
def test_runs_seen_through_a_loopback_mlflow_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = f"sqlite:///{tmp_path / 'server.db'}"
    with browser_check.mlflow_server(store) as base:  # started here, stopped by its PID
        monkeypatch.setenv("MLFLOW_TRACKING_URI", base)
        monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "served")
        monkeypatch.setenv("DVC_EXP_NAME", "lanky-pail")
        tracker = Tracker.create("lanky-pail", run_tags("h", "c" * 40, kind="pipeline"))
        assert tracker is not None
        tracker.log_params({"methods.ddim.steps": 20})
        tracker.log_metrics({"fid/ddim": 12.5, "nfe/ddim": 20})
        tracker.finish()
        assert tracker.enabled

        found = browser_check.rest(base, "runs/search", {
            "experiment_ids": [tracker.experiment_id],
            "filter": "tags.`dvc.exp_name` = 'lanky-pail'",
        })["runs"]
        assert len(found) == 1
        data = found[0]["data"]
        assert {m["key"]: m["value"] for m in data["metrics"]} == {"fid/ddim": 12.5,
                                                                     "nfe/ddim": 20.0}
        assert {p["key"]: p["value"] for p in data["params"]} == {"methods.ddim.steps": "20"}
        assert found[0]["info"]["run_name"] == "lanky-pail"
        assert found[0]["info"]["status"] == "FINISHED"
