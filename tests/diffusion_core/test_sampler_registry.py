"""The sampler registry is the one source: the functions, ``compatible`` and ``generate`` agree
with what ``diffusion_core.sampler_registry`` declares."""

import inspect
import math

import pytest
import torch

from diffusion_core.analytic import GaussianDenoiser
from diffusion_core.processes import VPSDE, DiscreteDDPM
from diffusion_core.sampler_registry import SPECS, SamplerSpec, Setting, spec_of
from diffusion_core.samplers import (
    SAMPLER_SETTINGS,
    SAMPLERS,
    compatible,
    generate,
    sampling_grid,
)

SHAPE = (1, 2, 2)
COMMON = {"denoiser", "process", "x", "grid", "labels", "rng", "callback"}


def keyword_settings(fn) -> dict[str, object]:
    """``{name: default}`` of a sampler function's settings beyond the common signature."""
    return {name: p.default for name, p in inspect.signature(fn).parameters.items()
            if name not in COMMON}


@pytest.mark.parametrize("name", list(SPECS))
def test_function_signatures_match_the_declared_settings_and_defaults(name):
    spec = SPECS[name]
    declared = spec.defaults()
    assert keyword_settings(SAMPLERS[name]) == declared  # names and defaults, in order
    assert list(keyword_settings(SAMPLERS[name])) == list(declared)
    assert SAMPLER_SETTINGS[name] == spec.setting_names()
    for setting in spec.settings:  # each default satisfies its own constraints
        assert setting.problem(setting.default) is None, (name, setting.name)


def test_samplers_are_derived_from_the_registry():
    assert list(SAMPLERS) == list(SPECS)
    assert SAMPLERS["sde"].__name__ == "euler_maruyama"
    with pytest.raises(ValueError, match="unknown sampler 'dpm'"):
        spec_of("dpm")


