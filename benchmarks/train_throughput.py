"""Training throughput: images per second with 1 and 2 processes (torchrun + DDP, gloo on CPU).

    .venv/bin/python benchmarks/train_throughput.py [--steps 60] [--params params.yaml]

Each configuration trains the default U-Net of ``params.yaml`` on the bundled digits with the
global batch of ``params.yaml`` for ``--steps`` steps; the first ``--warmup`` steps are not timed.
Scaling efficiency = (images/s with N processes) / (N x images/s with 1 process of 1 thread).
Run it on an otherwise idle machine: timings of processes that share cores are meaningless.
Results: ``benchmarks/results/train_throughput.md``, one section per machine and command line (a
rerun replaces its own section).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import RESULTS, command, machine, write_section

ROOT = Path(__file__).resolve().parents[1]
PAGE = RESULTS / "train_throughput.md"
TITLE = "Training throughput on the CPU: 1 and 2 processes"
INTRO = """Written by `python benchmarks/train_throughput.py`, one section per machine and command
line; a rerun replaces its own section. The default U-Net of `params.yaml` on the bundled digits
with the global batch of `params.yaml`, trained by the library's loop under torchrun (DDP over
gloo for 2 processes); the first `--warmup` steps are not timed. Scaling efficiency = images/s
with N processes / (N x images/s of 1 process with 1 thread)."""


def worker(args: argparse.Namespace) -> None:
    import torch

    from diffusion_core.data import load_dataset
    from diffusion_core.distributed import cleanup, setup_distributed
    from diffusion_core.processes import make_process
    from diffusion_core.training import TrainConfig, train
    from pipeline.config import load_params
    from pipeline.train import build_unet

    params = load_params(Path(args.params))
    dist = setup_distributed()
    x, y = load_dataset(params.data.dataset, params.data.root)
    torch.manual_seed(0)
    net = build_unet(params)
    process = make_process(params.process.name, **params.process.factory_kwargs())
    stamps: dict[int, float] = {}
    cfg = TrainConfig(steps=args.steps, batch_size=params.train.batch_size, lr=1e-4,
                      checkpoint_every=0, keep_last=1, log_every=1, seed=0,
                      p_uncond=params.train.p_uncond if params.model.conditional else 0.0)
    with tempfile.TemporaryDirectory() as tmp:
        train(net, process, x, y, cfg, checkpoint_dir=Path(tmp) / "ckpt", config_hash="bench",
              dist=dist, progress=False, on_log=lambda s, m: stamps.setdefault(s, time.perf_counter()))
    if dist.is_main:
        timed = args.steps - args.warmup
        seconds = stamps[args.steps] - stamps[args.warmup]
        print(json.dumps({"images_per_s": timed * params.train.batch_size / seconds,
                          "step_s": seconds / timed}))
    cleanup()


def run(nproc: int, threads: int, args: argparse.Namespace) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
           f"--nproc-per-node={nproc}", __file__, "--worker", "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--params", args.params]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    line = [x for x in out.stdout.splitlines() if x.startswith("{")][-1]
    return json.loads(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    rows = [("1 process x 1 thread", 1, 1), ("1 process x 2 threads", 1, 2),
            ("2 processes x 1 thread (DDP, gloo)", 2, 1)]
    results = {name: run(n, t, args) for name, n, t in rows}
    base = results[rows[0][0]]["images_per_s"]
    import torch

    from pipeline.config import load_params
    from pipeline.train import build_unet

    params = load_params(Path(args.params))
    size = sum(p.numel() for p in build_unet(params).parameters()) / 1e6
    lines = [f"torch {torch.__version__}; {size:.2f} M parameters, global batch "
             f"{params.train.batch_size}, {args.steps} steps of which the first {args.warmup} "
             "untimed", "",
             "| configuration | images/s | s/step | scaling efficiency vs 1x1 |",
             "|---|---|---|---|"]
    for name, n, _ in rows:
        r = results[name]
        eff = r["images_per_s"] / (n * base)
        lines.append(f"| {name} | {r['images_per_s']:.0f} | {r['step_s']:.3f} | {eff:.2f} |")
    write_section(PAGE, TITLE, INTRO, f"{machine()}: `{command()}`", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
