"""MNIST training recipes at small CPU budgets: sample quality per CPU-minute (issue #13).

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mnist_recipe.py \
        --root /work/shared/data/mnist --recipes ho2020,ours --minutes 1,2,4,8

Data: the pipeline's own split (``diffusion_core.data.train_test_split``, ``--test-fraction``
0.5 and ``--seed`` 0): on the 10,000 t10k images, 5,000 train and 5,000 held out. Scoring is the
pipeline's (``diffusion_core.evaluation``): the held-out split's reference half R and floor half F
(``reference_split``), FID with the features of the evaluation classifier (the pipeline's
``FeatureClassifier`` with the ``classifier`` defaults of ``params.yaml``, trained once on the
train split and cached), pivotal bootstrap intervals (``fid_interval``) and the real-data floor
at matched n (``floor_fid``). Samples are stored as uint8 and scored from that, as the pipeline.

Budget: ``--minutes M`` is M CPU-minutes of training in this one process (``time.process_time``,
so other load on the machine does not change it; run it with ``--threads 1``). The number of
optimiser steps is fixed before training from a timed calibration of a few steps of the same
network (its own CPU time is not counted), so the learning-rate warm-up and the EMA know the
run's length; the table reports the steps and the CPU seconds training really took.

Variants: ``--set section.key=value`` changes a recipe field (``--tag`` names the rows);
``--set self_condition=0.5`` trains and samples with self-conditioning
(``benchmarks/self_conditioning.py``, an experiment not in the library yet); ``--train-seed S``
re-seeds only the network's initialisation and training, to see the seed-to-seed spread.

Each (recipe, budget) is trained once; its row (``--cache``/rows), EMA weights
(``--cache``/models) and grid are kept, so the
table can be built over several invocations (``--table-only`` rebuilds it from the kept rows).
Writes ``benchmarks/results/mnist_recipe.md`` and one PNG of 100-image grids per row
(``mnist_recipe_<recipe>_<M>min.png``, a column per sampling method).

Columns: FID [95 % interval] per method (``n`` images, same seeds for every method), the floor
(``n`` real images of F), ``conf``: the share of samples the classifier labels with
probability >= 0.9 (real images: see the floor row), ``classes``: how many classes hold at least
2 % of the samples; with ``--guidance`` (class-conditional), ``acc``: the share of samples the
classifier puts in the class they were asked for.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.self_conditioning import SelfConditioned  # noqa: E402
from diffusion_core.atomic import write_bytes  # noqa: E402
from diffusion_core.checkpoint import load_checkpoint, save_atomic  # noqa: E402
from diffusion_core.data import from_uint8, load_dataset, to_uint8, train_test_split  # noqa: E402
from diffusion_core.denoiser import Denoiser  # noqa: E402
from diffusion_core.evaluation import (  # noqa: E402
    ReferenceStatistics,
    fid_interval,
    floor_fid,
    reference_split,
)
from diffusion_core.guidance import ClassifierFreeGuidance  # noqa: E402
from diffusion_core.losses import denoising_loss  # noqa: E402
from diffusion_core.metrics import FeatureClassifier, train_classifier  # noqa: E402
from diffusion_core.processes import make_process  # noqa: E402
from diffusion_core.samplers import generate  # noqa: E402
from diffusion_core.training import TrainConfig, train  # noqa: E402
from diffusion_core.unet import UNet  # noqa: E402
from pipeline.classifier import features  # noqa: E402

OUT = ROOT / "benchmarks" / "results"
CACHE = ROOT / "runs" / "mnist_recipe"

#: the U-Net of issue #13 (28x28): base 32, mults (1, 2, 2), attention at 7x7
MODEL = {"base_channels": 32, "channel_mults": [1, 2, 2], "num_res_blocks": 1,
         "attention_resolutions": [7], "dropout": 0.0}
#: today's pipeline training settings (params.yaml), at batch 64 as in the issue
BASE_TRAIN = {"batch_size": 64, "lr": 2e-3, "weight_decay": 0.0, "grad_clip": 1.0,
              "ema_decay": 0.999, "ema_warmup": True, "prediction": "eps"}

#: name -> {"model", "process", "train", "warmup_frac"}; train keys are TrainConfig fields
RECIPES: dict[str, dict[str, Any]] = {
    # Ho et al. 2020: eps prediction, linear betas, uniform t, unweighted loss, EMA 0.9999
    # (with the library's warm-up: without one, a few hundred steps would leave the average at
    # the random initial weights), fp32, constant lr, on the issue's U-Net (base 32, 1.19M).
    "ho2020": {"model": {}, "process": {"schedule": "linear"},
               "train": {"ema_decay": 0.9999}, "warmup_frac": 0.25},
    # the issue's recipe as the pipeline runs it today (EMA 0.999 with warm-up)
    "current": {"model": {}, "process": {"schedule": "linear"}, "train": {},
                "warmup_frac": 0.25},
    # chosen by 2-CPU-minute runs (mnist_recipe_explore.md): v prediction (no noise-only DDIM
    # samples), the cosine schedule and min-SNR weighting; the power EMA with std 0.1 is about
    # what the warm-up EMA gives at these lengths (a profile ~ k^8), but does not depend on them.
    # Then by 4-CPU-minute runs (mnist_recipe_explore_cpu.md): a 4x cheaper U-Net (base 16:
    # 0.30M parameters against 1.19M), bf16 autocast (1.5x steps/s) and a cosine lr decay;
    # at these budgets the number of steps counts more than the width
    "ours": {"model": {"base_channels": 16},
             "process": {"schedule": "cosine"},
             "train": {"prediction": "v", "loss_weighting": "min_snr", "ema_std": 0.1,
                       "mixed_precision": "bf16", "lr_decay": "cosine"},
             "warmup_frac": 0.25},
}

METHODS: dict[str, dict[str, Any]] = {  # name -> generate() arguments
    "ddpm1000": {"sampler": "ddpm", "steps": 1000},
    "ddpm250": {"sampler": "ddpm", "steps": 250},
    "ddpm100": {"sampler": "ddpm", "steps": 100},
    "ddim50": {"sampler": "ddim", "steps": 50},
    "dpmpp10": {"sampler": "dpmpp_2m", "steps": 10, "spacing": "logsnr"},
    "dpmpp20": {"sampler": "dpmpp_2m", "steps": 20, "spacing": "logsnr"},
    "heun50": {"sampler": "ode_heun", "steps": 50},
    # other time grids, x0 clipping and solvers on the same weights (``--from-model``)
    "ddim50_clip": {"sampler": "ddim", "steps": 50, "clip_x0": True},
    "ddim50_trailing": {"sampler": "ddim", "steps": 50, "spacing": "trailing"},
    "ddim50_logsnr": {"sampler": "ddim", "steps": 50, "spacing": "logsnr"},
    "ddim50_karras": {"sampler": "ddim", "steps": 50, "spacing": "karras"},
    "ddim50_quadratic": {"sampler": "ddim", "steps": 50, "spacing": "quadratic"},
    "ddpm20": {"sampler": "ddpm", "steps": 20},
    "dpmpp10_trailing": {"sampler": "dpmpp_2m", "steps": 10, "spacing": "trailing"},
    "dpmpp10_linspace": {"sampler": "dpmpp_2m", "steps": 10, "spacing": "linspace"},
    "dpmpp10_karras": {"sampler": "dpmpp_2m", "steps": 10, "spacing": "karras"},
    "dpmpp20_clip": {"sampler": "dpmpp_2m", "steps": 20, "spacing": "logsnr", "clip_x0": True},
    "dpmpp20_trailing": {"sampler": "dpmpp_2m", "steps": 20, "spacing": "trailing"},
    "dpmpp20_linspace": {"sampler": "dpmpp_2m", "steps": 20, "spacing": "linspace"},
    "dpmpp20_karras": {"sampler": "dpmpp_2m", "steps": 20, "spacing": "karras"},
    "dpmpp3m10_trailing": {"sampler": "dpmpp_3m", "steps": 10, "spacing": "trailing"},
    "dpmpp3m20": {"sampler": "dpmpp_3m", "steps": 20, "spacing": "logsnr"},
    "dpmpp3m20_trailing": {"sampler": "dpmpp_3m", "steps": 20, "spacing": "trailing"},
    "dpmpp_sde20": {"sampler": "dpmpp_2m_sde", "steps": 20, "spacing": "logsnr"},
    "dpmpp_sde20_trailing": {"sampler": "dpmpp_2m_sde", "steps": 20, "spacing": "trailing"},
    "unipc10": {"sampler": "unipc", "steps": 10, "spacing": "logsnr"},
    "unipc10_trailing": {"sampler": "unipc", "steps": 10, "spacing": "trailing"},
    "unipc20": {"sampler": "unipc", "steps": 20, "spacing": "logsnr"},
    "unipc20_trailing": {"sampler": "unipc", "steps": 20, "spacing": "trailing"},
    "unipc10_trailing_o3": {"sampler": "unipc", "steps": 10, "spacing": "trailing", "order": 3},
    "unipc20_trailing_o3": {"sampler": "unipc", "steps": 20, "spacing": "trailing", "order": 3},
    "edm10": {"sampler": "edm_heun", "steps": 10, "spacing": "karras"},
    "edm10_churn40": {"sampler": "edm_heun", "steps": 10, "spacing": "karras", "s_churn": 40.0},
}


# ------------------------------------------------------------------------------- set-up
def parse_value(text: str) -> Any:
    """A ``--set`` value: JSON when it parses (numbers, lists, null, true), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def recipe_spec(name: str, overrides: list[str]) -> dict[str, Any]:
    """The recipe ``name`` with ``section.key=value`` overrides applied."""
    spec = json.loads(json.dumps(RECIPES[name]))
    for item in overrides:
        key, _, value = item.partition("=")
        section, _, field = key.partition(".")
        if section not in ("model", "process", "train") or not field:
            if key in ("warmup_frac", "self_condition"):
                spec[key] = float(value)
                continue
            raise SystemExit(f"--set {item!r}: use model.KEY=V, process.KEY=V, train.KEY=V, "
                             "warmup_frac=F or self_condition=P")
        spec[section][field] = parse_value(value)
    return spec


