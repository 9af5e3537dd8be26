"""The sampler registry: the one declaration of every sampler's name, function and settings.

Each :class:`SamplerSpec` states what the rest of the code needs to know about a sampler without
running it: the function (by name in ``diffusion_core.samplers``), its keyword settings
(:class:`Setting`: type, default, bounds or choices, a description), the time-grid spacing it is
meant for, the fewest steps it can take and whether it takes ``steps`` at all (adaptive RK45
chooses its own). ``diffusion_core.samplers`` builds ``SAMPLERS``, ``generate`` and
``compatible`` from it; the pipeline derives the params model of ``methods.<name>`` from it.

The module is plain Python (no torch), so the params model can read it without importing the
samplers: a stage that only validates params does not depend on the samplers' code.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Setting:
    """One keyword setting of a sampler beyond the common signature.

    ``nullable``: ``None`` is a valid value (and means what ``description`` says)."""

    name: str
    type: type
    default: Any
    description: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    choices: tuple[Any, ...] | None = None
    nullable: bool = False

    def bounds(self) -> dict[str, Any]:
        """The numeric bounds that are set, as keyword arguments (``ge``, ``gt``, ``le``)."""
        return {k: v for k, v in (("ge", self.ge), ("gt", self.gt), ("le", self.le))
                if v is not None}

    def _has_type(self, value: Any) -> bool:
        """bool is only bool; an int setting takes integral numbers, a float one any number."""
        if self.type is bool or isinstance(value, bool):
            return self.type is bool and isinstance(value, bool)
        if self.type in (int, float):
            return isinstance(value, (int, float)) and (self.type is float
                                                        or float(value).is_integer())
        return isinstance(value, self.type)

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not a valid ``name`` (one line), or None."""
        if value is None:
            return None if self.nullable else f"{self.name} must not be None"
        if self.choices is not None:
            return None if value in self.choices else (
                f"{self.name} must be one of {', '.join(map(repr, self.choices))}, got {value!r}")
        if not self._has_type(value):
            return f"{self.name} must be a {self.type.__name__}, got {value!r}"
        for bound, holds, sign in ((self.ge, operator.ge, ">="), (self.gt, operator.gt, ">"),
                                   (self.le, operator.le, "<=")):
            if bound is not None and not holds(value, bound):
                return f"{self.name} must be {sign} {bound:g}, got {value!r}"
        return None


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler: ``function`` is ``"module.name"`` under ``diffusion_core.samplers``;
    ``spacing`` the default of ``NoiseProcess.time_grid``'s spacing; ``min_steps`` the fewest
    steps it runs (2 where the last step, to ``t = 0``, is only the denoising step);
    ``takes_steps`` False for adaptive solvers, which only use the grid's end points."""

    name: str
    function: str
    summary: str
    settings: tuple[Setting, ...] = ()
    spacing: str = "linspace"
    min_steps: int = 1
    takes_steps: bool = True

    def defaults(self) -> dict[str, Any]:
        """``{setting: default}``."""
        return {s.name: s.default for s in self.settings}

    def setting_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.settings)

    def settings_problem(self, settings: dict[str, Any]) -> str | None:
        """Why ``settings`` do not fit this sampler (an unknown name, a value out of range)."""
        unknown = sorted(set(settings) - set(self.setting_names()))
        if unknown:
            return (f"{self.name} does not take settings {unknown}; "
                    f"it takes {list(self.setting_names())}")
        by_name = {s.name: s for s in self.settings}
        for name, value in settings.items():
            problem = by_name[name].problem(value)
            if problem is not None:
                return f"{self.name}: {problem}"
        return None

    def steps_problem(self, steps: int) -> str | None:
        """Why this sampler cannot take ``steps`` steps (one line), or None."""
        if steps >= self.min_steps:
            return None
        if self.min_steps == 1:
            return f"{self.name} needs at least 1 step"
        return (f"{self.name} needs at least {self.min_steps} steps (the last one is the "
                "denoising step)")


_LOWER_ORDER_FINAL = Setting(
    "lower_order_final", bool, True,
    "with few steps, lower the order of the last steps (Lu et al. 2022)")

