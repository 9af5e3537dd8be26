"""Samplers against the exact denoiser of Gaussian data N(mu, s^2 I): no training needed."""

import pytest
import torch

from diffusion_core.analytic import GaussianDenoiser
from diffusion_core.processes import VESDE, VPSDE, DiscreteDDPM, SubVPSDE
from diffusion_core.samplers import (
    SAMPLERS,
    compatible,
    ddim,
    ddim_invert,
    ddpm,
    dopri5,
    generate,
    langevin_correct,
)

SHAPE = (1, 4, 4)
STD = 0.4
N = 1000


@pytest.fixture(scope="module")
def mu():
    return 0.5 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))


def run(sampler, process, mu, steps, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    x_T = process.prior_std * torch.randn(N, *SHAPE, generator=g)
    grid = process.time_grid(steps)
    return SAMPLERS[sampler](GaussianDenoiser(mu, STD, process), process, x_T, grid, rng=g, **kw)


def assert_moments(x, mu, std_rel):
    # mean per pixel within 5 standard errors, std averaged over pixels within std_rel
    assert (x.mean(0) - mu).abs().max().item() < 5 * STD / N**0.5
    assert x.std(0).mean().item() == pytest.approx(STD, rel=std_rel)


CASES = [  # (sampler, steps, settings, std tolerance)
    ("ddpm", 500, {"variance": "posterior"}, 0.04),
    ("ddpm", 500, {"variance": "beta"}, 0.06),
    ("ddim", 100, {"eta": 0.0}, 0.05),
    ("ddim", 500, {"eta": 1.0}, 0.04),
    ("sde", 500, {}, 0.04),
    ("pc", 200, {"snr": 0.1, "corrector_steps": 1}, 0.15),
    ("ode_heun", 100, {}, 0.03),
    ("ode_rk45", 2, {"rtol": 1e-4, "atol": 1e-4}, 0.03),
]


@pytest.mark.parametrize("process", [DiscreteDDPM(500), VPSDE(), SubVPSDE(), VESDE()],
                         ids=lambda p: p.name)
@pytest.mark.parametrize(("sampler", "steps", "settings", "tol"), CASES,
                         ids=[f"{c[0]}-{list(c[2].values())}" for c in CASES])
def test_sampler_reproduces_gaussian_data(process, sampler, steps, settings, tol, mu):
    res = run(sampler, process, mu, steps, **settings)
    assert torch.isfinite(res.x).all()
    assert_moments(res.x, mu, tol)
    assert res.nfe >= 1


def test_ddim_deterministic_for_identical_noise(mu):
    p = DiscreteDDPM(1000)
    a = run("ddim", p, mu, 50, seed=3, eta=0.0).x
    b = run("ddim", p, mu, 50, seed=3, eta=0.0).x
    assert torch.equal(a, b)
    # and it ignores the rng entirely: another generator for the (unused) step noise
    x_T = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(5))
    d = GaussianDenoiser(mu, STD, p)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    assert torch.equal(ddim(d, p, x_T, p.time_grid(20), rng=g1).x,
                       ddim(d, p, x_T, p.time_grid(20), rng=g2).x)


def test_ddim_eta_one_on_full_grid_equals_ddpm_posterior(mu):
    p = DiscreteDDPM(200)
    d = GaussianDenoiser(mu, STD, p)
    x_T = torch.randn(64, *SHAPE, generator=torch.Generator().manual_seed(7))
    grid = p.time_grid(200)
    a = ddim(d, p, x_T.double(), grid, rng=torch.Generator().manual_seed(9), eta=1.0).x
    b = ddpm(d, p, x_T.double(), grid, rng=torch.Generator().manual_seed(9), variance="posterior").x
    assert torch.allclose(a, b, atol=1e-8)


def test_ddim_with_few_steps_is_close(mu):
    """50 uniform DDIM steps keep the mean exactly and the std within 10% (first-order error)."""
    res = run("ddim", DiscreteDDPM(1000), mu, 50)
    assert_moments(res.x, mu, 0.1)
    assert res.nfe == 50


@pytest.mark.parametrize("process", [DiscreteDDPM(1000), VPSDE(), VESDE(0.01, 5.0)],
                         ids=lambda p: p.name)
def test_ddim_inversion_round_trip(process, mu):
    d = GaussianDenoiser(mu, STD, process)
    x0 = (mu + STD * torch.randn(16, *SHAPE, generator=torch.Generator().manual_seed(4))).double()
    grid = process.time_grid(200)
    enc = ddim_invert(d, process, x0, grid)
    dec = ddim(d, process, enc.x, grid, eta=0.0)
    assert enc.nfe == 199  # the step from 0 to t_1 is the identity and is skipped
    # the latent looks like prior noise, and decoding it gives the image back
    assert enc.x.std().item() == pytest.approx(process.prior_std, rel=0.3)
    err = (dec.x - x0).abs()
    assert err.mean().item() < 0.02 and err.max().item() < 0.06


