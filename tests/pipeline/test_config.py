"""params.yaml validation: the default file, lax numbers, one-line errors naming the key."""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _pipeline_helpers import REPO, default_raw, tiny_raw, write_params
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import ParamsError, load_params, validate_params
from pipeline.dataset_facts import DATASETS, held_out_size
from pipeline.params_digest import flatten, params_hash, train_config_hash

Edit = Callable[[dict[str, Any]], None]


def edited(edit: Edit) -> dict[str, Any]:
    raw = copy.deepcopy(default_raw())
    edit(raw)
    return raw


def test_default_params_validate() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.process.name == "ddpm"
    assert {"ddpm", "ddim50"} <= set(params.methods)
    assert params.methods["ddim50"].settings() == {"eta": 0.0}
    assert params.methods["ddpm"].settings() == {"variance": "posterior"}
    assert params.methods["dpmpp10"].settings() == {"lower_order_final": True}
    assert params.methods["unipc10"].settings() == {"order": 2, "lower_order_final": True}
    assert params.evaluate.bootstrap >= 100 and params.evaluate.confidence == 0.95


def test_n_images_is_not_capped_by_the_test_split() -> None:
    """The floor is matched to n by extrapolation, so n may exceed the held-out images."""
    params = validate_params(edited(_set("sample", "n_images", 5000)))
    assert params.sample.n_images == 5000 > held_out_size(DATASETS["digits"], 0.25)


def test_tiny_params_validate_and_keep_every_value() -> None:
    raw = tiny_raw()
    dumped = validate_params(raw).model_dump(mode="json")

    def same(given: Any, kept: Any, where: str) -> None:
        if isinstance(given, dict):
            for key, value in given.items():
                assert key in kept, f"{where}{key} dropped"
                same(value, kept[key], f"{where}{key}.")
        else:  # numbers compare by value: 1 == 1.0
            assert kept == given, f"{where[:-1]}: {given!r} became {kept!r}"

    same(raw, dumped, "")
    # the sizes that let every stage run in seconds reached the validated params
    params = validate_params(raw)
    assert (params.train.steps, params.process.num_steps, params.sample.n_images) == (6, 100, 20)
    assert params.model.base_channels == 8 and list(params.methods) == ["ddim5"]


def test_training_options_default_to_ho_et_al_and_reach_the_library() -> None:
    from pipeline.train import train_config

    default = train_config(load_params(REPO / "params.yaml"))
    assert (default.loss_weighting, default.t_sampling, default.ema_std) == ("none", "uniform", None)
    raw = edited(lambda r: r["train"].update(loss_weighting="min_snr", min_snr_gamma=3,
                                             t_sampling="log_normal", p_mean=-1, p_std=1.5,
                                             ema_std=0.1, sigma_data=0.7))
    cfg = train_config(validate_params(raw))
    assert (cfg.loss_weighting, cfg.min_snr_gamma, cfg.sigma_data) == ("min_snr", 3.0, 0.7)
    assert (cfg.t_sampling, cfg.p_mean, cfg.p_std, cfg.ema_std) == ("log_normal", -1.0, 1.5, 0.1)


def test_the_baseline_is_the_ddpm_method_or_the_first() -> None:
    params = validate_params(default_raw())
    assert params.evaluate.baseline == "ddpm"
    assert params.evaluate.baseline_of(params.methods) == "ddpm"
    first = validate_params(edited(lambda r: r["evaluate"].update(baseline=None)))
    assert first.evaluate.baseline_of(first.methods) == next(iter(first.methods))


def test_numbers_written_as_strings_are_accepted() -> None:
    """`dvc exp run -S train.lr=1e-05` can leave a YAML-1.1 string behind."""
    params = validate_params(edited(lambda r: r["train"].update(lr="1e-05", steps="10")))
    assert params.train.lr == pytest.approx(1e-5)
    assert params.train.steps == 10


def _set(section: str, key: str, value: Any) -> Edit:
    return lambda r: r[section].update({key: value})


def _method(name: str, spec: dict[str, Any]) -> Edit:
    return lambda r: r["methods"].update({name: spec})


