"""The MLflow UI and the `dvc plots` page in headless Chromium, on a tiny pipeline with a
two-experiment sweep (docs/tools/browser_check.py does the looking; `.ci/run` installs
Chromium where it is missing)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from _pipeline_helpers import REPO, tiny_raw
from test_e2e import dvc, make_repo

sys.path.insert(0, str(REPO / "docs" / "tools"))
import browser_check  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif("browser_check.chromium() is None and os.environ.get('CI') != 'true'",
                       reason="needs chromium (apt); under CI=true a missing one fails instead"),
]


def test_mlflow_ui_and_dvc_plots_page_render(tmp_path: Path) -> None:
    raw = tiny_raw()
    raw["methods"]["cfg1"] = {"sampler": "ddim", "steps": 5, "guidance": 1.0}
    env = make_repo(tmp_path, raw)
    dvc(tmp_path, env, "repro")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "baseline"], cwd=tmp_path, check=True)
    for steps in (3, 4):
        dvc(tmp_path, env, "exp", "run", "-S", f"methods.ddim5.steps={steps}")

    page = browser_check.plots_page(tmp_path, env)
    seen = browser_check.check_plots_page(page, data_charts=3)
    assert seen["images"] >= 3  # the two report figures and the grids
    with browser_check.mlflow_server(env["MLFLOW_TRACKING_URI"]) as base:
        found = browser_check.check_mlflow(base, swept="methods.ddim5.steps",
                                           screenshots=tmp_path / "shots", methods=2,
                                           compare_metric="fid/ddim5")
    assert len(found["runs"]) == 3  # the baseline and the two experiments
    assert found["methods"] == ["cfg1", "ddim5"]  # nested under the newest pipeline run
    assert found["run_count_shown"] == 1 + 3 * 3  # the training run, 3 pipeline runs, 6 methods
    assert {"fid", "fid_ci_low", "fid_diff"} <= set(found["fid_metrics_on_run_page"])
    for name in ("mlflow_runs.png", "mlflow_methods.png", "mlflow_compare.png"):
        assert (tmp_path / "shots" / name).stat().st_size > 10_000