_SPECS = (
    SamplerSpec("ddpm", "ddpm.ddpm", "DDPM ancestral sampling (Ho et al. 2020, Algorithm 2)",
                (Setting("variance", str, "posterior",
                         "reverse variance: posterior (beta-tilde) or beta",
                         choices=("posterior", "beta")),)),
    SamplerSpec("ddim", "ddim.ddim", "DDIM (Song, Meng & Ermon 2021, eq. 12)",
                (Setting("eta", float, 0.0, "noise scale: 0 deterministic, 1 DDPM ancestral",
                         ge=0.0, le=1.0),)),
    SamplerSpec("sde", "sde.euler_maruyama",
                "Euler-Maruyama on the reverse SDE (Song et al. 2021, eq. 6)", min_steps=2),
    SamplerSpec("pc", "sde.predictor_corrector",
                "predictor-corrector sampling (Song et al. 2021, Algorithms 2-5)",
                (Setting("snr", float, 0.16, "Langevin corrector signal-to-noise ratio", gt=0.0),
                 Setting("corrector_steps", int, 1, "Langevin steps per grid time", ge=0)),
                min_steps=2),
    SamplerSpec("ode_heun", "ode.heun_ode",
                "probability-flow ODE, fixed-step Heun (Song et al. 2021, eq. 13)", min_steps=2),
    SamplerSpec("ode_rk45", "ode.rk45_ode",
                "probability-flow ODE, adaptive RK45 (Dormand & Prince 1980)",
                (Setting("rtol", float, 1e-5, "relative error tolerance per step", gt=0.0),
                 Setting("atol", float, 1e-5, "absolute error tolerance per step", gt=0.0)),
                takes_steps=False),
    SamplerSpec("dpmpp_2m", "dpm_solver.dpmpp_2m", "DPM-Solver++(2M) (Lu et al. 2022, Alg. 2)",
                (_LOWER_ORDER_FINAL,), spacing="logsnr"),
    SamplerSpec("dpmpp_3m", "dpm_solver.dpmpp_3m", "DPM-Solver++(3M) (Lu et al. 2022, Sec. 4)",
                (_LOWER_ORDER_FINAL,), spacing="logsnr"),
    SamplerSpec("dpmpp_2m_sde", "dpm_solver.dpmpp_2m_sde",
                "SDE-DPM-Solver++(2M) (Lu et al. 2022, Sec. 5)", (_LOWER_ORDER_FINAL,),
                spacing="logsnr"),
    SamplerSpec("unipc", "unipc.unipc", "UniPC with bh2 (Zhao et al. 2023, Algorithms 1-2)",
                (Setting("order", int, 2, "order of the predictor", ge=1, le=3),
                 _LOWER_ORDER_FINAL), spacing="logsnr"),
    SamplerSpec("edm_heun", "edm.edm_heun",
                "EDM stochastic Heun (Karras et al. 2022, Algorithm 2): 2 steps - 1 evaluations",
                (Setting("s_churn", float, 0.0, "churn S_churn; 0 = deterministic (Algorithm 1)",
                         ge=0.0),
                 Setting("s_tmin", float, 0.0, "lowest noise level sigma/alpha that is churned",
                         ge=0.0),
                 Setting("s_tmax", float, None,
                         "highest noise level sigma/alpha that is churned; null = no bound",
                         ge=0.0, nullable=True),
                 Setting("s_noise", float, 1.0, "scale S_noise of the churn noise", ge=0.0)),
                spacing="karras", min_steps=2),
)

#: every sampler, by name, in the order of the docs
SPECS: dict[str, SamplerSpec] = {spec.name: spec for spec in _SPECS}


def _yaml(value: Any) -> str:
    """``value`` as params.yaml writes it."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _constraint(setting: Setting) -> str:
    choices = (True, False) if setting.type is bool else setting.choices
    if choices is not None:
        return " / ".join(f"`{_yaml(c)}`" for c in choices)
    parts = [f"{sign} {v:g}" for sign, v in ((">=", setting.ge), (">", setting.gt),
                                              ("<=", setting.le)) if v is not None]
    return ", ".join(parts) + (" or null" if setting.nullable else "")


def settings_table() -> str:
    """The registry as a markdown table (docs/samplers.md holds it; a test keeps them equal)."""
    rows = ["| sampler | steps (min) | spacing | setting | default | allowed | meaning |",
            "|---|---|---|---|---|---|---|"]
    for spec in SPECS.values():
        steps = str(spec.min_steps) if spec.takes_steps else "none (adaptive)"
        spacing = f"`{spec.spacing}`" if spec.takes_steps else ""
        head = f"| `{spec.name}` | {steps} | {spacing} |"
        if not spec.settings:
            rows.append(head + " | | | |")
        for k, s in enumerate(spec.settings):
            rows.append((head if k == 0 else "| | | |")
                        + f" `{s.name}` | `{_yaml(s.default)}` | {_constraint(s)} | "
                        f"{s.description} |")
    return "\n".join(rows)


def check_settings(sampler: str, **settings: Any) -> None:
    """Raise a one-line ValueError if ``settings`` break ``sampler``'s declared constraints
    (each sampler function calls this on its own settings)."""
    problem = SPECS[sampler].settings_problem(settings)
    if problem is not None:
        raise ValueError(problem)


def spec_of(sampler: str) -> SamplerSpec:
    """The spec of ``sampler``; a ValueError naming the choices if there is none."""
    if sampler not in SPECS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SPECS)}")
    return SPECS[sampler]
