"""Training-time distributions of the noise level, for any process.

Every process is ``x_t = alpha(t) x_0 + sigma(t) eps``; its noise level in EDM's sense (Karras et
al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", Sec. 2) is the
noise-to-signal ratio ``sigma_e(t) = sigma(t) / alpha(t) = exp(-lambda(t) / 2)``, with
``lambda = log(alpha^2 / sigma^2)`` the log-SNR. Two ways to draw the ``t`` of a training example:

* ``uniform``: the process's own :meth:`~diffusion_core.processes.NoiseProcess.sample_t`
  (``i ~ U{1..N}`` for DDPM, Ho et al. 2020, Algorithm 1; ``U(t_min, 1)`` for the SDEs, Song et
  al. 2021, eq. 7);
* ``log_normal``: EDM's ``ln sigma_e ~ N(P_mean, P_std^2)`` (Karras et al. 2022, Table 1,
  ``P_mean = -1.2``, ``P_std = 1.2``), i.e. ``lambda = -2 ln sigma_e``, mapped to the process's time
  by ``t = lambda^{-1}(lambda)``; clamped to ``[t_min, t_max]`` (the process cannot make noise
  levels outside ``[sigma_e(t_min), sigma_e(t_max)]``), and for a discrete DDPM snapped to the
  step whose log-SNR is nearest;
* ``logit_normal``: SD3's ``t = sigmoid(n)``, ``n ~ N(m, s^2)`` (Esser et al. 2024, "Scaling
  Rectified Flow Transformers", Sec. 3.1, best at ``m = 0``, ``s = 1``) on rectified flow. There
  ``ln sigma_e = ln(t / (1 - t)) = logit(t) = n``, so it is the log-normal family above with SD3's
  parameters, and that is how it is drawn on every process: ``lambda = -2 n``, then
  ``t = lambda^{-1}(lambda)`` (exactly ``sigmoid(n)`` on rectified flow, clamped to
  ``[t_min, t_max]``), so another process trains on the noise levels SD3 trains on.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from diffusion_core.processes import DiscreteDDPM, NoiseProcess

TSampling = Literal["uniform", "log_normal", "logit_normal"]
T_SAMPLINGS: tuple[str, ...] = get_args(TSampling)

#: EDM's training distribution of ln(sigma/alpha) (Karras et al. 2022, Table 1)
EDM_P_MEAN, EDM_P_STD = -1.2, 1.2
#: SD3's logit-normal times, logit(t) ~ N(0, 1) (Esser et al. 2024, Sec. 3.1 and Table 1)
SD3_LOGIT_MEAN, SD3_LOGIT_STD = 0.0, 1.0


def nearest_step_time(process: DiscreteDDPM, lam: Tensor) -> Tensor:
    """Grid times ``i / N`` of the DDPM steps whose log-SNR is nearest to ``lam`` (any shape).

    ``lambda_i`` falls strictly with ``i``, so the nearest is one of the two steps around the
    insertion point of ``lam`` in the ascending table ``lambda_N < ... < lambda_1``."""
    n = process.num_steps
    steps = torch.arange(1, n + 1, dtype=torch.float64) / n
    table = process.log_snr(steps).flip(0)  # ascending: entry j is step N - j
    lam = lam.to(torch.float64).cpu()
    j = torch.searchsorted(table, lam).clamp(1, n - 1)
    closer_low = (lam - table[j - 1]).abs() <= (table[j] - lam).abs()
    j = torch.where(closer_low, j - 1, j)
    return (n - j).to(torch.float64) / n


def time_from_log_snr(process: NoiseProcess, lam: Tensor) -> Tensor:
    """The training time with log-SNR ``lam``: exact inverse (clamped to ``[t_min, t_max]``) for a
    continuous process, the nearest step for a discrete DDPM."""
    if isinstance(process, DiscreteDDPM):
        return nearest_step_time(process, lam)
    return process.inverse_log_snr(lam.cpu())


def sample_training_t(
    process: NoiseProcess,
    n: int,
    *,
    kind: str = "uniform",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    p_mean: float = EDM_P_MEAN,
    p_std: float = EDM_P_STD,
    logit_mean: float = SD3_LOGIT_MEAN,
    logit_std: float = SD3_LOGIT_STD,
) -> Tensor:
    """``n`` training times (float64, on ``device``) drawn as ``kind`` says (module docstring):
    ``p_mean``, ``p_std`` parameterise ``log_normal``, ``logit_mean``, ``logit_std``
    ``logit_normal``."""
    if kind == "uniform":
        return process.sample_t(n, generator=generator, device=device)
    if kind not in ("log_normal", "logit_normal"):
        raise ValueError(f"unknown t_sampling {kind!r}: choose one of {list(T_SAMPLINGS)}")
    mean, std = (p_mean, p_std) if kind == "log_normal" else (logit_mean, logit_std)
    if std <= 0:
        name = "p_std" if kind == "log_normal" else "logit_std"
        raise ValueError(f"{name} must be > 0, got {std}")
    dev = generator.device if generator is not None else device
    z = torch.randn(n, generator=generator, device=dev, dtype=torch.float64)
    lam = -2.0 * (mean + std * z)  # ln(sigma/alpha) = mean + std z
    t = time_from_log_snr(process, lam)
    return t.to(device) if device is not None else t
