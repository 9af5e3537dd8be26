"""Our samplers against diffusers' schedulers (a test dependency only) on a small fixed network
with the same noise, to 1e-4, on the grids where the algorithms coincide; and the places where we
deliberately differ, shown.

Index convention: our step ``i = 1..N`` (time ``i/N``) is diffusers' timestep ``k = i - 1``.
"""

import pytest
import torch
from torch import nn

from diffusion_core.denoiser import ClipX0, Denoiser
from diffusion_core.processes import DiscreteDDPM
from diffusion_core.samplers import ddim, ddpm

diffusers = pytest.importorskip("diffusers")

N = 100
SHAPE = (4, 1, 4, 4)
TOL = 1e-4


def close(ours, ref):
    """Agreement to TOL on the output's scale (float32 runs; unclipped outputs reach ~25)."""
    return (ours - ref).abs().max().item() <= TOL * max(1.0, ref.abs().max().item())


class TinyNet(nn.Module):
    """A fixed, non-linear eps-network of (x, t)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.scale = nn.Parameter(torch.tensor(0.7))

    def forward(self, x, t, labels=None):
        t = t.reshape(-1, 1, 1, 1).to(x.dtype)
        return torch.tanh(self.conv(x)) * (0.3 + t) + self.scale * x * t


@pytest.fixture(scope="module")
def setup():
    process = DiscreteDDPM(N)
    net = TinyNet().eval()
    return process, net, Denoiser(net, process, "eps")


def prior_noise():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))


def diffusers_model(net):
    """diffusers' model call at timestep k is our network at t = (k + 1) / N."""
    return lambda x, k: net(x, torch.full((x.shape[0],), (int(k) + 1) / N))


def config(process, **kw):
    return {"num_train_timesteps": N, "trained_betas": process.betas.numpy(),
            "clip_sample": False, **kw}


def step_noise(count, seed=2):
    """The noise our samplers draw from ``Generator(seed)``, step after step."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=g) for _ in range(count)]


def run_diffusers_ddim(process, net, spacing, steps, eta=0.0, noise=None, **kw):
    sched = diffusers.DDIMScheduler(**config(process, timestep_spacing=spacing,
                                             set_alpha_to_one=True, **kw.pop("cfg", {})))
    sched.set_timesteps(steps)
    model = diffusers_model(net)
    x = prior_noise()
    with torch.no_grad():
        for j, k in enumerate(sched.timesteps):
            z = noise[j] if noise is not None and j < len(noise) else torch.zeros(SHAPE)
            x = sched.step(model(x, k), k, x, eta=eta, variance_noise=z, **kw).prev_sample
    return x, sched.timesteps


@pytest.mark.parametrize(("spacing", "steps"), [("leading", 10), ("leading", 20),
                                                ("trailing", 10), ("trailing", 25)])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_diffusers(setup, spacing, steps, eta):
    process, net, den = setup
    noise = step_noise(steps - 1) if eta > 0 else None
    ref, timesteps = run_diffusers_ddim(process, net, spacing, steps, eta=eta, noise=noise)
    grid = process.time_grid(steps, spacing)
    assert (torch.round(grid[:-1] * N).long() - 1).tolist() == timesteps.tolist()
    ours = ddim(den, process, prior_noise(), grid, eta=eta, rng=torch.Generator().manual_seed(2)).x
    assert close(ours, ref)
    assert ref.abs().max().item() > 0.1  # a real output, not a collapse


def test_ddim_on_linspace_differs_from_diffusers_by_design(setup):
    """diffusers' DDIM always steps from k to k - N // S, which on a ``linspace`` grid is not the
    grid's next timestep (and reaches below step 0 early); ours steps along the grid."""
    process, net, den = setup
    steps = 7
    ref, timesteps = run_diffusers_ddim(process, net, "linspace", steps)
    implied_prev = (timesteps - N // steps).tolist()
    assert implied_prev[:-1] != timesteps[1:].tolist()
    ours = ddim(den, process, prior_noise(), process.time_grid(steps, "linspace")).x
    assert (ours - ref).abs().max().item() > 1e-3
    # on a grid where N // S is the gap (leading, S | N) the two agree (test above)


@pytest.mark.parametrize(("spacing", "steps"), [("linspace", 100), ("linspace", 13),
                                                ("leading", 10), ("trailing", 7)])
@pytest.mark.parametrize("clip", [False, True])
def test_ddpm_ancestral_matches_diffusers(setup, spacing, steps, clip):
    """DDPMScheduler with variance "fixed_small" (the posterior variance) steps along its
    timesteps like ours; the step noise comes from the same generator in the same order.
    ``clip_sample=True`` is our ClipX0: both clamp x0 and use it in the posterior mean."""
    process, net, den = setup
    sched = diffusers.DDPMScheduler(**config(process, timestep_spacing=spacing,
                                             variance_type="fixed_small", clip_sample=clip))
    sched.set_timesteps(steps)
    model = diffusers_model(net)
    x = prior_noise()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for k in sched.timesteps:
            x = sched.step(model(x, k), k, x, generator=g).prev_sample
    grid = process.time_grid(steps, spacing)
    assert (torch.round(grid[:-1] * N).long() - 1).tolist() == sched.timesteps.tolist()
    ours = ddpm(ClipX0(den) if clip else den, process, prior_noise(), grid,
                rng=torch.Generator().manual_seed(5)).x
    assert close(ours, x)
    unclipped = ddpm(den, process, prior_noise(), grid, rng=torch.Generator().manual_seed(5)).x
    assert clip == ((unclipped - x).abs().max().item() > 1e-2)  # clipping really acted


def test_ddim_clipping_matches_diffusers_with_clipped_model_output(setup):
    """Our ClipX0 re-derives eps from the clipped x0 (as Ho et al.'s and GLIDE's samplers do);
    diffusers' DDIM does so only with ``use_clipped_model_output=True``; its default keeps the
    network's eps, which is no longer consistent with x_t = alpha x0 + sigma eps."""
    process, net, den = setup
    cfg = {"clip_sample": True}
    ref, _ = run_diffusers_ddim(process, net, "leading", 10, cfg=cfg,
                                use_clipped_model_output=True)
    ref_default, _ = run_diffusers_ddim(process, net, "leading", 10, cfg=cfg)
    ours = ddim(ClipX0(den), process, prior_noise(), process.time_grid(10, "leading")).x
    assert close(ours, ref)
    assert (ours - ref_default).abs().max().item() > 1e-2
