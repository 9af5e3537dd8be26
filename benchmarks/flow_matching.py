"""Flow matching against the MNIST recipe: the same U-Net and training budget, FID per NFE.

    PYTHONPATH=. .venv/bin/python benchmarks/flow_matching.py --mnist-root DIR \\
        [--steps 1000] [--batch 64] [--n 500] [--nfe 4,8,16,32]

Data: the MNIST test set (``t10k`` idx files in ``--mnist-root``), split per class in halves
(``diffusion_core.evaluation.reference_split`` seeded with ``--seed``): one half trains both
models and the evaluation classifier, the other is the held-out reference R.
Models: two trainings of the same U-Net with ``--steps`` steps of batch ``--batch`` (warm-up
25 %, cosine decay, the rest of the optimiser as the profile): ``ddpm``, the current MNIST
recipe (profile ``mnist-cpu``: cosine schedule with log-SNR shift -2, v prediction, min-SNR
weighting) and ``rf``, rectified flow (profile ``mnist-flow-cpu``: logit-normal times, flow
prediction, no weighting). The two trainings run side by side, one process and one thread each.
Evaluation: ``--n`` class-conditional samples (label ``i % 10``, no guidance) per sampler and
NFE, image ``i`` from seed ``i`` in both models; FID with the classifier's features against R,
a bootstrap interval (:func:`diffusion_core.evaluation.fid_interval`), and the paired difference
rf - ddpm over one joint bootstrap of the seeds and R (``paired_difference``; "better" only
where its interval excludes 0). The real-data floor: ``n`` images of the training half against R.
Samplers: Euler = DDIM (``steps = NFE``), Heun on the probability-flow ODE (``steps = (NFE+1)/2``,
NFE = 2 steps - 1) and DDIM on a uniform-in-t grid (linspace), DPM-Solver++ 2M (``steps = NFE``,
trailing grid, as the mnist-cpu profile), and the DDPM family: ancestral DDPM and
Euler-Maruyama on the reverse SDE (linspace, ``steps = NFE``), on both models.
Writes ``benchmarks/results/flow_matching.md`` (one section per machine and command) and
``flow_matching_<model>_nfe<k>.png`` grids (Euler, one row per class) for the NFE in ``--grids``.
Trained models are kept in ``--work`` (a rerun with the same settings reuses them).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
import yaml
from _results import RESULTS, command, machine, write_section

ROOT = Path(__file__).resolve().parents[1]
PAGE = RESULTS / "flow_matching.md"
TITLE = "Flow matching against the MNIST recipe, at equal training steps"
INTRO = """Written by `python benchmarks/flow_matching.py` (its docstring explains the protocol),
one section per machine and command line; a rerun replaces its own section. Two models of the
same U-Net trained for the same steps on half of the MNIST test set: `ddpm`, the current recipe
(profile `mnist-cpu`: cosine schedule, log-SNR shift -2, v prediction, min-SNR weighting) and
`rf`, rectified flow (profile `mnist-flow-cpu`: logit-normal times, flow prediction). FID with
the evaluation classifier's features against the other half R, 95 % bootstrap intervals, and
the paired difference rf - ddpm (same seeds and labels; one joint bootstrap of seeds and R):
"better" or "worse" only where its interval excludes 0."""

MODELS = {"ddpm": "mnist-cpu", "rf": "mnist-flow-cpu"}
SAMPLERS = {  # name: (sampler, spacing, steps for an NFE budget)
    "euler (ddim)": ("ddim", "linspace", lambda nfe: nfe),
    "heun (ode_heun)": ("ode_heun", "linspace", lambda nfe: (nfe + 1) // 2),
    "dpm-solver++ 2m": ("dpmpp_2m", "trailing", lambda nfe: nfe),
    "ddpm ancestral": ("ddpm", "linspace", lambda nfe: nfe),
    "reverse sde (euler-maruyama)": ("sde", "linspace", lambda nfe: nfe),
}
NFE_OF = {"ode_heun": lambda steps: 2 * steps - 1}


def halves(root: str, seed: int) -> tuple[torch.Tensor, ...]:
    """``(train_x, train_y, ref_x, ref_y)``: the MNIST idx files in ``root`` split per class."""
    from diffusion_core.data import load_dataset
    from diffusion_core.evaluation import reference_split

    x, y = load_dataset("mnist", root)
    ref, train = (torch.from_numpy(i) for i in reference_split(y.numpy(), seed))
    return x[train], y[train], x[ref], y[ref]


def recipe_params(profile: str, args: argparse.Namespace):
    """``params.yaml`` with ``profile``, the budget of ``args`` and one training process."""
    from pipeline.config import validate_params
    from pipeline.profiles import load_profile, merge

    raw = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), load_profile(profile))
    raw["seed"] = args.seed
    raw["data"]["root"] = args.mnist_root
    raw["train"].update(steps=args.steps, batch_size=args.batch, warmup_steps=args.steps // 4,
                        nproc=1, threads_per_proc=1, checkpoint_every=args.steps)
    return validate_params(raw, source=f"profile {profile}")


def train_one(name: str, args: argparse.Namespace) -> dict:
    """Train model ``name`` (one thread) into ``args.work``; its file, wall time and loss."""
    from diffusion_core.processes import make_process
    from diffusion_core.training import train
    from pipeline.config import train_config_hash
    from pipeline.prepare import tensor_digest
    from pipeline.train import build_unet, train_config

    torch.set_num_threads(1)
    params = recipe_params(MODELS[name], args)
    x, y, _, _ = halves(args.mnist_root, args.seed)
    process = make_process(params.process.name, **params.process.factory_kwargs())
    folder = Path(args.work) / name
    start = time.perf_counter()
    result = train(build_unet(params), process, x, y, train_config(params),
                   checkpoint_dir=folder, config_hash=train_config_hash(params, tensor_digest(x, y)),
                   progress=False, model_path=folder / "model.pt")
    wall = time.perf_counter() - start
    return {"model": name, "profile": MODELS[name], "path": str(result.model_path),
            "wall_s": wall, "s_per_step": wall / args.steps, "loss": result.loss,
            "resumed": result.resumed}


def train_both(args: argparse.Namespace) -> list[dict]:
    """Both trainings side by side (spawned processes, one thread each)."""
    with ProcessPoolExecutor(len(MODELS), mp_context=get_context("spawn")) as pool:
        runs = [pool.submit(train_one, name, args) for name in MODELS]
        out = [r.result() for r in runs]
    for r in out:
        print(f"trained {r['model']}: {r['wall_s']:.0f} s ({r['s_per_step']:.3f} s/step"
              f"{', resumed' if r['resumed'] else ''}), last loss {r['loss']:.4f}", flush=True)
    return out


def evaluation_classifier(train_x: torch.Tensor, train_y: torch.Tensor, args: argparse.Namespace):
    """The evaluation feature extractor, trained on the training half as the pipeline does."""
    from diffusion_core.feature_classifier import train_classifier
    from pipeline.config import load_params

    c = load_params(ROOT / "params.yaml").classifier
    return train_classifier(train_x, train_y, epochs=args.classifier_epochs,
                            batch_size=c.batch_size, lr=c.lr, seed=args.seed,
                            device=torch.device("cpu"), feature_dim=c.feature_dim, num_classes=10)


def draw(model, sampler: str, spacing: str, steps: int, n: int) -> torch.Tensor:
    """``n`` uint8 samples: image ``i`` from seed ``i`` and label ``i % 10``, no guidance."""
    from pipeline.sampling import Recipe, sample_images

    recipe = Recipe(sampler, steps=steps, spacing=spacing)
    return sample_images(model, model.denoiser, recipe, seeds=list(range(n)),
                         labels=torch.arange(n) % 10, device=torch.device("cpu"),
                         batch_size=250).images


def save_grid(images: torch.Tensor, name: str, out: Path) -> Path:
    from pipeline.pictures import labelled_grid

    path = out / f"flow_matching_{name}.png"
    labelled_grid(images, torch.arange(images.shape[0]) % 10, name).save(path)
    return path


def score_all(models: dict, clf, ref_f: np.ndarray, args: argparse.Namespace) -> list[dict]:
    """Every sampler at every NFE on both models: FID, interval, paired difference rf - ddpm."""
    from diffusion_core.data import from_uint8
    from diffusion_core.evaluation import (
        ReferenceStatistics,
        compare,
        fid_interval,
        joint_fid_draws,
        joint_plan,
        paired_difference,
    )
    from pipeline.classifier import features

    stats = ReferenceStatistics(ref_f)
    plan = joint_plan(args.n, ref_f.shape[0], args.bootstrap, args.seed + 2)
    rows = []
    for nfe in args.nfe:
        for label, (sampler, spacing, steps_of) in SAMPLERS.items():
            steps = steps_of(nfe)
            row = {"nfe": NFE_OF.get(sampler, lambda s: s)(steps), "sampler": label,
                   "steps": steps, "spacing": spacing}
            draws = {}
            for name, model in models.items():
                start = time.perf_counter()
                images = draw(model, sampler, spacing, steps, args.n)
                if sampler == "ddim" and nfe in args.grids:
                    save_grid(images[:100], f"{name}_nfe{nfe}", args.out)
                f = features(clf, from_uint8(images), 500, torch.device("cpu")).numpy()
                row[name] = fid_interval(f, stats, draws=args.bootstrap, seed=args.seed)
                draws[name] = joint_fid_draws(f, ref_f, plan)
                row[f"{name}_s"] = time.perf_counter() - start
            d = paired_difference(row["rf"].value, row["ddpm"].value, draws["rf"], draws["ddpm"])
            row["diff"], row["verdict"] = d, compare(d)
            print(f"NFE {row['nfe']:3d} {label:30s} ddpm {row['ddpm'].value:7.2f} "
                  f"rf {row['rf'].value:7.2f}  rf-ddpm {d.value:+.2f} [{d.low:+.2f}, {d.high:+.2f}]"
                  f" {row['verdict']}", flush=True)
            rows.append(row)
    return rows


def _fid(e) -> str:
    return f"{e.value:.2f} [{e.low:.2f}, {e.high:.2f}]"


def markdown(rows: list[dict], runs: list[dict], floor, args: argparse.Namespace,
             wall: float) -> str:
    """The section: budget, training, one table per NFE budget, grids."""
    lines = [f"torch {torch.__version__}; budget {args.steps} steps x batch {args.batch} per "
             f"model; n = {args.n} images per point, {args.bootstrap} bootstrap draws; "
             f"classifier {args.classifier_epochs} epochs; total {wall / 60:.1f} min. The heading's "
             "command leaves out `--mnist-root` (the folder of the t10k idx files).", "",
             "| model | profile | training wall | s/step | last loss |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | `{r['profile']}` | {r['wall_s']:.0f} s | {r['s_per_step']:.3f} "
              f"| {r['loss']:.4f} |" for r in runs]
    lines += ["", f"Real-data floor (n = {args.n} training-half images against R): "
              f"{_fid(floor)}.", ""]
    for nfe in args.nfe:
        lines += [f"### NFE about {nfe}", "",
                  "| sampler | steps | NFE | spacing | ddpm FID | rf FID | rf - ddpm | verdict |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in rows:
            if SAMPLERS[row["sampler"]][2](nfe) != row["steps"]:
                continue
            d = row["diff"]
            lines.append(f"| {row['sampler']} | {row['steps']} | {row['nfe']} | {row['spacing']} "
                         f"| {_fid(row['ddpm'])} | {_fid(row['rf'])} | {d.value:+.2f} "
                         f"[{d.low:+.2f}, {d.high:+.2f}] | {row['verdict']} |")
        lines.append("")
    grids = [f"flow_matching_{m}_nfe{k}.png" for k in args.grids for m in MODELS]
    lines.append("Sample grids (Euler, one row per class): "
                 + ", ".join(f"[{g}]({g})" for g in grids) + ".")
    return "\n".join(lines)


def parse() -> argparse.Namespace:
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mnist-root", default=None,
                    help="folder of the MNIST t10k idx files (required)")
    ap.add_argument("--steps", type=int, default=1000, help="training steps per model")
    ap.add_argument("--batch", type=int, default=64, help="training batch size")
    ap.add_argument("--n", type=int, default=500, help="samples per sampler and NFE")
    ap.add_argument("--nfe", type=ints, default=[4, 8, 16, 32])
    ap.add_argument("--grids", type=ints, default=[8, 32], help="NFE of the Euler sample grids")
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--classifier-epochs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads for sampling")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "flow_matching_bench"),
                    help="folder of the trained models (reused by a rerun)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder of the page and grids")
    args = ap.parse_args()
    if not args.mnist_root:
        ap.error("--mnist-root is required: the folder holding t10k-images-idx3-ubyte[.gz] "
                 "and t10k-labels-idx1-ubyte[.gz]")
    return args


def main() -> None:
    args = parse()
    from diffusion_core.evaluation import ReferenceStatistics, floor_fid
    from pipeline.classifier import features
    from pipeline.sampling import load_model

    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    train_x, train_y, ref_x, _ = halves(args.mnist_root, args.seed)
    runs = train_both(args)
    torch.set_num_threads(args.threads)
    clf = evaluation_classifier(train_x, train_y, args)
    cpu = torch.device("cpu")
    ref_f = features(clf, ref_x, 500, cpu).numpy()
    real = features(clf, train_x, 500, cpu).numpy()
    floor = floor_fid(real, ReferenceStatistics(ref_f), args.n, draws=args.bootstrap)
    models = {r["model"]: load_model(cpu, Path(r["path"])) for r in runs}
    rows = score_all(models, clf, ref_f, args)
    text = markdown(rows, runs, floor, args, time.perf_counter() - start)
    heading = f"{machine()}: `{command(drop=('--out', '--work', '--mnist-root'))}`"
    write_section(args.out / PAGE.name, TITLE, INTRO, heading, text)
    print(text)


if __name__ == "__main__":
    main()
    sys.exit(0)
