"""Stage ``evaluate``: the sample quality of every method (or of ``--method M``), with intervals
and a verdict. One process scores them all: the splits, the reference features and the
evaluation classifier are loaded once, and each method costs only its own features and scores.

The protocol is ``diffusion_core.evaluation``'s (see its docstring and the README): the held-out
test split, which neither the diffusion model nor the evaluation classifier trained on, is split
(stratified, seeded) into a reference half R and a floor half F. Samples are snapped to the
dataset's grey levels (``data.to_levels``/``from_levels``, as real images are stored), their
features computed in batches of ``evaluate.batch_size``, and scored against R:

* ``fid`` with ``fid_ci_low``/``fid_ci_high`` (bootstrap, level ``evaluate.confidence``) at
  ``n = sample.n_images`` (any n: not capped by the held-out count), to compare methods;
  ``fid_floor`` with its interval: what ``m = fid_matched_n = min(n, |F|)`` real images score
  against R, from F; ``fid_matched``: the FID of the first ``m`` samples; ``verdict`` (from
  those two): "indistinguishable from real data at this n", "worse than floor" or "below floor".
* ``kid_x1000`` +- ``kid_x1000_std`` and ``kid_floor_x1000`` (standardised features, subsets of
  ``kid_subset_size``); ``precision``, ``recall``, ``density``, ``coverage`` and their
  ``*_floor`` values (F against R at the same size ``prdc_n``).
* ``near_copy_fraction`` (pixel space, against the training split) and
  ``near_copy_fraction_heldout`` (F's value; about ``evaluate.near_copy_quantile``).
* ``unclear_fraction`` with ``unclear_fraction_ci_low``/``_ci_high`` (Wilson interval, level
  ``evaluate.confidence``): the share of samples whose evaluation-classifier top probability is
  below ``evaluate.unclear_below`` (ambiguous or malformed digits, noise), and
  ``unclear_fraction_floor`` with its interval: the same share for the m real images of F. Only
  with an evaluation classifier (a dataset with classes).
* ``class_accuracy``: for samples drawn with class labels (a conditional model, not an
  ``unconditional`` method), the fraction the evaluation classifier assigns to the class they
  were asked for.
* ``fid_joint_draws``: the FIDs of a joint bootstrap shared by every method (the same resampled
  seeds and reference images in draw ``b``; :func:`joint_draws`), from which the report takes
  each method's paired difference to ``evaluate.baseline`` and to every other method.
* ``bpd``: for ``ode_rk45`` methods when ``evaluate.bpd_images > 0``, the negative
  log-likelihood in bits/dim of that many test images under the probability-flow ODE with the
  method's tolerances (Song et al. 2021, Sec. 4.3), unconditional (null label), dequantised in
  bins centred on the dataset's pixel levels; image ``i`` uses seed ``seed + i``.

Progress (:class:`pipeline.progress.Progress`: a bar on a terminal, plain lines otherwise,
silenced by ``--quiet``) follows the feature batches, each score of
``diffusion_core.evaluation.SCORES`` and the near copies, and the bits/dim ODE (images, moved
along within a batch by the ODE's time).

``extractor`` names the feature extractor (``classifier`` or ``inception``). Writes
``reports/eval/M.json`` (the full record; the track stage logs its numbers to MLflow as
``<metric>/M``) and its headline numbers to ``metrics/eval/M.json`` (the DVC metric) for each
method, and ``provenance/evaluate.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from diffusion_core.checkpoint import load_checkpoint
from diffusion_core.clean_fid_features import extract_features
from diffusion_core.data import from_levels, from_uint8, to_levels
from diffusion_core.distributed import default_device
from diffusion_core.evaluation import (
    SCORES,
    joint_fid_draws,
    joint_plan,
    memorisation,
    proportion_interval,
    score_features,
)
from diffusion_core.feature_classifier import classification_accuracy, top_probabilities
from diffusion_core.inception import inception_extractor
from diffusion_core.likelihood import bits_per_dim
from pipeline import paths
from pipeline.classifier import features, held_out_halves, load_classifier
from pipeline.config import Params
from pipeline.dataset import dataset_info
from pipeline.errors import StageError
from pipeline.files import read_json, write_json, write_provenance
from pipeline.prepare import load_split
from pipeline.progress import Progress
from pipeline.sampling import load_model
from pipeline.verdicts import verdict

#: what ``metrics/eval/M.json`` (the DVC metric) keeps of the full record, so that
#: ``dvc metrics show`` / ``dvc exp show`` fit a terminal; everything is in ``reports/eval/M.json``
HEADLINE = ("nfe", "fid", "fid_ci_low", "fid_ci_high", "fid_floor", "precision", "recall",
            "unclear_fraction", "class_accuracy", "bpd")


#: the joint bootstrap's seed is ``seed`` + this (the FID interval uses ``seed``, the floor + 1)
JOINT_SEED_OFFSET = 2


def headline(record: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of a full evaluation record (``status`` alone when skipped)."""
    if record.get("status") != "ok":
        return {"status": record.get("status")}
    return {k: record[k] for k in HEADLINE if record.get(k) is not None}


