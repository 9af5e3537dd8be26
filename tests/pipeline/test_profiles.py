"""Profiles (docs/profiles): every shipped one validates merged into params.yaml, `dvc exp run -S`
with `diffusion profile args` gives exactly the merged parameters, and the CIFAR-10 GPU profile is
the DDPM paper's model and runs a few training steps on a CPU."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from _pipeline_helpers import REPO, default_raw, write_params
from typer.testing import CliRunner

from diffusion_core.inception import inception_weights_path
from diffusion_core.processes import make_process
from diffusion_core.training import train
from diffusion_core.unet import ResBlock
from pipeline.checks import check_buildable
from pipeline.cli import app
from pipeline.config import ParamsError, validate_params
from pipeline.profiles import (
    dvc_overrides,
    hydra_value,
    load_profile,
    merge,
    merged_params,
    profile_names,
)
from pipeline.train import build_unet, train_config

SHIPPED = ("mnist-cpu", "mnist-uncond-cpu", "fashion-mnist-cpu", "mnist-flow-cpu",
           "mnist-distill-cpu", "digits-distill", "cifar10-gpu")
CPU = ["mnist-cpu", "mnist-uncond-cpu", "fashion-mnist-cpu", "mnist-flow-cpu",
       "mnist-distill-cpu"]


def test_the_documented_profiles_are_shipped() -> None:
    assert set(SHIPPED) <= set(profile_names())


@pytest.mark.parametrize("name", profile_names())
def test_every_profile_validates_merged_into_params_yaml(name: str) -> None:
    raw, params = merged_params(default_raw(), name)
    assert params.data.dataset == load_profile(name)["data"]["dataset"]
    assert set(raw["methods"]) == set(load_profile(name)["methods"])  # replaced, not merged


@pytest.mark.parametrize("name", CPU)
def test_cpu_profiles_pass_the_check_stage(name: str) -> None:
    check_buildable(merged_params(default_raw(), name)[1])  # builds the U-Net on `meta`


@pytest.mark.parametrize("name", CPU)
def test_cpu_profiles_leave_bf16_to_cpus_that_compute_it(name: str) -> None:
    """An explicit bf16 is emulated, and 7x slower than fp32, on an AVX2-only CPU: the CPU
    profiles say `auto` (bf16 only where it is native) so their step budget holds anywhere."""
    params = merged_params(default_raw(), name)[1]
    assert params.train.mixed_precision == "auto"
    assert train_config(params).mixed_precision == "auto"


def test_the_unconditional_mnist_profile_is_mnist_cpu_without_labels() -> None:
    """One recipe: the unconditional profile may differ from mnist-cpu only in conditioning, and
    add autoguided methods (with the guide snapshot they need)."""
    cond, uncond = (merged_params(default_raw(), n)[1] for n in ("mnist-cpu", "mnist-uncond-cpu"))
    assert cond.model.conditional and not uncond.model.conditional
    assert uncond.train.p_uncond == 0.0
    assert uncond.model.model_dump(exclude={"conditional"}) == cond.model.model_dump(
        exclude={"conditional"})
    assert uncond.train.model_dump(exclude={"p_uncond", "guide_at"}) == cond.train.model_dump(
        exclude={"p_uncond", "guide_at"})
    assert uncond.process == cond.process and uncond.data == cond.data
    assert all(m.guidance == 0 for m in uncond.methods.values())
    plain = {n for n, m in uncond.methods.items() if m.autoguidance == 0}
    assert plain < set(cond.methods) and len(plain) < len(uncond.methods)
    assert uncond.train.guide_at > 0


def test_the_flow_profile_is_mnist_cpu_with_another_process_prediction_and_loss() -> None:
    """Its header (and benchmarks/flow_matching.py) says so: the same data, U-Net, optimiser and
    budget as mnist-cpu; rectified flow, flow prediction, logit-normal times, no weighting."""
    cpu, flow = (merged_params(default_raw(), n)[1] for n in ("mnist-cpu", "mnist-flow-cpu"))
    assert flow.process.name == "rectified_flow" and flow.model.prediction == "flow"
    assert (flow.train.t_sampling, flow.train.loss_weighting) == ("logit_normal", "none")
    assert flow.model.model_dump(exclude={"prediction"}) == cpu.model.model_dump(
        exclude={"prediction"})
    recipe = {"t_sampling", "loss_weighting"}
    assert flow.train.model_dump(exclude=recipe) == cpu.train.model_dump(exclude=recipe)
    assert flow.data == cpu.data and flow.evaluate.baseline in flow.methods


def test_the_mnist_distillation_teacher_is_the_mnist_recipe_at_1000_steps() -> None:
    recipe, distil = merged_params(default_raw(), "mnist-cpu")[1], \
        merged_params(default_raw(), "mnist-distill-cpu")[1]
    assert distil.process == recipe.process and distil.model == recipe.model
    assert distil.train.steps == 1000 and distil.distill.enabled
    teacher_images = distil.train.steps * distil.train.batch_size
    student_images = distil.distill.rounds * distil.distill.steps_per_round * \
        distil.distill.batch_size
    assert student_images <= 2 * teacher_images  # the compute bound
    students = {m.student for m in distil.methods.values() if m.student}
    assert students == {2, 4}


def test_the_fashion_mnist_profile_carries_the_mnist_recipe() -> None:
    """Its header says so: process, model, train and methods are mnist-cpu's, only data differ."""
    mnist, fashion = (merged_params(default_raw(), n)[1] for n in ("mnist-cpu", "fashion-mnist-cpu"))
    assert fashion.data.dataset == "fashion_mnist" != mnist.data.dataset
    assert (fashion.process, fashion.model, fashion.train, fashion.methods) == (
        mnist.process, mnist.model, mnist.train, mnist.methods)
    assert fashion.process.logsnr_shift == -2.0  # the shift chosen in round 7 on MNIST


