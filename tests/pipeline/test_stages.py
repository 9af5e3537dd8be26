"""The stages in-process on a tiny config: files, per-image seeds, skips, metrics, report."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from _pipeline_helpers import stage_workspace, tiny_raw

from diffusion_core.checkpoint import load_checkpoint
from diffusion_core.data import to_uint8
from diffusion_core.distributed import default_device
from diffusion_core.guidance import ClassifierFreeGuidance
from diffusion_core.inception import inception_weights_path
from diffusion_core.samplers import generate
from pipeline import classifier, codec, evaluate, paths, prepare, report, sample, train
from pipeline.config import Params, ParamsError, validate_params
from pipeline.errors import StageError
from pipeline.files import file_digest
from pipeline.sampling import load_model


def params_with(**methods: dict[str, Any]) -> Params:
    raw = tiny_raw()
    raw["train"]["guide_at"] = 0.5  # the model file keeps the EMA of step 3 as a guide
    raw["methods"].update(methods)
    return validate_params(raw)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """prepare, classifier and train (6 steps) run once in a temporary working directory."""
    root = tmp_path_factory.mktemp("workspace")
    with stage_workspace(root):
        params = params_with()
        prepare.run(params)
        classifier.run(params)
        train.run(params)
        yield root


def read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def test_prepare_splits_every_image_once_by_class(workspace: Path) -> None:
    info = read(workspace / paths.DATA_INFO)
    assert info["n_train"] + info["n_test"] == 1797
    for cls, n_test in info["test_classes"].items():
        n = n_test + info["train_classes"][cls]
        assert n_test == round(n * 0.25)
    train_x, train_y = prepare.load_split(workspace / paths.TRAIN_DATA)
    assert train_x.shape == (info["n_train"], 1, 8, 8) and train_x.dtype == torch.float32
    assert info["train_digest"] == prepare.tensor_digest(train_x, train_y)


def test_prepare_is_deterministic(workspace: Path) -> None:
    before = read(workspace / paths.DATA_INFO)
    prepare.run(params_with())
    after = read(workspace / paths.DATA_INFO)
    assert after["train_digest"] == before["train_digest"]
    assert after["test_digest"] == before["test_digest"]


def test_classifier_writes_model_metrics_and_reference_features(workspace: Path) -> None:
    record = read(workspace / paths.CLASSIFIER_METRICS)
    # one epoch of 6 steps: measured 0.178 (test) and 0.177 (train); chance, and an untrained
    # classifier, 0.1 (450 test images: one standard error at chance is 0.014)
    assert 0.14 < record["test_accuracy"] <= 1.0
    assert 0.14 < record["train_accuracy"] <= 1.0
    ref = load_checkpoint(workspace / paths.REFERENCE_FEATURES)
    assert ref["train"].shape == (record["n_train"], 16)
    assert ref["test"].shape == (record["n_test"], 16)
    halves = torch.cat([ref["reference_index"], ref["floor_index"]]).sort().values
    assert torch.equal(halves, torch.arange(record["n_test"]))  # disjoint, every test image


def test_train_writes_model_loss_curve_metrics_and_run_link(workspace: Path) -> None:
    model = load_checkpoint(workspace / paths.MODEL)
    assert model["step"] == 6 and "ema" in model
    lines = (workspace / paths.LOSS_CSV).read_text().splitlines()
    assert lines[0] == "step,loss,lr,grad_norm"
    assert [int(line.split(",")[0]) for line in lines[1:]] == [2, 4, 6]
    record = read(workspace / paths.TRAIN_METRICS)
    assert record["steps"] == 6 and set(record) == {"steps", "final_loss"}
    assert read(workspace / "runs/timing/train.json")["world_size"] == 1
    (link,) = (workspace / paths.TRAIN_DIR).glob("mlflow-*.json")  # the run to resume into
    assert len(read(link)["run_id"]) == 32
    assert read(workspace / "provenance/train.json")["model_sha256"] == file_digest(
        workspace / paths.MODEL
    )


def test_train_again_resumes_from_the_final_checkpoint(workspace: Path) -> None:
    with contextlib.chdir(workspace):
        result = train.run(params_with())
    assert result.resumed and result.step == 6
    lines = (workspace / paths.LOSS_CSV).read_text().splitlines()
    assert len(lines) == 4  # the loss history survives the resume


def test_training_is_reproducible(workspace: Path, tmp_path: Path) -> None:
    """Same params and data, fresh directory: the same weights (initialisation included)."""
    (tmp_path / "data").symlink_to(workspace / "data")
    with contextlib.chdir(tmp_path):
        train.run(params_with())
    first = load_checkpoint(workspace / paths.MODEL)["ema"]
    second = load_checkpoint(tmp_path / paths.MODEL)["ema"]
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_a_patched_unet_trains_and_samples(workspace: Path, tmp_path: Path) -> None:
    """``model.patch_size: 2`` reaches the network, its model file and the sampler."""
    (tmp_path / "data").symlink_to(workspace / "data")
    raw = tiny_raw()
    raw["model"].update(patch_size=2, attention_resolutions=[2])  # 8x8 images: a 4x4 grid
    params = validate_params(raw)
    with contextlib.chdir(tmp_path):
        train.run(params)
        record = sample.run(params, "ddim5")
    model = load_checkpoint(tmp_path / paths.MODEL)
    assert model["model_config"]["patch_size"] == 2
    assert model["ema"]["conv_in.weight"].shape[1] == 4  # 2 x 2 pixels of one channel
    images = load_checkpoint(tmp_path / paths.samples_dir("ddim5") / "samples.pt")["images"]
    assert record["nfe"] == 5 and images.shape == (20, 1, 8, 8)


def test_image_i_does_not_depend_on_the_batch_size(workspace: Path) -> None:
    spec = {"sampler": "ddim", "steps": 3, "eta": 1.0}
    outputs = []
    for batch in (20, 7):
        raw = tiny_raw()
        raw["sample"]["batch_size"] = batch
        raw["methods"] = {"ddim3": spec}
        with contextlib.chdir(workspace):
            record = sample.run(validate_params(raw), "ddim3")
        outputs.append(load_checkpoint(workspace / paths.samples_dir("ddim3") / "samples.pt"))
        assert record["nfe"] == 3
    first, second = outputs
    assert first["images"].dtype == torch.uint8 and first["images"].shape == (20, 1, 8, 8)
    assert torch.equal(first["images"], second["images"])
    assert first["labels"].tolist() == [i % 10 for i in range(20)]
    assert first["seeds"].tolist() == list(range(20))
    assert (workspace / paths.grid_path("ddim3")).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_classes_and_guidance(workspace: Path) -> None:
    spec = {"sampler": "ddim", "steps": 2, "classes": [3, 5]}
    params = params_with(guided={**spec, "guidance": 2.0}, unguided=spec)
    with contextlib.chdir(workspace):
        sample.run(params, "guided")
        sample.run(params, "unguided")
        denoiser, process, _ = load_model(default_device())
    out = load_checkpoint(workspace / paths.samples_dir("guided") / "samples.pt")
    plain = load_checkpoint(workspace / paths.samples_dir("unguided") / "samples.pt")
    assert out["labels"].tolist() == plain["labels"].tolist() == [3, 5] * 10
    # the same seeds and classes without guidance give other images (mean |difference| of the
    # uint8 pixels measured 0.69 for this 6-step model; 0 if guidance is ignored)
    change = (out["images"].float() - plain["images"].float()).abs().mean().item()
    assert change > 0.25, change
    # and they are the images of w = 2, drawn here outside the stage
    with torch.no_grad():
        explicit = generate(ClassifierFreeGuidance(denoiser, 2.0), process, "ddim",
                            shape=(1, 8, 8), seeds=list(range(20)), labels=out["labels"],
                            steps=2, eta=0.0, device=default_device())
    expected = to_uint8(explicit.x.cpu())
    assert torch.equal(expected, out["images"]), "the stage's images are not those of w = 2"


def test_autoguidance_against_the_trained_guide_snapshot(workspace: Path) -> None:
    """The train stage kept the EMA of step 3 of 6; an autoguided method samples against it
    (the same seeds give other images) and composes with classifier-free guidance."""
    spec = {"sampler": "ddim", "steps": 2}
    params = params_with(plain=spec, auto=({**spec, "autoguidance": 2.0}),
                         both={**spec, "autoguidance": 2.0, "guidance": 1.0})
    with contextlib.chdir(workspace):
        for name in ("plain", "auto", "both"):
            assert sample.run(params, name)["status"] == "ok"
    assert load_checkpoint(workspace / paths.MODEL)["guide"]["step"] == 3
    images = {n: load_checkpoint(workspace / paths.samples_dir(n) / "samples.pt")["images"]
              for n in ("plain", "auto", "both")}
    assert not torch.equal(images["plain"], images["auto"])
    assert not torch.equal(images["auto"], images["both"])


def test_unconditional_method_samples_the_null_label(workspace: Path) -> None:
    spec = {"sampler": "ddim", "steps": 2}
    params = params_with(cond2=spec, uncond2={**spec, "unconditional": True})
    with contextlib.chdir(workspace):
        sample.run(params, "cond2")
        sample.run(params, "uncond2")
        scored = evaluate.run(params, ["uncond2"])["uncond2"]
        denoiser, process, _ = load_model(default_device())
    cond = load_checkpoint(workspace / paths.samples_dir("cond2") / "samples.pt")
    uncond = load_checkpoint(workspace / paths.samples_dir("uncond2") / "samples.pt")
    assert uncond["labels"] is None
    assert read(workspace / "provenance/sample@uncond2.json")["conditional"] is False
    assert not torch.equal(cond["images"], uncond["images"])
    null = torch.full((20,), denoiser.net.null_label, dtype=torch.int64)
    with torch.no_grad():
        explicit = generate(
            denoiser,
            process,
            "ddim",
            shape=(1, 8, 8),
            seeds=list(range(20)),
            labels=null,
            steps=2,
            eta=0.0,
            device=default_device(),
        )
    assert torch.equal(to_uint8(explicit.x.cpu()), uncond["images"])
    assert scored["status"] == "ok" and "class_accuracy" not in scored
    assert scored["fid"] > 0 and scored["extractor"] == "classifier"
    # shares of 20 samples and of m real images, inside their Wilson intervals
    m = scored["fid_matched_n"]
    for key, count in (("unclear_fraction", 20), ("unclear_fraction_floor", m)):
        assert 0 <= scored[f"{key}_ci_low"] <= scored[key] <= scored[f"{key}_ci_high"] <= 1
        assert scored[key] * count == pytest.approx(round(scored[key] * count))
    assert "unclear_fraction" in read(workspace / paths.eval_metrics("uncond2"))


def test_incompatible_sampler_is_recorded_as_skipped(workspace: Path) -> None:
    """Validation refuses steps below a sampler's minimum (the registry's rule, which
    ``samplers.compatible`` applies too), so the stages' skip is reached here past validation."""
    from pipeline.config import METHOD_MODELS

    base = params_with()
    pc1 = METHOD_MODELS["pc"].model_construct(sampler="pc", steps=1)
    params = base.model_copy(update={"methods": {**base.methods, "pc1": pc1}})
    with contextlib.chdir(workspace):
        record = sample.run(params, "pc1")
        scored = evaluate.run(params, ["pc1"])["pc1"]
    assert record["status"] == "skipped" and "2 steps" in record["reason"]
    assert read(workspace / paths.sample_metrics("pc1"))["status"] == "skipped"
    assert (workspace / paths.grid_path("pc1")).is_file()
    assert scored["status"] == "skipped"


