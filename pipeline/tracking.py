"""All MLflow code: a training run per trained model, and one run per pipeline run.

* The **train** stage creates a *training run* (tag ``run.kind=train``): the validated params,
  the loss per step, the checkpoint file, and the trained network as an **MLflow Model** (a
  pyfunc that generates images, :mod:`pipeline.mlflow_model`) registered in the Model Registry
  under ``tracking.model_name``. The run is tagged with the model file's SHA-256.
* The last stage, **track**, creates the *pipeline run* (tag ``run.kind=pipeline``) of a
  ``dvc repro`` or DVC experiment: named after the experiment (``$DVC_EXP_NAME``) or, for a plain
  ``dvc repro``, ``repro-<commit>``; all validated params; ``fid/<method>`` and
  ``fid_diff/<method>``; ``train/loss``; the grids, report figures and metrics files as
  artifacts; and under it one nested *method run* per method (``run.kind=method``) with the
  method's settings as params and its scores as metrics (:mod:`pipeline.track`). It links to
  the training run of its model through the tag ``train.run_id`` (found by the model's
  SHA-256). A store that has no run with that model (a clone whose train stage came from the
  DVC cache) gets the model logged and registered by the pipeline run itself, so every store
  can load the model it evaluated.

The track stage is ``always_changed``: DVC runs it on every ``dvc repro`` and ``dvc exp run``,
also when nothing upstream re-ran (a fresh clone whose outputs match ``dvc.lock``). It logs a
state once: the pipeline run carries the tag ``pipeline.state`` (a digest of the params and the
evaluated files), and a state the store already holds is not logged again.

The store is resolved at run time: ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<root>/mlflow.db``
with artifacts in ``<root>/mlartifacts``, where ``<root>`` is ``$DVC_ROOT`` (the main repository,
also for queued experiments running in temporary workspaces) or the git top level. Nothing that
names a machine's path is written to a tracked file. Writers of a local sqlite store take a file
lock (``mlflow.db.lock``), so parallel queue workers never see "database is locked".

Tracking is best effort: an MLflow failure prints one warning and turns the tracker off; it never
fails a stage or touches its results. Only rank 0 of a distributed run creates a tracker.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.files import read_json, repo_root, write_json

DEFAULT_EXPERIMENT = "diffusion"
#: what the MLflow UI needs to open an experiment on its runs table (not the GenAI view)
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def tracking_uri(root: Path | None = None) -> str:
    """``$MLFLOW_TRACKING_URI`` or the sqlite store at the repository root."""
    root = root or repo_root()
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"


def experiment_name(configured: str = DEFAULT_EXPERIMENT) -> str:
    """``$MLFLOW_EXPERIMENT_NAME`` or the configured ``tracking.experiment``."""
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or configured


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock on a local sqlite store while writing to it (no-op otherwise)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri[len("sqlite:///") :])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _quiet_mlflow() -> None:
    """Keep MLflow's and its database migrations' chatter out of the stage logs.

    Runs after ``import mlflow``, which installs its own INFO-level logger.
    """
    import mlflow  # noqa: F401  (configures the loggers silenced below)

    for name in ("mlflow", "alembic", "sqlalchemy", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"mlflow(\..*)?$")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"mlflow")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _warn(action: str, exc: BaseException) -> None:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    print(f"warning: MLflow {action} failed, tracking is off: {first}", file=sys.stderr)


class Tracker:
    """One MLflow run, written through ``MlflowClient`` (no global active-run state).

    Every method swallows MLflow errors after printing one warning, then does nothing.
    """

    def __init__(self, client: Any, run_id: str, experiment_id: str, uri: str) -> None:
        self.client = client
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.uri = uri
        self.enabled = True

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def create(
        cls, run_name: str, tags: dict[str, str], experiment: str = DEFAULT_EXPERIMENT
    ) -> Tracker | None:
        """Start a new run in ``experiment_name(experiment)``; None if MLflow is unusable."""
        store = open_store(experiment)
        if store is None:
            return None
        client, experiment_id, uri = store
        try:
            with store_lock(uri):
                run = client.create_run(experiment_id, run_name=run_name, tags=tags)
            return cls(client, run.info.run_id, experiment_id, uri)
        except Exception as exc:  # noqa: BLE001 - tracking must never fail a stage
            _warn("run creation", exc)
            return None

    @classmethod
    def reopen(cls, link_file: Path) -> Tracker | None:
        """The run named in ``link_file`` (written by :meth:`write_link`) in today's store."""
        try:
            link = read_json(link_file)
            run_id = link["run_id"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        try:
            _quiet_mlflow()
            from mlflow.tracking import MlflowClient

            uri = tracking_uri()
            client = MlflowClient(tracking_uri=uri)
            run = client.get_run(run_id)
            return cls(client, run_id, run.info.experiment_id, uri)
        except Exception:  # noqa: BLE001 - another store, or a deleted run: start a new one
            return None

    def child(self, run_name: str, tags: dict[str, str]) -> Tracker | None:
        """A new run in this run's experiment and store (``tags`` should name the parent as
        ``mlflow.parentRunId`` to nest it); None when tracking is off."""
        run = self._call("run creation", self.client.create_run, self.experiment_id,
                         run_name=run_name, tags={k: str(v) for k, v in tags.items()
                                                  if v is not None})
        return None if run is None else Tracker(self.client, run.info.run_id,
                                                self.experiment_id, self.uri)

    def write_link(self, link_file: Path) -> None:
        """Remember the run (id only: the store is resolved again at run time)."""
        write_json(link_file, {"run_id": self.run_id, "experiment_id": self.experiment_id})

    # -- logging ----------------------------------------------------------------------------
    def _call(self, action: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled:
            return None
        try:
            with store_lock(self.uri):
                return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            _warn(action, exc)
            self.enabled = False
            return None

    def log_params(self, params: dict[str, Any], only_new: bool = False) -> None:
        """Log flat ``key -> value`` params (values up to 6000 characters).

        MLflow params are write-once; ``only_new`` skips keys the run already has (a resumed
        run whose bookkeeping settings changed keeps the values it started with).
        """
        from mlflow.entities import Param

        have: dict[str, str] = {}
        if only_new:
            run = self._call("reading params", self.client.get_run, self.run_id)
            if run is None:
                return
            have = run.data.params
        items = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in have]
        for start in range(0, len(items), 100):  # the store's batch limit
            self._call("log_params", self._log_batch, params=items[start : start + 100])

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Log the numeric entries of ``metrics`` (others are skipped)."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        items = [
            Metric(k, float(v), stamp, step or 0)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        ]
        for start in range(0, len(items), 1000):
            self._call("log_metrics", self._log_batch, metrics=items[start : start + 1000])

    def log_history(self, key: str, values: list[tuple[int, float]]) -> None:
        """Log ``key`` at several steps (e.g. the loss curve), in batches."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        items = [Metric(key, float(v), stamp, int(s)) for s, v in values]
        for start in range(0, len(items), 1000):
            self._call("log_metrics", self._log_batch, metrics=items[start : start + 1000])

    def _log_batch(self, **kwargs: Any) -> None:
        self.client.log_batch(self.run_id, **kwargs)

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
        if items:
            self._call("set_tags", self._log_batch, tags=items)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if Path(path).exists():
            self._call(
                f"logging {path}", self.client.log_artifact, self.run_id, str(path),
                artifact_path,
            )

    def log_model(
        self, model_file: Path, registered_name: str | None, sha256: str
    ) -> str | None:
        """Log ``model_file`` as an MLflow pyfunc model (``<run>/model``) and register it
        under ``registered_name`` (None: do not register). Returns the version or None."""
        if not self.enabled:
            return None
        from pipeline.mlflow_model import log_pyfunc

        version = self._call(
            "logging the model", log_pyfunc, self.uri, self.run_id, model_file, registered_name
        )
        self.set_tags({"model.sha256": sha256, "model.logged": "true"})
        if version is not None:
            self.set_tags({"model.registered_name": registered_name, "model.version": version})
        return version

    def mark_running(self) -> None:
        """Set a re-opened run's status back to ``RUNNING``."""
        self._call("updating the run", self.client.update_run, self.run_id, "RUNNING")

    def finish(self, status: str = "FINISHED") -> None:
        """Mark the run ``FINISHED``, ``FAILED`` or ``KILLED``."""
        self._call("ending the run", self.client.set_terminated, self.run_id, status)

    # -- queries ----------------------------------------------------------------------------
    def find_model_run(self, sha256: str) -> Any | None:
        """The newest run of this experiment that logged the model with this SHA-256."""
        runs = self._call(
            "searching runs",
            self.client.search_runs,
            [self.experiment_id],
            filter_string=f"tags.`model.sha256` = '{sha256}' and tags.`model.logged` = 'true'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0] if runs else None


def open_store(experiment: str = DEFAULT_EXPERIMENT) -> tuple[Any, str, str] | None:
    """``(client, experiment_id, uri)`` of today's store, creating the experiment if needed."""
    try:
        _quiet_mlflow()
        from mlflow.tracking import MlflowClient

        uri = tracking_uri()
        client = MlflowClient(tracking_uri=uri)
        with store_lock(uri):
            return client, _experiment_id(client, uri, experiment_name(experiment)), uri
    except Exception as exc:  # noqa: BLE001 - tracking must never fail a stage
        _warn("opening the store", exc)
        return None


def find_state_run(client: Any, experiment_id: str, uri: str, key: str) -> Any | None:
    """The newest finished pipeline run tagged ``pipeline.state = key``, or None (also when
    the search fails: then the state is logged again rather than lost)."""
    try:
        with store_lock(uri):
            runs = client.search_runs(
                [experiment_id],
                filter_string=(f"tags.`pipeline.state` = '{key}' and tags.`run.kind` = 'pipeline'"
                               " and attributes.status = 'FINISHED'"),
                order_by=["attributes.start_time DESC"], max_results=1,
            )
    except Exception as exc:  # noqa: BLE001
        _warn("searching runs", exc)
        return None
    return runs[0] if runs else None


def _experiment_id(client: Any, uri: str, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = None
        if uri.startswith("sqlite:"):
            location = (repo_root() / "mlartifacts").as_uri()
        try:
            return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
        except Exception:  # another process created it first
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.tags.get("mlflow.experimentKind") != EXPERIMENT_KIND["mlflow.experimentKind"]:
        for key, value in EXPERIMENT_KIND.items():
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def run_tags(params_hash: str, commit: str | None, kind: str) -> dict[str, str]:
    """Tags that tie an MLflow run to its DVC experiment, its baseline and its commit.

    During a DVC experiment the experiment's own commit does not exist yet: ``git.commit`` is
    the commit the run started from (the baseline) until :func:`sync_experiment_commits` sets
    ``dvc.exp_rev`` and ``git.commit`` to the experiment's commit.
    """
    tags = {
        "run.kind": kind,
        "params.hash": params_hash,
        "dvc.stage": os.environ.get("DVC_STAGE", "manual"),
        "dvc.exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "dvc.baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", ""),
    }
    if commit:
        tags["git.commit"] = commit
        tags["mlflow.source.git.commit"] = commit
    return tags


def run_name(commit: str | None) -> str:
    """The DVC experiment's name, else ``repro-<short commit>``.

    Whether the tree had local edits is the tag ``git.dirty``, not part of the name: during
    ``dvc repro`` DVC itself rewrites tracked outputs, so the tree is always dirty by then."""
    exp = os.environ.get("DVC_EXP_NAME")
    if exp:
        return exp
    return f"repro-{commit[:7]}" if commit else "repro"


def experiment_refs(root: Path) -> dict[str, str]:
    """DVC experiment name -> its commit, read from the ``refs/exps`` refs of the git repo."""
    try:
        out = subprocess.run(
            ["git", "for-each-ref", "--format=%(refname) %(objectname)", "refs/exps"],
            cwd=root, capture_output=True, text=True, timeout=30, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    refs: dict[str, str] = {}
    for line in out.splitlines():
        ref, _, sha = line.partition(" ")
        parts = ref.split("/")
        if len(parts) == 5 and len(parts[2]) == 2:  # refs/exps/<sha[:2]>/<sha[2:]>/<name>
            refs[parts[-1]] = sha
    return refs


def sync_experiment_commits(client: Any, experiment_id: str, uri: str, root: Path) -> int:
    """Tag the runs of finished DVC experiments with their commit (``dvc.exp_rev`` and
    ``git.commit``, read from the ``refs/exps`` of the repository at ``root``); returns how many
    runs were updated. MLflow errors print one warning."""
    refs = experiment_refs(root)
    if not refs:
        return 0
    updated = 0
    try:
        with store_lock(uri):
            runs = client.search_runs(
                [experiment_id], filter_string="tags.`dvc.exp_name` != ''", max_results=5000
            )
            for run in runs:
                sha = refs.get(run.data.tags.get("dvc.exp_name", ""))
                if sha and run.data.tags.get("dvc.exp_rev") != sha:
                    for key in ("dvc.exp_rev", "git.commit", "mlflow.source.git.commit"):
                        client.set_tag(run.info.run_id, key, sha)
                    updated += 1
    except Exception as exc:  # noqa: BLE001
        _warn("tagging experiment runs", exc)
    return updated