BAD: list[tuple[str, Edit, str]] = [
    ("negative lr", _set("train", "lr", -1), "train.lr: Input should be greater than 0 (got -1)"),
    ("unknown key", _set("train", "lrr", 1), "train.lrr: Extra inputs are not permitted"),
    ("wrong type", _set("train", "steps", "many"), "train.steps: Input should be a valid integer"),
    ("bad literal", _set("data", "dataset", "cifar"), "data.dataset: Input should be"),
    ("missing section", lambda r: r.pop("train"), "train: Field required"),
    (
        "eta above 1",
        _method("ddim50", {"sampler": "ddim", "steps": 5, "eta": 2}),
        "methods.ddim50.eta",
    ),
    ("unknown sampler", _method("x", {"sampler": "euler", "steps": 5}), "methods.x.sampler"),
    ("unipc order 4", _method("x", {"sampler": "unipc", "steps": 5, "order": 4}), "methods.x.order"),
    (
        "edm heun 1 step",
        _method("x", {"sampler": "edm_heun", "steps": 1}),
        "methods.x.steps: edm_heun needs at least 2 steps (the last one is the denoising step) "
        "(got 1)",
    ),
    # the registry's step rule, the one samplers.compatible applies, refused at validation
    ("pc 1 step", _method("x", {"sampler": "pc", "steps": 1}),
     "methods.x.steps: pc needs at least 2 steps"),
    ("ddim 0 steps", _method("x", {"sampler": "ddim", "steps": 0}),
     "methods.x.steps: ddim needs at least 1 step (got 0)"),
    ("rk45 takes no steps", _method("x", {"sampler": "ode_rk45", "steps": 5}),
     "methods.x.steps: Extra inputs are not permitted"),
    ("edm s_tmax inf", _method("x", {"sampler": "edm_heun", "steps": 5, "s_tmax": float("inf")}),
     "methods.x.s_tmax: Input should be a finite number"),
    ("old spacing name", _method("x", {"sampler": "ddim", "steps": 5, "spacing": "uniform"}),
     "methods.x.spacing: Input should be 'linspace'"),
    ("no sampler", _method("x", {"steps": 5}), "methods.x.sampler: Field required"),
    ("baseline not a method", _set("evaluate", "baseline", "ddim10"),
     "evaluate.baseline: must name a method (have: ddpm, ddim50,"),
    ("bad method name", _method("Big One", {"sampler": "ddim", "steps": 5}), "methods.Big One"),
    (
        "setting of another sampler",
        _method("x", {"sampler": "ddim", "steps": 5, "snr": 0.1}),
        "methods.x.snr",
    ),
    (
        "steps beyond ddpm",
        _method("x", {"sampler": "ddim", "steps": 2000}),
        "methods.x.steps: must not exceed process.num_steps=1000",
    ),
    (
        "batch vs nproc",
        _set("train", "nproc", 3),
        "train.batch_size: must be divisible by train.nproc=3",
    ),
    ("too few images", _set("sample", "n_images", 1), "sample.n_images: Input should be"),
    ("no sample process", _set("sample", "nproc", 0), "sample.nproc: Input should be"),
    (
        "more processes than images",
        _set("sample", "nproc", 401),
        "sample.nproc: more processes than the sample.n_images=400 images (got 401)",
    ),
    ("logsnr shift", _set("process", "logsnr_shift", 50), "process.logsnr_shift: Input should be"),
    ("loss weighting", _set("train", "loss_weighting", "p2"), "train.loss_weighting: Input should be"),
    ("t sampling", _set("train", "t_sampling", "beta"), "train.t_sampling: Input should be"),
    ("timestep shift", _set("process", "shift", 0.0), "process.shift: Input should be"),
    ("logit std", _set("train", "logit_std", 0.0), "train.logit_std: Input should be"),
    ("power ema std", _set("train", "ema_std", 0.5), "train.ema_std: Input should be less than"),
    ("confidence", _set("evaluate", "confidence", 1.0), "evaluate.confidence: Input should be"),
    (
        "beta order",
        _set("process", "beta_end", 1e-5),
        "process.beta_end: must exceed process.beta_start",
    ),
    (
        "attention size",
        _set("model", "attention_resolutions", [3]),
        "model.attention_resolutions: 3 is not",
    ),
    ("patch size", _set("model", "patch_size", 3), "model.patch_size: must divide the 8x8"),
    (
        "attention on the patch grid",
        _set("model", "patch_size", 4),
        "model.attention_resolutions: 4 is not a U-Net resolution [2, 1]",
    ),
    (
        "class label",
        _method("x", {"sampler": "ddim", "steps": 5, "classes": [12]}),
        "methods.x.classes",
    ),
]


