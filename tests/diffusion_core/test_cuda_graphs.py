"""CUDA graphs for sampling, and the GPU paths of sampling and training.

The CPU tests run everywhere; the CUDA ones run where a GPU is present (the project's GPU
checks run them on a lent machine) and are skipped otherwise.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_core.checkpoint import checkpoint_name, load_checkpoint
from diffusion_core.cuda_graphs import CUDAGraphNet
from diffusion_core.denoiser import Denoiser
from diffusion_core.guidance import ClassifierFreeGuidance
from diffusion_core.processes import make_process
from diffusion_core.rng import StackedRNG
from diffusion_core.samplers import generate
from diffusion_core.training import TrainConfig, train
from diffusion_core.unet import UNet

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _net(num_classes: int = 0) -> UNet:
    torch.manual_seed(0)
    return UNet(in_channels=1, image_size=8, base_channels=8, channel_mults=(1, 2),
                num_res_blocks=1, attention_resolutions=(4,), num_classes=num_classes).eval()


def test_cpu_calls_the_network_as_is_and_keeps_its_attributes():
    net = _net(num_classes=10)
    wrapped = CUDAGraphNet(net)
    x, t, y = torch.randn(3, 1, 8, 8), torch.full((3,), 0.3), torch.tensor([1, 2, 3])
    with torch.no_grad():
        assert torch.equal(wrapped(x, t, y), net(x, t, y))
    assert wrapped.captured == 0
    assert (wrapped.num_classes, wrapped.null_label) == (net.num_classes, net.null_label)


@cuda
def test_replays_match_eager_and_outputs_are_not_overwritten():
    net = _net(num_classes=10).cuda()
    wrapped = CUDAGraphNet(net)
    x1, x2 = torch.randn(2, 4, 1, 8, 8, device="cuda")
    t, y = torch.full((4,), 0.5, device="cuda"), torch.arange(4, device="cuda")
    with torch.no_grad():
        out1, out2 = wrapped(x1, t, y), wrapped(x2, t, y)
        torch.testing.assert_close(out1, net(x1, t, y), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out2, net(x2, t, y), rtol=1e-5, atol=1e-5)
        wrapped(x1, t, None)  # a new signature: a second graph
    assert wrapped.captured == 2


@cuda
@pytest.mark.parametrize("sampler,steps", [("ddpm", 20), ("ddim", 10), ("dpmpp_2m", 8),
                                           ("pc", 6), ("unipc", 8)])
def test_sampling_with_graphs_matches_eager_and_the_cpu(sampler, steps):
    process = make_process("ddpm", num_steps=100)
    net = _net()
    kw = dict(shape=(1, 8, 8), seeds=range(5), steps=steps)
    cpu = generate(Denoiser(net, process), process, sampler, device="cpu", **kw).x
    gpu_net = _net().cuda()
    eager = generate(Denoiser(gpu_net, process), process, sampler, device="cuda", **kw).x
    graphs = generate(Denoiser(CUDAGraphNet(gpu_net), process), process, sampler,
                      device="cuda", **kw).x
    torch.testing.assert_close(graphs, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(eager.cpu(), cpu, rtol=1e-3, atol=1e-3)


def test_generate_checks_labels_on_the_host_once():
    process = make_process("ddpm", num_steps=100)
    guided = ClassifierFreeGuidance(Denoiser(_net(num_classes=10), process), 1.0)
    kw = dict(shape=(1, 8, 8), seeds=range(2), steps=2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\].*got 11"):
        generate(guided, process, "ddim", labels=torch.tensor([1, 11]), **kw)
    with pytest.raises(ValueError, match="labels must be 2 integers"):
        generate(guided, process, "ddim", labels=torch.tensor([1.0, 2.0]), **kw)


@cuda
def test_guided_sampling_with_graphs_matches_eager():
    process = make_process("ddpm", num_steps=100)
    gpu_net = _net(num_classes=10).cuda()
    labels = torch.tensor([0, 3, 9, 10])
    kw = dict(shape=(1, 8, 8), seeds=range(4), steps=10, labels=labels, device="cuda")
    eager = generate(ClassifierFreeGuidance(Denoiser(gpu_net, process), 2.0), process, "ddim",
                     **kw).x
    graphs = generate(ClassifierFreeGuidance(Denoiser(CUDAGraphNet(gpu_net), process), 2.0),
                      process, "ddim", **kw).x
    torch.testing.assert_close(graphs, eager, rtol=1e-4, atol=1e-4)


@cuda
def test_noise_streams_are_the_same_on_cpu_and_cuda():
    a = StackedRNG([3, 7, 11], "cpu").randn((2, 5))
    b = StackedRNG([3, 7, 11], "cuda").randn((2, 5))
    torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-5)


@cuda
def test_gpu_training_checks_losses_at_logs_and_names_the_bad_step(tmp_path):
    images = torch.rand(64, 1, 8, 8) * 2 - 1
    cfg = TrainConfig(steps=6, batch_size=8, lr=1e-3, checkpoint_every=0, keep_last=1,
                      log_every=3, seed=0, mixed_precision="fp32", channels_last=True)
    result = train(_net(), make_process("ddpm", num_steps=100), images, None, cfg,
                   checkpoint_dir=tmp_path / "ok", config_hash="h", progress=False)
    assert (result.step, result.interrupted, result.resumed) == (6, False, False)
    assert math.isfinite(result.loss) and 0 < result.loss < 10
    assert result.checkpoint == tmp_path / "ok" / checkpoint_name(6)
    assert result.checkpoint.is_file()
    assert result.model_path is not None and result.model_path.is_file()
    saved = load_checkpoint(result.model_path)
    assert saved["step"] == 6
    before = _net().state_dict()  # the same seeded initialisation: the steps moved the weights
    assert any(not torch.equal(saved["model"][k].cpu(), v) for k, v in before.items())
    bad = images.clone()
    bad[:] = float("nan")
    with pytest.raises(FloatingPointError, match="at step 1;"):
        train(_net(), make_process("ddpm", num_steps=100), bad, None, cfg,
              checkpoint_dir=tmp_path / "bad", config_hash="h", progress=False)
    assert not list((tmp_path / "bad").glob("ckpt-*.pt"))
