"""Every process trains and samples end to end with the real U-Net (a few steps, tiny net)."""

import pytest
import torch

from diffusion_core.denoiser import Denoiser
from diffusion_core.processes import make_process
from diffusion_core.rng import StackedRNG
from diffusion_core.samplers import SAMPLERS, generate
from diffusion_core.training import TrainConfig, train
from diffusion_core.unet import UNet


@pytest.mark.parametrize("name", ["ddpm", "vp", "subvp", "ve"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_train_then_sample_every_sampler(tmp_path, name, prediction):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (64,), generator=g)
    images = (labels.float()[:, None, None, None] / 2 - 0.5) + 0.1 * torch.randn(64, 1, 8, 8, generator=g)
    net = UNet(base_channels=8, channel_mults=(1,), num_res_blocks=1, attention_resolutions=(),
               num_classes=3)
    process = make_process(name, num_steps=100)
    cfg = TrainConfig(steps=15, batch_size=16, lr=1e-3, p_uncond=0.2, prediction=prediction,
                      checkpoint_every=0, keep_last=1, log_every=5, seed=0)
    result = train(net, process, images, labels, cfg, checkpoint_dir=tmp_path / "ckpt",
                   config_hash="t", progress=False)
    assert result.step == 15 and torch.isfinite(torch.tensor(result.loss))
    den = Denoiser(net.eval(), process, prediction)
    # the prior draw generate() starts from (image i: a generator seeded with seeds[i])
    x_T = process.prior_sample((2, 1, 8, 8), StackedRNG([0, 1], "cpu"))
    for sampler in SAMPLERS:
        out = generate(den, process, sampler, shape=(1, 8, 8), seeds=[0, 1], steps=4,
                       labels=torch.tensor([0, 2]))
        assert out.x.shape == (2, 1, 8, 8) and torch.isfinite(out.x).all(), sampler
        # the sampler moved away from x_T: ||x - x_T|| / ||x_T|| measured 0.17 to 186 over the
        # processes, predictions and samplers here (0 for a sampler that returns its input)
        change = ((out.x - x_T).norm() / x_T.norm()).item()
        assert change > 0.1, (sampler, change)
