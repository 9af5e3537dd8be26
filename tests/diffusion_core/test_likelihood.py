"""The probability-flow ODE likelihood of Gaussian data equals the analytic log-density."""

import math

import pytest
import torch

from diffusion_core.analytic import GaussianDenoiser
from diffusion_core.data import from_levels, load_dataset, to_levels
from diffusion_core.likelihood import bits_per_dim, ode_log_likelihood
from diffusion_core.processes import VESDE, VPSDE, DiscreteDDPM, RectifiedFlow, SubVPSDE
from diffusion_core.rng import StackedRNG

MU = torch.tensor([[[0.3, -0.2], [0.1, 0.5]]], dtype=torch.float64)
S = 0.5


def analytic_logp(process, x, t=None, std=S):
    t = torch.tensor(process.t_min if t is None else t, dtype=torch.float64)
    a, s = process.alpha(t), process.sigma(t)
    var = a**2 * std**2 + s**2
    d = x[0].numel()
    sq = (x - a * MU).flatten(1).pow(2).sum(1)
    return -0.5 * sq / var - 0.5 * d * torch.log(2 * math.pi * var)


@pytest.mark.parametrize("process", [VPSDE(), SubVPSDE(), VESDE(0.01, 20.0), DiscreteDDPM(1000),
                                     RectifiedFlow()], ids=lambda p: p.name)
def test_exact_trace_likelihood_matches_analytic(process):
    d = GaussianDenoiser(MU, S, process)
    x = (MU + S * torch.randn(6, 1, 2, 2, generator=torch.Generator().manual_seed(0))).double()
    logp, nfe = ode_log_likelihood(d, process, x, exact_trace=True, rtol=1e-5, atol=1e-5,
                                   prior_logp=lambda x1: analytic_logp(process, x1, process.t_max))
    assert torch.allclose(logp, analytic_logp(process, x), atol=2e-3)
    assert nfe > 10
    # with the process's own prior the only error left is the prior's mismatch with p_1
    logp_prior, _ = ode_log_likelihood(d, process, x, exact_trace=True, rtol=1e-5, atol=1e-5)
    assert torch.allclose(logp_prior, logp, atol=0.1)


def test_hutchinson_estimate_is_unbiased():
    process = VPSDE()
    d = GaussianDenoiser(MU, S, process)
    x = (MU + S * torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(1))).double()
    xs = x.expand(400, -1, -1, -1).contiguous()
    logp, _ = ode_log_likelihood(d, process, xs, rng=StackedRNG(range(400)), rtol=1e-5, atol=1e-5,
                                 prior_logp=lambda x1: analytic_logp(process, x1, 1.0))
    ref = analytic_logp(process, x).item()
    assert logp.mean().item() == pytest.approx(ref, abs=4 * logp.std().item() / 20 + 2e-3)
    assert logp.std().item() > 0  # it really is a stochastic estimate


def test_callback_follows_every_evaluation_from_t_min_to_1():
    process = VPSDE()
    d = GaussianDenoiser(MU, S, process)
    levels = torch.randint(0, 256, (3, 1, 2, 2), generator=torch.Generator().manual_seed(2))
    seen = []
    bpd, nfe = bits_per_dim(d, process, levels, 256, dtype=torch.float64, rtol=1e-3, atol=1e-3,
                            callback=seen.append)
    assert [info["nfe"] for info in seen] == list(range(1, nfe + 1))
    assert seen[0]["t"] == pytest.approx(process.t_min)
    assert seen[-1]["t"] == pytest.approx(1.0)
    assert all(process.t_min <= info["t"] <= 1.0 + 1e-9 for info in seen)
    quiet, _ = bits_per_dim(d, process, levels, 256, dtype=torch.float64, rtol=1e-3, atol=1e-3)
    assert torch.equal(bpd, quiet)  # the callback only watches


