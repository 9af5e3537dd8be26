"""Stage ``track``: one MLflow run for this pipeline run or DVC experiment (see
:mod:`pipeline.tracking` for the design).

Reads only files the other stages wrote (params, ``metrics/``, ``reports/``, ``provenance/``,
``runs/train/loss.csv``, the git-ignored ``runs/timing/``) and logs them:

* params: every validated parameter, flattened (``train.lr``, ``methods.ddim50.steps``);
* metrics: per method ``<name>/<method>`` for every number of ``metrics/eval/<method>.json``
  (``fid/ddpm``, ``fid_ci_low/ddpm``, ``class_accuracy/cfg1``, ...), ``nfe/<method>``,
  ``images_per_s/<method>`` (when the method was sampled in this workspace), ``train/loss``
  per step, ``train/final_loss``, ``classifier/test_accuracy``, and the guidance trade-off as
  ``guidance_fid`` / ``guidance_class_accuracy`` at step ``round(100 w)``;
* artifacts: ``grids/`` (configured methods only), ``reports/``, ``process/`` (pictures),
  ``metrics/``, ``provenance/``,
  ``params.yaml`` and ``dvc.lock``;
* tags: ``run.kind=pipeline``, ``dvc.exp_name``, ``dvc.baseline_rev``, ``git.commit``,
  ``params.hash``, ``train.run_id`` (the training run of the evaluated model) and the model's
  registry name and version.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from pipeline import paths
from pipeline.config import Params, flatten, params_hash
from pipeline.files import (
    PROVENANCE_DIR,
    file_digest,
    read_json,
    read_timing,
    repo_root,
    run_context,
)
from pipeline.tracking import Tracker, open_store, run_name, run_tags, sync_experiment_commits

REPORT_FILES = (
    paths.SUMMARY_MD,
    paths.FID_VS_NFE,
    paths.FID_VS_NFE_PNG,
    paths.GUIDANCE_TRADEOFF,
    paths.GUIDANCE_TRADEOFF_PNG,
)


def _json(path: Path) -> dict[str, Any]:
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in record.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def method_metrics(params: Params) -> dict[str, float]:
    """``<metric>/<method>`` for every configured method's sample, eval and timing records."""
    out: dict[str, float] = {}
    for name in params.methods:
        sampled = _json(paths.sample_metrics(name))
        scored = _json(paths.eval_record(name))
        values = {**_numbers(scored)}
        if "nfe" in sampled:
            values["nfe"] = float(sampled["nfe"])
        timing = read_timing(f"sample@{name}")
        for key in ("images_per_s", "wall_s"):
            if isinstance(timing.get(key), int | float):
                values[f"sample_{key}" if key == "wall_s" else key] = float(timing[key])
        out.update({f"{k}/{name}": v for k, v in values.items()})
    return out


def loss_history() -> list[tuple[int, float]]:
    """``(step, loss)`` rows of ``runs/train/loss.csv``."""
    try:
        with paths.LOSS_CSV.open() as f:
            return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]
    except (OSError, KeyError, ValueError):
        return []


def guidance_curves(params: Params) -> list[tuple[int, dict[str, float]]]:
    """The guidance trade-off of ``metrics/summary.json`` as ``(round(100 w), metrics)``: the
    first family (in params order) as ``guidance_fid`` / ``guidance_class_accuracy``, further
    families as ``guidance_fid/<family>``, named after their first guided method."""
    rows = _json(paths.SUMMARY).get("guidance_tradeoff", [])
    order = [m for m in params.methods if any(r.get("family") == m for r in rows)]
    points = []
    for row in rows:
        family = row.get("family")
        suffix = "" if not order or family == order[0] else f"/{family}"
        values = {f"guidance_fid{suffix}": row.get("fid"),
                  f"guidance_class_accuracy{suffix}": row.get("class_accuracy")}
        values = {k: float(v) for k, v in values.items() if isinstance(v, int | float)}
        points.append((round(100 * float(row["guidance"])), values))
    return points


