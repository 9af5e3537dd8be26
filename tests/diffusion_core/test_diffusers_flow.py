"""Rectified flow against diffusers' flow-matching schedulers on one network, noise and grid.

diffusers is a dev dependency; these tests skip without it. diffusers' flow schedulers use the
path ``x = (1 - sigma) x0 + sigma eps`` with a model predicting ``eps - x0``: our
``RectifiedFlow`` with ``prediction="flow"``, time ``t = sigma``. Our denoiser feeds the network
``c_in x`` with ``c_in = 1 / sqrt((1 - t)^2 + t^2)`` (EDM's input scaling, see denoiser.py), so
the reference loop calls the same network on the same scaled input at the same ``t``. The grids
are diffusers' own sigmas followed by 0, passed to our samplers as they are.
"""

import math

import pytest
import torch
from _tiny_net import TinyNet

from diffusion_core.denoiser import Denoiser
from diffusion_core.processes import RectifiedFlow, timestep_shift
from diffusion_core.samplers import SAMPLERS

diffusers = pytest.importorskip("diffusers")

N_TRAIN = 1000
TOL = 1e-4


@pytest.fixture(scope="module")
def setup():
    net = TinyNet(0.8, -0.5).eval()
    process = RectifiedFlow(t_min=1.0 / N_TRAIN)
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    return net, process, x_T


def model(net, x, sigma):
    """The network as diffusers' pipelines would call it at noise level ``sigma``."""
    s = float(sigma)
    t = torch.full((x.shape[0],), s)
    return net(x / math.sqrt((1 - s) ** 2 + s**2), t)


def reference(scheduler, net, x_T, steps, **kw):
    scheduler.set_timesteps(steps, **kw)
    x = x_T.clone()
    with torch.no_grad():
        for i, k in enumerate(scheduler.timesteps):
            x = scheduler.step(model(net, x, scheduler.sigmas[i]), k, x).prev_sample
    grid = scheduler.sigmas.double()
    assert grid[-1].item() == 0.0
    return x, grid


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [4, 10, 28])
def test_euler_is_ddim_and_matches_flow_match_euler(setup, shift, steps):
    """FlowMatchEulerDiscreteScheduler's ``x + (sigma_next - sigma) u`` is our DDIM (eta = 0)
    with the flow denoiser, from sigma = 1 (alpha = 0: the flow's conversions stay finite)."""
    net, process, x_T = setup
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=N_TRAIN, shift=shift)
    want, grid = reference(sched, net, x_T, steps)
    assert grid[0].item() == 1.0
    got = SAMPLERS["ddim"](Denoiser(net, process, "flow"), process, x_T.clone(), grid)
    assert got.nfe == steps
    assert (got.x - want).abs().max().item() < TOL


@pytest.mark.parametrize("steps", [5, 10, 20])
def test_dpmpp_2m_matches_diffusers_with_flow_sigmas(setup, steps):
    """DPMSolverMultistepScheduler(use_flow_sigmas=True): its largest sigma is 1 - 1/N_train,
    our t_max for t_min = 1/N_train, so the log-SNR solver starts from a finite lambda."""
    net, process, x_T = setup
    sched = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=N_TRAIN, use_flow_sigmas=True, prediction_type="flow_prediction",
        flow_shift=1.0, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
        lower_order_final=True, final_sigmas_type="zero")
    want, grid = reference(sched, net, x_T, steps)
    assert grid[0].item() == pytest.approx(process.t_max, abs=1e-6)
    got = SAMPLERS["dpmpp_2m"](Denoiser(net, process, "flow"), process, x_T.clone(), grid)
    assert got.nfe == steps
    assert (got.x - want).abs().max().item() < TOL


@pytest.mark.parametrize("order", [2, 3])
def test_unipc_matches_diffusers_with_flow_sigmas(setup, order):
    net, process, x_T = setup
    sched = diffusers.UniPCMultistepScheduler(
        num_train_timesteps=N_TRAIN, use_flow_sigmas=True, prediction_type="flow_prediction",
        flow_shift=1.0, solver_order=order, solver_type="bh2", predict_x0=True,
        lower_order_final=True, final_sigmas_type="zero")
    want, grid = reference(sched, net, x_T, 10)
    got = SAMPLERS["unipc"](Denoiser(net, process, "flow"), process, x_T.clone(), grid,
                            order=order)
    assert (got.x - want).abs().max().item() < TOL


def test_a_different_algorithm_is_detected(setup):
    """The comparison can fail: our Euler against diffusers' DPM-Solver++ differs well above TOL."""
    net, process, x_T = setup
    sched = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=N_TRAIN, use_flow_sigmas=True, prediction_type="flow_prediction",
        algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero")
    want, grid = reference(sched, net, x_T, 10)
    got = SAMPLERS["ddim"](Denoiser(net, process, "flow"), process, x_T.clone(), grid)
    assert (got.x - want).abs().max().item() > 1e-2


@pytest.mark.parametrize("shift", [0.5, 3.0, 6.0])
def test_timestep_shift_matches_diffusers_and_trailing_is_sd3s_grid(shift):
    """diffusers shifts the sigmas it is given by SD3's formula; SD3's pipeline passes
    ``linspace(1, 1/S, S)``, our ``trailing`` spacing, mapped onto [t_min, t_max]."""
    steps = 12
    u = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=N_TRAIN, shift=shift)
    sched.set_timesteps(sigmas=u.tolist())
    want = sched.sigmas[:-1].double()
    torch.testing.assert_close(timestep_shift(u, shift), want, atol=1e-6, rtol=0)
    p = RectifiedFlow(shift=shift)
    ours = (p.time_grid(steps, "trailing")[:-1] - p.t_min) / (p.t_max - p.t_min)
    torch.testing.assert_close(ours, want, atol=1e-6, rtol=0)