def load_data(args) -> dict[str, torch.Tensor]:
    images, labels = load_dataset("mnist", root=args.root)
    train_x, train_y, test_x, test_y = train_test_split(images, labels, args.test_fraction,
                                                        args.seed)
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}


def evaluation_classifier(data: dict, args) -> tuple[FeatureClassifier, dict[str, np.ndarray]]:
    """The cached classifier and the held-out features (R and F halves), trained if absent."""
    path = args.cache / f"classifier-seed{args.seed}-tf{args.test_fraction}.pt"
    if path.is_file():
        obj = load_checkpoint(path, map_location="cpu")
    else:
        start = time.process_time()
        clf = train_classifier(data["train_x"], data["train_y"], epochs=30, batch_size=128,
                               lr=2e-3, seed=args.seed, device="cpu", feature_dim=64,
                               num_classes=10)
        test_f = features(clf, data["test_x"], 500, torch.device("cpu"))
        ref, floor = reference_split(data["test_y"].numpy(), args.seed)
        with torch.no_grad():
            acc = float((clf(data["test_x"]).argmax(1) == data["test_y"]).float().mean())
        obj = {"config": clf.config, "state_dict": clf.state_dict(), "test_features": test_f,
               "reference_index": torch.from_numpy(ref), "floor_index": torch.from_numpy(floor),
               "test_accuracy": acc}
        save_atomic(obj, path)
        print(f"classifier: test accuracy {acc:.4f}, {time.process_time() - start:.0f} CPU s",
              flush=True)
    clf = FeatureClassifier(**obj["config"])
    clf.load_state_dict(obj["state_dict"])
    test_f = obj["test_features"].numpy()
    sets = {"reference": test_f[obj["reference_index"].numpy()],
            "floor": test_f[obj["floor_index"].numpy()],
            "floor_labels": data["test_y"][obj["floor_index"]].numpy(),
            "floor_images": data["test_x"][obj["floor_index"]]}
    return clf.eval(), sets


