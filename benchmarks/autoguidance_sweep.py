"""Autoguidance on MNIST: which snapshot of the same run guides best, at which weight (issue #13).

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python benchmarks/autoguidance_sweep.py \
        --root /work/shared/data/mnist --train-seed 0 --steps 6125 \
        --combos "ddim50,0,0;ddim50,3060,1;unipc20_trailing,3060,1"

Trains the ``ours`` recipe of ``benchmarks/mnist_recipe.py`` for a fixed number of steps (6,125 is
what its 16-CPU-minute calibration gave) with a checkpoint every ``steps // 8`` steps, all kept:
each checkpoint's EMA weights are a candidate guide, free of extra training (``train.guide_at``
keeps one such snapshot in the pipeline). Then samples ``--n`` images per combo
``METHOD,GUIDE_STEP,W`` (``METHODS`` of mnist_recipe; ``W = 0``: no guidance) with
:class:`~diffusion_core.guidance.AutoGuidance` (Karras et al. 2024) and scores them as
mnist_recipe does (its evaluation classifier and split of ``--seed``, FID with a 95 % bootstrap
interval, ``conf`` = share of samples classified with probability >= 0.9). Training and every
combo are kept under ``--cache``/autoguidance/seed<S>; a call does only what is missing and
prints the table of everything kept. The same seeds for every combo, so the combos of one run
differ only by the guidance (a paired comparison); different ``--train-seed`` runs show the
run-to-run spread.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mnist_recipe as mr  # noqa: E402

from diffusion_core.atomic import write_bytes  # noqa: E402
from diffusion_core.checkpoint import checkpoint_name, load_checkpoint  # noqa: E402
from diffusion_core.data import from_uint8, to_uint8  # noqa: E402
from diffusion_core.denoiser import Denoiser  # noqa: E402
from diffusion_core.evaluation import ReferenceStatistics, fid_interval  # noqa: E402
from diffusion_core.guidance import AutoGuidance  # noqa: E402
from diffusion_core.processes import make_process  # noqa: E402
from diffusion_core.samplers import generate  # noqa: E402
from diffusion_core.training import train  # noqa: E402
from diffusion_core.unet import UNet  # noqa: E402
from pipeline.classifier import features  # noqa: E402


def train_with_snapshots(folder: Path, data: dict, train_seed: int, steps: int) -> dict:
    """The ``ours`` recipe for ``steps`` steps, every eighth checkpoint kept; its model file."""
    model = folder / "ck" / "model.pt"
    if not model.is_file():
        spec = mr.recipe_spec("ours", [])
        net, process = mr.build(spec, False, train_seed)
        cfg = dataclasses.replace(mr.train_config(spec, steps, False, train_seed),
                                  checkpoint_every=steps // 8, keep_last=16, log_every=500)
        start = time.process_time()
        train(net, process, data["train_x"], None, cfg, checkpoint_dir=folder / "ck",
              config_hash="autoguidance-sweep", progress=False,
              on_log=lambda s, d: print(f"  step {s}: loss {d['loss']:.4f}", flush=True))
        print(f"trained {steps} steps in {time.process_time() - start:.0f} CPU s", flush=True)
    return load_checkpoint(model, map_location="cpu")


def score(folder: Path, m: dict, combo: str, clf, reference, n: int) -> dict:
    method, guide_step, w = combo.split(",")
    config, process = m["model_config"], make_process(**m["process"])

    def denoiser(state: dict) -> Denoiser:
        net = UNet(**config)
        net.load_state_dict(state)
        return Denoiser(net.eval(), process, m["prediction"])

    den = denoiser(m["ema"])
    if float(w) > 0:
        guide = load_checkpoint(folder / "ck" / checkpoint_name(int(guide_step)), map_location="cpu")
        den = AutoGuidance(den, denoiser(guide["ema"]), float(w))
    kw = dict(mr.METHODS[method])
    sampler = kw.pop("sampler")
    start = time.process_time()
    with torch.no_grad():
        out = generate(den, process, sampler, shape=(1, 28, 28), seeds=list(range(n)), **kw)
    images = from_uint8(to_uint8(out.x))
    f = features(clf, images, 500, torch.device("cpu")).numpy()
    fid = fid_interval(f, reference, draws=200, seed=0)
    from pipeline.pictures import png_bytes, tile

    write_bytes(folder / f"{method}-g{guide_step}-w{w}.png",
                png_bytes(tile(to_uint8(out.x)[:100], 10, 10, min_pixels=28)))
    return {"method": method, "guide_step": int(guide_step), "w": float(w),
            "fid": round(fid.value, 1), "lo": round(fid.low, 1), "hi": round(fid.high, 1),
            **mr.class_stats(clf, images, None), "sample_cpu_s": round(time.process_time() - start)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="/work/shared/data/mnist")
    ap.add_argument("--train-seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=6125)
    ap.add_argument("--combos", default="ddim50,0,0",
                    help="METHOD,GUIDE_STEP,W;... (GUIDE_STEP: a multiple of steps // 8)")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--cache", type=Path, default=mr.CACHE)
    args = ap.parse_args()
    torch.set_num_threads(1)
    setup = types.SimpleNamespace(root=args.root, test_fraction=0.5, seed=0, cache=args.cache,
                                  n=args.n, bootstrap=200)
    data = mr.load_data(setup)
    clf, sets = mr.evaluation_classifier(data, setup)
    reference = ReferenceStatistics(sets["reference"])
    folder = args.cache / "autoguidance" / f"seed{args.train_seed}-{args.steps}"
    folder.mkdir(parents=True, exist_ok=True)
    m = train_with_snapshots(folder, data, args.train_seed, args.steps)
    kept = folder / "results.json"
    results = json.loads(kept.read_text()) if kept.is_file() else {}
    for combo in args.combos.split(";"):
        key = f"{combo}@n{args.n}"
        if key not in results:
            results[key] = score(folder, m, combo, clf, reference, args.n)
            print(key, results[key], flush=True)
            write_bytes(kept, json.dumps(results, indent=1).encode())
    print(f"\ntraining seed {args.train_seed}, {args.steps} steps, n = {args.n}\n")
    print("| method | guide step | w | FID [95 %] | conf |\n|---|---|---|---|---|")
    for r in sorted(results.values(), key=lambda r: (r["method"], r["guide_step"], r["w"])):
        print(f"| {r['method']} | {r['guide_step'] if r['w'] else '-'} | {r['w']:g} | "
              f"{r['fid']:.1f} [{r['lo']:.1f}, {r['hi']:.1f}] | {r['conf']:.3f} |")


if __name__ == "__main__":
    main()