def description(params: Params, name: str, metrics: dict[str, float]) -> str:
    """The run's markdown note: what ran and the headline numbers."""
    lines = [
        f"Pipeline run **{name}** on `{params.data.dataset}` "
        f"({params.process.name} process, {params.train.steps} training steps, "
        f"{params.sample.n_images} images per method).",
        "",
        "| method | sampler | NFE | FID |",
        "|---|---|---|---|",
    ]
    for method, spec in params.methods.items():
        nfe, fid = metrics.get(f"nfe/{method}"), metrics.get(f"fid/{method}")
        lines.append(
            f"| {method} | {spec.sampler} | {'-' if nfe is None else f'{nfe:.0f}'} | "
            f"{'-' if fid is None else f'{fid:.2f}'} |"
        )
    return "\n".join(lines)


def _link_model(tracker: Tracker, params: Params) -> dict[str, str]:
    """Tags naming the training run (and registered model) of ``runs/train/model.pt``; logs and
    registers the model here when no run of this store has it."""
    if not paths.MODEL.is_file():
        return {}
    sha = file_digest(paths.MODEL)
    owner = tracker.find_model_run(sha)
    if owner is not None:
        tags = {"model.run_id": owner.info.run_id, "model.sha256": sha}
        if owner.data.tags.get("run.kind") == "train":
            tags["train.run_id"] = owner.info.run_id
        for key in ("model.registered_name", "model.version"):
            if key in owner.data.tags:
                tags[key] = owner.data.tags[key]
        return tags
    registered = params.tracking.model_name if params.tracking.register_model else None
    version = tracker.log_model(paths.MODEL, registered, sha)
    tags = {"model.run_id": tracker.run_id, "model.sha256": sha}
    if version is not None:
        print(f"registered MLflow model {registered} version {version}")
    return tags


def run(params: Params) -> dict[str, Any]:
    """Create the MLflow run of this pipeline run; returns ``{run_id, name}`` (or {})."""
    context = run_context()
    name = run_name(context["git.commit"])
    metrics = method_metrics(params)
    tags = run_tags(params_hash(params), context["git.commit"], kind="pipeline")
    tags["git.dirty"] = str(context["git.dirty"])
    tags["mlflow.note.content"] = description(params, name, metrics)
    tracker = Tracker.create(name, tags, params.tracking.experiment)
    if tracker is None:
        return {}
    tracker.log_params(flatten(params.model_dump(mode="json")))
    train = _json(paths.TRAIN_METRICS)
    metrics.update({f"train/{k}": v for k, v in _numbers(train).items()})
    metrics.update({f"classifier/{k}": v for k, v in _numbers(_json(paths.CLASSIFIER_METRICS))
                    .items()})
    train_time = read_timing("train")
    if isinstance(train_time.get("wall_s"), int | float):
        metrics["train/wall_s"] = float(train_time["wall_s"])
    tracker.log_metrics(metrics)
    tracker.log_history("train/loss", loss_history())
    for step, values in guidance_curves(params):
        tracker.log_metrics(values, step=step)
    for method in params.methods:
        tracker.log_artifact(paths.grid_path(method), "grids")
        for path in (paths.sample_metrics(method), paths.eval_record(method)):
            tracker.log_artifact(path, str(Path("metrics") / path.parent.name))
    for path in (*REPORT_FILES, paths.SUMMARY, paths.TRAIN_METRICS, paths.CLASSIFIER_METRICS):
        tracker.log_artifact(path, "reports" if path.parent.name == "reports" else "metrics")
    for path in sorted(Path("reports/process").glob("*")):  # the pictures stage
        tracker.log_artifact(path, "process")
    for path in sorted(PROVENANCE_DIR.glob("*.json")):
        tracker.log_artifact(path, "provenance")
    for path in (Path("params.yaml"), Path("dvc.lock")):
        tracker.log_artifact(path)
    tracker.set_tags(_link_model(tracker, params))
    tracker.finish("FINISHED")
    synced = 0
    if tracker.enabled:
        synced = sync_experiment_commits(
            tracker.client, tracker.experiment_id, tracker.uri, repo_root()
        )
    if not tracker.enabled:
        return {}
    print(f"MLflow run {name!r} ({tracker.run_id}) in {tracker.uri}"
          + (f"; tagged {synced} experiment run(s) with their commits" if synced else ""))
    return {"run_id": tracker.run_id, "name": name}


def sync(params: Params) -> int:
    """Tag the runs of finished DVC experiments with their commits (``diffusion track --sync``)."""
    store = open_store(params.tracking.experiment)
    if store is None:
        return 0
    count = sync_experiment_commits(*store, repo_root())
    print(f"tagged {count} experiment run(s) with their commits")
    return count
