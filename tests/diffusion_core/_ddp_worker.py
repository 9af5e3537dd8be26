"""Worker for the two-process DDP tests, launched by ``python -m torch.distributed.run``.

Usage: ``torchrun --nproc_per_node 2 _ddp_worker.py OUT_DIR``. In one process group it runs:

1. ``mean``: a noise-free model (``ClassMean``) whose x0-loss does not depend on ``t`` or the
   noise, so its weights must match one process training on the same global batches;
2. ``full``: a tiny U-Net trained for ``STEPS`` steps without a break;
3. ``resume``: the same run, interrupted by SIGTERM on rank 1 only during step ``STOP_AT``
   then resumed to ``STEPS`` in a second call.

Each rank writes ``OUT_DIR/result-<rank>.json`` with its ``DistInfo`` and ``TrainResult`` fields.
The helpers (``ClassMean``, ``data``, ``unet``, ``CONFIG``) are also imported by the tests.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from diffusion_core.processes import make_process
from diffusion_core.training import TrainConfig, train
from diffusion_core.unet import UNet

STEPS = 6
STOP_AT = 3
SHAPE = (1, 4, 4)


class ClassMean(nn.Module):
    """``out = b + E[y]``: ignores ``x_t`` and ``t``, so ``|| out - x0 ||^2`` needs no noise."""

    def __init__(self, num_classes: int = 3, init_seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(init_seed)
        self.num_classes, self.null_label = num_classes, num_classes
        self.bias = nn.Parameter(0.1 * torch.randn(SHAPE, generator=g))
        self.emb = nn.Parameter(0.1 * torch.randn(num_classes + 1, *SHAPE, generator=g))
        self.config = {"num_classes": num_classes}

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        if labels is None:
            labels = torch.full((x.shape[0],), self.null_label, device=x.device)
        return self.bias + self.emb[labels]


def data(n: int = 32, image_shape: tuple[int, ...] = SHAPE) -> tuple[Tensor, Tensor]:
    """A fixed toy data set: images in [-1, 1] and labels in {0, 1, 2}."""
    g = torch.Generator().manual_seed(123)
    images = torch.rand(n, *image_shape, generator=g) * 2 - 1
    labels = torch.randint(0, 3, (n,), generator=g)
    return images, labels


def unet(seed: int = 0) -> UNet:
    """A tiny class-conditional U-Net with dropout (exercises the global RNG)."""
    torch.manual_seed(seed)
    return UNet(
        in_channels=1,
        image_size=4,
        base_channels=8,
        channel_mults=(1,),
        num_res_blocks=1,
        attention_resolutions=(),
        dropout=0.1,
        num_classes=3,
        num_heads=1,
    )


CONFIG = dict(
    batch_size=8,
    lr=1e-2,
    warmup_steps=2,
    grad_clip=1.0,
    ema_decay=0.9,
    checkpoint_every=2,
    keep_last=2,
    log_every=1,
    mixed_precision="fp32",
    seed=7,
)


def signal_at(net: nn.Module, call: int, sig: int = signal.SIGTERM) -> nn.Module:
    """Make ``net`` send ``sig`` to its own process in forward call number ``call`` (a hook, so
    the state dict is unchanged)."""
    calls = {"n": 0}

    def hook(module: nn.Module, args: tuple) -> None:
        calls["n"] += 1
        if calls["n"] == call:
            os.kill(os.getpid(), sig)

    net.register_forward_pre_hook(hook)
    return net


def main(out: Path) -> None:
    from diffusion_core.distributed import cleanup, setup_distributed

    torch.set_num_threads(1)
    dist = setup_distributed(device="cpu")  # gloo, even where CUDA is visible
    report: dict = {"dist": {**dataclasses.asdict(dist), "device": str(dist.device)}}
    images, labels = data()
    process = make_process("vp")

    cfg = TrainConfig(steps=STEPS, prediction="x0", **CONFIG)
    # Rank-dependent init: DDP must broadcast rank 0's weights.
    net = ClassMean(init_seed=dist.rank)
    kw = dict(dist=dist, progress=False)
    res = train(
        net, process, images, labels, cfg, checkpoint_dir=out / "mean", config_hash="m", **kw
    )
    report["mean"] = dataclasses.asdict(res)

    ucfg = TrainConfig(steps=STEPS, p_uncond=0.25, **CONFIG)
    res = train(
        unet(), process, images, labels, ucfg, checkpoint_dir=out / "full", config_hash="u", **kw
    )
    report["full"] = dataclasses.asdict(res)

    net = signal_at(unet(), STOP_AT) if dist.rank == 1 else unet()
    res = train(
        net, process, images, labels, ucfg, checkpoint_dir=out / "resume", config_hash="u", **kw
    )
    report["interrupted"] = dataclasses.asdict(res)
    res = train(
        unet(), process, images, labels, ucfg, checkpoint_dir=out / "resume", config_hash="u", **kw
    )
    report["resumed"] = dataclasses.asdict(res)

    (out / f"result-{dist.rank}.json").write_text(json.dumps(report, default=str))
    cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
