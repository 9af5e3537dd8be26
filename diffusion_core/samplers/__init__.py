"""Samplers: one short function per algorithm, all with one signature

    sampler(denoiser, process, x_T, grid, *, labels=None, rng=None, callback=None, **settings)
        -> SampleResult(x, nfe)

``grid`` is a descending time grid from :meth:`NoiseProcess.time_grid` ending at 0; the callback
receives ``{"i", "t", "x", "x0_pred"}`` after every step. :func:`generate` is the convenience entry
point: it draws ``x_T`` from the prior with per-image seeds and runs a named sampler.

What each sampler is called, takes and defaults to is declared once, in
:mod:`diffusion_core.sampler_registry`; ``SAMPLERS``, :func:`compatible` and :func:`generate` read
it there (a new sampler is its function, its test and one ``SamplerSpec``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from importlib import import_module

import torch
from torch import Tensor

from diffusion_core.denoiser import ClipX0
from diffusion_core.processes import NoiseProcess
from diffusion_core.rng import StackedRNG
from diffusion_core.sampler_registry import SPECS, SamplerSpec, Setting
from diffusion_core.samplers.base import SampleResult
from diffusion_core.samplers.ddim import ddim, ddim_invert
from diffusion_core.samplers.ddpm import ddpm
from diffusion_core.samplers.dpm_solver import dpmpp_2m, dpmpp_2m_sde, dpmpp_3m
from diffusion_core.samplers.edm import edm_heun
from diffusion_core.samplers.ode import dopri5, heun_ode, ode_velocity, rk45_ode
from diffusion_core.samplers.sde import euler_maruyama, langevin_correct, predictor_corrector
from diffusion_core.samplers.unipc import unipc


def _function(path: str) -> Callable[..., SampleResult]:
    """The sampler function ``module.name`` of this package."""
    module, _, name = path.rpartition(".")
    return getattr(import_module(f"{__name__}.{module}"), name)


#: name -> function, in the order of the registry (``diffusion_core.sampler_registry.SPECS``)
SAMPLERS: dict[str, Callable[..., SampleResult]] = {
    name: _function(spec.function) for name, spec in SPECS.items()
}
#: settings each sampler accepts beyond the common signature (from the registry)
SAMPLER_SETTINGS: dict[str, tuple[str, ...]] = {
    name: spec.setting_names() for name, spec in SPECS.items()
}


def compatible(sampler: str, process: NoiseProcess, steps: int | None = None) -> str | None:
    """Why ``sampler`` cannot run on ``process`` with ``steps`` (a one-line reason), or None.

    All samplers here are written against the shared ``alpha/sigma`` interface, so each runs on
    every process; what does not fit is a step count the process cannot provide (a discrete DDPM
    only has its own N steps) or one below the sampler's ``min_steps`` (its registry entry).
    ``steps`` is ignored for samplers that take none (adaptive RK45)."""
    if sampler not in SPECS:
        return f"unknown sampler {sampler!r}; choose one of {sorted(SPECS)}"
    spec = SPECS[sampler]
    if steps is None or not spec.takes_steps:
        return None
    if process.discrete and steps > process.num_steps:  # type: ignore[attr-defined]
        return (f"{sampler} with {steps} steps does not fit a discrete DDPM of "
                f"{process.num_steps} steps")  # type: ignore[attr-defined]
    return spec.steps_problem(steps)


def sampling_grid(process: NoiseProcess, sampler: str, steps: int = 50,
                  spacing: str | None = None, device: torch.device | str = "cpu") -> Tensor:
    """The time grid :func:`generate` runs ``sampler`` on: ``process.time_grid`` of ``steps``
    with ``spacing`` (default: the sampler's, from the registry); a sampler that takes no steps
    (adaptive RK45) gets the two-step grid, of which it uses the end points."""
    spec = SPECS[sampler]
    return process.time_grid(steps if spec.takes_steps else 2, spacing or spec.spacing,
                             device=device)


def check_labels(denoiser, labels: Tensor, n: int) -> None:
    """Class labels for ``n`` images, checked on the host once (the network does not check
    device labels: that would synchronise every step)."""
    if labels.shape != (n,) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be {n} integers, got {labels.dtype} {tuple(labels.shape)}")
    inner = denoiser  # look through guidance and clipping wrappers to the network's classes
    while not hasattr(inner, "num_classes") and hasattr(inner, "denoiser"):
        inner = inner.denoiser
    classes = int(getattr(inner, "num_classes", 0) or 0)
    if classes and labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi > classes:
            raise ValueError(f"labels must lie in [0, {classes}] ({classes} classes and the "
                             f"null label {classes}), got {lo if lo < 0 else hi}")


def generate(
    denoiser,
    process: NoiseProcess,
    sampler: str,
    *,
    shape: Sequence[int],
    seeds: Sequence[int],
    labels: Tensor | None = None,
    steps: int = 50,
    spacing: str | None = None,
    device: torch.device | str = "cpu",
    callback=None,
    clip_x0: bool = False,
    **settings,
) -> SampleResult:
    """Sample ``len(seeds)`` images of ``shape`` (C, H, W). Image ``i`` draws its prior sample and
    all its noise from a generator seeded with ``seeds[i]``. ``spacing`` defaults to the
    sampler's own (its registry entry); ``steps`` is ignored by samplers that take none
    (adaptive RK45 only uses the grid's end points). ``clip_x0`` clamps every ``x_0``
    estimate to [-1, 1] (:class:`~diffusion_core.denoiser.ClipX0`, once, around ``denoiser``
    and so after any guidance)."""
    reason = compatible(sampler, process, steps) or SPECS[sampler].settings_problem(settings)
    if reason:
        raise ValueError(reason)
    device = torch.device(device)
    rng = StackedRNG(seeds, device)
    x_T = process.prior_sample((len(seeds), *shape), rng, device=device)
    grid = sampling_grid(process, sampler, steps, spacing)
    if labels is not None:
        check_labels(denoiser, labels, len(seeds))
        labels = labels.to(device)
    if clip_x0:
        denoiser = ClipX0(denoiser)
    return SAMPLERS[sampler](denoiser, process, x_T, grid, labels=labels, rng=rng,
                             callback=callback, **settings)


__all__ = [
    "SAMPLERS", "SAMPLER_SETTINGS", "SPECS", "SampleResult", "SamplerSpec", "Setting",
    "compatible", "ddim", "ddim_invert", "ddpm", "dopri5", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m",
    "edm_heun", "euler_maruyama", "generate", "heun_ode", "langevin_correct", "ode_velocity",
    "predictor_corrector", "rk45_ode", "sampling_grid", "unipc",
]
