"""Noise-process math against closed forms and brute-force Gaussian computations."""

import math

import pytest
import torch

from diffusion_core.processes import (
    VESDE,
    VPSDE,
    DiscreteDDPM,
    SubVPSDE,
    cosine_betas,
    linear_betas,
    make_process,
)

ALL = [DiscreteDDPM(), VPSDE(), SubVPSDE(), VESDE()]
CONTINUOUS = [VPSDE(), SubVPSDE(), VESDE()]


def test_linear_betas_match_ho_et_al():
    b = linear_betas(1000)
    assert b[0].item() == pytest.approx(1e-4)
    assert b[-1].item() == pytest.approx(0.02)
    assert torch.all(b[1:] > b[:-1])


def test_cosine_schedule_matches_nichol_dhariwal_closed_form():
    n, s = 1000, 0.008
    p = DiscreteDDPM(n, "cosine")
    t = torch.arange(1, n + 1, dtype=torch.float64) / n
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    # beta clipping at 0.999 only touches the last step
    assert torch.allclose(p.alphas_cumprod[:-1], f[:-1], rtol=1e-9, atol=1e-12)
    assert cosine_betas(n).max() <= 0.999


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddpm_alpha_on_grid_is_cumulative_product(schedule):
    p = DiscreteDDPM(1000, schedule)
    i = torch.tensor([1, 2, 10, 500, 1000])
    abar = torch.cumprod(1 - p.betas, 0)[i - 1]
    t = i.double() / 1000
    assert torch.allclose(p.alpha(t) ** 2, abar, rtol=1e-10)
    assert torch.allclose(p.sigma(t) ** 2, 1 - abar, rtol=1e-10)
    # adjacent-step transition variance is beta_i
    a_ts, var = p.transition(t - 1e-3, t)
    assert torch.allclose(var, p.betas[i - 1], rtol=1e-8)
    assert torch.allclose(a_ts**2, 1 - p.betas[i - 1], rtol=1e-10)


def test_vp_closed_forms():
    p = VPSDE(0.1, 20.0)
    t = torch.linspace(0.01, 1, 7, dtype=torch.float64)
    integral = 0.1 * t + 0.5 * t**2 * (20 - 0.1)
    assert torch.allclose(p.alpha(t), torch.exp(-0.5 * integral))
    assert torch.allclose(p.sigma(t) ** 2 + p.alpha(t) ** 2, torch.ones_like(t))
    sub = SubVPSDE(0.1, 20.0)
    assert torch.allclose(sub.sigma(t), 1 - torch.exp(-integral))
    ve = VESDE(0.01, 50.0)
    assert torch.allclose(ve.sigma(t), 0.01 * (50 / 0.01) ** t)


@pytest.mark.parametrize("process", CONTINUOUS + [DiscreteDDPM(50)], ids=lambda p: p.name)
def test_drift_and_diffusion_follow_from_alpha_sigma(process):
    """f = d log alpha/dt and g^2 = d sigma^2/dt - 2 f sigma^2 (central differences)."""
    t = torch.tensor([0.113, 0.37, 0.61, 0.89], dtype=torch.float64)
    h = 1e-6
    dla = (process.log_alpha(t + h) - process.log_alpha(t - h)) / (2 * h)
    ds2 = (process.sigma(t + h) ** 2 - process.sigma(t - h) ** 2) / (2 * h)
    assert torch.allclose(process.f(t), dla, rtol=1e-5, atol=1e-6)
    g2 = ds2 - 2 * dla * process.sigma(t) ** 2
    assert torch.allclose(process.g2(t), g2, rtol=1e-5, atol=1e-6)


def test_discrete_ddpm_converges_to_vp_sde():
    """Linear betas with N steps -> VP-SDE(beta_min = 1000 beta_start, beta_max = 1000 beta_end)."""
    vp = VPSDE(0.1, 20.0)
    t = torch.linspace(0.05, 1, 20, dtype=torch.float64)
    errs = [(DiscreteDDPM(n).alpha(t) - vp.alpha(t)).abs().max().item() for n in (100, 300, 1000)]
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 2e-3


