"""dvc.yaml agrees with the code: each stage depends on every project file its module imports,
and writes the paths pipeline/paths.py names."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from _pipeline_helpers import REPO

from pipeline import paths

PACKAGES = ("pipeline", "diffusion_core")
# MLflow code has no effect on the stages' outputs: not a reason to re-run them (the track
# stage, which has no outputs, lists them so that a change to tracking logs a new run).
NOT_DEPS = {"pipeline/tracking.py", "pipeline/mlflow_model.py"}
STAGE_MODULES = {
    "prepare": "pipeline.prepare",
    "classifier": "pipeline.classifier",
    "train": "pipeline.train",
    "distill": "pipeline.distill",
    "sample": "pipeline.sample",
    "evaluate": "pipeline.evaluate",
    "report": "pipeline.report",
    "pictures": "pipeline.pictures",
    "track": "pipeline.track",
}


def module_file(name: str) -> Path | None:
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def project_imports(path: Path, package: str) -> set[str]:
    """Dotted names of project modules imported anywhere in ``path`` (lazy imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return {n for n in names if n.split(".")[0] in PACKAGES and module_file(n)}


def closure(module: str) -> set[str]:
    """Repository-relative files of ``module`` and every project module it imports."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = module_file(name)
        if path is None or path in seen:
            continue
        seen.add(path)
        if path.relative_to(REPO).as_posix() in NOT_DEPS:
            continue  # MLflow code: neither it nor what it imports decides a stage's outputs
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        parents = [".".join(name.split(".")[:i]) for i in range(1, len(name.split(".")))]
        todo.extend(parents)
        todo.extend(project_imports(path, package))
    files = {p.relative_to(REPO).as_posix() for p in seen}
    empty_inits = {f for f in files if f.endswith("__init__.py") and not (REPO / f).read_text()}
    return files - empty_inits - NOT_DEPS


@pytest.fixture(scope="module")
def stages() -> dict[str, Any]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def dep_paths(stage: dict[str, Any]) -> list[str]:
    body = stage.get("do", stage)
    return [d if isinstance(d, str) else next(iter(d)) for d in body["deps"]]


def covered(file: str, deps: list[str]) -> bool:
    return any(file == d or file.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", sorted(STAGE_MODULES))
def test_stage_depends_on_all_code_it_imports(stages: dict[str, Any], stage: str) -> None:
    deps = dep_paths(stages[stage])
    missing = sorted(f for f in closure(STAGE_MODULES[stage]) if not covered(f, deps))
    assert not missing, f"add to the deps of stage {stage!r} in dvc.yaml: {missing}"
    for dep in deps:  # a file or folder of the repository, or what another stage writes
        assert (REPO / dep).exists() or written_by_another_stage(stages, stage, dep), (
            f"stage {stage!r} depends on {dep!r}: neither in the repository nor an output of "
            "another stage"
        )


def written_by_another_stage(stages: dict[str, Any], stage: str, dep: str) -> bool:
    """Whether another stage writes ``dep``, a path inside it or a folder holding it (templated
    paths such as ``runs/samples/${key}`` match the same template)."""
    def inside(a: str, b: str) -> bool:
        return a == b or a.startswith(b.rstrip("/") + "/")

    return any(inside(dep, out) or inside(out, dep)
               for name, body in stages.items() if name != stage for out in outs(body))


def outs(stage: dict[str, Any]) -> set[str]:
    body = stage.get("do", stage)
    found = set()
    for kind in ("outs", "metrics", "plots"):
        for entry in body.get(kind, []):
            found.add(entry if isinstance(entry, str) else next(iter(entry)))
    return found


def test_stage_outputs_match_paths_module(stages: dict[str, Any]) -> None:
    key = "${key}"
    expected = {
        "prepare": {paths.PREPARED},
        "classifier": {paths.CLASSIFIER, paths.REFERENCE_FEATURES, paths.CLASSIFIER_METRICS},
        "train": {
            paths.CHECKPOINTS,
            paths.MODEL,
            paths.TRAIN_METRICS,
            paths.LOSS_CSV,
        },
        "distill": {paths.DISTILL_DIR, paths.DISTILL_METRICS},
        "sample": {paths.samples_dir(key), paths.grid_path(key), paths.sample_metrics(key)},
        "evaluate": {paths.EVAL_METRICS, paths.EVAL_RECORDS},
        "report": {
            paths.SUMMARY,
            paths.COMPARE,
            paths.SUMMARY_MD,
            paths.FID_VS_NFE,
            paths.FID_VS_NFE_PNG,
            paths.GUIDANCE_TRADEOFF,
            paths.GUIDANCE_TRADEOFF_PNG,
        },
        "track": set(),  # no outputs: it logs to MLflow, on every repro (always_changed)
    }
    for stage, files in expected.items():
        assert outs(stages[stage]) == {p.as_posix() for p in files}, stage
    assert stages["track"].get("always_changed") is True
    assert not any(body.get("always_changed") for name, body in stages.items() if name != "track")


def test_sampling_is_per_method_and_scoring_is_one_stage(stages: dict[str, Any]) -> None:
    # sampling is the costly part: one stage per method, re-run only when its method changes
    assert stages["sample"]["foreach"] == "${methods}"
    assert "methods" not in stages["sample"]["do"]["params"]
    assert "methods.${key}" in stages["sample"]["do"]["params"]
    # scoring costs well under a second a method: one process for all, re-run on any change
    assert "foreach" not in stages["evaluate"]
    assert "methods" in stages["evaluate"]["params"]
    assert {"runs/samples", "metrics/sample"} <= set(dep_paths(stages["evaluate"]))


def test_train_runs_under_torchrun_with_nproc_from_params(stages: dict[str, Any]) -> None:
    cmd = stages["train"]["cmd"]
    assert "python -m torch.distributed.run --standalone" in cmd
    assert "--nproc-per-node=${train.nproc}" in cmd
    assert "OMP_NUM_THREADS=${train.threads_per_proc}" in cmd
    checkpoints = next(o for o in stages["train"]["outs"] if isinstance(o, dict))
    assert checkpoints == {paths.CHECKPOINTS.as_posix(): {"persist": True}}


def test_report_figures_are_uncached_image_plots(stages: dict[str, Any]) -> None:
    plots = {next(iter(p)): next(iter(p.values())) for p in stages["report"]["plots"]}
    for png in (paths.FID_VS_NFE_PNG, paths.GUIDANCE_TRADEOFF_PNG):
        assert plots[png.as_posix()] == {"cache": False}
    tradeoff = plots[paths.GUIDANCE_TRADEOFF.as_posix()]
    assert (tradeoff["x"], tradeoff["y"], tradeoff["cache"]) == ("class_accuracy", "fid", False)


def test_a_cheap_check_stage_guards_every_other_stage(stages: dict[str, Any]) -> None:
    """A bad edit of params.yaml fails `check` before DVC deletes any other stage's outputs."""
    check = stages["check"]
    assert "check-params" in check["cmd"] and paths.PARAMS_OK.as_posix() in check["cmd"]
    assert outs(check) == {paths.PARAMS_OK.as_posix()}
    top_level = set(yaml.safe_load((REPO / "params.yaml").read_text()))
    assert set(check["params"]) == top_level
    for name, stage in stages.items():
        if name != "check":
            assert paths.PARAMS_OK.as_posix() in dep_paths(stage), name


def test_train_runs_under_the_launcher(stages: dict[str, Any]) -> None:
    cmd = stages["train"]["cmd"]
    launcher = "python -m pipeline.launch --params params.yaml --"
    assert cmd.index(launcher) < cmd.index("python -m torch.distributed.run")


def test_the_committed_lock_matches_the_code_and_params() -> None:
    """`dvc.lock` is written by DVC only: every stage's recorded code and params are those of
    the tree, so `dvc status` reports no changed dependency that Git tracks (outputs the DVC
    cache holds may be missing in a fresh clone; the track stage is always changed)."""
    tracked = set(subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                                 check=True).stdout.split())
    out = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    stale = []
    for stage, changes in json.loads(out or "{}").items():
        for change in changes:
            if not isinstance(change, dict):
                continue
            for path, what in change.get("changed deps", {}).items():
                if path in tracked or isinstance(what, dict):  # a file, or params.yaml's keys
                    stale.append(f"{stage}: {path} {what}")
    assert not stale, "dvc.lock is out of date (run `make run` and commit dvc.lock):\n" + "\n".join(
        stale)