def test_generate_is_independent_of_batch_composition(mu):
    p = VPSDE()
    d = GaussianDenoiser(mu, STD, p)
    for sampler, kw in [("ddpm", {}), ("pc", {}), ("ode_rk45", {"rtol": 1e-3, "atol": 1e-3})]:
        full = generate(d, p, sampler, shape=SHAPE, seeds=range(10, 18), steps=20, **kw).x
        half = generate(d, p, sampler, shape=SHAPE, seeds=range(14, 18), steps=20, **kw).x
        assert torch.allclose(full[4:], half, atol=1e-6), sampler


def test_callback_sees_every_step(mu):
    p = DiscreteDDPM(100)
    seen = []
    res = generate(GaussianDenoiser(mu, STD, p), p, "ddim", shape=SHAPE, seeds=[0, 1], steps=10,
                   callback=lambda d: seen.append((d["i"], d["t"], d["x"].shape, d["x0_pred"].shape)))
    assert [s[0] for s in seen] == list(range(10))
    assert seen[0][1] == pytest.approx(1.0)
    assert res.nfe == 10


def test_dopri5_solves_linear_ode_with_per_sample_rates():
    """dy/dt = -k y  ->  y(1) = y0 exp(-k), each sample with its own k and step sizes."""
    k = torch.tensor([0.5, 2.0, 8.0], dtype=torch.float64).reshape(3, 1)
    y0 = torch.ones(3, 1, dtype=torch.float64)
    y, nfe = dopri5(lambda y, t: -k * y, y0, 0.0, 1.0, rtol=1e-8, atol=1e-10)
    assert torch.allclose(y, torch.exp(-k), rtol=1e-6)
    # backwards in time too
    yb, _ = dopri5(lambda y, t: -k * y, y, 1.0, 0.0, rtol=1e-8, atol=1e-10)
    assert torch.allclose(yb, y0, rtol=1e-5)
    assert nfe > 7


def test_rk45_reports_more_evaluations_at_tighter_tolerance(mu):
    p = VPSDE()
    loose = run("ode_rk45", p, mu, 2, rtol=1e-2, atol=1e-2).nfe
    tight = run("ode_rk45", p, mu, 2, rtol=1e-5, atol=1e-5).nfe
    assert tight > loose


def test_bad_settings_are_refused(mu):
    p = DiscreteDDPM(100)
    d = GaussianDenoiser(mu, STD, p)
    with pytest.raises(ValueError, match="eta"):
        generate(d, p, "ddim", shape=SHAPE, seeds=[0], steps=5, eta=1.5)
    with pytest.raises(ValueError, match="does not take"):
        generate(d, p, "ddim", shape=SHAPE, seeds=[0], steps=5, snr=0.1)
    with pytest.raises(ValueError, match="does not fit"):
        generate(d, p, "ddpm", shape=SHAPE, seeds=[0], steps=500)
    assert compatible("ode_rk45", p) is None
    assert "unknown sampler" in compatible("dpm", p)


@pytest.mark.parametrize("process", [VPSDE(), VESDE()], ids=lambda p: p.name)
def test_langevin_corrector_targets_the_marginal(process, mu):
    """Many corrector steps at a fixed t, started far off, reach p_t = N(alpha mu, alpha^2 s^2 + sigma^2)."""
    t = torch.tensor(0.3, dtype=torch.float64)
    a, s = process.alpha(t).item(), process.sigma(t).item()
    g = torch.Generator().manual_seed(0)
    x = 3 * (a**2 * STD**2 + s**2) ** 0.5 * torch.randn(N, 1, 8, 8, generator=g)
    mu64 = mu.repeat(1, 2, 2)
    d = GaussianDenoiser(mu64, STD, process)
    x = langevin_correct(d, x, t, rng=g, snr=0.16, steps=300)
    assert (x.mean(0) - a * mu64).abs().mean().item() < 0.05 * (a**2 * STD**2 + s**2) ** 0.5
    # unadjusted Langevin keeps an O(snr^2) excess variance (a few percent at snr = 0.16)
    assert x.std(0).mean().item() == pytest.approx((a**2 * STD**2 + s**2) ** 0.5, rel=0.06)


def test_respaced_ddpm_ancestral(mu):
    """DDPM ancestral sampling on 250 of 1000 steps (Nichol & Dhariwal 2021) keeps the moments."""
    res = run("ddpm", DiscreteDDPM(1000), mu, 250)
    assert res.nfe == 250
    assert_moments(res.x, mu, 0.06)