def _guidance_without_condition(raw: dict[str, Any]) -> None:
    raw["model"]["conditional"] = False
    raw["methods"]["ddim50"]["guidance"] = 2.0


BAD.append(("guidance needs labels", _guidance_without_condition, "methods.ddim50.guidance"))
BAD += [
    (
        "unconditional with guidance",
        _method("u", {"sampler": "ddim", "steps": 5, "unconditional": True, "guidance": 2.0}),
        "methods.u.unconditional: cannot be combined with classifier-free guidance",
    ),
    (
        "autoguidance without a guide snapshot",
        _method("a", {"sampler": "ddim", "steps": 5, "autoguidance": 1.0}),
        "methods.a.autoguidance: needs the guide snapshot of train.guide_at > 0",
    ),
    ("guide_at of 1", _set("train", "guide_at", 1.0), "train.guide_at"),
    (
        "unconditional with classes",
        _method("u", {"sampler": "ddim", "steps": 5, "unconditional": True, "classes": [3]}),
        "methods.u.unconditional: samples with the null label, so it takes no classes",
    ),
]


BAD += [
    (
        "image size of mnist",
        lambda r: r["data"].update(dataset="mnist", image_size=32),
        "data.image_size: mnist images are 28x28; set null or 28 (got 32)",
    ),
    (
        "channels of cifar10",
        lambda r: r["data"].update(dataset="cifar10", channels=1),
        "data.channels: cifar10 images have 3 channel(s); set null or 3 (got 1)",
    ),
    ("two channels", _set("data", "channels", 2), "data.channels: Value error, must be 1 (grey)"),
    (
        "folder without root",
        lambda r: r["data"].update(dataset="folder", image_size=8),
        "data.root: the folder dataset needs root",
    ),
    (
        "folder without size",
        lambda r: r["data"].update(dataset="folder", root="images"),
        "data.image_size: the folder dataset needs the size images are resized to",
    ),
    (
        "folder size vs levels",
        lambda r: r["data"].update(dataset="folder", root="images", image_size=7),
        "model.channel_mults: 2 levels do not divide the 7x7 images",
    ),
]


