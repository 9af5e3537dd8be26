"""Does ``torch.compile`` pay for training on the CPU? The MNIST profile's U-Net (issue #13).

    PYTHONPATH=. .venv/bin/python benchmarks/cpu_compile.py [--batch 32] [--steps 30] [--eager-only]

One process, one thread (a rank of the CPU profiles' 2-process DDP, which trains batch 64 as 32
per rank): the U-Net of ``docs/profiles/mnist-uncond-cpu.yaml`` (base 16, mults [1, 2, 2],
attention at 7x7, v prediction, min-SNR loss, cosine schedule) on 28x28 inputs, AdamW steps with
and without ``torch.compile`` (inductor, ``mode="default"``; ``reduce-overhead`` adds CUDA graphs
only), in fp32 and under bf16 autocast. Reports the first step (compilation included) and the
mean of ``--steps`` later steps; ``break-even`` is the number of steps after which the compiled
run has caught up with eager (none when the compiled step is not faster); ``bf16 / fp32`` is the
eager bf16 step's speed against the eager fp32 one (above 1 only on a CPU with native bf16,
which the first line reports: ``mixed_precision: auto`` picks bf16 there only). ``--eager-only``
skips compilation. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from diffusion_core.losses import denoising_loss
from diffusion_core.processes import make_process
from diffusion_core.training import native_bf16
from diffusion_core.unet import UNet


def measure(compiled: bool, bf16: bool, batch: int, steps: int) -> tuple[float, float]:
    torch.manual_seed(0)
    net = UNet(in_channels=1, image_size=28, base_channels=16, channel_mults=[1, 2, 2],
               num_res_blocks=1, attention_resolutions=[7], dropout=0.0, num_classes=0)
    process = make_process("ddpm", num_steps=1000, schedule="cosine")
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    forward = torch.compile(net) if compiled else net
    x0 = torch.rand(batch, 1, 28, 28) * 2 - 1
    g = torch.Generator().manual_seed(0)

    def step() -> None:
        ctx = torch.autocast("cpu", torch.bfloat16) if bf16 else contextlib.nullcontext()
        with ctx:
            loss = denoising_loss(forward, process, x0, None, prediction="v", generator=g,
                                  weighting="min_snr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return first, (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--eager-only", action="store_true", help="no torch.compile columns")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"native bf16 {native_bf16(cpu)}, 1 thread, batch {args.batch}, "
          f"{args.steps} timed steps\n")
    print("| precision | eager ms/step | bf16 / fp32 | compiled ms/step | speed-up "
          "| compile s (first step) | break-even steps |\n|---|---|---|---|---|---|---|")
    fp32_ms = 0.0
    for bf16 in (False, True):
        e_first, eager = measure(False, bf16, args.batch, args.steps)
        fp32_ms = fp32_ms or eager
        ratio = f"{fp32_ms / eager:.2f}x" if bf16 else "-"
        if args.eager_only:
            compiled = "- | - | - | -"
        else:
            c_first, comp = measure(True, bf16, args.batch, args.steps)
            gain = eager - comp
            even = f"{(c_first - e_first) / gain:.0f}" if gain > 0 else "never"
            compiled = f"{comp * 1e3:.1f} | {eager / comp:.2f}x | {c_first:.0f} | {even}"
        print(f"| {'bf16' if bf16 else 'fp32'} | {eager * 1e3:.1f} | {ratio} | {compiled} |",
              flush=True)


if __name__ == "__main__":
    main()
