"""Stage ``train``: the U-Net on the prepared train split, one or several processes (torchrun).

Builds the network and noise process from ``params.yaml`` and calls
:func:`diffusion_core.training.train`, which checkpoints into ``runs/train/checkpoints`` (kept
between DVC runs: an interrupted stage resumes when the config hash matches) and writes
``runs/train/model.pt``. Rank 0 alone writes ``runs/train/loss.csv`` and ``metrics/train.json``
and talks to MLflow: one *training run* with the params, the loss per step, the checkpoint and
the model as a registered MLflow Model (see :mod:`pipeline.tracking`).

The loss log of a run in progress lives next to its checkpoints (``loss-<hash>.csv``), so a
resumed run keeps its loss history; its MLflow run id is kept in ``runs/train/mlflow-<hash>.json``
(git-ignored, outside the DVC-cached checkpoints), so a resumed run logs into the same run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from diffusion_core.distributed import DistInfo, broadcast_object, cleanup, setup_distributed
from diffusion_core.processes import make_process
from diffusion_core.training import TrainConfig, TrainResult, resolve_precision, train
from diffusion_core.unet import UNet
from pipeline import paths
from pipeline.config import Params, ParamsError
from pipeline.dataset import dataset_info
from pipeline.errors import StageError, StageInterruptedError
from pipeline.files import (
    file_digest,
    run_context,
    write_json,
    write_provenance,
    write_text,
    write_timing,
)
from pipeline.locks import FolderLock
from pipeline.params_digest import flatten, params_hash, train_config_hash
from pipeline.prepare import load_split, tensor_digest
from pipeline.progress import Progress
from pipeline.tracking import Tracker, run_name, run_tags


def build_unet(params: Params) -> UNet:
    """The U-Net ``params.model`` describes for the dataset (a ParamsError if it cannot exist)."""
    m, info = params.model, dataset_info(params)
    try:
        return UNet(
            in_channels=info.channels,
            image_size=info.image_size,
            base_channels=m.base_channels,
            channel_mults=m.channel_mults,
            num_res_blocks=m.num_res_blocks,
            attention_resolutions=m.attention_resolutions,
            dropout=m.dropout,
            num_classes=info.num_classes if m.conditional else 0,
            patch_size=m.patch_size,
        )
    except ValueError as exc:
        raise ParamsError(f"model: {exc}") from None


def train_config(params: Params) -> TrainConfig:
    """The library's training configuration from ``params.train`` and ``params.model``."""
    t = params.train
    return TrainConfig(
        steps=t.steps,
        batch_size=t.batch_size,
        lr=t.lr,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_steps,
        lr_decay=t.lr_decay,
        grad_clip=t.grad_clip,
        ema_decay=t.ema_decay,
        ema_warmup=t.ema_warmup,
        ema_std=t.ema_std,
        loss_weighting=t.loss_weighting,
        min_snr_gamma=t.min_snr_gamma,
        sigma_data=t.sigma_data,
        t_sampling=t.t_sampling,
        p_mean=t.p_mean,
        p_std=t.p_std,
        logit_mean=t.logit_mean,
        logit_std=t.logit_std,
        p_uncond=t.p_uncond if params.model.conditional else 0.0,
        guide_at=t.guide_at,
        prediction=params.model.prediction,
        mixed_precision=t.mixed_precision,
        compile=t.compile,
        compile_mode=t.compile_mode,
        channels_last=t.channels_last,
        checkpoint_every=t.checkpoint_every,
        keep_last=t.keep_last,
        log_every=t.log_every,
        seed=params.seed,
    )


class LossLog:
    """Append-only ``step,loss,lr,grad_norm`` rows kept with the checkpoints of one config."""

    FIELDS = ("step", "loss", "lr", "grad_norm")

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, step: int, values: dict[str, float]) -> None:
        row = [str(step)] + [repr(float(values.get(k, float("nan")))) for k in self.FIELDS[1:]]
        with self.path.open("a") as f:
            f.write(",".join(row) + "\n")

    def rows(self, last_step: int) -> list[dict[str, float]]:
        """One row per step up to ``last_step``; a step logged twice (after a resume) keeps the
        later value, a torn last line is skipped."""
        by_step: dict[int, dict[str, float]] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                parts = line.split(",")
                if len(parts) != len(self.FIELDS):
                    continue
                try:
                    step, *values = int(parts[0]), *map(float, parts[1:])
                except ValueError:
                    continue
                if step <= last_step:
                    by_step[step] = dict(zip(self.FIELDS, [step, *values], strict=True))
        return [by_step[s] for s in sorted(by_step)]


