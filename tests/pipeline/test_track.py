"""The track stage on hand-written stage outputs: one MLflow pipeline run per evaluated state
with a nested run per method, the guidance curves, the artifacts, and the model linked (or
logged when the store lacks it)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from test_report import METHODS, params_of, write_records
from test_tracking import tiny_model

from pipeline import paths, report, track
from pipeline.files import file_digest, read_json, write_json, write_text, write_timing
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
    assert metrics["fid/a"] == 10.0 and metrics["fid/b4"] == 30.0
    assert metrics["fid_diff/a"] == 0.0 and metrics["fid_diff/b4"] == 20.0
    assert not [k for k in metrics if k.startswith(("fid_ci", "nfe/", "class_accuracy/"))]
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
    write_text(paths.SUMMARY_MD, "another state\n")
    with contextlib.redirect_stdout(io.StringIO()):
        again = track.run(params)
    assert again["run_id"] != run.info.run_id
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


def method_runs(workdir: Path, parent: str) -> dict[str, object]:
    runs = client(workdir).search_runs(
        [client(workdir).get_run(parent).info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent}'",
    )
    return {r.info.run_name: r for r in runs}


def test_one_nested_run_per_method_with_its_settings_and_scores(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        out = track.run(params_of(METHODS))
    runs = method_runs(workdir, out["run_id"])
    assert set(runs) == set(METHODS)
    b4, a = runs["b4"], runs["a"]
    assert b4.info.status == "FINISHED" and b4.data.tags["run.kind"] == "method"
    assert b4.data.params["sampler"] == "ddim" and b4.data.params["steps"] == "5"
    assert b4.data.params["guidance"] == "4.0" and b4.data.params["baseline"] == "a"
    assert b4.data.params["clip_x0"] == "False" and b4.data.params["n_images"] == "20"
    m = b4.data.metrics
    assert (m["fid"], m["fid_ci_low"], m["fid_ci_high"]) == (30.0, 28.5, 31.5)
    assert m["fid_diff"] == 20.0 and m["fid_diff_ci_low"] > 0 and m["class_accuracy"] == 0.95
    assert m["nfe"] == 5.0 and "images_per_s" not in m and a.data.metrics["images_per_s"] == 10.0
    assert b4.data.tags["vs_baseline"] == "worse" and a.data.tags["vs_baseline"] == "baseline"
    assert b4.data.tags["verdict"] == "worse than floor"
    assert "class_accuracy" not in runs["u"].data.metrics
    # the experiment's saved view of the runs table: this state's methods, sorted by NFE
    experiment = client(workdir).get_experiment(b4.info.experiment_id)
    view = json.loads(experiment.tags["mlflow.sharedViewState.methods"])
    state = b4.data.tags["pipeline.state"]
    assert view["searchFilter"] == (f"tags.`run.kind` = 'method' and tags.`pipeline.state` = "
                                    f"'{state}'")
    assert "metrics.`fid_diff`" in view["selectedColumns"] and view["orderByKey"] == "metrics.`nfe`"
    shown = client(workdir).search_runs([experiment.experiment_id], view["searchFilter"])
    assert len(shown) == len(METHODS)
    # the tidy table of methods a user gets from MLflow
    import mlflow

    # the environment, not mlflow.set_tracking_uri: that would outlive this test in the worker
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")
    table = mlflow.search_runs(experiment_names=["track-test"],
                               filter_string="tags.`run.kind` = 'method'")
    assert len(table) == len(METHODS)
    assert {"metrics.fid", "metrics.fid_diff", "params.sampler", "tags.method"} <= set(table)


def test_an_unchanged_state_is_logged_once(workdir: Path) -> None:
    params = params_of(METHODS)
    with contextlib.redirect_stdout(io.StringIO()):
        first = track.run(params)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        second = track.run(params)
    assert second["run_id"] == first["run_id"] and "already logged" in printed.getvalue()
    experiment = client(workdir).get_run(first["run_id"]).info.experiment_id
    assert len(client(workdir).search_runs([experiment])) == 1 + len(METHODS)
    # another evaluated state (here: a changed report) is a new pipeline run
    write_json(paths.eval_record("a"), {**read_json(paths.eval_record("a")), "fid": 10.5})
    with contextlib.redirect_stdout(io.StringIO()):
        third = track.run(params)
    assert third["run_id"] != first["run_id"]
    assert track.state_key(params) == client(workdir).get_run(third["run_id"]).data.tags[
        "pipeline.state"]


def test_the_distill_stage_compute_is_logged_in_the_pipeline_run(workdir: Path) -> None:
    write_json(paths.DISTILL_METRICS, {"status": "ok", "images_seen": 300, "images_ratio": 1.5,
                                       "wall_s": 12.0, "students": {"student_1": {}}})
    with contextlib.redirect_stdout(io.StringIO()):
        out = track.run(params_of(METHODS))
    metrics = client(workdir).get_run(out["run_id"]).data.metrics
    assert metrics["distill/images_seen"] == 300 and metrics["distill/images_ratio"] == 1.5
    assert metrics["distill/wall_s"] == 12.0
