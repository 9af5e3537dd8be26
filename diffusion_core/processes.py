"""Forward noise processes: one abstraction for DDPM and the Score-SDE family.

Every process is a Gaussian marginal (Kingma et al. 2021, "Variational Diffusion Models", eq. 1)

    q(x_t | x_0) = N(alpha(t) x_0, sigma(t)^2 I),   t in [0, 1],

from which everything a sampler or a loss needs follows:

* the SDE ``dx = f(t) x dt + g(t) dW`` (Song et al. 2021, eq. 5) with
  ``f(t) = d log alpha / dt`` and ``g(t)^2 = d sigma^2 / dt - 2 f(t) sigma^2``;
* the transition ``q(x_t | x_s) = N(alpha_{t|s} x_s, sigma_{t|s}^2 I)`` for s < t with
  ``alpha_{t|s} = alpha_t / alpha_s`` and ``sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2``;
* the log signal-to-noise ratio ``lambda(t) = log(alpha^2 / sigma^2)`` (DPM-Solver's time variable).

The discrete DDPM (Ho et al. 2020) is the member whose ``log alpha`` is piecewise linear between
its grid times ``t_i = i / N``; at those times ``alpha(t_i)^2 = prod_{j<=i} (1 - beta_j)``
exactly. As ``N`` grows with ``beta_i = beta(t_i) / N`` it converges to the VP-SDE, which is why a
network trained on the discrete schedule can be sampled by every SDE/ODE solver here.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from typing import Literal, get_args

import torch
from torch import Tensor

Spacing = Literal["linspace", "leading", "trailing", "quadratic", "logsnr", "karras"]
#: every spacing name :meth:`NoiseProcess.time_grid` accepts (``uniform``: deprecated ``linspace``)
SPACINGS: tuple[str, ...] = get_args(Spacing)


def check_spacing(spacing: str) -> str:
    """Validate a spacing name; the old name ``uniform`` maps to ``linspace`` with a warning."""
    if spacing == "uniform":
        warnings.warn("spacing 'uniform' is now called 'linspace' (diffusers' name)",
                      DeprecationWarning, stacklevel=3)
        return "linspace"
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}: choose one of {list(SPACINGS)}")
    return spacing


def grid_fractions(steps: int, spacing: str) -> Tensor:
    """Descending positions ``u_j in [0, 1]`` (``u = 0`` the least noisy step, 1 the noisiest),
    ``j = 0..steps-1``, of the index-based spacings, as ``steps`` of a very fine DDPM:

    * ``linspace`` (diffusers ``linspace``): ``u_j = 1 - j/(S-1)``, both ends included;
    * ``leading`` (DDIM's "uniform", diffusers ``leading``): ``u_j = (S-1-j)/S``, ends at 0;
    * ``trailing`` (Lin et al. 2024, diffusers ``trailing``): ``u_j = (S-j)/S``, starts at 1;
    * ``quadratic`` (DDIM's CIFAR choice, Song et al. 2021 App. D.2):
      ``u_j = 0.8 ((S-1-j)/(S-1))^2``, capped at 0.8 as in DDIM.
    """
    j = torch.arange(steps - 1, -1, -1, dtype=torch.float64)  # S-1, ..., 0
    if spacing == "linspace":
        return j / (steps - 1) if steps > 1 else torch.ones(1, dtype=torch.float64)
    if spacing == "leading":
        return j / steps
    if spacing == "trailing":
        return (j + 1) / steps
    if spacing == "quadratic":
        return 0.8 * (j / (steps - 1)) ** 2 if steps > 1 else torch.zeros(1, dtype=torch.float64)
    raise ValueError(f"{spacing!r} is not an index-based spacing")


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """EDM's noise levels (Karras et al. 2022, eq. 5), descending:
    ``sigma_i = (smax^(1/rho) + i/(S-1) (smin^(1/rho) - smax^(1/rho)))^rho``."""
    if steps == 1:
        return torch.tensor([sigma_max], dtype=torch.float64)
    ramp = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def strictly_decreasing(idx: Tensor, lo: int, hi: int) -> Tensor:
    """Integer steps made strictly decreasing within ``[lo, hi]``: a step that collides with the
    one after it moves up by one (collisions happen near the low end, e.g. ``quadratic``)."""
    idx = idx.clone()
    n = idx.numel()
    idx[-1] = max(int(idx[-1]), lo)
    for j in range(n - 2, -1, -1):
        idx[j] = max(int(idx[j]), int(idx[j + 1]) + 1)
    idx = idx.clamp(max=hi)
    for j in range(1, n):
        idx[j] = min(int(idx[j]), int(idx[j - 1]) - 1)
    return idx


def _as_tensor(t: Tensor | float, like: Tensor | None = None) -> Tensor:
    if isinstance(t, Tensor):
        return t.to(torch.float64) if t.dtype != torch.float64 else t
    device = like.device if like is not None else None
    return torch.tensor(float(t), dtype=torch.float64, device=device)


class NoiseProcess(ABC):
    """A forward process ``x_t = alpha(t) x_0 + sigma(t) eps`` on ``t in [0, 1]``.

    Coefficient methods take a tensor ``t`` of any shape and return float64 tensors of that
    shape; callers cast to their working dtype. Subclasses implement ``log_alpha``, ``sigma``,
    ``f`` and ``g2``; the rest derives from them.
    """

    name: str = "process"
    #: smallest time used in training and the last time before the final denoising step
    t_min: float = 0.0
    #: largest time used in training and the first time of every grid (below 1 where t = 1 is
    #: singular: rectified flow's alpha(1) = 0)
    t_max: float = 1.0
    #: True for processes defined on a grid of N steps (discrete DDPM)
    discrete: bool = False
    #: standard deviation of the prior p_T = N(0, prior_std^2 I)
    prior_std: float = 1.0

    @abstractmethod
    def log_alpha(self, t: Tensor) -> Tensor:
        """``log alpha(t)``."""

    @abstractmethod
    def sigma(self, t: Tensor) -> Tensor:
        """``sigma(t)``, the standard deviation of the noise in ``x_t``."""

    @abstractmethod
    def f(self, t: Tensor) -> Tensor:
        """Drift coefficient ``f(t) = d log alpha(t) / dt`` of ``dx = f x dt + g dW``."""

    @abstractmethod
    def g2(self, t: Tensor) -> Tensor:
        """Squared diffusion ``g(t)^2 = d sigma^2/dt - 2 f(t) sigma(t)^2``."""

    # ----------------------------------------------------------------- derived quantities
    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(self.log_alpha(_as_tensor(t)))

    def log_snr(self, t: Tensor) -> Tensor:
        """``lambda(t) = log(alpha^2 / sigma^2)``."""
        t = _as_tensor(t)
        return 2.0 * (self.log_alpha(t) - torch.log(self.sigma(t)))

    def transition(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha_{t|s}, sigma_{t|s}^2)`` of ``q(x_t | x_s)`` for ``s < t``."""
        s, t = _as_tensor(s), _as_tensor(t)
        a_ts = torch.exp(self.log_alpha(t) - self.log_alpha(s))
        var = self.sigma(t) ** 2 - a_ts**2 * self.sigma(s) ** 2
        return a_ts, var.clamp_min(0.0)

    def posterior(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Coefficients of ``q(x_s | x_t, x_0) = N(c_t x_t + c_0 x_0, var I)`` for ``0 < s < t``
        (Ho et al. 2020, eq. 6-7 for a general ``alpha, sigma``; Kingma et al. 2021, eq. 28):
        ``c_t = alpha_{t|s} sigma_s^2 / sigma_t^2``, ``c_0 = alpha_s sigma_{t|s}^2 / sigma_t^2``,
        ``var = sigma_{t|s}^2 sigma_s^2 / sigma_t^2``. Returns ``(c_t, c_0, var)``."""
        s, t = _as_tensor(s), _as_tensor(t)
        a_ts, var_ts = self.transition(s, t)
        sig_s2, sig_t2 = self.sigma(s) ** 2, self.sigma(t) ** 2
        return a_ts * sig_s2 / sig_t2, self.alpha(s) * var_ts / sig_t2, var_ts * sig_s2 / sig_t2

    def marginal(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """``x_t = alpha(t) x_0 + sigma(t) eps`` with ``t`` of shape ``(B,)``."""
        a = broadcast(self.alpha(t), x0)
        s = broadcast(self.sigma(t), x0)
        return a * x0 + s * eps

    # ----------------------------------------------------------------------------- prior
    def prior_sample(self, shape: tuple[int, ...], rng=None, device=None) -> Tensor:
        """Draw ``x_T ~ N(0, prior_std^2 I)``; ``shape`` includes the batch dimension."""
        from diffusion_core.rng import randn

        return self.prior_std * randn(shape, rng, device=device)

    def prior_logp(self, x: Tensor) -> Tensor:
        """Per-sample ``log N(x; 0, prior_std^2 I)``, summed over all but the batch dim."""
        d = x[0].numel()
        sq = x.flatten(1).double().pow(2).sum(1)
        return -0.5 * d * math.log(2 * math.pi * self.prior_std**2) - sq / (2 * self.prior_std**2)

    # ------------------------------------------------------------------------------ time
    def sample_t(
        self, n: int, generator: torch.Generator | None = None, device=None
    ) -> Tensor:
        """Training-time distribution of t: ``U(t_min, t_max)`` (Song et al. 2021, eq. 7)."""
        dev = generator.device if generator is not None else device
        u = torch.rand(n, generator=generator, device=dev, dtype=torch.float64)
        t = self.t_min + (self.t_max - self.t_min) * u
        return t.to(device) if device is not None else t

    def inverse_log_snr(self, lam: Tensor) -> Tensor:
        """The time ``t in [t_min, t_max]`` with ``log_snr(t) = lam`` (bisection; lambda
        decreases in t), clamped to the ends for ``lam`` outside ``[lambda(t_max), lambda(t_min)]``."""
        lam = _as_tensor(lam)
        lo = torch.full_like(lam, self.t_min)
        hi = torch.full_like(lam, self.t_max)
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            above = self.log_snr(mid) > lam  # mid is still too early
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        return 0.5 * (lo + hi)

    def _positive_times(self, steps: int, spacing: str, rho: float) -> Tensor:
        """The descending positive times of :meth:`time_grid` (before the final 0)."""
        if spacing in ("logsnr", "karras"):
            if steps == 1:
                return torch.full((1,), self.t_max, dtype=torch.float64)
            lam_1, lam_min = (float(self.log_snr(torch.tensor(v, dtype=torch.float64)))
                              for v in (self.t_max, self.t_min))
            if spacing == "logsnr":
                lam = torch.linspace(lam_1, lam_min, steps, dtype=torch.float64)
            else:  # EDM's sigma is sigma/alpha = exp(-lambda/2)
                sig = karras_sigmas(steps, math.exp(-lam_min / 2), math.exp(-lam_1 / 2), rho)
                lam = -2.0 * torch.log(sig)
            t = self.inverse_log_snr(lam)
            t[0], t[-1] = self.t_max, self.t_min  # the ends exactly
            return t
        return self.t_min + (self.t_max - self.t_min) * grid_fractions(steps, spacing)

    def time_grid(self, steps: int, spacing: Spacing = "linspace", device=None, *,
                  rho: float = 7.0) -> Tensor:
        """Descending sampling times ``[t_0, ..., t_{S-1}, 0]`` for ``S = steps`` network calls.

        A continuous process is treated as a DDPM with infinitely fine steps: ``t_min`` plays
        step 1 and ``t_max`` (1 but for rectified flow) step N, and
        ``t_j = t_min + (t_max - t_min) u_j`` with ``u_j`` from :func:`grid_fractions` for
        ``linspace`` (ends ``t_max`` and ``t_min``), ``leading`` (first time
        ``t_max - (t_max - t_min)/S``, last ``t_min``), ``trailing`` (first ``t_max``, last
        ``t_min + (t_max - t_min)/S``) and ``quadratic`` (first ``t_min + 0.8 (t_max - t_min)``).
        ``logsnr``: uniform in ``lambda = log(alpha^2/sigma^2)`` from ``lambda(t_max)`` to
        ``lambda(t_min)`` (DPM-Solver, Lu et al. 2022); ``karras``: EDM's spacing of
        ``sigma/alpha = exp(-lambda/2)`` with exponent ``rho`` (Karras et al. 2022, eq. 5);
        both map back to t with :meth:`inverse_log_snr`. Grids that start below t = 1 still
        start from a prior sample, as diffusers does (harmless for VP, a mismatch for VE).

        The last interval ends at 0: samplers take it as the final denoising step
        (``x_0 = E[x_0 | x_{t_S-1}]``, Tweedie's formula).
        """
        spacing = check_spacing(spacing)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        grid = self._positive_times(steps, spacing, rho)
        return torch.cat([grid, torch.zeros(1, dtype=torch.float64)]).to(device)

    def describe(self) -> dict:
        """Plain-type description (stored in checkpoints, rebuilt by :func:`make_process`)."""
        return {"name": self.name}


def broadcast(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample (or scalar) coefficient to broadcast against ``x`` in x's dtype."""
    v = v.to(device=x.device, dtype=x.dtype)
    if v.dim() == 0:
        return v
    return v.reshape(-1, *([1] * (x.dim() - 1)))


# ======================================================================== Score-SDE family
class VPSDE(NoiseProcess):
    """Variance-preserving SDE (Song et al. 2021, eq. 11): ``dx = -beta(t)/2 x dt + sqrt(beta(t)) dW``.

    ``beta(t) = beta_min + t (beta_max - beta_min)``,
    ``log alpha(t) = -t^2 (beta_max - beta_min)/4 - t beta_min / 2``, ``sigma^2 = 1 - alpha^2``.
    """

    name = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3):
        if not 0 < beta_min < beta_max:
            raise ValueError(f"need 0 < beta_min < beta_max, got {beta_min}, {beta_max}")
        if not 0 < t_min < 1:
            raise ValueError(f"t_min must lie in (0, 1), got {t_min}")
        self.beta_min, self.beta_max, self.t_min = float(beta_min), float(beta_max), float(t_min)

    def beta(self, t: Tensor) -> Tensor:
        return self.beta_min + _as_tensor(t) * (self.beta_max - self.beta_min)

    def log_alpha(self, t: Tensor) -> Tensor:
        t = _as_tensor(t)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(2.0 * self.log_alpha(t)))

    def f(self, t: Tensor) -> Tensor:
        return -0.5 * self.beta(t)

    def g2(self, t: Tensor) -> Tensor:
        return self.beta(t)

    def describe(self) -> dict:
        return {"name": self.name, "beta_min": self.beta_min, "beta_max": self.beta_max,
                "t_min": self.t_min}


class SubVPSDE(VPSDE):
    """Sub-VP SDE (Song et al. 2021, eq. 12): same drift as VP,
    ``g^2 = beta(t) (1 - exp(-2 int_0^t beta))``, so ``sigma(t) = 1 - alpha(t)^2``."""

    name = "subvp"

    def sigma(self, t: Tensor) -> Tensor:
        return -torch.expm1(2.0 * self.log_alpha(t))

    def g2(self, t: Tensor) -> Tensor:
        return self.beta(t) * (-torch.expm1(4.0 * self.log_alpha(t)))


class VESDE(NoiseProcess):
    """Variance-exploding SDE (Song et al. 2021, eq. 9): ``dx = sqrt(d sigma^2/dt) dW``.

    ``alpha = 1``, ``sigma(t) = sigma_min (sigma_max / sigma_min)^t``,
    ``g^2 = 2 sigma(t)^2 log(sigma_max / sigma_min)``, prior ``N(0, sigma_max^2 I)``.
    """

    name = "ve"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, t_min: float = 1e-5):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        if not 0 < t_min < 1:
            raise ValueError(f"t_min must lie in (0, 1), got {t_min}")
        self.sigma_min, self.sigma_max, self.t_min = (
            float(sigma_min), float(sigma_max), float(t_min))
        self.prior_std = self.sigma_max
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def log_alpha(self, t: Tensor) -> Tensor:
        return torch.zeros_like(_as_tensor(t))

    def sigma(self, t: Tensor) -> Tensor:
        return self.sigma_min * torch.exp(_as_tensor(t) * self._log_ratio)

    def f(self, t: Tensor) -> Tensor:
        return torch.zeros_like(_as_tensor(t))

    def g2(self, t: Tensor) -> Tensor:
        return 2.0 * self.sigma(t) ** 2 * self._log_ratio

    def describe(self) -> dict:
        return {"name": self.name, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max,
                "t_min": self.t_min}


# ============================================================================ rectified flow
def timestep_shift(t: Tensor, shift: float) -> Tensor:
    """SD3's resolution-dependent timestep shift (Esser et al. 2024, "Scaling Rectified Flow
    Transformers for High-Resolution Image Synthesis", Sec. 5.3.2):
    ``t' = shift t / (1 + (shift - 1) t)``.

    On rectified flow ``t' / (1 - t') = shift t / (1 - t)``: the noise-to-signal ratio is scaled
    by ``shift``, i.e. the log-SNR moved by ``-2 log shift`` (``shift > 1``: noisier times)."""
    t = _as_tensor(t)
    return shift * t / (1.0 + (shift - 1.0) * t)


class RectifiedFlow(NoiseProcess):
    """Rectified flow / flow matching's linear path (Liu et al. 2023, "Flow Straight and Fast";
    Lipman et al. 2023, "Flow Matching for Generative Modeling"; Esser et al. 2024, Sec. 3.1):
    ``x_t = (1 - t) x_0 + t eps``, i.e. ``alpha(t) = 1 - t``, ``sigma(t) = t``.

    From the general formulas of the module docstring (Kingma et al. 2021, "Variational
    Diffusion Models"; Song et al. 2021, eq. 5): ``f(t) = d log alpha/dt = -1 / (1 - t)``,
    ``g(t)^2 = d sigma^2/dt - 2 f sigma^2 = 2t + 2t^2/(1-t) = 2t / (1 - t)``, log-SNR
    ``lambda(t) = 2 log((1 - t) / t)`` with inverse ``t = sigmoid(-lambda / 2)``. The
    probability-flow velocity ``f x + g^2 eps / (2 sigma) = (eps - x) / (1 - t)`` is
    ``E[eps - x_0 | x_t]``, the flow the network of ``prediction="flow"`` regresses onto.

    The end ``t = 1`` is pure noise (``alpha = 0``, ``lambda = -inf``, ``f`` and ``g^2`` infinite),
    so the process lives on ``[t_min, t_max]`` with ``t_max = 1 - t_min``: the same convention as
    the VP-SDE, whose ``alpha(1) ~ 0.007`` is small but not 0. Grids start at ``t_max``
    (``alpha = t_min``; the prior N(0, I) differs from the marginal there by ``t_min x_0``),
    the log-SNR range is symmetric, ``+-2 log((1 - t_min)/t_min)``, and every sampler, the
    likelihood and the log-SNR spacings see finite coefficients. diffusers' DPM-Solver++ with
    flow sigmas makes the same choice (its largest sigma is ``1 - 1/1000``).

    ``shift`` (SD3's timestep shift, :func:`timestep_shift`, default 1 = none) warps the
    index-based grids (``linspace``, ``leading``, ``trailing``, ``quadratic``):
    ``t_j = t_min + (t_max - t_min) shift(u_j)``, keeping both ends. The ``logsnr`` and ``karras``
    grids are fixed by their end noise levels and ignore it (a shift moves every log-SNR by the
    same constant, so a log-SNR-uniform grid between pinned ends is unchanged by it).
    """

    name = "rectified_flow"

    def __init__(self, t_min: float = 1e-3, shift: float = 1.0):
        if not 0 < t_min < 0.5:
            raise ValueError(f"t_min must lie in (0, 0.5) (t_max = 1 - t_min), got {t_min}")
        if not (math.isfinite(shift) and shift > 0):
            raise ValueError(f"shift must be a positive number, got {shift}")
        self.t_min, self.t_max, self.shift = float(t_min), 1.0 - float(t_min), float(shift)

    def log_alpha(self, t: Tensor) -> Tensor:
        return torch.log1p(-_as_tensor(t))

    def sigma(self, t: Tensor) -> Tensor:
        return _as_tensor(t).clone()

    def f(self, t: Tensor) -> Tensor:
        return -1.0 / (1.0 - _as_tensor(t))

    def g2(self, t: Tensor) -> Tensor:
        t = _as_tensor(t)
        return 2.0 * t / (1.0 - t)

    def log_snr(self, t: Tensor) -> Tensor:
        t = _as_tensor(t)
        return 2.0 * (torch.log1p(-t) - torch.log(t))

    def inverse_log_snr(self, lam: Tensor) -> Tensor:
        """``t = sigmoid(-lambda / 2)``, clamped to ``[t_min, t_max]``."""
        return torch.sigmoid(-0.5 * _as_tensor(lam)).clamp(self.t_min, self.t_max)

    def _positive_times(self, steps: int, spacing: str, rho: float) -> Tensor:
        if spacing in ("logsnr", "karras"):
            return super()._positive_times(steps, spacing, rho)
        u = timestep_shift(grid_fractions(steps, spacing), self.shift)
        return self.t_min + (self.t_max - self.t_min) * u

    def describe(self) -> dict:
        return {"name": self.name, "t_min": self.t_min, "shift": self.shift}


# ============================================================================ discrete DDPM
def linear_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Ho et al. 2020, Sec. 4: betas linear from 1e-4 to 0.02 over T = 1000 steps.

    For other ``num_steps`` the endpoints are rescaled by ``1000 / num_steps`` so that the
    process (and its VP-SDE limit, ``beta_min = 1000 beta_start``) stays the same."""
    scale = 1000.0 / num_steps
    return torch.linspace(beta_start * scale, beta_end * scale, num_steps, dtype=torch.float64)


def cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal 2021, eq. 17: ``abar(t) = cos^2(((t/T + s)/(1 + s)) pi/2) / abar(0)``."""
    t = torch.linspace(0, num_steps, num_steps + 1, dtype=torch.float64)
    abar = torch.cos(((t / num_steps + s) / (1 + s)) * math.pi / 2) ** 2
    abar = abar / abar[0]
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


def shift_logsnr(betas: Tensor, shift: float, max_beta: float = 0.999) -> Tensor:
    """The betas whose ``abar`` has ``log SNR = log(abar / (1 - abar))`` moved by ``shift`` at
    every step: ``abar'_i = sigmoid(log SNR_i + shift)``, ``beta'_i = 1 - abar'_i / abar'_{i-1}``.

    The shifted schedule of Hoogeboom et al. 2023 ("simple diffusion", Sec. 3.1), who move the
    cosine schedule by ``2 log(64 / d)`` for d x d images: at a lower resolution the same noise
    level destroys more of the image (fewer redundant pixels; Chen 2023, "On the importance of
    noise scheduling"), so by that rule ``shift > 0`` (less noise at every step) suits images
    smaller than 64 x 64 and ``shift < 0`` larger ones. Measure it per dataset: on 28x28 MNIST
    the rule's +1.65 was worse and -2 better for the deterministic samplers
    (benchmarks/results/mnist_recipe_explore_cpu.md, round 7)."""
    abar = torch.cumprod(1.0 - betas, 0)
    shifted = torch.sigmoid(torch.logit(abar) + shift)
    previous = torch.cat([torch.ones(1, dtype=shifted.dtype), shifted[:-1]])
    return (1 - shifted / previous).clamp(min=0.0, max=max_beta)


class DiscreteDDPM(NoiseProcess):
    """The DDPM forward process (Ho et al. 2020, eq. 4): ``q(x_i|x_0) = N(sqrt(abar_i) x_0, (1-abar_i) I)``.

    Step ``i in 1..N`` is time ``t_i = i/N``; between grid times ``log alpha`` is linear in t, so
    ``f(t) = N/2 log(1 - beta_i)`` and ``g(t)^2 = -2 f(t)`` on ``(t_{i-1}, t_i]``: the
    discretisation of the VP-SDE with ``beta(t_i) ~= N beta_i``. ``logsnr_shift`` moves the
    schedule's ``log SNR`` by a constant at every step (:func:`shift_logsnr`).
    """

    name = "ddpm"
    discrete = True

    def __init__(
        self,
        num_steps: int = 1000,
        schedule: Literal["linear", "cosine"] = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        cosine_s: float = 0.008,
        logsnr_shift: float = 0.0,
    ):
        if num_steps < 2:
            raise ValueError(f"num_steps must be >= 2, got {num_steps}")
        if schedule == "linear":
            if not 0 < beta_start < beta_end:
                raise ValueError(f"need 0 < beta_start < beta_end, got {beta_start}, {beta_end}")
            betas = linear_betas(num_steps, beta_start, beta_end)
            if betas.max() >= 1:
                raise ValueError("beta_end * 1000 / num_steps must stay below 1")
        elif schedule == "cosine":
            betas = cosine_betas(num_steps, cosine_s)
        else:
            raise ValueError(f"unknown beta schedule {schedule!r}: use 'linear' or 'cosine'")
        if not math.isfinite(logsnr_shift):
            raise ValueError(f"logsnr_shift must be finite, got {logsnr_shift}")
        if logsnr_shift:
            betas = shift_logsnr(betas, float(logsnr_shift))
        self.logsnr_shift = float(logsnr_shift)
        self.num_steps, self.schedule = int(num_steps), schedule
        self.beta_start, self.beta_end, self.cosine_s = beta_start, beta_end, cosine_s
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, 0)
        # log abar at grid times 0..N (abar_0 = 1)
        self._log_abar = torch.cat([torch.zeros(1, dtype=torch.float64),
                                    torch.log(self.alphas_cumprod)])
        self.t_min = 1.0 / num_steps
        self._device_tables: dict[tuple[str, str], Tensor] = {}

    def _table(self, name: str, device: torch.device) -> Tensor:
        """The float64 table ``name`` on ``device``, copied there once (not on every call: a
        host-to-device copy per step would synchronise a GPU sampling loop)."""
        if device.type == "cpu":
            return getattr(self, name)
        tables = self.__dict__.setdefault("_device_tables", {})
        key = (name, str(device))
        if key not in tables:
            tables[key] = getattr(self, name).to(device)
        return tables[key]

    # ---------------------------------------------------------------- piecewise-linear log alpha
    def _locate(self, t: Tensor) -> tuple[Tensor, Tensor]:
        pos = _as_tensor(t).clamp(0.0, 1.0) * self.num_steps
        lo = torch.floor(pos).clamp(max=self.num_steps - 1).long()
        return lo, pos - lo

    def log_alpha(self, t: Tensor) -> Tensor:
        lo, frac = self._locate(t)
        la = self._table("_log_abar", lo.device)
        return 0.5 * (la[lo] + frac * (la[lo + 1] - la[lo]))

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(2.0 * self.log_alpha(t)))

    def f(self, t: Tensor) -> Tensor:
        t = _as_tensor(t)
        # the interval (t_{i-1}, t_i] holding t uses beta_i
        idx = torch.ceil(t.clamp(0.0, 1.0) * self.num_steps - 1e-9).clamp(1, self.num_steps).long()
        betas = self._table("betas", idx.device)
        return 0.5 * self.num_steps * torch.log1p(-betas[idx - 1])

    def g2(self, t: Tensor) -> Tensor:
        return -2.0 * self.f(t)

    # -------------------------------------------------------------------------------- time
    def sample_t(self, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        """``i ~ U{1, ..., N}``, ``t = i / N`` (Ho et al. 2020, Algorithm 1)."""
        dev = generator.device if generator is not None else device
        i = torch.randint(1, self.num_steps + 1, (n,), generator=generator, device=dev)
        t = i.to(torch.float64) / self.num_steps
        return t.to(device) if device is not None else t

    def time_grid(self, steps: int, spacing: Spacing = "linspace", device=None, *,
                  rho: float = 7.0) -> Tensor:
        """Grid times ``i/N`` of ``steps`` distinct DDPM steps, descending, then 0.

        Step ``i in 1..N`` is diffusers' timestep ``k = i - 1`` (its ``alphas_cumprod[k]`` is our
        ``alpha(i/N)^2``). With ``S = steps``, ``j = 0..S-1``, ``round`` half to even as numpy:

        * ``linspace``: ``k_j = round(j (N-1)/(S-1))``, so steps N and 1 are both used (one step:
          ``k = N-1``, not diffusers' 0);
        * ``leading``: ``k_j = j floor(N/S)`` (DDIM's "uniform"; diffusers with
          ``steps_offset=0``);
        * ``trailing``: ``k_j = round(N - j N/S) - 1`` (Lin et al. 2024, "Common diffusion noise
          schedules and sample steps are flawed"), always using step N;
        * ``quadratic``: ``k_j = floor((j sqrt(0.8 N)/(S-1))^2)`` (DDIM's CIFAR-10 grid,
          capped at 0.8 N);
        * ``logsnr`` and ``karras``: the continuous grid (see :meth:`NoiseProcess.time_grid`)
          snapped to the nearest step, ``i = round(t N)``.

        Steps that collide after rounding (``quadratic``, ``logsnr``, ``karras`` near step 1)
        move up one at a time until all are distinct (see :func:`strictly_decreasing`).
        """
        spacing = check_spacing(spacing)
        n = self.num_steps
        if not 1 <= steps <= n:
            raise ValueError(f"steps must lie in [1, {n}] for a {n}-step DDPM, got {steps}")
        j = torch.arange(steps, dtype=torch.float64)
        if spacing == "linspace":
            k = torch.round(j * ((n - 1) / (steps - 1))) if steps > 1 else torch.tensor([n - 1.0])
        elif spacing == "leading":
            k = j * (n // steps)
        elif spacing == "trailing":
            k = torch.round(n - j * (n / steps)).flip(0) - 1
        elif spacing == "quadratic":
            k = torch.floor((j * (math.sqrt(0.8 * n) / max(steps - 1, 1))) ** 2)
        else:
            k = torch.round(self._positive_times(steps, spacing, rho) * n).flip(0) - 1
        idx = strictly_decreasing((k.flip(0) + 1).long(), 1, n)
        grid = torch.cat([idx.to(torch.float64) / n, torch.zeros(1, dtype=torch.float64)])
        return grid.to(device)

    def describe(self) -> dict:
        return {"name": self.name, "num_steps": self.num_steps, "schedule": self.schedule,
                "beta_start": self.beta_start, "beta_end": self.beta_end,
                "cosine_s": self.cosine_s, "logsnr_shift": self.logsnr_shift}


PROCESSES: dict[str, type[NoiseProcess]] = {
    "ddpm": DiscreteDDPM,
    "vp": VPSDE,
    "subvp": SubVPSDE,
    "ve": VESDE,
    "rectified_flow": RectifiedFlow,
}


def make_process(name: str, **kwargs) -> NoiseProcess:
    """Build a process by name (``ddpm``, ``vp``, ``subvp``, ``ve``, ``rectified_flow``); keyword
    arguments that belong to other processes are ignored, so one parameter block serves them
    all."""
    import inspect

    if name not in PROCESSES:
        raise ValueError(f"unknown process {name!r}: choose one of {sorted(PROCESSES)}")
    cls = PROCESSES[name]
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in kwargs.items() if k in accepted})
