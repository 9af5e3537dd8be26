"""Stage ``distill``: progressive distillation (Salimans & Ho 2022, Algorithm 2) of the trained
model into students of ``N/2, N/4, ..., N/2^rounds`` deterministic DDIM steps.

The first teacher is the EMA network of ``runs/train/model.pt`` on the grid
``process.time_grid(N, "trailing")`` (``N = distill.teacher_steps``); round ``r`` starts its
student as a copy of its teacher (:func:`~diffusion_core.distillation.start_round`), trains it
``distill.steps_per_round`` steps on :func:`~diffusion_core.distillation.distill_round` (the
x-target of two teacher DDIM steps, ``w = max(SNR, 1)``; the student outputs
``distill.prediction``) with an EMA, writes the EMA as ``runs/distill/student_<N/2^r>.pt`` (a model
file like ``runs/train/model.pt``, which ``methods.<m>.student: k`` samples with ``ddim``, eta 0,
trailing spacing) and hands it on as the next round's teacher. A class-conditional student sees
the train stage's label dropout (``train.p_uncond``), so classifier-free guidance still works on
it; the teacher's target for a dropped label is its own unconditional one.

Under ``torchrun`` (``distill.nproc`` processes) the student is wrapped in DDP and rank ``r`` of
``W`` takes the ``r``-th slice of each global batch (:class:`~diffusion_core.training.BatchSampler`)
and its own noise stream; the students therefore depend on ``distill.nproc`` (part of the resume
hash). ``runs/distill/checkpoint.pt`` (atomic, every ``checkpoint_every`` steps and after each
round) holds the round, step, student, optimiser and EMA: a re-run with the same settings resumes
exactly where it stopped. ``metrics/distill.json`` states the compute in images seen per round and
in all, beside the teacher's (``train.steps * train.batch_size``), and the wall time. With
``distill.enabled: false`` the stage writes ``runs/distill/skipped.json`` and a skipped record,
and no students.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from diffusion_core.checkpoint import load_checkpoint, save_atomic
from diffusion_core.denoiser import Denoiser
from diffusion_core.distillation import distill_round, start_round
from diffusion_core.distributed import (
    DistInfo,
    barrier,
    cleanup,
    data_parallel,
    setup_distributed,
)
from diffusion_core.ema import EMA
from diffusion_core.processes import NoiseProcess, make_process
from diffusion_core.training import BatchSampler, derive_seed, lr_at, model_file
from diffusion_core.unet import UNet
from pipeline import paths
from pipeline.config import Params
from pipeline.errors import StageError
from pipeline.files import (
    file_digest,
    read_model_file,
    run_context,
    write_json,
    write_provenance,
    write_timing,
)
from pipeline.params_digest import distill_config_hash, flatten, params_hash
from pipeline.prepare import load_split
from pipeline.progress import Progress
from pipeline.tracking import Tracker, run_name, run_tags


@dataclass
class Teacher:
    """A model file's EMA network, its process and prediction."""

    net: nn.Module
    process: NoiseProcess
    prediction: str


@dataclass
class RoundState:
    """What a round resumes from: its index, the next step, the student, optimiser and EMA."""

    index: int
    step: int
    net: nn.Module
    optimizer: torch.optim.Optimizer
    ema: EMA
    wall_s: float = 0.0
    loss: float = float("nan")
    history: list[dict[str, Any]] = field(default_factory=list)


def load_teacher(path: Any, device: torch.device) -> Teacher:
    """The EMA network of model file ``path`` (eval mode, frozen) on ``device``."""
    m = read_model_file(path)
    net = UNet(**m["model_config"])
    net.load_state_dict(m["ema"])
    net = net.to(device).eval().requires_grad_(False)
    return Teacher(net, make_process(**m["process"]), m["prediction"])


def _skip(params: Params, reason: str) -> dict[str, Any]:
    """No students: remove any earlier ones, write the skipped record."""
    _forget_students()
    paths.DISTILL_CHECKPOINT.unlink(missing_ok=True)
    record = {"status": "skipped", "reason": reason}
    write_json(paths.DISTILL_SKIPPED, record)
    write_json(paths.DISTILL_METRICS, record)
    write_provenance("distill", params)
    print(f"distill: skipped ({reason})")
    return record


def _forget_students() -> None:
    for path in paths.DISTILL_DIR.glob("student_*.pt"):
        path.unlink()


