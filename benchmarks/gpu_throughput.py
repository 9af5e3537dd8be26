"""Device throughput: training images/s (eager vs compiled, fp32 vs bf16, channels_last) and each
sampler's overhead = wall time / (NFE x one bare batched forward of the same network callable).

    python benchmarks/gpu_throughput.py                 # CUDA if present, else CPU
    python benchmarks/gpu_throughput.py --small         # CPU-sized quick run
    python benchmarks/gpu_throughput.py --compile       # also torch.compile on CPU
    python benchmarks/gpu_throughput.py --out DIR       # a copy of the page in DIR too

The model is the 28x28 U-Net of the GPU benchmark (base 32, mults [1, 2, 2], attention at 7,
~1.2 M parameters) on random 28x28 data (throughput does not depend on the pixels). On a GPU the
defaults are batch 256 for training and 1,000 images for sampling; ``--small`` uses batch 32 and
64 images. A sampler's overhead is what it costs beyond the network: 1.00 means the loop, the
noise and the coefficient arithmetic are free. Results: ``benchmarks/results/gpu_throughput.md``,
one section per device and command line (a rerun replaces its own section).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _results import RESULTS, command, machine, write_section  # noqa: E402

from diffusion_core.cuda_graphs import CUDAGraphNet  # noqa: E402
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


MODELS = {  # name: (U-Net keyword arguments, image shape)
    # a 28x28 MNIST-sized model: ~1.2 M parameters
    "mnist": (dict(in_channels=1, image_size=28, base_channels=32, channel_mults=[1, 2, 2],
                   num_res_blocks=1, attention_resolutions=[7]), (1, 28, 28)),
    # the DDPM paper's CIFAR-10 model (Ho et al. 2020): ~35.7 M parameters
    "cifar": (dict(in_channels=3, image_size=32, base_channels=128, channel_mults=[1, 2, 2, 2],
                   num_res_blocks=2, attention_resolutions=[16], dropout=0.1), (3, 32, 32)),
}


def unet(model: str = "mnist") -> UNet:
    torch.manual_seed(0)
    return UNet(**MODELS[model][0], num_classes=0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


WARMUP_STEPS = 10  # untimed (torch.compile compiles here)


def train_rate(device: torch.device, batch: int, steps: int, compile_: bool, bf16: bool,
               channels_last: bool = False, mode: str = "default", model: str = "mnist"
               ) -> tuple[float, float]:
    """(images/s, mean loss) of ``steps`` training steps after ``WARMUP_STEPS`` untimed ones.

    ``log_every = WARMUP_STEPS`` (a divisor of ``steps``), so the loop reads its losses back as
    rarely as the pipeline's would; the clock is read after a synchronisation at those logs."""
    data = torch.rand(max(batch * 4, 1024), *MODELS[model][1]) * 2 - 1
    stamps: dict[int, float] = {}
    losses: list[float] = []
    cfg = TrainConfig(steps=steps + WARMUP_STEPS, batch_size=batch, lr=1e-4, checkpoint_every=0,
                      keep_last=1, log_every=WARMUP_STEPS, seed=0, compile=compile_,
                      compile_mode=mode, channels_last=channels_last,
                      mixed_precision="bf16" if bf16 else "fp32")

    def on_log(step: int, logs: dict) -> None:
        sync(device)
        stamps.setdefault(step, time.perf_counter())
        if step > WARMUP_STEPS:
            losses.append(logs["loss"])

    with tempfile.TemporaryDirectory() as tmp:
        train(unet(model), make_process("ddpm"), data, None, cfg, checkpoint_dir=Path(tmp),
              config_hash="bench", dist=setup_distributed(), progress=False, on_log=on_log)
    rate = batch * steps / (stamps[steps + WARMUP_STEPS] - stamps[WARMUP_STEPS])
    return rate, sum(losses) / len(losses)


def bare_forward_s(net: torch.nn.Module, x: torch.Tensor, repeats: int = 10) -> float:
    t = torch.full((x.shape[0],), 0.5, device=x.device)
    with torch.no_grad():
        for _ in range(2):
            net(x, t)
        sync(x.device)
        start = time.perf_counter()
        for _ in range(repeats):
            net(x, t)
        sync(x.device)
    return (time.perf_counter() - start) / repeats


def overheads(device: torch.device, n: int, graphs: bool = False
              ) -> list[tuple[str, int, int, float, float]]:
    """Per sampler: (label, steps, NFE, wall s, overhead). With ``graphs`` the network is a
    :class:`CUDAGraphNet` and its bare forward is a graph replay too (same callable)."""
    net: torch.nn.Module = unet().to(device).eval()
    if graphs:
        net = CUDAGraphNet(net)
    process = make_process("ddpm")
    denoiser = Denoiser(net, process, "eps")
    forward = bare_forward_s(net, torch.randn(n, 1, 28, 28, device=device))
    rows = []
    for label, sampler, steps, settings in SAMPLERS:
        with torch.no_grad():
            generate(denoiser, process, sampler, shape=(1, 28, 28), seeds=range(n), steps=2,
                     device=device, **settings)  # warm-up (and graph capture) at this batch
            sync(device)
            start = time.perf_counter()
            out = generate(denoiser, process, sampler, shape=(1, 28, 28), seeds=range(n),
                           steps=steps, device=device, **settings)
            sync(device)
        wall = time.perf_counter() - start
        rows.append((label, steps, out.nfe, wall, wall / (out.nfe * forward)))
    return rows


