"""The training loop: DDP, EMA, atomic checkpoints, exact resume, signals and a NaN guard.

One optimiser step ``k`` (0-based) minimises the denoising loss of :mod:`diffusion_core.losses`
(Ho et al. 2020, Algorithm 1; Song et al. 2021, eq. 7) on the global batch ``k`` with AdamW
(Loshchilov & Hutter 2019), a linear learning-rate warm-up

    lr_k = lr * min(1, (k + 1) / warmup_steps),

gradient-norm clipping ``g <- g * min(1, grad_clip / ||g||)`` and an EMA of the weights
(:mod:`diffusion_core.ema`: exponential with warm-up, or EDM2's power function when ``ema_std`` is
set). The loss weighting (``none``, ``min_snr``, ``edm``) and the training distribution of ``t``
(``uniform``, ``log_normal``) are those of :mod:`diffusion_core.losses`.

Data order. Epoch ``e`` visits ``randperm(N)`` drawn from a generator seeded by ``(seed, e)`` in
global batches of ``batch_size`` (the last incomplete batch is dropped, as ``DistributedSampler``
with ``drop_last``); rank ``r`` of ``W`` takes the ``r``-th contiguous ``batch_size / W`` slice of
every global batch, so the global batch content at step ``k`` is the same for any world size.
Noise, ``t`` and label dropout come from one generator per rank, seeded by ``(seed, rank)``;
dropout inside the network uses the global torch RNG, seeded by ``(seed, rank)`` at a fresh start.

Checkpoints (rank 0, atomic, ``ckpt-<step>.pt`` in ``checkpoint_dir``, the last ``keep_last``
kept) hold the raw and EMA weights, the optimiser, the step and every rank's RNG states, so a
resumed run continues bit-identically (on CPU, in one process): training ``2N`` steps at once or
``N`` then ``N`` more gives the same weights. A checkpoint is only continued when its
``config_hash`` matches; otherwise it is moved to ``<archive_dir>/stale-<hash>/`` (default
``archive_dir``: ``checkpoint_dir``).

Interrupts. SIGINT or SIGTERM finishes the current step, saves a checkpoint and makes
:func:`train` *return* a :class:`TrainResult` with ``interrupted=True`` and the signal number
(a command line should then exit with ``128 + signal``: 130 for SIGINT, 143 for SIGTERM). Under
DDP the ranks agree on stopping through an all-reduce, so all stop after the same step (on a
GPU, at the next check below). A second SIGINT aborts at once with ``KeyboardInterrupt``.

A non-finite loss or gradient norm raises :class:`FloatingPointError` naming the step, and no
checkpoint is written over the last good one. The check reads the losses back to the host: on
the CPU after every step, before its optimiser step; on a GPU, where a read-back stalls the
launch queue, every ``log_every`` steps and before every checkpoint (the losses of the steps in
between wait on the device), so the device never waits for the host in between.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import shutil
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffusion_core.checkpoint import (
    checkpoint_name,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_atomic,
    scan_checkpoints,
)
from diffusion_core.distributed import (
    DistInfo,
    all_gather_object,
    barrier,
    broadcast_object,
    data_parallel,
    rank0_print,
)
from diffusion_core.ema import EMA, MAX_POWER_EMA_STD, unwrap_model
from diffusion_core.losses import LOSS_WEIGHTINGS, denoising_loss
from diffusion_core.noise_levels import (
    EDM_P_MEAN,
    EDM_P_STD,
    SD3_LOGIT_MEAN,
    SD3_LOGIT_STD,
    T_SAMPLINGS,
)
from diffusion_core.parameterization import PREDICTIONS

__all__ = [
    "MODEL_FORMAT",
    "CHECKPOINT_FORMAT",
    "BatchSampler",
    "TrainConfig",
    "TrainResult",
    "derive_seed",
    "lr_at",
    "native_bf16",
    "resolve_precision",
    "train",
]

CHECKPOINT_FORMAT = "diffusion-toolkit/train-checkpoint-v1"
MODEL_FORMAT = "diffusion-toolkit/model-v1"
MIXED_PRECISION = ("fp32", "bf16", "auto")
LR_DECAYS = ("none", "linear", "cosine")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class TrainConfig:
    """Training hyper-parameters (plain types only; ``dataclasses.asdict`` is stored in
    checkpoints).

    ``batch_size`` is the GLOBAL batch, split evenly across ranks. ``grad_clip = 0`` disables
    clipping. ``checkpoint_every = 0`` saves only at the end (and on interrupt).
    ``mixed_precision``: ``"fp32"``, ``"bf16"`` (autocast on CUDA or the CPU; faster only where
    the device computes bf16 natively, see docs/training.md) or ``"auto"`` (bf16 where the
    device computes it natively, else fp32: :func:`resolve_precision`).
    ``lr_decay`` (``none``, ``linear``, ``cosine``): see :func:`lr_at`. ``compile`` wraps the
    model in ``torch.compile(mode=compile_mode)`` (``"reduce-overhead"`` adds CUDA graphs);
    ``"auto"`` compiles on one CUDA device only (3x the eager images/s of a small U-Net on an
    H200; on the CPU compilation costs minutes, and under DDP it is not measured).
    ``channels_last`` stores weights and batches in NHWC order. The measurements behind these
    choices are in docs/benchmarks.md and docs/training.md.
    ``loss_weighting`` (with ``min_snr_gamma``, ``sigma_data``) and ``t_sampling`` (with
    ``p_mean``, ``p_std``, or ``logit_mean``, ``logit_std`` for ``logit_normal``) go to
    :func:`~diffusion_core.losses.denoising_loss`; ``ema_std``
    (``None``: exponential EMA with ``ema_decay``) to :class:`~diffusion_core.ema.EMA`.
    ``guide_at > 0`` keeps a copy of the EMA weights after step ``round(guide_at * steps)``
    (:attr:`guide_step`) in the checkpoints and the model file (``"guide"``): the weak model of
    autoguidance (:class:`~diffusion_core.guidance.AutoGuidance`, Karras et al. 2024), free of
    extra training. The defaults are the recipe of Ho et al. 2020.
    """

    steps: int = 1000
    batch_size: int = 64
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_decay: str = "none"
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = True
    ema_std: float | None = None
    loss_weighting: str = "none"
    min_snr_gamma: float = 5.0
    sigma_data: float = 0.5
    t_sampling: str = "uniform"
    p_mean: float = EDM_P_MEAN
    p_std: float = EDM_P_STD
    logit_mean: float = SD3_LOGIT_MEAN
    logit_std: float = SD3_LOGIT_STD
    p_uncond: float = 0.0
    guide_at: float = 0.0
    prediction: str = "eps"
    mixed_precision: str = "auto"
    compile: bool | str = False
    compile_mode: str = "reduce-overhead"
    channels_last: bool = False
    checkpoint_every: int = 1000
    keep_last: int = 3
    log_every: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.steps >= 1, "steps", "must be >= 1"),
            (self.batch_size >= 1, "batch_size", "must be >= 1"),
            (self.lr > 0 and math.isfinite(self.lr), "lr", "must be a positive number"),
            (self.weight_decay >= 0, "weight_decay", "must be >= 0"),
            (self.warmup_steps >= 0, "warmup_steps", "must be >= 0"),
            (self.lr_decay in LR_DECAYS, "lr_decay", f"must be one of {LR_DECAYS}"),
            (self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables clipping)"),
            (0 <= self.ema_decay < 1, "ema_decay", "must be in [0, 1)"),
            (
                self.ema_std is None or 0 < self.ema_std <= MAX_POWER_EMA_STD,
                "ema_std",
                f"must be None or in (0, {MAX_POWER_EMA_STD}]",
            ),
            (
                self.loss_weighting in LOSS_WEIGHTINGS,
                "loss_weighting",
                f"must be one of {LOSS_WEIGHTINGS}",
            ),
            (self.min_snr_gamma > 0, "min_snr_gamma", "must be > 0"),
            (self.sigma_data > 0, "sigma_data", "must be > 0"),
            (self.t_sampling in T_SAMPLINGS, "t_sampling", f"must be one of {T_SAMPLINGS}"),
            (self.p_std > 0, "p_std", "must be > 0"),
            (self.logit_std > 0, "logit_std", "must be > 0"),
            (0 <= self.p_uncond <= 1, "p_uncond", "must be in [0, 1]"),
            (0 <= self.guide_at < 1, "guide_at", "must be in [0, 1) (0: no guide snapshot)"),
            (self.prediction in PREDICTIONS, "prediction", f"must be one of {PREDICTIONS}"),
            (
                self.mixed_precision in MIXED_PRECISION,
                "mixed_precision",
                f"must be one of {MIXED_PRECISION}",
            ),
            (self.compile in (True, False, "auto"), "compile", "must be true, false or 'auto'"),
            (self.compile_mode in COMPILE_MODES, "compile_mode", f"must be one of {COMPILE_MODES}"),
            (self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0"),
            (self.keep_last >= 1, "keep_last", "must be >= 1"),
            (self.log_every >= 1, "log_every", "must be >= 1"),
            (0 <= self.seed < 2**63, "seed", "must be in [0, 2**63)"),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} {rule}")

    @property
    def guide_step(self) -> int:
        """The step after which the EMA weights become the autoguidance guide (0: none)."""
        return max(1, round(self.guide_at * self.steps)) if self.guide_at > 0 else 0


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` did: the final ``step`` and ``loss`` (mean over ranks of the last step),
    the last checkpoint, the ``model.pt`` written (``None`` when interrupted), whether it resumed
    and whether a signal (``signal``, e.g. 2 or 15) interrupted it."""

    step: int
    loss: float
    checkpoint: Path | None
    model_path: Path | None
    resumed: bool
    interrupted: bool
    signal: int | None = None


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple such as ``(seed, "data", epoch)`` (BLAKE2b of its repr)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def lr_at(step: int, lr: float, warmup_steps: int, decay: str = "none",
          total_steps: int = 0) -> float:
    """Learning rate of 0-based ``step``: linear warm-up ``lr * min(1, (step + 1) / warmup_steps)``
    times a decay over the steps after the warm-up, ``u = (step - warmup_steps) / (total_steps -
    warmup_steps)`` in [0, 1): ``"none"`` 1, ``"linear"`` ``1 - u``, ``"cosine"``
    ``(1 + cos(pi u)) / 2`` (Loshchilov & Hutter 2017, SGDR, without restarts). Decaying to zero
    over a known, short run is the usual way to get the most out of a fixed compute budget."""
    if decay not in LR_DECAYS:
        raise ValueError(f"lr_decay={decay!r} must be one of {LR_DECAYS}")
    factor = 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)
    span = total_steps - warmup_steps
    if decay == "none" or span <= 0 or step < warmup_steps:
        return lr * factor
    u = min(1.0, (step - warmup_steps) / span)
    if decay == "linear":
        return lr * factor * (1.0 - u)
    return lr * factor * 0.5 * (1.0 + math.cos(math.pi * u))