@pytest.mark.skipif(inception_weights_path().is_file(), reason="Inception weights are present")
def test_gpu_profile_names_the_missing_inception_weights_before_training() -> None:
    params = merged_params(default_raw(), "cifar10-gpu")[1]
    with pytest.raises(ParamsError, match="evaluate.extractor: inception needs clean-fid's weights"):
        check_buildable(params)


@pytest.mark.parametrize("name", profile_names())
def test_dvc_set_params_give_exactly_the_merged_params(name: str, tmp_path: Path) -> None:
    """What `dvc exp run $(diffusion profile args NAME)` does to params.yaml, without git."""
    from dvc.utils.hydra import apply_overrides

    path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", path)
    base = default_raw()
    merged, _ = merged_params(base, name)
    overrides = dvc_overrides(base, merged)
    assert all(" " not in o for o in overrides)  # one shell word each
    apply_overrides(path, overrides)
    written = yaml.safe_load(path.read_text())
    assert written == merged
    validate_params(written)


def test_a_root_given_after_the_profile_wins(tmp_path: Path) -> None:
    """The README's `dvc exp run $(diffusion profile args mnist-cpu) -S data.root=...`."""
    from dvc.utils.hydra import apply_overrides

    path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", path)
    base = default_raw()
    overrides = dvc_overrides(base, merged_params(base, "mnist-cpu")[0])
    apply_overrides(path, [*overrides, "data.root=/data/my-mnist"])
    assert yaml.safe_load(path.read_text())["data"]["root"] == "/data/my-mnist"


def test_merge_replaces_methods_and_merges_sections() -> None:
    base = {"data": {"dataset": "digits", "root": None}, "methods": {"a": {"s": 1}, "b": {"s": 2}}}
    out = merge(base, {"data": {"root": "x"}, "methods": {"c": {"s": 3}}})
    assert out == {"data": {"dataset": "digits", "root": "x"}, "methods": {"c": {"s": 3}}}
    assert base["data"]["root"] is None  # the base is not modified


def test_overrides_add_change_and_remove() -> None:
    base = {"m": {"a": {"x": 1, "y": 2}, "b": {"x": 1}}, "t": {"lr": 0.1, "on": True}}
    target = {"m": {"a": {"x": 1}, "c": {"x": 3, "w": [1, 2]}}, "t": {"lr": 2e-4, "on": False}}
    assert dvc_overrides(base, target) == [
        "~m.b",
        "~m.a.y",
        "+m.c={x:3,w:[1,2]}",
        "t.lr=0.0002",
        "t.on=false",
    ]


