"""Rectified flow (issue #32): the process against its closed forms, SD3's timestep shift and
logit-normal times, the flow loss, and every sampler on Gaussian data (exact laws, straight
paths), then a tiny network trained on it end to end. The log-SNR samplers' orders of
convergence on rectified flow are in test_fast_samplers.py, its grids in test_processes.py."""

import math

import pytest
import torch
from test_samplers import CASES, SHAPE, STD, exact_law

from diffusion_core.analytic import GaussianDenoiser
from diffusion_core.denoiser import Denoiser
from diffusion_core.losses import denoising_loss, loss_weight, target_factor
from diffusion_core.noise_levels import sample_training_t
from diffusion_core.processes import VPSDE, RectifiedFlow, make_process, timestep_shift
from diffusion_core.samplers import SAMPLERS, generate
from diffusion_core.samplers.ode import ode_velocity
from diffusion_core.training import TrainConfig, train
from diffusion_core.unet import UNet

RF = RectifiedFlow()


@pytest.fixture(scope="module")
def mu():
    return 0.5 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


# ------------------------------------------------------------------------------ the process
def test_closed_forms_and_the_finite_end():
    t = torch.tensor([1e-3, 0.1, 0.5, 0.8, 0.999], dtype=torch.float64)
    torch.testing.assert_close(RF.alpha(t), 1 - t)
    torch.testing.assert_close(RF.sigma(t), t)
    torch.testing.assert_close(RF.f(t), -1 / (1 - t))
    torch.testing.assert_close(RF.g2(t), 2 * t / (1 - t))
    torch.testing.assert_close(RF.log_snr(t), 2 * torch.log((1 - t) / t))
    torch.testing.assert_close(RF.inverse_log_snr(RF.log_snr(t)), t, atol=1e-12, rtol=0)
    # t_max = 1 - t_min: a symmetric, finite log-SNR range; the inverse clamps to it
    assert RF.t_max == 1 - RF.t_min
    assert RF.log_snr(torch.tensor(RF.t_max, dtype=torch.float64)).item() == pytest.approx(-2 * math.log(999))
    assert RF.inverse_log_snr(torch.tensor([-1e3, 1e3])).tolist() == [RF.t_max, RF.t_min]
    assert RF.sample_t(10_000, torch.Generator().manual_seed(0)).max() <= RF.t_max