class BatchSampler:
    """Indices of the global batch at each step, and of this rank's shard of it.

    Epoch ``e`` is ``randperm(num_items)`` from a generator seeded by ``(seed, e)``; the global
    batch ``j`` of the epoch is ``perm[j * B:(j + 1) * B]`` (an incomplete last batch is dropped)
    and rank ``r`` takes the ``r``-th of ``world_size`` equal contiguous slices.
    """

    def __init__(
        self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
        device: torch.device | str = "cpu",
    ) -> None:
        if batch_size % world_size != 0:
            raise ValueError(
                f"batch_size {batch_size} must be divisible by the world size {world_size}"
            )
        if batch_size > num_items:
            raise ValueError(f"batch_size {batch_size} is larger than the dataset ({num_items})")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = num_items // batch_size
        self.device = torch.device(device)
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def permutation(self, epoch: int) -> Tensor:
        """The order of epoch ``epoch`` (drawn on the host, moved to ``device`` once per epoch, so
        indexing a dataset that lives on a GPU needs no copy per step)."""
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "data", epoch))
            perm = torch.randperm(self.num_items, generator=g)
            self._epoch, self._perm = epoch, perm.to(self.device)
        return self._perm

    def global_batch(self, step: int) -> Tensor:
        """Dataset indices of the whole global batch at 0-based ``step``."""
        epoch, j = divmod(step, self.batches_per_epoch)
        return self.permutation(epoch)[j * self.batch_size : (j + 1) * self.batch_size]

    def local_batch(self, step: int) -> Tensor:
        """This rank's slice of :meth:`global_batch`."""
        local = self.batch_size // self.world_size
        return self.global_batch(step)[self.rank * local : (self.rank + 1) * local]


