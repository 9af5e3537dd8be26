"""Evaluation throughput: images per second for features and for the scores, at n = 400 and 2000.

    .venv/bin/python benchmarks/eval_throughput.py [--sizes 400 2000] [--params params.yaml]

Scores ``n`` images as the evaluate stage does, on the bundled digits with the default
``params.yaml`` settings (classifier width, ``evaluate.batch_size``, ``evaluate.bootstrap``,
``evaluate.kid_subsets``): features through clean-fid in batches (``features``), then
``score_features`` (FID and floor intervals, KID, P/R, D/C) and ``memorisation`` against the
training split (``scores``). The "generated" images are real digits with a little noise, cycled
to ``n``: the timing does not depend on what the images show. The classifier is trained for one
epoch (weights do not change the cost). One untimed warm-up first. Single process; ``--threads``
torch threads (the statistics use one BLAS thread: many small matrices). Results:
``benchmarks/results/eval_throughput.md``, one section per machine and command line (a rerun
replaces its own section).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _results import RESULTS, command, machine, write_section

ROOT = Path(__file__).resolve().parents[1]
PAGE = RESULTS / "eval_throughput.md"
TITLE = "Evaluation throughput"
INTRO = """Written by `python benchmarks/eval_throughput.py`, one section per machine and command
line; a rerun replaces its own section. `n` images scored as the evaluate stage scores a method,
on the bundled digits with the settings of `params.yaml`: features through clean-fid in batches
of `evaluate.batch_size` (`features`), then every score: FID and floor intervals, KID, P/R, D/C
and the near-copy check against the training split (`scores`). Single process."""


def flat(images: torch.Tensor):
    """Images as rows of pixels (float64 numpy), the space of the near-copy check."""
    return images.flatten(1).double().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[400, 2000])
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from diffusion_core.clean_fid_features import CleanFIDFeatureExtractor, extract_features
    from diffusion_core.data import load_dataset, train_test_split
    from diffusion_core.evaluation import memorisation, reference_split, score_features
    from diffusion_core.feature_classifier import train_classifier
    from pipeline.config import load_params

    params = load_params(args.params)
    ev = params.evaluate
    images, labels = load_dataset(params.data.dataset, params.data.root)
    train_x, train_y, test_x, test_y = train_test_split(
        images, labels, params.data.test_fraction, params.seed
    )
    clf = train_classifier(
        train_x,
        train_y,
        epochs=1,
        batch_size=128,
        lr=2e-3,
        seed=0,
        device="cpu",
        feature_dim=params.classifier.feature_dim,
    )
    extractor = CleanFIDFeatureExtractor(clf)
    ref_idx, floor_idx = reference_split(test_y.numpy(), params.seed)
    test_f = extract_features(extractor, test_x, batch_size=ev.batch_size, device="cpu")
    warm = extract_features(extractor, test_x[:64], batch_size=ev.batch_size, device="cpu")
    score_features(warm, test_f[ref_idx], test_f[floor_idx], draws=ev.bootstrap, seed=0)  # untimed
    lines = [f"torch {torch.__version__}, {args.threads} threads; {ev.bootstrap} bootstrap draws, "
             f"feature batches of {ev.batch_size}, {train_x.shape[0]} training images", "",
             "| n | features (images/s) | scores (images/s) | total (images/s) |",
             "|---|---|---|---|"]
    for n in args.sizes:
        gen = torch.Generator().manual_seed(n)
        fake = images[torch.arange(n) % images.shape[0]]
        fake = (fake + 0.05 * torch.randn(fake.shape, generator=gen)).clamp(-1, 1)
        start = time.perf_counter()
        feats = extract_features(extractor, fake, batch_size=ev.batch_size, device="cpu")
        mid = time.perf_counter()
        score_features(
            feats,
            test_f[ref_idx],
            test_f[floor_idx],
            draws=ev.bootstrap,
            confidence=ev.confidence,
            kid_subsets=ev.kid_subsets,
            seed=0,
        )
        memorisation(flat(fake), flat(train_x), flat(test_x[ref_idx]), flat(test_x[floor_idx]))
        end = time.perf_counter()
        lines.append(
            f"| {n} | {n / (mid - start):.0f} | {n / (end - mid):.0f} | {n / (end - start):.0f} |"
        )
        print(lines[-1], flush=True)
    write_section(PAGE, TITLE, INTRO, f"{machine()}: `{command()}`", "\n".join(lines))


if __name__ == "__main__":
    main()
