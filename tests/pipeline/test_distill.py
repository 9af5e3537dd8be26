"""The distill stage in-process on a tiny config: students per round, loadable and sampled by the
sample stage, exact resume, the skipped record, and check-params' rules for student methods."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from _pipeline_helpers import stage_workspace, tiny_raw

from pipeline import distill, paths, prepare, sample, train
from pipeline.config import Params, ParamsError, validate_params
from pipeline.sampling import load_model

STUDENT2 = {"sampler": "ddim", "steps": 2, "spacing": "trailing", "eta": 0.0, "student": 2}


def distill_raw(**changes: Any) -> dict[str, Any]:
    raw = tiny_raw()
    raw["distill"] = {"enabled": True, "teacher_steps": 4, "rounds": 2, "steps_per_round": 4,
                      "batch_size": 16, "lr": 1.0e-3, "nproc": 1, "checkpoint_every": 2,
                      "log_every": 2}
    raw["distill"].update(changes)
    raw["methods"]["student2"] = dict(STUDENT2)
    raw["methods"]["ddim2"] = {"sampler": "ddim", "steps": 2, "spacing": "trailing"}
    return raw


def distill_params(**changes: Any) -> Params:
    return validate_params(distill_raw(**changes))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """prepare, train (6 steps) and distill (2 rounds of 4 steps) once in a temporary folder."""
    root = tmp_path_factory.mktemp("distill")
    with stage_workspace(root):
        params = distill_params()
        prepare.run(params)
        train.run(params)
        distill.run(params)
        yield root


def test_each_round_writes_a_loadable_student_and_the_compute(workspace: Path) -> None:
    for steps in (2, 1):
        model = load_model(torch.device("cpu"), paths.student_path(steps))
        assert model.denoiser.prediction == "v"
        assert model.file["distill"]["steps"] == steps
    assert not paths.student_path(4).exists()
    record = json.loads(paths.DISTILL_METRICS.read_text())
    assert record["images_seen"] == 2 * 4 * 16  # rounds * steps_per_round * batch_size
    assert record["teacher_images_seen"] == 6 * 16  # train.steps * train.batch_size
    assert record["images_ratio"] == pytest.approx(128 / 96)
    assert set(record["students"]) == {"student_2", "student_1"}


def test_the_final_student_is_a_registered_model_of_its_own(workspace: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    versions = client.search_model_versions("name='diffusion-digits-student'")
    assert len(versions) == 1
    run = client.get_run(versions[0].run_id)
    assert run.data.tags["run.kind"] == "distill"
    assert run.data.metrics["distill/images_seen"] == 2 * 4 * 16


def test_a_student_differs_from_its_teacher(workspace: Path) -> None:
    teacher = torch.load(paths.MODEL, weights_only=True)["ema"]
    student = torch.load(paths.student_path(2), weights_only=True)["ema"]
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher)


def test_the_sample_stage_samples_the_student(workspace: Path) -> None:
    params = distill_params()
    record = sample.run(params, "student2")
    assert record["status"] == "ok" and record["nfe"] == 2
    provenance = json.loads(Path("provenance/sample@student2.json").read_text())
    assert provenance["model"] == paths.student_path(2).as_posix()
    sample.run(params, "ddim2")  # the teacher, same sampler and seeds
    drawn = torch.load(paths.samples_dir("student2") / "samples.pt", weights_only=True)
    undistilled = torch.load(paths.samples_dir("ddim2") / "samples.pt", weights_only=True)
    assert not torch.equal(drawn["images"], undistilled["images"])


def test_an_interrupted_run_resumes_to_the_same_students(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = distill_params()
    before = {k: paths.student_path(k).read_bytes() for k in (2, 1)}
    shutil.rmtree(paths.DISTILL_DIR)
    save = distill.save_state

    def stop_in_round_two(state: distill.RoundState, config_hash: str) -> None:
        save(state, config_hash)
        if state.index == 1 and state.step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(distill, "save_state", stop_in_round_two)
    with pytest.raises(KeyboardInterrupt):
        distill.run(params)
    assert paths.student_path(2).exists() and not paths.student_path(1).exists()
    monkeypatch.setattr(distill, "save_state", save)
    distill.run(params)
    assert {k: paths.student_path(k).read_bytes() for k in (2, 1)} == before


def test_disabled_writes_a_skipped_record_and_no_students(workspace: Path) -> None:
    keep = workspace / "kept"
    shutil.copytree(paths.DISTILL_DIR, keep, dirs_exist_ok=True)
    try:
        raw = distill_raw(enabled=False)
        del raw["methods"]["student2"]
        record = distill.run(validate_params(raw))
        assert record["status"] == "skipped"
        assert json.loads(paths.DISTILL_METRICS.read_text())["status"] == "skipped"
        assert paths.DISTILL_SKIPPED.is_file()
        assert not list(paths.DISTILL_DIR.glob("student_*.pt"))
    finally:
        shutil.rmtree(paths.DISTILL_DIR)
        shutil.copytree(keep, paths.DISTILL_DIR)


def one_line_error(raw: dict[str, Any]) -> str:
    with pytest.raises(ParamsError) as info:
        validate_params(raw)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_check_params_rejects_a_student_the_rounds_do_not_make() -> None:
    raw = distill_raw()
    raw["methods"]["student2"].update(student=3, steps=3)
    assert "methods.student2.student: the distill rounds make students of [2, 1] steps " \
           "(got 3)" in one_line_error(raw)


def test_check_params_rejects_a_student_without_the_distill_stage() -> None:
    message = one_line_error(distill_raw(enabled=False))
    assert "methods.student2.student: needs the distill stage (distill.enabled: true)" in message


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("steps", 4, "methods.student2.steps: must equal student=2 (got 4)"),
    ("spacing", "linspace", "methods.student2.spacing: a student's grid is trailing"),
    ("eta", 1.0, "methods.student2.eta: a student takes deterministic steps"),
])
def test_check_params_rejects_a_student_sampled_off_its_grid(key: str, value: Any,
                                                             expected: str) -> None:
    raw = distill_raw()
    raw["methods"]["student2"][key] = value
    assert expected in one_line_error(raw)


@pytest.mark.parametrize(("changes", "expected"), [
    ({"teacher_steps": 6}, "distill.teacher_steps: must be a power of two (got 6)"),
    ({"rounds": 3}, "distill.rounds: at most log2(distill.teacher_steps=4) = 2 halvings (got 3)"),
])
def test_check_params_rejects_rounds_the_teacher_cannot_halve(changes: dict[str, Any],
                                                              expected: str) -> None:
    raw = distill_raw(**changes)
    del raw["methods"]["student2"]
    assert expected in one_line_error(raw)
