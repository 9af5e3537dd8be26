"""Noise-process math against closed forms and brute-force Gaussian computations."""

import math

import pytest
import torch

from diffusion_core.processes import (
    SPACINGS,
    VESDE,
    VPSDE,
    DiscreteDDPM,
    RectifiedFlow,
    SubVPSDE,
    cosine_betas,
    linear_betas,
    make_process,
    shift_logsnr,
)

ALL = [DiscreteDDPM(), VPSDE(), SubVPSDE(), VESDE(), RectifiedFlow()]
CONTINUOUS = [VPSDE(), SubVPSDE(), VESDE(), RectifiedFlow()]


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


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("shift", [-2.0, 1.65])
def test_logsnr_shift_moves_log_snr_by_a_constant_at_every_step(schedule, shift):
    base, moved = DiscreteDDPM(1000, schedule), DiscreteDDPM(1000, schedule, logsnr_shift=shift)
    t = torch.arange(1, 1000, dtype=torch.float64) / 1000  # the clipped last step aside
    log_snr = lambda p: 2 * (p.log_alpha(t) - torch.log(p.sigma(t)))  # noqa: E731
    assert torch.allclose(log_snr(moved) - log_snr(base), torch.full_like(t, shift), atol=1e-6)
    # the shifted cosine of Hoogeboom et al. 2023: alpha^2 = sigmoid(log SNR + shift)
    if schedule == "cosine":
        s, c = 0.008, math.cos(0.008 / 1.008 * math.pi / 2) ** 2
        abar = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2 / c
        expected = torch.sigmoid(torch.logit(abar) + shift)
        assert torch.allclose(moved.alpha(t) ** 2, expected, rtol=1e-8)
    assert moved.describe()["logsnr_shift"] == shift
    assert make_process(**moved.describe()).describe() == moved.describe()


def test_a_zero_logsnr_shift_is_the_schedule_itself():
    betas = cosine_betas(1000)
    assert torch.allclose(shift_logsnr(betas, 0.0), betas, rtol=1e-9, atol=1e-15)
    assert torch.equal(DiscreteDDPM(1000, "cosine", logsnr_shift=0.0).betas, betas)
    with pytest.raises(ValueError, match="logsnr_shift must be finite"):
        DiscreteDDPM(1000, "cosine", logsnr_shift=float("inf"))


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
@pytest.mark.parametrize("spacing", SPACINGS)
def test_time_grid_shape(process, spacing):
    g = process.time_grid(20, spacing)
    assert g.numel() == 21
    assert g[-1].item() == 0.0
    assert torch.all(g[1:] < g[:-1])
    assert g[0].item() <= process.t_max and g[-2].item() >= process.t_min - 1e-12
    # which ends a spacing includes
    starts_at_max = spacing in ("linspace", "trailing", "logsnr", "karras")
    ends_at_min = spacing != "trailing"
    assert (g[0].item() == pytest.approx(process.t_max)) == starts_at_max
    assert (g[-2].item() == pytest.approx(process.t_min)) == ends_at_min


# step indices i (1..N) of a 1000-step DDPM with 10 steps, written out from each definition
DDPM_STEPS = {
    # k = round(j 999/9) = 111 j, i = k + 1
    "linspace": [1000, 889, 778, 667, 556, 445, 334, 223, 112, 1],
    # k = 100 j
    "leading": [901, 801, 701, 601, 501, 401, 301, 201, 101, 1],
    # k = round(1000 - 100 j) - 1
    "trailing": [1000, 900, 800, 700, 600, 500, 400, 300, 200, 100],
    # k = floor(800 j^2 / 81): 0, 9, 39, 88, 158, 246, 355, 483, 632, 800
    "quadratic": [801, 633, 484, 356, 247, 159, 89, 40, 10, 1],
}


@pytest.mark.parametrize("spacing", list(DDPM_STEPS))
def test_ddpm_grid_indices(spacing):
    g = DiscreteDDPM(1000).time_grid(10, spacing)
    assert torch.round(g * 1000).long().tolist() == DDPM_STEPS[spacing] + [0]


def test_ddpm_quadratic_collisions_move_up():
    # 200 quadratic steps of 1000: DDIM's k = floor(800 j^2 / 199^2) is 0 for j = 0..7, 1, ...;
    # the repeated low steps move up one at a time, so all 200 are distinct
    idx = torch.round(DiscreteDDPM(1000).time_grid(200, "quadratic") * 1000).long()[:-1]
    k = torch.floor((torch.arange(200.0, dtype=torch.float64) * (800**0.5 / 199)) ** 2)
    assert idx.unique().numel() == 200 and idx[-1] == 1 and idx[0] == 801
    # above the collisions every step is DDIM's own
    assert torch.equal(idx[:100].flip(0), k[100:].long() + 1)