# ------------------------------------------------------------------------------- training
def build(spec: dict, conditional: bool, seed: int):
    """The recipe's network and process; ``spec["self_condition"] = p > 0`` wraps a two-channel
    U-Net in :class:`SelfConditioned` (self-conditioning on a share p of each batch)."""
    p = float(spec.get("self_condition", 0.0))
    if p > 0 and conditional:  # guidance calls the network twice per step: one state each
        raise SystemExit("self_condition: unconditional rows only (the wrapper keeps one x0 "
                         "estimate per trajectory, which guidance would mix)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = UNet(in_channels=2 if p > 0 else 1, image_size=28,
                   num_classes=10 if conditional else 0, **{**MODEL, **spec["model"]})
    process = make_process("ddpm", **{"num_steps": 1000, **spec["process"]})
    if p > 0:
        net = SelfConditioned(net, process, spec["train"].get("prediction", "eps"), p)
    return net, process


def train_config(spec: dict, steps: int, conditional: bool, seed: int) -> TrainConfig:
    fields = {"mixed_precision": "fp32", **BASE_TRAIN, **spec["train"]}
    warmup = int(round(spec.get("warmup_frac", 0.25) * steps))
    return TrainConfig(steps=steps, warmup_steps=warmup, p_uncond=0.2 if conditional else 0.0,
                       checkpoint_every=0, keep_last=1,
                       log_every=max(1, steps), seed=seed, **fields)