@pytest.mark.parametrize(
    ("dataset", "shape"), [("fashion_mnist", (1, 28)), ("cifar10", (3, 32)), ("mnist", (1, 28))]
)
def test_registered_datasets_validate_with_their_facts(dataset: str, shape: tuple[int, int]) -> None:
    raw = tiny_raw()
    raw["data"].update(dataset=dataset, root="somewhere", image_size=shape[1], channels=shape[0])
    raw["model"]["attention_resolutions"] = [shape[1] // 2]
    params = validate_params(raw)
    assert (DATASETS[dataset].channels, DATASETS[dataset].image_size) == shape
    assert params.data.download is False


def test_folder_params_validate_without_touching_the_disk() -> None:
    raw = tiny_raw()
    raw["data"].update(dataset="folder", root="/no/such/folder", image_size=8, channels="3")
    params = validate_params(raw)
    assert params.data.channels == 3 and params.data.image_size == 8


@pytest.mark.parametrize("conditional", [True, False])
def test_unconditional_method_is_allowed_and_not_a_sampler_setting(conditional: bool) -> None:
    raw = tiny_raw()
    raw["model"]["conditional"] = conditional  # on an unconditional model it is a no-op
    raw["methods"]["u"] = {"sampler": "ddim", "steps": 5, "eta": 0.5, "unconditional": "true"}
    params = validate_params(raw)
    assert params.methods["u"].unconditional is True
    assert params.methods["u"].settings() == {"eta": 0.5}
    assert params.methods["ddim5"].unconditional is False


@pytest.mark.parametrize(("why", "edit", "expected"), BAD, ids=[b[0] for b in BAD])
def test_bad_values_name_the_key(why: str, edit: Edit, expected: str) -> None:
    with pytest.raises(ParamsError) as info:
        validate_params(edited(edit))
    message = str(info.value)
    assert message.startswith("params.yaml: ")
    assert expected in message
    assert "\n" not in message


@pytest.mark.parametrize(("why", "edit", "expected"), BAD[:6], ids=[b[0] for b in BAD[:6]])
def test_cli_exits_2_with_one_line(tmp_path: Path, why: str, edit: Edit, expected: str) -> None:
    path = write_params(tmp_path / "params.yaml", edited(edit))
    result = CliRunner().invoke(app, ["check-params", "--params", str(path)])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert expected in result.stderr
    assert result.stderr.startswith(f"{path}: ")


def test_subprocess_prints_one_line_and_no_traceback(tmp_path: Path) -> None:
    path = write_params(tmp_path / "params.yaml", edited(_set("train", "lr", -1)))
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "--params", str(path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr == f"{path}: train.lr: Input should be greater than 0 (got -1)\n"


def test_unreadable_and_malformed_files_exit_2(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(app, ["prepare", "--params", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2
    assert "cannot read" in missing.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("seed: 0\ndata: {dataset: digits\n")
    result = runner.invoke(app, ["prepare", "--params", str(broken)])
    assert result.exit_code == 2
    assert "invalid YAML at line" in result.stderr
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    assert runner.invoke(app, ["prepare", "--params", str(listing)]).exit_code == 2


def test_unknown_method_exits_2(tiny_params_file: Path) -> None:
    for command in ("sample", "evaluate"):
        result = CliRunner().invoke(
            app, [command, "--params", str(tiny_params_file), "--method", "nope"]
        )
        assert result.exit_code == 2
        assert "methods: no method named 'nope' (have: ddim5)" in result.stderr


@pytest.mark.parametrize(
    "command",
    [
        "prepare",
        "classifier",
        "train",
        "sample",
        "evaluate",
        "report",
        "encode",
        "decode",
        "check-params",
    ],
)
def test_help(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert "--params" in result.stdout


def test_params_hash_ignores_formatting_but_not_values(tmp_path: Path) -> None:
    raw = default_raw()
    compact = tmp_path / "compact.yaml"
    compact.write_text(__import__("json").dumps(raw))  # JSON is YAML, without comments
    assert params_hash(load_params(compact)) == params_hash(load_params(REPO / "params.yaml"))
    changed = edited(_set("train", "lr", 1e-3))
    assert params_hash(validate_params(changed)) != params_hash(validate_params(raw))


def test_train_config_hash_ignores_bookkeeping_only() -> None:
    base = validate_params(default_raw())
    same = validate_params(edited(lambda r: r["train"].update(log_every=7, nproc=4)))
    other = validate_params(edited(_set("train", "lr", 1e-3)))
    assert train_config_hash(base, "d") == train_config_hash(same, "d")
    assert train_config_hash(base, "d") != train_config_hash(other, "d")
    assert train_config_hash(base, "d") != train_config_hash(base, "e")


def test_process_factory_kwargs_pick_the_named_process() -> None:
    params = validate_params(edited(_set("process", "name", "ve")))
    assert params.process.factory_kwargs() == {"sigma_min": 0.01, "sigma_max": 50.0, "t_min": 1e-3}
    ddpm = validate_params(default_raw()).process.factory_kwargs()
    assert set(ddpm) == {"num_steps", "schedule", "beta_start", "beta_end", "logsnr_shift"}


def test_rectified_flow_with_flow_prediction_and_logit_normal_times() -> None:
    def edit(raw: dict[str, Any]) -> None:
        raw["process"].update(name="rectified_flow", shift=3.0)
        raw["model"]["prediction"] = "flow"
        raw["train"].update(t_sampling="logit_normal", logit_mean=0.5)

    from pipeline.train import train_config

    params = validate_params(edited(edit))
    assert params.process.factory_kwargs() == {"t_min": 1e-3, "shift": 3.0}
    cfg = train_config(params)
    assert (cfg.prediction, cfg.t_sampling, cfg.logit_mean, cfg.logit_std) == (
        "flow", "logit_normal", 0.5, 1.0)


def test_flatten() -> None:
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {
        "a.b": 1,
        "a.c.d": [1, 2],
        "e": None,
    }


def test_spacing_names_and_clip_option() -> None:
    from typing import get_args

    from diffusion_core.processes import SPACINGS
    from pipeline.config import Spacing

    assert get_args(Spacing) == SPACINGS  # the config offers exactly the library's spacings
    raw = tiny_raw()
    raw["methods"]["c"] = {"sampler": "pc", "steps": 5, "spacing": "trailing", "clip_x0": "true"}
    params = validate_params(raw)
    assert params.methods["c"].spacing == "trailing" and params.methods["c"].clip_x0 is True
    # neither is a sampler setting: generate() takes them by name
    assert params.methods["c"].settings() == {"snr": 0.16, "corrector_steps": 1}
    assert params.methods["ddim5"].clip_x0 is False
    assert validate_params(default_raw()).methods["ddim50"].spacing == "linspace"
