"""`diffusion generate` end to end on a tiny (untrained) model: files, names, labels, seeds,
determinism across batch sizes and process counts, and one line per bad option."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _pipeline_helpers import REPO, tiny_model
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.generate import image_name
from pipeline.progress import Progress


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("model") / "model.pt")


@pytest.fixture(scope="module")
def uncond_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("uncond") / "model.pt", num_classes=0)


def generate(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["generate", "--quiet", *args])
    return result.exit_code, result.output


def test_files_names_labels_and_npz(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "three"
    code, text = generate("--model", str(model), "--classes", "3,5", "-n", "7", "--sampler",
                          "ddim", "--steps", "4", "-w", "2", "--seed", "10", "--out", str(out))
    assert code == 0, text
    pngs = sorted(p.name for p in out.glob("*.png") if p.name != "grid.png")
    assert len(pngs) == 7
    assert pngs == [image_name(i, (3, 5)[i % 2], 10 + i) for i in range(7)]
    assert pngs[0] == "00000_class3_seed10.png"
    with np.load(out / "images.npz") as z:
        assert z["images"].shape == (7, 8, 8, 1) and z["images"].dtype == np.uint8
        assert z["labels"].tolist() == [3, 5, 3, 5, 3, 5, 3]
        assert z["seeds"].tolist() == list(range(10, 17))
        first = np.asarray(Image.open(out / pngs[0]))
        assert (first == z["images"][0, :, :, 0]).all()
    assert Image.open(out / "grid.png").size[0] > 32
    record = json.loads((out / "generate.json").read_text())
    assert record["options"]["guidance"] == 2.0 and record["nfe_per_image"] == 8  # 4 guided steps, 2 each


def test_same_images_for_any_batch_size_and_unconditional_names(model: Path,
                                                                 tmp_path: Path) -> None:
    common = ["--model", str(model), "-n", "5", "--sampler", "ddpm", "--steps", "6",
              "--classes", "none", "--no-png"]
    assert generate(*common, "--batch-size", "5", "--out", str(tmp_path / "a"))[0] == 0
    assert generate(*common, "--batch-size", "2", "--out", str(tmp_path / "b"))[0] == 0
    a, b = np.load(tmp_path / "a" / "images.npz"), np.load(tmp_path / "b" / "images.npz")
    assert (a["images"] == b["images"]).all() and (a["labels"] == -1).all()
    assert not list((tmp_path / "a").glob("0*.png"))  # --no-png
    assert image_name(3, None, 7) == "00003_uncond_seed7.png"


def test_the_default_spacing_is_the_samplers_own(model: Path, tmp_path: Path) -> None:
    common = ["--model", str(model), "-n", "3", "--sampler", "dpmpp_2m", "--steps", "4",
              "--no-png"]
    assert generate(*common, "--out", str(tmp_path / "own"))[0] == 0
    assert generate(*common, "--spacing", "logsnr", "--out", str(tmp_path / "logsnr"))[0] == 0
    record = json.loads((tmp_path / "own" / "generate.json").read_text())
    assert record["options"]["spacing"] == "logsnr"  # the registry's default for dpmpp_2m
    own, logsnr = (np.load(tmp_path / d / "images.npz")["images"] for d in ("own", "logsnr"))
    assert (own == logsnr).all()


def test_sampler_settings_with_set(model: Path, tmp_path: Path) -> None:
    code, text = generate("--model", str(model), "-n", "2", "--sampler", "pc", "--steps", "3",
                          "--set", "snr=0.1", "--set", "corrector_steps=2",
                          "--out", str(tmp_path / "pc"))
    assert code == 0, text
    record = json.loads((tmp_path / "pc" / "generate.json").read_text())
    assert record["settings"] == {"snr": 0.1, "corrector_steps": 2}


BAD = [
    (["-n", "0"], "--num: must be at least 1 (got 0)"),
    (["--batch-size", "0"], "--batch-size: must be at least 1"),
    (["--steps", "0"], "--steps: must be at least 1"),
    (["--seed", "-1"], "--seed: must be 0 or more"),
    (["-w", "-1"], "--guidance: must be 0 or more"),
    (["--autoguidance", "-1"], "--autoguidance: must be 0 or more"),
    (["--autoguidance", "1"], "--autoguidance: the model has no guide snapshot; train it"),
    (["--sampler", "magic"], "--sampler: unknown 'magic'; choose one of ddpm, ddim"),
    (["--set", "eta"], "--set: expected KEY=VALUE (got 'eta')"),
    (["--set", "snr=1"], "--set snr: ddim takes eta (got 'snr=1')"),
    (["--set", "eta=2"], "--set eta: Input should be less than or equal to 1 (got 2)"),
    (["--classes", "12"], "--classes: labels must lie in 0..9 (got '12')"),
    (["--classes", "three"], "--classes: expected all, none, a class or a comma-separated list"),
    (["--classes", "none", "-w", "1"], "--guidance: needs class labels"),
    (["--steps", "500"], "--steps: ddim with 500 steps does not fit a discrete DDPM of 100"),
    (["--spacing", "wiggly"], "--spacing: unknown spacing 'wiggly'"),
    (["--device", "tpu"], "--device: expected auto, cpu, cuda or cuda:N (got 'tpu')"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_each_bad_option_is_one_line_and_exit_2(model: Path, tmp_path: Path, args: list[str],
                                                message: str) -> None:
    code, text = generate("--model", str(model), "-n", "2", "--steps", "3",
                          "--out", str(tmp_path / "x"), *args)
    assert code == 2, text
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: " + message), text


def test_errors_of_the_model_and_the_output(model: Path, uncond_model: Path,
                                            tmp_path: Path) -> None:
    code, text = generate("--model", str(tmp_path / "none.pt"), "--out", str(tmp_path / "x"))
    assert code == 1 and text.strip() == f"error: --model: {tmp_path / 'none.pt'} is missing: "\
        "check --model", text
    code, text = generate("--model", str(uncond_model), "--classes", "3", "--out",
                          str(tmp_path / "x"))
    assert code == 2 and text.strip().startswith("error: --classes: the model is unconditional")
    (tmp_path / "file").write_text("")
    code, text = generate("--model", str(model), "--out", str(tmp_path / "file"))
    assert code == 2 and "--out:" in text and "is not a folder" in text
    if not torch.cuda.is_available():
        code, text = generate("--model", str(model), "--device", "cuda", "--out",
                              str(tmp_path / "x"))
        assert code == 2 and "--device: CUDA is not available here" in text


def test_two_processes_give_the_images_of_one(model: Path, tmp_path: Path) -> None:
    """torchrun, 2 CPU processes (gloo): each takes every other seed; same files as 1 process."""
    args = ["-m", "pipeline", "generate", "--model", str(model), "-n", "5", "--steps", "3",
            "--classes", "1,2", "-w", "1", "--batch-size", "2", "--device", "cpu", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, *args, "--out", str(one)], env=env, check=True,
                   capture_output=True, timeout=300)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         *args, "--out", str(two)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = np.load(one / "images.npz"), np.load(two / "images.npz")
    for key in ("images", "labels", "seeds"):
        assert (a[key] == b[key]).all(), key
    names = sorted(p.name for p in one.glob("*.png"))
    assert names == sorted(p.name for p in two.glob("*.png")) and len(names) == 6
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    assert json.loads((two / "generate.json").read_text())["world_size"] == 2


def test_progress_prints_a_line_every_n_without_a_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DIFFUSION_QUIET", raising=False)
    stream = io.StringIO()
    with Progress(10, "train", unit="step", every=5, stream=stream) as bar:
        for _ in range(10):
            bar.update(1, loss=0.5)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("train: 5/10 step, loss 0.5")
    monkeypatch.setenv("DIFFUSION_QUIET", "1")
    stream = io.StringIO()
    with Progress(10, "train", stream=stream) as bar:
        bar.update(10)
    assert stream.getvalue() == ""


@pytest.mark.filterwarnings("ignore")
def test_model_from_the_mlflow_registry(model: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    from pipeline.mlflow_model import log_pyfunc

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("gen", str(tmp_path / "artifacts")))
    version = log_pyfunc(uri, run.info.run_id, model, "tiny-digits")
    assert version is not None
    args = ["-n", "3", "--steps", "3", "--classes", "2", "--no-png"]
    code, text = generate("--model", f"models:/tiny-digits/{version}", *args,
                          "--out", str(tmp_path / "a"))
    assert code == 0, text
    assert generate("--model", str(model), *args, "--out", str(tmp_path / "b"))[0] == 0
    a, b = np.load(tmp_path / "a" / "images.npz"), np.load(tmp_path / "b" / "images.npz")
    assert (a["images"] == b["images"]).all()
    code, text = generate("--model", "models:/no-such-model/1", "--out", str(tmp_path / "c"))
    assert code == 1 and text.startswith("error: --model models:/no-such-model/1: cannot load")
    assert len(text.strip().splitlines()) == 1


def test_autoguidance_uses_the_guide_snapshot(tmp_path: Path) -> None:
    """A guide equal to the model changes nothing ((1 + w) D - w D = D); another guide does."""
    outs = {}
    for guide in ("same", "other"):
        model = tiny_model(tmp_path / guide / "model.pt", num_classes=0, guide=guide)
        for w in ("0", "1.5"):
            out = tmp_path / f"{guide}-{w}"
            code, text = generate("--model", str(model), "-n", "4", "--steps", "4",
                                  "--autoguidance", w, "--out", str(out), "--no-png")
            assert code == 0, text
            with np.load(out / "images.npz") as z:
                outs[guide, w] = z["images"]
    assert np.array_equal(outs["same", "0"], outs["same", "1.5"])
    assert np.array_equal(outs["same", "0"], outs["other", "0"])
    assert not np.array_equal(outs["other", "0"], outs["other", "1.5"])