def test_ddpm_one_step_grids():
    p = DiscreteDDPM(100)
    assert p.time_grid(1, "linspace").tolist() == [1.0, 0.0]  # step N (diffusers: step 1)
    assert p.time_grid(1, "trailing").tolist() == [1.0, 0.0]
    assert p.time_grid(1, "leading").tolist() == [0.01, 0.0]


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize(("n", "steps"), [(1000, 10), (1000, 50), (1000, 3), (1000, 7),
                                          (100, 30), (500, 500), (1000, 999), (50, 49)])
def test_ddpm_grid_matches_diffusers_timesteps(spacing, n, steps):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(num_train_timesteps=n, timestep_spacing=spacing)
    sched.set_timesteps(steps)
    ref = sched.timesteps.tolist()
    if len(ref) != steps:
        pytest.skip(f"diffusers returns {len(ref)} {spacing} timesteps for {steps} steps")
    ours = torch.round(DiscreteDDPM(n).time_grid(steps, spacing) * n).long()[:-1] - 1
    assert ours.tolist() == ref


@pytest.mark.parametrize("process", CONTINUOUS, ids=lambda p: p.name)
def test_continuous_index_spacings(process):
    lo, hi = process.t_min, process.t_max
    u = {"linspace": [1.0, 0.75, 0.5, 0.25, 0.0], "leading": [0.8, 0.6, 0.4, 0.2, 0.0],
         "trailing": [1.0, 0.8, 0.6, 0.4, 0.2], "quadratic": [0.8, 0.45, 0.2, 0.05, 0.0]}
    for spacing, frac in u.items():
        expected = torch.tensor([lo + (hi - lo) * f for f in frac] + [0.0], dtype=torch.float64)
        assert torch.allclose(process.time_grid(5, spacing), expected, atol=1e-12), spacing


@pytest.mark.parametrize("process", ALL, ids=lambda p: p.name)
def test_logsnr_grid_is_uniform_in_lambda(process):
    g = process.time_grid(8, "logsnr")[:-1]
    lam = process.log_snr(g)
    if process.discrete:  # snapped to steps: within one step's change of lambda
        ideal = torch.linspace(lam[0].item(), lam[-1].item(), 8, dtype=torch.float64)
        one_step = (process.log_snr(g - 1e-3) - lam).abs()
        assert torch.all((lam - ideal).abs() <= one_step)
    else:
        assert torch.allclose(lam.diff(), lam.diff().mean().expand(7), rtol=1e-8)
        lam_max = process.log_snr(torch.tensor(process.t_max, dtype=torch.float64))
        assert lam[0].item() == pytest.approx(lam_max.item())


@pytest.mark.parametrize("process", CONTINUOUS, ids=lambda p: p.name)
@pytest.mark.parametrize("rho", [7.0, 3.0])
def test_karras_grid_spaces_sigma_over_alpha(process, rho):
    g = process.time_grid(6, "karras", rho=rho)[:-1]
    sig = process.sigma(g) / process.alpha(g)
    smax, smin = sig[0].item(), sig[-1].item()
    i = torch.arange(6, dtype=torch.float64) / 5
    expected = (smax ** (1 / rho) + i * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    assert torch.allclose(sig, expected, rtol=1e-8)
    assert g[0].item() == process.t_max and g[-1].item() == process.t_min


@pytest.mark.parametrize("process", ALL, ids=lambda p: p.name)
def test_inverse_log_snr(process):
    t = torch.tensor([process.t_min, 0.013, 0.3, 0.77, process.t_max], dtype=torch.float64)
    assert torch.allclose(process.inverse_log_snr(process.log_snr(t)), t, atol=1e-9)


def test_uniform_is_a_deprecated_alias_and_unknown_names_fail():
    p = DiscreteDDPM(100)
    with pytest.warns(DeprecationWarning, match="linspace"):
        g = p.time_grid(10, "uniform")
    assert torch.equal(g, p.time_grid(10, "linspace"))
    with pytest.raises(ValueError, match="spacing"):
        VPSDE().time_grid(10, "cosine")


def test_ddpm_full_grid_is_every_step():
    p = DiscreteDDPM(100)
    for spacing in SPACINGS:
        g = p.time_grid(100, spacing)
        expected = torch.cat([torch.arange(100, 0, -1).double() / 100, torch.zeros(1)])
        assert torch.allclose(g, expected.double()), spacing
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