def cpu_seconds_per_step(spec: dict, data: dict, conditional: bool, seed: int,
                         steps: int = 4) -> float:
    """CPU seconds of one training step of this recipe (after one warm-up step)."""
    net, process = build(spec, conditional, seed)
    cfg = train_config(spec, 10, conditional, seed)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(seed)
    x0 = data["train_x"][: cfg.batch_size]
    y = data["train_y"][: cfg.batch_size] if conditional else None
    start = 0.0
    for k in range(steps + 1):
        if k == 1:
            start = time.process_time()
        with torch.autocast("cpu", torch.bfloat16, enabled=cfg.mixed_precision == "bf16"):
            loss = denoising_loss(net, process, x0, y, prediction=cfg.prediction, generator=g,
                                  weighting=cfg.loss_weighting, t_sampling=cfg.t_sampling)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.process_time() - start) / steps


def train_recipe(spec: dict, minutes: float, data: dict, args) -> tuple[UNet, Any, dict]:
    seed = args.seed if args.train_seed is None else args.train_seed
    per_step = cpu_seconds_per_step(spec, data, args.conditional, seed)
    steps = max(1, int(minutes * 60.0 / per_step))
    net, process = build(spec, args.conditional, seed)
    cfg = train_config(spec, steps, args.conditional, seed)
    labels = data["train_y"] if args.conditional else None
    with tempfile.TemporaryDirectory() as tmp:
        start = time.process_time()
        result = train(net, process, data["train_x"], labels, cfg, checkpoint_dir=tmp,
                       config_hash="mnist-recipe", progress=False)
        cpu = time.process_time() - start
        m = load_checkpoint(Path(tmp) / "model.pt", map_location="cpu")
    net.load_state_dict(m["ema"])
    info = {"steps": steps, "train_cpu_s": round(cpu, 1), "cpu_s_per_step": round(per_step, 4),
            "final_loss": round(result.loss, 5), "train_config": asdict(cfg)}
    print(f"  trained {steps} steps in {cpu:.0f} CPU s ({per_step:.3f} s/step calibrated), "
          f"loss {result.loss:.4f}", flush=True)
    return net.eval(), process, info


# ------------------------------------------------------------------------------- scoring
def class_stats(clf: FeatureClassifier, images: torch.Tensor,
                labels: torch.Tensor | None) -> dict[str, float]:
    with torch.no_grad():
        probs = torch.cat([clf(images[i:i + 500]).softmax(1) for i in range(0, len(images), 500)])
    top, pred = probs.max(1)
    counts = torch.bincount(pred, minlength=10).double() / len(pred)
    out = {"conf": float((top >= 0.9).double().mean()),
           "classes": int((counts >= 0.02).sum())}
    if labels is not None:
        out["acc"] = float((pred == labels).double().mean())
    return out


