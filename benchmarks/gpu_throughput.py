"""Device throughput: training images/s (eager vs compiled, fp32 vs bf16) and each sampler's
overhead = wall time / (NFE x one bare batched network forward).

    .venv/bin/python benchmarks/gpu_throughput.py                 # CUDA if present, else CPU
    .venv/bin/python benchmarks/gpu_throughput.py --small         # CPU-sized quick run
    .venv/bin/python benchmarks/gpu_throughput.py --compile       # also torch.compile on CPU

The model is the 28x28 U-Net of the GPU issue (base 32, mults [1, 2, 2], attention at 7,
~1.2 M parameters) on random 28x28 data (throughput does not depend on the pixels). On a GPU the
defaults are batch 256 for training and 1,000 images for sampling; ``--small`` uses batch 32 and
64 images. A sampler's overhead is what it costs beyond the network: 1.00 means the loop, the
noise and the coefficient arithmetic are free. Writes ``benchmarks/results/throughput_<device>.md``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusion_core.denoiser import Denoiser  # noqa: E402
from diffusion_core.distributed import default_device, setup_distributed  # noqa: E402
from diffusion_core.processes import make_process  # noqa: E402
from diffusion_core.samplers import generate  # noqa: E402
from diffusion_core.training import TrainConfig, train  # noqa: E402
from diffusion_core.unet import UNet  # noqa: E402

SAMPLERS = [  # (label, sampler, steps, settings)
    ("DDIM eta 0", "ddim", 50, {"eta": 0.0}),
    ("DDIM eta 0", "ddim", 20, {"eta": 0.0}),
    ("DDPM ancestral", "ddpm", 250, {}),
    ("DPM-Solver++ 2M", "dpmpp_2m", 20, {}),
    ("RK45 ODE", "ode_rk45", 2, {"rtol": 1e-3, "atol": 1e-3}),
]


def unet() -> UNet:
    torch.manual_seed(0)
    return UNet(in_channels=1, image_size=28, base_channels=32, channel_mults=[1, 2, 2],
                num_res_blocks=1, attention_resolutions=[7], num_classes=0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_rate(device: torch.device, batch: int, steps: int, compile_: bool, bf16: bool) -> float:
    """Images/s of ``steps`` training steps after 5 untimed ones."""
    data = torch.rand(max(batch * 4, 1024), 1, 28, 28) * 2 - 1
    stamps: dict[int, float] = {}
    cfg = TrainConfig(steps=steps + 5, batch_size=batch, lr=1e-4, checkpoint_every=0,
                      keep_last=1, log_every=1, seed=0, compile=compile_,
                      mixed_precision="bf16" if bf16 else "no")

    def on_log(step: int, _: dict) -> None:
        sync(device)
        stamps.setdefault(step, time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        train(unet(), make_process("ddpm"), data, None, cfg, checkpoint_dir=Path(tmp),
              config_hash="bench", dist=setup_distributed(), progress=False, on_log=on_log)
    return batch * steps / (stamps[steps + 5] - stamps[5])


def bare_forward_s(net: torch.nn.Module, x: torch.Tensor, repeats: int = 10) -> float:
    t = torch.full((x.shape[0],), 0.5, device=x.device)
    with torch.no_grad():
        net(x, t)
        sync(x.device)
        start = time.perf_counter()
        for _ in range(repeats):
            net(x, t)
        sync(x.device)
    return (time.perf_counter() - start) / repeats


def overheads(device: torch.device, n: int) -> list[tuple[str, int, int, float, float]]:
    net = unet().to(device).eval()
    process = make_process("ddpm")
    denoiser = Denoiser(net, process, "eps")
    forward = bare_forward_s(net, torch.randn(n, 1, 28, 28, device=device))
    rows = []
    for label, sampler, steps, settings in SAMPLERS:
        with torch.no_grad():
            generate(denoiser, process, sampler, shape=(1, 28, 28), seeds=range(2), steps=steps,
                     device=device, **settings)  # warm-up
            sync(device)
            start = time.perf_counter()
            out = generate(denoiser, process, sampler, shape=(1, 28, 28), seeds=range(n),
                           steps=steps, device=device, **settings)
            sync(device)
        wall = time.perf_counter() - start
        rows.append((label, steps, out.nfe, wall, wall / (out.nfe * forward)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="CPU-sized batches")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile on CPU (its compilation takes minutes)")
    args = parser.parse_args()
    device = default_device()
    small = args.small or device.type != "cuda"
    batch, n = (32, 64) if small else (256, 1000)
    steps = args.steps or (10 if small else 100)
    lines = [
        f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor() or 'cpu'}"
        f" ({device.type}), torch {torch.__version__}, threads {torch.get_num_threads()}",
        f"command: {' '.join(['python', *sys.argv])}",
        "",
        f"| training (batch {batch}) | images/s | vs eager fp32 |",
        "|---|---|---|",
    ]
    configs = [("eager fp32", False, False)]
    if device.type == "cuda" or args.compile:
        configs.append(("compiled fp32", True, False))
    if device.type == "cuda":
        configs += [("eager bf16", False, True), ("compiled bf16", True, True)]
    base = None
    for label, compile_, bf16 in configs:
        try:
            rate = train_rate(device, batch, steps, compile_, bf16)
        except Exception as exc:  # noqa: BLE001 - e.g. no C compiler for torch.compile
            lines.append(f"| {label} | failed: {str(exc).splitlines()[0][:60]} | - |")
            continue
        base = base or rate
        lines.append(f"| {label} | {rate:.0f} | {rate / base:.2f} |")
    lines += ["", f"| sampler ({n} images) | steps | NFE | wall s | overhead |", "|---|---|---|---|---|"]
    for label, steps_, nfe, wall, ratio in overheads(device, n):
        lines.append(f"| {label} | {steps_} | {nfe} | {wall:.2f} | {ratio:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = ROOT / "benchmarks" / "results" / f"throughput_{device.type}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