@pytest.mark.parametrize(
    ("value", "text"),
    [(None, "null"), ("data/mnist", "data/mnist"), ("null", "'null'"), ("1e-4", "'1e-4'"),
     ([16], "[16]"), (0.9999, "0.9999")],
)
def test_hydra_values(value: Any, text: str) -> None:
    assert hydra_value(value) == text


def test_a_value_with_a_space_is_refused() -> None:
    with pytest.raises(ParamsError, match="by hand"):
        hydra_value("my data")


def test_cli_args_show_and_list(tmp_path: Path) -> None:
    runner = CliRunner()
    params = str(REPO / "params.yaml")
    result = runner.invoke(app, ["profile", "args", "mnist-cpu", "--params", params])
    assert result.exit_code == 0
    words = result.stdout.split()
    assert words[0::2] == ["-S"] * (len(words) // 2)
    assert "data.dataset=mnist" in words and "~methods.ddpm" in words
    shown = runner.invoke(app, ["profile", "show", "cifar10-gpu", "--params", params])
    assert shown.exit_code == 0
    assert yaml.safe_load(shown.stdout)["model"]["base_channels"] == 128
    listed = runner.invoke(app, ["profile", "list"])
    assert all(name in listed.stdout for name in SHIPPED)


def test_cli_bad_profiles_exit_2_with_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    params = str(REPO / "params.yaml")
    result = runner.invoke(app, ["profile", "args", "no-such-profile", "--params", params])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "no such profile" in result.stderr and "mnist-cpu" in result.stderr
    bad = write_params(tmp_path / "bad.yaml", {"train": {"lr": -1}})
    result = runner.invoke(app, ["profile", "args", str(bad), "--params", params])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert f"profile {bad}: train.lr: Input should be greater than 0" in result.stderr


# ------------------------------------------------------------------- the DDPM CIFAR-10 model


@pytest.fixture(scope="module")
def cifar() -> Any:
    return merged_params(default_raw(), "cifar10-gpu")[1]


def test_cifar10_profile_is_the_ddpm_paper_recipe(cifar: Any) -> None:
    m, t, p = cifar.model, cifar.train, cifar.process
    assert (m.base_channels, m.channel_mults, m.num_res_blocks) == (128, [1, 2, 2, 2], 2)
    assert (m.attention_resolutions, m.dropout, m.conditional) == ([16], 0.1, False)
    assert (p.name, p.schedule, p.num_steps, p.beta_start, p.beta_end) == (
        "ddpm", "linear", 1000, 1e-4, 0.02
    )
    assert (t.lr, t.batch_size, t.steps, t.ema_decay) == (2e-4, 128, 800_000, 0.9999)
    assert (t.warmup_steps, t.grad_clip) == (5000, 1.0)
    assert cifar.evaluate.extractor == "inception"


def test_cifar10_unet_has_the_papers_35_7m_parameters_plus_scale_shift(cifar: Any) -> None:
    """Ho et al. report 35.7M. Our residual blocks project the embedding to a scale and a shift
    (2 x out_ch outputs, Dhariwal & Nichol) where the paper adds one bias (out_ch): without that
    second half the count is the paper's."""
    with torch.device("meta"):
        net = build_unet(cifar)
    total = sum(p.numel() for p in net.parameters())
    scale_halves = sum(
        b.emb.weight.numel() // 2 + b.emb.bias.numel() // 2
        for b in net.modules() if isinstance(b, ResBlock)
    )
    assert total == pytest.approx(38.3e6, rel=0.005)
    assert total - scale_halves == pytest.approx(35.7e6, rel=0.01)


def test_cifar10_profile_trains_two_steps_on_a_cpu(cifar: Any, tmp_path: Path) -> None:
    params = cifar.model_copy(
        update={"train": cifar.train.model_copy(update={"steps": 2, "batch_size": 2})}
    )
    torch.manual_seed(0)
    net = build_unet(params)
    process = make_process(params.process.name, **params.process.factory_kwargs())
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    result = train(
        net, process, images, None, train_config(params),
        checkpoint_dir=tmp_path / "ckpt", config_hash="cifar10-gpu", progress=False,
    )
    assert result.step == 2
    model = torch.load(tmp_path / "ckpt" / "model.pt", weights_only=True)
    assert model["model_config"]["base_channels"] == 128 and model["step"] == 2