def sample_and_score(net: UNet, process, prediction: str, clf, sets, args) -> tuple[dict, dict]:
    base = Denoiser(net, process, prediction)
    labels = torch.arange(args.n) % 10 if args.conditional else None
    runs = [(name, base) for name in args.methods]
    if args.conditional:  # one column per (method, guidance weight), same seeds
        runs = [(f"{name}-w{w:g}", ClassifierFreeGuidance(base, w))
                for w in args.guidance for name in args.methods]
    reference = ReferenceStatistics(sets["reference"])
    rows, grids = {}, {}
    for name, den in runs:
        kw = dict(METHODS[name.split("-w")[0]])
        sampler = kw.pop("sampler")
        start = time.process_time()
        with torch.no_grad():
            out = generate(den, process, sampler, shape=(1, 28, 28), seeds=list(range(args.n)),
                           labels=labels, **kw)
        cpu = time.process_time() - start
        stored = to_uint8(out.x)
        images = from_uint8(stored)
        f = features(clf, images, 500, torch.device("cpu")).numpy()
        fid = fid_interval(f, reference, draws=args.bootstrap, seed=args.seed)
        rows[name] = {"fid": round(fid.value, 2), "lo": round(fid.low, 2),
                      "hi": round(fid.high, 2), "nfe": out.nfe, "sample_cpu_s": round(cpu, 1),
                      **class_stats(clf, images, labels)}
        grids[name] = stored[:100]
        print(f"  {name:9s} FID {fid.value:8.2f} [{fid.low:.2f}, {fid.high:.2f}]  "
              f"{rows[name]}  ({cpu:.0f} CPU s)", flush=True)
    return rows, grids


def floor_row(clf, sets, args) -> dict[str, Any]:
    reference = ReferenceStatistics(sets["reference"])
    m = min(args.n, sets["floor"].shape[0])
    fl = floor_fid(sets["floor"], reference, m, draws=args.bootstrap, seed=args.seed + 1)
    stats = class_stats(clf, sets["floor_images"][:m],
                        torch.from_numpy(sets["floor_labels"][:m]))
    return {"fid": round(fl.value, 2), "lo": round(fl.low, 2), "hi": round(fl.high, 2),
            "n": m, **stats}


def save_grid(grids: dict[str, torch.Tensor], title: str, path: Path) -> None:
    from pipeline.pictures import annotate, png_bytes, tile

    names = list(grids)
    cells = [tile(grids[k], 10, 10, min_pixels=28) for k in names]
    from PIL import Image

    gap = 12
    w = sum(c.width for c in cells) + gap * (len(cells) - 1)
    canvas = Image.new("L", (w, cells[0].height), color=255)
    x = 0
    for c in cells:
        canvas.paste(c, (x, 0))
        x += c.width + gap
    image = annotate(canvas, top=names, title=title)
    path.write_bytes(png_bytes(image))


# ------------------------------------------------------------------------------- the table
def environment(args) -> dict[str, str]:
    return {"machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs",
            "torch": torch.__version__, "threads": str(torch.get_num_threads()),
            "command": shlex.join(["python", "benchmarks/mnist_recipe.py", *sys.argv[1:]])}


def row_key(recipe: str, minutes: float, args) -> str:
    cond = "-cond-w" + ",".join(f"{w:g}" for w in args.guidance) if args.conditional else ""
    tag = f"-{args.tag}" if args.tag else ""
    return f"{recipe}{tag}-{minutes:g}min-n{args.n}{cond}"


def markdown(rows: list[dict], floor: dict, args) -> str:
    methods = list(dict.fromkeys(m for r in rows for m in r["methods"]))
    extra = ["acc"] if args.conditional else ["conf", "classes"]
    head = ["recipe", "CPU min", "steps", "train CPU s"]
    for m in methods:
        head += [f"{m} FID [95 %]"] + [f"{m} {e}" for e in extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["recipe"], f"{r['minutes']:g}", str(r["steps"]), f"{r['train_cpu_s']:.0f}"]
        for m in methods:
            s = r["methods"].get(m)
            if s is None:
                cells += ["-"] * (1 + len(extra))
                continue
            cells.append(f"{s['fid']:.1f} [{s['lo']:.1f}, {s['hi']:.1f}]")
            cells += [f"{s[e]:.2f}" if isinstance(s[e], float) else str(s[e]) for e in extra]
        lines.append("| " + " | ".join(cells) + " |")
    fl = [f"real data (floor, F, m = {floor['n']})", "", "", "",
          f"{floor['fid']:.1f} [{floor['lo']:.1f}, {floor['hi']:.1f}]"]
    fl += [f"{floor[e]:.2f}" if isinstance(floor[e], float) else str(floor[e]) for e in extra]
    lines.append("| " + " | ".join(fl) + " |")
    return "\n".join(lines)


