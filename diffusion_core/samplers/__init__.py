"""Samplers: one short function per algorithm, all with one signature

    sampler(denoiser, process, x_T, grid, *, labels=None, rng=None, callback=None, **settings)
        -> SampleResult(x, nfe)

``grid`` is a descending time grid from :meth:`NoiseProcess.time_grid` ending at 0; the callback
receives ``{"i", "t", "x", "x0_pred"}`` after every step. :func:`generate` is the convenience entry
point: it draws ``x_T`` from the prior with per-image seeds and runs a named sampler.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from diffusion_core.denoiser import ClipX0
from diffusion_core.processes import NoiseProcess
from diffusion_core.rng import StackedRNG
from diffusion_core.samplers.base import SampleResult
from diffusion_core.samplers.ddim import ddim, ddim_invert
from diffusion_core.samplers.ddpm import ddpm
from diffusion_core.samplers.dpm_solver import dpmpp_2m, dpmpp_2m_sde, dpmpp_3m
from diffusion_core.samplers.edm import edm_heun
from diffusion_core.samplers.ode import dopri5, heun_ode, ode_velocity, rk45_ode
from diffusion_core.samplers.sde import euler_maruyama, langevin_correct, predictor_corrector
from diffusion_core.samplers.unipc import unipc

SAMPLERS: dict[str, Callable[..., SampleResult]] = {
    "ddpm": ddpm,
    "ddim": ddim,
    "sde": euler_maruyama,
    "pc": predictor_corrector,
    "ode_heun": heun_ode,
    "ode_rk45": rk45_ode,
    # fast samplers (issue #12): one evaluation per step, edm_heun two (2N - 1 in all)
    "dpmpp_2m": dpmpp_2m,
    "dpmpp_3m": dpmpp_3m,
    "dpmpp_2m_sde": dpmpp_2m_sde,
    "unipc": unipc,
    "edm_heun": edm_heun,
}

#: settings each sampler accepts beyond the common signature
SAMPLER_SETTINGS: dict[str, tuple[str, ...]] = {
    "ddpm": ("variance",),
    "ddim": ("eta",),
    "sde": (),
    "pc": ("snr", "corrector_steps"),
    "ode_heun": (),
    "ode_rk45": ("rtol", "atol"),
    "dpmpp_2m": ("lower_order_final",),
    "dpmpp_3m": ("lower_order_final",),
    "dpmpp_2m_sde": ("lower_order_final",),
    "unipc": ("order", "lower_order_final"),
    "edm_heun": ("s_churn", "s_tmin", "s_tmax", "s_noise"),
}


def compatible(sampler: str, process: NoiseProcess, steps: int | None = None) -> str | None:
    """Why ``sampler`` cannot run on ``process`` with ``steps`` (a one-line reason), or None.

    All samplers here are written against the shared ``alpha/sigma`` interface, so each runs on
    every process; what does not fit is a step count the process cannot provide (a discrete DDPM
    only has its own N steps) or a grid too short for the method."""
    if sampler not in SAMPLERS:
        return f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}"
    if steps is not None:
        if process.discrete and steps > process.num_steps:  # type: ignore[attr-defined]
            return (f"{sampler} with {steps} steps does not fit a discrete DDPM of "
                    f"{process.num_steps} steps")  # type: ignore[attr-defined]
        if sampler in ("ode_heun", "sde", "pc", "edm_heun") and steps < 2:
            return f"{sampler} needs at least 2 steps (the last one is the denoising step)"
    return None


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
    spacing: str = "linspace",
    device: torch.device | str = "cpu",
    callback=None,
    clip_x0: bool = False,
    **settings,
) -> SampleResult:
    """Sample ``len(seeds)`` images of ``shape`` (C, H, W). Image ``i`` draws its prior sample and
    all its noise from a generator seeded with ``seeds[i]``. ``clip_x0`` clamps every ``x_0``
    estimate to [-1, 1] (:class:`~diffusion_core.denoiser.ClipX0`, once, around ``denoiser``
    and so after any guidance)."""
    reason = compatible(sampler, process, None if sampler == "ode_rk45" else steps)
    if reason:
        raise ValueError(reason)
    unknown = set(settings) - set(SAMPLER_SETTINGS[sampler])
    if unknown:
        raise ValueError(f"{sampler} does not take settings {sorted(unknown)}; "
                         f"it takes {list(SAMPLER_SETTINGS[sampler])}")
    device = torch.device(device)
    rng = StackedRNG(seeds, device)
    x_T = process.prior_sample((len(seeds), *shape), rng, device=device)
    grid = process.time_grid(2 if sampler == "ode_rk45" else steps, spacing, device="cpu")
    if labels is not None:
        check_labels(denoiser, labels, len(seeds))
        labels = labels.to(device)
    if clip_x0:
        denoiser = ClipX0(denoiser)
    return SAMPLERS[sampler](denoiser, process, x_T, grid, labels=labels, rng=rng,
                             callback=callback, **settings)


__all__ = [
    "SAMPLERS", "SAMPLER_SETTINGS", "SampleResult", "compatible", "ddim", "ddim_invert", "ddpm",
    "dopri5", "euler_maruyama", "generate", "heun_ode", "langevin_correct", "ode_velocity",
    "predictor_corrector",
    "rk45_ode",
    "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m", "edm_heun", "unipc",
]