@pytest.mark.parametrize("process", ALL, ids=lambda p: p.name)
def test_marginal_moments(process):
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000, 1), 0.7, dtype=torch.float64)
    t = torch.full((200_000,), 0.3, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    xt = process.marginal(x0, t, eps)
    a, s = process.alpha(t[:1]).item(), process.sigma(t[:1]).item()
    assert xt.mean().item() == pytest.approx(0.7 * a, abs=4 * s / math.sqrt(2e5))
    assert xt.std().item() == pytest.approx(s, rel=1e-2)


@pytest.mark.parametrize("process", ALL, ids=lambda p: p.name)
def test_posterior_matches_brute_force_gaussian_conditioning(process):
    """q(x_s|x_t,x_0) from the joint Gaussian of (x_s, x_t) given x_0 by the Schur complement."""
    s, t = torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.45, dtype=torch.float64)
    x0, xt = 0.4, -0.2
    a_s, sig_s = process.alpha(s).item(), process.sigma(s).item()
    a_t, sig_t = process.alpha(t).item(), process.sigma(t).item()
    # joint: x_s = a_s x0 + sig_s e ; x_t = a_t x0 + sig_t e' with Cov(x_s, x_t) = a_{t|s} sig_s^2
    cov_st = (a_t / a_s) * sig_s**2
    mean_bf = a_s * x0 + cov_st / sig_t**2 * (xt - a_t * x0)
    var_bf = sig_s**2 - cov_st**2 / sig_t**2
    c_t, c_0, var = process.posterior(s, t)
    assert (c_t * xt + c_0 * x0).item() == pytest.approx(mean_bf, rel=1e-9, abs=1e-12)
    assert var.item() == pytest.approx(var_bf, rel=1e-9)


def test_posterior_by_monte_carlo():
    """Sample (x_s, x_t) forwards, keep pairs with x_t near a value, compare the conditional."""
    p = DiscreteDDPM(1000)
    g = torch.Generator().manual_seed(1)
    s, t = torch.tensor(0.2, dtype=torch.float64), torch.tensor(0.25, dtype=torch.float64)
    n, x0 = 2_000_000, 0.5
    a_ts, var_ts = p.transition(s, t)
    xs = p.alpha(s) * x0 + p.sigma(s) * torch.randn(n, generator=g, dtype=torch.float64)
    xt = a_ts * xs + var_ts.sqrt() * torch.randn(n, generator=g, dtype=torch.float64)
    target = 0.1
    sel = (xt - target).abs() < 0.01
    c_t, c_0, var = p.posterior(s, t)
    assert xs[sel].mean().item() == pytest.approx((c_t * target + c_0 * x0).item(), abs=0.01)
    assert xs[sel].var().item() == pytest.approx(var.item(), rel=0.05)


@pytest.mark.parametrize("process", ALL, ids=lambda p: p.name)
@pytest.mark.parametrize("spacing", ["uniform", "quadratic"])
def test_time_grid_shape(process, spacing):
    g = process.time_grid(20, spacing)
    assert g.numel() == 21
    assert g[0].item() == pytest.approx(1.0)
    assert g[-1].item() == 0.0
    assert g[-2].item() == pytest.approx(process.t_min)
    assert torch.all(g[1:] < g[:-1])


def test_ddpm_full_grid_is_every_step():
    p = DiscreteDDPM(100)
    g = p.time_grid(100)
    expected = torch.cat([torch.arange(100, 0, -1).double() / 100, torch.zeros(1)])
    assert torch.allclose(g, expected.double())
    with pytest.raises(ValueError, match="steps"):
        p.time_grid(101)


def test_prior_logp_is_standard_normal_density():
    p = VESDE(0.01, 5.0)
    x = torch.randn(3, 1, 2, 2)
    ref = torch.distributions.Normal(0, 5.0).log_prob(x.double()).flatten(1).sum(1)
    assert torch.allclose(p.prior_logp(x), ref)


def test_make_process_and_bad_input():
    assert isinstance(make_process("vp", beta_max=10.0, num_steps=5), VPSDE)
    assert make_process("ddpm", num_steps=100, sigma_max=3).num_steps == 100
    with pytest.raises(ValueError, match="unknown process"):
        make_process("edm")
    with pytest.raises(ValueError, match="schedule"):
        DiscreteDDPM(10, "sigmoid")
    with pytest.raises(ValueError):
        VESDE(sigma_min=2.0, sigma_max=1.0)