def batches(images: Tensor, labels: Tensor | None, params: Params, dist: DistInfo,
            round_index: int, null_label: int | None) -> Callable[[int], tuple[Tensor, Any]]:
    """``batch(step)``: this rank's slice of global batch ``step`` of round ``round_index``
    (shuffled per round), labels replaced by the null label with probability ``train.p_uncond``
    (drawn for the whole global batch from a generator of ``(seed, round, step)``)."""
    d = params.distill
    sampler = BatchSampler(images.shape[0], d.batch_size,
                           derive_seed(params.seed, "distill-data", round_index),
                           dist.rank, dist.world_size)
    p_uncond = params.train.p_uncond if labels is not None and null_label is not None else 0.0
    local = d.batch_size // dist.world_size
    lo = dist.rank * local

    def batch(step: int) -> tuple[Tensor, Tensor | None]:
        idx = sampler.local_batch(step)
        x0 = images[idx].to(dist.device)
        if labels is None:
            return x0, None
        y = labels[idx].clone()
        if p_uncond > 0:
            g = torch.Generator().manual_seed(
                derive_seed(params.seed, "distill-uncond", round_index, step))
            drop = (torch.rand(d.batch_size, generator=g) < p_uncond)[lo:lo + local]
            y[drop] = int(null_label)  # type: ignore[arg-type]
        return x0, y.to(dist.device)

    return batch


def new_round(index: int, teacher: nn.Module, params: Params) -> RoundState:
    """Round ``index``'s student (a copy of ``teacher``), its Adam optimiser and EMA."""
    net = start_round(teacher)
    opt = torch.optim.Adam(net.parameters(), lr=params.distill.lr)
    return RoundState(index, 0, net, opt, EMA(net, decay=params.distill.ema_decay, warmup=True))


def save_state(state: RoundState, config_hash: str) -> None:
    """``runs/distill/checkpoint.pt``: the round's full state, atomically (rank 0)."""
    save_atomic({
        "config_hash": config_hash, "round": state.index, "step": state.step,
        "student": {k: v.detach().cpu() for k, v in state.net.state_dict().items()},
        "optimizer": state.optimizer.state_dict(), "ema": state.ema.state_dict(),
        "wall_s": state.wall_s, "loss": state.loss, "history": state.history,
    }, paths.DISTILL_CHECKPOINT)


def resume_point(config_hash: str) -> dict[str, Any] | None:
    """The checkpoint of this configuration, or None (an older configuration's files, or a
    checkpoint that does not load, start afresh)."""
    try:
        ck = load_checkpoint(paths.DISTILL_CHECKPOINT)
    except Exception:  # noqa: BLE001 - missing or unreadable: start again
        return None
    return ck if ck.get("config_hash") == config_hash else None


def restore(ck: dict[str, Any], teacher: nn.Module, params: Params) -> RoundState:
    """The round state a checkpoint holds (the student starts as a copy of ``teacher``)."""
    state = new_round(int(ck["round"]), teacher, params)
    state.net.load_state_dict(ck["student"])
    state.optimizer.load_state_dict(ck["optimizer"])
    state.ema.load_state_dict(ck["ema"])
    state.step, state.wall_s, state.loss = int(ck["step"]), float(ck["wall_s"]), float(ck["loss"])
    state.history = list(ck["history"])
    return state


def save_student(steps: int, state: RoundState, teacher: Teacher, params: Params,
                 info: dict[str, Any]) -> None:
    """The round's student as a model file (EMA weights under ``ema``), as the train stage's."""
    save_atomic(model_file(state.net, state.ema.module, teacher.process,
                           params.distill.prediction, state.step,
                           distill={**info, "round": state.index + 1, "steps": steps}),
                paths.student_path(steps))