def test_probability_flow_velocity_is_the_expected_flow(mu):
    """f x + g^2 eps / (2 sigma) = (eps - x) / (1 - t) = E[eps - x0 | x_t] on the linear path."""
    d = GaussianDenoiser(mu, STD, RF)
    x = torch.randn(6, *SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    t = torch.tensor([0.002, 0.1, 0.4, 0.6, 0.9, 0.998], dtype=torch.float64)
    v, _ = ode_velocity(d, RF, x, t)
    out = d(x, t)
    torch.testing.assert_close(v, out.eps - out.x0, atol=1e-9, rtol=1e-9)


def test_make_process_describe_and_bad_input():
    p = make_process("rectified_flow", t_min=0.01, shift=3.0, beta_min=0.1, num_steps=5)
    assert p.describe() == {"name": "rectified_flow", "t_min": 0.01, "shift": 3.0}
    assert make_process(**p.describe()).describe() == p.describe()
    for kw in ({"t_min": 0.5}, {"t_min": 0.0}, {"shift": 0.0}, {"shift": math.inf}):
        with pytest.raises(ValueError):
            RectifiedFlow(**kw)


# ----------------------------------------------------------------------- SD3's timestep shift
def test_timestep_shift_is_sd3s_formula_and_a_log_snr_offset():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    for shift in (0.5, 1.0, 3.0):
        s = timestep_shift(t, shift)
        torch.testing.assert_close(s, shift * t / (1 + (shift - 1) * t))
        assert s[0].item() == 0.0 and s[-1].item() == 1.0 and bool((s.diff() > 0).all())
        # the noise-to-signal ratio t / (1 - t) is scaled by shift: log-SNR - 2 log(shift)
        inner = t[1:-1]
        torch.testing.assert_close(RF.log_snr(timestep_shift(inner, shift)),
                                   RF.log_snr(inner) - 2 * math.log(shift))
    torch.testing.assert_close(timestep_shift(t, 1.0), t)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing", "quadratic"])
def test_shift_warps_the_index_grids_and_keeps_their_ends(spacing):
    plain, shifted = RectifiedFlow(), RectifiedFlow(shift=3.0)
    u = (plain.time_grid(8, spacing)[:-1] - plain.t_min) / (plain.t_max - plain.t_min)
    expected = plain.t_min + (plain.t_max - plain.t_min) * timestep_shift(u, 3.0)
    got = shifted.time_grid(8, spacing)
    torch.testing.assert_close(got[:-1], expected, atol=1e-12, rtol=0)
    assert got[-1].item() == 0.0 and bool((got[:-1] > plain.time_grid(8, spacing)[:-1]).any())


def test_shift_leaves_the_log_snr_grid_alone():
    torch.testing.assert_close(RectifiedFlow(shift=3.0).time_grid(8, "logsnr"),
                               RF.time_grid(8, "logsnr"))


# ----------------------------------------------------------------------- logit-normal times
@pytest.mark.parametrize(("m", "s"), [(0.0, 1.0), (0.5, 0.6)])
def test_logit_normal_on_rectified_flow_is_sigmoid_of_a_normal(m, s):
    n = 50_000
    t = sample_training_t(RF, n, kind="logit_normal", logit_mean=m, logit_std=s,
                          generator=torch.Generator().manual_seed(0))
    z = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(t, torch.sigmoid(m + s * z).clamp(RF.t_min, RF.t_max))
    logit = torch.logit(t)
    assert logit.mean().item() == pytest.approx(m, abs=4 * s / n**0.5)
    assert logit.std().item() == pytest.approx(s, rel=0.02)
    if m == 0.0:  # symmetric about 1/2
        assert t.mean().item() == pytest.approx(0.5, abs=0.005)


def test_logit_normal_gives_other_processes_sd3s_noise_levels():
    """On VP the drawn ln(sigma/alpha) is N(logit_mean, logit_std^2): the levels SD3 trains on."""
    p = VPSDE()
    t = sample_training_t(p, 50_000, kind="logit_normal", generator=torch.Generator().manual_seed(1))
    ln_sigma = -0.5 * p.log_snr(t)
    assert ln_sigma.mean().item() == pytest.approx(0.0, abs=0.02)
    assert ln_sigma.std().item() == pytest.approx(1.0, rel=0.02)
    with pytest.raises(ValueError, match="logit_std"):
        sample_training_t(RF, 4, kind="logit_normal", logit_std=0.0)
    with pytest.raises(ValueError, match="logit_std"):
        TrainConfig(t_sampling="logit_normal", logit_std=-1.0)


# --------------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("t_sampling", ["uniform", "logit_normal"])
def test_flow_loss_regresses_onto_eps_minus_x0(t_sampling):
    """A network off the target eps - x0 by 0.1 everywhere has loss 0.01 exactly (the noise is
    replayed from the loss's generator: t first, then eps)."""
    n = 4096
    x0 = torch.full((n, 1, 2, 2), 0.3)
    replay = torch.Generator().manual_seed(3)
    sample_training_t(RF, n, kind=t_sampling, generator=replay)
    eps = torch.randn(x0.shape, generator=replay)

    def net(x, t, labels=None):
        return eps - x0 + 0.1

    loss = denoising_loss(net, RF, x0, prediction="flow", t_sampling=t_sampling,
                          generator=torch.Generator().manual_seed(3))
    assert loss.item() == pytest.approx(0.01, rel=1e-4)


def test_flow_target_factor_and_the_plain_flow_loss_weight():
    """||d u||^2 = ((alpha + sigma) / sigma)^2 ||d x0||^2: 1/t^2 on rectified flow, so the plain
    flow loss weighs the eps error by 1 / (1 - t)^2."""
    t = torch.linspace(RF.t_min, RF.t_max, 9, dtype=torch.float64)
    a, s = RF.alpha(t), RF.sigma(t)
    torch.testing.assert_close(target_factor("flow", a, s), 1 / t**2)
    torch.testing.assert_close(target_factor("flow", a, s) / target_factor("eps", a, s),
                               1 / (1 - t) ** 2)
    snr = a**2 / s**2
    torch.testing.assert_close(loss_weight("min_snr", "flow", a, s), snr.clamp(max=5.0) * t**2)


# ----------------------------------------------------------------- samplers on Gaussian data
#: rectified flow's pc law (its own Langevin over-dispersion; the rest share test_samplers' bands)
PC_BAND = (0.0015, 0.0035)


@pytest.mark.parametrize(("sampler", "steps", "settings", "band", "mean_tol", "nfe"), CASES,
                         ids=[f"{c[0]}-{list(c[2].values())}" for c in CASES])
def test_sampler_law_on_gaussian_data(sampler, steps, settings, band, mean_tol, nfe, mu):
    d = GaussianDenoiser(mu, STD, RF)
    grid = RF.time_grid(steps)
    mean, std = exact_law(sampler, d, RF, grid, **settings)
    err = std.mean().item() / STD - 1
    lo, hi = PC_BAND if sampler == "pc" else band
    assert lo < err < hi
    assert (mean - mu).abs().max().item() < mean_tol
    if sampler == "pc":
        alone = exact_law(sampler, d, RF, grid, **{**settings, "corrector_steps": 0})[1]
        assert err < 0.9 * (alone.mean().item() / STD - 1)
    assert SAMPLERS[sampler](d, RF, torch.zeros(1, *SHAPE), grid, rng=torch.Generator(),
                             **settings).nfe == nfe


def test_rk45_sampled_moments(mu):
    n = 1000
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(n, *SHAPE, generator=g)
    res = SAMPLERS["ode_rk45"](GaussianDenoiser(mu.float(), STD, RF), RF, x_T, RF.time_grid(2),
                               rtol=1e-4, atol=1e-4)
    assert torch.isfinite(res.x).all()
    assert (res.x.mean(0) - mu).abs().max().item() < 5 * STD / n**0.5
    assert res.x.std(0).mean().item() == pytest.approx(STD, rel=0.03)


@pytest.mark.parametrize("sampler", ["ddim", "ode_heun", "dpmpp_2m", "unipc", "edm_heun"])
def test_paths_are_straight_for_a_point_mass(sampler, mu):
    """Data at one point: every ODE path is the line x_s = (1 - s) mu + s eps, so each
    deterministic sampler (Euler = DDIM, Heun in t, the log-SNR solvers) hits it at every
    grid time with only 4 steps."""
    d = GaussianDenoiser(mu, 0.0, RF)
    x_T = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grid = RF.time_grid(4)
    seen = []
    SAMPLERS[sampler](d, RF, x_T, grid, callback=lambda info: seen.append(info["x"]))
    t0 = grid[0].item()
    eps = (x_T - (1 - t0) * mu) / t0
    for x, s in zip(seen, grid[1:].tolist(), strict=True):
        torch.testing.assert_close(x, (1 - s) * mu + s * eps, atol=1e-10, rtol=0)


# ----------------------------------------------------------------------------- end to end
def test_train_with_logit_normal_flow_then_sample_every_sampler(tmp_path):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (64,), generator=g)
    images = (labels.float()[:, None, None, None] / 2 - 0.5) + 0.1 * torch.randn(64, 1, 8, 8,
                                                                                 generator=g)
    net = UNet(base_channels=8, channel_mults=(1,), num_res_blocks=1, attention_resolutions=(),
               num_classes=3)
    cfg = TrainConfig(steps=15, batch_size=16, lr=1e-3, p_uncond=0.2, prediction="flow",
                      t_sampling="logit_normal", checkpoint_every=0, keep_last=1, log_every=5)
    result = train(net, RF, images, labels, cfg, checkpoint_dir=tmp_path / "ckpt",
                   config_hash="t", progress=False)
    assert result.step == 15 and math.isfinite(result.loss)
    den = Denoiser(net.eval(), RF, "flow")
    for sampler in SAMPLERS:
        out = generate(den, RF, sampler, shape=(1, 8, 8), seeds=[0, 1], steps=4,
                       labels=torch.tensor([0, 2]))
        assert out.x.shape == (2, 1, 8, 8) and torch.isfinite(out.x).all(), sampler
