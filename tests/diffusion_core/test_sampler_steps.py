"""Each sampler's first step against its paper's update written out by hand, and the exact times
every sampler evaluates the denoiser at, for every spacing.

The recording denoiser returns a fixed non-linear ``eps(x, t)`` (so a wrong time, coefficient or
sign changes the result) and keeps every ``(x, t)`` it is called with.
"""

import math

import pytest
import torch

from diffusion_core.denoiser import DenoiserOutput, time_batch
from diffusion_core.processes import SPACINGS, VESDE, VPSDE, DiscreteDDPM, SubVPSDE, broadcast
from diffusion_core.samplers import SAMPLERS, ddim_invert

SHAPE = (3, 1, 2, 2)
SEED = 123


def eps_fn(x, t):
    t = t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return torch.tanh(x) * (0.5 + t) - 0.2 * x


class Recorder:
    """A denoiser with a known ``eps(x, t)`` that records every call."""

    def __init__(self, process):
        self.process = process
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, x, t, labels=None):
        tb = time_batch(t, x)
        self.calls.append((x.clone(), tb.clone()))
        eps = eps_fn(x, tb)
        a = broadcast(self.process.alpha(tb), x)
        s = broadcast(self.process.sigma(tb), x)
        return DenoiserOutput(eps, (x - s * eps) / a)

    @property
    def times(self) -> list[float]:
        for _, t in self.calls:
            assert torch.all(t == t[0]), "one time per call for fixed-grid samplers"
        return [float(t[0]) for _, t in self.calls]


def x_start():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def noises(k):
    """The first ``k`` standard normal draws a sampler takes from ``Generator(SEED)``."""
    g = torch.Generator().manual_seed(SEED)
    return [torch.randn(SHAPE, generator=g).double() for _ in range(k)]


def first_step(sampler, process, grid, **kw):
    """Run ``sampler`` on ``grid`` and return (x after the first step, the recorder)."""
    rec = Recorder(process)
    seen = []
    SAMPLERS[sampler](rec, process, x_start(), grid, rng=torch.Generator().manual_seed(SEED),
                      callback=lambda d: seen.append(d["x"].clone()), **kw)
    return seen[0], rec


def scalars(process, t):
    t = torch.tensor(t, dtype=torch.float64)
    return process.alpha(t).item(), process.sigma(t).item()


# ----------------------------------------------------------------------------- DDPM, Alg. 2
@pytest.mark.parametrize("variance", ["posterior", "beta"])
def test_ddpm_step_is_ho_et_al_algorithm_2(variance):
    """x_{i-1} = (x_i - beta_i / sqrt(1 - abar_i) eps) / sqrt(1 - beta_i) + sigma_i z with
    sigma_i^2 = beta_i or (1 - abar_{i-1}) / (1 - abar_i) beta_i."""
    p = DiscreteDDPM(100)
    i = 60
    x1, rec = first_step("ddpm", p, torch.tensor([i / 100, (i - 1) / 100, 0.0],
                                                 dtype=torch.float64), variance=variance)
    beta, abar, abar_prev = p.betas[i - 1], p.alphas_cumprod[i - 1], p.alphas_cumprod[i - 2]
    x = x_start()
    eps = eps_fn(x, torch.tensor([i / 100]))
    var = beta if variance == "beta" else (1 - abar_prev) / (1 - abar) * beta
    (z,) = noises(1)
    expected = (x - beta / (1 - abar).sqrt() * eps) / (1 - beta).sqrt() + var.sqrt() * z
    assert torch.allclose(x1, expected, atol=1e-12)
    assert rec.times == [0.6, 0.59]