PAGE = "gpu_throughput.md"
TITLE = "Device throughput"
INTRO = """Written by `python benchmarks/gpu_throughput.py` (its docstring explains the options), one
section per device and command line; a rerun replaces its own section. Training: images/s of the
library's training loop on random data after 10 untimed steps, against the first configuration
of the run (eager fp32), with the mean loss of the timed steps. Samplers: wall time of
`diffusion_core.samplers.generate` and its overhead, wall time / (NFE x one bare batched forward
of the same network callable); "CUDA graph" replays the network with
`diffusion_core.cuda_graphs.CUDAGraphNet`. With `--diffusers`: our DPM-Solver++ 2M and UniPC
against diffusers' scheduler loop on the same network, noise and time grid."""

TRAIN_CONFIGS = [  # (label, compile, compile mode, bf16, channels_last); CUDA runs them all
    ("eager fp32", False, "default", False, False),
    ("eager bf16", False, "default", True, False),
    ("eager bf16 channels_last", False, "default", True, True),
    ("compiled fp32", True, "default", False, False),
    ("compiled bf16", True, "default", True, False),
    ("compiled bf16 channels_last", True, "default", True, True),
    ("compiled fp32 reduce-overhead", True, "reduce-overhead", False, False),
    ("compiled bf16 reduce-overhead", True, "reduce-overhead", True, False),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="CPU-sized batches")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile on CPU (its compilation takes minutes)")
    parser.add_argument("--skip-train", action="store_true", help="only the samplers")
    parser.add_argument("--skip-samplers", action="store_true", help="only training")
    parser.add_argument("--model", choices=sorted(MODELS), default="mnist",
                        help="the network to train (samplers always use mnist)")
    parser.add_argument("--configs", default=None,
                        help="comma-separated training configurations to run (default: all)")
    parser.add_argument("--batch", type=int, default=None, help="training batch size")
    parser.add_argument("--diffusers", action="store_true",
                        help="also time DPM-Solver++/UniPC against diffusers' scheduler loop")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"also write the page ({PAGE}) into this folder")
    args = parser.parse_args()
    device = default_device()
    small = args.small or device.type != "cuda"
    batch, n = (32, 64) if small else (256, 1000)
    batch = args.batch or batch
    steps = args.steps or (10 if small else 200)
    steps = max(WARMUP_STEPS, steps // WARMUP_STEPS * WARMUP_STEPS)
    lines = [
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, TF32 matmul "
        f"{torch.backends.cuda.matmul.allow_tf32 if device.type == 'cuda' else '-'}",
        "",
    ]
    heading = f"{machine(device)}: `{command()}`"
    pages = [RESULTS / PAGE] + ([args.out / PAGE] if args.out is not None else [])

    def flush() -> None:  # write what is measured so far (a killed run keeps its rows)
        for path in pages:
            write_section(path, TITLE, INTRO, heading, "\n".join(lines))

    if not args.skip_train:
        lines += [f"| training, {args.model} model (batch {batch}, {steps} timed steps) | images/s "
                  "| vs eager fp32 "
                  "| mean loss |", "|---|---|---|---|"]
        configs = [c for c in TRAIN_CONFIGS
                   if device.type == "cuda" or (not c[3] and not c[4]
                                                 and (not c[1] or args.compile)
                                                 and c[2] == "default")]
        if args.configs:
            wanted = [c.strip() for c in args.configs.split(",")]
            unknown = set(wanted) - {c[0] for c in TRAIN_CONFIGS}
            if unknown:
                parser.error(f"unknown configurations {sorted(unknown)}")
            configs = [c for c in configs if c[0] in wanted]
        base = None
        for label, compile_, mode, bf16, channels_last in configs:
            try:
                rate, loss = train_rate(device, batch, steps, compile_, bf16, channels_last, mode,
                                        args.model)
            except Exception as exc:  # noqa: BLE001 - e.g. no C compiler for torch.compile
                lines.append(f"| {label} | failed: {str(exc).splitlines()[0][:60]} | - | - |")
                flush()
                continue
            base = base or rate
            lines.append(f"| {label} | {rate:.0f} | {rate / base:.2f} | {loss:.4f} |")
            print(lines[-1], flush=True)
            flush()
        lines.append("")
    variants = [("eager", False)] + ([("CUDA graph", True)] if device.type == "cuda" else [])
    if args.skip_samplers:
        variants = []
    if variants:
        lines += [f"| sampler ({n} images) | network | steps | NFE | wall s | overhead |",
                  "|---|---|---|---|---|---|"]
    for net_label, graphs in variants:
        for label, steps_, nfe, wall, ratio in overheads(device, n, graphs):
            lines.append(f"| {label} | {net_label} | {steps_} | {nfe} | {wall:.2f} | {ratio:.2f} |")
            print(lines[-1], flush=True)
            flush()
    if args.diffusers:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from fast_samplers import compare_with_diffusers

        torch.manual_seed(0)
        net = unet().to(device).eval()
        x_T = torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(0)).to(device)
        rows = compare_with_diffusers(net, x_T, None, [10, 20], 5, lambda: sync(device))
        keys = ["sampler", "nfe", "batch", "forward_ms", "ours_s", "diffusers_s",
                "ours_overhead", "diffusers_overhead", "ours_vs_diffusers", "max_abs_diff"]
        lines += ["", "Ours vs diffusers' scheduler loop on the same network and noise:", "",
                  "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
        flush()
    flush()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
