"""The sample stage under torchrun, run with dvc.yaml's own command: two CPU processes (gloo)
write the samples, grid and metrics of one process, byte for byte."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from _pipeline_helpers import REPO, tiny_model, tiny_raw, write_params

from pipeline import paths

# ancestral sampling (fresh noise at every step) with labels and guidance
METHOD = "guided"
SPEC = {"sampler": "ddpm", "steps": 4, "guidance": 1.0, "classes": [1, 2, 3]}
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def stage_command(nproc: int, method: str) -> list[str]:
    """dvc.yaml's sample command for ``method`` with ``sample.nproc = nproc``, run by this
    interpreter."""
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["sample"]["do"]
    cmd = stage["cmd"].replace("${sample.nproc}", str(nproc)).replace("${key}", method)
    return [sys.executable if word == "python" else word for word in shlex.split(cmd)]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The stage with sample.nproc 1 and 2, each in a folder of its own."""
    folders = {}
    for nproc in (1, 2):
        root = tmp_path_factory.mktemp(f"nproc{nproc}")
        raw = tiny_raw()
        raw["sample"].update(n_images=7, batch_size=2, nproc=nproc)  # uneven shares, 2 batches
        raw["methods"] = {METHOD: SPEC}
        write_params(root / "params.yaml", raw)
        tiny_model(root / paths.MODEL)
        proc = subprocess.run(stage_command(nproc, METHOD), cwd=root, env=ENV,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.count(f"{METHOD}: 7 images in") == 1, proc.stdout  # rank 0 only
        folders[nproc] = root
    return folders


def test_two_processes_write_the_files_of_one(runs: dict[int, Path]) -> None:
    for name in (paths.samples_dir(METHOD) / "samples.pt", paths.grid_path(METHOD),
                 paths.sample_metrics(METHOD)):
        assert (runs[1] / name).read_bytes() == (runs[2] / name).read_bytes(), name
    provenance = [read_json(runs[n] / "provenance" / f"sample@{METHOD}.json") for n in (1, 2)]
    assert provenance[0].pop("params_hash") != provenance[1].pop("params_hash")  # nproc differs
    assert provenance[0] == provenance[1]
    assert read_json(runs[2] / "runs/timing" / f"sample@{METHOD}.json")["world_size"] == 2


def test_a_bad_method_is_one_line_and_exit_2_under_the_launcher(runs: dict[int, Path]) -> None:
    proc = subprocess.run(stage_command(2, "nope"), cwd=runs[2], env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"params.yaml: methods: no method named 'nope' (have: {METHOD})"
    ]
