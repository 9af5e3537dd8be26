"""Stage ``track``: one MLflow run for each evaluated state, with one nested run per method
(see :mod:`pipeline.tracking` for the design).

Reads only files the other stages wrote (params, ``metrics/``, ``reports/``, ``provenance/``,
``runs/train/loss.csv``, the git-ignored ``runs/timing/``) and logs them.

DVC runs this stage on every ``dvc repro`` and ``dvc exp run`` (``always_changed``), also when
every other stage was up to date, as in a fresh clone whose outputs match ``dvc.lock``. It is
idempotent: the **state key** (:func:`state_key`, tag ``pipeline.state``) is a digest of the
validated params and of every file the evaluation consists of (the model, ``metrics/``,
``reports/``); a state this store already holds a finished pipeline run of is not logged again.

The **pipeline run** (``run.kind=pipeline``):

* params: every validated parameter, flattened (``train.lr``, ``methods.ddim50.steps``);
* metrics: ``fid/<method>`` and ``fid_diff/<method>`` (the paired difference to
  ``evaluate.baseline``), so a sweep's pipeline runs compare a method's FID side by side;
  ``train/loss`` per step, ``train/final_loss``, ``classifier/test_accuracy``, and the guidance
  trade-off as ``guidance_fid`` / ``guidance_class_accuracy`` at step ``round(100 w)``;
* artifacts: ``grids/`` (configured methods only), ``reports/``, ``process/`` (pictures),
  ``metrics/``, ``provenance/``, ``params.yaml`` and ``dvc.lock``;
* tags: ``run.kind=pipeline``, ``pipeline.state``, ``dvc.exp_name``, ``dvc.baseline_rev``,
  ``git.commit``, ``params.hash``, ``train.run_id`` (the training run of the evaluated model)
  and the model's registry name and version.

A **method run** nested under it for every configured method (``run.kind=method``, run name the
method's name, tag ``mlflow.parentRunId``): params are the method's settings (``method``,
``sampler``, ``steps``, ``spacing``, ``guidance``, ``autoguidance``, ``clip_x0``, the
sampler's own) with ``baseline`` and ``n_images``; metrics every number of its evaluation
record (``fid`` and its interval, ``fid_diff`` to the baseline and its interval, precision,
recall, class accuracy, unclear share, ...) with ``nfe`` (network evaluations per image) and
``images_per_s`` (when sampled in this workspace); tags ``verdict`` (against real data) and
``vs_baseline``; its grid as an artifact. So MLflow's runs table, charts (FID against NFE) and
compare view work on methods, and ``mlflow.search_runs(filter_string="tags.`run.kind` =
'method'")`` is a tidy table of them.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from pipeline import paths
from pipeline.config import Params
from pipeline.files import (
    PROVENANCE_DIR,
    file_digest,
    read_json,
    read_timing,
    repo_root,
    run_context,
)
from pipeline.params_digest import flatten, params_hash
from pipeline.tracking import (
    Tracker,
    find_state_run,
    open_store,
    run_name,
    run_tags,
    store_lock,
    sync_experiment_commits,
)

#: what the evaluated state consists of, besides the params (the track stage's deps)
STATE_DIRS = (Path("metrics"), Path("reports"))

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


def state_key(params: Params) -> str:
    """A digest of the params hash, the model file and every file under ``metrics/`` and
    ``reports/`` (paths and contents): equal exactly when the evaluated state is."""
    digest = hashlib.sha256(params_hash(params).encode())
    files = [paths.MODEL] + sorted(p for d in STATE_DIRS if d.is_dir() for p in d.rglob("*")
                                   if p.is_file())
    for path in files:
        if path.is_file():
            digest.update(f"\0{path.as_posix()}\0{file_digest(path)}".encode())
    return digest.hexdigest()[:16]


#: the MLflow UI loads a saved view of the runs table from the experiment tag with this prefix
#: and the name in the address's ``viewStateShareKey``
SHARED_VIEW_TAG = "mlflow.sharedViewState."
METHODS_VIEW = "methods"
#: the columns of the methods view, in order
VIEW_COLUMNS = (
    "params.`sampler`", "params.`steps`", "params.`guidance`", "metrics.`nfe`", "metrics.`fid`",
    "metrics.`fid_ci_low`", "metrics.`fid_ci_high`", "metrics.`fid_diff`",
    "metrics.`fid_diff_ci_low`", "metrics.`fid_diff_ci_high`", "tags.`vs_baseline`",
    "metrics.`class_accuracy`", "tags.`verdict`",
)


def methods_view(key: str) -> dict[str, Any]:
    """The saved runs-table view of one state's method runs: filtered to them, sorted by NFE,
    with their settings and scores as columns (the UI's shared-view format)."""
    return {
        "searchFilter": f"tags.`run.kind` = 'method' and tags.`pipeline.state` = '{key}'",
        "orderByKey": "metrics.`nfe`", "orderByAsc": True,
        "selectedColumns": list(VIEW_COLUMNS), "columnOrder": list(VIEW_COLUMNS),
    }


def save_methods_view(client: Any, experiment_id: str, uri: str, key: str) -> None:
    """Point the experiment's saved methods view at state ``key`` (best effort)."""
    try:
        with store_lock(uri):
            client.set_experiment_tag(experiment_id, f"{SHARED_VIEW_TAG}{METHODS_VIEW}",
                                      json.dumps(methods_view(key)))
    except Exception as exc:  # noqa: BLE001 - tracking never fails a stage
        print(f"warning: MLflow saving the methods view failed: {exc}", file=sys.stderr)


def methods_view_path(experiment_id: str) -> str:
    """The UI address (after the server's base URL) of the newest state's methods view."""
    return (f"/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey={METHODS_VIEW}")


def _significant(value: float, digits: int = 4) -> float:
    """``value`` to ``digits`` significant digits: what the runs table shows (the evaluation
    records, logged as artifacts, keep every digit)."""
    return float(f"{value:.{digits}g}")


def method_record(params: Params, name: str, compare: dict[str, Any]) -> dict[str, float]:
    """The metrics of one method's run: every number of its evaluation record, ``nfe`` and
    ``denoiser_calls`` of its sample record, ``images_per_s`` and ``sample_wall_s`` where it
    was sampled in this workspace, and its paired difference to the baseline."""
    sampled = _json(paths.sample_metrics(name))
    values = {**_numbers(_json(paths.eval_record(name)))}
    for key in ("nfe", "denoiser_calls"):
        if isinstance(sampled.get(key), int | float):
            values[key] = float(sampled[key])
    timing = read_timing(f"sample@{name}")
    for key in ("images_per_s", "wall_s"):
        if isinstance(timing.get(key), int | float):
            values[f"sample_{key}" if key == "wall_s" else key] = float(timing[key])
    values.update(_numbers(compare.get(name, {})))
    return {k: _significant(v) for k, v in values.items()}


def method_params(params: Params, name: str) -> dict[str, Any]:
    """A method's settings as run params, with the baseline and n it was compared at."""
    spec = params.methods[name].model_dump(mode="json")
    return {"method": name, **spec, "baseline": params.evaluate.baseline_of(params.methods),
            "n_images": params.sample.n_images}


def parent_metrics(per_method: dict[str, dict[str, float]]) -> dict[str, float]:
    """``fid/<method>`` and ``fid_diff/<method>``: a sweep's pipeline runs side by side."""
    return {f"{key}/{name}": values[key] for name, values in per_method.items()
            for key in ("fid", "fid_diff") if key in values}


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


def description(params: Params, name: str, per_method: dict[str, dict[str, float]]) -> str:
    """The run's markdown note: what ran and the headline numbers."""
    baseline = params.evaluate.baseline_of(params.methods)
    lines = [
        f"Pipeline run **{name}** on `{params.data.dataset}` "
        f"({params.process.name} process, {params.train.steps} training steps, "
        f"{params.sample.n_images} images per method).",
        "",
        f"| method | sampler | NFE | FID | ΔFID vs {baseline} [CI] |",
        "|---|---|---|---|---|",
    ]
    for method, spec in params.methods.items():
        m = per_method.get(method, {})
        nfe, fid, diff = m.get("nfe"), m.get("fid"), m.get("fid_diff")
        interval = ("-" if diff is None else
                    f"{diff:+.1f} [{m['fid_diff_ci_low']:+.1f}, {m['fid_diff_ci_high']:+.1f}]")
        lines.append(
            f"| {method} | {spec.sampler} | {'-' if nfe is None else f'{nfe:.0f}'} | "
            f"{'-' if fid is None else f'{fid:.2f}'} | {interval} |"
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
    """Log this evaluated state (a pipeline run and its method runs) unless the store has it;
    returns ``{run_id, name}`` of the pipeline run (the existing one when already logged), or
    {} when tracking is off."""
    context = run_context()
    name = run_name(context["git.commit"])
    key = state_key(params)
    store = open_store(params.tracking.experiment)
    if store is None:
        return {}
    existing = find_state_run(*store, key)
    if existing is not None:
        save_methods_view(*store, key)
        print(f"MLflow: this state ({key}) is already logged as run "
              f"{existing.info.run_name!r} ({existing.info.run_id}); nothing new to log")
        return {"run_id": existing.info.run_id, "name": existing.info.run_name}
    compare = _json(paths.COMPARE)
    per_method = {m: method_record(params, m, compare) for m in params.methods}
    tags = run_tags(params_hash(params), context["git.commit"], kind="pipeline")
    tags.update({"git.dirty": str(context["git.dirty"]), "pipeline.state": key,
                 "mlflow.note.content": description(params, name, per_method)})
    tracker = Tracker.create(name, tags, params.tracking.experiment)
    if tracker is None:
        return {}
    _log_pipeline(tracker, params, per_method)
    for method in params.methods:
        _log_method(tracker, params, method, per_method[method], compare.get(method, {}), tags)
    tracker.set_tags(_link_model(tracker, params))
    tracker.finish("FINISHED")  # last: a crash before this leaves the state unlogged
    save_methods_view(*store, key)
    if not tracker.enabled:
        return {}
    synced = sync_experiment_commits(
        tracker.client, tracker.experiment_id, tracker.uri, repo_root()
    )
    print(f"MLflow run {name!r} ({tracker.run_id}) with {len(params.methods)} method runs in "
          f"{tracker.uri}" + (f"; tagged {synced} experiment run(s) with their commits"
                              if synced else ""))
    print(f"its methods side by side: {methods_view_path(tracker.experiment_id)} in the UI")
    return {"run_id": tracker.run_id, "name": name}


def _log_pipeline(tracker: Tracker, params: Params,
                  per_method: dict[str, dict[str, float]]) -> None:
    """The pipeline run's params, metrics and artifacts."""
    tracker.log_params(flatten(params.model_dump(mode="json")))
    metrics = parent_metrics(per_method)
    metrics.update({f"train/{k}": v for k, v in _numbers(_json(paths.TRAIN_METRICS)).items()})
    metrics.update({f"classifier/{k}": v for k, v in _numbers(_json(paths.CLASSIFIER_METRICS))
                    .items()})
    distilled = _json(paths.DISTILL_METRICS)
    if distilled.get("status") == "ok":  # images seen, their ratio to the teacher's, wall time
        metrics.update({f"distill/{k}": v for k, v in _numbers(distilled).items()})
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
    for path in (*REPORT_FILES, paths.SUMMARY, paths.COMPARE, paths.TRAIN_METRICS,
                 paths.CLASSIFIER_METRICS, paths.DISTILL_METRICS):
        tracker.log_artifact(path, "reports" if path.parent.name == "reports" else "metrics")
    for path in sorted(Path("reports/process").glob("*")):  # the pictures stage
        tracker.log_artifact(path, "process")
    for path in sorted(PROVENANCE_DIR.glob("*.json")):
        tracker.log_artifact(path, "provenance")
    for path in (Path("params.yaml"), Path("dvc.lock")):
        tracker.log_artifact(path)


def _log_method(parent: Tracker, params: Params, method: str, metrics: dict[str, float],
                compared: dict[str, Any], parent_tags: dict[str, str]) -> None:
    """One method's run, nested under ``parent``."""
    scored = _json(paths.eval_record(method))
    tags = {k: v for k, v in parent_tags.items()
            if k.startswith(("dvc.", "git.", "mlflow.source", "params.", "pipeline."))}
    tags.update({"run.kind": "method", "method": method, "mlflow.parentRunId": parent.run_id,
                 "status": scored.get("status", "missing"),
                 "verdict": scored.get("verdict"), "vs_baseline": compared.get("vs_baseline")})
    child = parent.child(method, tags)
    if child is None:
        return
    child.log_params(method_params(params, method))
    child.log_metrics(metrics)
    child.log_artifact(paths.grid_path(method))
    child.finish("FINISHED")


def sync(params: Params) -> int:
    """Tag the runs of finished DVC experiments with their commits (``diffusion track --sync``)."""
    store = open_store(params.tracking.experiment)
    if store is None:
        return 0
    count = sync_experiment_commits(*store, repo_root())
    print(f"tagged {count} experiment run(s) with their commits")
    return count
