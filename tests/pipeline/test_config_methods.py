"""The params model of ``methods.<name>`` is derived from the sampler registry
(``diffusion_core.sampler_registry``): same settings, defaults, bounds and step rule."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from _pipeline_helpers import REPO, tiny_raw

from diffusion_core.sampler_registry import SPECS, Setting
from pipeline.config import METHOD_MODELS, ParamsError, validate_params


def with_method(spec: dict[str, Any]) -> dict[str, Any]:
    raw = tiny_raw()
    raw["methods"]["m"] = spec
    return raw


def base(name: str) -> dict[str, Any]:
    spec = SPECS[name]
    return {"sampler": name, **({"steps": max(spec.min_steps, 4)} if spec.takes_steps else {})}


@pytest.mark.parametrize("name", list(SPECS))
def test_a_method_gets_the_declared_defaults_and_spacing(name: str) -> None:
    spec = SPECS[name]
    m = validate_params(with_method(base(name))).methods["m"]
    assert type(m) is METHOD_MODELS[name]
    assert m.settings() == spec.defaults()
    assert getattr(m, "spacing", None) == (spec.spacing if spec.takes_steps else None)
    assert hasattr(m, "steps") == spec.takes_steps


def out_of_range(setting: Setting) -> list[Any]:
    """Values just outside each declared constraint."""
    bad: list[Any] = [v for v in (
        None if setting.ge is None else setting.ge - 1,
        setting.gt,
        None if setting.le is None else setting.le + 1,
    ) if v is not None]
    if setting.choices:
        bad.append("not-a-choice")
    if not setting.nullable:
        bad.append(None)
    return bad


CASES = [(name, s, v) for name, spec in SPECS.items() for s in spec.settings
         for v in out_of_range(s)]


@pytest.mark.parametrize(("name", "setting", "value"), CASES,
                         ids=[f"{n}.{s.name}={v}" for n, s, v in CASES])
def test_values_outside_the_declared_constraints_are_refused_naming_the_key(
    name: str, setting: Setting, value: Any
) -> None:
    assert setting.problem(value) is not None  # the library refuses it too
    with pytest.raises(ParamsError) as info:
        validate_params(with_method({**base(name), setting.name: value}))
    message = str(info.value)
    assert message.startswith(f"params.yaml: methods.m.{setting.name}: ")
    assert "\n" not in message


def test_s_tmax_null_means_no_bound() -> None:
    m = validate_params(with_method({"sampler": "edm_heun", "steps": 4})).methods["m"]
    assert m.s_tmax is None  # was 1e3 here and inf in the library
    m = validate_params(with_method({"sampler": "edm_heun", "steps": 4, "s_tmax": "50"}))
    assert m.methods["m"].s_tmax == 50.0


FAKE = """
import dataclasses
from diffusion_core import sampler_registry as r
r.SPECS["fake"] = r.SamplerSpec(
    "fake", "ddim.ddim", "a sampler only this test knows",
    (r.Setting("tau", float, 0.5, "a fraction", gt=0.0, le=1.0),
     r.Setting("mode", str, "a", "a choice", choices=("a", "b"))),
    spacing="trailing", min_steps=3)
sys.path.insert(0, "tests/pipeline")
from _pipeline_helpers import tiny_raw
from pipeline.config import ParamsError, validate_params
raw = tiny_raw()
raw["methods"]["f"] = {"sampler": "fake", "steps": 3, "mode": "b"}
m = validate_params(raw).methods["f"]
print(m.settings(), m.spacing)
for bad in ({"tau": 2}, {"steps": 2}, {"rtol": 1e-3}):
    raw["methods"]["f"] = {"sampler": "fake", "steps": 3, **bad}
    try:
        validate_params(raw)
    except ParamsError as exc:
        print(exc)
"""


def test_a_sampler_added_to_the_registry_is_validated_with_no_edit_in_the_config() -> None:
    out = subprocess.run([sys.executable, "-c", "import sys\n" + FAKE], cwd=REPO,
                         capture_output=True, text=True, check=True,
                         timeout=120).stdout.splitlines()
    assert out[0] == "{'tau': 0.5, 'mode': 'b'} trailing"
    assert out[1] == "params.yaml: methods.f.tau: Input should be less than or equal to 1 (got 2)"
    assert out[2] == ("params.yaml: methods.f.steps: fake needs at least 3 steps (the last one "
                      "is the denoising step) (got 2)")
    assert out[3] == "params.yaml: methods.f.rtol: Extra inputs are not permitted (got 0.001)"