def test_evaluate_and_report(workspace: Path) -> None:
    params = params_with()
    with contextlib.chdir(workspace):
        sample.run(params, "ddim5")
        record = evaluate.run(params, ["ddim5"])["ddim5"]
        summary = report.run(params)
    # every score sits inside its interval; a 6-step model is far from the data
    assert record["fid_ci_low"] <= record["fid"] <= record["fid_ci_high"]
    assert 0 <= record["fid_floor_ci_low"] <= record["fid_floor"] <= record["fid_floor_ci_high"]
    assert record["fid_matched"] == record["fid"]  # n = 20 <= |F|: one size for both
    assert record["fid"] > record["fid_floor_ci_high"] and record["verdict"] == "worse than floor"
    assert record["kid_x1000"] > record["kid_floor_x1000"] and record["kid_x1000_std"] > 0
    assert record["kid_subset_size"] < record["n_images"]
    for key in ("precision", "recall", "coverage", "near_copy_fraction", "class_accuracy"):
        assert 0.0 <= record[key] <= 1.0
    assert record["recall_floor"] > record["recall"]  # real images cover the reference better
    n_test = read(workspace / paths.DATA_INFO)["n_test"]
    assert record["n_reference"] + record["n_floor"] == n_test
    assert read(workspace / paths.eval_record("ddim5")) == json.loads(json.dumps(record))
    headline = read(workspace / paths.eval_metrics("ddim5"))  # the DVC metric: a few numbers
    assert set(headline) <= set(evaluate.HEADLINE) and headline["fid"] == record["fid"]
    row = summary["methods"]["ddim5"]
    assert row["nfe"] == 5 and row["fid"] == record["fid"]
    assert row["verdict"] == record["verdict"]
    table = (workspace / paths.SUMMARY_MD).read_text()
    assert "| ddim5 | ddim | 5 |" in table and "worse than floor" in table
    csv = (workspace / paths.FID_VS_NFE).read_text().splitlines()
    assert csv[0] == report.FID_VS_NFE_HEADER
    assert csv[1].startswith("ddim5,ddim,5,")
    # no guided method: the trade-off has a header and an empty figure
    tradeoff = (workspace / paths.GUIDANCE_TRADEOFF).read_text()
    assert tradeoff == "method,sampler,steps,guidance,fid,class_accuracy\n"
    for png in (paths.FID_VS_NFE_PNG, paths.GUIDANCE_TRADEOFF_PNG):
        assert (workspace / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_guidance_tradeoff_from_real_samples(workspace: Path) -> None:
    params = params_with(
        w0={"sampler": "ddim", "steps": 2}, w3={"sampler": "ddim", "steps": 2, "guidance": 3.0}
    )
    with contextlib.chdir(workspace):
        for name in params.methods:
            sample.run(params, name)
            evaluate.run(params, [name])
        summary = report.run(params)
    lines = (workspace / paths.GUIDANCE_TRADEOFF).read_text().splitlines()
    assert [line.split(",")[:4] for line in lines[1:]] == [
        ["w0", "ddim", "2", "0"],
        ["w3", "ddim", "2", "3"],
    ]
    for line in lines[1:]:
        method, fid, accuracy = line.split(",")[0], *map(float, line.split(",")[4:])
        assert fid == pytest.approx(summary["methods"][method]["fid"], rel=1e-5)
        assert 0.0 <= accuracy <= 1.0


def test_evaluate_shows_progress_without_a_tty_and_none_when_quiet(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from diffusion_core.evaluation import SCORES
    from pipeline.cli import app

    monkeypatch.setenv("DIFFUSION_QUIET", "0")  # put back afterwards: --quiet sets it
    params_file = workspace / "progress.yaml"
    params_file.write_text(json.dumps(tiny_raw()))
    command = ["evaluate", "--params", str(params_file), "--method", "ddim5"]
    with contextlib.chdir(workspace):
        sample.run(params_with(), "ddim5")
        loud = CliRunner().invoke(app, command)
        quiet = CliRunner().invoke(app, ["--quiet", *command])
    assert loud.exit_code == 0 and quiet.exit_code == 0, loud.stderr + quiet.stderr
    lines = loud.stderr.splitlines()
    assert [line for line in lines if line.startswith("ddim5 features: ")] == [
        next(line for line in lines if line.startswith("ddim5 features: 20/20 img"))
    ]
    scores = [line for line in lines if line.startswith("ddim5 scores: ")]
    assert len(scores) == len(SCORES) + 1
    assert scores[0].startswith(f"ddim5 scores: 1/{len(scores)} score, done fid")
    assert scores[-1].startswith(f"ddim5 scores: {len(scores)}/{len(scores)} score, done near_")
    assert quiet.stderr == "" and "ddim5: FID" in quiet.stdout


def test_bits_per_dim_for_ode_methods(
    workspace: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DIFFUSION_QUIET", raising=False)
    raw = tiny_raw()
    raw["methods"] = {"rk": {"sampler": "ode_rk45", "rtol": 1e-2, "atol": 1e-2}}
    raw["sample"]["n_images"] = 4
    raw["evaluate"].update(bpd_images=3, batch_size=2)
    params = validate_params(raw)
    with contextlib.chdir(workspace):
        sample.run(params, "rk")
        capsys.readouterr()
        record = evaluate.run(params, ["rk"])["rk"]
    assert 0.0 < record["bpd"] < 50.0 and record["bpd_std"] >= 0.0
    assert record["bpd_nfe"] > 0
    progress = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("rk bits/dim")]
    counts = [int(line.split(": ")[1].split("/")[0]) for line in progress]
    assert counts == sorted(set(counts)) and counts[-1] == 3 and len(counts) > 1, progress


def test_more_images_than_held_out_ones(workspace: Path) -> None:
    """n above the 450 test images: the floor is extrapolated and narrows with n."""
    raw = tiny_raw()
    raw["methods"] = {"many": {"sampler": "ddim", "steps": 2}}
    raw["evaluate"]["batch_size"] = 128  # features in several batches
    records = {}
    for n in (20, 600):
        raw["sample"].update(n_images=n, batch_size=300)
        params = validate_params(raw)
        with contextlib.chdir(workspace):
            sample.run(params, "many")
            records[n] = evaluate.run(params, ["many"])["many"]
    small, large = records[20], records[600]
    assert large["n_images"] == 600 > read(workspace / paths.DATA_INFO)["n_test"]
    # the verdict is taken at the floor's size: all of F, the first |F| samples
    assert large["fid_matched_n"] == large["n_floor"] and small["fid_matched_n"] == 20
    assert small["fid_matched"] == small["fid"] and large["fid_matched"] != large["fid"]
    assert large["fid_floor"] < small["fid_floor"]  # the bias b/n shrinks
    width = {n: r["fid_floor_ci_high"] - r["fid_floor_ci_low"] for n, r in records.items()}
    assert width[600] < width[20]


@pytest.mark.skipif(inception_weights_path().is_file(), reason="Inception weights are present")
def test_inception_without_weights_is_a_one_line_stage_error(workspace: Path) -> None:
    raw = tiny_raw()
    raw["evaluate"]["extractor"] = "inception"
    with contextlib.chdir(workspace):
        sample.run(validate_params(raw), "ddim5")
        with pytest.raises(StageError, match="evaluate.extractor=inception: .*weights missing"):
            evaluate.run(validate_params(raw), ["ddim5"])


def test_report_needs_every_method(workspace: Path) -> None:
    params = params_with(never={"sampler": "ddim", "steps": 2})
    with contextlib.chdir(workspace), pytest.raises(StageError, match="sample@never"):
        report.run(params)


def test_ddim_inversion_round_trip_improves_with_steps(workspace: Path) -> None:
    params = params_with(
        fine={"sampler": "ddim", "steps": 100}, coarse={"sampler": "ddim", "steps": 2}
    )
    errors = {}
    with contextlib.chdir(workspace):
        for name in ("coarse", "fine"):
            enc = codec.encode(params, name, Path(f"runs/{name}.pt"), count=4)
            assert enc["latents"].shape == (4, 1, 8, 8) and enc["nfe"] == params.methods[name].steps - 1
            errors[name] = codec.decode(
                params, Path(f"runs/{name}.pt"), Path(f"runs/{name}-dec.pt")
            )["mse"]
        assert Path("runs/fine-dec.png").is_file()
        with pytest.raises(ParamsError, match="methods.pc1.sampler: encode/decode need a ddim"):
            codec.encode(params_with(pc1={"sampler": "pc", "steps": 3}), "pc1", Path("x.pt"))
    assert errors["fine"] < errors["coarse"]
    assert errors["fine"] < 0.01 * errors["coarse"]


@pytest.mark.parametrize(
    ("outcome", "exit_code", "status"),
    [("interrupted", 143, "KILLED"), ("nan", 1, "FAILED")],
)
def test_train_interrupt_and_nan_exit_codes_and_run_status(
    workspace: Path, monkeypatch: pytest.MonkeyPatch, outcome: str, exit_code: int, status: str
) -> None:
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from diffusion_core.training import TrainResult
    from pipeline.cli import app

    def fake_train(*args: Any, **kwargs: Any) -> TrainResult:
        if outcome == "nan":
            raise FloatingPointError("non-finite loss nan at step 3")
        return TrainResult(3, 0.5, None, None, resumed=False, interrupted=True, signal=15)

    monkeypatch.setattr(train, "train", fake_train)
    params_file = workspace / "tiny.yaml"
    params_file.write_text(json.dumps(tiny_raw()))
    with contextlib.chdir(workspace):
        result = CliRunner().invoke(app, ["train", "--params", str(params_file)])
    assert result.exit_code == exit_code
    assert result.stderr.count("\n") == 1
    link = next((workspace / paths.TRAIN_DIR).glob("mlflow-*.json"))
    run_id = json.loads(link.read_text())["run_id"]
    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == status