# ------------------------------------------------------------------------------------ helpers


class _StopOnSignal:
    """Record SIGINT/SIGTERM instead of dying; a second SIGINT raises ``KeyboardInterrupt``."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        name = signal.Signals(signum).name
        # os.write, not print: print is not reentrant and the signal may land inside one.
        if self.rank == 0:  # every rank gets it; one line is enough
            msg = f"{name} received, stopping after this step (checkpoint kept)\n"
            os.write(2, msg.encode())

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


#: datasets smaller than this are copied to the GPU once instead of once per step
DEVICE_DATA_BYTES = 1 << 30


def use_compile(cfg: TrainConfig, device: torch.device, world_size: int) -> bool:
    """Whether to ``torch.compile`` the model: as configured, or for ``"auto"`` on one CUDA
    device (where CUDA graphs remove the launch overhead that bounds a small network)."""
    if cfg.compile == "auto":
        return device.type == "cuda" and world_size == 1
    return bool(cfg.compile)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: a CUDA device with bf16 support, or a CPU with
    AVX512-BF16 or AMX instructions (PyTorch's CPU feature checks). Elsewhere, e.g. on an
    AVX2-only CPU, bf16 autocast is emulated and slower than fp32 (measurements:
    docs/training.md)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = (getattr(torch.cpu, name, None)
                  for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
        return any(bool(check()) for check in checks if check is not None)
    return False


def resolve_precision(mode: str, device: torch.device) -> str:
    """``"bf16"`` or ``"fp32"``: what ``mixed_precision`` means on ``device``. ``"auto"`` is
    bf16 where the device computes it natively (:func:`native_bf16`), else fp32; an explicit
    ``"bf16"`` stays bf16 (autocast exists on CUDA and the CPU only)."""
    if mode == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if mode == "bf16":
        if device.type not in ("cuda", "cpu"):
            raise ValueError(
                f"mixed_precision='bf16' needs CUDA or the CPU, the device is {device}; "
                "use 'auto' or 'fp32'"
            )
        return "bf16"
    return "fp32"


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _cpu_state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def _rng_state(device: torch.device, noise: torch.Generator) -> dict[str, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"torch": torch.get_rng_state(), "cuda": cuda, "noise": noise.get_state()}


def _set_rng_state(state: dict[str, Any], device: torch.device, noise: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    noise.set_state(state["noise"])


def _seed_rngs(seed: int, rank: int, noise: torch.Generator, *parts: int) -> None:
    torch.manual_seed(derive_seed(seed, "torch", rank, *parts))
    noise.manual_seed(derive_seed(seed, "noise", rank, *parts))


def _free_dir(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def _safe_name(text: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
    return cleaned[:64] or "none"


def _find_resume(
    ckdir: Path, config_hash: str, archive: Path
) -> tuple[Path | None, dict[str, Any] | None]:
    """Rank 0: the newest readable checkpoint with ``config_hash``; moves unreadable ones to
    ``archive/corrupt/`` and a run with another hash (all its checkpoints and ``model.pt``) to
    ``archive/stale-<hash>/``."""
    for path, ck, err in scan_checkpoints(ckdir):
        if ck is None:
            dest = archive / "corrupt"
            dest.mkdir(parents=True, exist_ok=True)
            target = _free_dir(dest / path.name)
            os.replace(path, target)
            print(f"unreadable checkpoint moved to {target}: {err}", flush=True)
            continue
        if ck.get("config_hash") == config_hash:
            return path, ck
        old = str(ck.get("config_hash"))
        dest = _free_dir(archive / f"stale-{_safe_name(old)}")
        dest.mkdir(parents=True)
        movable = [p for _, p in list_checkpoints(ckdir)] + [ckdir / "model.pt"]
        for p in movable:
            if p.is_file():
                shutil.move(p, dest / p.name)
        print(
            f"checkpoints in {ckdir} have config hash {old}, not {config_hash}: "
            f"moved to {dest}, starting fresh",
            flush=True,
        )
        return None, None
    return None, None


def _check_inputs(images: Tensor, labels: Tensor | None, cfg: TrainConfig, raw: nn.Module) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor (N, C, H, W), got {shape}")
    if labels is not None and (labels.shape != (images.shape[0],) or labels.is_floating_point()):
        raise ValueError(
            f"labels must be an integer tensor of shape ({images.shape[0]},), "
            f"got {labels.dtype} {tuple(labels.shape)}"
        )
    classes = int(getattr(raw, "num_classes", 0) or 0)
    if labels is not None and classes and labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= classes:
            raise ValueError(f"labels must lie in [0, {classes - 1}] for a network of {classes} "
                             f"classes, got {lo if lo < 0 else hi}")
    if cfg.p_uncond > 0 and (labels is None or getattr(raw, "null_label", None) is None):
        raise ValueError(
            f"p_uncond={cfg.p_uncond} needs labels and a class-conditional network "
            "(num_classes > 0)"
        )


# --------------------------------------------------------------------------- state and setup


@dataclass
class TrainState:
    """What one optimiser step changes and a checkpoint keeps: the network (unwrapped), its EMA,
    the optimiser, the generator of ``t``, the noise and the label dropout, the number of steps
    done, the last loss read back (mean over ranks), the losses since the last log line and the
    guide snapshot ``(step, EMA weights after it)``."""

    model: nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    noise: torch.Generator
    step: int = 0
    loss: float = math.nan
    window: list[float] = dataclasses.field(default_factory=list)
    guide: tuple[int, dict[str, Tensor]] | None = None


def _build_state(
    raw: nn.Module, cfg: TrainConfig, dist: DistInfo, ck: dict[str, Any] | None
) -> tuple[TrainState, nn.Module]:
    """The fresh state on ``dist.device`` (raw weights from ``ck`` when resuming) and the module
    the loop calls: ``DistributedDataParallel`` over several processes, whose construction
    broadcasts rank 0's weights, so it comes before the EMA copies them. AdamW is fused on CUDA
    (one kernel for all parameters; the CPU path stays the reference one). The weights go
    channels-last after the EMA copy: only the trained network runs in training."""
    device = dist.device
    raw.to(device).train()
    if ck is not None:
        raw.load_state_dict(ck["model"])
    model = data_parallel(raw, dist)  # broadcasts rank 0's weights
    ema = EMA(raw, cfg.ema_decay, cfg.ema_warmup, std=cfg.ema_std)
    optimizer = torch.optim.AdamW(raw.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda")
    raw.to(memory_format=_memory_format(cfg))
    return TrainState(raw, ema, optimizer, torch.Generator(device=device)), model


def _memory_format(cfg: TrainConfig) -> torch.memory_format:
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


def _resume_source(
    ckdir: Path, config_hash: str, archive_dir: str | os.PathLike | None, dist: DistInfo
) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint to continue and its contents (``None, None`` for a fresh start): rank 0
    finds it (:func:`_find_resume` moves stale and corrupt files aside) and tells the others,
    which then read it themselves."""
    ck: dict[str, Any] | None = None
    resume_path: Path | None = None
    if dist.is_main:
        ckdir.mkdir(parents=True, exist_ok=True)
        archive = Path(archive_dir) if archive_dir is not None else ckdir
        resume_path, ck = _find_resume(ckdir, config_hash, archive)
    resume_path = broadcast_object(resume_path)
    if resume_path is not None and ck is None:
        ck = load_checkpoint(resume_path, map_location="cpu")
    return resume_path, ck