def write_table(keys: list[str], floor: dict, args) -> None:
    rows = [json.loads((args.cache / "rows" / f"{k}.json").read_text())
            for k in keys if (args.cache / "rows" / f"{k}.json").is_file()]
    if not rows:
        return
    env = rows[-1]["environment"]
    text = "\n".join([
        "# MNIST recipes at small CPU budgets (issue #13)", "",
        "Rows made by (each trains once and is kept; `--table-only` rebuilds this file):", "",
        *[f"    {c}" for c in dict.fromkeys(r["environment"]["command"] for r in rows)], "",
        f"{env['machine']}, torch {env['torch']}, {env['threads']} thread(s). Training budget in "
        "CPU-minutes of one process (`time.process_time`). "
        f"{args.n} samples per method (seeds 0..{args.n - 1}), FID with the evaluation "
        "classifier's features against the held-out reference half R, 95 % pivotal bootstrap "
        "intervals; the floor is the FID of m real images of the held-out floor half F "
        "(prediction interval). " + ("Class-conditional, classifier-free guidance "
                                     "w = " + ", ".join(f"{w:g}" for w in args.guidance) +
                                     " (column suffix -wW). " if args.conditional else
                                     "Unconditional. "), "",
        markdown(rows, floor, args), "",
        "Recipes (train fields over today's pipeline settings: " + json.dumps(BASE_TRAIN) +
        ", U-Net " + json.dumps(MODEL) + "):", "",
        *[f"- `{name}`: {json.dumps(spec)}"
          for name, spec in {r["recipe"]: r["spec"] for r in rows}.items()],
        "",
    ])
    (args.out / args.table).write_text(text)
    print(text)


#: the heading of the hand-written part of a ``--from-model`` table, kept when it is rewritten
NOTES = "What it shows"


