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


def _model_file(
    raw: nn.Module, ema: EMA, process: Any, cfg: TrainConfig, step: int, config_hash: str,
    guide: tuple[int, dict[str, Tensor]] | None = None,
) -> dict[str, Any]:
    extra = {"guide": {"ema": guide[1], "step": guide[0]}} if guide is not None else {}
    return {
        "format": MODEL_FORMAT,
        "model_config": dict(getattr(raw, "config", None) or {}),
        "ema": _cpu_state(ema.module),
        "model": _cpu_state(raw),
        "process": _describe(process),
        "prediction": cfg.prediction,
        "step": step,
        "config_hash": config_hash,
        "train_config": dataclasses.asdict(cfg),
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

    Resumes from the newest checkpoint in ``checkpoint_dir`` whose ``config_hash`` matches (a
    different hash is moved aside, never continued). Writes ``ckpt-<step>.pt`` every
    ``cfg.checkpoint_every`` steps and at the end, and a final ``model_path`` (default
    ``checkpoint_dir/model.pt``: ``{"model_config", "ema", "model", "process", "prediction",
    "step", ...}``, with ``"guide": {"ema", "step"}`` when ``cfg.guide_at > 0``) that sampling
    loads with ``UNet(**m["model_config"])`` and ``m["ema"]``.
    ``on_log(step, {"loss", "lr", "grad_norm"})`` runs on rank 0 every ``cfg.log_every`` steps
    (``loss`` is the mean since the previous call). ``dist`` comes from
    :func:`diffusion_core.distributed.setup_distributed` (default: one process, CUDA if
    available). Checkpoints of another configuration and unreadable ones are moved to
    ``archive_dir`` (default ``checkpoint_dir``; give a folder outside a DVC-cached
    ``checkpoint_dir`` so they do not bloat the cache). See the module docstring for data
    order, signals and the NaN guard.
    """
    dist = dist or DistInfo.single()
    device, ws = dist.device, dist.world_size
    raw = unwrap_model(net)
    _check_inputs(images, labels, cfg, raw)
    # a small dataset lives on the GPU: no host-to-device copy per step
    data_on_device = (device.type == "cuda"
                      and images.numel() * images.element_size() < DEVICE_DATA_BYTES)
    sampler = BatchSampler(images.shape[0], cfg.batch_size, cfg.seed, dist.rank, ws,
                           device=device if data_on_device else images.device)
    precision = resolve_precision(cfg.mixed_precision, device)
    if precision == "bf16" and not native_bf16(device):
        rank0_print(f"warning: mixed_precision='bf16' on a {device.type} without native bf16 "
                    "(no AVX512-BF16 or AMX): autocast is emulated and slower than fp32; use "
                    "'auto' or 'fp32'")
    autocast = _autocast(precision, device)
    ckdir = Path(checkpoint_dir)
    model_path = Path(model_path) if model_path is not None else ckdir / "model.pt"

    # -- find what to resume from (rank 0 moves stale/corrupt files, then tells the others)
    ck: dict[str, Any] | None = None
    resume_path: Path | None = None
    if dist.is_main:
        ckdir.mkdir(parents=True, exist_ok=True)
        archive = Path(archive_dir) if archive_dir is not None else ckdir
        resume_path, ck = _find_resume(ckdir, config_hash, archive)
    resume_path = broadcast_object(resume_path)
    if resume_path is not None and ck is None:
        ck = load_checkpoint(resume_path, map_location="cpu")

    # -- model, EMA, optimiser, RNG
    raw.to(device).train()
    if ck is not None:
        raw.load_state_dict(ck["model"])
    model: nn.Module = raw
    if ws > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(raw, device_ids=ids)  # broadcasts rank 0
    ema = EMA(raw, cfg.ema_decay, cfg.ema_warmup, std=cfg.ema_std)
    # fused AdamW: one kernel for all parameters on CUDA (the CPU path stays the reference one)
    optimizer = torch.optim.AdamW(raw.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda")
    if data_on_device:
        images = images.to(device)
        labels = labels.to(device) if labels is not None else None
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    raw.to(memory_format=memory_format)
    noise = torch.Generator(device=device)
    step, loss_value, window = 0, float("nan"), []
    guide: tuple[int, dict[str, Tensor]] | None = None  # (step, EMA weights after it)
    if ck is None:
        _seed_rngs(cfg.seed, dist.rank, noise)
    else:
        ema.module.load_state_dict(ck["ema"])
        ema.num_updates = int(ck["ema_updates"])
        optimizer.load_state_dict(ck["optimizer"])
        step, loss_value = int(ck["step"]), float(ck["loss"])
        window = [float(v) for v in ck.get("log_window", [])]
        if "guide_ema" in ck:
            guide = (int(ck["guide_step"]), ck["guide_ema"])
        if cfg.guide_step and step >= cfg.guide_step and guide is None:
            raise ValueError(
                f"{resume_path} is past guide step {cfg.guide_step} but holds no guide snapshot "
                "(written without guide_at): give this configuration its own config_hash"
            )
        if guide is not None and guide[0] != cfg.guide_step:
            rank0_print(f"note: the guide snapshot of {resume_path} is from step {guide[0]}, "
                        f"not {cfg.guide_step} (steps changed); it is kept")
        ranks = ck["rng"]["ranks"]
        if len(ranks) == ws:
            _set_rng_state(ranks[dist.rank], device, noise)
        else:
            rank0_print(
                f"checkpoint was written by {len(ranks)} process(es), this run has {ws}: "
                "noise streams are re-seeded (the run is not bit-identical to an unbroken one)"
            )
            _seed_rngs(cfg.seed, dist.rank, noise, step)
        rank0_print(f"resuming from {resume_path} at step {step}")
        if step > cfg.steps:
            rank0_print(f"checkpoint step {step} is past steps={cfg.steps}; keeping it as is")
    forward = torch.compile(model, mode=cfg.compile_mode) if use_compile(cfg, device, ws) else model
    null_label = getattr(raw, "null_label", None)
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    last_ckpt: Path | None = resume_path

    def save_checkpoint() -> Path:
        rng = all_gather_object(_rng_state(device, noise))  # a collective: every rank calls it
        path = ckdir / checkpoint_name(step)
        if dist.is_main:
            state = {
                "format": CHECKPOINT_FORMAT,
                "step": step,
                "loss": loss_value,
                "log_window": list(window),
                "model_config": dict(getattr(raw, "config", None) or {}),
                "model": _cpu_state(raw),
                "ema": _cpu_state(ema.module),
                "ema_updates": ema.num_updates,
                "optimizer": optimizer.state_dict(),
                "rng": {"world_size": ws, "ranks": rng},
                "config_hash": config_hash,
                "process": _describe(process),
                "prediction": cfg.prediction,
                "train_config": dataclasses.asdict(cfg),
            }
            if guide is not None:
                state["guide_step"], state["guide_ema"] = guide
            save_atomic(state, path)
            prune_checkpoints(ckdir, cfg.keep_last)
        return path

    interrupted_by: int | None = None
    # losses and gradient norms wait on the device until the next check (NaN guard, logging)
    pending: list[Tensor] = []
    check_every = cfg.log_every if device.type == "cuda" else 1
    norm_value = float("nan")
    bar = tqdm(
        total=cfg.steps,
        initial=min(step, cfg.steps),
        disable=not (progress and dist.is_main),
        desc="train",
        dynamic_ncols=True,
    )
    try:
        with _StopOnSignal(dist.rank) as stop:
            for k in range(step, cfg.steps):
                idx = sampler.local_batch(k)
                x0 = images[idx].to(device, non_blocking=True)
                x0 = x0.contiguous(memory_format=memory_format)
                y = labels[idx.to(labels.device)].to(device) if labels is not None else None
                lr = lr_at(k, cfg.lr, cfg.warmup_steps, cfg.lr_decay, cfg.steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with autocast:
                    loss = denoising_loss(
                        forward,
                        process,
                        x0,
                        y,
                        prediction=cfg.prediction,
                        generator=noise,
                        p_uncond=cfg.p_uncond,
                        null_label=null_label,
                        weighting=cfg.loss_weighting,
                        min_snr_gamma=cfg.min_snr_gamma,
                        sigma_data=cfg.sigma_data,
                        t_sampling=cfg.t_sampling,
                        p_mean=cfg.p_mean,
                        p_std=cfg.p_std,
                        logit_mean=cfg.logit_mean,
                        logit_std=cfg.logit_std,
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), max_norm)
                pending.append(torch.stack([loss.detach().double(),
                                            grad_norm.detach().double().to(device)]))
                step = k + 1
                periodic = cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0
                checked = (step % check_every == 0 or periodic or step == cfg.steps
                           or (ws == 1 and stop.signum is not None))
                stop_sum = 0.0
                if checked:
                    # one read-back for the steps since the last check (every step on the CPU,
                    # every log_every steps on a GPU, where a read-back stalls the queue)
                    block = torch.stack(pending)
                    flag = torch.tensor([1.0 if stop.signum is not None else 0.0],
                                        dtype=torch.float64).to(device)
                    if ws > 1:  # sum: mean loss, same grad norm, any stop flag
                        tdist.all_reduce(block)
                        tdist.all_reduce(flag)
                    rows, stop_sum = block.tolist(), float(flag.item())
                    first = step - len(rows) + 1
                    pending = []
                    for j, (loss_sum, norm_sum) in enumerate(rows):
                        loss_value, norm_value = loss_sum / ws, norm_sum / ws
                        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
                            raise FloatingPointError(
                                f"non-finite loss {loss_value} (gradient norm {norm_value}) at "
                                f"step {first + j}; training stopped, the last good checkpoint "
                                f"is {last_ckpt}"
                            )
                        window.append(loss_value)
                optimizer.step()
                ema.update(raw)
                if step == cfg.guide_step and guide is None:  # a copy: .cpu() would alias
                    guide = (step, {k: v.detach().to("cpu", copy=True)
                                    for k, v in ema.module.state_dict().items()})
                bar.update(1)
                if checked:
                    bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
                if step % cfg.log_every == 0:
                    if on_log is not None and dist.is_main:
                        mean = sum(window) / len(window)
                        on_log(step, {"loss": mean, "lr": lr, "grad_norm": norm_value})
                    window = []
                stopping = stop_sum > 0 and step < cfg.steps
                if periodic or step == cfg.steps or stopping:
                    last_ckpt = save_checkpoint()
                if stopping:
                    signum = torch.tensor(stop.signum or 0, device=device)
                    if ws > 1:
                        tdist.all_reduce(signum, op=tdist.ReduceOp.MAX)
                    interrupted_by = int(signum.item())
                    rank0_print(
                        f"stopped by signal {interrupted_by} at step {step}; saved {last_ckpt}"
                    )
                    break
    finally:
        bar.close()

    written: Path | None = None
    if interrupted_by is None:
        if dist.is_main:
            save_atomic(_model_file(raw, ema, process, cfg, step, config_hash, guide),
                        model_path)
        written = model_path
    barrier()
    return TrainResult(
        step=step,
        loss=loss_value,
        checkpoint=last_ckpt,
        model_path=written,
        resumed=resume_path is not None,
        interrupted=interrupted_by is not None,
        signal=interrupted_by,
    )