def _restore(
    state: TrainState, ck: dict[str, Any], path: Path, cfg: TrainConfig, dist: DistInfo
) -> None:
    """Continue from checkpoint ``ck`` (read from ``path``): the EMA, the optimiser, the step,
    the log window, the guide snapshot and this rank's RNG states (re-seeded from
    ``(seed, rank, step)`` when the checkpoint was written by another number of processes)."""
    state.ema.module.load_state_dict(ck["ema"])
    state.ema.num_updates = int(ck["ema_updates"])
    state.optimizer.load_state_dict(ck["optimizer"])
    state.step, state.loss = int(ck["step"]), float(ck["loss"])
    state.window = [float(v) for v in ck.get("log_window", [])]
    if "guide_ema" in ck:
        state.guide = (int(ck["guide_step"]), ck["guide_ema"])
    _check_guide(state, path, cfg.guide_step)
    ranks = ck["rng"]["ranks"]
    if len(ranks) == dist.world_size:
        _set_rng_state(ranks[dist.rank], dist.device, state.noise)
    else:
        rank0_print(
            f"checkpoint was written by {len(ranks)} process(es), this run has "
            f"{dist.world_size}: noise streams are re-seeded (the run is not bit-identical to an "
            "unbroken one)"
        )
        _seed_rngs(cfg.seed, dist.rank, state.noise, state.step)
    rank0_print(f"resuming from {path} at step {state.step}")
    if state.step > cfg.steps:
        rank0_print(f"checkpoint step {state.step} is past steps={cfg.steps}; keeping it as is")