def train_round(state: RoundState, teacher: Teacher, params: Params, dist: DistInfo,
                data: tuple[Tensor, Tensor | None], on_step: Callable[[RoundState], None]) -> None:
    """Steps ``state.step ..`` of round ``state.index``: the teacher on its grid
    ``time_grid(N / 2^r, "trailing")``, the student (DDP under torchrun) predicting
    ``distill.prediction``; ``on_step`` sees the state after each step and its EMA update."""
    d = params.distill
    grid = teacher.process.time_grid(d.teacher_steps >> state.index, "trailing").to(dist.device)
    teacher_d = Denoiser(teacher.net, teacher.process, teacher.prediction)
    student = Denoiser(data_parallel(state.net, dist), teacher.process, d.prediction)
    null_label = getattr(teacher.net, "null_label", None)
    batch = batches(*data, params, dist, state.index, null_label)
    seed = params.seed if dist.rank == 0 else derive_seed(params.seed, "distill-rank", dist.rank)

    def callback(step: int, loss: float) -> None:
        state.ema.update(state.net)
        state.step, state.loss = step + 1, loss
        on_step(state)

    distill_round(student, teacher_d, teacher.process, state.optimizer, batch, grid,
                  steps=d.steps_per_round, seed=seed, round_index=state.index,
                  start_step=state.step, weighting=d.weighting, grad_clip=d.grad_clip,
                  lr=lambda s: lr_at(s, d.lr, 0, d.lr_decay, d.steps_per_round),
                  callback=callback)


def run(params: Params) -> dict[str, Any]:
    """Distil (resuming if possible), or write the skipped record; returns the metrics record."""
    if not params.distill.enabled:  # one process writes the record, the others just exit
        skipped = {"status": "skipped", "reason": "distill.enabled is false"}
        return _skip(params, skipped["reason"]) if os.environ.get("RANK", "0") == "0" else skipped
    torch.set_num_threads(params.distill.threads_per_proc)
    try:
        dist = setup_distributed()
    except (ValueError, RuntimeError) as exc:
        raise StageError(f"cannot start distributed distillation: {exc}") from None
    try:
        return _distill(params, dist)
    finally:
        cleanup()


def _distill(params: Params, dist: DistInfo) -> dict[str, Any]:
    d = params.distill
    if dist.is_main and dist.world_size != d.nproc:
        print(f"note: distill.nproc={d.nproc} but {dist.world_size} process(es) run")
    teacher = load_teacher(paths.MODEL, dist.device)
    images, labels = load_split(paths.TRAIN_DATA)
    if d.batch_size > images.shape[0]:
        raise StageError(f"distill.batch_size: larger than the {images.shape[0]} training "
                         f"images (got {d.batch_size})")
    data = (images, labels if params.model.conditional else None)
    sha = file_digest(paths.MODEL)
    config_hash = distill_config_hash(params, sha)
    ck = resume_point(config_hash)
    if ck is None and dist.is_main:
        _forget_students()
        paths.DISTILL_SKIPPED.unlink(missing_ok=True)
    barrier()
    state = _start(ck, teacher, params, dist)
    info = {"teacher_steps": d.teacher_steps, "teacher_sha256": sha, "config_hash": config_hash}
    tracker = _open_tracker(params) if dist.is_main else None
    try:
        _rounds(state, teacher, params, dist, data, config_hash, info, tracker)
    except BaseException:
        if tracker is not None:
            tracker.finish("FAILED")
        raise
    return _finish(params, state, info, tracker, dist) if dist.is_main else {"status": "ok"}


def _start(ck: dict[str, Any] | None, teacher: Teacher, params: Params,
           dist: DistInfo) -> RoundState:
    """The round to run: from the checkpoint (its round's teacher is the previous student's
    file) or round 0 from the trained model."""
    if ck is None:
        if dist.is_main:
            print(f"distilling {params.distill.teacher_steps} teacher steps in "
                  f"{params.distill.rounds} rounds of {params.distill.steps_per_round} steps "
                  f"({dist.world_size} x {dist.device.type})", flush=True)
        return new_round(0, teacher.net, params)
    index = int(ck["round"])
    if index > 0:
        _become_student_of(teacher, params.distill.teacher_steps >> index, params, dist)
    if dist.is_main:
        print(f"resuming distillation at round {index + 1}, step {int(ck['step'])}", flush=True)
    return restore(ck, teacher.net, params)


def _become_student_of(teacher: Teacher, steps: int, params: Params, dist: DistInfo) -> None:
    """Make ``teacher`` the written student of ``steps`` steps (the next round's teacher)."""
    student = load_teacher(paths.student_path(steps), dist.device)
    teacher.net, teacher.prediction = student.net, params.distill.prediction


