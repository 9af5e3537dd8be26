"""The self-conditioning wrapper of the recipe benchmark (Chen et al. 2022, section 3.2)."""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from diffusion_core.processes import DiscreteDDPM

# benchmarks/ is not an installed package: load the module from its file
_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "self_conditioning.py"
_spec = importlib.util.spec_from_file_location("_self_conditioning", _PATH)
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
SelfConditioned = _module.SelfConditioned


class Recorder(nn.Module):
    """A two-channel 'network' that predicts x0 = 0.5 * (image channel) and records its inputs."""

    in_channels = 2

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.inputs: list[torch.Tensor] = []

    def forward(self, x, t, labels=None):
        self.inputs.append(x.detach().clone())
        return self.scale * x[:, :1].repeat(1, 2, 1, 1)


def wrapped(p=0.5):
    net = Recorder()
    return net, SelfConditioned(net, DiscreteDDPM(schedule="cosine"), "x0", p)


def test_sampling_feeds_the_previous_estimate_of_the_same_trajectory():
    net, model = wrapped()
    model.eval()
    x1, x2, x3 = (torch.full((3, 1, 4, 4), v) for v in (1.0, 2.0, 4.0))
    model(x1, torch.full((3,), 0.9))
    model(x2, torch.full((3,), 0.5))
    model(x3, torch.full((3,), 0.9))  # time went up: a new trajectory
    fed = [inp[:, 1:] for inp in net.inputs]
    assert torch.equal(fed[0], torch.zeros_like(x1))
    assert torch.allclose(fed[1], 0.5 * x1)  # the x0 estimate of the first call
    assert torch.equal(fed[2], torch.zeros_like(x3))


def test_training_self_conditions_a_share_p_without_gradient_through_the_first_pass():
    net, model = wrapped(p=1.0)
    model.train()
    x = torch.randn(5, 1, 4, 4)
    out = model(x, torch.full((5,), 0.3))
    first, second = net.inputs
    assert torch.equal(first[:, 1:], torch.zeros_like(x))
    assert torch.allclose(second[:, 1:], 0.5 * x)
    out.sum().backward()  # d/dscale of scale * x: the first pass adds nothing
    assert torch.allclose(net.scale.grad, x.sum())

    net, model = wrapped(p=0.0)
    model.train()
    model(x, torch.full((5,), 0.3))
    assert len(net.inputs) == 1 and torch.equal(net.inputs[0][:, 1:], torch.zeros_like(x))


def test_needs_two_input_channels():
    net = Recorder()
    net.in_channels = 1
    with pytest.raises(ValueError, match="in_channels = 2"):
        SelfConditioned(net, DiscreteDDPM(), "x0")