def test_edm_s_tmax_has_one_default_meaning_no_bound():
    """Was ``inf`` in the library and ``1e3`` in the params model; now None (= no bound) in
    both: churn reaches every noise level, as with ``s_tmax = inf``."""
    s_tmax = next(s for s in SPECS["edm_heun"].settings if s.name == "s_tmax")
    assert s_tmax.default is None and s_tmax.nullable
    p = VPSDE()
    d = GaussianDenoiser(torch.zeros(SHAPE, dtype=torch.float64), 0.5, p)
    x = torch.randn(3, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grid = p.time_grid(6, "karras")

    def run(**kw):
        return SAMPLERS["edm_heun"](d, p, x.clone(), grid, s_churn=20.0,
                                    rng=torch.Generator().manual_seed(1), **kw).x

    assert torch.equal(run(), run(s_tmax=math.inf))
    assert not torch.equal(run(), run(s_tmax=1.0))  # a bound does cut the churn


@pytest.mark.parametrize("name", [n for n, s in SPECS.items() if s.takes_steps])
def test_generate_defaults_to_the_declared_spacing(name):
    p = VPSDE()
    d = GaussianDenoiser(torch.zeros(SHAPE, dtype=torch.float64), 0.5, p)
    seen = []
    generate(d, p, name, shape=SHAPE, seeds=[0], steps=6, callback=lambda i: seen.append(i["t"]))
    expected = p.time_grid(6, SPECS[name].spacing)[:-1].tolist()
    assert seen == pytest.approx(expected, rel=0, abs=1e-6)  # edm_heun reports float32 t
    assert sampling_grid(p, name, 6).tolist() == p.time_grid(6, SPECS[name].spacing).tolist()


def test_spacings_differ_so_the_default_test_can_fail():
    p = VPSDE()
    assert {SPECS[n].spacing for n in SPECS} == {"linspace", "logsnr", "karras"}
    assert p.time_grid(6, "logsnr").tolist() != p.time_grid(6, "linspace").tolist()


@pytest.mark.parametrize("name", list(SPECS))
def test_compatible_applies_the_declared_minimum_steps(name):
    spec, p = SPECS[name], DiscreteDDPM(100)
    if not spec.takes_steps:  # adaptive: any step count is ignored
        assert compatible(name, p, 0) is None and compatible(name, p, 10**6) is None
        return
    assert compatible(name, p, spec.min_steps) is None
    reason = compatible(name, p, spec.min_steps - 1)
    assert reason == spec.steps_problem(spec.min_steps - 1) and f"{name} needs" in reason
    assert "does not fit a discrete DDPM" in compatible(name, p, 101)


def test_the_step_rule_is_what_generate_refuses():
    p = VPSDE()
    d = GaussianDenoiser(torch.zeros(SHAPE, dtype=torch.float64), 0.5, p)
    with pytest.raises(ValueError, match="pc needs at least 2 steps"):
        generate(d, p, "pc", shape=SHAPE, seeds=[0], steps=1)
    assert generate(d, p, "ode_rk45", shape=SHAPE, seeds=[0], steps=1, rtol=1e-3,
                    atol=1e-3).nfe > 0  # steps do not apply


@pytest.mark.parametrize(("name", "settings", "message"), [
    ("ddim", {"eta": 1.5}, "ddim: eta must be <= 1, got 1.5"),
    ("pc", {"snr": 0.0}, "pc: snr must be > 0, got 0.0"),
    ("pc", {"corrector_steps": 1.5}, "pc: corrector_steps must be a int, got 1.5"),
    ("unipc", {"order": 4}, "unipc: order must be <= 3, got 4"),
    ("ddpm", {"variance": "fixed"}, "ddpm: variance must be one of 'posterior', 'beta'"),
    ("dpmpp_2m", {"lower_order_final": 1}, "lower_order_final must be a bool, got 1"),
    ("edm_heun", {"s_tmin": -1.0}, "edm_heun: s_tmin must be >= 0, got -1.0"),
    ("edm_heun", {"s_noise": None}, "s_noise must not be None"),
    ("ddim", {"snr": 0.1}, "ddim does not take settings ['snr']; it takes ['eta']"),
])
def test_generate_refuses_settings_outside_the_declared_constraints(name, settings, message):
    p = VPSDE()
    d = GaussianDenoiser(torch.zeros(SHAPE, dtype=torch.float64), 0.5, p)
    with pytest.raises(ValueError) as info:
        generate(d, p, name, shape=SHAPE, seeds=[0], steps=4, **settings)
    assert message in str(info.value)


def outside(setting: Setting) -> list[object]:
    """A value just outside each declared constraint of ``setting``."""
    bounds = [None if setting.ge is None else setting.ge - 1, setting.gt,
              None if setting.le is None else setting.le + 1]
    return ([v for v in bounds if v is not None] + (["other"] if setting.choices else [])
            + ([] if setting.nullable else [None]))


BAD = [(n, s.name, v) for n, spec in SPECS.items() for s in spec.settings for v in outside(s)]


@pytest.mark.parametrize(("name", "key", "value"), BAD, ids=[f"{n}.{k}={v}" for n, k, v in BAD])
def test_each_function_refuses_what_its_spec_refuses(name, key, value):
    """Called directly (not through generate), every sampler checks its settings against the
    registry: the constraints are declared once."""
    p = VPSDE()
    d = GaussianDenoiser(torch.zeros(SHAPE, dtype=torch.float64), 0.5, p)
    x = torch.zeros(1, *SHAPE, dtype=torch.float64)
    with pytest.raises(ValueError, match=f"^{name}: {key} must"):
        SAMPLERS[name](d, p, x, p.time_grid(3), rng=torch.Generator(), **{key: value})


def test_setting_problems_at_the_bounds():
    s = Setting("x", float, 0.5, "a fraction", gt=0.0, le=1.0)
    assert [s.problem(v) for v in (1e-9, 1, 1.0)] == [None, None, None]
    assert s.problem(0.0) == "x must be > 0, got 0.0"
    assert s.problem(float("nan")) is not None
    assert s.problem(True) == "x must be a float, got True"
    assert Setting("k", int, 1, "a count", ge=0).problem(2.0) is None  # integral numbers
    spec = SamplerSpec("fake", "ddim.ddim", "a fake", (s,), min_steps=3)
    assert spec.steps_problem(2) == ("fake needs at least 3 steps (the last one is the "
                                     "denoising step)")
    assert spec.settings_problem({"x": 0.25}) is None


def test_docs_table_is_the_registry():
    from pathlib import Path

    from diffusion_core.sampler_registry import settings_table

    text = (Path(__file__).parents[2] / "docs" / "samplers.md").read_text()
    begin, end = "<!-- sampler settings: begin -->\n", "\n<!-- sampler settings: end -->"
    assert text[text.index(begin) + len(begin):text.index(end)] == settings_table()
