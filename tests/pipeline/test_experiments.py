"""DVC experiments and MLflow together, in temporary git repositories on a tiny config:
a queued sweep with two workers, a clone at another path, and a clone that pulls from a
local-folder DVC remote instead of retraining."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from _pipeline_helpers import tiny_raw
from test_e2e import dvc, make_repo, runs_of

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

GIT_ID = ["-c", "user.name=test", "-c", "user.email=test@example.com"]


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *GIT_ID, *args], cwd=root, check=True, capture_output=True,
                          text=True).stdout


def committed_baseline(root: Path) -> dict[str, str]:
    """A tiny pipeline reproduced and committed (results included) in ``root``."""
    env = make_repo(root, tiny_raw())
    dvc(root, env, "repro")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "baseline")
    return env


def test_queued_sweep_with_two_workers_logs_one_run_per_experiment(tmp_path: Path) -> None:
    env = committed_baseline(tmp_path)
    env.pop("MLFLOW_TRACKING_URI")  # the default store: sqlite at $DVC_ROOT, the main repo
    before = len(runs_of(tmp_path, "pipeline"))
    dvc(tmp_path, env, "exp", "run", "--queue", "-S", "methods.ddim5.steps=3,4")
    dvc(tmp_path, env, "queue", "start", "-j", "2")
    deadline = time.time() + 480
    while True:
        status = dvc(tmp_path, env, "queue", "status")
        if "Queued" not in status and "Running" not in status:
            break
        assert time.time() < deadline, status
        time.sleep(3)
    assert status.count("Success") == 2, status

    shown = json.loads(dvc(tmp_path, env, "exp", "show", "--json"))
    names = set()
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            names.update(e["name"] for e in exp.get("revs", []) if e.get("name"))
    assert len(names) == 2, shown

    runs = runs_of(tmp_path, "pipeline")
    new = [r for r in runs if r.data.tags.get("dvc.exp_name")]
    assert len(runs) == before + 2 and len(new) == 2
    assert {r.data.tags["dvc.exp_name"] for r in new} == names
    assert {r.info.run_name for r in new} == names
    assert sorted(r.data.params["methods.ddim5.steps"] for r in new) == ["3", "4"]
    nested = {r.data.tags["mlflow.parentRunId"]: r for r in runs_of(tmp_path, "method")}
    assert sorted(nested[r.info.run_id].data.metrics["nfe"] for r in new) == [3.0, 4.0]
    # the compare view of the sweep: the baseline's run and both experiments carry fid/ddim5
    assert len(runs) == 3 and all("fid/ddim5" in r.data.metrics for r in runs)
    baseline_rev = git(tmp_path, "rev-parse", "HEAD").strip()
    assert {r.data.tags["dvc.baseline_rev"] for r in new} == {baseline_rev}
    assert all(r.data.tags["train.run_id"] for r in new)  # the baseline's training run
    assert len(runs_of(tmp_path, "train")) == 1  # the model came from the cache: no retraining
    assert not (tmp_path / ".dvc" / "tmp" / "exps" / "mlflow.db").exists()

    # the experiments' commits exist now; `diffusion track --sync` tags their runs with them
    out = subprocess.run(
        ["python", "-m", "pipeline", "track", "--sync"], cwd=tmp_path, env=env,
        capture_output=True, text=True, check=True,
    ).stdout
    assert "tagged 4 experiment run(s)" in out  # two pipeline runs and their method runs
    refs = git(tmp_path, "for-each-ref", "--format=%(objectname)", "refs/exps").split()
    for run in runs_of(tmp_path, "pipeline"):
        if run.data.tags.get("dvc.exp_name"):
            assert run.data.tags["dvc.exp_rev"] in refs
            assert run.data.tags["git.commit"] == run.data.tags["dvc.exp_rev"]


def test_clones_log_to_their_own_store_and_pull_instead_of_retraining(tmp_path: Path) -> None:
    origin = tmp_path / "origin"
    origin.mkdir()
    env = committed_baseline(origin)
    remote = tmp_path / "dvc-remote"
    dvc(origin, env, "remote", "add", "-d", "--local", "shared", str(remote))
    dvc(origin, env, "push")

    clone = tmp_path / "elsewhere" / "clone"
    git(tmp_path, "clone", "-q", str(origin), str(clone))
    clone_env = dict(env, MLFLOW_TRACKING_URI=f"sqlite:///{clone / 'mlflow.db'}")
    dvc(clone, clone_env, "remote", "add", "-d", "--local", "shared", str(remote))
    dvc(clone, clone_env, "pull")
    assert dvc(clone, clone_env, "status").split() == ["track:", "always", "changed"]
    out = dvc(clone, clone_env, "repro")
    assert out.count("Running stage") == 1 and "Running stage 'track'" in out  # nothing re-made
    assert len(runs_of(clone, "pipeline")) == 1  # the pulled state, in the clone's own store

    # a changed method re-samples from the pulled model and logs into the clone's own store
    params = (clone / "params.yaml").read_text().replace("steps: 5", "steps: 4")
    (clone / "params.yaml").write_text(params)
    out = dvc(clone, clone_env, "repro")
    assert "Running stage 'train'" not in out and "Running stage 'track'" in out
    run, first = sorted(runs_of(clone, "pipeline"), key=lambda r: -r.info.start_time)
    assert run.data.params["methods.ddim5.steps"] == "4"
    # the clone's first pipeline run logged the pulled model into this store; the next links it
    assert first.data.tags["model.run_id"] == first.info.run_id
    assert run.data.tags["model.run_id"] == first.info.run_id
    assert len(runs_of(origin, "pipeline")) == 1  # the origin's store is untouched
    assert subprocess.run(["git", "status", "--porcelain", "--", "runs/train"], cwd=clone,
                          capture_output=True, text=True).stdout == ""
