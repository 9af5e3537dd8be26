"""MLflow tracking: one run, re-opened by id, best effort when MLflow fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.tracking import Tracker, run_tags, tracking_uri


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "test-exp")
    return tracking_uri()


def test_default_store_is_sqlite_at_the_repo_root(store: str, tmp_path: Path) -> None:
    assert store == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_env_uri_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/m.db")
    assert tracking_uri(Path("/repo")) == "sqlite:////elsewhere/m.db"


def test_run_created_reopened_and_logged(store: str, tmp_path: Path) -> None:
    tracker = Tracker.create("train", run_tags("abc123", "deadbeef"))
    assert tracker is not None
    tracker.log_params({"train.lr": 0.002, "model.channel_mults": [1, 2]})
    tracker.log_metrics({"train/loss": 0.5, "skip": "not a number"}, step=10)
    link = tmp_path / "runs" / "mlflow_run.json"
    tracker.write_link(link)
    tracker.finish()

    again = Tracker.reopen(link)
    assert again is not None and again.run_id == tracker.run_id
    again.log_params({"train.lr": 0.5, "train.new": 1}, only_new=True)  # lr is write-once
    again.log_metrics({"fid_classifier/ddim5": 12.5})
    grid = tmp_path / "grid.png"
    grid.write_bytes(b"png")
    again.log_artifact(grid, "grids")
    assert again.enabled

    client = MlflowClient(store)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {
        "train.lr": "0.002",
        "model.channel_mults": "[1, 2]",
        "train.new": "1",
    }
    assert run.data.metrics == {"train/loss": 0.5, "fid_classifier/ddim5": 12.5}
    assert run.data.tags["params.hash"] == "abc123"
    assert run.data.tags["git.commit"] == "deadbeef"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "grids")] == ["grids/grid.png"]
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    assert json.loads(link.read_text())["tracking_uri"] == store


def test_missing_link_and_unreachable_store_turn_tracking_off(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert Tracker.reopen(tmp_path / "nope.json") is None
    link = tmp_path / "link.json"
    link.write_text(json.dumps({"run_id": None, "experiment_id": None, "tracking_uri": None}))
    assert Tracker.reopen(link) is None
    link.write_text(
        json.dumps(
            {
                "run_id": "0" * 32,
                "experiment_id": "1",
                "tracking_uri": "sqlite:///" + str(tmp_path / "x.db"),
            }
        )
    )
    assert Tracker.reopen(link) is None
    assert "warning" in capsys.readouterr().err


def test_a_failing_call_warns_once_and_disables(capsys: pytest.CaptureFixture[str]) -> None:
    class Broken:
        def log_batch(self, *args: object, **kwargs: object) -> None:
            raise RuntimeError("database is locked")

    tracker = Tracker(Broken(), "r", "1", "sqlite:///x")
    tracker.log_metrics({"a": 1.0})
    tracker.log_metrics({"b": 2.0})
    err = capsys.readouterr().err
    assert err.count("warning: MLflow") == 1
    assert "database is locked" in err
    assert not tracker.enabled