def _write_loss_csv(rows: list[dict[str, float]]) -> None:
    lines = [",".join(LossLog.FIELDS)]
    lines += [
        ",".join(f"{r[k]:.6g}" if k != "step" else str(int(r[k])) for k in LossLog.FIELDS)
        for r in rows
    ]
    write_text(paths.LOSS_CSV, "\n".join(lines) + "\n")


def _forget_other_runs(config_hash: str) -> None:
    """Drop loss logs and MLflow links of configurations other than ``config_hash``."""
    for folder, pattern in ((paths.CHECKPOINTS, "loss-*.csv"), (paths.TRAIN_DIR, "mlflow-*.json")):
        for path in folder.glob(pattern):
            if config_hash not in path.name:
                path.unlink(missing_ok=True)


def _open_tracker(params: Params, config_hash: str) -> Tracker | None:
    """Re-open the MLflow run of an interrupted run of this config, or start a new one."""
    link = paths.TRAIN_DIR / f"mlflow-{config_hash}.json"
    tracker = Tracker.reopen(link) if link.is_file() else None
    fresh = tracker is None
    if fresh:
        context = run_context()
        tags = run_tags(params_hash(params), context["git.commit"], kind="train")
        tags["mlflow.note.content"] = (
            f"Training of {params.data.dataset} ({params.process.name} process, "
            f"{params.model.prediction} prediction, {params.train.steps} steps)."
        )
        name = "train-" + run_name(context["git.commit"])
        tags["git.dirty"] = str(context["git.dirty"])
        tracker = Tracker.create(name, tags, params.tracking.experiment)
        if tracker is None:
            return None
        tracker.write_link(link)
    else:
        tracker.mark_running()
    tracker.log_params(flatten(params.model_dump(mode="json")), only_new=not fresh)
    tracker.set_tags({"train.config_hash": config_hash, "params.hash": params_hash(params)})
    return tracker


def _device_summary(dist: DistInfo, precision: str) -> str:
    return f"{dist.world_size} x {dist.device.type}, {precision}"


def run(params: Params) -> TrainResult:
    """Train (resuming if possible); returns the library's result on every rank."""
    torch.set_num_threads(params.train.threads_per_proc)
    try:
        dist = setup_distributed()
    except (ValueError, RuntimeError) as exc:
        raise StageError(f"cannot start distributed training: {exc}") from None
    lock = _lock_checkpoints(dist)
    tracker: Tracker | None = None
    try:
        if dist.world_size != params.train.nproc and dist.is_main:
            print(f"note: train.nproc={params.train.nproc} but {dist.world_size} process(es) run")
        images, labels = load_split(paths.TRAIN_DATA)
        config_hash = train_config_hash(params, tensor_digest(images, labels))
        with torch.random.fork_rng(devices=[]):  # the initial weights depend on the seed only
            torch.manual_seed(params.seed)
            net = build_unet(params)
        process = make_process(params.process.name, **params.process.factory_kwargs())
        cfg = train_config(params)
        if cfg.batch_size > images.shape[0]:
            raise ParamsError(
                f"train.batch_size: larger than the {images.shape[0]} training images "
                f"(got {cfg.batch_size})"
            )
        log: LossLog | None = None
        if dist.is_main:
            log, tracker = _start_main(params, config_hash, cfg, dist, net, images.shape[0])

        # one line per log_every steps without a TTY; a bar with loss, lr, images/s and ETA
        bar = Progress(cfg.steps, "train", unit="step", every=1, enabled=dist.is_main)

        def on_log(step: int, values: dict[str, float]) -> None:
            assert log is not None
            log.append(step, values)
            rate = bar.rate()
            extra = {"img/s": round(rate * cfg.batch_size)} if rate else {}
            bar.goto(step, loss=values["loss"], lr=values["lr"], **extra)
            if tracker is not None:
                tracker.log_metrics({f"train/{k}": v for k, v in values.items()}, step=step)

        start = time.perf_counter()
        result = train(
            net,
            process,
            images,
            labels if params.model.conditional else None,
            cfg,
            checkpoint_dir=paths.CHECKPOINTS,
            config_hash=config_hash,
            dist=dist,
            on_log=on_log,
            progress=False,
            model_path=paths.MODEL,
            archive_dir=paths.STALE,
        )
        wall_s = time.perf_counter() - start
        bar.close()
        if result.interrupted:
            raise StageInterruptedError(result.signal or 2)
        if dist.is_main:
            assert log is not None
            _finish(params, result, log, tracker, config_hash, dist, wall_s)
        return result
    except BaseException as exc:
        if tracker is not None:
            stopped = isinstance(exc, StageInterruptedError | KeyboardInterrupt)
            tracker.finish("KILLED" if stopped else "FAILED")
        if isinstance(exc, FloatingPointError):  # the library's NaN guard: a one-line failure
            raise StageError(str(exc)) from None
        raise
    finally:
        if lock is not None:
            lock.release()
        cleanup()


