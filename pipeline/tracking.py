"""All MLflow code: one MLflow run per pipeline run, shared by the stages through a link file.

The train stage creates the run and writes ``runs/train/mlflow_run.json``
(``{run_id, experiment_id, tracking_uri}``); sample, evaluate and report re-open that run by id
and log method-prefixed metrics (``fid_classifier/ddim50``). The store is
``sqlite:///<repo root>/mlflow.db`` with artifacts in ``<repo root>/mlartifacts`` unless
``MLFLOW_TRACKING_URI`` says otherwise; the experiment is ``$MLFLOW_EXPERIMENT_NAME`` or
``diffusion``. Tracking is best effort: an MLflow failure prints one warning and turns the
tracker off, it never fails a stage or touches its results. Only rank 0 may create a tracker.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from pipeline.files import read_json, repo_root, write_json

DEFAULT_EXPERIMENT = "diffusion"


def tracking_uri(root: Path | None = None) -> str:
    """``$MLFLOW_TRACKING_URI`` or the sqlite store at the repository root."""
    root = root or repo_root()
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"


def _quiet_mlflow() -> None:
    """Keep MLflow's and its database migrations' chatter out of the stage logs.

    Runs after ``import mlflow``, which installs its own INFO-level logger.
    """
    import mlflow  # noqa: F401  (configures the loggers silenced below)

    for name in ("mlflow", "alembic", "sqlalchemy", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"mlflow(\..*)?$")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"mlflow")


def _warn(action: str, exc: BaseException) -> None:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    print(f"warning: MLflow {action} failed, tracking is off: {first}", file=sys.stderr)


class Tracker:
    """One MLflow run, written through ``MlflowClient`` (no global active-run state).

    Every method swallows MLflow errors after printing one warning, then does nothing.
    """

    def __init__(self, client: Any, run_id: str, experiment_id: str, uri: str) -> None:
        self._client = client
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.uri = uri
        self.enabled = True

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def create(cls, run_name: str, tags: dict[str, str]) -> Tracker | None:
        """Start a new run in the project's experiment; None if MLflow is unusable."""
        try:
            _quiet_mlflow()
            from mlflow.tracking import MlflowClient

            uri = tracking_uri()
            client = MlflowClient(tracking_uri=uri)
            experiment_id = _experiment_id(client, uri)
            run = client.create_run(experiment_id, run_name=run_name, tags=tags)
            return cls(client, run.info.run_id, experiment_id, uri)
        except Exception as exc:  # noqa: BLE001 - tracking must never fail a stage
            _warn("run creation", exc)
            return None

    @classmethod
    def reopen(cls, link_file: Path) -> Tracker | None:
        """The run named in ``link_file`` (written by :meth:`write_link`); None if absent."""
        try:
            link = read_json(link_file)
        except (OSError, ValueError) as exc:
            print(f"warning: no MLflow run to log to ({link_file}: {exc})", file=sys.stderr)
            return None
        if not link.get("run_id"):
            print(f"warning: {link_file} names no MLflow run; tracking is off", file=sys.stderr)
            return None
        try:
            _quiet_mlflow()
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=link["tracking_uri"])
            client.get_run(link["run_id"])
            return cls(client, link["run_id"], link["experiment_id"], link["tracking_uri"])
        except Exception as exc:  # noqa: BLE001
            _warn("re-opening the training run", exc)
            return None

    def link(self) -> dict[str, str]:
        return {
            "run_id": self.run_id,
            "experiment_id": self.experiment_id,
            "tracking_uri": self.uri,
        }

    def write_link(self, link_file: Path) -> None:
        write_json(link_file, self.link())

    # -- logging ----------------------------------------------------------------------------
    def _call(self, action: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        if not self.enabled:
            return
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            _warn(action, exc)
            self.enabled = False

    def log_params(self, params: dict[str, Any], only_new: bool = False) -> None:
        """Log flat ``key -> value`` params (values up to 6000 characters).

        MLflow params are write-once; ``only_new`` skips keys the run already has (a resumed
        run whose bookkeeping settings changed keeps the values it started with).
        """
        from mlflow.entities import Param

        have: dict[str, str] = {}
        if only_new and self.enabled:
            try:
                have = self._client.get_run(self.run_id).data.params
            except Exception as exc:  # noqa: BLE001
                _warn("reading params", exc)
                self.enabled = False
                return
        items = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in have]
        for start in range(0, len(items), 100):  # the store's batch limit
            self._call("log_params", self._log_batch, params=items[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log numeric metrics; non-numbers and NaN-free checks are the caller's business."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        items = [
            Metric(k, float(v), stamp, step or 0)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        ]
        if items:
            self._call("log_metrics", self._log_batch, metrics=items)

    def _log_batch(self, **kwargs: Any) -> None:
        self._client.log_batch(self.run_id, **kwargs)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self._call("set_tag", self._client.set_tag, self.run_id, key, str(value))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._call(
            f"logging {path}", self._client.log_artifact, self.run_id, str(path), artifact_path
        )

    def mark_running(self) -> None:
        """Set a re-opened run's status back to ``RUNNING``."""
        self._call("updating the run", self._client.update_run, self.run_id, "RUNNING")

    def finish(self, status: str = "FINISHED") -> None:
        """Mark the run ``FINISHED``, ``FAILED`` or ``KILLED``."""
        self._call("ending the run", self._client.set_terminated, self.run_id, status)


def _experiment_id(client: Any, uri: str) -> str:
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:"):
        location = (repo_root() / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # another process created it first
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def run_tags(params_hash: str, commit: str | None) -> dict[str, str]:
    """Tags that tie an MLflow run to its DVC experiment and commit."""
    tags = {
        "params.hash": params_hash,
        "dvc.stage": os.environ.get("DVC_STAGE", "manual"),
        "dvc.exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "dvc.baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", ""),
    }
    if commit:
        tags["git.commit"] = commit
        tags["mlflow.source.git.commit"] = commit
    return tags