def test_respaced_ddpm_step_uses_the_respaced_betas():
    """Nichol & Dhariwal 2021, Sec. 4: beta_t' = 1 - abar_t / abar_s between kept steps s < t."""
    p = DiscreteDDPM(100)
    x1, _ = first_step("ddpm", p, torch.tensor([0.8, 0.5, 0.0], dtype=torch.float64))
    abar_t, abar_s = p.alphas_cumprod[79], p.alphas_cumprod[49]
    beta = 1 - abar_t / abar_s
    x = x_start()
    eps = eps_fn(x, torch.tensor([0.8]))
    (z,) = noises(1)
    var = (1 - abar_s) / (1 - abar_t) * beta
    expected = (x - beta / (1 - abar_t).sqrt() * eps) / (1 - beta).sqrt() + var.sqrt() * z
    assert torch.allclose(x1, expected, atol=1e-12)


# --------------------------------------------------------------------------- DDIM, eq. 12
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("process", [DiscreteDDPM(100), VPSDE()], ids=lambda p: p.name)
def test_ddim_step_is_song_meng_ermon_eq_12(process, eta):
    """x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s - c^2) eps + c z,
    c = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s)."""
    t, s = 0.7, 0.4
    x1, rec = first_step("ddim", process, torch.tensor([t, s, 0.0], dtype=torch.float64), eta=eta)
    abar_t, abar_s = scalars(process, t)[0] ** 2, scalars(process, s)[0] ** 2
    x = x_start()
    eps = eps_fn(x, torch.tensor([t]))
    x0 = (x - math.sqrt(1 - abar_t) * eps) / math.sqrt(abar_t)
    c = eta * math.sqrt((1 - abar_s) / (1 - abar_t)) * math.sqrt(1 - abar_t / abar_s)
    expected = math.sqrt(abar_s) * x0 + math.sqrt(1 - abar_s - c**2) * eps
    if eta > 0:
        expected = expected + c * noises(1)[0]
    assert torch.allclose(x1, expected, atol=1e-12)
    assert rec.times == [t, s]


def test_ddim_step_on_ve_keeps_the_noise_level():
    """alpha = 1: x_s = x0 + sqrt(sigma_s^2 - c^2) eps + c z, c^2 = eta^2 sigma_s^2
    (sigma_t^2 - sigma_s^2) / sigma_t^2 (eq. 12 written for a general alpha, sigma)."""
    p = VESDE(0.01, 5.0)
    t, s, eta = 0.7, 0.4, 0.6
    x1, _ = first_step("ddim", p, torch.tensor([t, s, 0.0], dtype=torch.float64), eta=eta)
    sig_t, sig_s = scalars(p, t)[1], scalars(p, s)[1]
    x = x_start()
    eps = eps_fn(x, torch.tensor([t]))
    c = eta * sig_s * math.sqrt(sig_t**2 - sig_s**2) / sig_t
    expected = x - sig_t * eps + math.sqrt(sig_s**2 - c**2) * eps + c * noises(1)[0]
    assert torch.allclose(x1, expected, atol=1e-12)


# ------------------------------------------------------------------------- Euler-Maruyama
@pytest.mark.parametrize("process", [VPSDE(0.1, 20.0), VESDE(0.01, 50.0)], ids=lambda p: p.name)
def test_euler_maruyama_step(process):
    """Reverse SDE (Song et al. 2021, eq. 6), one Euler-Maruyama step of size h = t - s:
    x_s = x_t - [f x_t - g^2 score] h + g sqrt(h) z, score = -eps / sigma; VP:
    f = -beta(t)/2, g^2 = beta(t) = 0.1 + 19.9 t; VE: f = 0, g^2 = 2 sigma^2 log(50/0.01)."""
    t, s = 0.7, 0.65
    x1, rec = first_step("sde", process, torch.tensor([t, s, 0.0], dtype=torch.float64))
    sig = scalars(process, t)[1]
    if process.name == "vp":
        beta = 0.1 + 19.9 * t
        f, g2 = -beta / 2, beta
    else:
        f, g2 = 0.0, 2 * sig**2 * math.log(50 / 0.01)
    x = x_start()
    score = -eps_fn(x, torch.tensor([t])) / sig
    h = t - s
    expected = x - (f * x - g2 * score) * h + math.sqrt(g2 * h) * noises(1)[0]
    assert torch.allclose(x1, expected, atol=1e-12)
    assert rec.times == [t, s]