def _check_guide(state: TrainState, path: Path, guide_step: int) -> None:
    """A resumed run past the guide step needs the snapshot; one from another step is kept."""
    if guide_step and state.step >= guide_step and state.guide is None:
        raise ValueError(
            f"{path} is past guide step {guide_step} but holds no guide snapshot "
            "(written without guide_at): give this configuration its own config_hash"
        )
    if state.guide is not None and state.guide[0] != guide_step:
        rank0_print(f"note: the guide snapshot of {path} is from step {state.guide[0]}, "
                    f"not {guide_step} (steps changed); it is kept")


def _keep_guide(state: TrainState, guide_step: int) -> None:
    """After step ``guide_step``, keep a copy of the EMA weights: the guide of autoguidance."""
    if state.step == guide_step and state.guide is None:  # a copy: .cpu() would alias
        state.guide = (state.step, {k: v.detach().to("cpu", copy=True)
                                    for k, v in state.ema.module.state_dict().items()})


def _precision_context(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast of ``cfg.mixed_precision`` on ``device`` (a warning where bf16 is emulated)."""
    precision = resolve_precision(cfg.mixed_precision, device)
    if precision == "bf16" and not native_bf16(device):
        rank0_print(f"warning: mixed_precision='bf16' on a {device.type} without native bf16 "
                    "(no AVX512-BF16 or AMX): autocast is emulated and slower than fp32; use "
                    "'auto' or 'fp32'")
    return _autocast(precision, device)


def _compiled(model: nn.Module, cfg: TrainConfig, dist: DistInfo) -> nn.Module:
    """``model`` under ``torch.compile`` where :func:`use_compile` says so."""
    if use_compile(cfg, dist.device, dist.world_size):
        return torch.compile(model, mode=cfg.compile_mode)
    return model


@dataclass(frozen=True)
class _Batches:
    """Algorithm 1's ``x_0 ~ q(x_0)``: this rank's shard of global batch ``k``
    (:class:`BatchSampler`) and its labels, on the training device in the chosen memory format.
    A dataset under :data:`DEVICE_DATA_BYTES` is copied to the GPU once, not once per step."""

    images: Tensor
    labels: Tensor | None
    sampler: BatchSampler
    device: torch.device
    memory_format: torch.memory_format

    @classmethod
    def of(cls, images: Tensor, labels: Tensor | None, cfg: TrainConfig,
           dist: DistInfo) -> _Batches:
        device = dist.device
        on_device = (device.type == "cuda"
                     and images.numel() * images.element_size() < DEVICE_DATA_BYTES)
        sampler = BatchSampler(images.shape[0], cfg.batch_size, cfg.seed, dist.rank,
                               dist.world_size, device=device if on_device else images.device)
        if on_device:
            images = images.to(device)
            labels = labels.to(device) if labels is not None else None
        return cls(images, labels, sampler, device, _memory_format(cfg))

    def at(self, step: int) -> tuple[Tensor, Tensor | None]:
        idx = self.sampler.local_batch(step)
        x0 = self.images[idx].to(self.device, non_blocking=True)
        x0 = x0.contiguous(memory_format=self.memory_format)
        if self.labels is None:
            return x0, None
        return x0, self.labels[idx.to(self.labels.device)].to(self.device)


# ------------------------------------------------------------------------- one step's pieces


def _set_lr(optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig) -> float:
    """Set and return the learning rate of 0-based ``step`` (:func:`lr_at`)."""
    lr = lr_at(step, cfg.lr, cfg.warmup_steps, cfg.lr_decay, cfg.steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def _loss(forward: nn.Module, process: Any, x0: Tensor, y: Tensor | None, cfg: TrainConfig,
          noise: torch.Generator, null_label: int | None) -> Tensor:
    """The denoising loss of Algorithm 1 with ``cfg``'s options: ``t ~ p(t)``, ``eps ~ N(0, I)``,
    ``x_t = alpha(t) x_0 + sigma(t) eps``, the weighted MSE of the prediction
    (:func:`~diffusion_core.losses.denoising_loss`), all drawn from ``noise``."""
    return denoising_loss(
        forward, process, x0, y, prediction=cfg.prediction, generator=noise,
        p_uncond=cfg.p_uncond, null_label=null_label, weighting=cfg.loss_weighting,
        min_snr_gamma=cfg.min_snr_gamma, sigma_data=cfg.sigma_data, t_sampling=cfg.t_sampling,
        p_mean=cfg.p_mean, p_std=cfg.p_std, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std,
    )


def _gradient(state: TrainState, loss: Tensor, grad_clip: float) -> Tensor:
    """Back-propagate ``loss`` into fresh gradients and clip their norm to ``grad_clip`` (0: no
    clipping); returns the norm before clipping."""
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    max_norm = grad_clip if grad_clip > 0 else math.inf
    return torch.nn.utils.clip_grad_norm_(state.model.parameters(), max_norm)


def _checkpoint_due(step: int, cfg: TrainConfig) -> bool:
    """A checkpoint follows every ``checkpoint_every`` steps (0: none) and the last step."""
    return (cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0) or step == cfg.steps


def _agreed_signal(signum: int | None, dist: DistInfo) -> int:
    """The signal all ranks stop for: the largest number any rank received."""
    agreed = torch.tensor(signum or 0, device=dist.device)
    if dist.world_size > 1:
        tdist.all_reduce(agreed, op=tdist.ReduceOp.MAX)
    return int(agreed.item())


class _Monitor:
    """The NaN guard, the stop agreement and the log of :func:`train`.

    Losses and gradient norms wait on the device and are read back together at a check: every
    step on the CPU; on a GPU, where a read-back stalls the launch queue, every ``log_every``
    steps, before every checkpoint and at the last step. Under DDP a check is an all-reduce
    (the sum of the losses, of the equal gradient norms and of the ranks' stop flags), so every
    rank checks after the same steps.
    """

    def __init__(self, cfg: TrainConfig, dist: DistInfo, bar: tqdm,
                 on_log: Callable[[int, dict[str, float]], None] | None) -> None:
        self.cfg, self.dist, self.bar, self.on_log = cfg, dist, bar, on_log
        self.check_every = cfg.log_every if dist.device.type == "cuda" else 1
        self.pending: list[Tensor] = []
        self.grad_norm = math.nan
        self.checked = False

    def check(self, state: TrainState, loss: Tensor, grad_norm: Tensor, signum: int | None,
              last_ckpt: Path | None) -> bool:
        """Queue step ``state.step``'s loss and gradient norm; at a check, read the queue back,
        raise :class:`FloatingPointError` at a non-finite value and return whether any rank
        received a signal (``False`` between checks)."""
        device, ws, step = self.dist.device, self.dist.world_size, state.step
        self.pending.append(torch.stack([loss.detach().double(),
                                         grad_norm.detach().double().to(device)]))
        self.checked = (step % self.check_every == 0 or _checkpoint_due(step, self.cfg)
                        or (ws == 1 and signum is not None))
        if not self.checked:
            return False
        block = torch.stack(self.pending)
        flag = torch.tensor([1.0 if signum is not None else 0.0], dtype=torch.float64).to(device)
        if ws > 1:  # sum: mean loss, same grad norm, any stop flag
            tdist.all_reduce(block)
            tdist.all_reduce(flag)
        rows, stop_sum = block.tolist(), float(flag.item())
        first, self.pending = step - len(rows) + 1, []
        for j, (loss_sum, norm_sum) in enumerate(rows):
            state.loss, self.grad_norm = loss_sum / ws, norm_sum / ws
            if not (math.isfinite(state.loss) and math.isfinite(self.grad_norm)):
                raise FloatingPointError(
                    f"non-finite loss {state.loss} (gradient norm {self.grad_norm}) at step "
                    f"{first + j}; training stopped, the last good checkpoint is {last_ckpt}"
                )
            state.window.append(state.loss)
        return stop_sum > 0

    def log(self, state: TrainState, lr: float) -> None:
        """Advance the progress bar; every ``log_every`` steps call ``on_log`` on rank 0 with
        the mean loss since the last call, the learning rate and the gradient norm."""
        self.bar.update(1)
        if self.checked:
            self.bar.set_postfix(loss=f"{state.loss:.4f}", refresh=False)
        if state.step % self.cfg.log_every == 0:
            if self.on_log is not None and self.dist.is_main:
                mean = sum(state.window) / len(state.window)
                self.on_log(state.step, {"loss": mean, "lr": lr, "grad_norm": self.grad_norm})
            state.window = []


# ---------------------------------------------------------------------------------- files


@dataclass(frozen=True)
class _Checkpoints:
    """The files :func:`train` writes: ``ckpt-<step>.pt`` in ``folder`` (atomic, rank 0, the
    last ``keep_last`` kept) and the final model file."""

    folder: Path
    config_hash: str
    process: Any
    cfg: TrainConfig
    dist: DistInfo

    def save(self, state: TrainState) -> Path:
        """Write the checkpoint of ``state`` with every rank's RNG states (a collective: every
        rank calls it); returns its path."""
        rng = all_gather_object(_rng_state(self.dist.device, state.noise))
        path = self.folder / checkpoint_name(state.step)
        if self.dist.is_main:
            ck = {
                "format": CHECKPOINT_FORMAT,
                "step": state.step,
                "loss": state.loss,
                "log_window": list(state.window),
                "model_config": dict(getattr(state.model, "config", None) or {}),
                "model": _cpu_state(state.model),
                "ema": _cpu_state(state.ema.module),
                "ema_updates": state.ema.num_updates,
                "optimizer": state.optimizer.state_dict(),
                "rng": {"world_size": self.dist.world_size, "ranks": rng},
                "config_hash": self.config_hash,
                "process": _describe(self.process),
                "prediction": self.cfg.prediction,
                "train_config": dataclasses.asdict(self.cfg),
            }
            if state.guide is not None:
                ck["guide_step"], ck["guide_ema"] = state.guide
            save_atomic(ck, path)
            prune_checkpoints(self.folder, self.cfg.keep_last)
        return path

    def save_model(self, state: TrainState, path: Path) -> None:
        """Rank 0 writes the model file that sampling loads (see :func:`train`)."""
        if not self.dist.is_main:
            return
        guide = state.guide
        extra = {"guide": {"ema": guide[1], "step": guide[0]}} if guide is not None else {}
        save_atomic(model_file(state.model, state.ema.module, self.process, self.cfg.prediction,
                               state.step, config_hash=self.config_hash,
                               train_config=dataclasses.asdict(self.cfg), **extra), path)


def model_file(model: nn.Module, ema_module: nn.Module, process: Any, prediction: str,
               step: int, **extra: Any) -> dict[str, Any]:
    """The contents of a model file (``MODEL_FORMAT``), the one thing sampling loads: the
    network's config, its EMA and raw weights on the CPU, the process, the prediction, the step,
    then ``extra`` (training: its config and hash and the guide; distillation: its round)."""
    return {
        "format": MODEL_FORMAT,
        "model_config": dict(getattr(model, "config", None) or {}),
        "ema": _cpu_state(ema_module),
        "model": _cpu_state(model),
        "process": _describe(process),
        "prediction": prediction,
        "step": step,
        **extra,
    }


def _describe(process: Any) -> dict[str, Any]:
    describe = getattr(process, "describe", None)
    return dict(describe()) if callable(describe) else {"name": getattr(process, "name", "")}


# --------------------------------------------------------------------------------- the loop


def train(
    net: nn.Module,
    process: Any,
    images: Tensor,
    labels: Tensor | None,
    cfg: TrainConfig,
    *,
    checkpoint_dir: str | os.PathLike,
    config_hash: str,
    dist: DistInfo | None = None,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
    model_path: str | os.PathLike | None = None,
    archive_dir: str | os.PathLike | None = None,
) -> TrainResult:
    """Train ``net`` on ``images`` (``(N, C, H, W)`` in ``[-1, 1]``) and optional ``labels``.

    Algorithm 1 of Ho et al. 2020: repeat ``x_0 ~ q(x_0)``, ``t ~ p(t)``, ``eps ~ N(0, I)``, a
    gradient step on the denoising loss, then the EMA update. Resumes from the newest checkpoint
    in ``checkpoint_dir`` whose ``config_hash`` matches (a different hash is moved aside, never
    continued). Writes ``ckpt-<step>.pt`` every ``cfg.checkpoint_every`` steps and at the end,
    and a final ``model_path`` (default ``checkpoint_dir/model.pt``: ``{"model_config", "ema",
    "model", "process", "prediction", "step", ...}``, with ``"guide": {"ema", "step"}`` when
    ``cfg.guide_at > 0``) that sampling loads with ``UNet(**m["model_config"])`` and
    ``m["ema"]``. ``on_log(step, {"loss", "lr", "grad_norm"})`` runs on rank 0 every
    ``cfg.log_every`` steps (``loss`` is the mean since the previous call). ``dist`` comes from
    :func:`diffusion_core.distributed.setup_distributed` (default: one process, CUDA if
    available). Checkpoints of another configuration and unreadable ones are moved to
    ``archive_dir`` (default ``checkpoint_dir``; give a folder outside a DVC-cached
    ``checkpoint_dir`` so they do not bloat the cache). See the module docstring for data
    order, signals and the NaN guard.
    """
    dist = dist or DistInfo.single()
    raw = unwrap_model(net)
    _check_inputs(images, labels, cfg, raw)
    batches = _Batches.of(images, labels, cfg, dist)
    autocast = _precision_context(cfg, dist.device)
    files = _Checkpoints(Path(checkpoint_dir), config_hash, process, cfg, dist)
    resume_path, ck = _resume_source(files.folder, config_hash, archive_dir, dist)
    state, model = _build_state(raw, cfg, dist, ck)
    if ck is None:
        _seed_rngs(cfg.seed, dist.rank, state.noise)
    else:
        _restore(state, ck, resume_path, cfg, dist)
    forward, null_label = _compiled(model, cfg, dist), getattr(raw, "null_label", None)
    last_ckpt, interrupted_by = resume_path, None
    bar = tqdm(total=cfg.steps, initial=min(state.step, cfg.steps), desc="train",
               disable=not (progress and dist.is_main), dynamic_ncols=True)
    with bar, _StopOnSignal(dist.rank) as stop:
        monitor = _Monitor(cfg, dist, bar, on_log)
        for k in range(state.step, cfg.steps):
            x0, y = batches.at(k)  # x_0 ~ q(x_0)
            lr = _set_lr(state.optimizer, k, cfg)
            with autocast:  # t ~ p(t), eps ~ N(0, I), the weighted MSE
                loss = _loss(forward, process, x0, y, cfg, state.noise, null_label)
            grad_norm = _gradient(state, loss, cfg.grad_clip)
            state.step = k + 1
            signalled = monitor.check(state, loss, grad_norm, stop.signum, last_ckpt)
            state.optimizer.step()  # the gradient step
            state.ema.update(raw)  # theta_ema <- d theta_ema + (1 - d) theta
            _keep_guide(state, cfg.guide_step)
            monitor.log(state, lr)
            stopping = signalled and state.step < cfg.steps
            if _checkpoint_due(state.step, cfg) or stopping:
                last_ckpt = files.save(state)
            if stopping:
                interrupted_by = _agreed_signal(stop.signum, dist)
                rank0_print(f"stopped by signal {interrupted_by} at step {state.step}; "
                            f"saved {last_ckpt}")
                break
    model_file = Path(model_path) if model_path is not None else files.folder / "model.pt"
    if interrupted_by is None:
        files.save_model(state, model_file)
    barrier()
    return TrainResult(step=state.step, loss=state.loss, checkpoint=last_ckpt,
                       model_path=model_file if interrupted_by is None else None,
                       resumed=resume_path is not None, interrupted=interrupted_by is not None,
                       signal=interrupted_by)
