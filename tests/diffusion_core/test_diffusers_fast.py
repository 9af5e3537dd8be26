"""DPM-Solver++ and UniPC against diffusers' schedulers on one network, noise and grid.

diffusers is a dev dependency; these tests skip without it. Mapping of the discrete DDPM:
diffusers' integer timestep ``k in 0..N-1`` indexes ``alphas_cumprod[k] = prod_{j<=k}(1-beta_j)``,
which is our step ``i = k + 1``, time ``t = (k + 1) / N``; diffusers' network sees ``k``, ours
sees ``t``, so the reference loop calls the same network with ``(k + 1) / N``. Both end with
``final_sigmas_type="zero"``: our grid's last time is 0, where both return the data prediction.
"""

import pytest
import torch
from _tiny_net import TinyNet

from diffusion_core.denoiser import Denoiser
from diffusion_core.processes import DiscreteDDPM
from diffusion_core.rng import StackedRNG
from diffusion_core.samplers import SAMPLERS

diffusers = pytest.importorskip("diffusers")

N_TRAIN = 1000
SEEDS = list(range(4))


@pytest.fixture(scope="module")
def setup():
    net = TinyNet(0.5).eval()
    process = DiscreteDDPM(N_TRAIN)
    x_T = torch.randn(len(SEEDS), 1, 8, 8, generator=torch.Generator().manual_seed(7))
    return net, process, x_T


def reference(scheduler, net, x_T, steps, noisy=False):
    scheduler.set_timesteps(steps)
    rng = StackedRNG(SEEDS)
    x = x_T.clone()
    with torch.no_grad():
        for i, k in enumerate(scheduler.timesteps):
            t = torch.full((x.shape[0],), (int(k) + 1) / N_TRAIN, dtype=torch.float64)
            eps = net(x, t.float())
            kw = {}
            if noisy:  # our sampler draws no noise for the final step to t = 0 (sigma = 0)
                last = i == len(scheduler.timesteps) - 1
                kw["variance_noise"] = torch.zeros_like(x) if last else rng.randn_like(x)
            x = scheduler.step(eps, k, x, **kw).prev_sample
    grid = torch.tensor([(int(k) + 1) / N_TRAIN for k in scheduler.timesteps] + [0.0],
                        dtype=torch.float64)
    return x, grid


def ours(sampler, net, process, x_T, grid, noisy=False, **settings):
    den = Denoiser(net, process, "eps")
    rng = StackedRNG(SEEDS) if noisy else None
    return SAMPLERS[sampler](den, process, x_T.clone(), grid, rng=rng, **settings)


DPM_CASES = [  # (our sampler, algorithm_type, order, steps)
    ("dpmpp_2m", "dpmsolver++", 2, 10),
    ("dpmpp_2m", "dpmsolver++", 2, 20),
    ("dpmpp_3m", "dpmsolver++", 3, 10),
    ("dpmpp_3m", "dpmsolver++", 3, 20),
    ("dpmpp_2m_sde", "sde-dpmsolver++", 2, 10),
    ("dpmpp_2m_sde", "sde-dpmsolver++", 2, 20),
]


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize(("sampler", "algorithm", "order", "steps"), DPM_CASES)
def test_dpmpp_matches_diffusers(setup, sampler, algorithm, order, steps, spacing):
    net, process, x_T = setup
    sched = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=N_TRAIN, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
        algorithm_type=algorithm, solver_order=order, solver_type="midpoint",
        lower_order_final=True, final_sigmas_type="zero", timestep_spacing=spacing)
    noisy = algorithm.startswith("sde")
    want, grid = reference(sched, net, x_T, steps, noisy=noisy)
    got = ours(sampler, net, process, x_T, grid, noisy=noisy)
    assert got.nfe == steps
    assert (got.x - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("steps", [5, 10, 20])
def test_unipc_matches_diffusers(setup, order, steps, spacing):
    net, process, x_T = setup
    sched = diffusers.UniPCMultistepScheduler(
        num_train_timesteps=N_TRAIN, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
        solver_order=order, solver_type="bh2", predict_x0=True, lower_order_final=True,
        final_sigmas_type="zero", timestep_spacing=spacing)
    want, grid = reference(sched, net, x_T, steps)
    got = ours("unipc", net, process, x_T, grid, order=order)
    assert got.nfe == steps
    assert (got.x - want).abs().max().item() < 1e-4


def test_a_different_algorithm_is_detected(setup):
    """The comparison can fail: 2M against diffusers' 3M differs well above the tolerance."""
    net, process, x_T = setup
    sched = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=N_TRAIN, algorithm_type="dpmsolver++", solver_order=3)
    want, grid = reference(sched, net, x_T, 20)
    got = ours("dpmpp_2m", net, process, x_T, grid)
    assert (got.x - want).abs().max().item() > 1e-3