def test_bits_per_dim_of_gaussian_levels():
    """bpd = -(log p(y) + D log Delta) / (D ln 2) at the dequantised points y, with the closed-form
    log-density of the Gaussian data's marginal at t_min; for Gaussian data the ODE's Jacobian
    is a multiple of I, so Hutchinson's estimate is exact and the match is to the ODE tolerance."""
    process = VPSDE()
    levels = torch.randint(0, 256, (8, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    d = GaussianDenoiser(MU, S, process)
    bpd, _ = bits_per_dim(d, process, levels, 256, dtype=torch.float64, rtol=1e-6, atol=1e-6,
                          prior_logp=lambda x1: analytic_logp(process, x1, 1.0))
    u = StackedRNG(range(8)).rand((1, 2, 2), dtype=torch.float64)  # the same dequantisation
    delta = 2.0 / 255  # bins of the level map x_k = 2 k / (L - 1) - 1, centred on the levels
    y = 2.0 * levels.double() / 255 - 1.0 + delta * (u - 0.5)
    expected = -(analytic_logp(process, y) + 4 * math.log(delta)) / (4 * math.log(2))
    assert bpd.shape == (8,)
    assert torch.allclose(bpd, expected, atol=1e-2)
    # with the process's own prior: only its mismatch with p_1 is added
    bpd_prior, _ = bits_per_dim(d, process, levels, 256, dtype=torch.float64)
    assert torch.allclose(bpd_prior, expected, atol=0.05)
    with pytest.raises(ValueError, match="integer"):
        bits_per_dim(d, process, levels.float(), 256)
    with pytest.raises(ValueError, match="levels"):
        bits_per_dim(d, process, levels, 100)


def test_bits_per_dim_matches_the_closed_form_of_centred_dequantisation():
    """Gaussian model, exact trace and prior: the mean bpd over images equals the closed form.

    With ``y = x_k + Delta (u - 1/2)`` and ``p_{t_min} = N(m, v)`` per dimension,
    ``E_u log p(y) = log N(x_k; m, v) - Delta^2 / (24 v)``, so
    ``E bpd = -(sum_d [log N(x_k; m, v) - Delta^2/(24 v)] + D log Delta) / (D ln 2)``, with
    ``Delta = 2 / (L - 1)``. Bins of width ``2 / L`` (off the data grid) miss it by ~0.09 bits.
    """
    process, num_levels, std = VPSDE(), 17, 1.5  # a wide Gaussian: little dequantisation noise
    d = GaussianDenoiser(MU, std, process)
    gen = torch.Generator().manual_seed(3)
    levels = to_levels(MU + 0.5 * torch.randn(32, 1, 2, 2, generator=gen, dtype=torch.float64), 17)
    bpd, _ = bits_per_dim(d, process, levels, num_levels, dtype=torch.float64, exact_trace=True,
                          prior_logp=lambda x1: analytic_logp(process, x1, 1.0, std))
    t = torch.tensor(process.t_min, dtype=torch.float64)
    a, s = process.alpha(t), process.sigma(t)
    var = a**2 * std**2 + s**2
    delta = 2.0 / (num_levels - 1)
    x = from_levels(levels, num_levels).double()
    per_dim = -0.5 * torch.log(2 * math.pi * var) - (x - a * MU) ** 2 / (2 * var)
    per_dim = per_dim - delta**2 / (24 * var)
    dims = x[0].numel()
    expected = -(per_dim.flatten(1).sum(1) + dims * math.log(delta)) / (dims * math.log(2.0))
    assert bpd.mean().item() == pytest.approx(expected.mean().item(), abs=1e-2)
    assert (bpd - expected).abs().max().item() < 0.03  # each image: dequantisation noise only


def test_level_map_is_the_one_the_data_uses():
    images, _ = load_dataset("digits")
    levels = to_levels(images, 17)
    assert levels.min() == 0 and levels.max() == 16
    assert torch.equal(from_levels(levels, 17), images)  # digits sit exactly on the grid
    k = torch.arange(256)
    assert torch.equal(to_levels(from_levels(k, 256), 256), k)
    torch.testing.assert_close(from_levels(k, 256), k.float() / 127.5 - 1.0, rtol=0, atol=0)