# ------------------------------------------------- predictor-corrector (Song et al. Alg. 2-5)
def test_pc_step_on_ve_is_algorithm_2_with_langevin_corrector():
    """Corrector at t (Alg. 4): x <- x + e score + sqrt(2 e) z, e = 2 (snr sigma_t)^2; then the
    reverse-diffusion predictor (Alg. 2): x_s = x + (sigma_t^2 - sigma_s^2) score
    + sqrt(sigma_t^2 - sigma_s^2) z, its score evaluated at the corrected x."""
    p = VESDE(0.01, 50.0)
    t, s, snr = 0.7, 0.6, 0.2
    x1, rec = first_step("pc", p, torch.tensor([t, s, 0.0], dtype=torch.float64),
                         snr=snr, corrector_steps=2)
    sig_t, sig_s = scalars(p, t)[1], scalars(p, s)[1]
    tt = torch.tensor([t])
    z1, z2, z3 = noises(3)
    x = x_start()
    e = 2 * (snr * sig_t) ** 2
    for z in (z1, z2):
        x = x + e * (-eps_fn(x, tt) / sig_t) + math.sqrt(2 * e) * z
    d2 = sig_t**2 - sig_s**2
    expected = x + d2 * (-eps_fn(x, tt) / sig_t) + math.sqrt(d2) * z3
    assert torch.allclose(x1, expected, atol=1e-12)
    assert rec.times == [t, t, t, s]  # 2 corrector + 1 predictor at t, then the final step


def test_pc_step_on_ddpm_uses_the_exact_transition():
    """VP/DDPM (Alg. 3, 5 with the exact transition): e = 2 (1 - beta_i) (snr sigma_t)^2,
    x_s = (x + beta' score) / sqrt(1 - beta') + sqrt(beta') z with beta' = 1 - abar_t/abar_s."""
    p = DiscreteDDPM(100)
    snr = 0.3
    x1, rec = first_step("pc", p, torch.tensor([0.6, 0.59, 0.0], dtype=torch.float64),
                         snr=snr, corrector_steps=1)
    abar_t, abar_s = p.alphas_cumprod[59], p.alphas_cumprod[58]
    beta = 1 - abar_t / abar_s
    assert beta.item() == pytest.approx(p.betas[59].item(), rel=1e-12)
    sig_t = (1 - abar_t).sqrt()
    tt = torch.tensor([0.6])
    z1, z2 = noises(2)
    x = x_start()
    e = 2 * (1 - beta) * (snr * sig_t) ** 2
    x = x + e * (-eps_fn(x, tt) / sig_t) + (2 * e).sqrt() * z1
    expected = (x + beta * (-eps_fn(x, tt) / sig_t)) / (1 - beta).sqrt() + beta.sqrt() * z2
    assert torch.allclose(x1, expected, atol=1e-12)
    assert rec.times == [0.6, 0.6, 0.59]


def test_langevin_step_does_not_depend_on_the_batch():
    """The step size comes from sigma_t alone: an image's update is the same in any batch."""
    p = VPSDE()
    x = x_start()
    from diffusion_core.samplers import langevin_correct

    full = langevin_correct(Recorder(p), x, 0.5, rng=torch.Generator().manual_seed(1), snr=0.2)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(SHAPE, generator=g).double()
    e = 2 * (0.2 * scalars(p, 0.5)[1]) ** 2
    one = x[:1] + e * (-eps_fn(x[:1], torch.tensor([0.5])) / scalars(p, 0.5)[1]) \
        + math.sqrt(2 * e) * z[:1]
    assert torch.allclose(full[:1], one, atol=1e-12)