def _load_samples(method: str) -> dict[str, Any]:
    path = paths.samples_dir(method) / "samples.pt"
    try:
        return load_checkpoint(path, map_location="cpu")
    except FileNotFoundError:
        raise StageError(f"{path} is missing: run `diffusion sample -m {method}` first") from None


def _reference(
    params: Params, test_x: torch.Tensor, test_y: torch.Tensor, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """Features of the reference half R and the floor half F of the test split."""
    ref_idx, floor_idx = held_out_halves(params, test_y)
    if params.evaluate.extractor == "classifier":
        test = load_checkpoint(paths.REFERENCE_FEATURES, map_location="cpu")["test"].numpy()
    else:
        test = _inception(test_x, params, device, "test features")
    return test[ref_idx.numpy()], test[floor_idx.numpy()]


def _inception(images: torch.Tensor, params: Params, device: torch.device,
               desc: str) -> np.ndarray:
    try:
        extractor = inception_extractor(device)
    except RuntimeError as exc:
        raise StageError(f"evaluate.extractor=inception: {exc}") from None
    batch = params.evaluate.batch_size
    with Progress(images.shape[0], desc, unit="img", every=batch) as bar:
        return extract_features(extractor, images, batch_size=batch, device=device,
                                resize="clean", callback=bar.update)


def _bits_per_dim(params: Params, method: str, device: torch.device) -> dict[str, float]:
    """Mean and spread of bits/dim of the first ``evaluate.bpd_images`` test images."""
    m = params.methods[method]
    count = params.evaluate.bpd_images
    if count == 0 or m.sampler != "ode_rk45":
        return {}
    denoiser, process, _ = load_model(device)
    test_x, _ = load_split(paths.TEST_DATA)
    num_levels = dataset_info(params).pixel_levels
    levels = to_levels(test_x[:count], num_levels)
    values, nfe = [], 0
    bar = Progress(count, f"{method} bits/dim", unit="img", every=max(1, count // 10))
    with bar:
        for lo in range(0, levels.shape[0], params.evaluate.batch_size):
            chunk = levels[lo : lo + params.evaluate.batch_size].to(device)
            seeds = [params.seed + i for i in range(lo, lo + chunk.shape[0])]
            bpd, used = bits_per_dim(
                denoiser, process, chunk, num_levels, seeds=seeds, rtol=m.rtol, atol=m.atol,
                callback=_ode_progress(bar, lo, chunk.shape[0], process.t_min),
            )
            values.append(bpd.detach().double().cpu())
            nfe = max(nfe, used)
            bar.goto(lo + chunk.shape[0], nfe=used)
    bpd = torch.cat(values)
    spread = float(bpd.std()) if bpd.numel() > 1 else 0.0
    return {"bpd": float(bpd.mean()), "bpd_std": spread, "bpd_nfe": float(nfe)}


def _ode_progress(bar: Progress, done: int, batch: int,
                  t_min: float) -> Callable[[dict[str, Any]], None]:
    """A likelihood callback moving ``bar`` (in images) through a batch of ``batch`` images after
    ``done`` others, in proportion to how far the batch's ODE has come from ``t_min`` to 1 (the
    batch counts as done when its values are back)."""

    def callback(info: dict[str, Any]) -> None:
        fraction = min(max((info["t"] - t_min) / (1.0 - t_min), 0.0), 1.0)
        bar.goto(max(bar.n, done + min(int(fraction * batch), batch - 1)), nfe=info["nfe"])

    return callback


def joint_draws(params: Params, sample_f: np.ndarray, ref_f: np.ndarray) -> dict[str, Any]:
    """``fid_joint_draws``: the FIDs of the joint bootstrap (``diffusion_core.evaluation.
    joint_plan``) that every method of this params file shares: draw ``b`` resamples the same
    seeds and the same reference images for every method, so the report differences any two
    methods draw by draw. ``joint_plan`` names the plan, so that only like draws are paired."""
    ev = params.evaluate
    plan = {"seed": params.seed + JOINT_SEED_OFFSET, "n": int(sample_f.shape[0]),
            "n_reference": int(ref_f.shape[0]), "draws": ev.bootstrap}
    draws = joint_fid_draws(sample_f, ref_f, joint_plan(plan["n"], plan["n_reference"],
                                                         plan["draws"], plan["seed"]))
    return {"joint_plan": plan, "fid_joint_draws": [float(f"{v:.7g}") for v in draws]}


def _skipped(params: Params, method: str, sample_record: dict[str, Any]) -> dict[str, Any]:
    record = {"status": "skipped", "reason": sample_record.get("reason", "sampling was skipped")}
    write_json(paths.eval_record(method), record)
    write_json(paths.eval_metrics(method), headline(record))
    print(f"skipped {method}: {record['reason']}")
    return record


def _unclear(params: Params, clf: torch.nn.Module | None, images: torch.Tensor,
             real: torch.Tensor, device: torch.device) -> dict[str, float]:
    """The shares of samples and of real images (F) the classifier is unsure of, with Wilson
    intervals; nothing without an evaluation classifier (``clf`` None)."""
    if clf is None:
        return {}
    ev = params.evaluate
    out: dict[str, float] = {}
    for key, x in (("unclear_fraction", images), ("unclear_fraction_floor", real)):
        k = int((top_probabilities(clf, x, ev.batch_size, device) < ev.unclear_below).sum())
        out[key] = k / x.shape[0]
        out[f"{key}_ci_low"], out[f"{key}_ci_high"] = proportion_interval(
            k, x.shape[0], ev.confidence)
    return out


def _flat(images: torch.Tensor) -> np.ndarray:
    return images.flatten(1).double().numpy()


@dataclass(frozen=True)
class _Shared:
    """What every method is scored against, loaded once per stage: the splits, the features of
    the reference half R and the floor half F, and the evaluation classifier (None without one)."""

    device: torch.device
    train_x: torch.Tensor
    test_x: torch.Tensor
    ref_idx: torch.Tensor
    floor_idx: torch.Tensor
    ref_f: np.ndarray
    floor_f: np.ndarray
    clf: torch.nn.Module | None


def _shared(params: Params) -> _Shared:
    device = default_device()
    train_x, _ = load_split(paths.TRAIN_DATA)
    test_x, test_y = load_split(paths.TEST_DATA)
    ref_f, floor_f = _reference(params, test_x, test_y, device)
    try:  # loaded once: features, the unclear share and class accuracy
        clf = load_classifier(device)
    except StageError:  # a dataset without classes: only the inception extractor scores it
        if params.evaluate.extractor == "classifier":
            raise
        clf = None
    ref_idx, floor_idx = held_out_halves(params, test_y)
    return _Shared(device, train_x, test_x, ref_idx, floor_idx, ref_f, floor_f, clf)


def _sample_features(params: Params, method: str, images: torch.Tensor,
                     shared: _Shared) -> np.ndarray:
    ev = params.evaluate
    if ev.extractor != "classifier":
        return _inception(images, params, shared.device, f"{method} features")
    with Progress(images.shape[0], f"{method} features", unit="img", every=ev.batch_size) as bar:
        return features(shared.clf, images, ev.batch_size, shared.device, bar.update).numpy()


def _scores(params: Params, method: str, images: torch.Tensor, sample_f: np.ndarray,
            shared: _Shared) -> dict[str, float]:
    """The FID, KID, P/R, D/C scores with their floors, and the near copies."""
    ev = params.evaluate
    with Progress(len(SCORES) + 1, f"{method} scores", unit="score", every=1) as bar:
        metrics: dict[str, float] = score_features(
            sample_f, shared.ref_f, shared.floor_f, draws=ev.bootstrap,
            confidence=ev.confidence, kid_subsets=ev.kid_subsets, seed=params.seed,
            callback=lambda score: bar.update(1, done=score),
        )
        metrics.update(memorisation(
            _flat(images), _flat(shared.train_x), _flat(shared.test_x[shared.ref_idx]),
            _flat(shared.test_x[shared.floor_idx]), quantile=ev.near_copy_quantile,
        ))
        bar.update(1, done="near_copies")
    return metrics


def score_method(params: Params, method: str, sample_record: dict[str, Any],
                 shared: _Shared) -> dict[str, Any]:
    """Score one method's samples (its sample stage wrote ``sample_record``) against
    ``shared``; writes and returns its record."""
    samples = _load_samples(method)
    levels = dataset_info(params).pixel_levels
    images = from_levels(to_levels(from_uint8(samples["images"]), levels), levels)
    ev, device = params.evaluate, shared.device
    sample_f = _sample_features(params, method, images, shared)
    metrics = _scores(params, method, images, sample_f, shared)
    joint = joint_draws(params, sample_f, shared.ref_f)
    metrics.update(_bits_per_dim(params, method, device))
    real = shared.test_x[shared.floor_idx][: int(metrics["fid_matched_n"])]
    metrics.update(_unclear(params, shared.clf, images, real, device))
    labels = samples.get("labels")
    if labels is not None:
        metrics["class_accuracy"] = classification_accuracy(
            shared.clf, images, labels, ev.batch_size, device)
    record = {
        "status": "ok",
        "extractor": ev.extractor,
        # the first m samples against what m real images score: the same n on both sides
        "verdict": verdict(
            metrics["fid_matched"], metrics["fid_floor_ci_low"], metrics["fid_floor_ci_high"]
        ),
        **metrics,
        "confidence": ev.confidence,
        "nfe": sample_record.get("nfe"),
        "n_images": images.shape[0],
        "n_reference": int(shared.ref_f.shape[0]),
        "n_floor": int(shared.floor_f.shape[0]),
        **joint,
    }
    write_json(paths.eval_record(method), record)
    write_json(paths.eval_metrics(method), headline(record))
    _print_summary(method, metrics, record["verdict"])
    return record


def _print_summary(method: str, metrics: dict[str, float], verdict_text: str) -> None:
    print(
        f"{method}: FID {metrics['fid']:.4g} [{metrics['fid_ci_low']:.4g}, "
        f"{metrics['fid_ci_high']:.4g}]; at m = {metrics['fid_matched_n']:.0f} "
        f"{metrics['fid_matched']:.4g} vs floor {metrics['fid_floor']:.4g} "
        f"[{metrics['fid_floor_ci_low']:.4g}, {metrics['fid_floor_ci_high']:.4g}]: "
        f"{verdict_text}; KID x1000 {metrics['kid_x1000']:.3g} +- "
        f"{metrics['kid_x1000_std']:.2g}; P/R {metrics['precision']:.2f}/{metrics['recall']:.2f}"
    )


def run(params: Params, methods: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Score ``methods`` (default: every method of ``params``) in one process, the splits,
    reference features and classifier loaded once; returns the records by method name."""
    names = methods or list(params.methods)
    for name in names:
        params.method(name)  # a clear error for an unknown name, before any work
    sampled = {name: read_json(paths.sample_metrics(name)) for name in names}
    scored = any(r.get("status") != "skipped" for r in sampled.values())
    shared = _shared(params) if scored else None
    records = {}
    for name, sample_record in sampled.items():
        if shared is None or sample_record.get("status") == "skipped":
            records[name] = _skipped(params, name, sample_record)
        else:
            records[name] = score_method(params, name, sample_record, shared)
    write_provenance("evaluate", params, methods=names)
    return records
