"""The track stage on hand-written stage outputs: one MLflow run with every method's metrics,
the guidance curves, the artifacts, and the model linked (or logged when the store lacks it)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from test_report import METHODS, params_of, write_records
from test_tracking import tiny_model

from pipeline import paths, report, track
from pipeline.files import file_digest, write_json, write_text, write_timing
from pipeline.tracking import Tracker, run_tags

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "track-test")
    for var in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(var, raising=False)
    write_records(METHODS)
    write_json(paths.TRAIN_METRICS, {"steps": 6, "final_loss": 0.25})
    write_text(paths.LOSS_CSV, "step,loss,lr,grad_norm\n2,0.5,0.1,1\n4,0.3,0.1,1\n")
    write_timing("sample@a", wall_s=2.0, images_per_s=10.0)
    tiny_model(paths.MODEL)
    with contextlib.redirect_stdout(io.StringIO()):
        report.run(params_of(METHODS))
    return tmp_path


def client(workdir: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")


def test_one_run_with_metrics_curves_artifacts_and_the_model(workdir: Path) -> None:
    params = params_of(METHODS)
    with contextlib.redirect_stdout(io.StringIO()):
        out = track.run(params)
    run = client(workdir).get_run(out["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["run.kind"] == "pipeline"
    metrics = run.data.metrics
    assert metrics["fid/a"] == 10.0 and metrics["fid_ci_high/a"] == 11.5
    assert metrics["nfe/e"] == 10.0
    assert metrics["class_accuracy/b4"] == 0.95 and "class_accuracy/u" not in metrics
    assert metrics["images_per_s/a"] == 10.0 and "images_per_s/b1" not in metrics
    assert metrics["train/final_loss"] == 0.25
    assert run.data.params["methods.b4.guidance"] == "4.0"

    def curve(key: str) -> list[tuple[int, float]]:
        history = client(workdir).get_metric_history(run.info.run_id, key)
        return sorted((m.step, m.value) for m in history)

    assert curve("train/loss") == [(2, 0.5), (4, 0.3)]
    assert curve("guidance_fid") == [(0, 10.0), (100, 12.0), (400, 30.0)]
    assert curve("guidance_class_accuracy") == [(0, 0.5), (100, 0.8), (400, 0.95)]
    assert curve("guidance_fid/e") == [(50, 7.0)]
    logged = {Path(a.path).name for a in client(workdir).list_artifacts(run.info.run_id,
                                                                         "reports")}
    assert {"summary.md", "fid_vs_nfe.png", "guidance_tradeoff.csv"} <= logged
    grids = client(workdir).list_artifacts(run.info.run_id, "grids")
    assert grids == []  # no grid files were written in this test: nothing stale is logged
    assert "| a | ddim | 5 |" in run.data.tags["mlflow.note.content"]

    # no training run in this store: the pipeline run logs and registers the model itself
    assert run.data.tags["model.run_id"] == run.info.run_id
    assert run.data.tags["model.version"] == "1" and "train.run_id" not in run.data.tags
    # the next pipeline run of the same model links to it instead of logging it again
    with contextlib.redirect_stdout(io.StringIO()):
        again = track.run(params)
    tags = client(workdir).get_run(again["run_id"]).data.tags
    assert tags["model.run_id"] == run.info.run_id and tags["model.version"] == "1"
    assert len(client(workdir).search_model_versions("name='diffusion-digits'")) == 1


def test_links_to_the_training_run_of_its_model(workdir: Path) -> None:
    training = Tracker.create("train-x", run_tags("h", None, kind="train"))
    assert training is not None
    training.log_model(paths.MODEL, "diffusion-digits", file_digest(paths.MODEL))
    with contextlib.redirect_stdout(io.StringIO()):
        out = track.run(params_of(METHODS))
    tags = client(workdir).get_run(out["run_id"]).data.tags
    assert tags["train.run_id"] == tags["model.run_id"] == training.run_id
    assert "model.logged" not in tags
