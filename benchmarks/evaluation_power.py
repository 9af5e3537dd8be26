"""Can the evaluation see a difference that exists, on the default model? Paired FID differences
(``diffusion_core.evaluation.paired_difference``) between sampler settings, at the pipeline's n.

    .venv/bin/python benchmarks/evaluation_power.py [--n 400] [--blocks 10]

Needs a finished ``make run`` (``runs/train/model.pt``, ``models/classifier.pt``,
``models/reference_features.pt``). Every set is scored as the pipeline scores a method: samples
snapped to the dataset's grey levels, classifier features, against the reference half R, with
the joint bootstrap of ``evaluate.bootstrap`` draws (the same resampled seeds and reference in
each draw of both sets).

* **Where the noise comes from**: for each method of the last run against ``evaluate.baseline``
  (their samples in ``runs/samples``), the spread of the paired difference when the bootstrap
  resamples both (the pipeline's interval), only the seeds, or only the reference, and the
  share of the unpaired variance that pairing cancels.
* **Power**: DDIM with 2, 5 and 10 steps against DDIM 50 on the same seeds and labels: each
  must be resolved as worse (or, where it is not, the table says so).
* **False positives**: DDIM 50 on one block of ``n`` seeds against DDIM 50 on the next,
  disjoint block (same sampler, other images), ``--blocks`` pairs: each should be
  "not resolved"; the share that is not estimates the false-positive rate on model samples.

Writes ``benchmarks/results/evaluation_power.md``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from _results import RESULTS, command, machine, write_section

ROOT = Path(__file__).resolve().parents[1]
OUT = RESULTS / "evaluation_power.md"
TITLE = "Evaluation power on the default model"
INTRO = ("Written by `benchmarks/evaluation_power.py` after a `make run`: where the noise of "
         "the paired FID differences comes from, and whether the evaluation resolves known "
         "differences between samplers and none between disjoint seed blocks. How to read it: "
         "[docs/evaluation.md](../../docs/evaluation.md).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--n", type=int, default=None, help="images per set (sample.n_images)")
    parser.add_argument("--blocks", type=int, default=10, help="false-positive pairs")
    parser.add_argument("--pairs", default="uncond:cfg1",
                        help="more method pairs a:b of the last run to decompose")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    os.chdir(ROOT)
    from diffusion_core.checkpoint import load_checkpoint
    from diffusion_core.data import from_levels, from_uint8, to_levels
    from diffusion_core.evaluation import (
        JointPlan,
        ReferenceStatistics,
        compare,
        joint_fid_draws,
        joint_plan,
        paired_difference,
    )
    from pipeline import paths
    from pipeline.classifier import features, held_out_halves, load_classifier
    from pipeline.config import METHOD_MODELS, load_params
    from pipeline.dataset import dataset_info
    from pipeline.prepare import load_split
    from pipeline.sampling import Recipe, load_model, method_labels, sample_images

    params = load_params(args.params)
    n = args.n or params.sample.n_images
    device = torch.device("cpu")
    model = load_model(device)
    clf = load_classifier(device)
    _, test_y = load_split(paths.TEST_DATA)
    ref_idx, _ = held_out_halves(params, test_y)
    ref_f = load_checkpoint(paths.REFERENCE_FEATURES, map_location="cpu")["test"].numpy()
    ref_f = ref_f[ref_idx.numpy()]
    stats = ReferenceStatistics(ref_f)
    levels = dataset_info(params).pixel_levels
    labels = method_labels(METHOD_MODELS["ddim"](sampler="ddim", steps=50), n, model.num_classes)
    plan = joint_plan(n, ref_f.shape[0], params.evaluate.bootstrap, params.seed + 2)
    level = params.evaluate.confidence

    def scored(steps: int, first_seed: int) -> tuple[float, np.ndarray]:
        recipe = Recipe("ddim", steps=steps, spacing="linspace", settings={"eta": 0.0})
        drawn = sample_images(model, model.denoiser, recipe,
                              seeds=[first_seed + i for i in range(n)], labels=labels,
                              device=device, desc=f"ddim{steps}")
        images = from_levels(to_levels(from_uint8(drawn.images), levels), levels)  # as evaluate
        f = features(clf, images, params.evaluate.batch_size, device).numpy()
        return stats.fid(f), joint_fid_draws(f, ref_f, plan)

    start = time.perf_counter()
    baseline = params.evaluate.baseline_of(params.methods)

    def sample_features(method: str) -> np.ndarray | None:
        path = paths.samples_dir(method) / "samples.pt"
        if not path.is_file():
            return None
        images = load_checkpoint(path, map_location="cpu")["images"]
        images = from_levels(to_levels(from_uint8(images), levels), levels)
        return features(clf, images, params.evaluate.batch_size, device).numpy()

    plans = {"both": plan,
             "seeds only": JointPlan(plan.samples, np.ones_like(plan.reference)),
             "reference only": JointPlan(np.ones_like(plan.samples), plan.reference)}
    noise_rows = []
    extra = [tuple(p.split(":")) for p in args.pairs.split(",") if p]
    cached = {m: sample_features(m) for m in {*params.methods, *(m for p in extra for m in p)}}
    for a_name, b_name in [(m, baseline) for m in params.methods if m != baseline] + extra:
        a_f, b_f = cached.get(a_name), cached.get(b_name)
        if a_f is None or b_f is None or a_f.shape != b_f.shape:
            continue
        spreads = {}
        for name, p in plans.items():
            a, b = joint_fid_draws(a_f, ref_f, p), joint_fid_draws(b_f, ref_f, p)
            spreads[name] = paired_difference(stats.fid(a_f), stats.fid(b_f), a, b, level)
        noise_rows.append((f"`{a_name}` vs `{b_name}`", spreads))

    rows = []
    reference = scored(50, params.seed)
    for steps in (2, 5, 10):
        fid, fid_draws = scored(steps, params.seed)
        d = paired_difference(fid, reference[0], fid_draws, reference[1], level)
        rows.append((f"DDIM {steps} vs DDIM 50 (same seeds)", d, compare(d)))
    blocks = []
    previous = reference
    for block in range(1, args.blocks + 1):
        current = scored(50, params.seed + block * n)
        d = paired_difference(current[0], previous[0], current[1], previous[1], level)
        blocks.append((f"DDIM 50, seeds block {block} vs block {block - 1}", d, compare(d)))
        previous = current
    wall = time.perf_counter() - start
    false_positives = sum(v != "not resolved" for *_, v in blocks)

    lines = [
        f"n = {n} images per set, {params.evaluate.bootstrap} joint bootstrap draws, "
        f"{100 * level:.0f} % intervals, reference |R| = {ref_f.shape[0]}; {wall:.0f} s.",
        "",
        f"### The last run's methods against `{baseline}` (and `--pairs`)",
        "",
        "Half-widths of the paired interval when the bootstrap resamples both the seeds and the "
        "reference (the pipeline's), only the seeds, or only the reference; \"shared\": the share "
        "of the unpaired variance var(a*) + var(b*) that pairing cancels (both resampled).",
        "",
        "| pair | ΔFID | interval (both) | half-width: both / seeds / reference | shared | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for method, spreads in noise_rows:
        both = spreads["both"]
        widths = " / ".join(f"{(d.high - d.low) / 2:.1f}" for d in spreads.values())
        lines.append(f"| {method} | {both.value:+.1f} | [{both.low:+.1f}, {both.high:+.1f}] | "
                     f"{widths} | {100 * both.shared:.0f} % | {compare(both)} |")
    lines += [
        "",
        "### Power and false positives on fresh samples",
        "",
        "| comparison | ΔFID | interval | noise shared | verdict |",
        "|---|---|---|---|---|",
    ]
    for name, d, verdict in rows + blocks:
        lines.append(f"| {name} | {d.value:+.1f} | [{d.low:+.1f}, {d.high:+.1f}] | "
                     f"{100 * d.shared:.0f} % | {verdict} |")
    lines += [
        "",
        f"False positives (disjoint seed blocks of the same sampler resolved apart): "
        f"{false_positives} of {len(blocks)}.",
    ]
    page = write_section(args.out, TITLE, INTRO, f"{machine()}: `{command()}`", "\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {page}")


if __name__ == "__main__":
    main()