def rescore(key: str, clf, sets, floor: dict, args) -> None:
    """Score ``args.methods`` on the kept EMA weights of row ``key`` (no training); each
    method's result is kept in ``--cache``/samplers/KEY/METHOD.json, then the table of all
    kept methods of that row is written to ``--table`` (text from a line starting
    "What it shows" on is kept)."""
    obj = load_checkpoint(args.cache / "models" / f"{key}.pt", map_location="cpu")
    train_row = json.loads((args.cache / "rows" / f"{key}.json").read_text())
    args.conditional = bool(obj["conditional"])
    net, process = build(obj["spec"], args.conditional, args.seed)
    net.load_state_dict(obj["ema"])
    folder = args.cache / "samplers" / key
    folder.mkdir(parents=True, exist_ok=True)
    def keep(name: str, row: dict) -> None:
        write_bytes(folder / f"{name}.json",
                    json.dumps({**row, **METHODS[name.split("-w")[0]]}, indent=1).encode())

    for name, row in train_row["methods"].items():  # scored when the row was made
        if not (folder / f"{name}.json").is_file():
            keep(name, row)
    todo = [m for m in args.methods if not (folder / f"{m}.json").is_file()]
    if todo:
        args.methods = todo
        rows, _ = sample_and_score(net.eval(), process, obj["spec"]["train"].get("prediction",
                                                                                 "eps"),
                                   clf, sets, args)
        for name, row in rows.items():
            keep(name, row)
    kept = {f.stem: json.loads(f.read_text()) for f in sorted(folder.glob("*.json"))}
    head = "| method | sampler | NFE | spacing | clip x0 | FID [95 %] | conf | CPU s |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for name, r in sorted(kept.items(), key=lambda kv: kv[1]["fid"]):
        lines.append(f"| {name} | {r['sampler']} | {r['nfe']} | {r.get('spacing', 'linspace')} "
                     f"| {'yes' if r.get('clip_x0') else ''} | {r['fid']:.1f} "
                     f"[{r['lo']:.1f}, {r['hi']:.1f}] | {r['conf']:.2f} | {r['sample_cpu_s']:.0f} |")
    lines.append(f"| real data (floor, m = {floor['n']}) | | | | | {floor['fid']:.1f} "
                 f"[{floor['lo']:.1f}, {floor['hi']:.1f}] | {floor['conf']:.2f} | |")
    env = environment(args)
    text = "\n".join([
        f"# Samplers on the same weights: `{key}` ({train_row['steps']} steps; issue #13)", "",
        "Made by (each method is kept in the cache's `samplers/` and scored once; a call "
        "scores the methods not kept yet):", "",
        f"    python benchmarks/mnist_recipe.py --from-model {key} --methods "
        + ",".join(sorted(kept)), "",
        f"{env['machine']}, torch {env['torch']}, 1 thread. The EMA weights of the row `{key}` "
        f"of `mnist_recipe.md` (kept in the cache's `models/`), {args.n} samples per "
        f"method (seeds 0..{args.n - 1}, the same prior draws for every method), FID with the "
        "evaluation classifier's features against the held-out reference half, 95 % pivotal "
        "bootstrap intervals; sorted by FID. `spacing`: the time grid "
        "(`NoiseProcess.time_grid`).", "",
        *lines, ""])
    path = args.out / args.table
    old = path.read_text() if path.is_file() else ""
    notes = old[old.index(NOTES):] if NOTES in old else ""  # hand-written, kept on a rewrite
    path.write_text(text + ("\n" + notes if notes else ""))
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="/work/shared/data/mnist", help="folder of the idx files")
    ap.add_argument("--recipes", default="ho2020,ours")
    ap.add_argument("--minutes", type=lambda s: [float(v) for v in s.split(",")],
                    default=[1.0, 2.0, 4.0, 8.0], help="training budgets in CPU-minutes")
    ap.add_argument("--methods", type=lambda s: s.split(","),
                    default=["ddpm250", "ddim50", "dpmpp10", "dpmpp20"])
    ap.add_argument("--n", type=int, default=500, help="samples per method")
    ap.add_argument("--conditional", action="store_true",
                    help="class-conditional network (label dropout 0.2), sampled with --guidance")
    ap.add_argument("--guidance", type=lambda s: [float(v) for v in s.split(",")],
                    default=[1.0], help="guidance weights, comma-separated (with --conditional)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a recipe field (model., process., train., warmup_frac, "
                         "self_condition)")
    ap.add_argument("--tag", default="", help="names the rows of a --set variant")
    ap.add_argument("--test-fraction", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0,
                    help="seeds the data split, the evaluation classifier and the bootstrap")
    ap.add_argument("--train-seed", type=int, default=None,
                    help="seeds the network's initialisation and training (default: --seed); "
                         "name the rows with --tag")
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--table", default="mnist_recipe.md")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--from-model", metavar="KEY", default="",
                    help="score --methods on the kept weights of row KEY (e.g. ours-16min-n500) "
                         "instead of training")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    (args.cache / "rows").mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    data = load_data(args)
    clf, sets = evaluation_classifier(data, args)
    floor = floor_row(clf, sets, args)
    print(f"floor (m = {floor['n']}): FID {floor['fid']} [{floor['lo']}, {floor['hi']}]")
    if args.from_model:
        rescore(args.from_model, clf, sets, floor, args)
        return
    keys = []
    for recipe in args.recipes.split(","):
        spec = recipe_spec(recipe, args.set)
        for minutes in args.minutes:
            key = row_key(recipe, minutes, args)
            keys.append(key)
            path = args.cache / "rows" / f"{key}.json"
            if args.table_only or path.is_file():
                continue
            print(f"{key}: {json.dumps(spec)}", flush=True)
            net, process, info = train_recipe(spec, minutes, data, args)
            # the EMA weights, so other samplers can be tried later on the same network
            (args.cache / "models").mkdir(exist_ok=True)
            save_atomic({"spec": spec, "conditional": args.conditional,
                         "ema": net.state_dict()}, args.cache / "models" / f"{key}.pt")
            rows, grids = sample_and_score(net, process, info["train_config"]["prediction"],
                                           clf, sets, args)
            save_grid(grids, f"{key}: {info['steps']} steps", args.out / f"mnist_recipe_{key}.png")
            row = {"recipe": recipe + (f"-{args.tag}" if args.tag else ""), "minutes": minutes,
                   "spec": spec, **info, "methods": rows, "floor": floor,
                   "environment": environment(args)}
            path.write_text(json.dumps(row, indent=1))
    write_table(keys, floor, args)


if __name__ == "__main__":
    main()
