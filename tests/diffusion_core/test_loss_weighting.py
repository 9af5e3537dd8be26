"""Loss weightings (min-SNR, EDM) and the log-normal noise-level distribution, against their
formulas: the weight of each target, the invariance of the weighted x0 error across targets, and
the empirical distribution of ln(sigma/alpha)."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_core.losses import denoising_loss, loss_weight, target_factor, x0_weight
from diffusion_core.noise_levels import nearest_step_time, sample_training_t, time_from_log_snr
from diffusion_core.parameterization import eps_from_x0, training_target
from diffusion_core.processes import VESDE, VPSDE, DiscreteDDPM, broadcast

PROCESSES = [DiscreteDDPM(1000), DiscreteDDPM(1000, "cosine"), VPSDE(), VESDE(0.01, 5.0)]


def _coefficients(process, n=64):
    t = torch.linspace(process.t_min, 1.0, n, dtype=torch.float64)
    return process.alpha(t), process.sigma(t)


@pytest.mark.parametrize("process", PROCESSES[:3], ids=lambda p: f"{p.name}")
def test_min_snr_weights_are_hang_et_al_formulas_on_vp(process):
    # Hang et al. 2023: eps target min(SNR, g)/SNR, x0 min(SNR, g), v min(SNR, g)/(SNR + 1)
    a, s = _coefficients(process)
    snr = a**2 / s**2
    g = 5.0
    torch.testing.assert_close(loss_weight("min_snr", "eps", a, s), snr.clamp(max=g) / snr)
    torch.testing.assert_close(loss_weight("min_snr", "x0", a, s), snr.clamp(max=g))
    torch.testing.assert_close(loss_weight("min_snr", "v", a, s), snr.clamp(max=g) / (snr + 1))
    assert (snr > g).any() and (snr < g).any()  # both branches of the min are exercised


def test_edm_weight_is_karras_lambda_on_the_x0_error():
    a, s = _coefficients(VPSDE())
    sig_e, sd = s / a, 0.5  # EDM's sigma is the noise-to-signal ratio
    expected = (sig_e**2 + sd**2) / (sig_e * sd) ** 2
    torch.testing.assert_close(x0_weight("edm", a, s, sigma_data=sd), expected)
    torch.testing.assert_close(loss_weight("edm", "x0", a, s, sigma_data=sd), expected)


@pytest.mark.parametrize("process", PROCESSES[:3], ids=lambda p: p.name)
def test_edm_weighting_with_unit_data_std_is_the_plain_v_loss_on_vp(process):
    # EDM's preconditioned output F is -v on VP when sigma_data = 1, so lambda = 1/c_out^2 is
    # the uniform weight on the v error
    a, s = _coefficients(process)
    torch.testing.assert_close(loss_weight("edm", "v", a, s, sigma_data=1.0),
                               torch.ones_like(a))


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: p.name)
@pytest.mark.parametrize("weighting", ["min_snr", "edm"])
def test_weighted_error_is_the_same_for_every_target(process, weighting):
    # a prediction x0_hat implies eps_hat and v_hat at the same x_t; w_target ||d target||^2
    # must equal lambda_x0 ||d x0||^2 for all three targets
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0.002, 0.05, 0.3, 0.7, 1.0], dtype=torch.float64)
    x0 = torch.randn(5, 1, 3, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 1, 3, 3, generator=g, dtype=torch.float64)
    x0_hat = x0 + 0.1 * torch.randn(5, 1, 3, 3, generator=g, dtype=torch.float64)
    a, s = process.alpha(t), process.sigma(t)
    ab, sb = broadcast(a, x0), broadcast(s, x0)
    x_t = ab * x0 + sb * eps
    eps_hat = eps_from_x0(x_t, x0_hat, ab, sb)
    lam = x0_weight(weighting, a, s)
    reference = lam * (x0_hat - x0).pow(2).flatten(1).sum(1)
    for kind in ("eps", "x0", "v", "flow"):
        err = (training_target(kind, x0_hat, eps_hat, ab, sb)
               - training_target(kind, x0, eps, ab, sb)).pow(2).flatten(1).sum(1)
        torch.testing.assert_close(loss_weight(weighting, kind, a, s) * err, reference)
        torch.testing.assert_close(target_factor(kind, a, s) * (x0_hat - x0).pow(2).flatten(1)
                                   .sum(1), err)


def test_weighted_loss_is_the_weight_times_the_error_per_example():
    process, n = DiscreteDDPM(100), 4096
    x0 = torch.zeros(n, 1, 2, 2)
    replay = torch.Generator().manual_seed(3)  # denoising_loss draws t first, then eps
    t = process.sample_t(n, generator=replay)
    eps = torch.randn(x0.shape, generator=replay)

    def net(x, t, labels=None):  # a constant error of 0.1 on the eps target
        return eps + 0.1

    loss = denoising_loss(net, process, x0, generator=torch.Generator().manual_seed(3),
                          weighting="min_snr")
    w = loss_weight("min_snr", "eps", process.alpha(t), process.sigma(t))
    assert loss.item() == pytest.approx(0.01 * w.mean().item(), rel=1e-5)
    plain = denoising_loss(net, process, x0, generator=torch.Generator().manual_seed(3))
    assert plain.item() == pytest.approx(0.01, rel=1e-5)


def test_unknown_weighting_and_bad_constants_are_refused():
    a, s = _coefficients(VPSDE(), 4)
    with pytest.raises(ValueError, match="unknown loss weighting"):
        loss_weight("p2", "eps", a, s)
    with pytest.raises(ValueError, match="min_snr_gamma"):
        loss_weight("min_snr", "eps", a, s, min_snr_gamma=0.0)
    with pytest.raises(ValueError, match="sigma_data"):
        loss_weight("edm", "eps", a, s, sigma_data=-1.0)
    with pytest.raises(ValueError, match="unknown prediction"):
        loss_weight("edm", "score", a, s)


# ------------------------------------------------------------------------ noise levels


def test_uniform_sampling_is_the_process_own():
    p = DiscreteDDPM(1000)
    a = sample_training_t(p, 100, generator=torch.Generator().manual_seed(1))
    b = p.sample_t(100, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


@pytest.mark.parametrize("p_mean, p_std", [(-1.2, 1.2), (0.0, 0.5)])
def test_log_normal_on_vp_has_edm_mean_and_std_of_ln_sigma(p_mean, p_std):
    # VP reaches sigma/alpha from 0.01 to 152, so the clamping at the ends is negligible here
    p = VPSDE()
    t = sample_training_t(p, 50_000, kind="log_normal", p_mean=p_mean, p_std=p_std,
                          generator=torch.Generator().manual_seed(0))
    ln_sigma = -0.5 * p.log_snr(t)
    assert ln_sigma.mean().item() == pytest.approx(p_mean, abs=0.02)
    assert ln_sigma.std().item() == pytest.approx(p_std, rel=0.02)
    assert ((t >= p.t_min) & (t <= 1.0)).all()


def test_log_normal_on_ddpm_uses_grid_steps_with_the_right_distribution():
    p = DiscreteDDPM(1000)
    t = sample_training_t(p, 50_000, kind="log_normal", generator=torch.Generator().manual_seed(0))
    steps = t * 1000
    assert torch.equal(steps, steps.round()) and steps.min() >= 1 and steps.max() <= 1000
    ln_sigma = -0.5 * p.log_snr(t)
    assert ln_sigma.mean().item() == pytest.approx(-1.2, abs=0.03)
    assert ln_sigma.std().item() == pytest.approx(1.2, rel=0.03)
    # the median noise level exp(P_mean) = 0.30 falls near step 110 of the linear schedule
    assert abs(float(steps.median()) - float(nearest_step_time(p, torch.tensor([2.4]))[0]) * 1000) < 3


def test_nearest_step_is_the_argmin_of_the_log_snr_distance():
    p = DiscreteDDPM(50, "cosine")
    grid = torch.arange(1, 51, dtype=torch.float64) / 50
    table = p.log_snr(grid)
    lam = torch.linspace(float(table.min()) - 3, float(table.max()) + 3, 997, dtype=torch.float64)
    brute = grid[(lam[:, None] - table[None, :]).abs().argmin(1)]
    torch.testing.assert_close(nearest_step_time(p, lam), brute)


def test_time_from_log_snr_inverts_a_continuous_process():
    p = VPSDE()
    t = torch.tensor([0.01, 0.2, 0.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(time_from_log_snr(p, p.log_snr(t)), t, atol=1e-9, rtol=0)
    assert math.isclose(float(time_from_log_snr(p, torch.tensor([1e3]))[0]), p.t_min, rel_tol=1e-6)


def test_unknown_t_sampling_is_refused():
    with pytest.raises(ValueError, match="unknown t_sampling"):
        sample_training_t(VPSDE(), 4, kind="beta")