def _rounds(state: RoundState, teacher: Teacher, params: Params, dist: DistInfo,
            data: tuple[Tensor, Tensor | None], config_hash: str, info: dict[str, Any],
            tracker: Tracker | None) -> None:
    """The remaining rounds, each ending in its student file and a checkpoint of the next."""
    d = params.distill
    total = d.rounds * d.steps_per_round
    bar = Progress(total, "distill", unit="step", every=d.log_every,
                   initial=state.index * d.steps_per_round + state.step, enabled=dist.is_main)
    clock = [time.perf_counter()]

    def on_step(s: RoundState) -> None:
        now = time.perf_counter()
        s.wall_s, clock[0] = s.wall_s + now - clock[0], now
        done = s.index * d.steps_per_round + s.step
        if s.step % d.log_every == 0 or s.step == d.steps_per_round:
            bar.goto(done, round=s.index + 1, loss=s.loss)
            if tracker is not None:
                tracker.log_metrics({"distill/loss": s.loss}, step=done)
        if dist.is_main and s.step % d.checkpoint_every == 0 and s.step < d.steps_per_round:
            save_state(s, config_hash)

    while state.index < d.rounds:
        train_round(state, teacher, params, dist, data, on_step)
        steps = d.teacher_steps >> (state.index + 1)
        state.history.append({"steps": steps, "images_seen": d.steps_per_round * d.batch_size,
                              "final_loss": state.loss, "wall_s": round(state.wall_s, 3)})
        if dist.is_main:
            save_student(steps, state, teacher, params, info)
        teacher.net, teacher.prediction = state.ema.module, d.prediction
        history = state.history
        state = new_round(state.index + 1, teacher.net, params)
        state.history = history
        if dist.is_main:
            save_state(state, config_hash)
        barrier()
    bar.close()


def _open_tracker(params: Params) -> Tracker | None:
    context = run_context()
    tags = run_tags(params_hash(params), context["git.commit"], kind="distill")
    tags["mlflow.note.content"] = (
        f"Progressive distillation of the trained model: {params.distill.teacher_steps} DDIM "
        f"steps to {params.distill.student_steps()[-1]} in {params.distill.rounds} rounds.")
    tracker = Tracker.create("distill-" + run_name(context["git.commit"]), tags,
                             params.tracking.experiment)
    if tracker is not None:
        tracker.log_params(flatten({"distill": params.distill.model_dump(mode="json"),
                                    "seed": params.seed}))
    return tracker


def compute_record(params: Params, history: list[dict[str, Any]]) -> dict[str, Any]:
    """``metrics/distill.json``: images seen and wall time per student and in all, beside the
    teacher's training images (``train.steps * train.batch_size``)."""
    seen = sum(int(h["images_seen"]) for h in history)
    teacher_seen = params.train.steps * params.train.batch_size
    return {
        "status": "ok",
        "images_seen": seen,
        "teacher_images_seen": teacher_seen,
        "images_ratio": seen / teacher_seen,
        "wall_s": round(sum(float(h["wall_s"]) for h in history), 3),
        "students": {f"student_{h['steps']}": h for h in history},
    }


def _finish(params: Params, state: RoundState, info: dict[str, Any], tracker: Tracker | None,
            dist: DistInfo) -> dict[str, Any]:
    """Rank 0: the metrics record, provenance, timing and the final student in MLflow."""
    record = compute_record(params, state.history)
    write_json(paths.DISTILL_METRICS, record)
    final = paths.student_path(params.distill.student_steps()[-1])
    write_provenance("distill", params, **info, students={
        h["steps"]: file_digest(paths.student_path(h["steps"])) for h in state.history})
    write_timing("distill", wall_s=record["wall_s"], world_size=dist.world_size,
                 device=dist.device.type)
    if tracker is not None:
        tracker.log_metrics({f"distill/{k}": v for k, v in record.items()
                             if isinstance(v, int | float)})
        name = (f"{params.tracking.model_name}-student" if params.tracking.register_model
                else None)
        version = tracker.log_model(final, name, file_digest(final))
        if version is not None:
            print(f"registered MLflow model {name} version {version}")
        tracker.finish("FINISHED")
    print(f"distilled to {params.distill.student_steps()[-1]} step(s): "
          f"{record['images_seen']:,} images seen ({record['images_ratio']:.2f} x the teacher's "
          f"{record['teacher_images_seen']:,}) in {record['wall_s']:.1f} s")
    return record