def _start_main(params: Params, config_hash: str, cfg: TrainConfig, dist: DistInfo, net: UNet,
                n_images: int) -> tuple[LossLog, Tracker | None]:
    """Rank 0, before training: the loss log and MLflow run of ``config_hash`` (older runs'
    files forgotten) and one line saying what trains where."""
    paths.CHECKPOINTS.mkdir(parents=True, exist_ok=True)
    _forget_other_runs(config_hash)
    log = LossLog(paths.CHECKPOINTS / f"loss-{config_hash}.csv")
    tracker = _open_tracker(params, config_hash)
    precision = resolve_precision(cfg.mixed_precision, dist.device)
    if tracker is not None:  # what `auto` became on this machine
        tracker.set_tags({"train.precision": precision})
    print(
        f"training {sum(p.numel() for p in net.parameters()):,} parameters on "
        f"{n_images} images ({_device_summary(dist, precision)}), config {config_hash}",
        flush=True,
    )
    return log, tracker


def _lock_checkpoints(dist: DistInfo) -> FolderLock | None:
    """Rank 0 takes the checkpoint folder's lock; every rank fails alike if another has it."""
    lock, refusal = None, None
    if dist.is_main:
        try:
            lock = FolderLock.acquire(paths.CHECKPOINTS)
        except StageError as exc:
            refusal = str(exc)
    refusal = broadcast_object(refusal)
    if refusal is not None:
        cleanup()
        raise StageError(refusal)
    return lock


def _finish(
    params: Params,
    result: TrainResult,
    log: LossLog,
    tracker: Tracker | None,
    config_hash: str,
    dist: DistInfo,
    wall_s: float,
) -> None:
    """Rank 0: loss curve, metrics file, MLflow artifacts and the run link for later stages."""
    rows = log.rows(result.step)
    _write_loss_csv(rows)
    sha = file_digest(paths.MODEL)
    record: dict[str, Any] = {"steps": result.step, "final_loss": result.loss}
    write_json(paths.TRAIN_METRICS, record)
    write_provenance("train", params, config_hash=config_hash, model_sha256=sha)
    write_timing("train", wall_s=round(wall_s, 3), resumed=result.resumed,
                 world_size=dist.world_size, device=dist.device.type)
    if tracker is not None:
        tracker.log_metrics({"train/final_loss": result.loss, "train/wall_s": wall_s})
        tracker.log_artifact(paths.MODEL, "checkpoint")
        tracker.log_artifact(paths.LOSS_CSV, "train")
        registered = params.tracking.model_name if params.tracking.register_model else None
        version = tracker.log_model(paths.MODEL, registered, sha)
        if version is not None:
            print(f"registered MLflow model {registered} version {version}")
        tracker.finish("FINISHED")
    print(f"trained {result.step} steps, final loss {result.loss:.5f} in {wall_s:.1f} s")
