"""The report stage on hand-written sample/evaluate records: the table, the FID-NFE and guidance
trade-off CSVs, the figures and the MLflow trade-off curve (no training needed)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _pipeline_helpers import tiny_raw
from PIL import Image

from pipeline import paths, report
from pipeline.config import Params, validate_params
from pipeline.errors import StageError
from pipeline.files import read_json, write_json

FLOOR = 2.0
# name: (method spec, FID, class accuracy or None); the sample records give NFE = steps.
METHODS: dict[str, tuple[dict[str, Any], float, float | None]] = {
    "a": ({"sampler": "ddim", "steps": 5}, 10.0, 0.50),
    "b4": ({"sampler": "ddim", "steps": 5, "guidance": 4.0}, 30.0, 0.95),
    "b1": ({"sampler": "ddim", "steps": 5, "guidance": 1.0}, 12.0, 0.80),
    "eta": ({"sampler": "ddim", "steps": 5, "eta": 1.0}, 11.0, 0.55),  # other settings: not a w=0
    "ddpm": ({"sampler": "ddpm", "steps": 5}, 9.0, 0.60),  # other sampler: not in the family
    "u": ({"sampler": "ddim", "steps": 5, "unconditional": True}, 8.0, None),
    "e": ({"sampler": "ddim", "steps": 10, "guidance": 0.5}, 7.0, 0.70),  # a second family
}


def params_of(methods: dict[str, tuple[dict[str, Any], float, float | None]]) -> Params:
    raw = tiny_raw()
    raw["methods"] = {name: spec for name, (spec, _, _) in methods.items()}
    return validate_params(raw)


#: the joint plan every record shares; its draws are FID + a shared offset + a small own noise
PLAN = {"seed": 2, "n": 400, "n_reference": 225, "draws": 200}
SHARED = np.random.default_rng(0).normal(0.0, 3.0, PLAN["draws"])


def joint_draws(name: str, fid: float) -> list[float]:
    own = np.random.default_rng(sum(map(ord, name))).normal(0.0, 0.5, PLAN["draws"])
    return (fid + SHARED + own).tolist()


def write_records(methods: dict[str, tuple[dict[str, Any], float, float | None]]) -> None:
    """What the sample and evaluate stages would have written, in the working directory."""
    for name, (spec, fid, accuracy) in methods.items():
        write_json(
            paths.sample_metrics(name),
            {"status": "ok", "nfe": float(spec["steps"]), "images_per_s": 100.0},
        )
        scored = {
            "status": "ok",
            "extractor": "classifier",
            "verdict": "worse than floor",
            "fid": fid,
            "fid_ci_low": fid - 1.5,
            "fid_ci_high": fid + 1.5,
            "fid_matched": fid,
            "fid_matched_n": 400,
            "fid_floor": FLOOR,
            "fid_floor_ci_low": FLOOR - 1.0,
            "fid_floor_ci_high": FLOOR + 1.0,
            "kid_x1000": fid * 10,
            "kid_x1000_std": 1.0,
            "precision": 0.9,
            "recall": 0.5,
            "density": 1.1,
            "coverage": 0.8,
            "near_copy_fraction": 0.02,
            "unclear_fraction": 0.05,
            "unclear_fraction_ci_low": 0.034,
            "unclear_fraction_ci_high": 0.073,
            "unclear_fraction_floor": 0.04,
            "confidence": 0.95,
            "n_images": 400,
            "joint_plan": PLAN,
            "fid_joint_draws": joint_draws(name, fid),
        }
        if accuracy is not None:
            scored["class_accuracy"] = accuracy
        write_json(paths.eval_record(name), scored)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(data)).size


def test_guidance_families_group_by_everything_but_w() -> None:
    params = params_of(METHODS)
    rows = [
        {"method": n, "guidance": spec.get("guidance", 0.0), "status": "ok", "class_accuracy": a}
        for n, (spec, _, a) in METHODS.items()
    ]
    families = report.guidance_families(params, rows)
    assert {k: [r["method"] for r in v] for k, v in families.items()} == {
        "b4": ["a", "b1", "b4"],  # named after the first guided method in params order
        "e": ["e"],
    }


def test_report_writes_the_tradeoff_csv_and_figures(workdir: Path) -> None:
    write_records(METHODS)
    summary = report.run(params_of(METHODS))
    lines = (workdir / paths.GUIDANCE_TRADEOFF).read_text().splitlines()
    assert lines == [
        "method,sampler,steps,guidance,fid,class_accuracy",
        "a,ddim,5,0,10,0.5",
        "e,ddim,10,0.5,7,0.7",
        "b1,ddim,5,1,12,0.8",
        "b4,ddim,5,4,30,0.95",
    ]
    assert [r["method"] for r in summary["guidance_tradeoff"]] == ["a", "e", "b1", "b4"]
    nfe_csv = (workdir / paths.FID_VS_NFE).read_text().splitlines()
    # FID against NFE compares the unguided conditional samplers; guided and null-label
    # methods are left to the trade-off plot and the table
    assert [line.split(",")[0] for line in nfe_csv[1:]] == ["a", "eta", "ddpm"]
    assert "| u | ddim | 5 | null label |" in (workdir / paths.SUMMARY_MD).read_text()
    assert summary["methods"]["u"]["class_accuracy"] is None
    for png in (paths.FID_VS_NFE_PNG, paths.GUIDANCE_TRADEOFF_PNG):
        width, height = png_size(workdir / png)
        assert width > 300 and height > 200


def test_table_shows_intervals_and_paired_verdicts(workdir: Path) -> None:
    """FIDs 7 to 30, each +- 1.5 on its own, and joint draws whose shared offset cancels in a
    difference (the own noise left: sd 0.7): 1 apart is not resolved, 2 apart is."""
    write_records(METHODS)
    report.run(params_of(METHODS))
    table = (workdir / paths.SUMMARY_MD).read_text()
    assert "| 10 [8.5, 11.5] | " in table and " | 10 (m = 400) | 2 [1, 3] | 100 +- 1 |" in table
    assert "ΔFID vs a [CI] | vs a |" in table  # the baseline: the first method by default
    assert "worse than floor" in table and "Paired verdicts at n = 400" in table
    summary = read_json(workdir / paths.SUMMARY)
    rows, pairs = summary["methods"], summary["pairs"]
    assert rows["a"]["vs_baseline"] == "baseline" and rows["a"]["fid_diff"] == 0.0
    assert rows["b1"]["vs_baseline"] == "worse" and rows["b1"]["fid_diff"] == 2.0
    assert rows["b1"]["fid_diff_ci_low"] > 0 and rows["b1"]["fid_diff_ci_high"] < 4.0
    assert rows["b1"]["fid_diff_shared"] > 0.9  # most of the noise is shared
    assert rows["eta"]["vs_baseline"] == "not resolved"  # 11 vs 10
    assert rows["ddpm"]["vs_baseline"] == "not resolved"  # 9 vs 10
    assert rows["e"]["vs_baseline"] == "better"  # 7 vs 10
    assert pairs["b4"]["a"] == "worse" and pairs["a"]["b4"] == "better"
    assert pairs["u"]["ddpm"] == "not resolved"  # 8 vs 9
    assert "| `a` |  | < | < | · | · | > | > |" in table  # row a against every column
    compare = read_json(workdir / paths.COMPARE)
    assert compare["b1"]["vs_baseline"] == "worse" and set(compare) == set(METHODS)
    csv = (workdir / paths.FID_VS_NFE).read_text().splitlines()
    assert csv[0].startswith("method,sampler,nfe,fid,fid_ci_low,fid_ci_high,fid_matched,")
    assert csv[1] == "a,ddim,5,10,8.5,11.5,10,400,2,1,3,worse than floor,classifier"


def test_the_configured_baseline_and_draws_of_another_plan(workdir: Path) -> None:
    write_records(METHODS)
    other = read_json(paths.eval_record("eta"))
    write_json(paths.eval_record("eta"), {**other, "joint_plan": {**PLAN, "n": 300}})
    raw = params_of(METHODS).model_dump(mode="json")
    raw["evaluate"]["baseline"] = "ddpm"
    report.run(validate_params(raw))
    rows = read_json(workdir / paths.SUMMARY)["methods"]
    assert rows["ddpm"]["vs_baseline"] == "baseline"
    assert rows["a"]["vs_baseline"] == "not resolved" and rows["b1"]["vs_baseline"] == "worse"
    assert "fid_diff" not in rows["eta"]  # not paired with draws of another plan
    assert "ΔFID vs ddpm [CI]" in (workdir / paths.SUMMARY_MD).read_text()


def test_report_without_guidance_methods_writes_empty_tradeoff(workdir: Path) -> None:
    methods = {k: METHODS[k] for k in ("a", "u")}
    write_records(methods)
    summary = report.run(params_of(methods))
    assert (workdir / paths.GUIDANCE_TRADEOFF).read_text() == (
        "method,sampler,steps,guidance,fid,class_accuracy\n"
    )
    assert summary["guidance_tradeoff"] == []
    png_size(workdir / paths.GUIDANCE_TRADEOFF_PNG)
    png_size(workdir / paths.FID_VS_NFE_PNG)


def test_skipped_guided_method_leaves_the_curve(workdir: Path) -> None:
    methods = {k: METHODS[k] for k in ("a", "b1", "b4")}
    write_records(methods)
    write_json(paths.sample_metrics("b4"), {"status": "skipped", "reason": "test"})
    write_json(paths.eval_record("b4"), {"status": "skipped", "reason": "test"})
    report.run(params_of(methods))
    rows = (workdir / paths.GUIDANCE_TRADEOFF).read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == ["a", "b1"]


def test_files_of_removed_methods_are_pruned(workdir: Path) -> None:
    write_records(METHODS)
    for name in ("a", "gone"):
        paths.grid_path(name).parent.mkdir(parents=True, exist_ok=True)
        paths.grid_path(name).write_bytes(b"png")
    write_json(paths.sample_metrics("gone"), {"status": "ok", "nfe": 5.0})
    write_json(paths.eval_metrics("gone"), {"status": "ok"})
    write_json(paths.eval_record("gone"), {"status": "ok"})
    with contextlib.redirect_stdout(io.StringIO()):
        report.run(params_of(METHODS))
    assert not paths.grid_path("gone").exists()
    assert not paths.sample_metrics("gone").exists() and not paths.eval_metrics("gone").exists()
    assert not paths.eval_record("gone").exists()
    assert paths.grid_path("a").exists() and paths.eval_record("a").exists()
    assert "gone" not in (workdir / paths.SUMMARY_MD).read_text()


def test_table_names_autoguidance_in_the_guidance_column(workdir: Path) -> None:
    methods = {"ag": ({"sampler": "ddim", "steps": 5, "autoguidance": 1.5}, 9.0, 0.5),
               "both": ({"sampler": "ddim", "steps": 5, "autoguidance": 1.0, "guidance": 2.0},
                        9.5, 0.9)}
    raw = tiny_raw()
    raw["train"]["guide_at"] = 0.25
    raw["methods"] = {name: spec for name, (spec, _, _) in methods.items()}
    write_records(methods)
    report.run(validate_params(raw))
    table = (workdir / paths.SUMMARY_MD).read_text()
    assert "| ag | ddim | 5 | auto 1.5 |" in table
    assert "| both | ddim | 5 | 2 + auto 1 |" in table
    assert "| 0.020 | 0.050 [0.034, 0.073] (0.040) |" in table  # near copies, unclear (real)


def test_readme_table_is_written_between_the_markers(workdir: Path) -> None:
    write_records(METHODS)
    report.run(params_of(METHODS))
    readme = workdir / "README.md"
    readme.write_text(f"intro\n{report.README_START}\nold\n{report.README_END}\nrest\n")
    assert report.write_readme_table(readme) is True
    text = readme.read_text()
    assert text.startswith(f"intro\n{report.README_START}\n| method |") and "old" not in text
    assert text.endswith(f"{report.README_END}\nrest\n")
    assert "| `b1` | ddim | 5 | 1 | 5 | 12.0 [10.5, 13.5] | +2.0 [+" in text
    assert "| `a` | ddim | 5 | 0 | 5 | 10.0 [8.5, 11.5] | 0 (baseline) | baseline |" in text
    assert report.write_readme_table(readme) is False  # already up to date
    readme.write_text("no block\n")
    with pytest.raises(StageError, match="no results block"):
        report.write_readme_table(readme)


def test_the_readme_table_is_the_committed_summarys() -> None:
    """The README's results are generated (`diffusion readme-table`), never copied by hand."""
    from _pipeline_helpers import REPO

    text = (REPO / "README.md").read_text()
    block = text.split(report.README_START, 1)[1].split(report.README_END, 1)[0]
    summary = read_json(REPO / paths.SUMMARY)
    assert block == "\n" + report.readme_table(summary)
