"""The denoising loss of the exact (Bayes-optimal) predictor equals its closed form."""

import pytest
import torch
from torch import nn

from diffusion_core.analytic import GaussianDenoiser
from diffusion_core.denoiser import input_scale
from diffusion_core.losses import denoising_loss
from diffusion_core.processes import VESDE, VPSDE, DiscreteDDPM, RectifiedFlow, broadcast

MU, S = 0.3, 0.5


class ExactNet(nn.Module):
    """Outputs the posterior-mean prediction for N(MU, S^2) data from the scaled input."""

    def __init__(self, process, kind):
        super().__init__()
        self.process, self.kind = process, kind
        self.exact = GaussianDenoiser(torch.full((1, 2, 2), MU), S, process)

    def forward(self, x_in, t, labels=None):
        t = t.double()
        a, s = broadcast(self.process.alpha(t), x_in), broadcast(self.process.sigma(t), x_in)
        x = x_in / input_scale(a, s)
        out = self.exact(x, t)
        if self.kind == "eps":
            return out.eps
        if self.kind == "x0":
            return out.x0
        if self.kind == "flow":
            return out.eps - out.x0
        return a * out.eps - s * out.x0


def closed_form(process, kind, n=200_000):
    """E_t of the per-pixel posterior variance of the target."""
    t = process.sample_t(n, torch.Generator().manual_seed(5))
    a, s = process.alpha(t), process.sigma(t)
    var_x0 = S**2 * s**2 / (a**2 * S**2 + s**2)
    if kind == "eps":
        return (a**2 * S**2 / (a**2 * S**2 + s**2)).mean().item()
    if kind == "x0":
        return var_x0.mean().item()
    if kind == "flow":  # ||d u||^2 = ((alpha + sigma) / sigma)^2 ||d x0||^2
        return (((a + s) / s) ** 2 * var_x0).mean().item()
    return (((a**2 + s**2) / s) ** 2 * var_x0).mean().item()


@pytest.mark.parametrize("process", [DiscreteDDPM(1000), VPSDE(), VESDE(0.01, 5.0),
                                     RectifiedFlow()], ids=lambda p: p.name)
@pytest.mark.parametrize("kind", ["eps", "x0", "v", "flow"])
def test_bayes_optimal_loss(process, kind):
    g = torch.Generator().manual_seed(0)
    x0 = MU + S * torch.randn(50_000, 1, 2, 2, generator=g, dtype=torch.float64)
    loss = denoising_loss(ExactNet(process, kind), process, x0, prediction=kind, generator=g)
    assert loss.item() == pytest.approx(closed_form(process, kind), rel=0.05)


def test_perturbed_predictor_has_higher_loss():
    p = VPSDE()
    g = torch.Generator().manual_seed(0)
    x0 = MU + S * torch.randn(20_000, 1, 2, 2, generator=g, dtype=torch.float64)
    exact = ExactNet(p, "eps")

    class Off(nn.Module):
        def forward(self, x, t, labels=None):
            return exact(x, t) + 0.1

    l1 = denoising_loss(exact, p, x0, generator=torch.Generator().manual_seed(1))
    l2 = denoising_loss(Off(), p, x0, generator=torch.Generator().manual_seed(1))
    assert l2.item() == pytest.approx(l1.item() + 0.01, rel=0.05)


def test_loss_is_seeded_and_needs_null_label_for_dropout():
    p = DiscreteDDPM(100)
    net = nn.Conv2d(1, 1, 1)
    x0 = torch.randn(8, 1, 2, 2)

    def f(x, t, labels=None):
        return net(x)

    a = denoising_loss(f, p, x0, generator=torch.Generator().manual_seed(3))
    b = denoising_loss(f, p, x0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="p_uncond"):
        denoising_loss(f, p, x0, torch.zeros(8, dtype=torch.long), p_uncond=0.1)