# ----------------------------------------------------------------------- probability-flow ODE
def velocity(process, x, t):
    """dx/dt = f x - g^2/2 score, written for VP: f = -beta/2, g^2 = beta."""
    beta = 0.1 + 19.9 * t
    sig = scalars(process, t)[1]
    return -0.5 * beta * x - 0.5 * beta * (-eps_fn(x, torch.tensor([t])) / sig)


def test_heun_step_is_edm_algorithm_1():
    """x_s = x + h/2 (d(x, t) + d(x + h d(x, t), s)), h = s - t (Karras et al. 2022, Alg. 1)."""
    p = VPSDE(0.1, 20.0)
    t, s = 0.7, 0.6
    x1, rec = first_step("ode_heun", p, torch.tensor([t, s, 0.0], dtype=torch.float64))
    x = x_start()
    h = s - t
    d1 = velocity(p, x, t)
    d2 = velocity(p, x + h * d1, s)
    assert torch.allclose(x1, x + 0.5 * h * (d1 + d2), atol=1e-12)
    assert rec.times == [t, s, s]
    assert torch.allclose(rec.calls[1][0], x + h * d1, atol=1e-12)


def test_rk45_first_stage():
    """Dormand-Prince: k1 = d(x, 1), stage 2 evaluates at t = 1 + h/5, y = x + h/5 k1, with the
    default first step h = -0.02 (1 - t_min)."""
    p = VPSDE(0.1, 20.0)
    rec = Recorder(p)
    x = x_start()
    SAMPLERS["ode_rk45"](rec, p, x, p.time_grid(2), rtol=1e-3, atol=1e-3)
    h = -0.02 * (1 - p.t_min)
    (x_a, t_a), (x_b, t_b) = rec.calls[:2]
    assert torch.equal(x_a, x) and torch.all(t_a == 1.0)
    assert torch.allclose(t_b, torch.full((3,), 1 + h / 5, dtype=torch.float64), atol=1e-15)
    assert torch.allclose(x_b, x + h / 5 * velocity(p, x, 1.0), atol=1e-12)
    # integration ends at t_min for every image, then the denoising step there
    assert torch.all(rec.calls[-1][1] == p.t_min)


# ------------------------------------------------------------------- times, every spacing
def expected_times(sampler, grid, corrector_steps=1):
    g = grid.tolist()
    out = []
    for t, s in zip(g[:-1], g[1:], strict=True):
        if sampler == "pc" and s > 0:
            out += [t] * (corrector_steps + 1)
        elif sampler == "ode_heun" and s > 0:
            out += [t, s]
        else:
            out.append(t)
    return out


@pytest.mark.parametrize("process", [DiscreteDDPM(100), VPSDE(), SubVPSDE(), VESDE()],
                         ids=lambda p: p.name)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "sde", "pc", "ode_heun"])
def test_denoiser_times_for_every_spacing(sampler, spacing, process):
    grid = process.time_grid(7, spacing)
    rec = Recorder(process)
    kw = {"corrector_steps": 2} if sampler == "pc" else {}
    res = SAMPLERS[sampler](rec, process, x_start(), grid,
                            rng=torch.Generator().manual_seed(0), **kw)
    assert rec.times == expected_times(sampler, grid, 2)
    assert res.nfe == len(rec.calls)


@pytest.mark.parametrize("spacing", SPACINGS)
def test_inversion_times_and_no_wasted_evaluation(spacing):
    """Inversion evaluates at t_1, ..., t_{S-1} (never twice at t_1, never at t_S)."""
    p = DiscreteDDPM(100)
    grid = p.time_grid(8, spacing)
    rec = Recorder(p)
    res = ddim_invert(rec, p, x_start(), grid)
    assert rec.times == grid.flip(0)[1:-1].tolist()
    assert res.nfe == 7  # one fewer than the 8-step decode
